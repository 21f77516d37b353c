use std::fmt;
use std::str::FromStr;

use parking_lot::Mutex;

use crate::error::ProbeError;
use crate::probe::GpuProbe;
use crate::types::GpuInfo;

/// The most simulated devices one spec may ask for.
pub const MAX_SIMULATED_GPUS: u32 = 256;

const UNITS: &[(&str, u64)] = &[
    ("gib", 1 << 30),
    ("gb", 1_000_000_000),
    ("mib", 1 << 20),
    ("mb", 1_000_000),
];

/// A parsed simulate spec: `<count>x<memory><unit>`, e.g. `2x80GiB`; the unit is one of GiB,
/// GB, MiB, MB in any case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimSpec {
    /// How many devices (1 ..= 256).
    pub count: u32,
    /// Memory of each, in bytes (> 0).
    pub memory_bytes: u64,
}

impl SimSpec {
    /// Parses a spec, naming the bad part in the error.
    pub fn parse(spec: &str) -> Result<SimSpec, ProbeError> {
        let bad = |reason: String| ProbeError::BadSpec {
            spec: spec.to_string(),
            reason,
        };
        let s = spec.trim();
        if s.is_empty() {
            return Err(bad(
                "empty; expected <count>x<memory>, e.g. `2x80GiB`".to_string()
            ));
        }
        let Some((count_part, memory_part)) = s.split_once(['x', 'X']) else {
            return Err(bad(
                "missing `x` between the GPU count and the memory, e.g. `2x80GiB`".to_string(),
            ));
        };
        let (count_part, memory_part) = (count_part.trim(), memory_part.trim());

        if count_part.is_empty() {
            return Err(bad(
                "missing the GPU count before `x`, e.g. `2x80GiB`".to_string()
            ));
        }
        if !count_part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!(
                "GPU count `{count_part}` is not a whole number"
            )));
        }
        let count: u32 = count_part
            .parse()
            .ok()
            .filter(|c| *c <= MAX_SIMULATED_GPUS)
            .ok_or_else(|| {
                bad(format!(
                    "GPU count `{count_part}` is more than {MAX_SIMULATED_GPUS}"
                ))
            })?;
        if count == 0 {
            return Err(bad("GPU count must be at least 1, not 0".to_string()));
        }

        if memory_part.is_empty() {
            return Err(bad("missing the memory after `x`, e.g. `80GiB`".to_string()));
        }
        let digits_end = memory_part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(memory_part.len());
        let (number, unit) = memory_part.split_at(digits_end);
        let unit = unit.trim();
        if number.is_empty() {
            return Err(bad(format!(
                "memory `{memory_part}` must start with a whole number, e.g. `80GiB`"
            )));
        }
        if unit.starts_with(['.', ',']) {
            return Err(bad(format!(
                "memory `{memory_part}` must be a whole number (use MiB or MB for fractions)"
            )));
        }
        if unit.is_empty() {
            return Err(bad(format!(
                "memory `{memory_part}` needs a unit: GiB, GB, MiB or MB"
            )));
        }
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| unit.eq_ignore_ascii_case(u)) else {
            return Err(bad(format!(
                "unknown memory unit `{unit}` in `{memory_part}`; use GiB, GB, MiB or MB"
            )));
        };
        let memory_bytes = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| bad(format!("memory `{memory_part}` is too large")))?;
        if memory_bytes == 0 {
            return Err(bad(format!("memory `{memory_part}` must be more than 0")));
        }
        Ok(SimSpec {
            count,
            memory_bytes,
        })
    }
}

impl FromStr for SimSpec {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SimSpec::parse(s)
    }
}

impl fmt::Display for SimSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}B", self.count, self.memory_bytes)
    }
}

/// Simulated GPUs for machines without them: named "Simulated GPU", uuid `GPU-sim-<index>`,
/// `simulated: true`. Used memory is exactly what callers [`charge`](Self::charge) and
/// [`release`](Self::release), so placement decisions can be tested against it; utilization,
/// temperature, power and energy read `Some(0)`. A device can be marked lost with
/// [`set_lost`](Self::set_lost) to exercise failure handling.
pub struct SimulatedProbe {
    spec: SimSpec,
    devices: Mutex<Vec<SimDevice>>,
}

