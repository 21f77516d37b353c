//! What every API handler shares: the model manager, the server's state, and the one inference
//! path that both gRPC APIs go through.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::metadata::MetadataMap;
use tracing::Instrument;
use veraltheim_bus::{Bus, TraceParent, with_trace};
use veraltheim_supervisor::SupervisorHandle;

use crate::cache::ResponseCache;
use crate::devices::Devices;
use crate::shm::SharedMemory;
use veraltheim_fastpath::{InferError, InferOutput, ModelWorker, Request};
use veraltheim_models::Tensor;
use veraltheim_models::validate::{validate_inputs, validate_outputs};
use veraltheim_storage::ContentHash;

use crate::manager::{InFlight, ManagerError, ModelManager};

pub struct Context {
    pub models: Arc<ModelManager>,
    pub bus: Bus,
    pub devices: Arc<Devices>,
    /// Whether KillChild (and the `fault` model) are allowed.
    pub fault_injection: bool,
    /// The supervision tree's root, once it runs.
    pub tree: parking_lot::RwLock<Option<SupervisorHandle>>,
    /// Answers of models that enable `response_cache`.
    pub cache: ResponseCache,
    /// The slow path, once its store is open and its jobs recovered.
    pub jobs: std::sync::OnceLock<crate::jobs::Jobs>,
    pub started: Instant,
    /// Client-registered system shared-memory regions (KServe shared-memory extension).
    pub shm: SharedMemory,
    /// Set once start-up loading is done; cleared when shutdown begins.
    ready: AtomicBool,
}

/// One inference as both APIs describe it.
pub struct InferCall {
    pub model: String,
    pub version: String,
    pub id: String,
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<String>,
    pub priority: u32,
    pub timeout: Option<Duration>,
    pub deadline: Option<Instant>,
    pub received: Instant,
}

impl Context {
    pub fn new(
        models: Arc<ModelManager>,
        bus: Bus,
        devices: Arc<Devices>,
        fault_injection: bool,
        cache: ResponseCache,
        shm: SharedMemory,
    ) -> Self {
        Context {
            cache,
            jobs: std::sync::OnceLock::new(),
            models,
            bus,
            devices,
            fault_injection,
            tree: parking_lot::RwLock::new(None),
            started: Instant::now(),
            shm,
            ready: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Validates, queues and awaits one inference.
    ///
    /// The checks, the cache lookup and the submit run when this is called; the future only
    /// awaits the answer. That keeps the future small: tonic, axum and hyper move it through
    /// several boxes. When it carried the whole path it was 10 KiB (the on-demand load inline)
    /// and `memmove` took 10.3% of the server's CPU samples; at ~1 KiB, 7.6–8.4%, the rest being
    /// h2's and hyper's own (perf, identity at concurrency 64). A model that must first be
    /// loaded on demand takes a boxed path.
    pub fn infer(
        &self,
        call: InferCall,
    ) -> impl Future<Output = Result<InferOutput, Status>> + Send + '_ {
        let span = tracing::debug_span!("infer", model = %call.model, id = %call.id);
        let step = span.in_scope(|| self.start(call));
        async move {
            match step {
                Step::Submitted(submitted) => self.finish(submitted).await,
                Step::Load(call) => Box::pin(self.load_then_infer(call)).await,
            }
        }
        .instrument(span)
    }

    fn start(&self, call: InferCall) -> Step {
        if let Err(e) = self.models.check_version(&call.model, &call.version) {
            return Step::Submitted(Submitted::Done(Err(manager_status(e))));
        }
        match self.models.acquire(&call.model) {
            Ok((worker, in_flight)) => Step::Submitted(self.submit(worker, in_flight, call)),
            Err(e) if self.models.loads_on_demand_after(&call.model, &e) => Step::Load(call),
            Err(e) => Step::Submitted(Submitted::Done(Err(manager_status(e)))),
        }
    }

    async fn load_then_infer(&self, call: InferCall) -> Result<InferOutput, Status> {
        // Held until the answer is in: a model with requests in flight is never evicted.
        let (worker, in_flight) = self
            .models
            .acquire_or_load(&call.model, call.deadline)
            .await
            .map_err(manager_status)?;
        self.finish(self.submit(worker, in_flight, call)).await
    }

    async fn finish(&self, submitted: Submitted) -> Result<InferOutput, Status> {
        match submitted {
            Submitted::Done(result) => result,
            Submitted::Waiting(waiting) => self.wait(waiting).await,
        }
    }

    /// Validates the call against the model's configuration, answers it from the response cache
    /// when it can, and queues it otherwise.
    fn submit(&self, worker: Arc<ModelWorker>, in_flight: InFlight, call: InferCall) -> Submitted {
        let config = worker.config();
        let (inputs, rows) = match validate_inputs(config, call.inputs) {
            Ok(v) => v,
            Err(e) => return Submitted::Done(Err(Status::invalid_argument(e.to_string()))),
        };
        if let Err(e) = validate_outputs(config, &call.outputs) {
            return Submitted::Done(Err(Status::invalid_argument(e.to_string())));
        }
        let cache_key = if config.cache_enabled() {
            let lookup = Instant::now();
            let key = ResponseCache::key(&call.model, &config.to_json(), &inputs, &call.outputs);
            if let Some(hit) = self.cache.get(&key) {
                worker.record_cache_hit(lookup.elapsed(), call.received.elapsed());
                return Submitted::Done(Ok(InferOutput {
                    outputs: hit.outputs.clone(),
                    queue: Duration::ZERO,
                    compute: Duration::ZERO,
                    batch_size: rows,
                }));
            }
            worker.record_cache_miss(lookup.elapsed());
            Some(key)
        } else {
            None
        };
        let deadline = call.deadline;
        let request = Request {
            id: call.id,
            inputs,
            rows,
            outputs: call.outputs,
            priority: call.priority,
            timeout: call.timeout,
            deadline,
            received: call.received,
        };
        match worker.submit(request) {
            Ok(rx) => Submitted::Waiting(Waiting {
                worker,
                _in_flight: in_flight,
                rx,
                cache_key,
                deadline,
            }),
            Err(e) => Submitted::Done(Err(infer_status(e))),
        }
    }

    async fn wait(&self, w: Waiting) -> Result<InferOutput, Status> {
        // The queue drops a request whose deadline passes while it waits; the timeout here
        // covers one whose batch is still computing when the caller's deadline comes.
        let answer = match w.deadline {
            Some(at) => match tokio::time::timeout_at(at.into(), w.rx).await {
                Ok(answer) => answer,
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "model '{}' did not answer within the request's deadline",
                        w.worker.name()
                    )));
                }
            },
            None => w.rx.await,
        };
        let out = match answer {
            Ok(result) => result.map_err(infer_status)?,
            Err(_) => {
                return Err(Status::internal(format!(
                    "model '{}' dropped the request without an answer",
                    w.worker.name()
                )));
            }
        };
        if let Some(key) = w.cache_key {
            self.cache.insert(key, out.outputs.clone());
        }
        Ok(out)
    }
}

