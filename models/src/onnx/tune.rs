//! What a load decides before serving: which optimised graph to open (through the cache of
//! [`super::optimize`]), whether the optimised graph of a text encoder agrees with the basic
//! level's (else the basic level is used), and, for a text encoder, how many intra-op threads and
//! instances to run, by a short measured sweep. Every decision goes to the log and into the
//! model's effective configuration parameters (`onnx_*`, see [`super`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ort::session::Session;

use super::encoder::OnnxEncoder;
use super::graph::Graph;
use super::optimize::{self, CheckRecord, GraphCache, Key, Level, Lookup};
use super::runtime::{Runtime, runtime};
use super::session::{Spec, open_session, open_sessions};
use super::{
    OnnxOptions, PARAM_CHECK, PARAM_CHECK_TOLERANCE, PARAM_GRAPH_CACHE, PARAM_INSTANCES,
    PARAM_INTRA_OP_THREADS, PARAM_INTRA_OP_THREADS_CHOSEN, PARAM_OPTIMIZATION, PARAM_SWEEP,
    PARAM_SWEEP_RESULT, model_file,
};
use crate::config::{InstanceGroup, ModelConfig, Parameter};
use crate::error::Error;
use crate::text::{Encoder, TextTokenizer, TokenBatch, max_seq_length_from_dir};

/// Largest difference, on any real token's hidden value, between the optimised graph and the
/// basic-level reference for the optimised graph to be used.
pub const CHECK_TOLERANCE: f64 = 1e-4;
/// How long one arrangement of the sweep is measured (after one warm-up batch).
pub const SWEEP_PER_CANDIDATE: Duration = Duration::from_millis(200);
/// The sweep stops trying arrangements once this much time went by (sessions opened included).
pub const SWEEP_BUDGET: Duration = Duration::from_secs(2);
/// Sentences of a sweep batch (capped by `max_batch_size`).
const SWEEP_BATCH: usize = 16;

/// Probe and sweep sentences: a realistic spread of lengths (10–80 characters).
const SENTENCES: [&str; 8] = [
    "A man is eating food.",
    "The new movie is awesome and everyone should go see it this week.",
    "Stocks fell sharply.",
    "Two dogs are running through a field of tall grass near the river.",
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "Is it going to rain in the mountains tomorrow afternoon, or later this evening?",
    "Thank you!",
];

/// The graph to open and how, after the cache was consulted.
pub(super) struct Prepared {
    /// The file sessions open: the cached optimised graph, or the source.
    pub file: PathBuf,
    /// The level ONNX Runtime applies when opening `file` (none for a cached graph).
    pub open_at: Level,
    /// The level the graph is optimised at, in effect.
    pub level: Level,
    /// The cache entry in use and its record.
    pub cached: Option<(optimize::Entry, optimize::Record)>,
    /// What the cache did, for the log and the parameters.
    pub cache_note: String,
    /// A session the preparation opened anyway (the one that wrote the cache), with the threads
    /// it was asked for.
    pub first: Option<Session>,
}

impl Prepared {
    fn spec(&self, intra_op_threads: usize) -> Spec<'_> {
        Spec {
            file: &self.file,
            level: self.open_at,
            intra_op_threads,
            save_optimized: None,
            profile: None,
        }
    }
}

