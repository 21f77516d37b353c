//! The model allocator: memory budgets per device, placement of models on devices, and eviction
//! of idle models when room is needed.
//!
//! A pure, synchronous data structure with no clock and no I/O (apart from [`estimate_bytes`], a
//! helper that reads a model folder). The model manager holds it behind a mutex and calls it around
//! loads, unloads and requests:
//!
//! 1. [`Allocator::admit`] before a load: places the model on a device and reserves its
//!    *estimated* size there (the model is `Loading`). The [`Admission`] names the device and the
//!    models evicted to make room; the caller unloads those and then calls [`Allocator::release`]
//!    for each.
//! 2. [`Allocator::charge`] once loaded: the *measured* size replaces the reservation (the model is
//!    `Ready`). If it has grown past what fits, idle models on the same device are evicted; if even
//!    that is not enough the charge fails, the reservation stays, and the caller unloads the model
//!    and calls [`Allocator::release`].
//! 3. [`Allocator::acquire`] / [`Allocator::finish`] around every request: a model with requests
//!    in flight is never evicted, and every acquire and finish counts as a use for LRU.
//! 4. [`Allocator::release`] after an unload or a failed load: frees its bytes.
//!
//! Memory that something other than a model takes on a device (a GPU job's process, under the
//! key `job:<id>`) is an *external holder*: [`Allocator::reserve_external`] places it on as many
//! distinct devices as it asks for, by the same placement and eviction rules as a model's load,
//! and [`Allocator::release`] frees it. An external holder counts against its devices' budgets
//! like a ready model, is never evicted, never acquired, charged or pinned, and is listed apart
//! from the models ([`DeviceUsage::externals`]); errors name it among what holds a device.
//!
//! # Budgets
//!
//! Each device has one budget: its capacity (host RAM for [`DeviceId::Cpu`], the GPU's memory for
//! [`DeviceId::Gpu`], from the device inventory) minus a reserve. What a device *holds* is the sum
//! of the reservations of models still loading and the charges of ready models. Every operation
//! keeps `held <= budget` — except [`Allocator::set_capacity`] (and [`Allocator::set_budget`]),
//! which follow the inventory and never evict by themselves: a device that shrinks below what it
//! holds is reported in [`DeviceUsage::over_committed_bytes`] until models are released. No other
//! operation raises what an over-committed device holds.
//!
//! # Placement
//!
//! The candidate devices are those the model's [`Placement`] allows and that have a non-zero
//! capacity (a device with capacity 0 is treated as lost). They are ordered by the `prefer` hint:
//! with [`Prefer::Gpu`] (the default) the allowed GPUs by most free budget first (ties: lower id),
//! then the CPU; with [`Prefer::Cpu`] the CPU first, then the GPUs in the same order.
//!
//! 1. The first candidate on which the model fits *without eviction* is chosen.
//! 2. Otherwise, among the candidates where evicting idle models makes it fit, the one that evicts
//!    the fewest bytes is chosen (ties: fewer victims, then the order above).
//! 3. Otherwise the load fails with [`Error::NoRoom`], naming every candidate's budget and
//!    what holds it (devices in id order).
//!
//! # Eviction
//!
//! Only models that are `Ready`, unpinned, with no request in flight, on the device in question,
//! and not named in the load's `keep` list can be evicted (never an external holder). They are
//! taken least recently used first (a logical clock ticks on every admit, charge, acquire and
//! finish), and only as many as needed. Evictions are all-or-nothing: if evicting every eligible model would not make room,
//! nothing is evicted. Victims stop counting against the budget at once and are marked
//! `Evicting`: [`Allocator::acquire`] refuses them until the caller releases them.
//!
//! # Reloads
//!
//! Model keys are opaque strings and one key holds at most one reservation. A new version of a
//! model that keeps serving while the new one loads is admitted under a distinct key (e.g.
//! `name#2`, the manager's generation) with the serving key in [`LoadRequest::keep`], so that the
//! load never evicts the version it replaces; once the new version serves, the caller releases the
//! old key.

use std::collections::BTreeMap;
use std::path::Path;

pub use crate::device::{DeviceId, DeviceReport, HolderReport, HolderState, format_bytes};
use crate::error::Error;

/// The memory a device offers to models: its capacity minus a reserve kept for everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The device.
    pub device: DeviceId,
    /// Total memory of the device in bytes (from the device inventory).
    pub capacity_bytes: u64,
    /// Bytes never given to models.
    pub reserve_bytes: u64,
}

impl Budget {
    /// A budget of `capacity_bytes - reserve_bytes` on `device`.
    pub fn new(device: DeviceId, capacity_bytes: u64, reserve_bytes: u64) -> Self {
        Budget {
            device,
            capacity_bytes,
            reserve_bytes,
        }
    }

    /// The bytes models may hold: capacity minus reserve, 0 if the reserve is larger.
    pub fn budget_bytes(&self) -> u64 {
        self.capacity_bytes.saturating_sub(self.reserve_bytes)
    }
}

/// Which kind of device to try first when several are allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefer {
    /// GPUs first (most free budget first), then the CPU.
    #[default]
    Gpu,
    /// The CPU first, then the GPUs.
    Cpu,
}

/// Where a model may be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The model may run on the CPU (host memory).
    pub allow_cpu: bool,
    /// The model may run on a GPU.
    pub allow_gpu: bool,
    /// If set, only these GPUs (inventory indices) are allowed; an empty list allows none.
    pub gpu_ids: Option<Vec<u32>>,
    /// Which kind of device to try first.
    pub prefer: Prefer,
}

impl Default for Placement {
    /// Any device, GPUs first.
    fn default() -> Self {
        Placement {
            allow_cpu: true,
            allow_gpu: true,
            gpu_ids: None,
            prefer: Prefer::Gpu,
        }
    }
}

impl Placement {
    /// Host memory only.
    pub fn cpu_only() -> Self {
        Placement {
            allow_cpu: true,
            allow_gpu: false,
            gpu_ids: None,
            prefer: Prefer::Cpu,
        }
    }

    /// Any GPU, never the CPU.
    pub fn gpu_only() -> Self {
        Placement {
            allow_cpu: false,
            allow_gpu: true,
            gpu_ids: None,
            prefer: Prefer::Gpu,
        }
    }

    /// Whether the model may be placed on `device`.
    pub fn allows(&self, device: DeviceId) -> bool {
        match device {
            DeviceId::Cpu => self.allow_cpu,
            DeviceId::Gpu(id) => {
                self.allow_gpu && self.gpu_ids.as_ref().is_none_or(|ids| ids.contains(&id))
            }
        }
    }

    /// The allowed devices in words, for messages: `cpu`, `any gpu`, `gpu1, gpu3`, `nothing`.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.allow_cpu {
            parts.push("cpu".to_string());
        }
        if self.allow_gpu {
            match &self.gpu_ids {
                None => parts.push("any gpu".to_string()),
                Some(ids) => {
                    let mut ids = ids.clone();
                    ids.sort_unstable();
                    ids.dedup();
                    parts.extend(ids.into_iter().map(|id| DeviceId::Gpu(id).to_string()));
                }
            }
        }
        if parts.is_empty() {
            "nothing".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// A request to reserve memory for a model that is about to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadRequest {
    /// The key the model is held under (unique; a reload uses a distinct key such as `name#2`).
    pub model: String,
    /// The estimated size in bytes (see [`estimate_bytes`]), reserved until [`Allocator::charge`].
    pub estimated_bytes: u64,
    /// Where the model may go.
    pub placement: Placement,
    /// Pinned models are never evicted.
    pub pinned: bool,
    /// Models this load must not evict (e.g. the version it replaces, which serves until the
    /// swap). Unknown keys are ignored.
    pub keep: Vec<String>,
}

impl LoadRequest {
    /// A request for `estimated_bytes` on any device, unpinned, keeping nothing.
    pub fn new(model: impl Into<String>, estimated_bytes: u64) -> Self {
        LoadRequest {
            model: model.into(),
            estimated_bytes,
            placement: Placement::default(),
            pinned: false,
            keep: Vec::new(),
        }
    }

    /// Sets where the model may go.
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Sets whether the model is pinned.
    pub fn with_pinned(mut self, pinned: bool) -> Self {
        self.pinned = pinned;
        self
    }

    /// Adds a model this load must not evict.
    pub fn with_keep(mut self, model: impl Into<String>) -> Self {
        self.keep.push(model.into());
        self
    }
}

/// A successful admission: where the model goes and whom the caller must unload first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The device the model is placed on.
    pub device: DeviceId,
    /// Models evicted to make room, least recently used first, all on `device`. They no longer
    /// count against the budget and [`Allocator::acquire`] refuses them; the caller unloads each
    /// and then calls [`Allocator::release`] for it.
    pub evict: Vec<String>,
}

/// How much an external holder takes on each device it is placed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalSize {
    /// These many bytes on each device.
    Bytes(u64),
    /// The device's whole budget (as it is when reserved): nothing else may be placed there
    /// while it holds the device.
    WholeDevice,
}

impl ExternalSize {
    /// The bytes it takes on a device whose budget is `budget_bytes`.
    pub fn on(self, budget_bytes: u64) -> u64 {
        match self {
            ExternalSize::Bytes(bytes) => bytes,
            ExternalSize::WholeDevice => budget_bytes,
        }
    }
}

impl std::fmt::Display for ExternalSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExternalSize::Bytes(bytes) => f.write_str(&format_bytes(*bytes)),
            ExternalSize::WholeDevice => f.write_str("a whole device"),
        }
    }
}

/// A request to reserve memory for an external holder (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalRequest {
    /// The key it is held under (e.g. `job:<id>`); distinct from every model's key.
    pub key: String,
    /// How many distinct devices it needs (0 reserves nothing and always succeeds).
    pub devices: u32,
    /// What it takes on each.
    pub size: ExternalSize,
    /// Where it may go.
    pub placement: Placement,
}

/// A successful external reservation: where it is and whom the caller must unload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalAdmission {
    /// The devices it holds, in the order they were chosen (most free first).
    pub devices: Vec<DeviceId>,
    /// Models evicted to make room (on those devices), to unload and release as after
    /// [`Allocator::admit`].
    pub evict: Vec<String>,
}

/// An external holder's memory on one device, as seen by [`Allocator::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalUsage {
    /// Its key.
    pub key: String,
    /// The bytes it holds on this device.
    pub bytes: u64,
}

/// One model's memory on a device, as seen by [`Allocator::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderUsage {
    /// The model's key.
    pub model: String,
    /// Bytes reserved (loading) or charged (ready); for an evicting model, what it held.
    pub bytes: u64,
    /// Whether it is pinned.
    pub pinned: bool,
    /// Requests in flight.
    pub in_flight: u32,
    /// Where it stands.
    pub state: HolderState,
    /// The logical time of its last use (higher is more recent).
    pub last_used: u64,
}

