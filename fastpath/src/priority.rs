//! Priorities and queue policies (Triton's `priority_levels`, `default_priority_level`,
//! `default_queue_policy`, `priority_queue_policy`), plus an aging rule of ours: a request's
//! effective level rises by one for every `aging` interval it has waited, so that the lowest level
//! is never starved forever. Strict between effective levels, FIFO within one. Pure functions of
//! the waiting requests and the time, tested without a runtime.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use veraltheim_models::ModelConfig;
use veraltheim_models::config::QueuePolicy;

/// How a level treats a request whose queue timeout passes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LevelPolicy {
    pub timeout: Option<Duration>,
    pub allow_timeout_override: bool,
    /// `DELAY`: the request is demoted behind every request that has not timed out, instead of
    /// being refused (`REJECT`).
    pub delay: bool,
    /// This level's own queue bound; 0: only the model's overall bound applies.
    pub max_queue_size: usize,
}

impl LevelPolicy {
    fn from_config(q: Option<&QueuePolicy>) -> Self {
        match q {
            None => LevelPolicy {
                timeout: None,
                allow_timeout_override: true,
                delay: false,
                max_queue_size: 0,
            },
            Some(q) => LevelPolicy {
                timeout: (q.default_timeout_microseconds > 0)
                    .then(|| Duration::from_micros(q.default_timeout_microseconds)),
                allow_timeout_override: q.allow_timeout_override,
                delay: q.timeout_action == "DELAY",
                max_queue_size: q.max_queue_size as usize,
            },
        }
    }

    /// The queue timeout a request gets, given what it asked for.
    pub fn timeout_for(&self, asked: Option<Duration>) -> Option<Duration> {
        match (asked, self.timeout) {
            (Some(_), Some(default)) if !self.allow_timeout_override => Some(default),
            (Some(asked), _) => Some(asked),
            (None, default) => default,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityPolicy {
    /// 0 or 1: a single level.
    pub levels: u32,
    pub default_level: u32,
    pub aging: Duration,
    default_policy: LevelPolicy,
    per_level: BTreeMap<u32, LevelPolicy>,
}

impl PriorityPolicy {
    pub fn from_config(config: &ModelConfig, aging: Duration) -> Self {
        let db = config.dynamic_batching.as_ref();
        let levels = db.map_or(0, |d| d.priority_levels.min(u64::from(u32::MAX)) as u32);
        let default_level = db
            .map_or(0, |d| {
                d.default_priority_level.min(u64::from(u32::MAX)) as u32
            })
            .clamp(1, levels.max(1));
        let per_level = db
            .map(|d| {
                d.priority_queue_policy
                    .iter()
                    .filter_map(|(k, q)| Some((k.parse().ok()?, LevelPolicy::from_config(Some(q)))))
                    .collect()
            })
            .unwrap_or_default();
        PriorityPolicy {
            levels,
            default_level,
            aging,
            default_policy: LevelPolicy::from_config(
                db.and_then(|d| d.default_queue_policy.as_ref()),
            ),
            per_level,
        }
    }

    /// Whether ordering by priority can differ from arrival order.
    pub fn ordered(&self) -> bool {
        self.levels > 1
    }

    /// The level a request runs at: 0 asks for the default; beyond `levels` is refused.
    pub fn level_of(&self, asked: u32) -> Result<u32, String> {
        match asked {
            0 => Ok(self.default_level),
            p if self.levels <= 1 => {
                if p == 1 {
                    Ok(1)
                } else {
                    Err(format!(
                        "priority {p} given, but the model has no priority levels"
                    ))
                }
            }
            p if p <= self.levels => Ok(p),
            p => Err(format!("priority {p} is outside 1..={}", self.levels)),
        }
    }

    /// Per-level queue bounds (index `level - 1`), when any level has its own
    /// `priority_queue_policy.max_queue_size`; levels without one are unbounded here (the model's
    /// overall bound still applies).
    pub fn level_caps(&self) -> Option<Vec<usize>> {
        if !self.per_level.values().any(|p| p.max_queue_size > 0) {
            return None;
        }
        Some(
            (1..=self.levels.max(1))
                .map(|l| match self.per_level.get(&l).map(|p| p.max_queue_size) {
                    Some(n) if n > 0 => n,
                    _ => usize::MAX,
                })
                .collect(),
        )
    }

    pub fn policy(&self, level: u32) -> &LevelPolicy {
        self.per_level.get(&level).unwrap_or(&self.default_policy)
    }

    /// Sort key: delayed requests last, then effective level (aging lifts one level per
    /// `aging` waited). Ties keep arrival order (the sort is stable).
    pub fn rank(&self, level: u32, delayed: bool, waited: Duration) -> (bool, u32) {
        let boost = if self.aging.is_zero() {
            0
        } else {
            (waited.as_nanos() / self.aging.as_nanos()).min(u128::from(u32::MAX)) as u32
        };
        (delayed, level.saturating_sub(boost).max(1))
    }
}

/// The order in which waiting requests should be considered at `now`: indices into `items`
/// (`(level, delayed, enqueued)`), highest effective priority first, FIFO within a rank.
pub fn order(policy: &PriorityPolicy, items: &[(u32, bool, Instant)], now: Instant) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.sort_by_key(|&i| {
        let (level, delayed, enqueued) = items[i];
        policy.rank(level, delayed, now.saturating_duration_since(enqueued))
    });
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(levels: u32, default: u32, aging_ms: u64) -> PriorityPolicy {
        let c = ModelConfig::from_json(&format!(
            r#"{{"name":"m","max_batch_size":8,"input":[{{"name":"a","data_type":"TYPE_FP32","dims":[1]}}],
                "dynamic_batching":{{"priority_levels":{levels},"default_priority_level":{default},
                  "default_queue_policy":{{"default_timeout_microseconds":1000,"allow_timeout_override":true}},
                  "priority_queue_policy":{{"2":{{"timeout_action":"DELAY","default_timeout_microseconds":500}}}}}}}}"#
        ))
        .unwrap();
        PriorityPolicy::from_config(&c, Duration::from_millis(aging_ms))
    }

