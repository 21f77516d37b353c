//! What a load run measured: a latency histogram (hdrhistogram, µs), successes, errors by gRPC
//! code, and the report printed from them (a table line or one JSON object).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::Code;

use super::cpu::CpuUse;

/// Largest latency the histogram resolves, in µs (60 s); longer ones are recorded as this value.
const MAX_US: u64 = 60_000_000;
/// Significant figures of the histogram: values are exact to 0.1%.
const SIGFIG: u8 = 3;

/// The error name a client-side timeout is counted under (the request was abandoned by the load
/// generator, no status came back).
pub const CLIENT_TIMEOUT: &str = "CLIENT_TIMEOUT";
/// The error name of an OK response with no output tensor.
pub const BAD_RESPONSE: &str = "BAD_RESPONSE";

/// The canonical gRPC name of a status code (`RESOURCE_EXHAUSTED`...), as the errors are keyed.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Accumulates the outcomes of requests: one per client task, merged at the end (no sharing
/// while the load runs).
#[derive(Clone, Debug)]
pub struct Recorder {
    hist: Histogram<u64>,
    /// Latency of the failed requests whose latency was given ([`Recorder::error_after`]).
    error_hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            hist: Histogram::new_with_bounds(1, MAX_US, SIGFIG)
                .expect("constant histogram bounds are valid"),
            error_hist: Histogram::new_with_bounds(1, MAX_US, SIGFIG)
                .expect("constant histogram bounds are valid"),
            errors: BTreeMap::new(),
        }
    }

    /// A successful request and its latency (clamped to 1 µs .. 60 s).
    pub fn ok(&mut self, latency: Duration) {
        record(&mut self.hist, latency);
    }

    /// A failed request, by error name, and how long its answer took (how fast the server
    /// refuses shows in [`Recorder::error_latency`]).
    pub fn error_after(&mut self, name: &str, latency: Duration) {
        self.error(name);
        record(&mut self.error_hist, latency);
    }

    /// Latency of the failed requests recorded with [`Recorder::error_after`].
    pub fn error_latency(&self) -> Latency {
        Latency::of(&self.error_hist)
    }

    /// A failed request, by error name (see [`code_name`], [`CLIENT_TIMEOUT`]).
    pub fn error(&mut self, name: &str) {
        *self.errors.entry(name.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms share the same bounds, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        let _ = self.error_hist.add(&other.error_hist);
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    pub fn successes(&self) -> u64 {
        self.hist.len()
    }

    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn latency(&self) -> Latency {
        Latency::of(&self.hist)
    }
}

/// Records `latency` clamped to 1 µs .. 60 s.
fn record(h: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_US);
    h.saturating_record(us.clamp(1, MAX_US));
}

/// Percentiles of a latency histogram, in µs; all zero when nothing was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// Successes per second over a measured window; 0 for an empty window.
pub fn throughput(successes: u64, window: Duration) -> f64 {
    let s = window.as_secs_f64();
    if s > 0.0 { successes as f64 / s } else { 0.0 }
}

/// The result of one load run against one target.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// `echo` (the in-process tonic echo server), `coordinator` (the `veraltheim serve` started by
    /// the suite) or the `--server` address.
    pub target: String,
    pub model: String,
    pub shape: String,
    /// `closed` (fixed concurrency) or `open` (fixed arrival rate).
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Offered rate of an open-loop run, requests/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    pub channels: usize,
    /// Length of the measured window, seconds (warm-up excluded).
    pub window_s: f64,
    /// Successful requests in the window.
    pub requests: u64,
    pub throughput_rps: f64,
    /// Latency of the successful requests; in an open loop measured from the scheduled send time.
    pub latency_us: Latency,
    pub errors: BTreeMap<String, u64>,
    /// Latency of the failed requests (from the scheduled send time in an open loop); absent
    /// when none failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_latency_us: Option<Latency>,
    /// Open loop only: requests the load generator did not send because `--max-outstanding`
    /// were already in flight (shed by the client, not by the server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_shed: Option<u64>,
    /// Open loop only: how late the generator actually sent requests against their schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_us: Option<Latency>,
    /// CPU used during the measured window (Linux only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuUse>,
    /// Closed loop with several requests: successes in the window per request (index into the
    /// caller's requests); empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub payload_requests: Vec<u64>,
}

