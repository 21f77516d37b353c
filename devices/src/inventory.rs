use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::ProbeError;
use crate::host::read_host;
use crate::nvml::NvmlProbe;
use crate::probe::GpuProbe;
use crate::simulated::SimulatedProbe;
use crate::types::{GpuInfo, Snapshot};

/// A change of device health, raised by [`Inventory::sample`] on the transition only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceEvent {
    /// A GPU was seen for the first time (followed by `GpuLost` if it was seen lost).
    GpuAppeared {
        /// Its index.
        index: u32,
        /// Its uuid (may be empty if unreadable).
        uuid: String,
        /// Its product name.
        name: String,
    },
    /// A GPU stopped answering, or the probe failed, or it is no longer reported.
    GpuLost {
        /// Its index.
        index: u32,
        /// Its last known uuid.
        uuid: String,
        /// Why.
        reason: String,
    },
    /// A lost GPU answers again.
    GpuRecovered {
        /// Its index.
        index: u32,
        /// Its uuid.
        uuid: String,
    },
    /// The GPU probe failed as a whole; every device it knew is now lost.
    ProbeFailed {
        /// The probe's name.
        probe: String,
        /// Why.
        reason: String,
    },
    /// The GPU probe works again after failing.
    ProbeRecovered {
        /// The probe's name.
        probe: String,
    },
}

/// The device inventory: a GPU probe (or none) and the latest [`Snapshot`].
///
/// [`sample`](Self::sample) reads host and GPUs, publishes a new snapshot and returns the health
/// changes; [`snapshot`](Self::snapshot) hands out the latest one without locking. Samples are
/// serialised among themselves; readers never wait for them. Before the first sample the
/// snapshot is empty (`time_ms == 0`). Devices are keyed by the probe's index.
pub struct Inventory {
    probe: Option<Arc<dyn GpuProbe>>,
    simulated: Option<Arc<SimulatedProbe>>,
    snapshot: ArcSwap<Snapshot>,
    state: Mutex<State>,
    /// Why there is no GPU probe at all (e.g. no NVML library), shown in every snapshot.
    unavailable: Option<String>,
}

#[derive(Default)]
struct State {
    /// Every device seen, as last published.
    known: BTreeMap<u32, GpuInfo>,
    /// Why the probe failed on the last sample, while it fails.
    probe_error: Option<String>,
}

impl Inventory {
    /// An inventory over this probe, or with no GPUs at all for `None`.
    pub fn new(probe: Option<Arc<dyn GpuProbe>>) -> Self {
        let snapshot = Snapshot {
            gpu_probe: probe.as_ref().map(|p| p.name().to_string()),
            ..Snapshot::default()
        };
        Inventory {
            probe,
            simulated: None,
            snapshot: ArcSwap::from_pointee(snapshot),
            state: Mutex::new(State::default()),
            unavailable: None,
        }
    }

    /// An inventory that reports the host only.
    pub fn without_gpus() -> Self {
        Inventory::new(None)
    }

    /// An inventory over simulated GPUs, keeping the handle for
    /// [`simulated_probe`](Self::simulated_probe) (charge and release).
    pub fn simulated(probe: Arc<SimulatedProbe>) -> Self {
        let mut inv = Inventory::new(Some(probe.clone()));
        inv.simulated = Some(probe);
        inv
    }

    /// Picks the GPU probe for this machine: simulated GPUs when `simulate` is given (a bad spec
    /// is an error), else NVML if it initialises, else none — logged once at info level, not an
    /// error. Does not sample; call [`sample`](Self::sample) to take the first snapshot.
    pub fn detect(simulate: Option<&str>) -> Result<Self, ProbeError> {
        if let Some(spec) = simulate {
            let probe = SimulatedProbe::from_spec(spec)?;
            let s = probe.spec();
            tracing::info!(
                count = s.count,
                memory_bytes = s.memory_bytes,
                "simulating GPUs ({spec})"
            );
            return Ok(Inventory::simulated(Arc::new(probe)));
        }
        match NvmlProbe::init() {
            Ok(probe) => {
                tracing::info!(driver = ?probe.driver_version(), "GPUs through NVML");
                Ok(Inventory::new(Some(Arc::new(probe))))
            }
            Err(e) => {
                tracing::info!("no GPUs: {e}");
                let mut inv = Inventory::without_gpus();
                inv.unavailable = Some(e.to_string());
                Ok(inv)
            }
        }
    }

