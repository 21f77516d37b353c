use std::ffi::OsStr;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

use crate::error::ProbeError;
use crate::probe::GpuProbe;
use crate::types::{GpuInfo, GpuProcess};

/// The library names tried by [`NvmlProbe::init`], in order: the versioned name every driver
/// install has, then the development symlink.
pub const NVML_LIBRARY_NAMES: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// The real GPU probe: NVIDIA's management library (NVML), loaded at run time, so a machine
/// without the driver builds and runs — [`NvmlProbe::init`] then fails with
/// [`ProbeError::Unavailable`].
///
/// Per device it reads identity, memory, utilization, temperature, power draw and limit, energy
/// and the running compute processes. A field the device does not support (or refuses) is
/// `None` with a note; a device whose handle cannot be had, or that answers any read with
/// `GpuLost` / `ResetRequired` (or its identity with `Unknown`), is reported `lost` with the error.
pub struct NvmlProbe {
    nvml: Nvml,
    driver_version: Option<String>,
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlProbe")
            .field("driver_version", &self.driver_version)
            .finish_non_exhaustive()
    }
}

impl NvmlProbe {
    /// Loads NVML from the usual library names ([`NVML_LIBRARY_NAMES`]) and initialises it.
    pub fn init() -> Result<Self, ProbeError> {
        let mut first_failure = None;
        for name in NVML_LIBRARY_NAMES {
            match Self::init_with_library(OsStr::new(name)) {
                Ok(probe) => return Ok(probe),
                // Only a library that cannot be loaded is worth another name; a loaded library
                // that fails (driver not loaded, no permission) answers for all of them.
                Err(ProbeError::Unavailable(reason)) if reason.starts_with(LOAD_FAILED) => {
                    first_failure.get_or_insert(reason);
                }
                Err(e) => return Err(e),
            }
        }
        Err(ProbeError::Unavailable(format!(
            "{} (also tried {}); is the NVIDIA driver installed?",
            first_failure.unwrap_or_default(),
            NVML_LIBRARY_NAMES[1..].join(", ")
        )))
    }

    /// Loads NVML from this library name or path and initialises it.
    pub fn init_with_library(library: &OsStr) -> Result<Self, ProbeError> {
        let nvml = Nvml::builder().lib_path(library).init().map_err(|e| {
            let lib = library.to_string_lossy();
            ProbeError::Unavailable(match e {
                NvmlError::LibloadingError(err) => {
                    let err = err.to_string();
                    if err.contains(&*lib) {
                        format!("{LOAD_FAILED}: {err}")
                    } else {
                        format!("{LOAD_FAILED} {lib}: {err}")
                    }
                }
                NvmlError::FailedToLoadSymbol(err) => {
                    format!("{lib} is not a usable NVML library: {err}")
                }
                NvmlError::DriverNotLoaded => {
                    format!("NVML ({lib}) loaded but the NVIDIA driver is not loaded")
                }
                NvmlError::NoPermission => {
                    format!("NVML ({lib}) may not talk to the NVIDIA driver: no permission")
                }
                other => format!("NVML ({lib}) failed to initialise: {other}"),
            })
        })?;
        let driver_version = nvml.sys_driver_version().ok();
        Ok(NvmlProbe {
            nvml,
            driver_version,
        })
    }

    /// The NVIDIA driver's version, when NVML could tell.
    pub fn driver_version(&self) -> Option<&str> {
        self.driver_version.as_deref()
    }

    fn read_device(&self, index: u32) -> GpuInfo {
        let mut info = GpuInfo::new(index);
        if let Err(reason) = self.fill_device(index, &mut info) {
            info.mark_lost(reason);
        }
        info
    }

