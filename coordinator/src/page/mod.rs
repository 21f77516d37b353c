//! The live status page on the HTTP port: `GET /` serves a page (one HTML, one script, one
//! style sheet, embedded in the binary) that polls three JSON endpoints once a second:
//!
//! - `GET /api/status`: the supervision tree, the models with their fast-path statistics, the
//!   GPUs and the host (`read` on the server, like GetStatus and GetResources);
//! - `GET /api/jobs?limit=N`: the newest N jobs the caller may see (ListJobs' rule and code:
//!   its tenant's jobs, every tenant's with `jobs.admin`);
//! - `GET /api/jobs/{id}/logs?tail_bytes=N`: the tail of the job's latest attempt's output
//!   (JobLogs' rule and code).
//!
//! The page shell itself carries no data and is open to every caller, like the health paths: a
//! browser cannot attach a bearer token to a navigation, so a shell behind `read` could never
//! show the prompt where the token is pasted (docs/SECURITY.md). Every number comes through the
//! endpoints above, which pass the same authentication layer as every other route.
//!
//! The numbers are the ones the other APIs serve: the tree is GetStatus's (and `veraltheim
//! status --json`'s shape), GPUs are GetResources' (`veraltheim gpus --json`), jobs ListJobs'
//! (`veraltheim jobs list --json`), model statistics the fast path's own counters
//! (GetModelStatistics, `/metrics`). Requests per second are computed by the page from two
//! samples of the request counters and the server's clock (`time_ms`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::{Value, json};
use veraltheim_fastpath::StatsSnapshot;
use veraltheim_models::ModelState;
use veraltheim_serving::ModelInfo;
use veraltheim_slowpath::{ListFilter, LogChunk, LogSource};
use veraltheim_supervisor::SupervisorHandle;

use crate::auth::Caller;
use crate::context::Context;
use crate::jobs::JobsApi;
use crate::rest::{RestError, caller, json as json_answer, refused};

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// The paths of the page's files (open to every caller: they hold no data).
pub const INDEX: &str = "/";
pub const SCRIPT: &str = "/page/app.js";
pub const STYLE: &str = "/page/style.css";

/// Jobs listed when the page does not say how many.
pub const DEFAULT_JOBS: usize = 50;
/// Most jobs one `/api/jobs` call lists.
pub const MAX_JOBS: usize = 500;
/// Log bytes returned per stream when the page does not say how many.
pub const DEFAULT_TAIL_BYTES: usize = 64 << 10;
/// Most log bytes one `/api/jobs/{id}/logs` call returns per stream.
pub const MAX_TAIL_BYTES: usize = 1 << 20;

/// What the page's handlers read besides the [`Context`].
#[derive(Clone)]
pub struct PageState {
    pub ctx: Arc<Context>,
    pub jobs: JobsApi,
    /// The supervision tree the HTTP server runs in.
    pub tree: SupervisorHandle,
}

/// The page's routes, with their state; merged into the HTTP server's one router.
pub fn routes<S: Clone + Send + Sync + 'static>(state: PageState) -> Router<S> {
    Router::new()
        .route(INDEX, get(index))
        .route(SCRIPT, get(script))
        .route(STYLE, get(style))
        .route("/api/status", get(status))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}/logs", get(logs))
        .with_state(state)
}

/// The page itself may only run its own script and style, talk only to this server, and never
/// be framed by another site.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut r = (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change only with the binary: revalidate rather than keep a stale page.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    file("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE_CSS)
}

