//! The runner following the fast path's pressure (see the module documentation of the runner
//! and of `crate::pressure`): the job CPU capacity it leaves, and the pause of running local
//! command jobs while an objective is at risk. Real processes through the local executor, an
//! in-memory store; no timing thresholds, only generous waits.

use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use veraltheim_storage::MemoryStore;

use super::*;
use crate::job::Resources;
use crate::local::LocalExecutor;
use crate::scheduler::{QueueConfig, Quota};

struct Setup {
    runner: Runner<MemoryStore>,
    pressure: watch::Sender<Pressure>,
    /// What the pause observer was told: (job, paused), in order.
    told: Arc<Mutex<Vec<(String, bool)>>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// A runner of 4000m over a local executor in `dir`, following a pressure channel, with a
/// floor of `floor` millicores; its loop running.
fn started(dir: &Path, floor: u64) -> Setup {
    let config = RunnerConfig {
        scheduler: SchedulerConfig {
            capacity: Resources {
                cpu_millis: 4000,
                memory_bytes: 1 << 30,
                gpus: 0,
                gpu_memory_bytes: 0,
            },
            queues: vec![QueueConfig {
                name: "default".into(),
                weight: 1,
                quota: Quota::default(),
            }],
            priority_classes: vec!["high".into(), "low".into()],
        },
        retry: RetryPolicy {
            initial_delay_ms: 10,
            max_delay_ms: 50,
            max_infra_retries: 2,
        },
        max_running: 8,
        jitter_seed: 1,
    };
    let (pressure, rx) = watch::channel(Pressure::default());
    let told = Arc::new(Mutex::new(Vec::new()));
    let observer: PauseObserver = {
        let told = told.clone();
        Arc::new(move |r: &JobRecord| told.lock().push((r.id.clone(), r.pauses.is_paused())))
    };
    let runner = Runner::new(
        JobStore::new(MemoryStore::new()),
        LocalExecutor::new(dir.join("jobs")),
        config,
    )
    .unwrap()
    .with_pressure(rx, floor)
    .with_pause_observer(observer);
    let shutdown = CancellationToken::new();
    let task = {
        let runner = runner.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { runner.run(shutdown).await })
    };
    Setup {
        runner,
        pressure,
        told,
        shutdown,
        task,
    }
}

/// A command job (the runner tests' own) asking for `cpu_millis`.
fn spec(name: &str, script: &str, cpu_millis: u64) -> JobSpec {
    let mut spec = super::tests::spec(name, script, 0);
    spec.resources.cpu_millis = cpu_millis;
    spec
}

/// A script that writes its pid to `<dir>/<name>.pid`, then appends a line to
/// `<dir>/<name>.count` every 50 ms, forever.
fn counting(dir: &Path, name: &str) -> String {
    format!(
        "echo $$ > {pid}; while true; do echo tick >> {count}; sleep 0.05; done",
        pid = dir.join(format!("{name}.pid")).display(),
        count = dir.join(format!("{name}.count")).display(),
    )
}

fn lines(dir: &Path, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{name}.count"))).map_or(0, |s| s.lines().count())
}