#[derive(Clone, Default)]
struct SimDevice {
    used: u64,
    lost: Option<String>,
}

impl SimulatedProbe {
    /// Simulated devices as the spec says.
    pub fn new(spec: SimSpec) -> Self {
        SimulatedProbe {
            spec,
            devices: Mutex::new(vec![SimDevice::default(); spec.count as usize]),
        }
    }

    /// Parses the spec (e.g. `2x80GiB`) and builds the devices.
    pub fn from_spec(spec: &str) -> Result<Self, ProbeError> {
        SimSpec::parse(spec).map(SimulatedProbe::new)
    }

    /// The spec it was built from.
    pub fn spec(&self) -> SimSpec {
        self.spec
    }

    /// The uuid of simulated device `index`.
    pub fn uuid(index: u32) -> String {
        format!("GPU-sim-{index}")
    }

    fn no_such(&self, index: u32) -> ProbeError {
        ProbeError::NoSuchDevice {
            index,
            count: self.spec.count,
        }
    }

    /// Takes `bytes` of device `index`'s memory; fails, changing nothing, if it has not that
    /// much free.
    pub fn charge(&self, index: u32, bytes: u64) -> Result<(), ProbeError> {
        let mut devices = self.devices.lock();
        let total = self.spec.memory_bytes;
        let dev = devices
            .get_mut(index as usize)
            .ok_or_else(|| self.no_such(index))?;
        let free = total - dev.used;
        if bytes > free {
            return Err(ProbeError::OverCharge {
                index,
                uuid: Self::uuid(index),
                requested: bytes,
                free,
                total,
            });
        }
        dev.used += bytes;
        Ok(())
    }

    /// Gives back `bytes` of device `index`'s memory; fails, changing nothing, if more is
    /// released than was charged.
    pub fn release(&self, index: u32, bytes: u64) -> Result<(), ProbeError> {
        let mut devices = self.devices.lock();
        let dev = devices
            .get_mut(index as usize)
            .ok_or_else(|| self.no_such(index))?;
        if bytes > dev.used {
            return Err(ProbeError::OverRelease {
                index,
                uuid: Self::uuid(index),
                requested: bytes,
                used: dev.used,
            });
        }
        dev.used -= bytes;
        Ok(())
    }

    /// Bytes charged to device `index`.
    pub fn used(&self, index: u32) -> Result<u64, ProbeError> {
        self.devices
            .lock()
            .get(index as usize)
            .map(|d| d.used)
            .ok_or_else(|| self.no_such(index))
    }

    /// Marks device `index` lost with a reason (`Some`) or healthy again (`None`). Charges are
    /// kept.
    pub fn set_lost(&self, index: u32, reason: Option<String>) -> Result<(), ProbeError> {
        let mut devices = self.devices.lock();
        let dev = devices
            .get_mut(index as usize)
            .ok_or_else(|| self.no_such(index))?;
        dev.lost = reason;
        Ok(())
    }
}

impl GpuProbe for SimulatedProbe {
    fn name(&self) -> &str {
        "simulated"
    }

    fn sample(&self) -> Result<Vec<GpuInfo>, ProbeError> {
        let total = self.spec.memory_bytes;
        let devices = self.devices.lock();
        Ok(devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let index = i as u32;
                let mut g = GpuInfo {
                    index,
                    uuid: Self::uuid(index),
                    name: "Simulated GPU".to_string(),
                    memory_total_bytes: total,
                    memory_used_bytes: d.used,
                    memory_free_bytes: total - d.used,
                    utilization_gpu_percent: Some(0),
                    utilization_memory_percent: Some(0),
                    temperature_celsius: Some(0),
                    power_draw_milliwatts: Some(0),
                    power_limit_milliwatts: Some(0),
                    energy_millijoules: Some(0),
                    processes: Vec::new(),
                    simulated: true,
                    lost: false,
                    errors: Vec::new(),
                };
                if let Some(reason) = &d.lost {
                    g.mark_lost(reason.clone());
                }
                g
            })
            .collect())
    }
}
