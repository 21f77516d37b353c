//! [`JobBackend`]: what the runner and the API need of a job store, implemented by the
//! key-value [`JobStore`] (redb or memory: the single-node default) and, with the `postgres`
//! feature, by [`crate::postgres::PgJobStore`] (several coordinators on one database).
//! [`AnyJobStore`] is either, chosen at start from the configuration.
//!
//! Both keep the same contract: a write is returned only once durable; every state change goes
//! through [`crate::job::JobState::transition`]; one idempotency key names one job; the
//! observer sees every durable change of a job in commit order.

use std::future::Future;

use veraltheim_storage::Store;

use crate::cluster::{JobNotice, LeaderFence, LiveEntry, LogPiece};
use crate::job::{JobSpec, JobState};
use crate::store::{
    Change, Expired, JobRecord, JobStore, ListFilter, Observer, Placement, StoreError,
};

/// A durable job store; see the module documentation and [`JobStore`]'s methods of the same
/// names, whose documentation holds for every implementation.
pub trait JobBackend: Send + Sync + 'static {
    /// Now, by this store's clock (ms since the Unix epoch).
    fn now_ms(&self) -> u64;

    /// Validates `spec` and stores it as a QUEUED job; see [`JobStore::submit_traced`].
    fn submit_traced(
        &self,
        spec: JobSpec,
        traceparent: Option<String>,
    ) -> impl Future<Output = Result<JobRecord, StoreError>> + Send;

    /// The job with `id`.
    fn get(&self, id: &str) -> impl Future<Output = Result<JobRecord, StoreError>> + Send;

    /// One page of the jobs matching `filter`, and the next page's token; see
    /// [`JobStore::list`].
    fn list(
        &self,
        filter: &ListFilter,
    ) -> impl Future<Output = Result<(Vec<JobRecord>, Option<String>), StoreError>> + Send;

    /// Applies the change `f` asks for, given the job as it is now, atomically; see
    /// [`JobStore::update`].
    fn update<F>(
        &self,
        id: &str,
        f: F,
    ) -> impl Future<Output = Result<JobRecord, StoreError>> + Send
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError> + Send;

    /// Marks job `id`'s running attempt paused for `why` (`Some`) or resumed (`None`), only
    /// while it still carries `placed` (when given); see [`JobStore::mark_paused`]. Not a change
    /// of state: the observer is not called. `None`: nothing changed.
    fn mark_paused(
        &self,
        id: &str,
        why: Option<String>,
        placed: Option<Placement>,
    ) -> impl Future<Output = Result<Option<JobRecord>, StoreError>> + Send;

    /// [`JobBackend::update`] to `to` for `reason`.
    fn transition(
        &self,
        id: &str,
        to: JobState,
        reason: impl Into<String>,
    ) -> impl Future<Output = Result<JobRecord, StoreError>> + Send {
        let change = Change::to(to, reason);
        self.update(id, move |_| Ok(change))
    }

    /// Puts admitted and running jobs back in line and returns the live ones; see
    /// [`JobStore::recover`].
    fn recover(&self) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send;

    /// [`JobBackend::recover`] keeping RUNNING jobs for an executor that adopts them.
    fn recover_adopting(&self) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send;

    /// When the next finished job expires, as far as this store knows without reading.
    fn next_expiry_ms(&self) -> Option<u64>;

    /// Deletes up to `limit` finished jobs whose TTL ran out by `now_ms`.
    fn delete_expired(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Expired, StoreError>> + Send;

    // What a cluster needs (the shared store overrides these; a store no other node shares
    // has no other leader, node or writer, and each default says what that means).

    /// Every live job as it is, nothing changed: a new leader's view of the work.
    fn live(&self) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send;

    /// The live jobs' ids, states and nodes, without their records: a leader's reconcile.
    fn live_index(&self) -> impl Future<Output = Result<Vec<LiveEntry>, StoreError>> + Send {
        async {
            Ok(self
                .live()
                .await?
                .into_iter()
                .map(|r| LiveEntry {
                    node: r.placement.map(|p| p.node),
                    id: r.id,
                    state: r.state,
                })
                .collect())
        }
    }

    /// The live jobs placed on `node` that are ADMITTED (for it to start) or asked to cancel
    /// (for it to stop).
    fn placed_on(
        &self,
        node: &str,
    ) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send {
        async move {
            Ok(self
                .live()
                .await?
                .into_iter()
                .filter(|r| {
                    r.placement.as_ref().is_some_and(|p| p.node == node)
                        && (r.state == JobState::Admitted || r.cancel_requested)
                })
                .collect())
        }
    }

    /// [`JobBackend::update`] made by a cluster leader: refused with [`StoreError::Fenced`],
    /// in the same transaction, unless `fence` still holds the leadership. Without other
    /// nodes, this node always leads: a plain update.
    fn update_as_leader<F>(
        &self,
        id: &str,
        fence: &LeaderFence,
        f: F,
    ) -> impl Future<Output = Result<JobRecord, StoreError>> + Send
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError> + Send,
    {
        let _ = fence;
        self.update(id, f)
    }

    /// Cancels job `id` from a node that does not run it: a waiting job at once; an admitted
    /// or running one is marked (`cancel_requested`) for the node that runs it to stop. Without
    /// other nodes, nothing runs elsewhere: the job is cancelled at once.
    fn request_cancel(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<JobRecord, StoreError>> + Send {
        self.transition(id, JobState::Cancelled, "cancelled")
    }

    /// The durable changes other nodes make, as they commit; `None` from a store no other node
    /// writes. Ends when the receiver is dropped.
    fn notices(&self) -> Option<tokio::sync::mpsc::Receiver<JobNotice>> {
        None
    }

    /// Keeps piece `seq` of an attempt's output for other nodes to serve. A store no other
    /// node reads keeps nothing: the executor's own logs are read instead.
    fn append_log(
        &self,
        id: &str,
        attempt: u32,
        seq: u32,
        stream: &str,
        data: &[u8],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (id, attempt, seq, stream, data);
        std::future::ready(Ok(()))
    }

    /// Up to `limit` kept pieces of an attempt's output after piece `after`, in order; none from
    /// a store that keeps none.
    fn read_logs(
        &self,
        id: &str,
        attempt: u32,
        after: Option<u32>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<LogPiece>, StoreError>> + Send {
        let _ = (id, attempt, after, limit);
        std::future::ready(Ok(Vec::new()))
    }
}

impl<S: Store + 'static> JobBackend for JobStore<S> {
    fn now_ms(&self) -> u64 {
        JobStore::now_ms(self)
    }

    fn submit_traced(
        &self,
        spec: JobSpec,
        traceparent: Option<String>,
    ) -> impl Future<Output = Result<JobRecord, StoreError>> + Send {
        JobStore::submit_traced(self, spec, traceparent)
    }

    fn get(&self, id: &str) -> impl Future<Output = Result<JobRecord, StoreError>> + Send {
        std::future::ready(JobStore::get(self, id))
    }

    fn list(
        &self,
        filter: &ListFilter,
    ) -> impl Future<Output = Result<(Vec<JobRecord>, Option<String>), StoreError>> + Send {
        std::future::ready(JobStore::list(self, filter))
    }

    fn update<F>(
        &self,
        id: &str,
        f: F,
    ) -> impl Future<Output = Result<JobRecord, StoreError>> + Send
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError> + Send,
    {
        JobStore::update(self, id, f)
    }

    async fn mark_paused(
        &self,
        id: &str,
        why: Option<String>,
        placed: Option<Placement>,
    ) -> Result<Option<JobRecord>, StoreError> {
        JobStore::mark_paused(self, id, why.as_deref(), placed.as_ref()).await
    }

    fn recover(&self) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send {
        JobStore::recover(self)
    }

    fn recover_adopting(&self) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send {
        JobStore::recover_adopting(self)
    }

    fn next_expiry_ms(&self) -> Option<u64> {
        JobStore::next_expiry_ms(self)
    }

    fn delete_expired(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Expired, StoreError>> + Send {
        JobStore::delete_expired(self, now_ms, limit)
    }

    fn live(&self) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send {
        std::future::ready(JobStore::live(self))
    }
}

/// The job store a coordinator runs on, chosen at start: the key-value store (redb, the
/// single-node default) or, with the `postgres` feature, a PostgreSQL database shared by
/// several coordinators.
pub enum AnyJobStore<S> {
    Kv(JobStore<S>),
    #[cfg(feature = "postgres")]
    Postgres(crate::postgres::PgJobStore),
}

impl<S: Store> AnyJobStore<S> {
    /// Calls `observer` with every record written from now on.
    pub fn with_observer(self, observer: Observer) -> Self {
        match self {
            Self::Kv(s) => Self::Kv(s.with_observer(observer)),
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => Self::Postgres(s.with_observer(observer)),
        }
    }
}

/// Runs `$body` with `$s` bound to whichever store `$self` is.
macro_rules! each {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            AnyJobStore::Kv($s) => $body,
            #[cfg(feature = "postgres")]
            AnyJobStore::Postgres($s) => $body,
        }
    };
}

