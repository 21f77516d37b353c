use crate::types::HostInfo;

/// Reads the host now: cores from the standard library, memory from `/proc/meminfo` and this
/// process's resident set from `/proc/self/status` on Linux (zeros elsewhere or when unreadable).
pub fn read_host() -> HostInfo {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let (memory_total_bytes, memory_available_bytes, process_rss_bytes) = read_memory();
    HostInfo {
        cores,
        memory_total_bytes,
        memory_available_bytes,
        process_rss_bytes,
    }
}

/// This process's resident memory now (`VmRSS`, in bytes, exact: no page size assumed); `None`
/// where it cannot be read.
pub fn resident_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        kib_field(&status, "VmRSS")
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(target_os = "linux")]
fn read_memory() -> (u64, u64, u64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    (
        kib_field(&meminfo, "MemTotal").unwrap_or(0),
        kib_field(&meminfo, "MemAvailable").unwrap_or(0),
        kib_field(&status, "VmRSS").unwrap_or(0),
    )
}

#[cfg(not(target_os = "linux"))]
fn read_memory() -> (u64, u64, u64) {
    (0, 0, 0)
}

/// The value of a `Key:   123 kB` line of a /proc file, in bytes.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, rest) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => value.checked_mul(1024),
            Some(_) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::kib_field;

    #[test]
    fn kib_fields_are_read_by_exact_key() {
        let text = "MemTotal:       16318412 kB\nMemFree:  1 kB\nMemAvailable:   8000 kB\n";
        assert_eq!(kib_field(text, "MemTotal"), Some(16_318_412 * 1024));
        assert_eq!(kib_field(text, "MemAvailable"), Some(8000 * 1024));
        assert_eq!(kib_field(text, "Mem"), None);
        assert_eq!(kib_field(text, "SwapTotal"), None);
        assert_eq!(kib_field("VmRSS: x kB", "VmRSS"), None);
    }
}
