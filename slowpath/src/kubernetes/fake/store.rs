//! The fake's state: Jobs, pods, logs and the history of changes that watches resume from,
//! with the label and field selectors that pick objects out of it.

use super::*;

/// Changes kept for watches to resume from; older resource versions are `410 Gone`.
pub(super) const HISTORY: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Job,
    Pod,
}

/// One change, as a watch sends it.
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub(super) rv: u64,
    pub(super) kind: Kind,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) line: Bytes,
}

#[derive(Clone, Debug)]
pub(super) struct Fault {
    pub(super) method: Option<Method>,
    pub(super) path_contains: String,
    pub(super) status: u16,
    pub(super) remaining: usize,
}

/// What a test (or a delete) tells a running Job's fake pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Control {
    Release,
    Evict,
    NodeLost,
    Deleted,
}

pub(super) struct State {
    pub(super) rv: u64,
    /// Watches from a resource version below this get `410 Gone`.
    pub(super) compacted: u64,
    pub(super) history: VecDeque<Change>,
    pub(super) jobs: BTreeMap<(String, String), Job>,
    pub(super) pods: BTreeMap<(String, String), Pod>,
    pub(super) logs: HashMap<(String, String), Vec<u8>>,
    pub(super) controls: HashMap<(String, String), mpsc::UnboundedSender<Control>>,
    pub(super) faults: Vec<Fault>,
    pub(super) requests: Vec<Recorded>,
    pub(super) deletions: Vec<Deletion>,
    /// Watches answered `410 Gone`.
    pub(super) expired: usize,
    pub(super) bookmarks: Vec<Bookmark>,
    pub(super) next_uid: u64,
    pub(super) bookmark_every: Duration,
    pub(super) step: Duration,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) changes: broadcast::Sender<Change>,
    /// Cancelled (and replaced) by [`FakeKube::close_watches`].
    pub(super) watches: Mutex<CancellationToken>,
    pub(super) shutdown: CancellationToken,
}

pub(super) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

pub(super) fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_owned(), name.to_owned())
}

/// A label selector of the forms `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated.
pub(super) fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels.get(k.trim()).map(String::as_str) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                !labels.contains_key(k.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

/// A field selector: `metadata.name=X`, `metadata.namespace=X`.
pub(super) fn fields_match(selector: &str, ns: &str, name: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => v == name,
            Some(("metadata.namespace", v)) => v == ns,
            _ => true,
        })
}

pub(super) fn labels_of(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

impl State {
    /// Records a change of an object: bumps the resource version, stamps it on the object,
    /// keeps it for watches and sends it to the open ones.
    pub(super) fn emit<T: serde::Serialize>(
        &mut self,
        tx: &broadcast::Sender<Change>,
        kind: Kind,
        type_: &str,
        meta: &mut ObjectMeta,
        object: impl FnOnce(&ObjectMeta) -> T,
    ) {
        self.rv += 1;
        meta.resource_version = Some(self.rv.to_string());
        let obj = object(meta);
        let mut line = serde_json::to_vec(&json!({"type": type_, "object": obj}))
            .unwrap_or_else(|_| b"{}".to_vec());
        line.push(b'\n');
        let change = Change {
            rv: self.rv,
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            labels: labels_of(meta),
            line: Bytes::from(line),
        };
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(change.clone());
        let _ = tx.send(change);
    }

    pub(super) fn emit_job(
        &mut self,
        tx: &broadcast::Sender<Change>,
        type_: &str,
        k: &(String, String),
    ) {
        let Some(mut job) = self.jobs.remove(k) else {
            return;
        };
        let mut meta = std::mem::take(&mut job.metadata);
        let mut snapshot = job.clone();
        self.emit(tx, Kind::Job, type_, &mut meta, |m| {
            snapshot.metadata = m.clone();
            snapshot
        });
        job.metadata = meta;
        if type_ != "DELETED" {
            self.jobs.insert(k.clone(), job);
        }
    }

    pub(super) fn emit_pod(
        &mut self,
        tx: &broadcast::Sender<Change>,
        type_: &str,
        k: &(String, String),
    ) {
        let Some(mut pod) = self.pods.remove(k) else {
            return;
        };
        let mut meta = std::mem::take(&mut pod.metadata);
        let mut snapshot = pod.clone();
        self.emit(tx, Kind::Pod, type_, &mut meta, |m| {
            snapshot.metadata = m.clone();
            snapshot
        });
        pod.metadata = meta;
        if type_ != "DELETED" {
            self.pods.insert(k.clone(), pod);
        }
    }

    pub(super) fn pods_of(&self, ns: &str, job: &str) -> Vec<(String, String)> {
        self.pods
            .iter()
            .filter(|((pns, _), p)| {
                pns == ns
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("job-name"))
                        .is_some_and(|j| j == job)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}
