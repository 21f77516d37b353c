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

/// Waits until `path` has `lines` lines (30 s at most, then fails the test saying so).
async fn wait_for_lines(path: &Path, lines: usize) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{} never had {lines} line(s): {text:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn acknowledged_jobs_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("attempts");
    let go = dir.path().join("go");
    // Each attempt marks its start, then holds until the test creates `go`: the first one is
    // still running when the coordinator dies, however slow the machine.
    let script = format!(
        "echo run >> {}; while [ ! -e {} ]; do sleep 0.05; done; echo done",
        marker.display(),
        go.display()
    );
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
        // The first attempt has run its command: its marker is there.
        wait_for_lines(&marker, 1).await;
        // kill -9: no shutdown path runs
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        (vec![first.id, second.id], running)
    };
    assert_eq!(running.attempt, 1);
    std::fs::write(&go, "").unwrap();
    let (_server, ch) = start(dir.path(), &[]).await;
    let mut jobs = JobServiceClient::new(ch);
    let first = wait_for(&mut jobs, &ids[0], v1::JobState::Succeeded).await;
    assert_eq!(first.attempt, 2, "the interrupted job ran again: {first:?}");
    wait_for(&mut jobs, &ids[1], v1::JobState::Succeeded).await;
    assert!(logs(&mut jobs, &ids[0]).await.contains("done"));
    let runs = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(
        runs.lines().count(),
        2,
        "at-least-once: the command ran once per attempt"
    );
}

/// The server still answers Health, and says it is ready.
async fn healthy(ch: &Channel) {
    let health = v1::system_service_client::SystemServiceClient::new(ch.clone())
        .health(v1::HealthRequest {})
        .await
        .expect("Health after the hostile request")
        .into_inner();
    assert!(health.ready);
}

/// Issue 18, case 4: a job writing 20 MB keeps a log of the configured size (head, a note of
/// the cut, tail), JobLogs sends it in chunks of at most 64 KiB, and the server stays healthy.
#[tokio::test]
async fn a_flooding_job_keeps_a_capped_log_streamed_in_small_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, ch) = start(dir.path(), &["--max-job-log-bytes", "1048576"]).await;
    let mut jobs = JobServiceClient::new(ch.clone());
    let job = jobs
        .submit_job(command(
            "flood",
            &[
                "sh",
                "-c",
                "echo first; head -c 20000000 /dev/zero | tr '\\0' x; echo; echo last",
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    wait_for(&mut jobs, &job.id, v1::JobState::Succeeded).await;
    let mut stream = jobs
        .job_logs(v1::JobLogsRequest {
            id: job.id.clone(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(chunk.data.len() <= 64 * 1024, "{}", chunk.data.len());
        out.extend_from_slice(&chunk.data);
    }
    let text = String::from_utf8_lossy(&out);
    assert!(out.len() <= 1024 * 1024 + 200, "{}", out.len());
    assert!(text.starts_with("first\n") && text.ends_with("\nlast\n"));
    assert!(text.contains("bytes of this output were cut here"));
    healthy(&ch).await;
}

/// Issue 18, case 4: a spec with a 900 KB label is refused at submit, and a default ListJobs
/// page of large (allowed) jobs stays within its byte budget.
#[tokio::test]
async fn large_specs_are_refused_and_pages_stay_small() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, ch) = start(dir.path(), &[]).await;
    let mut jobs = JobServiceClient::new(ch.clone());
    let mut req = command("labels", &["true"]);
    if let Some(spec) = req.spec.as_mut() {
        spec.labels.insert("big".into(), "x".repeat(900_000));
    }
    let err = jobs.submit_job(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("label 'big'"), "{}", err.message());

    let mut ids = Vec::new();
    for i in 0..24 {
        let mut req = command(&format!("wide-{i}"), &["true"]);
        if let Some(spec) = req.spec.as_mut() {
            spec.labels = (0..60)
                .map(|l| (format!("l{l:02}"), "y".repeat(1000)))
                .collect();
        }
        ids.push(jobs.submit_job(req).await.unwrap().into_inner().id);
    }
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = jobs
            .list_jobs(v1::ListJobsRequest {
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let bytes = prost::Message::encoded_len(&page);
        assert!(bytes < 1200 * 1024, "a page of {bytes} bytes");
        assert!(page.jobs.len() < 24);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
    healthy(&ch).await;
}

fn inference(input: &str, output: &str) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            name: "embed".into(),
            kind: Some(v1::job_spec::Kind::Inference(v1::InferenceJob {
                model: "identity".into(),
                input_path: input.into(),
                output_path: output.into(),
            })),
            ..Default::default()
        }),
    }
}

/// Issue 18, case 7: inference jobs read and write only under the configured folders; a path
/// outside them, through "..", or through a symlink is refused with INVALID_ARGUMENT naming the
/// path and the folders.
#[tokio::test]
async fn inference_job_paths_must_lie_under_the_configured_folders() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("in");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::write(allowed.join("ok.jsonl"), "{\"inputs\": {}}\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", allowed.join("link.jsonl")).unwrap();
    let (_server, ch) = start(
        dir.path(),
        &[
            "--inference-input-dirs",
            allowed.to_str().unwrap(),
            "--inference-output-dir",
            out.to_str().unwrap(),
        ],
    )
    .await;
    let mut jobs = JobServiceClient::new(ch.clone());
    let escape = format!("{}/../../../etc/passwd", allowed.display());
    let link = allowed.join("link.jsonl");
    let ok = allowed.join("ok.jsonl");
    let cases = [
        ("/etc/passwd", "o.jsonl", "/etc/passwd"),
        ("/dev/zero", "o.jsonl", "/dev/zero"),
        (escape.as_str(), "o.jsonl", "../etc/passwd"),
        (link.to_str().unwrap(), "o.jsonl", "link.jsonl"),
        (ok.to_str().unwrap(), "/etc/cron.d/x", "/etc/cron.d/x"),
        (ok.to_str().unwrap(), "../escape.jsonl", "../escape.jsonl"),
    ];
    for (input, output, named) in cases {
        let err = jobs.submit_job(inference(input, output)).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{input} {output}: {err:?}"
        );
        assert!(
            err.message().contains(named) && err.message().contains(out.to_str().unwrap()),
            "{}",
            err.message()
        );
    }
    // Inside the folders (a relative path is taken under them) a job is accepted, with its
    // paths resolved.
    let job = jobs
        .submit_job(inference("ok.jsonl", "result.jsonl"))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::job_spec::Kind::Inference(i)) = job.spec.and_then(|s| s.kind) else {
        panic!("not an inference job");
    };
    assert_eq!(Path::new(&i.input_path), ok.canonicalize().unwrap());
    assert_eq!(
        Path::new(&i.output_path),
        out.canonicalize().unwrap().join("result.jsonl")
    );
    healthy(&ch).await;
}
