//! The models a server knows, their load state, and their workers.
//!
//! Models come from two places: the built-in ones (`identity`, `cost`, `fault`) and the model
//! repository (one folder per model). Loading a model
//! 1. re-reads its folder (config + serving version) and applies the caller's override,
//! 2. waits for a load slot (at most `max_concurrent_loads` at once),
//! 3. asks the allocator for room on a device (estimated size: the version folder's files ×
//!    `size_factor`), unloading the idle models it evicts,
//! 4. builds the backend and runs the warm-up requests off the async threads, within
//!    `load_timeout`; a backend that cannot say what it holds is built while no other such build
//!    runs on that device, and is charged what this process's memory on the device grew by
//!    ([`MemoryGauge`]: resident memory for the CPU, NVML's per-process figure for a GPU),
//! 5. charges the measured size (the estimate only when nothing could be measured), hands a
//!    fast-path worker to the [`WorkerHost`], and only then marks the model READY. A reload that
//!    fails leaves the old version serving.
//!
//! A load that passes `load_timeout` is reported failed at once, but its memory reservation and
//! its load slot stay held until the build really ends (the build cannot be interrupted: it runs
//! on a blocking thread), then are released and the half-built model dropped: neither the
//! budgets nor `max_concurrent_loads` can be exceeded by loads that were given up on.
//!
//! Requests hold the model in the allocator while they run (an idle model is one with no request
//! in flight), so a model with requests in flight is never evicted.
//!
//! GPU jobs hold their memory in the same allocator (`jobs.rs`): a model load that needs the
//! room of a running GPU job fails naming it, and a job's reservation evicts idle models as a
//! load does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use veraltheim_bus::{Bus, Event, topic_segment};
use veraltheim_devices::GpuInfo;
use veraltheim_fastpath::{ExecutionPool, ModelWorker, WorkerOptions};
use veraltheim_models::allocator::{Allocator, Budget, DeviceId, DeviceUsage, HolderState};
use veraltheim_models::backend::BackendOptions;
use veraltheim_models::repository::Repository;
use veraltheim_models::{ModelConfig, ModelState, builtin};

use crate::Error;
use crate::gauge::MemoryGauge;
use crate::host::WorkerHost;

mod jobs;
mod load;

pub use jobs::{JobGpus, JobHeld, job_key};

/// The version built-in models serve.
pub const BUILTIN_VERSION: u64 = 1;

/// What the APIs show of a model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub state: ModelState,
    pub reason: String,
    pub config: ModelConfig,
    /// Where it runs and what it holds there, when loaded.
    pub device: Option<DeviceId>,
    pub memory_bytes: u64,
    /// Every version folder (repository models).
    pub versions: Vec<u64>,
    /// What its load was estimated at and charged, while loaded.
    pub memory: Option<MemoryCharge>,
}

/// What a loaded model was admitted on and what it was charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryCharge {
    /// Its files' size × `size_factor`: what admission reserved before the load.
    pub estimate_bytes: u64,
    /// What it holds on its device: the budget counts this.
    pub charged_bytes: u64,
    pub how: Measurement,
}

/// Memory the allocator holds for one model on one device: a placement, as the resource and
/// statistics APIs show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The model's name.
    pub model: String,
    /// The allocator's key for this load of it (`<name>#<generation>`): during a reload the
    /// serving version and the new one hold memory under two keys.
    pub key: String,
    pub device: DeviceId,
    /// Its measured charge when ready; its estimate while loading; for a model being evicted,
    /// what it held.
    pub bytes: u64,
    pub state: HolderState,
}

/// How a model's charge was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measurement {
    /// The backend reported what it holds (candle: its tensors' bytes; built-ins: their claim).
    Reported,
    /// This process's memory on the device grew by this much while the model was built alone.
    Growth,
    /// Nothing could be measured: the estimate stands.
    Estimate,
}

