//! `inference.GRPCInferenceService`: the KServe v2 / Triton protocol, so that the stock
//! `tritonclient` and tools built for Triton work against Veraltheim.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status, Streaming};
use veraltheim_models::allocator::DeviceId;
use veraltheim_models::{ModelConfig, ModelState};
use veraltheim_proto::inference::{
    self as pb, grpc_inference_service_server::GrpcInferenceService,
    infer_parameter::ParameterChoice,
};

use crate::auth::Caller;
use crate::context::{Context, grpc_deadline, status, traced, traceparent};
use crate::convert::{kserve_inputs, kserve_output};
use crate::params::unsigned_param;
use crate::shm::{SharedMemory, ShmRef, shm_ref};
use veraltheim_bus::TraceParent;
use veraltheim_serving::InferCall;

pub const SERVER_NAME: &str = "veraltheim";

/// Protocol extensions Veraltheim implements (the names Triton uses).
const EXTENSIONS: &[&str] = &[
    "model_repository",
    "model_configuration",
    "schedule_policy",
    "statistics",
    "binary_tensor_data",
    "parameters",
];

pub struct KserveService {
    ctx: Arc<Context>,
}

impl KserveService {
    pub fn new(ctx: Arc<Context>) -> Self {
        KserveService { ctx }
    }
}

/// A KServe request as an inference call: the tensors plus the reserved parameters
/// (`priority`, `timeout` in µs).
/// Also returns the outputs the caller wants written to shared memory, checked against the
/// registered regions before anything runs.
fn to_call(
    req: pb::ModelInferRequest,
    deadline: Option<Instant>,
    received: Instant,
    shm: &SharedMemory,
    max_shm_bytes: u64,
) -> Result<(InferCall, Vec<(String, ShmRef)>), Status> {
    let mut priority = 0;
    let mut timeout = None;
    for (key, value) in &req.parameters {
        match key.as_str() {
            "priority" => {
                priority = u32::try_from(unsigned_param(key, value)?)
                    .map_err(|_| Status::invalid_argument("parameter 'priority' is out of range"))?
            }
            "timeout" => {
                let us = unsigned_param(key, value)?;
                if us > 0 {
                    timeout = Some(Duration::from_micros(us));
                }
            }
            "sequence_id" => {
                let set = match &value.parameter_choice {
                    Some(ParameterChoice::Int64Param(v)) => *v != 0,
                    Some(ParameterChoice::Uint64Param(v)) => *v != 0,
                    Some(ParameterChoice::StringParam(s)) => !s.is_empty(),
                    _ => false,
                };
                if set {
                    return Err(Status::invalid_argument(format!(
                        "model '{}' does not use sequence batching; the request must not set sequence_id",
                        req.model_name
                    )));
                }
            }
            _ => {}
        }
    }
    let inputs = kserve_inputs(req.inputs, req.raw_input_contents, shm, max_shm_bytes)?;
    let mut to_shm = Vec::new();
    for o in &req.outputs {
        if let Some(place) = shm_ref("output", &o.name, &o.parameters)? {
            shm.check(&format!("output '{}'", o.name), &place)?;
            to_shm.push((o.name.clone(), place));
        }
    }
    let call = InferCall {
        model: req.model_name,
        version: req.model_version,
        id: req.id,
        inputs,
        outputs: req.outputs.into_iter().map(|o| o.name).collect(),
        priority,
        timeout,
        deadline,
        received,
        trace: None,
        background: false,
    };
    Ok((call, to_shm))
}

/// The response's outputs: in `raw_output_contents`, or written to the shared-memory place
/// the request gave (the output then says where, and its raw entry is empty, so that entries
/// stay in step with the outputs).
fn kserve_outputs(
    outputs: &[veraltheim_models::Tensor],
    to_shm: &[(String, ShmRef)],
    shm: &SharedMemory,
) -> Result<
    (
        Vec<pb::model_infer_response::InferOutputTensor>,
        Vec<bytes::Bytes>,
    ),
    Status,
