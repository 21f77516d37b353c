//! A Triton `config.pbtxt`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veraltheim_models::fuzz::config_pbtxt(data));
