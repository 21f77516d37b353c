//! The inventory driven by the scripted FAKE probe (`fake::ScriptedProbe`, feature `fake-probe`,
//! turned on for this crate's tests by its dev-dependency on itself), plus host info and detection
//! on this machine.

use std::sync::Arc;

use veraltheim_devices::fake::{ScriptStep, ScriptedProbe};
use veraltheim_devices::{
    DeviceEvent, GpuInfo, GpuProbe, Inventory, NvmlProbe, ProbeError, Snapshot, read_host,
};

const GIB: u64 = 1 << 30;

fn two_gpus() -> Vec<GpuInfo> {
    vec![
        ScriptedProbe::gpu(0, 80 * GIB),
        ScriptedProbe::gpu(1, 80 * GIB),
    ]
}

fn inventory(steps: Vec<ScriptStep>) -> (Inventory, Arc<ScriptedProbe>) {
    let probe = Arc::new(ScriptedProbe::new(steps));
    (Inventory::new(Some(probe.clone())), probe)
}

fn assert_lost_invariants(g: &GpuInfo) {
    assert!(g.lost, "GPU {} should be lost", g.index);
    assert_eq!(
        g.memory_free_bytes, 0,
        "lost GPU {} shows free memory",
        g.index
    );
    assert!(g.processes.is_empty());
    assert!(
        !g.errors.is_empty(),
        "lost GPU {} carries no reason",
        g.index
    );
}