> {
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for t in outputs {
        let mut tensor = kserve_output(t);
        match to_shm.iter().find(|(name, _)| *name == t.name()) {
            Some((_, place)) => {
                let data = t.to_raw();
                shm.write(&format!("output '{}'", t.name()), place, &data)?;
                let int = |v: u64| pb::InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(v as i64)),
                };
                tensor.parameters.insert(
                    "shared_memory_region".into(),
                    pb::InferParameter {
                        parameter_choice: Some(ParameterChoice::StringParam(place.region.clone())),
                    },
                );
                tensor
                    .parameters
                    .insert("shared_memory_byte_size".into(), int(data.len() as u64));
                if place.offset != 0 {
                    tensor
                        .parameters
                        .insert("shared_memory_offset".into(), int(place.offset));
                }
                raw.push(bytes::Bytes::new());
            }
            None => raw.push(t.to_raw()),
        }
        tensors.push(tensor);
    }
    Ok((tensors, raw))
}

/// One KServe inference. The request is converted and submitted when this is called; the
/// future only awaits the answer (see [`Context::infer`] for why it is kept small).
fn infer(
    ctx: &Context,
    req: pb::ModelInferRequest,
    deadline: Option<Instant>,
    received: Instant,
    trace: Option<TraceParent>,
) -> impl Future<Output = Result<pb::ModelInferResponse, Status>> + Send + '_ {
    let model_name = req.model_name.clone();
    let started = to_call(
        req,
        deadline,
        received,
        &ctx.shm,
        ctx.models.limits().max_request_bytes as u64,
    )
    .map(|(mut call, to_shm)| {
        call.trace = trace;
        let id = call.id.clone();
        (id, to_shm, ctx.infer(call))
    });
    async move {
        let (id, to_shm, answer) = started?;
        let out = answer.await?;
        let (outputs, raw_output_contents) = kserve_outputs(&out.outputs, &to_shm, &ctx.shm)?;
        Ok(pb::ModelInferResponse {
            model_version: ctx.models.version_of(&model_name),
            model_name,
            id,
            parameters: HashMap::new(),
            outputs,
            raw_output_contents,
        })
    }
}

fn data_type(name: &str) -> i32 {
    pb::DataType::from_str_name(name).map_or(0, |d| d as i32)
}

fn queue_policy(q: &veraltheim_models::config::QueuePolicy) -> pb::ModelQueuePolicy {
    pb::ModelQueuePolicy {
        timeout_action: pb::model_queue_policy::TimeoutAction::from_str_name(&q.timeout_action)
            .map_or(0, |a| a as i32),
        default_timeout_microseconds: q.default_timeout_microseconds,
        allow_timeout_override: q.allow_timeout_override,
        max_queue_size: q.max_queue_size,
    }
}

