//! Latency objectives through the real binary (issue 17): `--latency-slo` gives a built-in model
//! one; a batch inference job on it runs as background work under the model's controller; the
//! controller's state shows in ModelStatistics, `models stats`, `/metrics` and the status tree.

use std::process::Command;
use std::time::{Duration, Instant};

use veraltheim_proto::v1::{
    self, job_service_client::JobServiceClient, model_service_client::ModelServiceClient,
    system_service_client::SystemServiceClient,
};

mod common;

fn inference(model: &str, input: &str, output: &str) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            name: "embed".into(),
            kind: Some(v1::job_spec::Kind::Inference(v1::InferenceJob {
                model: model.into(),
                input_path: input.into(),
                output_path: output.into(),
            })),
            ..Default::default()
        }),
    }
}

async fn objective(ch: &tonic::transport::Channel, model: &str) -> v1::LatencyObjective {
    ModelServiceClient::new(ch.clone())
        .get_model_statistics(v1::GetModelStatisticsRequest { name: model.into() })
        .await
        .unwrap()
        .into_inner()
        .models
        .remove(0)
        .objective
        .unwrap_or_else(|| panic!("model {model} shows no objective"))
}

fn find_detail(n: &v1::SupervisorNode, prefix: &str) -> Option<String> {
    if n.name.starts_with(prefix) && !n.detail.is_empty() {
        return Some(n.detail.clone());
    }
    n.children.iter().find_map(|c| find_detail(c, prefix))
}

/// A server with `--latency-slo cost=250` and an input of `lines` lines for `cost` in its
/// inference folder (`in/lines.jsonl`; the output goes to `out/`).
async fn started(lines: usize) -> (tempfile::TempDir, common::Server, tonic::transport::Channel) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    std::fs::create_dir_all(&input).unwrap();
    let text: String = (0..lines)
        .map(|i| format!("{{\"inputs\": {{\"INPUT0\": [[{i}.0]]}}}}\n"))
        .collect();
    std::fs::write(input.join("lines.jsonl"), text).unwrap();
    let server = common::start(&[
        "--latency-slo",
        "cost=250",
        "--inference-input-dirs",
        input.to_str().unwrap(),
        "--inference-output-dir",
        output.to_str().unwrap(),
    ])
    .await;
    let ch = common::channel(&server).await;
    (dir, server, ch)
}

#[tokio::test]
async fn a_batch_job_runs_under_the_controller_and_its_state_is_shown_everywhere() {
    let (dir, server, ch) = started(2_000).await;
    let output = dir.path().join("out");

    // Loaded with the objective the flag gave; nothing ran yet.
    let o = objective(&ch, "cost").await;
    assert_eq!(o.slo_p99_ms, 250);
    assert_eq!((o.background_limit, o.background_in_flight), (1, 0));
    assert_eq!(
        o.background_max, 128,
        "twice max_batch_size (64) × 1 instance"
    );
    // `identity` got none.
    let stats = ModelServiceClient::new(ch.clone())
        .get_model_statistics(v1::GetModelStatisticsRequest {
            name: "identity".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.models[0].objective.is_none());

    let mut jobs = JobServiceClient::new(ch.clone());
    let job = jobs
        .submit_job(inference("cost", "lines.jsonl", "result.jsonl"))
        .await
        .unwrap()
        .into_inner();
    let done = common::wait_for(&mut jobs, &job.id, v1::JobState::Succeeded).await;
    assert_eq!(done.state, v1::JobState::Succeeded as i32);
    let written = std::fs::read_to_string(output.join("result.jsonl")).unwrap();
    assert_eq!(written.lines().count(), 2_000);
    assert!(!written.contains("\"error\""));

    // With no online traffic, background work was held back by the limit and the model idle:
    // the controller grew the limit, and says why.
    let o = objective(&ch, "cost").await;
    assert!(o.grows >= 1 && o.background_limit > 1, "{o:?}");
    assert_eq!(o.shrinks, 0, "{o:?}");
    assert!(!o.at_risk);
    assert_eq!(o.background_in_flight, 0);
    assert!(!o.reason.is_empty() && !o.decision.is_empty(), "{o:?}");

    // The status tree: the model's supervisor reports its objective.
    let status = SystemServiceClient::new(ch.clone())
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let detail = find_detail(status.root.as_ref().unwrap(), "model:cost")
        .expect("model:cost carries its objective in the status tree");
    assert!(detail.contains("objective p99 250 ms"), "{detail}");

    // /metrics.
    let (code, metrics) = common::http_call(&server.http, "GET", "/metrics", None, "").await;
    assert_eq!(code, 200);
    for family in [
        "veraltheim_model_slo_p99_seconds{model=\"cost\"",
        "veraltheim_background_limit{model=\"cost\"",
        "veraltheim_background_in_flight{model=\"cost\"",
        "veraltheim_model_online_p99_seconds{model=\"cost\"",
        "veraltheim_model_slo_at_risk{model=\"cost\"",
    ] {
        assert!(metrics.contains(family), "no {family} in /metrics");
    }
    assert!(
        metrics.contains("veraltheim_model_slo_p99_seconds{model=\"cost\",version=\"1\"} 0.25")
    );
    assert!(!metrics.contains("veraltheim_model_slo_p99_seconds{model=\"identity\""));

    // The CLI's table.
    let out = Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .args(["models", "stats", "cost", "--server", &server.grpc])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("SLO_MS") && text.contains("BG_LIMIT"),
        "{text}"
    );
}

#[tokio::test]
async fn online_requests_keep_their_place_ahead_of_a_running_job() {
    let (_dir, _server, ch) = started(20_000).await;
    let mut jobs = JobServiceClient::new(ch.clone());
    let job = jobs
        .submit_job(inference("cost", "lines.jsonl", "result.jsonl"))
        .await
        .unwrap()
        .into_inner();
    common::wait_for(&mut jobs, &job.id, v1::JobState::Running).await;
    // Online requests while the job runs are answered, and counted in the objective's window.
    let mut client =
        veraltheim_proto::v1::inference_service_client::InferenceServiceClient::new(ch.clone());
    let until = Instant::now() + Duration::from_secs(60);
    let mut answered = 0;
    while answered < 50 {
        assert!(Instant::now() < until, "online requests were not answered");
        client
            .infer(v1::InferRequest {
                model: "cost".into(),
                inputs: vec![common::fp32("INPUT0", vec![1, 1], vec![1.0])],
                ..Default::default()
            })
            .await
            .unwrap();
        answered += 1;
    }
    let o = objective(&ch, "cost").await;
    assert!(o.window_requests >= 1, "{o:?}");
    assert!(o.online_p99_us > 0, "{o:?}");
    jobs.cancel_job(v1::CancelJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    common::wait_for(&mut jobs, &job.id, v1::JobState::Cancelled).await;
}

#[test]
fn a_malformed_objective_stops_the_start_and_names_it() {
    for (flag, named) in [("cost", "'cost'"), ("cost=0", "'cost=0'"), ("=5", "'=5'")] {
        let out = Command::new(env!("CARGO_BIN_EXE_veraltheim"))
            .args([
                "serve",
                "--latency-slo",
                flag,
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:1",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("models.latency_slo") && stderr.contains(named),
            "{flag}: {stderr}"
        );
    }
}
