//! Per-model counters in Triton's terms, updated with relaxed atomics on the hot path and read as
//! a consistent-enough snapshot by the statistics APIs and `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Latency distributions of one model, in microseconds, since it was loaded.
#[derive(Debug)]
pub(crate) struct Latency {
    queue: Histogram<u64>,
    compute: Histogram<u64>,
    total: Histogram<u64>,
    /// The exact sum of the end-to-end times recorded in `total`, in microseconds.
    total_sum_us: u64,
}

impl Default for Latency {
    fn default() -> Self {
        // 1 µs to 10 min at 2 significant digits: a few KiB per histogram.
        let h = || Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds");
        Latency {
            queue: h(),
            compute: h(),
            total: h(),
            total_sum_us: 0,
        }
    }
}

impl Latency {
    pub(crate) fn record(&mut self, queue: Duration, compute: Duration, total: Duration) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.queue.saturating_record(us(queue));
        self.compute.saturating_record(us(compute));
        self.total.saturating_record(us(total));
        self.total_sum_us = self.total_sum_us.saturating_add(us(total));
    }
}

/// The end-to-end latency of a model's successful requests as cumulative buckets (Prometheus's
/// histogram form), since the model was loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyBuckets {
    /// For each upper bound asked for (µs, ascending), the requests that took at most that long.
    pub cumulative: Vec<u64>,
    /// All requests recorded.
    pub count: u64,
    /// Their summed latency, µs.
    pub sum_us: u64,
}

impl LatencyBuckets {
    /// Reads `h` into buckets bounded by `upper_us` (ascending). A recorded value sits in a cell
    /// of the histogram 1% wide (2 significant digits); it counts below a bound when its cell
    /// starts at or below the bound, so a bucket may take in values up to 1% above its bound.
    fn of(h: &Histogram<u64>, upper_us: &[u64], sum_us: u64) -> Self {
        let mut per_bucket = vec![0u64; upper_us.len()];
        for v in h.iter_recorded() {
            let low = h.lowest_equivalent(v.value_iterated_to());
            if let Some(i) = upper_us.iter().position(|&b| low <= b) {
                per_bucket[i] += v.count_at_value();
            }
        }
        let mut running = 0;
        let cumulative = per_bucket
            .into_iter()
            .map(|n| {
                running += n;
                running
            })
            .collect();
        LatencyBuckets {
            cumulative,
            count: h.len(),
            sum_us,
        }
    }
}

/// Percentiles of a latency distribution, in microseconds (0 when nothing was recorded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[derive(Default, Debug)]
pub struct DurationCounter {
    count: AtomicU64,
    ns: AtomicU64,
}

