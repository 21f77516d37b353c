//! Latency objectives and the controller of background work (online and batch on one model).
//!
//! A model may set `parameters.latency_slo_p99_ms`: the 99th percentile of its *online*
//! requests' end-to-end time (received → answered) that it should keep. Background requests —
//! batch inference jobs (`Request::background`) and any priority level listed in
//! `parameters.background_priority_levels` — then run under a [`Controller`] that decides how many
//! of them may be in flight (taken into a batch and not yet answered) at once.
//!
//! # The rules
//!
//! 1. **Order.** With an objective, a background request ranks behind every online request and
//!    does not age: an online request that is queued runs in the next batch the model forms, so a
//!    background batch delays it by at most the batch already executing on its instance (one
//!    batch). While an online request waits, the batch is planned from the online requests alone
//!    (a text model's by length, `batcher.rs`: an online request of another length than the
//!    oldest may wait for the next online batch, but a batch is never formed around a
//!    background request while an online one waits). As it leaves, it is **filled** with
//!    background rows unless `background_fill` is false ([`crate::BatchPolicy::fill`]: of its dimensions, a text batch
//!    only with rows that keep its padding within `max_padding_ratio`): as many as the limit
//!    leaves room for, and no more than rule 5's bound less the online rows waiting, so a filled
//!    batch lasts no longer than a background batch may. Why: on a CPU backend a row in a batch
//!    of one costs much more than a row in a full batch (MiniLM on one ONNX Runtime thread:
//!    5.1 ms alone, 3.5 ms per row at 16). Online requests at half the model's capacity ran in
//!    batches of their own of 1.2–1.3 rows and kept the instances 75–80% busy, so the batch job
//!    got 0.39–0.59 of the capacity online left (docs/PERFORMANCE.md, session 11). Filled
//!    batches are larger, so background rows cost less each; the price is online latency (each
//!    online request's batch is longer), which the controller keeps within the objective like
//!    any other. Measured (docs/PERFORMANCE.md, session 12, `cosched`, online at half the
//!    capacity, objective 100 ms): with the default bound (40% of the objective) and batches
//!    held to their padded tokens (rule 5), the batch job got 0.62–0.68 of what online left and
//!    the objective held in every 10-s window of both runs; unfilled at a quarter of the
//!    objective (the default before) 0.28–0.50, with one window over in one of three runs.
//!    `background_fill` false turns filling off: background rows then run only in batches of
//!    their own, when no online request waits, and the online p50 under background load stays
//!    nearer its p50 alone (18–23 ms against 40–45 ms filled).
//!    A background batch of its own is formed around the oldest background request out of *all*
//!    that wait, and only its size is capped by the room the limit leaves: shown only the first
//!    few, it found no similar lengths among them, and background batches ran at one or two rows
//!    each.
//! 2. **The window.** Online requests' totals go into a sliding window of [`SLICES`] slices of
//!    [`SLICE`] each (about five seconds): its p99 is what `models stats` and `/metrics` show.
//!    The controller reads the same window but only the slices begun within the last
//!    [`HORIZON`] and since its last decrease, so that it follows what happens now and judges a
//!    decrease by what came after it, not by the samples that caused it.
//! 3. **Ticks.** Every [`TICK`], and at once when an online request finishes over the
//!    objective, the controller observes the window and decides:
//!    - **Shrink** (multiplicative decrease) when the online p99 is above [`SHRINK_ABOVE`] (90%)
//!      of the objective — a margin for what the server's clock does not see of a request (the
//!      network, the client), so that the clients' p99 stays within the objective too: the
//!      limit halves (1 → 0), and the window is cut (rule 2). A second decrease waits until the
//!      background requests in flight have come down to the new limit and an online request has
//!      finished since the first: until then what is observed is still the old limit's doing.
//!    - **Grow** (additive increase, by `background_step`, 1 by default) when the online p99 is at
//!      most [`GROW_BELOW`] of the objective (or there was no online request) both over the last
//!      [`HORIZON`] and over the whole window since the last decrease, background work was
//!      held back by the limit during the tick, and the model has idle capacity: its instances
//!      spent less than [`SATURATED`] of the tick on online rows (a filled batch's time is
//!      shared among its rows). The limit
//!      never exceeds `background_max_in_flight` (default: twice `max_batch_size` × instances).
//!    - **Hold** otherwise, with the reason (between 80% and 90% of the objective, no background
//!      work waiting, online work alone fills the model, at the largest limit).
//! 4. **Impossible objectives.** When the online p99 is above the objective with no background
//!    request admitted (limit 0, none in flight) for a whole [`HORIZON`] since the last decrease,
//!    holding back background work cannot help: the limit stays 0 and the reason says that the
//!    objective cannot be met by the model as loaded.
//! 5. **One batch is bounded by time.** Rule 1 bounds how *many* batches delay an online
//!    request (one); this rule bounds how *long* that batch is. A batch of background rows, and an
//!    online batch filled with them, holds at most as many rows as execute within
//!    `background_batch_ms` (default: 40% of the objective) by the model's measured cost
//!    of a batch ([`Observation::batch_cost`]: a fixed part plus a part per row, fitted to recent
//!    batches by [`CostFit`]; before the first batch there is no bound but the limit, which
//!    starts at 1). The online rows waiting count against it; online rows are never held back
//!    by it. A text model's batch costs by its padded tokens (rows × the longest row), not its
//!    rows: a second line is fitted to them ([`Observation::token_cost`]), and such a batch is
//!    also held to the padded tokens that execute within `background_batch_ms` (the batching
//!    policy's token budget, lowered for it): a batch of long sentences takes fewer rows.
//!    (Measured, session 12: with rows alone, a filled batch of long sentences ran two to three
//!    times the bound, and the online p99 jumped from ~80 to 150–165 ms for a second.) The limit itself never exceeds that many rows per instance: above it the limit
//!    would only grow without effect, and a later halving would not be felt. Why a bound and
//!    not only the limit: the p99 follows the longest batch an online request can land behind;
//!    at half the objective or more per batch, a request queued behind one and then batched with
//!    the next is already late, whatever the limit's average. Why a fitted line and not the
//!    average time per row: on a CPU backend a small batch costs much more per row than a full
//!    one (MiniLM on one ONNX Runtime thread: 5.1 ms for one row, ~3.4 ms per row more); the
//!    average over small batches (5–6 ms) made the bound 4 rows where 6–7 fit, and the small
//!    batches it allowed kept the average high.
//! 6. **At risk.** The objective is *at risk* from a tick whose p99 is above [`SHRINK_ABOVE`] of
//!    it until one whose p99 is at most [`GROW_BELOW`] of it (hysteresis). The coordinator pauses the node's local
//!    command jobs while any objective is at risk.
//!
//! Without an objective nothing here applies: background requests are only the lowest priority
//! level, as before (strict priority with aging).
//!
//! Everything here is a pure function of what it is given and the instant passed in: the tests
//! drive it on a simulated clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use veraltheim_models::ModelConfig;

