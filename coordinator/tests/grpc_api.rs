//! End-to-end through the real binary: `veraltheim.v1` and the KServe service over real gRPC.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use tokio_stream::StreamExt;
use tonic::Code;
use veraltheim_proto::inference::{
    self as kserve, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use veraltheim_proto::v1::{
    self, inference_service_client::InferenceServiceClient,
    model_service_client::ModelServiceClient, system_service_client::SystemServiceClient,
};

mod common;

use common::{channel, fp32, start};

#[tokio::test]
async fn v1_infer_models_and_status() {
    let s = start(&[]).await;
    let ch = channel(&s).await;
    let mut infer = InferenceServiceClient::new(ch.clone());

    let r = infer
        .infer(v1::InferRequest {
            model: "cost".into(),
            id: "a".into(),
            inputs: vec![fp32("INPUT0", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.id, "a");
    assert_eq!(r.batch_size, 2);
    assert_eq!(r.outputs[0].shape, vec![2, 1]);
    match &r.outputs[0].data {
        Some(v1::tensor::Data::Values(v)) => assert_eq!(v.fp32, vec![3.0, 7.0]),
        other => panic!("{other:?}"),
    }
    let timing = r.timing.unwrap();
    assert!(timing.total_us >= timing.compute_us);

    // raw outputs on request
    let r = infer
        .infer(v1::InferRequest {
            model: "identity".into(),
            inputs: vec![fp32("INPUT0", vec![1, 2], vec![5.0, 6.0])],
            raw_outputs: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want: Vec<u8> = [5.0f32, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        r.outputs[0].data,
        Some(v1::tensor::Data::Raw(Bytes::from(want)))
    );

    // texts need a BYTES model
    let err = infer
        .infer(v1::InferRequest {
            model: "identity".into(),
            texts: vec!["hi".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("BYTES"), "{}", err.message());

    let err = infer
        .infer(v1::InferRequest {
            model: "identity".into(),
            inputs: vec![fp32("WRONG", vec![1, 1], vec![1.0])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("WRONG"));

    let err = infer
        .infer(v1::InferRequest {
            model: "nope".into(),
            inputs: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let mut models = ModelServiceClient::new(ch.clone());
    let list = models
        .list_models(v1::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["cost", "identity"],
        "fault needs --enable-fault-injection"
    );
    assert!(
        list.models
            .iter()
            .all(|m| m.state == v1::ModelState::Ready as i32)
    );

    let m = models
        .unload_model(v1::UnloadModelRequest {
            name: "identity".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state, v1::ModelState::NotLoaded as i32);
    let err = infer
        .infer(v1::InferRequest {
            model: "identity".into(),
            inputs: vec![fp32("INPUT0", vec![1, 1], vec![1.0])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let m = models
        .load_model(v1::LoadModelRequest {
            name: "identity".into(),
            config_json: r#"{"max_batch_size": 2}"#.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state, v1::ModelState::Ready as i32);
    assert_eq!(m.max_batch_size, 2);
    let err = models
        .load_model(v1::LoadModelRequest {
            name: "identity".into(),
            config_json: "{".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let stats = models
        .get_model_statistics(v1::GetModelStatisticsRequest {
            name: "cost".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.models[0].inference_count, 2);
    assert_eq!(stats.models[0].success.unwrap().count, 1);

    let status = SystemServiceClient::new(ch)
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let root = status.root.unwrap();
    assert!(!root.children.is_empty());
}

#[tokio::test]
async fn v1_stream_answers_every_request_by_id() {
    let s = start(&[]).await;
    let mut infer = InferenceServiceClient::new(channel(&s).await);
    let requests: Vec<v1::InferRequest> = (0..20)
        .map(|i| v1::InferRequest {
            model: "identity".into(),
            id: format!("r{i}"),
            inputs: vec![if i == 7 {
                fp32("BAD", vec![1, 1], vec![0.0])
            } else {
                fp32("INPUT0", vec![1, 1], vec![i as f32])
            }],
            ..Default::default()
        })
        .collect();
    let mut responses = infer
        .infer_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(item) = responses.next().await {
        let item = item.unwrap();
        let i: usize = item.id[1..].parse().unwrap();
        match item.result.unwrap() {
            v1::infer_stream_response::Result::Response(r) => match &r.outputs[0].data {
                Some(v1::tensor::Data::Values(v)) => assert_eq!(v.fp32, vec![i as f32]),
                other => panic!("{other:?}"),
            },
            v1::infer_stream_response::Result::Error(e) => {
                assert_eq!(i, 7);
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
        }
        seen.insert(i);
    }
    assert_eq!(seen.len(), 20);
}

#[tokio::test]
async fn oversize_requests_are_resource_exhausted() {
    let s = start(&["--max-message-bytes", "65536"]).await;
    let mut client = GrpcInferenceServiceClient::new(channel(&s).await);
    let n = 64 * 1024;
    let req = kserve::ModelInferRequest {
        model_name: "identity".into(),
        inputs: vec![kserve::model_infer_request::InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, n],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(vec![0u8; n as usize * 4])],
        ..Default::default()
    };
    let err = client.model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // and the server is fine afterwards
    let ok = client
        .server_live(kserve::ServerLiveRequest {})
        .await
        .unwrap();
    assert!(ok.into_inner().live);
}

/// The `cost` model's requests held by the server (from the allocator) and waiting in its queue.
async fn cost_in_flight_and_pending(ch: &tonic::transport::Channel) -> (u64, u64) {
    let mut models = ModelServiceClient::new(ch.clone());
    let memory = models
        .get_model_memory(v1::GetModelMemoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let in_flight = memory
        .devices
        .iter()
        .flat_map(|d| &d.holders)
        .filter(|h| h.key.starts_with("cost#"))
        .map(|h| h.in_flight)
        .sum();
    let stats = models
        .get_model_statistics(v1::GetModelStatisticsRequest {
            name: "cost".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (in_flight, stats.models[0].pending)
}

/// Polls until the `cost` model has `in_flight` requests of which `pending` are queued (read in
/// that order, so a request counted in flight and not queued is executing); 30 s at most.
async fn wait_for_cost(ch: &tonic::transport::Channel, in_flight: u64, pending: u64) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = cost_in_flight_and_pending(ch).await;
        if seen == (in_flight, pending) {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "cost never had {in_flight} requests in flight with {pending} queued; last {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_full_queue_is_refused_fast_and_the_server_recovers() {
    let s = start(&["--default-max-queue-size", "2", "--load-model", "cost"]).await;
    let ch = channel(&s).await;
    // Batches of one, each sleeping 5 s: one batch holds the model's only instance while the
    // queue behind it is filled and the refusal is checked (and the answer that shows the
    // model serves again takes 5 s too).
    ModelServiceClient::new(ch.clone())
        .load_model(v1::LoadModelRequest {
            name: "cost".into(),
            config_json: r#"{"max_batch_size":1,"parameters":{"base_us":{"string_value":"5000000"},"per_item_us":{"string_value":"0"},"busy":{"string_value":"sleep"}}}"#.into(),
        })
        .await
        .unwrap();
    let ask = |v: f32| v1::InferRequest {
        model: "cost".into(),
        inputs: vec![fp32("INPUT0", vec![1, 1], vec![v])],
        ..Default::default()
    };
    // The order in which calls come back.
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let call = |label: &'static str, v: f32| {
        let mut client = InferenceServiceClient::new(ch.clone());
        let (req, ended) = (ask(v), ended_tx.clone());
        tokio::spawn(async move {
            let result = client.infer(req).await;
            let _ = ended.send(label);
            result
        })
    };
    let held = call("held batch", 1.0);
    wait_for_cost(&ch, 1, 0).await;
    let queued = [call("queued", 2.0), call("queued", 3.0)];
    wait_for_cost(&ch, 3, 2).await;

    let err = InferenceServiceClient::new(ch.clone())
        .infer(ask(4.0))
        .await
        .expect_err("a third request while two are queued");
    ended_tx.send("refused").unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("cost"), "{}", err.message());
    // Fast: the refusal did not wait for room in the queue; it came back before the batch that
    // held the model ended, with the queue still full.
    assert_eq!(
        ended.recv().await,
        Some("refused"),
        "the refusal must come before anything it could have waited for"
    );
    assert_eq!(cost_in_flight_and_pending(&ch).await, (3, 2));
    let stats = ModelServiceClient::new(ch.clone())
        .get_model_statistics(v1::GetModelStatisticsRequest {
            name: "cost".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.models[0].rejected, 1);

    // The queued callers give up; the held batch ends.
    for q in &queued {
        q.abort();
    }
    let answer = held.await.unwrap().expect("the held batch is answered");
    match &answer.into_inner().outputs[0].data {
        Some(v1::tensor::Data::Values(v)) => assert_eq!(v.fp32, vec![1.0]),
        other => panic!("{other:?}"),
    }
    // Recovers: the model takes and answers requests again.
    let again = InferenceServiceClient::new(ch.clone())
        .infer(ask(5.0))
        .await
        .expect("an inference after the refusal")
        .into_inner();
    match &again.outputs[0].data {
        Some(v1::tensor::Data::Values(v)) => assert_eq!(v.fp32, vec![5.0]),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn watch_events_streams_model_state_changes_by_topic() {
    let s = start(&[]).await;
    let ch = channel(&s).await;
    let mut events = SystemServiceClient::new(ch.clone())
        .watch_events(v1::WatchEventsRequest {
            topics: vec!["models.cost.>".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut models = ModelServiceClient::new(ch.clone());
    models
        .unload_model(v1::UnloadModelRequest {
            name: "identity".into(),
        })
        .await
        .unwrap();
    models
        .unload_model(v1::UnloadModelRequest {
            name: "cost".into(),
        })
        .await
        .unwrap();
    models
        .load_model(v1::LoadModelRequest {
            name: "cost".into(),
            config_json: String::new(),
        })
        .await
        .unwrap();
    let mut states = Vec::new();
    while states.len() < 4 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            e.topic, "models.cost.state",
            "the filter must keep identity's events out"
        );
        states.push(e.attributes["state"].clone());
    }
    assert_eq!(states, ["UNLOADING", "NOT_LOADED", "LOADING", "READY"]);

    let err = SystemServiceClient::new(ch)
        .watch_events(v1::WatchEventsRequest {
            topics: vec!["models..x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn the_response_cache_answers_repeats_without_computing() {
    let s = start(&["--load-model", "cost"]).await;
    let ch = channel(&s).await;
    let mut models = ModelServiceClient::new(ch.clone());
    models
        .load_model(v1::LoadModelRequest {
            name: "cost".into(),
            config_json: r#"{"response_cache": {"enable": true}}"#.into(),
        })
        .await
        .unwrap();
    let mut infer = InferenceServiceClient::new(ch.clone());
    let ask = |v: f32| v1::InferRequest {
        model: "cost".into(),
        inputs: vec![fp32("INPUT0", vec![1, 2], vec![v, 1.0])],
        ..Default::default()
    };
    let first = infer.infer(ask(1.0)).await.unwrap().into_inner();
    let again = infer.infer(ask(1.0)).await.unwrap().into_inner();
    let other = infer.infer(ask(2.0)).await.unwrap().into_inner();
    assert_eq!(first.outputs, again.outputs);
    assert_ne!(first.outputs, other.outputs);
    let stats = GrpcInferenceServiceClient::new(ch)
        .model_statistics(kserve::ModelStatisticsRequest {
            name: "cost".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let m = &stats.model_stats[0];
    let inf = m.inference_stats.as_ref().unwrap();
    assert_eq!(inf.cache_hit.as_ref().unwrap().count, 1);
    assert_eq!(inf.cache_miss.as_ref().unwrap().count, 2);
    assert_eq!(m.inference_count, 2, "the hit must not reach the model");
    assert_eq!(inf.success.as_ref().unwrap().count, 3);
}

#[tokio::test]
async fn clients_over_their_rate_are_refused_with_a_retry_hint_and_refilled() {
    let s = start(&["--rate-limit-per-second", "1", "--rate-limit-burst", "2"]).await;
    let ch = channel(&s).await;
    let mut infer = InferenceServiceClient::new(ch.clone());
    // Each call names a fresh tenant: that must not give it a fresh bucket (a client could
    // otherwise bypass the limit by changing a header; issue 18 case 8).
    let call = |tenant: &str| {
        let mut r = tonic::Request::new(v1::InferRequest {
            model: "identity".into(),
            inputs: vec![fp32("INPUT0", vec![1, 1], vec![1.0])],
            ..Default::default()
        });
        r.metadata_mut()
            .insert("x-veraltheim-tenant", tenant.parse().unwrap());
        r
    };
    assert!(infer.infer(call("a")).await.is_ok());
    assert!(infer.infer(call("b")).await.is_ok());
    let err = infer.infer(call("c")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("'127.0.0.1'"), "{}", err.message());
    let wait_ms: u64 = err
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&wait_ms), "{wait_ms} ms at 1 request/s");
    // health stays answerable while the client is limited
    for _ in 0..5 {
        assert!(
            SystemServiceClient::new(ch.clone())
                .health(v1::HealthRequest {})
                .await
                .is_ok()
        );
    }
    // The bucket refills: after the hinted wait, a call is admitted again.
    tokio::time::sleep(Duration::from_millis(wait_ms + 50)).await;
    infer
        .infer(call("d"))
        .await
        .expect("admitted again once the hinted wait has passed");
}

#[tokio::test]
async fn events_carry_the_trace_context_of_their_cause() {
    let s = start(&[]).await;
    let ch = channel(&s).await;
    let mut events = SystemServiceClient::new(ch.clone())
        .watch_events(v1::WatchEventsRequest {
            topics: vec!["models.identity.state".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(v1::UnloadModelRequest {
        name: "identity".into(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    ModelServiceClient::new(ch).unload_model(req).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(e.traceparent.contains(trace_id), "{e:?}");
}

#[tokio::test]
async fn simulated_gpus_are_in_the_inventory_and_marked() {
    use veraltheim_proto::v1::resource_service_client::ResourceServiceClient;
    let s = start(&["--simulate-gpus", "2x80GiB"]).await;
    let snap = ResourceServiceClient::new(channel(&s).await)
        .get_resources(v1::GetResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.gpus.len(), 2);
    assert!(snap.gpus.iter().all(|g| g.simulated && !g.lost));
    assert_eq!(snap.gpus[1].memory_total_bytes, 80 << 30);
    assert_eq!(snap.gpu_probe, "simulated");
    let cpu = snap.cpu.unwrap();
    assert!(cpu.cores >= 1);

    let plain = start(&[]).await;
    let snap = ResourceServiceClient::new(channel(&plain).await)
        .get_resources(v1::GetResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    // Without --simulate-gpus: real GPUs through NVML, all of them marked real; or, without
    // NVML (this machine), no probe, no GPUs and the reason, which is not a failure.
    match snap.gpu_probe.as_str() {
        "nvml" => {
            assert!(snap.gpu_probe_error.is_empty(), "{snap:?}");
            assert!(snap.gpus.iter().all(|g| !g.simulated), "{snap:?}");
        }
        "" => {
            assert!(snap.gpus.is_empty(), "{snap:?}");
            assert!(!snap.gpu_probe_error.is_empty(), "{snap:?}");
        }
        other => panic!("probe {other:?} without --simulate-gpus: {snap:?}"),
    }
}

#[test]
fn a_bad_simulate_spec_stops_the_start_with_its_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .args([
            "serve",
            "--simulate-gpus",
            "2x80TB",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2x80TB"), "{stderr}");
}