/// Where [`Context::infer`] stands after its synchronous part.
enum Step {
    Submitted(Submitted),
    /// The model must be loaded on demand first.
    Load(InferCall),
}

/// A call that went through [`Context::submit`]: answered already, or queued.
enum Submitted {
    Done(Result<InferOutput, Status>),
    Waiting(Waiting),
}

/// A submitted request, until its answer comes.
struct Waiting {
    worker: Arc<ModelWorker>,
    /// Held until the answer is in: a model with requests in flight is never evicted.
    _in_flight: InFlight,
    rx: tokio::sync::oneshot::Receiver<Result<InferOutput, InferError>>,
    cache_key: Option<ContentHash>,
    deadline: Option<Instant>,
}

pub fn manager_status(e: ManagerError) -> Status {
    let msg = e.to_string();
    match e {
        ManagerError::NotFound(_) | ManagerError::NoSuchVersion { .. } => Status::not_found(msg),
        ManagerError::NotReady { .. } => Status::unavailable(msg),
        ManagerError::BadConfig { .. } => Status::invalid_argument(msg),
        ManagerError::LoadFailed { .. } => Status::internal(msg),
        ManagerError::NoRoom { .. } | ManagerError::LoadSlots { .. } => {
            Status::resource_exhausted(msg)
        }
        ManagerError::LoadTimeout { .. } => Status::deadline_exceeded(msg),
    }
}

/// How long a client should back off after a full queue (gRPC's retry pushback convention).
const RETRY_PUSHBACK_MS: &str = "50";

pub fn infer_status(e: InferError) -> Status {
    let msg = e.to_string();
    match e {
        InferError::QueueFull { .. } => {
            let mut s = Status::resource_exhausted(msg);
            s.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                tonic::metadata::MetadataValue::from_static(RETRY_PUSHBACK_MS),
            );
            s
        }
        InferError::DeadlineExceeded { .. } => Status::deadline_exceeded(msg),
        InferError::InvalidRequest { .. } => Status::invalid_argument(msg),
        InferError::Unavailable { .. } => Status::unavailable(msg),
        InferError::Backend { .. } | InferError::Panicked { .. } => Status::internal(msg),
    }
}

/// Runs `work` under the caller's W3C trace context (its `traceparent` metadata), so that the
/// events it causes (model state changes...) carry their cause.
pub async fn traced<F: std::future::Future>(metadata: &MetadataMap, work: F) -> F::Output {
    let parent = metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceParent::parse(v).ok());
    match parent {
        Some(parent) => with_trace(parent, work).await,
        None => work.await,
    }
}

/// The caller's gRPC deadline (`grpc-timeout` header), as an instant. tonic enforces it too, but
/// answers CANCELLED; knowing it here lets the queue drop the request and answer
/// DEADLINE_EXCEEDED itself.
pub fn grpc_deadline(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    received.checked_add(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let now = Instant::now();
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(
            grpc_deadline(&m, now),
            Some(now + Duration::from_millis(250))
        );
        m.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_deadline(&m, now), Some(now + Duration::from_secs(3)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_deadline(&m, now), None);
        assert_eq!(grpc_deadline(&MetadataMap::new(), now), None);
    }
}