/// Finds or builds the optimised graph of `source` at `level`. A session opened while building it
/// (with `intra_op_threads`) is handed back in [`Prepared::first`].
pub(super) fn prepare(
    rt: &Runtime,
    model: &str,
    source: &Path,
    level: Level,
    cache: &GraphCache,
    intra_op_threads: usize,
) -> Result<Prepared, Error> {
    let uncached = |note: String| Prepared {
        file: source.to_path_buf(),
        open_at: level,
        level,
        cached: None,
        cache_note: note,
        first: None,
    };
    if level == Level::None || *cache == GraphCache::Off {
        return Ok(uncached("off".into()));
    }
    let key = match optimize::sha256_file(source) {
        Ok((sha, _)) => Key {
            source_sha256: sha,
            ort_build: optimize::ort_build(),
            level: level.name().into(),
            cpu: optimize::cpu_signature(),
        },
        Err(e) => {
            return Err(Error::load(
                model,
                format!("cannot read '{}': {e}", source.display()),
            ));
        }
    };
    match optimize::lookup(source, &key, level, cache) {
        Lookup::Hit(entry, record) => {
            tracing::info!(model, level = level.name(), graph = %entry.graph.display(), "ONNX graph cache: hit");
            Ok(Prepared {
                file: entry.graph.clone(),
                open_at: Level::None,
                level,
                cache_note: format!("hit {}", entry.graph.display()),
                cached: Some((entry, record)),
                first: None,
            })
        }
        Lookup::Miss { entry: None, why } => {
            tracing::warn!(model, level = level.name(), reason = %why, "ONNX graph cache: none usable; optimising at every load");
            Ok(uncached(format!("not cached ({why})")))
        }
        Lookup::Miss {
            entry: Some(entry),
            why,
        } => {
            let temp = optimize::temp_beside(&entry.graph);
            let spec = Spec {
                file: source,
                level,
                intra_op_threads,
                save_optimized: Some(&temp),
                profile: None,
            };
            let session = match open_session(rt, model, &spec) {
                Ok(s) => s,
                Err(e) => {
                    // Some graphs cannot be written back (over 2 GB of weights): serve uncached.
                    let _ = std::fs::remove_file(&temp);
                    tracing::warn!(model, error = %e, "ONNX graph cache: cannot write the optimised graph; optimising at every load");
                    let mut p = uncached(format!("not cached (writing it failed: {e})"));
                    p.first = Some(open_session(
                        rt,
                        model,
                        &Spec {
                            save_optimized: None,
                            ..spec
                        },
                    )?);
                    return Ok(p);
                }
            };
            match optimize::publish(&entry, &temp, &key, None) {
                Ok(record) => {
                    tracing::info!(model, level = level.name(), graph = %entry.graph.display(), reason = %why, "ONNX graph cache: built");
                    Ok(Prepared {
                        file: entry.graph.clone(),
                        open_at: Level::None,
                        level,
                        cache_note: format!("built {} ({why})", entry.graph.display()),
                        cached: Some((entry, record)),
                        first: Some(session),
                    })
                }
                Err(e) => {
                    tracing::warn!(model, error = %e, "ONNX graph cache: cannot publish the optimised graph");
                    let mut p = uncached(format!("not cached ({e})"));
                    p.first = Some(session);
                    Ok(p)
                }
            }
        }
    }
}

/// The requested optimisation level (parameter `onnx_optimization`, default all).
pub(super) fn requested_level(config: &ModelConfig) -> Result<Level, Error> {
    match config.parameter(PARAM_OPTIMIZATION).map(str::trim) {
        None | Some("") => Ok(Level::All),
        Some(v) => Level::parse(v).ok_or_else(|| Error::InvalidConfig {
            model: config.name.clone(),
            reason: format!(
                "parameter '{PARAM_OPTIMIZATION}' is '{v}'; expected none, basic, extended or all"
            ),
        }),
    }
}

/// Intra-op threads set by the configuration (parameter, else the server's option when not 0).
pub(super) fn explicit_threads(
    config: &ModelConfig,
    options: &OnnxOptions,
) -> Result<Option<usize>, Error> {
    let from_param = match config.parameter(PARAM_INTRA_OP_THREADS).map(str::trim) {
        None | Some("") => None,
        Some(_) => Some(
            config
                .parameter_u64(PARAM_INTRA_OP_THREADS, 0)
                .map_err(|e| Error::load(&config.name, e))?,
        ),
    };
    match from_param {
        Some(n) => usize::try_from(n).map(Some).map_err(|_| {
            Error::load(
                &config.name,
                format!("parameter '{PARAM_INTRA_OP_THREADS}' is too large"),
            )
        }),
        None => Ok((options.intra_op_threads > 0).then_some(options.intra_op_threads)),
    }
}

/// Whether the configuration sets its instance count.
pub(super) fn explicit_instances(config: &ModelConfig) -> bool {
    config.instance_group.iter().any(|g| g.count > 0)
}

/// The check's tolerance (parameter `onnx_check_tolerance`, default [`CHECK_TOLERANCE`]).
fn check_tolerance(config: &ModelConfig) -> Result<f64, Error> {
    match config.parameter(PARAM_CHECK_TOLERANCE).map(str::trim) {
        None | Some("") => Ok(CHECK_TOLERANCE),
        Some(v) => match v.parse::<f64>() {
            Ok(t) if t >= 0.0 && t.is_finite() => Ok(t),
            _ => Err(Error::InvalidConfig {
                model: config.name.clone(),
                reason: format!(
                    "parameter '{PARAM_CHECK_TOLERANCE}' is '{v}', expected a number >= 0"
                ),
            }),
        },
    }
}