#[cfg(feature = "postgres")]
impl JobBackend for crate::postgres::PgJobStore {
    fn now_ms(&self) -> u64 {
        crate::postgres::PgJobStore::now_ms(self)
    }

    async fn submit_traced(
        &self,
        spec: JobSpec,
        traceparent: Option<String>,
    ) -> Result<JobRecord, StoreError> {
        crate::postgres::PgJobStore::submit_traced(self, spec, traceparent).await
    }

    async fn get(&self, id: &str) -> Result<JobRecord, StoreError> {
        crate::postgres::PgJobStore::get(self, id).await
    }

    async fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<(Vec<JobRecord>, Option<String>), StoreError> {
        crate::postgres::PgJobStore::list(self, filter).await
    }

    async fn update<F>(&self, id: &str, f: F) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError> + Send,
    {
        crate::postgres::PgJobStore::update(self, id, f).await
    }

    async fn mark_paused(
        &self,
        id: &str,
        why: Option<String>,
        placed: Option<Placement>,
    ) -> Result<Option<JobRecord>, StoreError> {
        crate::postgres::PgJobStore::mark_paused(self, id, why.as_deref(), placed.as_ref()).await
    }

    async fn recover(&self) -> Result<Vec<JobRecord>, StoreError> {
        crate::postgres::PgJobStore::recover(self).await
    }

