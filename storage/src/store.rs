use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;

use crate::{Batch, StorageError};

/// A key and its value, as bytes.
pub type RawEntry = (Vec<u8>, Vec<u8>);

/// When a commit counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Acknowledged only after the data is fsynced: survives a crash or power loss.
    Immediate,
    /// Acknowledged once readable; written to disk at the next immediate commit or when the store
    /// is closed. A crash loses it. For data that can be rebuilt.
    Eventual,
}

/// Proof that a batch committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Committed {
    /// Which group commit carried the batch, counting from 1 since the store was opened. Batches
    /// merged into one transaction share it.
    pub commit: u64,
}

/// Counters of a store since it was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed (each one fsync under [`Durability::Immediate`]).
    pub commits: u64,
    /// Batches acknowledged as committed.
    pub batches: u64,
    /// Writes in those batches.
    pub operations: u64,
    /// Batches that failed to commit.
    pub failed_batches: u64,
    /// Batches waiting for the committer now.
    pub queued: u64,
}

/// The future of a commit: resolves once the batch is durable (or visible, under
/// [`Durability::Eventual`]).
pub type CommitFuture = Pin<Box<dyn Future<Output = Result<Committed, StorageError>> + Send>>;

/// Which end of a key range a scan starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

/// An ordered key-value store of named tables with atomic batches.
///
/// Keys and values are bytes here; [`crate::Table`] adds types on top. Reads see every batch
/// acknowledged before they start. Reading a table that was never written gives nothing.
pub trait Store: Send + Sync {
    /// The value under `key` in `table`.
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Up to `limit` entries of `table` with keys within the bounds, taken from the first key
    /// on (`Order::Ascending`) or from the last key back (`Order::Descending`: what a "newest
    /// first" listing reads when keys grow with time). The one method a store implements.
    fn scan_in(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<RawEntry>, StorageError>;

    /// Up to `limit` entries of `table` with keys within the bounds, in key order.
    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<RawEntry>, StorageError> {
        self.scan_in(table, lower, upper, limit, Order::Ascending)
    }

    /// Up to `limit` entries of `table` with keys within the bounds, in descending key order.
    fn scan_back(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<RawEntry>, StorageError> {
        self.scan_in(table, lower, upper, limit, Order::Descending)
    }

    /// Queues `batch` now and resolves once it has committed. Several batches queued together
    /// may share one transaction, but each is applied whole or not at all, in queue order.
    fn commit(&self, batch: Batch) -> CommitFuture;

    /// [`Store::commit`] for threads that are not async tasks; blocks until committed.
    fn commit_blocking(&self, batch: Batch) -> Result<Committed, StorageError>;

    /// Counters since the store was opened.
    fn stats(&self) -> StoreStats;
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        S::get(self, table, key)
    }

    fn scan_in(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<RawEntry>, StorageError> {
        S::scan_in(self, table, lower, upper, limit, order)
    }

    fn commit(&self, batch: Batch) -> CommitFuture {
        S::commit(self, batch)
    }

    fn commit_blocking(&self, batch: Batch) -> Result<Committed, StorageError> {
        S::commit_blocking(self, batch)
    }

    fn stats(&self) -> StoreStats {
        S::stats(self)
    }
}

/// Whether no key can lie within the bounds (ordered maps panic on such ranges).
pub(crate) fn is_empty_range(lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> bool {
    match (lower, upper) {
        (Bound::Included(low), Bound::Included(high)) => low > high,
        (Bound::Included(low), Bound::Excluded(high))
        | (Bound::Excluded(low), Bound::Included(high))
        | (Bound::Excluded(low), Bound::Excluded(high)) => low >= high,
        (Bound::Unbounded, _) | (_, Bound::Unbounded) => false,
    }
}