/// Whether the sweep may run (parameter `onnx_sweep`, default true for text encoders).
fn sweep_allowed(config: &ModelConfig) -> Result<bool, Error> {
    match config.parameter(PARAM_SWEEP).map(str::trim) {
        None | Some("") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(Error::InvalidConfig {
            model: config.name.clone(),
            reason: format!("parameter '{PARAM_SWEEP}' is '{v}', expected 'true' or 'false'"),
        }),
    }
}

pub(super) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What a load decided, as the effective configuration's parameters.
#[derive(Debug, Default)]
pub(super) struct Decisions {
    pub params: BTreeMap<String, String>,
    /// The instance count chosen by the sweep, when it chose one.
    pub instances: Option<usize>,
}

impl Decisions {
    pub(super) fn apply(self, config: &mut ModelConfig) {
        for (k, v) in self.params {
            config.parameters.insert(k, Parameter { string_value: v });
        }
        if let Some(n) = self.instances {
            let count = u32::try_from(n).unwrap_or(u32::MAX);
            match config.instance_group.first_mut() {
                Some(g) => g.count = count,
                None => config.instance_group.push(InstanceGroup {
                    kind: "KIND_CPU".into(),
                    count,
                    ..InstanceGroup::default()
                }),
            }
        }
    }
}

/// Opens a text encoder as [`super::load`] does, with what it decided.
pub(super) fn open_encoder(
    config: &ModelConfig,
    dir: &Path,
    options: &OnnxOptions,
) -> Result<(OnnxEncoder, Decisions), Error> {
    let name = &config.name;
    let file = model_file(config, dir)?;
    let rt = runtime(options.library.as_deref()).map_err(|e| Error::load(name, e))?;
    let threads = explicit_threads(config, options)?;
    let prepared = prepare(
        &rt,
        name,
        &file,
        requested_level(config)?,
        &options.cache,
        threads.unwrap_or(0),
    )?;
    text_encoder(&rt, config, dir, &file, options, prepared)
}

/// The tokenized probe and sweep batches of a text model.
struct Batches {
    probes: Vec<TokenBatch>,
    sweep: TokenBatch,
}

fn batches(dir: &Path, max_batch: usize) -> Result<Batches, String> {
    let max_seq = max_seq_length_from_dir(dir)?;
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), max_seq)?;
    let probes = vec![
        tokenizer.encode(&SENTENCES)?,
        tokenizer.encode(&SENTENCES[..1])?,
        tokenizer.encode(&SENTENCES[6..7])?,
    ];
    // 0: the sentence embedder's default bound, which its configuration gets later.
    let max_batch = match max_batch {
        0 => crate::text::DEFAULT_MAX_BATCH_SIZE as usize,
        n => n,
    };
    let n = SWEEP_BATCH.min(max_batch);
    let sweep: Vec<&str> = (0..n).map(|i| SENTENCES[i % SENTENCES.len()]).collect();
    Ok(Batches {
        probes,
        sweep: tokenizer.encode(&sweep)?,
    })
}

/// Largest |a − b| over the real tokens (attention mask 1) of two `[batch, seq, hidden]` outputs.
fn max_diff_on_tokens(a: &[f32], b: &[f32], batch: &TokenBatch, hidden: usize) -> f64 {
    let mut worst = 0f64;
    for (t, &m) in batch.attention_mask.iter().enumerate() {
        if m == 0 {
            continue;
        }
        let (x, y) = (
            &a[t * hidden..(t + 1) * hidden],
            &b[t * hidden..(t + 1) * hidden],
        );
        for (p, q) in x.iter().zip(y) {
            let d = f64::from((p - q).abs());
            // NaN anywhere fails the check.
            worst = if d.is_nan() {
                f64::INFINITY
            } else {
                worst.max(d)
            };
        }
    }
    worst
}