impl Measurement {
    pub fn as_str(self) -> &'static str {
        match self {
            Measurement::Reported => "reported",
            Measurement::Growth => "measured",
            Measurement::Estimate => "estimate",
        }
    }
}

/// How the manager loads models.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    pub worker: WorkerOptions,
    pub unload_grace: Duration,
    pub fault_injection: bool,
    /// The model repository, if any.
    pub repository: Option<PathBuf>,
    pub backend: BackendOptions,
    pub max_concurrent_loads: usize,
    pub load_timeout: Duration,
    /// One budget per device.
    pub budgets: Vec<Budget>,
    /// Reserve of a GPU that appears after start (the start-up GPUs have theirs in `budgets`).
    pub gpu_reserve_bytes: u64,
    /// A load is admitted on its files' size times this factor.
    pub size_factor: f64,
    /// Latency objectives (p99, ms) by model name, from the command line or the settings: a
    /// model whose own configuration sets no `latency_slo_p99_ms` gets this one (a load's
    /// configuration override may still replace it). The way to give built-in models one.
    pub latency_slo_ms: std::collections::BTreeMap<String, u64>,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            worker: WorkerOptions::default(),
            unload_grace: Duration::from_secs(10),
            fault_injection: false,
            repository: None,
            backend: BackendOptions::default(),
            max_concurrent_loads: 2,
            load_timeout: Duration::from_secs(120),
            budgets: vec![Budget::new(DeviceId::Cpu, 64 << 30, 0)],
            gpu_reserve_bytes: 0,
            size_factor: 1.5,
            latency_slo_ms: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Builtin,
    Repository,
}

struct Entry {
    source: Source,
    /// The configuration the model starts from; overrides apply on top of it.
    base: ModelConfig,
    /// The configuration in effect (or last tried).
    config: ModelConfig,
    /// The serving (or last tried) version.
    version: u64,
    versions: Vec<u64>,
    state: ModelState,
    reason: String,
    worker: Option<Arc<ModelWorker>>,
    /// The worker's name under FastPathProcessor (`model:<name>#<generation>`), which is also the
    /// key the allocator holds its memory under (`<name>#<generation>`).
    child: Option<String>,
    key: Option<String>,
    memory: Option<MemoryCharge>,
    /// One load or unload of this model at a time.
    op: Arc<tokio::sync::Mutex<()>>,
}

