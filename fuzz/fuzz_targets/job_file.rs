//! A job file (`jobs submit -f`), parsed and turned into a spec.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veraltheim::fuzz::job_file(data));
