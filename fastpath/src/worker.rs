//! A model's worker: the batcher task that turns its queue into batches, and the execution of
//! each batch on the pool.
//!
//! The answers of a batch go back to their callers through the batcher: the pool thread hands
//! them over in one step and wakes the batcher once, and the batcher, a tokio task, completes
//! each caller's oneshot from inside the runtime. Completing them from the pool thread costs one
//! wake from outside the runtime per caller (each pushes onto tokio's shared injection queue
//! and may unpark a worker thread). Measured against answering from the pool thread (identity
//! 1×16, concurrency 64, six interleaved pairs), the throughput ratio to the echo server rose
//! from a median of 0.72 to 0.76 (docs/PERFORMANCE.md, session 4).
//!
//! **Inline execution** (issue 19). For a model whose batches are measured short (each of its
//! last [`INLINE_STREAK`] batches within `inline_execution_us`, default
//! [`DEFAULT_INLINE_BELOW`]), a request that arrives while the model is idle, with nothing
//! queued and no queue delay to wait out, runs inside `submit` on the caller's thread and is
//! answered from there: no wake of the batcher, of a pool thread, and of the batcher again. Under
//! load the model is busy and requests queue as before, so batching is unchanged; the caller
//! that holds the instance runs what queued meanwhile, up to [`INLINE_BATCHES`] batches. A model that
//! turns slow while inline costs its caller's thread one batch: the streak it needs doubles,
//! and its batches go to the pool until it has shown that many fast ones again (`try_inline`).
//! Models with a latency objective never run inline (their batches go through the controller).
//!
//! Inline execution is for requests that come one at a time: while the model's requests arrive
//! closer together than `inline_min_gap_us` (default [`DEFAULT_INLINE_MIN_GAP`]; an average over
//! about the last 8 arrivals), they go through the batcher. A fast model under many concurrent
//! callers is idle at nearly every arrival, so without this rule every request ran alone on its
//! caller's thread; measured (identity, median of 3 interleaved rounds against the echo server,
//! docs/PERFORMANCE.md session 11): 0.66 of the echo's throughput at concurrency 64 with inline
//! execution, 0.80 with batching (average batch 10).
//!
//! **Batches on the batcher task** (issue 19). A batch of a model whose batches are measured
//! tiny runs on the batcher task that formed it, not on the execution pool: at least
//! [`INLINE_STREAK`] batches seen, and their average execution time (exponential, weight 1/8)
//! within `batcher_execution_us` (default [`DEFAULT_BATCHER_BELOW`]: identity, lookups). For
//! such a batch the hand-off costs more than the work: a wake of a pool thread, the answers
//! handed back and the batcher woken again, and rayon's idle protocol after it (a worker that
//! finds no job yields its thread some 32 times before it sleeps: a context switch each on a
//! busy machine). Measured on 2 vCPUs (identity 1×16, concurrency 64): the pool's threads took
//! 16% of the server's CPU samples, 11 points of it in `sched_yield` and context switches.
//!
//! An average, not a streak as for inline execution: on a busy machine a tiny batch now and then
//! takes milliseconds of wall time (its thread was preempted), and a rule that reacted to one
//! slow batch turned this off within a second at identity concurrency 64. A batch of `D` sends
//! the model's next ~`ln(D ÷ bound) ÷ ln(8/7)` batches to the pool (26 after 5 ms against a
//! 20-µs bound; 83 after 10 s): a model that turns 8 times slower than the bound or more is off
//! the batcher after one batch, one that turns less slow after a few.
//! The batcher runs at most [`BATCHES_IN_PLACE`] batches per round and then yields to the
//! runtime, so that the connections it shares a thread with are served between batches.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use veraltheim_models::{Model, ModelConfig, Tensor, TensorData, TokenCount};

use crate::batcher::{BatchPolicy, Item, Plan};
use crate::error::InferError;
use crate::pool::{ExecutionPool, panic_message};
use crate::priority::PriorityPolicy;
use crate::queue::{BatchKey, Pending, Reply, RequestQueue};
use crate::request::{BatchTrace, InferOutput, Request};
use crate::slo::{
    Controller, CostFit, Decision, Observation, SloConfig, SloSnapshot, TICK, Window,
};
use crate::stats::{LatencyBuckets, ModelStats, StatsSnapshot};

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Queue bound when the model's config does not set `max_queue_size`.
    pub default_max_queue_size: usize,
    /// How long a request waits before its effective priority rises one level, unless the
    /// model's `priority_aging_ms` parameter says otherwise.
    pub priority_aging: Duration,
    /// Batches may run on the caller's thread for models measured this fast, unless the model's
    /// `inline_execution_us` parameter says otherwise; `None`: never.
    pub inline_below: Option<Duration>,
    /// Batches run on the batcher task instead of the pool for models measured this fast,
    /// unless the model's `batcher_execution_us` parameter says otherwise; `None`: never.
    pub batcher_below: Option<Duration>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            default_max_queue_size: 1024,
            priority_aging: Duration::from_secs(1),
            inline_below: Some(DEFAULT_INLINE_BELOW),
            batcher_below: Some(DEFAULT_BATCHER_BELOW),
        }
    }
}

struct Shared {
    name: String,
    model: Arc<dyn Model>,
    policy: BatchPolicy,
    priority: PriorityPolicy,
    instances: usize,
    queue: RequestQueue,
    stats: ModelStats,
    inflight: AtomicUsize,
    notify: Notify,
    closed: AtomicBool,
    abort: AtomicBool,
    pool: ExecutionPool,
    /// Requests taken off the ring but not yet batched. Only the batcher loop touches it (and
    /// `stop` after its grace), so the lock is uncontended; it lives here rather than in the loop
    /// so that a restarted loop carries on with them.
    pending: Mutex<VecDeque<Pending>>,
    /// Set by a batch whose backend panicked: the loop then ends with that failure, so that its
    /// supervisor sees and counts it.
    panicked: Mutex<Option<String>>,
    /// True once the worker is closed and has nothing left to do.
    finished: watch::Sender<bool>,
    /// Per-priority-level bounds, when the config sets any (`priority_queue_policy`).
    levels: Option<LevelBounds>,
    /// Answers of finished batches, waiting for the batcher to send them ([`deliver`]).
    answers: Mutex<Vec<Answer>>,
    /// Whether a batcher loop runs to send `answers`; when none does, the pool thread that
    /// finished the batch sends them itself.
    batcher_running: AtomicBool,
    /// Jobs handed to the execution pool (each runs one or more batches in place).
    pool_jobs: AtomicU64,
    /// Rounds of the batcher loop (each one a wake-up of its task).
    batcher_rounds: AtomicU64,
    /// Priority levels that count as background work (`background_priority_levels`).
    background_levels: Vec<u32>,
    /// Background requests taken into a batch and not yet answered.
    background_in_flight: AtomicUsize,
    /// The latency objective and its controller, when the model sets one.
    slo: Option<Slo>,
    /// Batches run on the caller's thread instead ([`ModelWorker::submit`]) up to this measured
    /// execution time; `None`: never (`inline_execution_us` = 0, or a latency objective).
    inline_below: Option<Duration>,
    /// Batches in a row that executed within `inline_below`, and the streak a batch needs to
    /// run inline.
    fast: Streak,
    /// Batches run on the caller's thread.
    inline_runs: AtomicU64,
    /// Batches run on the batcher task instead up to this measured execution time; `None`:
    /// never (`batcher_execution_us` = 0, or a latency objective).
    batcher_below: Option<Duration>,
    /// The model's batch time, averaged (read against `batcher_below`).
    batch_time: Average,
    /// Batches run on the batcher task.
    batcher_runs: AtomicU64,
    /// Inline execution only while the requests' average gap is at least this (0: always).
    inline_min_gap_ns: u64,
    /// When the last request arrived (ns since `started`) and the average gap between arrivals
    /// (an exponential average over about 8, each gap counted up to [`GAP_CAP`]).
    last_arrival_ns: AtomicU64,
    gap_ns: AtomicU64,
    started: Instant,
    /// Whether the model counts its requests' tokens (a text model with a tokenizer): its
    /// requests are counted on arrival and batched by length (`crate::batcher`).
    counts_tokens: bool,
    /// How long the model's last batch took, ns: a request whose deadline is nearer than this
    /// (twice, plus the batching delay) must run in the next batch (`Item::urgent_at`).
    last_batch_ns: AtomicU64,
}

