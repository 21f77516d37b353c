use std::collections::BTreeMap;
use std::future::ready;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::batch::check_table_name;
use crate::store::{Order, is_empty_range};
use crate::{Batch, CommitFuture, Committed, Op, RawEntry, StorageError, Store, StoreStats};

type Tables = BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

/// A [`Store`] held in memory, for tests and for data that need not survive the process.
/// Each batch is applied under one lock, so it is atomic and isolated; nothing is durable.
/// Cheap to clone; clones share the data.
#[derive(Clone, Default)]
pub struct MemoryStore {
    tables: Arc<RwLock<Tables>>,
    stats: Arc<Mutex<StoreStats>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn apply(&self, batch: &Batch) -> Committed {
        let mut tables = self.tables.write();
        for op in batch.ops() {
            match op {
                Op::Put { table, key, value } => {
                    tables
                        .entry(table.clone())
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                Op::Delete { table, key } => {
                    if let Some(entries) = tables.get_mut(table) {
                        entries.remove(key);
                    }
                }
            }
        }
        let mut stats = self.stats.lock();
        stats.commits += 1;
        stats.batches += 1;
        stats.operations += batch.len() as u64;
        Committed {
            commit: stats.commits,
        }
    }
}

impl Store for MemoryStore {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        check_table_name(table)?;
        Ok(self
            .tables
            .read()
            .get(table)
            .and_then(|entries| entries.get(key))
            .cloned())
    }

    fn scan_in(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<RawEntry>, StorageError> {
        check_table_name(table)?;
        if is_empty_range(lower, upper) {
            return Ok(Vec::new());
        }
        let tables = self.tables.read();
        let Some(entries) = tables.get(table) else {
            return Ok(Vec::new());
        };
        let range = entries.range::<[u8], _>((lower, upper));
        let owned = |(key, value): (&Vec<u8>, &Vec<u8>)| (key.clone(), value.clone());
        Ok(match order {
            Order::Ascending => range.take(limit).map(owned).collect(),
            Order::Descending => range.rev().take(limit).map(owned).collect(),
        })
    }
    fn commit(&self, batch: Batch) -> CommitFuture {
        Box::pin(ready(Ok(self.apply(&batch))))
    }

    fn commit_blocking(&self, batch: Batch) -> Result<Committed, StorageError> {
        Ok(self.apply(&batch))
    }

    fn stats(&self) -> StoreStats {
        self.stats.lock().clone()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("tables", &self.tables.read().len())
            .finish()
    }
}
