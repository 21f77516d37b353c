//! The `cosched` benchmark (issue 17): online inference with a latency objective beside a batch
//! inference job and a CPU-bound command job on the same coordinator, in three runs of one report.
//!
//! 1. A scratch model repository holds the model: all-MiniLM-L6-v2 on ONNX Runtime
//!    (`import_sentence_transformers`, as `text` does), or, with `--model cost`, the built-in
//!    `cost` model as a stand-in (a CPU spin per batch; for the smoke test, not for figures).
//!    Its config gets two priority levels (online at level 1, the default; batch inference jobs
//!    at the lowest, level 2), so that "strict priority" is what the fast path does today.
//! 2. **Capacity**: the real `veraltheim serve` on that repository, a closed loop at
//!    `--capacity-concurrency` (64) for `--capacity-duration` seconds, one sentence per KServe
//!    `ModelInfer` → sentences/s (or `--capacity` given).
//! 3. **Online load**: an open loop at `--online-fraction` × capacity: Poisson arrivals (or a
//!    fixed interval) from a seeded generator, one sentence per request, sentences of mixed
//!    lengths from [`sentences`](super::sentences::sentences); latency from each request's due
//!    time (no coordinated omission). After `--warmup` seconds the measured `--duration` is cut
//!    into windows of `--window` seconds by due time.
//! 4. Three runs, each on a fresh server (the same repository, the same sentences, the same
//!    arrangement: the model's instance count is `--instances`, or the one the first server's
//!    model chose — the ONNX backend's thread × instance sweep — pinned in the config for every
//!    later server, so that a sweep that chooses differently from one start to the next cannot
//!    compare a run on two instances with a capacity measured on one):
//!    - `alone`: the online load alone;
//!    - `strict`: the online load, plus a batch inference job (`SubmitJob`, a JSON-lines file of
//!      `--batch-sentences` lines `{"text": ...}`) and a CPU-bound command job
//!      (`sh -c 'while :; do :; done'` under `timeout`, with `--command-cpu-millis`), no
//!      objective set: today's behaviour;
//!    - `controller`: the same with the objective `latency_slo_p99_ms` = `--slo-ms` set on the
//!      model, either as a model parameter in its config (`--slo-via parameter`) or with
//!      `serve --latency-slo MODEL=MS` (`--slo-via flag`).
//!
//!    The jobs are submitted before the online load starts and cancelled when it ends. The batch
//!    job's progress (`GetJob`: progress × lines) is read at every window's edges.
//! 5. Per run and per window: online achieved rate, p50/p99/max latency, failures, whether the
//!    p99 stayed within the objective (and nothing failed), batch sentences/s, and the
//!    utilisation: batch sentences/s ÷ (capacity − online achieved rate). The controller's
//!    state (limit, in flight, online p99 over its window, last decision and why, at risk) is
//!    read at each window's end from v1 `GetModelStatistics` (`ModelStatistics.objective`),
//!    present only for a model with an objective.
//!
//! Targets (issue 17), on the `controller` run: online p99 within the objective in every
//! window, and utilisation ≥ [`TARGET_UTILISATION`].
//!
//! Clean-up: the jobs are cancelled and each server stopped whatever happened to the run; the
//! command job is wrapped in `timeout` so that even a coordinator killed outright leaves no
//! spinning process behind for long; the scratch folder (repository, inputs, outputs, the
//! servers' data) is removed when the benchmark ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use veraltheim_models::repository::{ImportBackend, ImportOptions, import_sentence_transformers};
use veraltheim_proto::inference as pb;
use veraltheim_proto::v1::{
    self, job_service_client::JobServiceClient, model_service_client::ModelServiceClient,
};

use super::args::{LoadOpts, MAX_CONCURRENCY, MAX_DURATION_S, MAX_RATE, MAX_SCHEDULED, Shape};
use super::client::{call, client, connect, infer_request, run_load_with};
use super::coordinator::{Coordinator, ServerSide, default_binary};
use super::cpu::{self, CpuUse};
use super::report::{Latency, LoadReport, Recorder};
use super::sentences::{SplitMix, sentences};
use super::text::text_request;

/// Target of issue 17: the batch job uses at least this share of the capacity online leaves.
pub const TARGET_UTILISATION: f64 = 0.8;
/// Most lines of the batch job's input.
pub const MAX_BATCH_SENTENCES: usize = 2_000_000;
/// Most windows of one run.
pub const MAX_WINDOWS: usize = 10_000;
/// How long a submitted job may take to start running before the run goes on without it.
const JOB_START_BOUND: Duration = Duration::from_secs(30);
/// How long a cancelled job may take to reach a final state.
const JOB_STOP_BOUND: Duration = Duration::from_secs(15);
/// Seconds the command job's `timeout` adds to the run's own length.
const COMMAND_TIMEOUT_SLACK_S: u64 = 300;
/// The error name of a due request the generator did not send (too many in flight).
const CLIENT_SHED: &str = "CLIENT_SHED";
/// Distinct sentences the online load cycles through.
const ONLINE_SENTENCES: usize = 4096;
/// Width of the `cost` stand-in's input rows.
const COST_WIDTH: usize = 16;

/// Which model is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CoschedModel {
    /// all-MiniLM-L6-v2 on ONNX Runtime (needs --model-dir and --onnx).
    Minilm,
    /// The built-in `cost` model as a stand-in (a CPU spin per batch): for tests, not figures.
    Cost,
}

impl CoschedModel {
    /// The model's name on the server.
    pub fn name(self) -> &'static str {
        match self {
            CoschedModel::Minilm => "minilm",
            // Not `cost`: that name is the built-in model's own.
            CoschedModel::Cost => "cost-stand-in",
        }
    }
}

/// How the objective reaches the server in the `controller` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SloVia {
    /// `parameters.latency_slo_p99_ms` in the model's config.
    Parameter,
    /// `veraltheim serve --latency-slo MODEL=MS`.
    Flag,
}

/// How online requests arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arrivals {
    /// Exponential gaps (a Poisson process) of mean 1/rate.
    Poisson,
    /// Request i due at i/rate.
    Fixed,
}

/// The three runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    /// Online load alone.
    Alone,
    /// Online + batch job + command job, strict priority only (no objective set).
    Strict,
    /// The same with the objective set (the controller governs background work).
    Controller,
}

impl RunKind {
    fn with_jobs(self) -> bool {
        self != RunKind::Alone
    }

    fn with_objective(self) -> bool {
        self == RunKind::Controller
    }

