//! The Kubernetes executor with the runner, against the FAKE Kubernetes API server
//! ([`super::fake`]); and, `#[ignore]`d, against a real cluster named by `KUBECONFIG` (without
//! it they fail, saying what they need).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use veraltheim_storage::MemoryStore;
use veraltheim_supervisor::BreakerConfig;

use super::fake::FakeKube;
use super::*;
use crate::job::{JobKind, JobSpec, JobState, Resources};
use crate::runner::{Runner, RunnerConfig, RunnerError};
use crate::scheduler::{QueueConfig, Quota, RetryPolicy, SchedulerConfig};
use crate::store::{JobRecord, JobStore};

const NS: &str = "batch-jobs";

fn kube_config(url: &str) -> KubernetesConfig {
    KubernetesConfig {
        api_url: url.to_owned(),
        namespace: NS.into(),
        service_account: "job-runner".into(),
        node_selector: BTreeMap::from([("pool".into(), "batch".into())]),
        tolerations: vec![Toleration {
            key: "nvidia.com/gpu".into(),
            operator: "Exists".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }],
        ttl_seconds_after_finished: Some(600),
        default_image: String::new(),
        run_as_user: 1000,
        run_as_group: 3000,
        breaker: BreakerConfig::new(3, Duration::from_millis(500), Duration::from_secs(2)),
        api_retries: 2,
        api_retry_min_delay: Duration::from_millis(10),
        api_retry_max_delay: Duration::from_millis(50),
        log_poll: Duration::from_millis(50),
        max_log_bytes: crate::local::DEFAULT_MAX_LOG_BYTES,
    }
}

fn runner_config() -> RunnerConfig {
    RunnerConfig {
        scheduler: SchedulerConfig {
            capacity: Resources {
                cpu_millis: 8000,
                memory_bytes: 1 << 34,
                gpus: 2,
                gpu_memory_bytes: 0,
            },
            queues: vec![QueueConfig {
                name: "default".into(),
                weight: 1,
                quota: Quota::default(),
            }],
            priority_classes: vec![],
        },
        retry: RetryPolicy {
            initial_delay_ms: 20,
            max_delay_ms: 100,
            max_infra_retries: 2,
        },
        max_running: 4,
        jitter_seed: 7,
    }
}

fn spec(name: &str, script: &str, max_retries: u32) -> JobSpec {
    JobSpec {
        name: name.into(),
        queue: "default".into(),
        priority_class: String::new(),
        resources: Resources {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            gpus: 1,
            gpu_memory_bytes: 0,
        },
        max_retries,
        deadline_seconds: None,
        ttl_seconds_after_finished: None,
        labels: BTreeMap::new(),
        idempotency_key: None,
        owner: None,
        pausable: None,
        kind: JobKind::Command {
            image: "busybox:1.36".into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::from([("GREETING".into(), "hello".into())]),
            working_dir: "/work".into(),
            writable_root: false,
        },
    }
}

type TestRunner = Runner<Arc<MemoryStore>>;

/// A runner on the Kubernetes executor, its loop running until the returned token is cancelled.
async fn runner_on(
    store: Arc<MemoryStore>,
    config: KubernetesConfig,
) -> (TestRunner, KubernetesExecutor, CancellationToken) {
    let exec = KubernetesExecutor::connect(config).await.unwrap();
    let runner = Runner::new(JobStore::new(store), exec.clone(), runner_config()).unwrap();
    runner.start().await.unwrap();
    let shutdown = CancellationToken::new();
    {
        let runner = runner.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { runner.run(shutdown).await });
    }
    (runner, exec, shutdown)
}