/// Without `inline_execution_us`, a batch may run on the caller's thread when its model's
/// executions take at most this long ([`ModelWorker::submit`]).
pub const DEFAULT_INLINE_BELOW: Duration = Duration::from_micros(200);
/// The batches in a row that must execute within the inline bound before one runs on a caller's
/// thread; one slower batch starts the count again.
pub const INLINE_STREAK: u64 = 64;
/// The most batches one caller's thread runs inline: its own request's, then those queued
/// meanwhile by callers that found the instance taken.
pub const INLINE_BATCHES: usize = 4;
/// The most batches in a row a model that ran slow inline must show before it runs inline again.
pub const INLINE_STREAK_MAX: u64 = 1 << 20;
/// Without `inline_min_gap_us`: requests run inline only while they arrive at least this far
/// apart on average. A caller at concurrency 1 over gRPC on loopback sends its next request one
/// round trip (~150–250 µs here) after the last; 16 or 64 callers send one every 30–40 µs.
pub const DEFAULT_INLINE_MIN_GAP: Duration = Duration::from_micros(100);
/// The longest gap the average counts: after an idle minute, a burst turns inline execution
/// off within about 20 arrivals.
const GAP_CAP: Duration = Duration::from_millis(1);

/// Without `batcher_execution_us`, a batch may run on the batcher task that formed it when its
/// model's executions take at most this long: about what handing it to a pool thread and back
/// costs in CPU (two thread wake-ups; more on a busy machine, see the module's header).
pub const DEFAULT_BATCHER_BELOW: Duration = Duration::from_micros(20);

/// Batches in a row measured within a bound, and how many a model must show before its batches
/// run on the caller's thread: [`INLINE_STREAK`] at first, doubled (up to [`INLINE_STREAK_MAX`])
/// by each batch that ran there and took longer.
struct Streak {
    count: AtomicU64,
    needed: AtomicU64,
}

impl Streak {
    fn new() -> Self {
        Streak {
            count: AtomicU64::new(0),
            needed: AtomicU64::new(INLINE_STREAK),
        }
    }

    /// Counts a batch that took `took`: one more in the streak, or a new count.
    fn record(&self, took: Duration, bound: Duration) {
        if took <= bound {
            self.count.fetch_add(1, Ordering::Relaxed);
        } else {
            self.count.store(0, Ordering::Relaxed);
        }
    }

    fn shown(&self) -> bool {
        self.count.load(Ordering::Relaxed) >= self.needed.load(Ordering::Relaxed)
    }

    /// A batch that ran off the pool took longer than the bound.
    fn ran_slow(&self) {
        let needed = self.needed.load(Ordering::Relaxed);
        self.needed
            .store((needed * 2).min(INLINE_STREAK_MAX), Ordering::Relaxed);
    }
}

/// The batches' execution time as an exponential average (weight 1/8), and how many were seen
/// (see the module's header).
#[derive(Default)]
struct Average {
    ns: AtomicU64,
    seen: AtomicU64,
}

impl Average {
    /// Concurrent batches may each fold their time into the same old average: it stays an
    /// estimate, which is all the rule needs.
    fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let seen = self.seen.fetch_add(1, Ordering::Relaxed);
        let average = if seen == 0 {
            took
        } else {
            let a = self.ns.load(Ordering::Relaxed);
            (a - a / 8).saturating_add(took / 8)
        };
        self.ns.store(average, Ordering::Relaxed);
    }

    /// At least [`INLINE_STREAK`] batches seen, on average within `bound`.
    fn within(&self, bound: Duration) -> bool {
        self.seen.load(Ordering::Relaxed) >= INLINE_STREAK
            && u128::from(self.ns.load(Ordering::Relaxed)) <= bound.as_nanos()
    }
}

/// The least average gap between a model's requests for them to run inline
/// (`inline_min_gap_us`, default [`DEFAULT_INLINE_MIN_GAP`]; 0: no such rule); an error names a
/// value that is not a whole number of microseconds.
pub fn inline_min_gap(config: &ModelConfig) -> Result<Duration, String> {
    match config.parameter("inline_min_gap_us").map(str::trim) {
        None | Some("") => Ok(DEFAULT_INLINE_MIN_GAP),
        Some(v) => v.parse::<u64>().map(Duration::from_micros).map_err(|_| {
            format!("parameter 'inline_min_gap_us' is '{v}', not a whole number of microseconds")
        }),
    }
}

/// The inline bound a model's configuration sets (`inline_execution_us`; 0 = never), or else
/// `default` (the server's); an error names a value that is not a whole number of microseconds.
pub fn inline_bound(
    config: &ModelConfig,
    default: Option<Duration>,
) -> Result<Option<Duration>, String> {
    micros_bound(config, "inline_execution_us", default)
}

/// The bound up to which a model's batches run on its batcher task (`batcher_execution_us`;
/// 0 = never), or else `default` (the server's); an error names a value that is not a whole
/// number of microseconds.
pub fn batcher_bound(
    config: &ModelConfig,
    default: Option<Duration>,
) -> Result<Option<Duration>, String> {
    micros_bound(config, "batcher_execution_us", default)
}

fn micros_bound(
    config: &ModelConfig,
    parameter: &str,
    default: Option<Duration>,
) -> Result<Option<Duration>, String> {
    let us = match config.parameter(parameter).map(str::trim) {
        None | Some("") => return Ok(default),
        Some(v) => v.parse::<u64>().map_err(|_| {
            format!("parameter '{parameter}' is '{v}', not a whole number of microseconds")
        })?,
    };
    Ok((us > 0).then(|| Duration::from_micros(us)))
}

/// A bound of a model's worker off the pool (`bound`: [`inline_bound`] or [`batcher_bound`]):
/// never with a latency objective (its batches go through the controller), nor with a value
/// that does not parse (the manager refuses such a configuration before it builds a worker).
fn off_pool_below(
    config: &ModelConfig,
    has_objective: bool,
    default: Option<Duration>,
    bound: fn(&ModelConfig, Option<Duration>) -> Result<Option<Duration>, String>,
) -> Option<Duration> {
    if has_objective {
        return None;
    }
    bound(config, default).unwrap_or_else(|e| {
        tracing::warn!(model = %config.name, error = %e, "batches run on the pool only");
        None
    })
}

/// Text bytes up to which `submit` counts a request's tokens on the caller's thread (an async
/// one, for the servers). MiniLM's tokenizer takes ~20 µs for a sentence of ~50 characters on
/// the 2-core development machine under load (single-threaded `tokenizers`, the same Rust code):
/// one sentence of 10–80 characters costs less than the two thread wake-ups of a hand-off to a
/// blocking thread, so it is counted in place, and a request this size costs ~100 µs at most.
/// Larger requests are counted on a blocking thread by the caller
/// ([`ModelWorker::count_tokens_of`]; `serving::Inference` does).
pub const INLINE_TOKEN_COUNT_BYTES: usize = 256;

/// A model's latency objective at work (see [`crate::slo`]): the controller, the window it
/// reads, and what the batcher and the pool threads tell it between ticks.
struct Slo {
    objective: Duration,
    /// Whether a batch holding online requests takes background rows (rule 1).
    fill: bool,
    controller: Mutex<Controller>,
    window: Mutex<Window>,
    /// The controller's limit, read by every batch decision.
    limit: AtomicUsize,
    /// Set when a batch decision left background work out for the limit.
    held_back: AtomicBool,
    /// Set when an online request finished over the objective: the batcher ticks at once.
    breach: AtomicBool,
    /// Instance time spent on online rows since the last tick, ns (a batch's time × its online
    /// rows ÷ its rows).
    online_busy_ns: AtomicU64,
    /// The cost of a batch, fitted to recent batches (rule 5 of [`crate::slo`]): by rows, and
    /// (text models) by padded tokens.
    cost: Mutex<CostFit>,
    token_cost: Mutex<CostFit>,
    /// A text model's padded tokens one batch holding background rows may reach (rule 5);
    /// `usize::MAX`: no bound yet.
    batch_tokens: AtomicUsize,
    /// Background rows one batch may take (rule 5 of [`crate::slo`]); `usize::MAX`: no bound yet.
    batch_rows: AtomicUsize,
    last_tick: Mutex<Instant>,
}

impl Slo {
    fn new(config: SloConfig, now: Instant) -> Self {
        let controller = Controller::new(config, now);
        Slo {
            objective: controller.config().objective,
            fill: controller.config().fill,
            limit: AtomicUsize::new(controller.limit()),
            controller: Mutex::new(controller),
            window: Mutex::new(Window::new(now)),
            held_back: AtomicBool::new(false),
            breach: AtomicBool::new(false),
            online_busy_ns: AtomicU64::new(0),
            cost: Mutex::new(CostFit::default()),
            token_cost: Mutex::new(CostFit::default()),
            batch_tokens: AtomicUsize::new(usize::MAX),
            batch_rows: AtomicUsize::new(usize::MAX),
            last_tick: Mutex::new(now),
        }
    }
}

type Answer = (Reply, Result<InferOutput, InferError>);

struct LevelBounds {
    depth: Vec<AtomicUsize>,
    cap: Vec<usize>,
}

