//! The `overload` benchmark: what the coordinator does when offered several times the load it
//! can sustain (issue 4: memory stays within the queue bounds, admitted requests keep a bounded
//! latency, the rest are refused fast).
//!
//! 1. A scratch repository holds one model, `overload`: the built-in `cost` model (a CPU spin of
//!    `base_us + per_item_us × rows` per batch) with the given `max_batch_size`,
//!    `max_queue_delay_microseconds` and `max_queue_size`.
//! 2. In-process: `Model::execute` on a full batch, repeated → one batch's compute.
//! 3. The real `veraltheim serve` on that repository. Sustainable load: the throughput of a
//!    closed loop whose concurrency equals the queue bound (no request is ever refused).
//! 4. Open loop at each `--factors` × that rate. The server's resident memory is sampled
//!    every 20 ms during each run, and its statistics are read around each window.
//! 5. Per run: served and refused requests, latency of each, the peak memory against the idle
//!    server's, and the target: p99 of admitted ≤ max queue delay + 2 × one batch's compute.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Serialize;
use serde_json::json;
use tokio::sync::oneshot;
use veraltheim_fastpath::WorkerOptions;
use veraltheim_models::{ModelConfig, Tensor, builtin};
use veraltheim_proto::v1::{self, model_service_client::ModelServiceClient};

use super::args::{LoadOpts, Shape};
use super::client::run_load;
use super::coordinator::{Coordinator, ServerSide, default_binary};
use super::report::LoadReport;

/// The model's name in the scratch repository.
const MODEL: &str = "overload";
/// How often the server's resident memory is read.
const RSS_PERIOD: Duration = Duration::from_millis(20);

#[derive(Args, Debug, Clone)]
pub struct OverloadArgs {
    /// The coordinator binary (default: `veraltheim` next to this executable).
    #[arg(long)]
    pub veraltheim_bin: Option<PathBuf>,
    /// Fixed compute per batch, µs (the model spins on an execution thread).
    #[arg(long, default_value_t = 2000)]
    pub base_us: u64,
    /// Compute per row, µs.
    #[arg(long, default_value_t = 200)]
    pub per_item_us: u64,
    /// `spin` (the model occupies a core, like CPU compute) or `sleep` (it holds its execution
    /// thread but not the CPU, like a call into an accelerator).
    #[arg(long, default_value = "spin")]
    pub busy: String,
    #[arg(long, default_value_t = 64)]
    pub max_batch_size: usize,
    /// The model's `max_queue_size` (0: the server's default bound).
    #[arg(long, default_value_t = 64)]
    pub max_queue_size: usize,
    #[arg(long, default_value_t = 0)]
    pub max_queue_delay_us: u64,
    /// Multiples of the sustainable rate to offer in open loop.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub factors: Vec<f64>,
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// HTTP/2 connections of the open loop.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Requests the generator keeps in flight before it sheds on its own side; high, so that
    /// the server does the shedding.
    #[arg(long, default_value_t = 16384)]
    pub max_outstanding: usize,
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout: f64,
    #[arg(long, default_value_t = 0)]
    pub execution_threads: usize,
    #[arg(long)]
    pub json: bool,
}

/// One batch's compute, measured in-process.
#[derive(Clone, Debug, Serialize)]
pub struct BatchCompute {
    pub rows: usize,
    pub runs: u32,
    pub mean_us: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct OverloadRun {
    /// Offered load ÷ sustainable load.
    pub factor: f64,
    pub report: LoadReport,
    pub server: ServerSide,
    /// Resident memory of the fresh server before the run, bytes.
    pub idle_rss_bytes: u64,
    /// Largest resident memory of the server seen during the run (warm-up included), bytes.
    pub peak_rss_bytes: u64,
    /// The server's own p50 / p99 / p99.9 of the admitted requests (receipt to answer), µs,
    /// over the whole run, warm-up included.
    pub server_p50_us: u64,
    pub server_p99_us: u64,
    pub server_p999_us: u64,
    /// Refused by the server (RESOURCE_EXHAUSTED), share of the requests answered.
    pub refused_share: f64,
    /// p99 of the admitted requests ≤ max queue delay + 2 × one batch's compute.
    pub meets_latency_target: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct OverloadReport {
    pub config: serde_json::Value,
    pub batch_compute: BatchCompute,
    /// max queue delay + 2 × one batch's compute, µs.
    pub latency_bound_us: f64,
    /// The closed loop at concurrency = queue bound that defines the sustainable load.
    pub sustainable: LoadReport,
    pub runs: Vec<OverloadRun>,
}

/// The model's configuration (the server's and the in-process copy).
fn model_config(a: &OverloadArgs) -> serde_json::Value {
    let mut batching = json!({ "max_queue_delay_microseconds": a.max_queue_delay_us });
    if a.max_queue_size > 0 {
        batching["default_queue_policy"] = json!({ "max_queue_size": a.max_queue_size });
    }
    json!({
        "name": MODEL,
        "backend": "builtin",
        "max_batch_size": a.max_batch_size,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [1]}],
        "dynamic_batching": batching,
        "parameters": {
            "builtin": {"string_value": "cost"},
            "base_us": {"string_value": a.base_us.to_string()},
            "per_item_us": {"string_value": a.per_item_us.to_string()},
            "busy": {"string_value": a.busy},
        },
    })
}

