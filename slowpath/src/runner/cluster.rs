//! The runner as one node of a cluster: several coordinators on one shared store (PostgreSQL).
//!
//! Two roles, in every node's runner:
//! - **Leader** (one node at a time, chosen by the store's leader row and told to the runner
//!   with [`RunnerOn::set_leader`]): keeps the scheduler over the live nodes' capacity
//!   ([`RunnerOn::set_members`]) and makes every admission a **placement**: QUEUED → ADMITTED
//!   with the node, the node's process (incarnation), the leader's epoch and a sequence number
//!   ([`Placement`]), written through [`JobBackend::update_as_leader`], which the store refuses
//!   once a newer leader exists. It also queues RETRY_WAIT jobs again when due and moves on the
//!   jobs of **lost nodes**: a job placed on a node whose lease lapsed, or whose process is not
//!   the one it was placed with (it restarted), is an infrastructure failure and goes to
//!   RETRY_WAIT (or FAILED past `max_infra_retries`), for another placement.
//! - **Node** (every runner): starts the jobs placed on it with its own incarnation, and writes
//!   their attempts' states only while the job still carries that placement
//!   ([`StoreError::MovedOn`] otherwise).
//!
//! Invariants, and why they hold:
//! 1. **Two attempts of one job never run at once.** A node starts an attempt only while its
//!    lease is valid by its own clock (the renewal's send time plus the lease, less a margin:
//!    [`RunnerOn::set_lease`]), and stops every attempt it runs when that time passes without
//!    a renewal. The database's lease end is later than that (it was computed from the
//!    database's `now()` when the renewal arrived), and the leader moves a node's jobs on only
//!    once the database says its lease lapsed. A node process that dies takes its attempts with
//!    it (the job shim), and its next process is a new incarnation, whose placements are new.
//! 2. **An old leader never admits or places.** Every leader write is fenced by the leader row
//!    in its own transaction (see `postgres::leader`).
//! 3. **Nothing is lost by a missed announcement.** Nodes learn of changes from the store's
//!    announcements ([`JobBackend::notices`]) and also look by themselves: a node at least
//!    every [`NODE_POLL`] for its placed jobs, a leader at least every [`RECONCILE`] over every
//!    live job, and both after the announcements' connection was lost.
//!
//! Any node takes submits (the job is durable and announced; the leader puts it in line),
//! cancels (a job running elsewhere is marked for its node to stop) and reads.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{RunnerConfig, RunnerError, RunnerOn, pending};
use crate::backend::JobBackend;
use crate::cluster::{JobNotice, LOG_END, LeaderFence, LogPiece, Member};
use crate::executor::{ExecError, Executor, InferenceExecutor, LogChunk, LogSource, LogStream};
use crate::job::JobState;
use crate::scheduler::{NodeCapacity, Scheduler};
use crate::store::{Change, FailureKind, JobRecord, Placement, StoreError};

/// How often a node looks for the jobs placed on it, whatever it was told.
pub const NODE_POLL: Duration = Duration::from_secs(2);

/// How often a leader compares its view with every live job in the store.
pub const RECONCILE: Duration = Duration::from_secs(5);

/// Placements written at once by a leader.
const PLACE_CONCURRENCY: usize = 16;

/// How often a reader of another node's attempt looks for more of its output.
const LOG_POLL: Duration = Duration::from_millis(200);

/// How long a reader waits for the end mark of an attempt that is over (its node may have died
/// before it could write the mark).
const LOG_END_GRACE: Duration = Duration::from_secs(3);

/// Pieces of output read from the store at once.
const LOG_PAGE: usize = 64;

/// This runner as a node of a cluster: its id and its process's incarnation (as registered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSelf {
    pub node: String,
    pub incarnation: String,
}