/// How often the controller decides.
pub const TICK: Duration = Duration::from_millis(100);
/// One slice of the latency window.
pub const SLICE: Duration = Duration::from_millis(500);
/// Slices kept: the window spans `SLICES × SLICE`.
pub const SLICES: usize = 10;
/// How far back the controller reads the window.
pub const HORIZON: Duration = Duration::from_secs(1);
/// The controller grows the limit only while the online p99 is at most this share of the
/// objective; it clears "at risk" there too.
pub const GROW_BELOW: f64 = 0.8;
/// The controller halves the limit when the online p99 is above this share of the objective.
pub const SHRINK_ABOVE: f64 = 0.9;
/// Above this share of a tick spent on online batches, the model has no idle capacity.
pub const SATURATED: f64 = 0.95;

/// A model's objective and the controller's bounds, from its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SloConfig {
    /// The p99 of online requests' end-to-end time to keep.
    pub objective: Duration,
    /// The most background requests in flight the controller allows.
    pub max_limit: usize,
    /// Additive increase per tick.
    pub step: usize,
    /// The most execution time of the background rows of one batch (rule 5).
    pub batch_time: Duration,
    /// The model's instances (batches that execute at once).
    pub instances: usize,
    /// Whether a batch holding online requests takes background rows (rule 1;
    /// `background_fill`, on by default).
    pub fill: bool,
}

impl SloConfig {
    /// The objective a model's configuration sets, if any; an error names a parameter that is
    /// not a positive integer.
    pub fn from_config(config: &ModelConfig) -> Result<Option<SloConfig>, String> {
        let Some(ms) = positive(config, "latency_slo_p99_ms")? else {
            return Ok(None);
        };
        let instances = config.instance_count().max(1);
        let default_max = (config.max_batch_size as usize).max(1) * instances * 2;
        Ok(Some(SloConfig {
            objective: Duration::from_millis(ms),
            max_limit: positive(config, "background_max_in_flight")?
                .map_or(default_max, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            step: positive(config, "background_step")?
                .map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            batch_time: positive(config, "background_batch_ms")?
                .map_or(Duration::from_millis(ms) * 2 / 5, Duration::from_millis),
            instances,
            fill: match config.parameter("background_fill").map(str::trim) {
                None | Some("") => true,
                Some(v) if v.eq_ignore_ascii_case("true") => true,
                Some(v) if v.eq_ignore_ascii_case("false") => false,
                Some(v) => {
                    return Err(format!(
                        "parameter 'background_fill' is '{v}', not true or false"
                    ));
                }
            },
        }))
    }
}

fn positive(config: &ModelConfig, key: &str) -> Result<Option<u64>, String> {
    match config.parameter(key).map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!(
                "parameter '{key}' is '{v}', not a positive integer"
            )),
        },
    }
}

/// The priority levels a model's configuration marks as background
/// (`background_priority_levels`, a comma-separated list); an error names a bad entry.
pub fn background_levels(config: &ModelConfig) -> Result<Vec<u32>, String> {
    let Some(list) = config.parameter("background_priority_levels") else {
        return Ok(Vec::new());
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().ok().filter(|&l| l > 0).ok_or_else(|| {
                format!(
                    "parameter 'background_priority_levels' is '{list}': '{s}' is not a priority level (1, 2, ...)"
                )
            })
        })
        .collect()
}

/// A sliding window of online latencies: [`SLICES`] histograms of [`SLICE`] each.
pub(crate) struct Window {
    /// Oldest first; each slice with the instant it began.
    slices: VecDeque<(Instant, Histogram<u32>)>,
}