/// Compares `candidate` with a basic-level session of `source` on the probes.
fn check(
    rt: &Runtime,
    model: &str,
    dir: &Path,
    source: &Path,
    candidate: &OnnxEncoder,
    graph: &Graph,
    probes: &[TokenBatch],
) -> Result<f64, Error> {
    let reference = open_session(
        rt,
        model,
        &Spec {
            file: source,
            level: Level::Basic,
            intra_op_threads: 0,
            save_optimized: None,
            profile: None,
        },
    )?;
    let reference = OnnxEncoder::from_sessions(model, dir, vec![reference], graph)?;
    let hidden = candidate.hidden_size();
    let mut worst = 0f64;
    for probe in probes {
        let a = reference.encode(probe)?;
        let b = candidate.encode(probe)?;
        if a.len() != b.len() {
            return Ok(f64::INFINITY);
        }
        worst = worst.max(max_diff_on_tokens(&a, &b, probe, hidden));
    }
    Ok(worst)
}

/// A text encoder over the prepared graph: the reference check (levels above basic), then the
/// thread and instance sweep, then the sessions the winner needs.
pub(super) fn text_encoder(
    rt: &Runtime,
    config: &ModelConfig,
    dir: &Path,
    source: &Path,
    options: &OnnxOptions,
    mut prepared: Prepared,
) -> Result<(OnnxEncoder, Decisions), Error> {
    let model = config.name.as_str();
    let threads = explicit_threads(config, options)?;
    let first_threads = threads.unwrap_or(0);
    let mut decisions = Decisions::default();
    let tolerance = check_tolerance(config)?;
    let first = match prepared.first.take() {
        Some(s) => s,
        None => open_session(rt, model, &prepared.spec(first_threads))?,
    };
    let graph = Graph::of(&first);
    let mut encoder = OnnxEncoder::from_sessions(model, dir, vec![first], &graph)?;
    let batches = batches(dir, config.max_batch_size as usize).map_err(|e| {
        Error::load(
            model,
            format!("as a text encoder: cannot build probe inputs: {e}"),
        )
    })?;

    // The reference check: the fused graph must agree with the basic level.
    let check_note = if prepared.level > Level::Basic {
        let known = prepared.cached.as_ref().and_then(|(_, r)| r.check.clone());
        let result = match known {
            Some(c) => (c.max_abs_diff, c.max_abs_diff <= tolerance, "recorded"),
            None => {
                let d = check(rt, model, dir, source, &encoder, &graph, &batches.probes)?;
                let accepted = d <= tolerance;
                if let Some((entry, record)) = prepared.cached.as_mut() {
                    record.check = Some(CheckRecord {
                        max_abs_diff: d,
                        accepted,
                    });
                    if let Err(e) = optimize::write_record(entry, record) {
                        tracing::warn!(model, error = %e, "cannot record the reference check");
                    }
                }
                (d, accepted, "measured")
            }
        };
        let (diff, accepted, how) = result;
        if accepted {
            tracing::info!(
                model,
                level = prepared.level.name(),
                max_abs_diff = diff,
                "ONNX optimised graph agrees with the basic level"
            );
            format!(
                "{} kept: max |diff| {diff:.2e} <= {tolerance:.0e} vs basic on {} probe \
                 batches ({how})",
                prepared.level.name(),
                batches.probes.len()
            )
        } else {
            tracing::warn!(
                model,
                level = prepared.level.name(),
                max_abs_diff = diff,
                tolerance,
                "ONNX optimised graph differs from the basic level; falling back to basic"
            );
            let note = format!(
                "{} refused: max |diff| {diff:.2e} > {tolerance:.0e} vs basic ({how}); \
                 fell back to basic",
                prepared.level.name()
            );
            drop(encoder);
            prepared = prepare(
                rt,
                model,
                source,
                Level::Basic,
                &options.cache,
                first_threads,
            )?;
            let first = match prepared.first.take() {
                Some(s) => s,
                None => open_session(rt, model, &prepared.spec(first_threads))?,
            };
            encoder = OnnxEncoder::from_sessions(model, dir, vec![first], &graph)?;
            note
        }
    } else {
        format!("{}: nothing to check", prepared.level.name())
    };
    decisions
        .params
        .insert(PARAM_OPTIMIZATION.into(), prepared.level.name().into());
    decisions.params.insert(PARAM_CHECK.into(), check_note);
    decisions
        .params
        .insert(PARAM_GRAPH_CACHE.into(), prepared.cache_note.clone());

    // The sweep over intra-op threads × instances.
    let explicit_count = explicit_instances(config).then(|| config.instance_count());
    let candidates = candidates(threads, explicit_count, cores());
    let sweep = sweep_allowed(config)? && candidates.len() > 1;
    let (intra, count, note) = if sweep {
        let mut pool = Sessions::new(first_threads, encoder.into_sessions());
        let (best, rates) = run_sweep(
            rt,
            model,
            dir,
            &graph,
            &prepared,
            &mut pool,
            &candidates,
            &batches.sweep,
        )?;
        let list: Vec<String> = rates
            .iter()
            .map(|((t, n), r)| format!("{}x{n}: {r:.0}/s", thread_name(*t)))
            .collect();
        let note = format!(
            "chose {} threads x {} instances; sentences/s of a {}-sentence batch: {}",
            thread_name(best.0),
            best.1,
            batches.sweep.batch,
            list.join(", ")
        );
        tracing::info!(model, intra_op_threads = best.0, instances = best.1, rates = %list.join(", "), "ONNX thread and instance sweep");
        encoder = pool.encoder(rt, model, dir, &graph, &prepared, best.0, best.1)?;
        (best.0, best.1, note)
    } else {
        let ((intra, count), why) = unswept(
            &candidates,
            sweep_allowed(config)?,
            first_threads,
            config.instance_count(),
        );
        let mut pool = Sessions::new(first_threads, encoder.into_sessions());
        encoder = pool.encoder(rt, model, dir, &graph, &prepared, intra, count)?;
        (intra, count, why)
    };
    decisions
        .params
        .insert(PARAM_INTRA_OP_THREADS_CHOSEN.into(), thread_name(intra));
    decisions
        .params
        .insert(PARAM_INSTANCES.into(), count.to_string());
    decisions.params.insert(PARAM_SWEEP_RESULT.into(), note);
    if explicit_count.is_none() && count != config.instance_count() {
        decisions.instances = Some(count);
    }
    debug_assert_eq!(encoder.instances(), count.max(1));
    Ok((encoder, decisions))
}

