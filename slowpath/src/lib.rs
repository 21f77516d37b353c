//! The slow path: heavy work that may take minutes to hours. Durable batch jobs (commands run as
//! local processes or Kubernetes pods, batch inference through the model registry) are admitted
//! by a scheduler under quotas and priorities and survive a restart of the coordinator.
//!
//! Invariants: this crate knows nothing of gRPC or the configuration file. A job is acknowledged
//! only once it is durable; every state change goes through [`job::JobState::transition`], so no
//! code path can move a job along an edge the lifecycle does not have.
//!
//! - [`job`]: the job specification with its validation and the job lifecycle.
//! - [`store`]: [`JobStore`], durable jobs over a `veraltheim_storage::Store`.
//! - [`scheduler`]: the admission decisions (queues, quotas, capacity, priority classes, weighted
//!   DRF between queues) and the retry policy, as pure logic.
//! - [`local`]: the local executor, a command job as a process group with its logs in files.
//! - [`runner`]: the three tied together in an async loop.

pub mod job;
pub mod local;
pub mod runner;
pub mod scheduler;
pub mod store;

pub use job::{JobError, JobSpec, JobState, Resources};
pub use local::{CommandRun, LocalExecutor, Outcome};
pub use runner::{Runner, RunnerConfig, RunnerError};
pub use scheduler::{QueueConfig, Quota, RetryPolicy, Scheduler, SchedulerConfig};
pub use store::{Change, FailureKind, JobRecord, JobStore, ListFilter, Observer, StoreError};