#[test]
fn fake_probe_drives_the_inventory_through_failure_and_recovery() {
    let library_missing = ProbeError::Unavailable("libnvidia-ml.so.1: cannot open".into());

    let mut gpu1_lost = two_gpus();
    gpu1_lost[1] = GpuInfo::lost(1, "device handle: GPU is lost");

    let mut temp_unsupported = two_gpus();
    temp_unsupported[0].temperature_celsius = None;
    temp_unsupported[0]
        .errors
        .push("temperature_celsius: not supported".into());

    let (inv, probe) = inventory(vec![
        ScriptStep::Report(two_gpus()),
        ScriptStep::Fail(library_missing.clone()),
        ScriptStep::Fail(library_missing.clone()),
        ScriptStep::Report(two_gpus()),
        ScriptStep::Report(gpu1_lost),
        ScriptStep::Report(temp_unsupported),
    ]);
    assert_eq!(inv.probe_name(), Some("scripted (fake)"));
    assert_eq!(inv.snapshot().time_ms, 0, "no sample yet");

    // 1. Normal: both appear.
    let events = inv.sample();
    assert_eq!(
        events,
        vec![
            DeviceEvent::GpuAppeared {
                index: 0,
                uuid: "GPU-fake-0".into(),
                name: "Fake GPU".into()
            },
            DeviceEvent::GpuAppeared {
                index: 1,
                uuid: "GPU-fake-1".into(),
                name: "Fake GPU".into()
            },
        ]
    );
    let normal = inv.snapshot();
    assert!(normal.time_ms > 0);
    assert_eq!(normal.gpus, two_gpus());
    assert_eq!(normal.gpu_probe.as_deref(), Some("scripted (fake)"));
    assert_eq!(normal.gpu_probe_error, None);
    // A fake device never passes for hardware.
    assert!(normal.gpus.iter().all(|g| g.simulated), "{normal:?}");

    // 2. The probe fails: devices kept, marked lost, one ProbeFailed and a GpuLost each.
    let events = inv.sample();
    let reason = library_missing.to_string();
    assert_eq!(
        events,
        vec![
            DeviceEvent::ProbeFailed {
                probe: "scripted (fake)".into(),
                reason: reason.clone()
            },
            DeviceEvent::GpuLost {
                index: 0,
                uuid: "GPU-fake-0".into(),
                reason: reason.clone()
            },
            DeviceEvent::GpuLost {
                index: 1,
                uuid: "GPU-fake-1".into(),
                reason: reason.clone()
            },
        ]
    );
    let failed = inv.snapshot();
    assert_eq!(failed.gpus.len(), 2);
    for g in &failed.gpus {
        assert_lost_invariants(g);
        assert_eq!(g.errors, vec![reason.clone()]);
        assert_eq!(g.uuid, format!("GPU-fake-{}", g.index), "identity kept");
        assert_eq!(g.memory_total_bytes, 80 * GIB, "total kept");
        assert!(g.simulated, "a lost fake device is still marked simulated");
    }
    assert_eq!(failed.gpu_probe_error.as_deref(), Some(reason.as_str()));
    // The earlier snapshot a reader holds is untouched.
    assert!(normal.gpus.iter().all(|g| !g.lost));

    // 3. Still failing: no new events.
    assert_eq!(inv.sample(), vec![]);
    assert_eq!(inv.snapshot().gpus.len(), 2);

    // 4. Recovers.
    let events = inv.sample();
    assert_eq!(
        events,
        vec![
            DeviceEvent::ProbeRecovered {
                probe: "scripted (fake)".into()
            },
            DeviceEvent::GpuRecovered {
                index: 0,
                uuid: "GPU-fake-0".into()
            },
            DeviceEvent::GpuRecovered {
                index: 1,
                uuid: "GPU-fake-1".into()
            },
        ]
    );
    let recovered = inv.snapshot();
    assert_eq!(recovered.gpus, two_gpus());
    assert_eq!(recovered.gpu_probe_error, None);

    // 5. GPU 1 lost while GPU 0 stays fine; identity of 1 comes from what was known.
    let events = inv.sample();
    assert_eq!(
        events,
        vec![DeviceEvent::GpuLost {
            index: 1,
            uuid: "GPU-fake-1".into(),
            reason: "device handle: GPU is lost".into()
        }]
    );
    let one_lost = inv.snapshot();
    assert_eq!(one_lost.gpus[0], two_gpus()[0]);
    let g1 = one_lost.gpu(1).unwrap();
    assert_lost_invariants(g1);
    assert_eq!(g1.uuid, "GPU-fake-1");
    assert_eq!(g1.name, "Fake GPU");
    assert_eq!(g1.memory_total_bytes, 80 * GIB);
    assert!(
        g1.simulated,
        "reported lost without the mark: it is kept from what was known"
    );
    assert_eq!(g1.errors, vec!["device handle: GPU is lost".to_string()]);
    assert_eq!(
        one_lost.usable_gpus().map(|g| g.index).collect::<Vec<_>>(),
        vec![0]
    );

    // 6. A field not supported: None plus a note, device not lost; GPU 1 recovers.
    let events = inv.sample();
    assert_eq!(
        events,
        vec![DeviceEvent::GpuRecovered {
            index: 1,
            uuid: "GPU-fake-1".into()
        }]
    );
    let partial = inv.snapshot();
    let g0 = partial.gpu(0).unwrap();
    assert!(!g0.lost);
    assert_eq!(g0.temperature_celsius, None);
    assert_eq!(
        g0.errors,
        vec!["temperature_celsius: not supported".to_string()]
    );
    assert_eq!(
        g0.utilization_gpu_percent,
        Some(10),
        "other fields still read"
    );
    assert_eq!(g0.memory_free_bytes, 79 * GIB);

    // The script's last step repeats: steady state, no events.
    assert_eq!(inv.sample(), vec![]);
    assert_eq!(probe.calls(), 7);
}

#[test]
fn a_device_no_longer_reported_is_lost_not_dropped() {
    let (inv, _) = inventory(vec![
        ScriptStep::Report(two_gpus()),
        ScriptStep::Report(vec![ScriptedProbe::gpu(0, 80 * GIB)]),
        ScriptStep::Report(two_gpus()),
    ]);
    inv.sample();
    let events = inv.sample();
    assert_eq!(
        events,
        vec![DeviceEvent::GpuLost {
            index: 1,
            uuid: "GPU-fake-1".into(),
            reason: "no longer reported by the scripted (fake) probe".into()
        }]
    );
    let snap = inv.snapshot();
    assert_eq!(snap.gpus.len(), 2);
    assert_lost_invariants(snap.gpu(1).unwrap());
    assert_eq!(
        inv.sample(),
        vec![DeviceEvent::GpuRecovered {
            index: 1,
            uuid: "GPU-fake-1".into()
        }]
    );
}

