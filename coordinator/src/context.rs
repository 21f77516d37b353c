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
use veraltheim_fastpath::{InferError, InferOutput, Request};
use veraltheim_models::Tensor;
use veraltheim_models::validate::{validate_inputs, validate_outputs};

use crate::manager::{ManagerError, ModelManager};

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
    pub async fn infer(&self, call: InferCall) -> Result<InferOutput, Status> {
        let span = tracing::debug_span!("infer", model = %call.model, id = %call.id);
        async move {
            self.models
                .check_version(&call.model, &call.version)
                .map_err(manager_status)?;
            // Held until the answer is in: a model with requests in flight is never evicted.
            let (worker, _in_flight) = self
                .models
                .acquire_or_load(&call.model, call.deadline)
                .await
                .map_err(manager_status)?;
            let config = worker.config();
            let (inputs, rows) =
                validate_inputs(config, call.inputs).map_err(|e| Status::invalid_argument(e.0))?;
            validate_outputs(config, &call.outputs).map_err(|e| Status::invalid_argument(e.0))?;
            let cache_key = if config.cache_enabled() {
                let lookup = Instant::now();
                let key =
                    ResponseCache::key(&call.model, &config.to_json(), &inputs, &call.outputs);
                if let Some(hit) = self.cache.get(&key) {
                    worker.record_cache_hit(lookup.elapsed(), call.received.elapsed());
                    return Ok(InferOutput {
                        outputs: hit.outputs.clone(),
                        queue: Duration::ZERO,
                        compute: Duration::ZERO,
                        batch_size: rows,
                    });
                }
                worker.record_cache_miss(lookup.elapsed());
                Some(key)
            } else {
                None
            };
            let request = Request {
                id: call.id,
                inputs,
                rows,
                outputs: call.outputs,
                priority: call.priority,
                timeout: call.timeout,
                deadline: call.deadline,
                received: call.received,
            };
            let deadline = request.deadline;
            let rx = worker.submit(request).map_err(infer_status)?;
            let answer = async {
                match rx.await {
                    Ok(result) => result.map_err(infer_status),
                    Err(_) => Err(Status::internal(format!(
                        "model '{}' dropped the request without an answer",
                        worker.name()
                    ))),
                }
            };
            // The queue drops a request whose deadline passes while it waits; this covers one
            // whose batch is still computing when the caller's deadline comes.
            let answer = async {
                let out = answer.await?;
                if let Some(key) = cache_key {
                    self.cache.insert(key, out.outputs.clone());
                }
                Ok(out)
            };
            match deadline {
                Some(at) => tokio::time::timeout_at(at.into(), answer)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "model '{}' did not answer within the request's deadline",
                            worker.name()
                        )))
                    }),
                None => answer.await,
            }
        }
        .instrument(span)
        .await
    }
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