async fn wait_for(
    runner: &TestRunner,
    id: &str,
    what: &str,
    pred: impl Fn(&JobRecord) -> bool,
) -> JobRecord {
    for _ in 0..600 {
        let rec = runner.store().get(id).unwrap();
        if pred(&rec) {
            return rec;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let rec = runner.store().get(id).unwrap();
    panic!("job {id} never got {what}: {rec:#?}");
}

async fn until(what: &str, mut pred: impl FnMut() -> bool) {
    for _ in 0..600 {
        if pred() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never: {what}");
}

fn jobs_of(fake: &FakeKube, id: &str) -> Vec<Job> {
    fake.jobs(NS)
        .into_iter()
        .filter(|j| label(j, LABEL_JOB_ID).as_deref() == Some(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_a_job_runs_to_succeeded_as_one_batch_v1_job() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let mut s = spec("embed-nightly", "echo hello; sleep 0.2; echo done", 0);
    s.deadline_seconds = Some(120);
    let id = runner.submit(s).await.unwrap().id;
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:#?}");
    assert_eq!((rec.attempt, rec.exit_code), (1, Some(0)));
    assert!(
        rec.history
            .iter()
            .any(|h| h.reason == format!("running (Kubernetes Job {NS}/vt-{id}-1)")),
        "{rec:#?}"
    );

    // The Job as the API server got it.
    let jobs = jobs_of(&fake, &id);
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job.metadata.name.as_deref(), Some(&*format!("vt-{id}-1")));
    let labels = job.metadata.labels.clone().unwrap();
    assert_eq!(labels[LABEL_JOB_ID], id);
    assert_eq!(labels[LABEL_ATTEMPT], "1");
    assert_eq!(labels[LABEL_JOB_NAME], "embed-nightly");
    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    assert_eq!(spec.active_deadline_seconds, Some(120));
    assert_eq!(spec.ttl_seconds_after_finished, Some(600));
    let template_labels = spec.template.metadata.as_ref().unwrap().labels.clone();
    assert_eq!(template_labels.unwrap()[LABEL_JOB_ID], id);
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.service_account_name.as_deref(), Some("job-runner"));
    assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "batch");
    let toleration = &pod.tolerations.as_ref().unwrap()[0];
    assert_eq!(toleration.key.as_deref(), Some("nvidia.com/gpu"));
    assert_eq!(toleration.operator.as_deref(), Some("Exists"));
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("busybox:1.36"));
    assert_eq!(c.command.as_ref().unwrap()[0], "sh");
    assert_eq!(c.working_dir.as_deref(), Some("/work"));
    assert_eq!(c.env.as_ref().unwrap()[0].name, "GREETING");
    let limits = c.resources.as_ref().unwrap().limits.clone().unwrap();
    assert_eq!(limits["cpu"].0, "500m");
    assert_eq!(limits["memory"].0, (256u64 << 20).to_string());
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(c.resources.as_ref().unwrap().requests, Some(limits));
    // Pod Security "restricted", a read-only root with an empty /tmp, no API token.
    assert_restricted(pod, 1000, 3000);
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let mount = &c.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.mount_path, "/tmp");
    let volume = &pod.volumes.as_ref().unwrap()[0];
    assert_eq!(volume.name, mount.name);
    assert!(volume.empty_dir.is_some(), "{volume:?}");

    // The log of a finished attempt, from the pod log API.
    let chunks: Vec<_> = exec.logs(&id, 1, false).collect().await;
    let text: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap().data).collect();
    assert_eq!(String::from_utf8(text).unwrap(), "hello\ndone\n");
    shutdown.cancel();
}