#[test]
fn a_device_first_seen_lost_appears_then_is_lost() {
    let mut lost = GpuInfo::lost(3, "device handle: Unknown");
    lost.memory_free_bytes = 123; // a careless probe; the inventory enforces the invariant
    let (inv, _) = inventory(vec![ScriptStep::Report(vec![lost])]);
    let events = inv.sample();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(
        events[0],
        DeviceEvent::GpuAppeared { index: 3, .. }
    ));
    assert!(
        matches!(&events[1], DeviceEvent::GpuLost { index: 3, reason, .. } if reason == "device handle: Unknown")
    );
    assert_lost_invariants(inv.snapshot().gpu(3).unwrap());
}

#[test]
fn a_failing_probe_at_the_start_raises_one_event_and_reports_no_gpus() {
    let (inv, _) = inventory(vec![ScriptStep::Fail(ProbeError::Failed("boom".into()))]);
    let events = inv.sample();
    assert_eq!(
        events,
        vec![DeviceEvent::ProbeFailed {
            probe: "scripted (fake)".into(),
            reason: "GPU probe failed: boom".into()
        }]
    );
    assert!(inv.snapshot().gpus.is_empty());
    assert!(inv.sample().is_empty());
}

/// A probe that reports one GPU, then panics once.
struct PanickyProbe(std::sync::atomic::AtomicU32);

impl GpuProbe for PanickyProbe {
    fn name(&self) -> &str {
        "panicky (fake)"
    }
    fn sample(&self) -> Result<Vec<GpuInfo>, ProbeError> {
        if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            panic!("driver exploded");
        }
        Ok(vec![ScriptedProbe::gpu(0, GIB)])
    }
}

#[test]
fn a_panicking_probe_is_a_failing_probe() {
    let inv = Inventory::new(Some(Arc::new(PanickyProbe(Default::default()))));
    inv.sample();
    let events = inv.sample();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        matches!(&events[0], DeviceEvent::ProbeFailed { reason, .. } if reason.contains("probe panicked: driver exploded"))
    );
    assert!(inv.snapshot().gpu(0).unwrap().lost);
    assert_eq!(inv.sample().len(), 2, "recovered: probe and GPU");
}

#[test]
fn a_different_uuid_at_a_known_index_is_a_replacement() {
    let mut other = ScriptedProbe::gpu(0, 40 * GIB);
    other.uuid = "GPU-other".into();
    let (inv, _) = inventory(vec![
        ScriptStep::Report(vec![ScriptedProbe::gpu(0, 80 * GIB)]),
        ScriptStep::Report(vec![other]),
    ]);
    inv.sample();
    let events = inv.sample();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(&events[0], DeviceEvent::GpuLost { uuid, .. } if uuid == "GPU-fake-0"));
    assert!(matches!(&events[1], DeviceEvent::GpuAppeared { uuid, .. } if uuid == "GPU-other"));
    assert_eq!(inv.snapshot().gpu(0).unwrap().memory_total_bytes, 40 * GIB);
}

#[test]
fn readers_take_snapshots_while_sampling() {
    let (inv, _) = inventory(vec![ScriptStep::Report(two_gpus())]);
    let inv = Arc::new(inv);
    inv.sample();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let inv = inv.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                for _ in 0..2000 {
                    let s = inv.snapshot();
                    assert!(s.time_ms >= last, "snapshots go back in time");
                    assert_eq!(s.gpus.len(), 2);
                    last = s.time_ms;
                }
            })
        })
        .collect();
    for _ in 0..200 {
        inv.sample();
    }
    for r in readers {
        r.join().unwrap();
    }
}

