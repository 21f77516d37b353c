//! The dynamic batcher's rules, as a pure function of what waits and when.
//!
//! # Requests without tokens (every model but text models): Triton's rules
//!
//! A batch leaves at once when it reaches `max_batch_size` or a preferred size, otherwise when
//! its oldest request has waited `max_queue_delay`. Requests only share a batch when their
//! non-batch dimensions agree; a request that cannot join the front's batch keeps its place for
//! the next. The requests are taken in the order given (the worker's: priority, aging, background
//! work last), as a prefix of the compatible ones: the first that does not fit ends the batch.
//!
//! # Requests with tokens (text models): length-aware batching
//!
//! A text model's requests carry their real token counts, counted by the model's tokenizer when
//! they arrive ([`Item::tokens`]: the longest row; [`Item::real`]: all rows). A batch is padded to
//! its longest row, so it costs `rows × longest` tokens of which `Σ real` are real; batching
//! requests of similar lengths keeps that ratio near 1. When the front request has tokens:
//!
//! 1. **Anchor.** The batch is formed around one request, its anchor: the front (the most urgent
//!    by the worker's order), so the oldest request of the highest rank always runs in the next
//!    batch. Exception, for deadlines: when a request of the front's class (same rank: priority
//!    level after aging, background or not, delayed or not) is *urgent* — its
//!    [`Item::urgent_at`] has come, the instant after which waiting for another batch would
//!    miss its deadline — the urgent one with the earliest instant anchors instead, unless the
//!    front itself has been passed over [`BatchPolicy::max_passes`] times already (so a stream of
//!    urgent requests cannot starve it). Requests of a lower class never anchor while a higher
//!    one waits: priorities and the latency objective's order (background last, `slo.rs` rule 1)
//!    hold as before.
//! 2. **Joining.** The other requests with the anchor's non-batch dimensions are considered in
//!    this order: urgent requests of the anchor's class (earliest first); requests passed over
//!    `max_passes` times or more (queue order); then the rest by class (higher first), then by
//!    distance of their longest row from the anchor's, then queue order. Each joins when the
//!    batch's rows stay within `max_batch_size` and its padded size within `max_batch_tokens`;
//!    those of the last group only when the batch's padded ÷ real tokens also stays within
//!    [`BatchPolicy::max_padding`] (the `max_padding_ratio` parameter, default 1.05). A request
//!    refused only for padding waits for a batch of its own length.
//! 3. **Leaving.** The batch leaves at once when it is full (`max_batch_size` rows, or a request
//!    was refused for rows or for the token budget), when a request in it is urgent, or when it
//!    reaches a preferred size (it is cut to the largest preferred size it reaches, keeping the
//!    anchor and the requests that joined first). Otherwise it leaves when its anchor has waited
//!    `max_queue_delay` (or one of its requests becomes urgent, if that is sooner): an idle model runs what is there
//!    then, and never waits longer to fill a length.
//! 4. **No starvation.** Every batch takes its anchor, so within a class a request waits for at
//!    most the requests ahead of it in the order (bounded by the queue) plus urgent ones, which
//!    can pass the front at most `max_passes` times; and a request passed over `max_passes` times
//!    joins the next batch of its dimensions that has room whatever its length (rule 2). The
//!    worker counts the passes ([`Item::passed`]): a request shown to the policy, compatible with
//!    the batch that left, and not taken while a request after it in the order was (one behind
//!    every request taken was not passed over: it only waits its turn).
//!
//! # Filling a batch with lower-class requests
//!
//! [`BatchPolicy::fill`] adds requests the plan was not shown (the worker's background work under
//! a latency objective, `slo.rs` rule 1) to a batch that is leaving, up to a number of rows the
//! caller gives: only requests of the batch's dimensions and kind (tokens or none), within
//! `max_batch_size` and `max_batch_tokens`. Text requests join closest to the batch's longest row
//! first, and only while the batch's padded ÷ real tokens stays within `max_padding` (or does not
//! grow): a filled batch costs what a batch of its size of one length costs. With preferred
//! sizes, the filled batch is cut back to the largest preferred size it reaches, if that is at
//! least the size it had before filling. Filling never delays the batch: it leaves when the plan
//! said.
//!
//! A request over the token budget on its own still runs, alone. A batch of requests without
//! tokens behind a front that has tokens (or the reverse) is not formed: requests are compared
//! only with the anchor's kind, and requests without tokens always follow the rules above.

use std::time::{Duration, Instant};

use veraltheim_models::ModelConfig;

/// `max_padding` when the config does not set `max_padding_ratio`.
pub const DEFAULT_MAX_PADDING: f64 = 1.05;
/// `max_passes` when the config does not set `max_passed_over`.
pub const DEFAULT_MAX_PASSES: u32 = 16;

