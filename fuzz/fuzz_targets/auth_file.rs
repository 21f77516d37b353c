//! An auth file (`server.auth_file`): principals and roles.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veraltheim::fuzz::auth_file(data));
