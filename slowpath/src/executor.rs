//! What runs an attempt of a command job: the [`Executor`] trait, with two implementations —
//! the `local` module's `LocalExecutor` (a process group on this machine) and
//! the `kubernetes` module's `KubernetesExecutor` (a `batch/v1` Job per attempt).
//!
//! The runner drives every executor the same way: [`Executor::start`] an attempt, then
//! [`Execution::wait`] for its [`Outcome`] — cancelling through the token it passes — and, after a
//! restart of the coordinator, [`Executor::adopt`] the attempts that were running (where the
//! executor can find them again). [`Executor::logs`] streams an attempt's output.
//!
//! Outcomes tell the job's own failures (a non-zero exit code, a signal: counted against its
//! `max_retries`) from the infrastructure's ([`Outcome::Infrastructure`] — evicted, node lost,
//! image pull error — and [`ExecError`]s). An [`ExecError::Unavailable`] (API unreachable,
//! circuit breaker open) means nothing was started: the job waits and is not charged a failure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::job::{JobKind, JobSpec, Resources};

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command exited with this code (0: success; otherwise the job's own failure).
    Exited(i32),
    /// The command was ended by this signal, not by us (the job's own failure).
    Signalled(i32),
    /// Cancelled through the token given to [`Execution::wait`].
    Cancelled,
    /// The job's deadline passed and the attempt was stopped.
    TimedOut,
    /// The infrastructure ended the attempt, not the command: pod evicted, node lost, image
    /// pull error, the Job deleted behind our back. Says what happened, for people.
    Infrastructure(String),
    /// In-process work (a batch inference job) failed on its own terms: an unknown model, an
    /// unreadable input. The job's own failure, with the reason for people.
    Failed(String),
}

/// How far a job has come: (done, total) units of work, e.g. lines of an inference job's input.
pub type ProgressFn = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Runs batch inference jobs in this process (the coordinator implements it over its model
/// manager, so that the jobs go through the same queues as online requests, behind them).
pub trait InferenceExecutor: Send + Sync + 'static {
    /// Starts an attempt of inference job `job_id`; `progress` is called as it advances.
    fn start(
        &self,
        job_id: &str,
        spec: &JobSpec,
        progress: ProgressFn,
    ) -> Result<Box<dyn Execution>, ExecError>;
}

/// Failures of the executor itself; every one is an infrastructure failure, never the job's.
#[derive(Debug, Error)]
pub enum ExecError {
    #[error("the command is empty")]
    EmptyCommand,
    #[error("cannot create the log file {path}: {source}")]
    Logs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start '{program}': {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the command failed: {0}")]
    Wait(#[source] std::io::Error),
    /// The executor's backend cannot be reached now (API down, answering 5xx, circuit breaker
    /// open). Nothing was started; try again after `retry_after` (when known).
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The backend refused the attempt for good (an invalid object, no permission, a name
    /// taken by something else): starting it again would fail the same way.
    #[error("{0}")]
    Rejected(String),
    /// Anything else that went wrong in the backend.
    #[error("{0}")]
    Backend(String),
}

impl ExecError {
    /// When the backend is unavailable, how long to wait (if it said).
    pub fn unavailable(&self) -> Option<Option<Duration>> {
        match self {
            ExecError::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether trying again cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ExecError::Rejected(_) | ExecError::EmptyCommand)
    }
}

/// One attempt of a command job, as an executor sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandRun {
    pub job_id: String,
    /// The job's name (Kubernetes: a label on the Job).
    pub job_name: String,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// The container image (Kubernetes); the local executor ignores it.
    pub image: String,
    /// Program and arguments.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Empty: the executor's default (local: the job's own folder; Kubernetes: the image's).
    pub working_dir: String,
    /// Kubernetes: a writable root filesystem (read-only otherwise); the local executor ignores
    /// it.
    pub writable_root: bool,
    /// What the job holds while it runs (Kubernetes: requests and limits).
    pub resources: Resources,
    /// The attempt ends as [`Outcome::TimedOut`] after this long, the time it was paused not
    /// counted ([`Execution::wait_pausable`]).
    pub deadline: Option<Duration>,
}

impl CommandRun {
    /// Attempt `attempt` of a command job; `None` for a job of another kind.
    pub fn of(job_id: &str, spec: &JobSpec, attempt: u32) -> Option<CommandRun> {
        let JobKind::Command {
            image,
            command,
            env,
            working_dir,
            writable_root,
        } = &spec.kind
        else {
            return None;
        };
        Some(CommandRun {
            job_id: job_id.to_owned(),
            job_name: spec.name.clone(),
            attempt,
            image: image.clone(),
            command: command.clone(),
            env: env.clone(),
            working_dir: working_dir.clone(),
            writable_root: *writable_root,
            resources: spec.resources.clone(),
            deadline: spec.deadline_seconds.map(Duration::from_secs),
        })
    }
}

/// Which output a [`LogChunk`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSource {
    Stdout,
    Stderr,
    /// Both interleaved, as Kubernetes' pod log API gives them.
    Combined,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
            LogSource::Combined => "combined",
        }
    }
}