impl Window {
    pub(crate) fn new(now: Instant) -> Self {
        let mut slices = VecDeque::with_capacity(SLICES + 1);
        slices.push_back((now, histogram()));
        Window { slices }
    }

    /// Moves on to a new slice when the current one is [`SLICE`] old, dropping slices that
    /// began more than the window ago.
    fn advance(&mut self, now: Instant) {
        let current = self.slices.back().map(|(start, _)| *start);
        if current.is_none_or(|start| now.saturating_duration_since(start) >= SLICE) {
            self.start_slice(now);
        }
    }

    fn start_slice(&mut self, now: Instant) {
        let mut h = if self.slices.len() >= SLICES {
            self.slices
                .pop_front()
                .map(|(_, h)| h)
                .unwrap_or_else(histogram)
        } else {
            histogram()
        };
        h.reset();
        self.slices.push_back((now, h));
        let span = SLICE * SLICES as u32;
        while self
            .slices
            .front()
            .is_some_and(|(start, _)| now.saturating_duration_since(*start) > span)
        {
            self.slices.pop_front();
        }
    }

    pub(crate) fn record(&mut self, now: Instant, total: Duration) {
        self.advance(now);
        if let Some((_, h)) = self.slices.back_mut() {
            h.saturating_record(micros(total));
        }
    }

    /// Starts a new slice now, so that [`Window::since`] of this instant holds only what comes
    /// after it.
    pub(crate) fn cut(&mut self, now: Instant) {
        self.start_slice(now);
    }

    /// Requests and their p99 over the whole window.
    pub(crate) fn all(&mut self, now: Instant) -> (u64, Option<Duration>) {
        self.advance(now);
        let oldest = self.slices.front().map_or(now, |(start, _)| *start);
        self.since(oldest, now)
    }

    /// Requests and their p99 over the slices begun at or after `since` (all of the window
    /// when `since` is older).
    pub(crate) fn since(&mut self, since: Instant, now: Instant) -> (u64, Option<Duration>) {
        self.advance(now);
        let mut merged: Option<Histogram<u32>> = None;
        for (start, h) in &self.slices {
            if *start < since || h.is_empty() {
                continue;
            }
            match &mut merged {
                None => merged = Some(h.clone()),
                Some(m) => {
                    let _ = m.add(h);
                }
            }
        }
        match merged {
            Some(m) if !m.is_empty() => (
                m.len(),
                Some(Duration::from_micros(m.value_at_quantile(0.99))),
            ),
            _ => (0, None),
        }
    }
}

fn histogram() -> Histogram<u32> {
    // 1 µs to 60 s at 2 significant digits, 32-bit counts: about 10 KiB per slice.
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What the controller sees at a tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observation {
    /// Online requests finished since the last decrease (within the window), and their p99.
    pub online_count: u64,
    pub online_p99: Option<Duration>,
    /// The p99 over the whole window since the last decrease (up to the window's span): growth
    /// also waits for it, so that a lucky second does not add background work.
    pub online_p99_since_decrease: Option<Duration>,
    /// Background requests in flight now.
    pub in_flight: usize,
    /// Whether background work waited for the limit during the tick.
    pub held_back: bool,
    /// The share of the model's instance time, over the tick, spent on online rows (a batch's
    /// time × its online rows ÷ its rows; 0.0–1.0).
    pub online_busy: f64,
    /// The model's measured cost of a batch (rule 5); `None` before the first batch.
    pub batch_cost: Option<BatchCost>,
    /// A text model's measured cost of a batch by its padded tokens (rule 5: `per_row` is per
    /// token); `None` for other models and before the first batch.
    pub token_cost: Option<BatchCost>,
}

/// What a batch of `n` rows costs the model: `fixed + per_row × n` (rule 5).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchCost {
    pub fixed: Duration,
    pub per_row: Duration,
}

impl BatchCost {
    /// The most rows a batch may hold to execute within `budget`: at least 1 (this rule never
    /// stops background work; the limit does).
    pub fn rows_within(&self, budget: Duration) -> usize {
        let per_row = self.per_row.as_secs_f64();
        if per_row <= 0.0 {
            return usize::MAX;
        }
        let rows = (budget.as_secs_f64() - self.fixed.as_secs_f64()) / per_row;
        if rows >= 1.0 {
            rows.floor() as usize
        } else {
            1
        }
    }
}

/// Fits a [`BatchCost`] to the batches a model executed: least squares over exponentially
/// weighted averages (about the last [`CostFit::SPAN`] batches) of rows, time, rows² and
/// rows × time. While recent batches were (nearly) all of one size the line is not determined:
/// the fit is then the average time per row, with no fixed part. A fitted line with a negative
/// part is replaced the same way.
#[derive(Clone, Debug, Default)]
pub struct CostFit {
    n: f64,
    t: f64,
    nn: f64,
    nt: f64,
    batches: u64,
}

impl CostFit {
    /// Batches the averages span (the weight of a new batch is 1 / `SPAN`).
    pub const SPAN: f64 = 16.0;

    pub fn record(&mut self, rows: usize, took: Duration) {
        let (n, t) = (rows.max(1) as f64, took.as_secs_f64());
        let w = if self.batches == 0 {
            1.0
        } else {
            1.0 / Self::SPAN
        };
        self.n += w * (n - self.n);
        self.t += w * (t - self.t);
        self.nn += w * (n * n - self.nn);
        self.nt += w * (n * t - self.nt);
        self.batches += 1;
    }