    fn label(self) -> &'static str {
        match self {
            RunKind::Alone => "online alone",
            RunKind::Strict => "online + batch + command, strict priority only",
            RunKind::Controller => "online + batch + command, with the objective (controller)",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct CoschedArgs {
    /// The model: `minilm` (the real measurement) or `cost` (the built-in stand-in, for tests).
    #[arg(long, value_enum, default_value = "minilm")]
    pub model: CoschedModel,
    /// The sentence-transformers folder of all-MiniLM-L6-v2 (config.json, tokenizer.json, ...).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// The ONNX export of the encoder (testdata/minilm_onnx.py writes one).
    #[arg(long)]
    pub onnx: Option<PathBuf>,
    /// The coordinator binary (default: `veraltheim` next to this executable).
    #[arg(long)]
    pub veraltheim_bin: Option<PathBuf>,
    /// The latency objective: p99 of online requests, milliseconds.
    #[arg(long, default_value_t = 100)]
    pub slo_ms: u64,
    /// How the `controller` run sets the objective on the server.
    #[arg(long, value_enum, default_value = "parameter")]
    pub slo_via: SloVia,
    /// Extra model parameters for every run, `KEY=VALUE` (repeatable), e.g.
    /// `background_batch_ms=20` to try the controller's settings.
    #[arg(long = "model-parameter", value_name = "KEY=VALUE")]
    pub model_parameters: Vec<String>,
    /// Online load as a share of the measured capacity (open loop).
    #[arg(long, default_value_t = 0.5)]
    pub online_fraction: f64,
    /// How online requests arrive.
    #[arg(long, value_enum, default_value = "poisson")]
    pub arrivals: Arrivals,
    /// Seed of the arrivals and of the sentences.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds of each run's online load before measuring (the jobs already run).
    #[arg(long, default_value_t = 5.0)]
    pub warmup: f64,
    /// Length of a reporting window, seconds (the objective must hold in each).
    #[arg(long, default_value_t = 10.0)]
    pub window: f64,
    /// The capacity in sentences/s, instead of measuring it.
    #[arg(long)]
    pub capacity: Option<f64>,
    /// Closed-loop clients of the capacity measurement.
    #[arg(long, default_value_t = 64)]
    pub capacity_concurrency: usize,
    /// Measured seconds of the capacity measurement (after 2 s of warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub capacity_duration: f64,
    /// Lines of the batch inference job's input.
    #[arg(long, default_value_t = 100_000)]
    pub batch_sentences: usize,
    /// CPU request of the batch inference job, millicores.
    #[arg(long, default_value_t = 100)]
    pub batch_cpu_millis: u64,
    /// The command job's program, run with `sh -c` (under `timeout`).
    #[arg(long, default_value = "while :; do :; done")]
    pub command: String,
    /// CPU request of the command job, millicores.
    #[arg(long, default_value_t = 1000)]
    pub command_cpu_millis: u64,
    /// Passed to `serve --inference-job-concurrency` (requests of one batch job in flight);
    /// unset: the server's default.
    #[arg(long)]
    pub inference_job_concurrency: Option<usize>,
    /// The runs, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "alone,strict,controller"
    )]
    pub runs: Vec<RunKind>,
    /// `max_batch_size` of the model.
    #[arg(long, default_value_t = 64)]
    pub max_batch_size: u32,
    /// ONNX Runtime intra-op threads (`serve --onnx-intra-op-threads`); 0: its default.
    #[arg(long, default_value_t = 0)]
    pub intra_op_threads: usize,
    /// The model's instances in every run. Without it, the first server's model decides (the
    /// ONNX backend's thread × instance sweep, when it runs) and the count it chose is pinned
    /// for every later server, so that all runs and the capacity measure one arrangement.
    #[arg(long)]
    pub instances: Option<u32>,
    /// Passed to `serve --execution-threads` (0 = its default).
    #[arg(long, default_value_t = 0)]
    pub execution_threads: usize,
    /// The `cost` stand-in's compute per batch, µs.
    #[arg(long, default_value_t = 1000)]
    pub cost_base_us: u64,
    /// The `cost` stand-in's compute per row, µs.
    #[arg(long, default_value_t = 100)]
    pub cost_per_item_us: u64,
    /// HTTP/2 connections of the online open loop.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Online requests in flight at most; a due request beyond it is shed by the client (and
    /// counted against the objective).
    #[arg(long, default_value_t = 4096)]
    pub max_outstanding: usize,
    /// Seconds before the client abandons an online request.
    #[arg(long, default_value_t = 30.0)]
    pub request_timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn seconds(name: &str, v: f64) -> Result<Duration, String> {
    if v.is_finite() && v > 0.0 && v <= MAX_DURATION_S {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "--{name} must be 0 < seconds ≤ {MAX_DURATION_S}, got {v}"
        ))
    }
}

/// Checks every flag; the message names the offending one.
pub fn validate(a: &CoschedArgs) -> Result<(), String> {
    if a.model == CoschedModel::Minilm && (a.model_dir.is_none() || a.onnx.is_none()) {
        return Err(
            "--model minilm needs --model-dir (the sentence-transformers folder) and --onnx (its ONNX export); --model cost runs without them"
                .into(),
        );
    }
    model_parameters(a)?;
    if a.slo_ms == 0 || a.slo_ms > 3_600_000 {
        return Err(format!(
            "--slo-ms must be 1..=3600000 milliseconds, got {}",
            a.slo_ms
        ));
    }
    if !(a.online_fraction.is_finite() && a.online_fraction > 0.0 && a.online_fraction < 1.0) {
        return Err(format!(
            "--online-fraction must be between 0 and 1 (exclusive), got {}",
            a.online_fraction
        ));
    }
    let duration = seconds("duration", a.duration)?;
    if !(a.warmup.is_finite() && (0.0..=MAX_DURATION_S).contains(&a.warmup)) {
        return Err(format!(
            "--warmup must be 0 ≤ seconds ≤ {MAX_DURATION_S}, got {}",
            a.warmup
        ));
    }
    let window = seconds("window", a.window)?;
    if window > duration {
        return Err(format!(
            "--window ({} s) must not be longer than --duration ({} s)",
            a.window, a.duration
        ));
    }
    if windows(duration, window) > MAX_WINDOWS {
        return Err(format!(
            "--duration / --window makes more than {MAX_WINDOWS} windows"
        ));
    }
    seconds("capacity-duration", a.capacity_duration)?;
    seconds("request-timeout", a.request_timeout)?;
    if let Some(c) = a.capacity
        && !(c.is_finite() && c > 0.0 && c <= MAX_RATE)
    {
        return Err(format!(
            "--capacity must be > 0 and ≤ {MAX_RATE} sentences/s, got {c}"
        ));
    }
    if a.capacity_concurrency == 0 || a.capacity_concurrency > MAX_CONCURRENCY {
        return Err(format!(
            "--capacity-concurrency must be 1..={MAX_CONCURRENCY}, got {}",
            a.capacity_concurrency
        ));
    }
    if a.batch_sentences == 0 || a.batch_sentences > MAX_BATCH_SENTENCES {
        return Err(format!(
            "--batch-sentences must be 1..={MAX_BATCH_SENTENCES}, got {}",
            a.batch_sentences
        ));
    }
    if a.command.trim().is_empty() {
        return Err("--command must not be empty".into());
    }
    if a.batch_cpu_millis == 0 || a.command_cpu_millis == 0 {
        return Err("--batch-cpu-millis and --command-cpu-millis must be at least 1".into());
    }
    if a.inference_job_concurrency == Some(0) {
        return Err("--inference-job-concurrency must be at least 1".into());
    }
    if a.runs.is_empty() {
        return Err("--runs must name at least one of alone, strict, controller".into());
    }
    let mut seen = a.runs.clone();
    seen.sort();
    seen.dedup();
    if seen.len() != a.runs.len() {
        return Err(format!("--runs names a run twice: {:?}", a.runs));
    }
    if a.max_batch_size == 0 || a.max_batch_size > 4096 {
        return Err(format!(
            "--max-batch-size must be 1..=4096, got {}",
            a.max_batch_size
        ));
    }
    if a.channels == 0 || a.channels > 1024 {
        return Err(format!("--channels must be 1..=1024, got {}", a.channels));
    }
    if a.max_outstanding == 0 || a.max_outstanding > 100_000 {
        return Err(format!(
            "--max-outstanding must be 1..=100000, got {}",
            a.max_outstanding
        ));
    }
    Ok(())
}

/// Windows of `window` in `duration` (the last one may be shorter).
fn windows(duration: Duration, window: Duration) -> usize {
    let n = duration.as_secs_f64() / window.as_secs_f64();
    // A float just above an integer (60 / 10 computed as 6.000000001) is that integer.
    ((n - 1e-9).ceil().max(1.0)) as usize
}

/// Due times of an open loop at `rate`/s, from the loop's start, for `total` seconds.
#[derive(Clone, Debug)]
pub struct Arrival {
    rate: f64,
    kind: Arrivals,
    rng: SplitMix,
    i: u64,
    t: f64,
    total: f64,
}

impl Arrival {
    pub fn new(rate: f64, kind: Arrivals, seed: u64, total: Duration) -> Self {
        Arrival {
            rate,
            kind,
            rng: SplitMix::new(seed ^ 0xA5A5_5A5A_0F0F_F0F0),
            i: 0,
            t: 0.0,
            total: total.as_secs_f64(),
        }
    }
}

impl Iterator for Arrival {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let t = match self.kind {
            Arrivals::Fixed => self.i as f64 / self.rate,
            Arrivals::Poisson => {
                let t = self.t;
                self.t += -self.rng.unit().ln() / self.rate;
                t
            }
        };
        self.i += 1;
        (t < self.total).then(|| Duration::from_secs_f64(t))
    }
}

