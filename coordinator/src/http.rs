//! HTTP: Triton's health paths and Prometheus metrics, the REST APIs (`rest/`) and the status
//! page (`page/`). The health paths and the page's files (which hold no data) are open to every
//! caller; everything else passes the authentication layer (`crate::auth`): `/metrics` needs
//! `read` on the server unless `server.metrics_public`.
//!
//! The metrics text is rendered by hand from the fast path's own counters at scrape time: the
//! numbers already live in atomics there, and a metrics registry would only keep a second copy.

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use veraltheim_models::ModelState;

use crate::context::Context;

pub fn router(
    ctx: Arc<Context>,
    page: crate::page::PageState,
    gate: Arc<crate::auth::Gate>,
) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        // Short aliases for Kubernetes probes.
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(crate::rest::router())
        // The status page and its JSON endpoints (`page/`).
        .merge(crate::page::routes(page))
        .fallback(crate::rest::no_route)
        .method_not_allowed_fallback(crate::rest::wrong_method)
        .with_state(ctx)
        .layer(axum::middleware::from_fn_with_state(
            gate,
            crate::auth::http_layer,
        ))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(ctx): State<Arc<Context>>) -> StatusCode {
    if ctx.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&ctx),
    )
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
    /// Samples whose name is the family's plus a suffix (a histogram's `_bucket`, `_sum`,
    /// `_count`), in order.
    suffixed: Vec<(&'static str, String, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
            suffixed: Vec::new(),
        }
    }
}

/// The upper bounds of the request-duration histogram's buckets, in microseconds (100 µs to
/// one minute; `+Inf` is added).
const DURATION_BUCKETS_US: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// The families of the coordinator's own state: each model's memory and each device's budget
/// (the allocator), jobs by state (the job runner), restarts (the supervision tree).
fn coordinator_families(ctx: &Context) -> Vec<Family> {
    let mut model_memory = Family::new(
        "veraltheim_model_memory_bytes",
        "gauge",
        "Memory the allocator holds for each model on each device (measured when ready, the \
         estimate while loading)",
    );
    let mut held: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for p in ctx.models.placements() {
        let sum = held.entry((p.model, p.device.to_string())).or_default();
        *sum = sum.saturating_add(p.bytes);
    }
    for ((model, device), bytes) in held {
        model_memory.samples.push((
            format!(
                "model=\"{}\",device=\"{}\"",
                escape(&model),
                escape(&device)
            ),
            bytes as f64,
        ));
    }
    let mut budget = Family::new(
        "veraltheim_device_memory_budget_bytes",
        "gauge",
        "Memory models may hold on each device (capacity minus reserve)",
    );
    let mut device_held = Family::new(
        "veraltheim_device_memory_held_bytes",
        "gauge",
        "Memory models hold on each device, loading ones included",
    );
    for d in ctx.models.memory() {
        let l = format!("device=\"{}\"", d.device);
        budget.samples.push((l.clone(), d.budget_bytes as f64));
        device_held.samples.push((l, d.held_bytes as f64));
    }

    let mut live = Family::new(
        "veraltheim_jobs",
        "gauge",
        "Live batch jobs by state (QUEUED, RUNNING: admitted or running, RETRY_WAIT)",
    );
    let mut entered = Family::new(
        "veraltheim_jobs_entered_total",
        "counter",
        "Batch jobs that entered each state since the coordinator started",
    );
    let mut paused = Family::new(
        "veraltheim_jobs_paused",
        "gauge",
        "Running local jobs paused now (SIGSTOP) while a latency objective is at risk",
    );
    let mut job_cpu = Family::new(
        "veraltheim_jobs_cpu_capacity_millicores",
        "gauge",
        "CPU local jobs are admitted against now: the configured capacity less what the fast \
         path uses (never below jobs.min_cpu_millis)",
    );
    if let Some(jobs) = &ctx.jobs {
        paused.samples.push((String::new(), jobs.paused() as f64));
        job_cpu
            .samples
            .push((String::new(), jobs.cpu_capacity_millis() as f64));
        let c = jobs.live();
        for (state, n) in [
            ("QUEUED", c.queued),
            ("RUNNING", c.running),
            ("RETRY_WAIT", c.retry_wait),
        ] {
            live.samples.push((format!("state=\"{state}\""), n as f64));
        }
        for (state, n) in jobs.entered() {
            entered
                .samples
                .push((format!("state=\"{}\"", state.as_str()), n as f64));
        }
    }

    let mut restarts = Family::new(
        "veraltheim_supervisor_restarts_total",
        "counter",
        "Restarts of each supervised task by its supervisor (path as `veraltheim status` shows \
         it; a task's count starts again when its supervisor restarts)",
    );
    if let Some(root) = ctx.tree.get() {
        fn walk(
            node: &veraltheim_supervisor::NodeSnapshot,
            path: &str,
            out: &mut Vec<(String, f64)>,
        ) {
            for child in &node.children {
                let path = if path.is_empty() {
                    child.name.clone()
                } else {
                    format!("{path}/{}", child.name)
                };
                out.push((
                    format!("path=\"{}\"", escape(&path)),
                    f64::from(child.restarts),
                ));
                walk(child, &path, out);
            }
        }
        walk(&root.snapshot(), "", &mut restarts.samples);
    }
    let mut families = vec![
        model_memory,
        budget,
        device_held,
        live,
        entered,
        paused,
        job_cpu,
        restarts,
    ];
    families.extend(nats_families(ctx));
    families
}