impl<B: JobBackend> RunnerOn<B> {
    /// A runner that is node `me` of a cluster sharing `store`; see the module documentation.
    /// It leads only once told so ([`RunnerOn::set_leader`]) and runs attempts only while it
    /// has a lease ([`RunnerOn::set_lease`]).
    pub fn in_cluster(
        store: B,
        exec: std::sync::Arc<dyn Executor>,
        inference: Option<std::sync::Arc<dyn InferenceExecutor>>,
        config: RunnerConfig,
        me: ClusterSelf,
    ) -> Result<Self, RunnerError> {
        Self::build(store, exec, inference, config, Some(me))
    }

    /// This node, when it is one of a cluster.
    pub fn cluster_self(&self) -> Option<&ClusterSelf> {
        self.inner.cluster.as_ref()
    }

    /// The leadership this runner holds now.
    pub fn leadership(&self) -> Option<LeaderFence> {
        self.inner.state.lock().leader.clone()
    }

    /// This node may run attempts until `until` (its lease's end by its own clock, less a
    /// margin); past it, every attempt it runs is stopped.
    pub fn set_lease(&self, until: tokio::time::Instant) {
        *self.inner.lease_until.lock() = Some(until);
        self.inner.wake.notify_one();
    }

    fn lease_valid(&self) -> bool {
        self.inner
            .lease_until
            .lock()
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }

    /// The live nodes, as the registry lists them now: where the leader places jobs (those
    /// that admit), and whose placements are still good (all of them).
    pub fn set_members(&self, members: &[Member]) {
        let mut state = self.inner.state.lock();
        state.members = members
            .iter()
            .map(|m| (m.node.clone(), m.incarnation.clone()))
            .collect();
        state.node_caps = members
            .iter()
            .filter(|m| m.admitting)
            .map(|m| NodeCapacity {
                id: m.node.clone(),
                capacity: m.capacity.clone(),
                slots: m.slots,
            })
            .collect();
        let caps = state.node_caps.clone();
        state.sched.set_nodes(caps);
        drop(state);
        self.inner.wake.notify_one();
    }

    /// Takes up (`Some`) or gives up (`None`) the leadership. A new fence makes a new view:
    /// every live job is read again; jobs placed on nodes that are gone are moved on at the
    /// next round.
    pub async fn set_leader(&self, fence: Option<LeaderFence>) -> Result<(), StoreError> {
        if self.inner.state.lock().leader == fence {
            return Ok(());
        }
        match fence {
            None => {
                self.step_down("the leadership passed");
                Ok(())
            }
            Some(fence) => self.take_over(fence).await,
        }
    }

    fn step_down(&self, why: &str) {
        let mut state = self.inner.state.lock();
        if let Some(old) = state.leader.take() {
            tracing::warn!(epoch = old.epoch, %why, "no longer the scheduler leader");
        }
        self.clear_view(&mut state);
    }

    /// Forgets the leader's view: an empty scheduler over the nodes as last set, no
    /// placements, retries or reasons.
    fn clear_view(&self, state: &mut super::State) {
        state.placements.clear();
        state.retries.clear();
        state.reasons.clear();
        state.parked.clear();
        // The configuration was accepted when the runner was built.
        if let Ok(mut sched) = Scheduler::new(self.inner.sched_config.clone()) {
            sched.set_nodes(state.node_caps.clone());
            state.sched = sched;
        }
    }