/// The arrangement when the sweep does not run, and why: with the sweep off, the set (or default)
/// threads × the configured count; otherwise the one candidate left. That is the set pair when
/// both are set, or, when only the instance count is, the one thread count that fits the cores
/// beside it (one thread × 2 instances on 2 cores): taking ONNX Runtime's default there would
/// run a thread per core in every instance, more threads than cores.
fn unswept(
    candidates: &[(usize, usize)],
    sweep_on: bool,
    threads: usize,
    count: usize,
) -> ((usize, usize), String) {
    match candidates {
        [only] if sweep_on => {
            let why = format!(
                "skipped: {} threads x {} instances is the one arrangement (as set, or the only \
                 one within the {} cores)",
                thread_name(only.0),
                only.1,
                cores()
            );
            (*only, why)
        }
        _ => ((threads, count), format!("off (parameter '{PARAM_SWEEP}')")),
    }
}

fn thread_name(t: usize) -> String {
    if t == 0 {
        format!("default ({})", cores())
    } else {
        t.to_string()
    }
}

/// The arrangements to try: intra-op threads in {1, 2, ONNX Runtime's default of one per core}
/// (or the set value) × instances in
/// {1, 2} (or the set count), no more threads in all than cores (unless the configuration sets
/// both, which leaves one arrangement).
pub(super) fn candidates(
    threads: Option<usize>,
    instances: Option<usize>,
    cores: usize,
) -> Vec<(usize, usize)> {
    // 0 is ONNX Runtime's default: one thread per (physical) core.
    let ts: Vec<usize> = match threads {
        Some(t) => vec![t],
        None if cores <= 1 => vec![1],
        None if cores == 2 => vec![1, 0],
        None => vec![1, 2, 0],
    };
    let ns: Vec<usize> = match instances {
        Some(n) => vec![n],
        None => vec![1, 2],
    };
    let mut out = Vec::new();
    for &n in &ns {
        for &t in &ts {
            let used = if t == 0 { cores } else { t } * n;
            if used <= cores || (threads.is_some() && instances.is_some()) || (n == 1) {
                out.push((t, n));
            }
        }
    }
    if out.is_empty() {
        out.push((ts[0], ns[0]));
    }
    out
}

