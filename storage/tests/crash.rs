//! A process killed with SIGKILL loses no acknowledged write.
//!
//! The test runs itself again as a child process that writes from several threads and prints
//! each acknowledged key; the parent kills it mid-stream, reopens the file and looks for every
//! key it saw acknowledged. A kill leaves the OS page cache intact, so this checks that
//! acknowledgements follow commits, not that fsync reaches the disk.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use veraltheim_storage::{RedbStore, StoreOptions, Table};

const CHILD_ENV: &str = "VERALTHEIM_STORAGE_CRASH_CHILD";
const TEST_NAME: &str = "acknowledged_writes_survive_kill_9";
const JOBS: Table<u64, String> = Table::new("jobs");
const THREADS: u64 = 4;
/// A bound on the child's work in case the parent dies before killing it.
const MAX_WRITES_PER_THREAD: u64 = 20_000;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        write_until_killed(Path::new(&path));
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("crash.redb");
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = KillOnDrop(
        Command::new(exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the child starts"),
    );
    let stdout = child.0.stdout.take().expect("piped");
    let mut acknowledged = BTreeSet::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child output is text");
        if let Some(key) = line.strip_prefix("acked ") {
            acknowledged.insert(key.parse::<u64>().expect("the child prints numbers"));
            if acknowledged.len() >= 300 {
                break;
            }
        }
    }
    drop(child);
    assert!(acknowledged.len() >= 300, "the child stopped early");

    let store = RedbStore::open(&path, StoreOptions::default()).expect("reopens after a crash");
    for key in &acknowledged {
        assert_eq!(
            JOBS.get(&store, key).expect("reads"),
            Some(format!("job {key}")),
            "acknowledged key {key} was lost"
        );
    }
}

fn write_until_killed(path: &Path) {
    let store = RedbStore::open(path, StoreOptions::default()).expect("child opens");
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let store = &store;
            scope.spawn(move || {
                for i in 0..MAX_WRITES_PER_THREAD {
                    let key = thread * 1_000_000 + i;
                    JOBS.put_blocking(store, &key, &format!("job {key}"))
                        .expect("child writes");
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "acked {key}");
                    let _ = out.flush();
                }
            });
        }
    });
}