/// The controller's state at one moment, as the model's statistics give it
/// (`veraltheim.v1.ModelStatistics.objective`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ControllerSample {
    pub slo_p99_ms: u64,
    /// Online requests in the controller's sliding window and their p99 (0 when none).
    pub window_requests: u64,
    pub online_p99_ms: f64,
    /// Background requests allowed in flight, the most it may allow, and those in flight.
    pub background_limit: u64,
    pub background_max: u64,
    pub background_in_flight: u64,
    /// Background rows one batch may take (0: not measured yet).
    pub background_batch_rows: u64,
    /// The last decision ("grow", "hold", "shrink") and why.
    pub decision: String,
    pub reason: String,
    pub at_risk: bool,
    /// Decisions that changed the limit since the model loaded.
    pub grows: u64,
    pub shrinks: u64,
}

impl From<v1::LatencyObjective> for ControllerSample {
    fn from(o: v1::LatencyObjective) -> Self {
        ControllerSample {
            slo_p99_ms: o.slo_p99_ms,
            window_requests: o.window_requests,
            online_p99_ms: o.online_p99_us as f64 / 1000.0,
            background_limit: o.background_limit,
            background_max: o.background_max,
            background_in_flight: o.background_in_flight,
            background_batch_rows: o.background_batch_rows,
            decision: o.decision,
            reason: o.reason,
            at_risk: o.at_risk,
            grows: o.grows,
            shrinks: o.shrinks,
        }
    }
}

/// The controller's state through v1 `GetModelStatistics`; `None` when the model has no
/// objective (or the server does not answer within two seconds).
async fn read_controller(server: &Coordinator, model: &str) -> Option<ControllerSample> {
    let read = async {
        let stats = ModelServiceClient::new(server.channel().await.ok()?)
            .get_model_statistics(v1::GetModelStatisticsRequest {
                name: model.to_string(),
            })
            .await
            .ok()?
            .into_inner();
        let m = stats.models.into_iter().find(|m| m.name == model)?;
        m.objective.map(ControllerSample::from)
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// The measured capacity (or the given one).
#[derive(Clone, Debug, Serialize)]
pub struct Capacity {
    pub sentences_per_s: f64,
    /// The closed loop that measured it; absent when `--capacity` was given.
    pub measured: Option<LoadReport>,
}

/// One reporting window of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    /// Seconds after the measured start.
    pub from_s: f64,
    pub to_s: f64,
    /// Requests due in the window.
    pub offered: u64,
    pub answered: u64,
    /// Failed (by error name), shed by the client included.
    pub failed: BTreeMap<String, u64>,
    /// Answered / window length.
    pub achieved_rate: f64,
    pub latency_us: Latency,
    /// p99 ≤ objective and no request failed.
    pub within_slo: bool,
    /// Sentences the batch job finished in the window, per second.
    pub batch_sentences_per_s: Option<f64>,
    /// batch sentences/s ÷ (capacity − online achieved rate).
    pub utilisation: Option<f64>,
    /// The controller's state at the window's end (none without an objective).
    pub controller: Option<ControllerSample>,
}

/// A submitted job's life around the run.
#[derive(Clone, Debug, Serialize)]
pub struct JobOutcome {
    pub id: String,
    /// State when the measured window began (`RUNNING`, `QUEUED`...) and why it waited if so.
    pub state_at_start: String,
    pub reason_at_start: String,
    /// State once cancelled at the end.
    pub state_at_end: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BatchOutcome {
    pub job: JobOutcome,
    pub lines: usize,
    /// Lines done when the measured window began and when it ended.
    pub done_at_start: u64,
    pub done_at_end: u64,
    pub sentences_per_s: f64,
    pub utilisation: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct OnlineOutcome {
    pub offered_rate: f64,
    pub offered: u64,
    pub answered: u64,
    pub failed: BTreeMap<String, u64>,
    pub achieved_rate: f64,
    pub latency_us: Latency,
    /// How late the generator sent requests against their due time.
    pub send_lag_us: Latency,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub kind: RunKind,
    /// The objective was set on the server for this run.
    pub objective_set: bool,
    /// The extra `serve` flags of this run.
    pub serve_flags: Vec<String>,
    pub online: OnlineOutcome,
    pub windows: Vec<Window>,
    /// Online p99 within the objective (and no failure) in every window.
    pub within_slo_every_window: bool,
    pub batch: Option<BatchOutcome>,
    pub command: Option<JobOutcome>,
    /// The model's statistics showed a controller during the run.
    pub controller_seen: bool,
    /// Decisions of the controller that grew and shrank the limit over the measured window.
    pub controller_grows: Option<u64>,
    pub controller_shrinks: Option<u64>,
    /// What the model's statistics say the server did over the window (online and batch).
    pub server: ServerSide,
    /// CPU over the window (the command job's process is among `others`).
    pub cpu: Option<CpuUse>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CoschedReport {
    pub model: CoschedModel,
    pub cores: usize,
    pub slo_ms: u64,
    pub slo_via: SloVia,
    pub model_parameters: Vec<String>,
    pub online_fraction: f64,
    pub arrivals: Arrivals,
    pub window_s: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub batch_sentences: usize,
    pub command: String,
    pub inference_job_concurrency: Option<usize>,
    pub mean_sentence_bytes: f64,
    /// The model's instances in every run (given, or chosen by the first server and pinned).
    pub instances: Option<u32>,
    pub capacity: Capacity,
    pub runs: Vec<RunReport>,
    /// The targets on the `controller` run (absent when it was not run).
    pub controller_within_slo_every_window: Option<bool>,
    pub controller_utilisation: Option<f64>,
    pub target_utilisation: f64,
}

fn say(msg: &str) {
    eprintln!("[cosched] {msg}");
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Everything a run needs that does not change between runs.
struct Bench<'a> {
    args: &'a CoschedArgs,
    binary: PathBuf,
    repository: PathBuf,
    inputs: PathBuf,
    outputs: PathBuf,
    /// The online requests, cycled.
    payloads: Arc<Vec<pb::ModelInferRequest>>,
    base_config: serde_json::Value,
    /// The instance count every server's model runs with, once known (`--instances`, or the
    /// first server's choice).
    instances: std::sync::OnceLock<u32>,
}

impl Bench<'_> {
    fn model(&self) -> &'static str {
        self.args.model.name()
    }

    /// Writes the model's config for `kind` (the objective as a parameter where asked).
    fn write_config(&self, kind: RunKind) -> anyhow::Result<()> {
        let mut config = self.base_config.clone();
        if let Some(n) = self.instances.get() {
            config["instance_group"] = json!([{ "count": n, "kind": "KIND_CPU" }]);
        }
        if kind.with_objective() && self.args.slo_via == SloVia::Parameter {
            config["parameters"]["latency_slo_p99_ms"] =
                json!({"string_value": self.args.slo_ms.to_string()});
        }
        let path = self.repository.join(self.model()).join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    fn serve_flags(&self, kind: RunKind) -> Vec<String> {
        let a = self.args;
        let mut flags = vec![
            "--inference-input-dirs".to_string(),
            self.inputs.display().to_string(),
            "--inference-output-dir".to_string(),
            self.outputs.display().to_string(),
            // Room for both jobs whatever the core count.
            "--max-running-jobs".to_string(),
            "4".to_string(),
        ];
        if a.intra_op_threads > 0 {
            flags.extend([
                "--onnx-intra-op-threads".into(),
                a.intra_op_threads.to_string(),
            ]);
        }
        if let Some(c) = a.inference_job_concurrency {
            flags.extend(["--inference-job-concurrency".into(), c.to_string()]);
        }
        if kind.with_objective() && a.slo_via == SloVia::Flag {
            flags.extend([
                "--latency-slo".into(),
                format!("{}={}", self.model(), a.slo_ms),
            ]);
        }
        flags
    }

    async fn start(&self, kind: RunKind) -> anyhow::Result<(Coordinator, Vec<String>)> {
        self.write_config(kind)?;
        let flags = self.serve_flags(kind);
        say(&format!(
            "starting {} for run '{}' ({})",
            self.binary.display(),
            serde_json::to_value(kind)?.as_str().unwrap_or(""),
            flags.join(" ")
        ));
        let server = Coordinator::start_in(
            &self.binary,
            &[self.model().to_string()],
            self.args.execution_threads,
            None,
            Some(&self.repository),
            &flags,
        )
        .await
        .with_context(|| {
            if kind.with_objective() && self.args.slo_via == SloVia::Flag {
                "the coordinator did not start with --latency-slo (does this build have the flag? try --slo-via parameter)".to_string()
            } else {
                "the coordinator did not start".to_string()
            }
        })?;
        if self.instances.get().is_none() {
            let n = effective_instances(&server, self.model()).await?;
            let _ = self.instances.set(n);
            say(&format!(
                "the model runs {n} instance(s) (its own choice): pinned for every later run"
            ));
        }
        Ok((server, flags))
    }
}

/// The instance count `model` runs with on `server`: the ONNX backend's `onnx_instances`
/// (its sweep's choice, when it ran), else the config's instance groups.
async fn effective_instances(server: &Coordinator, model: &str) -> anyhow::Result<u32> {
    let response = client(server.channel().await?)
        .model_config(pb::ModelConfigRequest {
            name: model.to_string(),
            version: String::new(),
        })
        .await
        .with_context(|| format!("cannot read the config of model '{model}'"))?
        .into_inner();
    let config = response
        .config
        .with_context(|| format!("the server sent no config for model '{model}'"))?;
    if let Some(p) = config.parameters.get("onnx_instances") {
        return p.string_value.trim().parse().with_context(|| {
            format!(
                "model '{model}' has onnx_instances '{}', not a count",
                p.string_value
            )
        });
    }
    let count: i64 = config
        .instance_group
        .iter()
        .map(|g| i64::from(g.count.max(0)))
        .sum();
    Ok(u32::try_from(count.max(1)).unwrap_or(u32::MAX))
}

/// `--model-parameter` as (key, value) pairs; an error names a malformed one.
fn model_parameters(a: &CoschedArgs) -> Result<Vec<(String, String)>, String> {
    a.model_parameters
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && k.trim() != "latency_slo_p99_ms" => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!(
                "--model-parameter '{kv}' is not KEY=VALUE (the objective is --slo-ms)"
            )),
        })
        .collect()
}