/// Opened sessions by intra-op threads, reused across the sweep's arrangements.
struct Sessions {
    by_threads: BTreeMap<usize, Vec<Session>>,
}

impl Sessions {
    fn new(threads: usize, sessions: Vec<Session>) -> Sessions {
        Sessions {
            by_threads: BTreeMap::from([(threads, sessions)]),
        }
    }

    /// An encoder of `count` sessions with `threads` intra-op threads (opening what is missing).
    #[allow(clippy::too_many_arguments)]
    fn encoder(
        &mut self,
        rt: &Runtime,
        model: &str,
        dir: &Path,
        graph: &Graph,
        prepared: &Prepared,
        threads: usize,
        count: usize,
    ) -> Result<OnnxEncoder, Error> {
        let have = self.by_threads.entry(threads).or_default();
        if have.len() < count {
            let more = open_sessions(rt, model, &prepared.spec(threads), count - have.len())?;
            have.extend(more);
        }
        let taken: Vec<Session> = have.drain(..count.max(1)).collect();
        OnnxEncoder::from_sessions(model, dir, taken, graph)
    }

    fn give_back(&mut self, threads: usize, encoder: OnnxEncoder) {
        self.by_threads
            .entry(threads)
            .or_default()
            .extend(encoder.into_sessions());
    }
}

/// Measures each arrangement for [`SWEEP_PER_CANDIDATE`] (within [`SWEEP_BUDGET`] in all) and
/// returns the fastest with every measured rate (sentences/s).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn run_sweep(
    rt: &Runtime,
    model: &str,
    dir: &Path,
    graph: &Graph,
    prepared: &Prepared,
    pool: &mut Sessions,
    candidates: &[(usize, usize)],
    batch: &TokenBatch,
) -> Result<((usize, usize), Vec<((usize, usize), f64)>), Error> {
    let start = Instant::now();
    let mut rates = Vec::new();
    let mut longest = Duration::ZERO;
    for &(threads, count) in candidates {
        // Stop before an arrangement that would likely end past the budget.
        if !rates.is_empty() && start.elapsed() + longest > SWEEP_BUDGET {
            tracing::debug!(model, threads, count, "sweep budget spent");
            break;
        }
        let t0 = Instant::now();
        let encoder = pool.encoder(rt, model, dir, graph, prepared, threads, count)?;
        let rate = measure(model, &encoder, batch, count)?;
        rates.push(((threads, count), rate));
        pool.give_back(threads, encoder);
        longest = longest.max(t0.elapsed());
    }
    let best = choose(&rates).unwrap_or(candidates[0]);
    Ok((best, rates))
}

/// A sweep arrangement with fewer instances must be this much faster than one with more to be
/// chosen over it.
pub const FEWER_INSTANCES_MARGIN: f64 = 1.15;

/// The arrangement to serve from the sweep's rates: the fastest, unless one with more instances
/// is within [`FEWER_INSTANCES_MARGIN`] of it (then the one with most instances among those).
///
/// The sweep times back-to-back runs of the encoder alone. Served, each batch is also
/// tokenized, pooled and answered on its pool thread, and a single instance's intra-op threads
/// wait meanwhile; more instances overlap that work, and small batches split poorly over
/// intra-op threads. Measured with `veraltheim-load text` on 2 cores (docs/PERFORMANCE.md,
/// session 14): 1 thread × 2 instances served 602–684 sentences/s against 432–542 for 2
/// threads × 1 instance, while the sweep rated the two within 3% of each other.
pub(super) fn choose(rates: &[((usize, usize), f64)]) -> Option<(usize, usize)> {
    let fastest = rates.iter().map(|(_, r)| *r).fold(f64::NAN, f64::max);
    rates
        .iter()
        .filter(|(_, r)| r * FEWER_INSTANCES_MARGIN >= fastest)
        .max_by(|a, b| a.0.1.cmp(&b.0.1).then(a.1.total_cmp(&b.1)))
        .map(|(c, _)| *c)
}

