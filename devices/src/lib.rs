//! The device inventory: what compute this machine has and how it is doing — host cores and
//! memory, and NVIDIA GPUs read through NVML — sampled on demand into a [`Snapshot`] that any
//! number of readers take without locks.
//!
//! The pieces:
//! - [`GpuProbe`] reads the GPUs. [`NvmlProbe`] is the real one (NVML, loaded at run time);
//!   [`SimulatedProbe`] stands in for GPUs this machine lacks (`--simulate-gpus 2x80GiB`), with
//!   memory charged and released by its callers; `fake::ScriptedProbe` (feature `fake-probe`) is a
//!   **fake for tests** that plays back a script of readings and failures; its devices are
//!   marked simulated.
//! - [`Inventory`] owns a probe (or none), samples host and GPUs on [`Inventory::sample`], keeps the
//!   latest [`Snapshot`] for [`Inventory::snapshot`], and returns [`DeviceEvent`]s when a device's
//!   health changes, for the caller to publish.
//!
//! Invariants:
//! - Sampling never panics and never fails as a whole. A field a device does not support is
//!   `None` with a note in [`GpuInfo::errors`]; a device that fails as a whole is kept with
//!   `lost: true` and its error; a failing probe marks every device it knew lost and raises
//!   [`DeviceEvent::ProbeFailed`]. A device once seen is never dropped silently.
//! - A lost device has `memory_free_bytes == 0`, so nothing is placed on it by accident; only
//!   its identity (`index`, `uuid`, `name`, `memory_total_bytes`) is meaningful.
//! - Events are raised on transitions only (appeared, lost, recovered, probe failed/recovered),
//!   never once per sample while a state holds.
//! - No NVIDIA library or driver is not an error: [`Inventory::detect`] then reports no GPUs and
//!   logs one info line.
//!
//! This crate knows nothing of gRPC, configuration files, models or queues.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
#[cfg(feature = "fake-probe")]
pub mod fake;
mod host;
mod inventory;
mod nvml;
mod probe;
mod simulated;
mod types;

pub use error::ProbeError;
pub use host::{read_host, resident_bytes};
pub use inventory::{DeviceEvent, Inventory};
pub use nvml::{NVML_LIBRARY_NAMES, NvmlProbe};
pub use probe::GpuProbe;
pub use simulated::{MAX_SIMULATED_GPUS, SimSpec, SimulatedProbe};
pub use types::{GpuInfo, GpuProcess, HostInfo, Snapshot};