impl LoadReport {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let load = match (self.concurrency, self.rate) {
            (Some(c), _) => format!("closed c={c}"),
            (_, Some(r)) => format!("open {r:.0}/s"),
            _ => String::new(),
        };
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut s = format!(
            "{:<12} {:<9} {:<6} {:<13} {:>10.0} req/s  p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  n={} errors: {}",
            self.target,
            self.model,
            self.shape,
            load,
            self.throughput_rps,
            self.latency_us.p50_us,
            self.latency_us.p99_us,
            self.latency_us.p999_us,
            self.requests,
            errors
        );
        if let Some(e) = &self.error_latency_us {
            s.push_str(&format!("  errors p50 {} µs p99 {} µs", e.p50_us, e.p99_us));
        }
        if let Some(shed) = self.client_shed {
            s.push_str(&format!("  client-shed: {shed}"));
        }
        if let Some(lag) = &self.send_lag_us {
            s.push_str(&format!("  send-lag p99 {} µs", lag.p99_us));
        }
        if let Some(c) = &self.cpu {
            let opt = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.2}"));
            s.push_str(&format!(
                "  cpu cores: client {:.2} server {} others {} (steal {}, machine busy {}); cpu µs/req: client {} server {}",
                c.client_cores,
                opt(c.server_cores),
                opt(c.others_cores),
                opt(c.steal_cores),
                opt(c.machine_busy_cores),
                opt(c.client_us_per_request(self.throughput_rps)),
                opt(c.server_us_per_request(self.throughput_rps)),
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentiles_of_a_uniform_sample() {
        let mut r = Recorder::new();
        for i in 1..=1000 {
            r.ok(us(i));
        }
        let l = r.latency();
        assert_eq!(r.successes(), 1000);
        // hdrhistogram at 3 significant figures is exact below 2048.
        assert_eq!(l.p50_us, 500);
        assert_eq!(l.p90_us, 900);
        assert_eq!(l.p99_us, 990);
        assert_eq!(l.p999_us, 999);
        assert_eq!(l.max_us, 1000);
        assert_eq!(l.mean_us, 500.5);
    }

    #[test]
    fn tail_is_seen_by_p99_but_not_p50() {
        let mut r = Recorder::new();
        for _ in 0..980 {
            r.ok(us(100));
        }
        for _ in 0..20 {
            r.ok(us(50_000));
        }
        let l = r.latency();
        assert_eq!(l.p50_us, 100);
        // 50 000 µs is resolved to within 0.1%.
        assert!((49_950..=50_050).contains(&l.p99_us), "{l:?}");
    }

    #[test]
    fn values_are_clamped_not_lost() {
        let mut r = Recorder::new();
        r.ok(Duration::ZERO);
        r.ok(Duration::from_secs(3600));
        assert_eq!(r.successes(), 2);
        let l = r.latency();
        assert_eq!(l.p50_us, 1);
        assert!(l.max_us >= MAX_US && l.max_us <= MAX_US + MAX_US / 1000);
    }

    #[test]
    fn empty_recorder_reports_zeros() {
        let r = Recorder::new();
        assert_eq!(r.latency(), Latency::default());
        assert_eq!(r.successes(), 0);
        assert_eq!(throughput(0, Duration::ZERO), 0.0);
    }

    #[test]
    fn merge_adds_counts_and_errors() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        a.ok(us(10));
        a.error("UNAVAILABLE");
        b.ok(us(20));
        b.ok(us(30));
        b.error("UNAVAILABLE");
        b.error(CLIENT_TIMEOUT);
        a.merge(&b);
        assert_eq!(a.successes(), 3);
        assert_eq!(a.errors().get("UNAVAILABLE"), Some(&2));
        assert_eq!(a.errors().get(CLIENT_TIMEOUT), Some(&1));
        assert_eq!(a.error_total(), 3);
        assert_eq!(a.latency().max_us, 30);
    }

    #[test]
    fn throughput_is_successes_over_window() {
        assert_eq!(throughput(5000, Duration::from_millis(2500)), 2000.0);
    }

    #[test]
    fn codes_have_canonical_names() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn report_serialises_as_one_object() {
        let mut r = Recorder::new();
        r.ok(us(100));
        r.error("NOT_FOUND");
        let rep = LoadReport {
            target: "echo".into(),
            model: "identity".into(),
            shape: "1x16".into(),
            mode: "closed",
            concurrency: Some(4),
            rate: None,
            channels: 1,
            window_s: 1.0,
            requests: r.successes(),
            throughput_rps: throughput(r.successes(), Duration::from_secs(1)),
            latency_us: r.latency(),
            errors: r.errors().clone(),
            error_latency_us: None,
            client_shed: None,
            send_lag_us: None,
            cpu: None,
            payload_requests: Vec::new(),
        };
        let v: serde_json::Value = serde_json::to_value(&rep).unwrap();
        assert_eq!(v["requests"], 1);
        assert_eq!(v["errors"]["NOT_FOUND"], 1);
        assert_eq!(v["latency_us"]["p99_us"], 100);
        assert!(v.get("rate").is_none() && v.get("client_shed").is_none());
        assert_eq!(rep.error_total(), 1);
        assert!(rep.line().contains("NOT_FOUND=1"), "{}", rep.line());
    }
}