    pub fn estimate(&self) -> Option<BatchCost> {
        if self.batches == 0 || self.n <= 0.0 {
            return None;
        }
        let average = BatchCost {
            fixed: Duration::ZERO,
            per_row: Duration::from_secs_f64((self.t / self.n).max(0.0)),
        };
        let variance = self.nn - self.n * self.n;
        // Sizes that differ by less than about a row between batches do not determine a line.
        if variance < 0.5 {
            return Some(average);
        }
        let per_row = (self.nt - self.n * self.t) / variance;
        let fixed = self.t - per_row * self.n;
        if per_row <= 0.0 || fixed < 0.0 || !per_row.is_finite() {
            return Some(average);
        }
        Some(BatchCost {
            fixed: Duration::from_secs_f64(fixed),
            per_row: Duration::from_secs_f64(per_row),
        })
    }
}

/// What the controller did at its last tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Decision {
    #[default]
    Hold,
    Grow,
    Shrink,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Hold => "hold",
            Decision::Grow => "grow",
            Decision::Shrink => "shrink",
        }
    }
}

/// The AIMD controller of one model's background work (rules 3–5 of the module header).
#[derive(Clone, Debug)]
pub struct Controller {
    config: SloConfig,
    limit: usize,
    decision: Decision,
    reason: String,
    at_risk: bool,
    /// The last decrease (or the start): the window is read from here.
    since: Instant,
    /// The limit set by the last decrease, until the requests in flight come down to it and an
    /// online request has finished after it.
    settling: Option<usize>,
    /// Background rows one batch may take (rule 5); `None` until a batch was measured.
    batch_rows: Option<usize>,
    /// A text model's padded tokens one batch holding background rows may reach (rule 5).
    batch_tokens: Option<usize>,
    grows: u64,
    shrinks: u64,
}

impl Controller {
    /// Starts at a limit of one background request: the controller then finds its way up.
    pub fn new(config: SloConfig, now: Instant) -> Self {
        Controller {
            limit: 1.min(config.max_limit),
            config,
            decision: Decision::Hold,
            reason: "starting".into(),
            at_risk: false,
            since: now,
            settling: None,
            batch_rows: None,
            batch_tokens: None,
            grows: 0,
            shrinks: 0,
        }
    }

    /// Background rows one batch may take (rule 5); `None`: no bound measured yet.
    pub fn batch_rows(&self) -> Option<usize> {
        self.batch_rows
    }

    /// The padded tokens a text model's batch holding background rows may reach (rule 5);
    /// `None`: not a text model, or not measured yet.
    pub fn batch_tokens(&self) -> Option<usize> {
        self.batch_tokens
    }

    /// The largest limit now: `background_max_in_flight`, and no more than
    /// [`Controller::batch_rows`] per instance.
    pub fn bound(&self) -> usize {
        self.batch_rows.map_or(self.config.max_limit, |rows| {
            rows.saturating_mul(self.config.instances.max(1))
                .min(self.config.max_limit)
        })
    }

