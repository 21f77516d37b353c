//! Detects the devices of this machine and prints one snapshot as JSON.
//!
//! `cargo run -p veraltheim-devices --example inventory [-- <simulate spec, e.g. 2x80GiB>]`

use veraltheim_devices::{Inventory, NvmlProbe};

fn main() {
    let simulate = std::env::args().nth(1);
    let inventory = match Inventory::detect(simulate.as_deref()) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match inventory.probe_name() {
        Some(name) => eprintln!("GPU probe: {name}"),
        // Detection logs why at info level; without a subscriber here, say it directly.
        None => match NvmlProbe::init() {
            Err(e) => eprintln!("no GPUs: {e}"),
            Ok(_) => eprintln!("no GPUs"),
        },
    }
    let events = inventory.sample();
    for event in &events {
        eprintln!(
            "event: {}",
            serde_json::to_string(event).expect("events serialise")
        );
    }
    let snapshot = inventory.snapshot();
    println!(
        "{}",
        serde_json::to_string_pretty(&*snapshot).expect("snapshots serialise")
    );
}
