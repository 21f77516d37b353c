//! The `text` benchmark: a sentence embedder (all-MiniLM-L6-v2) served by the real coordinator
//! against the same model called in-process, against the same server with batching off, and
//! against the hardware's limit.
//!
//! 0. Sentences: by default `--sentences` (1000) generated sentences of mixed lengths
//!    ([`sentences`](super::sentences::sentences), seeded by `--seed`); with `--sentences-file`,
//!    the first `--sentences` non-empty `items[].text` of that JSON file instead. Each
//!    sentence's tokens are counted with the model folder's own tokenizer (`tokenizer.json`,
//!    truncated at the folder's token limit, special tokens included, as the served model
//!    counts them); the report gives their mean, min, p10/p50/p90 and max.
//! 1. A scratch model repository is written with `import_sentence_transformers` (ONNX Runtime
//!    from `--onnx`; with `--candle`, a candle copy too; with `--int8`, the export quantised
//!    to int8 as `minilm-int8`, measured like the others against the same FP32 ceiling).
//! 2. The limit ([`ceiling`](super::ceiling)), with no server running (measured once before the
//!    runs and once after them; the better GEMM run sets the ceiling, so a run on a busy host
//!    does not lower the limit and flatter the ratios): the model's FLOPs per
//!    token from the folder's `config.json`, and an FP32 GEMM benchmark at the encoder's shapes
//!    for `--gemm-tokens` rows (default `--max-batch-size` × the mean tokens per sentence rounded
//!    up), `--gemm-duration` seconds per shape, on `--intra-op-threads` × `--instances` threads
//!    (at most the cores; all cores when `--intra-op-threads` is 0). Ceiling: sentences/s = best GEMM rate ÷ (linear FLOPs per token × mean
//!    tokens per sentence), tokens/s = best GEMM rate ÷ linear FLOPs per token.
//! 3. In-process: `backend::instantiate` (the load's sweep included) then `Model::execute` on
//!    TEXT batches of 1, 8, 32, 64 sentences from as many threads at once as the model has
//!    instances (the server runs that many batches at once), but no more than `--concurrency`
//!    (one at concurrency 1, the batch-1 latency's baseline) → sentences/s per batch size; the
//!    best one is the in-process ceiling.
//! 4. Served: `veraltheim serve --model-repository <scratch> --load-model <model>`, closed loop
//!    at `--concurrency` with one sentence per KServe `ModelInfer` (TEXT, BYTES, `[1,1]`); each
//!    client goes through the sentences (the client's k-th call sends sentence
//!    `(c + k × concurrency) % n`). Tokens/s served = Σ over the sentences of (successes in the
//!    window × its tokens) ÷ window, so the mean tokens per served request is that of what was
//!    actually sent. A `cpu` line says where the cores went over the window: the coordinator by
//!    thread name (the execution pool, where the model computes, against the runtime), the load
//!    generator, and the rest of the machine.
//! 5. The model is reloaded through v1 `LoadModel` with `{"dynamic_batching": null}`; the
//!    server's inference/execution counts over the window must then be 1:1; measured again.
//! 6. Ratios: served/in-process best (target ≥ 0.9), batched/unbatched (target ≥ 2), and
//!    served (batched) ÷ ceiling, in sentences/s and in tokens/s (issue 19's target:
//!    ≥ [`TARGET_VS_CEILING`]); the in-process best ÷ ceiling too.
//! 7. Where an ONNX model's time goes ([`veraltheim_models::onnx::profile`]), the server gone:
//!    ONNX Runtime's profiler over [`PROFILE_RUNS`] runs of one batch at the served batches'
//!    mean shape (average batch rows × the mean tokens per request, rounded up), on the
//!    intra-op threads each served instance had. The report gives the kernel time per operator
//!    type, the products' share of the kernels and of the wall time, and their rate per thread
//!    against the ceiling's GEMM per thread, and the bound this puts on the backend: its rate
//!    with its products at the ceiling's GEMM rate and the rest of its time (normalisation,
//!    GELU, additions, reshapes, the executor) as measured, ÷ the ceiling. No FP32 backend can
//!    pass that bound at that shape; a quantised one's products are not bounded by the FP32
//!    GEMM, and the report says so instead.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;
use serde::Serialize;
use tokio::sync::oneshot;
use veraltheim_models::allocator::DeviceId;
use veraltheim_models::backend::{self, BackendOptions};
use veraltheim_models::onnx::profile::EncoderProfile;
use veraltheim_models::repository::{
    ImportBackend, ImportOptions, ImportQuantize, Repository, import_sentence_transformers,
};
use veraltheim_models::text::{TextTokenizer, max_seq_length_from_dir};
use veraltheim_models::{Model, Tensor};
use veraltheim_proto::inference::{self as pb, model_infer_request::InferInputTensor};
use veraltheim_proto::v1::{self, model_service_client::ModelServiceClient};

use super::args::{LoadOpts, MAX_BATCH, Shape, compute_plan};
use super::ceiling::{self, Ceiling, ModelFlops};
use super::client::run_load_with;
use super::compute::ComputePoint;
use super::coordinator::{Coordinator, ServerSide, default_binary};
use super::report::LoadReport;
use super::sentences::{TokenStats, sentences as generated_sentences, weighted_mean};

/// At most this many executions per batch size, besides the time bound.
const MAX_EXECUTIONS: u64 = 10_000_000;
/// Most sentences taken from the sentences file.
const MAX_SENTENCES: usize = 10_000;
/// Targets of issue 4.
pub const TARGET_VS_IN_PROCESS: f64 = 0.9;
pub const TARGET_VS_UNBATCHED: f64 = 2.0;
/// Target of issue 19: served sentences/s ÷ the FLOP ceiling of the same run.
pub const TARGET_VS_CEILING: f64 = 0.85;
/// The model `--int8` adds.
const INT8_MODEL: &str = "minilm-int8";
/// Most seconds of the GEMM benchmark per shape.
const MAX_GEMM_DURATION_S: f64 = 60.0;

