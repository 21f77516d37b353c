//! Storage for Veraltheim's components: a fast in-memory cache and a durable embedded store.
//!
//! - [`KvCache`] is an in-memory cache bounded by bytes (each entry weighs its [`ByteSize`]) and
//!   by time to live, counting hits, misses and evictions. [`ContentHash`] gives stable 256-bit
//!   keys for caching results by the content of the request.
//! - [`Store`] is an ordered key-value store of named tables with atomic batches. [`RedbStore`]
//!   is the embedded default (redb): every write goes through one committer thread that merges
//!   all pending batches into one transaction and one fsync (group commit), and acknowledges a
//!   writer only once its batch is durable. [`MemoryStore`] is the same contract in memory, for
//!   tests. [`Table`] gives typed access (ordered keys, serde values) over either.
//!
//! Invariants: an acknowledged write under [`Durability::Immediate`] survives a crash; a batch is
//! applied whole or not at all; every queue is bounded. This crate knows nothing of models, gRPC
//! or configuration files.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod batch;
mod cache;
mod error;
mod hash;
mod key;
mod memory;
mod redb_store;
mod store;
mod table;

pub use batch::{Batch, Op};
pub use cache::{ByteSize, CacheConfig, CacheStats, KvCache};
pub use error::StorageError;
pub use hash::{ContentHash, ContentHasher};
pub use key::Key;
pub use memory::MemoryStore;
pub use redb_store::{RedbStore, StoreOptions};
pub use store::{CommitFuture, Committed, Durability, RawEntry, Store, StoreStats};
pub use table::Table;