/// One device's budget and who holds it, as seen by [`Allocator::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceUsage {
    /// The device.
    pub device: DeviceId,
    /// Its capacity in bytes.
    pub capacity_bytes: u64,
    /// Its reserve in bytes.
    pub reserve_bytes: u64,
    /// Capacity minus reserve (0 if the reserve is larger).
    pub budget_bytes: u64,
    /// Measured bytes of ready models.
    pub charged_bytes: u64,
    /// Estimated bytes of models still loading.
    pub reserved_bytes: u64,
    /// Bytes of external holders (jobs).
    pub external_bytes: u64,
    /// `charged_bytes + reserved_bytes + external_bytes`: what counts against the budget.
    pub held_bytes: u64,
    /// Budget left: `budget_bytes - held_bytes`, 0 if over-committed.
    pub free_bytes: u64,
    /// How far `held_bytes` exceeds the budget (after the device shrank); 0 normally.
    pub over_committed_bytes: u64,
    /// Bytes of evicted models not yet released (not counted in `held_bytes`).
    pub evicting_bytes: u64,
    /// The models on this device, by key.
    pub holders: Vec<HolderUsage>,
    /// The external holders on this device, by key.
    pub externals: Vec<ExternalUsage>,
}

/// One model's bookkeeping.
#[derive(Clone, Debug)]
struct Entry {
    device: DeviceId,
    /// Reserved (loading) or charged (ready) bytes; for an evicting model, what it held.
    bytes: u64,
    /// The size it was admitted with.
    estimated: u64,
    state: HolderState,
    pinned: bool,
    in_flight: u32,
    last_used: u64,
    /// Models this (still loading) model's load must not evict.
    keep: Vec<String>,
}

impl Entry {
    fn counted(&self) -> bool {
        self.state != HolderState::Evicting
    }
}

/// Memory budgets per device and the models holding them. See the module documentation for the
/// rules.
#[derive(Clone, Debug, Default)]
pub struct Allocator {
    devices: BTreeMap<DeviceId, Budget>,
    entries: BTreeMap<String, Entry>,
    /// External holders: the bytes each holds on each of its devices.
    externals: BTreeMap<String, Vec<(DeviceId, u64)>>,
    clock: u64,
}

impl Allocator {
    /// An allocator over these budgets (a later budget for the same device replaces an earlier
    /// one).
    pub fn new(budgets: impl IntoIterator<Item = Budget>) -> Self {
        let mut allocator = Allocator::default();
        for budget in budgets {
            allocator.devices.insert(budget.device, budget);
        }
        allocator
    }

    /// Sets (or adds) a device's budget, e.g. when a GPU appears. Never evicts: a device left
    /// holding more than its budget is reported in [`DeviceUsage::over_committed_bytes`].
    pub fn set_budget(&mut self, budget: Budget) {
        self.devices.insert(budget.device, budget);
    }

    /// Changes a known device's capacity (the inventory changed; 0 marks it lost, so nothing new
    /// is placed there). Never evicts: a device left holding more than its budget is reported in
    /// [`DeviceUsage::over_committed_bytes`]. Returns false, changing nothing, for an unknown
    /// device (use [`Allocator::set_budget`] to add one).
    pub fn set_capacity(&mut self, device: DeviceId, capacity_bytes: u64) -> bool {
        match self.devices.get_mut(&device) {
            Some(budget) => {
                budget.capacity_bytes = capacity_bytes;
                true
            }
            None => false,
        }
    }

    /// Follows what a device itself reports: `used_bytes` of its `total_bytes` are in use by
    /// anything, this process's models included. What others hold there (used less what our
    /// models hold, never negative) comes off the capacity, so that admission sees the memory
    /// that is really left instead of failing later in the driver. Never evicts. Returns false,
    /// changing nothing, for an unknown device.
    pub fn follow_device(&mut self, device: DeviceId, total_bytes: u64, used_bytes: u64) -> bool {
        let ours: u64 = self
            .on_device(device)
            .map(|(_, entry)| entry.bytes)
            .chain(self.externals_on(device).map(|(_, bytes)| bytes))
            .fold(0, u64::saturating_add);
        let others = used_bytes.saturating_sub(ours);
        self.set_capacity(device, total_bytes.saturating_sub(others))
    }

    /// Places a model and reserves its estimated size there, evicting idle models if needed (see
    /// the module documentation for the rules). On error nothing changes.
    pub fn admit(&mut self, req: &LoadRequest) -> Result<Admission, Error> {
        self.check_free_key(&req.model)?;
        let candidates = self.candidates(&req.placement);
        if candidates.is_empty() {
            return Err(Error::NoAllowedDevice {
                model: req.model.clone(),
                allowed: req.placement.describe(),
                present: self
                    .devices
                    .values()
                    .filter(|b| b.capacity_bytes > 0)
                    .map(|b| b.device)
                    .collect(),
            });
        }
        let need = req.estimated_bytes;
        let chosen = self.choose(&candidates, |_| need, &req.keep);
        let Some((device, evict)) = chosen else {
            return Err(Error::NoRoom {
                model: req.model.clone(),
                needed_bytes: need,
                devices: {
                    let mut devices = candidates.clone();
                    devices.sort_unstable();
                    devices
                        .into_iter()
                        .map(|device| self.report(device, None, &req.keep))
                        .collect()
                },
            });
        };
        self.mark_evicting(&evict);
        let last_used = self.tick();
        self.entries.insert(
            req.model.clone(),
            Entry {
                device,
                bytes: need,
                estimated: need,
                state: HolderState::Loading,
                pinned: req.pinned,
                in_flight: 0,
                last_used,
                keep: req.keep.clone(),
            },
        );
        Ok(Admission { device, evict })
    }

    /// Reserves memory for an external holder on `req.devices` distinct devices, evicting idle
    /// models as a load would (see the module documentation). All or nothing: on error nothing
    /// changes.
    pub fn reserve_external(&mut self, req: &ExternalRequest) -> Result<ExternalAdmission, Error> {
        self.check_free_key(&req.key)?;
        let mut trial = self.clone();
        let mut devices: Vec<DeviceId> = Vec::new();
        let mut evict = Vec::new();
        for _ in 0..req.devices {
            let candidates: Vec<DeviceId> = trial
                .candidates(&req.placement)
                .into_iter()
                .filter(|d| !devices.contains(d))
                .collect();
            let need = |device: DeviceId| req.size.on(trial.budget_of(device));
            let Some((device, victims)) = trial.choose(&candidates, need, &[]) else {
                let mut allowed = self.candidates(&req.placement);
                allowed.sort_unstable();
                return Err(Error::NoRoomExternal {
                    key: req.key.clone(),
                    size: req.size.to_string(),
                    wanted: req.devices,
                    found: u32::try_from(devices.len()).unwrap_or(u32::MAX),
                    devices: allowed
                        .into_iter()
                        .map(|device| self.report(device, None, &[]))
                        .collect(),
                });
            };
            let bytes = need(device);
            trial.mark_evicting(&victims);
            // Counted at once, so that the next device is chosen with this one's share held.
            trial
                .externals
                .entry(req.key.clone())
                .or_default()
                .push((device, bytes));
            devices.push(device);
            evict.extend(victims);
        }
        *self = trial;
        Ok(ExternalAdmission { devices, evict })
    }

    /// The devices an external holder holds and the bytes on each, if it holds any.
    pub fn external(&self, key: &str) -> Option<&[(DeviceId, u64)]> {
        self.externals.get(key).map(Vec::as_slice)
    }

    /// Charges a loaded model its measured size, replacing its reservation (or a ready model's
    /// earlier charge), and marks it ready. A charge no larger than what the model holds always
    /// succeeds; a larger one evicts idle models on its device as needed and returns them (the
    /// caller unloads and releases them). If even that is not enough, nothing changes and the
    /// error says so: the caller unloads the model and releases it.
    pub fn charge(&mut self, model: &str, measured_bytes: u64) -> Result<Vec<String>, Error> {
        let Some(entry) = self.entries.get(model) else {
            return Err(Error::NotHeld(model.to_string()));
        };
        if entry.state == HolderState::Evicting {
            return Err(Error::Evicting(model.to_string()));
        }
        let device = entry.device;
        let victims = if measured_bytes <= entry.bytes {
            Vec::new()
        } else {
            let keep = entry.keep.clone();
            match self.eviction_plan(device, measured_bytes, Some(model), &keep) {
                Some(victims) => victims,
                None => {
                    let estimated = entry.estimated;
                    return Err(Error::NoRoomAfterLoad {
                        model: model.to_string(),
                        estimated_bytes: estimated,
                        measured_bytes,
                        device: Box::new(self.report(device, Some(model), &keep)),
                    });
                }
            }
        };
        self.mark_evicting(&victims);
        let last_used = self.tick();
        if let Some(entry) = self.entries.get_mut(model) {
            entry.bytes = measured_bytes;
            entry.state = HolderState::Ready;
            entry.last_used = last_used;
            entry.keep = Vec::new();
        }
        Ok(victims)
    }

    /// Forgets a model (unloaded, failed to load, or an evicted victim once unloaded) or an
    /// external holder (on every device it holds), freeing its bytes. Returns false if it held
    /// nothing.
    pub fn release(&mut self, model: &str) -> bool {
        self.entries.remove(model).is_some() || self.externals.remove(model).is_some()
    }

    /// A request to the model starts: counts it in flight (so the model is not evicted) and
    /// marks the model used. Returns false, changing nothing, if the model is unknown, still
    /// loading or being evicted.
    pub fn acquire(&mut self, model: &str) -> bool {
        let ready = self
            .entries
            .get(model)
            .is_some_and(|e| e.state == HolderState::Ready);
        if !ready {
            return false;
        }
        let now = self.tick();
        if let Some(entry) = self.entries.get_mut(model) {
            entry.in_flight = entry.in_flight.saturating_add(1);
            entry.last_used = now;
        }
        true
    }

    /// A request to the model ended: one fewer in flight, and the model is marked used. Ignored
    /// for an unknown model or one with nothing in flight.
    pub fn finish(&mut self, model: &str) {
        let busy = self.entries.get(model).is_some_and(|e| e.in_flight > 0);
        if !busy {
            return;
        }
        let now = self.tick();
        if let Some(entry) = self.entries.get_mut(model) {
            entry.in_flight -= 1;
            entry.last_used = now;
        }
    }

    /// Pins (never evicted) or unpins a model. Returns false if the model is unknown or being
    /// evicted.
    pub fn set_pinned(&mut self, model: &str, pinned: bool) -> bool {
        match self.entries.get_mut(model) {
            Some(entry) if entry.state != HolderState::Evicting => {
                entry.pinned = pinned;
                true
            }
            _ => false,
        }
    }

    /// One model's memory, if it holds any.
    pub fn holder(&self, model: &str) -> Option<(DeviceId, HolderUsage)> {
        self.entries
            .get(model)
            .map(|entry| (entry.device, usage(model, entry)))
    }

