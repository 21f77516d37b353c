//! Serving: the models a server knows and the one path an inference takes to them.
//!
//! - [`ModelManager`] owns every model's lifecycle — NOT_LOADED → LOADING → READY → UNLOADING,
//!   or FAILED — its placement on a device under the allocator's budgets (LRU eviction of idle,
//!   unpinned models), its load (bounded slots, a time-out that cannot overrun a budget or a
//!   slot, a measured memory charge) and its fast-path [`ModelWorker`](veraltheim_fastpath::ModelWorker).
//!   Workers run where its [`WorkerHost`] says: under the supervision tree in the server, on
//!   tasks of their own in tests ([`Detached`]).
//! - [`Inference`] is the one inference edge: resolve the model (loading it on demand),
//!   validate, answer from the [`ResponseCache`] or queue, await the answer within the deadline.
//! - [`Error`] is this crate's one error type; its [`ErrorKind`] is what protocols map to their
//!   statuses.
//!
//! Invariants (as absences): this crate knows nothing of gRPC, HTTP, the configuration file or
//! the supervision tree — configuration arrives as [`ManagerOptions`], the tree as a
//! [`WorkerHost`]. It sits above `fastpath` and `models` and below the coordinator.

mod cache;
mod error;
mod gauge;
mod host;
mod inference;
mod manager;

pub use cache::{Cached, ResponseCache};
pub use error::{Error, ErrorKind};
pub use gauge::{HostGauge, MemoryGauge};
pub use host::{Detached, WorkerHost};
pub use inference::{InferCall, Inference};
pub use manager::{
    BUILTIN_VERSION, InFlight, JobGpus, JobHeld, ManagerDeps, ManagerOptions, Measurement,
    MemoryCharge, ModelInfo, ModelManager, Placed, job_key,
};
