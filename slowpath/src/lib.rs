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
//! - [`cluster`]: the node registry's data (what a node reports, its state from its lease);
//!   `postgres::nodes` keeps it in the shared database.
//! - [`backend`]: [`JobBackend`], what the runner needs of a job store, and [`AnyJobStore`].
//! - `postgres` (feature `postgres`): `PgJobStore`, durable jobs in a PostgreSQL database that
//!   several coordinators share.
//! - [`scheduler`]: the admission decisions (queues, quotas, capacity, priority classes, weighted
//!   DRF between queues) and the retry policy, as pure logic.
//! - [`gpu`]: [`GpuReservations`], the GPUs and GPU memory a job that asks for GPUs is given
//!   on this node (implemented by the coordinator over the model allocator), and the
//!   environment that names them to the job.
//! - [`executor`]: the [`Executor`] trait every executor implements (start, wait for the
//!   outcome, cancel, logs, adopt after a restart), and the outcomes that tell the job's own
//!   failures from the infrastructure's.
//! - [`local`]: the local executor, a command job as a process group with its logs in files.
//! - [`sandbox`]: what a local job may touch: its user and group, environment, folder,
//!   rlimits, allowed programs and cgroup.
//! - [`shim`]: the job shim, this binary again between the coordinator and a local job's
//!   program, which kills the job's process group when the coordinator dies.
//! - [`kubernetes`]: the Kubernetes executor, a `batch/v1` Job per attempt through `kube`, and
//!   (feature `fake-k8s`) the fake Kubernetes API server its tests run against.
//! - [`pressure`]: [`Pressure`], what the fast path tells the runner about the node's cores
//!   (the CPU it uses, whether a latency objective is at risk), and the rules the runner
//!   follows from it: the job CPU capacity it leaves, which jobs may be paused.
//! - [`runner`]: store, scheduler and an executor tied together in an async loop.

pub mod backend;
pub mod cluster;
pub mod executor;
pub mod gpu;
pub mod job;
pub mod kubernetes;
pub mod local;
mod logcap;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod pressure;
pub mod runner;
pub mod sandbox;
pub mod scheduler;
pub mod shim;
pub mod store;

pub use backend::{AnyJobStore, JobBackend};
pub use executor::{
    CommandRun, ExecError, Execution, Executor, InferenceExecutor, LogChunk, LogSource, LogStream,
    Outcome, ProgressFn,
};
pub use gpu::{GpuGrant, GpuReservations};
pub use job::{JobError, JobSpec, JobState, Owner, Resources};
pub use kubernetes::{KubernetesConfig, KubernetesExecutor, Toleration};
pub use local::LocalExecutor;
pub use pressure::Pressure;
pub use runner::{DRAINING, LiveCounts, Runner, RunnerConfig, RunnerError, RunnerOn};
pub use scheduler::{QueueConfig, Quota, RetryPolicy, Scheduler, SchedulerConfig};
pub use store::{Change, FailureKind, JobRecord, JobStore, ListFilter, Observer, StoreError};
