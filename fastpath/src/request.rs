use std::time::{Duration, Instant};

use veraltheim_models::Tensor;

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
        }
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
}
