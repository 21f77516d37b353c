//! Batch jobs through the real binary: submit, watch, logs, cancel, and durability across a
//! kill -9 of the coordinator.

use std::path::Path;
use std::time::Duration;

use tonic::transport::Channel;
use veraltheim_proto::v1::{self, job_service_client::JobServiceClient};

mod common;

use common::{command, wait_for};

async fn start(data: &Path, extra: &[&str]) -> (common::Server, Channel) {
    let server = common::start_in(data, extra).await;
    let ch = common::channel(&server).await;
    (server, ch)
}

async fn logs(client: &mut JobServiceClient<Channel>, id: &str) -> String {
    let mut stream = client
        .job_logs(v1::JobLogsRequest {
            id: id.into(),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        out.extend_from_slice(&chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn submit_watch_logs_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, ch) = start(dir.path(), &[]).await;
    let mut jobs = JobServiceClient::new(ch);
    let job = jobs
        .submit_job(command("hello", &["sh", "-c", "echo out; echo err >&2"]))
        .await
        .unwrap()
        .into_inner();
    let mut watch = jobs
        .watch_job(v1::WatchJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    while let Some(j) = watch.message().await.unwrap() {
        states.push(j.state);
    }
    assert_eq!(
        states.last(),
        Some(&(v1::JobState::Succeeded as i32)),
        "{states:?}"
    );
    let text = logs(&mut jobs, &job.id).await;
    assert!(text.contains("out") && text.contains("err"), "{text}");

    let long = jobs
        .submit_job(command("long", &["sleep", "30"]))
        .await
        .unwrap()
        .into_inner();
    wait_for(&mut jobs, &long.id, v1::JobState::Running).await;
    jobs.cancel_job(v1::CancelJobRequest {
        id: long.id.clone(),
    })
    .await
    .unwrap();
    wait_for(&mut jobs, &long.id, v1::JobState::Cancelled).await;

    let list = jobs
        .list_jobs(v1::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.jobs.len(), 2);
    let err = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(v1::JobSpec {
                queue: "nope".into(),
                ..command("x", &["true"]).spec.unwrap()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = jobs
        .get_job(v1::GetJobRequest {
            id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn job_state_changes_go_out_as_events() {
    use veraltheim_proto::v1::system_service_client::SystemServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let (_server, ch) = start(dir.path(), &[]).await;
    let mut events = SystemServiceClient::new(ch.clone())
        .watch_events(v1::WatchEventsRequest {
            topics: vec!["jobs.*.state".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let job = JobServiceClient::new(ch)
        .submit_job(command("evented", &["true"]))
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    while states.last().map(String::as_str) != Some("SUCCEEDED") {
        let e = tokio::time::timeout(Duration::from_secs(20), events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.topic, format!("jobs.{}.state", job.id));
        states.push(e.attributes["state"].clone());
    }
    assert_eq!(states, ["QUEUED", "ADMITTED", "RUNNING", "SUCCEEDED"]);
}

#[tokio::test]
async fn acknowledged_jobs_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("attempts");
    let script = format!("echo run >> {}; sleep 2; echo done", marker.display());
    let (ids, running) = {
        let (mut server, ch) = start(dir.path(), &["--max-running-jobs", "1"]).await;
        let mut jobs = JobServiceClient::new(ch);
        let first = jobs
            .submit_job(command("first", &["sh", "-c", &script]))
            .await
            .unwrap()
            .into_inner();
        let second = jobs
            .submit_job(command("second", &["sh", "-c", "echo second"]))
            .await
            .unwrap()
            .into_inner();
        let running = wait_for(&mut jobs, &first.id, v1::JobState::Running).await;
        // kill -9: no shutdown path runs
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        (vec![first.id, second.id], running)
    };
    assert_eq!(running.attempt, 1);
    let (_server, ch) = start(dir.path(), &[]).await;
    let mut jobs = JobServiceClient::new(ch);
    let first = wait_for(&mut jobs, &ids[0], v1::JobState::Succeeded).await;
    assert!(
        first.attempt >= 2,
        "the interrupted job ran again: {first:?}"
    );
    wait_for(&mut jobs, &ids[1], v1::JobState::Succeeded).await;
    assert!(logs(&mut jobs, &ids[0]).await.contains("done"));
    let runs = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(
        runs.lines().count(),
        2,
        "at-least-once: the command ran once per attempt"
    );
}
