//! The runner: the job store, the scheduler and an [`Executor`] (local processes or Kubernetes
//! Jobs) tied together.
//!
//! [`Runner::start`] recovers the live jobs from the store ([`JobStore::recover`]); then
//! [`Runner::run`] loops: it moves RETRY_WAIT jobs whose time has come back to QUEUED, asks the
//! scheduler for admissions within the free slots (`max_running`), writes ADMITTED, and starts a
//! task per admitted job that starts the attempt ([`Executor::start`]), writes RUNNING, waits for
//! the attempt and writes the outcome: SUCCEEDED, CANCELLED, TIMED_OUT, or on failure RETRY_WAIT
//! (backoff from the [`RetryPolicy`]) or FAILED. Failures are counted apart: the job's own
//! (an exit code, a signal) against its `max_retries`, the infrastructure's (evicted, node lost,
//! image pull error, an executor error) against the policy's `max_infra_retries`. An executor
//! that cannot be reached ([`ExecError::Unavailable`]: API down, circuit breaker open) costs the
//! job nothing: it waits in RETRY_WAIT with that reason, and while the executor says it is
//! unavailable ([`Executor::unavailable`]) nothing is admitted and waiting jobs show why.
//! The loop sleeps on a [`tokio::sync::Notify`] (woken by a submit, a cancel or a job's end) or
//! until the next retry is due.
//!
//! A job's `deadline_seconds` bounds each attempt, from its start. Inference jobs are not run by
//! this runner yet: they fail at admission, saying so. When [`Runner::run`] stops, the jobs
//! still running stay RUNNING in the store. At the next start, an executor that adopts
//! ([`Executor::adopts`]: Kubernetes) is asked for each one's attempt ([`Executor::adopt`]): one
//! still there is waited for again, not rerun; one that is gone, and every job of an executor
//! that does not adopt (local), runs again — commands run at least once.
//!
//! The loop also deletes finished jobs whose `ttl_seconds_after_finished` ran out
//! ([`JobStore::delete_expired`]) with their log folders, waking when the next one expires.
//! The record goes first and its folder just after, so a reader can briefly find a job gone
//! while its folder is still there; never the other way round.
//!
//! With [`GpuReservations`] ([`RunnerOn::with_gpu_reservations`]; the coordinator gives them to
//! a runner of local jobs), a job that asks for GPUs is admitted only once it holds GPU memory,
//! is told its devices in its environment, and frees them when its attempt ends: the rules are
//! the `gpu` module's.
//!
//! **Pressure** ([`RunnerOn::with_pressure`], see [`crate::pressure`]): while [`RunnerOn::run`]
//! runs, a task follows the fast path's [`Pressure`]. On a single node, the scheduler's CPU
//! capacity for admission is the configured one less the fast path's use (never below the
//! floor), and jobs that wait for it say so; running jobs are never stopped for it. In a
//! cluster the leader places against each node's registered capacity: each node registers
//! [`RunnerOn::job_cpu_capacity`], its capacity less its own fast path's use, at each renewal
//! of its lease. While [`Pressure::at_risk`] is set, every running attempt that can be
//! paused ([`Execution::can_pause`]: local command jobs; not Kubernetes pods, not inference
//! jobs, which the fast path's own controller governs) of a job that may be paused
//! ([`crate::pressure::pausable`]) is paused, and resumed once it clears, at most one such
//! change every [`MIN_PAUSE_FLIP`]. An attempt that starts while it is set is paused as soon
//! as it runs (RUNNING is written). Each
//! pause and resume is marked in the job's record ([`JobBackend::mark_paused`]: its state stays
//! RUNNING) and told to the pause observer ([`RunnerOn::with_pause_observer`]: the
//! coordinator's `jobs.<id>.paused` / `jobs.<id>.resumed` events). The attempt's deadline does
//! not count the time paused. When the loop stops, every paused attempt is resumed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
#[cfg(test)]
use veraltheim_storage::Store;

use crate::backend::JobBackend;
use crate::cluster::LeaderFence;
use crate::executor::{
    CommandRun, ExecError, Execution, Executor, InferenceExecutor, Outcome, ProgressFn,
};
use crate::gpu::{GPU_RETRY, GpuGrant, GpuReservations, visible_devices};
use crate::job::{JobSpec, JobState};
use crate::pressure::{MIN_PAUSE_FLIP, Pressure, job_cpu_capacity, lowered_note, pausable};
use crate::scheduler::{
    Jitter, NO_SLOT, Pending, RetryDecision, RetryPolicy, SchedError, Scheduler, SchedulerConfig,
};
use crate::store::{Change, FailureKind, JobRecord, JobStore, Placement, StoreError};

mod cluster;
pub use cluster::ClusterSelf;
#[cfg(test)]
mod pressure_tests;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerConfig {
    pub scheduler: SchedulerConfig,
    pub retry: RetryPolicy,
    /// Most jobs admitted or running at once; at least 1.
    pub max_running: usize,
    /// Seed of the retry jitter.
    pub jitter_seed: u64,
}

#[derive(Debug, Error)]
pub enum RunnerError {
    #[error(transparent)]
    Schedule(#[from] SchedError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The executor can never run this job (e.g. no image on Kubernetes).
    #[error("job can never run on the {executor} executor: {reason}")]
    Rejected {
        executor: &'static str,
        reason: String,
    },
}

/// The change that records a failed attempt (`what` happened, of `failure`'s kind): RETRY_WAIT
/// until the policy's time, or FAILED when it gives up, with its reason.
fn failed_attempt(
    decision: &RetryDecision,
    failure: FailureKind,
    exit_code: Option<i32>,
    what: &str,
) -> Change {
    let (to, reason, retry_at_ms) = match decision {
        RetryDecision::RetryAt { at_ms, reason } => (JobState::RetryWait, reason, Some(*at_ms)),
        RetryDecision::GiveUp { reason } => (JobState::Failed, reason, None),
    };
    Change {
        exit_code,
        failure: Some(failure),
        retry_at_ms,
        ..Change::to(to, format!("{what}; {reason}"))
    }
}

/// The waiting reason of the jobs a drained runner holds back ([`RunnerOn::set_draining`]).
pub const DRAINING: &str = "this node is draining: it starts no new job";

/// Most expired jobs deleted in one commit; more wait for the next turn of the loop.
const SWEEP_BATCH: usize = 256;

struct State {
    sched: Scheduler,
    /// Admitted or running jobs and their cancel tokens.
    running: HashMap<String, CancellationToken>,
    /// RETRY_WAIT jobs by (due time, id).
    retries: BTreeSet<(u64, String)>,
    reasons: HashMap<String, String>,
    /// QUEUED jobs the scheduler cannot take under this configuration, with why.
    parked: HashMap<String, String>,
    jitter: Jitter,
    // In a cluster (see `cluster.rs`):
    /// The leadership this runner holds, if it leads.
    leader: Option<LeaderFence>,
    /// As leader: where each admitted job is placed (`None`: a job admitted before the
    /// cluster, placed nowhere: an orphan).
    placements: HashMap<String, Option<Placement>>,
    /// The live nodes' processes, by node (as last set).
    members: HashMap<String, String>,
    /// What the live nodes that admit offer jobs (as last set).
    node_caps: Vec<crate::scheduler::NodeCapacity>,
    /// The placements of the attempts running here.
    here: HashMap<String, Placement>,
    /// Attempts stopped here because this node's lease ran out (not cancelled by anyone).
    lease_stopped: HashSet<String>,
    /// The GPUs each admitted or running job holds here (with [`GpuReservations`]).
    gpus: HashMap<String, GpuGrant>,
    /// The running attempts that may be paused: whether each should be paused now.
    pausable: HashMap<String, tokio::sync::watch::Sender<bool>>,
    /// Why running jobs are paused now (the pressure's `at_risk` as last applied).
    at_risk: Option<String>,
}

impl State {
    /// Takes the RETRY_WAIT jobs due by `now` out of waiting, in due order.
    fn take_due(&mut self, now: u64) -> Vec<String> {
        let due: Vec<_> = self
            .retries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .cloned()
            .collect();
        for d in &due {
            self.retries.remove(d);
        }
        due.into_iter().map(|(_, id)| id).collect()
    }

