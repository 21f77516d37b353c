//! Graph optimisation and its cache: the level a model's graph is optimised at, and the optimised
//! graph that the first load writes and later loads reuse.
//!
//! The cache of a graph file `F` at level `L` is two files: `F`'s optimised graph and a JSON
//! record of what it was made from (the source graph's SHA-256, ONNX Runtime's build string, the
//! level, the CPU's model and flags) and of what was written (the optimised file's length and
//! SHA-256), plus the result of the reference check ([`super::tune`]) once it ran. They lie beside
//! the model (`.F.L.optimized.onnx` / `.json`) when the model's folder is writable, else in
//! [`GraphCache::Beside`]'s fallback folder (`<sha>.L.optimized.onnx`, under the server's
//! `<data_dir>/onnx-cache`); without a usable folder the graph is optimised at every load.
//!
//! A load trusts the cache only when the record parses, names the same source hash, ONNX Runtime
//! build, level and CPU (else it is *stale*), and the optimised file's length and hash match the
//! record (else it is *corrupt*). Anything else is rebuilt from the source, and the reason logged.
//! A rebuilt cache is written under temporary names and renamed into place, so that a load that
//! runs at the same time never sees half a file (and if it did, the hash would say so).
//! Thread settings are not part of the key: ONNX Runtime's graph rewrites do not depend on them.
//! The cached graph is loaded with ONNX Runtime's own optimisation off: it is already optimised.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ort::session::builder::GraphOptimizationLevel;
use serde::{Deserialize, Serialize};

/// How far ONNX Runtime rewrites a graph before running it (model parameter
/// [`super::PARAM_OPTIMIZATION`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// No rewrites.
    None,
    /// Constant folding and redundant-node removal: the reference the others are checked against.
    Basic,
    /// Basic plus the complex fusions (attention, layer norm, GELU, MatMul+Add, ...).
    Extended,
    /// Everything, layout rewrites included (ONNX Runtime's default).
    All,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::Basic => "basic",
            Level::Extended => "extended",
            Level::All => "all",
        }
    }

    /// Parses a parameter value; `None` for an unknown one.
    pub fn parse(text: &str) -> Option<Level> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" | "disable" | "disabled" | "0" => Some(Level::None),
            "basic" | "level1" | "1" => Some(Level::Basic),
            "extended" | "level2" | "2" => Some(Level::Extended),
            "all" | "level3" | "3" | "99" => Some(Level::All),
            _ => None,
        }
    }

    pub(super) fn ort(self) -> GraphOptimizationLevel {
        match self {
            Level::None => GraphOptimizationLevel::Disable,
            Level::Basic => GraphOptimizationLevel::Level1,
            Level::Extended => GraphOptimizationLevel::Level2,
            Level::All => GraphOptimizationLevel::All,
        }
    }
}

/// Where the optimised graphs of a model are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphCache {
    /// Beside the model when its folder is writable, else in the given folder (when there is one).
    Beside(Option<PathBuf>),
    /// Only in this folder.
    In(PathBuf),
    /// Nowhere: every load optimises the graph again.
    Off,
}

impl Default for GraphCache {
    fn default() -> Self {
        GraphCache::Beside(None)
    }
}

/// What a cached graph was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Key {
    pub source_sha256: String,
    pub ort_build: String,
    pub level: String,
    pub cpu: String,
}

/// The record beside a cached graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct Record {
    pub key: Key,
    pub optimized_len: u64,
    pub optimized_sha256: String,
    /// The reference check of this graph, once it ran.
    #[serde(default)]
    pub check: Option<CheckRecord>,
}

/// The result of comparing the optimised graph's outputs with the basic level's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct CheckRecord {
    pub max_abs_diff: f64,
    pub accepted: bool,
}

/// One cache entry's two files.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub graph: PathBuf,
    pub record: PathBuf,
}

/// The state of the cache for a graph at a level.
#[derive(Debug)]
pub(super) enum Lookup {
    /// A valid optimised graph.
    Hit(Entry, Record),
    /// None usable: build one into `entry` (`None`: nowhere writable). `why` says what was wrong.
    Miss { entry: Option<Entry>, why: String },
}