impl LevelBounds {
    fn try_reserve(&self, level: u32) -> Result<(), usize> {
        let i = (level as usize).saturating_sub(1).min(self.cap.len() - 1);
        self.depth[i]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < self.cap[i]).then_some(d + 1)
            })
            .map(|_| ())
            .map_err(|_| self.cap[i])
    }

    fn release(&self, level: u32) {
        let i = (level as usize).saturating_sub(1).min(self.cap.len() - 1);
        self.depth[i].fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request leaves the queue (batched, answered or dropped): give back its level's slot.
fn leave_level(s: &Shared, level: u32) {
    if let Some(b) = &s.levels {
        b.release(level);
    }
}

/// The serving side of one loaded model. Its batcher loop ([`ModelWorker::run`]) is run by
/// whoever owns the worker: a supervisor in the coordinator, or [`ModelWorker::start`].
pub struct ModelWorker {
    shared: Arc<Shared>,
}

/// Why a batcher loop ended abnormally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WorkerFailure(pub String);

impl ModelWorker {
    /// A worker whose batcher loop runs on the current tokio runtime, restarted in place after a
    /// backend panic. (The coordinator runs the loop under its supervision tree instead.)
    pub fn start(model: Arc<dyn Model>, pool: ExecutionPool, options: &WorkerOptions) -> Self {
        let worker = Self::new(model, pool, options);
        worker.run_detached();
        worker
    }

    /// Runs the batcher loop on its own tokio task, restarting it in place after a backend
    /// panic, until the worker is closed and drained (for callers without a supervisor).
    pub fn run_detached(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let cancel = CancellationToken::new();
            while let Err(failure) = run(&shared, &cancel).await {
                tracing::warn!(model = %shared.name, %failure, "batcher restarted");
            }
        });
    }

    /// A worker whose batcher loop nobody runs yet: call [`ModelWorker::run`].
    pub fn new(model: Arc<dyn Model>, pool: ExecutionPool, options: &WorkerOptions) -> Self {
        let config = model.config();
        let queue_policy = config
            .dynamic_batching
            .as_ref()
            .and_then(|d| d.default_queue_policy.as_ref());
        let capacity = match queue_policy.map_or(0, |p| p.max_queue_size) {
            0 => options.default_max_queue_size,
            n => n as usize,
        };
        let aging = config
            .parameter("priority_aging_ms")
            .and_then(|v| v.trim().parse().ok())
            .map_or(options.priority_aging, Duration::from_millis);
        let priority = PriorityPolicy::from_config(config, aging);
        // The manager refuses a configuration whose objective parameters do not parse before it
        // builds the worker; a worker built directly with one runs without them, and says so.
        let slo = SloConfig::from_config(config).unwrap_or_else(|e| {
            tracing::warn!(model = %config.name, error = %e, "no latency objective");
            None
        });
        let background_levels = crate::slo::background_levels(config).unwrap_or_else(|e| {
            tracing::warn!(model = %config.name, error = %e, "no background levels");
            Vec::new()
        });
        let levels = priority.level_caps().map(|cap| LevelBounds {
            depth: cap.iter().map(|_| AtomicUsize::new(0)).collect(),
            cap,
        });
        let inline_below =
            off_pool_below(config, slo.is_some(), options.inline_below, inline_bound);
        let batcher_below =
            off_pool_below(config, slo.is_some(), options.batcher_below, batcher_bound);
        let inline_min_gap = inline_min_gap(config).unwrap_or_else(|e| {
            tracing::warn!(model = %config.name, error = %e, "the default inline gap");
            DEFAULT_INLINE_MIN_GAP
        });
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            policy: BatchPolicy::from_config(config),
            priority,
            instances: config.instance_count(),
            queue: RequestQueue::new(capacity),
            stats: ModelStats::default(),
            inflight: AtomicUsize::new(0),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            pool,
            pending: Mutex::new(VecDeque::new()),
            panicked: Mutex::new(None),
            finished: watch::channel(false).0,
            levels,
            answers: Mutex::new(Vec::new()),
            batcher_running: AtomicBool::new(false),
            pool_jobs: AtomicU64::new(0),
            batcher_rounds: AtomicU64::new(0),
            background_levels,
            background_in_flight: AtomicUsize::new(0),
            inline_below,
            slo: slo.map(|c| Slo::new(c, Instant::now())),
            fast: Streak::new(),
            inline_runs: AtomicU64::new(0),
            batcher_below,
            batch_time: Average::default(),
            batcher_runs: AtomicU64::new(0),
            inline_min_gap_ns: u64::try_from(inline_min_gap.as_nanos()).unwrap_or(u64::MAX),
            last_arrival_ns: AtomicU64::new(0),
            gap_ns: AtomicU64::new(0),
            started: Instant::now(),
            counts_tokens: model.count_tokens(&[]).is_some(),
            last_batch_ns: AtomicU64::new(0),
            model,
        });
        ModelWorker { shared }
    }

    /// The batcher loop. Returns `Ok` when the worker is closed and drained or `cancel` fires,
    /// and an error after a batch whose backend panicked (that batch's callers already have
    /// their INTERNAL answer; queued requests stay queued for the next run of the loop).
    pub async fn run(&self, cancel: &CancellationToken) -> Result<(), WorkerFailure> {
        run(&self.shared, cancel).await
    }

    /// Whether the worker has stopped for good (closed and drained, or failed after `stop`).
    pub fn is_finished(&self) -> bool {
        *self.shared.finished.borrow()
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn config(&self) -> &ModelConfig {
        self.shared.model.config()
    }

    /// The model's own token count of each text ([`Model::count_tokens`]); `None` when the model
    /// has no tokenizer. Tokenizes on the calling thread: call it from a blocking thread.
    pub fn count_tokens(
        &self,
        texts: &[&str],
    ) -> Option<Result<Vec<usize>, veraltheim_models::Error>> {
        self.shared.model.count_tokens(texts)
    }

    /// Whether `req` should have its tokens counted before [`submit`](Self::submit), on a
    /// blocking thread: the model counts tokens, nobody counted them yet, and its text is over
    /// [`INLINE_TOKEN_COUNT_BYTES`] (`submit` would otherwise tokenize it on the caller's thread).
    pub fn counts_tokens_off_runtime(&self, req: &Request) -> bool {
        self.shared.counts_tokens
            && req.tokens.is_none()
            && req.inputs.iter().map(text_bytes).sum::<usize>() > INLINE_TOKEN_COUNT_BYTES
    }

    /// Counts the tokens of `req` with the model's tokenizer and keeps them in it (a text model;
    /// others: nothing to do). Tokenizes on the calling thread: call it from a blocking thread.
    pub fn count_tokens_of(&self, req: &mut Request) -> Result<(), InferError> {
        req.tokens = count(&self.shared, &req.inputs)?;
        Ok(())
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut snapshot = self.shared.stats.snapshot(self.shared.queue.depth());
        snapshot.slo = self.slo();
        snapshot
    }

    /// The latency objective and its controller's state, when the model has one.
    pub fn slo(&self) -> Option<SloSnapshot> {
        let s = &self.shared;
        let slo = s.slo.as_ref()?;
        let (window_count, window_p99) = slo.window.lock().all(Instant::now());
        let c = slo.controller.lock();
        let (grows, shrinks) = c.counts();
        Some(SloSnapshot {
            objective: c.config().objective,
            window_count,
            window_p99,
            limit: c.limit(),
            max_limit: c.config().max_limit,
            batch_rows: c.batch_rows(),
            in_flight: s.background_in_flight.load(Ordering::Acquire),
            decision: c.decision().as_str(),
            reason: c.reason().to_string(),
            at_risk: c.at_risk(),
            grows,
            shrinks,
        })
    }

    /// The end-to-end latency of successful requests since the model loaded, in buckets
    /// bounded by `upper_us` (µs, ascending): `/metrics`'s histogram.
    pub fn latency_buckets(&self, upper_us: &[u64]) -> LatencyBuckets {
        self.shared.stats.latency_buckets(upper_us)
    }

    /// Counts a request answered from the response cache: a success that never reached the
    /// queue (`lookup` is the time the cache took).
    pub fn record_cache_hit(&self, lookup: Duration, total: Duration) {
        self.shared.stats.cache_hit.add(1, lookup);
        self.shared.stats.success.add(1, total);
    }

    /// Counts a cache lookup that missed; the request then runs as usual.
    pub fn record_cache_miss(&self, lookup: Duration) {
        self.shared.stats.cache_miss.add(1, lookup);
    }

    /// Jobs handed to the execution pool so far; a pool thread runs due batches in place, so
    /// under load this grows more slowly than the execution count. For diagnostics and tests.
    pub fn pool_jobs(&self) -> u64 {
        self.shared.pool_jobs.load(Ordering::Relaxed)
    }

    /// Rounds of the batcher loop so far: each is one wake-up of its task.
    pub fn batcher_rounds(&self) -> u64 {
        self.shared.batcher_rounds.load(Ordering::Relaxed)
    }

    /// Batches run on their caller's thread (see [`ModelWorker::submit`]).
    pub fn inline_runs(&self) -> u64 {
        self.shared.inline_runs.load(Ordering::Relaxed)
    }

    /// Batches run on the batcher task instead of the execution pool.
    pub fn batcher_runs(&self) -> u64 {
        self.shared.batcher_runs.load(Ordering::Relaxed)
    }

    pub fn queue_capacity(&self) -> usize {
        self.shared.queue.capacity()
    }

    /// Queues a request; the receiver yields its result. Refuses at once when the queue is full
    /// or the model is shutting down.
    pub fn submit(
        &self,
        req: Request,
    ) -> Result<oneshot::Receiver<Result<InferOutput, InferError>>, InferError> {
        let s = &self.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(InferError::Unavailable {
                model: s.name.clone(),
                reason: "the model is being unloaded".into(),
            });
        }
        let level =
            s.priority
                .level_of(req.priority)
                .map_err(|reason| InferError::InvalidRequest {
                    model: s.name.clone(),
                    reason,
                })?;
        s.model
            .check_request(&req.inputs)
            .map_err(|reason| InferError::InvalidRequest {
                model: s.name.clone(),
                reason,
            })?;
        let level_policy = s.priority.policy(level);
        let enqueued = Instant::now();
        let queue_expiry = level_policy.timeout_for(req.timeout).map(|t| enqueued + t);
        let delay_on_timeout = level_policy.delay;
        let deadline = req.deadline;
        let background = req.background || s.background_levels.contains(&level);
        let has_expiry = deadline.is_some() || queue_expiry.is_some();
        // Text models: the real count, here unless the caller counted it off its thread.
        let tokens = match req.tokens {
            Some(t) if s.counts_tokens => Some(t),
            _ => count(s, &req.inputs)?,
        };
        let key: BatchKey = req
            .inputs
            .iter()
            .map(|t| {
                (
                    t.name().to_string(),
                    t.shape().get(1..).unwrap_or_default().to_vec(),
                )
            })
            .collect();
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            req,
            reply,
            enqueued,
            level,
            queue_expiry,
            delay_on_timeout,
            delayed: false,
            deadline,
            key,
            tokens,
            passed: 0,
            background,
        };
        let Some(pending) = try_inline(s, pending) else {
            return Ok(rx);
        };
        if let Some(bounds) = &s.levels
            && let Err(capacity) = bounds.try_reserve(level)
        {
            s.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(InferError::QueueFull {
                model: s.name.clone(),
                capacity,
            });
        }
        if !s.queue.try_push(pending) {
            leave_level(s, level);
            s.stats
                .rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(InferError::QueueFull {
                model: s.name.clone(),
                capacity: s.queue.capacity(),
            });
        }
        // The batcher has work only when an instance is free or when this request carries an
        // expiry it must schedule a wake-up for. Otherwise every instance is busy, and the pool
        // thread that finishes first takes the next batch itself (`run_batches`): waking the
        // batcher would cost a context switch for nothing. The fence pairs with the SeqCst
        // decrement in `Instance::drop` (a store-then-load on each side): either this load sees
        // the freed instance, or the batcher, woken after that decrement, sees this request.
        std::sync::atomic::fence(Ordering::SeqCst);
        if has_expiry || s.inflight.load(Ordering::SeqCst) < s.instances {
            s.notify.notify_one();
        }
        Ok(rx)
    }

    /// Stops taking requests, lets queued and running ones finish for up to `grace`, then fails
    /// what is still queued with UNAVAILABLE. Batches already executing finish regardless.
    pub async fn stop(&self, grace: Duration) {
        let s = &self.shared;
        s.closed.store(true, Ordering::Release);
        s.notify.notify_one();
        let mut finished = s.finished.subscribe();
        if tokio::time::timeout(grace, finished.wait_for(|f| *f))
            .await
            .is_err()
        {
            s.abort.store(true, Ordering::Release);
            fail_all(s, "the model was unloaded before this request ran");
            s.finished.send_replace(true);
            s.notify.notify_one();
        }
    }
}