/// The model's config: the imported one (or the `cost` stand-in's) with two priority levels.
fn model_config(a: &CoschedArgs, imported: Option<&Path>) -> anyhow::Result<serde_json::Value> {
    let mut config = match imported {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?
        }
        None => json!({
            "name": CoschedModel::Cost.name(),
            "backend": "builtin",
            "max_batch_size": a.max_batch_size,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [1]}],
            "parameters": {
                "builtin": {"string_value": "cost"},
                "base_us": {"string_value": a.cost_base_us.to_string()},
                "per_item_us": {"string_value": a.cost_per_item_us.to_string()},
            },
        }),
    };
    let map = config
        .as_object_mut()
        .context("the model's config is not a JSON object")?;
    // Online requests carry no priority: they take the default level, 1; batch inference jobs
    // take the lowest, 2 (see coordinator/src/batch.rs, background_priority).
    let mut batching = map
        .get("dynamic_batching")
        .filter(|d| d.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    batching["priority_levels"] = json!(2);
    batching["default_priority_level"] = json!(1);
    map.insert("dynamic_batching".into(), batching);
    if !a.model_parameters.is_empty() {
        let parameters = map
            .entry("parameters")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .context("the model's config has 'parameters' that are not an object")?;
        for (k, v) in model_parameters(a).map_err(anyhow::Error::msg)? {
            parameters.insert(k, json!({ "string_value": v }));
        }
    }
    Ok(config)
}

/// One batch-job input line.
fn batch_line(model: CoschedModel, sentence: &str, n: usize) -> String {
    match model {
        CoschedModel::Minilm => json!({ "text": sentence }).to_string(),
        CoschedModel::Cost => {
            let row: Vec<f32> = (0..COST_WIDTH).map(|i| ((n + i) % 1024) as f32).collect();
            json!({ "inputs": { "INPUT0": [row] } }).to_string()
        }
    }
}

