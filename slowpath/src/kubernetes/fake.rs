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

/// Changes kept for watches to resume from; older resource versions are `410 Gone`.
const HISTORY: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Job,
    Pod,
}

/// One change, as a watch sends it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    line: Bytes,
}

/// A request the fake answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
}

/// A delete the fake was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub kind: String,
    pub name: String,
    /// `propagationPolicy` as sent (body or query), if any.
    pub propagation: Option<String>,
}

#[derive(Clone, Debug)]
struct Fault {
    method: Option<Method>,
    path_contains: String,
    status: u16,
    remaining: usize,
}

/// What a test (or a delete) tells a running Job's fake pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Release,
    Evict,
    NodeLost,
    Deleted,
}

struct State {
    rv: u64,
    /// Watches from a resource version below this get `410 Gone`.
    compacted: u64,
    history: VecDeque<Change>,
    jobs: BTreeMap<(String, String), Job>,
    pods: BTreeMap<(String, String), Pod>,
    logs: HashMap<(String, String), Vec<u8>>,
    controls: HashMap<(String, String), mpsc::UnboundedSender<Control>>,
    faults: Vec<Fault>,
    requests: Vec<Recorded>,
    deletions: Vec<Deletion>,
    /// Watches answered `410 Gone`.
    expired: usize,
    next_uid: u64,
    bookmark_every: Duration,
    step: Duration,
}

struct Shared {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
    /// Cancelled (and replaced) by [`FakeKube::close_watches`].
    watches: Mutex<CancellationToken>,
    shutdown: CancellationToken,
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

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_owned(), name.to_owned())
}

fn status_body(code: u16, reason: &str, message: &str, details: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    })
}

