//! The status page's files and JSON endpoints on the real binary (no authentication here; the
//! rights are tested in tests/auth.rs beside every other route's).

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;
use veraltheim_proto::v1::{
    self, inference_service_client::InferenceServiceClient, job_service_client::JobServiceClient,
};

use common::{channel, fp32, http_call, http_exchange, start};

async fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = http_call(addr, "GET", path, None, "").await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

fn find<'a>(node: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('/').try_fold(node, |n, name| {
        n["children"].as_array()?.iter().find(|c| c["name"] == name)
    })
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn the_page_files_are_served_with_a_strict_policy() {
    let server = start(&[]).await;
    for (path, kind, marker) in [
        ("/", "text/html", "/page/app.js"),
        ("/page/app.js", "text/javascript", "/api/status"),
        ("/page/style.css", "text/css", ".spark"),
    ] {
        let (status, head, body) = http_exchange(&server.http, "GET", path, None, "").await;
        assert_eq!(status, 200, "{path}");
        assert!(
            header(&head, "content-type").is_some_and(|v| v.starts_with(kind)),
            "{path}: {head}"
        );
        let csp = header(&head, "content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
            "{path}: {csp}"
        );
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        assert!(body.contains(marker), "{path} lacks {marker}");
    }
    // The page loads nothing from elsewhere: it works offline.
    let (_, page) = http_call(&server.http, "GET", "/", None, "").await;
    let (_, script) = http_call(&server.http, "GET", "/page/app.js", None, "").await;
    for text in [&page, &script] {
        assert!(!text.contains("https://") && !text.contains("//cdn"));
    }
}