    /// The GPU probe's name, if there is one.
    pub fn probe_name(&self) -> Option<&str> {
        self.probe.as_deref().map(|p| p.name())
    }

    /// The simulated probe, when the GPUs are simulated: charge and release memory through it.
    pub fn simulated_probe(&self) -> Option<&Arc<SimulatedProbe>> {
        self.simulated.as_ref()
    }

    /// The device memory this process holds on GPU `index` now, as the probe reports it per
    /// process (NVML's running compute processes); `None` when there is no such GPU, the probe
    /// fails or does not list processes. Reads the probe directly, without publishing a snapshot
    /// or raising events (the next [`sample`](Self::sample) does that). May block (NVML).
    pub fn process_gpu_bytes(&self, index: u32) -> Option<u64> {
        let probe = self.probe.as_ref()?;
        let gpus = panic::catch_unwind(AssertUnwindSafe(|| probe.sample()))
            .ok()?
            .ok()?;
        let pid = std::process::id();
        let gpu = gpus.into_iter().find(|g| g.index == index && !g.lost)?;
        Some(
            gpu.processes
                .iter()
                .filter(|p| p.pid == pid)
                .filter_map(|p| p.used_memory_bytes)
                .sum(),
        )
    }

    /// The latest snapshot, without locking.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Reads host and GPUs now, publishes the new snapshot and returns what changed in device
    /// health. Never fails and never panics on a probe error (a probe that panics counts as
    /// failing): the error is recorded in the snapshot, the devices are marked lost and events
    /// say so.
    pub fn sample(&self) -> Vec<DeviceEvent> {
        let host = read_host();
        let mut state = self.state.lock();
        let mut events = Vec::new();
        if let Some(probe) = &self.probe {
            let name = probe.name();
            // A probe that panics is a failing probe, not a failing inventory.
            let result = panic::catch_unwind(AssertUnwindSafe(|| probe.sample()))
                .unwrap_or_else(|payload| Err(ProbeError::Failed(panic_message(&*payload))));
            match result {
                Ok(reported) => {
                    if state.probe_error.take().is_some() {
                        tracing::info!(probe = name, "GPU probe recovered");
                        events.push(DeviceEvent::ProbeRecovered {
                            probe: name.to_string(),
                        });
                    }
                    merge(&mut state.known, reported, name, &mut events);
                }
                Err(e) => {
                    let reason = e.to_string();
                    if state.probe_error.is_none() {
                        tracing::warn!(probe = name, "GPU probe failed: {reason}");
                        events.push(DeviceEvent::ProbeFailed {
                            probe: name.to_string(),
                            reason: reason.clone(),
                        });
                    }
                    for gpu in state.known.values_mut() {
                        lose(gpu, reason.clone(), &mut events);
                    }
                    state.probe_error = Some(reason);
                }
            }
        }
        let snapshot = Snapshot {
            time_ms: now_ms(),
            host,
            gpus: state.known.values().cloned().collect(),
            gpu_probe: self.probe.as_ref().map(|p| p.name().to_string()),
            gpu_probe_error: state
                .probe_error
                .clone()
                .or_else(|| self.unavailable.clone()),
        };
        self.snapshot.store(Arc::new(snapshot));
        events
    }
}