/// A piece of an attempt's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    pub source: LogSource,
    pub data: Vec<u8>,
}

/// An attempt's output as it comes.
pub type LogStream = BoxStream<'static, Result<LogChunk, ExecError>>;

/// Runs attempts of command jobs. See the module documentation.
pub trait Executor: Send + Sync + 'static {
    /// A short name: `local`, `kubernetes`.
    fn name(&self) -> &'static str;

    /// Refuses, at submit time, a job this executor can never run (e.g. no image on
    /// Kubernetes), saying why.
    fn check(&self, _spec: &JobSpec) -> Result<(), String> {
        Ok(())
    }

    /// Why nothing should be started now (the backend is known to be down), if so; the runner
    /// then admits nothing and shows this as the reason jobs wait.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// Starts attempt `run`. Where the backend can tell that this very attempt exists already
    /// (an answer lost to a fault, a coordinator that died between starting it and recording
    /// so), it attaches to it instead of starting it twice.
    fn start<'a>(
        &'a self,
        run: &'a CommandRun,
    ) -> BoxFuture<'a, Result<Box<dyn Execution>, ExecError>>;

    /// Whether [`Executor::adopt`] can find attempts that an earlier coordinator process
    /// started. When false, a job that was running at a restart runs again (at least once).
    fn adopts(&self) -> bool {
        false
    }

    /// After a restart: attempt `run.attempt` of job `run.job_id`, if the backend still has it
    /// (running or finished); `None` if it is gone, so the job must run again.
    fn adopt<'a>(
        &'a self,
        run: &'a CommandRun,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Execution>>, ExecError>> {
        let _ = run;
        Box::pin(async { Ok(None) })
    }

    /// Attempt `attempt`'s output so far and, with `follow`, what comes until it ends. An
    /// attempt not started (or no longer known) has no output: the stream ends at once.
    fn logs(&self, job_id: &str, attempt: u32, follow: bool) -> LogStream;

    /// The folder on this machine holding a job's files (its logs), deleted with the job;
    /// `None` when the executor keeps nothing here.
    fn log_dir(&self, job_id: &str) -> Option<PathBuf> {
        let _ = job_id;
        None
    }
}

/// A started (or adopted) attempt.
pub trait Execution: Send {
    /// Says where it runs, for people ("process group 4242", "Kubernetes Job ns/name").
    fn describe(&self) -> String;

    /// Waits for the attempt's end. When `cancel` fires, the executor stops the attempt (local:
    /// kills its process group; Kubernetes: deletes the Job with foreground propagation) and
    /// returns [`Outcome::Cancelled`]; past the deadline it stops it as [`Outcome::TimedOut`].
    fn wait(
        self: Box<Self>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<Outcome, ExecError>>;

    /// Whether [`Execution::wait_pausable`] can pause this attempt: a local process group can
    /// (SIGSTOP); a Kubernetes pod and in-process work cannot.
    fn can_pause(&self) -> bool {
        false
    }

    /// [`Execution::wait`], pausing the attempt while `paused` holds `true` and resuming it
    /// when it turns `false` (or its sender goes). The deadline counts the time the attempt
    /// ran, not the time it was paused: it moves later by each pause. A cancel or the deadline
    /// stops a paused attempt as a running one. The default, for an attempt that cannot pause,
    /// ignores `paused`.
    fn wait_pausable(
        self: Box<Self>,
        cancel: CancellationToken,
        paused: tokio::sync::watch::Receiver<bool>,
    ) -> BoxFuture<'static, Result<Outcome, ExecError>> {
        let _ = paused;
        self.wait(cancel)
    }
}
