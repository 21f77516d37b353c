//! What every API handler shares — the models, the one inference path, the bus, the devices,
//! the client shared-memory regions — and the one place where the serving layer's errors become
//! gRPC statuses ([`status`]) and the one where they become HTTP statuses ([`http_status`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::metadata::MetadataMap;
use veraltheim_bus::{Bus, TraceParent, with_trace};
use veraltheim_fastpath::InferOutput;
use veraltheim_serving::{Error, ErrorKind, InferCall, Inference, ModelManager};

use crate::devices::Devices;
use crate::shm::SharedMemory;
use crate::telemetry::{Protocol, Telemetry};

/// What `/metrics` reads of the batch jobs (implemented by `jobs::Jobs`): through this trait the
/// context does not depend on the jobs module, which depends on it.
pub trait JobCounts: Send + Sync {
    /// Live jobs by state: QUEUED, RUNNING (admitted or running), RETRY_WAIT.
    fn live(&self) -> veraltheim_slowpath::LiveCounts;
    /// How many jobs entered each state since the start.
    fn entered(&self) -> Vec<(veraltheim_slowpath::JobState, u64)>;
    /// Running local jobs paused now while a latency objective is at risk.
    fn paused(&self) -> usize;
    /// The CPU (millicores) jobs are admitted against now: the configured capacity less what
    /// the fast path uses.
    fn cpu_capacity_millis(&self) -> u64;
}

pub struct Context {
    pub models: Arc<ModelManager>,
    pub inference: Arc<Inference>,
    pub bus: Bus,
    pub devices: Arc<Devices>,
    /// Whether KillChild (and the `fault` model) are allowed.
    pub fault_injection: bool,
    pub started: Instant,
    /// Client-registered system shared-memory regions (KServe shared-memory extension).
    pub shm: SharedMemory,
    /// Bounds the API checks before it allocates for a call (`[limits]`).
    pub limits: ApiLimits,
    /// The audit log, for ListAuditEvents; set by the server.
    pub audit: Option<crate::audit::Audit>,
    /// Largest request body the HTTP APIs read (`server.max_message_bytes`, gRPC's bound too).
    pub max_body_bytes: usize,
    /// Traces (`--otlp-endpoint`); `None`: no spans are made.
    pub telemetry: Option<Arc<Telemetry>>,
    /// The batch jobs, for `/metrics` (jobs by state); set by the server.
    pub jobs: Option<Arc<dyn JobCounts>>,
    /// The bridge of events to NATS JetStream (`--nats-url`), for `GetStatus` and `/metrics`;
    /// set by the server.
    pub bridge: Option<Arc<veraltheim_bus::nats::NatsBridge>>,
    /// The supervision tree's root, for `/metrics` (restarts); set once the tree runs.
    pub tree: std::sync::OnceLock<veraltheim_supervisor::SupervisorHandle>,
    /// Set once start-up loading is done; cleared when shutdown begins.
    ready: AtomicBool,
}

/// The `[limits]` the API itself enforces (the model limits live in the model manager).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    /// Most topic patterns of one WatchEvents call.
    pub max_watch_topics: usize,
    /// Longest topic pattern, in bytes.
    pub max_topic_pattern_bytes: usize,
}

impl Default for ApiLimits {
    /// The default configuration's values.
    fn default() -> Self {
        ApiLimits {
            max_watch_topics: 64,
            max_topic_pattern_bytes: 256,
        }
    }
}

impl Context {
    pub fn new(
        inference: Arc<Inference>,
        bus: Bus,
        devices: Arc<Devices>,
        fault_injection: bool,
        shm: SharedMemory,
    ) -> Self {
        Context {
            models: inference.models().clone(),
            inference,
            bus,
            devices,
            fault_injection,
            started: Instant::now(),
            shm,
            limits: ApiLimits::default(),
            audit: None,
            max_body_bytes: 64 << 20,
            telemetry: None,
            jobs: None,
            bridge: None,
            tree: std::sync::OnceLock::new(),
            ready: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// [`Inference::infer`] with its error as a gRPC status: the gRPC APIs' edge.
    pub fn infer(
        &self,
        call: InferCall,
    ) -> impl Future<Output = Result<InferOutput, Status>> + Send + '_ {
        self.traced_infer(call, status, Protocol::Grpc)
    }

    /// [`Inference::infer`] with its error turned into an HTTP API's own by `map` (a mapping
    /// built on [`http_status`]): the HTTP APIs' edge.
    pub fn infer_as<E: 'static>(
        &self,
        call: InferCall,
        map: fn(Error) -> E,
    ) -> impl Future<Output = Result<InferOutput, E>> + Send + '_ {
        self.traced_infer(call, map, Protocol::Http)
    }

    /// The one inference edge, with its span when traces are exported (`telemetry.rs`).
    /// Without an exporter the call's trace context is cleared, so that nothing below records
    /// anything for it.
    fn traced_infer<E: 'static>(
        &self,
        mut call: InferCall,
        map: fn(Error) -> E,
        protocol: Protocol,
    ) -> impl Future<Output = Result<InferOutput, E>> + Send + '_ {
        let traced = match &self.telemetry {
            Some(t) => t.begin(&mut call, protocol),
            None => {
                call.trace = None;
                None
            }
        };
        let answer = self.inference.infer(call);
        async move {
            let result = answer.await;
            if let (Some(t), Some(traced)) = (&self.telemetry, traced) {
                // The status the caller is answered with, from the one mapping (below).
                let status_code = |kind| match protocol {
                    Protocol::Grpc => grpc_code(kind) as i64,
                    Protocol::Http => i64::from(http_status(kind).as_u16()),
                };
                t.end(traced, &result, &self.models, status_code);
            }
            result.map_err(map)
        }
    }
}

