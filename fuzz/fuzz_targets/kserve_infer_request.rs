//! A KServe `ModelInferRequest` off the wire, then its tensors.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veraltheim::fuzz::kserve_infer_request(data));