    pub fn config(&self) -> &SloConfig {
        &self.config
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn decision(&self) -> Decision {
        self.decision
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub fn at_risk(&self) -> bool {
        self.at_risk
    }

    /// The last decrease (or the start).
    pub fn since_decrease(&self) -> Instant {
        self.since
    }

    /// Where the window is read from at `now`: the last decrease, or [`HORIZON`] ago if later.
    pub fn read_from(&self, now: Instant) -> Instant {
        now.checked_sub(HORIZON)
            .map_or(self.since, |h| h.max(self.since))
    }

    /// Decisions taken so far: (grow, shrink).
    pub fn counts(&self) -> (u64, u64) {
        (self.grows, self.shrinks)
    }

    /// One tick: decides from `o` and returns the decision. After a [`Decision::Shrink`] the
    /// caller cuts the latency window at `now` (the controller reads it from there).
    pub fn tick(&mut self, o: &Observation, now: Instant) -> Decision {
        let objective = self.config.objective;
        if let Some(cost) = o.batch_cost.filter(|c| !c.per_row.is_zero()) {
            self.batch_rows = Some(cost.rows_within(self.config.batch_time));
            self.limit = self.limit.min(self.bound());
        }
        if let Some(cost) = o.token_cost.filter(|c| !c.per_row.is_zero()) {
            self.batch_tokens = Some(cost.rows_within(self.config.batch_time));
        }
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        if let Some(target) = self.settling {
            if o.in_flight <= target && o.online_count > 0 {
                self.settling = None;
            } else {
                return self.hold(format!(
                    "waiting for the last decrease to take effect ({} background in flight, limit {target})",
                    o.in_flight
                ));
            }
        }
        let p99 = o.online_p99.filter(|_| o.online_count > 0);
        let share = |p: Duration| p.as_secs_f64() / objective.as_secs_f64().max(1e-9);
        if p99.is_some_and(|p| share(p) > SHRINK_ABOVE) {
            self.at_risk = true;
        }
        if let Some(p) = p99.filter(|&p| share(p) > SHRINK_ABOVE) {
            if self.limit == 0 {
                return if p <= objective {
                    self.hold(format!(
                        "online p99 {} is above {:.0}% of the objective {} with no background work admitted",
                        ms(p),
                        SHRINK_ABOVE * 100.0,
                        ms(objective)
                    ))
                } else if o.in_flight == 0 && now.saturating_duration_since(self.since) >= HORIZON {
                    self.hold(format!(
                        "online p99 {} is above the objective {} with no background work running: \
                         the objective cannot be met by holding back background work (the online \
                         load alone is more than the model can serve within it)",
                        ms(p),
                        ms(objective)
                    ))
                } else {
                    self.hold(format!(
                        "online p99 {} is above the objective {}; waiting for the background work that ran to \
                         leave the window ({} in flight)",
                        ms(p),
                        ms(objective),
                        o.in_flight
                    ))
                };
            }
            let old = self.limit;
            self.limit /= 2;
            self.since = now;
            self.settling = Some(self.limit);
            self.shrinks += 1;
            self.decision = Decision::Shrink;
            self.reason = format!(
                "online p99 {} is above {} of the objective {}: background limit {old} -> {}",
                ms(p),
                if p > objective {
                    "100%".to_string()
                } else {
                    format!("{:.0}%", SHRINK_ABOVE * 100.0)
                },
                ms(objective),
                self.limit
            );
            return Decision::Shrink;
        }
        // Growth is cautious, decrease quick: growth needs the longer view to be calm too.
        let p99 = match (p99, o.online_p99_since_decrease) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let calm = p99.is_none_or(|p| p.as_secs_f64() <= GROW_BELOW * objective.as_secs_f64());
        if !calm {
            return self.hold(format!(
                "online p99 {} (over the last second and since the last decrease) is above {:.0}% \
                 of the objective {}, not above {:.0}% over the last second",
                ms(p99.unwrap_or_default()),
                GROW_BELOW * 100.0,
                ms(objective),
                SHRINK_ABOVE * 100.0
            ));
        }
        self.at_risk = false;
        let shown = p99.map_or_else(
            || "no online requests".to_string(),
            |p| format!("online p99 {}", ms(p)),
        );
        if !o.held_back {
            return self.hold(format!(
                "{shown}; no background work waits beyond the limit {}",
                self.limit
            ));
        }
        if o.online_busy >= SATURATED {
            return self.hold(format!(
                "{shown}; online requests keep the model busy ({:.0}% of the tick): no idle capacity",
                o.online_busy * 100.0
            ));
        }
        let bound = self.bound();
        if self.limit >= bound {
            return self.hold(match self.batch_rows {
                Some(rows) if bound < self.config.max_limit => format!(
                    "{shown}; at the largest limit {bound}: {rows} background rows per batch \
                     execute in about {} (background_batch_ms)",
                    ms(self.config.batch_time)
                ),
                _ => format!("{shown}; at the largest limit {bound}"),
            });
        }
        let old = self.limit;
        self.limit = self.limit.saturating_add(self.config.step).min(bound);
        self.grows += 1;
        self.decision = Decision::Grow;
        self.reason = format!(
            "{shown} is under {:.0}% of the objective {} and the model has idle capacity: background limit {old} -> {}",
            GROW_BELOW * 100.0,
            ms(objective),
            self.limit
        );
        Decision::Grow
    }

    fn hold(&mut self, reason: String) -> Decision {
        self.decision = Decision::Hold;
        self.reason = reason;
        Decision::Hold
    }
}

/// A model's objective and controller as the statistics show them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SloSnapshot {
    pub objective: Duration,
    /// Online requests in the window and their p99 (`None`: none).
    pub window_count: u64,
    pub window_p99: Option<Duration>,
    pub limit: usize,
    pub max_limit: usize,
    /// Background rows one batch may take (rule 5), once measured.
    pub batch_rows: Option<usize>,
    pub in_flight: usize,
    pub decision: &'static str,
    pub reason: String,
    pub at_risk: bool,
    pub grows: u64,
    pub shrinks: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(objective_ms: u64, max: usize) -> SloConfig {
        SloConfig {
            objective: Duration::from_millis(objective_ms),
            max_limit: max,
            step: 1,
            batch_time: Duration::from_millis(objective_ms),
            instances: 1,
            fill: true,
        }
    }

    /// A batch cost of `ms` per row and no fixed part.
    fn per_row(ms: u64) -> BatchCost {
        BatchCost {
            fixed: Duration::ZERO,
            per_row: Duration::from_millis(ms),
        }
    }

    /// A simulated model: online requests at `rate`/s each taking `base` plus, per background
    /// request in flight, `per_background` (the background rows that share or precede their
    /// batch). The controller ticks every [`TICK`] over a window fed by the plant.
    struct Plant {
        base: Duration,
        per_background: Duration,
        rate: u32,
        window: Window,
        controller: Controller,
        now: Instant,
        /// The online p99 each tick observed, with the limit after the tick.
        trace: Vec<(Option<Duration>, usize)>,
        /// What the plant reports as its cost of a batch.
        batch_cost: Option<BatchCost>,
    }

    impl Plant {
        fn new(objective_ms: u64, base_ms: u64, per_background_us: u64) -> Self {
            let now = Instant::now();
            Plant {
                base: Duration::from_millis(base_ms),
                per_background: Duration::from_micros(per_background_us),
                rate: 200,
                window: Window::new(now),
                controller: Controller::new(config(objective_ms, 64), now),
                now,
                trace: Vec::new(),
                batch_cost: None,
            }
        }

        /// Runs for `ticks`; background work always waits (a batch job with a long input).
        fn run(&mut self, ticks: u32) {
            for _ in 0..ticks {
                let in_flight = self.controller.limit();
                let per_tick = (self.rate as u64 * TICK.as_millis() as u64 / 1000).max(1);
                let latency = self.base + self.per_background * in_flight as u32;
                for i in 0..per_tick {
                    let at = self.now + TICK * i as u32 / per_tick as u32;
                    self.window.record(at, latency);
                }
                self.now += TICK;
                let (count, p99) = self
                    .window
                    .since(self.controller.read_from(self.now), self.now);
                let (_, long) = self
                    .window
                    .since(self.controller.since_decrease(), self.now);
                let o = Observation {
                    online_count: count,
                    online_p99: p99,
                    online_p99_since_decrease: long,
                    in_flight,
                    held_back: true,
                    online_busy: 0.5,
                    batch_cost: self.batch_cost,
                    token_cost: None,
                };
                if self.controller.tick(&o, self.now) == Decision::Shrink {
                    self.window.cut(self.now);
                }
                self.trace.push((p99, self.controller.limit()));
            }
        }
    }

    #[test]
    fn grows_to_the_objective_then_holds_around_it() {
        // 20 ms alone, +2 ms per background request: the objective (100 ms) allows 40 in
        // flight; growth stops at 80% (30 in flight) and the limit stays in [15, 40].
        let mut p = Plant::new(100, 20, 2_000);
        p.run(300);
        let limits: Vec<usize> = p.trace[100..].iter().map(|t| t.1).collect();
        assert!(limits.iter().all(|&l| (15..=40).contains(&l)), "{limits:?}");
        assert!(
            p.trace[100..]
                .iter()
                .all(|(p99, _)| p99.is_none_or(|p| p <= Duration::from_millis(100)))
        );
        assert!(p.controller.counts().0 >= 25, "{:?}", p.controller.counts());
    }

    #[test]
    fn a_step_in_online_load_shrinks_the_limit_at_once() {
        let mut p = Plant::new(100, 20, 2_000);
        p.run(200);
        let before = p.controller.limit();
        assert!(before >= 20, "{before}");
        // The online work gets heavier: 60 ms alone, so at the old limit the p99 is far above.
        p.base = Duration::from_millis(60);
        p.run(1);
        assert_eq!(p.controller.decision(), Decision::Shrink);
        assert_eq!(p.controller.limit(), before / 2);
        assert!(p.controller.at_risk());
        assert!(
            p.controller
                .reason()
                .contains("above 100% of the objective"),
            "{}",
            p.controller.reason()
        );
        // It settles where 60 ms + 2 ms × limit ≤ 90 ms, i.e. at most 15 in flight, and the
        // objective is kept from there on.
        p.run(200);
        let tail = &p.trace[p.trace.len() - 150..];
        assert!(tail.iter().all(|t| t.1 <= 15), "{tail:?}");
        assert!(
            tail.iter()
                .all(|t| t.0.is_none_or(|p| p <= Duration::from_millis(92)))
        );
        // At risk until the p99 is at most 80% of the objective (hysteresis).
        p.base = Duration::from_millis(30);
        p.run(60);
        assert!(!p.controller.at_risk());
    }

    #[test]
    fn a_burst_above_the_objective_halves_once_per_effect_not_per_tick() {
        let mut p = Plant::new(100, 20, 2_000);
        p.run(200);
        let before = p.controller.limit();
        // A one-tick burst: every online request of the tick takes 150 ms.
        let base = p.base;
        p.base = Duration::from_millis(150);
        p.run(1);
        p.base = base;
        assert_eq!(p.controller.limit(), before / 2);
        // The burst's samples are behind the cut: no second decrease for them.
        p.run(5);
        assert!(
            p.trace[p.trace.len() - 5..]
                .iter()
                .all(|t| t.1 >= before / 2),
            "{:?}",
            &p.trace[p.trace.len() - 6..]
        );
    }

    #[test]
    fn one_batch_of_background_rows_is_bounded_by_its_measured_time() {
        // The same plant as above would grow to ~30; with rows measured at 2 ms and 25 ms of
        // background per batch, the limit stops at 12 rows and says why.
        let mut p = Plant::new(100, 20, 2_000);
        p.controller.config.batch_time = Duration::from_millis(25);
        p.batch_cost = Some(per_row(2));
        p.run(200);
        assert_eq!(p.controller.batch_rows(), Some(12));
        assert!(p.trace.iter().all(|t| t.1 <= 12), "{:?}", p.trace);
        assert_eq!(p.controller.limit(), 12);
        assert!(
            p.controller
                .reason()
                .contains("12 background rows per batch"),
            "{}",
            p.controller.reason()
        );
        // Rows get heavier (5 ms): the bound follows at the next tick, without waiting for the
        // latency to rise.
        p.batch_cost = Some(per_row(5));
        p.run(1);
        assert_eq!(p.controller.batch_rows(), Some(5));
        assert_eq!(p.controller.limit(), 5);
        // Two instances execute two batches at once: twice the rows in flight.
        let mut two = Plant::new(100, 20, 1_000);
        two.controller.config.batch_time = Duration::from_millis(25);
        two.controller.config.instances = 2;
        two.batch_cost = Some(per_row(5));
        two.run(100);
        assert_eq!(two.controller.limit(), 10);
        // A row slower than the whole bound still lets one through: never a stop by this rule.
        two.batch_cost = Some(per_row(40));
        two.run(1);
        assert_eq!(two.controller.batch_rows(), Some(1));
        assert_eq!(two.controller.limit(), 2);
        // A fixed part per batch: MiniLM on one thread, 1.7 ms + 3.4 ms per row, fits 6 rows in
        // 25 ms (its average per row over batches of one, 5.1 ms, would allow 4).
        two.batch_cost = Some(BatchCost {
            fixed: Duration::from_micros(1_700),
            per_row: Duration::from_micros(3_400),
        });
        two.run(100);
        assert_eq!(two.controller.batch_rows(), Some(6));
        assert_eq!(two.controller.limit(), 12);
        assert_eq!(two.controller.batch_tokens(), None, "not a text model");
    }

    #[test]
    fn a_text_models_batch_is_also_bounded_by_its_padded_tokens() {
        // 0.2 ms per padded token, 1 ms fixed: 25 ms allow 120 tokens (6 rows of 20, or 1 of 120).
        let mut c = Controller::new(config(100, 64), Instant::now());
        c.config.batch_time = Duration::from_millis(25);
        let o = Observation {
            online_count: 10,
            online_p99: Some(Duration::from_millis(10)),
            held_back: true,
            online_busy: 0.5,
            batch_cost: Some(per_row(4)),
            token_cost: Some(BatchCost {
                fixed: Duration::from_millis(1),
                per_row: Duration::from_micros(200),
            }),
            ..Observation::default()
        };
        c.tick(&o, Instant::now());
        assert_eq!(c.batch_rows(), Some(6));
        assert_eq!(c.batch_tokens(), Some(120));
    }

    #[test]
    fn the_cost_of_a_batch_is_a_line_fitted_to_recent_batches() {
        let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
        let close = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()).abs() < 2e-5;
        let mut fit = CostFit::default();
        assert_eq!(fit.estimate(), None);
        // Batches of 1–8 rows costing 1.7 ms + 3.4 ms per row.
        for i in 0..64 {
            let rows = 1 + i % 8;
            fit.record(rows, ms(1.7 + 3.4 * rows as f64));
        }
        let c = fit.estimate().unwrap();
        assert!(
            close(c.fixed, ms(1.7)) && close(c.per_row, ms(3.4)),
            "{c:?}"
        );
        assert_eq!(c.rows_within(ms(25.0)), 6);
        assert_eq!(c.rows_within(ms(1.0)), 1, "never below one row");
        // The model gets slower (another load on the machine): the fit follows within about
        // twice its span.
        for i in 0..64 {
            let rows = 1 + i % 8;
            fit.record(rows, ms(3.0 + 6.0 * rows as f64));
        }
        let c = fit.estimate().unwrap();
        assert!((c.per_row.as_secs_f64() * 1e3 - 6.0).abs() < 0.5, "{c:?}");
        // Batches all of one size do not determine a line: the average per row, no fixed part.
        let mut one = CostFit::default();
        for _ in 0..20 {
            one.record(4, ms(20.0));
        }
        assert_eq!(
            one.estimate(),
            Some(BatchCost {
                fixed: Duration::ZERO,
                per_row: ms(5.0)
            })
        );
        // Larger batches costing less in all (noise): not a line with a negative part.
        let mut odd = CostFit::default();
        for i in 0..20 {
            let rows = if i % 2 == 0 { 1 } else { 8 };
            odd.record(rows, ms(if rows == 1 { 10.0 } else { 8.0 }));
        }
        let c = odd.estimate().unwrap();
        assert_eq!(c.fixed, Duration::ZERO, "{c:?}");
    }