/// A JSON answer that no cache keeps (it carries what one caller may see).
fn fresh(value: &Value) -> Response {
    let mut r = json_answer(value);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The query parameters of `uri` as `name=value` pairs; a parameter not in `known` is refused
/// (400) naming it and those there are.
fn query<'a>(uri: &'a Uri, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, RestError> {
    let mut pairs = Vec::new();
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !known.contains(&name) {
            let name: String = name.chars().take(64).collect();
            return Err(RestError::bad_request(format!(
                "unknown query parameter '{name}' (known: {})",
                known.join(", ")
            )));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// The count parameter `name` of `uri`: `default` when absent, refused (400) unless a whole
/// number from 1 to `max`.
fn count(uri: &Uri, name: &str, default: usize, max: usize) -> Result<usize, RestError> {
    let Some((_, value)) = query(uri, &[name])?.into_iter().next_back() else {
        return Ok(default);
    };
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => {
            let value: String = value.chars().take(64).collect();
            Err(RestError::bad_request(format!(
                "{name}={value}: give a whole number from 1 to {max}"
            )))
        }
    }
}

/// One model: what the model manager knows of it and, while it is READY, its fast path's
/// statistics since it loaded.
fn model_json(info: &ModelInfo, stats: Option<&StatsSnapshot>) -> Value {
    let stats = stats.map(|s| {
        let avg_batch = if s.execution_count > 0 {
            s.inference_count as f64 / s.execution_count as f64
        } else {
            0.0
        };
        json!({
            "pending": s.pending,
            "success": s.success.count,
            "failure": s.fail.count,
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "avg_batch_size": avg_batch,
            "rejected": s.rejected,
            "expired": s.expired,
            "last_inference_ms": s.last_inference_ms,
            "total_p50_us": s.total_us.p50,
            "total_p99_us": s.total_us.p99,
            "queue_p50_us": s.queue_us.p50,
            "queue_p99_us": s.queue_us.p99,
            "compute_p50_us": s.compute_us.p50,
            "compute_p99_us": s.compute_us.p99,
            "objective": s.slo.as_ref().map(crate::api::objective_line),
        })
    });
    json!({
        "name": info.name,
        "version": info.version,
        "state": info.state.as_str(),
        "reason": info.reason,
        "backend": info.config.backend,
        "device": info.device.map(|d| d.to_string()),
        "memory_bytes": info.memory_bytes,
        "max_batch_size": info.config.max_batch_size,
        "stats": stats,
    })
}

/// The whole server as the page shows it; `read` on the server (the layer decided).
pub fn status_document(ctx: &Context, tree: &SupervisorHandle) -> Value {
    let models: Vec<Value> = ctx
        .models
        .list()
        .iter()
        .map(|info| {
            let stats = (info.state == ModelState::Ready)
                .then(|| ctx.models.worker(&info.name).ok())
                .flatten()
                .map(|w| w.stats());
            model_json(info, stats.as_ref())
        })
        .collect();
    let resources = crate::api::resource_snapshot(ctx);
    let host = resources.cpu.unwrap_or_default();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "time_ms": now_ms(),
        "uptime_ms": ctx.started.elapsed().as_millis() as u64,
        "ready": ctx.is_ready(),
        "tree": crate::cli::node_json(&crate::api::status_tree(&tree.snapshot(), &ctx.models)),
        "nats": ctx.bridge.as_ref().map(|b| crate::cli::nats_json(&crate::api::nats_status(&b.status()))),
        "models": models,
        "gpus": resources.gpus.iter().map(crate::cli::gpu_json).collect::<Vec<_>>(),
        "gpu_probe": resources.gpu_probe,
        "gpu_probe_error": resources.gpu_probe_error,
        "host": {
            "cores": host.cores,
            "memory_total_bytes": host.memory_total_bytes,
            "memory_available_bytes": host.memory_available_bytes,
            "process_rss_bytes": host.process_rss_bytes,
        },
    })
}

async fn status(State(page): State<PageState>) -> Response {
    fresh(&status_document(&page.ctx, &page.tree))
}

/// A job for the page: `veraltheim jobs list --json`'s fields, and whose it is.
fn job_json(job: &veraltheim_proto::v1::Job) -> Value {
    let mut v = crate::cli::job_json(job);
    if let Value::Object(map) = &mut v {
        map.insert("tenant".into(), json!(job.tenant));
        map.insert("principal".into(), json!(job.principal));
        let kind = match job.spec.as_ref().and_then(|s| s.kind.as_ref()) {
            Some(veraltheim_proto::v1::job_spec::Kind::Inference(_)) => "inference",
            _ => "command",
        };
        map.insert("kind".into(), json!(kind));
    }
    v
}