#[derive(Clone, Debug, PartialEq)]
pub struct BatchPolicy {
    /// 0: the model does not batch; every request runs alone.
    pub max_batch_size: usize,
    /// Whether requests are combined at all (`dynamic_batching` present in the config).
    pub dynamic: bool,
    /// Ascending.
    pub preferred: Vec<usize>,
    pub max_delay: Duration,
    /// Text models: a batch's padded size (rows × the longest row's tokens) stays within this
    /// (the `max_batch_tokens` parameter). A request over the budget on its own runs alone.
    pub max_batch_tokens: Option<usize>,
    /// Text models: the padded ÷ real tokens a batch may reach by joining requests of other
    /// lengths (rule 2); at least 1.
    pub max_padding: f64,
    /// Text models: how many times a request may be passed over before it joins whatever its
    /// length, and how many times urgent requests may anchor ahead of the front (rules 1, 4).
    pub max_passes: u32,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_batch_size: 0,
            dynamic: false,
            preferred: Vec::new(),
            max_delay: Duration::ZERO,
            max_batch_tokens: None,
            max_padding: DEFAULT_MAX_PADDING,
            max_passes: DEFAULT_MAX_PASSES,
        }
    }
}

/// What the batcher should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Execute the requests at these positions (ascending) as one batch.
    Run(Vec<usize>),
    /// Nothing is due before this instant (unless more requests arrive).
    Wait(Instant),
    Idle,
}

/// What the policy needs to know of one waiting request.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a, K> {
    pub enqueued: Instant,
    pub rows: usize,
    pub key: &'a K,
    /// Tokens of the request's longest row (0: the request has no tokens).
    pub tokens: usize,
    /// Real tokens of all its rows (0: no tokens).
    pub real: usize,
    /// Its rank: items of equal class are equally urgent by priority (the order given already
    /// puts higher classes first).
    pub class: u64,
    /// From this instant the request must run in the next batch to keep its deadline.
    pub urgent_at: Option<Instant>,
    /// Batches of its dimensions that left without it while it waited.
    pub passed: u32,
}

impl<'a, K> Item<'a, K> {
    /// A request of `rows` rows without tokens, class 0, no deadline, never passed over.
    pub fn new(enqueued: Instant, rows: usize, key: &'a K) -> Self {
        Item {
            enqueued,
            rows,
            key,
            tokens: 0,
            real: 0,
            class: 0,
            urgent_at: None,
            passed: 0,
        }
    }

    fn urgent(&self, now: Instant) -> bool {
        self.urgent_at.is_some_and(|at| at <= now)
    }
}

/// The `max_padding_ratio` and `max_passed_over` parameters, or why they cannot be used.
fn length_parameters(config: &ModelConfig) -> Result<(f64, u32), String> {
    let padding = match config.parameter("max_padding_ratio").map(str::trim) {
        None | Some("") => DEFAULT_MAX_PADDING,
        Some(v) => match v.parse::<f64>() {
            Ok(r) if r.is_finite() && r >= 1.0 => r,
            _ => {
                return Err(format!(
                    "parameter 'max_padding_ratio' is '{v}', expected a number ≥ 1 (padded ÷ \
                     real tokens of a batch)"
                ));
            }
        },
    };
    let passes = match config.parameter("max_passed_over").map(str::trim) {
        None | Some("") => DEFAULT_MAX_PASSES,
        Some(v) => v.parse::<u32>().map_err(|_| {
            format!("parameter 'max_passed_over' is '{v}', expected a whole number ≥ 0")
        })?,
    };
    Ok((padding, passes))
}

/// Checks the length-aware batching parameters of `config` (`max_padding_ratio`,
/// `max_passed_over`): the manager refuses a model whose values do not parse, by name.
pub fn check_length_parameters(config: &ModelConfig) -> Result<(), String> {
    length_parameters(config).map(|_| ())
}