    #[test]
    fn an_impossible_objective_drives_background_to_zero_and_says_why() {
        // Online alone takes 150 ms: no limit meets 100 ms.
        let mut p = Plant::new(100, 150, 2_000);
        p.run(50);
        assert_eq!(p.controller.limit(), 0);
        assert!(p.controller.at_risk());
        assert!(
            p.controller.reason().contains("cannot be met"),
            "{}",
            p.controller.reason()
        );
        // Once online is within it again, background work comes back, once the slow requests
        // have left the window (rule 3: growth is cautious).
        p.base = Duration::from_millis(10);
        p.run(60);
        assert!(p.controller.limit() > 0);
        assert!(!p.controller.at_risk());
    }

    #[test]
    fn holds_without_demand_or_idle_capacity_and_at_the_largest_limit() {
        let now = Instant::now();
        let mut c = Controller::new(config(100, 2), now);
        let calm = Observation {
            online_count: 100,
            online_p99: Some(Duration::from_millis(10)),
            online_p99_since_decrease: None,
            in_flight: 1,
            held_back: false,
            online_busy: 0.2,
            batch_cost: None,
            token_cost: None,
        };
        assert_eq!(c.tick(&calm, now), Decision::Hold);
        assert!(
            c.reason().contains("no background work waits"),
            "{}",
            c.reason()
        );
        let busy = Observation {
            held_back: true,
            online_busy: 0.99,
            ..calm
        };
        assert_eq!(c.tick(&busy, now), Decision::Hold);
        assert!(c.reason().contains("no idle capacity"), "{}", c.reason());
        let ok = Observation {
            held_back: true,
            ..calm
        };
        assert_eq!(c.tick(&ok, now), Decision::Grow);
        assert_eq!(c.limit(), 2);
        assert_eq!(c.tick(&ok, now), Decision::Hold);
        assert!(c.reason().contains("largest limit 2"), "{}", c.reason());
        // Between 80% and 90%: hold, and "at risk" keeps its value (hysteresis).
        let warm = Observation {
            online_p99: Some(Duration::from_millis(85)),
            ..ok
        };
        assert_eq!(c.tick(&warm, now), Decision::Hold);
        assert!(!c.at_risk());
        // Above 90%: shrink and at risk, until at most 80% again.
        let near = Observation {
            online_p99: Some(Duration::from_millis(95)),
            ..ok
        };
        assert_eq!(c.tick(&near, now), Decision::Shrink);
        assert!(c.at_risk());
        assert!(
            c.reason().contains("above 90% of the objective"),
            "{}",
            c.reason()
        );
        let over = Observation {
            online_p99: Some(Duration::from_millis(105)),
            in_flight: 0,
            ..ok
        };
        assert_eq!(c.tick(&over, now), Decision::Shrink);
        assert!(c.at_risk());
        assert_eq!(c.limit(), 0);
        let drained = |o: Observation| Observation { in_flight: 0, ..o };
        assert_eq!(c.tick(&drained(warm), now), Decision::Hold);
        assert!(c.at_risk());
        assert_eq!(c.tick(&drained(ok), now), Decision::Grow);
        assert!(!c.at_risk());
    }