/// Folds one successful reading into the known devices, raising events for health changes.
fn merge(
    known: &mut BTreeMap<u32, GpuInfo>,
    reported: Vec<GpuInfo>,
    probe: &str,
    events: &mut Vec<DeviceEvent>,
) {
    let mut seen = BTreeMap::new();
    for gpu in reported {
        if seen.contains_key(&gpu.index) {
            tracing::warn!(
                probe,
                index = gpu.index,
                "GPU probe reported an index twice"
            );
            continue;
        }
        seen.insert(gpu.index, gpu);
    }
    let reported_indices: BTreeSet<u32> = seen.keys().copied().collect();

    for (index, mut gpu) in seen {
        match known.get(&index) {
            None => {
                if gpu.lost {
                    normalise_lost(&mut gpu, None);
                }
                tracing::info!(index, uuid = %gpu.uuid, name = %gpu.name, "GPU appeared");
                events.push(DeviceEvent::GpuAppeared {
                    index,
                    uuid: gpu.uuid.clone(),
                    name: gpu.name.clone(),
                });
                if gpu.lost {
                    let reason = gpu.errors.join("; ");
                    tracing::warn!(index, uuid = %gpu.uuid, "GPU lost: {reason}");
                    events.push(DeviceEvent::GpuLost {
                        index,
                        uuid: gpu.uuid.clone(),
                        reason,
                    });
                }
            }
            Some(old) if gpu.lost => {
                normalise_lost(&mut gpu, Some(old));
                if !old.lost {
                    let reason = gpu.errors.join("; ");
                    tracing::warn!(index, uuid = %gpu.uuid, "GPU lost: {reason}");
                    events.push(DeviceEvent::GpuLost {
                        index,
                        uuid: gpu.uuid.clone(),
                        reason,
                    });
                }
            }
            Some(old) => {
                let replaced = !old.uuid.is_empty() && !gpu.uuid.is_empty() && old.uuid != gpu.uuid;
                if replaced {
                    if !old.lost {
                        events.push(DeviceEvent::GpuLost {
                            index,
                            uuid: old.uuid.clone(),
                            reason: format!("replaced by {} at index {index}", gpu.uuid),
                        });
                    }
                    tracing::info!(index, uuid = %gpu.uuid, name = %gpu.name, "GPU appeared");
                    events.push(DeviceEvent::GpuAppeared {
                        index,
                        uuid: gpu.uuid.clone(),
                        name: gpu.name.clone(),
                    });
                } else if old.lost {
                    if gpu.uuid.is_empty() {
                        gpu.uuid = old.uuid.clone();
                    }
                    tracing::info!(index, uuid = %gpu.uuid, "GPU recovered");
                    events.push(DeviceEvent::GpuRecovered {
                        index,
                        uuid: gpu.uuid.clone(),
                    });
                }
            }
        }
        known.insert(index, gpu);
    }

    // Devices known but not reported this time are lost, not dropped.
    for (index, gpu) in known.iter_mut() {
        if !reported_indices.contains(index) {
            lose(
                gpu,
                format!("no longer reported by the {probe} probe"),
                events,
            );
        }
    }
}

/// Makes a device the probe reported lost obey the lost-device invariants, taking identity the
/// probe could not read from the last known record.
fn normalise_lost(gpu: &mut GpuInfo, old: Option<&GpuInfo>) {
    let mut reasons = std::mem::take(&mut gpu.errors);
    if reasons.is_empty() {
        reasons.push("lost".to_string());
    }
    if let Some(old) = old {
        if gpu.uuid.is_empty() {
            gpu.uuid = old.uuid.clone();
        }
        if gpu.name.is_empty() {
            gpu.name = old.name.clone();
        }
        if gpu.memory_total_bytes == 0 {
            gpu.memory_total_bytes = old.memory_total_bytes;
        }
        gpu.simulated = old.simulated || gpu.simulated;
    }
    gpu.mark_lost(String::new());
    gpu.errors = reasons;
}

/// Marks a known device lost for `reason`, raising `GpuLost` if it was not lost already.
fn lose(gpu: &mut GpuInfo, reason: String, events: &mut Vec<DeviceEvent>) {
    if !gpu.lost {
        tracing::warn!(index = gpu.index, uuid = %gpu.uuid, "GPU lost: {reason}");
        events.push(DeviceEvent::GpuLost {
            index: gpu.index,
            uuid: gpu.uuid.clone(),
            reason: reason.clone(),
        });
    }
    gpu.mark_lost(reason);
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    format!("probe panicked: {text}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
