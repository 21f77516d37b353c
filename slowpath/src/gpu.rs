//! GPUs for the jobs this node runs: [`GpuReservations`], what the runner asks before a job
//! that wants GPUs starts here, and the environment that tells the job which devices are its.
//!
//! The slow path does not know where GPU memory is kept: the coordinator implements this trait
//! over its model manager, so that a GPU job and the models on the same device share one
//! memory budget (the model allocator's; a job holds its memory there under `job:<id>`).
//!
//! Rules (the runner's side, see `runner`):
//! - On a single node, a job that asks for GPUs (`resources.gpus` ≥ 1) is admitted only once
//!   [`GpuReservations::reserve`] gives it devices: until then it waits in line (QUEUED) as a
//!   job blocked by capacity does, its waiting reason saying which device holds what, and the
//!   runner asks again every [`GPU_RETRY`]. A job no GPU here could ever hold is refused at
//!   submit ([`GpuReservations::check`]). In a cluster, the node an attempt was placed on
//!   reserves when the attempt starts; a refusal puts the job back to wait (RETRY_WAIT, not
//!   counted as a failure).
//! - The models a reservation evicted are unloaded ([`GpuGrant::evictions`]) before the job's
//!   command starts.
//! - The command's environment says which devices are its ([`visible_devices`]): the job's
//!   own values for these variables are replaced, and a job that asked for no GPU sees none.
//! - The reservation is released when the attempt ends, whichever way it ends (success,
//!   failure, cancel, deadline, a start that failed, a panic); after a restart of the
//!   coordinator nothing is held (the allocator lives in memory) and a local job that was
//!   running runs again, reserving again.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;

/// How often a job waiting for GPU memory is looked at again (memory is freed by models that
/// unload, which the runner is not told of).
pub const GPU_RETRY: Duration = Duration::from_secs(1);

/// What a job was given: its GPUs, and the unloading of the models evicted for it.
pub struct GpuGrant {
    /// The GPUs (inventory indices) the job holds memory on.
    pub gpus: Vec<u32>,
    /// Unloads the models evicted to make room; awaited before the job's command starts.
    pub evictions: Option<BoxFuture<'static, ()>>,
}

impl std::fmt::Debug for GpuGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuGrant")
            .field("gpus", &self.gpus)
            .field("evictions", &self.evictions.is_some())
            .finish()
    }
}

/// GPU memory for jobs, kept where the node's models keep theirs. See the module
/// documentation. Every method is called with the runner's lock held: none may block on
/// anything but a short lock of its own.
pub trait GpuReservations: Send + Sync + 'static {
    /// Refuses, at submit, a job that no GPU of this node could ever hold (`gpus` GPUs with
    /// `bytes_per_gpu` each, 0 meaning whole GPUs), saying why.
    fn check(&self, gpus: u32, bytes_per_gpu: u64) -> Result<(), String> {
        let _ = (gpus, bytes_per_gpu);
        Ok(())
    }

    /// Reserves `bytes_per_gpu` (0: the whole GPU) on each of `gpus` distinct GPUs for job
    /// `job_id`, evicting idle models as a model load would. `Err` says why it cannot now
    /// (which device holds what); nothing is then held.
    fn reserve(&self, job_id: &str, gpus: u32, bytes_per_gpu: u64) -> Result<GpuGrant, String>;

    /// Frees what job `job_id` holds (nothing if it holds nothing).
    fn release(&self, job_id: &str);

    /// The GPUs job `job_id` holds memory on (empty: none).
    fn gpus_of(&self, job_id: &str) -> Vec<u32>;
}

/// The variables that tell a job its devices: `CUDA_VISIBLE_DEVICES` (CUDA's), with
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that CUDA numbers the devices as the inventory does, and
/// `NVIDIA_VISIBLE_DEVICES` (the NVIDIA container runtime's). No GPUs: an empty
/// `CUDA_VISIBLE_DEVICES` and `void`, so the job sees none.
pub fn visible_devices(gpus: &[u32]) -> BTreeMap<String, String> {
    let list = gpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let nvidia = if gpus.is_empty() {
        "void".to_string()
    } else {
        list.clone()
    };
    BTreeMap::from([
        ("CUDA_DEVICE_ORDER".to_string(), "PCI_BUS_ID".to_string()),
        ("CUDA_VISIBLE_DEVICES".to_string(), list),
        ("NVIDIA_VISIBLE_DEVICES".to_string(), nvidia),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_the_devices_or_hides_them_all() {
        let env = visible_devices(&[2, 0]);
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "2,0");
        assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "2,0");
        assert_eq!(env["CUDA_DEVICE_ORDER"], "PCI_BUS_ID");
        let none = visible_devices(&[]);
        assert_eq!(none["CUDA_VISIBLE_DEVICES"], "");
        assert_eq!(none["NVIDIA_VISIBLE_DEVICES"], "void");
    }
}
