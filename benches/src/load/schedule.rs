//! The open loop's fixed schedule: request `i` is due at `i / rate` seconds after the start,
//! whatever happened to earlier requests. Latency is measured from that due time, so a server
//! that stalls is charged for the requests that waited behind the stall (no coordinated
//! omission). The first `warmup_count` requests are sent but not recorded.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    rate: f64,
    warmup_count: u64,
    total: u64,
}

/// `x` requests, rounded down, tolerating float error just below an integer (0.3 × 10 = 2.999…).
fn whole(x: f64) -> u64 {
    (x + 1e-9).floor().max(0.0) as u64
}

impl Schedule {
    /// `rate` requests/s (finite, > 0) for `warmup` then `duration`.
    pub fn new(rate: f64, warmup: Duration, duration: Duration) -> Schedule {
        assert!(rate.is_finite() && rate > 0.0, "rate must be positive");
        let warmup_count = whole(warmup.as_secs_f64() * rate);
        let measured = whole(duration.as_secs_f64() * rate);
        Schedule {
            rate,
            warmup_count,
            total: warmup_count + measured,
        }
    }

    /// How many requests the schedule holds, warm-up included.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn warmup_count(&self) -> u64 {
        self.warmup_count
    }

    pub fn measured_count(&self) -> u64 {
        self.total - self.warmup_count
    }

    /// When request `i` is due, after the schedule's start (rounded to the nanosecond; computed
    /// from `i`, not accumulated, so there is no drift).
    pub fn offset(&self, i: u64) -> Duration {
        Duration::from_nanos((i as f64 * 1e9 / self.rate).round() as u64)
    }

    /// Whether request `i` is recorded (it is due after the warm-up).
    pub fn is_measured(&self, i: u64) -> bool {
        i >= self.warmup_count
    }

    /// The measured window, after the schedule's start: from the first measured request's due
    /// time for `measured_count / rate`.
    pub fn measured_window(&self) -> (Duration, Duration) {
        let start = self.offset(self.warmup_count);
        let len = Duration::from_secs_f64(self.measured_count() as f64 / self.rate);
        (start, start + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_rate_and_durations() {
        let s = Schedule::new(1000.0, Duration::from_millis(500), Duration::from_secs(2));
        assert_eq!(s.warmup_count(), 500);
        assert_eq!(s.measured_count(), 2000);
        assert_eq!(s.total(), 2500);
    }

    #[test]
    fn float_products_just_below_an_integer_are_not_lost() {
        // 0.3 s × 10/s is 2.9999999999999996 in f64.
        let s = Schedule::new(10.0, Duration::ZERO, Duration::from_secs_f64(0.3));
        assert_eq!(s.measured_count(), 3);
    }

    #[test]
    fn offsets_are_exact_and_drift_free() {
        let s = Schedule::new(3.0, Duration::ZERO, Duration::from_secs(1000));
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.offset(3), Duration::from_secs(1));
        // Far into the schedule, still on the exact grid (an accumulated 1/3 s would drift).
        assert_eq!(s.offset(2999), Duration::from_nanos(999_666_666_667));
        assert_eq!(s.offset(3000), Duration::from_secs(1000));
        for i in 0..3000 {
            assert!(s.offset(i) < s.offset(i + 1));
        }
    }

    #[test]
    fn warmup_requests_are_not_measured() {
        let s = Schedule::new(
            100.0,
            Duration::from_millis(100),
            Duration::from_millis(100),
        );
        assert!(!s.is_measured(0));
        assert!(!s.is_measured(9));
        assert!(s.is_measured(10));
        assert_eq!(s.total(), 20);
        let (start, end) = s.measured_window();
        assert_eq!(start, Duration::from_millis(100));
        assert_eq!(end, Duration::from_millis(200));
    }

    #[test]
    fn fractional_rates() {
        let s = Schedule::new(0.5, Duration::ZERO, Duration::from_secs(5));
        assert_eq!(s.measured_count(), 2);
        assert_eq!(s.offset(1), Duration::from_secs(2));
        let (_, end) = s.measured_window();
        assert_eq!(end, Duration::from_secs(4));
    }
}