#[derive(Args, Debug, Clone)]
pub struct TextArgs {
    /// The sentence-transformers folder (config.json, tokenizer.json, 1_Pooling/...).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// The ONNX export of the encoder (testdata/minilm_onnx.py writes one).
    #[arg(long)]
    pub onnx: PathBuf,
    /// Also import and measure the candle backend (the in-process baseline then needs this
    /// load generator built with the benches crate's `candle` feature).
    #[arg(long)]
    pub candle: bool,
    /// Also import the ONNX export quantised to int8 (`models import --quantize int8`) as
    /// `minilm-int8`, and measure it the same way.
    #[arg(long)]
    pub int8: bool,
    /// The coordinator binary (default: `veraltheim` next to this executable).
    #[arg(long)]
    pub veraltheim_bin: Option<PathBuf>,
    /// JSON file with `items[].text` (e.g. testdata/minilm-reference.json, the former default):
    /// its first --sentences non-empty texts are cycled instead of the generated mix.
    #[arg(long)]
    pub sentences_file: Option<PathBuf>,
    /// Sentences cycled: generated (mixed lengths), or the first of --sentences-file.
    #[arg(long, default_value_t = 1000)]
    pub sentences: usize,
    /// Seed of the generated sentences.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rows of the GEMM benchmark's products (tokens of a batch); 0: --max-batch-size × the
    /// mean tokens per sentence, rounded up.
    #[arg(long, default_value_t = 0)]
    pub gemm_tokens: usize,
    /// Seconds of the GEMM benchmark per shape (three shapes).
    #[arg(long, default_value_t = 1.0)]
    pub gemm_duration: f64,
    /// Closed-loop clients, one sentence per request.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds of each served run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up seconds of each served run.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    #[arg(long, default_value_t = 16)]
    pub clients_per_channel: usize,
    #[arg(long, default_value_t = 30.0)]
    pub request_timeout: f64,
    /// In-process batch sizes (sentences per `execute`).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batch_sizes: Vec<usize>,
    /// Seconds of in-process measurement per batch size.
    #[arg(long, default_value_t = 3.0)]
    pub compute_duration: f64,
    /// `max_batch_size` written into the imported model's config.
    #[arg(long, default_value_t = 64)]
    pub max_batch_size: u32,
    /// ONNX Runtime intra-op threads, of the in-process model and of the server's
    /// (`--onnx-intra-op-threads`); 0: ONNX Runtime's default (one per core).
    #[arg(long, default_value_t = 0)]
    pub intra_op_threads: usize,
    /// Instances of the served model (`instance_group` count, one session each): batches that
    /// run at once.
    #[arg(long, default_value_t = 1)]
    pub instances: u32,
    /// Passed to `veraltheim serve --execution-threads` (0 = its default).
    #[arg(long, default_value_t = 0)]
    pub execution_threads: usize,
    /// How the served runs send their sentences: `grpc` (KServe ModelInfer), `http` (KServe
    /// REST, JSON tensors) or `http-binary` (REST with the binary-data extension).
    #[arg(long, value_enum, default_value = "grpc")]
    pub protocol: super::http::Protocol,
    /// Written into the imported model's config as its `max_padding_ratio` parameter (the
    /// batcher's bound on padded ÷ real tokens; a large value batches regardless of length).
    #[arg(long)]
    pub max_padding_ratio: Option<f64>,
    /// Written into the imported model's config as its `max_passed_over` parameter (how many
    /// batches may leave without a request before it joins one whatever its length).
    #[arg(long)]
    pub max_passed_over: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One served closed-loop run and what the server says it did over the window.
#[derive(Clone, Debug, Serialize)]
pub struct ServedRun {
    pub load: LoadReport,
    pub server: ServerSide,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendReport {
    pub backend: &'static str,
    pub model: String,
    pub in_process: Vec<ComputePoint>,
    pub best_batch: usize,
    pub best_sentences_per_s: f64,
    pub batched: ServedRun,
    pub unbatched: ServedRun,
    /// The reloaded config has no `dynamic_batching` and the window ran one request per batch.
    pub batching_off_verified: bool,
    /// The `config_json` of the batching-off reload (the short override, or the served config
    /// with `dynamic_batching` null when the server refused the short one).
    pub batching_off_override: String,
    pub served_vs_in_process: f64,
    pub batched_vs_unbatched: f64,
    /// Mean tokens per successful request of the batched run (what was actually sent).
    pub served_mean_tokens: f64,
    /// Tokens/s of the batched run.
    pub served_tokens_per_s: f64,
    /// Batched sentences/s ÷ the ceiling's sentences/s.
    pub served_vs_ceiling: f64,
    /// Batched tokens/s ÷ the ceiling's tokens/s (GEMM rate ÷ FLOPs per token).
    pub served_tokens_vs_ceiling: f64,
    /// The in-process best sentences/s ÷ the ceiling's sentences/s.
    pub in_process_vs_ceiling: f64,
    /// ONNX Runtime's profile of the model at the served batches' mean shape (ONNX models).
    pub profile: Option<ProfileReport>,
}

/// Runs of the encoder's profile.
const PROFILE_RUNS: u32 = 20;

/// Where an ONNX model's time goes, and what that leaves of the ceiling.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileReport {
    pub profile: EncoderProfile,
    /// The products' rate, per thread: the linear layers' FLOPs of the profiled runs ÷ the
    /// products' kernel time ÷ the session's threads (attention's products, a fraction of a
    /// percent of the FLOPs at these lengths, are in the time but not the FLOPs).
    pub matmul_gflops_per_thread: f64,
    /// The ceiling's GEMM rate per thread, to compare with.
    pub gemm_gflops_per_thread: f64,
    /// The most of the ceiling this backend can reach at this shape: its rate if its products
    /// ran at the ceiling's GEMM rate and the rest of its wall time stayed as measured,
    /// ÷ the ceiling. `None` when its products already run faster than the FP32 GEMM
    /// (quantised): the FP32 ceiling is not their limit.
    pub bound_vs_ceiling: Option<f64>,
}

impl ProfileReport {
    fn new(profile: EncoderProfile, ceiling: &Ceiling) -> ProfileReport {
        // 0 is ONNX Runtime's default: a thread per core.
        let threads = match profile.intra_op_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        } as f64;
        let flops = ceiling.flops.linear_per_token
            * (profile.rows * profile.seq) as f64
            * f64::from(profile.runs);
        let matmul_s = profile.matmul_micros() as f64 / 1e6;
        let other_s = profile.wall_micros.saturating_sub(profile.matmul_micros()) as f64 / 1e6;
        let gemm_per_thread = ceiling.gemm.best_gflops / ceiling.gemm.threads.max(1) as f64;
        let matmul_per_thread = if matmul_s > 0.0 {
            flops / matmul_s / 1e9 / threads
        } else {
            0.0
        };
        // The products' time at the ceiling's rate, on the session's threads.
        let at_ceiling_s = flops / (gemm_per_thread * threads * 1e9);
        let bound_vs_ceiling = (matmul_per_thread <= gemm_per_thread * QUANTISED_MARGIN
            && at_ceiling_s > 0.0)
            .then(|| at_ceiling_s / (at_ceiling_s + other_s));
        ProfileReport {
            matmul_gflops_per_thread: matmul_per_thread,
            gemm_gflops_per_thread: gemm_per_thread,
            bound_vs_ceiling,
            profile,
        }
    }

