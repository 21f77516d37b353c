//! GPU memory for jobs: a command job that asks for GPUs holds its memory in the same allocator
//! as the models, as an external holder under the key `job:<id>` (see the allocator's module
//! documentation). Its reservation is placed by the rules of a model's load (the GPUs with most
//! free budget first) and evicts idle, unpinned models as a load would; the job's runner
//! unloads those ([`ModelManager::unload_evicted`]) before the job starts, and releases the
//! reservation when the attempt ends. While it holds a GPU, a model load that needs the room
//! fails with `NoRoom` naming the job among the holders.

use veraltheim_models::allocator::{DeviceId, ExternalRequest, ExternalSize, Placement};

use super::ModelManager;

/// What a job was given by [`ModelManager::reserve_job_gpus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobGpus {
    /// The GPUs (inventory indices) it holds memory on, most free first when reserved.
    pub gpus: Vec<u32>,
    /// The allocator keys of the models evicted to make room: unloaded with
    /// [`ModelManager::unload_evicted`] before the job starts.
    pub evicted: Vec<String>,
}

/// One job's memory on one GPU, as [`ModelManager::job_holders`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobHeld {
    /// The job's id.
    pub job_id: String,
    pub device: DeviceId,
    pub bytes: u64,
}

/// The allocator key of job `job_id`'s GPU memory.
pub fn job_key(job_id: &str) -> String {
    format!("job:{job_id}")
}

impl ModelManager {
    /// Reserves `size` on each of `gpus` distinct GPUs for job `job_id`. On error nothing is
    /// held and nothing evicted; the error names every GPU and what holds it.
    pub fn reserve_job_gpus(
        &self,
        job_id: &str,
        gpus: u32,
        size: ExternalSize,
    ) -> Result<JobGpus, veraltheim_models::Error> {
        let admission = self.allocator.lock().reserve_external(&ExternalRequest {
            key: job_key(job_id),
            devices: gpus,
            size,
            placement: Placement::gpu_only(),
        })?;
        let gpus = admission
            .devices
            .iter()
            .filter_map(|d| match d {
                DeviceId::Gpu(id) => Some(*id),
                DeviceId::Cpu => None,
            })
            .collect();
        Ok(JobGpus {
            gpus,
            evicted: admission.evict,
        })
    }

    /// Unloads the models a job's reservation evicted (they are idle), as a load does.
    pub async fn unload_evicted(&self, evicted: &[String], job_id: &str) {
        self.evict(evicted, &job_key(job_id)).await;
    }

    /// Frees job `job_id`'s GPU memory; false if it held none.
    pub fn release_job_gpus(&self, job_id: &str) -> bool {
        self.allocator.lock().release(&job_key(job_id))
    }

    /// The GPUs job `job_id` holds memory on (empty: none).
    pub fn job_gpus(&self, job_id: &str) -> Vec<u32> {
        self.allocator
            .lock()
            .external(&job_key(job_id))
            .unwrap_or_default()
            .iter()
            .filter_map(|(d, _)| match d {
                DeviceId::Gpu(id) => Some(*id),
                DeviceId::Cpu => None,
            })
            .collect()
    }

    /// Every job's memory on every device, devices in order, jobs by key within a device.
    pub fn job_holders(&self) -> Vec<JobHeld> {
        self.memory()
            .into_iter()
            .flat_map(|d| {
                d.externals.into_iter().filter_map(move |e| {
                    Some(JobHeld {
                        job_id: e.key.strip_prefix("job:")?.to_string(),
                        device: d.device,
                        bytes: e.bytes,
                    })
                })
            })
            .collect()
    }
}
