//! Batch-1 requests on an idle, fast model run on the thread that received them, through the
//! real binary: `/metrics` counts them (`veraltheim_inference_inline_total`), the answers are
//! right, and `--inline-execution-us 0` turns it off. Likewise the batches of a tiny model on its
//! batcher task (`veraltheim_inference_batcher_executions_total`, `--batcher-execution-us`).

use veraltheim_proto::v1::{self, inference_service_client::InferenceServiceClient};

mod common;

use common::{channel, fp32, http_call, start};

/// Sends `n` identity requests one after the other, checks each answer, and returns the
/// model's inline count from `/metrics`.
async fn inline_after(s: &common::Server, n: usize) -> f64 {
    counter_after(s, n, "veraltheim_inference_inline_total").await
}

/// Sends `n` identity requests one after the other, checks each answer, and returns the
/// model's `counter` from `/metrics`.
async fn counter_after(s: &common::Server, n: usize, counter: &str) -> f64 {
    let mut infer = InferenceServiceClient::new(channel(s).await);
    for i in 0..n {
        let v = i as f32;
        let r = infer
            .infer(v1::InferRequest {
                model: "identity".into(),
                inputs: vec![fp32("INPUT0", vec![1, 2], vec![v, -v])],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        match &r.outputs[0].data {
            Some(v1::tensor::Data::Values(t)) => assert_eq!(t.fp32, vec![v, -v]),
            other => panic!("{other:?}"),
        }
    }
    let (code, metrics) = http_call(&s.http, "GET", "/metrics", None, "").await;
    assert_eq!(code, 200);
    let prefix = format!("{counter}{{model=\"identity\"");
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&prefix)
                .and_then(|rest| rest.split_once("} "))
                .and_then(|(_, v)| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {counter} for identity in /metrics"))
}

#[tokio::test]
async fn lone_requests_on_a_fast_idle_model_run_inline_unless_turned_off() {
    // A bound no identity batch exceeds even on a busy machine: 20 ms.
    let on = start(&["--inline-execution-us", "20000"]).await;
    // 64 batches in a row must be seen fast first; the next lone ones run inline.
    assert!(inline_after(&on, 100).await >= 1.0);
    let off = start(&["--inline-execution-us", "0"]).await;
    assert_eq!(inline_after(&off, 100).await, 0.0);
}

#[tokio::test]
async fn batches_of_a_tiny_model_run_on_its_batcher_unless_turned_off() {
    const BATCHER: &str = "veraltheim_inference_batcher_executions_total";
    // Inline execution off, so that every request goes through the batcher; a bound no
    // identity batch exceeds even on a busy machine: 20 ms.
    let on = start(&[
        "--inline-execution-us",
        "0",
        "--batcher-execution-us",
        "20000",
    ])
    .await;
    // 64 batches must be seen first, tiny on average; the next ones run on the batcher task.
    assert!(counter_after(&on, 100, BATCHER).await >= 1.0);
    let off = start(&["--inline-execution-us", "0", "--batcher-execution-us", "0"]).await;
    assert_eq!(counter_after(&off, 100, BATCHER).await, 0.0);
}
