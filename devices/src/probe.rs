use crate::error::ProbeError;
use crate::types::GpuInfo;

/// Something that reads the GPUs: NVML, a simulation or a test fake.
///
/// `sample` reads every device now. It returns `Err` only when the probe fails as a whole; a
/// device that cannot be read is returned with `lost: true`, and a field a device does not
/// support is `None` with a note in [`GpuInfo::errors`]. Indices are the probe's own and should
/// stay stable from one sample to the next.
pub trait GpuProbe: Send + Sync {
    /// A short name for logs and snapshots (`nvml`, `simulated`, …).
    fn name(&self) -> &str;

    /// Reads every device now.
    fn sample(&self) -> Result<Vec<GpuInfo>, ProbeError>;
}