    /// Every device's budget, what it holds and by whom (devices in order: cpu, gpu0, gpu1, …).
    pub fn snapshot(&self) -> Vec<DeviceUsage> {
        self.devices
            .values()
            .map(|budget| {
                let mut usage_ = DeviceUsage {
                    device: budget.device,
                    capacity_bytes: budget.capacity_bytes,
                    reserve_bytes: budget.reserve_bytes,
                    budget_bytes: budget.budget_bytes(),
                    charged_bytes: 0,
                    reserved_bytes: 0,
                    external_bytes: 0,
                    held_bytes: 0,
                    free_bytes: 0,
                    over_committed_bytes: 0,
                    evicting_bytes: 0,
                    holders: Vec::new(),
                    externals: Vec::new(),
                };
                for (model, entry) in self.on_device(budget.device) {
                    let slot = match entry.state {
                        HolderState::Loading => &mut usage_.reserved_bytes,
                        HolderState::Ready => &mut usage_.charged_bytes,
                        HolderState::Evicting => &mut usage_.evicting_bytes,
                    };
                    *slot = slot.saturating_add(entry.bytes);
                    usage_.holders.push(usage(model, entry));
                }
                for (key, bytes) in self.externals_on(budget.device) {
                    usage_.external_bytes = usage_.external_bytes.saturating_add(bytes);
                    usage_.externals.push(ExternalUsage {
                        key: key.clone(),
                        bytes,
                    });
                }
                usage_.held_bytes = usage_
                    .charged_bytes
                    .saturating_add(usage_.reserved_bytes)
                    .saturating_add(usage_.external_bytes);
                usage_.free_bytes = usage_.budget_bytes.saturating_sub(usage_.held_bytes);
                usage_.over_committed_bytes = usage_.held_bytes.saturating_sub(usage_.budget_bytes);
                usage_
            })
            .collect()
    }

    fn tick(&mut self) -> u64 {
        self.clock = self.clock.saturating_add(1);
        self.clock
    }

    fn on_device(&self, device: DeviceId) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter().filter(move |(_, e)| e.device == device)
    }

    /// Bytes counted against `device`'s budget, leaving out `except`.
    fn held(&self, device: DeviceId, except: Option<&str>) -> u64 {
        self.on_device(device)
            .filter(|(model, e)| e.counted() && Some(model.as_str()) != except)
            .map(|(_, e)| e.bytes)
            .chain(self.externals_on(device).map(|(_, bytes)| bytes))
            .fold(0u64, u64::saturating_add)
    }

    /// The external holders on `device` and the bytes each holds there.
    fn externals_on(&self, device: DeviceId) -> impl Iterator<Item = (&String, u64)> {
        self.externals.iter().flat_map(move |(key, held)| {
            held.iter()
                .filter(move |(d, _)| *d == device)
                .map(move |(_, bytes)| (key, *bytes))
        })
    }

    /// Refuses a key that already holds memory, as a model or as an external holder.
    fn check_free_key(&self, key: &str) -> Result<(), Error> {
        if let Some(entry) = self.entries.get(key) {
            return Err(Error::AlreadyHeld {
                model: key.to_string(),
                device: entry.device,
                state: entry.state,
            });
        }
        if self.externals.contains_key(key) {
            return Err(Error::AlreadyReserved(key.to_string()));
        }
        Ok(())
    }

    /// The device among `candidates` (in preference order) for something needing `need(d)`
    /// bytes on device `d`, and the models to evict there: the first where it fits without
    /// eviction, else the one that evicts the fewest bytes (ties: fewer victims, then the
    /// order). `None` if no candidate can hold it.
    fn choose(
        &self,
        candidates: &[DeviceId],
        need: impl Fn(DeviceId) -> u64,
        keep: &[String],
    ) -> Option<(DeviceId, Vec<String>)> {
        if let Some(&device) = candidates
            .iter()
            .find(|&&device| self.fits(device, need(device), None))
        {
            return Some((device, Vec::new()));
        }
        // (evicted bytes, victims, preference position) — the smallest wins.
        let mut best: Option<(u64, usize, usize, DeviceId, Vec<String>)> = None;
        for (position, &device) in candidates.iter().enumerate() {
            if let Some(victims) = self.eviction_plan(device, need(device), None, keep) {
                let bytes = self.sum_bytes(&victims);
                let key = (bytes, victims.len(), position);
                if best
                    .as_ref()
                    .is_none_or(|(b, n, p, _, _)| key < (*b, *n, *p))
                {
                    best = Some((bytes, victims.len(), position, device, victims));
                }
            }
        }
        best.map(|(_, _, _, device, victims)| (device, victims))
    }

    fn budget_of(&self, device: DeviceId) -> u64 {
        self.devices.get(&device).map_or(0, Budget::budget_bytes)
    }

    fn free(&self, device: DeviceId, except: Option<&str>) -> u64 {
        self.budget_of(device)
            .saturating_sub(self.held(device, except))
    }

    /// Whether `need` more bytes fit on `device` without eviction. Zero bytes always fit (they
    /// raise nothing).
    fn fits(&self, device: DeviceId, need: u64, except: Option<&str>) -> bool {
        need == 0 || need <= self.free(device, except)
    }

    /// The allowed devices with a non-zero capacity, in preference order.
    fn candidates(&self, placement: &Placement) -> Vec<DeviceId> {
        let mut gpus: Vec<(u64, u32)> = self
            .devices
            .values()
            .filter(|b| b.capacity_bytes > 0 && placement.allows(b.device))
            .filter_map(|b| match b.device {
                DeviceId::Gpu(id) => Some((self.free(b.device, None), id)),
                DeviceId::Cpu => None,
            })
            .collect();
        gpus.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let gpus = gpus.into_iter().map(|(_, id)| DeviceId::Gpu(id));
        let cpu = self
            .devices
            .get(&DeviceId::Cpu)
            .filter(|b| b.capacity_bytes > 0 && placement.allow_cpu)
            .map(|b| b.device);
        match placement.prefer {
            Prefer::Gpu => gpus.chain(cpu).collect(),
            Prefer::Cpu => cpu.into_iter().chain(gpus).collect(),
        }
    }

    /// Whether a model could be evicted for a load that keeps `keep`, leaving out `except`.
    fn evictable(model: &str, entry: &Entry, except: Option<&str>, keep: &[String]) -> bool {
        entry.state == HolderState::Ready
            && !entry.pinned
            && entry.in_flight == 0
            && Some(model) != except
            && !keep.iter().any(|k| k == model)
    }

    /// The least recently used idle models on `device` whose eviction makes `need` bytes fit
    /// (leaving `except` out of the count), oldest first, as few as needed; `None` if evicting
    /// every one of them is not enough. Empty if it fits already.
    fn eviction_plan(
        &self,
        device: DeviceId,
        need: u64,
        except: Option<&str>,
        keep: &[String],
    ) -> Option<Vec<String>> {
        if self.fits(device, need, except) {
            return Some(Vec::new());
        }
        let budget = u128::from(self.budget_of(device));
        let held = self
            .on_device(device)
            .filter(|(model, e)| e.counted() && Some(model.as_str()) != except)
            .map(|(_, e)| e.bytes)
            .chain(self.externals_on(device).map(|(_, bytes)| bytes))
            .fold(0u128, |sum, bytes| sum + u128::from(bytes));
        let mut deficit = (held + u128::from(need)).saturating_sub(budget);
        let mut eligible: Vec<(u64, &String, u64)> = self
            .on_device(device)
            .filter(|(model, e)| Self::evictable(model, e, except, keep))
            .map(|(model, e)| (e.last_used, model, e.bytes))
            .collect();
        eligible.sort();
        let mut victims = Vec::new();
        for (_, model, bytes) in eligible {
            if deficit == 0 {
                break;
            }
            victims.push(model.clone());
            deficit = deficit.saturating_sub(u128::from(bytes));
        }
        (deficit == 0).then_some(victims)
    }

    fn sum_bytes(&self, models: &[String]) -> u64 {
        models
            .iter()
            .filter_map(|m| self.entries.get(m))
            .fold(0u64, |sum, e| sum.saturating_add(e.bytes))
    }

    fn mark_evicting(&mut self, victims: &[String]) {
        for victim in victims {
            if let Some(entry) = self.entries.get_mut(victim) {
                entry.state = HolderState::Evicting;
            }
        }
    }

    /// `device`'s budget and what holds it (leaving out `except`), largest holders first.
    fn report(&self, device: DeviceId, except: Option<&str>, keep: &[String]) -> DeviceReport {
        let budget = self
            .devices
            .get(&device)
            .copied()
            .unwrap_or(Budget::new(device, 0, 0));
        let mut holders: Vec<HolderReport> = self
            .on_device(device)
            .filter(|(model, e)| e.counted() && Some(model.as_str()) != except)
            .map(|(model, e)| HolderReport {
                model: model.clone(),
                bytes: e.bytes,
                pinned: e.pinned,
                in_flight: e.in_flight,
                loading: e.state == HolderState::Loading,
                kept: e.state == HolderState::Ready && keep.iter().any(|k| k == model),
                external: false,
            })
            .chain(self.externals_on(device).map(|(key, bytes)| HolderReport {
                model: key.clone(),
                bytes,
                pinned: false,
                in_flight: 0,
                loading: false,
                kept: false,
                external: true,
            }))
            .collect();
        holders.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.model.cmp(&b.model)));
        DeviceReport {
            device,
            capacity_bytes: budget.capacity_bytes,
            reserve_bytes: budget.reserve_bytes,
            budget_bytes: budget.budget_bytes(),
            held_bytes: self.held(device, except),
            holders,
        }
    }
}

fn usage(model: &str, entry: &Entry) -> HolderUsage {
    HolderUsage {
        model: model.to_string(),
        bytes: entry.bytes,
        pinned: entry.pinned,
        in_flight: entry.in_flight,
        state: entry.state,
        last_used: entry.last_used,
    }
}

/// The estimated memory of a model: the sizes of the regular files under `dir` (recursively,
/// following symbolic links to files but not to folders, so a link cycle cannot loop) times
/// `factor`, rounded up. A `factor` that is negative or not finite is refused.
pub fn estimate_bytes(dir: &Path, factor: f64) -> std::io::Result<u64> {
    if !factor.is_finite() || factor < 0.0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("size factor must be a finite number >= 0, not {factor}"),
        ));
    }
    let total = files_size(dir)?;
    // `as` saturates: an estimate past u64::MAX becomes u64::MAX.
    Ok((total as f64 * factor).ceil() as u64)
}