impl Drop for ModelWorker {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.abort.store(true, Ordering::Release);
        fail_all(&self.shared, "the model worker went away");
        self.shared.notify.notify_one();
    }
}

/// The tokens of a request to `s`'s model, when it counts them; a request its tokenizer refuses
/// (text that is not UTF-8) is refused alone.
fn count(s: &Shared, inputs: &[Tensor]) -> Result<Option<TokenCount>, InferError> {
    if !s.counts_tokens {
        return Ok(None);
    }
    match s.model.request_tokens(inputs) {
        None => Ok(None),
        Some(Ok(t)) => Ok(Some(t)),
        Some(Err(reason)) => Err(InferError::InvalidRequest {
            model: s.name.clone(),
            reason,
        }),
    }
}

/// The bytes of a BYTES tensor's elements (0 for other tensors).
fn text_bytes(t: &Tensor) -> usize {
    match t.data() {
        TensorData::Bytes(rows) => rows.iter().map(|r| r.len()).sum(),
        _ => 0,
    }
}

/// Answers every queued request with UNAVAILABLE.
fn fail_all(s: &Shared, reason: &str) {
    let mut pending = s.pending.lock();
    while let Some(p) = s.queue.pop() {
        pending.push_back(p);
    }
    let n = pending.len();
    for p in pending.drain(..) {
        leave_level(s, p.level);
        let _ = p.reply.send(Err(InferError::Unavailable {
            model: s.name.clone(),
            reason: reason.to_string(),
        }));
    }
    s.queue.release(n);
}

/// The batcher: bookkeeping only, no model code.
async fn run(s: &Arc<Shared>, cancel: &CancellationToken) -> Result<(), WorkerFailure> {
    let _running = BatcherRunning::enter(s);
    // Two buffers take turns: the pool fills one while the batcher sends from the other.
    let mut sending = Vec::new();
    loop {
        s.batcher_rounds.fetch_add(1, Ordering::Relaxed);
        deliver(s, &mut sending);
        if let Some(message) = s.panicked.lock().take() {
            return Err(WorkerFailure(format!("backend panicked: {message}")));
        }
        if s.abort.load(Ordering::Acquire) {
            fail_all(s, "the model was unloaded before this request ran");
            s.finished.send_replace(true);
            return Ok(());
        }
        // Batches this round ran on this task (tiny ones: `on_batcher`).
        let mut ran_here = 0;
        let wake = {
            let mut pending = s.pending.lock();
            let now = Instant::now();
            let mut wake = collect(s, &mut pending, now);
            if let Some(slo) = &s.slo {
                let tick = control(s, slo, now);
                wake = Some(wake.map_or(tick, |w| w.min(tick)));
            }
            // The instance is taken before the batch: a caller running its request inline
            // (`try_inline`) takes one the same way.
            while !pending.is_empty() && ran_here < BATCHES_IN_PLACE && take_instance(s) {
                match next_batch(s, &mut pending, now) {
                    Next::Run(batch) if on_batcher(s) => {
                        ran_here += 1;
                        run_on_batcher(s, batch);
                    }
                    Next::Run(batch) => {
                        s.pool_jobs.fetch_add(1, Ordering::Relaxed);
                        let shared = s.clone();
                        s.pool.spawn(move || run_batches(&shared, batch));
                    }
                    Next::Wait(at) => {
                        give_back_unused_instance(s);
                        wake = Some(wake.map_or(at, |w| w.min(at)));
                        break;
                    }
                    Next::Idle => {
                        give_back_unused_instance(s);
                        break;
                    }
                }
            }
            if s.closed.load(Ordering::Acquire)
                && pending.is_empty()
                && s.queue.depth() == 0
                && s.inflight.load(Ordering::Acquire) == 0
            {
                s.finished.send_replace(true);
                return Ok(());
            }
            wake
        };
        if ran_here > 0 {
            // Their answers go out now; then the tasks this one shares a thread with (the
            // connections its callers wait on) run before the next round. A model kept busy
            // this way never reaches the wait below, so the loop's cancellation is read here.
            deliver(s, &mut sending);
            tokio::task::yield_now().await;
            if cancel.is_cancelled() {
                return Ok(());
            }
            continue;
        }
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = s.notify.notified() => {}
            _ = sleep => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// Whether the batch the batcher just formed runs on the batcher task: the model's batches are
/// measured tiny (see the module's header) and it is not being torn down.
fn on_batcher(s: &Shared) -> bool {
    s.batcher_below
        .is_some_and(|bound| s.batch_time.within(bound))
        && !s.abort.load(Ordering::Acquire)
}

/// Runs a batch on the batcher task, holding the instance the batcher took for it; its answers
/// wait in `answers` for the batcher's next delivery.
fn run_on_batcher(s: &Shared, batch: Vec<Pending>) {
    s.batcher_runs.fetch_add(1, Ordering::Relaxed);
    execute(s, batch);
    s.inflight.fetch_sub(1, Ordering::SeqCst);
}

/// Takes one of the model's instances if one is free.
fn take_instance(s: &Shared) -> bool {
    s.inflight
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < s.instances).then_some(n + 1)
        })
        .is_ok()
}