#[test]
fn host_info_of_this_machine() {
    let host = read_host();
    assert!(host.cores >= 1);
    if cfg!(target_os = "linux") {
        assert!(host.memory_total_bytes > 0);
        assert!(host.memory_available_bytes > 0);
        assert!(host.memory_available_bytes <= host.memory_total_bytes);
        assert!(host.process_rss_bytes > 0);
    }
    // And it lands in the snapshot, with or without a GPU probe.
    let inv = Inventory::without_gpus();
    assert!(inv.sample().is_empty());
    let snap = inv.snapshot();
    assert_eq!(snap.host.cores, host.cores);
    assert_eq!(snap.host.memory_total_bytes, host.memory_total_bytes);
    assert!(snap.gpus.is_empty() && snap.gpu_probe.is_none());
}

/// On a machine without NVIDIA's library (this one) detection gives an inventory with no GPUs;
/// on a GPU machine it picks NVML. It never fails.
#[test]
fn detect_without_simulation_never_fails() {
    let inv = Inventory::detect(None).expect("detection does not fail");
    inv.sample();
    match NvmlProbe::init() {
        Err(e) => {
            let ProbeError::Unavailable(reason) = &e else {
                panic!("NVML init failed with the wrong kind: {e:?}");
            };
            assert!(reason.contains("libnvidia-ml.so.1"), "{reason}");
            assert_eq!(inv.probe_name(), None);
            assert!(inv.snapshot().gpus.is_empty());
            // The reason travels with every snapshot, so users see why there are no GPUs.
            let why = inv.snapshot().gpu_probe_error.clone().unwrap_or_default();
            assert!(why.contains("libnvidia-ml.so.1"), "{why}");
        }
        Ok(_) => assert_eq!(inv.probe_name(), Some("nvml")),
    }
}

#[test]
fn nvml_from_a_missing_library_is_unavailable_and_names_it() {
    let err = NvmlProbe::init_with_library("/nonexistent/libnvidia-ml.so.1".as_ref()).unwrap_err();
    match &err {
        ProbeError::Unavailable(reason) => {
            assert!(
                reason.contains("/nonexistent/libnvidia-ml.so.1"),
                "{reason}"
            )
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn snapshots_and_events_serialise() {
    let (inv, _) = inventory(vec![ScriptStep::Report(two_gpus())]);
    let events = inv.sample();
    let json = serde_json::to_value(&events[0]).unwrap();
    assert_eq!(json["kind"], "gpu_appeared");
    assert_eq!(json["uuid"], "GPU-fake-0");
    let snap = inv.snapshot();
    let text = serde_json::to_string(&*snap).unwrap();
    let back: Snapshot = serde_json::from_str(&text).unwrap();
    assert_eq!(back, *snap);
}

/// The real thing: run on a machine with an NVIDIA GPU (`cargo test -p veraltheim-devices --
/// --ignored --nocapture`). Prints what NVML read.
#[test]
#[ignore = "needs an NVIDIA GPU and driver"]
fn nvml_reads_a_real_gpu() {
    let probe = NvmlProbe::init().expect("NVML initialises on a GPU machine");
    println!("driver: {:?}", probe.driver_version());
    let gpus = probe.sample().expect("NVML samples");
    assert!(!gpus.is_empty(), "no GPUs found");
    for g in &gpus {
        println!("{g:#?}");
        assert!(!g.lost, "GPU {} lost: {:?}", g.index, g.errors);
        assert!(g.uuid.starts_with("GPU-"), "uuid {}", g.uuid);
        assert!(!g.name.is_empty());
        assert!(g.memory_total_bytes > 0);
        assert!(g.memory_used_bytes + g.memory_free_bytes <= g.memory_total_bytes);
        assert!(!g.simulated);
    }
    let inv = Inventory::new(Some(Arc::new(probe)));
    let events = inv.sample();
    assert_eq!(events.len(), gpus.len(), "one GpuAppeared each: {events:?}");
    println!(
        "{}",
        serde_json::to_string_pretty(&*inv.snapshot()).unwrap()
    );
}