    #[test]
    fn the_window_forgets_old_slices_and_reads_from_a_cut() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        for i in 0..100u32 {
            w.record(
                t0 + Duration::from_millis(i as u64),
                Duration::from_millis(200),
            );
        }
        let (n, p99) = w.since(t0, t0 + Duration::from_millis(100));
        assert_eq!(n, 100);
        assert!(p99.unwrap() >= Duration::from_millis(198));
        let cut = t0 + Duration::from_millis(150);
        w.cut(cut);
        w.record(cut + Duration::from_millis(1), Duration::from_millis(5));
        let (n, p99) = w.since(cut, cut + Duration::from_millis(2));
        assert_eq!(n, 1);
        assert!(p99.unwrap() <= Duration::from_millis(6));
        // Six seconds later, everything has left the window.
        assert_eq!(w.since(t0, t0 + Duration::from_secs(6)), (0, None));
    }

    #[test]
    fn configuration_is_read_and_bad_values_are_named() {
        let c = |params: &str| {
            ModelConfig::from_json(&format!(
                r#"{{"name":"m","max_batch_size":8,"input":[{{"name":"a","data_type":"TYPE_FP32","dims":[1]}}],
                    "parameters":{{{params}}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(SloConfig::from_config(&c("")).unwrap(), None);
        let s = SloConfig::from_config(&c(r#""latency_slo_p99_ms":{"string_value":"50"}"#))
            .unwrap()
            .unwrap();
        assert_eq!(s.objective, Duration::from_millis(50));
        assert_eq!(s.max_limit, 16);
        assert_eq!(s.step, 1);
        assert_eq!(
            s.batch_time,
            Duration::from_millis(20),
            "40% of the objective"
        );
        assert!(s.fill, "online batches take background rows by default");
        let off = |v: &str| {
            SloConfig::from_config(&c(&format!(
                r#""latency_slo_p99_ms":{{"string_value":"50"}},"background_fill":{{"string_value":"{v}"}}"#
            )))
        };
        assert!(!off("false").unwrap().unwrap().fill);
        assert!(off("TRUE").unwrap().unwrap().fill);
        assert!(off("true").unwrap().unwrap().fill);
        let err = off("sometimes").unwrap_err();
        assert!(
            err.contains("background_fill") && err.contains("'sometimes'"),
            "{err}"
        );
        let s = SloConfig::from_config(&c(
            r#""latency_slo_p99_ms":{"string_value":"50"},"background_batch_ms":{"string_value":"20"}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(s.batch_time, Duration::from_millis(20));
        let err = SloConfig::from_config(&c(
            r#""latency_slo_p99_ms":{"string_value":"50"},"background_batch_ms":{"string_value":"-1"}"#,
        ))
        .unwrap_err();
        assert!(err.contains("background_batch_ms"), "{err}");
        let err =
            SloConfig::from_config(&c(r#""latency_slo_p99_ms":{"string_value":"0"}"#)).unwrap_err();
        assert!(
            err.contains("latency_slo_p99_ms") && err.contains("positive"),
            "{err}"
        );
        let err = SloConfig::from_config(&c(
            r#""latency_slo_p99_ms":{"string_value":"5"},"background_step":{"string_value":"x"}"#,
        ))
        .unwrap_err();
        assert!(err.contains("background_step"), "{err}");
        assert_eq!(
            background_levels(&c(
                r#""background_priority_levels":{"string_value":"3, 4"}"#
            )),
            Ok(vec![3, 4])
        );
        let err = background_levels(&c(
            r#""background_priority_levels":{"string_value":"3,zero"}"#,
        ))
        .unwrap_err();
        assert!(err.contains("'zero'"), "{err}");
    }
}
