//! `veraltheim.v1`: our own API — inference, models, the system (health, the supervision tree,
//! events, fault injection) and resources (host and GPUs). Jobs have their own service type
//! (`jobs.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use veraltheim_bus::{SubscribeOptions, TraceParent, WhenFull};
use veraltheim_models::{DataType, ModelConfig, ModelState, Tensor};
use veraltheim_proto::v1::{
    self, inference_service_server::InferenceService, model_service_server::ModelService,
    resource_service_server::ResourceService, system_service_server::SystemService,
};

use crate::auth::Caller;
use crate::context::{Context, grpc_deadline, status, traced, traceparent};
use crate::convert::{from_v1, to_v1, v1_datatype};
use veraltheim_serving::{InferCall, ModelInfo};
use veraltheim_supervisor::{NodeKind, NodeSnapshot, SupervisorHandle};

/// Events a watcher may fall behind by before the oldest are dropped.
const EVENT_BUFFER: usize = 1024;

use crate::stream::StreamOf;

#[derive(Clone)]
pub struct Api {
    ctx: Arc<Context>,
    /// The supervision tree the API serves in (its status, KillChild).
    tree: SupervisorHandle,
}

impl Api {
    pub fn new(ctx: Arc<Context>, tree: SupervisorHandle) -> Self {
        Api { ctx, tree }
    }
}

