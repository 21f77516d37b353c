//! Simulate specs and the simulated probe's memory accounting.

use veraltheim_devices::{GpuProbe, Inventory, ProbeError, SimSpec, SimulatedProbe};

const GIB: u64 = 1 << 30;

#[test]
fn valid_specs_parse() {
    let cases: &[(&str, u32, u64)] = &[
        ("2x80GiB", 2, 80 * GIB),
        ("1X16gb", 1, 16_000_000_000),
        ("4x512MiB", 4, 512 << 20),
        ("3x100mb", 3, 100_000_000),
        ("8x141GB", 8, 141_000_000_000),
        (" 2 x 80 gib ", 2, 80 * GIB),
        ("256x1MiB", 256, 1 << 20),
    ];
    for &(spec, count, memory_bytes) in cases {
        assert_eq!(
            SimSpec::parse(spec),
            Ok(SimSpec {
                count,
                memory_bytes
            }),
            "{spec}"
        );
        assert_eq!(spec.parse::<SimSpec>().unwrap().count, count);
    }
}

#[test]
fn invalid_specs_name_the_bad_part() {
    let cases: &[(&str, &str)] = &[
        ("x80GiB", "missing the GPU count before `x`"),
        ("0x1GiB", "GPU count must be at least 1"),
        ("2x", "missing the memory after `x`"),
        ("2x80TB", "unknown memory unit `TB` in `80TB`"),
        ("", "empty"),
        ("80GiB", "missing `x`"),
        ("ax80GiB", "GPU count `a` is not a whole number"),
        ("-1x80GiB", "GPU count `-1` is not a whole number"),
        ("2x80", "memory `80` needs a unit"),
        ("2xGiB", "memory `GiB` must start with a whole number"),
        ("2x1.5GiB", "memory `1.5GiB` must be a whole number"),
        ("2x0GiB", "memory `0GiB` must be more than 0"),
        ("257x1GiB", "GPU count `257` is more than 256"),
        ("2x2x80GiB", "unknown memory unit `x80GiB`"),
        ("2x99999999999999999999GiB", "is too large"),
    ];
    for &(spec, expected) in cases {
        let err = SimSpec::parse(spec).expect_err(spec);
        let ProbeError::BadSpec {
            spec: given,
            reason,
        } = &err
        else {
            panic!("{spec}: wrong error kind {err:?}");
        };
        assert_eq!(given, spec);
        assert!(
            reason.contains(expected),
            "{spec}: `{reason}` lacks `{expected}`"
        );
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("`{spec}`")),
            "{spec}: message `{shown}` does not quote the spec"
        );
    }
}

#[test]
fn simulated_devices_look_as_documented() {
    let probe = SimulatedProbe::from_spec("2x80GiB").unwrap();
    assert_eq!(probe.name(), "simulated");
    let gpus = probe.sample().unwrap();
    assert_eq!(gpus.len(), 2);
    for (i, g) in gpus.iter().enumerate() {
        assert_eq!(g.index, i as u32);
        assert_eq!(g.uuid, format!("GPU-sim-{i}"));
        assert_eq!(g.name, "Simulated GPU");
        assert!(g.simulated && !g.lost);
        assert_eq!(g.memory_total_bytes, 80 * GIB);
        assert_eq!(g.memory_used_bytes, 0);
        assert_eq!(g.memory_free_bytes, 80 * GIB);
        assert_eq!(g.utilization_gpu_percent, Some(0));
        assert_eq!(g.utilization_memory_percent, Some(0));
        assert_eq!(g.temperature_celsius, Some(0));
        assert_eq!(g.power_draw_milliwatts, Some(0));
        assert_eq!(g.energy_millijoules, Some(0));
        assert!(g.errors.is_empty());
    }
}

#[test]
fn charge_and_release_are_accounted_per_device() {
    let probe = SimulatedProbe::from_spec("2x10GiB").unwrap();
    probe.charge(0, 4 * GIB).unwrap();
    probe.charge(0, 6 * GIB).unwrap(); // exactly full
    probe.charge(1, GIB).unwrap();
    let gpus = probe.sample().unwrap();
    assert_eq!(gpus[0].memory_used_bytes, 10 * GIB);
    assert_eq!(gpus[0].memory_free_bytes, 0);
    assert_eq!(gpus[1].memory_used_bytes, GIB);
    assert_eq!(gpus[1].memory_free_bytes, 9 * GIB);

    // Over-charge names the device and changes nothing.
    let err = probe.charge(1, 9 * GIB + 1).unwrap_err();
    assert_eq!(
        err,
        ProbeError::OverCharge {
            index: 1,
            uuid: "GPU-sim-1".into(),
            requested: 9 * GIB + 1,
            free: 9 * GIB,
            total: 10 * GIB,
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("simulated GPU 1 (GPU-sim-1)"), "{msg}");
    assert_eq!(probe.used(1).unwrap(), GIB);
    assert!(probe.charge(0, 1).is_err());

    probe.release(0, 4 * GIB).unwrap();
    assert_eq!(probe.used(0).unwrap(), 6 * GIB);
    assert_eq!(probe.sample().unwrap()[0].memory_free_bytes, 4 * GIB);

    // Releasing more than charged is a caller bug, reported and not applied.
    let err = probe.release(1, 2 * GIB).unwrap_err();
    assert!(matches!(err, ProbeError::OverRelease { index: 1, used, .. } if used == GIB));
    assert_eq!(probe.used(1).unwrap(), GIB);

    assert_eq!(
        probe.charge(2, 1),
        Err(ProbeError::NoSuchDevice { index: 2, count: 2 })
    );
    assert!(probe.release(5, 1).is_err());
    assert!(probe.used(2).is_err());
}

#[test]
fn simulated_inventory_shows_charges_and_losses() {
    let inv = Inventory::detect(Some("2x16GiB")).unwrap();
    assert_eq!(inv.probe_name(), Some("simulated"));
    let sim = inv.simulated_probe().expect("simulated handle").clone();
    assert_eq!(inv.sample().len(), 2, "two GpuAppeared events");

    sim.charge(1, 3 * GIB).unwrap();
    assert!(inv.sample().is_empty());
    let snap = inv.snapshot();
    assert_eq!(snap.gpus.len(), 2);
    assert_eq!(snap.gpu(1).unwrap().memory_used_bytes, 3 * GIB);
    assert_eq!(snap.gpu(1).unwrap().memory_free_bytes, 13 * GIB);

    sim.set_lost(0, Some("simulated loss".into())).unwrap();
    let events = inv.sample();
    assert_eq!(events.len(), 1, "{events:?}");
    let snap = inv.snapshot();
    let g0 = snap.gpu(0).unwrap();
    assert!(g0.lost && g0.simulated);
    assert_eq!(g0.memory_free_bytes, 0);
    assert_eq!(g0.errors, vec!["simulated loss".to_string()]);
    assert_eq!(snap.usable_gpus().count(), 1);
}

#[test]
fn detect_rejects_a_bad_spec() {
    let err = Inventory::detect(Some("2x80TB"))
        .err()
        .expect("bad spec is an error");
    assert!(matches!(err, ProbeError::BadSpec { .. }), "{err:?}");
}