/// The newest `limit` jobs the caller may see (ListJobs' rule: `jobs.read`, its tenant's).
async fn jobs(
    State(page): State<PageState>,
    found: Option<axum::Extension<Caller>>,
    uri: Uri,
) -> Result<Response, RestError> {
    let caller = caller(found)?;
    let limit = count(&uri, "limit", DEFAULT_JOBS, MAX_JOBS)?;
    let filter = ListFilter {
        page_size: limit,
        newest_first: true,
        ..ListFilter::default()
    };
    let (list, next) = page
        .jobs
        .list_for(&caller, filter)
        .await
        .map_err(grpc_error)?;
    Ok(fresh(&json!({
        "time_ms": now_ms(),
        "limit": limit,
        "jobs": list.iter().map(job_json).collect::<Vec<_>>(),
        // More (older) jobs may be there; the page shows only the newest.
        "more": next.is_some(),
    })))
}

/// A gRPC status from the shared jobs code as an HTTP error.
fn grpc_error(s: tonic::Status) -> RestError {
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => refused(s),
        tonic::Code::NotFound => RestError::new(StatusCode::NOT_FOUND, s.message()),
        tonic::Code::InvalidArgument => RestError::bad_request(s.message()),
        tonic::Code::Unavailable => RestError::new(StatusCode::SERVICE_UNAVAILABLE, s.message()),
        _ => RestError::new(StatusCode::INTERNAL_SERVER_ERROR, s.message()),
    }
}

/// The last bytes of one output stream, kept while it is read: never more than the tail and
/// one chunk in memory, whatever the log's size.
struct Tail {
    source: LogSource,
    data: Vec<u8>,
    total: u64,
}

/// Adds `chunk` to the tail of its stream (streams in order of first output), keeping at most
/// `keep` bytes of each.
fn push_chunk(out: &mut Vec<Tail>, chunk: LogChunk, keep: usize) {
    let i = match out.iter().position(|t| t.source == chunk.source) {
        Some(i) => i,
        None => {
            out.push(Tail {
                source: chunk.source,
                data: Vec::new(),
                total: 0,
            });
            out.len() - 1
        }
    };
    let t = &mut out[i];
    t.total += chunk.data.len() as u64;
    let data = if chunk.data.len() > keep {
        &chunk.data[chunk.data.len() - keep..]
    } else {
        &chunk.data[..]
    };
    t.data.extend_from_slice(data);
    if t.data.len() > keep {
        let cut = t.data.len() - keep;
        t.data.drain(..cut);
    }
}

fn tail_json(t: &Tail) -> Value {
    // Cut at a character boundary: a tail that starts inside a UTF-8 sequence loses the
    // sequence's rest rather than showing replacement characters.
    let start = t
        .data
        .iter()
        .take(3)
        .position(|b| (*b & 0xC0) != 0x80)
        .unwrap_or(0);
    let start = if (t.data.len() as u64) < t.total {
        start
    } else {
        0
    };
    json!({
        "stream": t.source.as_str(),
        "text": String::from_utf8_lossy(&t.data[start..]),
        "bytes": t.total,
        "truncated": (t.data.len() as u64) < t.total,
    })
}

