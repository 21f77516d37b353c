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

/// Hands the C heap's free memory back to the system (glibc's `malloc_trim`), so that a growth
/// measured around a build counts what the model holds, not what its load parsed and freed:
/// ONNX Runtime allocates through the C heap, and glibc keeps freed chunks in the arena of the
/// thread that freed them — without this, the same model was charged 109 or 138 MB depending
/// on which blocking thread built it. Elsewhere a no-op.
pub(crate) fn trim_c_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own arenas under
    // their locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
