//! A model configuration in JSON: read whole, and applied as a load's override.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veraltheim_models::fuzz::config_json(data));