    fn line(&self, model: &str) -> String {
        let p = &self.profile;
        let kernels = p.kernel_micros().max(1) as f64;
        let top: Vec<String> = p
            .ops
            .iter()
            .take(6)
            .map(|o| format!("{} {:.1}%", o.op, 100.0 * o.micros as f64 / kernels))
            .collect();
        let bound = match self.bound_vs_ceiling {
            Some(b) => format!("with them at its rate, at most {b:.3} of the ceiling"),
            None => "faster than the FP32 GEMM: the ceiling does not bound them".to_string(),
        };
        format!(
            "profile    {:<14} ONNX Runtime at {} × {} tokens, {} thread(s), {} runs: {}; products {:.1}% of the kernels, {:.1}% of the wall time, {:.1} GFLOP/s per thread (the ceiling's GEMM {:.1}); {bound}\n",
            model,
            p.rows,
            p.seq,
            p.intra_op_threads,
            p.runs,
            top.join(", "),
            100.0 * p.matmul_share_of_kernels(),
            100.0 * p.matmul_share_of_wall(),
            self.matmul_gflops_per_thread,
            self.gemm_gflops_per_thread,
        )
    }
}

/// Products faster than this × the FP32 GEMM per thread are taken as quantised.
const QUANTISED_MARGIN: f64 = 1.25;

/// ONNX Runtime's profile of the repository model `name` (its encoder) at `rows × seq`.
fn profile(
    repository: &Path,
    name: &str,
    rows: usize,
    seq: usize,
    intra_op_threads: usize,
) -> anyhow::Result<EncoderProfile> {
    let repo_model = Repository::new(repository).model(name)?;
    let dir = repo_model.version_dir();
    let scratch = tempfile::tempdir().context("a scratch folder for the profile")?;
    let options = veraltheim_models::onnx::OnnxOptions {
        library: onnxruntime_library(),
        intra_op_threads,
        ..Default::default()
    };
    Ok(veraltheim_models::onnx::profile::profile_encoder(
        &repo_model.config,
        &dir,
        &options,
        rows,
        seq,
        PROFILE_RUNS,
        scratch.path(),
    )?)
}