fn status(code: u16, reason: &str, message: String, details: Value) -> Response {
    let body = status_body(code, reason, &message, details);
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

fn json_response(code: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (code, [("content-type", "application/json")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn not_found(kind: &str, group: &str, name: &str) -> Response {
    let what = if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    };
    status(
        404,
        "NotFound",
        format!("{what} \"{name}\" not found"),
        json!({"name": name, "group": group, "kind": kind}),
    )
}

/// A label selector of the forms `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated.
fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
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
fn fields_match(selector: &str, ns: &str, name: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => v == name,
            Some(("metadata.namespace", v)) => v == ns,
            _ => true,
        })
}

fn labels_of(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

impl State {
    /// Records a change of an object: bumps the resource version, stamps it on the object,
    /// keeps it for watches and sends it to the open ones.
    fn emit<T: serde::Serialize>(
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

    fn emit_job(&mut self, tx: &broadcast::Sender<Change>, type_: &str, k: &(String, String)) {
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

    fn emit_pod(&mut self, tx: &broadcast::Sender<Change>, type_: &str, k: &(String, String)) {
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

    fn pods_of(&self, ns: &str, job: &str) -> Vec<(String, String)> {
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

/// Splits a request path into (api prefix, namespace, resource, name, subresource).
struct Target {
    ns: String,
    resource: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let rest = path
        .strip_prefix("/apis/batch/v1/namespaces/")
        .map(|r| ("jobs", r))
        .or_else(|| {
            path.strip_prefix("/api/v1/namespaces/")
                .map(|r| ("pods", r))
        })?;
    let (want, rest) = rest;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        [ns, res] if *res == want => Some(Target {
            ns: (*ns).to_owned(),
            resource: want.to_owned(),
            name: None,
            sub: None,
        }),
        [ns, res, name] if *res == want => Some(Target {
            ns: (*ns).to_owned(),
            resource: want.to_owned(),
            name: Some((*name).to_owned()),
            sub: None,
        }),
        [ns, res, name, sub] if *res == want => Some(Target {
            ns: (*ns).to_owned(),
            resource: want.to_owned(),
            name: Some((*name).to_owned()),
            sub: Some((*sub).to_owned()),
        }),
        _ => None,
    }
}

async fn handle(shared: Arc<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let query: HashMap<String, String> = Query::try_from_uri(&uri)
        .map(|q: Query<HashMap<String, String>>| q.0)
        .unwrap_or_default();
    let fault = {
        let mut state = shared.state.lock();
        let hit = state.faults.iter_mut().find(|f| {
            f.remaining > 0
                && f.method.as_ref().is_none_or(|m| *m == method)
                && path.contains(&f.path_contains)
        });
        hit.map(|f| {
            f.remaining -= 1;
            f.status
        })
    };
    let response = match fault {
        Some(code) => status(
            code,
            "InternalError",
            format!("fake: injected fault ({code}) for {method} {path}"),
            json!({}),
        ),
        None => route(&shared, &method, &path, &query, &body).await,
    };
    shared.state.lock().requests.push(Recorded {
        method: method.to_string(),
        path,
        query: uri.query().unwrap_or_default().to_owned(),
        status: response.status().as_u16(),
    });
    response
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Response {
    let Some(t) = parse_path(path) else {
        return status(
            404,
            "NotFound",
            format!("fake: no route for {path}"),
            json!({}),
        );
    };
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    match (
        method,
        t.resource.as_str(),
        t.name.as_deref(),
        t.sub.as_deref(),
    ) {
        (&Method::POST, "jobs", None, None) => create_job(shared, &t.ns, body),
        (&Method::GET, res, None, None) if watch => {
            let kind = if res == "jobs" { Kind::Job } else { Kind::Pod };
            watch_objects(shared, kind, &t.ns, query)
        }
        (&Method::GET, res, None, None) => {
            let kind = if res == "jobs" { Kind::Job } else { Kind::Pod };
            list(shared, kind, &t.ns, query)
        }
        (&Method::GET, "jobs", Some(name), None) => {
            let state = shared.state.lock();
            match state.jobs.get(&key(&t.ns, name)) {
                Some(job) => json_response(StatusCode::OK, job),
                None => not_found("jobs", "batch", name),
            }
        }
        (&Method::GET, "pods", Some(name), None) => {
            let state = shared.state.lock();
            match state.pods.get(&key(&t.ns, name)) {
                Some(pod) => json_response(StatusCode::OK, pod),
                None => not_found("pods", "", name),
            }
        }
        (&Method::DELETE, "jobs", Some(name), None) => delete_job(shared, &t.ns, name, query, body),
        (&Method::GET, "pods", Some(name), Some("log")) => pod_log(shared, &t.ns, name, query),
        _ => status(
            405,
            "MethodNotAllowed",
            format!("fake: {method} {path} is not supported"),
            json!({}),
        ),
    }
}

fn create_job(shared: &Arc<Shared>, ns: &str, body: &Bytes) -> Response {
    let mut job: Job = match serde_json::from_slice(body) {
        Ok(j) => j,
        Err(e) => {
            return status(
                400,
                "BadRequest",
                format!("fake: not a Job: {e}"),
                json!({}),
            );
        }
    };
    let Some(name) = job.metadata.name.clone().filter(|n| !n.is_empty()) else {
        return status(
            422,
            "Invalid",
            "Job.batch is invalid: metadata.name: Required value".into(),
            json!({"group": "batch", "kind": "Job"}),
        );
    };
    let k = key(ns, &name);
    let (tx, rx) = mpsc::unbounded_channel();
    let created = {
        let mut state = shared.state.lock();
        if state.jobs.contains_key(&k) {
            return status(
                409,
                "AlreadyExists",
                format!("jobs.batch \"{name}\" already exists"),
                json!({"name": name, "group": "batch", "kind": "jobs"}),
            );
        }
        let uid = format!("fake-uid-{:08}", state.next_uid);
        state.next_uid += 1;
        job.metadata.namespace = Some(ns.to_owned());
        job.metadata.uid = Some(uid);
        job.metadata.creation_timestamp = Some(now());
        job.metadata.generation = Some(1);
        job.status = Some(JobStatus::default());
        state.jobs.insert(k.clone(), job);
        state.emit_job(&shared.changes, "ADDED", &k);
        state.controls.insert(k.clone(), tx);
        state.jobs.get(&k).cloned()
    };
    let driver = Driver {
        shared: shared.clone(),
        ns: ns.to_owned(),
        job: name,
        controls: rx,
        released: false,
    };
    tokio::spawn(driver.run());
    match created {
        Some(job) => json_response(StatusCode::CREATED, &job),
        None => status(500, "InternalError", "fake: lost a Job".into(), json!({})),
    }
}

fn list(shared: &Arc<Shared>, kind: Kind, ns: &str, query: &HashMap<String, String>) -> Response {
    let labels = query.get("labelSelector").cloned().unwrap_or_default();
    let fields = query.get("fieldSelector").cloned().unwrap_or_default();
    let state = shared.state.lock();
    let rv = state.rv.to_string();
    let pick = |meta: &ObjectMeta| {
        meta.namespace.as_deref() == Some(ns)
            && selector_matches(&labels, &labels_of(meta))
            && fields_match(&fields, ns, meta.name.as_deref().unwrap_or(""))
    };
    let body = match kind {
        Kind::Job => {
            let items: Vec<&Job> = state.jobs.values().filter(|j| pick(&j.metadata)).collect();
            json!({"kind": "JobList", "apiVersion": "batch/v1", "metadata": {"resourceVersion": rv}, "items": items})
        }
        Kind::Pod => {
            let items: Vec<&Pod> = state.pods.values().filter(|p| pick(&p.metadata)).collect();
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})
        }
    };
    json_response(StatusCode::OK, &body)
}

fn line(value: &Value) -> Bytes {
    let mut v = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

fn watch_objects(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    query: &HashMap<String, String>,
) -> Response {
    let labels = query.get("labelSelector").cloned().unwrap_or_default();
    let fields = query.get("fieldSelector").cloned().unwrap_or_default();
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let from = query.get("resourceVersion").cloned().unwrap_or_default();
    let ns = ns.to_owned();
    let matches = move |c: &Change| {
        c.kind == kind
            && c.namespace == ns
            && selector_matches(&labels, &c.labels)
            && fields_match(&fields, &c.namespace, &c.name)
    };
    let (api_version, kind_name) = match kind {
        Kind::Job => ("batch/v1", "Job"),
        Kind::Pod => ("v1", "Pod"),
    };
    let (mut first, mut sent_rv, mut sub, bookmark_every) = {
        let mut state = shared.state.lock();
        let sub = shared.changes.subscribe();
        let mut first: Vec<Bytes> = Vec::new();
        let start = match from.as_str() {
            "" | "0" => None,
            v => v.parse::<u64>().ok(),
        };
        match start {
            Some(rv) if rv < state.compacted || rv > state.rv => {
                state.expired += 1;
                let gone = json!({"type": "ERROR", "object": status_body(
                    410,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", state.compacted),
                    json!({}),
                )});
                let body = Body::from(line(&gone));
                return (StatusCode::OK, [("content-type", "application/json")], body)
                    .into_response();
            }
            Some(rv) => {
                first.extend(
                    state
                        .history
                        .iter()
                        .filter(|c| c.rv > rv && matches(c))
                        .map(|c| c.line.clone()),
                );
            }
            None => {
                // "Any" version: the current objects, as ADDED.
                let pick = |m: &ObjectMeta| {
                    let c = Change {
                        rv: 0,
                        kind,
                        namespace: m.namespace.clone().unwrap_or_default(),
                        name: m.name.clone().unwrap_or_default(),
                        labels: labels_of(m),
                        line: Bytes::new(),
                    };
                    matches(&c)
                };
                match kind {
                    Kind::Job => first.extend(
                        state
                            .jobs
                            .values()
                            .filter(|j| pick(&j.metadata))
                            .map(|j| line(&json!({"type": "ADDED", "object": j}))),
                    ),
                    Kind::Pod => first.extend(
                        state
                            .pods
                            .values()
                            .filter(|p| pick(&p.metadata))
                            .map(|p| line(&json!({"type": "ADDED", "object": p}))),
                    ),
                }
            }
        }
        (first, state.rv, sub, state.bookmark_every)
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let closed = shared.watches.lock().clone();
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        for l in first.drain(..) {
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = &mut end => return,
                () = closed.cancelled() => return,
                () = shutdown.cancelled() => return,
                _ = tick.tick(), if bookmarks => {
                    let bookmark = json!({"type": "BOOKMARK", "object": {
                        "kind": kind_name,
                        "apiVersion": api_version,
                        "metadata": {"resourceVersion": sent_rv.to_string()},
                    }});
                    if tx.send(Ok(line(&bookmark))).await.is_err() {
                        return;
                    }
                }
                change = sub.recv() => match change {
                    Ok(c) => {
                        // Every change up to this one has passed this watch.
                        sent_rv = sent_rv.max(c.rv);
                        if matches(&c) && tx.send(Ok(c.line)).await.is_err() {
                            return;
                        }
                    }
                    // Fell behind or the server stops: end; the client resumes.
                    Err(_) => return,
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn delete_job(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Response {
    let from_body = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("propagationPolicy")?.as_str().map(str::to_owned));
    let propagation = from_body.or_else(|| query.get("propagationPolicy").cloned());
    let k = key(ns, name);
    let mut state = shared.state.lock();
    state.deletions.push(Deletion {
        kind: "Job".into(),
        name: name.to_owned(),
        propagation: propagation.clone(),
    });
    let Some(uid) = state
        .jobs
        .get(&k)
        .map(|j| j.metadata.uid.clone().unwrap_or_default())
    else {
        return not_found("jobs", "batch", name);
    };
    if let Some(tx) = state.controls.remove(&k) {
        let _ = tx.send(Control::Deleted);
    }
    match propagation.as_deref() {
        Some("Foreground") => {
            if let Some(job) = state.jobs.get_mut(&k)
                && job.metadata.deletion_timestamp.is_none()
            {
                job.metadata.deletion_timestamp = Some(now());
                job.metadata.finalizers = Some(vec!["foregroundDeletion".into()]);
            }
            state.emit_job(&shared.changes, "MODIFIED", &k);
            let marked = state.jobs.get(&k).cloned();
            // The garbage collector: the pods first, then the Job.
            let shared = shared.clone();
            let gc = k.clone();
            tokio::spawn(async move {
                let step = shared.state.lock().step;
                tokio::time::sleep(step).await;
                let mut state = shared.state.lock();
                for p in state.pods_of(&gc.0, &gc.1) {
                    state.emit_pod(&shared.changes, "DELETED", &p);
                }
                state.emit_job(&shared.changes, "DELETED", &gc);
            });
            match marked {
                Some(job) => json_response(StatusCode::OK, &job),
                None => not_found("jobs", "batch", name),
            }
        }
        other => {
            let orphan = other.is_none_or(|p| p == "Orphan");
            if !orphan {
                for p in state.pods_of(ns, name) {
                    state.emit_pod(&shared.changes, "DELETED", &p);
                }
            }
            state.emit_job(&shared.changes, "DELETED", &k);
            json_response(
                StatusCode::OK,
                &json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": "batch", "kind": "jobs", "uid": uid},
                }),
            )
        }
    }
}

fn pod_log(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
) -> Response {
    let follow = query.get("follow").is_some_and(|f| f == "true");
    let k = key(ns, name);
    {
        let state = shared.state.lock();
        let Some(pod) = state.pods.get(&k) else {
            return not_found("pods", "", name);
        };
        let waiting = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref());
        let pending = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
        if pending || waiting.is_some() {
            let why = waiting
                .and_then(|w| w.reason.clone())
                .unwrap_or_else(|| "ContainerCreating".into());
            return status(
                400,
                "BadRequest",
                format!("container \"job\" in pod \"{name}\" is waiting to start: {why}"),
                json!({}),
            );
        }
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut sent = 0usize;
        loop {
            let (data, ended) = {
                let state = shared.state.lock();
                let data = state.logs.get(&k).map(|l| l[sent..].to_vec());
                let ended = state.pods.get(&k).is_none_or(|p| {
                    matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    )
                });
                (data.unwrap_or_default(), ended)
            };
            if !data.is_empty() {
                sent += data.len();
                if tx.send(Ok(Bytes::from(data))).await.is_err() {
                    return;
                }
            }
            if !follow || ended || shared.shutdown.is_cancelled() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        StatusCode::OK,
        [("content-type", "text/plain")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// One statement of a fake container's script.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Echo(String),
    Sleep(Duration),
    Exit(i32),
    Hold,
    Evict,
    NodeLost,
}

fn script(command: &[String]) -> Vec<Step> {
    let text = match command {
        [sh, flag, script, ..] if sh.ends_with("sh") && flag == "-c" => script.clone(),
        argv => argv.join(" "),
    };
    text.split(['\n', ';'])
        .flat_map(|s| s.split("&&"))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let (word, rest) = s.split_once(' ').unwrap_or((s, ""));
            let rest = rest.trim();
            Some(match word {
                "echo" => Step::Echo(rest.trim_matches(['"', '\'']).to_owned()),
                "sleep" => Step::Sleep(Duration::from_secs_f64(rest.parse().unwrap_or(0.0))),
                "exit" => Step::Exit(rest.parse().unwrap_or(1)),
                "true" => return None,
                "false" => Step::Exit(1),
                "fake-hold" => Step::Hold,
                "fake-evict" => Step::Evict,
                "fake-node-lost" => Step::NodeLost,
                _ => return None,
            })
        })
        .collect()
}

/// How a fake pod ended.
enum End {
    Exit(i32),
    Evicted,
    NodeLost,
    Deadline,
    Deleted,
}

/// The fake job controller and kubelet for one Job.
struct Driver {
    shared: Arc<Shared>,
    ns: String,
    job: String,
    controls: mpsc::UnboundedReceiver<Control>,
    released: bool,
}

impl Driver {
    fn pod_key(&self) -> (String, String) {
        key(&self.ns, &format!("{}-fake0", self.job))
    }

    async fn run(mut self) {
        let k = key(&self.ns, &self.job);
        let (spec, step) = {
            let state = self.shared.state.lock();
            (state.jobs.get(&k).cloned(), state.step)
        };
        let Some(job) = spec else { return };
        let job_spec = job.spec.clone().unwrap_or_default();
        let pod_spec = job_spec.template.spec.clone().unwrap_or_default();
        let container = pod_spec.containers.first().cloned().unwrap_or_default();
        let image = container.image.clone().unwrap_or_default();
        let mut argv = container.command.clone().unwrap_or_default();
        argv.extend(container.args.clone().unwrap_or_default());
        let steps = script(&argv);
        let deadline = job_spec
            .active_deadline_seconds
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s.max(0) as u64));

        // The job controller makes the pod; the scheduler places it.
        self.make_pod(&job);
        tokio::time::sleep(step).await;
        let end = if image.contains("pull-error") {
            self.set_waiting(
                "ErrImagePull",
                &format!("fake: cannot pull image \"{image}\""),
            );
            tokio::time::sleep(step).await;
            self.set_waiting(
                "ImagePullBackOff",
                &format!("Back-off pulling image \"{image}\""),
            );
            self.idle(deadline).await
        } else {
            self.set_running();
            self.run_steps(&steps, deadline).await
        };
        self.finish(end);
    }

    /// Waits for a control or the deadline, starting nothing.
    async fn idle(&mut self, deadline: Option<tokio::time::Instant>) -> End {
        loop {
            match self.wait_or_control(None, deadline).await {
                Some(End::Exit(_)) | None => continue,
                Some(end) => return end,
            }
        }
    }

    /// Sleeps for `d` (forever when `None`) unless a control or the deadline comes first.
    /// `Some(End::Exit(0))` stands for a release.
    async fn wait_or_control(
        &mut self,
        d: Option<Duration>,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<End> {
        let sleep = async {
            match d {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => None,
            () = deadline => Some(End::Deadline),
            c = self.controls.recv() => match c {
                Some(Control::Release) => {
                    self.released = true;
                    Some(End::Exit(0))
                }
                Some(Control::Evict) => Some(End::Evicted),
                Some(Control::NodeLost) => Some(End::NodeLost),
                Some(Control::Deleted) | None => Some(End::Deleted),
            },
        }
    }

    async fn run_steps(&mut self, steps: &[Step], deadline: Option<tokio::time::Instant>) -> End {
        for s in steps {
            match s {
                Step::Echo(text) => {
                    let mut state = self.shared.state.lock();
                    let log = state.logs.entry(self.pod_key()).or_default();
                    log.extend_from_slice(text.as_bytes());
                    log.push(b'\n');
                }
                Step::Sleep(d) => {
                    let until = tokio::time::Instant::now() + *d;
                    loop {
                        let left = until.saturating_duration_since(tokio::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match self.wait_or_control(Some(left), deadline).await {
                            None => break,
                            Some(End::Exit(_)) => continue, // a release, not awaited here
                            Some(end) => return end,
                        }
                    }
                }
                Step::Hold => {
                    while !self.released {
                        match self.wait_or_control(None, deadline).await {
                            Some(End::Exit(_)) | None => {}
                            Some(end) => return end,
                        }
                    }
                    self.released = false;
                }
                Step::Exit(code) => return End::Exit(*code),
                Step::Evict => return End::Evicted,
                Step::NodeLost => return End::NodeLost,
            }
            // Controls that came while we were not waiting.
            if let Ok(c) = self.controls.try_recv() {
                match c {
                    Control::Release => self.released = true,
                    Control::Evict => return End::Evicted,
                    Control::NodeLost => return End::NodeLost,
                    Control::Deleted => return End::Deleted,
                }
            }
        }
        End::Exit(0)
    }

    fn make_pod(&self, job: &Job) {
        let template = job
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let uid = job.metadata.uid.clone().unwrap_or_default();
        labels.insert("job-name".into(), self.job.clone());
        labels.insert("batch.kubernetes.io/job-name".into(), self.job.clone());
        labels.insert("controller-uid".into(), uid.clone());
        labels.insert("batch.kubernetes.io/controller-uid".into(), uid.clone());
        let pk = self.pod_key();
        let mut spec = template.spec.unwrap_or_default();
        spec.node_name = Some("fake-node-1".into());
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(pk.1.clone()),
                namespace: Some(self.ns.clone()),
                uid: Some(format!("{uid}-pod")),
                creation_timestamp: Some(now()),
                labels: Some(labels),
                owner_references: Some(vec![OwnerReference {
                    api_version: "batch/v1".into(),
                    kind: "Job".into(),
                    name: self.job.clone(),
                    uid,
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            spec: Some(spec),
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                container_statuses: Some(vec![ContainerStatus {
                    name: super::classify::CONTAINER.into(),
                    image: String::new(),
                    image_id: String::new(),
                    ready: false,
                    restart_count: 0,
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("ContainerCreating".into()),
                            message: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        let mut state = self.shared.state.lock();
        state.pods.insert(pk.clone(), pod);
        state.emit_pod(&self.shared.changes, "ADDED", &pk);
        let jk = key(&self.ns, &self.job);
        if let Some(job) = state.jobs.get_mut(&jk) {
            let s = job.status.get_or_insert_with(JobStatus::default);
            s.active = Some(1);
            s.ready = Some(0);
            s.start_time = Some(now());
        }
        state.emit_job(&self.shared.changes, "MODIFIED", &jk);
    }

    fn update_pod(&self, f: impl FnOnce(&mut PodStatus)) {
        let pk = self.pod_key();
        let mut state = self.shared.state.lock();
        let Some(pod) = state.pods.get_mut(&pk) else {
            return;
        };
        f(pod.status.get_or_insert_with(PodStatus::default));
        state.emit_pod(&self.shared.changes, "MODIFIED", &pk);
    }

    fn set_container(status: &mut PodStatus, state: ContainerState, ready: bool) {
        if let Some(c) = status
            .container_statuses
            .as_mut()
            .and_then(|c| c.first_mut())
        {
            c.state = Some(state);
            c.ready = ready;
            c.started = Some(ready);
        }
    }

    fn set_waiting(&self, reason: &str, message: &str) {
        self.update_pod(|s| {
            Self::set_container(
                s,
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        message: Some(message.into()),
                    }),
                    ..Default::default()
                },
                false,
            );
        });
    }

    fn set_running(&self) {
        self.update_pod(|s| {
            s.phase = Some("Running".into());
            s.start_time = Some(now());
            Self::set_container(
                s,
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(now()),
                    }),
                    ..Default::default()
                },
                true,
            );
        });
        let jk = key(&self.ns, &self.job);
        let mut state = self.shared.state.lock();
        if let Some(job) = state.jobs.get_mut(&jk) {
            job.status.get_or_insert_with(JobStatus::default).ready = Some(1);
        }
        state.emit_job(&self.shared.changes, "MODIFIED", &jk);
    }

    fn terminated(code: i32) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                finished_at: Some(now()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn finish(&self, end: End) {
        let pk = self.pod_key();
        match end {
            End::Deleted => return, // the delete handler takes it from here
            End::Exit(code) => self.update_pod(|s| {
                s.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
                Self::set_container(s, Self::terminated(code), false);
            }),
            End::Evicted => self.update_pod(|s| {
                s.phase = Some("Failed".into());
                s.reason = Some("Evicted".into());
                s.message = Some("The node was low on resource: memory.".into());
                s.conditions
                    .get_or_insert_with(Vec::new)
                    .push(PodCondition {
                        type_: "DisruptionTarget".into(),
                        status: "True".into(),
                        reason: Some("TerminationByKubelet".into()),
                        message: Some("The node was low on resource: memory.".into()),
                        ..Default::default()
                    });
                Self::set_container(s, Self::terminated(137), false);
            }),
            End::NodeLost | End::Deadline => {
                let mut state = self.shared.state.lock();
                state.emit_pod(&self.shared.changes, "DELETED", &pk);
            }
        }
        let jk = key(&self.ns, &self.job);
        let mut state = self.shared.state.lock();
        state.controls.remove(&jk);
        let Some(job) = state.jobs.get_mut(&jk) else {
            return;
        };
        let s = job.status.get_or_insert_with(JobStatus::default);
        s.active = None;
        s.ready = Some(0);
        let condition = |type_: &str, reason: &str, message: &str| JobCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_transition_time: Some(now()),
            last_probe_time: Some(now()),
        };
        match end {
            End::Exit(0) => {
                s.succeeded = Some(1);
                s.completion_time = Some(now());
                s.conditions = Some(vec![
                    condition(
                        "SuccessCriteriaMet",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                    condition(
                        "Complete",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                ]);
            }
            End::Deadline => {
                s.failed = Some(1);
                s.conditions = Some(vec![
                    condition(
                        "FailureTarget",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    ),
                    condition(
                        "Failed",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    ),
                ]);
            }
            _ => {
                s.failed = Some(1);
                s.conditions = Some(vec![
                    condition(
                        "FailureTarget",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                    condition(
                        "Failed",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                ]);
            }
        }
        state.emit_job(&self.shared.changes, "MODIFIED", &jk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_and_selectors() {
        let sh = |s: &str| vec!["sh".to_owned(), "-c".to_owned(), s.to_owned()];
        assert_eq!(
            script(&sh("echo hello; sleep 0.5 && exit 3")),
            vec![
                Step::Echo("hello".into()),
                Step::Sleep(Duration::from_millis(500)),
                Step::Exit(3)
            ]
        );
        assert_eq!(script(&["false".to_owned()]), vec![Step::Exit(1)]);
        assert_eq!(
            script(&sh("fake-hold\nfake-evict")),
            vec![Step::Hold, Step::Evict]
        );
        let labels = BTreeMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        assert!(selector_matches("a=1,b", &labels));
        assert!(selector_matches("a==1,!c", &labels));
        assert!(!selector_matches("a!=1", &labels));
        assert!(!selector_matches("c", &labels));
    }
}
