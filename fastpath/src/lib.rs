//! The fast path: latency-sensitive inference. Each loaded model gets a [`ModelWorker`]: a
//! bounded queue that is lock-free on the submit side, a dynamic batcher with Triton's rules, and
//! execution of whole batches on a shared rayon [`ExecutionPool`]. Requests carry their deadline;
//! an expired or abandoned request is dropped before compute.
//!
//! Invariants: this crate knows nothing of gRPC or jobs. Model code never runs on a tokio worker
//! thread: the batcher task only does bookkeeping and hands batches to the pool. A full queue
//! refuses at once; nothing here grows without bound.

mod batcher;
mod error;
mod pool;
mod priority;
mod queue;
mod request;
mod slo;
mod stats;
mod worker;

pub use batcher::{BatchPolicy, Item, Plan, check_length_parameters};
pub use error::InferError;
pub use pool::ExecutionPool;
pub use priority::{LevelPolicy, PriorityPolicy, order as priority_order};
pub use request::{BatchTrace, InferOutput, Request, SpanRef};
pub use slo::{
    BatchCost, Controller, CostFit, Decision, Observation, SloConfig, SloSnapshot,
    background_levels,
};
pub use stats::{BatchStat, DurationStat, LatencyBuckets, ModelStats, Percentiles, StatsSnapshot};
pub use worker::{
    DEFAULT_BATCHER_BELOW, DEFAULT_INLINE_BELOW, DEFAULT_INLINE_MIN_GAP, INLINE_STREAK,
    INLINE_TOKEN_COUNT_BYTES, ModelWorker, WorkerFailure, WorkerOptions, batcher_bound,
    inline_bound, inline_min_gap,
};
