//! The job store: jobs as durable records over a [`veraltheim_storage::Store`].
//!
//! Four tables:
//! - `slowpath.jobs`: id → [`JobRecord`];
//! - `slowpath.idempotency`: idempotency key → id;
//! - `slowpath.active`: id → `()` for every job not yet in a terminal state, so that
//!   [`JobStore::recover`] reads the live jobs only, not the whole history;
//! - `slowpath.expiry`: `<expiry ms, 16 digits><id>` → `()` for every finished job with a TTL
//!   (`ttl_seconds_after_finished`), written in the same commit as its terminal state, so that
//!   [`JobStore::delete_expired`] reads only what is due, in time order.
//!
//! Ids are time ordered: 16 digits of milliseconds since the Unix epoch and 4 digits of a counter
//! (`00017330000000000000` is the first job of its millisecond), so listing in id order is listing in submission order.
//!
//! Every state change goes through [`JobState::transition`] inside [`JobStore::update`]; a write
//! is returned to the caller only after the store's commit future resolved (durable under
//! `Durability::Immediate`). Writes to one job (and submits with one idempotency key) are
//! serialized by one of [`LOCK_SHARDS`] async mutexes chosen by hashing the id (or key), held
//! across the commit, so a read-modify-write never loses a concurrent change, while writes to
//! different jobs commit concurrently and share the store's group commits.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use veraltheim_storage::{Batch, StorageError, Store, Table};

use crate::job::{JobError, JobSpec, JobState};

/// Jobs by id.
pub const JOBS: Table<str, JobRecord> = Table::new("slowpath.jobs");
/// Job ids by idempotency key.
pub const IDEMPOTENCY: Table<str, String> = Table::new("slowpath.idempotency");
/// The ids of the jobs not yet terminal.
pub const ACTIVE: Table<str, ()> = Table::new("slowpath.active");
/// Finished jobs with a TTL, keyed by [`expiry_key`]: when they expire, then their id.
pub const EXPIRY: Table<str, ()> = Table::new("slowpath.expiry");

/// The key of a finished job in [`EXPIRY`]: 16 digits of its expiry time (ms), then its id.
pub fn expiry_key(expires_ms: u64, id: &str) -> String {
    format!("{expires_ms:016}{id}")
}

/// When a finished job expires: its finish time plus its TTL; `None` while it is not finished
/// or when it has no TTL.
pub fn expires_ms(rec: &JobRecord) -> Option<u64> {
    let ttl = rec.spec.ttl_seconds_after_finished?;
    let finished = rec.finished_ms.filter(|_| rec.state.is_terminal())?;
    Some(finished.saturating_add(ttl.saturating_mul(1000)))
}

/// What one [`JobStore::delete_expired`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// The jobs deleted, in expiry order.
    pub deleted: Vec<String>,
    /// When the next job expires (it may already be due when more were due than one call
    /// deletes); `None` when no finished job has a TTL.
    pub next_ms: Option<u64>,
}

/// The default and the largest page of [`JobStore::list`].
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The largest page of [`JobStore::list`]; larger requests are cut to it.
pub const MAX_PAGE_SIZE: usize = 1000;
/// The most bytes of jobs (their specs' text and reasons, see [`JobRecord::wire_bytes`]) one
/// page of [`JobStore::list`] holds: a page ends at this many bytes or at its size, whichever
/// comes first, so a few jobs with large labels cannot make every page too large for a client
/// to receive (gRPC clients refuse messages above 4 MiB by default). A page always holds at
/// least one job, so a job larger than the budget (stored before the spec limits) still lists.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// Why an attempt failed: the job's own failure (a non-zero exit code) or the infrastructure's
/// (the process could not start, the coordinator restarted, a pod was evicted). The two are
/// counted apart, so that an unlucky node does not use up a job's own retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureKind {
    Application,
    Infrastructure,
}

/// One entry of a job's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub state: JobState,
    pub time_ms: u64,
    pub reason: String,
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    /// Why the job is in its state, for people.
    pub reason: String,
    /// Attempts started so far (0 until the job first runs).
    pub attempt: u32,
    pub created_ms: u64,
    /// When the latest attempt started running.
    pub started_ms: Option<u64>,
    /// When the job reached a terminal state.
    pub finished_ms: Option<u64>,
    pub exit_code: Option<i32>,
    /// Attempts that failed through the job's own fault.
    pub app_failures: u32,
    /// Attempts that failed through the infrastructure's fault.
    pub infra_failures: u32,
    /// In RETRY_WAIT: when the job may be queued again.
    pub retry_at_ms: Option<u64>,
    pub history: Vec<HistoryEntry>,
    /// The W3C `traceparent` the job was submitted under, if any: its attempts' spans continue
    /// that trace. Kept out of the spec, so that a retried submit under a new trace is still
    /// the same request for its idempotency key. Records written before the field existed read
    /// as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Where the job was last admitted, when a cluster's leader placed it (see
    /// [`Placement`]); `None` on a single node. Kept after the attempt ends: it says where the
    /// last attempt ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// A cancel was asked on a node other than the one running the job: that node stops the
    /// attempt and writes CANCELLED.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// Its pauses (see [`crate::pressure`]): whether its running attempt is paused now, and
    /// the time paused so far. Records written before the field existed read as never paused.
    #[serde(default, skip_serializing_if = "Pauses::is_empty")]
    pub pauses: Pauses,
}

/// A job's pauses: a running local command job is paused (SIGSTOP of its process group) while
/// a latency objective of the fast path is at risk, and resumed after; its state stays RUNNING
/// meanwhile. Every write that moves the job out of RUNNING closes a pause still open.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pauses {
    /// Set while the running attempt is paused: since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// While paused: why (the objective at risk).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Time the job spent paused, over all its attempts, pauses that ended only (see
    /// [`Pauses::total_ms`]).
    #[serde(default)]
    pub paused_ms: u64,
    /// How many times it was paused.
    #[serde(default)]
    pub count: u32,
}

impl Pauses {
    pub fn is_empty(&self) -> bool {
        *self == Pauses::default()
    }

    /// Whether the running attempt is paused now.
    pub fn is_paused(&self) -> bool {
        self.since_ms.is_some()
    }

    /// The time paused by `now`, a pause still open included.
    pub fn total_ms(&self, now: u64) -> u64 {
        let open = self.since_ms.map_or(0, |since| now.saturating_sub(since));
        self.paused_ms.saturating_add(open)
    }

