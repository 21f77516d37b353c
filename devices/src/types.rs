use serde::{Deserialize, Serialize};

/// One GPU as last read. See the crate invariants for what a lost device carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The probe's index of the device (NVML index; stable within one run of the driver).
    pub index: u32,
    /// The device's uuid (`GPU-…`); empty when it could not be read.
    pub uuid: String,
    /// The product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total device memory in bytes.
    pub memory_total_bytes: u64,
    /// Memory in use in bytes.
    pub memory_used_bytes: u64,
    /// Memory free in bytes (0 on a lost device).
    pub memory_free_bytes: u64,
    /// Percent of time a kernel ran over the driver's last sample period.
    pub utilization_gpu_percent: Option<u32>,
    /// Percent of time device memory was read or written over the last sample period.
    pub utilization_memory_percent: Option<u32>,
    /// GPU die temperature.
    pub temperature_celsius: Option<u32>,
    /// Current power draw.
    pub power_draw_milliwatts: Option<u32>,
    /// The power limit the driver enforces.
    pub power_limit_milliwatts: Option<u32>,
    /// Energy used since the driver was loaded.
    pub energy_millijoules: Option<u64>,
    /// Compute processes running on the device.
    pub processes: Vec<GpuProcess>,
    /// True when the device is simulated (no real hardware behind it).
    pub simulated: bool,
    /// True when the device could not be read as a whole (fell off the bus, probe failing, …).
    pub lost: bool,
    /// Per-field notes (`temperature_celsius: not supported`) and, on a lost device, why.
    pub errors: Vec<String>,
}

/// A compute process on a GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// Its process id.
    pub pid: u32,
    /// Device memory it uses, when the driver can tell.
    pub used_memory_bytes: Option<u64>,
}

/// The host's cores and memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Cores this process may use (at least 1).
    pub cores: u32,
    /// Host memory in bytes (0 where /proc is not available).
    pub memory_total_bytes: u64,
    /// Host memory available for new work in bytes (0 where /proc is not available).
    pub memory_available_bytes: u64,
    /// This process's resident set in bytes (0 where /proc is not available).
    pub process_rss_bytes: u64,
}

/// One sample of the whole inventory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken, in milliseconds since the Unix epoch (0: never sampled).
    pub time_ms: u64,
    /// The host.
    pub host: HostInfo,
    /// Every GPU seen since the inventory started, by index, lost ones included.
    pub gpus: Vec<GpuInfo>,
    /// The name of the GPU probe (`nvml`, `simulated`, …); `None` when there is none.
    pub gpu_probe: Option<String>,
    /// Why the GPU probe failed on this sample; `None` while it works.
    pub gpu_probe_error: Option<String>,
}

const MIB: u64 = 1024 * 1024;

impl GpuInfo {
    /// A device record holding only an index; the probes fill in the rest.
    pub fn new(index: u32) -> Self {
        GpuInfo {
            index,
            ..GpuInfo::default()
        }
    }

    /// A device that failed as a whole, with the reason.
    pub fn lost(index: u32, reason: impl Into<String>) -> Self {
        let mut g = GpuInfo::new(index);
        g.mark_lost(reason);
        g
    }

    /// Marks this device lost: keeps its identity and total memory, clears every reading (free
    /// memory becomes 0) and sets `errors` to the reason.
    pub fn mark_lost(&mut self, reason: impl Into<String>) {
        self.lost = true;
        self.memory_used_bytes = 0;
        self.memory_free_bytes = 0;
        self.utilization_gpu_percent = None;
        self.utilization_memory_percent = None;
        self.temperature_celsius = None;
        self.power_draw_milliwatts = None;
        self.power_limit_milliwatts = None;
        self.energy_millijoules = None;
        self.processes.clear();
        self.errors = vec![reason.into()];
    }

    /// Whether work may be placed on it (not lost).
    pub fn is_usable(&self) -> bool {
        !self.lost
    }

    /// Total memory in MiB (rounded down).
    pub fn memory_total_mib(&self) -> u64 {
        self.memory_total_bytes / MIB
    }

    /// Used memory in MiB (rounded down).
    pub fn memory_used_mib(&self) -> u64 {
        self.memory_used_bytes / MIB
    }

    /// Free memory in MiB (rounded down).
    pub fn memory_free_mib(&self) -> u64 {
        self.memory_free_bytes / MIB
    }
}

impl Snapshot {
    /// The GPUs that are not lost.
    pub fn usable_gpus(&self) -> impl Iterator<Item = &GpuInfo> {
        self.gpus.iter().filter(|g| !g.lost)
    }

    /// The GPU with this index, lost or not.
    pub fn gpu(&self, index: u32) -> Option<&GpuInfo> {
        self.gpus.iter().find(|g| g.index == index)
    }
}