fn write_batch_input(a: &CoschedArgs, path: &Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    // Different sentences from the online load's (another seed), in chunks to bound memory.
    let mut written = 0;
    let mut chunk_seed = a.seed.wrapping_add(1);
    while written < a.batch_sentences {
        let n = (a.batch_sentences - written).min(10_000);
        for (i, s) in sentences(n, chunk_seed).iter().enumerate() {
            writeln!(out, "{}", batch_line(a.model, s, written + i))?;
        }
        written += n;
        chunk_seed = chunk_seed.wrapping_add(1);
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

fn state_name(state: i32) -> String {
    v1::JobState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_string())
        .unwrap_or_else(|_| format!("state {state}"))
}

async fn get_job(
    jobs: &mut JobServiceClient<tonic::transport::Channel>,
    id: &str,
) -> anyhow::Result<v1::Job> {
    Ok(jobs
        .get_job(v1::GetJobRequest { id: id.to_string() })
        .await
        .with_context(|| format!("GetJob {id}"))?
        .into_inner())
}

fn is_terminal(state: i32) -> bool {
    [
        v1::JobState::Succeeded,
        v1::JobState::Failed,
        v1::JobState::Cancelled,
        v1::JobState::TimedOut,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

/// Waits (up to `bound`) until `id` runs or ends.
async fn wait_started(
    jobs: &mut JobServiceClient<tonic::transport::Channel>,
    id: &str,
    bound: Duration,
) -> anyhow::Result<v1::Job> {
    let deadline = Instant::now() + bound;
    loop {
        let job = get_job(jobs, id).await?;
        if job.state == v1::JobState::Running as i32
            || is_terminal(job.state)
            || Instant::now() >= deadline
        {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cancels `id` and waits (bounded) for its final state.
async fn cancel(jobs: &mut JobServiceClient<tonic::transport::Channel>, id: &str) -> String {
    let cancelled = jobs
        .cancel_job(v1::CancelJobRequest { id: id.to_string() })
        .await;
    if let Err(status) = &cancelled
        && status.code() != tonic::Code::FailedPrecondition
    {
        say(&format!("CancelJob {id}: {}", status.message()));
    }
    let deadline = Instant::now() + JOB_STOP_BOUND;
    loop {
        match get_job(jobs, id).await {
            Ok(job) if is_terminal(job.state) || Instant::now() >= deadline => {
                return state_name(job.state);
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return format!("unknown ({e:#})"),
        }
    }
}

fn inference_spec(a: &CoschedArgs, run: RunKind) -> v1::JobSpec {
    v1::JobSpec {
        name: format!("cosched-batch-{}", run_name(run)),
        queue: "default".into(),
        resources: Some(v1::Resources {
            cpu_millis: a.batch_cpu_millis,
            memory_bytes: 0,
            gpus: 0,
            gpu_memory_bytes: 0,
        }),
        labels: [("bench".to_string(), "cosched".to_string())].into(),
        kind: Some(v1::job_spec::Kind::Inference(v1::InferenceJob {
            model: a.model.name().to_string(),
            input_path: "cosched-input.jsonl".into(),
            output_path: format!("cosched-output-{}.jsonl", run_name(run)),
        })),
        ..Default::default()
    }
}

/// The command job: `timeout SECONDS sh -c COMMAND`, so that it ends by itself even if the
/// coordinator that started it is killed before it can cancel it.
fn command_spec(a: &CoschedArgs, run: RunKind) -> v1::JobSpec {
    let bound = (a.warmup + a.duration).ceil() as u64 + COMMAND_TIMEOUT_SLACK_S;
    v1::JobSpec {
        name: format!("cosched-command-{}", run_name(run)),
        queue: "default".into(),
        resources: Some(v1::Resources {
            cpu_millis: a.command_cpu_millis,
            memory_bytes: 0,
            gpus: 0,
            gpu_memory_bytes: 0,
        }),
        labels: [("bench".to_string(), "cosched".to_string())].into(),
        kind: Some(v1::job_spec::Kind::Command(v1::CommandJob {
            command: vec![
                "timeout".into(),
                bound.to_string(),
                "sh".into(),
                "-c".into(),
                a.command.clone(),
            ],
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn run_name(run: RunKind) -> &'static str {
    match run {
        RunKind::Alone => "alone",
        RunKind::Strict => "strict",
        RunKind::Controller => "controller",
    }
}

/// One online request's outcome.
struct Shot {
    /// Due time after the measured window's start; `None` during the warm-up.
    due: Option<Duration>,
    result: Result<(), &'static str>,
    latency: Duration,
    lag: Duration,
}

/// What the open loop recorded: per window, and the generator's lag.
struct OnlineRecord {
    per_window: Vec<Recorder>,
    offered: Vec<u64>,
    lag: Recorder,
}

fn window_of(due: Duration, window: Duration, n: usize) -> usize {
    ((due.as_secs_f64() / window.as_secs_f64()) as usize).min(n - 1)
}

/// The online open loop: requests due per `arrivals` from `start`, the first `warmup` not
/// recorded; released by a dedicated thread with the OS's timer (as the `run` open loop does);
/// at most `max_outstanding` in flight, a due request beyond that counted as [`CLIENT_SHED`].
#[allow(clippy::too_many_arguments)]
async fn online_loop(
    addr: &str,
    channels: usize,
    payloads: Arc<Vec<pb::ModelInferRequest>>,
    arrivals: Arrival,
    start: std::time::Instant,
    warmup: Duration,
    window: Duration,
    n_windows: usize,
    max_outstanding: usize,
    timeout: Duration,
) -> anyhow::Result<OnlineRecord> {
    let channels = connect(addr, channels, &Default::default()).await?;
    let clients: Vec<_> = channels.into_iter().map(client).collect();
    let permits = Arc::new(Semaphore::new(max_outstanding));
    let (tx, mut rx) = mpsc::channel::<Shot>(max_outstanding.max(1));
    let collector = tokio::spawn(async move {
        let mut per_window: Vec<Recorder> = (0..n_windows).map(|_| Recorder::new()).collect();
        let mut offered = vec![0u64; n_windows];
        let mut lag = Recorder::new();
        while let Some(shot) = rx.recv().await {
            let Some(due) = shot.due else { continue };
            let w = window_of(due, window, n_windows);
            offered[w] += 1;
            match shot.result {
                Ok(()) => {
                    lag.ok(shot.lag);
                    per_window[w].ok(shot.latency);
                }
                Err(e) => per_window[w].error_after(e, shot.latency),
            }
        }
        OnlineRecord {
            per_window,
            offered,
            lag,
        }
    });
    let handle = tokio::runtime::Handle::current();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("{}-cosched", cpu::CLIENT_THREADS))
        .spawn(move || {
            for (i, offset) in arrivals.enumerate() {
                let due = start + offset;
                let now = std::time::Instant::now();
                if due > now + Duration::from_micros(20) {
                    std::thread::sleep(due - now);
                }
                let measured = offset.checked_sub(warmup);
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    if measured.is_some() {
                        let _ = tx.blocking_send(Shot {
                            due: measured,
                            result: Err(CLIENT_SHED),
                            latency: Duration::ZERO,
                            lag: Duration::ZERO,
                        });
                    }
                    continue;
                };
                let mut client = clients[i % clients.len()].clone();
                let payloads = payloads.clone();
                let tx = tx.clone();
                handle.spawn(async move {
                    let sent = std::time::Instant::now();
                    let request = &payloads[i % payloads.len()];
                    let result = call(&mut client, request, timeout).await;
                    let done = std::time::Instant::now();
                    let _ = tx
                        .send(Shot {
                            due: measured,
                            result,
                            latency: done.saturating_duration_since(due),
                            lag: sent.saturating_duration_since(due),
                        })
                        .await;
                    drop(permit);
                });
            }
            let _ = done_tx.send(());
        })
        .context("cannot start the dispatcher thread")?;
    done_rx.await.context("the dispatcher thread panicked")?;
    // Every call in flight ends within the request timeout, so this wait is bounded.
    collector.await.context("the collector panicked")
}

/// What is read at each window's edge.
#[derive(Clone, Debug, Default)]
struct Edge {
    /// Lines the batch job had done.
    done: Option<u64>,
    controller: Option<ControllerSample>,
}

/// Reads the batch job's progress and the controller's state at `start + warmup + k × window`
/// for k = 0..=n (the last edge at the measured window's end), and the CPU and the model's
/// counters at the first and last edge.
#[allow(clippy::too_many_arguments)]
async fn edges(
    server: &Coordinator,
    model: &str,
    batch: Option<(&str, usize)>,
    start: Instant,
    warmup: Duration,
    window: Duration,
    duration: Duration,
    n: usize,
) -> anyhow::Result<(Vec<Edge>, Option<CpuUse>, ServerSide)> {
    let mut jobs = JobServiceClient::new(server.channel().await?);
    let mut out = Vec::with_capacity(n + 1);
    let mut cpu_first = None;
    let mut counts_first = None;
    let mut cpu_use = None;
    let mut side = ServerSide::default();
    for k in 0..=n {
        let at = start + warmup + (window * k as u32).min(duration);
        tokio::time::sleep_until(at).await;
        let (done, controller) = tokio::join!(
            async {
                let (id, lines) = batch?;
                let job = get_job(&mut jobs, id).await.ok()?;
                Some(if job.state == v1::JobState::Succeeded as i32 {
                    lines as u64
                } else {
                    (job.progress * lines as f64).round() as u64
                })
            },
            read_controller(server, model)
        );
        if k == 0 {
            cpu_first = Some(cpu::sample(server.pid()));
            counts_first = server.counts(model).await.ok();
        }
        if k == n {
            if let Some(first) = &cpu_first {
                cpu_use = Some(CpuUse::between(first, &cpu::sample(server.pid())));
            }
            if let (Some(before), Ok(after)) = (counts_first, server.counts(model).await) {
                side = after.since(&before, duration.as_secs_f64());
            }
        }
        out.push(Edge { done, controller });
    }
    Ok((out, cpu_use, side))
}

/// The jobs of one run, submitted so far (cancelled whatever happens).
#[derive(Default)]
struct Submitted {
    batch: Option<String>,
    command: Option<String>,
}

/// Runs `kind` on a fresh server; the server is stopped and the jobs cancelled whatever happens.
async fn one_run(
    bench: &Bench<'_>,
    kind: RunKind,
    capacity: f64,
    online_rate: f64,
) -> anyhow::Result<RunReport> {
    let (server, flags) = bench.start(kind).await?;
    let mut submitted = Submitted::default();
    let result = drive(
        bench,
        &server,
        kind,
        capacity,
        online_rate,
        flags,
        &mut submitted,
    )
    .await;
    // Clean-up: cancel what was submitted (again, if the run already did: harmless), then stop.
    if let Ok(channel) = server.channel().await {
        let mut jobs = JobServiceClient::new(channel);
        for id in [&submitted.batch, &submitted.command].into_iter().flatten() {
            let _ = jobs
                .cancel_job(v1::CancelJobRequest { id: id.clone() })
                .await;
        }
    }
    let stopped = server.stop().await;
    let report = result?;
    match stopped {
        Ok(status) if !status.success() => {
            say(&format!(
                "warning: the coordinator exited with {status} after SIGTERM"
            ));
        }
        Ok(_) => {}
        Err(e) => say(&format!("warning: stopping the coordinator: {e:#}")),
    }
    Ok(report)
}

async fn drive(
    bench: &Bench<'_>,
    server: &Coordinator,
    kind: RunKind,
    capacity: f64,
    online_rate: f64,
    serve_flags: Vec<String>,
    submitted: &mut Submitted,
) -> anyhow::Result<RunReport> {
    let a = bench.args;
    let model = bench.model();
    let mut jobs = JobServiceClient::new(server.channel().await?);
    if kind.with_jobs() {
        // The batch job first, so that it is admitted first when capacity is short.
        let job = jobs
            .submit_job(v1::SubmitJobRequest {
                spec: Some(inference_spec(a, kind)),
            })
            .await
            .context("SubmitJob (the batch inference job)")?
            .into_inner();
        submitted.batch = Some(job.id);
        let job = jobs
            .submit_job(v1::SubmitJobRequest {
                spec: Some(command_spec(a, kind)),
            })
            .await
            .context("SubmitJob (the command job)")?
            .into_inner();
        submitted.command = Some(job.id);
    }
    let mut at_start = BTreeMap::new();
    for id in [&submitted.batch, &submitted.command].into_iter().flatten() {
        let job = wait_started(&mut jobs, id, JOB_START_BOUND).await?;
        if job.state != v1::JobState::Running as i32 {
            say(&format!(
                "job {id} ({}) is {} after {JOB_START_BOUND:?}: {}",
                job.spec.map(|s| s.name).unwrap_or_default(),
                state_name(job.state),
                job.reason
            ));
        }
        at_start.insert(id.clone(), (state_name(job.state), job.reason));
    }

    let warmup = Duration::from_secs_f64(a.warmup);
    let duration = Duration::from_secs_f64(a.duration);
    let window = Duration::from_secs_f64(a.window);
    let n = windows(duration, window);
    // A short lead so that the first requests are not late by the set-up.
    let start = Instant::now() + Duration::from_millis(50);
    let arrivals = Arrival::new(online_rate, a.arrivals, a.seed, warmup + duration);
    say(&format!(
        "run '{}': online {online_rate:.1}/s for {} s + {} s warm-up",
        run_name(kind),
        a.duration,
        a.warmup
    ));
    let addr = server.addr().to_string();
    let batch = submitted.batch.as_deref().map(|id| (id, a.batch_sentences));
    let (online, edges) = tokio::join!(
        online_loop(
            &addr,
            a.channels,
            bench.payloads.clone(),
            arrivals,
            start.into_std(),
            warmup,
            window,
            n,
            a.max_outstanding,
            Duration::from_secs_f64(a.request_timeout),
        ),
        edges(server, model, batch, start, warmup, window, duration, n)
    );
    let online = online?;
    let (edges, cpu_use, side) = edges?;

    let mut command = None;
    let mut batch_outcome = None;
    let slo_us = a.slo_ms * 1000;
    let mut windows_out = Vec::with_capacity(n);
    for w in 0..n {
        let from = window * w as u32;
        let to = (window * (w as u32 + 1)).min(duration);
        let len = (to - from).as_secs_f64();
        let rec = &online.per_window[w];
        let achieved = rec.successes() as f64 / len;
        let batch_rate = match (edges[w].done, edges[w + 1].done) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / len),
            _ => None,
        };
        let latency = rec.latency();
        windows_out.push(Window {
            from_s: from.as_secs_f64(),
            to_s: to.as_secs_f64(),
            offered: online.offered[w],
            answered: rec.successes(),
            failed: rec.errors().clone(),
            achieved_rate: achieved,
            within_slo: rec.successes() > 0 && latency.p99_us <= slo_us && rec.error_total() == 0,
            latency_us: latency,
            batch_sentences_per_s: batch_rate,
            utilisation: batch_rate.map(|b| ratio(b, capacity - achieved)),
            controller: edges[w + 1].controller.clone(),
        });
    }
    let mut all = Recorder::new();
    for r in &online.per_window {
        all.merge(r);
    }
    let secs = duration.as_secs_f64();
    let online_out = OnlineOutcome {
        offered_rate: online_rate,
        offered: online.offered.iter().sum(),
        answered: all.successes(),
        failed: all.errors().clone(),
        achieved_rate: all.successes() as f64 / secs,
        latency_us: all.latency(),
        send_lag_us: online.lag.latency(),
    };
    let outcome = |id: &String, end: String| {
        let (state, reason) = at_start.get(id).cloned().unwrap_or_default();
        JobOutcome {
            id: id.clone(),
            state_at_start: state,
            reason_at_start: reason,
            state_at_end: end,
        }
    };
    if let Some(id) = &submitted.batch {
        let first = edges.first().and_then(|e| e.done).unwrap_or(0);
        let last = edges.last().and_then(|e| e.done).unwrap_or(first);
        let rate = last.saturating_sub(first) as f64 / secs;
        let end = cancel(&mut jobs, id).await;
        batch_outcome = Some(BatchOutcome {
            job: outcome(id, end),
            lines: a.batch_sentences,
            done_at_start: first,
            done_at_end: last,
            sentences_per_s: rate,
            utilisation: ratio(rate, capacity - online_out.achieved_rate),
        });
    }
    if let Some(id) = &submitted.command {
        let end = cancel(&mut jobs, id).await;
        command = Some(outcome(id, end));
    }
    let controller_seen = edges.iter().any(|e| e.controller.is_some());
    let (first, last) = (
        edges.first().and_then(|e| e.controller.as_ref()),
        edges.last().and_then(|e| e.controller.as_ref()),
    );
    let (controller_grows, controller_shrinks) = match (first, last) {
        (Some(a), Some(b)) => (
            Some(b.grows.saturating_sub(a.grows)),
            Some(b.shrinks.saturating_sub(a.shrinks)),
        ),
        _ => (None, None),
    };
    Ok(RunReport {
        kind,
        objective_set: kind.with_objective(),
        serve_flags,
        within_slo_every_window: windows_out.iter().all(|w| w.within_slo),
        online: online_out,
        windows: windows_out,
        batch: batch_outcome,
        command,
        controller_seen,
        controller_grows,
        controller_shrinks,
        server: side,
        cpu: cpu_use,
    })
}

/// The closed loop that measures the capacity, on `server`.
async fn measure_capacity(bench: &Bench<'_>, server: &Coordinator) -> anyhow::Result<LoadReport> {
    let a = bench.args;
    let spec = LoadOpts {
        model: bench.model().to_string(),
        shape: Shape(vec![1, 1]),
        concurrency: Some(a.capacity_concurrency),
        rate: None,
        duration: a.capacity_duration,
        warmup: 2.0,
        clients_per_channel: 16,
        channels: 4,
        max_outstanding: 1024,
        request_timeout: a.request_timeout,
    }
    .spec()
    .map_err(anyhow::Error::msg)?;
    let report = run_load_with(
        "capacity",
        &server.addr().to_string(),
        &spec,
        bench.payloads.to_vec(),
        server.pid(),
        None,
    )
    .await?;
    if report.throughput_rps <= 0.0 {
        bail!("the capacity run served nothing: {}", report.line());
    }
    Ok(report)
}

/// Runs the whole benchmark.
pub async fn cosched(a: &CoschedArgs) -> anyhow::Result<CoschedReport> {
    validate(a).map_err(anyhow::Error::msg)?;
    let binary = match &a.veraltheim_bin {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
    let scratch = tempfile::Builder::new()
        .prefix("veraltheim-cosched-")
        .tempdir()
        .context("cannot create the scratch folder")?;
    let repository = scratch.path().join("models");
    let inputs = scratch.path().join("inputs");
    let outputs = scratch.path().join("outputs");
    for d in [&repository, &inputs, &outputs] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let model = a.model.name();
    let imported = match a.model {
        CoschedModel::Minilm => {
            let (dir, onnx) = (
                a.model_dir.clone().context("--model-dir")?,
                a.onnx.clone().context("--onnx")?,
            );
            import_sentence_transformers(
                &dir,
                &repository,
                &ImportOptions {
                    name: model.to_string(),
                    backend: ImportBackend::OnnxRuntime,
                    onnx: Some(onnx),
                    max_batch_size: a.max_batch_size,
                    force: false,
                    quantize: None,
                    onnxruntime_library: None,
                },
            )?;
            Some(repository.join(model).join("config.json"))
        }
        CoschedModel::Cost => {
            std::fs::create_dir_all(repository.join(model).join("1"))?;
            None
        }
    };
    let base_config = model_config(a, imported.as_deref())?;
    let online_sentences = sentences(ONLINE_SENTENCES, a.seed);
    let mean_sentence_bytes = online_sentences.iter().map(String::len).sum::<usize>() as f64
        / online_sentences.len() as f64;
    let payloads: Vec<pb::ModelInferRequest> = match a.model {
        CoschedModel::Minilm => online_sentences
            .iter()
            .map(|s| text_request(model, s))
            .collect(),
        CoschedModel::Cost => vec![infer_request(model, &Shape(vec![1, COST_WIDTH]))],
    };
    if a.runs.iter().any(|r| r.with_jobs()) {
        say(&format!("writing {} batch input lines", a.batch_sentences));
        write_batch_input(a, &inputs.join("cosched-input.jsonl"))?;
    }
    let bench = Bench {
        args: a,
        binary,
        repository,
        inputs,
        outputs,
        payloads: Arc::new(payloads),
        base_config,
        instances: a
            .instances
            .map(std::sync::OnceLock::from)
            .unwrap_or_default(),
    };

    let capacity = match a.capacity {
        Some(c) => Capacity {
            sentences_per_s: c,
            measured: None,
        },
        None => {
            let (server, _) = bench.start(RunKind::Alone).await?;
            say(&format!(
                "capacity: closed loop at concurrency {} for {} s",
                a.capacity_concurrency, a.capacity_duration
            ));
            let measured = measure_capacity(&bench, &server).await;
            let stopped = server.stop().await;
            let measured = measured?;
            stopped?;
            say(&format!("  {}", measured.line()));
            Capacity {
                sentences_per_s: measured.throughput_rps,
                measured: Some(measured),
            }
        }
    };
    let online_rate = a.online_fraction * capacity.sentences_per_s;
    let scheduled = online_rate * (a.warmup + a.duration);
    if scheduled > MAX_SCHEDULED {
        bail!("the online load would schedule more than {MAX_SCHEDULED} requests");
    }
    let mut runs = Vec::with_capacity(a.runs.len());
    for &kind in &a.runs {
        let run = one_run(&bench, kind, capacity.sentences_per_s, online_rate)
            .await
            .with_context(|| format!("run '{}'", run_name(kind)))?;
        say(&run_lines(&run, a.slo_ms)
            .trim_end()
            .replace('\n', "\n[cosched] "));
        runs.push(run);
    }
    let controller = runs.iter().find(|r| r.kind == RunKind::Controller);
    let report = CoschedReport {
        model: a.model,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        slo_ms: a.slo_ms,
        slo_via: a.slo_via,
        model_parameters: a.model_parameters.clone(),
        online_fraction: a.online_fraction,
        arrivals: a.arrivals,
        window_s: a.window,
        duration_s: a.duration,
        warmup_s: a.warmup,
        batch_sentences: a.batch_sentences,
        command: a.command.clone(),
        inference_job_concurrency: a.inference_job_concurrency,
        mean_sentence_bytes,
        instances: bench.instances.get().copied(),
        capacity,
        controller_within_slo_every_window: controller.map(|r| r.within_slo_every_window),
        controller_utilisation: controller.and_then(|r| r.batch.as_ref().map(|b| b.utilisation)),
        target_utilisation: TARGET_UTILISATION,
        runs,
    };
    drop(bench);
    scratch
        .close()
        .context("cannot remove the scratch folder")?;
    Ok(report)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn failed_text(failed: &BTreeMap<String, u64>) -> String {
    if failed.is_empty() {
        "none".into()
    } else {
        failed
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

/// The text of one run.
pub fn run_lines(r: &RunReport, slo_ms: u64) -> String {
    let mut s = format!(
        "run {:<10} {}{}\n",
        run_name(r.kind),
        r.kind.label(),
        if r.serve_flags.iter().any(|f| f == "--latency-slo") {
            " [objective via serve --latency-slo]"
        } else if r.objective_set {
            " [objective via parameters.latency_slo_p99_ms]"
        } else {
            ""
        }
    );
    s.push_str(&format!(
        "  online   offered {:.1}/s  achieved {:.1}/s  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  failed: {}  send-lag p99 {} µs\n",
        r.online.offered_rate,
        r.online.achieved_rate,
        r.online.latency_us.p50_us as f64 / 1000.0,
        r.online.latency_us.p99_us as f64 / 1000.0,
        r.online.latency_us.max_us as f64 / 1000.0,
        failed_text(&r.online.failed),
        r.online.send_lag_us.p99_us
    ));
    for w in &r.windows {
        let controller = w.controller.as_ref().map_or_else(String::new, |c| {
            format!(
                "  controller: limit {}/{} ({} per batch) in flight {} window p99 {:.1} ms ({} requests) {}{}: {}",
                c.background_limit,
                c.background_max,
                c.background_batch_rows,
                c.background_in_flight,
                c.online_p99_ms,
                c.window_requests,
                c.decision,
                if c.at_risk { " AT RISK" } else { "" },
                c.reason
            )
        });
        s.push_str(&format!(
            "  [{:>5.0}-{:>5.0} s] online {:>7.1}/s  p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  failed {}  p99 ≤ {slo_ms} ms: {:<3}  batch {:>7}/s  utilisation {}{}\n",
            w.from_s,
            w.to_s,
            w.achieved_rate,
            w.latency_us.p50_us as f64 / 1000.0,
            w.latency_us.p99_us as f64 / 1000.0,
            w.latency_us.max_us as f64 / 1000.0,
            failed_text(&w.failed),
            yes(w.within_slo),
            opt(w.batch_sentences_per_s, 1),
            opt(w.utilisation, 2),
            controller
        ));
    }
    s.push_str(&format!(
        "  online p99 within {slo_ms} ms in every window: {}\n",
        yes(r.within_slo_every_window)
    ));
    if let Some(b) = &r.batch {
        s.push_str(&format!(
            "  batch    job {} ({} → {}; at start: {}): {} → {} of {} lines, {:.1} sentences/s, utilisation {:.2}\n",
            b.job.id,
            b.job.state_at_start,
            b.job.state_at_end,
            if b.job.reason_at_start.is_empty() { "-" } else { &b.job.reason_at_start },
            b.done_at_start,
            b.done_at_end,
            b.lines,
            b.sentences_per_s,
            b.utilisation
        ));
    }
    if let Some(c) = &r.command {
        s.push_str(&format!(
            "  command  job {} ({} → {}{})\n",
            c.id,
            c.state_at_start,
            c.state_at_end,
            if c.reason_at_start.is_empty() {
                String::new()
            } else {
                format!("; at start: {}", c.reason_at_start)
            }
        ));
    }
    if let (Some(g), Some(k)) = (r.controller_grows, r.controller_shrinks) {
        s.push_str(&format!(
            "  controller: {g} grows and {k} shrinks of the limit over the measured window\n"
        ));
    }
    if r.objective_set && !r.controller_seen {
        s.push_str(
            "  controller: none in the model's statistics (no objective reached the server)\n",
        );
    }
    s.push_str(&format!(
        "  server   inferences {} (online + batch)  avg batch {}  execute busy {}",
        r.server.inferences,
        opt(r.server.average_batch, 2),
        opt(r.server.execute_busy, 2)
    ));
    if let Some(c) = &r.cpu {
        s.push_str(&format!(
            "  cpu cores: server {} others {} (the command job is among others) machine busy {}",
            opt(c.server_cores, 2),
            opt(c.others_cores, 2),
            opt(c.machine_busy_cores, 2)
        ));
    }
    s.push('\n');
    s
}

impl CoschedReport {
    pub fn text(&self) -> String {
        let mut s = format!(
            "cosched: model {} ({} instance(s) in every run) on {} cores, objective p99 ≤ {} ms, online at {:.2} × capacity ({:?} arrivals), {} s measured + {} s warm-up per run, windows of {} s, batch job of {} lines, command `{}`\n",
            self.model.name(),
            self.instances.map_or("?".to_string(), |n| n.to_string()),
            self.cores,
            self.slo_ms,
            self.online_fraction,
            self.arrivals,
            self.duration_s,
            self.warmup_s,
            self.window_s,
            self.batch_sentences,
            self.command
        );
        match &self.capacity.measured {
            Some(m) => s.push_str(&format!(
                "capacity {:.1} sentences/s (closed loop c={}, p99 {:.1} ms, mean sentence {:.1} bytes)\n",
                self.capacity.sentences_per_s,
                m.concurrency.unwrap_or(0),
                m.latency_us.p99_us as f64 / 1000.0,
                self.mean_sentence_bytes
            )),
            None => s.push_str(&format!(
                "capacity {:.1} sentences/s (given)\n",
                self.capacity.sentences_per_s
            )),
        }
        for r in &self.runs {
            s.push_str(&run_lines(r, self.slo_ms));
        }
        if let Some(within) = self.controller_within_slo_every_window {
            s.push_str(&format!(
                "targets (controller run): online p99 ≤ {} ms in every window: {}; utilisation {} (target ≥ {}): {}\n",
                self.slo_ms,
                if within { "met" } else { "NOT met" },
                opt(self.controller_utilisation, 2),
                self.target_utilisation,
                if self.controller_utilisation.is_some_and(|u| u >= self.target_utilisation) {
                    "met"
                } else {
                    "NOT met"
                }
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> CoschedArgs {
        let cli = super::super::args::Cli::try_parse_from(
            ["veraltheim-load", "cosched"]
                .into_iter()
                .chain(args.iter().copied()),
        )
        .unwrap();
        match cli.command {
            super::super::args::Command::Cosched(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_issue_s_setting() {
        let a = parse(&["--model-dir", "m", "--onnx", "m.onnx"]);
        assert_eq!(a.slo_ms, 100);
        assert_eq!(a.online_fraction, 0.5);
        assert_eq!(a.duration, 60.0);
        assert_eq!(a.window, 10.0);
        assert_eq!(a.batch_sentences, 100_000);
        assert_eq!(a.capacity_concurrency, 64);
        assert_eq!(
            a.runs,
            vec![RunKind::Alone, RunKind::Strict, RunKind::Controller]
        );
        assert_eq!(a.slo_via, SloVia::Parameter);
        validate(&a).unwrap();
    }

    #[test]
    fn bad_flags_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["--model", "minilm"], "--model-dir"),
            (&["--model", "cost", "--slo-ms", "0"], "--slo-ms"),
            (
                &["--model", "cost", "--online-fraction", "1"],
                "--online-fraction",
            ),
            (
                &["--model", "cost", "--online-fraction", "NaN"],
                "--online-fraction",
            ),
            (&["--model", "cost", "--duration", "0"], "--duration"),
            (&["--model", "cost", "--warmup=-1"], "--warmup"),
            (&["--model", "cost", "--window", "0"], "--window"),
            (
                &["--model", "cost", "--duration", "5", "--window", "10"],
                "--window",
            ),
            (
                &["--model", "cost", "--duration", "3600", "--window", "0.1"],
                "windows",
            ),
            (&["--model", "cost", "--capacity", "0"], "--capacity"),
            (
                &["--model", "cost", "--capacity-concurrency", "0"],
                "--capacity-concurrency",
            ),
            (
                &["--model", "cost", "--batch-sentences", "0"],
                "--batch-sentences",
            ),
            (&["--model", "cost", "--command", " "], "--command"),
            (
                &["--model", "cost", "--command-cpu-millis", "0"],
                "--command-cpu-millis",
            ),
            (
                &["--model", "cost", "--inference-job-concurrency", "0"],
                "--inference-job-concurrency",
            ),
            (&["--model", "cost", "--runs", "alone,alone"], "twice"),
            (&["--model", "cost", "--channels", "0"], "--channels"),
            (
                &["--model", "cost", "--max-outstanding", "0"],
                "--max-outstanding",
            ),
            (
                &["--model", "cost", "--request-timeout", "0"],
                "--request-timeout",
            ),
        ];
        for (args, flag) in cases {
            let e = validate(&parse(args)).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        // An unknown run is refused by the parser itself.
        assert!(
            super::super::args::Cli::try_parse_from([
                "veraltheim-load",
                "cosched",
                "--runs",
                "sometimes"
            ])
            .is_err()
        );
    }

    #[test]
    fn windows_cover_the_duration() {
        let s = Duration::from_secs;
        assert_eq!(windows(s(60), s(10)), 6);
        assert_eq!(windows(s(65), s(10)), 7);
        assert_eq!(windows(s(10), s(10)), 1);
        assert_eq!(
            windows(Duration::from_secs_f64(0.6), Duration::from_secs_f64(0.2)),
            3
        );
        assert_eq!(window_of(s(0), s(10), 6), 0);
        assert_eq!(window_of(s(19), s(10), 6), 1);
        // A due time at the very end belongs to the last window.
        assert_eq!(window_of(s(60), s(10), 6), 5);
    }

    #[test]
    fn arrivals_follow_the_rate() {
        let fixed: Vec<Duration> =
            Arrival::new(4.0, Arrivals::Fixed, 1, Duration::from_secs(1)).collect();
        assert_eq!(
            fixed,
            [0, 250, 500, 750].map(Duration::from_millis).to_vec()
        );
        // Poisson at 1000/s for 20 s: about 20 000 arrivals (±5% is > 7 standard deviations),
        // increasing, all within the span.
        let p: Vec<Duration> =
            Arrival::new(1000.0, Arrivals::Poisson, 3, Duration::from_secs(20)).collect();
        assert!((19_000..=21_000).contains(&p.len()), "{}", p.len());
        assert!(p.windows(2).all(|w| w[0] <= w[1]));
        assert!(*p.last().unwrap() < Duration::from_secs(20));
        // The gaps vary (not a fixed interval): some far shorter, some far longer than the mean.
        let gaps: Vec<f64> = p.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        assert!(gaps.iter().any(|g| *g < 0.0002) && gaps.iter().any(|g| *g > 0.003));
    }

    #[test]
    fn the_controller_state_is_taken_from_the_statistics() {
        let s = ControllerSample::from(v1::LatencyObjective {
            slo_p99_ms: 100,
            window_requests: 420,
            online_p99_us: 42_500,
            background_limit: 12,
            background_max: 64,
            background_in_flight: 7,
            decision: "shrink".into(),
            reason: "p99 105 ms > 100 ms".into(),
            at_risk: true,
            grows: 30,
            shrinks: 4,
            background_batch_rows: 5,
        });
        assert_eq!(s.online_p99_ms, 42.5);
        assert_eq!((s.background_limit, s.background_in_flight), (12, 7));
        assert_eq!(s.background_batch_rows, 5);
        assert_eq!(s.decision, "shrink");
        assert!(s.at_risk);
    }

    #[test]
    fn the_config_has_two_priority_levels_and_the_objective_where_asked() {
        let a = parse(&["--model", "cost"]);
        let c = model_config(&a, None).unwrap();
        assert_eq!(c["dynamic_batching"]["priority_levels"], 2);
        assert_eq!(c["dynamic_batching"]["default_priority_level"], 1);
        let cfg = veraltheim_models::ModelConfig::from_json(&c.to_string()).unwrap();
        assert_eq!(cfg.name, "cost-stand-in");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cost-stand-in")).unwrap();
        let bench = Bench {
            args: &a,
            binary: PathBuf::new(),
            repository: dir.path().to_path_buf(),
            inputs: PathBuf::from("/in"),
            outputs: PathBuf::from("/out"),
            payloads: Arc::new(Vec::new()),
            base_config: c,
            instances: std::sync::OnceLock::new(),
        };
        let read = || -> serde_json::Value {
            serde_json::from_slice(
                &std::fs::read(dir.path().join("cost-stand-in/config.json")).unwrap(),
            )
            .unwrap()
        };
        bench.write_config(RunKind::Strict).unwrap();
        assert!(read()["parameters"].get("latency_slo_p99_ms").is_none());
        assert!(read().get("instance_group").is_none(), "not pinned yet");
        bench.instances.set(2).unwrap();
        bench.write_config(RunKind::Controller).unwrap();
        assert_eq!(
            read()["parameters"]["latency_slo_p99_ms"]["string_value"],
            "100"
        );
        assert_eq!(
            read()["instance_group"],
            json!([{ "count": 2, "kind": "KIND_CPU" }]),
            "pinned once known"
        );
        assert!(
            veraltheim_models::ModelConfig::from_json(&read().to_string()).is_ok(),
            "the pinned config loads"
        );
        assert!(
            !bench
                .serve_flags(RunKind::Controller)
                .contains(&"--latency-slo".to_string())
        );
        let a = parse(&["--model", "cost", "--slo-via", "flag", "--slo-ms", "250"]);
        let bench = Bench { args: &a, ..bench };
        let flags = bench.serve_flags(RunKind::Controller);
        let at = flags.iter().position(|f| f == "--latency-slo").unwrap();
        assert_eq!(flags[at + 1], "cost-stand-in=250");
        assert!(
            !bench
                .serve_flags(RunKind::Strict)
                .contains(&"--latency-slo".to_string())
        );
    }

    #[test]
    fn batch_lines_fit_the_model() {
        let line: serde_json::Value =
            serde_json::from_str(&batch_line(CoschedModel::Minilm, "a \"b\"", 0)).unwrap();
        assert_eq!(line["text"], "a \"b\"");
        let line: serde_json::Value =
            serde_json::from_str(&batch_line(CoschedModel::Cost, "ignored", 3)).unwrap();
        assert_eq!(
            line["inputs"]["INPUT0"][0].as_array().unwrap().len(),
            COST_WIDTH
        );
    }

    #[test]
    fn the_command_job_ends_by_itself() {
        let a = parse(&["--model", "cost", "--duration", "20", "--warmup", "2"]);
        let spec = command_spec(&a, RunKind::Strict);
        let Some(v1::job_spec::Kind::Command(c)) = spec.kind else {
            panic!()
        };
        assert_eq!(c.command[0], "timeout");
        assert_eq!(c.command[1], (22 + COMMAND_TIMEOUT_SLACK_S).to_string());
        assert_eq!(&c.command[2..], ["sh", "-c", "while :; do :; done"]);
        assert_eq!(spec.resources.unwrap().cpu_millis, 1000);
    }
}
