//! KServe v2 over HTTP/REST, as Triton serves it (what `tritonclient.http` and curl speak):
//! server and model metadata, readiness, configuration, statistics, inference (JSON tensors and
//! the binary-data extension, `tensors.rs`) and the model repository (index, load with a
//! `config` override, unload). The answers carry what the gRPC service's do, in Triton's JSON.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use veraltheim_models::allocator::DeviceId;
use veraltheim_models::{ModelConfig, ModelState};

use super::tensors;
use super::{RestError, audit_result, caller, json_body, read_body, refused, shm_refusal, traced};
use crate::auth::{Caller, code_name};
use crate::context::Context;

/// The caller found by the authentication layer.
type Found = Option<axum::Extension<Caller>>;

/// The protocol extensions served over HTTP (Triton's names); `system_shared_memory` is added
/// when the server allows client shared memory, as over gRPC. CUDA shared memory is answered as
/// Triton answers it without GPU support (no regions, registration refused), and so is not
/// listed.
const EXTENSIONS: &[&str] = &[
    "model_repository",
    "model_configuration",
    "schedule_policy",
    "statistics",
    "binary_tensor_data",
    "parameters",
];

pub fn routes() -> Router<Arc<Context>> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{name}/config", get(model_config))
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(model_config),
        )
        .route("/v2/models/{name}/stats", get(model_statistics))
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(model_statistics),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(load))
        .route("/v2/repository/models/{name}/unload", post(unload))
        // System shared memory: the registry gRPC uses (`shm.rs`).
        .route("/v2/systemsharedmemory/status", get(system_status_all))
        .route(
            "/v2/systemsharedmemory/region/{name}/status",
            get(system_status),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/register",
            post(system_register),
        )
        .route(
            "/v2/systemsharedmemory/unregister",
            post(system_unregister_all),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/unregister",
            post(system_unregister),
        )
        // CUDA shared memory, as Triton answers it without GPU support (`shm.rs`).
        .route("/v2/cudasharedmemory/status", get(cuda_status_all))
        .route(
            "/v2/cudasharedmemory/region/{name}/status",
            get(cuda_status),
        )
        .route(
            "/v2/cudasharedmemory/region/{name}/register",
            post(cuda_register),
        )
        .route("/v2/cudasharedmemory/unregister", post(cuda_unregister_all))
        .route(
            "/v2/cudasharedmemory/region/{name}/unregister",
            post(cuda_unregister),
        )
}

/// A model named in the path, with the version asked for (empty: the serving one).
#[derive(Deserialize)]
struct ModelPath {
    name: String,
    #[serde(default)]
    version: String,
}

fn model_path(path: Result<Path<ModelPath>, PathRejection>) -> Result<ModelPath, RestError> {
    path.map(|Path(p)| p)
        .map_err(|e| RestError::bad_request(format!("the model path: {}", e.body_text())))
}

/// Checks that `name` exists and serves `version`.
fn check(ctx: &Context, name: &str, version: &str) -> Result<(), RestError> {
    ctx.models
        .check_version(name, version)
        .map_err(RestError::serving)
}

async fn server_metadata(State(ctx): State<Arc<Context>>) -> Response {
    let extensions: Vec<&str> = EXTENSIONS
        .iter()
        .copied()
        .chain(ctx.shm.allowed().then_some("system_shared_memory"))
        .collect();
    super::json(&json!({
        "name": crate::kserve::SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": extensions,
    }))
}

fn tensor_metadata(c: &ModelConfig, list: &[veraltheim_models::config::TensorConfig]) -> Value {
    list.iter()
        .map(|t| {
            json!({
                "name": t.name,
                "datatype": ModelConfig::datatype_of(t).as_str(),
                "shape": c.full_shape(t),
            })
        })
        .collect()
}

