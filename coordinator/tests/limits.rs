//! The `[limits]` through the real binary: each case here was accepted, answered INTERNAL, or
//! aborted the process before the limits existed (issue 18). Each asserts the exact status, that
//! the message names the field or limit, and that the server still serves afterwards.

use tonic::Code;
use veraltheim_proto::v1::{
    self, inference_service_client::InferenceServiceClient,
    model_service_client::ModelServiceClient, system_service_client::SystemServiceClient,
};

mod common;

use common::{channel, fp32, start};

/// The server still answers an ordinary inference.
async fn still_serves(ch: &tonic::transport::Channel) {
    let r = InferenceServiceClient::new(ch.clone())
        .infer(v1::InferRequest {
            model: "identity".into(),
            inputs: vec![fp32("INPUT0", vec![1, 2], vec![1.0, 2.0])],
            ..Default::default()
        })
        .await
        .expect("identity still answers");
    assert_eq!(r.into_inner().batch_size, 1);
}

#[tokio::test]
async fn watch_events_bounds_its_topic_patterns() {
    let s = start(&[]).await;
    let ch = channel(&s).await;
    let mut system = SystemServiceClient::new(ch.clone());
    // 250,000 patterns once took ~2.6 GiB and aborted the process; far fewer show the bound.
    let many = (0..5_000).map(|i| format!("models.m{i}.>")).collect();
    let err = system
        .watch_events(v1::WatchEventsRequest { topics: many })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("limits.max_watch_topics"), "{err}");

    let long = format!("models.{}", "x".repeat(300));
    let err = system
        .watch_events(v1::WatchEventsRequest { topics: vec![long] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("limits.max_topic_pattern_bytes"),
        "{err}"
    );

    // Within the limits a watch still opens.
    system
        .watch_events(v1::WatchEventsRequest {
            topics: vec!["models.>".into(); 64],
        })
        .await
        .expect("64 patterns are within the default");
    still_serves(&ch).await;
}

#[tokio::test]
async fn loads_beyond_the_limits_or_with_a_bad_config_are_invalid_argument_by_name() {
    // Two execution threads: the instance bound is the pool's size.
    let s = start(&["--execution-threads", "2"]).await;
    let ch = channel(&s).await;
    let mut models = ModelServiceClient::new(ch.clone());
    let cases = [
        // Aborted the process (allocation of 4 PiB in the warm-up).
        (
            r#"{"model_warmup":[{"name":"w","batch_size":1,"inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[1125899906842624],"zero_data":true}}}]}"#,
            "limits.max_tensor_elements",
        ),
        // Accepted: 2^31 warm-up runs.
        (
            r#"{"model_warmup":[{"name":"w","count":2147483648,"inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[1],"zero_data":true}}}]}"#,
            "limits.max_warmup_count",
        ),
        // Accepted: requests then waited until their deadline.
        (
            r#"{"dynamic_batching":{"max_queue_delay_microseconds":"9223372036854775808"}}"#,
            "max_queue_delay_microseconds",
        ),
        // Accepted: 8 instances on a pool of 2 held every thread.
        (
            r#"{"instance_group":[{"count":8,"kind":"KIND_CPU"}]}"#,
            "instance_group",
        ),
        // Accepted: an hour of sleep per batch.
        (
            r#"{"parameters":{"base_us":{"string_value":"3600000000"},"busy":{"string_value":"sleep"}}}"#,
            "limits.max_builtin_cost_us",
        ),
        // Silently ignored.
        (r#"{"max_batch_sise":8}"#, "max_batch_sise"),
        // INTERNAL before: the caller's own parameter value and backend switch.
        (
            r#"{"parameters":{"per_item_us":{"string_value":"x"}}}"#,
            "per_item_us",
        ),
        (r#"{"backend":"onnxruntime"}"#, "backend"),
    ];
    for (config, field) in cases {
        let err = models
            .load_model(v1::LoadModelRequest {
                name: "cost".into(),
                config_json: config.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{config}: {err}");
        assert!(
            err.message().contains(field),
            "{config}: {err} should name {field}"
        );
    }
    // Within the limits a load still works, and the other models kept serving.
    models
        .load_model(v1::LoadModelRequest {
            name: "cost".into(),
            config_json: r#"{"instance_group":[{"count":2,"kind":"KIND_CPU"}]}"#.into(),
        })
        .await
        .expect("two instances on a pool of two");
    still_serves(&ch).await;
}

#[tokio::test]
async fn a_tensor_beyond_the_element_limit_is_invalid_argument() {
    let s = start(&["--max-tensor-elements", "8"]).await;
    let ch = channel(&s).await;
    let err = InferenceServiceClient::new(ch.clone())
        .infer(v1::InferRequest {
            model: "identity".into(),
            inputs: vec![fp32("INPUT0", vec![1, 16], vec![0.0; 16])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("limits.max_tensor_elements"),
        "{err}"
    );
    still_serves(&ch).await;
}