    async fn recover_adopting(&self) -> Result<Vec<JobRecord>, StoreError> {
        crate::postgres::PgJobStore::recover_adopting(self).await
    }

    fn next_expiry_ms(&self) -> Option<u64> {
        crate::postgres::PgJobStore::next_expiry_ms(self)
    }

    async fn delete_expired(&self, now_ms: u64, limit: usize) -> Result<Expired, StoreError> {
        crate::postgres::PgJobStore::delete_expired(self, now_ms, limit).await
    }

    async fn live(&self) -> Result<Vec<JobRecord>, StoreError> {
        crate::postgres::PgJobStore::live(self).await
    }

    async fn live_index(&self) -> Result<Vec<LiveEntry>, StoreError> {
        crate::postgres::PgJobStore::live_index(self).await
    }

    async fn placed_on(&self, node: &str) -> Result<Vec<JobRecord>, StoreError> {
        crate::postgres::PgJobStore::placed_on(self, node).await
    }

    async fn update_as_leader<F>(
        &self,
        id: &str,
        fence: &LeaderFence,
        f: F,
    ) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError> + Send,
    {
        crate::postgres::PgJobStore::update_as_leader(self, id, fence, f).await
    }

    async fn request_cancel(&self, id: &str) -> Result<JobRecord, StoreError> {
        crate::postgres::PgJobStore::request_cancel(self, id).await
    }

    fn notices(&self) -> Option<tokio::sync::mpsc::Receiver<JobNotice>> {
        Some(crate::postgres::PgJobStore::notices(self))
    }