    #[test]
    fn levels_and_defaults() {
        let p = policy(3, 2, 100);
        assert_eq!(p.level_of(0), Ok(2));
        assert_eq!(p.level_of(1), Ok(1));
        assert_eq!(p.level_of(3), Ok(3));
        assert!(p.level_of(4).unwrap_err().contains("outside 1..=3"));
        let flat = PriorityPolicy::from_config(
            &veraltheim_models::builtin::config("identity").unwrap(),
            Duration::from_secs(1),
        );
        assert_eq!(flat.level_of(0), Ok(1));
        assert_eq!(flat.level_of(1), Ok(1));
        assert!(flat.level_of(2).is_err());
        assert!(!flat.ordered());
    }

    #[test]
    fn per_level_policies_and_timeout_override() {
        let p = policy(3, 2, 100);
        assert!(p.policy(2).delay);
        assert_eq!(p.policy(2).timeout, Some(Duration::from_micros(500)));
        assert!(!p.policy(1).delay);
        // level 2 does not allow an override: its default wins
        assert_eq!(
            p.policy(2).timeout_for(Some(Duration::from_secs(9))),
            Some(Duration::from_micros(500))
        );
        // level 1 (default policy) allows it
        assert_eq!(
            p.policy(1).timeout_for(Some(Duration::from_secs(9))),
            Some(Duration::from_secs(9))
        );
        assert_eq!(
            p.policy(1).timeout_for(None),
            Some(Duration::from_micros(1000))
        );
    }

    #[test]
    fn strict_between_levels_fifo_within() {
        let p = policy(3, 2, 1_000_000);
        let t0 = Instant::now();
        let at = |us| t0 + Duration::from_micros(us);
        let items = [
            (3, false, at(0)),
            (1, false, at(1)),
            (2, false, at(2)),
            (1, false, at(3)),
        ];
        assert_eq!(order(&p, &items, at(10)), vec![1, 3, 2, 0]);
    }

    #[test]
    fn aging_lifts_the_lowest_level_until_it_runs() {
        let p = policy(3, 2, 100);
        let t0 = Instant::now();
        let items = [(3, false, t0), (1, false, t0 + Duration::from_millis(140))];
        // at 150 ms the level-3 request counts as level 2: still behind level 1
        assert_eq!(
            order(&p, &items, t0 + Duration::from_millis(150)),
            vec![1, 0]
        );
        // from 200 ms it counts as level 1 and, being older, goes first
        assert_eq!(
            order(&p, &items, t0 + Duration::from_millis(200)),
            vec![0, 1]
        );
    }

    #[test]
    fn delayed_requests_go_last_even_at_the_top_level() {
        let p = policy(3, 2, 1_000_000);
        let t0 = Instant::now();
        let items = [(1, true, t0), (3, false, t0 + Duration::from_micros(5))];
        assert_eq!(
            order(&p, &items, t0 + Duration::from_micros(10)),
            vec![1, 0]
        );
    }
}