impl Entry {
    fn new(source: Source, config: ModelConfig, version: u64, versions: Vec<u64>) -> Self {
        Entry {
            source,
            base: config.clone(),
            config,
            version,
            versions,
            state: ModelState::NotLoaded,
            reason: String::new(),
            worker: None,
            child: None,
            key: None,
            memory: None,
            op: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// A request's hold on a model: while it lives the model counts as busy and is not evicted.
pub struct InFlight {
    allocator: Arc<Mutex<Allocator>>,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.allocator.lock().finish(&self.key);
    }
}

pub struct ModelManager {
    pool: ExecutionPool,
    options: ManagerOptions,
    repository: Option<Repository>,
    entries: RwLock<BTreeMap<String, Entry>>,
    allocator: Arc<Mutex<Allocator>>,
    load_slots: Arc<tokio::sync::Semaphore>,
    /// State changes are published as `models.<name>.state`.
    bus: Bus,
    /// Runs the model workers' batcher loops (the supervision tree, in the server).
    host: Arc<dyn WorkerHost>,
    /// Measures what a load took, for backends that cannot say.
    gauge: Arc<dyn MemoryGauge>,
    /// One measured build at a time per device (see the module documentation).
    measuring: Mutex<BTreeMap<DeviceId, Arc<tokio::sync::Mutex<()>>>>,
    generation: AtomicU64,
}

/// What a manager works with besides its options: the execution pool its workers share, the bus
/// its state changes go out on, where its workers run and how its loads are measured.
pub struct ManagerDeps {
    pub pool: ExecutionPool,
    pub bus: Bus,
    pub host: Arc<dyn WorkerHost>,
    pub gauge: Arc<dyn MemoryGauge>,
}

impl ManagerDeps {
    /// Workers on tasks of their own ([`crate::Detached`]), loads measured on the host
    /// ([`crate::HostGauge`]), a fresh bus: for tests and tools.
    pub fn detached(pool: ExecutionPool) -> Self {
        ManagerDeps {
            pool,
            bus: Bus::new(),
            host: Arc::new(crate::Detached),
            gauge: Arc::new(crate::HostGauge),
        }
    }
}

/// The model an allocator key (`<name>#<generation>`) belongs to.
fn key_model(key: &str) -> &str {
    key.rsplit_once('#').map_or(key, |(name, _)| name)
}

impl ModelManager {
    /// The limits requests and loads are checked against.
    pub fn limits(&self) -> &veraltheim_models::Limits {
        &self.options.backend.limits
    }

    pub fn new(
        options: ManagerOptions,
        deps: ManagerDeps,
    ) -> Result<Self, veraltheim_models::Error> {
        let ManagerDeps {
            pool,
            bus,
            host,
            gauge,
        } = deps;
        let mut entries = BTreeMap::new();
        for name in builtin::names(options.fault_injection) {
            let config = builtin::config(name)?;
            entries.insert(
                name.to_string(),
                Entry::new(
                    Source::Builtin,
                    config,
                    BUILTIN_VERSION,
                    vec![BUILTIN_VERSION],
                ),
            );
        }
        let repository = options.repository.as_ref().map(Repository::new);
        let manager = ModelManager {
            pool,
            allocator: Arc::new(Mutex::new(Allocator::new(options.budgets.clone()))),
            load_slots: Arc::new(tokio::sync::Semaphore::new(
                options.max_concurrent_loads.max(1),
            )),
            options,
            repository,
            entries: RwLock::new(entries),
            bus,
            host,
            gauge,
            measuring: Mutex::new(BTreeMap::new()),
            generation: AtomicU64::new(0),
        };
        manager.refresh();
        Ok(manager)
    }

    /// Re-reads the repository: new folders become known (NOT_LOADED), broken ones show their
    /// error as the reason. Models already known keep their state.
    pub fn refresh(&self) {
        let Some(repo) = &self.repository else { return };
        let names = match repo.names() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "model repository not readable");
                return;
            }
        };
        let mut entries = self.entries.write();
        for name in names {
            if entries
                .get(&name)
                .is_some_and(|e| e.source == Source::Builtin)
            {
                tracing::warn!(model = %name, "repository folder shadowed by the built-in model of that name");
                continue;
            }
            if entries.contains_key(&name) {
                continue;
            }
            let entry = match repo.model(&name) {
                Ok(m) => Entry::new(Source::Repository, m.config, m.serving, m.versions),
                Err(e) => {
                    let mut entry = Entry::new(
                        Source::Repository,
                        ModelConfig {
                            name: name.clone(),
                            ..Default::default()
                        },
                        0,
                        Vec::new(),
                    );
                    entry.reason = e.to_string();
                    entry
                }
            };
            entries.insert(name, entry);
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.read().keys().cloned().collect()
    }

    /// Whether the API may address this version of the model ("" = the serving one).
    pub fn check_version(&self, name: &str, version: &str) -> Result<(), Error> {
        let entries = self.entries.read();
        let e = entries
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        if version.is_empty() || version == e.version.to_string() {
            Ok(())
        } else {
            Err(Error::NoSuchVersion {
                name: name.to_string(),
                version: version.to_string(),
                serving: e.version,
            })
        }
    }

    /// The version a model serves (or last tried), as the APIs spell it.
    pub fn version_of(&self, name: &str) -> String {
        self.entries
            .read()
            .get(name)
            .map_or_else(|| BUILTIN_VERSION.to_string(), |e| e.version.to_string())
    }