    /// Fills `info`; `Err` with the reason when the device is lost as a whole.
    fn fill_device(&self, index: u32, info: &mut GpuInfo) -> Result<(), String> {
        let dev = self
            .nvml
            .device_by_index(index)
            .map_err(|e| format!("device handle: {e}"))?;
        let notes = &mut info.errors;

        match dev.uuid() {
            Ok(u) => info.uuid = u,
            Err(e) => identity(notes, "uuid", e)?,
        }
        match dev.name() {
            Ok(n) => info.name = n,
            Err(e) => identity(notes, "name", e)?,
        }

        if let Some(m) = field(notes, "memory", dev.memory_info())? {
            info.memory_total_bytes = m.total;
            info.memory_used_bytes = m.used;
            info.memory_free_bytes = m.free;
        }
        if let Some(u) = field(notes, "utilization", dev.utilization_rates())? {
            info.utilization_gpu_percent = Some(u.gpu);
            info.utilization_memory_percent = Some(u.memory);
        }
        info.temperature_celsius = field(
            notes,
            "temperature_celsius",
            dev.temperature(TemperatureSensor::Gpu),
        )?;
        info.power_draw_milliwatts = field(notes, "power_draw_milliwatts", dev.power_usage())?;
        info.power_limit_milliwatts =
            field(notes, "power_limit_milliwatts", dev.enforced_power_limit())?;
        info.energy_millijoules =
            field(notes, "energy_millijoules", dev.total_energy_consumption())?;
        if let Some(procs) = field(notes, "processes", dev.running_compute_processes())? {
            info.processes = procs
                .into_iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    used_memory_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b),
                        UsedGpuMemory::Unavailable => None,
                    },
                })
                .collect();
        }
        Ok(())
    }
}

const LOAD_FAILED: &str = "cannot load the NVML library";

fn note(field: &str, e: &NvmlError) -> String {
    match e {
        NvmlError::NotSupported => format!("{field}: not supported"),
        other => format!("{field}: {other}"),
    }
}

/// An identity read failed: `Unknown` here (as `GpuLost`, `ResetRequired`) means the device
/// itself is not answering, so it is lost; anything else is a note.
fn identity(notes: &mut Vec<String>, name: &str, e: NvmlError) -> Result<(), String> {
    match e {
        NvmlError::GpuLost | NvmlError::ResetRequired | NvmlError::Unknown => {
            Err(format!("{name}: {e}"))
        }
        other => {
            notes.push(note(name, &other));
            Ok(())
        }
    }
}

/// One field's read: `Ok(Some)` read, `Ok(None)` not available (noted), `Err` device lost.
fn field<T>(
    notes: &mut Vec<String>,
    name: &str,
    result: Result<T, NvmlError>,
) -> Result<Option<T>, String> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e @ (NvmlError::GpuLost | NvmlError::ResetRequired)) => Err(format!("{name}: {e}")),
        Err(e) => {
            notes.push(note(name, &e));
            Ok(None)
        }
    }
}

impl GpuProbe for NvmlProbe {
    fn name(&self) -> &str {
        "nvml"
    }

    fn sample(&self) -> Result<Vec<GpuInfo>, ProbeError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| ProbeError::Failed(format!("NVML device count: {e}")))?;
        Ok((0..count).map(|i| self.read_device(i)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_or_refused_fields_are_notes() {
        let mut notes = Vec::new();
        assert_eq!(
            field(&mut notes, "temperature_celsius", Ok(41u32)),
            Ok(Some(41))
        );
        assert_eq!(
            field::<u32>(
                &mut notes,
                "temperature_celsius",
                Err(NvmlError::NotSupported)
            ),
            Ok(None)
        );
        assert_eq!(
            field::<u64>(
                &mut notes,
                "energy_millijoules",
                Err(NvmlError::NoPermission)
            ),
            Ok(None)
        );
        assert_eq!(
            field::<u32>(&mut notes, "power_draw_milliwatts", Err(NvmlError::Unknown)),
            Ok(None)
        );
        assert_eq!(
            notes,
            vec![
                "temperature_celsius: not supported".to_string(),
                format!("energy_millijoules: {}", NvmlError::NoPermission),
                format!("power_draw_milliwatts: {}", NvmlError::Unknown),
            ]
        );
    }

    #[test]
    fn a_lost_gpu_fails_the_whole_device() {
        let mut notes = Vec::new();
        for e in [NvmlError::GpuLost, NvmlError::ResetRequired] {
            let shown = e.to_string();
            assert_eq!(
                field::<u32>(&mut notes, "memory", Err(e)),
                Err(format!("memory: {shown}"))
            );
        }
        assert!(identity(&mut notes, "uuid", NvmlError::Unknown).is_err());
        assert!(identity(&mut notes, "name", NvmlError::GpuLost).is_err());
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            identity(&mut notes, "name", NvmlError::NotSupported),
            Ok(())
        );
        assert_eq!(notes, vec!["name: not supported".to_string()]);
    }
}
