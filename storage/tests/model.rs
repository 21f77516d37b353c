//! Model-based test: random operations applied to a store and to a `BTreeMap` model, compared
//! after every step, with reopens of the redb file in between.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::PathBuf;

use proptest::prelude::*;
use veraltheim_storage::{Batch, Durability, MemoryStore, RedbStore, Store, StoreOptions, Table};

const TABLES: [Table<[u8], u32>; 2] = [Table::new("alpha"), Table::new("beta")];

type Model = [BTreeMap<Vec<u8>, u32>; 2];

#[derive(Debug, Clone)]
enum Action {
    Put {
        table: usize,
        key: Vec<u8>,
        value: u32,
    },
    Delete {
        table: usize,
        key: Vec<u8>,
    },
    Batch(Vec<(usize, Vec<u8>, Option<u32>)>),
    Get {
        table: usize,
        key: Vec<u8>,
    },
    Scan {
        table: usize,
        lower: Bound<Vec<u8>>,
        upper: Bound<Vec<u8>>,
        limit: usize,
    },
    Prefix {
        table: usize,
        prefix: Vec<u8>,
    },
    Reopen,
}

/// Few distinct bytes, so that keys collide, nest as prefixes, and hit the 0xff edge.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![0u8..3, Just(0xff)], 0..4)
}

fn bound() -> impl Strategy<Value = Bound<Vec<u8>>> {
    prop_oneof![
        Just(Bound::Unbounded),
        key().prop_map(Bound::Included),
        key().prop_map(Bound::Excluded),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    let table = 0..TABLES.len();
    prop_oneof![
        4 => (table.clone(), key(), any::<u32>())
            .prop_map(|(table, key, value)| Action::Put { table, key, value }),
        2 => (table.clone(), key()).prop_map(|(table, key)| Action::Delete { table, key }),
        2 => prop::collection::vec((table.clone(), key(), prop::option::of(any::<u32>())), 0..6)
            .prop_map(Action::Batch),
        2 => (table.clone(), key()).prop_map(|(table, key)| Action::Get { table, key }),
        2 => (table.clone(), bound(), bound(), prop_oneof![Just(usize::MAX), 0usize..4])
            .prop_map(|(table, lower, upper, limit)| Action::Scan { table, lower, upper, limit }),
        1 => (table, key()).prop_map(|(table, prefix)| Action::Prefix { table, prefix }),
        1 => Just(Action::Reopen),
    ]
}

/// A store under test that may be closed and opened again.
trait Subject {
    fn store(&self) -> &dyn Store;
    fn reopen(&mut self);
}

struct Redb {
    _dir: tempfile::TempDir,
    path: PathBuf,
    options: StoreOptions,
    store: Option<RedbStore>,
}

impl Redb {
    fn new(durability: Durability) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("model.redb");
        let options = StoreOptions {
            durability,
            ..StoreOptions::default()
        };
        let store = RedbStore::open(&path, options.clone()).expect("opens");
        Self {
            _dir: dir,
            path,
            options,
            store: Some(store),
        }
    }
}

impl Subject for Redb {
    fn store(&self) -> &dyn Store {
        self.store.as_ref().expect("open between steps")
    }

    fn reopen(&mut self) {
        if let Some(store) = self.store.take() {
            store.close().expect("closes cleanly");
        }
        self.store = Some(RedbStore::open(&self.path, self.options.clone()).expect("reopens"));
    }
}

impl Subject for MemoryStore {
    fn store(&self) -> &dyn Store {
        self
    }

    fn reopen(&mut self) {}
}

fn model_range(
    map: &BTreeMap<Vec<u8>, u32>,
    lower: &Bound<Vec<u8>>,
    upper: &Bound<Vec<u8>>,
    limit: usize,
    back: bool,
) -> Vec<(Vec<u8>, u32)> {
    // BTreeMap::range panics on inverted bounds; a store answers them with nothing.
    let empty = match (lower, upper) {
        (Bound::Included(low), Bound::Included(high)) => low > high,
        (Bound::Included(low) | Bound::Excluded(low), Bound::Excluded(high))
        | (Bound::Excluded(low), Bound::Included(high)) => low >= high,
        _ => false,
    };
    if empty {
        return Vec::new();
    }
    let range = map.range((lower.clone(), upper.clone()));
    let entries: Box<dyn Iterator<Item = _>> = if back {
        Box::new(range.rev())
    } else {
        Box::new(range)
    };
    entries
        .take(limit)
        .map(|(key, value)| (key.clone(), *value))
        .collect()
}

fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key.as_slice()),
        Bound::Excluded(key) => Bound::Excluded(key.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn run(subject: &mut dyn Subject, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut model: Model = Default::default();
    for (step, action) in actions.iter().enumerate() {
        match action {
            Action::Put { table, key, value } => {
                TABLES[*table]
                    .put_blocking(subject.store(), key, value)
                    .expect("put commits");
                model[*table].insert(key.clone(), *value);
            }
            Action::Delete { table, key } => {
                TABLES[*table]
                    .delete_blocking(subject.store(), key)
                    .expect("delete commits");
                model[*table].remove(key);
            }
            Action::Batch(ops) => {
                let mut batch = Batch::new();
                for (table, key, value) in ops {
                    match value {
                        Some(value) => {
                            batch.put(&TABLES[*table], key, value).expect("encodes");
                            model[*table].insert(key.clone(), *value);
                        }
                        None => {
                            batch.delete(&TABLES[*table], key).expect("valid table");
                            model[*table].remove(key);
                        }
                    }
                }
                subject
                    .store()
                    .commit_blocking(batch)
                    .expect("batch commits");
            }
            Action::Get { table, key } => {
                let got = TABLES[*table].get(subject.store(), key).expect("reads");
                prop_assert_eq!(
                    got,
                    model[*table].get(key).copied(),
                    "step {}: {:?}",
                    step,
                    action
                );
            }
            Action::Scan {
                table,
                lower,
                upper,
                limit,
            } => {
                let got = TABLES[*table]
                    .range_limit(subject.store(), (as_ref(lower), as_ref(upper)), *limit)
                    .expect("scans");
                let want = model_range(&model[*table], lower, upper, *limit, false);
                prop_assert_eq!(got, want, "step {}: {:?}", step, action);
                // The same range from its end.
                let got = TABLES[*table]
                    .range_limit_back(subject.store(), (as_ref(lower), as_ref(upper)), *limit)
                    .expect("scans back");
                let want = model_range(&model[*table], lower, upper, *limit, true);
                prop_assert_eq!(got, want, "step {} (back): {:?}", step, action);
            }
            Action::Prefix { table, prefix } => {
                let got = TABLES[*table]
                    .prefix(subject.store(), prefix)
                    .expect("scans");
                let want: Vec<(Vec<u8>, u32)> = model[*table]
                    .iter()
                    .filter(|(key, _)| key.starts_with(prefix))
                    .map(|(key, value)| (key.clone(), *value))
                    .collect();
                prop_assert_eq!(got, want, "step {}: {:?}", step, action);
            }
            Action::Reopen => subject.reopen(),
        }
        for (table, expected) in TABLES.iter().zip(&model) {
            let all = table.range(subject.store(), ..).expect("scans");
            let want: Vec<(Vec<u8>, u32)> = expected
                .iter()
                .map(|(key, value)| (key.clone(), *value))
                .collect();
            prop_assert_eq!(
                all,
                want,
                "table {} after step {}: {:?}",
                table.name(),
                step,
                action
            );
        }
    }
    Ok(())
}

proptest! {
    // Each case opens a file and fsyncs every commit: fewer cases than the default.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn redb_store_behaves_like_a_btreemap(
        actions in prop::collection::vec(action(), 1..40),
        immediate in any::<bool>(),
    ) {
        let durability = if immediate { Durability::Immediate } else { Durability::Eventual };
        run(&mut Redb::new(durability), &actions)?;
    }
}

proptest! {
    #[test]
    fn memory_store_behaves_like_a_btreemap(actions in prop::collection::vec(action(), 1..40)) {
        run(&mut MemoryStore::new(), &actions)?;
    }
}