/// Polls `pred` every 25 ms for up to 20 s; whether it came true.
async fn eventually(mut pred: impl FnMut() -> bool) -> bool {
    for _ in 0..800 {
        if pred() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

async fn record_until(
    runner: &Runner<MemoryStore>,
    id: &str,
    what: &str,
    pred: impl Fn(&JobRecord) -> bool,
) -> JobRecord {
    for _ in 0..800 {
        let rec = runner.store().get(id).unwrap();
        if pred(&rec) {
            return rec;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "job {id} never got {what}: {:#?}",
        runner.store().get(id).unwrap()
    );
}

async fn pid_of(dir: &Path, name: &str) -> u32 {
    let path = dir.join(format!("{name}.pid"));
    let mut pid = None;
    assert!(
        eventually(|| {
            pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            pid.is_some()
        })
        .await,
        "job {name} never wrote its pid"
    );
    pid.unwrap()
}

/// The state letter of `pid` (`T`: stopped), or `None` once it is gone (a zombie is `Z`).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// The states of the processes of group `pgid` now.
fn group_states(pgid: u32) -> Vec<char> {
    let mut states = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        // Fields 3 (state) and 5 (process group).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
            && let Some(state) = fields.first().and_then(|s| s.chars().next())
        {
            states.push(state);
        }
    }
    states
}

/// Whether group `pgid` is stopped: a process of it is stopped and none runs or sleeps (a shell
/// that vforked a child stopped before its exec waits in `D` for it).
fn frozen(pgid: u32) -> bool {
    let states = group_states(pgid);
    states.contains(&'T') && states.iter().all(|s| matches!(s, 'T' | 't' | 'D'))
}

/// The process group of a running local job, from its record's reason.
fn pgid_of(rec: &JobRecord) -> u32 {
    rec.reason
        .strip_prefix("running (process group ")
        .and_then(|r| r.strip_suffix(')'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no process group in '{}'", rec.reason))
}

fn at_risk(why: &str) -> Pressure {
    Pressure {
        at_risk: Some(why.into()),
        ..Pressure::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_cpu_capacity_is_what_the_fast_path_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path();
    let s = started(files, 500);
    let go = files.join("go");
    // A job holding 2000m runs; then the fast path takes 3000m of the 4000m.
    let first = s
        .runner
        .submit(spec(
            "first",
            &format!("while [ ! -e {} ]; do sleep 0.05; done", go.display()),
            2000,
        ))
        .await
        .unwrap();
    record_until(&s.runner, &first.id, "RUNNING", |r| {
        r.state == JobState::Running
    })
    .await;
    s.pressure.send_replace(Pressure {
        fast_path_cpu_millis: 3000,
        ..Pressure::default()
    });
    assert!(eventually(|| s.runner.job_cpu_capacity() == 1000).await);
    let waiting = s.runner.submit(spec("second", "true", 500)).await.unwrap();
    let mut reason = None;
    assert!(
        eventually(|| {
            reason = s.runner.waiting_reason(&waiting.id);
            reason.as_deref().is_some_and(|r| r.contains("fast path"))
        })
        .await,
        "{reason:?}"
    );
    assert_eq!(
        reason.as_deref(),
        Some(
            "capacity cpu 2000/1000m (needs 500m); the fast path uses 3000m of the configured 4000m"
        )
    );
    // The running job, above the lowered capacity, was not touched: it ends by itself.
    assert_eq!(
        s.runner.store().get(&first.id).unwrap().state,
        JobState::Running
    );
    // The fast path takes everything: the floor is left.
    s.pressure.send_replace(Pressure {
        fast_path_cpu_millis: 9000,
        ..Pressure::default()
    });
    assert!(eventually(|| s.runner.job_cpu_capacity() == 500).await);
    std::fs::write(&go, "").unwrap();
    let rec = record_until(&s.runner, &first.id, "its end", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{}", rec.reason);
    // Its 2000m are free, and 500m are left to jobs: the waiting job fits.
    let rec = record_until(&s.runner, &waiting.id, "its end", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Succeeded, "{}", rec.reason);
    // The fast path goes quiet: the whole capacity is back.
    s.pressure.send_replace(Pressure::default());
    assert!(eventually(|| s.runner.job_cpu_capacity() == 4000).await);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_jobs_are_paused_while_an_objective_is_at_risk() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path();
    let s = started(files, 0);
    let job = s
        .runner
        .submit(spec("counter", &counting(files, "counter"), 100))
        .await
        .unwrap();
    // Of a higher class, and opted out: neither is paused.
    let mut high = spec("high", &counting(files, "high"), 100);
    high.priority_class = "high".into();
    let high = s.runner.submit(high).await.unwrap();
    let mut kept = spec("kept", &counting(files, "kept"), 100);
    kept.pausable = Some(false);
    let kept = s.runner.submit(kept).await.unwrap();
    let pid = pid_of(files, "counter").await;
    let (high_pid, kept_pid) = (pid_of(files, "high").await, pid_of(files, "kept").await);
    assert!(eventually(|| lines(files, "counter") >= 2).await);

    let why = "model minilm: p99 95 ms above 80% of the 100 ms objective";
    s.pressure.send_replace(at_risk(why));
    let rec = record_until(&s.runner, &job.id, "paused", |r| r.pauses.is_paused()).await;
    assert_eq!(rec.state, JobState::Running, "a paused job stays RUNNING");
    assert_eq!(rec.pauses.reason, why);
    assert_eq!(rec.pauses.count, 1);
    assert_eq!(s.runner.paused_for().as_deref(), Some(why));
    assert!(eventually(|| frozen(pid)).await, "{:?}", group_states(pid));
    let stopped_at = lines(files, "counter");
    let others = (lines(files, "high"), lines(files, "kept"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lines(files, "counter"), stopped_at, "a paused job went on");
    // The others go on counting.
    assert!(
        eventually(|| lines(files, "high") > others.0 && lines(files, "kept") > others.1).await
    );
    assert!(!group_states(high_pid).contains(&'T'));
    assert!(!group_states(kept_pid).contains(&'T'));
    for id in [&high.id, &kept.id] {
        assert!(!s.runner.store().get(id).unwrap().pauses.is_paused());
    }

    s.pressure.send_replace(Pressure::default());
    let rec = record_until(&s.runner, &job.id, "resumed", |r| !r.pauses.is_paused()).await;
    assert!(rec.pauses.paused_ms > 0, "{:?}", rec.pauses);
    assert_eq!(rec.pauses.count, 1);
    assert!(rec.pauses.reason.is_empty());
    assert!(
        eventually(|| lines(files, "counter") > stopped_at + 2).await,
        "the job did not go on after the resume"
    );
    // Told once paused, once resumed; the others never.
    assert_eq!(
        *s.told.lock(),
        [(job.id.clone(), true), (job.id.clone(), false)]
    );
    // The pause is no change of state: the history has none.
    assert_eq!(
        rec.history.iter().map(|h| h.state).collect::<Vec<_>>(),
        [JobState::Queued, JobState::Admitted, JobState::Running]
    );
    for id in [&job.id, &high.id, &kept.id] {
        s.runner.cancel(id).await.unwrap();
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_can_be_cancelled_and_a_job_started_at_risk_starts_paused() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path();
    let s = started(files, 0);
    s.pressure.send_replace(at_risk("model m: at risk"));
    assert!(eventually(|| s.runner.paused_for().is_some()).await);
    let job = s
        .runner
        .submit(spec("late", &counting(files, "late"), 100))
        .await
        .unwrap();
    let rec = record_until(&s.runner, &job.id, "paused", |r| r.pauses.is_paused()).await;
    assert_eq!(rec.state, JobState::Running);
    // Stopped as soon as it started, the job may not even have written its pid.
    let pid = pgid_of(&rec);
    assert!(eventually(|| frozen(pid)).await, "{:?}", group_states(pid));
    let stopped_at = lines(files, "late");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lines(files, "late"), stopped_at, "a paused job went on");

    s.runner.cancel(&job.id).await.unwrap();
    let rec = record_until(&s.runner, &job.id, "its end", |r| r.state.is_terminal()).await;
    assert_eq!(rec.state, JobState::Cancelled);
    // Its end closed the pause: counted, and no longer open.
    assert!(!rec.pauses.is_paused());
    assert!(rec.pauses.paused_ms > 0, "{:?}", rec.pauses);
    assert!(
        eventually(|| matches!(proc_state(pid), None | Some('Z'))).await,
        "the paused job {pid} survived its cancel: {:?}",
        proc_state(pid)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_stops_resumes_the_jobs_it_paused() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path();
    let s = started(files, 0);
    let job = s
        .runner
        .submit(spec("counter", &counting(files, "counter"), 100))
        .await
        .unwrap();
    let pid = pid_of(files, "counter").await;
    s.pressure.send_replace(at_risk("model m: at risk"));
    record_until(&s.runner, &job.id, "paused", |r| r.pauses.is_paused()).await;
    assert!(eventually(|| frozen(pid)).await, "{:?}", group_states(pid));
    let runner = s.runner.clone();
    s.stop().await;
    // The loop is gone; the job's attempt goes on (the coordinator's shim kills it when the
    // process ends), and is not left stopped.
    let rec = record_until(&runner, &job.id, "resumed", |r| !r.pauses.is_paused()).await;
    assert_eq!(rec.state, JobState::Running);
    let stopped_at = lines(files, "counter");
    assert!(
        eventually(|| lines(files, "counter") > stopped_at + 2).await,
        "the job stayed stopped after the runner stopped"
    );
    runner.cancel(&job.id).await.unwrap();
    record_until(&runner, &job.id, "its end", |r| r.state.is_terminal()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_the_capacity_is_kept_for_the_node_to_register() {
    let dir = tempfile::tempdir().unwrap();
    let s = started(dir.path(), 0);
    let config = RunnerConfig {
        scheduler: s.runner.inner.sched_config.clone(),
        retry: RetryPolicy::default(),
        max_running: 2,
        jitter_seed: 1,
    };
    s.stop().await;
    let (pressure, rx) = watch::channel(Pressure::default());
    let runner = RunnerOn::in_cluster(
        JobStore::new(MemoryStore::new()),
        Arc::new(LocalExecutor::new(dir.path().join("jobs"))),
        None,
        config,
        ClusterSelf {
            node: "a".into(),
            incarnation: "a-1".into(),
        },
    )
    .unwrap()
    .with_pressure(rx, 0);
    let shutdown = CancellationToken::new();
    let task = {
        let runner = runner.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { runner.run(shutdown).await })
    };
    pressure.send_replace(Pressure {
        fast_path_cpu_millis: 3000,
        ..Pressure::default()
    });
    assert!(eventually(|| runner.job_cpu_capacity() == 1000).await);
    shutdown.cancel();
    task.await.unwrap();
}
