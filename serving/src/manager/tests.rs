use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::ManagerDeps;
use veraltheim_models::backend::BackendOptions;

fn manager() -> ModelManager {
    ModelManager::new(
        ManagerOptions {
            unload_grace: Duration::from_secs(5),
            fault_injection: true,
            ..ManagerOptions::default()
        },
        ManagerDeps::detached(ExecutionPool::new(1).unwrap()),
    )
    .unwrap()
}

#[tokio::test]
async fn state_changes_are_published_in_order() {
    let m = manager();
    let mut sub = m
        .bus
        .subscribe(
            "models.cost.>",
            veraltheim_bus::SubscribeOptions::new(16, veraltheim_bus::WhenFull::Reject),
        )
        .unwrap();
    m.load("cost", None).await.unwrap();
    m.unload("cost").await.unwrap();
    let mut states = Vec::new();
    for _ in 0..4 {
        let e = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap_or_else(|_| panic!("only got {states:?}"))
            .unwrap();
        states.push(e.attributes["state"].clone());
    }
    assert_eq!(states, ["LOADING", "READY", "UNLOADING", "NOT_LOADED"]);
}

#[tokio::test]
async fn load_unload_reload_cycle() {
    let m = manager();
    assert!(matches!(m.worker("cost"), Err(Error::NotReady { .. })));
    let info = m.load("cost", None).await.unwrap();
    assert_eq!(info.state, ModelState::Ready);
    assert!(m.worker("cost").is_ok());
    let info = m
        .load("cost", Some(r#"{"max_batch_size": 8}"#))
        .await
        .unwrap();
    assert_eq!(info.config.max_batch_size, 8);
    assert_eq!(m.worker("cost").unwrap().config().max_batch_size, 8);
    let info = m.unload("cost").await.unwrap();
    assert_eq!(info.state, ModelState::NotLoaded);
    assert!(m.worker("cost").is_err());
}

#[tokio::test]
async fn a_bad_reload_keeps_the_old_version_serving() {
    let m = manager();
    m.load("cost", None).await.unwrap();
    let err = m
        .load(
            "cost",
            Some(r#"{"parameters":{"base_us":{"string_value":"slow"}}}"#),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("base_us"), "{err}");
    assert_eq!(m.info("cost").unwrap().state, ModelState::Ready);
    assert_eq!(m.worker("cost").unwrap().config().max_batch_size, 64);
    let err = m.load("cost", Some("not json")).await.unwrap_err();
    assert!(matches!(err, Error::BadConfig { .. }));
}

#[tokio::test]
async fn a_failed_first_load_is_failed_with_its_reason() {
    let m = manager();
    let err = m
        .load(
            "cost",
            Some(r#"{"parameters":{"per_item_us":{"string_value":"x"}}}"#),
        )
        .await
        .unwrap_err();
    // The caller's own config: INVALID_ARGUMENT naming the parameter, not INTERNAL.
    assert!(matches!(err, Error::BadConfig { .. }), "{err:?}");
    assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
    let info = m.info("cost").unwrap();
    assert_eq!(info.state, ModelState::Failed);
    assert!(info.reason.contains("per_item_us"));
    assert!(matches!(
        m.load("nope", None).await,
        Err(Error::NotFound(_))
    ));
}

struct Repo(std::path::PathBuf);

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A repository of built-in-backed models: (name, builtin, memory_bytes, extra config JSON
/// fields, version folders, bytes of files in the last version).
/// (name, builtin, memory_bytes, extra config JSON, version folders, bytes in the last).
type RepoModelSpec<'a> = (&'a str, &'a str, u64, &'a str, &'a [u64], usize);

fn repo(models: &[RepoModelSpec<'_>]) -> Repo {
    static N: AtomicU64 = AtomicU64::new(0);
    let root = std::env::temp_dir().join(format!(
        "veraltheim-manager-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    for (name, kind, memory, extra, versions, file_bytes) in models {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = builtin::config(kind).unwrap();
        config.name = String::new();
        config.parameters.insert(
            "builtin".into(),
            veraltheim_models::config::Parameter {
                string_value: kind.to_string(),
            },
        );
        config.parameters.insert(
            "memory_bytes".into(),
            veraltheim_models::config::Parameter {
                string_value: memory.to_string(),
            },
        );
        let mut json: serde_json::Value = serde_json::from_str(&config.to_json()).unwrap();
        let extra: serde_json::Value =
            serde_json::from_str(if extra.is_empty() { "{}" } else { extra }).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            json[k] = v.clone();
        }
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        for v in *versions {
            std::fs::create_dir_all(dir.join(v.to_string())).unwrap();
        }
        if let Some(last) = versions.last() {
            std::fs::write(
                dir.join(last.to_string()).join("weights"),
                vec![0u8; *file_bytes],
            )
            .unwrap();
        }
    }
    Repo(root)
}

fn with_repo(repo: &Repo, cpu_bytes: u64) -> ModelManager {
    ModelManager::new(
        ManagerOptions {
            unload_grace: Duration::from_secs(5),
            repository: Some(repo.0.clone()),
            budgets: vec![Budget::new(DeviceId::Cpu, cpu_bytes, 0)],
            size_factor: 1.0,
            ..ManagerOptions::default()
        },
        ManagerDeps::detached(ExecutionPool::new(1).unwrap()),
    )
    .unwrap()
}

/// An identity model that must run on a GPU and claims `bytes` there.
fn on_gpu(bytes: u64) -> String {
    format!(
        r#"{{"instance_group":[{{"kind":"KIND_GPU","count":1}}],"parameters":{{"memory_bytes":{{"string_value":"{bytes}"}}}}}}"#
    )
}

/// One FP32 row through the one inference edge; the answer's values.
async fn echo(
    inference: &crate::Inference,
    model: &str,
    values: &[f32],
) -> Result<Vec<f32>, Error> {
    let input = veraltheim_models::Tensor::from_f32("INPUT0", vec![1, values.len()], values)
        .expect("a valid tensor");
    let out = inference
        .infer(crate::InferCall {
            model: model.into(),
            version: String::new(),
            id: "late-gpu".into(),
            inputs: vec![input],
            outputs: Vec::new(),
            priority: 0,
            timeout: None,
            deadline: None,
            received: Instant::now(),
            trace: None,
            background: false,
        })
        .await?;
    Ok(out.outputs[0].f32_values().expect("FP32 output"))
}

#[tokio::test]
async fn a_gpu_that_appears_after_start_takes_a_model_and_a_lost_one_takes_none() {
    const MODEL: u64 = 512 << 20;
    let m = Arc::new(
        ModelManager::new(
            ManagerOptions {
                gpu_reserve_bytes: 1 << 30,
                // Simulated GPUs, so that a built-in may be placed on one.
                backend: BackendOptions {
                    simulated_gpus: true,
                    ..BackendOptions::default()
                },
                ..ManagerOptions::default()
            },
            ManagerDeps::detached(ExecutionPool::new(1).unwrap()),
        )
        .unwrap(),
    );
    let inference = crate::Inference::new(m.clone(), crate::ResponseCache::new(0, None));
    let gpu0 = |m: &ModelManager| {
        m.memory()
            .into_iter()
            .find(|u| u.device == DeviceId::Gpu(0))
    };
    assert!(gpu0(&m).is_none(), "no GPU at start");
    // With no GPU, a model that must run on one has nowhere to go.
    let err = m.load("identity", Some(&on_gpu(MODEL))).await.unwrap_err();
    assert!(err.to_string().contains("any gpu"), "{err}");

    let gpu = GpuInfo {
        index: 0,
        name: "late".into(),
        memory_total_bytes: 16 << 30,
        memory_used_bytes: 2 << 30,
        simulated: true,
        ..GpuInfo::default()
    };
    m.follow_gpus(std::slice::from_ref(&gpu));
    let usage = gpu0(&m).expect("the GPU that appeared has a budget");
    assert_eq!(usage.reserve_bytes, 1 << 30);
    // Capacity less what others hold (2 GiB), less the reserve.
    assert_eq!(usage.budget_bytes, (16 << 30) - (2 << 30) - (1 << 30));

    // It takes the model: placed, charged and serving there.
    let info = m.load("identity", Some(&on_gpu(MODEL))).await.unwrap();
    assert_eq!(info.state, ModelState::Ready);
    assert_eq!(info.device, Some(DeviceId::Gpu(0)));
    assert_eq!(info.memory_bytes, MODEL);
    let usage = gpu0(&m).unwrap();
    assert_eq!(usage.charged_bytes, MODEL);
    assert_eq!(
        usage
            .holders
            .iter()
            .map(|h| key_model(&h.model))
            .collect::<Vec<_>>(),
        ["identity"]
    );
    assert_eq!(m.memory_of("identity"), [(DeviceId::Gpu(0), MODEL)]);
    let cpu = m
        .memory()
        .into_iter()
        .find(|u| u.device == DeviceId::Cpu)
        .unwrap();
    assert!(cpu.holders.is_empty(), "nothing on the CPU: {cpu:?}");
    assert_eq!(
        echo(&inference, "identity", &[1.0, 2.0]).await.unwrap(),
        [1.0, 2.0]
    );

    // Lost: the GPU gets no budget, so nothing new is placed there.
    m.follow_gpus(&[GpuInfo {
        lost: true,
        memory_used_bytes: 0,
        ..gpu.clone()
    }]);
    let usage = gpu0(&m).unwrap();
    assert_eq!(usage.budget_bytes, 0);
    let err = m.load("cost", Some(&on_gpu(1 << 20))).await.unwrap_err();
    assert!(err.to_string().contains("any gpu"), "{err}");
    assert_eq!(m.info("cost").unwrap().device, None);
    // The model already there is not silently forgotten: it keeps its charge on gpu0, shown as
    // over-committed. The manager does not unload it by itself (it cannot tell whether the
    // backend survived; a built-in on a simulated GPU does): it stays READY until unloaded.
    assert_eq!(usage.charged_bytes, MODEL);
    assert_eq!(usage.over_committed_bytes, MODEL);
    assert_eq!(m.info("identity").unwrap().state, ModelState::Ready);
    assert_eq!(m.memory_of("identity"), [(DeviceId::Gpu(0), MODEL)]);
    assert_eq!(echo(&inference, "identity", &[3.0]).await.unwrap(), [3.0]);
    m.unload("identity").await.unwrap();
    let usage = gpu0(&m).unwrap();
    assert!(
        usage.holders.is_empty() && usage.over_committed_bytes == 0,
        "{usage:?}"
    );
    assert!(m.memory_of("identity").is_empty());

    // Back again: it takes models again.
    m.follow_gpus(std::slice::from_ref(&gpu));
    let info = m.load("identity", Some(&on_gpu(MODEL))).await.unwrap();
    assert_eq!(info.device, Some(DeviceId::Gpu(0)));
}

#[tokio::test]
async fn repository_models_serve_their_latest_version() {
    let r = repo(&[
        ("a", "identity", 10, "", &[1, 2], 0),
        (
            "pinned_v1",
            "identity",
            10,
            r#"{"version_policy":{"specific":{"versions":[1]}}}"#,
            &[1, 2],
            0,
        ),
    ]);
    let m = with_repo(&r, 1000);
    assert!(m.names().contains(&"a".to_string()));
    let info = m.load("a", None).await.unwrap();
    assert_eq!(info.version, "2");
    assert_eq!(info.versions, [1, 2]);
    assert_eq!(info.device, Some(DeviceId::Cpu));
    assert_eq!(info.memory_bytes, 10);
    assert!(m.check_version("a", "2").is_ok());
    assert!(matches!(
        m.check_version("a", "1"),
        Err(Error::NoSuchVersion { serving: 2, .. })
    ));
    assert_eq!(m.load("pinned_v1", None).await.unwrap().version, "1");
    // A new version folder serves at the next load.
    std::fs::create_dir_all(r.0.join("a/3")).unwrap();
    assert_eq!(m.load("a", None).await.unwrap().version, "3");
}

#[tokio::test]
async fn eviction_is_least_recently_used_and_spares_pinned_and_busy_models() {
    let r = repo(&[
        ("a", "identity", 100, r#"{"pinned": true}"#, &[1], 0),
        ("b", "identity", 100, "", &[1], 0),
        ("c", "identity", 100, "", &[1], 0),
        ("d", "identity", 100, "", &[1], 0),
    ]);
    let m = with_repo(&r, 300);
    for name in ["a", "b", "c"] {
        m.load(name, None).await.unwrap();
    }
    // b is used after c: c is now the least recently used unpinned model.
    drop(m.acquire("b").unwrap());
    m.load("d", None).await.unwrap();
    let c = m.info("c").unwrap();
    assert_eq!(c.state, ModelState::NotLoaded);
    assert!(
        c.reason.contains("evicted to make room for 'd'"),
        "{}",
        c.reason
    );
    assert_eq!(m.info("a").unwrap().state, ModelState::Ready);
    assert_eq!(m.info("b").unwrap().state, ModelState::Ready);
    // With b and d busy and a pinned, nothing can make room for c.
    let _b = m.acquire("b").unwrap();
    let _d = m.acquire("d").unwrap();
    let err = m.load("c", None).await.unwrap_err();
    assert!(matches!(err, Error::NoRoom { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("cpu budget") && msg.contains("pinned"),
        "{msg}"
    );
    assert_eq!(m.info("c").unwrap().state, ModelState::Failed);
    let held: u64 = m.memory().iter().map(|d| d.held_bytes).sum();
    assert_eq!(held, 300);
}

#[tokio::test]
async fn a_model_too_big_for_the_budget_is_refused_by_its_estimate() {
    let r = repo(&[("big", "identity", 0, "", &[1], 4096)]);
    let m = with_repo(&r, 1024);
    let err = m.load("big", None).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NoRoom { .. }), "{msg}");
    assert!(
        msg.contains("4.00 KiB") && msg.contains("cpu budget"),
        "{msg}"
    );
    assert!(m.memory()[0].holders.is_empty());
}

#[tokio::test]
async fn load_on_demand_loads_at_the_first_request_only_when_allowed() {
    let r = repo(&[
        (
            "lazy",
            "identity",
            0,
            r#"{"load_on_demand": true}"#,
            &[1],
            0,
        ),
        ("strict", "identity", 0, "", &[1], 0),
    ]);
    let m = with_repo(&r, 1000);
    let (worker, _hold) = m
        .acquire_or_load("lazy", Some(Instant::now() + Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(worker.name(), "lazy");
    assert_eq!(m.info("lazy").unwrap().state, ModelState::Ready);
    assert!(matches!(
        m.acquire_or_load("strict", None).await,
        Err(Error::NotReady { .. })
    ));
}

#[tokio::test]
async fn many_first_requests_cause_one_load() {
    let r = repo(&[(
        "lazy",
        "identity",
        0,
        r#"{"load_on_demand": true}"#,
        &[1],
        0,
    )]);
    let m = Arc::new(with_repo(&r, 1000));
    let mut sub = m
        .bus
        .subscribe(
            "models.lazy.state",
            veraltheim_bus::SubscribeOptions::new(64, veraltheim_bus::WhenFull::Reject),
        )
        .unwrap();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let m = m.clone();
            tokio::spawn(async move { m.acquire_or_load("lazy", None).await.map(|_| ()) })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let mut states = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
        states.push(e.attributes["state"].clone());
    }
    assert_eq!(
        states,
        ["LOADING", "READY"],
        "one load, not one per request"
    );
}

#[tokio::test]
async fn broken_folders_are_listed_with_their_reason_and_fail_to_load() {
    let r = repo(&[("ok", "identity", 0, "", &[1], 0)]);
    std::fs::create_dir_all(r.0.join("broken")).unwrap();
    std::fs::write(r.0.join("broken/config.json"), "{oops").unwrap();
    let m = with_repo(&r, 1000);
    let broken = m.info("broken").unwrap();
    assert!(
        broken.reason.contains("not valid JSON"),
        "{}",
        broken.reason
    );
    let err = m.load("broken", None).await.unwrap_err();
    assert!(err.to_string().contains("not valid JSON"), "{err}");
    assert_eq!(m.info("broken").unwrap().state, ModelState::Failed);
    // Fixed on disk: the next load reads it again.
    std::fs::write(
        r.0.join("broken/config.json"),
        std::fs::read_to_string(r.0.join("ok/config.json")).unwrap(),
    )
    .unwrap();
    std::fs::create_dir_all(r.0.join("broken/1")).unwrap();
    assert_eq!(
        m.load("broken", None).await.unwrap().state,
        ModelState::Ready
    );
}
/// A repository model backed by the built-in `cost` whose warm-up sleeps `warmup_ms`: a backend
/// whose build blocks (it cannot be interrupted) for that long.
fn slow_model_extra(warmup_ms: u64, memory: u64) -> String {
    format!(
        r#"{{"parameters": {{"builtin": {{"string_value": "cost"}}, "memory_bytes": {{"string_value": "{memory}"}},
             "busy": {{"string_value": "sleep"}}, "base_us": {{"string_value": "{}"}}, "per_item_us": {{"string_value": "0"}}}},
            "model_warmup": [{{"name": "slow", "batch_size": 1,
             "inputs": {{"INPUT0": {{"data_type": "TYPE_FP32", "dims": [4], "zero_data": true}}}}}}]}}"#,
        warmup_ms * 1000
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_load_keeps_its_reservation_and_slot_until_the_build_ends() {
    let slow = slow_model_extra(3000, 100);
    let r = repo(&[
        ("slow", "cost", 100, &slow, &[1], 100),
        ("other", "identity", 100, "", &[1], 100),
    ]);
    let m = ModelManager::new(
        ManagerOptions {
            repository: Some(r.0.clone()),
            budgets: vec![Budget::new(DeviceId::Cpu, 150, 0)],
            size_factor: 1.0,
            max_concurrent_loads: 1,
            load_timeout: Duration::from_millis(300),
            ..ManagerOptions::default()
        },
        ManagerDeps::detached(ExecutionPool::new(1).unwrap()),
    )
    .unwrap();
    let err = m.load("slow", None).await.unwrap_err();
    assert!(matches!(err, Error::LoadTimeout { .. }), "{err}");
    assert_eq!(err.kind(), crate::ErrorKind::DeadlineExceeded);
    assert_eq!(m.info("slow").unwrap().state, ModelState::Failed);
    // Reported at once, while the build (3 s) still runs: its reservation still counts against
    // the budget, and its load slot is still taken, so another load waits for the slot and
    // gives up.
    let cpu = |m: &ModelManager| m.memory()[0].clone();
    assert_eq!(cpu(&m).held_bytes, 100, "{:?}", cpu(&m));
    let err = m.load("other", None).await.unwrap_err();
    assert!(matches!(err, Error::LoadSlots { max: 1, .. }), "{err}");
    assert!(cpu(&m).held_bytes <= cpu(&m).budget_bytes);
    // Once the build ends, both are free again, and the half-built model is gone.
    let until = Instant::now() + Duration::from_secs(20);
    while cpu(&m).held_bytes != 0 {
        assert!(Instant::now() < until, "the reservation was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cpu(&m).holders.is_empty(), "{:?}", cpu(&m));
    let info = m.load("other", None).await.unwrap();
    assert_eq!(info.state, ModelState::Ready);
    assert_eq!(info.memory_bytes, 100);
    assert_eq!(m.info("slow").unwrap().state, ModelState::Failed);
}

#[tokio::test]
async fn the_charge_says_how_it_was_found() {
    let r = repo(&[("a", "identity", 64, "", &[1], 10)]);
    let m = with_repo(&r, 1000);
    let info = m.load("a", None).await.unwrap();
    let memory = info.memory.expect("a loaded model has a charge");
    // Built-ins report their claim; the estimate (files × size_factor) stays beside it.
    assert_eq!(memory.how, Measurement::Reported);
    assert_eq!(memory.charged_bytes, 64);
    assert_eq!(memory.estimate_bytes, 10);
    assert_eq!(info.memory_bytes, 64);
    m.unload("a").await.unwrap();
    assert_eq!(m.info("a").unwrap().memory, None);
}

#[tokio::test]
async fn loads_beyond_the_limits_are_refused_as_the_callers_config_by_name() {
    let m = manager();
    // Each case failed before: accepted (instances, queue delay, cost), or aborted the process
    // (warm-up dims), or answered INTERNAL (a parameter value).
    let cases = [
        (
            r#"{"instance_group":[{"count":8,"kind":"KIND_CPU"}]}"#,
            "instance_group",
        ),
        (
            r#"{"dynamic_batching":{"max_queue_delay_microseconds":"9223372036854775808"}}"#,
            "max_queue_delay_microseconds",
        ),
        (
            r#"{"parameters":{"base_us":{"string_value":"3600000000"},"busy":{"string_value":"sleep"}}}"#,
            "limits.max_builtin_cost_us",
        ),
        (
            r#"{"model_warmup":[{"name":"w","inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[1125899906842624],"zero_data":true}}}]}"#,
            "limits.max_tensor_elements",
        ),
        (
            r#"{"model_warmup":[{"name":"w","count":2147483648,"inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[1],"zero_data":true}}}]}"#,
            "limits.max_warmup_count",
        ),
        (r#"{"max_batch_sise":8}"#, "max_batch_sise"),
        (r#"{"backend":"onnxruntime"}"#, "backend"),
    ];
    for (over, field) in cases {
        let err = m.load("cost", Some(over)).await.unwrap_err();
        assert_eq!(
            err.kind(),
            crate::ErrorKind::InvalidArgument,
            "{over}: {err}"
        );
        assert!(
            err.to_string().contains(field),
            "{over}: {err} should name {field}"
        );
    }
    // The pool has one thread here: one instance loads.
    m.load(
        "cost",
        Some(r#"{"instance_group":[{"count":1,"kind":"KIND_CPU"}]}"#),
    )
    .await
    .unwrap();
}

/// A manager with one simulated GPU of `gpu_bytes` (and room on the CPU), so that built-ins
/// may be placed on it.
fn with_gpu(gpu_bytes: u64) -> ModelManager {
    ModelManager::new(
        ManagerOptions {
            unload_grace: Duration::from_secs(5),
            budgets: vec![
                Budget::new(DeviceId::Cpu, 64 << 30, 0),
                Budget::new(DeviceId::Gpu(0), gpu_bytes, 0),
            ],
            backend: BackendOptions {
                simulated_gpus: true,
                ..BackendOptions::default()
            },
            ..ManagerOptions::default()
        },
        ManagerDeps::detached(ExecutionPool::new(1).unwrap()),
    )
    .unwrap()
}

use veraltheim_models::allocator::ExternalSize;

#[tokio::test]
async fn a_jobs_gpu_memory_blocks_a_model_load_that_needs_it_and_is_listed_as_a_job() {
    const GIB: u64 = 1 << 30;
    let m = with_gpu(16 * GIB);
    let given = m
        .reserve_job_gpus("17", 1, ExternalSize::Bytes(12 * GIB))
        .unwrap();
    assert_eq!(given.gpus, [0]);
    assert!(given.evicted.is_empty());
    assert_eq!(m.job_gpus("17"), [0]);
    assert_eq!(
        m.job_holders(),
        [JobHeld {
            job_id: "17".into(),
            device: DeviceId::Gpu(0),
            bytes: 12 * GIB
        }]
    );
    // A job is not a model: it is in no model's placements.
    assert!(m.placements().is_empty(), "{:?}", m.placements());
    // A model that needs more than what is left is refused, naming the job.
    let err = m
        .load("identity", Some(&on_gpu(8 * GIB)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoRoom { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("gpu0 budget 16.0 GiB")
            && msg.contains("job:17 (12.0 GiB, not a model, never evicted)"),
        "{msg}"
    );
    // One that fits beside it loads.
    m.load("cost", Some(&on_gpu(2 * GIB))).await.unwrap();
    assert_eq!(m.memory_of("cost"), [(DeviceId::Gpu(0), 2 * GIB)]);
    // The job ends: its memory is free and the model loads.
    assert!(m.release_job_gpus("17"));
    assert!(!m.release_job_gpus("17"));
    assert!(m.job_gpus("17").is_empty() && m.job_holders().is_empty());
    let info = m.load("identity", Some(&on_gpu(8 * GIB))).await.unwrap();
    assert_eq!(info.device, Some(DeviceId::Gpu(0)));
}

#[tokio::test]
async fn a_jobs_reservation_evicts_idle_models_but_never_pinned_or_busy_ones() {
    const GIB: u64 = 1 << 30;
    let m = with_gpu(16 * GIB);
    let pinned = r#"{"instance_group":[{"kind":"KIND_GPU","count":1}],"pinned":true,"parameters":{"memory_bytes":{"string_value":"6442450944"}}}"#;
    m.load("identity", Some(pinned)).await.unwrap();
    m.load("cost", Some(&on_gpu(6 * GIB))).await.unwrap();
    // 4 GiB free; the job needs 8: the idle "cost" goes, the pinned "identity" stays.
    let given = m
        .reserve_job_gpus("5", 1, ExternalSize::Bytes(8 * GIB))
        .unwrap();
    assert_eq!(given.gpus, [0]);
    assert_eq!(given.evicted.len(), 1);
    assert_eq!(key_model(&given.evicted[0]), "cost");
    m.unload_evicted(&given.evicted, "5").await;
    let cost = m.info("cost").unwrap();
    assert_eq!(cost.state, ModelState::NotLoaded);
    assert!(
        cost.reason.contains("evicted to make room for 'job:5'"),
        "{}",
        cost.reason
    );
    assert_eq!(m.info("identity").unwrap().state, ModelState::Ready);
    let gpu0 = m
        .memory()
        .into_iter()
        .find(|u| u.device == DeviceId::Gpu(0))
        .unwrap();
    assert_eq!((gpu0.held_bytes, gpu0.external_bytes), (14 * GIB, 8 * GIB));
    assert!(m.release_job_gpus("5"));

    // A busy model is not evicted either: with "cost" loaded again and a request on it, a job
    // that needs its room is refused, and nothing is evicted.
    m.load("cost", Some(&on_gpu(6 * GIB))).await.unwrap();
    let hold = m.acquire("cost").unwrap();
    let err = m
        .reserve_job_gpus("6", 1, ExternalSize::Bytes(8 * GIB))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("'job:6' needs 8.00 GiB on each of 1 device(s) but 0 can hold it now")
            && msg.contains("1 request in flight")
            && msg.contains("pinned"),
        "{msg}"
    );
    assert!(m.job_gpus("6").is_empty());
    drop(hold);
    assert_eq!(m.info("cost").unwrap().state, ModelState::Ready);
    // A whole GPU: every idle model there goes, the pinned one keeps it from fitting.
    let err = m
        .reserve_job_gpus("7", 1, ExternalSize::WholeDevice)
        .unwrap_err();
    assert!(err.to_string().contains("needs a whole device"), "{err}");
    m.unload("identity").await.unwrap();
    let given = m
        .reserve_job_gpus("7", 1, ExternalSize::WholeDevice)
        .unwrap();
    m.unload_evicted(&given.evicted, "7").await;
    assert_eq!(m.info("cost").unwrap().state, ModelState::NotLoaded);
    let err = m.load("cost", Some(&on_gpu(1))).await.unwrap_err();
    assert!(err.to_string().contains("job:7 (16.0 GiB"), "{err}");
}

#[tokio::test]
async fn latency_objectives_come_from_the_options_and_bad_ones_are_refused_by_name() {
    let m = ModelManager::new(
        ManagerOptions {
            latency_slo_ms: [("identity".to_string(), 40)].into_iter().collect(),
            ..ManagerOptions::default()
        },
        ManagerDeps::detached(ExecutionPool::new(1).unwrap()),
    )
    .unwrap();
    m.load("identity", None).await.unwrap();
    let slo = m.worker("identity").unwrap().slo().expect("an objective");
    assert_eq!(slo.objective, Duration::from_millis(40));
    // A load's override replaces it; `cost` has none.
    m.load(
        "identity",
        Some(r#"{"parameters":{"latency_slo_p99_ms":{"string_value":"7"}}}"#),
    )
    .await
    .unwrap();
    let slo = m.worker("identity").unwrap().slo().unwrap();
    assert_eq!(slo.objective, Duration::from_millis(7));
    m.load("cost", None).await.unwrap();
    assert!(m.worker("cost").unwrap().slo().is_none());
    for (key, value) in [
        ("latency_slo_p99_ms", "soon"),
        ("background_max_in_flight", "0"),
        ("background_priority_levels", "1,x"),
    ] {
        let err = m
            .load(
                "cost",
                Some(&format!(
                    r#"{{"parameters":{{"latency_slo_p99_ms":{{"string_value":"5"}},"{key}":{{"string_value":"{value}"}}}}}}"#
                )),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err}");
    }
    // The refused reloads left the running version serving, without an objective.
    assert!(m.worker("cost").unwrap().slo().is_none());
}