/// Sentences/s of `encoder` on `batch` with `parallel` batches in flight.
fn measure(
    model: &str,
    encoder: &OnnxEncoder,
    batch: &TokenBatch,
    parallel: usize,
) -> Result<f64, Error> {
    let run = || -> Result<usize, Error> {
        encoder.encode_with(batch, &mut |_| {})?; // warm-up
        let t0 = Instant::now();
        let mut done = 0;
        while t0.elapsed() < SWEEP_PER_CANDIDATE {
            encoder.encode_with(batch, &mut |_| {})?;
            done += batch.batch;
        }
        Ok(done)
    };
    let t0 = Instant::now();
    let done: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..parallel.max(1)).map(|_| s.spawn(run)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::load(model, "a sweep thread panicked")))
            })
            .sum::<Result<usize, Error>>()
    })?;
    Ok(done as f64 / t0.elapsed().as_secs_f64().max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threads_in_use_are_read_back_from_what_the_load_wrote() {
        use crate::onnx::intra_op_threads_in_use;
        let with = |value: String| {
            let mut config = ModelConfig::default();
            config.parameters.insert(
                PARAM_INTRA_OP_THREADS_CHOSEN.into(),
                Parameter {
                    string_value: value,
                },
            );
            intra_op_threads_in_use(&config)
        };
        assert_eq!(with(thread_name(1)), Some(1));
        assert_eq!(with(thread_name(0)), Some(cores()));
        assert_eq!(with("many".into()), None);
        assert_eq!(intra_op_threads_in_use(&ModelConfig::default()), None);
    }

    #[test]
    fn without_a_sweep_the_one_arrangement_left_is_used() {
        // Two instances set on two cores, threads not: one thread each, not the default's
        // thread per core in each (four threads on two cores).
        let only = candidates(None, Some(2), 2);
        assert_eq!(only, vec![(1, 2)]);
        let ((t, n), why) = unswept(&only, true, 0, 2);
        assert_eq!((t, n), (1, 2));
        assert!(why.starts_with("skipped: 1 threads x 2 instances"), "{why}");
        // Both set: the set pair.
        let both = candidates(Some(2), Some(2), 2);
        assert_eq!(unswept(&both, true, 2, 2).0, (2, 2));
        // The sweep off: the set (or default) threads and the configured count, as they are.
        let ((t, n), why) = unswept(&candidates(None, None, 2), false, 0, 1);
        assert_eq!((t, n), (0, 1));
        assert!(why.starts_with("off"), "{why}");
        let ((t, n), _) = unswept(&only, false, 0, 2);
        assert_eq!((t, n), (0, 2));
    }

    #[test]
    fn candidates_stay_within_the_cores_and_respect_settings() {
        assert_eq!(candidates(None, None, 2), vec![(1, 1), (0, 1), (1, 2)]);
        assert_eq!(
            candidates(None, None, 4),
            vec![(1, 1), (2, 1), (0, 1), (1, 2), (2, 2)]
        );
        assert_eq!(candidates(None, None, 1), vec![(1, 1)]);
        assert_eq!(candidates(Some(2), None, 2), vec![(2, 1)]);
        assert_eq!(candidates(None, Some(2), 2), vec![(1, 2)]);
        assert_eq!(candidates(Some(4), Some(3), 2), vec![(4, 3)]);
    }

    #[test]
    fn the_sweep_prefers_more_instances_unless_fewer_are_clearly_faster() {
        // Within the margin: the most instances win.
        assert_eq!(
            choose(&[((1, 1), 204.0), ((0, 1), 375.0), ((1, 2), 340.0)]),
            Some((1, 2))
        );
        // Fewer instances clearly faster: the fastest wins.
        assert_eq!(
            choose(&[((1, 1), 204.0), ((0, 1), 450.0), ((1, 2), 380.0)]),
            Some((0, 1))
        );
        // Among arrangements of the same instances, the faster.
        assert_eq!(
            choose(&[((1, 2), 300.0), ((2, 2), 320.0), ((0, 1), 330.0)]),
            Some((2, 2))
        );
        assert_eq!(choose(&[((1, 1), 10.0)]), Some((1, 1)));
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn the_difference_only_counts_real_tokens() {
        let batch = TokenBatch {
            batch: 1,
            seq: 2,
            input_ids: vec![1, 0],
            attention_mask: vec![1, 0],
            token_type_ids: vec![0, 0],
        };
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [1.0, 2.5, 300.0, -4.0];
        assert_eq!(max_diff_on_tokens(&a, &b, &batch, 2), 0.5);
        let nan = [f32::NAN, 2.0, 3.0, 4.0];
        assert!(max_diff_on_tokens(&a, &nan, &batch, 2).is_infinite());
    }
}
