//! A FAKE Kubernetes API server, for tests only (feature `fake-k8s`; always in this crate's
//! unit tests). No Kubernetes API server can run on the machines that build Veraltheim, so the
//! Kubernetes executor is tested against this: a real HTTP server (axum) on a loopback port that
//! speaks the Kubernetes JSON wire format for what the executor uses — and nothing more:
//!
//! - `batch/v1` Jobs: create (`409 AlreadyExists` on a taken name), get, list and watch (label
//!   and field selectors), delete (the `propagationPolicy` of the body or the query is recorded;
//!   `Foreground` first marks the Job with a `deletionTimestamp` and the `foregroundDeletion`
//!   finalizer, deletes its pods, then the Job);
//! - pods: get, list and watch (by label), and their log (`follow` streams until the pod ends);
//! - watches: `ADDED` / `MODIFIED` / `DELETED` events from a given `resourceVersion`, `BOOKMARK`
//!   events when `allowWatchBookmarks=true`, and an `ERROR` event with a `410 Gone` /
//!   `Expired` Status for a `resourceVersion` older than the last [`FakeKube::compact`];
//! - faults: [`FakeKube::fail`] answers matching requests with a 5xx Status.
//!
//! It plays the job controller and the kubelet too: a created Job gets one pod, which "runs" the
//! container's command as a tiny script — `sh -c "..."` or a plain argv, statements split on
//! `;`, newlines and `&&`: `echo TEXT` writes a log line, `sleep SECONDS` waits, `exit N` ends
//! with code N (`true`, `false` too); fake-only statements: `fake-hold` waits for
//! [`FakeKube::release`], `fake-evict` evicts the pod, `fake-node-lost` makes the pod vanish.
//! An image whose name contains `pull-error` never starts: its container waits in
//! `ErrImagePull` then `ImagePullBackOff`. `activeDeadlineSeconds` is enforced
//! (`DeadlineExceeded`). Tests can also [`FakeKube::evict`] or [`FakeKube::lose_node`] at any
//! moment. It does not garbage-collect finished Jobs (`ttlSecondsAfterFinished` is ignored).

// The parts, named after what they hold; each sees the others through this module's imports.
mod kubelet;
mod routes;
mod store;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Query;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use kubelet::*;
use routes::*;
use store::*;
use watch::*;

/// A request the fake answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
}

/// A `BOOKMARK` the fake handed to an open watch (sent before anything later on that watch,
/// so its client sees it before the watch ends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bookmark {
    /// "Job" or "Pod".
    pub kind: String,
    /// The watch's `labelSelector`, as sent.
    pub label_selector: String,
    pub resource_version: u64,
}

/// A delete the fake was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub kind: String,
    pub name: String,
    /// `propagationPolicy` as sent (body or query), if any.
    pub propagation: Option<String>,
}

/// The FAKE Kubernetes API server; see the module documentation. Stops when dropped.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

impl FakeKube {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> std::io::Result<FakeKube> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (changes, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                compacted: 0,
                history: VecDeque::new(),
                jobs: BTreeMap::new(),
                pods: BTreeMap::new(),
                logs: HashMap::new(),
                controls: HashMap::new(),
                faults: Vec::new(),
                requests: Vec::new(),
                deletions: Vec::new(),
                expired: 0,
                bookmarks: Vec::new(),
                next_uid: 1,
                bookmark_every: Duration::from_millis(500),
                step: Duration::from_millis(50),
            }),
            changes,
            watches: Mutex::new(CancellationToken::new()),
            shutdown: CancellationToken::new(),
        });
        let app = axum::Router::new().fallback({
            let shared = shared.clone();
            move |method: Method, uri: Uri, body: Bytes| {
                let shared = shared.clone();
                async move { handle(shared, method, uri, body).await }
            }
        });
        let shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            let server = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await });
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "fake Kubernetes API server stopped");
            }
        });
        Ok(FakeKube { shared, addr })
    }

    /// The base URL, for [`super::KubernetesConfig::api_url`].
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next `times` requests whose method is `method` (any when `None`) and whose
    /// path contains `path_contains` with a `status` (5xx) Status, doing nothing else.
    pub fn fail(&self, method: Option<&str>, path_contains: &str, status: u16, times: usize) {
        self.shared.state.lock().faults.push(Fault {
            method: method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()),
            path_contains: path_contains.to_owned(),
            status,
            remaining: times,
        });
    }

    /// Drops every fault not yet used up.
    pub fn clear_faults(&self) {
        self.shared.state.lock().faults.clear();
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state.lock().requests.clone()
    }

    /// How many requests with `method` whose path contains `path_contains` were answered with
    /// `status` (any status when `None`).
    pub fn count(&self, method: &str, path_contains: &str, status: Option<u16>) -> usize {
        self.shared
            .state
            .lock()
            .requests
            .iter()
            .filter(|r| {
                r.method == method
                    && r.path.contains(path_contains)
                    && status.is_none_or(|s| s == r.status)
            })
            .count()
    }

    /// How many watches were answered `410 Gone` (`Expired`).
    pub fn expired_watches(&self) -> usize {
        self.shared.state.lock().expired
    }

    /// Every `BOOKMARK` handed to a watch so far.
    pub fn bookmarks(&self) -> Vec<Bookmark> {
        self.shared.state.lock().bookmarks.clone()
    }

    /// Every delete asked for so far.
    pub fn deletions(&self) -> Vec<Deletion> {
        self.shared.state.lock().deletions.clone()
    }

    /// The Jobs of `namespace` now.
    pub fn jobs(&self, namespace: &str) -> Vec<Job> {
        let state = self.shared.state.lock();
        state
            .jobs
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, j)| j.clone())
            .collect()
    }

    /// The pods of `namespace` now.
    pub fn pods(&self, namespace: &str) -> Vec<Pod> {
        let state = self.shared.state.lock();
        state
            .pods
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// From now on, watches resuming from any resource version up to the current one get
    /// `410 Gone` (`Expired`), as after an etcd compaction.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock();
        state.compacted = state.rv + 1;
        state.history.clear();
    }

    /// Ends every open watch (its client resumes from the last resource version it saw).
    pub fn close_watches(&self) {
        let mut token = self.shared.watches.lock();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// How often an open watch sends a `BOOKMARK` (when it asked for them).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.state.lock().bookmark_every = every;
    }

    fn control(&self, namespace: &str, job: &str, c: Control) -> bool {
        let state = self.shared.state.lock();
        state
            .controls
            .get(&key(namespace, job))
            .is_some_and(|tx| tx.send(c).is_ok())
    }

    /// Lets a Job's `fake-hold` go on; whether the Job is running.
    pub fn release(&self, namespace: &str, job: &str) -> bool {
        self.control(namespace, job, Control::Release)
    }

    /// Evicts a running Job's pod (the kubelet's `Evicted`, with a `DisruptionTarget`
    /// condition); whether the Job is running.
    pub fn evict(&self, namespace: &str, job: &str) -> bool {
        self.control(namespace, job, Control::Evict)
    }

    /// Makes a running Job's pod vanish, as when its node is lost; whether the Job is running.
    pub fn lose_node(&self, namespace: &str, job: &str) -> bool {
        self.control(namespace, job, Control::NodeLost)
    }
}