    async fn take_over(&self, fence: LeaderFence) -> Result<(), StoreError> {
        let live = self.inner.store.live().await?;
        let mut state = self.inner.state.lock();
        self.clear_view(&mut state);
        for rec in &live {
            Self::take_up(&mut state, rec);
        }
        state.leader = Some(fence.clone());
        drop(state);
        tracing::info!(
            epoch = fence.epoch,
            jobs = live.len(),
            "scheduler leader: took up the live jobs"
        );
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Puts one live job into the leader's view.
    fn take_up(state: &mut super::State, rec: &JobRecord) {
        match rec.state {
            JobState::Queued => state.enqueue(rec),
            JobState::RetryWait => {
                state
                    .retries
                    .insert((rec.retry_at_ms.unwrap_or(0), rec.id.clone()));
            }
            JobState::Admitted | JobState::Running => {
                let node = rec.placement.as_ref().map_or("", |p| p.node.as_str());
                if let Err(e) = state.sched.adopt_on(&pending(rec), node) {
                    tracing::warn!(job = %rec.id, error = %e, "cannot hold a placed job's resources");
                }
                state
                    .placements
                    .insert(rec.id.clone(), rec.placement.clone());
            }
            _ => {}
        }
    }

    /// The cluster's loop: the leader's rounds while it leads, this node's placed jobs, the
    /// store's announcements, and the lease. Returns when `shutdown` is cancelled.
    pub(super) async fn run_cluster(&self, shutdown: CancellationToken) {
        let mut notices = self.inner.store.notices();
        let mut last_poll = tokio::time::Instant::now() - NODE_POLL;
        let mut last_reconcile = tokio::time::Instant::now() - RECONCILE;
        loop {
            let now = tokio::time::Instant::now();
            self.check_lease();
            if now.duration_since(last_poll) >= NODE_POLL {
                last_poll = now;
                self.poll_here().await;
            }
            let mut next_retry = None;
            if let Some(fence) = self.leadership() {
                let reconciling = now.duration_since(last_reconcile) >= RECONCILE;
                if reconciling {
                    last_reconcile = now;
                    if let Err(e) = self.reconcile().await {
                        tracing::warn!(error = %e, "the leader's reconcile failed; trying again");
                    }
                }
                match self.lead_round(&fence).await {
                    Ok(next) => next_retry = next,
                    Err(StoreError::Fenced(why)) => self.step_down(&why),
                    Err(e) => {
                        tracing::error!(error = %e, "scheduling round failed; trying again");
                        next_retry = Some(self.inner.store.now_ms() + 1_000);
                    }
                }
                // Jobs other nodes finished are not in this store's expiry hint: the leader
                // also sweeps at each reconcile, whatever the hint says.
                if let Some(next) = self.sweep_expired(reconciling).await {
                    next_retry = Some(next_retry.map_or(next, |r: u64| r.min(next)));
                }
            }
            let mut sleep = NODE_POLL.min(RECONCILE);
            if let Some(at) = next_retry {
                sleep = sleep.min(Duration::from_millis(
                    at.saturating_sub(self.inner.store.now_ms()),
                ));
            }
            let wake_at = {
                let lease = *self.inner.lease_until.lock();
                let at = tokio::time::Instant::now() + sleep;
                match lease {
                    Some(l) if l > tokio::time::Instant::now() && !self.idle_here() => at.min(l),
                    _ => at,
                }
            };
            let notice = async {
                match notices.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep_until(wake_at) => {}
                notice = notice => match notice {
                    Some(n) => {
                        self.on_notice(n).await;
                        // More may be waiting: take them before the next round.
                        if let Some(rx) = notices.as_mut() {
                            while let Ok(n) = rx.try_recv() {
                                self.on_notice(n).await;
                            }
                        }
                    }
                    None => {
                        tracing::warn!("the store's job announcements ended; polling only");
                        notices = None;
                    }
                },
            }
        }
    }

    fn idle_here(&self) -> bool {
        self.inner.state.lock().here.is_empty()
    }

    /// Past the lease's end: stops every attempt this node runs (they are recorded as
    /// infrastructure failures, if the store still takes the write).
    fn check_lease(&self) {
        if self.lease_valid() {
            return;
        }
        let mut state = self.inner.state.lock();
        let ids: Vec<String> = state
            .here
            .keys()
            .filter(|id| !state.lease_stopped.contains(*id))
            .cloned()
            .collect();
        for id in ids {
            tracing::error!(job = %id, "this node's lease ran out: stopping the attempt");
            if let Some(token) = state.running.get(&id) {
                token.cancel();
            }
            state.lease_stopped.insert(id);
        }
    }

    /// Looks for the jobs placed on this node and starts or stops them.
    async fn poll_here(&self) {
        let Some(me) = self.inner.cluster.clone() else {
            return;
        };
        match self.inner.store.placed_on(&me.node).await {
            Ok(placed) => {
                for rec in placed {
                    self.consider_here(rec);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for the jobs placed here"),
        }
    }

    /// A job placed on this node: started if ADMITTED here and not running yet, stopped if a
    /// cancel was asked.
    fn consider_here(&self, rec: JobRecord) {
        let Some(me) = &self.inner.cluster else {
            return;
        };
        let Some(p) = rec.placement.clone() else {
            return;
        };
        if p.node != me.node || p.incarnation != me.incarnation {
            return;
        }
        let mut state = self.inner.state.lock();
        if let Some(token) = state.running.get(&rec.id) {
            if rec.cancel_requested {
                token.cancel();
            }
            return;
        }
        if rec.state != JobState::Admitted {
            return;
        }
        if !self.lease_valid() {
            tracing::warn!(job = %rec.id, "not starting a placed job: this node has no valid lease");
            return;
        }
        state
            .running
            .insert(rec.id.clone(), CancellationToken::new());
        state.here.insert(rec.id.clone(), p.clone());
        drop(state);
        let runner = self.clone();
        tokio::spawn(async move { runner.run_job(rec.id, Some(p)).await });
    }

    /// One announced change.
    async fn on_notice(&self, notice: JobNotice) {
        let (id, state, node, cancel) = match notice {
            JobNotice::Resync => {
                self.poll_here().await;
                if self.leadership().is_some()
                    && let Err(e) = self.reconcile().await
                {
                    tracing::warn!(error = %e, "the leader's reconcile failed");
                }
                return;
            }
            JobNotice::Changed {
                id,
                state,
                node,
                cancel_requested,
            } => (id, state, node, cancel_requested),
        };
        let me = self.inner.cluster.as_ref().map(|c| c.node.as_str());
        if node.as_deref() == me && me.is_some() && (state == JobState::Admitted || cancel) {
            match self.inner.store.get(&id).await {
                Ok(rec) => self.consider_here(rec),
                Err(e) => tracing::warn!(job = %id, error = %e, "cannot read a job placed here"),
            }
        }
        if self.leadership().is_none() {
            return;
        }
        match state {
            JobState::Queued => {
                let known = {
                    let s = self.inner.state.lock();
                    s.sched.is_waiting(&id) || s.placements.contains_key(&id)
                };
                if !known {
                    self.fetch_into_view(&id).await;
                }
            }
            JobState::RetryWait => {
                self.forget(&id);
                self.fetch_into_view(&id).await;
            }
            s if s.is_terminal() => self.forget(&id),
            _ => return,
        }
        self.inner.wake.notify_one();
    }

    /// The leader forgets job `id`: out of line, its place freed, no retry due.
    fn forget(&self, id: &str) {
        let mut state = self.inner.state.lock();
        state.sched.remove(id);
        state.sched.release(id);
        state.placements.remove(id);
        state.parked.remove(id);
        state.reasons.remove(id);
        state.retries.retain(|(_, r)| r != id);
    }

    async fn fetch_into_view(&self, id: &str) {
        match self.inner.store.get(id).await {
            Ok(rec) => {
                let mut state = self.inner.state.lock();
                if state.leader.is_some()
                    && !state.sched.is_waiting(id)
                    && !state.placements.contains_key(id)
                    && !state.retries.iter().any(|(_, r)| r == id)
                {
                    Self::take_up(&mut state, &rec);
                }
            }
            Err(StoreError::NotFound(_)) => {}
            Err(e) => tracing::warn!(job = %id, error = %e, "cannot read an announced job"),
        }
    }

    /// Compares the leader's view with every live job of the store and mends it.
    async fn reconcile(&self) -> Result<(), StoreError> {
        let index = self.inner.store.live_index().await?;
        let live: HashMap<&str, JobState> =
            index.iter().map(|e| (e.id.as_str(), e.state)).collect();
        let mut missing = Vec::new();
        {
            let mut state = self.inner.state.lock();
            if state.leader.is_none() {
                return Ok(());
            }
            let stale: Vec<String> = state
                .placements
                .keys()
                .filter(|id| {
                    !matches!(
                        live.get(id.as_str()),
                        Some(JobState::Admitted | JobState::Running)
                    )
                })
                .cloned()
                .collect();
            let retrying: std::collections::HashSet<String> =
                state.retries.iter().map(|(_, id)| id.clone()).collect();
            for e in &index {
                let known = match e.state {
                    JobState::Queued => {
                        state.sched.is_waiting(&e.id) || state.parked.contains_key(&e.id)
                    }
                    JobState::RetryWait => retrying.contains(&e.id),
                    _ => state.placements.contains_key(&e.id),
                };
                if !known && !stale.contains(&e.id) {
                    missing.push(e.id.clone());
                }
            }
            for id in stale {
                state.sched.release(&id);
                state.placements.remove(&id);
            }
            let gone: Vec<(u64, String)> = state
                .retries
                .iter()
                .filter(|(_, id)| live.get(id.as_str()) != Some(&JobState::RetryWait))
                .cloned()
                .collect();
            for r in gone {
                state.retries.remove(&r);
            }
        }
        for id in missing {
            self.fetch_into_view(&id).await;
        }
        Ok(())
    }

    /// One round of the leader: retries due, lost nodes' jobs moved on, placements. Returns
    /// when the next retry is due.
    async fn lead_round(&self, fence: &LeaderFence) -> Result<Option<u64>, StoreError> {
        let inner = &self.inner;
        let now = inner.store.now_ms();
        let due = inner.state.lock().take_due(now);
        for id in due {
            let change = Change::to(JobState::Queued, "queued again after backoff");
            match inner
                .store
                .update_as_leader(&id, fence, move |_| Ok(change))
                .await
            {
                Ok(rec) => inner.state.lock().enqueue(&rec),
                Err(e @ StoreError::Fenced(_)) => return Err(e),
                Err(e) => tracing::warn!(job = %id, error = %e, "a retry could not be queued"),
            }
        }
        let orphans: Vec<(String, Option<Placement>)> = {
            let state = inner.state.lock();
            state
                .placements
                .iter()
                .filter(|(_, p)| match p {
                    Some(p) => state.members.get(&p.node) != Some(&p.incarnation),
                    None => true,
                })
                .map(|(id, p)| (id.clone(), p.clone()))
                .collect()
        };
        for (id, placed) in orphans {
            self.move_on(fence, &id, placed).await?;
        }
        let placed: Vec<(String, String, String)> = {
            let mut state = inner.state.lock();
            let decision = state.sched.schedule();
            state.reasons = decision.waiting.into_iter().collect();
            let mut placed = Vec::new();
            for job in decision.admitted {
                let node = state.sched.node_of(&job.id).unwrap_or_default().to_owned();
                match state.members.get(&node).cloned() {
                    Some(incarnation) => placed.push((job.id, node, incarnation)),
                    // Placed on a node that left meanwhile: back in line.
                    None => {
                        state.sched.release(&job.id);
                        let _ = state.sched.enqueue(job);
                    }
                }
            }
            placed
        };
        let me = inner.cluster.as_ref().map(|c| c.node.clone());
        let results: Vec<_> = futures::stream::iter(placed)
            .map(|(id, node, incarnation)| {
                let fence = fence.clone();
                async move {
                    let place = Placement {
                        node: node.clone(),
                        incarnation,
                        epoch: fence.epoch,
                        seq: 0,
                    };
                    let change = Change {
                        place: Some(place),
                        ..Change::to(
                            JobState::Admitted,
                            format!("placed on node {node} by leader epoch {}", fence.epoch),
                        )
                    };
                    let r = self
                        .inner
                        .store
                        .update_as_leader(&id, &fence, move |_| Ok(change))
                        .await;
                    (id, r)
                }
            })
            .buffer_unordered(PLACE_CONCURRENCY)
            .collect()
            .await;
        let mut fenced = None;
        for (id, r) in results {
            match r {
                Ok(rec) => {
                    inner
                        .state
                        .lock()
                        .placements
                        .insert(id, rec.placement.clone());
                    if rec.placement.as_ref().map(|p| &p.node) == me.as_ref() {
                        self.consider_here(rec);
                    }
                }
                Err(e) => {
                    inner.state.lock().sched.release(&id);
                    match e {
                        StoreError::Fenced(_) => fenced = Some(e),
                        e => {
                            tracing::warn!(job = %id, error = %e, "a placement could not be written")
                        }
                    }
                }
            }
        }
        if let Some(e) = fenced {
            return Err(e);
        }
        Ok(inner.state.lock().retries.first().map(|(at, _)| *at))
    }

    /// A job placed on a node that is gone (its lease lapsed, or it is another process now):
    /// an infrastructure failure, to RETRY_WAIT or FAILED by the retry policy, or CANCELLED if
    /// a cancel was asked.
    async fn move_on(
        &self,
        fence: &LeaderFence,
        id: &str,
        placed: Option<Placement>,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let now = inner.store.now_ms();
        let expected = placed.clone();
        let result = inner
            .store
            .update_as_leader(id, fence, |rec| {
                if rec.placement != expected
                    || !matches!(rec.state, JobState::Admitted | JobState::Running)
                {
                    return Err(StoreError::MovedOn {
                        id: rec.id.clone(),
                        why: format!("it is {} now", rec.state),
                    });
                }
                let where_ = match &expected {
                    Some(p) => format!("node {} was lost", p.node),
                    None => "it was placed on no node (admitted before the cluster)".into(),
                };
                if rec.cancel_requested {
                    return Ok(Change::to(
                        JobState::Cancelled,
                        format!("cancelled; {where_}"),
                    ));
                }
                let decision = {
                    let mut state = inner.state.lock();
                    inner.retry.on_failure(
                        FailureKind::Infrastructure,
                        rec.app_failures,
                        rec.infra_failures,
                        rec.spec.max_retries,
                        now,
                        &mut state.jitter,
                    )
                };
                let what = format!("{where_} during attempt {}", rec.attempt.max(1));
                Ok(super::failed_attempt(
                    &decision,
                    FailureKind::Infrastructure,
                    None,
                    &what,
                ))
            })
            .await;
        match result {
            Ok(rec) => {
                tracing::warn!(job = %id, state = %rec.state, reason = %rec.reason, "moved a lost node's job on");
                let mut state = inner.state.lock();
                state.sched.release(id);
                state.placements.remove(id);
                if rec.state == JobState::RetryWait {
                    state
                        .retries
                        .insert((rec.retry_at_ms.unwrap_or(now), id.to_owned()));
                }
                Ok(())
            }
            Err(e @ StoreError::Fenced(_)) => Err(e),
            Err(e) => {
                // It moved on by itself (ended, or another change came first): the view
                // follows the store.
                tracing::debug!(job = %id, error = %e, "a lost node's job had moved on");
                {
                    let mut state = inner.state.lock();
                    state.sched.release(id);
                    state.placements.remove(id);
                }
                self.fetch_into_view(id).await;
                Ok(())
            }
        }
    }

    /// Copies the output of attempt `attempt` of job `id`, running here, into the store as it
    /// comes, then an end mark, so that any node can serve it. Best effort: a piece the store
    /// does not take after three tries is skipped with a warning; the attempt never waits for
    /// it.
    pub(super) fn ship_logs(&self, id: &str, attempt: u32) {
        let runner = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let mut stream = runner.inner.exec.logs(&id, attempt, true);
            let mut seq = 0u32;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        runner
                            .store_piece(&id, attempt, seq, c.source.as_str(), &c.data)
                            .await;
                        seq += 1;
                    }
                    Err(e) => {
                        tracing::warn!(job = %id, attempt, error = %e, "an attempt's output could not be read for the store");
                        break;
                    }
                }
            }
            runner.store_piece(&id, attempt, seq, LOG_END, &[]).await;
        });
    }

    async fn store_piece(&self, id: &str, attempt: u32, seq: u32, stream: &str, data: &[u8]) {
        let mut pause = Duration::from_millis(200);
        for _ in 0..3 {
            match self
                .inner
                .store
                .append_log(id, attempt, seq, stream, data)
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(job = %id, attempt, seq, error = %e, "a piece of output could not be stored; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        tracing::warn!(job = %id, attempt, seq, "a piece of output was not stored: other nodes will not show it");
    }

    /// The output of attempt `attempt` of job `rec`: from the executor when it ran on this
    /// node (always on a single node), from the store when another node ran it. With `follow`,
    /// what comes until the attempt ends.
    pub fn logs(&self, rec: &JobRecord, attempt: u32, follow: bool) -> LogStream {
        let elsewhere = match (&self.inner.cluster, &rec.placement) {
            (Some(me), Some(p)) => p.node != me.node,
            _ => false,
        };
        if !elsewhere {
            return self.inner.exec.logs(&rec.id, attempt, follow);
        }
        let state = StoredLogs {
            runner: self.clone(),
            id: rec.id.clone(),
            attempt,
            follow,
            after: None,
            pieces: std::collections::VecDeque::new(),
            over_since: None,
            done: false,
        };
        Box::pin(futures::stream::unfold(state, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        }))
    }
}