fn validate(a: &OverloadArgs) -> anyhow::Result<()> {
    if a.max_batch_size == 0 {
        bail!("--max-batch-size must be at least 1");
    }
    if a.factors.is_empty() || a.factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
        bail!("--factors must be positive numbers, got {:?}", a.factors);
    }
    if a.channels == 0 {
        bail!("--channels must be at least 1");
    }
    Ok(())
}

/// One full batch executed in-process, repeated for about half a second.
fn batch_compute(config: &serde_json::Value, rows: usize) -> anyhow::Result<BatchCompute> {
    let config = ModelConfig::from_json(&config.to_string())?;
    let model = builtin::instantiate(config)?;
    let width = 16;
    let input = Tensor::from_f32("INPUT0", vec![rows, width], &vec![1.0; rows * width])?;
    let start = Instant::now();
    let mut runs = 0u32;
    while runs < 3 || (start.elapsed() < Duration::from_millis(500) && runs < 1000) {
        model
            .execute(std::slice::from_ref(&input))
            .context("the in-process batch")?;
        runs += 1;
    }
    Ok(BatchCompute {
        rows,
        runs,
        mean_us: start.elapsed().as_secs_f64() * 1e6 / f64::from(runs),
    })
}

/// The process's resident memory (`VmRSS`), bytes; `None` off Linux or once it has exited.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Samples `pid`'s resident memory until dropped; `peak()` is the largest seen.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = rss_bytes(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(RSS_PERIOD).await;
            }
        });
        RssWatch { peak, stop }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn write_repository(dir: &Path, config: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let repo = dir.join("overload-models");
    let folder = repo.join(MODEL).join("1");
    std::fs::create_dir_all(&folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    std::fs::write(
        repo.join(MODEL).join("config.json"),
        serde_json::to_vec_pretty(config)?,
    )?;
    Ok(repo)
}

fn load_opts(a: &OverloadArgs, concurrency: Option<usize>, rate: Option<f64>) -> LoadOpts {
    LoadOpts {
        model: MODEL.to_string(),
        shape: "1x16".parse::<Shape>().expect("a constant shape"),
        concurrency,
        rate,
        duration: a.duration,
        warmup: a.warmup,
        clients_per_channel: concurrency.map_or(16, |c| c.div_ceil(a.channels)),
        channels: a.channels,
        max_outstanding: a.max_outstanding,
        request_timeout: a.request_timeout,
    }
}

/// The server's own end-to-end latency percentiles of the model's successful requests since it
/// was loaded (v1 `GetModelStatistics`), µs.
async fn server_latency(server: &Coordinator) -> anyhow::Result<v1::LatencyPercentiles> {
    let stats = ModelServiceClient::new(server.channel().await?)
        .get_model_statistics(v1::GetModelStatisticsRequest {
            name: MODEL.to_string(),
        })
        .await?
        .into_inner();
    stats
        .models
        .into_iter()
        .find(|m| m.name == MODEL)
        .and_then(|m| m.total_latency)
        .context("no latency statistics for the model")
}

/// One load run with the server's statistics around its measured window and its memory
/// sampled throughout.
async fn measured(
    server: &Coordinator,
    opts: &LoadOpts,
    target: &str,
) -> anyhow::Result<(LoadReport, ServerSide, u64)> {
    let spec = opts.spec().map_err(anyhow::Error::msg)?;
    let pid = server.pid().context("the coordinator has no pid")?;
    let watch = RssWatch::start(pid);
    let (tx, rx) = oneshot::channel();
    let before = async {
        rx.await.ok()?;
        server.counts(MODEL).await.ok()
    };
    let addr = server.addr().to_string();
    let (report, before) =
        tokio::join!(run_load(target, &addr, &spec, Some(pid), Some(tx)), before);
    let report = report?;
    let after = server.counts(MODEL).await?;
    let side = before.map_or_else(ServerSide::default, |b| after.since(&b, report.window_s));
    Ok((report, side, watch.peak()))
}

pub async fn overload(a: &OverloadArgs) -> anyhow::Result<OverloadReport> {
    validate(a)?;
    let config = model_config(a);
    let compute = {
        let config = config.clone();
        let rows = a.max_batch_size;
        tokio::task::spawn_blocking(move || batch_compute(&config, rows)).await??
    };
    let bound_us = a.max_queue_delay_us as f64 + 2.0 * compute.mean_us;
    let binary = match &a.veraltheim_bin {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
    let scratch = tempfile::tempdir()?;
    let repo = write_repository(scratch.path(), &config)?;
    // A fresh server for each run, so that its memory and latency statistics are the run's.
    let models = [MODEL.to_string()];
    let start = || {
        Coordinator::start_in(
            &binary,
            &models,
            a.execution_threads,
            None,
            Some(&repo),
            &[],
        )
    };
    // Without a bound of its own the model gets the server's `models.default_max_queue_size`,
    // whose embedded default is the worker's.
    let bound = if a.max_queue_size > 0 {
        a.max_queue_size
    } else {
        WorkerOptions::default().default_max_queue_size
    };
    let server = start().await?;
    let (sustainable, _, _) =
        measured(&server, &load_opts(a, Some(bound), None), "sustainable").await?;
    server.stop().await?;
    if sustainable.throughput_rps <= 0.0 {
        bail!("the closed loop served nothing: {}", sustainable.line());
    }
    let mut runs = Vec::new();
    for &factor in &a.factors {
        let server = start().await?;
        let pid = server.pid().context("the coordinator has no pid")?;
        let idle_rss = rss_bytes(pid).unwrap_or(0);
        let rate = (sustainable.throughput_rps * factor).round();
        let (report, server_side, peak) = measured(
            &server,
            &load_opts(a, None, Some(rate)),
            &format!("{factor}x"),
        )
        .await?;
        let latency = server_latency(&server).await?;
        server.stop().await?;
        let refused = report
            .errors
            .get("RESOURCE_EXHAUSTED")
            .copied()
            .unwrap_or(0);
        let answered = report.requests + report.error_total();
        runs.push(OverloadRun {
            factor,
            refused_share: if answered > 0 {
                refused as f64 / answered as f64
            } else {
                0.0
            },
            meets_latency_target: report.requests > 0
                && (report.latency_us.p99_us as f64) <= bound_us,
            report,
            server: server_side,
            idle_rss_bytes: idle_rss,
            peak_rss_bytes: peak,
            server_p50_us: latency.p50_us,
            server_p99_us: latency.p99_us,
            server_p999_us: latency.p999_us,
        });
    }
    Ok(OverloadReport {
        config,
        batch_compute: compute,
        latency_bound_us: bound_us,
        sustainable,
        runs,
    })
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

impl OverloadReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("model: {}\n", self.config));
        s.push_str(&format!(
            "one batch of {} in-process: {:.0} µs (mean of {}); latency bound = max queue delay + 2 × that = {:.0} µs\n",
            self.batch_compute.rows,
            self.batch_compute.mean_us,
            self.batch_compute.runs,
            self.latency_bound_us
        ));
        s.push_str(&format!("sustainable: {}\n", self.sustainable.line()));
        for r in &self.runs {
            s.push_str(&format!("{}\n", r.report.line()));
            let opt = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.1}"));
            s.push_str(&format!(
                "    {}× offered: refused {:.1}%, admitted p99 {} µs at the client vs bound {:.0} µs → {}; in the server p50 / p99 / p99.9 {} / {} / {} µs; peak memory {} (idle {}); average batch {}, mean queue {} µs, mean in server {} µs, execute busy {}\n",
                r.factor,
                r.refused_share * 100.0,
                r.report.latency_us.p99_us,
                self.latency_bound_us,
                if r.meets_latency_target { "met" } else { "MISSED" },
                r.server_p50_us,
                r.server_p99_us,
                r.server_p999_us,
                mib(r.peak_rss_bytes),
                mib(r.idle_rss_bytes),
                opt(r.server.average_batch),
                opt(r.server.mean_queue_us),
                opt(r.server.mean_in_server_us),
                r.server
                    .execute_busy
                    .map_or("?".to_string(), |b| format!("{:.0}%", b * 100.0)),
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> OverloadArgs {
        OverloadArgs {
            veraltheim_bin: None,
            busy: "spin".into(),
            base_us: 100,
            per_item_us: 10,
            max_batch_size: 8,
            max_queue_size: 16,
            max_queue_delay_us: 500,
            factors: vec![1.0, 4.0],
            duration: 1.0,
            warmup: 0.0,
            channels: 2,
            max_outstanding: 100,
            request_timeout: 1.0,
            execution_threads: 0,
            json: false,
        }
    }

    #[test]
    fn the_model_config_carries_the_bounds_and_builds() {
        let a = args();
        let c = model_config(&a);
        assert_eq!(
            c["dynamic_batching"]["default_queue_policy"]["max_queue_size"],
            16
        );
        assert_eq!(c["dynamic_batching"]["max_queue_delay_microseconds"], 500);
        let b = batch_compute(&c, 8).unwrap();
        // 100 + 8 × 10 µs of spin per batch.
        assert!(b.mean_us >= 180.0, "{b:?}");
        assert!(b.runs >= 3);
    }

    #[test]
    fn bad_factors_are_refused_by_name() {
        let mut a = args();
        a.factors = vec![0.0];
        let e = validate(&a).unwrap_err().to_string();
        assert!(e.contains("--factors"), "{e}");
    }

    #[test]
    fn own_memory_is_read() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
