//! Answers that must come from the running server, not fixed values, through the real binary:
//! the models placed on each GPU (`GetResources`) and a model's memory per device in KServe's
//! `ModelStatistics`.

use veraltheim_proto::inference::{
    self as kserve, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use veraltheim_proto::v1::{
    self, model_service_client::ModelServiceClient, resource_service_client::ResourceServiceClient,
};

mod common;

use common::{channel, start};

const MIB: u64 = 1 << 20;

/// A load of a built-in with a memory claim, optionally pinned to GPUs with `KIND_GPU`.
async fn load(ch: &tonic::transport::Channel, name: &str, bytes: u64, gpus: Option<&[u32]>) {
    let group = match gpus {
        Some(ids) => {
            format!(r#","instance_group":[{{"kind":"KIND_GPU","count":1,"gpus":{ids:?}}}]"#)
        }
        None => String::new(),
    };
    let config =
        format!(r#"{{"parameters":{{"memory_bytes":{{"string_value":"{bytes}"}}}}{group}}}"#);
    let model = ModelServiceClient::new(ch.clone())
        .load_model(v1::LoadModelRequest {
            name: name.into(),
            config_json: config,
        })
        .await
        .unwrap_or_else(|e| panic!("load {name}: {e}"))
        .into_inner();
    assert_eq!(model.state, v1::ModelState::Ready as i32, "{model:?}");
}

async fn resources(ch: &tonic::transport::Channel) -> v1::ResourceSnapshot {
    ResourceServiceClient::new(ch.clone())
        .get_resources(v1::GetResourcesRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Each GPU's models as GetResources lists them, by index.
fn models_by_gpu(s: &v1::ResourceSnapshot) -> Vec<(u32, Vec<String>)> {
    s.gpus.iter().map(|g| (g.index, g.models.clone())).collect()
}

/// KServe's memory usage of a model: (type, id, bytes).
async fn memory_usage(ch: &tonic::transport::Channel, name: &str) -> Vec<(String, i64, u64)> {
    let stats = GrpcInferenceServiceClient::new(ch.clone())
        .model_statistics(kserve::ModelStatisticsRequest {
            name: name.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.model_stats.len(), 1, "{stats:?}");
    stats.model_stats[0]
        .memory_usage
        .iter()
        .map(|m| (m.r#type.clone(), m.id, m.byte_size))
        .collect()
}

#[tokio::test]
async fn gpus_list_the_models_placed_on_them_and_statistics_their_memory() {
    let s = start(&["--simulate-gpus", "2x16GiB"]).await;
    let ch = channel(&s).await;
    assert_eq!(
        models_by_gpu(&resources(&ch).await),
        [(0, vec![]), (1, vec![])],
        "nothing placed yet"
    );

    // identity must run on GPU 1 (not the first, which the allocator would pick on a tie);
    // cost stays on the CPU (a built-in's default).
    load(&ch, "identity", 256 * MIB, Some(&[1])).await;
    load(&ch, "cost", 3 * MIB, None).await;
    let snap = resources(&ch).await;
    assert_eq!(
        models_by_gpu(&snap),
        [(0, vec![]), (1, vec!["identity".to_string()])]
    );
    let placed = &snap.gpus[1].placed_models;
    assert_eq!(
        placed,
        &[v1::PlacedModel {
            name: "identity".into(),
            bytes: 256 * MIB,
            state: "READY".into(),
        }]
    );
    let model = ModelServiceClient::new(ch.clone())
        .get_model(v1::GetModelRequest {
            name: "identity".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(model.device, "gpu1", "the model's own view agrees");

    // Triton's memory_usage: one entry per device, with the bytes the allocator holds there.
    assert_eq!(
        memory_usage(&ch, "identity").await,
        [("GPU".to_string(), 1, 256 * MIB)]
    );
    assert_eq!(
        memory_usage(&ch, "cost").await,
        [("CPU".to_string(), 0, 3 * MIB)]
    );

    // Unloaded: on no GPU, and its memory is no longer held.
    ModelServiceClient::new(ch.clone())
        .unload_model(v1::UnloadModelRequest {
            name: "identity".into(),
        })
        .await
        .unwrap();
    let snap = resources(&ch).await;
    assert_eq!(models_by_gpu(&snap), [(0, vec![]), (1, vec![])]);
    assert!(
        snap.gpus.iter().all(|g| g.placed_models.is_empty()),
        "{snap:?}"
    );
}
