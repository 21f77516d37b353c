//! The host's side of the device inventory: cores, host memory and the coordinator's own memory,
//! sampled by the ResourceMonitor and read without waiting by the APIs and `/metrics`. (GPUs
//! join it with the NVML work; until then the inventory reports none.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostSnapshot {
    pub time_ms: u64,
    pub cores: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub process_rss_bytes: u64,
}

pub struct HostMonitor {
    interval: Duration,
    snapshot: RwLock<HostSnapshot>,
}

/// A `Key:   123 kB` line of a /proc status file, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

impl HostMonitor {
    pub fn new(interval: Duration) -> Self {
        let m = HostMonitor {
            interval,
            snapshot: RwLock::new(HostSnapshot::default()),
        };
        m.sample();
        m
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn snapshot(&self) -> HostSnapshot {
        self.snapshot.read().clone()
    }

    /// Reads /proc (Linux); on other systems the memory figures stay 0.
    pub fn sample(&self) {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let s = HostSnapshot {
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_total_bytes: kib_field(&meminfo, "MemTotal").unwrap_or(0),
            memory_available_bytes: kib_field(&meminfo, "MemAvailable").unwrap_or(0),
            process_rss_bytes: kib_field(&status, "VmRSS").unwrap_or(0),
        };
        *self.snapshot.write() = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_fields() {
        let text = "MemTotal:       24576000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(kib_field(text, "MemTotal"), Some(24576000 * 1024));
        assert_eq!(kib_field(text, "MemAvailable"), Some(1000 * 1024));
        assert_eq!(kib_field(text, "VmRSS"), None);
    }

    #[test]
    fn samples_this_machine() {
        let m = HostMonitor::new(Duration::from_secs(1));
        let s = m.snapshot();
        assert!(s.cores >= 1);
        if cfg!(target_os = "linux") {
            assert!(s.memory_total_bytes > 0);
            assert!(s.process_rss_bytes > 0);
            assert!(s.memory_available_bytes <= s.memory_total_bytes);
        }
    }
}