/// The batcher gives back an instance it took for a batch the policy did not form (wait or
/// idle). It holds the pending list and has its wake-up time; only a request that a caller
/// queued meanwhile (finding the instance taken, it did not wake the batcher) needs another
/// look. Waking on anything else would make the batcher spin: it would wake, find the same
/// list, take the instance, give it back and wake itself again.
fn give_back_unused_instance(s: &Shared) {
    s.inflight.fetch_sub(1, Ordering::SeqCst);
    std::sync::atomic::fence(Ordering::SeqCst);
    if !s.queue.ring_is_empty() {
        s.notify.notify_one();
    }
}

/// Gives back an instance after an inline batch, and wakes the batcher unless it provably has
/// nothing to do. A caller that queued its request
/// while the instance was taken did not wake it (`submit`); the fence pairs with the one there.
fn give_back_instance(s: &Shared) {
    s.inflight.fetch_sub(1, Ordering::SeqCst);
    std::sync::atomic::fence(Ordering::SeqCst);
    let idle = s.queue.depth() == 0
        && !s.closed.load(Ordering::Acquire)
        && s.panicked.lock().is_none()
        && s.pending.try_lock().is_some_and(|p| p.is_empty());
    if !idle {
        s.notify.notify_one();
    }
}

/// Runs a request on the caller's thread when that costs less than handing it to the batcher
/// and a pool thread and back (two thread wake-ups, tens of µs): the model's last
/// `streak_needed` batches each executed within `inline_below` (short models: identity, small
/// ones), nothing is queued ahead of it, the batching policy would run it alone now (no queue
/// delay to wait out), and an instance is free. Returns the request when it must be queued.
///
/// Then, while batches are due (requests that queued meanwhile: their callers found the
/// instance taken), it runs them too, up to [`INLINE_BATCHES`] in all.
///
/// Why this cannot stall the runtime for long: only a model measured fast runs inline, at most
/// [`INLINE_BATCHES`] batches per caller, and an inline batch slower than the bound ends the run
/// and turns inline off until twice as many fast batches in a row have been seen (up to
/// [`INLINE_STREAK_MAX`]).
fn try_inline(s: &Shared, p: Pending) -> Option<Pending> {
    let Some(bound) = s.inline_below else {
        return Some(p);
    };
    if arrival_gap(s, p.enqueued) < s.inline_min_gap_ns
        || !s.fast.shown()
        || s.queue.depth() > 0
        || s.abort.load(Ordering::Acquire)
    {
        return Some(p);
    }
    match s.pending.try_lock() {
        Some(pending) if pending.is_empty() => {}
        _ => return Some(p),
    }
    let item = item_of(s, &p, p.enqueued, Duration::ZERO);
    if !matches!(s.policy.plan(&[item], p.enqueued), Plan::Run(_)) || !take_instance(s) {
        return Some(p);
    }
    let mut batch = vec![p];
    let mut runs = 0;
    loop {
        runs += 1;
        s.inline_runs.fetch_add(1, Ordering::Relaxed);
        let took = execute(s, batch);
        // The answers go out from here: the callers' tasks are woken from this runtime thread,
        // without a hop through the batcher.
        deliver(s, &mut Vec::new());
        if took > bound {
            s.fast.ran_slow();
            tracing::debug!(model = %s.name, took_us = took.as_micros() as u64, "an inline batch ran slow");
            break;
        }
        if runs == INLINE_BATCHES {
            break;
        }
        // Requests that queued meanwhile (their callers found the instance taken) run here
        // too, while they are due: a hand-off to the pool would cost them what this one saved.
        match next_in_place(s) {
            Some(next) => batch = next,
            None => break,
        }
    }
    give_back_instance(s);
    None
}

/// Records an arrival at `at` and returns the average gap between the model's arrivals, ns (see
/// the module's header). Concurrent callers may each fold in a gap from the same last arrival:
/// the average stays an estimate, which is all the rule needs.
fn arrival_gap(s: &Shared, at: Instant) -> u64 {
    let now = u64::try_from(at.saturating_duration_since(s.started).as_nanos()).unwrap_or(u64::MAX);
    let last = s.last_arrival_ns.swap(now, Ordering::Relaxed);
    let average = fold_gap(s.gap_ns.load(Ordering::Relaxed), last, now);
    s.gap_ns.store(average, Ordering::Relaxed);
    average
}

/// The average gap after an arrival at `now` (ns) following one at `last` (0: none yet, counted
/// as a long idle time): the gap, up to [`GAP_CAP`], folded into `average` with weight 1/8.
fn fold_gap(average: u64, last: u64, now: u64) -> u64 {
    let cap = u64::try_from(GAP_CAP.as_nanos()).unwrap_or(u64::MAX);
    let gap = if last == 0 {
        cap
    } else {
        now.saturating_sub(last).min(cap)
    };
    average - average / 8 + gap / 8
}

/// How many batches a pool thread runs back to back before it hands the model back to the
/// batcher: the pool is shared by every model, and a job that re-queues itself goes behind the
/// other models' batches already waiting for a thread. Likewise the most tiny batches the
/// batcher runs in one round before it yields its runtime thread (`on_batcher`).
const BATCHES_IN_PLACE: usize = 16;

/// Runs on a pool thread, holding one of the model's instances: executes `batch`, then, while
/// the next batch is already due, takes and runs it here. A busy model thus costs no hand-off
/// back to the batcher task and out to another pool thread per batch (two thread wake-ups). The
/// instance is given back, and the batcher woken, once nothing is due.
fn run_batches(s: &Arc<Shared>, batch: Vec<Pending>) {
    // Gives the instance back even if this job unwinds (a panic `execute` did not catch, left to
    // the pool's handler): a lost instance would stall the model for good.
    let _instance = Instance(s);
    let mut next = Some(batch);
    let mut runs = 0;
    while let Some(batch) = next.take() {
        execute(s, batch);
        runs += 1;
        if runs < BATCHES_IN_PLACE {
            next = next_in_place(s);
        }
        if next.is_some() {
            // This batch's answers go out while the next one runs.
            s.notify.notify_one();
        }
    }
}

/// One of the model's instances, held by a pool job; given back (and the batcher woken) on drop.
struct Instance<'a>(&'a Shared);

impl Drop for Instance<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        self.0.notify.notify_one();
    }
}

/// Marks a batcher loop as running; when it ends (returns, fails or is dropped), sends what is
/// left in `answers`, so that nothing waits for a batcher that is gone.
struct BatcherRunning<'a>(&'a Shared);

impl<'a> BatcherRunning<'a> {
    fn enter(s: &'a Shared) -> Self {
        s.batcher_running.store(true, Ordering::SeqCst);
        BatcherRunning(s)
    }
}

impl Drop for BatcherRunning<'_> {
    fn drop(&mut self) {
        self.0.batcher_running.store(false, Ordering::SeqCst);
        deliver(self.0, &mut Vec::new());
    }
}

/// Sends the answers that finished batches left in `s.answers`. `sending` is an empty buffer
/// that takes their place (and is left empty, with its capacity, for the next call).
fn deliver(s: &Shared, sending: &mut Vec<Answer>) {
    std::mem::swap(sending, &mut *s.answers.lock());
    for (reply, answer) in sending.drain(..) {
        let _ = reply.send(answer);
    }
}

/// Hands a finished batch's answers to the batcher (or sends them, when no batcher runs).
fn hand_over(s: &Shared, answers: impl Iterator<Item = Answer>) {
    s.answers.lock().extend(answers);
    // Pairs with the SeqCst store in `BatcherRunning::drop`: either the batcher's last delivery
    // comes after the extend above, or this load sees that no batcher runs.
    if !s.batcher_running.load(Ordering::SeqCst) {
        deliver(s, &mut Vec::new());
    }
}

/// The batch due now, if any, taken by a pool thread that just finished one. Leaves the
/// decision to the batcher when it holds the list, after a panic, on abort, or when the policy
/// says to wait (the batcher then schedules the wake-up).
fn next_in_place(s: &Shared) -> Option<Vec<Pending>> {
    if s.abort.load(Ordering::Acquire) || s.panicked.lock().is_some() {
        return None;
    }
    let mut pending = s.pending.try_lock()?;
    let now = Instant::now();
    collect(s, &mut pending, now);
    match next_batch(s, &mut pending, now) {
        Next::Run(batch) => Some(batch),
        Next::Wait(_) | Next::Idle => None,
    }
}

