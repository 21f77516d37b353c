//! The durable store: group commit under concurrency, survival across reopen, typed tables.

use std::sync::Arc;

use veraltheim_storage::{
    Batch, Durability, MemoryStore, RedbStore, StorageError, Store, StoreOptions, Table,
};

const COUNTS: Table<u64, String> = Table::new("counts");
const NAMES: Table<str, u32> = Table::new("names");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_are_acknowledged_share_commits_and_survive_reopen() {
    const TASKS: u64 = 12;
    const THREADS: u64 = 4;
    const EACH: u64 = 25;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("concurrent.redb");
    let store = Arc::new(RedbStore::open(&path, StoreOptions::default()).expect("opens"));

    let tasks: Vec<_> = (0..TASKS)
        .map(|writer| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for i in 0..EACH {
                    let key = writer * 1000 + i;
                    COUNTS
                        .put(&store, &key, &format!("value {key}"))
                        .await
                        .expect("acknowledged");
                }
            })
        })
        .collect();
    let threads: Vec<_> = (TASKS..TASKS + THREADS)
        .map(|writer| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let key = writer * 1000 + i;
                    COUNTS
                        .put_blocking(&store, &key, &format!("value {key}"))
                        .expect("acknowledged");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task completes");
    }
    for thread in threads {
        thread.join().expect("writer thread completes");
    }

    let writes = (TASKS + THREADS) * EACH;
    let stats = store.stats();
    assert_eq!(
        (stats.batches, stats.operations, stats.failed_batches),
        (writes, writes, 0)
    );
    assert!(
        stats.commits < writes,
        "group commit merged nothing: {} commits for {writes} writes",
        stats.commits
    );

    Arc::into_inner(store)
        .expect("writers are done")
        .close()
        .expect("closes");
    let reopened = RedbStore::open(&path, StoreOptions::default()).expect("reopens");
    let all = COUNTS.range(&reopened, ..).expect("scans");
    assert_eq!(all.len() as u64, writes);
    for writer in 0..TASKS + THREADS {
        for i in 0..EACH {
            let key = writer * 1000 + i;
            assert_eq!(
                COUNTS.get(&reopened, &key).expect("reads"),
                Some(format!("value {key}"))
            );
        }
    }
}

#[test]
fn eventual_commits_are_made_durable_on_close() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("eventual.redb");
    let options = StoreOptions {
        durability: Durability::Eventual,
        ..StoreOptions::default()
    };
    let store = RedbStore::open(&path, options).expect("opens");
    for (n, name) in ["a", "b", "c"].into_iter().enumerate() {
        NAMES
            .put_blocking(&store, name, &(n as u32))
            .expect("commits");
    }
    NAMES.delete_blocking(&store, "b").expect("commits");
    drop(store);
    let reopened = RedbStore::open(&path, StoreOptions::default()).expect("reopens");
    let all = NAMES.range(&reopened, ..).expect("scans");
    assert_eq!(all, vec![("a".to_owned(), 0), ("c".to_owned(), 2)]);
}

#[test]
fn a_file_is_opened_by_one_store_at_a_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("locked.redb");
    let first = RedbStore::open(&path, StoreOptions::default()).expect("opens");
    let error = RedbStore::open(&path, StoreOptions::default()).expect_err("already open");
    assert!(matches!(error, StorageError::Open { .. }));
    assert!(error.to_string().contains("locked.redb"), "{error}");
    first.close().expect("closes");
    RedbStore::open(&path, StoreOptions::default()).expect("free again");
}