impl BackendReport {
    /// Sets the ratios to `ceiling`.
    fn against(&mut self, ceiling: &Ceiling) {
        self.served_vs_ceiling = ratio(self.batched.load.throughput_rps, ceiling.sentences_per_s);
        self.served_tokens_vs_ceiling = ratio(self.served_tokens_per_s, ceiling.tokens_per_s);
        self.in_process_vs_ceiling = ratio(self.best_sentences_per_s, ceiling.sentences_per_s);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TextReport {
    /// The GEMM's best rate before the in-process and served runs, and after them; the ceiling
    /// is the better one's.
    pub gemm_runs_best_gflops: [f64; 2],
    pub cores: usize,
    /// How the served runs sent their requests.
    pub protocol: super::http::Protocol,
    /// `generated (seed N)` or the sentences file.
    pub sentence_source: String,
    pub sentences: usize,
    pub mean_sentence_bytes: f64,
    /// Tokens per sentence, counted with the model's tokenizer.
    pub tokens: TokenStats,
    /// The hardware limit: GEMM rate, FLOPs per token, ceiling.
    pub ceiling: Ceiling,
    pub concurrency: usize,
    /// Served instances (`instance_group` count).
    pub instances: u32,
    /// ONNX Runtime intra-op threads (0: its default, one per core).
    pub intra_op_threads: usize,
    pub backends: Vec<BackendReport>,
}

/// The first `n` non-empty `items[].text` of the reference file.
pub fn read_sentences(path: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    if n == 0 || n > MAX_SENTENCES {
        bail!("--sentences must be 1..={MAX_SENTENCES}");
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let items = v
        .get("items")
        .and_then(|i| i.as_array())
        .with_context(|| format!("{} has no items[]", path.display()))?;
    let out: Vec<String> = items
        .iter()
        .filter_map(|i| i.get("text").and_then(|t| t.as_str()))
        .filter(|t| !t.trim().is_empty())
        .take(n)
        .map(str::to_string)
        .collect();
    if out.is_empty() {
        bail!("{} has no non-empty items[].text", path.display());
    }
    Ok(out)
}

/// The sentences of the run: from `--sentences-file`, else generated; and where they came from.
pub fn run_sentences(args: &TextArgs) -> anyhow::Result<(Vec<String>, String)> {
    match &args.sentences_file {
        Some(path) => Ok((
            read_sentences(path, args.sentences)?,
            path.display().to_string(),
        )),
        None => {
            if args.sentences == 0 || args.sentences > MAX_SENTENCES {
                bail!("--sentences must be 1..={MAX_SENTENCES}");
            }
            Ok((
                generated_sentences(args.sentences, args.seed),
                format!("generated (seed {})", args.seed),
            ))
        }
    }
}

/// Each sentence's tokens with the tokenizer of the sentence-transformers folder `model_dir`
/// (its `tokenizer.json`, truncated at the folder's token limit), as the served model counts.
pub fn count_tokens(model_dir: &Path, sentences: &[String]) -> anyhow::Result<Vec<usize>> {
    let limit = max_seq_length_from_dir(model_dir).map_err(anyhow::Error::msg)?;
    let tokenizer = TextTokenizer::from_file(&model_dir.join("tokenizer.json"), limit)
        .map_err(anyhow::Error::msg)?;
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    tokenizer
        .count_tokens(&texts)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("counting tokens with {}", model_dir.display()))
}

/// A TEXT batch of `batch` sentences, `[batch, 1]`, cycling `sentences` from `offset`.
pub fn text_batch(sentences: &[String], batch: usize, offset: usize) -> anyhow::Result<Tensor> {
    let elements: Vec<Bytes> = (0..batch)
        .map(|i| Bytes::from(sentences[(offset + i) % sentences.len()].clone()))
        .collect();
    Ok(Tensor::from_elements("TEXT", &[batch as i64, 1], elements)?)
}

/// One sentence as KServe sends it with binary data: BYTES `[1,1]`, raw contents =
/// 4-byte little-endian length + UTF-8.
pub fn text_request(model: &str, sentence: &str) -> pb::ModelInferRequest {
    let mut raw = Vec::with_capacity(4 + sentence.len());
    raw.extend_from_slice(&(sentence.len() as u32).to_le_bytes());
    raw.extend_from_slice(sentence.as_bytes());
    pb::ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![InferInputTensor {
            name: "TEXT".into(),
            datatype: "BYTES".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(raw)],
        ..Default::default()
    }
}

/// Both libraries' rates at one shape, as the report prints them.
fn rates(p: &ceiling::GemmPoint) -> String {
    let onnx = match &p.onnx_runtime_gflops {
        Ok(g) => format!("{g:.1}"),
        Err(e) => format!("not measured: {e}"),
    };
    format!(
        "{} {:.1}, {} {onnx}",
        ceiling::GEMM_CRATE,
        p.gemm_crate_gflops,
        ceiling::ONNX_RUNTIME
    )
}

fn onnxruntime_library() -> Option<PathBuf> {
    std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from)
}

/// The in-process ceiling of the repository model `name`.
fn in_process(
    repository: &Path,
    name: &str,
    sentences: &[String],
    batch_sizes: &[usize],
    per_size: Duration,
    intra_op_threads: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<ComputePoint>, usize)> {
    let repo_model = Repository::new(repository).model(name)?;
    let dir = repo_model.version_dir();
    let options = BackendOptions {
        onnxruntime_library: onnxruntime_library(),
        intra_op_threads,
        ..BackendOptions::default()
    };
    let model = backend::instantiate(repo_model.config, Some(&dir), DeviceId::Cpu, &options)?;
    // As many callers as the server runs batches at once: one per instance (the load's sweep
    // may have chosen two, and one caller would leave a session idle), but no more than the
    // served run's concurrency (at concurrency 1 one batch runs at a time, and a second caller
    // would slow the baseline that batch-1 latency is compared with).
    let callers = model.config().instance_count().min(concurrency).max(1);
    // The intra-op threads each instance runs on, as the load chose or was told (ONNX
    // Runtime's default as its count, so that the profile runs on as many and counts them).
    let threads = veraltheim_models::onnx::intra_op_threads_in_use(model.config())
        .unwrap_or(intra_op_threads);
    let mut points = Vec::with_capacity(batch_sizes.len());
    for &batch in batch_sizes {
        points.push(measure(
            model.as_ref(),
            sentences,
            batch,
            per_size,
            callers,
        )?);
    }
    Ok((points, threads))
}

/// `callers` threads each executing batches of `batch` sentences for `per_size`.
fn measure(
    model: &dyn Model,
    sentences: &[String],
    batch: usize,
    per_size: Duration,
    callers: usize,
) -> anyhow::Result<ComputePoint> {
    // Batches starting at each sentence, so that every batch size sees the same mix.
    let inputs: Vec<[Tensor; 1]> = (0..sentences.len())
        .map(|o| text_batch(sentences, batch, o).map(|t| [t]))
        .collect::<anyhow::Result<_>>()?;
    model.execute(&inputs[0])?;
    let start = Instant::now();
    let caller = |first: usize| -> anyhow::Result<u64> {
        let mut executions = 0u64;
        while executions < MAX_EXECUTIONS {
            let at = (first as u64 + executions * callers as u64) % inputs.len() as u64;
            std::hint::black_box(model.execute(&inputs[at as usize])?);
            executions += 1;
            if start.elapsed() >= per_size {
                break;
            }
        }
        Ok(executions)
    };
    let executions = std::thread::scope(|s| {
        let handles: Vec<_> = (0..callers).map(|c| s.spawn(move || caller(c))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an in-process caller panicked")))
            })
            .sum::<anyhow::Result<u64>>()
    })?;
    let secs = start.elapsed().as_secs_f64();
    Ok(ComputePoint {
        batch,
        executions,
        us_per_batch: secs * 1e6 * callers as f64 / executions as f64,
        items_per_s: (executions as usize * batch) as f64 / secs,
    })
}

/// A closed-loop run against the coordinator with the server's counters over the window.
async fn served(
    coordinator: &Coordinator,
    args: &TextArgs,
    model: &str,
    sentences: &[String],
) -> anyhow::Result<ServedRun> {
    let mut spec = LoadOpts {
        model: model.to_string(),
        shape: Shape(vec![1, 1]),
        concurrency: Some(args.concurrency),
        rate: None,
        duration: args.duration,
        warmup: args.warmup,
        clients_per_channel: args.clients_per_channel,
        channels: 4,
        max_outstanding: 1024,
        request_timeout: args.request_timeout,
    }
    .spec()
    .map_err(anyhow::Error::msg)?;
    spec.protocol = args.protocol;
    let payloads: Vec<pb::ModelInferRequest> =
        sentences.iter().map(|s| text_request(model, s)).collect();
    let addr = match args.protocol {
        super::http::Protocol::Grpc => coordinator.addr(),
        _ => coordinator.http_addr(),
    }
    .to_string();
    let (tx, rx) = oneshot::channel();
    let at_start = async {
        let _ = rx.await;
        coordinator.counts(model).await
    };
    let (load, before) = tokio::join!(
        run_load_with(
            "coordinator",
            &addr,
            &spec,
            payloads,
            coordinator.pid(),
            Some(tx)
        ),
        at_start
    );
    let load = load?;
    let before = before.context("ModelStatistics at the window's start")?;
    let after = coordinator
        .counts(model)
        .await
        .context("ModelStatistics at the window's end")?;
    let window = load.cpu.as_ref().map_or(load.window_s, |c| c.wall_s);
    Ok(ServedRun {
        server: after.since(&before, window),
        load,
    })
}