/// The NATS bridge's state and counters (`--nats-url`); none without a bridge.
fn nats_families(ctx: &Context) -> Vec<Family> {
    let Some(bridge) = &ctx.bridge else {
        return Vec::new();
    };
    let s = bridge.status();
    let one = |name, kind, help, value: u64| {
        let mut f = Family::new(name, kind, help);
        f.samples.push((String::new(), value as f64));
        f
    };
    let mut dropped = Family::new(
        "veraltheim_nats_bridge_dropped_total",
        "counter",
        "Events the NATS bridge did not publish: its buffer was full (buffer_full) or their \
         publish attempts failed (publish_failed)",
    );
    dropped
        .samples
        .push(("reason=\"buffer_full\"".to_string(), s.dropped_full as f64));
    dropped.samples.push((
        "reason=\"publish_failed\"".to_string(),
        s.dropped_failed as f64,
    ));
    vec![
        one(
            "veraltheim_nats_bridge_connected",
            "gauge",
            "1 while the NATS bridge is connected with its stream and consumer set up",
            u64::from(s.connection == veraltheim_bus::nats::Connection::Connected),
        ),
        one(
            "veraltheim_nats_bridge_buffered",
            "gauge",
            "Events waiting for the NATS bridge to publish them",
            s.buffered,
        ),
        one(
            "veraltheim_nats_bridge_published_total",
            "counter",
            "Events the NATS bridge stored in its stream",
            s.published,
        ),
        one(
            "veraltheim_nats_bridge_duplicates_total",
            "counter",
            "Publishes the stream acknowledged as duplicates of an earlier attempt",
            s.duplicates,
        ),
        one(
            "veraltheim_nats_bridge_received_total",
            "counter",
            "Events from other nodes the NATS bridge delivered here",
            s.received,
        ),
        dropped,
        one(
            "veraltheim_nats_bridge_publish_errors_total",
            "counter",
            "Failed publish attempts of the NATS bridge",
            s.publish_errors,
        ),
        one(
            "veraltheim_nats_bridge_invalid_total",
            "counter",
            "Messages in the NATS stream that were not valid events",
            s.invalid,
        ),
    ]
}

/// A label value in the Prometheus text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(model: &str, version: &str) -> String {
    format!(
        "model=\"{}\",version=\"{}\"",
        escape(model),
        escape(version)
    )
}