/// Our configuration in Triton's protobuf form.
pub fn config_to_proto(c: &ModelConfig) -> pb::ModelConfig {
    let groups = if c.instance_group.is_empty() {
        vec![pb::ModelInstanceGroup {
            name: c.name.clone(),
            kind: pb::model_instance_group::Kind::Cpu as i32,
            count: 1,
            ..Default::default()
        }]
    } else {
        c.instance_group
            .iter()
            .map(|g| pb::ModelInstanceGroup {
                name: g.name.clone(),
                kind: pb::model_instance_group::Kind::from_str_name(&g.kind)
                    .map_or(pb::model_instance_group::Kind::Cpu as i32, |k| k as i32),
                count: g.count.max(1) as i32,
                gpus: g.gpus.clone(),
                ..Default::default()
            })
            .collect()
    };
    pb::ModelConfig {
        name: c.name.clone(),
        platform: c.platform.clone(),
        backend: c.backend.clone(),
        max_batch_size: c.max_batch_size as i32,
        input: c
            .input
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.clone(),
                data_type: data_type(&t.data_type),
                dims: t.dims.clone(),
                optional: t.optional,
                ..Default::default()
            })
            .collect(),
        output: c
            .output
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.clone(),
                data_type: data_type(&t.data_type),
                dims: t.dims.clone(),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: c.dynamic_batching.as_ref().map(|d| {
            pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
                preferred_batch_size: d.preferred_batch_size.iter().map(|p| *p as i32).collect(),
                max_queue_delay_microseconds: d.max_queue_delay_microseconds,
                preserve_ordering: d.preserve_ordering,
                priority_levels: d.priority_levels,
                default_priority_level: d.default_priority_level,
                default_queue_policy: d.default_queue_policy.as_ref().map(queue_policy),
                priority_queue_policy: d
                    .priority_queue_policy
                    .iter()
                    .filter_map(|(level, q)| Some((level.parse().ok()?, queue_policy(q))))
                    .collect(),
            })
        }),
        instance_group: groups,
        response_cache: c
            .response_cache
            .as_ref()
            .map(|r| pb::ModelResponseCache { enable: r.enable }),
        parameters: c
            .parameters
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::ModelParameter {
                        string_value: v.string_value.clone(),
                    },
                )
            })
            .collect(),
        version_policy: Some(version_policy(c)),
        default_model_filename: c.default_model_filename.clone(),
        model_warmup: c
            .model_warmup
            .iter()
            .map(|w| pb::ModelWarmup {
                name: w.name.clone(),
                batch_size: w.batch_size,
                count: w.count,
                inputs: w
                    .inputs
                    .iter()
                    .map(|(name, i)| {
                        use pb::model_warmup::input::InputDataType as D;
                        let data = if i.zero_data {
                            D::ZeroData(true)
                        } else if i.random_data {
                            D::RandomData(true)
                        } else {
                            D::InputDataFile(i.input_data_file.clone())
                        };
                        (
                            name.clone(),
                            pb::model_warmup::Input {
                                data_type: data_type(&i.data_type),
                                dims: i.dims.clone(),
                                input_data_type: Some(data),
                            },
                        )
                    })
                    .collect(),
            })
            .collect(),
        ..Default::default()
    }
}

/// Triton's version policy as the config states it (the default, as Triton reports it: latest 1).
fn version_policy(c: &ModelConfig) -> pb::ModelVersionPolicy {
    use pb::model_version_policy::{All, Latest, PolicyChoice, Specific};
    let choice = match &c.version_policy {
        Some(p) if p.all.is_some() => PolicyChoice::All(All {}),
        Some(p) if p.specific.is_some() => PolicyChoice::Specific(Specific {
            versions: p
                .specific
                .as_ref()
                .map(|s| s.versions.clone())
                .unwrap_or_default(),
        }),
        Some(p) => PolicyChoice::Latest(Latest {
            num_versions: p.latest.as_ref().map_or(1, |l| l.num_versions.max(1)),
        }),
        None => PolicyChoice::Latest(Latest { num_versions: 1 }),
    };
    pb::ModelVersionPolicy {
        policy_choice: Some(choice),
    }
}

fn tensor_metadata(
    c: &ModelConfig,
    list: &[veraltheim_models::config::TensorConfig],
) -> Vec<pb::model_metadata_response::TensorMetadata> {
    list.iter()
        .map(|t| pb::model_metadata_response::TensorMetadata {
            name: t.name.clone(),
            datatype: ModelConfig::datatype_of(t).as_str().to_string(),
            shape: c.full_shape(t),
        })
        .collect()
}

/// A model's memory as Triton reports it in its statistics: one entry per device the allocator
/// holds memory on for it, `type` `CPU` or `GPU`, `id` the device's index (0 for the host).
fn memory_usage(by_device: &[(DeviceId, u64)]) -> Vec<pb::MemoryUsage> {
    by_device
        .iter()
        .map(|&(device, byte_size)| {
            let (kind, id) = match device {
                DeviceId::Cpu => ("CPU", 0),
                DeviceId::Gpu(index) => ("GPU", i64::from(index)),
            };
            pb::MemoryUsage {
                r#type: kind.to_string(),
                id,
                byte_size,
            }
        })
        .collect()
}

/// The message of a refused or failed load over KServe (gRPC and HTTP). Triton's clients look
/// for "failed to load" in it (its model-control example does, for a malformed configuration
/// and for an unknown model), so it says so before our own text when that does not already.
pub fn load_message(name: &str, message: &str) -> String {
    if message.contains("failed to load") {
        message.to_string()
    } else {
        format!("failed to load '{name}': {message}")
    }
}