/// The SHA-256 of a file, in hex, and its length.
pub(super) fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((hex(ctx.finish().as_ref()), len))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// ONNX Runtime's build string (version, commit, flags).
pub(super) fn ort_build() -> String {
    let api = ort::api();
    // SAFETY: ONNX Runtime returns a static NUL-terminated string (or null, handled).
    unsafe {
        let p = (api.GetBuildInfoString)();
        if p.is_null() {
            return "unknown".into();
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// The CPU as the optimised graph may depend on it: its model and instruction-set flags (hashed),
/// or the architecture alone where /proc/cpuinfo cannot be read.
pub(super) fn cpu_signature() -> String {
    let arch = std::env::consts::ARCH;
    let Ok(info) = fs::read_to_string("/proc/cpuinfo") else {
        return arch.to_string();
    };
    // The first processor's block: every core of a host has the same model and flags.
    let first = info.split("\n\n").next().unwrap_or("");
    let wanted: Vec<&str> = first
        .lines()
        .filter(|l| {
            let k = l.split(':').next().unwrap_or("").trim();
            matches!(
                k,
                "vendor_id" | "model name" | "flags" | "Features" | "CPU part"
            )
        })
        .collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, wanted.join("\n").as_bytes());
    format!("{arch}-{}", &hex(digest.as_ref())[..16])
}

/// Where the cache of `source` at `level` lives, or the first folder that turned out writable.
fn locations(source: &Path, source_sha: &str, level: Level, cache: &GraphCache) -> Vec<Entry> {
    let file = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.onnx".into());
    let beside = |dir: &Path| {
        let stem = format!(".{file}.{}.optimized", level.name());
        Entry {
            graph: dir.join(format!("{stem}.onnx")),
            record: dir.join(format!("{stem}.json")),
        }
    };
    let shared = |dir: &Path| {
        let stem = format!("{}.{}.optimized", &source_sha[..32], level.name());
        Entry {
            graph: dir.join(format!("{stem}.onnx")),
            record: dir.join(format!("{stem}.json")),
        }
    };
    match cache {
        GraphCache::Off => Vec::new(),
        GraphCache::In(dir) => vec![shared(dir)],
        GraphCache::Beside(fallback) => {
            let mut v = Vec::new();
            if let Some(dir) = source.parent() {
                v.push(beside(dir));
            }
            if let Some(dir) = fallback {
                v.push(shared(dir));
            }
            v
        }
    }
}

/// Checks an entry against `key`: `Ok(record)` when it can be trusted, else why not.
fn validate(entry: &Entry, key: &Key) -> Result<Record, String> {
    let text = match fs::read_to_string(&entry.record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("none yet".into()),
        Err(e) => return Err(format!("its record cannot be read ({e})")),
    };
    let record: Record = serde_json::from_str(&text)
        .map_err(|e| format!("corrupt: its record does not parse ({e})"))?;
    if record.key != *key {
        let what = if record.key.source_sha256 != key.source_sha256 {
            "the source graph changed"
        } else if record.key.ort_build != key.ort_build {
            "another ONNX Runtime build made it"
        } else if record.key.cpu != key.cpu {
            "it was made on another CPU"
        } else {
            "its level differs"
        };
        return Err(format!("stale: {what}"));
    }
    let (sha, len) = sha256_file(&entry.graph)
        .map_err(|e| format!("corrupt: the optimised graph cannot be read ({e})"))?;
    if len != record.optimized_len || sha != record.optimized_sha256 {
        return Err(format!(
            "corrupt: the optimised graph is {len} bytes with SHA-256 {}…, the record says {} \
             bytes, {}…",
            &sha[..12],
            record.optimized_len,
            &record.optimized_sha256[..record.optimized_sha256.len().min(12)]
        ));
    }
    Ok(record)
}

/// Looks the cache up: the first location that holds a valid entry, else where to build one.
pub(super) fn lookup(source: &Path, key: &Key, level: Level, cache: &GraphCache) -> Lookup {
    let places = locations(source, &key.source_sha256, level, cache);
    if places.is_empty() {
        return Lookup::Miss {
            entry: None,
            why: "the graph cache is off".into(),
        };
    }
    let mut why = Vec::new();
    for entry in &places {
        match validate(entry, key) {
            Ok(record) => return Lookup::Hit(entry.clone(), record),
            Err(reason) => why.push(format!("{}: {reason}", entry.graph.display())),
        }
    }
    // Build into the first folder we can write.
    let entry = places.into_iter().find(|e| writable(&e.graph));
    if entry.is_none() {
        why.push("no folder to cache it in is writable".into());
    }
    Lookup::Miss {
        entry,
        why: why.join("; "),
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name beside `path`.
pub(super) fn temp_beside(path: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Whether a file can be created in `path`'s folder (creating the folder if needed).
fn writable(path: &Path) -> bool {
    let Some(dir) = path.parent() else {
        return false;
    };
    if fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = temp_beside(path);
    let ok = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

/// Publishes an optimised graph written at `temp` as `entry`: hashes it, writes the record and
/// renames both into place. On error the temporary file is removed.
pub(super) fn publish(
    entry: &Entry,
    temp: &Path,
    key: &Key,
    check: Option<CheckRecord>,
) -> Result<Record, String> {
    let result = (|| {
        let (sha, len) = sha256_file(temp)
            .map_err(|e| format!("cannot read the optimised graph {}: {e}", temp.display()))?;
        let record = Record {
            key: key.clone(),
            optimized_len: len,
            optimized_sha256: sha,
            check,
        };
        fs::rename(temp, &entry.graph)
            .map_err(|e| format!("cannot move it to {}: {e}", entry.graph.display()))?;
        write_record(entry, &record)?;
        Ok(record)
    })();
    let _ = fs::remove_file(temp);
    result
}

/// Writes (or rewrites) an entry's record, atomically.
pub(super) fn write_record(entry: &Entry, record: &Record) -> Result<(), String> {
    let text = serde_json::to_string_pretty(record).map_err(|e| e.to_string())?;
    let temp = temp_beside(&entry.record);
    let written = fs::File::create(&temp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&temp, &entry.record));
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(format!("cannot write {}: {e}", entry.record.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_name_themselves() {
        for l in [Level::None, Level::Basic, Level::Extended, Level::All] {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        assert_eq!(Level::parse(" Level3 "), Some(Level::All));
        assert_eq!(Level::parse("fast"), None);
        assert!(Level::Basic < Level::All);
    }

    fn key() -> Key {
        Key {
            source_sha256: "ab".repeat(32),
            ort_build: "ort 1.x".into(),
            level: "all".into(),
            cpu: "x86_64-test".into(),
        }
    }

    #[test]
    fn a_published_entry_is_found_and_a_changed_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("model.onnx");
        fs::write(&source, b"source").unwrap();
        let cache = GraphCache::default();
        let Lookup::Miss {
            entry: Some(entry),
            why,
        } = lookup(&source, &key(), Level::All, &cache)
        else {
            panic!("an empty writable folder is a miss with a place to build")
        };
        assert!(why.contains("none yet"), "{why}");
        assert_eq!(entry.graph.parent(), Some(dir.path()));
        let temp = temp_beside(&entry.graph);
        fs::write(&temp, b"optimised").unwrap();
        publish(&entry, &temp, &key(), None).unwrap();
        assert!(!temp.exists());
        assert!(matches!(
            lookup(&source, &key(), Level::All, &cache),
            Lookup::Hit(..)
        ));

        // Stale: another source hash (or build, or CPU).
        let mut other = key();
        other.source_sha256 = "cd".repeat(32);
        let Lookup::Miss { why, .. } = lookup(&source, &other, Level::All, &cache) else {
            panic!("a changed source must not hit")
        };
        assert!(why.contains("stale: the source graph changed"), "{why}");
        let mut other = key();
        other.ort_build = "ort 2".into();
        let Lookup::Miss { why, .. } = lookup(&source, &other, Level::All, &cache) else {
            panic!("another build must not hit")
        };
        assert!(why.contains("another ONNX Runtime build"), "{why}");

        // Corrupt: same length, one byte changed; then truncated; then a broken record.
        fs::write(&entry.graph, b"optimisee").unwrap();
        let Lookup::Miss { why, .. } = lookup(&source, &key(), Level::All, &cache) else {
            panic!("a changed graph must not hit")
        };
        assert!(why.contains("corrupt"), "{why}");
        fs::write(&entry.graph, b"opt").unwrap();
        assert!(matches!(
            lookup(&source, &key(), Level::All, &cache),
            Lookup::Miss { .. }
        ));
        fs::write(&entry.record, b"{not json").unwrap();
        let Lookup::Miss { why, .. } = lookup(&source, &key(), Level::All, &cache) else {
            panic!("a broken record must not hit")
        };
        assert!(why.contains("does not parse"), "{why}");
    }

    #[test]
    fn an_unwritable_model_folder_falls_back_to_the_cache_folder() {
        let dir = tempfile::tempdir().unwrap();
        let fallback = tempfile::tempdir().unwrap();
        // The model's "folder" is under a file, so nothing can be created there.
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"x").unwrap();
        let source_under_file = blocker.join("model.onnx");
        let cache = GraphCache::Beside(Some(fallback.path().to_path_buf()));
        let Lookup::Miss {
            entry: Some(entry), ..
        } = lookup(&source_under_file, &key(), Level::All, &cache)
        else {
            panic!("the fallback folder is writable")
        };
        assert_eq!(entry.graph.parent(), Some(fallback.path()));
        let Lookup::Miss { entry, why } =
            lookup(&source_under_file, &key(), Level::All, &GraphCache::Off)
        else {
            panic!("off never hits")
        };
        assert!(entry.is_none());
        assert!(why.contains("off"), "{why}");
    }
}