/// The override that turns batching off.
const BATCHING_OFF: &str = r#"{"dynamic_batching": null}"#;

/// Reloads `model` through v1 `LoadModel` with batching off; returns the config as served and
/// the override that was sent. `{"dynamic_batching": null}` alone is tried first; a server that
/// refuses it (an imported text model declares its inputs only once loaded, and the override is
/// validated against the folder's config) gets the served config with `dynamic_batching` null.
async fn reload_unbatched(
    coordinator: &Coordinator,
    model: &str,
) -> anyhow::Result<(String, String)> {
    let client = ModelServiceClient::new(coordinator.channel().await?);
    let load = |config_json: String| {
        let mut client = client.clone();
        async move {
            client
                .load_model(v1::LoadModelRequest {
                    name: model.to_string(),
                    config_json,
                })
                .await
        }
    };
    let (m, sent) = match load(BATCHING_OFF.to_string()).await {
        Ok(m) => (m.into_inner(), BATCHING_OFF.to_string()),
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            say(&format!(
                "  the server refused {BATCHING_OFF} ({}); sending the served config with dynamic_batching null",
                status.message()
            ));
            let served = client
                .clone()
                .get_model(v1::GetModelRequest {
                    name: model.to_string(),
                })
                .await
                .with_context(|| format!("GetModel {model}"))?
                .into_inner();
            let mut config: serde_json::Value = serde_json::from_str(&served.config_json)
                .with_context(|| format!("the served config of {model} is not JSON"))?;
            let map = config
                .as_object_mut()
                .with_context(|| format!("the served config of {model} is not an object"))?;
            map.insert("dynamic_batching".into(), serde_json::Value::Null);
            let full = config.to_string();
            let m = load(full.clone())
                .await
                .with_context(|| format!("LoadModel {model} with batching off"))?;
            (m.into_inner(), full)
        }
        Err(status) => {
            return Err(status).with_context(|| format!("LoadModel {model} with batching off"));
        }
    };
    if m.state != v1::ModelState::Ready as i32 {
        bail!("{model} is not READY after the reload: {}", m.reason);
    }
    Ok((m.config_json, sent))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn say(msg: &str) {
    eprintln!("[text] {msg}");
}