impl BatchPolicy {
    pub fn from_config(config: &ModelConfig) -> Self {
        let db = config.dynamic_batching.as_ref();
        let mut preferred: Vec<usize> = db
            .map(|d| d.preferred_batch_size.iter().map(|&p| p as usize).collect())
            .unwrap_or_default();
        preferred.sort_unstable();
        preferred.dedup();
        let (max_padding, max_passes) = length_parameters(config).unwrap_or_else(|e| {
            tracing::warn!(model = %config.name, error = %e, "default length-aware batching");
            (DEFAULT_MAX_PADDING, DEFAULT_MAX_PASSES)
        });
        BatchPolicy {
            max_batch_size: config.max_batch_size as usize,
            dynamic: db.is_some(),
            preferred,
            max_delay: Duration::from_micros(db.map_or(0, |d| d.max_queue_delay_microseconds)),
            max_batch_tokens: config
                .parameter("max_batch_tokens")
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n > 0),
            max_padding,
            max_passes,
        }
    }

    /// This policy with its token budget lowered to `cap` (the worker's bound on a text
    /// model's batch that holds background rows, `slo.rs` rule 5).
    pub fn with_token_cap(&self, cap: usize) -> BatchPolicy {
        BatchPolicy {
            max_batch_tokens: Some(self.max_batch_tokens.map_or(cap, |b| b.min(cap))),
            ..self.clone()
        }
    }

    pub fn plan<K: PartialEq>(&self, items: &[Item<'_, K>], now: Instant) -> Plan {
        self.plan_within(items, now, usize::MAX)
    }

    /// [`BatchPolicy::plan`] for a batch of at most `max_rows` rows (below `max_batch_size`):
    /// the rules are the same, with `max_rows` as the batch's size limit — a batch that reaches
    /// it is full and leaves at once. The first request is taken whatever its rows, as a request
    /// of more rows than `max_batch_size` runs alone. The worker caps a batch of background
    /// requests so (`slo.rs` rule 5) while showing the policy all of them, so that a text model
    /// forms it of similar lengths out of every background request that waits.
    pub fn plan_within<K: PartialEq>(
        &self,
        items: &[Item<'_, K>],
        now: Instant,
        max_rows: usize,
    ) -> Plan {
        let Some(front) = items.first() else {
            return Plan::Idle;
        };
        if self.max_batch_size == 0 || !self.dynamic {
            return Plan::Run(vec![0]);
        }
        let max = self.max_batch_size.min(max_rows.max(1));
        if front.tokens > 0 {
            return self.plan_by_length(items, now, max);
        }
        let mut chosen = Vec::new();
        let mut rows = 0;
        let mut longest = 0;
        let mut over_budget = false;
        for (i, item) in items.iter().enumerate() {
            if item.key != front.key {
                continue;
            }
            if rows + item.rows > max && !chosen.is_empty() {
                break;
            }
            if let Some(budget) = self.max_batch_tokens {
                let padded = (rows + item.rows).saturating_mul(longest.max(item.tokens));
                if padded > budget && !chosen.is_empty() {
                    over_budget = true;
                    break;
                }
            }
            rows += item.rows;
            longest = longest.max(item.tokens);
            chosen.push(i);
        }
        // Full by rows or by tokens: nothing more can join, so waiting gains nothing.
        if rows >= max || over_budget {
            return Plan::Run(chosen);
        }
        if self.preferred_cut(items, &mut chosen, rows).is_some() {
            return Plan::Run(chosen);
        }
        let due = front.enqueued + self.max_delay;
        if now >= due {
            Plan::Run(chosen)
        } else {
            Plan::Wait(due)
        }
    }

    /// Cuts `chosen` (holding `rows` rows) to the largest preferred size it reaches, keeping its
    /// order's first requests (at least one); `None` when it reaches none.
    fn preferred_cut<K>(
        &self,
        items: &[Item<'_, K>],
        chosen: &mut Vec<usize>,
        rows: usize,
    ) -> Option<usize> {
        let &target = self.preferred.iter().rev().find(|&&p| p <= rows)?;
        let mut taken = 0;
        let prefix = chosen
            .iter()
            .take_while(|&&i| {
                taken += items[i].rows;
                taken <= target
            })
            .count()
            .max(1);
        chosen.truncate(prefix);
        Some(target)
    }

    /// Filling (the module's header): the requests at `extra` that join the batch at `chosen`,
    /// in the order they join, holding at most `max_extra_rows` rows between them.
    pub fn fill<K: PartialEq>(
        &self,
        items: &[Item<'_, K>],
        chosen: &[usize],
        extra: &[usize],
        max_extra_rows: usize,
    ) -> Vec<usize> {
        let Some(&first) = chosen.first() else {
            return Vec::new();
        };
        if self.max_batch_size == 0 || !self.dynamic || max_extra_rows == 0 {
            return Vec::new();
        }
        let key = items[first].key;
        let text = items[first].tokens > 0;
        let (mut rows, mut longest, mut real) = chosen.iter().fold((0, 0, 0), |(r, l, t), &i| {
            let it = &items[i];
            (r + it.rows, l.max(it.tokens), t + it.real)
        });
        let before = rows;
        let mut candidates: Vec<usize> = extra
            .iter()
            .copied()
            .filter(|&i| items[i].key == key && (items[i].tokens > 0) == text)
            .collect();
        if text {
            candidates.sort_by_key(|&i| (items[i].tokens.abs_diff(longest), i));
        }
        let mut joined = Vec::new();
        for i in candidates {
            let it = &items[i];
            if rows + it.rows > self.max_batch_size || rows + it.rows - before > max_extra_rows {
                continue;
            }
            let padded = (rows + it.rows).saturating_mul(longest.max(it.tokens));
            if self.max_batch_tokens.is_some_and(|budget| padded > budget) {
                continue;
            }
            if text {
                let ratio = |padded: usize, real: usize| padded as f64 / real.max(1) as f64;
                let after = ratio(padded, real + it.real);
                if after > self.max_padding && after > ratio(rows * longest, real) {
                    continue;
                }
            }
            rows += it.rows;
            longest = longest.max(it.tokens);
            real += it.real;
            joined.push(i);
        }
        // Preferred sizes: the filled batch is cut back to the largest one it reaches, but never
        // below what it held before filling.
        if let Some(&target) = self
            .preferred
            .iter()
            .rev()
            .find(|&&p| p <= rows && p >= before)
        {
            while rows > target {
                let Some(i) = joined.pop() else { break };
                rows -= items[i].rows;
            }
        }
        joined
    }

    /// The rules for requests with tokens (the module's header, rules 1–3).
    fn plan_by_length<K: PartialEq>(
        &self,
        items: &[Item<'_, K>],
        now: Instant,
        max: usize,
    ) -> Plan {
        let front = &items[0];
        // Rule 1: the anchor.
        let anchor = if front.passed < self.max_passes {
            items
                .iter()
                .enumerate()
                .filter(|(_, it)| it.class == front.class && it.tokens > 0 && it.urgent(now))
                .min_by_key(|(i, it)| (it.urgent_at, *i))
                .map_or(0, |(i, _)| i)
        } else {
            0
        };
        let a = &items[anchor];
        // Rule 2: who may join, in order.
        let mut candidates: Vec<usize> = (0..items.len())
            .filter(|&i| i != anchor && items[i].key == a.key && items[i].tokens > 0)
            .collect();
        // 0: urgent, of the anchor's class; 1: passed over too often; 2: the rest.
        let group = |it: &Item<'_, K>| {
            if it.class == a.class && it.urgent(now) {
                0u8
            } else if it.passed >= self.max_passes {
                1
            } else {
                2
            }
        };
        candidates.sort_by_key(|&i| {
            let it = &items[i];
            match group(it) {
                0 => (0, 0, 0, it.urgent_at, i),
                1 => (1, 0, 0, None, i),
                g => (g, it.class, it.tokens.abs_diff(a.tokens), None, i),
            }
        });
        let mut chosen = vec![anchor];
        let (mut rows, mut longest, mut real) = (a.rows, a.tokens, a.real);
        let mut full = false;
        for i in candidates {
            let it = &items[i];
            if rows + it.rows > max {
                full = true;
                continue;
            }
            let padded = (rows + it.rows).saturating_mul(longest.max(it.tokens));
            if self.max_batch_tokens.is_some_and(|budget| padded > budget) {
                full = true;
                continue;
            }
            if group(it) == 2 && padded as f64 > self.max_padding * (real + it.real) as f64 {
                continue;
            }
            rows += it.rows;
            longest = longest.max(it.tokens);
            real += it.real;
            chosen.push(i);
        }
        // Rule 3: when it leaves.
        let run = |mut chosen: Vec<usize>| {
            chosen.sort_unstable();
            Plan::Run(chosen)
        };
        if rows >= max || full || chosen.iter().any(|&i| items[i].urgent(now)) {
            return run(chosen);
        }
        if self.preferred_cut(items, &mut chosen, rows).is_some() {
            return run(chosen);
        }
        // Wake for the first request of the anchor's class that becomes urgent, in the batch
        // or not (it then anchors or joins at once).
        let due = chosen
            .iter()
            .map(|&i| &items[i])
            .chain(
                items
                    .iter()
                    .filter(|it| it.class == a.class && it.tokens > 0),
            )
            .filter_map(|it| it.urgent_at)
            .fold(a.enqueued + self.max_delay, Instant::min);
        if now >= due {
            run(chosen)
        } else {
            Plan::Wait(due)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: usize, preferred: &[usize], delay_us: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: max,
            dynamic: true,
            preferred: preferred.to_vec(),
            max_delay: Duration::from_micros(delay_us),
            ..BatchPolicy::default()
        }
    }

    fn items<'a>(t0: Instant, rows: &[usize], keys: &'a [u8]) -> Vec<Item<'a, u8>> {
        rows.iter()
            .zip(keys)
            .enumerate()
            .map(|(i, (&rows, key))| Item::new(t0 + Duration::from_micros(i as u64), rows, key))
            .collect()
    }

    #[test]
    fn waits_for_the_delay_then_runs_what_is_there() {
        let t0 = Instant::now();
        let p = policy(8, &[], 100);
        let it = items(t0, &[1, 1], &[0, 0]);
        assert_eq!(p.plan(&it, t0), Plan::Wait(t0 + Duration::from_micros(100)));
        assert_eq!(
            p.plan(&it, t0 + Duration::from_micros(100)),
            Plan::Run(vec![0, 1])
        );
    }

    #[test]
    fn full_batch_leaves_at_once_and_is_capped() {
        let t0 = Instant::now();
        let p = policy(4, &[], 1_000_000);
        let it = items(t0, &[2, 2, 1], &[0, 0, 0]);
        assert_eq!(p.plan(&it, t0), Plan::Run(vec![0, 1]));
    }

    #[test]
    fn preferred_size_leaves_at_once() {
        let t0 = Instant::now();
        let p = policy(16, &[2, 4], 1_000_000);
        let it = items(t0, &[1, 1, 1], &[0, 0, 0]);
        // Three wait: the largest preferred size that fits (2) leaves now.
        assert_eq!(p.plan(&it, t0), Plan::Run(vec![0, 1]));
        let one = items(t0, &[1], &[0]);
        assert!(matches!(p.plan(&one, t0), Plan::Wait(_)));
    }

    #[test]
    fn zero_delay_runs_everything_compatible_now() {
        let t0 = Instant::now();
        let p = policy(8, &[], 0);
        let it = items(t0, &[1, 3, 1, 2], &[0, 1, 0, 0]);
        // Request 1 has other dimensions: it waits for a batch of its own.
        assert_eq!(p.plan(&it, t0), Plan::Run(vec![0, 2, 3]));
    }

    #[test]
    fn order_is_kept_when_the_next_request_does_not_fit() {
        let t0 = Instant::now();
        let p = policy(4, &[], 0);
        let it = items(t0, &[3, 2, 1], &[0, 0, 0]);
        assert_eq!(p.plan(&it, t0), Plan::Run(vec![0]));
    }

    #[test]
    fn no_batching_runs_one_at_a_time() {
        let t0 = Instant::now();
        let mut p = policy(8, &[], 1000);
        p.dynamic = false;
        assert_eq!(p.plan(&items(t0, &[1, 1], &[0, 0]), t0), Plan::Run(vec![0]));
        let p = policy(0, &[], 1000);
        assert_eq!(p.plan(&items(t0, &[1, 1], &[0, 0]), t0), Plan::Run(vec![0]));
        assert_eq!(p.plan::<u8>(&[], t0), Plan::Idle);
    }

    #[test]
    fn from_config_reads_dynamic_batching() {
        let c = ModelConfig::from_json(
            r#"{"name":"m","max_batch_size":16,"input":[{"name":"a","data_type":"TYPE_FP32","dims":[1]}],
                "dynamic_batching":{"preferred_batch_size":[8,4],"max_queue_delay_microseconds":"300"}}"#,
        )
        .unwrap();
        let p = BatchPolicy::from_config(&c);
        assert_eq!(p.max_batch_tokens, None);
        assert_eq!(p.max_padding, DEFAULT_MAX_PADDING);
        assert_eq!(p.max_passes, DEFAULT_MAX_PASSES);
        assert_eq!(p.preferred, vec![4, 8]);
        assert_eq!(p.max_delay, Duration::from_micros(300));
        assert!(p.dynamic);
    }

    /// A waiting text request in a simulation, with what the worker tracks of it.
    #[derive(Clone, Debug)]
    struct Text {
        id: usize,
        tokens: usize,
        enqueued: Instant,
        passed: u32,
    }

    fn shown<'a>(queue: &[Text], key: &'a u8) -> Vec<Item<'a, u8>> {
        queue
            .iter()
            .map(|t| Item {
                tokens: t.tokens,
                real: t.tokens,
                passed: t.passed,
                ..Item::new(t.enqueued, 1, key)
            })
            .collect()
    }

    /// Token counts like those of sentences of 10–80+ characters: mostly 5–22 tokens, some
    /// short phrases of 4–6, a tail up to 40 (a SplitMix64 stream, so the test is reproducible).
    fn lengths(seed: u64) -> impl FnMut() -> usize {
        let mut x = seed;
        move || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let r = (z ^ (z >> 31)) as usize;
            match r % 10 {
                0 => 4 + r / 10 % 3,
                1 => 22 + r / 10 % 19,
                _ => 5 + r / 10 % 18,
            }
        }
    }

    /// Runs a closed loop on an idle model: `waiting` requests queued, every batch the policy
    /// forms taken out and replaced by as many new ones; the worker's pass counts kept. Returns
    /// (padded, real) tokens over `batches` batches, and checks each batch on the way.
    fn closed_loop(p: &BatchPolicy, waiting: usize, batches: usize, seed: u64) -> (usize, usize) {
        let key = 0u8;
        let mut next = lengths(seed);
        let t0 = Instant::now();
        let mut now = t0;
        let mut id = 0;
        let mut queue: Vec<Text> = Vec::new();
        let (mut padded, mut real) = (0, 0);
        for _ in 0..batches {
            while queue.len() < waiting {
                queue.push(Text {
                    id,
                    tokens: next(),
                    enqueued: now,
                    passed: 0,
                });
                id += 1;
            }
            now += Duration::from_millis(1);
            let Plan::Run(positions) = p.plan(&shown(&queue, &key), now) else {
                panic!("an idle model past the delay must run a batch");
            };
            assert!(
                positions.contains(&0),
                "the front always runs: {positions:?}"
            );
            let longest = positions.iter().map(|&i| queue[i].tokens).max().unwrap();
            let sum: usize = positions.iter().map(|&i| queue[i].tokens).sum();
            let batch_padded = positions.len() * longest;
            assert!(positions.len() <= p.max_batch_size);
            if let Some(budget) = p.max_batch_tokens {
                assert!(
                    batch_padded <= budget || positions.len() == 1,
                    "over the budget"
                );
            }
            for &i in &positions {
                assert!(
                    queue[i].passed <= p.max_passes,
                    "request {} was passed over {} times",
                    queue[i].id,
                    queue[i].passed
                );
            }
            padded += batch_padded;
            real += sum;
            let mut kept = Vec::with_capacity(queue.len());
            for (i, mut t) in queue.drain(..).enumerate() {
                if !positions.contains(&i) {
                    t.passed += 1;
                    kept.push(t);
                }
            }
            queue = kept;
        }
        (padded, real)
    }

    fn text_policy(max: usize) -> BatchPolicy {
        policy(max, &[], 100)
    }

    #[test]
    fn mixed_lengths_at_concurrency_64_pad_at_most_five_percent() {
        let p = text_policy(64);
        for seed in [1, 2, 3] {
            let (padded, real) = closed_loop(&p, 64, 3000, seed);
            let ratio = padded as f64 / real as f64;
            assert!(ratio <= 1.05, "seed {seed}: padded ÷ real {ratio:.3}");
        }
        // The same mix in arrival order (no lengths known) pads far more: what this fixes.
        let mut next = lengths(1);
        let batch: Vec<usize> = (0..64).map(|_| next()).collect();
        let fifo = (64 * batch.iter().max().unwrap()) as f64 / batch.iter().sum::<usize>() as f64;
        assert!(fifo > 1.3, "{fifo}");
    }

    #[test]
    fn the_token_budget_holds_and_a_full_batch_leaves_at_once() {
        let mut p = text_policy(64);
        p.max_batch_tokens = Some(200);
        let (padded, real) = closed_loop(&p, 64, 500, 4);
        assert!(padded as f64 / real as f64 <= 1.05);
        // Five requests of 20 tokens fill a budget of 100: they leave at once, long delay or not.
        p.max_batch_tokens = Some(100);
        p.max_delay = Duration::from_secs(60);
        let key = 0u8;
        let t0 = Instant::now();
        let queue: Vec<Text> = (0..7)
            .map(|id| Text {
                id,
                tokens: 20,
                enqueued: t0,
                passed: 0,
            })
            .collect();
        assert_eq!(
            p.plan(&shown(&queue, &key), t0),
            Plan::Run(vec![0, 1, 2, 3, 4])
        );
        // A request over the budget on its own runs alone, never blocking the queue.
        let mut big = queue.clone();
        big[0].tokens = 500;
        assert_eq!(p.plan(&shown(&big, &key), t0), Plan::Run(vec![0]));
    }

    #[test]
    fn a_long_request_is_passed_over_at_most_max_passes_times() {
        // Ten lengths 10, 13, ..., 37 (each too far from the others to share a batch), three
        // requests of each, then a long one: every batch takes the three of the front's length.
        let mut p = text_policy(64);
        p.max_passes = 3;
        let key = 0u8;
        let t0 = Instant::now();
        let mut queue: Vec<Text> = (0..31)
            .map(|id| Text {
                id,
                tokens: if id == 30 { 120 } else { 10 + (id % 10) * 3 },
                enqueued: t0 + Duration::from_micros(id as u64),
                passed: 0,
            })
            .collect();
        let now = t0 + Duration::from_secs(1);
        for batch in 0.. {
            let Plan::Run(positions) = p.plan(&shown(&queue, &key), now) else {
                panic!("must run");
            };
            if let Some(&i) = positions.iter().find(|&&i| queue[i].id == 30) {
                // Without the bound it would have waited until it was the front (batch 10).
                assert_eq!(batch, 3, "taken after 3 passes");
                assert_eq!(queue[i].passed, 3);
                break;
            }
            assert!(batch < 3, "passed over more than 3 times");
            assert_eq!(positions.len(), 3, "one length per batch");
            let mut kept = Vec::new();
            for (i, mut t) in queue.drain(..).enumerate() {
                if !positions.contains(&i) {
                    t.passed += 1;
                    kept.push(t);
                }
            }
            queue = kept;
        }
    }

    #[test]
    fn an_urgent_request_anchors_and_leaves_at_once() {
        let p = policy(64, &[], 1_000_000);
        let key = 0u8;
        let t0 = Instant::now();
        let item = |tokens: usize, urgent_at: Option<Instant>, class: u64, passed: u32| Item {
            tokens,
            real: tokens,
            urgent_at,
            class,
            passed,
            ..Item::new(t0, 1, &key)
        };
        let now = t0 + Duration::from_micros(10);
        // The front (10 tokens) is not urgent; the second (40 tokens) is: it runs now, alone
        // (the front would pad it).
        let it = [item(10, None, 0, 0), item(40, Some(now), 0, 0)];
        assert_eq!(p.plan(&it, now), Plan::Run(vec![1]));
        // Not urgent yet: the batch waits until it is (sooner than the delay).
        let soon = now + Duration::from_millis(3);
        let it = [item(10, None, 0, 0), item(40, Some(soon), 0, 0)];
        assert_eq!(p.plan(&it, now), Plan::Wait(soon));
        // A front passed over too often keeps its place; the urgent one joins it whatever its
        // length, and the batch leaves at once.
        let it = [item(10, None, 0, p.max_passes), item(40, Some(now), 0, 0)];
        assert_eq!(p.plan(&it, now), Plan::Run(vec![0, 1]));
        // A lower class never anchors ahead of a higher one, urgent or not.
        let it = [item(10, None, 0, 0), item(40, Some(now), 1, 0)];
        assert_eq!(p.plan(&it, now), Plan::Wait(t0 + p.max_delay));
    }

    #[test]
    fn higher_classes_join_first_and_lengths_group() {
        let p = policy(3, &[], 0);
        let key = 0u8;
        let t0 = Instant::now();
        let item = |tokens: usize, class: u64| Item {
            tokens,
            real: tokens,
            class,
            ..Item::new(t0, 1, &key)
        };
        // Anchor 20: every class-0 candidate is considered before the class-1 one, closest
        // length first: the 20, then the 21 (3 × 21 = 63 ≤ 1.05 × 61); then the batch is full.
        let it = [
            item(20, 0),
            item(20, 1),
            item(30, 0),
            item(20, 0),
            item(21, 0),
        ];
        assert_eq!(p.plan(&it, t0), Plan::Run(vec![0, 3, 4]));
        // Requests with tokens and requests without never share a batch.
        let mixed = [item(20, 0), Item::new(t0, 1, &key), item(20, 0)];
        assert_eq!(p.plan(&mixed, t0), Plan::Run(vec![0, 2]));
    }

    #[test]
    fn a_batch_capped_below_its_size_leaves_full_with_the_closest_lengths() {
        // What the worker does with background work under a latency objective: all 40 waiting
        // requests are shown, the batch may take 4. It takes the front and the three closest to
        // its length out of all of them, and leaves at once (full), a long delay or not.
        let p = policy(64, &[], 1_000_000);
        let key = 0u8;
        let t0 = Instant::now();
        let mut next = lengths(7);
        let mut queue: Vec<Text> = (0..40)
            .map(|id| Text {
                id,
                tokens: next(),
                enqueued: t0 + Duration::from_micros(id as u64),
                passed: 0,
            })
            .collect();
        for i in [0, 5, 17, 33] {
            queue[i].tokens = 12;
        }
        let Plan::Run(positions) = p.plan_within(&shown(&queue, &key), t0, 4) else {
            panic!("a full batch leaves at once");
        };
        assert_eq!(positions.len(), 4, "{positions:?}");
        assert_eq!(positions[0], 0, "the front anchors");
        let mut distances: Vec<usize> = queue[1..].iter().map(|t| t.tokens.abs_diff(12)).collect();
        distances.sort_unstable();
        let taken: Vec<usize> = positions[1..]
            .iter()
            .map(|&i| queue[i].tokens.abs_diff(12))
            .collect();
        assert!(
            taken.iter().all(|&d| d <= distances[2]),
            "the closest lengths join: took distances {taken:?}, the closest are {:?}",
            &distances[..3]
        );
        assert!(
            positions.iter().any(|&i| i >= 4),
            "found beyond the first four"
        );
        let longest = positions.iter().map(|&i| queue[i].tokens).max().unwrap();
        let real: usize = positions.iter().map(|&i| queue[i].tokens).sum();
        assert!((4 * longest) as f64 <= p.max_padding * real as f64);
        // Shown only the first four (what the worker did before), the batch finds no partner
        // of the front's length and waits for its delay.
        queue.truncate(4);
        queue[1].tokens = 30;
        queue[2].tokens = 5;
        queue[3].tokens = 20;
        assert!(matches!(
            p.plan_within(&shown(&queue, &key), t0, 4),
            Plan::Wait(_)
        ));
        // Without tokens: a prefix of at most the cap, full at the cap; a first request of more
        // rows than the cap still runs, alone.
        let it = items(t0, &[1, 1, 1, 1], &[0, 0, 0, 0]);
        assert_eq!(p.plan_within(&it, t0, 2), Plan::Run(vec![0, 1]));
        let it = items(t0, &[3, 1], &[0, 0]);
        assert_eq!(p.plan_within(&it, t0, 2), Plan::Run(vec![0]));
        assert_eq!(
            p.plan_within(&it, t0, usize::MAX),
            p.plan(&it, t0),
            "no cap is the plain plan"
        );
    }

    #[test]
    fn a_leaving_batch_is_filled_with_the_closest_lengths_within_its_bounds() {
        let p = policy(6, &[], 1_000_000);
        let key = 0u8;
        let other = 1u8;
        let t0 = Instant::now();
        let item = |tokens: usize, key| Item {
            tokens,
            real: tokens,
            ..Item::new(t0, 1, key)
        };
        // An online batch of 20 and 19 tokens (positions 0, 1); background behind it.
        let it = [
            item(20, &key),
            item(19, &key),
            item(40, &key),   // 2: would pad the batch to twice its real tokens
            item(20, &other), // 3: other dimensions
            item(18, &key),   // 4
            item(20, &key),   // 5
            item(21, &key),   // 6
            item(20, &key),   // 7
        ];
        let extra = [2, 3, 4, 5, 6, 7];
        // Closest to the batch's longest row (20) first: the two 20s, then the 21 (5 × 21 = 105 ≤
        // 1.05 × 100); the 18 would pad the batch to 6 × 21 = 126 > 1.05 × 118 and waits.
        assert_eq!(p.fill(&it, &[0, 1], &extra, 10), vec![5, 7, 6]);
        // Held to the rows the caller allows.
        assert_eq!(p.fill(&it, &[0, 1], &extra, 2), vec![5, 7]);
        assert!(p.fill(&it, &[0, 1], &extra, 0).is_empty());
        // Held to the token budget: 4 rows × 20 = 80; a cap lowers a budget, never raises it.
        let budget = p.with_token_cap(80);
        assert_eq!(budget.fill(&it, &[0, 1], &extra, 10), vec![5, 7]);
        assert_eq!(budget.with_token_cap(1000).max_batch_tokens, Some(80));
        // Never padded beyond the ratio: a batch of 10 takes no 40 even with room for it.
        let short = [item(10, &key), item(40, &key), item(11, &key)];
        assert_eq!(p.fill(&short, &[0], &[1, 2], 10), vec![2]);
        // A preferred size: cut back to the largest one reached (4), not below the batch.
        let preferred = policy(6, &[4], 1_000_000);
        assert_eq!(preferred.fill(&it, &[0, 1], &extra, 10), vec![5, 7]);
        // A model that does not batch takes nothing.
        assert!(policy(0, &[], 0).fill(&it, &[0], &extra, 10).is_empty());
        // Without tokens: in the order given, of the batch's dimensions, up to the size.
        let plain = items(t0, &[1, 2, 1, 3, 1], &[0, 0, 1, 0, 0]);
        assert_eq!(
            policy(4, &[], 0).fill(&plain, &[0], &[1, 2, 3, 4], 10),
            vec![1, 4]
        );
        // Kinds do not mix: a text batch takes no request without tokens.
        let mixed = [item(10, &key), Item::new(t0, 1, &key)];
        assert!(p.fill(&mixed, &[0], &[1], 10).is_empty());
    }

    #[test]
    fn preferred_sizes_keep_the_anchor_and_its_closest() {
        let p = BatchPolicy {
            max_padding: 2.0,
            ..policy(16, &[2], 1_000_000)
        };
        let key = 0u8;
        let t0 = Instant::now();
        let item = |tokens: usize| Item {
            tokens,
            real: tokens,
            ..Item::new(t0, 1, &key)
        };
        let it = [item(10), item(14), item(11), item(12)];
        assert_eq!(p.plan(&it, t0), Plan::Run(vec![0, 2]));
    }

    #[test]
    fn length_parameters_are_read_and_bad_ones_named() {
        let config = |params: &str| {
            ModelConfig::from_json(&format!(
                r#"{{"name":"m","max_batch_size":8,"input":[{{"name":"a","data_type":"TYPE_FP32","dims":[1]}}],
                    "dynamic_batching":{{}},"parameters":{{{params}}}}}"#
            ))
            .unwrap()
        };
        let c = config(
            r#""max_padding_ratio":{"string_value":"1.2"},"max_passed_over":{"string_value":"4"}"#,
        );
        let p = BatchPolicy::from_config(&c);
        assert_eq!((p.max_padding, p.max_passes), (1.2, 4));
        assert!(check_length_parameters(&c).is_ok());
        for bad in [
            r#""max_padding_ratio":{"string_value":"0.9"}"#,
            r#""max_padding_ratio":{"string_value":"x"}"#,
        ] {
            let e = check_length_parameters(&config(bad)).unwrap_err();
            assert!(e.contains("max_padding_ratio"), "{e}");
        }
        let e = check_length_parameters(&config(r#""max_passed_over":{"string_value":"-1"}"#))
            .unwrap_err();
        assert!(e.contains("max_passed_over"), "{e}");
    }

    proptest::proptest! {
        /// Whatever waits, a length-aware batch holds its anchor, stays within its rows and its
        /// token budget (unless alone), and never lets a lower class anchor.
        #[test]
        fn length_aware_batches_keep_their_bounds(
            waiting in proptest::collection::vec(
                (1usize..64, 1usize..4, 0u64..3, proptest::option::of(0u64..2000), 0u32..20, 0u8..2),
                1..40,
            ),
            max in 1usize..16,
            budget in proptest::option::of(16usize..400),
            now_us in 0u64..3000,
        ) {
            let p = BatchPolicy { max_batch_tokens: budget, max_passes: 8, ..policy(max, &[], 500) };
            let t0 = Instant::now();
            let now = t0 + Duration::from_micros(now_us);
            let mut sorted = waiting.clone();
            sorted.sort_by_key(|w| w.2);
            let items: Vec<Item<'_, u8>> = sorted
                .iter()
                .enumerate()
                .map(|(i, (tokens, rows, class, urgent, passed, key))| Item {
                    tokens: *tokens,
                    real: tokens * rows,
                    class: *class,
                    urgent_at: urgent.map(|u| t0 + Duration::from_micros(u)),
                    passed: *passed,
                    ..Item::new(t0 + Duration::from_nanos(i as u64), *rows, key)
                })
                .collect();
            match p.plan(&items, now) {
                Plan::Run(positions) => {
                    proptest::prop_assert!(!positions.is_empty());
                    proptest::prop_assert!(positions.windows(2).all(|w| w[0] < w[1]));
                    let anchor_class = positions.iter().map(|&i| items[i].class).min().unwrap();
                    proptest::prop_assert_eq!(anchor_class, items[0].class);
                    let key = items[positions[0]].key;
                    proptest::prop_assert!(positions.iter().all(|&i| items[i].key == key));
                    let rows: usize = positions.iter().map(|&i| items[i].rows).sum();
                    let longest = positions.iter().map(|&i| items[i].tokens).max().unwrap();
                    if positions.len() > 1 {
                        proptest::prop_assert!(rows <= max);
                        if let Some(b) = budget {
                            proptest::prop_assert!(rows * longest <= b);
                        }
                    }
                    if items[0].passed >= p.max_passes || !items.iter().any(|it| it.class == items[0].class && it.urgent(now)) {
                        proptest::prop_assert!(positions.contains(&0), "the front runs");
                    }
                }
                Plan::Wait(at) => proptest::prop_assert!(at > now),
                Plan::Idle => proptest::prop_assert!(false, "items wait"),
            }
        }
    }
}