fn files_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for item in std::fs::read_dir(&folder)? {
            let item = item?;
            let kind = item.file_type()?;
            if kind.is_dir() {
                pending.push(item.path());
            } else if kind.is_file() {
                total = total.saturating_add(item.metadata()?.len());
            } else if kind.is_symlink() {
                // A broken link counts nothing; a link to a folder is not followed.
                if let Ok(meta) = std::fs::metadata(item.path())
                    && meta.is_file()
                {
                    total = total.saturating_add(meta.len());
                }
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;

    fn cpu(capacity: u64) -> Budget {
        Budget::new(DeviceId::Cpu, capacity, 0)
    }

    fn gpu(id: u32, capacity: u64) -> Budget {
        Budget::new(DeviceId::Gpu(id), capacity, 0)
    }

    /// Admits and charges `model` at `bytes` on whatever device the rules choose.
    fn load(a: &mut Allocator, req: LoadRequest) -> Admission {
        let model = req.model.clone();
        let bytes = req.estimated_bytes;
        let admission = a.admit(&req).expect("admit");
        assert_eq!(
            a.charge(&model, bytes).expect("charge"),
            Vec::<String>::new()
        );
        admission
    }

    fn device_usage(a: &Allocator, device: DeviceId) -> DeviceUsage {
        a.snapshot()
            .into_iter()
            .find(|u| u.device == device)
            .expect("device")
    }

    #[test]
    fn device_ids_display_as_cpu_and_gpu_n() {
        assert_eq!(DeviceId::Cpu.to_string(), "cpu");
        assert_eq!(DeviceId::Gpu(0).to_string(), "gpu0");
        assert_eq!(DeviceId::Gpu(12).to_string(), "gpu12");
    }

    #[test]
    fn format_bytes_uses_binary_units_and_three_digits() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.00 KiB");
        assert_eq!(format_bytes(512 * MIB), "512 MiB");
        assert_eq!(format_bytes(700 * MIB), "700 MiB");
        assert_eq!(format_bytes(2 * GIB), "2.00 GiB");
        assert_eq!(format_bytes(3 * GIB / 2), "1.50 GiB");
        assert_eq!(format_bytes(12 * GIB + GIB / 2), "12.5 GiB");
        assert_eq!(format_bytes(10 * GIB - 1), "10.0 GiB");
        assert_eq!(format_bytes(80 * GIB), "80.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn budget_is_capacity_minus_reserve_and_never_negative() {
        assert_eq!(Budget::new(DeviceId::Cpu, 10, 3).budget_bytes(), 7);
        assert_eq!(Budget::new(DeviceId::Cpu, 3, 10).budget_bytes(), 0);
        let mut a = Allocator::new([Budget::new(DeviceId::Cpu, 100, 30)]);
        assert!(a.admit(&LoadRequest::new("a", 70)).is_ok());
        assert!(matches!(
            a.admit(&LoadRequest::new("b", 1)),
            Err(Error::NoRoom { .. })
        ));
    }

    #[test]
    fn memory_others_hold_on_a_gpu_shrinks_its_budget_but_ours_is_not_counted_twice() {
        let mut a = Allocator::new([cpu(GIB), gpu(0, 80 * GIB)]);
        load(
            &mut a,
            LoadRequest::new("ours", 10 * GIB)
                .with_placement(Placement::gpu_only())
                .with_pinned(true),
        );
        // The device reports 30 GiB used: our 10 and 20 held by another process.
        assert!(a.follow_device(DeviceId::Gpu(0), 80 * GIB, 30 * GIB));
        let u = device_usage(&a, DeviceId::Gpu(0));
        assert_eq!((u.capacity_bytes, u.free_bytes), (60 * GIB, 50 * GIB));
        let too_big = LoadRequest::new("big", 55 * GIB).with_placement(Placement::gpu_only());
        assert!(matches!(a.admit(&too_big), Err(Error::NoRoom { .. })));
        // The other process exits: the room comes back.
        assert!(a.follow_device(DeviceId::Gpu(0), 80 * GIB, 10 * GIB));
        assert_eq!(device_usage(&a, DeviceId::Gpu(0)).free_bytes, 70 * GIB);
        assert_eq!(a.admit(&too_big).unwrap().evict, Vec::<String>::new());
        // Our models using less than they are charged frees nothing beyond the total.
        assert!(a.follow_device(DeviceId::Gpu(0), 80 * GIB, 0));
        assert_eq!(device_usage(&a, DeviceId::Gpu(0)).capacity_bytes, 80 * GIB);
        assert!(!a.follow_device(DeviceId::Gpu(3), 80 * GIB, 0));
    }

    #[test]
    fn admit_reserves_the_estimate_and_charge_replaces_it() {
        let mut a = Allocator::new([cpu(100)]);
        let adm = a.admit(&LoadRequest::new("m", 40)).unwrap();
        assert_eq!(
            adm,
            Admission {
                device: DeviceId::Cpu,
                evict: vec![]
            }
        );
        let u = device_usage(&a, DeviceId::Cpu);
        assert_eq!(
            (
                u.reserved_bytes,
                u.charged_bytes,
                u.held_bytes,
                u.free_bytes
            ),
            (40, 0, 40, 60)
        );
        assert_eq!(u.holders[0].state, HolderState::Loading);
        assert_eq!(a.charge("m", 55).unwrap(), Vec::<String>::new());
        let u = device_usage(&a, DeviceId::Cpu);
        assert_eq!(
            (
                u.reserved_bytes,
                u.charged_bytes,
                u.held_bytes,
                u.free_bytes
            ),
            (0, 55, 55, 45)
        );
        assert_eq!(u.holders[0].state, HolderState::Ready);
        // A new measurement of a ready model replaces the charge too.
        assert_eq!(a.charge("m", 10).unwrap(), Vec::<String>::new());
        assert_eq!(device_usage(&a, DeviceId::Cpu).charged_bytes, 10);
        assert!(a.release("m"));
        assert!(!a.release("m"));
        assert_eq!(device_usage(&a, DeviceId::Cpu).held_bytes, 0);
    }

    #[test]
    fn placement_picks_the_gpu_with_most_free_budget() {
        let mut a = Allocator::new([cpu(1000), gpu(0, 100), gpu(1, 200), gpu(2, 200)]);
        // gpu1 and gpu2 tie: the lower id wins.
        assert_eq!(
            load(&mut a, LoadRequest::new("a", 50)).device,
            DeviceId::Gpu(1)
        );
        assert_eq!(
            load(&mut a, LoadRequest::new("b", 50)).device,
            DeviceId::Gpu(2)
        );
        assert_eq!(
            load(&mut a, LoadRequest::new("c", 50)).device,
            DeviceId::Gpu(1)
        );
        // Only gpu0 (100 free) and gpu2 (150 free) are left with room for 120 → gpu2.
        assert_eq!(
            load(&mut a, LoadRequest::new("d", 120)).device,
            DeviceId::Gpu(2)
        );
        // No GPU fits 500: the CPU takes it.
        assert_eq!(
            load(&mut a, LoadRequest::new("e", 500)).device,
            DeviceId::Cpu
        );
    }

    #[test]
    fn placement_follows_the_constraints_and_the_hint() {
        let mut a = Allocator::new([cpu(1000), gpu(0, 500), gpu(1, 100)]);
        let cpu_only = LoadRequest::new("c", 10).with_placement(Placement::cpu_only());
        assert_eq!(load(&mut a, cpu_only).device, DeviceId::Cpu);
        let prefer_cpu = Placement {
            prefer: Prefer::Cpu,
            ..Placement::default()
        };
        let req = LoadRequest::new("p", 10).with_placement(prefer_cpu);
        assert_eq!(load(&mut a, req).device, DeviceId::Cpu);
        let only_gpu1 = Placement {
            gpu_ids: Some(vec![1]),
            ..Placement::default()
        };
        let req = LoadRequest::new("g", 10).with_placement(only_gpu1.clone());
        assert_eq!(load(&mut a, req).device, DeviceId::Gpu(1));
        // gpu1 is full for 200: the model falls back to the CPU, never to gpu0.
        let req = LoadRequest::new("h", 200).with_placement(only_gpu1);
        assert_eq!(load(&mut a, req).device, DeviceId::Cpu);
        // GPU only, no GPU fits: refused although the CPU has room.
        let req = LoadRequest::new("x", 900).with_placement(Placement::gpu_only());
        let err = a.admit(&req).unwrap_err();
        let Error::NoRoom { devices, .. } = &err else {
            panic!("{err:?}")
        };
        let named: Vec<DeviceId> = devices.iter().map(|d| d.device).collect();
        assert_eq!(named, vec![DeviceId::Gpu(0), DeviceId::Gpu(1)]);
    }

    #[test]
    fn placement_that_allows_no_present_device_is_refused_by_name() {
        let mut a = Allocator::new([cpu(100), gpu(0, 100), gpu(1, 0)]);
        let only_gpu1 = Placement {
            allow_cpu: false,
            gpu_ids: Some(vec![3, 1]),
            ..Placement::default()
        };
        let err = a
            .admit(&LoadRequest::new("m", 1).with_placement(only_gpu1))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "model 'm' cannot be placed: it allows gpu1, gpu3 but this machine has cpu, gpu0"
        );
        let nothing = Placement {
            allow_cpu: false,
            allow_gpu: false,
            ..Placement::default()
        };
        let err = a
            .admit(&LoadRequest::new("m", 1).with_placement(nothing))
            .unwrap_err();
        assert!(err.to_string().contains("it allows nothing"), "{err}");
        assert!(a.snapshot().iter().all(|u| u.holders.is_empty()));
    }

    #[test]
    fn a_lost_device_gets_no_new_models() {
        let mut a = Allocator::new([cpu(100), gpu(0, 100)]);
        assert!(a.set_capacity(DeviceId::Gpu(0), 0));
        assert_eq!(
            a.admit(&LoadRequest::new("z", 0)).unwrap().device,
            DeviceId::Cpu
        );
        assert!(!a.set_capacity(DeviceId::Gpu(7), 10), "unknown device");
        a.set_budget(gpu(7, 50));
        assert_eq!(
            a.admit(&LoadRequest::new("y", 10)).unwrap().device,
            DeviceId::Gpu(7)
        );
    }

    #[test]
    fn placement_prefers_no_eviction_even_on_a_less_preferred_device() {
        let mut a = Allocator::new([cpu(100), gpu(0, 100)]);
        load(&mut a, LoadRequest::new("old", 80));
        // gpu0 would need to evict "old"; the CPU fits without eviction.
        let adm = a.admit(&LoadRequest::new("new", 50)).unwrap();
        assert_eq!(
            adm,
            Admission {
                device: DeviceId::Cpu,
                evict: vec![]
            }
        );
    }

    #[test]
    fn placement_with_eviction_picks_the_device_that_evicts_least() {
        let mut a = Allocator::new([cpu(100), gpu(0, 100), gpu(1, 100)]);
        let gpu0 = Placement {
            gpu_ids: Some(vec![0]),
            allow_cpu: false,
            ..Placement::default()
        };
        let gpu1 = Placement {
            gpu_ids: Some(vec![1]),
            allow_cpu: false,
            ..Placement::default()
        };
        load(&mut a, LoadRequest::new("a", 60).with_placement(gpu0));
        load(&mut a, LoadRequest::new("b", 90).with_placement(gpu1));
        load(
            &mut a,
            LoadRequest::new("c", 95).with_placement(Placement::cpu_only()),
        );
        // Needs 50: gpu0 must evict a (60), gpu1 b (90), cpu c (95) → gpu0.
        let adm = a.admit(&LoadRequest::new("n", 50)).unwrap();
        assert_eq!(
            adm,
            Admission {
                device: DeviceId::Gpu(0),
                evict: vec!["a".to_string()]
            }
        );
    }

    #[test]
    fn eviction_takes_least_recently_used_first_and_only_as_many_as_needed() {
        let mut a = Allocator::new([cpu(100)]);
        for name in ["a", "b", "c", "d"] {
            load(&mut a, LoadRequest::new(name, 25));
        }
        // Use a and c: the LRU order is now b, d, a, c.
        assert!(a.acquire("a"));
        a.finish("a");
        assert!(a.acquire("c"));
        a.finish("c");
        let adm = a.admit(&LoadRequest::new("n", 40)).unwrap();
        assert_eq!(adm.evict, vec!["b".to_string(), "d".to_string()]);
        let u = device_usage(&a, DeviceId::Cpu);
        assert_eq!((u.held_bytes, u.evicting_bytes), (90, 50));
    }

    #[test]
    fn pinned_busy_and_loading_models_are_never_evicted() {
        let mut a = Allocator::new([cpu(100)]);
        load(&mut a, LoadRequest::new("pinned", 20).with_pinned(true));
        load(&mut a, LoadRequest::new("busy", 20));
        a.admit(&LoadRequest::new("loading", 20)).unwrap();
        load(&mut a, LoadRequest::new("idle", 20));
        assert!(a.acquire("busy"));
        // 20 free + idle's 20 = 40: a 40-byte load evicts only idle.
        let adm = a.admit(&LoadRequest::new("n", 40)).unwrap();
        assert_eq!(adm.evict, vec!["idle".to_string()]);
        // Nothing else may go: a further load fails and changes nothing.
        let before = a.snapshot();
        assert!(matches!(
            a.admit(&LoadRequest::new("m", 1)),
            Err(Error::NoRoom { .. })
        ));
        assert_eq!(a.snapshot(), before);
        // Unpinned and idle, "pinned" becomes a victim.
        assert!(a.set_pinned("pinned", false));
        assert_eq!(
            a.admit(&LoadRequest::new("m", 1)).unwrap().evict,
            vec!["pinned".to_string()]
        );
    }

    #[test]
    fn eviction_is_all_or_nothing() {
        let mut a = Allocator::new([cpu(100)]);
        load(&mut a, LoadRequest::new("idle", 30));
        load(&mut a, LoadRequest::new("pinned", 60).with_pinned(true));
        let before = a.snapshot();
        // Evicting idle frees 30 of the 50 needed: nothing is evicted.
        assert!(a.admit(&LoadRequest::new("n", 50)).is_err());
        assert_eq!(a.snapshot(), before);
        assert!(a.acquire("idle"));
    }

    #[test]
    fn victims_are_refused_at_once_and_released_by_the_caller() {
        let mut a = Allocator::new([cpu(100)]);
        load(&mut a, LoadRequest::new("old", 80));
        let adm = a.admit(&LoadRequest::new("new", 50)).unwrap();
        assert_eq!(adm.evict, vec!["old".to_string()]);
        assert!(!a.acquire("old"));
        assert!(!a.set_pinned("old", true));
        assert_eq!(a.holder("old").unwrap().1.state, HolderState::Evicting);
        assert_eq!(a.charge("old", 1), Err(Error::Evicting("old".to_string())));
        assert!(matches!(
            a.admit(&LoadRequest::new("old", 1)),
            Err(Error::AlreadyHeld {
                state: HolderState::Evicting,
                ..
            })
        ));
        assert!(a.release("old"));
        assert_eq!(device_usage(&a, DeviceId::Cpu).evicting_bytes, 0);
        assert!(a.admit(&LoadRequest::new("old", 1)).is_ok());
    }

    #[test]
    fn acquire_refuses_unknown_and_loading_models_and_finish_never_underflows() {
        let mut a = Allocator::new([cpu(100)]);
        assert!(!a.acquire("nope"));
        a.finish("nope");
        a.admit(&LoadRequest::new("m", 10)).unwrap();
        assert!(!a.acquire("m"));
        a.charge("m", 10).unwrap();
        assert!(a.acquire("m"));
        assert!(a.acquire("m"));
        assert_eq!(a.holder("m").unwrap().1.in_flight, 2);
        a.finish("m");
        a.finish("m");
        a.finish("m");
        assert_eq!(a.holder("m").unwrap().1.in_flight, 0);
        assert!(!a.set_pinned("nope", true));
        assert_eq!(a.charge("nope", 1), Err(Error::NotHeld("nope".to_string())));
    }

    #[test]
    fn no_room_message_names_the_budget_and_what_holds_it() {
        let mut a = Allocator::new([Budget::new(DeviceId::Cpu, 2 * GIB, 512 * MIB)]);
        load(&mut a, LoadRequest::new("a", 700 * MIB).with_pinned(true));
        load(&mut a, LoadRequest::new("b", 500 * MIB));
        for _ in 0..3 {
            assert!(a.acquire("b"));
        }
        let err = a.admit(&LoadRequest::new("big", 2 * GIB)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model 'big' needs 2.00 GiB but no device can hold it: cpu budget 1.50 GiB \
             (capacity 2.00 GiB \u{2212} reserve 512 MiB), 1.17 GiB held by a (700 MiB, pinned), \
             b (500 MiB, 3 requests in flight)"
        );
    }

    #[test]
    fn no_room_message_covers_every_device_and_every_reason() {
        let mut a = Allocator::new([cpu(0), gpu(0, 100), gpu(1, 100)]);
        let on = |id| Placement {
            gpu_ids: Some(vec![id]),
            ..Placement::default()
        };
        load(&mut a, LoadRequest::new("p", 50).with_placement(on(0)));
        a.admit(&LoadRequest::new("l", 30).with_placement(on(0)))
            .unwrap();
        load(&mut a, LoadRequest::new("r", 60).with_placement(on(1)));
        assert!(a.acquire("r"));
        load(&mut a, LoadRequest::new("i", 10).with_placement(on(1)));
        let err = a
            .admit(&LoadRequest::new("n", 90).with_keep("p"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "model 'n' needs 90 B but no device can hold it: \
             gpu0 budget 100 B (capacity 100 B \u{2212} reserve 0 B), 80 B held by \
             p (50 B, kept by this load), l (30 B, loading); \
             gpu1 budget 100 B (capacity 100 B \u{2212} reserve 0 B), 70 B held by \
             r (60 B, 1 request in flight), i (10 B, evictable)"
        );
    }

    #[test]
    fn no_room_message_sums_up_long_holder_lists() {
        let mut a = Allocator::new([cpu(100)]);
        for i in 0..10 {
            load(
                &mut a,
                LoadRequest::new(format!("m{i}"), 10 - i).with_pinned(true),
            );
        }
        let err = a.admit(&LoadRequest::new("n", 50)).unwrap_err().to_string();
        assert!(err.ends_with("m7 (3 B, pinned) and 2 more (3 B)"), "{err}");
    }

    #[test]
    fn charge_that_grows_evicts_on_its_device_or_reports() {
        let mut a = Allocator::new([cpu(100), gpu(0, 100)]);
        load(
            &mut a,
            LoadRequest::new("g", 50).with_placement(Placement::gpu_only()),
        );
        load(
            &mut a,
            LoadRequest::new("x", 30).with_placement(Placement::cpu_only()),
        );
        load(
            &mut a,
            LoadRequest::new("y", 30).with_placement(Placement::cpu_only()),
        );
        a.admit(&LoadRequest::new("m", 30).with_placement(Placement::cpu_only()))
            .unwrap();
        // 70 bytes measured: needs 30 more on the CPU → x (the LRU) goes; never g on gpu0.
        assert_eq!(a.charge("m", 70).unwrap(), vec!["x".to_string()]);
        assert_eq!(device_usage(&a, DeviceId::Cpu).held_bytes, 100);

        // A growth nothing can make room for is reported; the reservation stays.
        a.set_pinned("y", true);
        a.release("m");
        a.admit(&LoadRequest::new("m", 30).with_placement(Placement::cpu_only()))
            .unwrap();
        let before = a.snapshot();
        let err = a.charge("m", 80).unwrap_err();
        assert_eq!(a.snapshot(), before);
        assert_eq!(
            err.to_string(),
            "model 'm' takes 80 B once loaded (estimated 30 B) but cpu cannot hold it: \
             cpu budget 100 B (capacity 100 B \u{2212} reserve 0 B), 30 B held by y (30 B, pinned)"
        );
        assert_eq!(a.holder("m").unwrap().1.state, HolderState::Loading);
    }

    #[test]
    fn reload_under_a_distinct_key_keeps_the_serving_version() {
        let mut a = Allocator::new([cpu(100)]);
        load(&mut a, LoadRequest::new("m#1", 60));
        load(&mut a, LoadRequest::new("other", 20));
        assert!(matches!(
            a.admit(&LoadRequest::new("m#1", 60)),
            Err(Error::AlreadyHeld {
                device: DeviceId::Cpu,
                state: HolderState::Ready,
                ..
            })
        ));
        // m#1 is the LRU, but the reload keeps it: "other" goes instead.
        let adm = a
            .admit(&LoadRequest::new("m#2", 30).with_keep("m#1"))
            .unwrap();
        assert_eq!(adm.evict, vec!["other".to_string()]);
        // The kept version is protected for the charge too.
        assert!(a.charge("m#2", 50).is_err());
        assert_eq!(a.charge("m#2", 40).unwrap(), Vec::<String>::new());
        assert!(a.release("m#1"));
        assert_eq!(device_usage(&a, DeviceId::Cpu).held_bytes, 40);
    }

    #[test]
    fn shrinking_a_device_never_evicts_and_is_reported() {
        let mut a = Allocator::new([cpu(100)]);
        load(&mut a, LoadRequest::new("a", 40));
        load(&mut a, LoadRequest::new("b", 40));
        assert!(a.set_capacity(DeviceId::Cpu, 50));
        let u = device_usage(&a, DeviceId::Cpu);
        assert_eq!(
            (u.held_bytes, u.free_bytes, u.over_committed_bytes),
            (80, 0, 30)
        );
        assert!(u.holders.iter().all(|h| h.state == HolderState::Ready));
        // A charge that does not grow still succeeds on an over-committed device.
        assert_eq!(a.charge("b", 35).unwrap(), Vec::<String>::new());
        // A new load must bring the device back within its budget: 75 + 10 − 50 = 35 more, so
        // a (40, used before b's new charge) goes.
        let adm = a.admit(&LoadRequest::new("n", 10)).unwrap();
        assert_eq!(adm.evict, vec!["a".to_string()]);
        assert_eq!(device_usage(&a, DeviceId::Cpu).over_committed_bytes, 0);
        // The error on an over-committed device says so.
        a.set_capacity(DeviceId::Cpu, 5);
        let err = a.admit(&LoadRequest::new("z", 1)).unwrap_err().to_string();
        assert!(
            err.contains(
                "45 B held (over budget by 40 B) by b (35 B, evictable), n (10 B, loading)"
            ),
            "{err}"
        );
    }

    fn job(key: &str, devices: u32, size: ExternalSize) -> ExternalRequest {
        ExternalRequest {
            key: key.to_string(),
            devices,
            size,
            placement: Placement::gpu_only(),
        }
    }

    #[test]
    fn an_external_holder_counts_against_the_budget_and_is_listed_apart_from_models() {
        let mut a = Allocator::new([cpu(1000), gpu(0, 100), gpu(1, 200)]);
        // Most free first: gpu1.
        let adm = a
            .reserve_external(&job("job:1", 1, ExternalSize::Bytes(50)))
            .unwrap();
        assert_eq!(adm.devices, vec![DeviceId::Gpu(1)]);
        assert!(adm.evict.is_empty());
        assert_eq!(a.external("job:1"), Some(&[(DeviceId::Gpu(1), 50)][..]));
        let u = device_usage(&a, DeviceId::Gpu(1));
        assert_eq!(
            (u.external_bytes, u.held_bytes, u.free_bytes),
            (50, 50, 150)
        );
        assert!(u.holders.is_empty(), "a job is not a model: {u:?}");
        assert_eq!(
            u.externals,
            vec![ExternalUsage {
                key: "job:1".into(),
                bytes: 50
            }]
        );
        // A model that would have fitted on gpu1 alone no longer does; the error names the job.
        let req = LoadRequest::new("m", 160).with_placement(Placement::gpu_only());
        let err = a.admit(&req).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("gpu1 budget 200 B")
                && msg.contains("job:1 (50 B, not a model, never evicted)"),
            "{msg}"
        );
        // Released, its bytes are free again.
        assert!(a.release("job:1"));
        assert!(!a.release("job:1"));
        assert_eq!(a.external("job:1"), None);
        assert_eq!(load(&mut a, req).device, DeviceId::Gpu(1));
    }

    #[test]
    fn an_external_holder_evicts_idle_models_like_a_load_and_is_never_evicted() {
        let mut a = Allocator::new([gpu(0, 100)]);
        let gpu_only =
            |m: &str, b: u64| LoadRequest::new(m, b).with_placement(Placement::gpu_only());
        load(&mut a, gpu_only("idle", 40));
        load(&mut a, gpu_only("pinned", 40).with_pinned(true));
        let adm = a
            .reserve_external(&job("job:7", 1, ExternalSize::Bytes(50)))
            .unwrap();
        assert_eq!(adm.devices, vec![DeviceId::Gpu(0)]);
        assert_eq!(adm.evict, vec!["idle".to_string()]);
        assert!(!a.acquire("idle"), "a victim is refused at once");
        assert!(a.release("idle"));
        // The job is not evictable: a model that needs its room is refused, naming it.
        let err = a.admit(&gpu_only("late", 30)).unwrap_err();
        let Error::NoRoom { devices, .. } = &err else {
            panic!("{err:?}")
        };
        let holder = devices[0]
            .holders
            .iter()
            .find(|h| h.model == "job:7")
            .expect("the job is named");
        assert!(holder.external && !holder.evictable(), "{holder:?}");
        // Nor is it acquired, charged or pinned as a model.
        assert!(!a.acquire("job:7"));
        assert_eq!(a.charge("job:7", 1), Err(Error::NotHeld("job:7".into())));
        assert!(!a.set_pinned("job:7", true));
        // Keys are one namespace: a job cannot take a model's key nor a model a job's.
        assert!(matches!(
            a.reserve_external(&job("pinned", 1, ExternalSize::Bytes(1))),
            Err(Error::AlreadyHeld { .. })
        ));
        assert_eq!(
            a.reserve_external(&job("job:7", 1, ExternalSize::Bytes(1))),
            Err(Error::AlreadyReserved("job:7".into()))
        );
        assert_eq!(
            a.admit(&LoadRequest::new("job:7", 1)),
            Err(Error::AlreadyReserved("job:7".into()))
        );
    }

    #[test]
    fn a_holder_on_several_devices_is_placed_on_distinct_ones_all_or_nothing() {
        let mut a = Allocator::new([cpu(1000), gpu(0, 100), gpu(1, 60), gpu(2, 40)]);
        let only_gpu2 = Placement {
            allow_cpu: false,
            gpu_ids: Some(vec![2]),
            ..Placement::default()
        };
        load(
            &mut a,
            LoadRequest::new("small", 40).with_placement(only_gpu2),
        );
        assert_eq!(a.external("x"), None);
        // gpu0 (100 free), then gpu1 (60): most free first, distinct devices.
        let adm = a
            .reserve_external(&job("job:1", 2, ExternalSize::Bytes(50)))
            .unwrap();
        assert_eq!(adm.devices, vec![DeviceId::Gpu(0), DeviceId::Gpu(1)]);
        let held =
            |a: &Allocator| -> Vec<u64> { a.snapshot().iter().map(|u| u.held_bytes).collect() };
        assert_eq!(held(&a), vec![0, 50, 50, 40]);
        // Two more devices with 40 each: gpu0 has 50 free; gpu2 could evict "small"; gpu1 has
        // 10. Only two of three: refused, and nothing is evicted.
        let before = a.snapshot();
        let err = a
            .reserve_external(&job("job:2", 3, ExternalSize::Bytes(40)))
            .unwrap_err();
        assert_eq!(a.snapshot(), before);
        assert!(a.acquire("small"), "not evicted by a refused reservation");
        a.finish("small");
        let Error::NoRoomExternal {
            wanted,
            found,
            devices,
            ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!((*wanted, *found), (3, 2));
        let named: Vec<DeviceId> = devices.iter().map(|d| d.device).collect();
        assert_eq!(
            named,
            vec![DeviceId::Gpu(0), DeviceId::Gpu(1), DeviceId::Gpu(2)]
        );
        assert!(
            err.to_string().starts_with(
                "'job:2' needs 40 B on each of 3 device(s) but 2 can hold it now: gpu0 budget"
            ),
            "{err}"
        );
        // Two devices fit: gpu0 without eviction, then gpu2 by evicting "small".
        let adm = a
            .reserve_external(&job("job:2", 2, ExternalSize::Bytes(40)))
            .unwrap();
        assert_eq!(adm.devices, vec![DeviceId::Gpu(0), DeviceId::Gpu(2)]);
        assert_eq!(adm.evict, vec!["small".to_string()]);
        // Asking for none holds nothing.
        let adm = a
            .reserve_external(&job("job:3", 0, ExternalSize::Bytes(40)))
            .unwrap();
        assert!(adm.devices.is_empty() && a.external("job:3").is_none());
    }

    #[test]
    fn a_whole_device_holder_takes_its_budget_and_leaves_no_room() {
        let mut a = Allocator::new([cpu(1000), gpu(0, 100), gpu(1, 80)]);
        let gpu_only =
            |m: &str, b: u64| LoadRequest::new(m, b).with_placement(Placement::gpu_only());
        load(&mut a, gpu_only("m", 10));
        // gpu1 is empty (80 free) where gpu0 has 90 free but holds a model: only gpu1 takes a
        // whole device without eviction.
        let adm = a
            .reserve_external(&job("job:1", 1, ExternalSize::WholeDevice))
            .unwrap();
        assert_eq!((adm.devices, adm.evict), (vec![DeviceId::Gpu(1)], vec![]));
        assert_eq!(device_usage(&a, DeviceId::Gpu(1)).free_bytes, 0);
        let only_gpu1 = Placement {
            allow_cpu: false,
            gpu_ids: Some(vec![1]),
            ..Placement::default()
        };
        let err = a
            .admit(&LoadRequest::new("n", 1).with_placement(only_gpu1))
            .unwrap_err();
        assert!(err.to_string().contains("job:1 (80 B"), "{err}");
        let adm = a
            .reserve_external(&job("job:2", 1, ExternalSize::WholeDevice))
            .unwrap();
        assert_eq!(
            (adm.devices, adm.evict),
            (vec![DeviceId::Gpu(0)], vec!["m".to_string()])
        );
        let err = a
            .reserve_external(&job("job:3", 1, ExternalSize::WholeDevice))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("needs a whole device on each of 1 device(s) but 0"),
            "{err}"
        );
    }

    #[test]
    fn what_a_device_reports_used_counts_external_holders_as_ours() {
        let mut a = Allocator::new([gpu(0, 80 * GIB)]);
        a.reserve_external(&job("job:1", 1, ExternalSize::Bytes(10 * GIB)))
            .unwrap();
        // The job's process uses its 10 GiB and another process 20: only those 20 shrink it.
        assert!(a.follow_device(DeviceId::Gpu(0), 80 * GIB, 30 * GIB));
        let u = device_usage(&a, DeviceId::Gpu(0));
        assert_eq!((u.capacity_bytes, u.free_bytes), (60 * GIB, 50 * GIB));
    }

    #[test]
    fn estimate_sums_files_recursively_times_the_factor() {
        let dir = std::env::temp_dir().join(format!("veraltheim-alloc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        std::fs::write(dir.join("model.onnx"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("sub/a.bin"), vec![0u8; 200]).unwrap();
        std::fs::write(dir.join("sub/deeper/b.bin"), vec![0u8; 50]).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.join("model.onnx"), dir.join("link.onnx")).unwrap();
            std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).unwrap();
            std::os::unix::fs::symlink(dir.join("missing"), dir.join("broken")).unwrap();
        }
        let files = if cfg!(unix) { 2250 } else { 1250 };
        assert_eq!(estimate_bytes(&dir, 1.0).unwrap(), files);
        assert_eq!(estimate_bytes(&dir, 1.5).unwrap(), files * 3 / 2);
        assert_eq!(estimate_bytes(&dir, 0.0).unwrap(), 0);
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let err = estimate_bytes(&dir, bad).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        }
        assert!(estimate_bytes(&dir.join("missing"), 1.0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    mod model_based {
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        const NAMES: [&str; 10] = ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "m9"];
        const DEVICES: [DeviceId; 3] = [DeviceId::Cpu, DeviceId::Gpu(0), DeviceId::Gpu(1)];
        const JOBS: [&str; 3] = ["job:0", "job:1", "job:2"];

        #[derive(Clone, Debug)]
        enum Op {
            Admit {
                model: usize,
                bytes: u64,
                placement: Placement,
                pinned: bool,
                keep: Option<usize>,
            },
            Charge {
                model: usize,
                bytes: u64,
            },
            Release {
                model: usize,
            },
            Acquire {
                model: usize,
            },
            Finish {
                model: usize,
            },
            SetPinned {
                model: usize,
                pinned: bool,
            },
            SetCapacity {
                device: usize,
                capacity: u64,
            },
            /// An external holder: `size` bytes on each of `devices` devices (`None`: whole).
            Reserve {
                job: usize,
                devices: u32,
                size: Option<u64>,
                placement: Placement,
            },
            ReleaseJob {
                job: usize,
            },
        }

        fn placement() -> impl Strategy<Value = Placement> {
            let prefer = prop_oneof![Just(Prefer::Gpu), Just(Prefer::Cpu)];
            let ids = prop_oneof![
                6 => Just(None),
                1 => Just(Some(vec![])),
                1 => Just(Some(vec![0])),
                1 => Just(Some(vec![1])),
                1 => Just(Some(vec![1, 5])),
            ];
            let allow = || prop::bool::weighted(0.8);
            (allow(), allow(), ids, prefer).prop_map(|(allow_cpu, allow_gpu, gpu_ids, prefer)| {
                Placement {
                    allow_cpu,
                    allow_gpu,
                    gpu_ids,
                    prefer,
                }
            })
        }

        fn size() -> impl Strategy<Value = u64> {
            prop_oneof![1 => Just(0u64), 9 => 1..100u64]
        }

        fn admit() -> impl Strategy<Value = Op> {
            (
                0..NAMES.len(),
                size(),
                placement(),
                prop::bool::weighted(0.2),
                prop::option::of(0..NAMES.len()),
            )
                .prop_map(|(model, bytes, placement, pinned, keep)| Op::Admit {
                    model,
                    bytes,
                    placement,
                    pinned,
                    keep,
                })
        }

        /// One operation, or a whole load (admit, then charge what was estimated) so that many
        /// models are ready and idle, the ones eviction works on.
        fn ops() -> impl Strategy<Value = Vec<Op>> {
            let model = 0..NAMES.len();
            prop_oneof![
                3 => admit().prop_map(|admit| match &admit {
                    Op::Admit { model, bytes, .. } => {
                        let charge = Op::Charge { model: *model, bytes: *bytes };
                        vec![admit, charge]
                    }
                    _ => vec![admit],
                }),
                3 => admit().prop_map(|admit| vec![admit]),
                3 => (model.clone(), 0..130u64).prop_map(|(model, bytes)| vec![Op::Charge { model, bytes }]),
                2 => model.clone().prop_map(|model| vec![Op::Release { model }]),
                2 => model.clone().prop_map(|model| vec![Op::Acquire { model }]),
                3 => model.clone().prop_map(|model| vec![Op::Finish { model }]),
                1 => (model, any::<bool>()).prop_map(|(model, pinned)| vec![Op::SetPinned { model, pinned }]),
                1 => (0..3usize, 0..300u64)
                    .prop_map(|(device, capacity)| vec![Op::SetCapacity { device, capacity }]),
                2 => (0..JOBS.len(), 0..4u32, prop_oneof![1 => Just(None), 4 => size().prop_map(Some)], placement())
                    .prop_map(|(job, devices, size, placement)| vec![Op::Reserve { job, devices, size, placement }]),
                1 => (0..JOBS.len()).prop_map(|job| vec![Op::ReleaseJob { job }]),
            ]
        }

        #[derive(Clone, Debug)]
        struct Held {
            device: DeviceId,
            bytes: u64,
            state: HolderState,
            pinned: bool,
            in_flight: u32,
            last: u64,
            keep: Vec<String>,
        }

        /// The reference: plain bookkeeping that the allocator's decisions are checked against.
        struct Reference {
            budgets: BTreeMap<DeviceId, Budget>,
            models: BTreeMap<String, Held>,
            /// External holders: the bytes each holds on each of its devices.
            jobs: BTreeMap<String, Vec<(DeviceId, u64)>>,
            clock: u64,
        }

        impl Reference {
            fn tick(&mut self) -> u64 {
                self.clock += 1;
                self.clock
            }

            fn budget(&self, d: DeviceId) -> u64 {
                self.budgets[&d].budget_bytes()
            }

            fn held(&self, d: DeviceId, except: Option<&str>) -> u64 {
                self.models
                    .iter()
                    .filter(|(m, h)| {
                        h.device == d
                            && h.state != HolderState::Evicting
                            && Some(m.as_str()) != except
                    })
                    .map(|(_, h)| h.bytes)
                    .sum::<u64>()
                    + self.jobs_on(d).map(|(_, b)| b).sum::<u64>()
            }

            fn jobs_on(&self, d: DeviceId) -> impl Iterator<Item = (&String, u64)> {
                self.jobs.iter().flat_map(move |(k, held)| {
                    held.iter()
                        .filter(move |(dd, _)| *dd == d)
                        .map(move |(_, b)| (k, *b))
                })
            }

            fn fits(&self, d: DeviceId, need: u64, except: Option<&str>) -> bool {
                need == 0 || self.held(d, except) + need <= self.budget(d)
            }

            /// Eligible victims on `d`, oldest first.
            fn eligible(
                &self,
                d: DeviceId,
                except: Option<&str>,
                keep: &[String],
            ) -> Vec<(String, u64)> {
                let mut v: Vec<(u64, String, u64)> = self
                    .models
                    .iter()
                    .filter(|(m, h)| {
                        h.device == d
                            && h.state == HolderState::Ready
                            && !h.pinned
                            && h.in_flight == 0
                            && Some(m.as_str()) != except
                            && !keep.contains(m)
                    })
                    .map(|(m, h)| (h.last, m.clone(), h.bytes))
                    .collect();
                v.sort();
                v.into_iter().map(|(_, m, b)| (m, b)).collect()
            }

            /// Candidates in preference order (GPUs by most free, then lower id).
            fn candidates(&self, p: &Placement) -> Vec<DeviceId> {
                let mut gpus: Vec<DeviceId> = self
                    .budgets
                    .values()
                    .filter(|b| b.capacity_bytes > 0 && matches!(b.device, DeviceId::Gpu(_)))
                    .map(|b| b.device)
                    .filter(|&d| match d {
                        DeviceId::Gpu(id) => {
                            p.allow_gpu && p.gpu_ids.as_ref().is_none_or(|ids| ids.contains(&id))
                        }
                        DeviceId::Cpu => false,
                    })
                    .collect();
                gpus.sort_by_key(|&d| {
                    (
                        std::cmp::Reverse(self.budget(d).saturating_sub(self.held(d, None))),
                        d,
                    )
                });
                let cpu: Vec<DeviceId> = self
                    .budgets
                    .get(&DeviceId::Cpu)
                    .filter(|b| b.capacity_bytes > 0 && p.allow_cpu)
                    .map(|b| b.device)
                    .into_iter()
                    .collect();
                match p.prefer {
                    Prefer::Gpu => gpus.into_iter().chain(cpu).collect(),
                    Prefer::Cpu => cpu.into_iter().chain(gpus).collect(),
                }
            }

            /// Checks an eviction list for `need` bytes on `d` and returns its byte total.
            fn check_victims(
                &self,
                d: DeviceId,
                need: u64,
                except: Option<&str>,
                keep: &[String],
                victims: &[String],
            ) -> Result<u64, TestCaseError> {
                let eligible = self.eligible(d, except, keep);
                for v in victims {
                    let h = &self.models[v];
                    prop_assert!(!h.pinned, "pinned {v} evicted");
                    prop_assert_eq!(h.in_flight, 0, "busy {} evicted", v);
                    prop_assert_eq!(
                        h.state,
                        HolderState::Ready,
                        "{} evicted while {}",
                        v,
                        h.state
                    );
                    prop_assert_eq!(h.device, d, "{} evicted from another device", v);
                }
                let lasts: Vec<u64> = victims.iter().map(|v| self.models[v].last).collect();
                prop_assert!(
                    lasts.windows(2).all(|w| w[0] < w[1]),
                    "not in LRU order: {:?}",
                    lasts
                );
                // Exactly the LRU prefix, as short as possible.
                let prefix: Vec<String> = eligible
                    .iter()
                    .take(victims.len())
                    .map(|(m, _)| m.clone())
                    .collect();
                prop_assert_eq!(&prefix, &victims.to_vec());
                let freed: u64 = victims.iter().map(|v| self.models[v].bytes).sum();
                let held = self.held(d, except);
                prop_assert!(
                    need == 0 || held - freed + need <= self.budget(d),
                    "victims do not make room"
                );
                if let Some(last) = victims.last() {
                    let short = freed - self.models[last].bytes;
                    prop_assert!(
                        held - short + need > self.budget(d),
                        "more victims than needed"
                    );
                }
                Ok(freed)
            }

            /// Whether evicting every eligible model makes room.
            fn could_fit(
                &self,
                d: DeviceId,
                need: u64,
                except: Option<&str>,
                keep: &[String],
            ) -> bool {
                let all: u64 = self.eligible(d, except, keep).iter().map(|(_, b)| b).sum();
                need == 0 || self.held(d, except) - all + need <= self.budget(d)
            }
        }

        fn step(a: &mut Allocator, r: &mut Reference, op: &Op) -> Result<(), TestCaseError> {
            match op {
                Op::Admit {
                    model,
                    bytes,
                    placement,
                    pinned,
                    keep,
                } => {
                    let name = NAMES[*model];
                    let keep: Vec<String> = keep.iter().map(|k| NAMES[*k].to_string()).collect();
                    let req = LoadRequest {
                        model: name.to_string(),
                        estimated_bytes: *bytes,
                        placement: placement.clone(),
                        pinned: *pinned,
                        keep: keep.clone(),
                    };
                    let result = a.admit(&req);
                    let candidates = r.candidates(placement);
                    if r.models.contains_key(name) {
                        prop_assert!(
                            matches!(result, Err(Error::AlreadyHeld { .. })),
                            "{:?}",
                            result
                        );
                        return Ok(());
                    }
                    if candidates.is_empty() {
                        prop_assert!(
                            matches!(result, Err(Error::NoAllowedDevice { .. })),
                            "{:?}",
                            result
                        );
                        return Ok(());
                    }
                    let fitting: Vec<DeviceId> = candidates
                        .iter()
                        .copied()
                        .filter(|&d| r.fits(d, *bytes, None))
                        .collect();
                    match result {
                        Ok(adm) => {
                            prop_assert!(candidates.contains(&adm.device));
                            let freed =
                                r.check_victims(adm.device, *bytes, None, &keep, &adm.evict)?;
                            if let Some(&first) = fitting.first() {
                                prop_assert_eq!(adm.device, first);
                                prop_assert!(adm.evict.is_empty());
                            } else {
                                prop_assert!(!adm.evict.is_empty() || *bytes == 0);
                                let pos = candidates
                                    .iter()
                                    .position(|&d| d == adm.device)
                                    .unwrap_or(usize::MAX);
                                // No other candidate evicts less (bytes, count, preference).
                                for (i, &d) in candidates.iter().enumerate() {
                                    if !r.could_fit(d, *bytes, None, &keep) {
                                        continue;
                                    }
                                    let mut deficit =
                                        (r.held(d, None) + bytes).saturating_sub(r.budget(d));
                                    let mut cost = (0u64, 0usize);
                                    for (_, b) in r.eligible(d, None, &keep) {
                                        if deficit == 0 {
                                            break;
                                        }
                                        cost = (cost.0 + b, cost.1 + 1);
                                        deficit = deficit.saturating_sub(b);
                                    }
                                    prop_assert!(
                                        (freed, adm.evict.len(), pos) <= (cost.0, cost.1, i),
                                        "{:?} evicts more than {}",
                                        adm,
                                        d
                                    );
                                }
                            }
                            for v in &adm.evict {
                                if let Some(h) = r.models.get_mut(v) {
                                    h.state = HolderState::Evicting;
                                }
                            }
                            let last = r.tick();
                            r.models.insert(
                                name.to_string(),
                                Held {
                                    device: adm.device,
                                    bytes: *bytes,
                                    state: HolderState::Loading,
                                    pinned: *pinned,
                                    in_flight: 0,
                                    last,
                                    keep,
                                },
                            );
                        }
                        Err(Error::NoRoom {
                            needed_bytes,
                            devices,
                            ..
                        }) => {
                            prop_assert_eq!(needed_bytes, *bytes);
                            let named: Vec<DeviceId> = devices.iter().map(|d| d.device).collect();
                            let mut sorted = candidates.clone();
                            sorted.sort();
                            prop_assert_eq!(&named, &sorted);
                            for &d in &candidates {
                                prop_assert!(
                                    !r.could_fit(d, *bytes, None, &keep),
                                    "{} could hold it",
                                    d
                                );
                            }
                        }
                        Err(other) => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                Op::Charge { model, bytes } => {
                    let name = NAMES[*model];
                    let result = a.charge(name, *bytes);
                    let Some(h) = r.models.get(name).cloned() else {
                        prop_assert_eq!(result, Err(Error::NotHeld(name.to_string())));
                        return Ok(());
                    };
                    if h.state == HolderState::Evicting {
                        prop_assert_eq!(result, Err(Error::Evicting(name.to_string())));
                        return Ok(());
                    }
                    match result {
                        Ok(victims) => {
                            if *bytes <= h.bytes {
                                prop_assert!(victims.is_empty());
                            } else {
                                r.check_victims(h.device, *bytes, Some(name), &h.keep, &victims)?;
                            }
                            for v in &victims {
                                if let Some(v) = r.models.get_mut(v) {
                                    v.state = HolderState::Evicting;
                                }
                            }
                            let last = r.tick();
                            let h = r.models.get_mut(name).expect("held");
                            h.bytes = *bytes;
                            h.state = HolderState::Ready;
                            h.last = last;
                            h.keep.clear();
                        }
                        Err(Error::NoRoomAfterLoad {
                            measured_bytes,
                            device,
                            ..
                        }) => {
                            prop_assert_eq!(measured_bytes, *bytes);
                            prop_assert_eq!(device.device, h.device);
                            prop_assert!(*bytes > h.bytes);
                            prop_assert!(!r.could_fit(h.device, *bytes, Some(name), &h.keep));
                        }
                        Err(other) => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                Op::Release { model } => {
                    let name = NAMES[*model];
                    prop_assert_eq!(a.release(name), r.models.remove(name).is_some());
                }
                Op::Acquire { model } => {
                    let name = NAMES[*model];
                    let ready = r
                        .models
                        .get(name)
                        .is_some_and(|h| h.state == HolderState::Ready);
                    prop_assert_eq!(a.acquire(name), ready);
                    if ready {
                        let last = r.tick();
                        let h = r.models.get_mut(name).expect("held");
                        h.in_flight += 1;
                        h.last = last;
                    }
                }
                Op::Finish { model } => {
                    let name = NAMES[*model];
                    a.finish(name);
                    if r.models.get(name).is_some_and(|h| h.in_flight > 0) {
                        let last = r.tick();
                        let h = r.models.get_mut(name).expect("held");
                        h.in_flight -= 1;
                        h.last = last;
                    }
                }
                Op::SetPinned { model, pinned } => {
                    let name = NAMES[*model];
                    let expected = match r.models.get_mut(name) {
                        Some(h) if h.state != HolderState::Evicting => {
                            h.pinned = *pinned;
                            true
                        }
                        _ => false,
                    };
                    prop_assert_eq!(a.set_pinned(name, *pinned), expected);
                }
                Op::Reserve {
                    job,
                    devices,
                    size,
                    placement,
                } => {
                    let key = JOBS[*job];
                    let size = size.map_or(ExternalSize::WholeDevice, ExternalSize::Bytes);
                    let req = ExternalRequest {
                        key: key.to_string(),
                        devices: *devices,
                        size,
                        placement: placement.clone(),
                    };
                    let result = a.reserve_external(&req);
                    if r.jobs.contains_key(key) {
                        prop_assert_eq!(result, Err(Error::AlreadyReserved(key.to_string())));
                        return Ok(());
                    }
                    let candidates = r.candidates(placement);
                    let need = |d: DeviceId| size.on(r.budget(d));
                    // Devices are independent (a device's victims are its own): exactly the
                    // candidates that could hold it alone can be given.
                    let able = candidates
                        .iter()
                        .filter(|&&d| r.could_fit(d, need(d), None, &[]))
                        .count();
                    let wanted = *devices as usize;
                    match result {
                        Ok(adm) => {
                            prop_assert!(able >= wanted);
                            prop_assert_eq!(adm.devices.len(), wanted);
                            let mut distinct = adm.devices.clone();
                            distinct.sort();
                            distinct.dedup();
                            prop_assert_eq!(distinct.len(), wanted, "{:?}", adm);
                            prop_assert!(adm.devices.iter().all(|d| candidates.contains(d)));
                            // The first device follows the rules of a load: the first candidate
                            // where it fits without eviction, if there is one.
                            if let (Some(&first), Some(&fitting)) = (
                                adm.devices.first(),
                                candidates.iter().find(|&&d| r.fits(d, need(d), None)),
                            ) {
                                prop_assert_eq!(first, fitting);
                            }
                            for &d in &adm.devices {
                                let victims: Vec<String> = adm
                                    .evict
                                    .iter()
                                    .filter(|v| r.models.get(*v).is_some_and(|h| h.device == d))
                                    .cloned()
                                    .collect();
                                r.check_victims(d, need(d), None, &[], &victims)?;
                            }
                            for v in &adm.evict {
                                let on_chosen = r
                                    .models
                                    .get(v)
                                    .is_some_and(|h| adm.devices.contains(&h.device));
                                prop_assert!(on_chosen, "{} evicted off the chosen devices", v);
                            }
                            for v in &adm.evict {
                                if let Some(h) = r.models.get_mut(v) {
                                    h.state = HolderState::Evicting;
                                }
                            }
                            if wanted > 0 {
                                let held: Vec<(DeviceId, u64)> = adm
                                    .devices
                                    .iter()
                                    .map(|&d| (d, size.on(r.budget(d))))
                                    .collect();
                                r.jobs.insert(key.to_string(), held);
                            }
                        }
                        Err(Error::NoRoomExternal {
                            wanted: w,
                            found,
                            devices: reports,
                            ..
                        }) => {
                            prop_assert_eq!(w, *devices);
                            prop_assert!(able < wanted, "{} devices could hold it", able);
                            prop_assert_eq!(found as usize, able);
                            let named: Vec<DeviceId> = reports.iter().map(|d| d.device).collect();
                            let mut sorted = candidates.clone();
                            sorted.sort();
                            prop_assert_eq!(&named, &sorted);
                        }
                        Err(other) => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                Op::ReleaseJob { job } => {
                    let key = JOBS[*job];
                    prop_assert_eq!(a.release(key), r.jobs.remove(key).is_some());
                }
                Op::SetCapacity { device, capacity } => {
                    let d = DEVICES[*device];
                    let known = match r.budgets.get_mut(&d) {
                        Some(b) => {
                            b.capacity_bytes = *capacity;
                            true
                        }
                        None => false,
                    };
                    prop_assert_eq!(a.set_capacity(d, *capacity), known);
                }
            }
            Ok(())
        }

        /// The snapshot matches the reference, and over-commit is reported exactly.
        fn check_snapshot(a: &Allocator, r: &Reference) -> Result<(), TestCaseError> {
            let snapshot = a.snapshot();
            prop_assert_eq!(snapshot.len(), r.budgets.len());
            for u in &snapshot {
                let b = r.budgets[&u.device];
                prop_assert_eq!(
                    (u.capacity_bytes, u.reserve_bytes, u.budget_bytes),
                    (b.capacity_bytes, b.reserve_bytes, b.budget_bytes())
                );
                let held = r.held(u.device, None);
                prop_assert_eq!(u.held_bytes, held);
                prop_assert_eq!(
                    u.held_bytes,
                    u.charged_bytes + u.reserved_bytes + u.external_bytes
                );
                let jobs: Vec<ExternalUsage> = r
                    .jobs_on(u.device)
                    .map(|(key, bytes)| ExternalUsage {
                        key: key.clone(),
                        bytes,
                    })
                    .collect();
                prop_assert_eq!(&u.externals, &jobs);
                prop_assert_eq!(
                    u.over_committed_bytes,
                    held.saturating_sub(b.budget_bytes())
                );
                prop_assert_eq!(u.free_bytes, b.budget_bytes().saturating_sub(held));
                let expected: Vec<HolderUsage> = r
                    .models
                    .iter()
                    .filter(|(_, h)| h.device == u.device)
                    .map(|(m, h)| HolderUsage {
                        model: m.clone(),
                        bytes: h.bytes,
                        pinned: h.pinned,
                        in_flight: h.in_flight,
                        state: h.state,
                        last_used: h.last,
                    })
                    .collect();
                prop_assert_eq!(&u.holders, &expected);
            }
            Ok(())
        }

        fn devices() -> impl Strategy<Value = Vec<Budget>> {
            let capacity = prop_oneof![1 => Just(0u64), 9 => 40..160u64];
            let budget = (capacity, 0..40u64);
            (
                prop::sample::subsequence(DEVICES.to_vec(), 1..=3),
                prop::collection::vec(budget, 3),
            )
                .prop_map(|(devices, sizes)| {
                    devices
                        .into_iter()
                        .zip(sizes)
                        .map(|(d, (capacity, reserve))| Budget::new(d, capacity, reserve))
                        .collect()
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn allocator_keeps_its_invariants(budgets in devices(), ops in prop::collection::vec(ops(), 1..80)) {
                let ops: Vec<Op> = ops.into_iter().flatten().collect();
                let mut a = Allocator::new(budgets.clone());
                let mut r = Reference {
                    budgets: budgets.iter().map(|b| (b.device, *b)).collect(),
                    models: BTreeMap::new(),
                    jobs: BTreeMap::new(),
                    clock: 0,
                };
                for op in &ops {
                    let before: BTreeMap<DeviceId, u64> =
                        a.snapshot().iter().map(|u| (u.device, u.held_bytes)).collect();
                    step(&mut a, &mut r, op)?;
                    check_snapshot(&a, &r)?;
                    if !matches!(op, Op::SetCapacity { .. }) {
                        // Within budget — or, on a device that shrank, never more over it.
                        for u in a.snapshot() {
                            prop_assert!(u.held_bytes <= u.budget_bytes || u.held_bytes <= before[&u.device],
                                "{:?} raised {} past its budget: {:?}", op, u.device, u);
                        }
                    }
                }
            }
        }
    }
}
