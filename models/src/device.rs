//! The allocator's vocabulary, as the rest of the crate names it: devices ([`DeviceId`]),
//! where a model holding memory stands ([`HolderState`]), and the reports an error names
//! ([`HolderReport`], [`DeviceReport`]), with [`format_bytes`]. Kept apart from the allocator
//! so that `error` can name them without the allocator's code (which returns those errors).

use std::fmt;

/// A device that holds model memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceId {
    /// Host memory.
    Cpu,
    /// The GPU with this inventory index.
    Gpu(u32),
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Cpu => f.write_str("cpu"),
            DeviceId::Gpu(id) => write!(f, "gpu{id}"),
        }
    }
}

/// Where a model holding memory stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HolderState {
    /// Admitted; its estimated size is reserved until it is charged.
    Loading,
    /// Loaded; its measured size is charged.
    Ready,
    /// Chosen as an eviction victim: no longer counted against the budget, refused by
    /// the allocator's `acquire`, waiting for the caller to unload and release it.
    Evicting,
}

impl HolderState {
    /// The state in lowercase words: `loading`, `ready`, `evicting`.
    pub fn as_str(self) -> &'static str {
        match self {
            HolderState::Loading => "loading",
            HolderState::Ready => "ready",
            HolderState::Evicting => "evicting",
        }
    }
}

impl fmt::Display for HolderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model or an external holder (a job) holding memory on a device, as named in an error of
/// the crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderReport {
    /// The model's key.
    pub model: String,
    /// The bytes it holds.
    pub bytes: u64,
    /// Whether it is pinned.
    pub pinned: bool,
    /// Requests in flight.
    pub in_flight: u32,
    /// Whether it is still loading.
    pub loading: bool,
    /// Whether the failed load asked to keep it.
    pub kept: bool,
    /// Whether it is an external holder (a job), not a model: never evicted.
    pub external: bool,
}

impl HolderReport {
    /// Whether nothing stops this model from being evicted.
    pub fn evictable(&self) -> bool {
        !self.pinned && self.in_flight == 0 && !self.loading && !self.kept && !self.external
    }
}

impl fmt::Display for HolderReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut reasons = Vec::new();
        if self.external {
            reasons.push("not a model, never evicted".to_string());
        }
        if self.pinned {
            reasons.push("pinned".to_string());
        }
        if self.in_flight == 1 {
            reasons.push("1 request in flight".to_string());
        } else if self.in_flight > 1 {
            reasons.push(format!("{} requests in flight", self.in_flight));
        }
        if self.loading {
            reasons.push("loading".to_string());
        }
        if self.kept {
            reasons.push("kept by this load".to_string());
        }
        if reasons.is_empty() {
            reasons.push("evictable".to_string());
        }
        write!(
            f,
            "{} ({}, {})",
            self.model,
            format_bytes(self.bytes),
            reasons.join(", ")
        )
    }
}

/// A device's budget and what holds it, as named in an error of the crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReport {
    /// The device.
    pub device: DeviceId,
    /// Its capacity in bytes.
    pub capacity_bytes: u64,
    /// Its reserve in bytes.
    pub reserve_bytes: u64,
    /// Capacity minus reserve.
    pub budget_bytes: u64,
    /// Bytes held by the holders below.
    pub held_bytes: u64,
    /// The models holding memory there, largest first.
    pub holders: Vec<HolderReport>,
}

/// How many holders a message names before summing up the rest.
const HOLDERS_NAMED: usize = 8;

impl fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} budget {} (capacity {} \u{2212} reserve {}), ",
            self.device,
            format_bytes(self.budget_bytes),
            format_bytes(self.capacity_bytes),
            format_bytes(self.reserve_bytes)
        )?;
        if self.holders.is_empty() {
            return f.write_str("nothing held");
        }
        write!(f, "{} held", format_bytes(self.held_bytes))?;
        if self.held_bytes > self.budget_bytes {
            write!(
                f,
                " (over budget by {})",
                format_bytes(self.held_bytes - self.budget_bytes)
            )?;
        }
        f.write_str(" by ")?;
        let named = self.holders.iter().take(HOLDERS_NAMED);
        let named: Vec<String> = named.map(ToString::to_string).collect();
        f.write_str(&named.join(", "))?;
        let rest = &self.holders[self.holders.len().min(HOLDERS_NAMED)..];
        if !rest.is_empty() {
            let bytes = rest.iter().fold(0u64, |sum, h| sum.saturating_add(h.bytes));
            write!(f, " and {} more ({})", rest.len(), format_bytes(bytes))?;
        }
        Ok(())
    }
}

/// Bytes in binary units with three significant digits: `512 B`, `700 MiB`, `1.50 GiB`,
/// `12.5 TiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    // Decide the decimals on the rounded value, so that 9.999 shows as `10.0`, not `10.00`.
    if (value * 100.0).round() / 100.0 < 10.0 {
        format!("{value:.2} {unit}")
    } else if (value * 10.0).round() / 10.0 < 100.0 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.0} {unit}")
    }
}
