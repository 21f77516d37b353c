//! The slow path: heavy work that may take minutes to hours. Durable batch jobs (commands run as
//! local processes or Kubernetes pods, batch inference through the model registry) are admitted
//! by a scheduler under quotas and priorities and survive a restart of the coordinator.
//!
//! Invariants: this crate knows nothing of gRPC or the configuration file. A job is acknowledged
//! only once it is durable; every state change goes through [`job::JobState::transition`], so no
//! code path can move a job along an edge the lifecycle does not have.
//!
//! What is here now: the job specification with its validation and the job lifecycle. The
//! store, the scheduler and the executors build on them.

pub mod job;

pub use job::{JobError, JobSpec, JobState, Resources};