    /// Ends a pause still open at `now`; whether one was.
    fn close(&mut self, now: u64) -> bool {
        let Some(since) = self.since_ms.take() else {
            return false;
        };
        self.paused_ms = self.paused_ms.saturating_add(now.saturating_sub(since));
        self.reason.clear();
        true
    }
}

/// Where a cluster's leader placed a job, and under which leadership. A node writes the
/// outcome of an attempt only while the job still carries the placement it started it under
/// (same node and `seq`), so that once the leader has moved the job on (its node lost), a late
/// write of the old attempt is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The node it was placed on.
    pub node: String,
    /// That node's process when it was placed (its registry incarnation): a node that restarts
    /// is a new incarnation, and its old placements are orphans.
    pub incarnation: String,
    /// The leader epoch that placed it.
    pub epoch: u64,
    /// The job's placements so far, this one included.
    pub seq: u32,
}

impl JobRecord {
    /// About the bytes this job takes in a `ListJobs` answer: its spec's text, its reason and a
    /// fixed allowance for the numbers and field tags.
    pub fn wire_bytes(&self) -> usize {
        self.spec.text_bytes() + self.reason.len() + self.id.len() + 128
    }
}

/// One state change asked of [`JobStore::update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub to: JobState,
    pub reason: String,
    /// The exit code of the attempt that ended, if one did.
    pub exit_code: Option<i32>,
    /// Counted when the change records a failed attempt.
    pub failure: Option<FailureKind>,
    /// For RETRY_WAIT: when to queue the job again.
    pub retry_at_ms: Option<u64>,
    /// For ADMITTED in a cluster: where the leader placed the job (its `seq` is set by the
    /// change: one more than the job's last).
    pub place: Option<Placement>,
}

impl Change {
    /// A change to `to` for `reason`, with nothing else recorded.
    pub fn to(to: JobState, reason: impl Into<String>) -> Self {
        Self {
            to,
            reason: reason.into(),
            exit_code: None,
            failure: None,
            retry_at_ms: None,
            place: None,
        }
    }
}

/// Which jobs [`JobStore::list`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Jobs in any of these states; empty: any state.
    pub states: BTreeSet<JobState>,
    /// Jobs of this queue only.
    pub queue: Option<String>,
    /// Jobs carrying every one of these labels with these values.
    pub labels: BTreeMap<String, String>,
    /// Jobs of this tenant only ([`crate::job::Owner`]); jobs submitted without one are not
    /// its.
    pub tenant: Option<String>,
    /// Most jobs per page: 0 means [`DEFAULT_PAGE_SIZE`], above [`MAX_PAGE_SIZE`] is cut to it.
    pub page_size: usize,
    /// The `next_token` of the previous page; empty for the first page.
    pub page_token: String,
    /// The newest jobs first (descending ids, which grow with submission time); the page
    /// token then leads to older jobs. Default: oldest first.
    pub newest_first: bool,
}

impl ListFilter {
    pub(crate) fn matches(&self, rec: &JobRecord) -> bool {
        (self.states.is_empty() || self.states.contains(&rec.state))
            && self.queue.as_ref().is_none_or(|q| *q == rec.spec.queue)
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| rec.spec.owner.as_ref().is_some_and(|o| o.tenant == *t))
            && self
                .labels
                .iter()
                .all(|(k, v)| rec.spec.labels.get(k) == Some(v))
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("no job with id '{0}'")]
    NotFound(String),
    #[error("idempotency key '{key}' was already used by job {existing} with a different spec")]
    IdempotencyConflict { key: String, existing: String },
    #[error("page token '{0}' is not one this service gave out")]
    InvalidPageToken(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The job database cannot be reached now (connection lost or refused, pool exhausted,
    /// the server shutting down): nothing was acknowledged; the caller may try again later.
    #[error("the job database is unavailable: {0}")]
    Unavailable(String),
    /// The job database's schema is newer than this binary knows: it was upgraded by a newer
    /// release, whose data this one could misread.
    #[error(
        "the job database has schema version {found}, newer than this binary knows (version {known}): run a newer veraltheim, or point it at another database"
    )]
    SchemaTooNew { found: i32, known: i32 },
    /// A write refused because its writer no longer holds the right to make it: a leader
    /// whose epoch has passed, or a node whose placement of the job was moved on.
    #[error("write refused: {0}")]
    Fenced(String),
    /// A node's write about an attempt the job no longer carries: the leader placed the job
    /// anew (its node was lost) or another change came first.
    #[error("job {id} moved on: {why}")]
    MovedOn { id: String, why: String },
    /// The job database refused a statement for another reason (a bug or a damaged schema).
    #[error("job database error: {0}")]
    Database(String),
}

/// Milliseconds since the Unix epoch; replaceable in tests.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock in milliseconds since the Unix epoch.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    })
}

/// Where a spec's idempotency key is kept: the key itself, or, for a job with an owner, the key
/// within its tenant (`tenant` NUL `key`), so that tenants never see each other's keys (nor the
/// ids of each other's jobs in a conflict).
pub(crate) fn idempotency_slot(spec: &JobSpec) -> Option<String> {
    let key = spec.idempotency_key.as_ref()?;
    Some(match &spec.owner {
        Some(owner) => format!("{}\0{key}", owner.tenant),
        None => key.clone(),
    })
}

