//! The HTTP side of the fake: paths to handlers, Job create/list/delete, pod logs, and
//! Kubernetes `Status` answers.

use super::*;

pub(super) fn status_body(code: u16, reason: &str, message: &str, details: Value) -> Value {
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

pub(super) fn status(code: u16, reason: &str, message: String, details: Value) -> Response {
    let body = status_body(code, reason, &message, details);
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

pub(super) fn json_response(code: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (code, [("content-type", "application/json")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub(super) fn not_found(kind: &str, group: &str, name: &str) -> Response {
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

/// Splits a request path into (api prefix, namespace, resource, name, subresource).
pub(super) struct Target {
    pub(super) ns: String,
    pub(super) resource: String,
    pub(super) name: Option<String>,
    pub(super) sub: Option<String>,
}

pub(super) fn parse_path(path: &str) -> Option<Target> {
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

pub(super) async fn handle(shared: Arc<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
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

pub(super) async fn route(
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

pub(super) fn create_job(shared: &Arc<Shared>, ns: &str, body: &Bytes) -> Response {
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

pub(super) fn list(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    query: &HashMap<String, String>,
) -> Response {
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

pub(super) fn delete_job(
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

pub(super) fn pod_log(
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
