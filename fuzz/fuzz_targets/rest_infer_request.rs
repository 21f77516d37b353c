//! An HTTP inference request (KServe v2 JSON and binary data).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veraltheim::fuzz::rest_infer_request(data));
