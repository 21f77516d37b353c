//! Memory charged per model, measured: ONNX Runtime cannot say what a session holds, so the
//! manager builds such a model while no other measured build runs on its device and charges
//! what this process's memory grew by. Two loads at once must then each be charged what one is
//! charged alone (within 5%), not each other's growth.
//!
//! Real model: the ONNX export of all-MiniLM-L6-v2 (`scripts/provision-models`); needs
//! libonnxruntime (`ORT_DYLIB_PATH`, else the onnxruntime wheel in `<workspace>/.venv`).

#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::path::Path;

use veraltheim_fastpath::ExecutionPool;
use veraltheim_models::backend::BackendOptions;
use veraltheim_serving::{ManagerDeps, ManagerOptions, Measurement, ModelManager};

/// A repository of plain ONNX models (no tokenizer: any graph), each the MiniLM export.
fn repository(names: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    // One copy inside the repository (a hidden folder is no model), linked from each model:
    // symlinks that leave the repository are refused at load.
    let onnx = root.path().join(".files/model.onnx");
    std::fs::create_dir_all(onnx.parent().unwrap()).expect("files folder");
    std::fs::copy(common::minilm_onnx(), &onnx).expect("copy of the graph");
    for name in names {
        let version = root.path().join(name).join("1");
        std::fs::create_dir_all(&version).expect("model folder");
        std::fs::write(
            root.path().join(name).join("config.json"),
            r#"{"backend": "onnxruntime", "instance_group": [{"count": 1, "kind": "KIND_CPU"}]}"#,
        )
        .expect("config.json");
        std::os::unix::fs::symlink(&onnx, version.join("model.onnx")).expect("symlink");
    }
    root
}

fn manager(repo: &Path) -> ModelManager {
    ModelManager::new(
        ManagerOptions {
            repository: Some(repo.to_path_buf()),
            backend: BackendOptions {
                onnxruntime_library: Some(common::ort_library()),
                intra_op_threads: 1,
                ..BackendOptions::default()
            },
            max_concurrent_loads: 2,
            ..ManagerOptions::default()
        },
        ManagerDeps::detached(ExecutionPool::new(1).expect("pool")),
    )
    .expect("manager")
}

fn charge(m: &ModelManager, name: &str) -> u64 {
    let info = m.info(name).expect("known model");
    let memory = info
        .memory
        .unwrap_or_else(|| panic!("{name} is loaded but has no charge: {info:?}"));
    assert_eq!(
        memory.how,
        Measurement::Growth,
        "{name}: an ONNX model is charged what it was measured to take"
    );
    assert_eq!(info.memory_bytes, memory.charged_bytes);
    memory.charged_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_onnx_models_loaded_at_once_are_each_charged_what_one_is_charged_alone() {
    let repo = repository(&["primer", "alone", "a", "b"]);
    let m = manager(repo.path());
    // The first ONNX load also sets up ONNX Runtime itself (the library, its environment and
    // thread pools): a one-off cost no later model holds.
    m.load("primer", None).await.expect("primer loads");
    m.load("alone", None).await.expect("alone loads");
    let alone = charge(&m, "alone");
    // The weights alone are ~90 MB: a charge far below that measured nothing real.
    assert!(alone > 50 << 20, "alone was charged {alone} bytes");
    let (a, b) = tokio::join!(m.load("a", None), m.load("b", None));
    a.expect("a loads");
    b.expect("b loads");
    for name in ["a", "b"] {
        let bytes = charge(&m, name);
        let ratio = bytes as f64 / alone as f64;
        eprintln!("{name}: charged {bytes} bytes, {ratio:.3}× the {alone} of one loaded alone");
        assert!(
            (0.95..=1.05).contains(&ratio),
            "{name} loaded beside another was charged {bytes} bytes, {ratio:.3}× the {alone} \
             bytes of one loaded alone"
        );
    }
}