/// How long a client should back off after a full queue (gRPC's retry pushback convention).
const RETRY_PUSHBACK_MS: &str = "50";

/// The gRPC status of a serving error: the one mapping both gRPC APIs use.
pub fn status(e: Error) -> Status {
    let mut s = Status::new(grpc_code(e.kind()), e.to_string());
    if e.is_queue_full() {
        s.metadata_mut().insert(
            "grpc-retry-pushback-ms",
            tonic::metadata::MetadataValue::from_static(RETRY_PUSHBACK_MS),
        );
    }
    s
}

/// The gRPC code of a serving error kind.
pub fn grpc_code(kind: ErrorKind) -> tonic::Code {
    use tonic::Code as C;
    match kind {
        ErrorKind::InvalidArgument => C::InvalidArgument,
        ErrorKind::NotFound => C::NotFound,
        ErrorKind::Unavailable => C::Unavailable,
        ErrorKind::ResourceExhausted => C::ResourceExhausted,
        ErrorKind::DeadlineExceeded => C::DeadlineExceeded,
        ErrorKind::Internal => C::Internal,
    }
}

/// The HTTP status of a serving error kind: the one mapping both HTTP APIs (KServe v2 over REST,
/// OpenAI embeddings) use. Triton's HTTP statuses: a bad request 400, an unknown model or version
/// 404, a server fault 500, and everything that means "not now" (not ready, a full queue, a
/// deadline or queue timeout that passed) 503, which clients retry.
pub fn http_status(kind: ErrorKind) -> http::StatusCode {
    use http::StatusCode as S;
    match kind {
        ErrorKind::InvalidArgument => S::BAD_REQUEST,
        ErrorKind::NotFound => S::NOT_FOUND,
        ErrorKind::Unavailable | ErrorKind::ResourceExhausted | ErrorKind::DeadlineExceeded => {
            S::SERVICE_UNAVAILABLE
        }
        ErrorKind::Internal => S::INTERNAL_SERVER_ERROR,
    }
}

/// Runs `work` under the caller's W3C trace context (its `traceparent` metadata), so that the
/// events it causes (model state changes...) carry their cause.
pub async fn traced<F: std::future::Future>(metadata: &MetadataMap, work: F) -> F::Output {
    match traceparent(metadata) {
        Some(parent) => with_trace(parent, work).await,
        None => work.await,
    }
}

/// The caller's W3C trace context (its `traceparent` metadata), when it sent a valid one (an
/// invalid one is ignored, as W3C trace context asks: the call then starts a trace of its own).
pub fn traceparent(metadata: &MetadataMap) -> Option<TraceParent> {
    metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceParent::parse(v).ok())
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

/// The code a refusal of tonic's own codec gets, when its code says "server fault" for what is
/// the caller's: an undecodable message (INTERNAL → INVALID_ARGUMENT) or one over the size
/// limit (OUT_OF_RANGE → RESOURCE_EXHAUSTED). `code` is the decimal code, `message` the text,
/// plain or percent-encoded.
pub(crate) fn client_code(code: &str, message: &str) -> Option<&'static str> {
    let says = |text: &str| message.contains(text) || message.contains(&text.replace(' ', "%20"));
    match code {
        "11" if says("length too large") => Some("8"),
        "13" if says("failed to decode Protobuf message") => Some("3"),
        _ => None,
    }
}

/// A status from reading a request stream, with the caller's code where [`client_code`] says.
pub(crate) fn as_client_error(status: tonic::Status) -> tonic::Status {
    let code = (status.code() as i32).to_string();
    match client_code(&code, status.message()) {
        Some(c) => tonic::Status::new(
            tonic::Code::from(c.parse::<i32>().unwrap_or(2)),
            status.message(),
        ),
        None => status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veraltheim_fastpath::InferError;

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

    #[test]
    fn a_full_queue_asks_the_client_to_back_off() {
        let s = status(Error::Infer(InferError::QueueFull {
            model: "m".into(),
            capacity: 2,
        }));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            s.metadata().get("grpc-retry-pushback-ms").unwrap(),
            RETRY_PUSHBACK_MS
        );
        let s = status(Error::NotFound("m".into()));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(s.metadata().get("grpc-retry-pushback-ms").is_none());
    }
}
