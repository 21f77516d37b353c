//! Answers that must come from the running server, not fixed values, through the real binary:
//! the models placed on each GPU (`GetResources`), a model's memory per device in KServe's
//! `ModelStatistics`, and KServe's `LogSettings` (read from the flags, changed at run time) and
//! `TraceSetting` (UNIMPLEMENTED, with the reason).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tonic::Code;
use veraltheim_proto::inference::{
    self as kserve, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use veraltheim_proto::v1::{
    self, model_service_client::ModelServiceClient, resource_service_client::ResourceServiceClient,
};

mod common;

use common::{channel, start};

const MIB: u64 = 1 << 20;

/// A load of a built-in with a memory claim, optionally pinned to GPUs with `KIND_GPU`.
async fn load(ch: &tonic::transport::Channel, name: &str, bytes: u64, gpus: Option<&[u32]>) {
    let group = match gpus {
        Some(ids) => {
            format!(r#","instance_group":[{{"kind":"KIND_GPU","count":1,"gpus":{ids:?}}}]"#)
        }
        None => String::new(),
    };
    let config =
        format!(r#"{{"parameters":{{"memory_bytes":{{"string_value":"{bytes}"}}}}{group}}}"#);
    let model = ModelServiceClient::new(ch.clone())
        .load_model(v1::LoadModelRequest {
            name: name.into(),
            config_json: config,
        })
        .await
        .unwrap_or_else(|e| panic!("load {name}: {e}"))
        .into_inner();
    assert_eq!(model.state, v1::ModelState::Ready as i32, "{model:?}");
}

async fn resources(ch: &tonic::transport::Channel) -> v1::ResourceSnapshot {
    ResourceServiceClient::new(ch.clone())
        .get_resources(v1::GetResourcesRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Each GPU's models as GetResources lists them, by index.
fn models_by_gpu(s: &v1::ResourceSnapshot) -> Vec<(u32, Vec<String>)> {
    s.gpus.iter().map(|g| (g.index, g.models.clone())).collect()
}

/// KServe's memory usage of a model: (type, id, bytes).
async fn memory_usage(ch: &tonic::transport::Channel, name: &str) -> Vec<(String, i64, u64)> {
    let stats = GrpcInferenceServiceClient::new(ch.clone())
        .model_statistics(kserve::ModelStatisticsRequest {
            name: name.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.model_stats.len(), 1, "{stats:?}");
    stats.model_stats[0]
        .memory_usage
        .iter()
        .map(|m| (m.r#type.clone(), m.id, m.byte_size))
        .collect()
}

#[tokio::test]
async fn gpus_list_the_models_placed_on_them_and_statistics_their_memory() {
    let s = start(&["--simulate-gpus", "2x16GiB"]).await;
    let ch = channel(&s).await;
    assert_eq!(
        models_by_gpu(&resources(&ch).await),
        [(0, vec![]), (1, vec![])],
        "nothing placed yet"
    );

    // identity must run on GPU 1 (not the first, which the allocator would pick on a tie);
    // cost stays on the CPU (a built-in's default).
    load(&ch, "identity", 256 * MIB, Some(&[1])).await;
    load(&ch, "cost", 3 * MIB, None).await;
    let snap = resources(&ch).await;
    assert_eq!(
        models_by_gpu(&snap),
        [(0, vec![]), (1, vec!["identity".to_string()])]
    );
    let placed = &snap.gpus[1].placed_models;
    assert_eq!(
        placed,
        &[v1::PlacedModel {
            name: "identity".into(),
            bytes: 256 * MIB,
            state: "READY".into(),
        }]
    );
    let model = ModelServiceClient::new(ch.clone())
        .get_model(v1::GetModelRequest {
            name: "identity".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(model.device, "gpu1", "the model's own view agrees");

    // Triton's memory_usage: one entry per device, with the bytes the allocator holds there.
    assert_eq!(
        memory_usage(&ch, "identity").await,
        [("GPU".to_string(), 1, 256 * MIB)]
    );
    assert_eq!(
        memory_usage(&ch, "cost").await,
        [("CPU".to_string(), 0, 3 * MIB)]
    );

    // Unloaded: on no GPU, and its memory is no longer held.
    ModelServiceClient::new(ch.clone())
        .unload_model(v1::UnloadModelRequest {
            name: "identity".into(),
        })
        .await
        .unwrap();
    let snap = resources(&ch).await;
    assert_eq!(models_by_gpu(&snap), [(0, vec![]), (1, vec![])]);
    assert!(
        snap.gpus.iter().all(|g| g.placed_models.is_empty()),
        "{snap:?}"
    );
}

/// A server whose stderr (the log) is read line by line.
struct Logged {
    child: Child,
    grpc: String,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Logged {
    /// The next log line, within 30 s (the test fails otherwise).
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the server wrote no more log lines")
    }
}

async fn start_logged(extra: &[&str]) -> Logged {
    let dir = tempfile::tempdir().unwrap();
    let grpc = format!("127.0.0.1:{}", common::free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .args(["serve", "--grpc-addr", &grpc])
        .args(["--http-addr", &format!("127.0.0.1:{}", common::free_port())])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--model-repository")
        .arg(dir.path().join("models"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let server = Logged {
        child,
        grpc,
        lines,
        _dir: dir,
    };
    let started = Instant::now();
    loop {
        if let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
            .unwrap()
            .connect()
            .await
        {
            let ready = v1::system_service_client::SystemServiceClient::new(ch)
                .health(v1::HealthRequest {})
                .await
                .is_ok_and(|r| r.into_inner().ready);
            if ready {
                return server;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

use kserve::log_settings_request::setting_value::ParameterChoice as In;
use kserve::log_settings_response::setting_value::ParameterChoice as Out;

async fn log_settings(
    ch: &tonic::transport::Channel,
    changes: &[(&str, In)],
) -> Result<HashMap<String, Out>, tonic::Status> {
    let settings = changes
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                kserve::log_settings_request::SettingValue {
                    parameter_choice: Some(v.clone()),
                },
            )
        })
        .collect();
    let answer = GrpcInferenceServiceClient::new(ch.clone())
        .log_settings(kserve::LogSettingsRequest { settings })
        .await?
        .into_inner();
    Ok(answer
        .settings
        .into_iter()
        .map(|(k, v)| (k, v.parameter_choice.expect("every setting has a value")))
        .collect())
}

fn expect(verbose: u32, info: bool, warning: bool, error: bool) -> HashMap<String, Out> {
    [
        ("log_verbose_level", Out::Uint32Param(verbose)),
        ("log_info", Out::BoolParam(info)),
        ("log_warning", Out::BoolParam(warning)),
        ("log_error", Out::BoolParam(error)),
        ("log_format", Out::StringParam("json".into())),
        ("log_file", Out::StringParam(String::new())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The JSON log line's field, if it is one.
fn field(line: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["fields"][name].as_str().map(str::to_string)
}

#[tokio::test]
async fn log_settings_answer_the_flags_and_change_the_running_log() {
    let s = start_logged(&["--log-level", "debug", "--log-format", "json"]).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // What the flags say (the old answer was verbose level 0 and format "default", always).
    assert_eq!(
        log_settings(&ch, &[]).await.unwrap(),
        expect(1, true, true, true)
    );

    // A change that leaves the levels as they are still writes its line: a mark in the log.
    log_settings(&ch, &[("log_error", In::BoolParam(true))])
        .await
        .unwrap();
    while field(&s.next_line(), "message").as_deref() != Some("log settings changed") {}

    // Quiet: no debug, no info. The answer and a later read say so.
    let quiet = log_settings(
        &ch,
        &[
            ("log_verbose_level", In::Uint32Param(0)),
            ("log_info", In::BoolParam(false)),
        ],
    )
    .await
    .unwrap();
    assert_eq!(quiet, expect(0, false, true, true));
    assert_eq!(log_settings(&ch, &[]).await.unwrap(), quiet);
    // A load now writes no info line...
    load(&ch, "identity", 0, None).await;
    // ...and with info back on, the next load does. Its line comes after everything the quiet
    // load could have written, none of which may name it.
    assert_eq!(
        log_settings(&ch, &[("log_info", In::BoolParam(true))])
            .await
            .unwrap(),
        expect(0, true, true, true)
    );
    load(&ch, "cost", 0, None).await;
    let mut before = Vec::new();
    loop {
        let line = s.next_line();
        if field(&line, "model").as_deref() == Some("cost")
            && field(&line, "state").as_deref() == Some("READY")
        {
            break;
        }
        before.push(line);
    }
    assert!(
        !before
            .iter()
            .any(|l| field(l, "model").as_deref() == Some("identity")),
        "the quiet load was logged: {before:#?}"
    );

    // Refused whole, naming the setting; nothing changes.
    for (changes, named) in [
        (
            vec![
                ("log_verbose_level", In::Uint32Param(2)),
                ("log_format", In::StringParam("ISO8601".into())),
            ],
            "log_format",
        ),
        (
            vec![("log_file", In::StringParam("/tmp/x.log".into()))],
            "log_file",
        ),
        (vec![("log_colour", In::BoolParam(true))], "log_colour"),
        (vec![("log_info", In::Uint32Param(1))], "log_info"),
    ] {
        let err = log_settings(&ch, &changes).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(named), "{err:?}");
    }
    assert_eq!(
        log_settings(&ch, &[]).await.unwrap(),
        expect(0, true, true, true)
    );

    // Trace settings: not implemented, said so with the reason, for a read and for a change.
    let mut client = GrpcInferenceServiceClient::new(ch.clone());
    for settings in [
        HashMap::new(),
        HashMap::from([(
            "trace_level".to_string(),
            kserve::trace_setting_request::SettingValue {
                value: vec!["TIMESTAMPS".into()],
            },
        )]),
    ] {
        let err = client
            .trace_setting(kserve::TraceSettingRequest {
                settings,
                model_name: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
        assert!(err.message().contains("LogSettings"), "{err:?}");
    }
}

/// Issue 17, item 4, through the real binary on simulated GPUs (fakes: no GPU here): a local
/// job that asks for a GPU and memory there is given the GPU with most room
/// (`CUDA_VISIBLE_DEVICES`), holds its memory in the models' budget while it runs (listed as a
/// job by GetResources and GetModelMemory, named when a model load needs the room), and frees
/// it when it ends.
#[tokio::test]
async fn a_gpu_job_holds_its_memory_beside_the_models_and_frees_it_at_its_end() {
    use veraltheim_proto::v1::job_service_client::JobServiceClient;
    const GIB: u64 = 1 << 30;
    let s = start(&["--simulate-gpus", "2x16GiB"]).await;
    let ch = channel(&s).await;
    // gpu0 holds a model: gpu1 has most room.
    load(&ch, "identity", 2 * GIB, Some(&[0])).await;
    let flag = s.dir().join("go");
    let script = format!(
        "echo \"[$CUDA_VISIBLE_DEVICES]\"; while [ ! -e {} ]; do sleep 0.05; done",
        flag.display()
    );
    let mut req = common::command("gpu", &["sh", "-c", &script]);
    req.spec.as_mut().unwrap().resources = Some(v1::Resources {
        gpus: 1,
        gpu_memory_bytes: 12 * GIB,
        ..Default::default()
    });
    let mut jobs = JobServiceClient::new(ch.clone());
    let id = jobs.submit_job(req).await.unwrap().into_inner().id;
    common::wait_for(&mut jobs, &id, v1::JobState::Running).await;
    let snap = resources(&ch).await;
    let held: Vec<(u32, Vec<(String, u64)>)> = snap
        .gpus
        .iter()
        .map(|g| {
            let jobs = g.jobs.iter().map(|j| (j.job_id.clone(), j.bytes)).collect();
            (g.index, jobs)
        })
        .collect();
    assert_eq!(held, [(0, vec![]), (1, vec![(id.clone(), 12 * GIB)])]);
    assert!(snap.gpus[1].models.is_empty(), "a job is not a model");
    let memory = ModelServiceClient::new(ch.clone())
        .get_model_memory(v1::GetModelMemoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let gpu1 = memory.devices.iter().find(|d| d.device == "gpu1").unwrap();
    assert_eq!(gpu1.jobs.len(), 1);
    assert_eq!(
        (gpu1.jobs[0].job_id.as_str(), gpu1.held_bytes),
        (id.as_str(), 12 * GIB)
    );
    assert!(gpu1.holders.is_empty(), "{gpu1:?}");
    // A model that needs gpu1's room is refused, naming the job.
    let err = ModelServiceClient::new(ch.clone())
        .load_model(v1::LoadModelRequest {
            name: "cost".into(),
            config_json: format!(
                r#"{{"parameters":{{"memory_bytes":{{"string_value":"{}"}}}},"instance_group":[{{"kind":"KIND_GPU","count":1,"gpus":[1]}}]}}"#,
                8 * GIB
            ),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message()
            .contains(&format!("job:{id} (12.0 GiB, not a model")),
        "{err}"
    );
    // The job ends: it saw its device, and its memory is free.
    std::fs::write(&flag, b"").unwrap();
    common::wait_for(&mut jobs, &id, v1::JobState::Succeeded).await;
    let out = s.dir().join("data/jobs").join(&id).join("attempt-1.stdout");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "[1]\n");
    let snap = resources(&ch).await;
    assert!(snap.gpus.iter().all(|g| g.jobs.is_empty()), "{snap:?}");
    load(&ch, "cost", 8 * GIB, Some(&[1])).await;
}

/// The same on a machine's real NVIDIA GPUs (NVML): a job asking for one GPU and 1 GiB there is
/// given a device the inventory lists, holds its memory on it while it runs, and frees it.
/// Needs a GPU: `cargo test -p veraltheim --test answers -- --ignored real_gpu`.
#[tokio::test]
#[ignore = "needs an NVIDIA GPU and its driver"]
async fn on_a_real_gpu_a_job_is_given_a_listed_device_and_holds_its_memory() {
    use veraltheim_proto::v1::job_service_client::JobServiceClient;
    let s = start(&[]).await;
    let ch = channel(&s).await;
    let snap = resources(&ch).await;
    assert!(
        !snap.gpus.is_empty(),
        "no GPU found: {}",
        snap.gpu_probe_error
    );
    let flag = s.dir().join("go");
    let script = format!(
        "echo \"$CUDA_VISIBLE_DEVICES\"; while [ ! -e {} ]; do sleep 0.05; done",
        flag.display()
    );
    let mut req = common::command("real-gpu", &["sh", "-c", &script]);
    req.spec.as_mut().unwrap().resources = Some(v1::Resources {
        gpus: 1,
        gpu_memory_bytes: 1 << 30,
        ..Default::default()
    });
    let mut jobs = JobServiceClient::new(ch.clone());
    let id = jobs.submit_job(req).await.unwrap().into_inner().id;
    common::wait_for(&mut jobs, &id, v1::JobState::Running).await;
    let snap = resources(&ch).await;
    let holding: Vec<u32> = snap
        .gpus
        .iter()
        .filter(|g| g.jobs.iter().any(|j| j.job_id == id && j.bytes == 1 << 30))
        .map(|g| g.index)
        .collect();
    assert_eq!(holding.len(), 1, "{snap:?}");
    std::fs::write(&flag, b"").unwrap();
    common::wait_for(&mut jobs, &id, v1::JobState::Succeeded).await;
    let out = s.dir().join("data/jobs").join(&id).join("attempt-1.stdout");
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        format!("{}\n", holding[0])
    );
    let snap = resources(&ch).await;
    assert!(snap.gpus.iter().all(|g| g.jobs.is_empty()), "{snap:?}");
}