#[tokio::test]
async fn api_status_shows_the_tree_models_with_their_statistics_and_gpus() {
    let server = start(&["--simulate-gpus", "2x16GiB"]).await;
    let http = &server.http;
    let doc = get_json(http, "/api/status").await;
    // The supervision tree as GetStatus gives it (and `veraltheim status --json`).
    assert_eq!(doc["tree"]["name"], "SystemSupervisor");
    let node = find(&doc["tree"], "API/http").expect("API/http in the tree");
    assert_eq!(node["state"], "running");
    assert_eq!(node["restarts"], 0);
    assert!(find(&doc["tree"], "MessageBusSupervisor/QueueManager").is_some());
    assert_eq!(doc["ready"], true);
    assert!(doc["time_ms"].as_u64().unwrap() > 0);
    // Two simulated GPUs, as GetResources shows them.
    let gpus = doc["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[0]["simulated"], true);
    assert_eq!(gpus[0]["memory_total_bytes"], 16u64 << 30);
    assert!(gpus[1]["utilization_percent"].is_u64());
    assert!(doc["host"]["cores"].as_u64().unwrap() > 0);

    // A request to identity shows in its statistics.
    let model = |doc: &Value, name: &str| {
        doc["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no model {name}: {doc}"))
    };
    let before = model(&doc, "identity");
    assert_eq!(before["state"], "READY");
    assert_eq!(before["device"], "cpu");
    assert_eq!(before["stats"]["success"], 0);
    let mut client = InferenceServiceClient::new(channel(&server).await);
    for _ in 0..3 {
        client
            .infer(v1::InferRequest {
                model: "identity".into(),
                inputs: vec![fp32("INPUT0", vec![1, 2], vec![1.0, 2.0])],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let after = model(&get_json(http, "/api/status").await, "identity");
    let stats = &after["stats"];
    assert_eq!(stats["success"], 3, "{after}");
    assert_eq!(stats["failure"], 0);
    assert_eq!(stats["inference_count"], 3);
    let executions = stats["execution_count"].as_u64().unwrap();
    assert!((1..=3).contains(&executions), "{stats}");
    assert_eq!(
        stats["avg_batch_size"].as_f64().unwrap(),
        3.0 / executions as f64
    );
    assert_eq!(stats["pending"], 0);
    assert!(stats["total_p50_us"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["total_p99_us"].as_u64() >= stats["total_p50_us"].as_u64());
}

#[tokio::test]
async fn api_jobs_lists_the_newest_first_within_a_bound_and_logs_give_the_tail() {
    let server = start(&[]).await;
    let http = &server.http;
    let mut jobs = JobServiceClient::new(channel(&server).await);
    let mut ids = Vec::new();
    for i in 0..3 {
        let script = format!("echo out-{i}; echo err-{i} >&2");
        let job = jobs
            .submit_job(common::command(&format!("j{i}"), &["sh", "-c", &script]))
            .await
            .unwrap()
            .into_inner();
        ids.push(job.id);
    }
    for id in &ids {
        common::wait_for(&mut jobs, id, v1::JobState::Succeeded).await;
    }
    let doc = get_json(http, "/api/jobs").await;
    let listed: Vec<&str> = doc["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [&ids[2], &ids[1], &ids[0]], "newest first");
    assert_eq!(doc["more"], false);
    assert_eq!(doc["limit"], 50);
    let first = &doc["jobs"][0];
    assert_eq!(first["name"], "j2");
    assert_eq!(first["state"], "SUCCEEDED");
    assert_eq!(first["progress"], 1.0);
    assert_eq!(first["queue"], "default");
    assert_eq!(first["kind"], "command");
    assert!(first["created_ms"].as_u64().unwrap() <= doc["time_ms"].as_u64().unwrap());
    // The bound.
    let doc = get_json(http, "/api/jobs?limit=2").await;
    assert_eq!(doc["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(doc["jobs"][0]["id"], ids[2]);
    assert_eq!(doc["more"], true);

    // The logs of a job: each stream's tail.
    let logs = get_json(http, &format!("/api/jobs/{}/logs", ids[1])).await;
    assert_eq!(logs["state"], "SUCCEEDED");
    assert_eq!(logs["attempt"], 1);
    let stream = |logs: &Value, name: &str| {
        logs["logs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["stream"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name}: {logs}"))
    };
    assert_eq!(stream(&logs, "stdout")["text"], "out-1\n");
    assert_eq!(stream(&logs, "stderr")["text"], "err-1\n");
    assert_eq!(stream(&logs, "stdout")["truncated"], false);
    let tail = get_json(http, &format!("/api/jobs/{}/logs?tail_bytes=3", ids[1])).await;
    let out = stream(&tail, "stdout");
    assert_eq!(out["text"], "-1\n");
    assert_eq!(out["bytes"], 6);
    assert_eq!(out["truncated"], true);

    // Bad input is named.
    for (path, status, words) in [
        ("/api/jobs?limit=0", 400, "from 1 to 500"),
        ("/api/jobs?limit=100000", 400, "from 1 to 500"),
        ("/api/jobs?page=2", 400, "unknown query parameter 'page'"),
        (
            "/api/jobs/00000000000000000000/logs",
            404,
            "00000000000000000000",
        ),
    ] {
        let (got, body) = http_call(http, "GET", path, None, "").await;
        assert_eq!(got, status, "{path}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(words),
            "{path}: {body}"
        );
    }
    let (got, body) = http_call(
        http,
        "GET",
        &format!("/api/jobs/{}/logs?tail_bytes=9999999", ids[0]),
        None,
        "",
    )
    .await;
    assert_eq!(got, 400, "{body}");
    assert!(body.contains("tail_bytes"), "{body}");
}

#[tokio::test]
async fn a_killed_child_shows_its_restart_in_api_status() {
    let server = start(&["--enable-fault-injection"]).await;
    let http = &server.http;
    veraltheim_proto::v1::system_service_client::SystemServiceClient::new(channel(&server).await)
        .kill_child(v1::KillChildRequest {
            path: "MessageBusSupervisor/QueueManager".into(),
        })
        .await
        .unwrap();
    // The restart waits out a short backoff.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let doc = get_json(http, "/api/status").await;
        let node = find(&doc["tree"], "MessageBusSupervisor/QueueManager").unwrap();
        if node["restarts"] == 1 && node["state"] == "running" {
            assert_eq!(node["last_failure"], "killed");
            break;
        }
        assert!(Instant::now() < until, "no restart shown: {node}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Killing the HTTP server itself: it comes back, and the page's data with it.
    veraltheim_proto::v1::system_service_client::SystemServiceClient::new(channel(&server).await)
        .kill_child(v1::KillChildRequest {
            path: "API/http".into(),
        })
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http_call(http, "GET", "/api/status", None, "").await;
        if status == 200 {
            let doc: Value = serde_json::from_str(&body).unwrap();
            if find(&doc["tree"], "API/http").unwrap()["restarts"] == 1 {
                break;
            }
        }
        assert!(Instant::now() < until, "the HTTP server did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