async fn model_metadata(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Response, RestError> {
    let p = model_path(path)?;
    caller(found)?.model(&p.name).map_err(refused)?;
    check(&ctx, &p.name, &p.version)?;
    let info = ctx.models.info(&p.name).map_err(RestError::serving)?;
    let c = &info.config;
    let platform = if c.platform.is_empty() {
        &c.backend
    } else {
        &c.platform
    };
    Ok(super::json(&json!({
        "name": info.name,
        "versions": [info.version],
        "platform": platform,
        "inputs": tensor_metadata(c, &c.input),
        "outputs": tensor_metadata(c, &c.output),
    })))
}

/// 200 when the model is READY (and serves the version asked for); 404 for an unknown model or
/// version; 503, saying its state, when it is known but not ready.
async fn model_ready(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<StatusCode, RestError> {
    let p = model_path(path)?;
    caller(found)?.model(&p.name).map_err(refused)?;
    let info = ctx.models.info(&p.name).map_err(RestError::serving)?;
    check(&ctx, &p.name, &p.version)?;
    if info.state == ModelState::Ready {
        Ok(StatusCode::OK)
    } else {
        Err(RestError::serving(veraltheim_serving::Error::NotReady {
            name: info.name,
            state: info.state,
            reason: info.reason,
        }))
    }
}

/// The configuration in effect, in Triton's JSON form, with the defaults Triton reports filled
/// in (one CPU instance, the latest version), as the gRPC answer has them.
async fn model_config(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Response, RestError> {
    let p = model_path(path)?;
    caller(found)?.model(&p.name).map_err(refused)?;
    check(&ctx, &p.name, &p.version)?;
    let info = ctx.models.info(&p.name).map_err(RestError::serving)?;
    let mut config = serde_json::to_value(&info.config).map_err(|e| {
        RestError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the configuration of '{}' cannot be written: {e}", p.name),
        )
    })?;
    if let Value::Object(map) = &mut config {
        if info.config.instance_group.is_empty() {
            map.insert(
                "instance_group".into(),
                json!([{"name": info.config.name, "kind": "KIND_CPU", "count": 1}]),
            );
        }
        map.entry("version_policy")
            .or_insert_with(|| json!({"latest": {"num_versions": 1}}));
    }
    Ok(super::json(&config))
}

fn memory_usage(by_device: &[(DeviceId, u64)]) -> Value {
    by_device
        .iter()
        .map(|&(device, byte_size)| {
            let (kind, id) = match device {
                DeviceId::Cpu => ("CPU", 0),
                DeviceId::Gpu(index) => ("GPU", i64::from(index)),
            };
            json!({"type": kind, "id": id, "byte_size": byte_size})
        })
        .collect()
}

/// The statistics of `workers`, in Triton's JSON (the same counters as the gRPC answer).
fn statistics(ctx: &Context, workers: &[Arc<veraltheim_fastpath::ModelWorker>]) -> Response {
    let d = |x: veraltheim_fastpath::DurationStat| json!({"count": x.count, "ns": x.ns});
    let model_stats: Vec<Value> = workers
        .iter()
        .map(|w| {
            let s = w.stats();
            json!({
                "name": w.name(),
                "version": ctx.models.version_of(w.name()),
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": d(s.success),
                    "fail": d(s.fail),
                    "queue": d(s.queue),
                    "compute_input": d(s.compute_input),
                    "compute_infer": d(s.compute_infer),
                    "compute_output": d(s.compute_output),
                    "cache_hit": d(s.cache_hit),
                    "cache_miss": d(s.cache_miss),
                },
                "batch_stats": s.batches.iter().map(|b| json!({
                    "batch_size": b.batch_size,
                    "compute_infer": {"count": b.count, "ns": b.compute_ns},
                })).collect::<Vec<_>>(),
                "memory_usage": memory_usage(&ctx.models.memory_of(w.name())),
                "response_stats": {},
            })
        })
        .collect();
    super::json(&json!({ "model_stats": model_stats }))
}

async fn all_statistics(
    State(ctx): State<Arc<Context>>,
    found: Found,
) -> Result<Response, RestError> {
    let caller = caller(found)?;
    let mut workers = ctx.models.workers();
    workers.retain(|w| caller.sees_model(w.name()));
    Ok(statistics(&ctx, &workers))
}

async fn model_statistics(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Response, RestError> {
    let p = model_path(path)?;
    caller(found)?.model(&p.name).map_err(refused)?;
    check(&ctx, &p.name, &p.version)?;
    let worker = ctx.models.worker(&p.name).map_err(RestError::serving)?;
    Ok(statistics(&ctx, &[worker]))
}

async fn infer(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<ModelPath>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, RestError> {
    let received = Instant::now();
    let p = model_path(path)?;
    // Before the body is read: a refused caller costs no reading.
    caller(found)?.model(&p.name).map_err(refused)?;
    let body = read_body(&headers, body, ctx.max_body_bytes).await?;
    let parsed = tensors::parse_request(
        p.name,
        p.version,
        &headers,
        body,
        received,
        &ctx.shm,
        ctx.models.limits().max_request_bytes as u64,
    )?;
    let (call, reply) = (parsed.call, parsed.reply);
    let model = call.model.clone();
    let id = call.id.clone();
    let out = ctx.infer_as(call, RestError::serving).await?;
    tensors::response(
        &model,
        &ctx.models.version_of(&model),
        &id,
        &out.outputs,
        &reply,
        &ctx.shm,
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(
    State(ctx): State<Arc<Context>>,
    found: Found,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, RestError> {
    let caller = caller(found)?;
    let body = read_body(&headers, body, ctx.max_body_bytes).await?;
    let r: IndexRequest = json_body(&body, "repository index")?;
    ctx.models.refresh();
    let models: Vec<Value> = ctx
        .models
        .list()
        .into_iter()
        .filter(|m| !r.ready || m.state == ModelState::Ready)
        .filter(|m| caller.sees_model(&m.name))
        .map(|m| {
            json!({
                "name": m.name,
                "version": m.version,
                "state": m.state.triton_str(),
                "reason": m.reason,
            })
        })
        .collect();
    Ok(super::json(&models))
}

/// The body of a load or unload: Triton's `{"parameters": {...}}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RepositoryRequest {
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Records a load's or an unload's outcome in the audit log.
fn audited(
    caller: &Caller,
    name: &str,
    outcome: Result<StatusCode, RestError>,
) -> Result<StatusCode, RestError> {
    let (result, message) = match &outcome {
        Ok(status) => (audit_result(*status), ""),
        Err(e) => (audit_result(e.status), e.message.as_str()),
    };
    caller.audit_result(format!("model:{name}"), result, message);
    outcome
}

async fn load(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<ModelPath>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    let p = model_path(path)?;
    let caller = caller(found)?;
    caller.model(&p.name).map_err(refused)?;
    let outcome = load_model(&ctx, &p, headers, body).await;
    audited(&caller, &p.name, outcome)
}

async fn load_model(
    ctx: &Context,
    p: &ModelPath,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    let body = read_body(&headers, body, ctx.max_body_bytes).await?;
    let r: RepositoryRequest = json_body(&body, "load")?;
    let mut config = None;
    for (key, value) in &r.parameters {
        match (key.as_str(), value) {
            ("config", Value::String(json)) => config = Some(json.as_str()),
            ("config", _) => {
                return Err(RestError::bad_request(
                    "parameter 'config' must be a string holding the model configuration as JSON",
                ));
            }
            (k, _) if k.starts_with("file:") => {
                return Err(RestError::bad_request(format!(
                    "parameter '{k}': loading model files over HTTP is not supported; put the \
                     files in the model repository"
                )));
            }
            _ => {}
        }
    }
    traced(&headers, ctx.models.load(&p.name, config))
        .await
        .map_err(|e| {
            let mut e = RestError::serving(e);
            e.message = crate::kserve::load_message(&p.name, &e.message);
            e
        })?;
    Ok(StatusCode::OK)
}

async fn unload(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<ModelPath>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    let p = model_path(path)?;
    let caller = caller(found)?;
    caller.model(&p.name).map_err(refused)?;
    let outcome = async {
        let body = read_body(&headers, body, ctx.max_body_bytes).await?;
        // `unload_dependents` has nothing to act on: no model depends on another here.
        let _: RepositoryRequest = json_body(&body, "unload")?;
        traced(&headers, ctx.models.unload(&p.name))
            .await
            .map_err(RestError::serving)?;
        Ok(StatusCode::OK)
    }
    .await;
    audited(&caller, &p.name, outcome)
}

/// A region named in a shared-memory path; none for the calls on every region.
#[derive(Deserialize)]
struct RegionPath {
    name: String,
}

fn region_name(path: Result<Path<RegionPath>, PathRejection>) -> Result<String, RestError> {
    path.map(|Path(r)| r.name)
        .map_err(|e| RestError::bad_request(format!("the region path: {}", e.body_text())))
}

/// The status of region `name` (all of them when it is empty), as Triton's JSON lists them.
fn system_status_of(ctx: &Context, name: &str) -> Result<Response, RestError> {
    let regions: Vec<Value> = ctx
        .shm
        .status(name)
        .map_err(shm_refusal)?
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "key": r.key,
                "offset": r.offset,
                "byte_size": r.byte_size,
            })
        })
        .collect();
    Ok(super::json(&regions))
}

/// `GET /v2/systemsharedmemory/status`: every registered region.
async fn system_status_all(State(ctx): State<Arc<Context>>) -> Result<Response, RestError> {
    system_status_of(&ctx, "")
}

/// `GET /v2/systemsharedmemory/region/{name}/status`: that region, or 404.
async fn system_status(
    State(ctx): State<Arc<Context>>,
    path: Result<Path<RegionPath>, PathRejection>,
) -> Result<Response, RestError> {
    let name = region_name(path)?;
    system_status_of(&ctx, &name)
}

/// The body of a system shared-memory registration: Triton's `{"key", "offset", "byte_size"}`
/// (`offset` may be left out: 0).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SystemRegisterRequest {
    key: Option<String>,
    offset: Option<u64>,
    byte_size: Option<u64>,
}

/// `POST /v2/systemsharedmemory/region/{name}/register`: the checks and answers of gRPC's
/// SystemSharedMemoryRegister (an existing name, a bad key, a range past the object: 400).
async fn system_register(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<RegionPath>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    let caller = caller(found)?;
    let name = region_name(path)?;
    let outcome = async {
        let body = read_body(&headers, body, ctx.max_body_bytes).await?;
        let r: SystemRegisterRequest = json_body(&body, "register")?;
        let missing = |field: &str| {
            RestError::bad_request(format!(
                "register: the body needs \"{field}\" (Triton's {{\"key\", \"offset\", \"byte_size\"}})"
            ))
        };
        let key = r.key.ok_or_else(|| missing("key"))?;
        let byte_size = r.byte_size.ok_or_else(|| missing("byte_size"))?;
        ctx.shm
            .register(&name, &key, r.offset.unwrap_or(0), byte_size)
            .map_err(shm_refusal)?;
        Ok(StatusCode::OK)
    }
    .await;
    audited_region(&caller, "shared_memory", &name, outcome)
}

/// `POST /v2/systemsharedmemory/unregister`: every region.
async fn system_unregister_all(
    State(ctx): State<Arc<Context>>,
    found: Found,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    unregister_named(&ctx, found, Memory::System, String::new(), headers, body).await
}

/// `POST /v2/systemsharedmemory/region/{name}/unregister`: that region (an unknown name is not
/// an error, as over gRPC).
async fn system_unregister(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<RegionPath>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    let name = region_name(path)?;
    unregister_named(&ctx, found, Memory::System, name, headers, body).await
}

/// Which shared memory an unregistration is for.
#[derive(Clone, Copy)]
enum Memory {
    System,
    Cuda,
}

/// Unregisters `name` (every region when empty) of `memory`, audited under the resource gRPC
/// names it with.
async fn unregister_named(
    ctx: &Context,
    found: Found,
    memory: Memory,
    name: String,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    let caller = caller(found)?;
    let outcome = async {
        let body = read_body(&headers, body, ctx.max_body_bytes).await?;
        let _: UnregisterRequest = json_body(&body, "unregister")?;
        match memory {
            Memory::System => ctx.shm.unregister(&name),
            Memory::Cuda => ctx.shm.cuda_unregister(&name),
        }
        .map_err(shm_refusal)?;
        Ok(StatusCode::OK)
    }
    .await;
    let resource = match memory {
        Memory::System => "shared_memory",
        Memory::Cuda => "cuda_shared_memory",
    };
    audited_region(&caller, resource, &name, outcome)
}

/// `GET /v2/cudasharedmemory/status`: the list of CUDA regions, empty.
async fn cuda_status_all(State(ctx): State<Arc<Context>>) -> Result<Response, RestError> {
    ctx.shm.cuda_status("").map_err(shm_refusal)?;
    Ok(super::json(&Vec::<Value>::new()))
}

/// `GET /v2/cudasharedmemory/region/{name}/status`: 404, as no CUDA region is ever registered.
async fn cuda_status(
    State(ctx): State<Arc<Context>>,
    path: Result<Path<RegionPath>, PathRejection>,
) -> Result<Response, RestError> {
    let name = region_name(path)?;
    ctx.shm.cuda_status(&name).map_err(shm_refusal)?;
    Ok(super::json(&Vec::<Value>::new()))
}

/// The body of a CUDA registration, as Triton's HTTP clients send it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only parsed, so that a malformed body is refused as such (400) first
struct CudaRegisterRequest {
    raw_handle: Option<Value>,
    device_id: Option<i64>,
    byte_size: Option<u64>,
}

/// An unregistration takes no options; a body, if any, must be an empty JSON object.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UnregisterRequest {}

/// `POST /v2/cudasharedmemory/region/{name}/register`: refused (400), saying why.
async fn cuda_register(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<RegionPath>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    let caller = caller(found)?;
    let name = region_name(path)?;
    let outcome = async {
        let body = read_body(&headers, body, ctx.max_body_bytes).await?;
        let _: CudaRegisterRequest = json_body(&body, "register")?;
        ctx.shm.cuda_register(&name).map_err(shm_refusal)?;
        Ok(StatusCode::OK)
    }
    .await;
    audited_region(&caller, "cuda_shared_memory", &name, outcome)
}

/// `POST /v2/cudasharedmemory/unregister`: OK (there is nothing to remove).
async fn cuda_unregister_all(
    State(ctx): State<Arc<Context>>,
    found: Found,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    unregister_named(&ctx, found, Memory::Cuda, String::new(), headers, body).await
}

/// `POST /v2/cudasharedmemory/region/{name}/unregister`: OK (there is nothing to remove).
async fn cuda_unregister(
    State(ctx): State<Arc<Context>>,
    found: Found,
    path: Result<Path<RegionPath>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, RestError> {
    let name = region_name(path)?;
    unregister_named(&ctx, found, Memory::Cuda, name, headers, body).await
}

/// Records a shared-memory call's outcome in the audit log under the resource gRPC names it
/// with (`shared_memory:{name}`, `cuda_shared_memory:{name}`).
fn audited_region(
    caller: &Caller,
    kind: &str,
    name: &str,
    outcome: Result<StatusCode, RestError>,
) -> Result<StatusCode, RestError> {
    let (result, message) = match &outcome {
        Ok(status) => (audit_result(*status).to_string(), ""),
        Err(e) => (
            e.code
                .map_or_else(|| audit_result(e.status).to_string(), code_name),
            e.message.as_str(),
        ),
    };
    caller.audit_result(format!("{kind}:{name}"), &result, message);
    outcome
}