/// Moves what arrived on the ring into `pending`, answers the requests that are gone or out of
/// time and puts the rest in order. Returns the earliest expiry still ahead.
fn collect(s: &Shared, pending: &mut VecDeque<Pending>, now: Instant) -> Option<Instant> {
    while let Some(p) = s.queue.pop() {
        pending.push_back(p);
    }
    let wake = drop_dead(s, pending, now);
    let background_last = s.slo.is_some() && pending.iter().any(|p| p.background);
    if background_last || s.priority.ordered() || pending.iter().any(|p| p.delayed) {
        reorder(s, pending, now);
    }
    wake
}

enum Next {
    /// A batch to execute, taken out of the queue (its slots given back).
    Run(Vec<Pending>),
    /// Nothing is due before this instant.
    Wait(Instant),
    Idle,
}

/// Asks the batching policy what `pending` allows now, and takes the batch when one is due.
/// With a latency objective (rule 1 of [`crate::slo`]), background requests are not shown to the
/// policy while an online request waits: the batch is planned from the online requests alone and,
/// when it leaves, filled ([`BatchPolicy::fill`]) with as many background rows as the
/// controller's limit leaves room for and its bound per batch allows (rule 5), unless
/// `background_fill` is off. A batch of background requests alone is shown all of them but takes
/// only as many rows as that room: a text model then forms it of similar lengths out of every
/// background request that waits, not only the first few. A text model's batch holding
/// background rows (filled or background alone) is also held to rule 5's padded tokens.
fn next_batch(s: &Shared, pending: &mut VecDeque<Pending>, now: Instant) -> Next {
    // Text models: a request must run in the next batch once its deadline is nearer than the
    // batching delay and two batches as long as the last one.
    let margin = s.policy.max_delay
        + Duration::from_nanos(s.last_batch_ns.load(Ordering::Relaxed)).saturating_mul(2);
    let item = |p| item_of(s, p, now, margin);
    // Positions in `pending` of the requests shown to the policy, when not all of them are.
    let mut shown: Option<Vec<usize>> = None;
    let mut max_rows = usize::MAX;
    // Background rows an online batch may be filled with.
    let mut fill = 0;
    // A text model's batch holding background rows is held to rule 5's padded tokens.
    let mut token_cap = usize::MAX;
    let mut background_only = false;
    let items: Vec<Item<'_, BatchKey>> = match &s.slo {
        Some(slo) if pending.iter().any(|p| p.background) => {
            let background = pending.iter().filter(|p| p.background).count();
            let room = slo
                .limit
                .load(Ordering::Acquire)
                .saturating_sub(s.background_in_flight.load(Ordering::Acquire))
                .min(slo.batch_rows.load(Ordering::Acquire));
            if background > room {
                slo.held_back.store(true, Ordering::Relaxed);
            }
            token_cap = slo.batch_tokens.load(Ordering::Acquire);
            if background < pending.len() || room == 0 {
                if slo.fill {
                    // Every online row waiting counts against rule 5's bound, not only the
                    // batch's own: a filled batch lasts no longer than a batch of background
                    // rows alone may, and under a burst of online requests (which the next
                    // batches must serve) it takes fewer background rows. (Counting only the
                    // batch's own rows let the filled batches grow under bursts: measured, the
                    // online p99 then broke the objective in 2–4 of 4 windows.)
                    let online: usize = pending
                        .iter()
                        .filter(|p| !p.background)
                        .map(|p| p.req.rows)
                        .sum();
                    fill = room.min(
                        slo.batch_rows
                            .load(Ordering::Acquire)
                            .saturating_sub(online),
                    );
                }
                let positions: Vec<usize> = (0..pending.len())
                    .filter(|&i| !pending[i].background)
                    .collect();
                let items = positions.iter().map(|&i| item(&pending[i])).collect();
                shown = Some(positions);
                items
            } else {
                max_rows = room;
                background_only = true;
                pending.iter().map(item).collect()
            }
        }
        _ => pending.iter().map(item).collect(),
    };
    // Built only for a batch that may hold background rows (the policy holds a Vec).
    let capped = (token_cap != usize::MAX && (background_only || fill > 0))
        .then(|| s.policy.with_token_cap(token_cap));
    let background_policy = capped.as_ref().unwrap_or(&s.policy);
    let policy = if background_only {
        background_policy
    } else {
        &s.policy
    };
    match policy.plan_within(&items, now, max_rows) {
        Plan::Run(positions) => {
            let mut positions: Vec<usize> = match &shown {
                Some(shown) => positions.iter().map(|&j| shown[j]).collect(),
                None => positions,
            };
            let filled = if fill > 0 {
                let all: Vec<Item<'_, BatchKey>> = pending.iter().map(item).collect();
                let background: Vec<usize> = (0..pending.len())
                    .filter(|&i| pending[i].background)
                    .collect();
                background_policy.fill(&all, &positions, &background, fill)
            } else {
                Vec::new()
            };
            count_passes(pending, shown.as_deref(), &positions);
            if !filled.is_empty() {
                positions.extend(filled);
                positions.sort_unstable();
            }
            let batch = take(pending, &positions);
            s.queue.release(batch.len());
            let background = batch.iter().filter(|p| p.background).count();
            if background > 0 {
                s.background_in_flight
                    .fetch_add(background, Ordering::AcqRel);
            }
            for p in &batch {
                leave_level(s, p.level);
            }
            Next::Run(batch)
        }
        Plan::Wait(at) => Next::Wait(at),
        Plan::Idle => Next::Idle,
    }
}

/// What the batching policy sees of `p`.
fn item_of<'a>(s: &Shared, p: &'a Pending, now: Instant, margin: Duration) -> Item<'a, BatchKey> {
    let mut item = Item::new(p.enqueued, p.req.rows, &p.key);
    if let Some(t) = p.tokens {
        let background_last = s.slo.is_some();
        item.tokens = t.longest;
        item.real = t.total;
        item.passed = p.passed;
        // The rank `reorder` sorts by, as one number.
        let (delayed, level) = if background_last && p.background {
            (p.delayed, u32::MAX)
        } else {
            s.priority.rank(
                p.level,
                p.delayed,
                now.saturating_duration_since(p.enqueued),
            )
        };
        item.class = (u64::from(background_last && p.background) << 40)
            | (u64::from(delayed) << 32)
            | u64::from(level);
        let expiry = p.queue_expiry.filter(|_| !p.delay_on_timeout);
        item.urgent_at = [p.deadline, expiry]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.checked_sub(margin).unwrap_or(p.enqueued));
    }
    item
}

/// Text requests shown to the policy with the dimensions of the batch at `positions` (ascending),
/// not taken, and ahead of a request taken: one more pass each (the batcher's rule 4).
fn count_passes(pending: &mut VecDeque<Pending>, shown: Option<&[usize]>, positions: &[usize]) {
    let (Some(&first), Some(&last)) = (positions.first(), positions.last()) else {
        return;
    };
    if pending[first].tokens.is_none() {
        return;
    }
    let passed: Vec<usize> = match shown {
        Some(shown) => shown.to_vec(),
        None => (0..pending.len()).collect(),
    }
    .into_iter()
    // Passed over: left behind while a request after it in the order went. One behind every
    // request taken only waits its turn (a background batch capped by the controller's room
    // leaves most of the waiting ones so).
    .filter(|&i| {
        i < last && positions.binary_search(&i).is_err() && pending[i].key == pending[first].key
    })
    .collect();
    for i in passed {
        pending[i].passed = pending[i].passed.saturating_add(1);
    }
}

