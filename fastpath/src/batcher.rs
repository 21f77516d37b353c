//! The dynamic batcher's rules, as a pure function of what waits and when (Triton semantics):
//! a batch leaves at once when it reaches `max_batch_size` or a preferred size, otherwise when its
//! oldest request has waited `max_queue_delay`. Requests only share a batch when their non-batch
//! dimensions agree; a request that cannot join the front's batch keeps its place for the next.

use std::time::{Duration, Instant};

use veraltheim_models::ModelConfig;

#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Estimated tokens of the request's longest row (0 when unknown).
    pub tokens: usize,
}

impl BatchPolicy {
    pub fn from_config(config: &ModelConfig) -> Self {
        let db = config.dynamic_batching.as_ref();
        let mut preferred: Vec<usize> = db
            .map(|d| d.preferred_batch_size.iter().map(|&p| p as usize).collect())
            .unwrap_or_default();
        preferred.sort_unstable();
        preferred.dedup();
        BatchPolicy {
            max_batch_size: config.max_batch_size as usize,
            dynamic: db.is_some(),
            preferred,
            max_delay: Duration::from_micros(db.map_or(0, |d| d.max_queue_delay_microseconds)),
            max_batch_tokens: config
                .parameter("max_batch_tokens")
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n > 0),
        }
    }

    pub fn plan<K: PartialEq>(&self, items: &[Item<'_, K>], now: Instant) -> Plan {
        let Some(front) = items.first() else {
            return Plan::Idle;
        };
        if self.max_batch_size == 0 || !self.dynamic {
            return Plan::Run(vec![0]);
        }
        let mut chosen = Vec::new();
        let mut rows = 0;
        let mut longest = 0;
        let mut over_budget = false;
        for (i, item) in items.iter().enumerate() {
            if item.key != front.key {
                continue;
            }
            if rows + item.rows > self.max_batch_size {
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
        if rows >= self.max_batch_size || over_budget {
            return Plan::Run(chosen);
        }
        if let Some(&target) = self.preferred.iter().rev().find(|&&p| p <= rows) {
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
            return Plan::Run(chosen);
        }
        let due = front.enqueued + self.max_delay;
        if now >= due {
            Plan::Run(chosen)
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
            max_batch_tokens: None,
        }
    }

    fn items<'a>(t0: Instant, rows: &[usize], keys: &'a [u8]) -> Vec<Item<'a, u8>> {
        rows.iter()
            .zip(keys)
            .enumerate()
            .map(|(i, (&rows, key))| Item {
                enqueued: t0 + Duration::from_micros(i as u64),
                rows,
                key,
                tokens: 0,
            })
            .collect()
    }

    #[test]
    fn token_budget_bounds_the_padded_batch_and_sends_it_at_once() {
        let t0 = Instant::now();
        let mut p = policy(16, &[], 1_000_000);
        p.max_batch_tokens = Some(64);
        let keys = [0u8; 5];
        let mut it = items(t0, &[1, 1, 1, 1, 1], &keys);
        for (item, tokens) in it.iter_mut().zip([10, 12, 30, 5, 5]) {
            item.tokens = tokens;
        }
        // 2 rows × 12 = 24 fits; a third row of 30 would pad to 3 × 30 = 90 > 64: the two leave now.
        assert_eq!(p.plan(&it, t0), Plan::Run(vec![0, 1]));
        // The long one first: 30, then 2 × 30 = 60 fits, 3 × 30 = 90 does not.
        let it2: Vec<_> = it[2..].to_vec();
        assert_eq!(p.plan(&it2, t0), Plan::Run(vec![0, 1]));
        // A request over the budget on its own still runs (alone), never blocking the queue.
        let mut big = items(t0, &[1, 1], &keys[..2]);
        big[0].tokens = 500;
        big[1].tokens = 1;
        assert_eq!(p.plan(&big, t0), Plan::Run(vec![0]));
        // Within budget: the usual delay applies.
        let small: Vec<_> = it[3..].to_vec();
        assert!(matches!(p.plan(&small, t0), Plan::Wait(_)));
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
        assert_eq!(p.preferred, vec![4, 8]);
        assert_eq!(p.max_delay, Duration::from_micros(300));
        assert!(p.dynamic);
    }
}
