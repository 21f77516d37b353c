//! Watches: `ADDED` / `MODIFIED` / `DELETED` events from a resource version, bookmarks, and
//! `410 Gone` for a version older than the last compaction.

use super::*;

pub(super) fn line(value: &Value) -> Bytes {
    let mut v = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

pub(super) fn watch_objects(
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
    let selector = labels.clone();
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
    let shared = shared.clone();
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
                    shared.state.lock().bookmarks.push(Bookmark {
                        kind: kind_name.to_owned(),
                        label_selector: selector.clone(),
                        resource_version: sent_rv,
                    });
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