/// Puts the waiting requests in the order the batcher should consider them: by priority
/// ([`PriorityPolicy::rank`]); with a latency objective, background requests after every online
/// one, without aging (rule 1 of [`crate::slo`]).
fn reorder(s: &Shared, pending: &mut VecDeque<Pending>, now: Instant) {
    let priority: &PriorityPolicy = &s.priority;
    let background_last = s.slo.is_some();
    let keys: Vec<(bool, (bool, u32))> = pending
        .iter()
        .map(|p| {
            if background_last && p.background {
                (true, (p.delayed, u32::MAX))
            } else {
                let waited = now.saturating_duration_since(p.enqueued);
                (false, priority.rank(p.level, p.delayed, waited))
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| keys[i]);
    if order.iter().enumerate().all(|(i, &j)| i == j) {
        return;
    }
    let mut slots: Vec<Option<Pending>> = pending.drain(..).map(Some).collect();
    pending.extend(order.into_iter().filter_map(|i| slots[i].take()));
}

/// The controller's tick, when one is due (every [`TICK`], or sooner after a breach of the
/// objective); returns when the next one is due.
fn control(s: &Shared, slo: &Slo, now: Instant) -> Instant {
    let mut last = slo.last_tick.lock();
    let due = *last + TICK;
    let breach = slo.breach.load(Ordering::Acquire) && now >= *last + TICK / 10;
    if now < due && !breach {
        return due;
    }
    slo.breach.store(false, Ordering::Release);
    let elapsed = now
        .saturating_duration_since(*last)
        .max(Duration::from_micros(1));
    *last = now;
    let busy_ns = slo.online_busy_ns.swap(0, Ordering::AcqRel) as f64;
    let online_busy = (busy_ns / (elapsed.as_nanos() as f64 * s.instances.max(1) as f64)).min(1.0);
    let mut c = slo.controller.lock();
    let mut w = slo.window.lock();
    let (online_count, online_p99) = w.since(c.read_from(now), now);
    let (_, online_p99_since_decrease) = w.since(c.since_decrease(), now);
    let o = Observation {
        online_count,
        online_p99,
        online_p99_since_decrease,
        in_flight: s.background_in_flight.load(Ordering::Acquire),
        held_back: slo.held_back.swap(false, Ordering::AcqRel),
        online_busy,
        batch_cost: slo.cost.lock().estimate(),
        token_cost: slo.token_cost.lock().estimate(),
    };
    let before = c.limit();
    if c.tick(&o, now) == Decision::Shrink {
        w.cut(now);
    }
    slo.limit.store(c.limit(), Ordering::Release);
    slo.batch_rows
        .store(c.batch_rows().unwrap_or(usize::MAX), Ordering::Release);
    slo.batch_tokens
        .store(c.batch_tokens().unwrap_or(usize::MAX), Ordering::Release);
    if c.limit() != before {
        tracing::debug!(model = %s.name, limit = c.limit(), reason = c.reason(), "background limit");
    }
    now + TICK
}

/// Answers and removes requests whose caller left or whose time is up (a DELAY policy demotes
/// instead of refusing); returns the earliest expiry still ahead, so the batcher wakes for it even
/// while the model is busy.
fn drop_dead(s: &Shared, pending: &mut VecDeque<Pending>, now: Instant) -> Option<Instant> {
    let mut next: Option<Instant> = None;
    let mut removed = 0;
    let mut kept = VecDeque::with_capacity(pending.len());
    for mut p in pending.drain(..) {
        if p.reply.is_closed() {
            s.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            leave_level(s, p.level);
            removed += 1;
            continue;
        }
        let past_deadline = p.deadline.is_some_and(|d| d <= now);
        let past_queue_timeout = p.queue_expiry.is_some_and(|q| q <= now);
        if past_queue_timeout && !past_deadline && p.delay_on_timeout {
            p.delayed = true;
            p.queue_expiry = None;
        } else if past_deadline || past_queue_timeout {
            let waited = now.duration_since(p.enqueued);
            leave_level(s, p.level);
            s.stats.expired.fetch_add(1, Ordering::Relaxed);
            s.stats.fail.add(1, now.duration_since(p.req.received));
            let _ = p.reply.send(Err(InferError::DeadlineExceeded {
                model: s.name.clone(),
                waited,
            }));
            removed += 1;
            continue;
        }
        for at in [p.deadline, p.queue_expiry].into_iter().flatten() {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        kept.push_back(p);
    }
    *pending = kept;
    s.queue.release(removed);
    next
}

fn take(pending: &mut VecDeque<Pending>, positions: &[usize]) -> Vec<Pending> {
    if positions.len() == 1 && positions[0] == 0 {
        return pending.pop_front().into_iter().collect();
    }
    let mut batch = Vec::with_capacity(positions.len());
    let mut rest = VecDeque::with_capacity(pending.len());
    let mut next = positions.iter().peekable();
    for (i, p) in pending.drain(..).enumerate() {
        if next.peek() == Some(&&i) {
            next.next();
            batch.push(p);
        } else {
            rest.push_back(p);
        }
    }
    *pending = rest;
    batch
}

/// Why a batch got no outputs.
enum Failure {
    /// The backend returned an error, or its outputs could not be split: the batch's callers
    /// get INTERNAL, the worker carries on.
    Backend(String),
    /// Something panicked, in the backend or around it: the batch's callers get INTERNAL and
    /// the batcher loop ends with the failure, so that its supervisor counts a restart.
    Panicked(String),
}

/// When the backend call began and ended, for the compute statistics.
struct Marks {
    infer_start: Instant,
    infer_end: Instant,
}

/// Runs on an execution-pool thread: assembles the batch, calls the model, answers each caller.
/// Every step between taking the batch and answering runs under `catch_unwind`, not only the
/// backend call: a panic while concatenating the inputs or splitting the outputs must fail this
/// batch, not abort the process or leave its callers waiting.
/// Returns how long the batch took (the inline bound's measure).
fn execute(s: &Shared, batch: Vec<Pending>) -> Duration {
    let start = Instant::now();
    for p in &batch {
        s.stats.queue.add(1, start.duration_since(p.enqueued));
    }
    let rows: Vec<usize> = batch.iter().map(|p| p.req.rows).collect();
    let total: usize = rows.iter().sum();

    let mut marks = Marks {
        infer_start: start,
        infer_end: start,
    };
    let mut stage = "assembling the batch's inputs";
    let per_request = catch_unwind(AssertUnwindSafe(|| {
        compute(s, &batch, &rows, &mut marks, &mut stage)
    }))
    .unwrap_or_else(|panic| {
        let message = panic_message(&panic);
        Err(Failure::Panicked(if stage == EXECUTING {
            message
        } else {
            format!("while {stage}: {message}")
        }))
    });
    let done = Instant::now();
    // A batch that failed before or inside the backend call has no later marks.
    let infer_start = marks.infer_start;
    let infer_end = marks.infer_end.max(infer_start);
    let n = batch.len() as u64;
    s.stats.compute_input.add(n, infer_start - start);
    s.stats.compute_infer.add(n, infer_end - infer_start);
    s.stats
        .compute_output
        .add(n, done.saturating_duration_since(infer_end));
    s.stats.record_batch(total, infer_end - infer_start);
    let took = done.saturating_duration_since(start);
    if let Some(bound) = s.inline_below {
        s.fast.record(took, bound);
    }
    if s.batcher_below.is_some() {
        s.batch_time.record(took);
    }
    let took_ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    s.last_batch_ns.store(took_ns, Ordering::Relaxed);
    let background = batch.iter().filter(|p| p.background).count();
    let tokens = padded_and_real(&batch);
    if let Some(slo) = &s.slo {
        let online_rows: usize = batch
            .iter()
            .filter(|p| !p.background)
            .map(|p| p.req.rows)
            .sum();
        if online_rows > 0 {
            let share = took_ns as u128 * online_rows as u128 / total.max(1) as u128;
            slo.online_busy_ns
                .fetch_add(u64::try_from(share).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        slo.cost.lock().record(total, took);
        if let Some((padded, _)) = tokens {
            slo.token_cost
                .lock()
                .record(usize::try_from(padded).unwrap_or(usize::MAX), took);
        }
    }
    if background > 0 {
        s.background_in_flight
            .fetch_sub(background, Ordering::AcqRel);
    }

    match per_request {
        Ok(parts) => {
            if let Some((padded, real)) = tokens {
                s.stats.record_tokens(padded, real);
            }
            {
                let mut latency = s.stats.latency.lock();
                for p in &batch {
                    latency.record(
                        start.duration_since(p.enqueued),
                        done - start,
                        done.duration_since(p.req.received),
                    );
                }
            }
            if let Some(slo) = &s.slo
                && background < batch.len()
            {
                record_online(s, slo, &batch, done);
            }
            // Only a batch holding a traced request pays for its trace: the instants are the
            // ones read above; spans are made by the callers, off this thread.
            let trace = batch.iter().any(|p| p.req.span.is_some()).then(|| {
                BatchTrace::new(
                    [start, infer_start, infer_end, done],
                    total,
                    batch.len(),
                    batch.iter().filter_map(|p| p.req.span).collect(),
                )
            });
            let answers = batch.into_iter().zip(parts).map(|(p, outputs)| {
                s.stats.success.add(1, done.duration_since(p.req.received));
                let answer = Ok(InferOutput {
                    outputs,
                    queue: start.duration_since(p.enqueued),
                    compute: done - start,
                    batch_size: total,
                    batch: p.req.span.and_then(|_| trace.clone()),
                });
                (p.reply, answer)
            });
            hand_over(s, answers);
        }
        Err(failure) => {
            let (message, panicked) = match failure {
                Failure::Backend(m) => (m, false),
                Failure::Panicked(m) => (m, true),
            };
            tracing::warn!(model = %s.name, batch = total, %message, panicked, "batch failed");
            if panicked {
                *s.panicked.lock() = Some(message.clone());
            }
            let answers = batch.into_iter().map(|p| {
                s.stats.fail.add(1, done.duration_since(p.req.received));
                let err = if panicked {
                    InferError::Panicked {
                        model: s.name.clone(),
                        message: message.clone(),
                    }
                } else {
                    InferError::Backend {
                        model: s.name.clone(),
                        message: message.clone(),
                    }
                };
                (p.reply, Err(err))
            });
            hand_over(s, answers);
        }
    }
    took
}

/// A text batch's tokens as the model runs it: padded (every row padded to the longest) and
/// real. `None` when its requests have no token counts.
fn padded_and_real(batch: &[Pending]) -> Option<(u64, u64)> {
    let (mut rows, mut longest, mut real) = (0usize, 0usize, 0usize);
    for p in batch {
        let t = p.tokens?;
        rows += p.req.rows;
        longest = longest.max(t.longest);
        real += t.total;
    }
    Some((rows.saturating_mul(longest) as u64, real as u64))
}

/// Puts a finished batch's online requests into the objective's window; one over the controller's
/// decrease threshold ([`crate::slo::SHRINK_ABOVE`] of the objective) makes the batcher tick at
/// once.
fn record_online(s: &Shared, slo: &Slo, batch: &[Pending], done: Instant) {
    let objective = slo.objective.mul_f64(crate::slo::SHRINK_ABOVE);
    let mut over = false;
    {
        let mut w = slo.window.lock();
        for p in batch.iter().filter(|p| !p.background) {
            let total = done.saturating_duration_since(p.req.received);
            over |= total > objective;
            w.record(done, total);
        }
    }
    if over {
        slo.breach.store(true, Ordering::Release);
        s.notify.notify_one();
    }
}

/// `execute`'s stage while the backend runs: a panic there is the backend's own, reported as is.
const EXECUTING: &str = "executing";

/// The part of `execute` that may panic: concatenates the inputs, runs the backend, splits its
/// outputs per request and keeps the outputs each asked for. `stage` says where it is, for the
/// message of a panic.
fn compute(
    s: &Shared,
    batch: &[Pending],
    rows: &[usize],
    marks: &mut Marks,
    stage: &mut &'static str,
) -> Result<Vec<Vec<Tensor>>, Failure> {
    let inputs: Vec<Tensor> = if batch.len() == 1 {
        batch[0].req.inputs.clone()
    } else {
        (0..batch[0].req.inputs.len())
            .map(|i| {
                let parts: Vec<&Tensor> = batch.iter().map(|p| &p.req.inputs[i]).collect();
                Tensor::concat(&parts).map_err(|e| Failure::Backend(e.to_string()))
            })
            .collect::<Result<_, _>>()?
    };
    *stage = EXECUTING;
    marks.infer_start = Instant::now();
    let outputs = s
        .model
        .execute(&inputs)
        .map_err(|e| Failure::Backend(e.to_string()))?;
    marks.infer_end = Instant::now();
    *stage = "splitting the batch's outputs";
    #[cfg(test)]
    tests::panic_after_execute(&s.name, &outputs);
    let parts = split_outputs(s, outputs, rows, batch.len()).map_err(Failure::Backend)?;
    Ok(batch
        .iter()
        .zip(parts)
        .map(|(p, outputs)| {
            if p.req.outputs.is_empty() {
                outputs
            } else {
                outputs
                    .into_iter()
                    .filter(|t| p.req.outputs.iter().any(|o| o == t.name()))
                    .collect()
            }
        })
        .collect())
}

fn split_outputs(
    s: &Shared,
    outputs: Vec<Tensor>,
    rows: &[usize],
    requests: usize,
) -> Result<Vec<Vec<Tensor>>, String> {
    if requests == 1 {
        return Ok(vec![outputs]);
    }
    let mut per_request: Vec<Vec<Tensor>> = (0..requests)
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for out in outputs {
        let parts = out
            .split(rows)
            .map_err(|e| format!("model '{}' returned a bad batch: {e}", s.name))?;
        for (dst, part) in per_request.iter_mut().zip(parts) {
            dst.push(part);
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use veraltheim_models::{Tensor, builtin};

    use super::{ModelWorker, WorkerOptions};
    use crate::error::InferError;
    use crate::pool::ExecutionPool;
    use crate::request::Request;

    /// A model of this name makes the step after `execute` panic when its first output starts
    /// with a negative number: the panic that a backend's malformed outputs (or a bug in the
    /// splitting) would cause there, injected because a well-formed `Tensor` cannot cause it.
    const PANIC_AFTER_EXECUTE: &str = "test-panic-after-execute";

    pub(super) fn panic_after_execute(model: &str, outputs: &[Tensor]) {
        let negative = || {
            outputs
                .first()
                .and_then(|t| t.f32_values().ok())
                .and_then(|v| v.first().copied())
                .is_some_and(|v| v < 0.0)
        };
        if model == PANIC_AFTER_EXECUTE && negative() {
            panic!("injected panic after execute");
        }
    }

    fn identity(name: &str) -> Arc<dyn veraltheim_models::Model> {
        // A built-in identity under another name, as a repository model of backend `builtin`.
        let mut config = builtin::config("identity")
            .unwrap()
            .with_override(r#"{"parameters":{"builtin":{"string_value":"identity"}}}"#)
            .unwrap();
        config.name = name.to_string();
        builtin::instantiate(config).unwrap()
    }

    fn row(v: f32) -> Request {
        Request::new(
            vec![Tensor::from_f32("INPUT0", vec![1, 2], &[v, 1.0]).unwrap()],
            1,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_after_execute_fails_the_batch_and_restarts_the_worker() {
        let pool = ExecutionPool::new(1).unwrap();
        let worker = ModelWorker::new(
            identity(PANIC_AFTER_EXECUTE),
            pool.clone(),
            &WorkerOptions::default(),
        );
        let first = worker.submit(row(-1.0)).unwrap();
        let cancel = CancellationToken::new();
        // The loop ends with the failure: that is what its supervisor counts as a restart.
        let failure = tokio::time::timeout(Duration::from_secs(10), worker.run(&cancel))
            .await
            .expect("the batcher loop must end after the panic")
            .unwrap_err();
        assert!(
            failure.0.contains("splitting the batch's outputs")
                && failure.0.contains("injected panic after execute"),
            "{failure}"
        );
        match first.await.unwrap() {
            Err(InferError::Panicked { message, .. }) => {
                assert!(
                    message.contains("injected panic after execute"),
                    "{message}"
                )
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert_eq!(worker.stats().fail.count, 1);

        // The process lives and the pool with it: another model on the same pool is served.
        let other = ModelWorker::start(identity("healthy"), pool, &WorkerOptions::default());
        let ok = other.submit(row(5.0)).unwrap().await.unwrap().unwrap();
        assert_eq!(ok.outputs[0].f32_values().unwrap(), vec![5.0, 1.0]);

        // The restarted loop serves the model again: the failed batch gave its instance back.
        worker.run_detached();
        let later = tokio::time::timeout(Duration::from_secs(10), worker.submit(row(2.0)).unwrap())
            .await
            .expect("a request after the restart must be served")
            .unwrap()
            .unwrap();
        assert_eq!(later.outputs[0].f32_values().unwrap(), vec![2.0, 1.0]);
        assert_eq!(worker.stats().success.count, 1);
    }

    #[test]
    fn the_arrival_gap_is_an_average_that_follows_the_traffic() {
        use super::{DEFAULT_INLINE_MIN_GAP, GAP_CAP, fold_gap};
        let us = |n: u64| n * 1_000;
        let threshold = DEFAULT_INLINE_MIN_GAP.as_nanos() as u64;
        // The first arrival counts as one after a long idle time: inline may run at once.
        let mut avg = fold_gap(0, 0, us(5));
        assert!(avg >= threshold, "{avg}");
        // Arrivals 30 µs apart (many callers): under the threshold within a few.
        let mut at = us(5);
        let mut below = None;
        for i in 0..40 {
            at += us(30);
            avg = fold_gap(avg, at - us(30), at);
            if avg < threshold && below.is_none() {
                below = Some(i);
            }
        }
        assert!(below.is_some_and(|i| i < 8), "{below:?}");
        assert!(avg < us(40), "settles near the gap: {avg}");
        // One caller, a request every 250 µs: above the threshold again.
        for _ in 0..40 {
            at += us(250);
            avg = fold_gap(avg, at - us(250), at);
        }
        assert!(avg > threshold && avg <= us(250), "{avg}");
        // An idle minute counts as GAP_CAP, so the next burst is seen within about 20 arrivals.
        let cap = GAP_CAP.as_nanos() as u64;
        avg = fold_gap(avg, at, at + 60_000_000_000);
        assert!(avg <= cap, "{avg}");
        let mut n = 0;
        while avg >= threshold {
            avg = fold_gap(avg, at, at + us(10));
            at += us(10);
            n += 1;
        }
        assert!(n <= 20, "{n} arrivals");
    }
}