    /// Puts a QUEUED job in line, or parks it with the scheduler's reason.
    fn enqueue(&mut self, rec: &JobRecord) {
        match self.sched.enqueue(pending(rec)) {
            Ok(()) | Err(SchedError::Duplicate(_)) => {}
            Err(e) => {
                tracing::warn!(job = %rec.id, reason = %e, "job parked");
                self.parked.insert(rec.id.clone(), e.to_string());
            }
        }
    }
}

struct Inner<B> {
    store: B,
    exec: Arc<dyn Executor>,
    /// Runs inference jobs; without one they fail, saying so.
    inference: Option<Arc<dyn InferenceExecutor>>,
    /// Progress of running jobs that report it: (done, total).
    progress: Mutex<HashMap<String, (u64, u64)>>,
    retry: RetryPolicy,
    max_running: usize,
    /// Set while this node is drained ([`RunnerOn::set_draining`]): nothing new is admitted.
    draining: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    wake: Notify,
    /// This node in a cluster; `None` on a single node, which leads itself.
    cluster: Option<ClusterSelf>,
    /// What the scheduler was made of (a new leader makes its own from it).
    sched_config: SchedulerConfig,
    /// In a cluster: until when this node may run attempts (its lease, less a margin); `None`
    /// until it has one.
    lease_until: Mutex<Option<tokio::time::Instant>>,
    /// Where jobs that ask for GPUs get them on this node; unset: GPUs are only counted.
    gpu: std::sync::OnceLock<Arc<dyn GpuReservations>>,
    /// The fast path's pressure, followed while [`RunnerOn::run`] runs
    /// ([`RunnerOn::with_pressure`]).
    pressure: Mutex<Option<tokio::sync::watch::Receiver<Pressure>>>,
    /// The least CPU capacity (millis) the fast path's use leaves jobs.
    cpu_floor_millis: std::sync::atomic::AtomicU64,
    /// The CPU capacity (millis) jobs are admitted against now on this node.
    cpu_capacity_now: std::sync::atomic::AtomicU64,
    /// Told of each pause and resume ([`RunnerOn::with_pause_observer`]).
    on_pause: Mutex<Option<PauseObserver>>,
}

/// Told of a job's pause or resume, with the job as marked: paused when
/// `rec.pauses.is_paused()`, resumed otherwise.
pub type PauseObserver = Arc<dyn Fn(&JobRecord) + Send + Sync>;

/// Live jobs by state ([`Runner::live_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    /// QUEUED: in line, or parked (the configuration cannot take them now).
    pub queued: usize,
    /// ADMITTED or RUNNING: holding their resources.
    pub running: usize,
    /// RETRY_WAIT: waiting for their next attempt.
    pub retry_wait: usize,
}

/// See the module documentation. Cheap to clone. Runs over any [`JobBackend`]; [`Runner`] is
/// the runner over the key-value [`JobStore`] (the single-node default).
pub struct RunnerOn<B> {
    inner: Arc<Inner<B>>,
}

/// The runner over a key-value [`JobStore`] on `S`.
pub type Runner<S> = RunnerOn<JobStore<S>>;

impl<B> Clone for RunnerOn<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

fn pending(rec: &JobRecord) -> Pending {
    Pending {
        id: rec.id.clone(),
        queue: rec.spec.queue.clone(),
        priority_class: rec.spec.priority_class.clone(),
        resources: rec.spec.resources.clone(),
        // Quotas are each tenant's own in a queue (see the scheduler).
        tenant: rec
            .spec
            .owner
            .as_ref()
            .map(|o| o.tenant.clone())
            .unwrap_or_default(),
    }
}

impl<B: JobBackend> RunnerOn<B> {
    /// A runner over `store` whose attempts `exec` runs.
    pub fn new(store: B, exec: impl Executor, config: RunnerConfig) -> Result<Self, RunnerError> {
        Self::with_executors(store, Arc::new(exec), None, config)
    }

    /// [`Runner::new`] with an executor shared with others (e.g. the API, for logs), and what
    /// runs inference jobs (the coordinator's in-process batch inference), if anything.
    pub fn with_executors(
        store: B,
        exec: Arc<dyn Executor>,
        inference: Option<Arc<dyn InferenceExecutor>>,
        config: RunnerConfig,
    ) -> Result<Self, RunnerError> {
        Self::build(store, exec, inference, config, None)
    }