/// Texts become the model's single BYTES input, one row each.
fn text_input(ctx: &Context, model: &str, texts: Vec<String>) -> Result<Tensor, Status> {
    let info = ctx.models.info(model).map_err(status)?;
    let bytes_inputs: Vec<_> = info
        .config
        .input
        .iter()
        .filter(|i| ModelConfig::datatype_of(i) == DataType::Bytes)
        .collect();
    let [input] = bytes_inputs.as_slice() else {
        return Err(Status::invalid_argument(format!(
            "model '{model}' does not take texts: `texts` needs a model with exactly one BYTES input"
        )));
    };
    let rows = texts.len() as i64;
    let shape: Vec<i64> = if info.config.batching() {
        vec![rows, 1]
    } else {
        vec![rows]
    };
    let elements = texts.into_iter().map(Bytes::from).collect();
    Tensor::from_elements(&input.name, &shape, elements)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

async fn infer(
    ctx: &Context,
    req: v1::InferRequest,
    deadline: Option<Instant>,
    trace: Option<TraceParent>,
) -> Result<v1::InferResponse, Status> {
    let received = Instant::now();
    if req.model.is_empty() {
        return Err(Status::invalid_argument("`model` is empty"));
    }
    let mut inputs = req
        .inputs
        .into_iter()
        .map(from_v1)
        .collect::<Result<Vec<_>, _>>()?;
    if !req.texts.is_empty() {
        if !inputs.is_empty() {
            return Err(Status::invalid_argument(
                "give either `inputs` or `texts`, not both",
            ));
        }
        inputs.push(text_input(ctx, &req.model, req.texts)?);
    }
    let raw = req.raw_outputs;
    let out = ctx
        .infer(InferCall {
            model: req.model.clone(),
            version: req.version,
            id: req.id.clone(),
            inputs,
            outputs: req.outputs,
            priority: req.priority,
            timeout: (req.timeout_us > 0).then(|| Duration::from_micros(req.timeout_us)),
            deadline,
            received,
            trace,
            background: false,
        })
        .await?;
    Ok(v1::InferResponse {
        version: ctx.models.version_of(&req.model),
        model: req.model,
        id: req.id,
        outputs: out.outputs.iter().map(|t| to_v1(t, raw)).collect(),
        timing: Some(v1::Timing {
            queue_us: out.queue.as_micros() as u64,
            compute_us: out.compute.as_micros() as u64,
            total_us: received.elapsed().as_micros() as u64,
        }),
        batch_size: out.batch_size as u32,
    })
}

#[tonic::async_trait]
impl InferenceService for Api {
    async fn infer(
        &self,
        request: Request<v1::InferRequest>,
    ) -> Result<Response<v1::InferResponse>, Status> {
        let deadline = grpc_deadline(request.metadata(), Instant::now());
        let trace = traceparent(request.metadata());
        Caller::of(&request)?.model(&request.get_ref().model)?;
        Ok(Response::new(
            infer(&self.ctx, request.into_inner(), deadline, trace).await?,
        ))
    }

    type InferStreamStream = StreamOf<v1::InferStreamResponse>;

    async fn infer_stream(
        &self,
        request: Request<Streaming<v1::InferRequest>>,
    ) -> Result<Response<Self::InferStreamStream>, Status> {
        let ctx = self.ctx.clone();
        let caller = Caller::of(&request)?;
        // The stream's trace context: each of its requests continues it.
        let trace = traceparent(request.metadata());
        Ok(Response::new(crate::stream::serve(
            request.into_inner(),
            move |req: v1::InferRequest| {
                let ctx = ctx.clone();
                // Each message names its model: each is authorised.
                let allowed = caller.model(&req.model);
                async move {
                    let id = req.id.clone();
                    let answer = match allowed {
                        Ok(()) => infer(&ctx, req, None, trace).await,
                        Err(refused) => Err(refused),
                    };
                    let result = match answer {
                        Ok(r) => v1::infer_stream_response::Result::Response(r),
                        Err(s) => v1::infer_stream_response::Result::Error(v1::Error {
                            code: s.code() as i32,
                            message: s.message().to_string(),
                        }),
                    };
                    v1::InferStreamResponse {
                        id,
                        result: Some(result),
                    }
                }
            },
        )))
    }
}

fn percentiles(p: veraltheim_fastpath::Percentiles) -> v1::LatencyPercentiles {
    v1::LatencyPercentiles {
        p50_us: p.p50,
        p90_us: p.p90,
        p99_us: p.p99,
        p999_us: p.p999,
        max_us: p.max,
    }
}

fn model_state(s: ModelState) -> v1::ModelState {
    match s {
        ModelState::NotLoaded => v1::ModelState::NotLoaded,
        ModelState::Loading => v1::ModelState::Loading,
        ModelState::Ready => v1::ModelState::Ready,
        ModelState::Unloading => v1::ModelState::Unloading,
        ModelState::Failed => v1::ModelState::Failed,
    }
}

fn specs(c: &ModelConfig, list: &[veraltheim_models::config::TensorConfig]) -> Vec<v1::TensorSpec> {
    list.iter()
        .map(|t| v1::TensorSpec {
            name: t.name.clone(),
            datatype: v1_datatype(ModelConfig::datatype_of(t)) as i32,
            shape: c.full_shape(t),
        })
        .collect()
}

pub fn model_message(m: &ModelInfo) -> v1::Model {
    let c = &m.config;
    v1::Model {
        name: m.name.clone(),
        version: m.version.clone(),
        backend: c.backend.clone(),
        state: model_state(m.state) as i32,
        reason: m.reason.clone(),
        inputs: specs(c, &c.input),
        outputs: specs(c, &c.output),
        max_batch_size: c.max_batch_size,
        config_json: c.to_json(),
        device: m.device.map(|d| d.to_string()).unwrap_or_default(),
        memory_bytes: m.memory_bytes,
        versions: m.versions.iter().map(|v| v.to_string()).collect(),
        pinned: c.pinned,
    }
}

fn memory_message(
    usage: Vec<veraltheim_models::allocator::DeviceUsage>,
    charges: &std::collections::BTreeMap<String, veraltheim_serving::MemoryCharge>,
) -> v1::GetModelMemoryResponse {
    v1::GetModelMemoryResponse {
        devices: usage
            .into_iter()
            .map(|d| v1::DeviceMemory {
                device: d.device.to_string(),
                capacity_bytes: d.capacity_bytes,
                reserve_bytes: d.reserve_bytes,
                budget_bytes: d.budget_bytes,
                held_bytes: d.held_bytes,
                free_bytes: d.free_bytes,
                // Jobs are listed as jobs, not models (the allocator's external holders).
                jobs: d
                    .externals
                    .iter()
                    .map(|e| v1::JobHolder {
                        job_id: e.key.strip_prefix("job:").unwrap_or(&e.key).to_string(),
                        bytes: e.bytes,
                    })
                    .collect(),
                holders: d
                    .holders
                    .into_iter()
                    .map(|h| {
                        let charge = charges.get(&h.model);
                        v1::ModelHolder {
                            estimate_bytes: charge.map_or(h.bytes, |c| c.estimate_bytes),
                            measurement: charge
                                .map(|c| c.how.as_str().to_string())
                                .unwrap_or_default(),
                            key: h.model,
                            bytes: h.bytes,
                            pinned: h.pinned,
                            in_flight: u64::from(h.in_flight),
                            state: h.state.as_str().to_ascii_uppercase(),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl ModelService for Api {
    async fn get_model_memory(
        &self,
        _: Request<v1::GetModelMemoryRequest>,
    ) -> Result<Response<v1::GetModelMemoryResponse>, Status> {
        Ok(Response::new(memory_message(
            self.ctx.models.memory(),
            &self.ctx.models.charges(),
        )))
    }

    async fn list_models(
        &self,
        request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let ready_only = request.get_ref().ready_only;
        self.ctx.models.refresh();
        let models = self
            .ctx
            .models
            .list()
            .iter()
            .filter(|m| !ready_only || m.state == ModelState::Ready)
            .filter(|m| caller.sees_model(&m.name))
            .map(model_message)
            .collect();
        Ok(Response::new(v1::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<v1::GetModelRequest>,
    ) -> Result<Response<v1::Model>, Status> {
        Caller::of(&request)?.model(&request.get_ref().name)?;
        let info = self
            .ctx
            .models
            .info(&request.get_ref().name)
            .map_err(status)?;
        Ok(Response::new(model_message(&info)))
    }

    async fn load_model(
        &self,
        request: Request<v1::LoadModelRequest>,
    ) -> Result<Response<v1::Model>, Status> {
        let caller = Caller::of(&request)?;
        caller.model(&request.get_ref().name)?;
        let metadata = request.metadata().clone();
        let r = request.into_inner();
        let json = (!r.config_json.is_empty()).then_some(r.config_json.as_str());
        let outcome = traced(&metadata, self.ctx.models.load(&r.name, json))
            .await
            .map_err(status)
            .map(|info| Response::new(model_message(&info)));
        caller.audit(format!("model:{}", r.name), &outcome);
        outcome
    }

    async fn unload_model(
        &self,
        request: Request<v1::UnloadModelRequest>,
    ) -> Result<Response<v1::Model>, Status> {
        let caller = Caller::of(&request)?;
        caller.model(&request.get_ref().name)?;
        let outcome = traced(
            request.metadata(),
            self.ctx.models.unload(&request.get_ref().name),
        )
        .await
        .map_err(status)
        .map(|info| Response::new(model_message(&info)));
        caller.audit(format!("model:{}", request.get_ref().name), &outcome);
        outcome
    }

    async fn get_model_statistics(
        &self,
        request: Request<v1::GetModelStatisticsRequest>,
    ) -> Result<Response<v1::GetModelStatisticsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let name = &request.get_ref().name;
        let workers = if name.is_empty() {
            let mut all = self.ctx.models.workers();
            all.retain(|w| caller.sees_model(w.name()));
            all
        } else {
            caller.model(name)?;
            vec![self.ctx.models.worker(name).map_err(status)?]
        };
        let d = |x: veraltheim_fastpath::DurationStat| {
            Some(v1::DurationStat {
                count: x.count,
                total_ns: x.ns,
            })
        };
        let models = workers
            .iter()
            .map(|w| {
                let s = w.stats();
                v1::ModelStatistics {
                    name: w.name().to_string(),
                    version: self.ctx.models.version_of(w.name()),
                    success: d(s.success),
                    failure: d(s.fail),
                    queue: d(s.queue),
                    compute: d(s.compute_infer),
                    inference_count: s.inference_count,
                    execution_count: s.execution_count,
                    last_inference_ms: s.last_inference_ms,
                    pending: s.pending,
                    rejected: s.rejected,
                    queue_latency: Some(percentiles(s.queue_us)),
                    compute_latency: Some(percentiles(s.compute_us)),
                    total_latency: Some(percentiles(s.total_us)),
                    expired: s.expired,
                    cache_hits: s.cache_hit.count,
                    objective: s.slo.as_ref().map(objective),
                    padded_tokens: s.padded_tokens,
                    real_tokens: s.real_tokens,
                }
            })
            .collect();
        Ok(Response::new(v1::GetModelStatisticsResponse { models }))
    }
}

/// A model's latency objective and its controller, as the API shows them.
pub(crate) fn objective(o: &veraltheim_fastpath::SloSnapshot) -> v1::LatencyObjective {
    v1::LatencyObjective {
        slo_p99_ms: u64::try_from(o.objective.as_millis()).unwrap_or(u64::MAX),
        window_requests: o.window_count,
        online_p99_us: o
            .window_p99
            .map_or(0, |p| u64::try_from(p.as_micros()).unwrap_or(u64::MAX)),
        background_limit: o.limit as u64,
        background_max: o.max_limit as u64,
        background_batch_rows: o.batch_rows.map_or(0, |r| r as u64),
        background_in_flight: o.in_flight as u64,
        decision: o.decision.to_string(),
        reason: o.reason.clone(),
        at_risk: o.at_risk,
        grows: o.grows,
        shrinks: o.shrinks,
    }
}

pub(crate) fn node(n: &NodeSnapshot) -> v1::SupervisorNode {
    v1::SupervisorNode {
        name: n.name.clone(),
        kind: match n.kind {
            NodeKind::Supervisor => "supervisor",
            NodeKind::Worker => "worker",
        }
        .to_string(),
        state: n.state.as_str().to_string(),
        restarts: n.restarts,
        last_failure: n.last_failure.clone().unwrap_or_default(),
        children: n.children.iter().map(node).collect(),
        detail: String::new(),
    }
}

/// The supervision tree as the API shows it, with what its tasks report of themselves: a model's
/// supervisor (`model:NAME#GENERATION`) gives its latency objective's state.
pub(crate) fn status_tree(
    n: &NodeSnapshot,
    models: &veraltheim_serving::ModelManager,
) -> v1::SupervisorNode {
    fn annotate(n: &mut v1::SupervisorNode, models: &veraltheim_serving::ModelManager) {
        if let Some(name) = n
            .name
            .strip_prefix("model:")
            .and_then(|r| r.split('#').next())
            && let Ok(worker) = models.worker(name)
            && let Some(o) = worker.slo()
        {
            n.detail = objective_line(&o);
        }
        for c in &mut n.children {
            annotate(c, models);
        }
    }
    let mut root = node(n);
    annotate(&mut root, models);
    root
}

/// One line on a latency objective's state.
pub(crate) fn objective_line(o: &veraltheim_fastpath::SloSnapshot) -> String {
    let p99 = o.window_p99.map_or_else(
        || "no online requests".to_string(),
        |p| format!("online p99 {:.1} ms", p.as_secs_f64() * 1e3),
    );
    format!(
        "objective p99 {} ms{}: {p99}; background {} in flight, limit {}/{}{}; {}: {}",
        o.objective.as_millis(),
        if o.at_risk { " (at risk)" } else { "" },
        o.in_flight,
        o.limit,
        o.max_limit,
        o.batch_rows
            .map_or_else(String::new, |r| format!(", {r} per batch")),
        o.decision,
        o.reason
    )
}

/// The NATS bridge's state, as `GetStatus` carries it.
pub(crate) fn nats_status(s: &veraltheim_bus::nats::BridgeStatus) -> v1::NatsBridgeStatus {
    v1::NatsBridgeStatus {
        url: s.url.clone(),
        stream: s.stream.clone(),
        state: s.connection.as_str().to_string(),
        last_error: s.last_error.clone().unwrap_or_default(),
        buffered: s.buffered,
        capacity: s.capacity,
        published: s.published,
        duplicates: s.duplicates,
        received: s.received,
        dropped_full: s.dropped_full,
        dropped_failed: s.dropped_failed,
        publish_errors: s.publish_errors,
        invalid: s.invalid,
    }
}

/// One GPU as the inventory read it, with the models and the jobs the allocator placed there.
fn gpu(
    g: &veraltheim_devices::GpuInfo,
    placements: &[veraltheim_serving::Placed],
    jobs: &[veraltheim_serving::JobHeld],
) -> v1::Gpu {
    let here: Vec<&veraltheim_serving::Placed> = placements
        .iter()
        .filter(|p| p.device == veraltheim_models::allocator::DeviceId::Gpu(g.index))
        .collect();
    let mut models: Vec<String> = here.iter().map(|p| p.model.clone()).collect();
    models.sort_unstable();
    models.dedup();
    v1::Gpu {
        index: g.index,
        uuid: g.uuid.clone(),
        name: g.name.clone(),
        memory_total_bytes: g.memory_total_bytes,
        memory_used_bytes: g.memory_used_bytes,
        memory_free_bytes: g.memory_free_bytes,
        utilization_percent: g.utilization_gpu_percent.unwrap_or(0),
        memory_utilization_percent: g.utilization_memory_percent.unwrap_or(0),
        temperature_celsius: g.temperature_celsius.unwrap_or(0),
        power_draw_milliwatts: g.power_draw_milliwatts.unwrap_or(0),
        power_limit_milliwatts: g.power_limit_milliwatts.unwrap_or(0),
        energy_millijoules: g.energy_millijoules.unwrap_or(0),
        simulated: g.simulated,
        models,
        placed_models: here
            .iter()
            .map(|p| v1::PlacedModel {
                name: p.model.clone(),
                bytes: p.bytes,
                state: p.state.as_str().to_ascii_uppercase(),
            })
            .collect(),
        lost: g.lost,
        processes: g
            .processes
            .iter()
            .map(|p| v1::GpuProcess {
                pid: p.pid,
                used_memory_bytes: p.used_memory_bytes.unwrap_or(0),
            })
            .collect(),
        notes: g.errors.clone(),
        jobs: jobs
            .iter()
            .filter(|j| j.device == veraltheim_models::allocator::DeviceId::Gpu(g.index))
            .map(|j| v1::GpuJob {
                job_id: j.job_id.clone(),
                bytes: j.bytes,
            })
            .collect(),
    }
}

pub fn resource_snapshot(ctx: &Context) -> v1::ResourceSnapshot {
    let s = ctx.devices.snapshot();
    let h = &s.host;
    v1::ResourceSnapshot {
        time_ms: s.time_ms,
        cpu: Some(v1::Cpu {
            cores: h.cores,
            memory_total_bytes: h.memory_total_bytes,
            memory_available_bytes: h.memory_available_bytes,
            process_rss_bytes: h.process_rss_bytes,
        }),
        gpus: {
            let placements = ctx.models.placements();
            let jobs = ctx.models.job_holders();
            s.gpus.iter().map(|g| gpu(g, &placements, &jobs)).collect()
        },
        gpu_probe: s.gpu_probe.clone().unwrap_or_default(),
        gpu_probe_error: s.gpu_probe_error.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl SystemService for Api {
    async fn health(
        &self,
        _: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        Ok(Response::new(v1::HealthResponse {
            live: true,
            ready: self.ctx.is_ready(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn get_status(
        &self,
        _: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        Ok(Response::new(v1::GetStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.ctx.started.elapsed().as_millis() as u64,
            root: Some(status_tree(&self.tree.snapshot(), &self.ctx.models)),
            nats: self.ctx.bridge.as_ref().map(|b| nats_status(&b.status())),
        }))
    }

    async fn kill_child(
        &self,
        request: Request<v1::KillChildRequest>,
    ) -> Result<Response<v1::KillChildResponse>, Status> {
        let caller = Caller::of(&request)?;
        let resource = format!("task:{}", request.get_ref().path);
        let outcome = self.kill(request).await;
        caller.audit(resource, &outcome);
        outcome
    }

    type WatchEventsStream = StreamOf<v1::Event>;

    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let caller = Caller::of(&request)?;
        let mut patterns = request.into_inner().topics;
        // Each pattern is a bus subscription with its own buffer: bounded before any is made.
        check_watch_topics(&patterns, &self.ctx.limits)?;
        for p in &patterns {
            caller.watch(p)?;
        }
        if patterns.is_empty() {
            patterns.push(">".to_string());
        }
        let mut streams = Vec::with_capacity(patterns.len());
        for p in &patterns {
            // A slow watcher loses its oldest events (and is told how many), never slows the
            // components that publish.
            let sub = self
                .ctx
                .bus
                .subscribe(
                    p,
                    SubscribeOptions::new(EVENT_BUFFER, WhenFull::DropOldest).named("WatchEvents"),
                )
                .map_err(|e| Status::invalid_argument(format!("topic filter '{p}': {e}")))?;
            // Audit records go only to patterns that name them (`audit.>`): a watch of every
            // topic gets the lifecycle events, not a copy of the audit log.
            let audit = p == "audit" || p.starts_with("audit.");
            streams.push(Box::pin(
                futures::stream::unfold(sub, |mut sub| async move {
                    let d = sub.recv_delivery().await?;
                    Some((d, sub))
                })
                .filter(move |d| std::future::ready(audit || !d.event.topic.starts_with("audit."))),
            ));
        }
        // What the caller may not see (other tenants' jobs, the audit log without
        // system.admin) is left out.
        let events = futures::stream::select_all(streams)
            .filter(move |d| {
                std::future::ready(caller.sees_event(&d.event.topic, &d.event.attributes))
            })
            .map(|d| {
                let mut attributes: std::collections::HashMap<String, String> =
                    d.event.attributes.into_iter().collect();
                if d.missed_before > 0 {
                    attributes.insert("missed_before".into(), d.missed_before.to_string());
                }
                // Events from other nodes name theirs (the NATS bridge sets the attribute);
                // the others happened here.
                let node = attributes
                    .get(veraltheim_bus::nats::NODE_ATTRIBUTE)
                    .cloned()
                    .unwrap_or_else(|| crate::node::node_id().to_string());
                Ok(v1::Event {
                    topic: d.event.topic,
                    time_ms: d.event.time_ms,
                    message: d.event.message,
                    attributes,
                    traceparent: d.event.traceparent,
                    node,
                })
            });
        Ok(Response::new(Box::pin(events)))
    }

    async fn list_audit_events(
        &self,
        request: Request<v1::ListAuditEventsRequest>,
    ) -> Result<Response<v1::ListAuditEventsResponse>, Status> {
        let r = request.into_inner();
        let audit = self
            .ctx
            .audit
            .as_ref()
            .ok_or_else(|| Status::unavailable("this server keeps no audit log"))?;
        let (records, next) = audit.list(r.since_ms, r.page_size as usize, &r.page_token)?;
        Ok(Response::new(v1::ListAuditEventsResponse {
            events: records
                .into_iter()
                .map(|a| v1::AuditEvent {
                    time_ms: a.time_ms,
                    principal: a.principal,
                    tenant: a.tenant,
                    verb: a.verb,
                    resource: a.resource,
                    result: a.result,
                    action: a.action,
                    peer: a.peer,
                    trace_id: a.trace_id,
                    message: a.message,
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }
}

impl Api {
    /// KillChild once authorised.
    async fn kill(
        &self,
        request: Request<v1::KillChildRequest>,
    ) -> Result<Response<v1::KillChildResponse>, Status> {
        if !self.ctx.fault_injection {
            return Err(Status::failed_precondition(
                "KillChild is fault injection: start the server with --enable-fault-injection",
            ));
        }
        let path = request.into_inner().path;
        self.tree.kill_child(&path).await.map_err(|e| match e {
            veraltheim_supervisor::Error::NotFound { .. } => {
                Status::not_found(format!("no supervised task at '{path}': {e}"))
            }
            other => Status::failed_precondition(format!("cannot kill '{path}': {other}")),
        })?;
        tracing::warn!(%path, "killed by request (fault injection)");
        Ok(Response::new(v1::KillChildResponse {}))
    }
}

/// Refuses a WatchEvents call with more topic patterns, or a longer one, than the limits allow.
fn check_watch_topics(
    patterns: &[String],
    limits: &crate::context::ApiLimits,
) -> Result<(), Status> {
    if patterns.len() > limits.max_watch_topics {
        return Err(Status::invalid_argument(format!(
            "{} topic patterns; one WatchEvents call may name at most {} (limits.max_watch_topics)",
            patterns.len(),
            limits.max_watch_topics
        )));
    }
    if let Some(long) = patterns
        .iter()
        .find(|p| p.len() > limits.max_topic_pattern_bytes)
    {
        return Err(Status::invalid_argument(format!(
            "a topic pattern of {} bytes is longer than {} (limits.max_topic_pattern_bytes)",
            long.len(),
            limits.max_topic_pattern_bytes
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl ResourceService for Api {
    async fn get_resources(
        &self,
        _: Request<v1::GetResourcesRequest>,
    ) -> Result<Response<v1::ResourceSnapshot>, Status> {
        Ok(Response::new(resource_snapshot(&self.ctx)))
    }

    type WatchResourcesStream = StreamOf<v1::ResourceSnapshot>;

    async fn watch_resources(
        &self,
        request: Request<v1::WatchResourcesRequest>,
    ) -> Result<Response<Self::WatchResourcesStream>, Status> {
        let ms = request.get_ref().interval_ms;
        let every = if ms == 0 {
            self.ctx.devices.interval()
        } else {
            // Sampling faster than this only burns the watcher's and our CPU.
            Duration::from_millis(u64::from(ms).max(100))
        };
        let ctx = self.ctx.clone();
        let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(every));
        Ok(Response::new(Box::pin(
            ticks.map(move |_| Ok(resource_snapshot(&ctx))),
        )))
    }
}