    /// The worker of a READY model (for statistics and metadata; requests use [`Self::acquire`]).
    pub fn worker(&self, name: &str) -> Result<Arc<ModelWorker>, Error> {
        let entries = self.entries.read();
        let entry = entries
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        match (&entry.worker, entry.state) {
            (Some(w), ModelState::Ready) => Ok(w.clone()),
            _ => Err(Error::NotReady {
                name: name.to_string(),
                state: entry.state,
                reason: entry.reason.clone(),
            }),
        }
    }

    /// The worker of a READY model plus a hold that keeps it from being evicted while the
    /// request runs.
    pub fn acquire(&self, name: &str) -> Result<(Arc<ModelWorker>, InFlight), Error> {
        let entries = self.entries.read();
        let entry = entries
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let not_ready = || Error::NotReady {
            name: name.to_string(),
            state: entry.state,
            reason: entry.reason.clone(),
        };
        match (&entry.worker, &entry.key, entry.state) {
            (Some(w), Some(key), ModelState::Ready) => {
                if !self.allocator.lock().acquire(key) {
                    return Err(Error::NotReady {
                        name: name.to_string(),
                        state: ModelState::Unloading,
                        reason: "being evicted".into(),
                    });
                }
                Ok((
                    w.clone(),
                    InFlight {
                        allocator: self.allocator.clone(),
                        key: key.clone(),
                    },
                ))
            }
            _ => Err(not_ready()),
        }
    }

    /// [`Self::acquire`], loading the model first when it is not loaded and its configuration
    /// sets `load_on_demand` (the request waits for the load until its deadline).
    pub async fn acquire_or_load(
        &self,
        name: &str,
        deadline: Option<Instant>,
    ) -> Result<(Arc<ModelWorker>, InFlight), Error> {
        match self.acquire(name) {
            Err(e) if self.loads_on_demand_after(name, &e) => {
                let load = async {
                    match self.load_if_needed(name, None, true).await {
                        Ok(_) => Ok(()),
                        // Someone else's load may have won meanwhile.
                        Err(e) => self.acquire(name).map(|_| ()).map_err(|_| e),
                    }
                };
                match deadline {
                    Some(at) => {
                        tokio::time::timeout_at(at.into(), load)
                            .await
                            .map_err(|_| Error::NotReady {
                                name: name.to_string(),
                                state: ModelState::Loading,
                                reason: "still loading when the request's deadline passed".into(),
                            })??
                    }
                    None => load.await?,
                }
                self.acquire(name)
            }
            other => other,
        }
    }

    /// Whether a request that [`Self::acquire`] refused with `e` should wait for an on-demand
    /// load of `name` ([`Self::acquire_or_load`]).
    pub fn loads_on_demand_after(&self, name: &str, e: &Error) -> bool {
        matches!(
            e,
            Error::NotReady {
                state: ModelState::NotLoaded | ModelState::Loading,
                ..
            }
        ) && self.loads_on_demand(name)
    }

    fn loads_on_demand(&self, name: &str) -> bool {
        self.entries
            .read()
            .get(name)
            .is_some_and(|e| e.base.load_on_demand)
    }

    pub fn workers(&self) -> Vec<Arc<ModelWorker>> {
        self.entries
            .read()
            .values()
            .filter_map(|e| e.worker.clone())
            .collect()
    }

    pub fn info(&self, name: &str) -> Result<ModelInfo, Error> {
        let entries = self.entries.read();
        let e = entries
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(self.to_info(name, e))
    }

    /// Every known model. Folders added to the repository since the last refresh show only after
    /// [`Self::refresh`] (the listing APIs call it; metrics scrapes do not read the disk).
    pub fn list(&self) -> Vec<ModelInfo> {
        self.entries
            .read()
            .iter()
            .map(|(name, e)| self.to_info(name, e))
            .collect()
    }