/// A reader of an attempt's output kept in the store by the node that ran it.
struct StoredLogs<B> {
    runner: RunnerOn<B>,
    id: String,
    attempt: u32,
    follow: bool,
    after: Option<u32>,
    pieces: std::collections::VecDeque<LogPiece>,
    /// Since when the attempt is known to be over (for [`LOG_END_GRACE`]).
    over_since: Option<tokio::time::Instant>,
    done: bool,
}

impl<B: JobBackend> StoredLogs<B> {
    async fn next(&mut self) -> Option<Result<LogChunk, ExecError>> {
        let store = &self.runner.inner.store;
        loop {
            if let Some(p) = self.pieces.pop_front() {
                let source = match p.stream.as_str() {
                    LOG_END => {
                        self.done = true;
                        return None;
                    }
                    "stderr" => LogSource::Stderr,
                    "combined" => LogSource::Combined,
                    _ => LogSource::Stdout,
                };
                return Some(Ok(LogChunk {
                    source,
                    data: p.data,
                }));
            }
            if self.done {
                return None;
            }
            match store
                .read_logs(&self.id, self.attempt, self.after, LOG_PAGE)
                .await
            {
                Ok(pieces) if !pieces.is_empty() => {
                    self.after = pieces.last().map(|p| p.seq);
                    self.pieces.extend(pieces);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(ExecError::Backend(format!(
                        "the output kept in the job database cannot be read: {e}"
                    ))));
                }
            }
            if !self.follow {
                return None;
            }
            let over = match store.get(&self.id).await {
                Ok(r) => {
                    r.attempt != self.attempt
                        || !matches!(r.state, JobState::Admitted | JobState::Running)
                }
                Err(_) => true,
            };
            if over {
                let since = *self
                    .over_since
                    .get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= LOG_END_GRACE {
                    return None;
                }
            }
            tokio::time::sleep(LOG_POLL).await;
        }
    }
}