pub fn render(ctx: &Context) -> String {
    let mut fams = [
        Family::new(
            "nv_inference_request_success",
            "counter",
            "Successful inference requests",
        ),
        Family::new(
            "nv_inference_request_failure",
            "counter",
            "Failed inference requests",
        ),
        Family::new(
            "nv_inference_count",
            "counter",
            "Inferences performed (batch items)",
        ),
        Family::new(
            "nv_inference_exec_count",
            "counter",
            "Model executions (batches)",
        ),
        Family::new(
            "nv_inference_request_duration_us",
            "counter",
            "Cumulative end-to-end inference request duration in microseconds",
        ),
        Family::new(
            "nv_inference_queue_duration_us",
            "counter",
            "Cumulative time requests spent in the queue in microseconds",
        ),
        Family::new(
            "nv_inference_compute_input_duration_us",
            "counter",
            "Cumulative input assembly duration in microseconds",
        ),
        Family::new(
            "nv_inference_compute_infer_duration_us",
            "counter",
            "Cumulative model execution duration in microseconds",
        ),
        Family::new(
            "nv_inference_compute_output_duration_us",
            "counter",
            "Cumulative output handling duration in microseconds",
        ),
        Family::new(
            "nv_inference_pending_request_count",
            "gauge",
            "Requests waiting in the model's queue",
        ),
        Family::new(
            "veraltheim_inference_rejected_total",
            "counter",
            "Requests refused because the model's queue was full",
        ),
        Family::new(
            "veraltheim_inference_expired_total",
            "counter",
            "Requests dropped from the queue because their deadline passed",
        ),
        Family::new(
            "veraltheim_inference_inline_total",
            "counter",
            "Batches run on the thread that received their request (the model idle and measured \
             fast: models.inline_execution_us)",
        ),
        Family::new(
            "veraltheim_inference_batcher_executions_total",
            "counter",
            "Batches run on the model's batcher task instead of the execution pool (the model's \
             batches measured tiny: models.batcher_execution_us)",
        ),
        Family::new(
            "veraltheim_inference_padded_tokens_total",
            "counter",
            "Text models: tokens of the executed batches, each padded to its longest sentence",
        ),
        Family::new(
            "veraltheim_inference_real_tokens_total",
            "counter",
            "Text models: real tokens of the executed batches (padded ÷ real is padding's cost)",
        ),
    ];
    let mut summaries = [
        Family::new(
            "nv_inference_request_summary_us",
            "summary",
            "End-to-end latency of successful requests in microseconds, since the model loaded",
        ),
        Family::new(
            "nv_inference_queue_summary_us",
            "summary",
            "Queue time of successful requests in microseconds, since the model loaded",
        ),
        Family::new(
            "nv_inference_compute_infer_summary_us",
            "summary",
            "Batch compute time of successful requests in microseconds, since the model loaded",
        ),
    ];
    let mut duration = Family::new(
        "veraltheim_inference_request_duration_seconds",
        "histogram",
        "End-to-end duration of successful inference requests in seconds, since the model loaded \
         (a bucket may take in durations up to 1% above its bound)",
    );
    let mut objectives = [
        Family::new(
            "veraltheim_model_slo_p99_seconds",
            "gauge",
            "The model's latency objective: the p99 of its online requests to keep",
        ),
        Family::new(
            "veraltheim_model_online_p99_seconds",
            "gauge",
            "The p99 of the model's online requests over the last ~5 s (0 when there were none)",
        ),
        Family::new(
            "veraltheim_background_limit",
            "gauge",
            "Background requests (batch inference jobs) the model's controller allows in flight",
        ),
        Family::new(
            "veraltheim_background_in_flight",
            "gauge",
            "Background requests of the model in flight now",
        ),
        Family::new(
            "veraltheim_background_batch_rows",
            "gauge",
            "Background rows one batch of the model may take (by background_batch_ms and the \
             measured time per row; 0 until measured)",
        ),
        Family::new(
            "veraltheim_model_slo_at_risk",
            "gauge",
            "1 while the model's latency objective is at risk (local command jobs are paused)",
        ),
    ];
    for w in ctx.models.workers() {
        let s = w.stats();
        let l = labels(w.name(), &ctx.models.version_of(w.name()));
        if let Some(o) = &s.slo {
            let values = [
                o.objective.as_secs_f64(),
                o.window_p99.map_or(0.0, |p| p.as_secs_f64()),
                o.limit as f64,
                o.in_flight as f64,
                o.batch_rows.map_or(0.0, |r| r as f64),
                if o.at_risk { 1.0 } else { 0.0 },
            ];
            for (fam, v) in objectives.iter_mut().zip(values) {
                fam.samples.push((l.clone(), v));
            }
        }
        let b = w.latency_buckets(&DURATION_BUCKETS_US);
        for (le, n) in DURATION_BUCKETS_US.iter().zip(&b.cumulative) {
            let le = *le as f64 / 1e6;
            duration
                .suffixed
                .push(("_bucket", format!("{l},le=\"{le}\""), *n as f64));
        }
        duration
            .suffixed
            .push(("_bucket", format!("{l},le=\"+Inf\""), b.count as f64));
        duration
            .suffixed
            .push(("_sum", l.clone(), b.sum_us as f64 / 1e6));
        duration
            .suffixed
            .push(("_count", l.clone(), b.count as f64));
        for (fam, p) in summaries
            .iter_mut()
            .zip([s.total_us, s.queue_us, s.compute_us])
        {
            for (q, v) in [
                ("0.5", p.p50),
                ("0.9", p.p90),
                ("0.99", p.p99),
                ("0.999", p.p999),
            ] {
                fam.samples
                    .push((format!("{l},quantile=\"{q}\""), v as f64));
            }
        }
        let values = [
            s.success.count as f64,
            s.fail.count as f64,
            s.inference_count as f64,
            s.execution_count as f64,
            ((s.success.ns + s.fail.ns) / 1000) as f64,
            (s.queue.ns / 1000) as f64,
            (s.compute_input.ns / 1000) as f64,
            (s.compute_infer.ns / 1000) as f64,
            (s.compute_output.ns / 1000) as f64,
            s.pending as f64,
            s.rejected as f64,
            s.expired as f64,
            w.inline_runs() as f64,
            w.batcher_runs() as f64,
            s.padded_tokens as f64,
            s.real_tokens as f64,
        ];
        for (fam, v) in fams.iter_mut().zip(values) {
            fam.samples.push((l.clone(), v));
        }
    }
    let mut state = Family::new(
        "veraltheim_model_state",
        "gauge",
        "1 for the state each known model is in",
    );
    for m in ctx.models.list() {
        for s in [
            ModelState::NotLoaded,
            ModelState::Loading,
            ModelState::Ready,
            ModelState::Unloading,
            ModelState::Failed,
        ] {
            state.samples.push((
                format!("{},state=\"{}\"", labels(&m.name, &m.version), s.as_str()),
                if m.state == s { 1.0 } else { 0.0 },
            ));
        }
    }
    let mut dropped = Family::new(
        "veraltheim_log_lines_dropped_total",
        "counter",
        "Log lines dropped because stderr could not take them (a closed pipe, a full disk)",
    );
    dropped
        .samples
        .push((String::new(), crate::logging::dropped_lines() as f64));
    let mut up = Family::new(
        "veraltheim_uptime_seconds",
        "gauge",
        "Seconds since the coordinator started",
    );
    up.samples
        .push((String::new(), ctx.started.elapsed().as_secs_f64()));

    let c = ctx.inference.cache().stats();
    let snapshot = ctx.devices.snapshot();
    let h = &snapshot.host;
    let mut singles = Vec::new();
    for (name, kind, help, value) in [
        (
            "veraltheim_response_cache_hits_total",
            "counter",
            "Response cache lookups that hit",
            c.hits as f64,
        ),
        (
            "veraltheim_response_cache_misses_total",
            "counter",
            "Response cache lookups that missed",
            c.misses as f64,
        ),
        (
            "veraltheim_response_cache_evictions_total",
            "counter",
            "Entries evicted to stay within the cache's byte bound",
            c.evictions as f64,
        ),
        (
            "veraltheim_response_cache_entries",
            "gauge",
            "Entries in the response cache",
            c.entries as f64,
        ),
        (
            "veraltheim_response_cache_bytes",
            "gauge",
            "Bytes held by the response cache",
            c.bytes as f64,
        ),
        (
            "veraltheim_host_cpu_cores",
            "gauge",
            "CPU cores available to the coordinator",
            f64::from(h.cores),
        ),
        (
            "veraltheim_host_memory_total_bytes",
            "gauge",
            "Host memory",
            h.memory_total_bytes as f64,
        ),
        (
            "veraltheim_host_memory_available_bytes",
            "gauge",
            "Host memory available",
            h.memory_available_bytes as f64,
        ),
        (
            "veraltheim_process_resident_memory_bytes",
            "gauge",
            "Resident memory of the coordinator",
            h.process_rss_bytes as f64,
        ),
    ] {
        let mut f = Family::new(name, kind, help);
        f.samples.push((String::new(), value));
        singles.push(f);
    }

    // One series per GPU with the DCGM exporter's names and labels, so existing GPU dashboards
    // work unchanged. A field the device cannot report is left out rather than shown as 0.
    let mut dcgm = [
        Family::new("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)"),
        Family::new(
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "gauge",
            "Memory utilization (in %)",
        ),
        Family::new(
            "DCGM_FI_DEV_FB_USED",
            "gauge",
            "Framebuffer memory used (in MiB)",
        ),
        Family::new(
            "DCGM_FI_DEV_FB_FREE",
            "gauge",
            "Framebuffer memory free (in MiB)",
        ),
        Family::new("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)"),
        Family::new("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)"),
        Family::new(
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "counter",
            "Total energy consumption since boot (in mJ)",
        ),
    ];
    for g in &snapshot.gpus {
        let l = format!(
            "gpu=\"{}\",UUID=\"{}\",device=\"nvidia{}\",modelName=\"{}\",simulated=\"{}\"",
            g.index,
            escape(&g.uuid),
            g.index,
            escape(&g.name),
            g.simulated
        );
        let mib = |b: u64| (b / (1024 * 1024)) as f64;
        let values = [
            g.utilization_gpu_percent.map(f64::from),
            g.utilization_memory_percent.map(f64::from),
            Some(mib(g.memory_used_bytes)),
            Some(mib(g.memory_free_bytes)),
            g.temperature_celsius.map(f64::from),
            g.power_draw_milliwatts.map(|mw| f64::from(mw) / 1000.0),
            g.energy_millijoules.map(|mj| mj as f64),
        ];
        for (fam, v) in dcgm.iter_mut().zip(values) {
            if let (Some(v), false) = (v, g.lost) {
                fam.samples.push((l.clone(), v));
            }
        }
    }

    let coordinator = coordinator_families(ctx);
    let mut out = String::with_capacity(4096);
    for fam in fams
        .iter()
        .chain(summaries.iter())
        .chain([&duration, &state, &up, &dropped])
        .chain(coordinator.iter())
        .chain(singles.iter())
        .chain(dcgm.iter().filter(|f| !f.samples.is_empty()))
        .chain(objectives.iter().filter(|f| !f.samples.is_empty()))
    {
        let _ = writeln!(out, "# HELP {} {}", fam.name, fam.help);
        let _ = writeln!(out, "# TYPE {} {}", fam.name, fam.kind);
        for (labels, v) in &fam.samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{} {v}", fam.name);
            } else {
                let _ = writeln!(out, "{}{{{labels}}} {v}", fam.name);
            }
        }
        for (suffix, labels, v) in &fam.suffixed {
            let _ = writeln!(out, "{}{suffix}{{{labels}}} {v}", fam.name);
        }
    }
    out
}