impl DurationCounter {
    pub fn add(&self, n: u64, d: Duration) {
        self.count.fetch_add(n, Relaxed);
        self.ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    fn snapshot(&self) -> DurationStat {
        DurationStat {
            count: self.count.load(Relaxed),
            ns: self.ns.load(Relaxed),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurationStat {
    pub count: u64,
    pub ns: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStat {
    pub batch_size: u64,
    pub count: u64,
    pub compute_ns: u64,
}

#[derive(Default, Debug)]
pub struct ModelStats {
    pub(crate) success: DurationCounter,
    pub(crate) fail: DurationCounter,
    pub(crate) queue: DurationCounter,
    pub(crate) compute_input: DurationCounter,
    pub(crate) compute_infer: DurationCounter,
    pub(crate) compute_output: DurationCounter,
    pub(crate) cache_hit: DurationCounter,
    pub(crate) cache_miss: DurationCounter,
    pub(crate) inference_count: AtomicU64,
    pub(crate) execution_count: AtomicU64,
    pub(crate) last_inference_ms: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) padded_tokens: AtomicU64,
    pub(crate) real_tokens: AtomicU64,
    pub(crate) batches: Mutex<BTreeMap<u64, (u64, u64)>>,
    pub(crate) latency: Mutex<Latency>,
}

/// A copy of a model's statistics at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub success: DurationStat,
    pub fail: DurationStat,
    pub queue: DurationStat,
    pub compute_input: DurationStat,
    pub compute_infer: DurationStat,
    pub compute_output: DurationStat,
    /// Requests answered from the response cache (lookup time).
    pub cache_hit: DurationStat,
    /// Lookups that missed (lookup time; the request then ran).
    pub cache_miss: DurationStat,
    /// Batch items executed.
    pub inference_count: u64,
    /// Batches executed.
    pub execution_count: u64,
    pub last_inference_ms: u64,
    /// Refused because the queue was full.
    pub rejected: u64,
    /// Dropped from the queue because their deadline passed.
    pub expired: u64,
    /// Dropped from the queue because the caller went away.
    pub cancelled: u64,
    /// Waiting in the queue now.
    pub pending: u64,
    /// Text models: tokens of the batches executed successfully, padded to each batch's longest
    /// row (what the model computed) and real (the requests' own); 0 for other models.
    pub padded_tokens: u64,
    pub real_tokens: u64,
    pub batches: Vec<BatchStat>,
    /// Successful requests: time in the queue, in the batch, and end to end.
    pub queue_us: Percentiles,
    pub compute_us: Percentiles,
    pub total_us: Percentiles,
    /// The latency objective and its controller, when the model has one.
    pub slo: Option<crate::slo::SloSnapshot>,
}

impl ModelStats {
    pub(crate) fn record_batch(&self, rows: usize, compute: Duration) {
        self.inference_count.fetch_add(rows as u64, Relaxed);
        self.execution_count.fetch_add(1, Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_inference_ms.store(now_ms, Relaxed);
        let mut b = self.batches.lock();
        let e = b.entry(rows as u64).or_default();
        e.0 += 1;
        e.1 += compute.as_nanos() as u64;
    }

    pub(crate) fn record_tokens(&self, padded: u64, real: u64) {
        self.padded_tokens.fetch_add(padded, Relaxed);
        self.real_tokens.fetch_add(real, Relaxed);
    }

    /// The end-to-end latency of successful requests in buckets bounded by `upper_us`
    /// (microseconds, ascending), for a Prometheus histogram.
    pub fn latency_buckets(&self, upper_us: &[u64]) -> LatencyBuckets {
        let l = self.latency.lock();
        LatencyBuckets::of(&l.total, upper_us, l.total_sum_us)
    }

    /// `pending` is the queue depth, which the queue itself counts.
    pub fn snapshot(&self, pending: usize) -> StatsSnapshot {
        let (queue_us, compute_us, total_us) = {
            let l = self.latency.lock();
            (
                Percentiles::of(&l.queue),
                Percentiles::of(&l.compute),
                Percentiles::of(&l.total),
            )
        };
        StatsSnapshot {
            queue_us,
            compute_us,
            total_us,
            success: self.success.snapshot(),
            fail: self.fail.snapshot(),
            queue: self.queue.snapshot(),
            compute_input: self.compute_input.snapshot(),
            compute_infer: self.compute_infer.snapshot(),
            compute_output: self.compute_output.snapshot(),
            cache_hit: self.cache_hit.snapshot(),
            cache_miss: self.cache_miss.snapshot(),
            inference_count: self.inference_count.load(Relaxed),
            execution_count: self.execution_count.load(Relaxed),
            last_inference_ms: self.last_inference_ms.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            expired: self.expired.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            padded_tokens: self.padded_tokens.load(Relaxed),
            real_tokens: self.real_tokens.load(Relaxed),
            pending: pending as u64,
            slo: None,
            batches: self
                .batches
                .lock()
                .iter()
                .map(|(&batch_size, &(count, compute_ns))| BatchStat {
                    batch_size,
                    count,
                    compute_ns,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_with_an_exact_sum() {
        let mut l = Latency::default();
        let us = Duration::from_micros;
        for total in [50, 100, 900, 1_000, 20_000, 3_000_000] {
            l.record(us(1), us(1), us(total));
        }
        let b = LatencyBuckets::of(&l.total, &[100, 1_000, 10_000, 1_000_000], l.total_sum_us);
        assert_eq!(b.cumulative, vec![2, 4, 4, 5]);
        assert_eq!(b.count, 6);
        assert_eq!(b.sum_us, 50 + 100 + 900 + 1_000 + 20_000 + 3_000_000);
        let empty = LatencyBuckets::of(&Latency::default().total, &[100], 0);
        assert_eq!(empty.cumulative, vec![0]);
        assert_eq!(empty.count, 0);
    }
}
