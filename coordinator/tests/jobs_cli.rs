//! The jobs CLI against the real binary: `jobs submit -f job.toml` with flags over the file,
//! `jobs watch` as plain lines when its output is not a terminal (with its exit status), and
//! finished jobs deleted with their logs once their TTL ran out.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use veraltheim_proto::v1::{self, job_service_client::JobServiceClient};

mod common;

/// `veraltheim jobs ARGS...` against `server` (`--server` goes first: after `--`, it would be
/// part of the job's command).
fn cli(server: &common::Server, args: &[&str]) -> Output {
    let (first, rest) = args.split_first().unwrap();
    Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .arg(first)
        .args(["--server", &server.grpc])
        .args(rest)
        .env_remove("VERALTHEIM_SERVER")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `jobs submit` printed one id and nothing else.
fn submitted_id(out: &Output) -> String {
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "submit failed: {}", text(&out.stderr));
    let id = stdout.trim_end_matches('\n');
    assert!(
        id.len() == 20 && id.bytes().all(|b| b.is_ascii_digit()),
        "stdout is not an id alone: {stdout:?}"
    );
    id.to_string()
}

#[tokio::test]
async fn submit_from_a_job_file_with_flags_over_it_then_watch() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_in(dir.path(), &[]).await;
    let file = dir.path().join("job.toml");
    std::fs::write(
        &file,
        r#"
name = "from-file"
priority = "low"
max_retries = 2
ttl = "1h"
idempotency_key = "file-1"

[resources]
cpu = "250m"
memory = "64Mi"

[labels]
team = "search"

[command]
command = ["sh", "-c", "echo $GREETING; echo $OTHER"]
env = { GREETING = "from the file", OTHER = "kept" }
"#,
    )
    .unwrap();
    let out = cli(
        &server,
        &[
            "jobs",
            "submit",
            "-f",
            file.to_str().unwrap(),
            "--name",
            "from-flag",
            "--env",
            "GREETING=from the flag",
            "--label",
            "stage=test",
        ],
    );
    let id = submitted_id(&out);

    let mut jobs = JobServiceClient::new(common::channel(&server).await);
    let job = jobs
        .get_job(v1::GetJobRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let spec = job.spec.unwrap();
    assert_eq!(spec.name, "from-flag", "the flag overrides the file");
    assert_eq!(spec.priority_class, "low");
    assert_eq!(spec.max_retries, 2);
    assert_eq!(spec.ttl_seconds_after_finished, 3600);
    assert_eq!(spec.idempotency_key, "file-1");
    let r = spec.resources.unwrap();
    assert_eq!((r.cpu_millis, r.memory_bytes), (250, 64 << 20));
    assert_eq!(spec.labels.get("team").map(String::as_str), Some("search"));
    assert_eq!(spec.labels.get("stage").map(String::as_str), Some("test"));

    // Not a terminal: one plain line per change, the last one the end; exit status 0.
    let out = cli(&server, &["jobs", "watch", &id]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        !stdout.contains('\r') && !stdout.contains('\x1b'),
        "{stdout:?}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.last().copied(),
        Some("SUCCEEDED attempt 1  exited with code 0"),
        "{stdout}"
    );
    let logs = cli(&server, &["jobs", "logs", &id]);
    assert_eq!(text(&logs.stdout), "from the flag\nkept\n");

    // --json: one object per line.
    let out = cli(&server, &["jobs", "watch", &id, "--json"]);
    let last: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "SUCCEEDED");
    assert_eq!(last["id"], id.as_str());
}

#[tokio::test]
async fn watch_exits_non_zero_unless_the_job_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_in(dir.path(), &[]).await;
    let id = submitted_id(&cli(
        &server,
        &[
            "jobs", "submit", "--name", "fails", "--", "sh", "-c", "exit 3",
        ],
    ));
    let out = cli(&server, &["jobs", "watch", &id]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("FAILED attempt 1  exited with code 3"),
        "{stdout}"
    );
    // Only the last line is a terminal state.
    let terminal = ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"];
    let states: Vec<&str> = stdout
        .lines()
        .map(|l| l.split(' ').next().unwrap_or_default())
        .collect();
    let (last_state, before) = states.split_last().unwrap();
    assert_eq!(*last_state, "FAILED");
    assert!(before.iter().all(|s| !terminal.contains(s)), "{stdout}");

    let out = cli(&server, &["jobs", "watch", "00000000000000000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no job with id"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn a_bad_job_file_is_refused_by_name_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_in(dir.path(), &[]).await;
    let file = dir.path().join("job.toml");
    std::fs::write(&file, "name = \"x\"\n[command]\ncmd = [\"true\"]\n").unwrap();
    let out = cli(&server, &["jobs", "submit", "-f", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown field `cmd`"), "{stderr}");
    let list = cli(&server, &["jobs", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list, serde_json::json!([]), "nothing was submitted");
}

async fn gone(jobs: &mut JobServiceClient<tonic::transport::Channel>, id: &str) -> bool {
    match jobs.get_job(v1::GetJobRequest { id: id.into() }).await {
        Err(s) if s.code() == tonic::Code::NotFound => true,
        Err(s) => panic!("GetJob {id}: {s}"),
        Ok(_) => false,
    }
}

#[tokio::test]
async fn finished_jobs_are_deleted_with_their_logs_after_their_ttl() {
    let dir = tempfile::tempdir().unwrap();
    // The server's default TTL, 1 s, for jobs submitted without one.
    let server = common::start_in(dir.path(), &["--default-job-ttl-seconds", "1"]).await;
    let short = submitted_id(&cli(&server, &["jobs", "submit", "--", "echo", "short"]));
    let kept = submitted_id(&cli(
        &server,
        &["jobs", "submit", "--ttl", "1h", "--", "echo", "kept"],
    ));
    let logs_of = |id: &str| -> std::path::PathBuf {
        Path::new(dir.path()).join("data").join("jobs").join(id)
    };
    let mut jobs = JobServiceClient::new(common::channel(&server).await);
    let until = Instant::now() + Duration::from_secs(30);
    while !gone(&mut jobs, &short).await {
        assert!(Instant::now() < until, "job {short} was never deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The record goes first, its log folder just after it (the same sweep).
    while logs_of(&short).exists() {
        assert!(Instant::now() < until, "its log folder is left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job = jobs
        .get_job(v1::GetJobRequest { id: kept.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, v1::JobState::Succeeded as i32);
    assert_eq!(job.spec.unwrap().ttl_seconds_after_finished, 3600);
    assert!(logs_of(&kept).join("attempt-1.stdout").exists());
    let list = jobs
        .list_jobs(v1::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = list.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [kept.as_str()]);
}
