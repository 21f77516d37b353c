use std::future::ready;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase, TableDefinition, TableError};
use tokio::sync::oneshot;

use crate::batch::check_table_name;
use crate::store::{Order, is_empty_range};
use crate::{
    Batch, CommitFuture, Committed, Durability, Op, RawEntry, StorageError, Store, StoreStats,
};

type BytesTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// Every table holds bytes; [`crate::Table`] types them.
fn definition(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// How a [`RedbStore`] commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// When a commit is acknowledged.
    pub durability: Durability,
    /// Most batches waiting for the committer; beyond it [`Store::commit`] fails at once with
    /// [`StorageError::Overloaded`].
    pub max_queued_batches: usize,
    /// Most batches merged into one transaction.
    pub max_batches_per_commit: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Immediate,
            max_queued_batches: 4096,
            max_batches_per_commit: 1024,
        }
    }
}

enum Reply {
    Async(oneshot::Sender<Result<Committed, StorageError>>),
    Blocking(mpsc::SyncSender<Result<Committed, StorageError>>),
}

impl Reply {
    fn send(self, result: Result<Committed, StorageError>) {
        // A writer that stopped waiting no longer needs its acknowledgement.
        match self {
            Self::Async(tx) => {
                let _ = tx.send(result);
            }
            Self::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

struct Request {
    batch: Batch,
    reply: Reply,
}

#[derive(Default)]
struct Shared {
    stats: Mutex<StoreStats>,
    queued: AtomicUsize,
}

/// The embedded durable [`Store`], on a redb file, with group commit.
///
/// Writers queue batches to one committer thread, which takes everything queued, applies it in
/// one write transaction with one fsync, then acknowledges each writer. Concurrent writers thus
/// share fsyncs instead of waiting for one each. Reads run on the caller's thread against the
/// last committed state.
///
/// One process may open a file at a time. Dropping the store (or [`RedbStore::close`]) commits
/// what is queued and closes the file, blocking the dropping thread until then.
pub struct RedbStore {
    /// The open database, shared with the committer, which replaces it after an I/O failure
    /// (redb poisons a database after one: every later transaction fails until it is reopened);
    /// `None` while a reopen has not yet succeeded.
    db: Arc<RwLock<Option<Arc<Database>>>>,
    path: PathBuf,
    options: StoreOptions,
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    committer: Option<thread::JoinHandle<Result<(), StorageError>>>,
}

impl RedbStore {
    /// Opens the store at `path`, creating the file if it does not exist.
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StorageError> {
        Self::start(path.as_ref(), options, None)
    }

    fn start(
        path: &Path,
        mut options: StoreOptions,
        gate: Option<mpsc::Receiver<()>>,
    ) -> Result<Self, StorageError> {
        options.max_queued_batches = options.max_queued_batches.max(1);
        options.max_batches_per_commit = options.max_batches_per_commit.max(1);
        let db = Database::create(path).map_err(|source| StorageError::Open {
            path: path.to_owned(),
            source,
        })?;
        let db = Arc::new(RwLock::new(Some(Arc::new(db))));
        let shared = Arc::new(Shared::default());
        let (requests, inbox) = mpsc::channel();
        let committer = Committer {
            db: Arc::clone(&db),
            path: path.to_owned(),
            poisoned: false,
            shared: Arc::clone(&shared),
            options: options.clone(),
            sequence: 0,
        };
        let handle = thread::Builder::new()
            .name("store-committer".to_owned())
            .spawn(move || {
                if let Some(gate) = gate {
                    let _ = gate.recv();
                }
                committer.run(&inbox)
            })
            .map_err(|error| StorageError::backend("start the committer thread", error))?;
        Ok(Self {
            db,
            path: path.to_owned(),
            options,
            shared,
            requests: Some(requests),
            committer: Some(handle),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options it was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Commits what is queued, makes everything durable and closes the file, reporting any
    /// failure to do so (dropping the store does the same but can only log it).
    pub fn close(mut self) -> Result<(), StorageError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), StorageError> {
        drop(self.requests.take());
        match self.committer.take() {
            Some(handle) => handle.join().unwrap_or_else(|_| {
                Err(StorageError::backend(
                    "stop the committer",
                    "the committer thread panicked",
                ))
            }),
            None => Ok(()),
        }
    }

    fn enqueue(&self, batch: Batch, reply: Reply) -> Result<(), StorageError> {
        let requests = self.requests.as_ref().ok_or(StorageError::Closed)?;
        let limit = self.options.max_queued_batches;
        if self.shared.queued.fetch_add(1, Ordering::AcqRel) >= limit {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(StorageError::Overloaded { limit });
        }
        requests.send(Request { batch, reply }).map_err(|_| {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            StorageError::Closed
        })
    }

    fn read<T>(
        &self,
        table: &str,
        absent: T,
        read: impl FnOnce(
            redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
        ) -> Result<T, redb::StorageError>,
    ) -> Result<T, StorageError> {
        check_table_name(table)?;
        let db = self.db.read().clone().ok_or_else(|| {
            StorageError::backend("read", "the store is being reopened after a write failure")
        })?;
        let txn = db
            .begin_read()
            .map_err(|error| StorageError::backend("begin a read transaction", error))?;
        match txn.open_table(definition(table)) {
            Ok(opened) => read(opened).map_err(|error| StorageError::backend("read", error)),
            Err(TableError::TableDoesNotExist(_)) => Ok(absent),
            Err(error) => Err(StorageError::backend("open a table for reading", error)),
        }
    }
}

impl Store for RedbStore {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.read(table, None, |opened| {
            Ok(opened.get(key)?.map(|value| value.value().to_vec()))
        })
    }

    fn scan_in(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<RawEntry>, StorageError> {
        if is_empty_range(lower, upper) || limit == 0 {
            check_table_name(table)?;
            return Ok(Vec::new());
        }
        self.read(table, Vec::new(), |opened| {
            let range = opened.range::<&[u8]>((lower, upper))?;
            let owned = |entry: Result<_, redb::StorageError>| {
                let (key, value): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) = entry?;
                Ok((key.value().to_vec(), value.value().to_vec()))
            };
            match order {
                Order::Ascending => range.take(limit).map(owned).collect(),
                Order::Descending => range.rev().take(limit).map(owned).collect(),
            }
        })
    }
    fn commit(&self, batch: Batch) -> CommitFuture {
        let (tx, rx) = oneshot::channel();
        match self.enqueue(batch, Reply::Async(tx)) {
            Ok(()) => Box::pin(async move { rx.await.unwrap_or(Err(StorageError::Closed)) }),
            Err(error) => Box::pin(ready(Err(error))),
        }
    }

    fn commit_blocking(&self, batch: Batch) -> Result<Committed, StorageError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(batch, Reply::Blocking(tx))?;
        rx.recv().unwrap_or(Err(StorageError::Closed))
    }

    fn stats(&self) -> StoreStats {
        let mut stats = self.shared.stats.lock().clone();
        stats.queued = self.shared.queued.load(Ordering::Acquire) as u64;
        stats
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::error!(path = %self.path.display(), %error, "closing the store failed");
        }
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish()
    }
}

/// The single writer: merges queued batches into group commits.
struct Committer {
    db: Arc<RwLock<Option<Arc<Database>>>>,
    path: PathBuf,
    /// A write failed with an I/O error: the database must be reopened before the next write.
    poisoned: bool,
    shared: Arc<Shared>,
    options: StoreOptions,
    sequence: u64,
}

impl Committer {
    fn run(mut self, inbox: &mpsc::Receiver<Request>) -> Result<(), StorageError> {
        while let Ok(first) = inbox.recv() {
            let mut group = vec![first];
            while group.len() < self.options.max_batches_per_commit {
                match inbox.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            self.shared.queued.fetch_sub(group.len(), Ordering::AcqRel);
            self.commit_group(group);
        }
        if self.options.durability == Durability::Eventual {
            // An immediate commit makes every earlier eventual one durable.
            self.write(&[], Durability::Immediate)?;
        }
        Ok(())
    }

    fn commit_group(&mut self, group: Vec<Request>) {
        let batches: Vec<&Batch> = group.iter().map(|request| &request.batch).collect();
        match self.write(&batches, self.options.durability) {
            Ok(()) => {
                let committed = self.record_commit(&batches);
                for request in group {
                    request.reply.send(Ok(committed));
                }
            }
            Err(error) if group.len() == 1 => {
                self.shared.stats.lock().failed_batches += 1;
                if let Some(request) = group.into_iter().next() {
                    request.reply.send(Err(error));
                }
            }
            Err(error) => {
                // One bad batch must not fail its neighbours: retry each alone.
                tracing::warn!(%error, batches = group.len(), "group commit failed; committing its batches one by one");
                for request in group {
                    let result = self
                        .write(&[&request.batch], self.options.durability)
                        .map(|()| self.record_commit(&[&request.batch]));
                    if result.is_err() {
                        self.shared.stats.lock().failed_batches += 1;
                    }
                    request.reply.send(result);
                }
            }
        }
    }

    fn record_commit(&mut self, batches: &[&Batch]) -> Committed {
        self.sequence += 1;
        let mut stats = self.shared.stats.lock();
        stats.commits += 1;
        stats.batches += batches.len() as u64;
        stats.operations += batches.iter().map(|batch| batch.len() as u64).sum::<u64>();
        Committed {
            commit: self.sequence,
        }
    }

    /// Closes and reopens the database file after an I/O failure. redb opens a file once per
    /// process, so the old handle must be gone first: a read in flight still holds it, hence a
    /// few short waits; if it is still held, the next write tries again.
    fn reopen(&mut self) -> Result<(), StorageError> {
        let mut slot = self.db.write();
        if let Some(mut old) = slot.take() {
            for _ in 0..50 {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) => {
                        old = shared;
                        thread::sleep(std::time::Duration::from_millis(2));
                    }
                }
            }
        }
        let db = Database::create(&self.path)
            .map_err(|error| StorageError::from_redb("reopen the database", error))?;
        *slot = Some(Arc::new(db));
        self.poisoned = false;
        tracing::info!(path = %self.path.display(), "the store reopened its file after a write failure");
        Ok(())
    }

    fn write(&mut self, batches: &[&Batch], durability: Durability) -> Result<(), StorageError> {
        if self.poisoned {
            self.reopen()?;
        }
        let result = self.try_write(batches, durability);
        if let Err(error) = &result
            && error.needs_reopen()
        {
            self.poisoned = true;
        }
        result
    }

    fn try_write(&self, batches: &[&Batch], durability: Durability) -> Result<(), StorageError> {
        let db = self
            .db
            .read()
            .clone()
            .ok_or_else(|| StorageError::backend("write", "the store is not open"))?;
        let mut txn = db
            .begin_write()
            .map_err(|error| StorageError::from_redb("begin a write transaction", error))?;
        txn.set_durability(match durability {
            Durability::Immediate => redb::Durability::Immediate,
            Durability::Eventual => redb::Durability::None,
        })
        .map_err(|error| StorageError::backend("set the commit durability", error))?;
        {
            let mut open: Option<(&str, BytesTable<'_>)> = None;
            for op in batches.iter().flat_map(|batch| batch.ops()) {
                let name = op.table();
                if open.as_ref().is_none_or(|(current, _)| *current != name) {
                    let table = txn.open_table(definition(name)).map_err(|error| {
                        StorageError::from_redb("open a table for writing", error)
                    })?;
                    open = Some((name, table));
                }
                let Some((_, table)) = open.as_mut() else {
                    continue;
                };
                let applied = match op {
                    Op::Put { key, value, .. } => {
                        table.insert(key.as_slice(), value.as_slice()).map(drop)
                    }
                    Op::Delete { key, .. } => table.remove(key.as_slice()).map(drop),
                };
                applied.map_err(|error| StorageError::from_redb("write", error))?;
            }
        }
        txn.commit()
            .map_err(|error| StorageError::from_redb("commit", error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_queued_together_share_one_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gated.redb");
        let (open, gate) = mpsc::channel();
        let store = RedbStore::start(&path, StoreOptions::default(), Some(gate)).expect("opens");
        let pending: Vec<CommitFuture> = (0..50u8)
            .map(|n| {
                let mut batch = Batch::new();
                batch.put_raw("t", vec![n], vec![n]).expect("valid table");
                store.commit(batch)
            })
            .collect();
        assert_eq!(store.stats().queued, 50);
        open.send(()).expect("committer waits on the gate");
        for commit in pending {
            assert_eq!(commit.await.expect("commits").commit, 1);
        }
        let stats = store.stats();
        assert_eq!(
            (stats.commits, stats.batches, stats.operations, stats.queued),
            (1, 50, 50, 0)
        );
    }

    #[tokio::test]
    async fn merging_is_capped_and_overload_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("capped.redb");
        let (open, gate) = mpsc::channel();
        let options = StoreOptions {
            max_queued_batches: 10,
            max_batches_per_commit: 4,
            ..StoreOptions::default()
        };
        let store = RedbStore::start(&path, options, Some(gate)).expect("opens");
        let pending: Vec<CommitFuture> = (0..10).map(|_| store.commit(Batch::new())).collect();
        assert!(matches!(
            store.commit(Batch::new()).await,
            Err(StorageError::Overloaded { limit: 10 })
        ));
        open.send(()).expect("committer waits on the gate");
        let mut commits = Vec::new();
        for commit in pending {
            commits.push(commit.await.expect("commits").commit);
        }
        assert_eq!(commits, vec![1, 1, 1, 1, 2, 2, 2, 2, 3, 3]);
    }

    /// Unmounts the tmpfs when the test ends, however it ends.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    /// Issue 18, case 6: a full disk is [`StorageError::Full`] (not a "close and re-open the
    /// database" failure), and once space is free the next commit succeeds without a restart.
    /// Needs root to mount a 2 MiB tmpfs; elsewhere it says so and passes.
    #[tokio::test]
    async fn a_full_disk_is_reported_and_the_store_recovers_once_space_is_free() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mount = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(dir.path())
            .output();
        if !mount.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: cannot mount a tmpfs here (not root?): {mount:?}");
            return;
        }
        let _mounted = Mounted(dir.path().to_owned());
        let store =
            RedbStore::open(dir.path().join("s.redb"), StoreOptions::default()).expect("opens");
        let put = |n: u8, bytes: usize| {
            let mut batch = Batch::new();
            batch
                .put_raw("t", vec![n], vec![n; bytes])
                .expect("valid table");
            batch
        };
        store.commit(put(0, 1000)).await.expect("room at first");
        // Fill what is left of the disk.
        let filler = dir.path().join("filler");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&filler).expect("filler");
            let block = vec![0u8; 4096];
            while f.write_all(&block).is_ok() {}
        }
        let mut full = None;
        for n in 1..20u8 {
            match store.commit(put(n, 256 * 1024)).await {
                Ok(_) => {}
                Err(e) => {
                    full = Some(e);
                    break;
                }
            }
        }
        let full = full.expect("a write on a full disk fails");
        assert!(matches!(full, StorageError::Full { .. }), "{full}");
        assert!(!full.to_string().contains("re-open"), "{full}");
        // Still full: still Full, never poisoned for good.
        let again = store.commit(put(30, 256 * 1024)).await.unwrap_err();
        assert!(matches!(again, StorageError::Full { .. }), "{again}");

        std::fs::remove_file(&filler).expect("free the space");
        store
            .commit(put(31, 1000))
            .await
            .expect("commits once space is free");
        assert_eq!(store.get("t", &[31]).expect("reads"), Some(vec![31; 1000]));
        assert_eq!(store.get("t", &[0]).expect("reads"), Some(vec![0; 1000]));
    }
}