    /// Follows the GPUs as the inventory last read them: each GPU's capacity becomes its total
    /// less what other processes hold there ([`Allocator::follow_device`]); a lost GPU gets
    /// none, so nothing new is placed on it (the models already there keep their charge, shown
    /// as over-committed, until they are unloaded). A GPU that was not there at start gets a
    /// budget (with `gpu_reserve_bytes`) and takes models from then on.
    pub fn follow_gpus(&self, gpus: &[GpuInfo]) {
        let mut allocator = self.allocator.lock();
        for g in gpus {
            let device = DeviceId::Gpu(g.index);
            if g.lost {
                allocator.set_capacity(device, 0);
            } else if !allocator.follow_device(device, g.memory_total_bytes, g.memory_used_bytes) {
                // A GPU that was not there at start (a driver restart, a MIG change): it gets a
                // budget now, with the configured reserve, and models may be placed there.
                allocator.set_budget(Budget::new(
                    device,
                    g.memory_total_bytes,
                    self.options.gpu_reserve_bytes,
                ));
                allocator.follow_device(device, g.memory_total_bytes, g.memory_used_bytes);
                tracing::info!(gpu = g.index, name = %g.name, "a GPU appeared; it now has a memory budget");
            }
        }
    }

    /// Each loaded model's charge, by its allocator key (`<name>#<generation>`).
    pub fn charges(&self) -> BTreeMap<String, MemoryCharge> {
        self.entries
            .read()
            .values()
            .filter_map(|e| Some((e.key.clone()?, e.memory?)))
            .collect()
    }

    /// Each device's budget and what holds it.
    pub fn memory(&self) -> Vec<DeviceUsage> {
        self.allocator.lock().snapshot()
    }

    /// Every model's memory on every device, as the allocator holds it now: devices in order
    /// (cpu, gpu0, gpu1, …), models by key within a device.
    pub fn placements(&self) -> Vec<Placed> {
        self.memory()
            .into_iter()
            .flat_map(|d| {
                d.holders.into_iter().map(move |h| Placed {
                    model: key_model(&h.model).to_string(),
                    device: d.device,
                    bytes: h.bytes,
                    state: h.state,
                    key: h.model,
                })
            })
            .collect()
    }

    /// What the allocator holds for the model `name` on each device where it holds anything,
    /// devices in order; both versions count while a reload holds two.
    pub fn memory_of(&self, name: &str) -> Vec<(DeviceId, u64)> {
        let mut by_device: BTreeMap<DeviceId, u64> = BTreeMap::new();
        for p in self.placements().into_iter().filter(|p| p.model == name) {
            let sum = by_device.entry(p.device).or_default();
            *sum = sum.saturating_add(p.bytes);
        }
        by_device.into_iter().collect()
    }

    fn to_info(&self, name: &str, e: &Entry) -> ModelInfo {
        let held = e.key.as_ref().and_then(|k| self.allocator.lock().holder(k));
        ModelInfo {
            name: name.to_string(),
            version: e.version.to_string(),
            state: e.state,
            reason: e.reason.clone(),
            config: e.config.clone(),
            device: held.as_ref().map(|(d, _)| *d),
            memory_bytes: held.map_or(0, |(_, u)| u.bytes),
            versions: e.versions.clone(),
            memory: e.key.as_ref().and(e.memory),
        }
    }

    pub(super) async fn set_state(&self, name: &str, state: ModelState, reason: &str) {
        if let Some(e) = self.entries.write().get_mut(name) {
            e.state = state;
            e.reason = reason.to_string();
        }
        self.announce(name, state, reason).await;
    }

    pub(super) async fn announce(&self, name: &str, state: ModelState, reason: &str) {
        tracing::info!(model = name, state = %state, reason, "model state");
        let message = if reason.is_empty() {
            format!("model {name} is {state}")
        } else {
            format!("model {name} is {state}: {reason}")
        };
        let event = Event::new(format!("models.{}.state", topic_segment(name)), message)
            .with_attribute("model", name)
            .with_attribute("state", state.as_str())
            .with_attribute("reason", reason);
        if let Err(e) = self.bus.publish(event).await {
            tracing::warn!(model = name, error = %e, "model state event not published");
        }
    }
}

#[cfg(test)]
mod tests;
