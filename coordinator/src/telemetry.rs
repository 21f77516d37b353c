//! Traces: spans exported over OTLP/gRPC to an OpenTelemetry collector (`--otlp-endpoint`,
//! `telemetry.otlp_endpoint`). Every span the coordinator makes is made here.
//!
//! - **Inference.** Every protocol reaches the models through `Context::infer`/`infer_as`,
//!   which calls [`Telemetry::begin`] and [`Telemetry::end`] around the call. `begin` starts the
//!   server span `infer` — a child of the caller's span when the call carried a W3C
//!   `traceparent`, a new trace otherwise — and hands its ids down with the request
//!   (`InferCall::trace` → `fastpath::Request::span`). The fast path makes no span: the pool
//!   thread that runs a batch holding a traced request records its instants and the ids of its
//!   traced requests (`fastpath::BatchTrace`, read where the statistics read the clock anyway)
//!   and the answer carries it back. `end` then builds, with those instants as explicit start
//!   and end times, the children `queue` (enqueued → batch taken), `compute` (batch taken →
//!   outputs split, with the backend call as events) and `answer` (→ the answer reached the
//!   edge), and, once per batch, the `batch` span: a root of its own with a link to each traced
//!   request it held. Each request's `compute` links back to it.
//! - **Jobs.** The job store's observer calls [`Telemetry::job_changed`] with every durable
//!   change; a change that ends an attempt (RUNNING → anything else) becomes a `job.attempt`
//!   span from the attempt's start, a child of the submit's `traceparent` when the job has one.
//!
//! Without an endpoint there is no [`Telemetry`]: `Context` clears `InferCall::trace`, so no
//! span and no `BatchTrace` is built, and the observer skips the call.
//!
//! Spans go to the SDK's batch span processor: a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`,
//! 2048) that drops a span when full — ending a span never waits — and a thread of its own that
//! exports every `OTEL_BSP_SCHEDULE_DELAY` ms (5000) or when a batch is full.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context as OtelContext, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    Config, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample,
};
use veraltheim_bus::TraceParent;
use veraltheim_fastpath::{BatchTrace, InferOutput, SpanRef};
use veraltheim_serving::{Error, ErrorKind, InferCall, ModelManager};
use veraltheim_slowpath::job::JobKind;
use veraltheim_slowpath::{JobRecord, JobState};

/// The service name every span's resource carries.
pub const SERVICE_NAME: &str = "veraltheim";

/// Attribute keys (those without an OpenTelemetry convention are `veraltheim.*`).
pub mod key {
    pub const NODE: &str = "veraltheim.node.id";
    pub const MODEL: &str = "veraltheim.model.name";
    pub const MODEL_VERSION: &str = "veraltheim.model.version";
    pub const REQUEST_ID: &str = "veraltheim.request.id";
    pub const PROTOCOL: &str = "veraltheim.protocol";
    /// Batch items executed together (rows).
    pub const BATCH_SIZE: &str = "veraltheim.batch.size";
    /// Requests in the batch.
    pub const BATCH_REQUESTS: &str = "veraltheim.batch.requests";
    pub const JOB_ID: &str = "veraltheim.job.id";
    pub const JOB_NAME: &str = "veraltheim.job.name";
    pub const JOB_QUEUE: &str = "veraltheim.job.queue";
    pub const JOB_KIND: &str = "veraltheim.job.kind";
    pub const JOB_ATTEMPT: &str = "veraltheim.job.attempt";
    /// The state the attempt ended in (SUCCEEDED, RETRY_WAIT, FAILED...).
    pub const JOB_OUTCOME: &str = "veraltheim.job.outcome";
    pub const JOB_EXIT_CODE: &str = "veraltheim.job.exit_code";
    pub const ERROR_TYPE: &str = "error.type";
    pub const GRPC_STATUS: &str = "rpc.grpc.status_code";
    pub const HTTP_STATUS: &str = "http.response.status_code";
}

/// The API an inference came in through: its error becomes a gRPC or an HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        }
    }
}

/// The name of a batch's span.
const BATCH: &str = "batch";

