//! Batch-1 requests on an idle, fast model run on the thread that received them, through the
//! real binary: `/metrics` counts them (`veraltheim_inference_inline_total`), the answers are
//! right, and `--inline-execution-us 0` turns it off.

use veraltheim_proto::v1::{self, inference_service_client::InferenceServiceClient};

mod common;

use common::{channel, fp32, http_call, start};

/// Sends `n` identity requests one after the other, checks each answer, and returns the
/// model's inline count from `/metrics`.
async fn inline_after(s: &common::Server, n: usize) -> f64 {
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
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("veraltheim_inference_inline_total{model=\"identity\"")
                .and_then(|rest| rest.split_once("} "))
                .and_then(|(_, v)| v.trim().parse().ok())
        })
        .expect("no veraltheim_inference_inline_total for identity in /metrics")
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