    fn build(
        store: B,
        exec: Arc<dyn Executor>,
        inference: Option<Arc<dyn InferenceExecutor>>,
        config: RunnerConfig,
        cluster: Option<ClusterSelf>,
    ) -> Result<Self, RunnerError> {
        let sched_config = config.scheduler.clone();
        let mut sched = Scheduler::new(config.scheduler)?;
        if cluster.is_some() {
            // Nothing is placed until the live nodes are known.
            sched.set_nodes(Vec::new());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                exec,
                inference,
                progress: Mutex::new(HashMap::new()),
                retry: config.retry,
                max_running: config.max_running.max(1),
                draining: std::sync::atomic::AtomicBool::new(false),
                state: Mutex::new(State {
                    sched,
                    running: HashMap::new(),
                    retries: BTreeSet::new(),
                    reasons: HashMap::new(),
                    parked: HashMap::new(),
                    jitter: Jitter::new(config.jitter_seed),
                    leader: None,
                    placements: HashMap::new(),
                    members: HashMap::new(),
                    node_caps: Vec::new(),
                    here: HashMap::new(),
                    lease_stopped: HashSet::new(),
                    gpus: HashMap::new(),
                    pausable: HashMap::new(),
                    at_risk: None,
                }),
                wake: Notify::new(),
                cluster,
                lease_until: Mutex::new(None),
                gpu: std::sync::OnceLock::new(),
                pressure: Mutex::new(None),
                cpu_floor_millis: std::sync::atomic::AtomicU64::new(0),
                cpu_capacity_now: std::sync::atomic::AtomicU64::new(
                    sched_config.capacity.cpu_millis,
                ),
                on_pause: Mutex::new(None),
                sched_config,
            }),
        })
    }

    /// Gives the jobs that ask for GPUs their devices and memory through `gpus` (see the `gpu`
    /// module). Set once, before [`RunnerOn::start`]; a second call changes nothing.
    pub fn with_gpu_reservations(self, gpus: Arc<dyn GpuReservations>) -> Self {
        if self.inner.gpu.set(gpus).is_err() {
            tracing::warn!("GPU reservations were already set; the second ones are ignored");
        }
        self
    }

    /// The GPUs (inventory indices) job `id` holds here while it is admitted or running; empty
    /// when it holds none (or the runner has no [`GpuReservations`]).
    pub fn gpus_of(&self, id: &str) -> Vec<u32> {
        self.inner
            .state
            .lock()
            .gpus
            .get(id)
            .map(|g| g.gpus.clone())
            .unwrap_or_default()
    }

    /// Every admitted or running job here that holds GPUs, with them, by job id.
    pub fn gpu_jobs(&self) -> Vec<(String, Vec<u32>)> {
        let state = self.inner.state.lock();
        let mut jobs: Vec<(String, Vec<u32>)> = state
            .gpus
            .iter()
            .filter(|(_, g)| !g.gpus.is_empty())
            .map(|(id, g)| (id.clone(), g.gpus.clone()))
            .collect();
        jobs.sort();
        jobs
    }

    pub fn store(&self) -> &B {
        &self.inner.store
    }

    /// Follows the fast path's `pressure` (see the module documentation) once [`RunnerOn::run`]
    /// runs; the job CPU capacity it leaves is never below `cpu_floor_millis`.
    pub fn with_pressure(
        self,
        pressure: tokio::sync::watch::Receiver<Pressure>,
        cpu_floor_millis: u64,
    ) -> Self {
        *self.inner.pressure.lock() = Some(pressure);
        self.inner
            .cpu_floor_millis
            .store(cpu_floor_millis, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Tells `observer` of every pause and resume of a job (see [`PauseObserver`]).
    pub fn with_pause_observer(self, observer: PauseObserver) -> Self {
        *self.inner.on_pause.lock() = Some(observer);
        self
    }

    /// The CPU capacity (millis) jobs are admitted against on this node now: the configured
    /// one, less what the fast path uses when the runner follows its pressure (in a cluster:
    /// what the node registers for the leader to place against).
    pub fn job_cpu_capacity(&self) -> u64 {
        self.inner
            .cpu_capacity_now
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why running jobs are paused now, if they are.
    pub fn paused_for(&self) -> Option<String> {
        self.inner.state.lock().at_risk.clone()
    }

    /// Running attempts on this node that are paused now (SIGSTOP while an objective is at risk).
    pub fn paused_count(&self) -> usize {
        let state = self.inner.state.lock();
        if state.at_risk.is_some() {
            state.pausable.len()
        } else {
            0
        }
    }

    /// The executor that runs the attempts.
    pub fn executor(&self) -> &Arc<dyn Executor> {
        &self.inner.exec
    }

    /// Takes up the live jobs of the store; call once, before [`Runner::run`]. A recovered job
    /// the scheduler can no longer take (its queue or class left the configuration, or it asks
    /// for more than the new quota or capacity) stays QUEUED, out of line, with that reason
    /// ([`Runner::waiting_reason`]) until it is cancelled or the configuration takes it back.
    ///
    /// With an executor that adopts, a job that was RUNNING keeps its resources and a task asks
    /// the executor for its attempt (retrying while the executor is unreachable): found, it is
    /// waited for as if never interrupted; gone, the job goes back in line (RETRY_WAIT, not
    /// counted as a failure).
    pub async fn start(&self) -> Result<(), RunnerError> {
        if self.inner.cluster.is_some() {
            // A node of a cluster takes up nothing by itself: the leader places the work, and
            // treats what was placed on this node's earlier process as lost.
            return Ok(());
        }
        let adopts = self.inner.exec.adopts();
        let live = if adopts {
            self.inner.store.recover_adopting().await?
        } else {
            self.inner.store.recover().await?
        };
        for rec in live {
            match rec.state {
                JobState::RetryWait => {
                    let at = rec.retry_at_ms.unwrap_or(0);
                    self.inner.state.lock().retries.insert((at, rec.id));
                }
                JobState::Running if adopts => {
                    {
                        let mut state = self.inner.state.lock();
                        if let Err(e) = state.sched.adopt(&pending(&rec)) {
                            tracing::warn!(job = %rec.id, error = %e, "cannot hold an adopted job's resources");
                        }
                        state
                            .running
                            .insert(rec.id.clone(), CancellationToken::new());
                    }
                    let runner = self.clone();
                    tokio::spawn(async move { runner.resume_job(rec).await });
                }
                _ => self.inner.state.lock().enqueue(&rec),
            }
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Checks `spec` against the scheduler (unknown queue or class, more than quota or
    /// capacity), stores it durably and puts it in line.
    pub async fn submit(&self, spec: JobSpec) -> Result<JobRecord, RunnerError> {
        self.submit_traced(spec, None).await
    }

    /// [`Runner::submit`], keeping the caller's W3C `traceparent` with the job (its attempts'
    /// spans continue that trace).
    pub async fn submit_traced(
        &self,
        spec: JobSpec,
        traceparent: Option<String>,
    ) -> Result<JobRecord, RunnerError> {
        self.inner
            .exec
            .check(&spec)
            .map_err(|reason| RunnerError::Rejected {
                executor: self.inner.exec.name(),
                reason,
            })?;
        self.inner
            .state
            .lock()
            .sched
            .check(&spec.queue, &spec.priority_class, &spec.resources)?;
        if let Some(gpu) = self.inner.gpu.get()
            && self.inner.cluster.is_none()
            && spec.resources.gpus > 0
        {
            gpu.check(spec.resources.gpus, spec.resources.gpu_memory_bytes)
                .map_err(SchedError::NeverFits)?;
        }
        let rec = self.inner.store.submit_traced(spec, traceparent).await?;
        if rec.state == JobState::Queued && rec.history.len() == 1 && self.leads() {
            let mut state = self.inner.state.lock();
            match state.sched.enqueue(pending(&rec)) {
                // A repeated submit (same idempotency key) finds the job already in line.
                Ok(()) | Err(SchedError::Duplicate(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.inner.wake.notify_one();
        Ok(rec)
    }

    /// Cancels a job: a waiting one at once, a running one by killing its process (its task
    /// then writes CANCELLED). Returns the job as it is after the cancel was asked.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord, RunnerError> {
        let running = {
            let mut state = self.inner.state.lock();
            state.sched.remove(id);
            state.retries.retain(|(_, r)| r != id);
            state.reasons.remove(id);
            state.parked.remove(id);
            state.running.get(id).cloned()
        };
        let rec = match running {
            Some(token) => {
                token.cancel();
                self.inner.store.get(id).await?
            }
            // Another node may run it: it is asked to stop.
            None if self.inner.cluster.is_some() => self.inner.store.request_cancel(id).await?,
            None => {
                self.inner
                    .store
                    .transition(id, JobState::Cancelled, "cancelled")
                    .await?
            }
        };
        self.inner.wake.notify_one();
        Ok(rec)
    }

    /// How many live jobs are in each live state now, from the runner's own bookkeeping (no
    /// store read): for `/metrics`.
    pub fn live_counts(&self) -> LiveCounts {
        let state = self.inner.state.lock();
        LiveCounts {
            queued: state.sched.waiting_len() + state.parked.len(),
            running: state.running.len(),
            retry_wait: state.retries.len(),
        }
    }

    /// Drains this runner (`true`) or lets it take work again (`false`). While drained it
    /// admits nothing: jobs submitted or queued again after a backoff stay QUEUED with the
    /// reason [`DRAINING`]; the jobs already admitted or running go on to their end.
    pub fn set_draining(&self, draining: bool) {
        let was = self
            .inner
            .draining
            .swap(draining, std::sync::atomic::Ordering::AcqRel);
        if was != draining {
            tracing::info!(
                draining,
                "job admission {}",
                if draining {
                    "stopped: this node is draining"
                } else {
                    "resumed"
                }
            );
            self.inner.wake.notify_one();
        }
    }

    /// Whether this runner is drained ([`RunnerOn::set_draining`]).
    pub fn is_draining(&self) -> bool {
        self.inner
            .draining
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Why a waiting job waits, as of the last scheduling round.
    pub fn waiting_reason(&self, id: &str) -> Option<String> {
        let state = self.inner.state.lock();
        // Queue heads' reasons from the last round; the jobs behind them, from the scheduler.
        state
            .parked
            .get(id)
            .or_else(|| state.reasons.get(id))
            .cloned()
            .or_else(|| state.sched.waiting_reason(id))
            .or_else(|| {
                // In a cluster only the leader schedules, and knows why a job waits.
                (self.inner.cluster.is_some() && state.leader.is_none()).then(|| {
                    "waiting for the scheduler leader to place it (the leader's node says why it waits)"
                        .to_string()
                })
            })
    }

    /// The scheduling loop; returns when `shutdown` is cancelled.
    pub async fn run(&self, shutdown: CancellationToken) {
        // A clone: a loop started again (its supervisor restarted it) follows it again.
        let pressure = self.inner.pressure.lock().clone();
        let follower = pressure.map(|rx| {
            let runner = self.clone();
            let stop = shutdown.child_token();
            (
                stop.clone(),
                tokio::spawn(async move { runner.follow_pressure(rx, stop).await }),
            )
        });
        if self.inner.cluster.is_some() {
            self.run_cluster(shutdown).await;
        } else {
            self.run_single(shutdown).await;
        }
        if let Some((stop, task)) = follower {
            stop.cancel();
            let _ = task.await;
        }
    }

    /// The single node's loop.
    async fn run_single(&self, shutdown: CancellationToken) {
        loop {
            let next_retry = match self.round().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, "scheduling round failed; trying again");
                    Some(self.inner.store.now_ms() + 1_000)
                }
            };
            let next_expiry = self.sweep_expired(false).await;
            let next_retry = match (next_retry, next_expiry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = next_retry.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis(at.saturating_sub(self.inner.store.now_ms()))
            });
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Deletes the finished jobs whose TTL ran out, and their log folders; returns when the
    /// next one expires. A failure is logged and tried again a second later.
    async fn sweep_expired(&self, force: bool) -> Option<u64> {
        let store = &self.inner.store;
        let now = store.now_ms();
        if !force && store.next_expiry_ms().is_none_or(|at| at > now) {
            return store.next_expiry_ms();
        }
        match store.delete_expired(now, SWEEP_BATCH).await {
            Ok(expired) => {
                for id in &expired.deleted {
                    // Ids come from the store's own keys (20 digits), never a path.
                    let Some(dir) = self.inner.exec.log_dir(id) else {
                        continue;
                    };
                    match tokio::fs::remove_dir_all(&dir).await {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            tracing::warn!(job = %id, dir = %dir.display(), error = %e, "cannot delete an expired job's logs");
                        }
                        _ => {}
                    }
                }
                if !expired.deleted.is_empty() {
                    tracing::info!(
                        jobs = expired.deleted.len(),
                        "deleted finished jobs past their TTL"
                    );
                }
                expired.next_ms
            }
            Err(e) => {
                tracing::warn!(error = %e, "expired jobs could not be deleted; trying again");
                Some(now + 1_000)
            }
        }
    }

    /// One round; returns when the next retry is due.
    async fn round(&self) -> Result<Option<u64>, RunnerError> {
        let inner = &self.inner;
        let now = inner.store.now_ms();
        let due = inner.state.lock().take_due(now);
        for id in due {
            // One job's failure to move on (cancelled meanwhile, a store error) must not hold
            // back the others: each is handled on its own.
            let rec = match inner
                .store
                .transition(&id, JobState::Queued, "queued again after backoff")
                .await
            {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "a retry could not be queued");
                    continue;
                }
            };
            inner.state.lock().enqueue(&rec);
        }
        // An executor known to be down (its circuit breaker open) gets nothing to start: the
        // jobs that would go wait with its reason, and the loop looks again in a second.
        let unavailable = inner.exec.unavailable();
        let unavailable = match unavailable {
            None if self.is_draining() => Some(DRAINING.to_string()),
            other => other,
        };
        let mut gpu_refused = false;
        let admitted = {
            let mut state = inner.state.lock();
            let slots = match &unavailable {
                Some(_) => 0,
                None => inner.max_running.saturating_sub(state.running.len()),
            };
            let decision = match inner.gpu.get() {
                None => state.sched.schedule_at_most(slots),
                // A job that asks for GPUs is admitted once it holds their memory.
                Some(gpu) => {
                    let mut grants = Vec::new();
                    let decision = state.sched.schedule_gated(slots, &mut |job: &Pending| {
                        if job.resources.gpus == 0 {
                            return Ok(());
                        }
                        match gpu.reserve(
                            &job.id,
                            job.resources.gpus,
                            job.resources.gpu_memory_bytes,
                        ) {
                            Ok(grant) => {
                                grants.push((job.id.clone(), grant));
                                Ok(())
                            }
                            Err(why) => {
                                gpu_refused = true;
                                Err(why)
                            }
                        }
                    });
                    state.gpus.extend(grants);
                    decision
                }
            };
            state.reasons = decision
                .waiting
                .into_iter()
                .map(|(id, reason)| match &unavailable {
                    Some(why) if reason == NO_SLOT => (id, why.clone()),
                    _ => (id, reason),
                })
                .collect();
            for job in &decision.admitted {
                state
                    .running
                    .insert(job.id.clone(), CancellationToken::new());
            }
            decision.admitted
        };
        for job in admitted {
            let runner = self.clone();
            tokio::spawn(async move { runner.run_job(job.id, None).await });
        }
        let next = inner.state.lock().retries.first().map(|(at, _)| *at);
        // Memory a job waits for is freed by models that unload too, which nobody tells the
        // runner of: it looks again soon.
        let soon = match (&unavailable, gpu_refused) {
            (Some(_), _) => Some(now + 1_000),
            (None, true) => Some(now + GPU_RETRY.as_millis() as u64),
            (None, false) => None,
        };
        Ok(match soon {
            Some(soon) => Some(next.map_or(soon, |at| at.min(soon))),
            None => next,
        })
    }

    async fn run_job(self, id: String, placed: Option<Placement>) {
        let attempt = AssertUnwindSafe(self.attempt(&id, placed))
            .catch_unwind()
            .await;
        self.settle(&id, attempt, "a job's state could not be written")
            .await;
    }

    /// Ends a job's turn. A failure in the runner's own handling of one job (a panic: a bug, or
    /// a value no check caught) fails that job with the reason, and never the loop or another
    /// job; its slot and resources are freed either way.
    async fn settle(
        &self,
        id: &str,
        attempt: Result<Result<(), StoreError>, Box<dyn std::any::Any + Send>>,
        unwritten: &str,
    ) {
        match attempt {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(job = %id, error = %e, "{unwritten}"),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                tracing::error!(job = %id, %message, "running the job panicked; the job fails");
                let reason = format!("internal error while running the job: {message}");
                if let Err(e) = self.write(id, Change::to(JobState::Failed, reason)).await {
                    tracing::error!(job = %id, error = %e, "the failed job's state could not be written");
                }
            }
        }
        self.release(id);
    }

    /// The job ended its turn (finished, or back to wait): its slot and resources are free.
    fn release(&self, id: &str) {
        let mut state = self.inner.state.lock();
        if let Some(gpu) = self.inner.gpu.get()
            && let Some(mut grant) = state.gpus.remove(id)
        {
            // Models evicted for an attempt that ended before it started are unloaded all
            // the same (the allocator no longer counts them, and refuses their requests).
            if let Some(evictions) = grant.evictions.take() {
                tokio::spawn(evictions);
            }
            gpu.release(id);
        }
        state.running.remove(id);
        state.here.remove(id);
        state.lease_stopped.remove(id);
        state.pausable.remove(id);
        // A cluster's leader frees the job's place when the job's change is announced.
        if self.inner.cluster.is_none() {
            state.sched.release(id);
        }
        drop(state);
        self.inner.wake.notify_one();
    }

    fn token_of(&self, id: &str) -> CancellationToken {
        self.inner
            .state
            .lock()
            .running
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Runs an attempt of job `id`: on a single node, admitting it first; in a cluster, as
    /// `placed` there by the leader (already ADMITTED), every write fenced by that placement.
    async fn attempt(&self, id: &str, placed: Option<Placement>) -> Result<(), StoreError> {
        let inner = &self.inner;
        let token = self.token_of(id);
        let rec = match &placed {
            None => {
                inner
                    .store
                    .transition(id, JobState::Admitted, "admitted")
                    .await?
            }
            Some(p) => {
                let rec = inner.store.get(id).await?;
                if rec.state != JobState::Admitted || rec.placement.as_ref() != Some(p) {
                    return Err(StoreError::MovedOn {
                        id: id.to_owned(),
                        why: format!("it is {} and no longer placed here", rec.state),
                    });
                }
                if rec.cancel_requested {
                    token.cancel();
                }
                rec
            }
        };
        // The job's GPUs: the models evicted for it are unloaded before it starts.
        let gpus = match self.take_gpus(id, &rec) {
            Ok(Some(evictions)) => {
                evictions.await;
                Some(self.gpus_of(id))
            }
            Ok(None) => self.inner.gpu.get().map(|_| self.gpus_of(id)),
            Err(why) => return self.wait_for_gpus(id, &why).await,
        };
        let Some(mut run) = CommandRun::of(id, &rec.spec, rec.attempt + 1) else {
            return self.attempt_inference(id, &rec, token).await;
        };
        if token.is_cancelled() {
            self.write(id, Change::to(JobState::Cancelled, "cancelled"))
                .await?;
            return Ok(());
        }
        if let Some(gpus) = gpus {
            run.env.extend(visible_devices(&gpus));
        }
        // Started before RUNNING is written: a coordinator that dies in between finds the job
        // ADMITTED at its next start and starts the same attempt again, which an executor that
        // can tell (Kubernetes: 409 on the Job's name) attaches to instead.
        let execution = match inner.exec.start(&run).await {
            Ok(execution) => execution,
            Err(e) => {
                if let Some(retry_after) = e.unavailable() {
                    return self.wait_for_executor(id, &e, retry_after).await;
                }
                return self
                    .record_failure(id, &rec, FailureKind::Infrastructure, None, e)
                    .await;
            }
        };
        let rec = self
            .write(
                id,
                Change::to(JobState::Running, self.running_reason(id, &*execution)),
            )
            .await?;
        if inner.cluster.is_some() {
            // Other nodes serve its output from the store.
            self.ship_logs(id, rec.attempt);
        }
        self.finish(id, &rec, execution, token).await
    }

    /// The GPUs of a job about to start: the grant admission made, or (an attempt placed here
    /// by a cluster's leader) one made now. Returns the unloading of the models evicted for
    /// it, to await before the job starts; `Err` says why it cannot have them now.
    fn take_gpus(
        &self,
        id: &str,
        rec: &JobRecord,
    ) -> Result<Option<futures::future::BoxFuture<'static, ()>>, String> {
        let Some(gpu) = self.inner.gpu.get() else {
            return Ok(None);
        };
        let mut state = self.inner.state.lock();
        if let Some(grant) = state.gpus.get_mut(id) {
            return Ok(grant.evictions.take());
        }
        let r = &rec.spec.resources;
        if r.gpus == 0 {
            return Ok(None);
        }
        let mut grant = gpu.reserve(id, r.gpus, r.gpu_memory_bytes)?;
        let evictions = grant.evictions.take();
        state.gpus.insert(id.to_owned(), grant);
        Ok(evictions)
    }

    /// The attempt cannot have its GPUs now (a cluster's node): back to wait, without counting
    /// a failure.
    async fn wait_for_gpus(&self, id: &str, why: &str) -> Result<(), StoreError> {
        let delay = GPU_RETRY.as_millis() as u64;
        let at = self.inner.store.now_ms().saturating_add(delay);
        let change = Change {
            retry_at_ms: Some(at),
            ..Change::to(
                JobState::RetryWait,
                format!("{why}; trying again in {delay} ms (not counted as a failure)"),
            )
        };
        self.write(id, change).await?;
        self.retry_at(at, id);
        Ok(())
    }

    /// Runs an attempt of an inference job in this process (see [`InferenceExecutor`]).
    async fn attempt_inference(
        &self,
        id: &str,
        rec: &JobRecord,
        token: CancellationToken,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let executor = inner.inference.clone();
        let Some(executor) = executor else {
            self.write(
                id,
                Change::to(
                    JobState::Failed,
                    "this server runs no inference jobs (no inference executor)",
                ),
            )
            .await?;
            return Ok(());
        };
        if token.is_cancelled() {
            self.write(id, Change::to(JobState::Cancelled, "cancelled"))
                .await?;
            return Ok(());
        }
        let progress: ProgressFn = {
            let runner = self.clone();
            let id = id.to_owned();
            Arc::new(move |done, total| {
                runner
                    .inner
                    .progress
                    .lock()
                    .insert(id.clone(), (done, total));
            })
        };
        let execution = match executor.start(id, &rec.spec, progress) {
            Ok(execution) => execution,
            Err(e) => {
                return self
                    .record_failure(id, rec, FailureKind::Application, None, e)
                    .await;
            }
        };
        let rec = self
            .write(
                id,
                Change::to(JobState::Running, self.running_reason(id, &*execution)),
            )
            .await?;
        let result = self.finish(id, &rec, execution, token).await;
        inner.progress.lock().remove(id);
        result
    }

    /// Progress of a running job that reports it: (done, total).
    pub fn progress(&self, id: &str) -> Option<(u64, u64)> {
        self.inner.progress.lock().get(id).copied()
    }

    /// The attempt could not be started because the executor is unreachable: back to wait,
    /// without counting a failure.
    async fn wait_for_executor(
        &self,
        id: &str,
        e: &ExecError,
        retry_after: Option<Duration>,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let delay = retry_after
            .map_or(inner.retry.initial_delay_ms, |d| d.as_millis() as u64)
            .max(100);
        let at = inner.store.now_ms().saturating_add(delay);
        let change = Change {
            retry_at_ms: Some(at),
            ..Change::to(
                JobState::RetryWait,
                format!("{e}; trying again in {delay} ms (not counted as a failure)"),
            )
        };
        self.write(id, change).await?;
        self.retry_at(at, id);
        Ok(())
    }

    /// Waits for a started (or adopted) attempt and writes how it ended.
    async fn finish(
        &self,
        id: &str,
        rec: &JobRecord,
        execution: Box<dyn Execution>,
        token: CancellationToken,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let can_pause = execution.can_pause();
        let result = match self.pause_handle(id, &rec.spec, can_pause).await {
            Some(paused) => {
                let result = execution.wait_pausable(token, paused).await;
                inner.state.lock().pausable.remove(id);
                result
            }
            None => execution.wait(token).await,
        };
        let (failure, exit_code, what) = match result {
            Ok(Outcome::Exited(0)) => {
                let change = Change {
                    exit_code: Some(0),
                    ..Change::to(JobState::Succeeded, "exited with code 0")
                };
                self.write(id, change).await?;
                return Ok(());
            }
            Ok(Outcome::Cancelled) if inner.state.lock().lease_stopped.contains(id) => (
                FailureKind::Infrastructure,
                None,
                "stopped: this node's lease ran out before it could renew it".to_string(),
            ),
            Ok(Outcome::Cancelled) => {
                self.write(id, Change::to(JobState::Cancelled, "cancelled"))
                    .await?;
                return Ok(());
            }
            Ok(Outcome::TimedOut) => {
                let secs = rec.spec.deadline_seconds.unwrap_or_default();
                self.write(
                    id,
                    Change::to(JobState::TimedOut, format!("deadline of {secs} s passed")),
                )
                .await?;
                return Ok(());
            }
            Ok(Outcome::Exited(code)) => (
                FailureKind::Application,
                Some(code),
                format!("exited with code {code}"),
            ),
            Ok(Outcome::Signalled(sig)) => (
                FailureKind::Application,
                None,
                format!("killed by signal {sig}"),
            ),
            Ok(Outcome::Infrastructure(why)) => (FailureKind::Infrastructure, None, why),
            Ok(Outcome::Failed(why)) => (FailureKind::Application, None, why),
            Err(e) => {
                return self
                    .record_failure(id, rec, FailureKind::Infrastructure, None, e)
                    .await;
            }
        };
        self.record(id, rec, failure, exit_code, what, false).await
    }

    async fn record_failure(
        &self,
        id: &str,
        rec: &JobRecord,
        failure: FailureKind,
        exit_code: Option<i32>,
        e: ExecError,
    ) -> Result<(), StoreError> {
        let permanent = e.is_permanent();
        self.record(id, rec, failure, exit_code, e.to_string(), permanent)
            .await
    }

    /// Writes a failed attempt: RETRY_WAIT with the policy's backoff, or FAILED when its limits
    /// are reached or trying again cannot help (`permanent`).
    async fn record(
        &self,
        id: &str,
        rec: &JobRecord,
        failure: FailureKind,
        exit_code: Option<i32>,
        what: String,
        permanent: bool,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let now = inner.store.now_ms();
        let decision = if permanent {
            RetryDecision::GiveUp {
                reason: "trying again cannot help".into(),
            }
        } else {
            let mut state = inner.state.lock();
            inner.retry.on_failure(
                failure,
                rec.app_failures,
                rec.infra_failures,
                rec.spec.max_retries,
                now,
                &mut state.jitter,
            )
        };
        let change = failed_attempt(&decision, failure, exit_code, &what);
        self.write(id, change).await?;
        if let RetryDecision::RetryAt { at_ms, .. } = decision {
            self.retry_at(at_ms, id);
        }
        Ok(())
    }

    /// After a restart, a job that was RUNNING under an executor that adopts: finds its
    /// attempt again (retrying while the executor cannot be reached) and waits for it; if the
    /// attempt is gone, the job goes back in line without a failure counted.
    async fn resume_job(self, rec: JobRecord) {
        let resumed = AssertUnwindSafe(self.resume(&rec)).catch_unwind().await;
        self.settle(
            &rec.id,
            resumed,
            "an adopted job's state could not be written",
        )
        .await;
    }

    async fn resume(&self, rec: &JobRecord) -> Result<(), StoreError> {
        let inner = &self.inner;
        let id = rec.id.as_str();
        let token = self.token_of(id);
        let Some(run) = CommandRun::of(id, &rec.spec, rec.attempt) else {
            return self
                .back_in_line(id, "coordinator restarted; not a command job")
                .await;
        };
        let mut delay = Duration::from_millis(inner.retry.initial_delay_ms.max(100));
        let found = loop {
            match inner.exec.adopt(&run).await {
                Ok(found) => break found,
                Err(e) if e.unavailable().is_some() => {
                    tracing::warn!(job = %id, error = %e, "cannot look for a running attempt yet; trying again");
                    tokio::time::sleep(delay).await;
                    delay =
                        (delay * 2).min(Duration::from_millis(inner.retry.max_delay_ms.max(100)));
                }
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "cannot adopt a running attempt; running the job again");
                    break None;
                }
            }
        };
        match found {
            Some(execution) => {
                tracing::info!(job = %id, attempt = rec.attempt, "adopted after a restart");
                self.finish(id, rec, execution, token).await
            }
            None if token.is_cancelled() => self
                .write(id, Change::to(JobState::Cancelled, "cancelled"))
                .await
                .map(drop),
            None => {
                let reason = format!(
                    "coordinator restarted; attempt {} was not found by the {} executor; attempt {} next",
                    rec.attempt,
                    inner.exec.name(),
                    rec.attempt + 1
                );
                self.back_in_line(id, &reason).await
            }
        }
    }

    /// RUNNING → RETRY_WAIT due now, not counted as a failure.
    async fn back_in_line(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        let at = self.inner.store.now_ms();
        let change = Change {
            retry_at_ms: Some(at),
            ..Change::to(JobState::RetryWait, reason)
        };
        self.write(id, change).await?;
        self.retry_at(at, id);
        Ok(())
    }

    /// Writes `change` to job `id` about the attempt this node runs: on a single node as is;
    /// in a cluster only while the job still carries the placement the attempt runs under
    /// ([`StoreError::MovedOn`] otherwise), so a late write of an attempt the leader has given
    /// up on changes nothing.
    async fn write(&self, id: &str, change: Change) -> Result<JobRecord, StoreError> {
        let placed = self.inner.state.lock().here.get(id).cloned();
        self.inner
            .store
            .update(id, move |rec| match &placed {
                Some(p) if rec.placement.as_ref() != Some(p) => Err(StoreError::MovedOn {
                    id: rec.id.clone(),
                    why: format!(
                        "its attempt on node {} (placement {}) is no longer its current one",
                        p.node, p.seq
                    ),
                }),
                _ => Ok(change),
            })
            .await
    }

    /// Why a job is RUNNING: the attempt, and in a cluster where and under which leader.
    fn running_reason(&self, id: &str, execution: &dyn Execution) -> String {
        match self.inner.state.lock().here.get(id) {
            Some(p) => format!(
                "running ({}) on node {}, placed by leader epoch {}",
                execution.describe(),
                p.node,
                p.epoch
            ),
            None => format!("running ({})", execution.describe()),
        }
    }

    /// A job waits in RETRY_WAIT until `at`: a single node keeps it; a cluster's leader learns
    /// it from the job's announced change.
    fn retry_at(&self, at: u64, id: &str) {
        if self.inner.cluster.is_none() {
            self.inner.state.lock().retries.insert((at, id.to_owned()));
        }
    }

    /// For an attempt that can be paused, of a job that may be: the receiver through which it
    /// is paused, registered for the pressure's changes, and already set (and the job marked
    /// paused) when an objective is at risk now.
    async fn pause_handle(
        &self,
        id: &str,
        spec: &JobSpec,
        can_pause: bool,
    ) -> Option<tokio::sync::watch::Receiver<bool>> {
        let classes = &self.inner.sched_config.priority_classes;
        if !can_pause || !pausable(spec.pausable, &spec.priority_class, classes) {
            return None;
        }
        let (rx, at_risk) = {
            let mut state = self.inner.state.lock();
            let at_risk = state.at_risk.clone();
            let (tx, rx) = tokio::sync::watch::channel(at_risk.is_some());
            state.pausable.insert(id.to_owned(), tx);
            (rx, at_risk)
        };
        if let Some(why) = at_risk {
            self.mark_paused(id, Some(why)).await;
        }
        Some(rx)
    }

    /// Marks job `id` paused (`Some(why)`) or resumed and tells the pause observer; a failure
    /// to write is logged (the attempt is paused or resumed all the same).
    async fn mark_paused(&self, id: &str, why: Option<String>) {
        let placed = self.inner.state.lock().here.get(id).cloned();
        match self.inner.store.mark_paused(id, why, placed).await {
            Ok(Some(rec)) => {
                tracing::info!(
                    job = %id,
                    paused = rec.pauses.is_paused(),
                    reason = %rec.pauses.reason,
                    paused_ms = rec.pauses.paused_ms,
                    "job {}",
                    if rec.pauses.is_paused() { "paused" } else { "resumed" }
                );
                let observer = self.inner.on_pause.lock().clone();
                if let Some(observer) = observer {
                    observer(&rec);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "a job's pause could not be recorded");
            }
        }
    }

    /// Follows the fast path's pressure until `stop`: the CPU capacity at each change, the
    /// pause of the running jobs at each change of `at_risk` (at most one every
    /// [`MIN_PAUSE_FLIP`]); at the end, resumes every paused job.
    async fn follow_pressure(
        &self,
        mut rx: tokio::sync::watch::Receiver<Pressure>,
        stop: CancellationToken,
    ) {
        let mut last_flip: Option<tokio::time::Instant> = None;
        loop {
            let pressure = rx.borrow_and_update().clone();
            self.apply_cpu(pressure.fast_path_cpu_millis);
            let was = self.inner.state.lock().at_risk.clone();
            match (&was, &pressure.at_risk) {
                (Some(_), Some(why)) => {
                    // Still at risk, maybe for another model: only the words change.
                    self.inner.state.lock().at_risk = Some(why.clone());
                }
                (None, None) => {}
                _ => {
                    let due = last_flip.map(|at| at + MIN_PAUSE_FLIP);
                    if let Some(due) = due.filter(|due| *due > tokio::time::Instant::now()) {
                        // Too soon after the last change: look again then, at what holds then.
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep_until(due) => continue,
                        }
                    }
                    self.set_at_risk(pressure.at_risk.clone()).await;
                    last_flip = Some(tokio::time::Instant::now());
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                changed = rx.changed() => if changed.is_err() { break },
            }
        }
        self.set_at_risk(None).await;
    }

    /// Pauses (`Some(why)`) or resumes every running attempt that may be paused, and marks
    /// their jobs.
    async fn set_at_risk(&self, at_risk: Option<String>) {
        let ids: Vec<String> = {
            let mut state = self.inner.state.lock();
            if state.at_risk.is_some() == at_risk.is_some() {
                state.at_risk = at_risk;
                return;
            }
            state.at_risk = at_risk.clone();
            for tx in state.pausable.values() {
                tx.send_replace(at_risk.is_some());
            }
            state.pausable.keys().cloned().collect()
        };
        match &at_risk {
            Some(why) if !ids.is_empty() => {
                tracing::info!(jobs = ids.len(), reason = %why, "pausing the running jobs that may be paused");
            }
            None if !ids.is_empty() => {
                tracing::info!(jobs = ids.len(), "resuming the paused jobs");
            }
            _ => {}
        }
        for id in ids {
            self.mark_paused(&id, at_risk.clone()).await;
        }
    }

    /// The CPU capacity jobs are admitted against, from the fast path's use (see the module
    /// documentation). In a cluster it is only kept, for the node to register.
    fn apply_cpu(&self, fast_path_cpu_millis: u64) {
        let configured = self.inner.sched_config.capacity.cpu_millis;
        let floor = self
            .inner
            .cpu_floor_millis
            .load(std::sync::atomic::Ordering::Relaxed);
        let capacity = job_cpu_capacity(configured, fast_path_cpu_millis, floor);
        let before = self
            .inner
            .cpu_capacity_now
            .swap(capacity, std::sync::atomic::Ordering::Relaxed);
        if before == capacity || self.inner.cluster.is_some() {
            return;
        }
        let note = lowered_note(configured, capacity).unwrap_or_default();
        self.inner
            .state
            .lock()
            .sched
            .set_cpu_taken("", configured - capacity, note);
        // A round gives the waiting jobs their new reasons (and admits, if there is room).
        self.inner.wake.notify_one();
    }

    /// Whether this runner schedules: a single node always, a cluster node while it leads.
    fn leads(&self) -> bool {
        self.inner.cluster.is_none() || self.inner.state.lock().leader.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use veraltheim_storage::MemoryStore;

    use super::*;
    use crate::job::{JobKind, Resources};
    use crate::local::LocalExecutor;
    use crate::scheduler::{QueueConfig, Quota};

    /// Runs the runner's loop on its own task until the returned token is cancelled.
    fn run_loop<S: Store + 'static>(
        runner: &Runner<S>,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let task = {
            let runner = runner.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { runner.run(shutdown).await })
        };
        (shutdown, task)
    }

    /// A runner over an in-memory store and a local executor in `dir`, its loop running.
    fn started(
        dir: &std::path::Path,
        max_running: usize,
    ) -> (
        Runner<MemoryStore>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let runner = Runner::new(
            JobStore::new(MemoryStore::new()),
            LocalExecutor::new(dir),
            config(max_running),
        )
        .unwrap();
        let (shutdown, task) = run_loop(&runner);
        (runner, shutdown, task)
    }

    fn config(max_running: usize) -> RunnerConfig {
        RunnerConfig {
            scheduler: SchedulerConfig {
                capacity: Resources {
                    cpu_millis: 4000,
                    memory_bytes: 1 << 30,
                    gpus: 0,
                    gpu_memory_bytes: 0,
                },
                queues: vec![QueueConfig {
                    name: "default".into(),
                    weight: 1,
                    quota: Quota::default(),
                }],
                priority_classes: vec![],
            },
            retry: RetryPolicy {
                initial_delay_ms: 10,
                max_delay_ms: 50,
                max_infra_retries: 2,
            },
            max_running,
            jitter_seed: 1,
        }
    }

    pub(super) fn spec(name: &str, script: &str, max_retries: u32) -> JobSpec {
        JobSpec {
            name: name.into(),
            queue: "default".into(),
            priority_class: String::new(),
            resources: Resources {
                cpu_millis: 1000,
                memory_bytes: 0,
                gpus: 0,
                gpu_memory_bytes: 0,
            },
            max_retries,
            deadline_seconds: None,
            ttl_seconds_after_finished: None,
            labels: BTreeMap::new(),
            idempotency_key: None,
            owner: None,
            pausable: None,
            kind: JobKind::Command {
                image: String::new(),
                command: vec!["sh".into(), "-c".into(), script.into()],
                env: BTreeMap::new(),
                working_dir: String::new(),
                writable_root: false,
            },
        }
    }

    async fn wait_for(
        runner: &Runner<MemoryStore>,
        id: &str,
        pred: impl Fn(&JobRecord) -> bool,
    ) -> JobRecord {
        for _ in 0..400 {
            let rec = runner.store().get(id).unwrap();
            if pred(&rec) {
                return rec;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {id} never reached the expected state");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_runner_starts_nothing_new_and_lets_running_jobs_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (runner, shutdown, task) = started(dir.path(), 4);
        runner.start().await.unwrap();
        let flag = dir.path().join("go");
        let script = format!("while [ ! -e {} ]; do sleep 0.05; done", flag.display());
        let running = runner.submit(spec("running", &script, 0)).await.unwrap();
        wait_for(&runner, &running.id, |r| r.state == JobState::Running).await;
        runner.set_draining(true);
        assert!(runner.is_draining());
        let held = runner.submit(spec("held", "true", 0)).await.unwrap();
        // The running job finishes while the node drains.
        std::fs::write(&flag, b"").unwrap();
        wait_for(&runner, &running.id, |r| r.state == JobState::Succeeded).await;
        // Its end woke the loop (a free slot): the held job is still not started, and says why.
        let mut reason = None;
        for _ in 0..400 {
            reason = runner.waiting_reason(&held.id);
            if reason.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(reason.as_deref(), Some(DRAINING));
        assert_eq!(
            runner.store().get(&held.id).unwrap().state,
            JobState::Queued
        );
        assert_eq!(runner.live_counts().running, 0);
        // Admission resumes.
        runner.set_draining(false);
        wait_for(&runner, &held.id, |r| r.state == JobState::Succeeded).await;
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_to_success_and_a_failing_job_retries_then_fails() {
        let dir = tempfile::tempdir().unwrap();
        let runner = Runner::new(
            JobStore::new(MemoryStore::new()),
            LocalExecutor::new(dir.path()),
            config(2),
        )
        .unwrap();
        runner.start().await.unwrap();
        let (shutdown, loop_task) = run_loop(&runner);
        let mut ok = Vec::new();
        for i in 0..3 {
            ok.push(
                runner
                    .submit(spec(&format!("ok{i}"), "echo done", 0))
                    .await
                    .unwrap()
                    .id,
            );
        }
        let bad = runner.submit(spec("bad", "exit 7", 2)).await.unwrap().id;
        for id in &ok {
            let rec = wait_for(&runner, id, |r| r.state.is_terminal()).await;
            assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
            assert_eq!((rec.attempt, rec.exit_code), (1, Some(0)));
        }
        let rec = wait_for(&runner, &bad, |r| r.state.is_terminal()).await;
        assert_eq!(rec.state, JobState::Failed, "{rec:?}");
        assert_eq!(
            (rec.attempt, rec.app_failures, rec.exit_code),
            (3, 3, Some(7))
        );
        assert_eq!(
            rec.history
                .iter()
                .filter(|h| h.state == JobState::RetryWait)
                .count(),
            2
        );
        assert!(
            rec.reason
                .starts_with("exited with code 7; failed 3 times (max_retries 2)"),
            "{}",
            rec.reason
        );
        // Everything released: nothing admitted, nothing waiting.
        {
            let state = runner.inner.state.lock();
            assert_eq!(state.sched.admitted_len(), 0);
            assert_eq!(state.sched.waiting_len(), 0);
        }
        shutdown.cancel();
        loop_task.await.unwrap();
    }

    /// The local executor, except that starting a job named `boom` panics (a bug in the
    /// runner's path for one job).
    struct PanicsOnBoom(LocalExecutor);

    impl Executor for PanicsOnBoom {
        fn name(&self) -> &'static str {
            "panics-on-boom"
        }

        fn start<'a>(
            &'a self,
            run: &'a CommandRun,
        ) -> futures::future::BoxFuture<'a, Result<Box<dyn Execution>, ExecError>> {
            assert!(
                run.job_name != "boom",
                "boom: overflow when adding duration to instant"
            );
            self.0.start(run)
        }

        fn logs(&self, job_id: &str, attempt: u32, follow: bool) -> crate::executor::LogStream {
            self.0.logs(job_id, attempt, follow)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_for_one_job_fails_that_job_and_frees_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        // One slot: if the panicking job kept it, the next job would never run.
        let runner = Runner::new(
            JobStore::new(MemoryStore::new()),
            PanicsOnBoom(LocalExecutor::new(dir.path())),
            config(1),
        )
        .unwrap();
        runner.start().await.unwrap();
        let (shutdown, loop_task) = run_loop(&runner);
        let boom = runner.submit(spec("boom", "true", 3)).await.unwrap();
        let after = runner.submit(spec("after", "echo ok", 0)).await.unwrap();
        let failed = wait_for(&runner, &boom.id, |r| r.state.is_terminal()).await;
        assert_eq!(failed.state, JobState::Failed);
        assert!(
            failed.reason.contains("internal error") && failed.reason.contains("overflow"),
            "{}",
            failed.reason
        );
        let done = wait_for(&runner, &after.id, |r| r.state.is_terminal()).await;
        assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
        shutdown.cancel();
        loop_task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn running_jobs_never_exceed_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        // Every record the store writes, in commit order for each job.
        let (tx, mut written) = tokio::sync::mpsc::unbounded_channel::<JobRecord>();
        let store = JobStore::new(MemoryStore::new()).with_observer(Arc::new(move |rec| {
            let _ = tx.send(rec.clone());
        }));
        let runner = Runner::new(store, LocalExecutor::new(dir.path()), config(2)).unwrap();
        runner.start().await.unwrap();
        // Each job marks its start and ends only once two jobs have started: the first two
        // must overlap, however slowly the runner or the machine goes.
        let started = dir.path().join("started");
        std::fs::create_dir(&started).unwrap();
        let b = started.display();
        // All six are in line before the loop runs: its first round has four more jobs than
        // slots to choose from.
        let mut ids = BTreeSet::new();
        for i in 0..6 {
            let script =
                format!("touch {b}/j{i}; while [ $(ls {b} | wc -l) -lt 2 ]; do sleep 0.01; done");
            let mut s = spec(&format!("j{i}"), &script, 0);
            s.resources.cpu_millis = 10;
            ids.insert(runner.submit(s).await.unwrap().id);
        }
        let (shutdown, loop_task) = run_loop(&runner);
        // A job holds a slot from ADMITTED until its end is written (the slot is freed after
        // that write, and the next job admitted after that), so replaying the records in the
        // order they were written never shows more jobs holding slots than there were.
        let mut holding = BTreeSet::new();
        let mut succeeded = BTreeSet::new();
        let mut most = 0;
        let replay = async {
            while succeeded.len() < ids.len() {
                let rec = written.recv().await.expect("the store went away");
                match rec.state {
                    JobState::Admitted | JobState::Running => {
                        holding.insert(rec.id.clone());
                    }
                    JobState::Queued => {}
                    JobState::Succeeded => {
                        holding.remove(&rec.id);
                        succeeded.insert(rec.id.clone());
                    }
                    other => panic!("job {} went to {other:?}: {rec:?}", rec.id),
                }
                assert!(holding.len() <= 2, "{holding:?} hold slots; there are 2");
                most = most.max(holding.len());
            }
        };
        tokio::time::timeout(Duration::from_secs(60), replay)
            .await
            .unwrap_or_else(|_| panic!("the six jobs did not all succeed within 60 s"));
        assert_eq!(succeeded, ids);
        assert_eq!(most, 2, "both slots were used at once");
        shutdown.cancel();
        loop_task.await.unwrap();
    }

    /// A fake of the coordinator's GPU memory (the model allocator): GPUs with so many bytes
    /// free, a job placed on the ones with most free; what is held, and every release.
    #[derive(Default)]
    struct FakeGpus {
        free: parking_lot::Mutex<Vec<u64>>,
        held: parking_lot::Mutex<BTreeMap<String, Vec<(u32, u64)>>>,
        released: parking_lot::Mutex<Vec<String>>,
    }

    impl FakeGpus {
        fn new(free: &[u64]) -> Arc<Self> {
            Arc::new(FakeGpus {
                free: parking_lot::Mutex::new(free.to_vec()),
                ..FakeGpus::default()
            })
        }
    }

    impl GpuReservations for FakeGpus {
        fn check(&self, gpus: u32, bytes: u64) -> Result<(), String> {
            let n = self.free.lock().len();
            if bytes > 100 {
                return Err(format!("{bytes} bytes per GPU: no GPU here has that many"));
            }
            if gpus as usize > n {
                return Err(format!("{gpus} GPUs: this node has {n}"));
            }
            Ok(())
        }

        fn reserve(&self, job: &str, gpus: u32, bytes: u64) -> Result<GpuGrant, String> {
            let mut free = self.free.lock();
            let mut order: Vec<u32> = (0..free.len() as u32).collect();
            order.sort_by_key(|&g| (std::cmp::Reverse(free[g as usize]), g));
            let chosen: Vec<u32> = order
                .into_iter()
                .filter(|&g| free[g as usize] >= bytes)
                .take(gpus as usize)
                .collect();
            if chosen.len() < gpus as usize {
                return Err(format!("no GPU has {bytes} bytes free: {free:?}"));
            }
            for &g in &chosen {
                free[g as usize] -= bytes;
            }
            let held = chosen.iter().map(|&g| (g, bytes)).collect();
            self.held.lock().insert(job.to_owned(), held);
            Ok(GpuGrant {
                gpus: chosen,
                evictions: None,
            })
        }

        fn release(&self, job: &str) {
            if let Some(held) = self.held.lock().remove(job) {
                let mut free = self.free.lock();
                for (g, bytes) in held {
                    free[g as usize] += bytes;
                }
            }
            self.released.lock().push(job.to_owned());
        }

        fn gpus_of(&self, job: &str) -> Vec<u32> {
            self.held
                .lock()
                .get(job)
                .map(|h| h.iter().map(|(g, _)| *g).collect())
                .unwrap_or_default()
        }
    }

    fn gpu_spec(name: &str, script: &str, gpus: u32, bytes: u64) -> JobSpec {
        let mut s = spec(name, script, 0);
        s.resources.cpu_millis = 100;
        s.resources.gpus = gpus;
        s.resources.gpu_memory_bytes = bytes;
        s
    }

    fn gpu_runner(dir: &std::path::Path, gpus: &Arc<FakeGpus>) -> Runner<MemoryStore> {
        let mut config = config(4);
        config.scheduler.capacity.gpus = 2;
        Runner::new(
            JobStore::new(MemoryStore::new()),
            LocalExecutor::new(dir),
            config,
        )
        .unwrap()
        .with_gpu_reservations(gpus.clone())
    }

    const SHOW_GPUS: &str =
        r#"echo "[$CUDA_VISIBLE_DEVICES] [$NVIDIA_VISIBLE_DEVICES] [$CUDA_DEVICE_ORDER]""#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gpu_job_is_told_its_reserved_device_and_frees_it_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let gpus = FakeGpus::new(&[40, 60]);
        let runner = gpu_runner(dir.path(), &gpus);
        runner.start().await.unwrap();
        let (shutdown, loop_task) = run_loop(&runner);
        // The job's own value is replaced by its device.
        let mut one = gpu_spec("one", SHOW_GPUS, 1, 30);
        if let JobKind::Command { env, .. } = &mut one.kind {
            env.insert("CUDA_VISIBLE_DEVICES".into(), "0,1".into());
        }
        let one = runner.submit(one).await.unwrap().id;
        let none = runner.submit(spec("none", SHOW_GPUS, 0)).await.unwrap().id;
        let two = runner
            .submit(gpu_spec("two", SHOW_GPUS, 2, 10))
            .await
            .unwrap()
            .id;
        let log = |id: &str| {
            std::fs::read_to_string(dir.path().join(id).join("attempt-1.stdout")).unwrap()
        };
        for id in [&one, &none, &two] {
            let rec = wait_for(&runner, id, |r| r.state.is_terminal()).await;
            assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
        }
        // gpu1 had most free.
        assert_eq!(log(&one), "[1] [1] [PCI_BUS_ID]\n");
        // A job that asked for no GPU sees none.
        assert_eq!(log(&none), "[] [void] [PCI_BUS_ID]\n");
        let two_log = log(&two);
        assert!(
            two_log == "[1,0] [1,0] [PCI_BUS_ID]\n" || two_log == "[0,1] [0,1] [PCI_BUS_ID]\n",
            "{two_log}"
        );
        // Every reservation was released; nothing is held.
        assert!(gpus.held.lock().is_empty());
        assert_eq!(*gpus.free.lock(), [40, 60]);
        let released = gpus.released.lock().clone();
        assert!(
            released.contains(&one) && released.contains(&two),
            "{released:?}"
        );
        assert!(runner.gpu_jobs().is_empty());
        shutdown.cancel();
        loop_task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gpu_job_waits_in_line_for_memory_and_every_end_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let gpus = FakeGpus::new(&[50]);
        let runner = gpu_runner(dir.path(), &gpus);
        runner.start().await.unwrap();
        let (shutdown, loop_task) = run_loop(&runner);
        // More than any GPU here has: refused at submit.
        let err = runner
            .submit(gpu_spec("huge", "true", 1, 1000))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("job can never be admitted: 1000 bytes per GPU"),
            "{err}"
        );
        // Something else (a model) holds 30 of the 50: a job that needs 40 waits in line.
        gpus.free.lock()[0] = 20;
        let flag = dir.path().join("go");
        let script = format!("while [ ! -e {} ]; do sleep 0.05; done", flag.display());
        let big = runner
            .submit(gpu_spec("big", &script, 1, 40))
            .await
            .unwrap()
            .id;
        let mut reason = None;
        for _ in 0..400 {
            reason = runner.waiting_reason(&big);
            if reason.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(reason.as_deref(), Some("no GPU has 40 bytes free: [20]"));
        assert_eq!(runner.store().get(&big).unwrap().state, JobState::Queued);
        // The model goes: the job is admitted at the next look, holds gpu0 while it runs.
        gpus.free.lock()[0] = 50;
        wait_for(&runner, &big, |r| r.state == JobState::Running).await;
        assert_eq!(runner.gpus_of(&big), [0]);
        assert_eq!(runner.gpu_jobs(), [(big.clone(), vec![0])]);
        assert_eq!(*gpus.free.lock(), [10]);
        // Cancelled: released.
        runner.cancel(&big).await.unwrap();
        wait_for(&runner, &big, |r| r.state == JobState::Cancelled).await;
        // Failed: released too.
        let bad = runner
            .submit(gpu_spec("bad", "exit 3", 1, 40))
            .await
            .unwrap()
            .id;
        wait_for(&runner, &bad, |r| r.state == JobState::Failed).await;
        // Timed out: released too.
        let mut slow = gpu_spec("slow", "sleep 30", 1, 40);
        slow.deadline_seconds = Some(1);
        let slow = runner.submit(slow).await.unwrap().id;
        wait_for(&runner, &slow, |r| r.state == JobState::TimedOut).await;
        // A start that fails (no such program): released too.
        let mut missing = gpu_spec("missing", "true", 1, 40);
        if let JobKind::Command { command, .. } = &mut missing.kind {
            *command = vec!["/nonexistent/program".into()];
        }
        let missing = runner.submit(missing).await.unwrap().id;
        wait_for(&runner, &missing, |r| r.state == JobState::Failed).await;
        for _ in 0..400 {
            if gpus.held.lock().is_empty() && runner.gpu_jobs().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gpus.held.lock().is_empty(), "{:?}", gpus.held.lock());
        assert_eq!(*gpus.free.lock(), [50]);
        let released = gpus.released.lock().clone();
        for id in [&big, &bad, &slow, &missing] {
            assert!(released.contains(id), "{id} not released: {released:?}");
        }
        shutdown.cancel();
        loop_task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_runs_interrupted_jobs_again() {
        use veraltheim_storage::{RedbStore, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let (running, retrying);
        {
            // The first coordinator admitted and started one job, and had another in backoff,
            // then died.
            let store = JobStore::new(RedbStore::open(&path, StoreOptions::default()).unwrap());
            running = store.submit(spec("r", "echo again", 0)).await.unwrap().id;
            retrying = store.submit(spec("w", "true", 1)).await.unwrap().id;
            for id in [&running, &retrying] {
                store.transition(id, JobState::Admitted, "").await.unwrap();
                store.transition(id, JobState::Running, "").await.unwrap();
            }
            store
                .update(&retrying, |_| {
                    Ok(Change {
                        failure: Some(FailureKind::Application),
                        retry_at_ms: Some(0),
                        ..Change::to(JobState::RetryWait, "exit 1")
                    })
                })
                .await
                .unwrap();
        }
        let store = JobStore::new(RedbStore::open(&path, StoreOptions::default()).unwrap());
        let runner = Runner::new(store, LocalExecutor::new(dir.path()), config(2)).unwrap();
        runner.start().await.unwrap();
        let (shutdown, loop_task) = run_loop(&runner);
        for id in [&running, &retrying] {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let rec = loop {
                let rec = runner.store().get(id).unwrap();
                if rec.state.is_terminal() || std::time::Instant::now() > deadline {
                    break rec;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
            assert_eq!(rec.attempt, 2);
        }
        let rec = runner.store().get(&running).unwrap();
        assert!(
            rec.history
                .iter()
                .any(|h| h.reason == "coordinator restarted; attempt 2")
        );
        let log = std::fs::read_to_string(dir.path().join(&running).join("attempt-2.stdout"));
        assert_eq!(log.unwrap(), "again\n");
        shutdown.cancel();
        loop_task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_job_and_its_logs_are_deleted_after_its_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let (runner, shutdown, loop_task) = started(dir.path(), 2);
        let mut short = spec("short", "echo bye", 0);
        short.ttl_seconds_after_finished = Some(1);
        let short = runner.submit(short).await.unwrap().id;
        let kept = runner
            .submit(spec("kept", "echo stay", 0))
            .await
            .unwrap()
            .id;
        for id in [&short, &kept] {
            let rec = wait_for(&runner, id, |r| r.state.is_terminal()).await;
            assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
        }
        let logs = dir.path().join(&short);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while runner.store().get(&short).is_ok() {
            // No wake-up is sent for an expiry: the loop must sleep until it by itself.
            assert!(std::time::Instant::now() < deadline, "never deleted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The record goes first, its log folder just after it (the same sweep).
        while logs.exists() {
            let left = logs.display();
            assert!(
                std::time::Instant::now() < deadline,
                "the log folder {left} is left"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            runner.store().get(&kept).unwrap().state,
            JobState::Succeeded
        );
        assert!(dir.path().join(&kept).join("attempt-1.stdout").exists());
        shutdown.cancel();
        loop_task.await.unwrap();
    }

    #[tokio::test]
    async fn a_job_whose_queue_left_the_configuration_is_parked_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::new(MemoryStore::new());
        let mut s = spec("old", "true", 0);
        s.queue = "gone".into();
        let id = store.submit(s).await.unwrap().id;
        let runner = Runner::new(store, LocalExecutor::new(dir.path()), config(1)).unwrap();
        runner.start().await.unwrap();
        runner.round().await.unwrap();
        assert_eq!(runner.store().get(&id).unwrap().state, JobState::Queued);
        assert_eq!(
            runner.waiting_reason(&id).as_deref(),
            Some("no queue named 'gone'")
        );
        let rec = runner.cancel(&id).await.unwrap();
        assert_eq!(rec.state, JobState::Cancelled);
        assert_eq!(runner.waiting_reason(&id), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_a_running_and_a_waiting_job_and_reject_impossible_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (runner, shutdown, loop_task) = started(dir.path(), 1);
        let long = runner.submit(spec("long", "sleep 30", 0)).await.unwrap().id;
        let next = runner.submit(spec("next", "sleep 30", 0)).await.unwrap().id;
        wait_for(&runner, &long, |r| r.state == JobState::Running).await;
        // One slot: the second waits, with a reason.
        for _ in 0..100 {
            if runner.waiting_reason(&next).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            runner.waiting_reason(&next).as_deref(),
            Some("every slot for running jobs is taken")
        );
        let rec = runner.cancel(&next).await.unwrap();
        assert_eq!(rec.state, JobState::Cancelled);
        runner.cancel(&long).await.unwrap();
        let rec = wait_for(&runner, &long, |r| r.state.is_terminal()).await;
        assert_eq!(rec.state, JobState::Cancelled);

        let mut big = spec("big", "true", 0);
        big.resources.cpu_millis = 5000;
        let err = runner.submit(big).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "job can never be admitted: capacity cpu 0/4000m (needs 5000m)"
        );
        let mut lost = spec("lost", "true", 0);
        lost.queue = "nope".into();
        assert!(matches!(
            runner.submit(lost).await,
            Err(RunnerError::Schedule(SchedError::UnknownQueue(_)))
        ));
        shutdown.cancel();
        loop_task.await.unwrap();
    }
}