/// RepositoryModelLoad once authorised: a load with an optional `config` parameter.
async fn repository_load(
    ctx: &Context,
    request: Request<pb::RepositoryModelLoadRequest>,
) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
    let metadata = request.metadata().clone();
    let r = request.into_inner();
    let mut config = None;
    for (key, value) in &r.parameters {
        use pb::model_repository_parameter::ParameterChoice as P;
        match (key.as_str(), &value.parameter_choice) {
            ("config", Some(P::StringParam(json))) => config = Some(json.clone()),
            ("config", _) => {
                return Err(Status::invalid_argument(
                    "parameter 'config' must be a string holding the model configuration as JSON",
                ));
            }
            (k, _) if k.starts_with("file:") => {
                return Err(Status::invalid_argument(format!(
                    "parameter '{k}': loading model files over gRPC is not supported; put the files in the model repository"
                )));
            }
            _ => {}
        }
    }
    traced(&metadata, ctx.models.load(&r.model_name, config.as_deref()))
        .await
        .map_err(|e| {
            let s = status(e);
            Status::new(s.code(), load_message(&r.model_name, s.message()))
        })?;
    Ok(Response::new(pb::RepositoryModelLoadResponse {}))
}

use crate::stream::StreamOf;

#[tonic::async_trait]
impl GrpcInferenceService for KserveService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.ctx.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.model(&r.name)?;
        let info = self.ctx.models.info(&r.name).map_err(status)?;
        let ready = info.state == ModelState::Ready
            && self.ctx.models.check_version(&r.name, &r.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: SERVER_NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: EXTENSIONS
                .iter()
                .copied()
                .chain(self.ctx.shm.allowed().then_some("system_shared_memory"))
                .map(str::to_string)
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.model(&r.name)?;
        self.ctx
            .models
            .check_version(&r.name, &r.version)
            .map_err(status)?;
        let info = self.ctx.models.info(&r.name).map_err(status)?;
        let c = &info.config;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: info.name.clone(),
            versions: vec![info.version.clone()],
            platform: if c.platform.is_empty() {
                c.backend.clone()
            } else {
                c.platform.clone()
            },
            inputs: tensor_metadata(c, &c.input),
            outputs: tensor_metadata(c, &c.output),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let received = Instant::now();
        let deadline = grpc_deadline(request.metadata(), received);
        let trace = traceparent(request.metadata());
        Caller::of(&request)?.model(&request.get_ref().model_name)?;
        let response = infer(&self.ctx, request.into_inner(), deadline, received, trace).await?;
        Ok(Response::new(response))
    }

    type ModelStreamInferStream = StreamOf<pb::ModelStreamInferResponse>;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let ctx = self.ctx.clone();
        let caller = Caller::of(&request)?;
        // The stream's trace context: each of its requests continues it.
        let trace = traceparent(request.metadata());
        Ok(Response::new(crate::stream::serve(
            request.into_inner(),
            move |req: pb::ModelInferRequest| {
                let ctx = ctx.clone();
                // Each message names its model: each is authorised.
                let allowed = caller.model(&req.model_name);
                async move {
                    let (id, model) = (req.id.clone(), req.model_name.clone());
                    let answer = match allowed {
                        Ok(()) => infer(&ctx, req, None, Instant::now(), trace).await,
                        Err(refused) => Err(refused),
                    };
                    match answer {
                        Ok(r) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(r),
                        },
                        // The error travels in-band so that the stream stays open; the id says
                        // which request it belongs to.
                        Err(status) => pb::ModelStreamInferResponse {
                            error_message: status.message().to_string(),
                            infer_response: Some(pb::ModelInferResponse {
                                model_version: ctx.models.version_of(&model),
                                model_name: model,
                                id,
                                ..Default::default()
                            }),
                        },
                    }
                }
            },
        )))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.model(&r.name)?;
        self.ctx
            .models
            .check_version(&r.name, &r.version)
            .map_err(status)?;
        let info = self.ctx.models.info(&r.name).map_err(status)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(config_to_proto(&info.config)),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let workers = if r.name.is_empty() {
            let mut all = self.ctx.models.workers();
            all.retain(|w| caller.sees_model(w.name()));
            all
        } else {
            caller.model(&r.name)?;
            self.ctx
                .models
                .check_version(&r.name, &r.version)
                .map_err(status)?;
            vec![self.ctx.models.worker(&r.name).map_err(status)?]
        };
        let model_stats = workers
            .iter()
            .map(|w| {
                let s = w.stats();
                let d = |x: veraltheim_fastpath::DurationStat| {
                    Some(pb::StatisticDuration {
                        count: x.count,
                        ns: x.ns,
                    })
                };
                pb::ModelStatistics {
                    name: w.name().to_string(),
                    version: self.ctx.models.version_of(w.name()),
                    last_inference: s.last_inference_ms,
                    inference_count: s.inference_count,
                    execution_count: s.execution_count,
                    inference_stats: Some(pb::InferStatistics {
                        success: d(s.success),
                        fail: d(s.fail),
                        queue: d(s.queue),
                        compute_input: d(s.compute_input),
                        compute_infer: d(s.compute_infer),
                        compute_output: d(s.compute_output),
                        cache_hit: d(s.cache_hit),
                        cache_miss: d(s.cache_miss),
                    }),
                    batch_stats: s
                        .batches
                        .iter()
                        .map(|b| pb::InferBatchStatistics {
                            batch_size: b.batch_size,
                            compute_infer: Some(pb::StatisticDuration {
                                count: b.count,
                                ns: b.compute_ns,
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    memory_usage: memory_usage(&self.ctx.models.memory_of(w.name())),
                    response_stats: HashMap::new(),
                }
            })
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        self.ctx.models.refresh();
        let models = self
            .ctx
            .models
            .list()
            .into_iter()
            .filter(|m| !r.ready || m.state == ModelState::Ready)
            .filter(|m| caller.sees_model(&m.name))
            .map(|m| pb::repository_index_response::ModelIndex {
                name: m.name,
                version: m.version,
                state: m.state.triton_str().to_string(),
                reason: m.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let caller = Caller::of(&request)?;
        caller.model(&request.get_ref().model_name)?;
        let resource = format!("model:{}", request.get_ref().model_name);
        let outcome = repository_load(&self.ctx, request).await;
        caller.audit(resource, &outcome);
        outcome
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let caller = Caller::of(&request)?;
        caller.model(&request.get_ref().model_name)?;
        let resource = format!("model:{}", request.get_ref().model_name);
        let metadata = request.metadata().clone();
        let r = request.into_inner();
        let outcome = traced(&metadata, self.ctx.models.unload(&r.model_name))
            .await
            .map_err(status)
            .map(|_| Response::new(pb::RepositoryModelUnloadResponse {}));
        caller.audit(resource, &outcome);
        outcome
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        use pb::system_shared_memory_status_response::RegionStatus;
        let regions = self.ctx.shm.status(&request.get_ref().name)?;
        Ok(Response::new(pb::SystemSharedMemoryStatusResponse {
            regions: regions
                .iter()
                .map(|r| {
                    let status = RegionStatus {
                        name: r.name.clone(),
                        key: r.key.clone(),
                        offset: r.offset,
                        byte_size: r.byte_size,
                    };
                    (r.name.clone(), status)
                })
                .collect(),
        }))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let outcome = self
            .ctx
            .shm
            .register(&r.name, &r.key, r.offset, r.byte_size)
            .map(|()| Response::new(pb::SystemSharedMemoryRegisterResponse {}));
        caller.audit(format!("shared_memory:{}", r.name), &outcome);
        outcome
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        let caller = Caller::of(&request)?;
        let outcome = self
            .ctx
            .shm
            .unregister(&request.get_ref().name)
            .map(|()| Response::new(pb::SystemSharedMemoryUnregisterResponse {}));
        caller.audit(
            format!("shared_memory:{}", request.get_ref().name),
            &outcome,
        );
        outcome
    }

    /// CUDA shared memory as Triton answers it without GPU support (see `shm.rs`): no region,
    /// unregistering is OK, registering is refused.
    async fn cuda_shared_memory_status(
        &self,
        request: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        self.ctx.shm.cuda_status(&request.get_ref().name)?;
        Ok(Response::new(pb::CudaSharedMemoryStatusResponse {
            regions: HashMap::new(),
        }))
    }

    async fn cuda_shared_memory_register(
        &self,
        request: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        let caller = Caller::of(&request)?;
        let name = &request.get_ref().name;
        let outcome = self
            .ctx
            .shm
            .cuda_register(name)
            .map(|()| Response::new(pb::CudaSharedMemoryRegisterResponse {}));
        caller.audit(format!("cuda_shared_memory:{name}"), &outcome);
        outcome
    }

    async fn cuda_shared_memory_unregister(
        &self,
        request: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        let caller = Caller::of(&request)?;
        let name = &request.get_ref().name;
        let outcome = self
            .ctx
            .shm
            .cuda_unregister(name)
            .map(|()| Response::new(pb::CudaSharedMemoryUnregisterResponse {}));
        caller.audit(format!("cuda_shared_memory:{name}"), &outcome);
        outcome
    }

    async fn trace_setting(
        &self,
        _: Request<pb::TraceSettingRequest>,
    ) -> Result<Response<pb::TraceSettingResponse>, Status> {
        Err(Status::unimplemented(
            "Triton request tracing (trace_level, trace_rate, trace_file, ...) is not implemented: \
             Veraltheim writes no trace files. A W3C traceparent on a load or unload is carried \
             onto the events it causes (WatchEvents); the log's level is read and changed with \
             LogSettings",
        ))
    }

    /// Triton's log settings, read and changed at run time (the mapping is in `logging.rs`).
    async fn log_settings(
        &self,
        request: Request<pb::LogSettingsRequest>,
    ) -> Result<Response<pb::LogSettingsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let changing = !request.get_ref().settings.is_empty();
        caller.settings(changing)?;
        let outcome = log_settings(request.into_inner()).map(Response::new);
        if changing {
            caller.audit("server:log_settings", &outcome);
        }
        outcome
    }
}

/// The `LogSettings` RPC: an empty request reads the settings; one that names settings changes
/// them (all or none) and answers the settings in effect afterwards.
fn log_settings(request: pb::LogSettingsRequest) -> Result<pb::LogSettingsResponse, Status> {
    use crate::logging::LogValue;
    use pb::log_settings_request::setting_value::ParameterChoice as In;
    use pb::log_settings_response::{SettingValue, setting_value::ParameterChoice as Out};
    let control = crate::logging::control().ok_or_else(|| {
        Status::failed_precondition("this process's log is not under the server's control")
    })?;
    let settings = if request.settings.is_empty() {
        control.settings()
    } else {
        let mut changes: Vec<(String, LogValue)> = request
            .settings
            .into_iter()
            .map(|(name, v)| {
                let value = match v.parameter_choice {
                    Some(In::BoolParam(b)) => LogValue::Bool(b),
                    Some(In::Uint32Param(u)) => LogValue::Uint(u),
                    Some(In::StringParam(t)) => LogValue::Text(t),
                    None => LogValue::Missing,
                };
                (name, value)
            })
            .collect();
        // A map has no order; the first bad setting named must not depend on the hash.
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        control.update(&changes).map_err(|e| match e {
            crate::logging::LogSettingsError::Gone(_) => Status::internal(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        })?
    };
    let v = |p: Out| SettingValue {
        parameter_choice: Some(p),
    };
    let answer = [
        ("log_file", v(Out::StringParam(settings.file.to_string()))),
        ("log_info", v(Out::BoolParam(settings.info))),
        ("log_warning", v(Out::BoolParam(settings.warning))),
        ("log_error", v(Out::BoolParam(settings.error))),
        (
            "log_verbose_level",
            v(Out::Uint32Param(settings.verbose_level)),
        ),
        (
            "log_format",
            v(Out::StringParam(settings.format.to_string())),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Ok(pb::LogSettingsResponse { settings: answer })
}
