//! Without a usable libonnxruntime, loading an ONNX model fails with a message that says how to
//! fix it, and nothing panics (not even inside `ort`, where a panic would be caught); a later
//! attempt with a good library then succeeds. Its own test binary: ONNX Runtime is loaded once per
//! process, and this must run before anything else touches it.
#![cfg(feature = "onnx")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use veraltheim_models::onnx::{self, OnnxOptions};
use veraltheim_models::{Error, ModelConfig};

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn assert_fix_it(e: &Error, what: &str) {
    let msg = e.to_string();
    assert!(matches!(e, Error::Load { .. }), "{what}: {msg}");
    assert!(msg.contains("model 'm'"), "{what}: {msg}");
    for needed in [
        "ORT_DYLIB_PATH",
        "models.onnxruntime_library",
        "pip install onnxruntime",
        "onnxruntime/capi/",
    ] {
        assert!(msg.contains(needed), "{what}: no '{needed}' in: {msg}");
    }
}

#[test]
fn missing_runtime_fails_with_a_fix_and_a_later_good_path_works() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let original = std::env::var_os("ORT_DYLIB_PATH");
    let good = common::ort_library_from(original);

    let dir = tempfile::tempdir().expect("temp dir");
    // Loading never reaches the graph without a runtime, so any file will do.
    std::fs::write(dir.path().join("model.onnx"), b"not a graph").expect("write");
    let config = ModelConfig::from_json(r#"{"name":"m"}"#).expect("config");
    let load = |options: &OnnxOptions| onnx::load(config.clone(), dir.path(), options);

    // SAFETY: this is the only test in this binary, so no other thread reads the environment.
    unsafe { std::env::set_var("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.32.0") };
    let e = load(&OnnxOptions::default())
        .err()
        .expect("no library there");
    assert_fix_it(&e, "ORT_DYLIB_PATH to a missing file");
    assert!(
        e.to_string()
            .contains("/nonexistent/libonnxruntime.so.1.32.0"),
        "{e}"
    );

    // SAFETY: as above.
    unsafe { std::env::remove_var("ORT_DYLIB_PATH") };
    let e = load(&OnnxOptions::default())
        .err()
        .expect("no library named");
    assert_fix_it(&e, "no ORT_DYLIB_PATH");
    assert!(e.to_string().contains("not found"), "{e}");

    // A file that is not a shared library: dlopen fails, ort reports it, we pass it on.
    let not_a_library = dir.path().join("model.onnx");
    let e = load(&OnnxOptions {
        library: Some(not_a_library.clone()),
        intra_op_threads: 0,
        ..OnnxOptions::default()
    })
    .err()
    .expect("not a shared library");
    assert_fix_it(&e, "a file that is not a library");
    assert!(e.to_string().contains("cannot be used"), "{e}");
    assert!(onnx::init_runtime(Some(&not_a_library)).is_err());

    // The failed attempts poisoned nothing: the good library loads now.
    let info = onnx::init_runtime(Some(&good)).expect("the good library loads after failures");
    assert!(info.library.is_absolute());
    let e = load(&OnnxOptions {
        library: Some(good),
        intra_op_threads: 0,
        ..OnnxOptions::default()
    })
    .err()
    .expect("the graph itself is garbage");
    assert!(
        e.to_string().contains("ONNX Runtime cannot open")
            && !e.to_string().contains("ORT_DYLIB_PATH"),
        "the runtime is there now, only the graph is wrong: {e}"
    );
    // Once loaded, it stays, whatever a later call names.
    assert!(onnx::init_runtime(None).is_ok());

    let _ = std::panic::take_hook();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}