/// Is `s` shaped like an id this store gives out (20 digits)?
pub(crate) fn is_id(s: &str) -> bool {
    s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// How many locks serialize writers; see the module documentation.
pub const LOCK_SHARDS: usize = 64;

/// Told of every job record once it is durable, in commit order for each job (it runs while the
/// job's write lock is held); it must be quick and must not block (forward to a channel).
pub type Observer = Arc<dyn Fn(&JobRecord) + Send + Sync>;

/// Durable jobs. See the module documentation.
pub struct JobStore<S> {
    store: S,
    clock: Clock,
    observer: Option<Observer>,
    /// The id generator.
    ids: IdGen,
    /// Writers of one job or one idempotency key hold the lock of its shard across the commit.
    locks: Box<[tokio::sync::Mutex<()>]>,
    /// No finished job expires before this (ms); `u64::MAX`: none does. 0 until the first
    /// [`JobStore::delete_expired`] has read the expiry table.
    next_expiry: AtomicU64,
}

/// Gives out ids: 16 digits of milliseconds and 4 of a counter, each later than the one before.
#[derive(Default)]
pub(crate) struct IdGen(parking_lot::Mutex<IdState>);

#[derive(Default)]
struct IdState {
    last_ms: u64,
    seq: u32,
}

impl IdGen {
    /// A new id, later than every id this generator gave out.
    pub(crate) fn next(&self, now: u64) -> String {
        let mut ids = self.0.lock();
        if now > ids.last_ms {
            ids.last_ms = now;
            ids.seq = 0;
        } else if ids.seq >= 9999 {
            ids.last_ms += 1;
            ids.seq = 0;
        } else {
            ids.seq += 1;
        }
        format!("{:016}{:04}", ids.last_ms, ids.seq)
    }
}

impl<S: Store> JobStore<S> {
    /// A job store over `store` with the system clock.
    pub fn new(store: S) -> Self {
        Self::with_clock(store, system_clock())
    }

    /// A job store over `store` reading time from `clock`.
    pub fn with_clock(store: S, clock: Clock) -> Self {
        Self {
            store,
            clock,
            observer: None,
            ids: IdGen::default(),
            locks: (0..LOCK_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            next_expiry: AtomicU64::new(0),
        }
    }

    /// Calls `observer` with every record written from now on (state changes as they happen,
    /// e.g. to publish them as events).
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    fn notify(&self, rec: &JobRecord) {
        if let Some(observer) = &self.observer {
            observer(rec);
        }
    }

    fn shard_of(&self, name: &str) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        (h.finish() % self.locks.len() as u64) as usize
    }

    fn lock_of(&self, name: &str) -> &tokio::sync::Mutex<()> {
        &self.locks[self.shard_of(name)]
    }

    /// A new id, later than every id this store gave out since it was opened.
    fn next_id(&self, now: u64) -> String {
        self.ids.next(now)
    }

    /// The underlying store.
    pub fn inner(&self) -> &S {
        &self.store
    }

    /// Now, by this store's clock.
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    /// Validates `spec`, stores it as a QUEUED job and returns the job once durable. A spec with
    /// an idempotency key already used returns the job first submitted with it, unchanged; if
    /// that job's spec differs, the submit fails with [`StoreError::IdempotencyConflict`].
    pub async fn submit(&self, spec: JobSpec) -> Result<JobRecord, StoreError> {
        self.submit_traced(spec, None).await
    }

    /// [`JobStore::submit`], keeping the caller's W3C `traceparent` with the job
    /// ([`JobRecord::traceparent`]).
    pub async fn submit_traced(
        &self,
        spec: JobSpec,
        traceparent: Option<String>,
    ) -> Result<JobRecord, StoreError> {
        spec.validate()?;
        // Submits with the same idempotency key are serialized; without a key, nothing is shared.
        let slot = idempotency_slot(&spec);
        let _guard = match &slot {
            Some(slot) => Some(self.lock_of(slot).lock().await),
            None => None,
        };
        if let (Some(key), Some(slot)) = (&spec.idempotency_key, &slot)
            && let Some(existing) = IDEMPOTENCY.get(&self.store, slot.as_str())?
        {
            let rec = JOBS
                .get(&self.store, existing.as_str())?
                .ok_or_else(|| StoreError::NotFound(existing.clone()))?;
            return if rec.spec == spec {
                Ok(rec)
            } else {
                Err(StoreError::IdempotencyConflict {
                    key: key.clone(),
                    existing,
                })
            };
        }
        let now = self.now_ms();
        let id = loop {
            let id = self.next_id(now);
            // After a restart with a clock that went back, skip ids already taken.
            if JOBS.get(&self.store, id.as_str())?.is_none() {
                break id;
            }
        };
        let rec = new_record(id.clone(), spec, now, traceparent);
        let mut batch = Batch::new();
        batch.put(&JOBS, id.as_str(), &rec)?;
        batch.put(&ACTIVE, id.as_str(), &())?;
        if let Some(slot) = &slot {
            batch.put(&IDEMPOTENCY, slot.as_str(), &id)?;
        }
        self.store.commit(batch).await?;
        self.notify(&rec);
        Ok(rec)
    }

    /// The job with `id`.
    pub fn get(&self, id: &str) -> Result<JobRecord, StoreError> {
        JOBS.get(&self.store, id)?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    /// One page of the jobs matching `filter`, in id (submission) order, and the token of the
    /// next page: `None` once the end is reached (a full page's token may lead to an empty
    /// page). A token is the last id of its page, so pages stay stable as jobs are added.
    pub fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<(Vec<JobRecord>, Option<String>), StoreError> {
        let page_size = match filter.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        if !filter.page_token.is_empty() && !is_id(&filter.page_token) {
            return Err(StoreError::InvalidPageToken(filter.page_token.clone()));
        }
        let mut after = filter.page_token.clone();
        let mut page = Vec::new();
        let mut page_bytes = 0usize;
        let chunk = page_size.max(64);
        loop {
            let past = if after.is_empty() {
                Bound::Unbounded
            } else {
                Bound::Excluded(after.as_str())
            };
            let rows = if filter.newest_first {
                JOBS.range_limit_back(&self.store, (Bound::Unbounded, past), chunk)?
            } else {
                JOBS.range_limit(&self.store, (past, Bound::Unbounded), chunk)?
            };
            let exhausted = rows.len() < chunk;
            for (id, rec) in rows {
                after = id;
                if filter.matches(&rec) {
                    let bytes = rec.wire_bytes();
                    if !page.is_empty() && page_bytes.saturating_add(bytes) > MAX_PAGE_BYTES {
                        // This job opens the next page: the token is the last id of this one.
                        let last = page.last().map(|r: &JobRecord| r.id.clone());
                        return Ok((page, last));
                    }
                    page_bytes = page_bytes.saturating_add(bytes);
                    page.push(rec);
                    if page.len() == page_size {
                        return Ok((page, Some(after)));
                    }
                }
            }
            if exhausted {
                return Ok((page, None));
            }
        }
    }

    /// Applies the change `f` asks for, given the job as it is now: the state moves through
    /// [`JobState::transition`] (an illegal edge fails and writes nothing), the change is added
    /// to the history and written; returns the job as written, once durable.
    pub async fn update<F>(&self, id: &str, f: F) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError>,
    {
        let _guard = self.lock_of(id).lock().await;
        let mut rec = self.get(id)?;
        let change = f(&rec)?;
        let now = self.now_ms();
        apply(&mut rec, change, now)?;
        self.write_record(&rec).await?;
        Ok(rec)
    }

    /// Marks job `id`'s running attempt paused for `why` (`Some`) or resumed (`None`), by this
    /// store's clock, and returns the job as it is after. Not a change of state: nothing is
    /// added to the history and the observer is not called (the runner tells of pauses
    /// itself). Returns the job as written, or `None` when nothing changed: a job that is not
    /// RUNNING, or already so, or (with `placed`) no longer placed so, is left as it is.
    pub async fn mark_paused(
        &self,
        id: &str,
        why: Option<&str>,
        placed: Option<&Placement>,
    ) -> Result<Option<JobRecord>, StoreError> {
        let _guard = self.lock_of(id).lock().await;
        let mut rec = self.get(id)?;
        if !mark_pause(&mut rec, why, placed, self.now_ms()) {
            return Ok(None);
        }
        let mut batch = Batch::new();
        batch.put(&JOBS, rec.id.as_str(), &rec)?;
        self.store.commit(batch).await?;
        Ok(Some(rec))
    }

    /// [`JobStore::update`] to `to` for `reason`.
    pub async fn transition(
        &self,
        id: &str,
        to: JobState,
        reason: impl Into<String>,
    ) -> Result<JobRecord, StoreError> {
        let change = Change::to(to, reason);
        self.update(id, |_| Ok(change)).await
    }

    /// Run once at start, before scheduling: puts every job that was admitted or running when
    /// the coordinator stopped back in line (RUNNING → RETRY_WAIT → QUEUED, ADMITTED → QUEUED,
    /// with the reason "coordinator restarted; attempt N+1"), and returns every live job (QUEUED
    /// or RETRY_WAIT) in id order for the scheduler to take up. A command that was running is
    /// therefore run again: commands are executed at least once, not exactly once. A restart
    /// is not counted as a failure of the job.
    pub async fn recover(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.recover_with(false).await
    }

    /// [`JobStore::recover`] for an executor that re-attaches to running attempts (Kubernetes):
    /// RUNNING jobs stay RUNNING, for the runner to adopt (or put back in line if their attempt
    /// is gone); ADMITTED jobs are put back in line as by `recover`.
    pub async fn recover_adopting(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.recover_with(true).await
    }

    /// Every live job as it is (nothing changed).
    pub fn live(&self) -> Result<Vec<JobRecord>, StoreError> {
        let active = ACTIVE.range(&self.store, ..)?;
        let mut live = Vec::with_capacity(active.len());
        for (id, ()) in active {
            if let Some(rec) = JOBS.get(&self.store, id.as_str())?
                && !rec.state.is_terminal()
            {
                live.push(rec);
            }
        }
        Ok(live)
    }

    async fn recover_with(&self, keep_running: bool) -> Result<Vec<JobRecord>, StoreError> {
        let active = ACTIVE.range(&self.store, ..)?;
        let mut live = Vec::with_capacity(active.len());
        let now = self.now_ms();
        for (id, ()) in active {
            let _guard = self.lock_of(&id).lock().await;
            let Some(mut rec) = JOBS.get(&self.store, id.as_str())? else {
                continue;
            };
            let reason = format!("coordinator restarted; attempt {}", rec.attempt + 1);
            let changed = match rec.state {
                JobState::Running if !keep_running => {
                    apply(
                        &mut rec,
                        Change::to(JobState::RetryWait, reason.clone()),
                        now,
                    )?;
                    apply(&mut rec, Change::to(JobState::Queued, reason), now)?;
                    true
                }
                JobState::Admitted => {
                    apply(&mut rec, Change::to(JobState::Queued, reason), now)?;
                    true
                }
                _ => false,
            };
            if changed {
                self.write_record(&rec).await?;
            }
            if !rec.state.is_terminal() {
                live.push(rec);
            }
        }
        Ok(live)
    }

    async fn write_record(&self, rec: &JobRecord) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        batch.put(&JOBS, rec.id.as_str(), rec)?;
        if rec.state.is_terminal() {
            batch.delete(&ACTIVE, rec.id.as_str())?;
        }
        let expires = expires_ms(rec);
        if let Some(at) = expires {
            batch.put(&EXPIRY, expiry_key(at, &rec.id).as_str(), &())?;
        }
        self.store.commit(batch).await?;
        if let Some(at) = expires {
            // After the commit: a sweep that starts later sees the entry, one that started
            // earlier sees this lower bound (see `delete_expired`).
            self.next_expiry.fetch_min(at, Ordering::AcqRel);
        }
        self.notify(rec);
        Ok(())
    }

    /// When the next finished job expires, as far as this store knows without reading: `None`
    /// when none does; `Some(0)` before the first [`JobStore::delete_expired`].
    pub fn next_expiry_ms(&self) -> Option<u64> {
        match self.next_expiry.load(Ordering::Acquire) {
            u64::MAX => None,
            at => Some(at),
        }
    }

    /// Deletes up to `limit` finished jobs whose TTL ran out by `now_ms` (their record, their
    /// expiry entry and their idempotency key, which becomes free again) in one commit, and
    /// says which, and when the next one expires. Jobs that are not finished are never
    /// deleted: only a terminal write adds an expiry entry, and terminal states are final.
    pub async fn delete_expired(&self, now_ms: u64, limit: usize) -> Result<Expired, StoreError> {
        // Reset before reading: a job finishing from now on lowers it again after its commit,
        // so no expiry is lost between the read below and the update at the end.
        self.next_expiry.store(u64::MAX, Ordering::Release);
        let upper = format!("{:016}", now_ms.saturating_add(1));
        let due = match EXPIRY.range_limit(
            &self.store,
            (Bound::Unbounded, Bound::Excluded(upper.as_str())),
            limit.max(1),
        ) {
            Ok(due) => due,
            Err(e) => {
                self.next_expiry.store(0, Ordering::Release);
                return Err(e.into());
            }
        };
        let result = self.delete_due(due).await;
        let next = EXPIRY.range_limit(&self.store, .., 1).map(|first| {
            first
                .first()
                .and_then(|(key, ())| parse_expiry_key(key).map(|(at, _)| at))
        });
        match (&result, next) {
            (Ok(_), Ok(next)) => {
                self.next_expiry
                    .fetch_min(next.unwrap_or(u64::MAX), Ordering::AcqRel);
            }
            // Unknown: look again next time.
            _ => self.next_expiry.store(0, Ordering::Release),
        }
        let deleted = result?;
        Ok(Expired {
            deleted,
            next_ms: self.next_expiry_ms(),
        })
    }

    async fn delete_due(&self, due: Vec<(String, ())>) -> Result<Vec<String>, StoreError> {
        let mut batch = Batch::new();
        let mut deleted = Vec::with_capacity(due.len());
        let mut keys = Vec::new();
        for (key, ()) in due {
            batch.delete(&EXPIRY, key.as_str())?;
            let Some((_, id)) = parse_expiry_key(&key) else {
                tracing::warn!(key, "a malformed expiry entry was dropped");
                continue;
            };
            let Some(rec) = JOBS.get(&self.store, id)? else {
                continue;
            };
            if !rec.state.is_terminal() {
                // Cannot happen (only terminal writes add entries); keep the job regardless.
                continue;
            }
            batch.delete(&JOBS, id)?;
            if let Some(k) = idempotency_slot(&rec.spec) {
                keys.push((k, id.to_owned()));
            }
            deleted.push(id.to_owned());
        }
        // A submit with one of these keys must see the job and its key entry both, or neither:
        // hold the keys' shards (each once, in order, so no two holders wait on each other)
        // across the commit.
        let mut shards: Vec<usize> = keys.iter().map(|(k, _)| self.shard_of(k)).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut guards = Vec::with_capacity(shards.len());
        for shard in shards {
            guards.push(self.locks[shard].lock().await);
        }
        for (key, id) in keys {
            // The key may be another job's by now only if this one was deleted before; check.
            if IDEMPOTENCY.get(&self.store, key.as_str())?.as_deref() == Some(id.as_str()) {
                batch.delete(&IDEMPOTENCY, key.as_str())?;
            }
        }
        if !batch.is_empty() {
            self.store.commit(batch).await?;
        }
        drop(guards);
        Ok(deleted)
    }
}

/// `(expiry ms, id)` of an [`EXPIRY`] key.
fn parse_expiry_key(key: &str) -> Option<(u64, &str)> {
    let (at, id) = (key.get(..16)?, key.get(16..)?);
    let at = at.parse().ok()?;
    is_id(id).then_some((at, id))
}

/// A job just submitted: QUEUED at `now`, its history that one entry.
pub(crate) fn new_record(
    id: String,
    spec: JobSpec,
    now: u64,
    traceparent: Option<String>,
) -> JobRecord {
    JobRecord {
        id,
        state: JobState::Queued,
        reason: "submitted".into(),
        attempt: 0,
        created_ms: now,
        started_ms: None,
        finished_ms: None,
        exit_code: None,
        app_failures: 0,
        infra_failures: 0,
        retry_at_ms: None,
        history: vec![HistoryEntry {
            state: JobState::Queued,
            time_ms: now,
            reason: "submitted".into(),
        }],
        spec,
        traceparent,
        placement: None,
        cancel_requested: false,
        pauses: Pauses::default(),
    }
}

/// Marks the running attempt of `rec` paused at `now` for `why` (`Some`), or resumed (`None`);
/// whether that changed the record. A job that is not RUNNING, or already so, or (with
/// `placed`) no longer carrying that placement (its attempt here is no longer its current one),
/// is left as it is.
pub(crate) fn mark_pause(
    rec: &mut JobRecord,
    why: Option<&str>,
    placed: Option<&Placement>,
    now: u64,
) -> bool {
    if rec.state != JobState::Running || placed.is_some_and(|p| rec.placement.as_ref() != Some(p)) {
        return false;
    }
    match why {
        Some(_) if rec.pauses.is_paused() => false,
        Some(why) => {
            rec.pauses.since_ms = Some(now);
            rec.pauses.reason = why.to_owned();
            rec.pauses.count = rec.pauses.count.saturating_add(1);
            true
        }
        None => rec.pauses.close(now),
    }
}

/// Applies `change` to `rec` at `now`: the only place a stored job's state changes.
pub(crate) fn apply(rec: &mut JobRecord, change: Change, now: u64) -> Result<(), StoreError> {
    rec.state = rec.state.transition(change.to)?;
    // A job leaving RUNNING (or starting another attempt) is no longer paused.
    rec.pauses.close(now);
    match change.to {
        JobState::Running => {
            rec.attempt += 1;
            rec.started_ms = Some(now);
            rec.exit_code = None;
        }
        state if state.is_terminal() => rec.finished_ms = Some(now),
        _ => {}
    }
    if change.exit_code.is_some() {
        rec.exit_code = change.exit_code;
    }
    match change.failure {
        Some(FailureKind::Application) => rec.app_failures += 1,
        Some(FailureKind::Infrastructure) => rec.infra_failures += 1,
        None => {}
    }
    rec.retry_at_ms = if change.to == JobState::RetryWait {
        change.retry_at_ms
    } else {
        None
    };
    if let Some(mut place) = change.place.filter(|_| change.to == JobState::Admitted) {
        place.seq = rec
            .placement
            .as_ref()
            .map_or(1, |p| p.seq.saturating_add(1));
        rec.placement = Some(place);
    }
    rec.reason = change.reason.clone();
    rec.history.push(HistoryEntry {
        state: change.to,
        time_ms: now,
        reason: change.reason,
    });
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use veraltheim_storage::{MemoryStore, RedbStore, StoreOptions};

    use super::*;
    use crate::job::{JobKind, Resources};

    pub(crate) fn spec(name: &str, queue: &str) -> JobSpec {
        JobSpec {
            name: name.into(),
            queue: queue.into(),
            priority_class: String::new(),
            resources: Resources::default(),
            max_retries: 2,
            deadline_seconds: None,
            ttl_seconds_after_finished: None,
            labels: BTreeMap::new(),
            idempotency_key: None,
            owner: None,
            pausable: None,
            kind: JobKind::Command {
                image: String::new(),
                command: vec!["true".into()],
                env: BTreeMap::new(),
                working_dir: String::new(),
                writable_root: false,
            },
        }
    }

    fn fixed_clock(ms: u64) -> (Clock, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(ms));
        let t2 = t.clone();
        (Arc::new(move || t2.load(Ordering::SeqCst)), t)
    }

    fn mem() -> JobStore<MemoryStore> {
        JobStore::with_clock(MemoryStore::new(), fixed_clock(1_700_000_000_000).0)
    }

    #[tokio::test]
    async fn submit_assigns_time_ordered_ids_and_persists() {
        let store = mem();
        let a = store.submit(spec("a", "q")).await.unwrap();
        let b = store.submit(spec("b", "q")).await.unwrap();
        assert_eq!(a.id, "00017000000000000000");
        assert_eq!(b.id, "00017000000000000001");
        assert!(a.id < b.id);
        assert_eq!(store.get(&a.id).unwrap(), a);
        assert_eq!(a.state, JobState::Queued);
        assert_eq!(a.history.len(), 1);
    }

    #[tokio::test]
    async fn submit_rejects_invalid_specs_and_writes_nothing() {
        let store = mem();
        let err = store.submit(spec("-bad", "q")).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Job(JobError::InvalidSpec(_))),
            "{err}"
        );
        let (page, next) = store.list(&ListFilter::default()).unwrap();
        assert!(page.is_empty() && next.is_none());
    }

    #[tokio::test]
    async fn idempotency_key_returns_the_existing_job_or_conflicts() {
        let store = mem();
        let mut s = spec("a", "q");
        s.idempotency_key = Some("k1".into());
        let first = store.submit(s.clone()).await.unwrap();
        let again = store.submit(s.clone()).await.unwrap();
        assert_eq!(first, again);
        let (page, _) = store.list(&ListFilter::default()).unwrap();
        assert_eq!(page.len(), 1);
        s.name = "other".into();
        let err = store.submit(s).await.unwrap_err();
        assert!(
            matches!(err, StoreError::IdempotencyConflict { .. }),
            "{err}"
        );
    }

    fn owned(name: &str, tenant: &str) -> JobSpec {
        let mut s = spec(name, "q");
        s.owner = Some(crate::job::Owner {
            principal: format!("{tenant}-user"),
            tenant: tenant.into(),
        });
        s
    }

    #[tokio::test]
    async fn jobs_are_listed_by_tenant_and_keys_are_each_tenants_own() {
        let store = mem();
        store.submit(owned("a1", "a")).await.unwrap();
        store.submit(owned("b1", "b")).await.unwrap();
        store.submit(spec("anon", "q")).await.unwrap();
        store.submit(owned("a2", "a")).await.unwrap();
        let names = |tenant: Option<&str>| {
            let filter = ListFilter {
                tenant: tenant.map(str::to_owned),
                ..Default::default()
            };
            let (page, _) = store.list(&filter).unwrap();
            page.into_iter().map(|r| r.spec.name).collect::<Vec<_>>()
        };
        assert_eq!(names(Some("a")), ["a1", "a2"]);
        assert_eq!(names(Some("b")), ["b1"]);
        assert_eq!(names(None), ["a1", "b1", "anon", "a2"]);
        // One idempotency key in two tenants is two jobs, and neither tenant learns of the
        // other's (no conflict naming its job).
        let mut a = owned("same", "a");
        a.idempotency_key = Some("k".into());
        let mut b = owned("same", "b");
        b.idempotency_key = Some("k".into());
        let ja = store.submit(a.clone()).await.unwrap();
        let jb = store.submit(b).await.unwrap();
        assert_ne!(ja.id, jb.id);
        assert_eq!(store.submit(a).await.unwrap().id, ja.id);
        let mut other = owned("different", "a");
        other.idempotency_key = Some("k".into());
        assert!(matches!(
            store.submit(other).await,
            Err(StoreError::IdempotencyConflict { .. })
        ));
    }

    #[test]
    fn records_written_before_owners_existed_read_without_one() {
        // A record as the store wrote it before the field existed: no `owner` key.
        let mut rec = serde_json::to_value(JobRecord {
            id: "00017000000000000000".into(),
            spec: spec("old", "q"),
            state: JobState::Queued,
            reason: "submitted".into(),
            attempt: 0,
            created_ms: 1,
            started_ms: None,
            finished_ms: None,
            exit_code: None,
            app_failures: 0,
            infra_failures: 0,
            retry_at_ms: None,
            history: Vec::new(),
            traceparent: None,
            placement: None,
            cancel_requested: false,
            pauses: Pauses::default(),
        })
        .unwrap();
        assert!(rec.get("traceparent").is_none(), "not written when unset");
        assert!(rec["spec"].get("owner").is_none(), "not written when unset");
        rec["spec"].as_object_mut().unwrap().remove("owner");
        let back: JobRecord = serde_json::from_value(rec).unwrap();
        assert_eq!(back.spec.owner, None);
        let with = serde_json::to_value(owned("new", "t").owner).unwrap();
        assert_eq!(with["tenant"], "t");
    }

    #[tokio::test]
    async fn get_of_unknown_id_is_not_found() {
        let err = mem().get("nope").unwrap_err();
        assert_eq!(err.to_string(), "no job with id 'nope'");
    }

    #[tokio::test]
    async fn pages_are_bounded_by_bytes_as_well_as_count() {
        let store = mem();
        let mut ids = Vec::new();
        for i in 0..40 {
            let mut s = spec(&format!("j{i}"), "q");
            // 60 labels of 1000 bytes: near the spec limit, ~60 KB a job.
            s.labels = (0..60)
                .map(|l| (format!("l{l:02}"), "x".repeat(996)))
                .collect();
            ids.push(store.submit(s).await.unwrap().id);
        }
        let mut filter = ListFilter::default();
        let mut seen = Vec::new();
        loop {
            let (page, next) = store.list(&filter).unwrap();
            let bytes: usize = page.iter().map(JobRecord::wire_bytes).sum();
            assert!(bytes <= MAX_PAGE_BYTES, "{bytes}");
            assert!(!page.is_empty() && page.len() < 40, "{}", page.len());
            seen.extend(page.into_iter().map(|r| r.id));
            match next {
                Some(t) => filter.page_token = t,
                None => break,
            }
        }
        assert_eq!(seen, ids);
    }

    #[tokio::test]
    async fn list_filters_and_pages_in_id_order() {
        let store = mem();
        let mut ids = Vec::new();
        for i in 0..10 {
            let mut s = spec(&format!("j{i}"), if i % 2 == 0 { "even" } else { "odd" });
            s.labels
                .insert("team".into(), if i < 5 { "a" } else { "b" }.into());
            ids.push(store.submit(s).await.unwrap().id);
        }
        store
            .transition(&ids[0], JobState::Cancelled, "by user")
            .await
            .unwrap();

        // Paging through everything gives every job once, in order.
        let mut seen = Vec::new();
        let mut filter = ListFilter {
            page_size: 3,
            ..Default::default()
        };
        loop {
            let (page, next) = store.list(&filter).unwrap();
            assert!(page.len() <= 3);
            seen.extend(page.into_iter().map(|r| r.id));
            match next {
                Some(t) => filter.page_token = t,
                None => break,
            }
        }
        assert_eq!(seen, ids);

        // Newest first: the same jobs from the last submitted back, page by page.
        let mut back = Vec::new();
        let mut filter = ListFilter {
            page_size: 4,
            newest_first: true,
            ..Default::default()
        };
        loop {
            let (page, next) = store.list(&filter).unwrap();
            assert!(page.len() <= 4);
            back.extend(page.into_iter().map(|r| r.id));
            match next {
                Some(t) => filter.page_token = t,
                None => break,
            }
        }
        let mut reversed = ids.clone();
        reversed.reverse();
        assert_eq!(back, reversed);
        // The filters hold in that order too: the newest two of queue "even" are j8 and j6.
        let filter = ListFilter {
            queue: Some("even".into()),
            newest_first: true,
            page_size: 2,
            ..Default::default()
        };
        let (page, next) = store.list(&filter).unwrap();
        let names: Vec<_> = page.iter().map(|r| r.spec.name.as_str()).collect();
        assert_eq!(names, ["j8", "j6"]);
        assert!(next.is_some());

        let filter = ListFilter {
            queue: Some("even".into()),
            labels: [("team".to_string(), "a".to_string())].into(),
            states: [JobState::Queued].into(),
            ..Default::default()
        };
        let (page, next) = store.list(&filter).unwrap();
        let names: Vec<_> = page.iter().map(|r| r.spec.name.as_str()).collect();
        assert_eq!(names, ["j2", "j4"]);
        assert!(next.is_none());

        let bad = ListFilter {
            page_token: "xyz".into(),
            ..Default::default()
        };
        assert!(matches!(
            store.list(&bad),
            Err(StoreError::InvalidPageToken(_))
        ));
    }

    #[tokio::test]
    async fn the_observer_sees_every_durable_change_in_order() {
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let store = JobStore::new(MemoryStore::new()).with_observer({
            let seen = seen.clone();
            Arc::new(move |r: &JobRecord| seen.lock().push(r.state))
        });
        let id = store.submit(spec("a", "q")).await.unwrap().id;
        store
            .transition(&id, JobState::Admitted, "admitted")
            .await
            .unwrap();
        store
            .transition(&id, JobState::Running, "started")
            .await
            .unwrap();
        store
            .transition(&id, JobState::Succeeded, "done")
            .await
            .unwrap();
        assert!(
            store
                .transition(&id, JobState::Running, "again")
                .await
                .is_err()
        );
        assert_eq!(
            *seen.lock(),
            [
                JobState::Queued,
                JobState::Admitted,
                JobState::Running,
                JobState::Succeeded
            ]
        );
    }

    #[tokio::test]
    async fn update_goes_through_the_lifecycle_and_records_history() {
        let (clock, t) = fixed_clock(1_000);
        let store = JobStore::with_clock(MemoryStore::new(), clock);
        let id = store.submit(spec("a", "q")).await.unwrap().id;
        store
            .transition(&id, JobState::Admitted, "admitted")
            .await
            .unwrap();
        t.store(2_000, Ordering::SeqCst);
        let rec = store
            .transition(&id, JobState::Running, "started")
            .await
            .unwrap();
        assert_eq!((rec.attempt, rec.started_ms), (1, Some(2_000)));
        t.store(3_000, Ordering::SeqCst);
        let rec = store
            .update(&id, |_| {
                Ok(Change {
                    exit_code: Some(0),
                    ..Change::to(JobState::Succeeded, "exit 0")
                })
            })
            .await
            .unwrap();
        assert_eq!(rec.finished_ms, Some(3_000));
        assert_eq!(rec.exit_code, Some(0));
        let states: Vec<_> = rec.history.iter().map(|h| h.state).collect();
        use JobState::*;
        assert_eq!(states, [Queued, Admitted, Running, Succeeded]);
        assert_eq!(store.get(&id).unwrap(), rec);

        // Terminal is final, and an illegal edge writes nothing.
        let err = store
            .transition(&id, JobState::Running, "again")
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "job cannot go from SUCCEEDED to RUNNING");
        assert_eq!(store.get(&id).unwrap(), rec);
    }

    #[tokio::test]
    async fn failures_are_counted_by_kind() {
        use JobState::*;
        let store = mem();
        let id = store.submit(spec("a", "q")).await.unwrap().id;
        store.transition(&id, Admitted, "").await.unwrap();
        store.transition(&id, Running, "").await.unwrap();
        let rec = store
            .update(&id, |_| {
                Ok(Change {
                    exit_code: Some(3),
                    failure: Some(FailureKind::Application),
                    retry_at_ms: Some(99),
                    ..Change::to(RetryWait, "exit 3")
                })
            })
            .await
            .unwrap();
        assert_eq!((rec.app_failures, rec.infra_failures), (1, 0));
        assert_eq!(rec.retry_at_ms, Some(99));
        let rec = store.transition(&id, Queued, "retry").await.unwrap();
        assert_eq!(rec.retry_at_ms, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submits_and_updates_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let store = Arc::new(JobStore::new(
            RedbStore::open(&path, StoreOptions::default()).unwrap(),
        ));
        // 30 distinct submits, and 10 with one idempotency key.
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = spec(&format!("j{i}"), "q");
                if i >= 30 {
                    s.name = "same".into();
                    s.idempotency_key = Some("once".into());
                }
                store.submit(s).await.unwrap().id
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        let once: BTreeSet<_> = ids[30..].iter().cloned().collect();
        assert_eq!(once.len(), 1, "one job for one idempotency key");
        let all: BTreeSet<_> = ids.iter().cloned().collect();
        assert_eq!(all.len(), 31);
        let (page, next) = store.list(&ListFilter::default()).unwrap();
        assert!(next.is_none());
        let listed: Vec<_> = page.into_iter().map(|r| r.id).collect();
        assert_eq!(listed, all.iter().cloned().collect::<Vec<_>>());

        // Racing writers of one job: exactly one moves it from QUEUED to ADMITTED.
        let id = ids[0].clone();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (store, id) = (store.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                store.transition(&id, JobState::Admitted, "race").await
            }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(e) => assert_eq!(e.to_string(), "job cannot go from ADMITTED to ADMITTED"),
            }
        }
        assert_eq!(won, 1);
        assert_eq!(store.get(&id).unwrap().history.len(), 2);
    }

    #[tokio::test]
    async fn finished_jobs_are_deleted_once_their_ttl_ran_out() {
        use JobState::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let (clock, t) = fixed_clock(1_000_000);
        let store = JobStore::with_clock(
            RedbStore::open(&path, StoreOptions::default()).unwrap(),
            clock.clone(),
        );
        let with_ttl = |name: &str, ttl: Option<u64>, key: Option<&str>| {
            let mut s = spec(name, "q");
            s.ttl_seconds_after_finished = ttl;
            s.idempotency_key = key.map(str::to_owned);
            s
        };
        let short = store
            .submit(with_ttl("short", Some(10), Some("k")))
            .await
            .unwrap()
            .id;
        let long = store
            .submit(with_ttl("long", Some(60), None))
            .await
            .unwrap()
            .id;
        let forever = store
            .submit(with_ttl("forever", None, None))
            .await
            .unwrap()
            .id;
        let live = store
            .submit(with_ttl("live", Some(1), None))
            .await
            .unwrap()
            .id;
        assert_eq!(
            store.next_expiry_ms(),
            Some(0),
            "unknown before the first sweep"
        );
        let none = store.delete_expired(1_000_000, 10).await.unwrap();
        assert_eq!(
            none,
            Expired::default(),
            "nothing finished, nothing expires"
        );

        t.store(2_000_000, Ordering::SeqCst);
        for id in [&short, &long, &forever] {
            store.transition(id, Cancelled, "by user").await.unwrap();
        }
        assert_eq!(store.next_expiry_ms(), Some(2_010_000));
        // Not yet due: nothing goes.
        let r = store.delete_expired(2_009_999, 10).await.unwrap();
        assert!(r.deleted.is_empty());
        assert_eq!(r.next_ms, Some(2_010_000));
        // Due: the job, its expiry entry and its idempotency key go in one commit.
        let r = store.delete_expired(2_010_000, 10).await.unwrap();
        assert_eq!(r.deleted, std::slice::from_ref(&short));
        assert_eq!(r.next_ms, Some(2_060_000));
        assert!(matches!(store.get(&short), Err(StoreError::NotFound(_))));
        assert_eq!(IDEMPOTENCY.get(store.inner(), "k").unwrap(), None);
        let again = store
            .submit(with_ttl("short", Some(10), Some("k")))
            .await
            .unwrap();
        assert_ne!(again.id, short, "the key is free again: a new job");
        drop(store);

        // After a restart the sweep reads what is due from disk.
        let store = JobStore::with_clock(
            RedbStore::open(&path, StoreOptions::default()).unwrap(),
            clock,
        );
        let r = store.delete_expired(10_000_000, 10).await.unwrap();
        assert_eq!(r.deleted, std::slice::from_ref(&long));
        assert_eq!(r.next_ms, None);
        assert_eq!(store.get(&forever).unwrap().state, Cancelled);
        assert_eq!(
            store.get(&live).unwrap().state,
            Queued,
            "a live job is never deleted"
        );
        let (page, _) = store.list(&ListFilter::default()).unwrap();
        let ids: Vec<_> = page.into_iter().map(|r| r.id).collect();
        assert_eq!(ids, [forever, live, again.id]);
    }

    #[tokio::test]
    async fn the_sweep_deletes_at_most_its_limit_and_says_more_are_due() {
        let (clock, t) = fixed_clock(5_000);
        let store = JobStore::with_clock(MemoryStore::new(), clock);
        let mut ids = Vec::new();
        for i in 0..5 {
            let mut s = spec(&format!("j{i}"), "q");
            s.ttl_seconds_after_finished = Some(0);
            let id = store.submit(s).await.unwrap().id;
            t.store(5_000 + i, Ordering::SeqCst);
            store
                .transition(&id, JobState::Cancelled, "")
                .await
                .unwrap();
            ids.push(id);
        }
        let r = store.delete_expired(6_000, 2).await.unwrap();
        assert_eq!(r.deleted, ids[..2]);
        assert_eq!(r.next_ms, Some(5_002), "already due: the caller goes on");
        let r = store.delete_expired(6_000, 10).await.unwrap();
        assert_eq!(r.deleted, ids[2..]);
        assert_eq!(r.next_ms, None);
    }

    #[tokio::test]
    async fn recover_requeues_admitted_and_running_jobs_from_disk() {
        use JobState::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let (queued, admitted, running, done);
        {
            let store = JobStore::new(RedbStore::open(&path, StoreOptions::default()).unwrap());
            queued = store.submit(spec("q", "q")).await.unwrap().id;
            admitted = store.submit(spec("a", "q")).await.unwrap().id;
            running = store.submit(spec("r", "q")).await.unwrap().id;
            done = store.submit(spec("d", "q")).await.unwrap().id;
            store.transition(&admitted, Admitted, "").await.unwrap();
            for s in [Admitted, Running] {
                store.transition(&running, s, "").await.unwrap();
            }
            store.transition(&done, Cancelled, "").await.unwrap();
            // Dropped without any shutdown step, as after a crash.
        }
        let store = JobStore::new(RedbStore::open(&path, StoreOptions::default()).unwrap());
        let live = store.recover().await.unwrap();
        let ids: Vec<_> = live.iter().map(|r| r.id.clone()).collect();
        assert_eq!(ids, [queued.clone(), admitted.clone(), running.clone()]);
        assert!(live.iter().all(|r| r.state == Queued));
        let r = store.get(&running).unwrap();
        assert_eq!(r.reason, "coordinator restarted; attempt 2");
        let states: Vec<_> = r.history.iter().map(|h| h.state).collect();
        assert_eq!(states, [Queued, Admitted, Running, RetryWait, Queued]);
        assert_eq!((r.app_failures, r.infra_failures), (0, 0));
        assert_eq!(
            store.get(&admitted).unwrap().reason,
            "coordinator restarted; attempt 1"
        );
        assert_eq!(store.get(&done).unwrap().state, Cancelled);
        // A submit after the restart does not reuse an id.
        let new = store.submit(spec("n", "q")).await.unwrap().id;
        assert!(new > done);
    }
}