/// Which spans are recorded: the standard choice (`OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG`, as the SDK reads them; by default every new trace and whatever
/// the caller's `traceparent` says), except for a `batch` span. That span is only made for a
/// batch that holds a recorded request, and it is a root of its own, so a ratio sampler would
/// drop it by its own trace id while keeping the requests that link to it: it is always kept.
#[derive(Clone, Debug)]
struct Sampling(Box<dyn ShouldSample>);

impl ShouldSample for Sampling {
    fn should_sample(
        &self,
        parent: Option<&OtelContext>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if name == BATCH {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.0
            .should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// The tracer and its exporter.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    node: KeyValue,
}

/// A traced inference between [`Telemetry::begin`] and [`Telemetry::end`]: the context holding
/// its server span.
pub struct Traced {
    cx: OtelContext,
    model: String,
    protocol: Protocol,
}

impl Telemetry {
    /// Starts exporting to `endpoint` (an `http://` or `https://` URL of an OTLP/gRPC
    /// receiver). Call it inside the server's tokio runtime: the gRPC channel's connection task
    /// runs there. Connecting is lazy: a receiver that is down costs failed exports (logged),
    /// never a failed start.
    pub fn start(endpoint: &str) -> anyhow::Result<Telemetry> {
        let https = endpoint.starts_with("https://");
        if !https && !endpoint.starts_with("http://") {
            bail!(
                "telemetry.otlp_endpoint (--otlp-endpoint) must be the http:// or https:// URL of \
                 an OTLP/gRPC receiver, e.g. http://127.0.0.1:4317; it is {endpoint:?}"
            );
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint);
        if https {
            exporter = exporter
                .with_tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots());
        }
        let exporter = exporter.build().with_context(|| {
            format!("telemetry.otlp_endpoint (--otlp-endpoint) {endpoint:?} cannot be used")
        })?;
        let node = crate::node::node_id();
        let resource = Resource::builder_empty()
            .with_service_name(SERVICE_NAME)
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", node.to_string()),
                KeyValue::new(key::NODE, node.to_string()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampling(Config::default().sampler))
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        let tracer = provider.tracer(SERVICE_NAME);
        Ok(Telemetry {
            provider,
            tracer,
            node: KeyValue::new(key::NODE, node.to_string()),
        })
    }

    /// Exports what is queued and stops (at most `timeout`). Blocks: call it off the runtime's
    /// worker threads.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(error = %e, "traces: the last spans may not have been exported");
        }
    }

    /// Starts the server span of `call` and puts its ids in `call.trace`, for the fast path to
    /// record its batch. A caller's `traceparent` that is not sampled is respected: nothing is
    /// recorded, and `call.trace` is cleared.
    pub fn begin(&self, call: &mut InferCall, protocol: Protocol) -> Option<Box<Traced>> {
        let parent = match call.trace.take() {
            Some(p) if !p.sampled() => return None,
            Some(p) => OtelContext::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id()),
                SpanId::from_bytes(p.parent_id()),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            None => OtelContext::new(),
        };
        let clock = Clock::now();
        let mut attributes = vec![
            KeyValue::new(key::MODEL, call.model.clone()),
            KeyValue::new(key::PROTOCOL, protocol.name()),
            self.node.clone(),
        ];
        if !call.id.is_empty() {
            attributes.push(KeyValue::new(key::REQUEST_ID, call.id.clone()));
        }
        let span = self
            .tracer
            .span_builder("infer")
            .with_kind(SpanKind::Server)
            .with_start_time(clock.at(call.received))
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        let sc = span.span_context().clone();
        if !sc.is_sampled() {
            return None;
        }
        call.trace = TraceParent::new(sc.trace_id().to_bytes(), sc.span_id().to_bytes(), true).ok();
        Some(Box::new(Traced {
            cx: OtelContext::new().with_span(span),
            model: call.model.clone(),
            protocol,
        }))
    }

    /// Ends the server span of a traced call with its outcome, after its children: `queue`,
    /// `compute` and `answer` from the batch's instants, and the batch's own span if no other
    /// request of the batch has made it yet.
    pub fn end(
        &self,
        traced: Box<Traced>,
        result: &Result<InferOutput, Error>,
        models: &ModelManager,
        status_code: impl Fn(ErrorKind) -> i64,
    ) {
        let clock = Clock::now();
        // The answer is in now; a batch's own reading of the wall clock may come out a hair
        // later, and the span must hold its children.
        let end_at = match result {
            Ok(InferOutput {
                batch: Some(batch), ..
            }) => clock.now_system.max(batch.wall(batch.done)),
            _ => clock.now_system,
        };
        let span = traced.cx.span();
        span.set_attribute(KeyValue::new(
            key::MODEL_VERSION,
            models.version_of(&traced.model),
        ));
        match result {
            Ok(out) => {
                span.set_attribute(KeyValue::new(key::BATCH_SIZE, out.batch_size as i64));
                if let Some(batch) = &out.batch {
                    self.children(&traced, out, batch, end_at);
                }
            }
            Err(e) => {
                let kind = e.kind();
                span.set_status(Status::error(e.to_string()));
                span.set_attribute(KeyValue::new(key::ERROR_TYPE, kind_name(kind)));
                let status_key = match traced.protocol {
                    Protocol::Grpc => key::GRPC_STATUS,
                    Protocol::Http => key::HTTP_STATUS,
                };
                span.set_attribute(KeyValue::new(status_key, status_code(kind)));
            }
        }
        span.end_with_timestamp(end_at);
    }

    fn children(&self, traced: &Traced, out: &InferOutput, batch: &BatchTrace, end_at: SystemTime) {
        let batch_span = *batch
            .span
            .get_or_init(|| self.batch_span(&traced.model, batch));
        // The batch's instants on the wall clock as the batch itself reads them, so that every
        // request of a batch agrees with its batch span to the nanosecond.
        let (taken, done) = (batch.wall(batch.start), batch.wall(batch.done));
        let enqueued = taken.checked_sub(out.queue).unwrap_or(taken);
        let child = |name: &'static str, from: SystemTime| {
            self.tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(from)
                .with_attributes([
                    KeyValue::new(key::MODEL, traced.model.clone()),
                    self.node.clone(),
                ])
        };
        child("queue", enqueued)
            .start_with_context(&self.tracer, &traced.cx)
            .end_with_timestamp(taken);
        let mut compute = child("compute", taken)
            .with_links(vec![Link::with_context(remote(batch_span))])
            .start_with_context(&self.tracer, &traced.cx);
        compute.set_attribute(KeyValue::new(key::BATCH_SIZE, batch.rows as i64));
        backend_events(&mut compute, batch);
        compute.end_with_timestamp(done);
        child("answer", done)
            .start_with_context(&self.tracer, &traced.cx)
            .end_with_timestamp(end_at);
    }

    /// The span of an executed batch: a root of its own trace (a batch serves many traces),
    /// linked to each traced request it held.
    fn batch_span(&self, model: &str, batch: &BatchTrace) -> SpanRef {
        let links = batch
            .links
            .iter()
            .map(|r| Link::with_context(remote(*r)))
            .collect();
        let mut span = self
            .tracer
            .span_builder(BATCH)
            .with_kind(SpanKind::Internal)
            .with_start_time(batch.wall(batch.start))
            .with_links(links)
            .with_attributes([
                KeyValue::new(key::MODEL, model.to_string()),
                self.node.clone(),
                KeyValue::new(key::BATCH_SIZE, batch.rows as i64),
                KeyValue::new(key::BATCH_REQUESTS, batch.requests as i64),
            ])
            .start_with_context(&self.tracer, &OtelContext::new());
        backend_events(&mut span, batch);
        let sc = span.span_context();
        let id = SpanRef {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
        };
        span.end_with_timestamp(batch.wall(batch.done));
        id
    }

    /// Called with every durable change of a job: a change that ends an attempt (the job was
    /// RUNNING and is not any more) becomes that attempt's span, unless the job was submitted
    /// under a trace its caller does not sample. Never blocks.
    pub fn job_changed(&self, rec: &JobRecord) {
        let [.., before, now] = rec.history.as_slice() else {
            return;
        };
        if before.state != JobState::Running || now.state == JobState::Running {
            return;
        }
        let Some(started_ms) = rec.started_ms else {
            return;
        };
        let parent = rec
            .traceparent
            .as_deref()
            .and_then(|t| TraceParent::parse(t).ok());
        if parent.is_some_and(|p| !p.sampled()) {
            // The submitter does not record this trace.
            return;
        }
        let parent = parent.map_or_else(OtelContext::new, |p| {
            OtelContext::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id()),
                SpanId::from_bytes(p.parent_id()),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            ))
        });
        let kind = match &rec.spec.kind {
            JobKind::Command { .. } => "command",
            JobKind::Inference { .. } => "inference",
        };
        let mut attributes = vec![
            KeyValue::new(key::JOB_ID, rec.id.clone()),
            KeyValue::new(key::JOB_NAME, rec.spec.name.clone()),
            KeyValue::new(key::JOB_QUEUE, rec.spec.queue.clone()),
            KeyValue::new(key::JOB_KIND, kind),
            KeyValue::new(key::JOB_ATTEMPT, i64::from(rec.attempt)),
            KeyValue::new(key::JOB_OUTCOME, now.state.as_str()),
            self.node.clone(),
        ];
        if let JobKind::Inference { model, .. } = &rec.spec.kind {
            attributes.push(KeyValue::new(key::MODEL, model.clone()));
        }
        if let Some(code) = rec.exit_code {
            attributes.push(KeyValue::new(key::JOB_EXIT_CODE, i64::from(code)));
        }
        let mut span = self
            .tracer
            .span_builder("job.attempt")
            .with_kind(SpanKind::Internal)
            .with_start_time(epoch_ms(started_ms))
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        if matches!(
            now.state,
            JobState::Failed | JobState::RetryWait | JobState::TimedOut
        ) {
            span.set_status(Status::error(now.reason.clone()));
        }
        span.end_with_timestamp(epoch_ms(now.time_ms));
    }
}