    async fn append_log(
        &self,
        id: &str,
        attempt: u32,
        seq: u32,
        stream: &str,
        data: &[u8],
    ) -> Result<(), StoreError> {
        crate::postgres::PgJobStore::append_log(self, id, attempt, seq, stream, data).await
    }

    async fn read_logs(
        &self,
        id: &str,
        attempt: u32,
        after: Option<u32>,
        limit: usize,
    ) -> Result<Vec<LogPiece>, StoreError> {
        crate::postgres::PgJobStore::read_logs(self, id, attempt, after, limit).await
    }
}

impl<S: Store + 'static> JobBackend for AnyJobStore<S> {
    fn now_ms(&self) -> u64 {
        each!(self, s => s.now_ms())
    }

    async fn submit_traced(
        &self,
        spec: JobSpec,
        traceparent: Option<String>,
    ) -> Result<JobRecord, StoreError> {
        each!(self, s => JobBackend::submit_traced(s, spec, traceparent).await)
    }

    async fn get(&self, id: &str) -> Result<JobRecord, StoreError> {
        each!(self, s => JobBackend::get(s, id).await)
    }

    async fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<(Vec<JobRecord>, Option<String>), StoreError> {
        each!(self, s => JobBackend::list(s, filter).await)
    }

    async fn update<F>(&self, id: &str, f: F) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError> + Send,
    {
        each!(self, s => JobBackend::update(s, id, f).await)
    }

    async fn mark_paused(
        &self,
        id: &str,
        why: Option<String>,
        placed: Option<Placement>,
    ) -> Result<Option<JobRecord>, StoreError> {
        each!(self, s => JobBackend::mark_paused(s, id, why, placed).await)
    }

    async fn recover(&self) -> Result<Vec<JobRecord>, StoreError> {
        each!(self, s => JobBackend::recover(s).await)
    }

    async fn recover_adopting(&self) -> Result<Vec<JobRecord>, StoreError> {
        each!(self, s => JobBackend::recover_adopting(s).await)
    }

    fn next_expiry_ms(&self) -> Option<u64> {
        each!(self, s => s.next_expiry_ms())
    }

    async fn delete_expired(&self, now_ms: u64, limit: usize) -> Result<Expired, StoreError> {
        each!(self, s => JobBackend::delete_expired(s, now_ms, limit).await)
    }

    async fn live(&self) -> Result<Vec<JobRecord>, StoreError> {
        each!(self, s => JobBackend::live(s).await)
    }

    async fn live_index(&self) -> Result<Vec<LiveEntry>, StoreError> {
        each!(self, s => JobBackend::live_index(s).await)
    }

    async fn placed_on(&self, node: &str) -> Result<Vec<JobRecord>, StoreError> {
        each!(self, s => JobBackend::placed_on(s, node).await)
    }

    async fn update_as_leader<F>(
        &self,
        id: &str,
        fence: &LeaderFence,
        f: F,
    ) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError> + Send,
    {
        each!(self, s => JobBackend::update_as_leader(s, id, fence, f).await)
    }

    async fn request_cancel(&self, id: &str) -> Result<JobRecord, StoreError> {
        each!(self, s => JobBackend::request_cancel(s, id).await)
    }

    fn notices(&self) -> Option<tokio::sync::mpsc::Receiver<JobNotice>> {
        each!(self, s => JobBackend::notices(s))
    }

    async fn append_log(
        &self,
        id: &str,
        attempt: u32,
        seq: u32,
        stream: &str,
        data: &[u8],
    ) -> Result<(), StoreError> {
        each!(self, s => JobBackend::append_log(s, id, attempt, seq, stream, data).await)
    }

    async fn read_logs(
        &self,
        id: &str,
        attempt: u32,
        after: Option<u32>,
        limit: usize,
    ) -> Result<Vec<LogPiece>, StoreError> {
        each!(self, s => JobBackend::read_logs(s, id, attempt, after, limit).await)
    }
}

#[cfg(test)]
pub(crate) mod tests;
