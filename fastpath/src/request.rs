use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use veraltheim_models::{Tensor, TokenCount};

/// One inference request, already validated against the model (inputs in model order).
#[derive(Debug)]
pub struct Request {
    pub id: String,
    pub inputs: Vec<Tensor>,
    /// Batch items this request carries (its first dimension; 1 for a non-batching model).
    pub rows: usize,
    /// Output names to return; empty returns all.
    pub outputs: Vec<String>,
    /// 1 is highest; 0 means the model's default level.
    pub priority: u32,
    /// Queue timeout asked by the client (KServe `timeout` parameter).
    pub timeout: Option<Duration>,
    /// The caller's own deadline (the gRPC deadline), enforced regardless of the queue policy.
    pub deadline: Option<Instant>,
    /// When the server received the request; end-to-end durations start here.
    pub received: Instant,
    /// The span this request runs under, when the server traces it: its batch then records a
    /// [`BatchTrace`] that links to it. `None` (no tracing) costs the batch nothing.
    pub span: Option<SpanRef>,
    /// Background work (a batch inference job's line): behind online requests, and under the
    /// model's controller when it has a latency objective (`crate::SloConfig`).
    pub background: bool,
    /// A text model's token count of this request, when the caller counted it already (off its
    /// async threads: [`crate::ModelWorker::count_tokens_of`]); `None`: `submit` counts it.
    pub tokens: Option<TokenCount>,
}

impl Request {
    pub fn new(inputs: Vec<Tensor>, rows: usize) -> Self {
        Request {
            id: String::new(),
            inputs,
            rows,
            outputs: Vec::new(),
            priority: 0,
            timeout: None,
            deadline: None,
            received: Instant::now(),
            span: None,
            background: false,
            tokens: None,
        }
    }
}

/// A span by its W3C ids, as the tracing layer above this crate names it. Nothing here makes
/// or exports spans: the fast path only records which traced requests shared a batch and when
/// its steps happened ([`BatchTrace`]), and the caller turns that into spans, off the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanRef {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// What an executed batch that held at least one traced request looked like: its instants
/// (read on the pool thread, where the statistics read them anyway) and the spans of the traced
/// requests it held. Built only for such batches, shared by their answers.
#[derive(Debug)]
pub struct BatchTrace {
    /// When the batch was taken off the queue (its requests' queue wait ends here).
    pub start: Instant,
    /// `start` on the wall clock (read once per traced batch), so that every request of the
    /// batch places its instants on the wall clock alike ([`BatchTrace::wall`]).
    pub started_at: SystemTime,
    /// When the backend call began (the inputs are assembled by then).
    pub infer_start: Instant,
    /// When the backend call returned.
    pub infer_end: Instant,
    /// When the outputs were split per request (the answers go back from here).
    pub done: Instant,
    /// Batch items executed (rows of all its requests).
    pub rows: usize,
    /// Requests in the batch, traced or not.
    pub requests: usize,
    /// The spans of the batch's traced requests, in batch order.
    pub links: Vec<SpanRef>,
    /// The batch's own span, once the first answer's receiver has made it; every other
    /// receiver finds it here (so there is one batch span, and each request can link to it).
    pub span: OnceLock<SpanRef>,
}

impl BatchTrace {
    pub(crate) fn new(
        [start, infer_start, infer_end, done]: [Instant; 4],
        rows: usize,
        requests: usize,
        links: Vec<SpanRef>,
    ) -> Arc<BatchTrace> {
        let (now, now_wall) = (Instant::now(), SystemTime::now());
        let started_at = now_wall
            .checked_sub(now.saturating_duration_since(start))
            .unwrap_or(now_wall);
        Arc::new(BatchTrace {
            start,
            started_at,
            infer_start,
            infer_end,
            done,
            rows,
            requests,
            links,
            span: OnceLock::new(),
        })
    }

    /// One of the batch's instants on the wall clock.
    pub fn wall(&self, instant: Instant) -> SystemTime {
        self.started_at + instant.saturating_duration_since(self.start)
    }
}

/// A successful result with where its time went.
#[derive(Debug, Clone)]
pub struct InferOutput {
    pub outputs: Vec<Tensor>,
    pub queue: Duration,
    pub compute: Duration,
    /// Batch items executed together with this request, its own included.
    pub batch_size: usize,
    /// The batch's instants and traced requests, when this request was traced
    /// ([`Request::span`]); `None` otherwise.
    pub batch: Option<Arc<BatchTrace>>,
}
