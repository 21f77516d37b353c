//! How a load is measured when its backend cannot say what it holds: what this process holds on
//! the device before and after the build (run while no other measured build runs there).

use veraltheim_models::allocator::DeviceId;

/// What this process holds on a device now.
pub trait MemoryGauge: Send + Sync + 'static {
    /// Bytes this process holds on `device` now; `None` when it cannot tell. Called on a
    /// blocking thread.
    fn held_bytes(&self, device: DeviceId) -> Option<u64>;
}

/// The host's resident memory for the CPU; nothing for GPUs. The coordinator's gauge adds GPUs
/// through the device inventory (NVML's per-process figure).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostGauge;

impl MemoryGauge for HostGauge {
    fn held_bytes(&self, device: DeviceId) -> Option<u64> {
        match device {
            DeviceId::Cpu => veraltheim_devices::resident_bytes(),
            DeviceId::Gpu(_) => None,
        }
    }
}
