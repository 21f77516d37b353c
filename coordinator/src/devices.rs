//! The device inventory as the coordinator runs it: the `devices` crate's `Inventory` (host, and
//! GPUs through NVML or simulated), sampled by the supervised ResourceMonitor, its health changes
//! published on the bus (`devices.gpu.<index>.<kind>`, `devices.probe.<kind>`), read lock-free by
//! the APIs and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use veraltheim_bus::{Bus, Event};
use veraltheim_devices::{DeviceEvent, Inventory, ProbeError, Snapshot};

pub struct Devices {
    inventory: Inventory,
    interval: Duration,
}

impl Devices {
    /// `simulate`: simulated GPUs as a `COUNT x MEMORY` spec; `None` or empty: the real ones, if
    /// any.
    pub fn detect(simulate: Option<&str>, interval: Duration) -> Result<Self, ProbeError> {
        let spec = simulate.map(str::trim).filter(|s| !s.is_empty());
        let inventory = Inventory::detect(spec)?;
        inventory.sample();
        Ok(Devices {
            inventory,
            interval,
        })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether the GPUs are simulated (`--simulate-gpus`): built-in models may then be placed
    /// on them (`BackendOptions::simulated_gpus`).
    pub fn simulated(&self) -> bool {
        self.inventory.simulated_probe().is_some()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inventory.snapshot()
    }

    /// Samples (NVML calls may block: run it off the async threads) and publishes what changed.
    pub async fn sample_and_publish(self: &Arc<Self>, bus: &Bus) {
        let me = self.clone();
        let events = match tokio::task::spawn_blocking(move || me.inventory.sample()).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "device sampling did not finish");
                return;
            }
        };
        for e in events {
            let event = to_event(&e);
            tracing::info!(topic = %event.topic, "{}", event.message);
            if let Err(err) = bus.publish(event).await {
                tracing::warn!(error = %err, "device event not published");
            }
        }
    }
}

fn to_event(e: &DeviceEvent) -> Event {
    match e {
        DeviceEvent::GpuAppeared { index, uuid, name } => Event::new(
            format!("devices.gpu.{index}.appeared"),
            format!("GPU {index} ({name}) appeared"),
        )
        .with_attribute("gpu", index.to_string())
        .with_attribute("uuid", uuid),
        DeviceEvent::GpuLost {
            index,
            uuid,
            reason,
        } => Event::new(
            format!("devices.gpu.{index}.lost"),
            format!("GPU {index} lost: {reason}"),
        )
        .with_attribute("gpu", index.to_string())
        .with_attribute("uuid", uuid)
        .with_attribute("reason", reason),
        DeviceEvent::GpuRecovered { index, uuid } => Event::new(
            format!("devices.gpu.{index}.recovered"),
            format!("GPU {index} recovered"),
        )
        .with_attribute("gpu", index.to_string())
        .with_attribute("uuid", uuid),
        DeviceEvent::ProbeFailed { probe, reason } => Event::new(
            "devices.probe.failed",
            format!("GPU probe {probe} failed: {reason}"),
        )
        .with_attribute("probe", probe)
        .with_attribute("reason", reason),
        DeviceEvent::ProbeRecovered { probe } => Event::new(
            "devices.probe.recovered",
            format!("GPU probe {probe} recovered"),
        )
        .with_attribute("probe", probe),
    }
}

/// Loads whose backend cannot say what it holds are charged what this process's memory on the
/// device grew by: resident memory for the CPU, NVML's per-process figure for a GPU.
impl veraltheim_serving::MemoryGauge for Devices {
    fn held_bytes(&self, device: veraltheim_models::allocator::DeviceId) -> Option<u64> {
        match device {
            veraltheim_models::allocator::DeviceId::Cpu => veraltheim_devices::resident_bytes(),
            veraltheim_models::allocator::DeviceId::Gpu(index) => {
                self.inventory.process_gpu_bytes(index)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn simulated_gpus_appear_on_the_bus() {
        let devices = Arc::new(Devices::detect(Some("2x1GiB"), Duration::from_secs(1)).unwrap());
        let snap = devices.snapshot();
        assert_eq!(snap.gpus.len(), 2);
        assert!(snap.gpus.iter().all(|g| g.simulated));
        assert!(devices.simulated());
        assert!(
            !Devices::detect(None, Duration::from_secs(1))
                .unwrap()
                .simulated()
        );
        assert!(Devices::detect(Some("2x"), Duration::from_secs(1)).is_err());
        let topics: Vec<String> = [
            DeviceEvent::GpuLost {
                index: 1,
                uuid: "u".into(),
                reason: "gone".into(),
            },
            DeviceEvent::ProbeFailed {
                probe: "nvml".into(),
                reason: "x".into(),
            },
        ]
        .iter()
        .map(|e| to_event(e).topic)
        .collect();
        assert_eq!(topics, ["devices.gpu.1.lost", "devices.probe.failed"]);
    }
}