/// What every job pod must have (Pod Security "restricted", and no service-account token).
fn assert_restricted(pod: &PodSpec, uid: i64, gid: i64) {
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.enable_service_links, Some(false));
    assert!(pod.host_network.is_none() && pod.host_pid.is_none() && pod.host_ipc.is_none());
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!((psc.run_as_user, psc.run_as_group), (Some(uid), Some(gid)));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    for c in &pod.containers {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.privileged, Some(false));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert!(caps.add.is_none());
    }
    for v in pod.volumes.iter().flatten() {
        assert!(v.empty_dir.is_some(), "only emptyDir volumes: {v:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_a_job_asking_for_a_writable_root_gets_one_and_nothing_else() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, _exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let mut s = spec("writer", "echo writing", 0);
    if let JobKind::Command { writable_root, .. } = &mut s.kind {
        *writable_root = true;
    }
    let id = runner.submit(s).await.unwrap().id;
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:#?}");
    let jobs = jobs_of(&fake, &id);
    let pod = jobs[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(false)
    );
    assert!(
        c.volume_mounts.is_none() && pod.volumes.is_none(),
        "{pod:?}"
    );
    // Everything else stays restricted.
    assert_restricted(pod, 1000, 3000);
    shutdown.cancel();
}

#[tokio::test]
async fn fake_k8s_job_pods_never_run_as_root() {
    let mut config = kube_config("http://127.0.0.1:1");
    config.run_as_user = 0;
    let err = KubernetesExecutor::connect(config).await.unwrap_err();
    assert!(err.to_string().contains("non-root uid"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_an_exit_code_is_an_application_failure_retried_up_to_max_retries() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, _exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let id = runner
        .submit(spec("flaky", "echo trying; exit 3", 2))
        .await
        .unwrap()
        .id;
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Failed, "{rec:#?}");
    assert_eq!(
        (
            rec.attempt,
            rec.app_failures,
            rec.infra_failures,
            rec.exit_code
        ),
        (3, 3, 0, Some(3))
    );
    assert!(
        rec.reason
            .starts_with("exited with code 3; failed 3 times (max_retries 2)"),
        "{}",
        rec.reason
    );
    // One Job per attempt, each with backoffLimit 0: the runner owns the retries.
    let mut names: Vec<_> = jobs_of(&fake, &id).iter().map(|j| j.name_any()).collect();
    names.sort();
    assert_eq!(
        names,
        (1..=3).map(|a| format!("vt-{id}-{a}")).collect::<Vec<_>>()
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_image_pull_errors_are_infrastructure_failures_counted_apart() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, _exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let mut s = spec("no-image", "echo never", 5);
    s.kind = JobKind::Command {
        image: "registry.example/pull-error:1".into(),
        command: vec!["true".into()],
        env: BTreeMap::new(),
        working_dir: String::new(),
        writable_root: false,
    };
    let id = runner.submit(s).await.unwrap().id;
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    // max_infra_retries is 2: the third infrastructure failure ends it; max_retries (5) is
    // for the job's own failures and untouched.
    assert_eq!(rec.state, JobState::Failed, "{rec:#?}");
    assert_eq!((rec.app_failures, rec.infra_failures), (0, 3));
    assert!(
        rec.reason.starts_with("image pull error: ImagePullBackOff"),
        "{}",
        rec.reason
    );
    assert!(rec.reason.contains("3 infrastructure failures (limit 2)"));
    // The stuck Jobs were deleted, not left to wait for their deadline.
    until("the stuck Jobs are gone", || jobs_of(&fake, &id).is_empty()).await;
    assert_eq!(fake.deletions().len(), 3);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_eviction_and_a_lost_node_are_infrastructure_failures_then_retried() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, _exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    // No retries of its own: only infrastructure failures may be retried.
    let id = runner
        .submit(spec("unlucky", "echo start; fake-hold; echo end", 0))
        .await
        .unwrap()
        .id;
    let running = |a: u32| move |r: &JobRecord| r.state == JobState::Running && r.attempt == a;
    wait_for(&runner, &id, "attempt 1 running", running(1)).await;
    until("attempt 1's pod runs", || {
        fake.pods(NS)
            .iter()
            .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    })
    .await;
    assert!(fake.evict(NS, &job_name(&id, 1)));
    wait_for(&runner, &id, "attempt 2 running", running(2)).await;
    let rec = runner.store().get(&id).unwrap();
    assert_eq!((rec.app_failures, rec.infra_failures), (0, 1));
    let evicted = rec
        .history
        .iter()
        .find(|h| h.state == JobState::RetryWait)
        .unwrap();
    assert!(
        evicted.reason.contains("disrupted: TerminationByKubelet"),
        "{evicted:?}"
    );

    until("attempt 2's pod runs", || {
        fake.pods(NS).iter().any(|p| {
            p.metadata.name.as_deref() == Some(&*format!("{}-fake0", job_name(&id, 2)))
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
    })
    .await;
    assert!(fake.lose_node(NS, &job_name(&id, 2)));
    wait_for(&runner, &id, "attempt 3 running", running(3)).await;
    until("attempt 3's Job runs", || {
        fake.release(NS, &job_name(&id, 3))
    })
    .await;
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:#?}");
    assert_eq!(
        (rec.attempt, rec.app_failures, rec.infra_failures),
        (3, 0, 2)
    );
    assert!(
        rec.history.iter().any(|h| h
            .reason
            .contains("its pod is gone (node lost or pod deleted)")),
        "{rec:#?}"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_a_409_on_create_after_a_restart_adopts_the_existing_job() {
    let fake = FakeKube::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    // The coordinator before: admitted the job, created attempt 1's Job, and died before it
    // wrote RUNNING.
    let id = {
        let jobs = JobStore::new(store.clone());
        let rec = jobs
            .submit(spec("adopt-me", "echo once; fake-hold; echo end", 0))
            .await
            .unwrap();
        jobs.transition(&rec.id, JobState::Admitted, "admitted")
            .await
            .unwrap();
        let exec = KubernetesExecutor::connect(kube_config(&fake.url()))
            .await
            .unwrap();
        let run = CommandRun::of(&rec.id, &rec.spec, 1).unwrap();
        drop(exec.start(&run).await.unwrap());
        rec.id
    };
    assert_eq!(fake.count("POST", "/jobs", Some(201)), 1);

    let (runner, _exec, shutdown) = runner_on(store, kube_config(&fake.url())).await;
    wait_for(&runner, &id, "running", |r| r.state == JobState::Running).await;
    // The create was refused (409 AlreadyExists) and the runner attached to that Job.
    assert_eq!(fake.count("POST", "/jobs", Some(409)), 1);
    assert!(fake.release(NS, &job_name(&id, 1)));
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:#?}");
    assert_eq!(rec.attempt, 1);
    assert_eq!(fake.count("POST", "/jobs", Some(201)), 1, "no second Job");
    assert_eq!(jobs_of(&fake, &id).len(), 1);
    shutdown.cancel();
}

#[test]
fn fake_k8s_a_running_job_is_adopted_by_its_labels_after_a_restart() {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let main = rt();
    let fake = main.block_on(FakeKube::start()).unwrap();
    let store = Arc::new(MemoryStore::new());
    // The first coordinator: runs the job, then dies with everything it runs (its runtime).
    let first = rt();
    let id = first.block_on(async {
        let (runner, _exec, _shutdown) = runner_on(store.clone(), kube_config(&fake.url())).await;
        let id = runner
            .submit(spec("long", "echo started; fake-hold; echo finished", 0))
            .await
            .unwrap()
            .id;
        wait_for(&runner, &id, "running", |r| r.state == JobState::Running).await;
        id
    });
    first.shutdown_timeout(Duration::from_secs(5));
    assert_eq!(fake.count("POST", "/jobs", None), 1);

    main.block_on(async {
        let (runner, _exec, shutdown) = runner_on(store, kube_config(&fake.url())).await;
        // Still RUNNING, still attempt 1: adopted, not put back in line.
        until("the Jobs were listed by label", || {
            fake.requests().iter().any(|r| {
                r.method == "GET"
                    && r.path.ends_with("/jobs")
                    && r.query.contains("labelSelector=veraltheim.io%2Fjob-id%3D")
                    && !r.query.contains("watch")
            })
        })
        .await;
        let rec = runner.store().get(&id).unwrap();
        assert_eq!((rec.state, rec.attempt), (JobState::Running, 1), "{rec:#?}");
        until("the adopted Job is released", || {
            fake.release(NS, &job_name(&id, 1))
        })
        .await;
        let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
        assert_eq!(rec.state, JobState::Succeeded, "{rec:#?}");
        assert_eq!((rec.attempt, rec.infra_failures), (1, 0));
        assert_eq!(
            fake.count("POST", "/jobs", None),
            1,
            "no second Job created"
        );
        shutdown.cancel();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_a_job_whose_attempt_is_gone_after_a_restart_runs_again() {
    let fake = FakeKube::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    let id = {
        // RUNNING in the store, but no Job in the cluster (deleted while we were down).
        let jobs = JobStore::new(store.clone());
        let rec = jobs.submit(spec("lost", "echo again", 0)).await.unwrap();
        jobs.transition(&rec.id, JobState::Admitted, "")
            .await
            .unwrap();
        jobs.transition(&rec.id, JobState::Running, "")
            .await
            .unwrap();
        rec.id
    };
    let (runner, _exec, shutdown) = runner_on(store, kube_config(&fake.url())).await;
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:#?}");
    assert_eq!((rec.attempt, rec.infra_failures), (2, 0));
    assert!(
        rec.history.iter().any(|h| h.reason
            == "coordinator restarted; attempt 1 was not found by the kubernetes executor; attempt 2 next"),
        "{rec:#?}"
    );
    shutdown.cancel();
}

/// The `resourceVersion`s of the watches of job `id`'s Jobs, and how many plain lists of them.
fn job_watches(fake: &FakeKube, id: &str) -> (Vec<u64>, usize) {
    let selector = format!("veraltheim.io%2Fjob-id%3D{id}%2C");
    let ours: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/jobs") && r.query.contains(&selector))
        .collect();
    let versions = ours
        .iter()
        .filter(|r| r.query.contains("watch=true"))
        .filter_map(|r| {
            r.query
                .split('&')
                .find_map(|kv| kv.strip_prefix("resourceVersion="))
                .and_then(|v| v.parse().ok())
        })
        .collect();
    let lists = ours.iter().filter(|r| !r.query.contains("watch=")).count();
    (versions, lists)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_bookmarks_move_the_watch_on_and_a_410_gone_relists() {
    let fake = FakeKube::start().await.unwrap();
    fake.set_bookmark_interval(Duration::from_millis(50));
    let (runner, _exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let id = runner
        .submit(spec("watched", "echo a; fake-hold", 0))
        .await
        .unwrap()
        .id;
    wait_for(&runner, &id, "running", |r| r.state == JobState::Running).await;
    until("attempt 1's pod runs", || {
        fake.pods(NS)
            .iter()
            .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    })
    .await;
    let job_rv: u64 = jobs_of(&fake, &id)[0]
        .metadata
        .resource_version
        .as_ref()
        .and_then(|v| v.parse().ok())
        .unwrap();
    // Changes the first job's watch does not see (another job's) move the resource version on;
    // only BOOKMARK events carry it to that watch.
    let other = runner
        .submit(spec("other", "fake-hold", 0))
        .await
        .unwrap()
        .id;
    wait_for(&runner, &other, "running", |r| r.state == JobState::Running).await;
    // Wait until a bookmark past the first Job's version was handed to that Job's watch: its
    // client reads it before the watch ends, so it resumes from there.
    let selector = attempt_selector(&id, 1);
    until(
        "a bookmark past the Job's version reached its watch",
        || {
            fake.bookmarks().iter().any(|b| {
                b.kind == "Job" && b.label_selector == selector && b.resource_version > job_rv
            })
        },
    )
    .await;
    fake.close_watches();
    until(
        "the watch resumed from a bookmark's resource version",
        || job_watches(&fake, &id).0.iter().any(|rv| *rv > job_rv),
    )
    .await;

    // Compacted: every resumed watch is 410 Gone, and the watcher lists again.
    let (_, lists_before) = job_watches(&fake, &id);
    fake.compact();
    fake.close_watches();
    until("a watch was answered 410 Gone", || {
        fake.expired_watches() > 0
    })
    .await;
    until("the Jobs were listed again", || {
        job_watches(&fake, &id).1 > lists_before
    })
    .await;
    // The job's end still arrives through the new watch.
    assert!(fake.release(NS, &job_name(&id, 1)));
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:#?}");
    assert_eq!(rec.attempt, 1);
    runner.cancel(&other).await.unwrap();
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_5xx_bursts_are_retried_then_the_breaker_opens_and_the_job_waits() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    fake.fail(Some("POST"), "/jobs", 503, 1_000);
    let id = runner
        .submit(spec("patient", "echo finally", 0))
        .await
        .unwrap()
        .id;
    // Three tries (two retries) of the create, each a breaker failure: the breaker opens.
    let rec = wait_for(&runner, &id, "a retry wait", |r| {
        r.state == JobState::RetryWait
    })
    .await;
    assert!(
        rec.reason
            .starts_with("Kubernetes API unavailable: cannot create the Job: HTTP 503"),
        "{}",
        rec.reason
    );
    assert!(
        rec.reason.ends_with("(not counted as a failure)"),
        "{}",
        rec.reason
    );
    assert_eq!(fake.count("POST", "/jobs", Some(503)), 3);
    assert_eq!(
        exec.breaker().state(),
        veraltheim_supervisor::BreakerState::Open
    );
    // While it is open, the job waits and says why; no request goes out.
    let mut reason = String::new();
    until("the job waits for the breaker", || {
        reason = runner
            .waiting_reason(&id)
            .unwrap_or_else(|| runner.store().get(&id).unwrap().reason);
        reason.contains("circuit breaker")
    })
    .await;
    let rec = runner.store().get(&id).unwrap();
    assert_eq!((rec.app_failures, rec.infra_failures), (0, 0));
    // The API comes back: the half-open probe goes through and the job runs.
    fake.clear_faults();
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:#?}");
    assert_eq!(
        (rec.attempt, rec.app_failures, rec.infra_failures),
        (1, 0, 0)
    );
    assert_eq!(
        exec.breaker().state(),
        veraltheim_supervisor::BreakerState::Closed
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_cancel_deletes_the_job_with_foreground_propagation() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, _exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let id = runner
        .submit(spec("cancel-me", "fake-hold", 0))
        .await
        .unwrap()
        .id;
    wait_for(&runner, &id, "running", |r| r.state == JobState::Running).await;
    runner.cancel(&id).await.unwrap();
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Cancelled, "{rec:#?}");
    let deletions = fake.deletions();
    assert_eq!(deletions.len(), 1, "{deletions:?}");
    assert_eq!(deletions[0].name, job_name(&id, 1));
    assert_eq!(deletions[0].propagation.as_deref(), Some("Foreground"));
    // Foreground: the pods go, then the Job.
    until("the Job and its pod are gone", || {
        jobs_of(&fake, &id).is_empty() && fake.pods(NS).is_empty()
    })
    .await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_logs_are_streamed_while_the_pod_runs() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let id = runner
        .submit(spec(
            "chatty",
            "echo one; sleep 0.3; echo two; fake-hold",
            0,
        ))
        .await
        .unwrap()
        .id;
    // Followed as soon as the attempt is started, before its pod runs.
    wait_for(&runner, &id, "running", |r| r.state == JobState::Running).await;
    let mut logs = exec.logs(&id, 1, true);
    let mut text = String::new();
    while !text.contains("two\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(15), logs.next())
            .await
            .expect("a log chunk in time")
            .expect("the stream goes on while the pod runs")
            .unwrap();
        assert_eq!(chunk.source, LogSource::Combined);
        text.push_str(std::str::from_utf8(&chunk.data).unwrap());
    }
    assert_eq!(text, "one\ntwo\n");
    assert_eq!(runner.store().get(&id).unwrap().state, JobState::Running);
    assert!(fake.release(NS, &job_name(&id, 1)));
    // The stream ends with the pod.
    let rest = tokio::time::timeout(Duration::from_secs(15), logs.collect::<Vec<_>>())
        .await
        .expect("the followed log ends with the pod");
    assert!(rest.iter().all(Result::is_ok), "{rest:?}");
    wait_for(&runner, &id, "success", |r| r.state == JobState::Succeeded).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_a_long_pod_log_is_read_capped_to_head_and_tail() {
    let fake = FakeKube::start().await.unwrap();
    let mut config = kube_config(&fake.url());
    config.max_log_bytes = 1000;
    let (runner, exec, shutdown) = runner_on(Arc::default(), config).await;
    // 300 lines of 10 bytes: 3000 bytes, three times the cap.
    let script: Vec<String> = (0..300).map(|i| format!("echo line-{i:04}")).collect();
    let id = runner
        .submit(spec("flood", &script.join("; "), 0))
        .await
        .unwrap()
        .id;
    wait_for(&runner, &id, "success", |r| r.state == JobState::Succeeded).await;
    let whole: String = (0..300).map(|i| format!("line-{i:04}\n")).collect();
    let note = "\n[veraltheim: 2000 bytes of this output were cut here (jobs.max_log_bytes)]\n";
    let want = format!("{}{note}{}", &whole[..500], &whole[2500..]);
    for follow in [false, true] {
        let chunks: Vec<_> = tokio::time::timeout(
            Duration::from_secs(15),
            exec.logs(&id, 1, follow).collect::<Vec<_>>(),
        )
        .await
        .expect("the log of a finished attempt ends");
        let mut text = String::new();
        for c in chunks {
            text.push_str(std::str::from_utf8(&c.unwrap().data).unwrap());
        }
        assert_eq!(text, want, "follow {follow}");
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_the_deadline_becomes_active_deadline_seconds_and_times_out() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, _exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let mut s = spec("slow", "sleep 30", 3);
    s.deadline_seconds = Some(1);
    let id = runner.submit(s).await.unwrap().id;
    let rec = wait_for(&runner, &id, "a terminal state", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::TimedOut, "{rec:#?}");
    assert_eq!(rec.reason, "deadline of 1 s passed");
    assert_eq!((rec.app_failures, rec.infra_failures), (0, 0));
    shutdown.cancel();
}

#[tokio::test]
async fn fake_k8s_jobs_kubernetes_cannot_run_are_refused_at_submit() {
    let fake = FakeKube::start().await.unwrap();
    let (runner, _exec, shutdown) = runner_on(Arc::default(), kube_config(&fake.url())).await;
    let mut s = spec("imageless", "true", 0);
    if let JobKind::Command { image, .. } = &mut s.kind {
        image.clear();
    }
    let err = runner.submit(s.clone()).await.unwrap_err();
    assert!(matches!(err, RunnerError::Rejected { .. }), "{err}");
    assert!(err.to_string().contains("needs an image"), "{err}");
    // With a default image, the same job is taken and runs that image.
    let mut config = kube_config(&fake.url());
    config.default_image = "busybox:stable".into();
    let exec = KubernetesExecutor::connect(config).await.unwrap();
    let job = exec
        .job_object(&CommandRun::of("00000000000000000001", &s, 1).unwrap())
        .unwrap();
    let image = job.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("busybox:stable"));
    shutdown.cancel();
}

/// A real cluster (`KUBECONFIG`), namespace `VERALTHEIM_TEST_NAMESPACE` (default `default`),
/// image `VERALTHEIM_TEST_IMAGE` (default `busybox:1.36`). Without `KUBECONFIG` the test fails
/// saying so: run with `--ignored` only where there is a cluster.
async fn real_cluster() -> (KubernetesExecutor, String) {
    if std::env::var_os("KUBECONFIG").is_none() {
        panic!(
            "this test needs a real Kubernetes cluster: set KUBECONFIG to its kubeconfig \
             (optionally VERALTHEIM_TEST_NAMESPACE, default `default`, and \
             VERALTHEIM_TEST_IMAGE, default busybox:1.36)"
        );
    }
    let config = KubernetesConfig {
        namespace: std::env::var("VERALTHEIM_TEST_NAMESPACE").unwrap_or_else(|_| "default".into()),
        ttl_seconds_after_finished: Some(300),
        ..KubernetesConfig::default()
    };
    let image = std::env::var("VERALTHEIM_TEST_IMAGE").unwrap_or_else(|_| "busybox:1.36".into());
    (KubernetesExecutor::connect(config).await.unwrap(), image)
}

/// The names of the pods of `run`'s Job, as the API lists them now.
async fn real_pods(exec: &KubernetesExecutor, run: &CommandRun) -> Vec<String> {
    let lp = ListParams::default().labels(&attempt_selector(&run.job_id, run.attempt));
    exec.pods()
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.name_any())
        .collect()
}

/// Polls the real cluster (every half second, two minutes at most, then fails with `what` and
/// what it last saw) until `done` says yes.
async fn real_wait_until<T: std::fmt::Debug, F, Fut>(
    what: &str,
    mut look: F,
    done: impl Fn(&T) -> bool,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let until = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let seen = look().await;
        if done(&seen) {
            return seen;
        }
        assert!(
            std::time::Instant::now() < until,
            "{what}: not so after 120 s; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn real_run(image: &str, script: &str) -> CommandRun {
    let id = format!(
        "{:020}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    CommandRun {
        job_id: id,
        job_name: "veraltheim-real-cluster-test".into(),
        attempt: 1,
        image: image.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        resources: Resources {
            cpu_millis: 100,
            memory_bytes: 64 << 20,
            gpus: 0,
            gpu_memory_bytes: 0,
        },
        deadline: Some(Duration::from_secs(300)),
        ..Default::default()
    }
}

#[tokio::test]
#[ignore = "needs a real Kubernetes cluster (KUBECONFIG)"]
async fn real_cluster_a_job_runs_logs_and_exit_codes() {
    let (exec, image) = real_cluster().await;
    let run = real_run(&image, "echo hello from veraltheim");
    let outcome = exec
        .start(&run)
        .await
        .unwrap()
        .wait(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Exited(0));
    let text: Vec<u8> = exec
        .logs(&run.job_id, 1, false)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .flat_map(|c| c.unwrap().data)
        .collect();
    assert!(String::from_utf8_lossy(&text).contains("hello from veraltheim"));
    let failing = real_run(&image, "exit 3");
    let outcome = exec
        .start(&failing)
        .await
        .unwrap()
        .wait(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Exited(3));
}

#[tokio::test]
#[ignore = "needs a real Kubernetes cluster (KUBECONFIG)"]
async fn real_cluster_cancel_and_adopt() {
    let (exec, image) = real_cluster().await;
    let run = real_run(&image, "sleep 600");
    let name = job_name(&run.job_id, run.attempt);
    let first = exec.start(&run).await.unwrap();
    drop(first);
    // The Job and a pod of it exist before the cancel, so their absence after it says something.
    real_wait_until(
        "the Job has a pod",
        || real_pods(&exec, &run),
        |pods| !pods.is_empty(),
    )
    .await;
    // Found again by its labels, then cancelled (foreground delete).
    let adopted = exec.adopt(&run).await.unwrap().expect("the Job is found");
    let cancel = CancellationToken::new();
    cancel.cancel();
    assert_eq!(adopted.wait(cancel).await.unwrap(), Outcome::Cancelled);
    // A foreground delete removes the pods first, then the Job.
    let jobs = exec.jobs();
    real_wait_until(
        &format!("Job {name} and its pods are gone after the cancel"),
        || async {
            let job = jobs.get_opt(&name).await.unwrap().map(|j| j.name_any());
            (job, real_pods(&exec, &run).await)
        },
        |(job, pods)| job.is_none() && pods.is_empty(),
    )
    .await;
}