fn typed_tables_scan_in_key_order(store: &dyn Store) {
    let mut batch = Batch::new();
    for (name, n) in [("b", 2), ("ab", 12), ("c", 3), ("a", 1), ("abc", 123)] {
        batch.put(&NAMES, name, &n).expect("encodes");
    }
    for n in [256u64, 1, 2, u64::MAX, 0] {
        batch.put(&COUNTS, &n, &n.to_string()).expect("encodes");
    }
    store.commit_blocking(batch).expect("commits");

    let names = |entries: Vec<(String, u32)>| -> Vec<String> {
        entries.into_iter().map(|(name, _)| name).collect()
    };
    assert_eq!(
        names(NAMES.range(store, ..).expect("scans")),
        ["a", "ab", "abc", "b", "c"]
    );
    assert_eq!(
        names(NAMES.prefix(store, "ab").expect("scans")),
        ["ab", "abc"]
    );
    assert_eq!(
        names(NAMES.range(store, "ab".."c").expect("scans")),
        ["ab", "abc", "b"]
    );
    assert_eq!(names(NAMES.range(store, "b"..).expect("scans")), ["b", "c"]);
    assert_eq!(
        names(NAMES.range_limit(store, .., 2).expect("scans")),
        ["a", "ab"]
    );
    assert_eq!(
        names(NAMES.range(store, "c".."a").expect("inverted is empty")),
        Vec::<String>::new()
    );
    // From the end: the last entries first, within the same bounds.
    assert_eq!(
        names(NAMES.range_limit_back(store, .., 2).expect("scans")),
        ["c", "b"]
    );
    assert_eq!(
        names(NAMES.range_limit_back(store, .."b", 10).expect("scans")),
        ["abc", "ab", "a"]
    );
    assert_eq!(
        names(NAMES.range_limit_back(store, "ab"..="b", 2).expect("scans")),
        ["b", "abc"]
    );
    assert_eq!(
        names(
            NAMES
                .range_limit_back(store, "c".."a", 5)
                .expect("inverted is empty")
        ),
        Vec::<String>::new()
    );

    let numbers: Vec<u64> = COUNTS
        .range(store, ..)
        .expect("scans")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        numbers,
        [0, 1, 2, 256, u64::MAX],
        "numeric, not lexicographic"
    );
    assert_eq!(
        COUNTS.get(store, &256).expect("reads"),
        Some("256".to_owned())
    );
    assert_eq!(COUNTS.get(store, &3).expect("reads"), None);
    assert_eq!(
        Table::<str, u32>::new("never-written")
            .range(store, ..)
            .expect("empty"),
        Vec::new()
    );
}

#[test]
fn typed_tables_scan_in_key_order_on_redb() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        RedbStore::open(dir.path().join("typed.redb"), StoreOptions::default()).expect("opens");
    typed_tables_scan_in_key_order(&store);
}

#[test]
fn typed_tables_scan_in_key_order_in_memory() {
    typed_tables_scan_in_key_order(&MemoryStore::new());
}

#[tokio::test]
async fn wrong_types_and_names_are_reported_with_context() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    NAMES.put(&store, "job-7", &7).await.expect("commits");

    const AS_TEXT: Table<str, String> = Table::new("names");
    let error = AS_TEXT
        .get(&store, "job-7")
        .expect_err("a number is not a string");
    let message = error.to_string();
    assert!(matches!(error, StorageError::Decode { .. }));
    assert!(
        message.contains("\"names\"") && message.contains("job-7"),
        "{message}"
    );

    const AS_NUMBERS: Table<u64, u32> = Table::new("names");
    assert!(matches!(
        AS_NUMBERS.range(&store, ..),
        Err(StorageError::KeyDecode { .. })
    ));

    const NAMELESS: Table<str, u32> = Table::new("");
    assert!(matches!(
        NAMELESS.put(&store, "x", &1).await,
        Err(StorageError::InvalidTableName { .. })
    ));
    assert!(matches!(
        Batch::new().put_raw("bad\nname", b"k".to_vec(), b"v".to_vec()),
        Err(StorageError::InvalidTableName { .. })
    ));
}

#[tokio::test]
async fn a_batch_is_applied_whole_and_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        RedbStore::open(dir.path().join("batch.redb"), StoreOptions::default()).expect("opens");
    NAMES.put(&store, "gone", &0).await.expect("commits");
    let mut batch = Batch::new();
    batch
        .put(&NAMES, "x", &1)
        .and_then(|batch| batch.put(&NAMES, "x", &2))
        .and_then(|batch| batch.delete(&NAMES, "gone"))
        .and_then(|batch| batch.put(&COUNTS, &9, &"nine".to_owned()))
        .expect("valid");
    let committed = store.commit(batch).await.expect("commits");
    assert_eq!(committed.commit, 2);
    assert_eq!(
        NAMES.range(&store, ..).expect("scans"),
        vec![("x".to_owned(), 2)]
    );
    assert_eq!(
        COUNTS.get(&store, &9).expect("reads").as_deref(),
        Some("nine")
    );
}