/// The tail of job `id`'s latest attempt's output (JobLogs' rule: `jobs.read` on the job's
/// queue, its tenant's job or `jobs.admin`).
async fn logs(
    State(page): State<PageState>,
    found: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, RestError> {
    let caller = caller(found)?;
    let keep = count(&uri, "tail_bytes", DEFAULT_TAIL_BYTES, MAX_TAIL_BYTES)?;
    let rec = page
        .jobs
        .authorised_for(&caller, &id)
        .await
        .map_err(grpc_error)?;
    let job = page.jobs.wire(&rec);
    let mut stream = page
        .jobs
        .clone()
        .attempt_logs(id.clone(), false)
        .await
        .map_err(grpc_error)?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            RestError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("job logs of '{id}': {e}"),
            )
        })?;
        push_chunk(&mut out, chunk, keep);
    }
    Ok(fresh(&json!({
        "id": id,
        "attempt": rec.attempt,
        "state": job_json(&job)["state"].clone(),
        "tail_bytes": keep,
        "logs": out.iter().map(tail_json).collect::<Vec<_>>(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tails(chunks: impl IntoIterator<Item = LogChunk>, keep: usize) -> Vec<Tail> {
        let mut out = Vec::new();
        for c in chunks {
            push_chunk(&mut out, c, keep);
        }
        out
    }

    fn chunk(source: LogSource, data: &[u8]) -> LogChunk {
        LogChunk {
            source,
            data: data.to_vec(),
        }
    }

    #[test]
    fn tails_keep_the_last_bytes_of_each_stream() {
        let t = tails(
            [
                chunk(LogSource::Stdout, b"0123456789"),
                chunk(LogSource::Stderr, b"err"),
                chunk(LogSource::Stdout, b"abc"),
            ],
            5,
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].source, LogSource::Stdout);
        assert_eq!(t[0].data, b"89abc");
        assert_eq!(t[0].total, 13);
        assert_eq!(t[1].data, b"err");
        let j = tail_json(&t[0]);
        assert_eq!(j["text"], "89abc");
        assert_eq!(j["truncated"], true);
        assert_eq!(j["stream"], "stdout");
        assert_eq!(tail_json(&t[1])["truncated"], false);
        // A chunk longer than the tail keeps only its end.
        let t = tails([chunk(LogSource::Combined, &[b'x'; 100])], 7);
        assert_eq!(t[0].data.len(), 7);
        assert_eq!(t[0].total, 100);
    }

    #[test]
    fn a_tail_cut_inside_a_character_starts_at_the_next_one() {
        // "é" is two bytes; the tail of 3 bytes of "aéé" starts on the second byte of the first.
        let t = tails([chunk(LogSource::Stdout, "aéé".as_bytes())], 3);
        assert_eq!(t[0].data.len(), 3);
        assert_eq!(tail_json(&t[0])["text"], "é");
    }

    fn uri(q: &str) -> Uri {
        format!("/api/jobs{q}").parse().unwrap()
    }

    #[test]
    fn counts_are_bounded_and_unknown_parameters_named() {
        assert_eq!(count(&uri(""), "limit", 50, 500).unwrap(), 50);
        assert_eq!(count(&uri("?limit=7"), "limit", 50, 500).unwrap(), 7);
        assert_eq!(count(&uri("?limit=500"), "limit", 50, 500).unwrap(), 500);
        for bad in ["?limit=0", "?limit=501", "?limit=-1", "?limit=x", "?limit="] {
            let e = count(&uri(bad), "limit", 50, 500).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(e.message.contains("from 1 to 500"), "{bad}: {}", e.message);
        }
        let e = count(&uri("?limt=3"), "limit", 50, 500).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("'limt'") && e.message.contains("limit"),
            "{}",
            e.message
        );
    }

    #[test]
    fn every_page_route_has_an_access_rule() {
        use crate::auth::rules::{Rule, Verb, rule_of};
        for path in [INDEX, SCRIPT, STYLE] {
            assert_eq!(rule_of(path).map(|r| r.1), Some(Rule::Open), "{path}");
        }
        assert_eq!(
            rule_of("/api/status").map(|r| r.1),
            Some(Rule::Server(Verb::Read))
        );
        assert_eq!(rule_of("/api/jobs").map(|r| r.1), Some(Rule::JobList));
        assert_eq!(
            rule_of("/api/jobs/{id}/logs").map(|r| r.1),
            Some(Rule::Job(Verb::JobsRead))
        );
    }
}