/// When the backend call of a batch began and returned, as events of `span`.
fn backend_events(span: &mut impl opentelemetry::trace::Span, batch: &BatchTrace) {
    span.add_event_with_timestamp(
        "backend call started",
        batch.wall(batch.infer_start),
        Vec::new(),
    );
    span.add_event_with_timestamp(
        "backend call returned",
        batch.wall(batch.infer_end),
        Vec::new(),
    );
}

/// A span of ours, as the context of a link.
fn remote(r: SpanRef) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(r.trace_id),
        SpanId::from_bytes(r.span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

fn epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The wall-clock time of monotonic instants, read against one pair of readings taken now.
struct Clock {
    now: Instant,
    now_system: SystemTime,
}

impl Clock {
    fn now() -> Self {
        Clock {
            now: Instant::now(),
            now_system: SystemTime::now(),
        }
    }

    fn at(&self, instant: Instant) -> SystemTime {
        let ago = self.now.saturating_duration_since(instant);
        let ahead = instant.saturating_duration_since(self.now);
        (self.now_system - ago) + ahead
    }
}

/// An error kind as `error.type`.
fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
        ErrorKind::NotFound => "NOT_FOUND",
        ErrorKind::Unavailable => "UNAVAILABLE",
        ErrorKind::ResourceExhausted => "RESOURCE_EXHAUSTED",
        ErrorKind::DeadlineExceeded => "DEADLINE_EXCEEDED",
        ErrorKind::Internal => "INTERNAL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_map_onto_the_wall_clock_in_order() {
        let clock = Clock::now();
        let before = clock.now - Duration::from_millis(250);
        let after = clock.now + Duration::from_millis(5);
        assert_eq!(
            clock.now_system.duration_since(clock.at(before)).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            clock.at(after).duration_since(clock.now_system).unwrap(),
            Duration::from_millis(5)
        );
    }

    #[tokio::test]
    async fn an_endpoint_that_is_not_a_url_is_refused_by_name() {
        for bad in ["127.0.0.1:4317", "grpc://collector:4317", ""] {
            let e = Telemetry::start(bad).err().expect("refused");
            assert!(e.to_string().contains("--otlp-endpoint"), "{e}");
        }
    }
}