/// Sets the `instance_group` count in an imported model's `config.json`.
fn set_instances(model_dir: &Path, count: u32) -> anyhow::Result<()> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)?;
    config["instance_group"] = serde_json::json!([{ "count": count, "kind": "KIND_CPU" }]);
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// Sets a string parameter in an imported model's `config.json`.
fn set_parameter(model_dir: &Path, key: &str, value: &str) -> anyhow::Result<()> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)?;
    config["parameters"][key] = serde_json::json!({ "string_value": value });
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// Runs the whole benchmark.
pub async fn text(args: &TextArgs) -> anyhow::Result<TextReport> {
    let (batch_sizes, per_size) =
        compute_plan(&args.batch_sizes, args.compute_duration).map_err(anyhow::Error::msg)?;
    if args.max_batch_size == 0 || args.max_batch_size as usize > MAX_BATCH {
        bail!("--max-batch-size must be 1..={MAX_BATCH}");
    }
    if args.instances == 0 {
        bail!("--instances must be at least 1");
    }
    if !(args.gemm_duration > 0.0 && args.gemm_duration <= MAX_GEMM_DURATION_S) {
        bail!(
            "--gemm-duration must be > 0 and ≤ {MAX_GEMM_DURATION_S} seconds, got {}",
            args.gemm_duration
        );
    }
    let (sentences, sentence_source) = run_sentences(args)?;
    let flops = ModelFlops::from_dir(&args.model_dir)?;
    let token_counts = count_tokens(&args.model_dir, &sentences)?;
    let tokens = TokenStats::of(&token_counts).context("no sentence")?;
    say(&format!(
        "{} sentences ({sentence_source}): tokens per sentence mean {:.2}, min {}, p10 {}, p50 {}, p90 {}, max {}",
        tokens.sentences, tokens.mean, tokens.min, tokens.p10, tokens.p50, tokens.p90, tokens.max
    ));
    let binary = match &args.veraltheim_bin {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
    let scratch = tempfile::tempdir().context("cannot create the scratch repository")?;
    let repository = scratch.path().join("models");
    let mut plan = vec![(ImportBackend::OnnxRuntime, "minilm".to_string())];
    if args.candle {
        plan.push((ImportBackend::Candle, "minilm-candle".to_string()));
    }
    if args.int8 {
        plan.push((ImportBackend::OnnxRuntime, INT8_MODEL.to_string()));
    }
    for (b, name) in &plan {
        import_sentence_transformers(
            &args.model_dir,
            &repository,
            &ImportOptions {
                name: name.clone(),
                backend: *b,
                onnx: matches!(b, ImportBackend::OnnxRuntime).then(|| args.onnx.clone()),
                max_batch_size: args.max_batch_size,
                force: false,
                quantize: (name == INT8_MODEL).then_some(ImportQuantize::Int8),
                onnxruntime_library: None,
            },
        )?;
        if args.instances > 1 {
            set_instances(&repository.join(name), args.instances)?;
        }
        let parameters = [
            (
                "max_padding_ratio",
                args.max_padding_ratio.map(|r| r.to_string()),
            ),
            (
                "max_passed_over",
                args.max_passed_over.map(|p| p.to_string()),
            ),
        ];
        for (key, value) in parameters {
            if let Some(value) = value {
                set_parameter(&repository.join(name), key, &value)?;
            }
        }
    }

    // The limit first, with no server running.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The threads the served model computes on: intra-op threads × instances (all cores when
    // ONNX Runtime's default is asked for), never more than the cores.
    let gemm_threads = if args.intra_op_threads > 0 {
        (args.intra_op_threads * args.instances.max(1) as usize).min(cores)
    } else {
        cores
    };
    let gemm_tokens = if args.gemm_tokens > 0 {
        args.gemm_tokens
    } else {
        args.max_batch_size as usize * tokens.mean.ceil() as usize
    };
    say(&format!(
        "GEMM at {gemm_tokens} tokens on {gemm_threads} thread(s), {} s per shape",
        args.gemm_duration
    ));
    let measure_gemm = || {
        let flops = flops.clone();
        let per_shape = Duration::from_secs_f64(args.gemm_duration);
        async move {
            tokio::task::spawn_blocking(move || {
                let library = onnxruntime_library();
                ceiling::measure(
                    &flops,
                    gemm_tokens,
                    gemm_threads,
                    per_shape,
                    library.as_deref(),
                )
            })
            .await
            .context("the GEMM benchmark panicked")?
        }
    };
    let gemm = measure_gemm().await?;
    for p in &gemm.shapes {
        say(&format!(
            "  {}×{} · {}×{}: {:.1} GFLOP/s ({} products, {}; {})",
            p.shape.m,
            p.shape.k,
            p.shape.k,
            p.shape.n,
            p.gflops,
            p.products,
            p.library,
            rates(p)
        ));
    }
    let first_gemm_gflops = gemm.best_gflops;
    let mut ceiling = Ceiling::new(gemm, flops.clone(), tokens.mean);
    say(&format!(
        "  best {:.1} GFLOP/s, layer mix {:.1} GFLOP/s; {:.2} MFLOP/token → ceiling {:.0} tokens/s, {:.1} sentences/s",
        ceiling.gemm.best_gflops,
        ceiling.gemm.layer_mix_gflops,
        ceiling.flops.linear_per_token / 1e6,
        ceiling.tokens_per_s,
        ceiling.sentences_per_s
    ));

    // In-process next, with no server running.
    let mut ceilings = Vec::with_capacity(plan.len());
    for (b, name) in &plan {
        say(&format!("in-process {name} ({})", b.name()));
        let (repo, name2, s2, sizes) = (
            repository.clone(),
            name.clone(),
            sentences.clone(),
            batch_sizes.clone(),
        );
        let (threads, concurrency) = (args.intra_op_threads, args.concurrency);
        let (points, chosen_threads) = tokio::task::spawn_blocking(move || {
            in_process(&repo, &name2, &s2, &sizes, per_size, threads, concurrency)
        })
        .await
        .context("the in-process run panicked")?
        .with_context(|| format!("in-process {name}"))?;
        for p in &points {
            say(&format!(
                "  batch {:>3}: {:>8.1} sentences/s ({:.0} µs/batch, {} executions)",
                p.batch, p.items_per_s, p.us_per_batch, p.executions
            ));
        }
        ceilings.push((points, chosen_threads));
    }

    let names: Vec<String> = plan.iter().map(|(_, n)| n.clone()).collect();
    say(&format!("starting {}", binary.display()));
    let extra = if args.intra_op_threads > 0 {
        vec![
            "--onnx-intra-op-threads".to_string(),
            args.intra_op_threads.to_string(),
        ]
    } else {
        Vec::new()
    };
    let coordinator = Coordinator::start_in(
        &binary,
        &names,
        args.execution_threads,
        None,
        Some(&repository),
        &extra,
    )
    .await?;
    let mut backends = Vec::with_capacity(plan.len());
    let mut threads_of = Vec::with_capacity(plan.len());
    for ((b, name), (points, chosen_threads)) in plan.iter().zip(ceilings) {
        threads_of.push(chosen_threads);
        say(&format!("served {name}, batching on"));
        let batched = served(&coordinator, args, name, &sentences).await?;
        say(&format!("  {}", batched.load.line()));
        say(&format!("reloading {name} with batching off"));
        let (config, override_sent) = reload_unbatched(&coordinator, name).await?;
        let config_off = serde_json::from_str::<serde_json::Value>(&config)
            .ok()
            .is_some_and(|c| c.get("dynamic_batching").is_none_or(|d| d.is_null()));
        say(&format!("served {name}, batching off"));
        let unbatched = served(&coordinator, args, name, &sentences).await?;
        say(&format!("  {}", unbatched.load.line()));
        let one_per_batch = unbatched.server.executions > 0
            && unbatched.server.inferences == unbatched.server.executions;
        let best = points
            .iter()
            .max_by(|a, b| a.items_per_s.total_cmp(&b.items_per_s))
            .context("no batch size")?;
        let served_mean_tokens =
            weighted_mean(&token_counts, &batched.load.payload_requests).unwrap_or(tokens.mean);
        let served_tokens_per_s = batched.load.throughput_rps * served_mean_tokens;
        let mut report = BackendReport {
            served_mean_tokens,
            served_tokens_per_s,
            served_vs_ceiling: 0.0,
            served_tokens_vs_ceiling: 0.0,
            in_process_vs_ceiling: 0.0,
            backend: b.name(),
            model: name.clone(),
            best_batch: best.batch,
            best_sentences_per_s: best.items_per_s,
            served_vs_in_process: ratio(batched.load.throughput_rps, best.items_per_s),
            batched_vs_unbatched: ratio(batched.load.throughput_rps, unbatched.load.throughput_rps),
            batching_off_verified: config_off && one_per_batch,
            batching_off_override: if override_sent == BATCHING_OFF {
                override_sent
            } else {
                "served config + {\"dynamic_batching\": null}".into()
            },
            in_process: points,
            batched,
            unbatched,
            profile: None,
        };
        report.against(&ceiling);
        backends.push(report);
    }
    let status = coordinator.stop().await?;
    if !status.success() {
        eprintln!("warning: the coordinator exited with {status} after SIGTERM");
    }
    // The GEMM again, the server gone: a limit measured while the host was busy would be too
    // low and flatter every ratio, so the better of the two runs is the ceiling.
    say("GEMM again, after the served runs");
    let again = measure_gemm().await?;
    let last_gemm_gflops = again.best_gflops;
    say(&format!("  best {last_gemm_gflops:.1} GFLOP/s"));
    if last_gemm_gflops > first_gemm_gflops {
        ceiling = Ceiling::new(again, flops, tokens.mean);
        for b in &mut backends {
            b.against(&ceiling);
        }
    }
    // ONNX Runtime's own account of each ONNX model's time, at the served batches' mean shape,
    // the server gone.
    for ((b, name), (report, threads)) in plan.iter().zip(backends.iter_mut().zip(threads_of)) {
        if !matches!(b, ImportBackend::OnnxRuntime) {
            continue;
        }
        let rows = report
            .batched
            .server
            .average_batch
            .unwrap_or(1.0)
            .round()
            .max(1.0) as usize;
        let seq = report.served_mean_tokens.ceil().max(1.0) as usize;
        say(&format!(
            "profiling {name}: {rows} × {seq} tokens, {threads} intra-op thread(s), {PROFILE_RUNS} runs"
        ));
        let (repo, name2) = (repository.clone(), name.clone());
        let profile =
            tokio::task::spawn_blocking(move || profile(&repo, &name2, rows, seq, threads))
                .await
                .context("the profile panicked")?
                .with_context(|| format!("profiling {name}"))?;
        report.profile = Some(ProfileReport::new(profile, &ceiling));
    }
    Ok(TextReport {
        gemm_runs_best_gflops: [first_gemm_gflops, last_gemm_gflops],
        cores,
        protocol: args.protocol,
        sentence_source,
        tokens,
        ceiling,
        mean_sentence_bytes: sentences.iter().map(String::len).sum::<usize>() as f64
            / sentences.len() as f64,
        sentences: sentences.len(),
        concurrency: args.concurrency,
        instances: args.instances,
        intra_op_threads: args.intra_op_threads,
        backends,
    })
}

/// Where the cores went during a served run: the load generator, the coordinator by thread name
/// (`veraltheim-exec`: the execution pool, where batches run; `tokio-rt-worker`: gRPC, the token
/// count on arrival and batching), and the rest of the machine. On a machine the client
/// shares, the served rate can reach the ceiling only in the share of the cores the model had.
fn cpu_line(model: &str, label: &str, c: &super::cpu::CpuUse, cores: usize) -> String {
    let mut threads: Vec<(&String, &f64)> = c
        .server_threads
        .iter()
        .filter(|(_, v)| **v >= 0.005)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(a.1));
    let threads = threads
        .iter()
        .map(|(name, v)| format!("{name} {v:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "cpu        {model:<14} {label:<9} of {cores} cores: server {} ({threads}), load generator {:.2}, others {}, machine busy {}\n",
        opt(c.server_cores, 2),
        c.client_cores,
        opt(c.others_cores, 2),
        opt(c.machine_busy_cores, 2),
    )
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn verdict(value: f64, target: f64) -> &'static str {
    if value >= target { "met" } else { "NOT met" }
}

impl TextReport {
    pub fn text(&self) -> String {
        let mut s = format!(
            "text: {} sentences, {} (mean {:.1} bytes) cycled, served over {:?}, concurrency {}, {} cores, {} instance(s), intra-op threads {}\n",
            self.sentences,
            self.sentence_source,
            self.mean_sentence_bytes,
            self.protocol,
            self.concurrency,
            self.cores,
            self.instances,
            self.intra_op_threads
        );
        let t = &self.tokens;
        s.push_str(&format!(
            "tokens     per sentence: mean {:.2}  min {}  p10 {}  p50 {}  p90 {}  max {}\n",
            t.mean, t.min, t.p10, t.p50, t.p90, t.max
        ));
        let c = &self.ceiling;
        for p in &c.gemm.shapes {
            s.push_str(&format!(
                "gemm       {}×{} · {}×{} (×{} per layer)  {:>7.1} GFLOP/s  ({} products, {} thread(s), {}; {})\n",
                p.shape.m,
                p.shape.k,
                p.shape.k,
                p.shape.n,
                p.per_layer,
                p.gflops,
                p.products,
                c.gemm.threads,
                p.library,
                rates(p)
            ));
        }
        s.push_str(&format!(
            "gemm       best {:.1} GFLOP/s  layer mix {:.1} GFLOP/s  (best before the runs {:.1}, after {:.1}: the ceiling takes the better)\n",
            c.gemm.best_gflops,
            c.gemm.layer_mix_gflops,
            self.gemm_runs_best_gflops[0],
            self.gemm_runs_best_gflops[1]
        ));
        s.push_str(&format!(
            "flops      linear {:.2} MFLOP/token (h {}, i {}, {} layers)  attention {:.3} MFLOP/token at the mean length (not in the ceiling)\n",
            c.flops.linear_per_token / 1e6,
            c.flops.hidden_size,
            c.flops.intermediate_size,
            c.flops.num_hidden_layers,
            c.attention_per_token_at_mean / 1e6
        ));
        s.push_str(&format!(
            "ceiling    {:.0} tokens/s  {:.1} sentences/s (best GEMM rate ÷ FLOPs per token ÷ {:.2} tokens per sentence)\n",
            c.tokens_per_s, c.sentences_per_s, t.mean
        ));
        for b in &self.backends {
            for p in &b.in_process {
                s.push_str(&format!(
                    "in-process {:<14} batch {:>3}  {:>9.1} sentences/s  {:>9.0} µs/batch\n",
                    b.model, p.batch, p.items_per_s, p.us_per_batch
                ));
            }
            for (label, r) in [("batched", &b.batched), ("unbatched", &b.unbatched)] {
                let errors: u64 = r.load.errors.values().sum();
                s.push_str(&format!(
                    "served     {:<14} {:<9} {:>9.1} sentences/s  p50 {} µs  p99 {} µs  errors {}  server avg batch {}  queue {} µs  execute busy {}  padded÷real {}\n",
                    b.model,
                    label,
                    r.load.throughput_rps,
                    r.load.latency_us.p50_us,
                    r.load.latency_us.p99_us,
                    errors,
                    opt(r.server.average_batch, 2),
                    opt(r.server.mean_queue_us, 0),
                    opt(r.server.execute_busy, 2),
                    opt(r.server.padded_per_real, 3),
                ));
                if let Some(c) = &r.load.cpu {
                    s.push_str(&cpu_line(&b.model, label, c, self.cores));
                }
            }
            s.push_str(&format!(
                "ratio      {:<14} served/in-process(best, batch {}) {:.3} (target ≥ {TARGET_VS_IN_PROCESS}: {})  batched/unbatched {:.3} (target ≥ {TARGET_VS_UNBATCHED}: {})  batching off verified: {} (config_json: {})\n",
                b.model,
                b.best_batch,
                b.served_vs_in_process,
                verdict(b.served_vs_in_process, TARGET_VS_IN_PROCESS),
                b.batched_vs_unbatched,
                verdict(b.batched_vs_unbatched, TARGET_VS_UNBATCHED),
                b.batching_off_verified,
                b.batching_off_override,
            ));
            s.push_str(&format!(
                "vs limit   {:<14} served {:.1} sentences/s = {:.0} tokens/s ({:.2} tokens/request): {:.3} of the ceiling (target ≥ {TARGET_VS_CEILING}: {}), tokens/s {:.3} of it; in-process best {:.3} of it\n",
                b.model,
                b.batched.load.throughput_rps,
                b.served_tokens_per_s,
                b.served_mean_tokens,
                b.served_vs_ceiling,
                verdict(b.served_vs_ceiling, TARGET_VS_CEILING),
                b.served_tokens_vs_ceiling,
                b.in_process_vs_ceiling,
            ));
            if let Some(p) = &b.profile {
                s.push_str(&p.line(&b.model));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_length_prefixed_utf8() {
        let r = text_request("minilm", "héllo");
        assert_eq!(r.inputs[0].shape, vec![1, 1]);
        assert_eq!(r.inputs[0].datatype, "BYTES");
        let raw = &r.raw_input_contents[0];
        assert_eq!(&raw[..4], &6u32.to_le_bytes());
        assert_eq!(&raw[4..], "héllo".as_bytes());
    }

    #[test]
    fn the_cpu_line_splits_the_server_by_thread_name_largest_first() {
        let c = super::super::cpu::CpuUse {
            wall_s: 10.0,
            machine_busy_cores: Some(1.99),
            steal_cores: Some(0.0),
            client_cores: 0.05,
            server_cores: Some(1.93),
            others_cores: Some(0.01),
            server_threads: [
                ("tokio-rt-worker".to_string(), 0.07),
                ("veraltheim-exec".to_string(), 1.86),
                ("store-committer".to_string(), 0.0),
            ]
            .into_iter()
            .collect(),
        };
        let line = cpu_line("minilm", "batched", &c, 2);
        assert!(
            line.contains(
                "of 2 cores: server 1.93 (veraltheim-exec 1.86, tokio-rt-worker 0.07), load generator 0.05, others 0.01, machine busy 1.99"
            ),
            "{line}"
        );
    }

    #[test]
    fn batches_cycle_sentences() {
        let s = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let t = text_batch(&s, 5, 1).unwrap();
        assert_eq!(t.shape(), vec![5, 1]);
        assert_eq!(t.batch_size(), 5);
    }

    /// A ceiling of `gflops` on `threads` threads for a model of 1 MFLOP per token.
    fn ceiling_of(gflops: f64, threads: usize) -> Ceiling {
        let gemm = ceiling::GemmReport {
            threads,
            tokens: 64,
            shapes: Vec::new(),
            best_gflops: gflops,
            layer_mix_gflops: gflops,
        };
        let flops = ModelFlops::from_config(&serde_json::json!({
            "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1
        }))
        .unwrap();
        let flops = ModelFlops {
            linear_per_token: 1e6,
            ..flops
        };
        Ceiling::new(gemm, flops, 10.0)
    }

    fn profile_of(matmul_us: u64, other_kernels_us: u64, wall_us: u64) -> EncoderProfile {
        use veraltheim_models::onnx::profile::OpTime;
        EncoderProfile {
            rows: 10,
            seq: 10,
            runs: 10,
            intra_op_threads: 1,
            wall_micros: wall_us,
            ops: vec![
                OpTime {
                    op: "MatMul".into(),
                    micros: matmul_us,
                    calls: 10,
                },
                OpTime {
                    op: "Add".into(),
                    micros: other_kernels_us,
                    calls: 10,
                },
            ],
        }
    }

    #[test]
    fn the_profile_bounds_an_fp32_backend_by_the_time_outside_its_products() {
        // 10 runs × 100 tokens × 1 MFLOP = 1 GFLOP of products. At 2 threads × 50 GFLOP/s the
        // ceiling's GEMM is 50 per thread: 20 ms on the profile's one thread.
        let ceiling = ceiling_of(100.0, 2);
        // Products took 25 ms (40 GFLOP/s), the run 30 ms: 5 ms elsewhere. With the products
        // at 20 ms, the bound is 20 / 25.
        let r = ProfileReport::new(profile_of(25_000, 3_000, 30_000), &ceiling);
        assert!((r.matmul_gflops_per_thread - 40.0).abs() < 1e-9);
        assert!((r.gemm_gflops_per_thread - 50.0).abs() < 1e-9);
        assert!((r.bound_vs_ceiling.unwrap() - 0.8).abs() < 1e-9);
        assert!(
            r.line("m").contains("at most 0.800 of the ceiling"),
            "{}",
            r.line("m")
        );
        // Nothing outside the products: the bound is the ceiling itself.
        let r = ProfileReport::new(profile_of(25_000, 0, 25_000), &ceiling);
        assert!((r.bound_vs_ceiling.unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn quantised_products_faster_than_the_fp32_gemm_get_no_bound() {
        let ceiling = ceiling_of(100.0, 2);
        // 1 GFLOP in 10 ms: 100 GFLOP/s per thread, twice the FP32 GEMM.
        let r = ProfileReport::new(profile_of(10_000, 2_000, 13_000), &ceiling);
        assert_eq!(r.bound_vs_ceiling, None);
        assert!(
            r.line("m").contains("does not bound them"),
            "{}",
            r.line("m")
        );
    }

    #[test]
    fn reference_sentences_are_read() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/minilm-reference.json");
        let s = read_sentences(&path, 8).unwrap();
        assert_eq!(s.len(), 8);
        assert!(s.iter().all(|t| !t.is_empty()));
        assert!(read_sentences(&path, 0).is_err());
    }
}
