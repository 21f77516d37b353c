//! Issue 17 item 3 through the real binary: a local command job runs at `jobs.local.nice`, is
//! paused (SIGSTOP of its process group) while a model's latency objective is at risk and
//! resumed once it is kept again, with the pause in its record, on the wire and as
//! `jobs.<id>.paused` / `jobs.<id>.resumed` events; a paused job can be cancelled.
//!
//! The objective is put at risk for real: `cost` (0.5 ms of CPU per batch) gets an objective of
//! 1 ms and 32 concurrent online requests, whose total times are several milliseconds each.
//! Waits are generous bounds, never measures.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use veraltheim_proto::v1::{
    self, inference_service_client::InferenceServiceClient, job_service_client::JobServiceClient,
    system_service_client::SystemServiceClient,
};

mod common;

/// `/proc/<pid>/stat` field `n` (from 1, as `man proc` counts); `None` once it is gone.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    rest.split_whitespace().nth(n - 3).map(str::to_owned)
}

/// The states of the live processes of group `pgid`.
fn group_states(pgid: u32) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat_field(pid, 5).is_some_and(|g| g == pgid.to_string()))
        .filter_map(|pid| stat_field(pid, 3))
        .filter(|s| s != "Z")
        .collect()
}

/// Whether group `pgid` is stopped: a process of it is stopped and none runs or sleeps (a shell
/// that vforked a child stopped before its exec waits in `D` for it).
fn frozen(pgid: u32) -> bool {
    let states = group_states(pgid);
    states.iter().any(|s| s == "T") && states.iter().all(|s| matches!(s.as_str(), "T" | "t" | "D"))
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Polls `pred` every 50 ms for up to 60 s; whether it came true.
async fn eventually<F: std::future::Future<Output = bool>>(mut pred: impl FnMut() -> F) -> bool {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if pred().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn job(ch: &Channel, id: &str) -> v1::Job {
    JobServiceClient::new(ch.clone())
        .get_job(v1::GetJobRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Online load on `cost` from 32 concurrent callers until the returned flag is set.
fn online_load(ch: &Channel) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (ch, stop) = (ch.clone(), stop.clone());
        tokio::spawn(async move {
            let callers = (0..32).map(|_| {
                let (ch, stop) = (ch.clone(), stop.clone());
                async move {
                    let mut client = InferenceServiceClient::new(ch);
                    while !stop.load(Ordering::Relaxed) {
                        client
                            .infer(v1::InferRequest {
                                model: "cost".into(),
                                inputs: vec![common::fp32("INPUT0", vec![1, 1], vec![1.0])],
                                ..Default::default()
                            })
                            .await
                            .unwrap();
                    }
                }
            });
            futures::future::join_all(callers).await;
        })
    };
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_job_is_paused_while_an_objective_is_at_risk_and_resumed_after() {
    let dir = tempfile::tempdir().unwrap();
    let (pidfile, counter) = (dir.path().join("sh.pid"), dir.path().join("count"));
    let server = common::start(&["--latency-slo", "cost=1"]).await;
    let ch = common::channel(&server).await;
    let mut events = SystemServiceClient::new(ch.clone())
        .watch_events(v1::WatchEventsRequest {
            topics: vec!["jobs.*.paused".into(), "jobs.*.resumed".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let script = format!(
        "echo $$ > {}; while true; do echo tick >> {}; sleep 0.05; done",
        pidfile.display(),
        counter.display()
    );
    let mut jobs = JobServiceClient::new(ch.clone());
    let submitted = jobs
        .submit_job(common::command("counter", &["sh", "-c", &script]))
        .await
        .unwrap()
        .into_inner();
    let id = submitted.id.clone();
    common::wait_for(&mut jobs, &id, v1::JobState::Running).await;
    let read_pid = || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    assert!(eventually(|| async { read_pid().is_some() }).await);
    let pid = read_pid().unwrap();
    // It runs at jobs.local.nice (10 by default): /proc/PID/stat field 19.
    assert_eq!(stat_field(pid, 19).as_deref(), Some("10"));
    assert!(eventually(|| async { lines(&counter) >= 2 }).await);
    assert!(!job(&ch, &id).await.paused);

    // The objective at risk: the job is paused, and says so.
    let (stop, load) = online_load(&ch);
    assert!(
        eventually(|| async { job(&ch, &id).await.paused }).await,
        "the job was never paused: {:?}",
        job(&ch, &id).await
    );
    let paused = job(&ch, &id).await;
    assert_eq!(paused.state, v1::JobState::Running as i32);
    assert!(
        paused.paused_reason.contains("model cost"),
        "{}",
        paused.paused_reason
    );
    assert!(paused.paused_since_ms > 0 && paused.pauses >= 1);
    assert!(
        eventually(|| async { frozen(pid) }).await,
        "{:?}",
        group_states(pid)
    );
    let stopped_at = lines(&counter);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lines(&counter), stopped_at, "a paused job went on");
    // `veraltheim jobs get` says it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .args(["jobs", "get", &id, "--server", &server.grpc])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("PAUSED"), "{text}");
    // /metrics counts it.
    let paused_gauge = || async {
        let (code, metrics) = common::http_call(&server.http, "GET", "/metrics", None, "").await;
        assert_eq!(code, 200);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("veraltheim_jobs_paused "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    assert_eq!(paused_gauge().await, Some(1.0));

    // The online load stops: once its window is calm the objective is kept, the job resumes.
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        eventually(|| async { !job(&ch, &id).await.paused }).await,
        "the job was never resumed"
    );
    assert!(
        eventually(|| async { lines(&counter) > stopped_at + 2 }).await,
        "the job did not go on after the resume"
    );
    let resumed = job(&ch, &id).await;
    assert!(resumed.paused_ms > 0, "{resumed:?}");
    assert_eq!(paused_gauge().await, Some(0.0));
    assert_eq!(resumed.state, v1::JobState::Running as i32);
    let mut told = Vec::new();
    while told.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("no pause event within 30 s")
            .unwrap()
            .unwrap();
        if e.attributes.get("job") == Some(&id) {
            told.push(e.topic);
        }
    }
    assert_eq!(
        told,
        [format!("jobs.{id}.paused"), format!("jobs.{id}.resumed")]
    );

    // At risk again, and cancelled while paused: nothing of the job is left, stopped or not.
    let (stop, load) = online_load(&ch);
    assert!(eventually(|| async { job(&ch, &id).await.paused }).await);
    assert!(eventually(|| async { frozen(pid) }).await);
    jobs.cancel_job(v1::CancelJobRequest { id: id.clone() })
        .await
        .unwrap();
    let cancelled = common::wait_for(&mut jobs, &id, v1::JobState::Cancelled).await;
    assert!(!cancelled.paused);
    assert!(cancelled.paused_ms >= resumed.paused_ms);
    assert!(
        eventually(|| async { group_states(pid).is_empty() }).await,
        "the cancelled job's group {pid} still holds {:?}",
        group_states(pid)
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
}
