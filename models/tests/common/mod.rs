//! Helpers shared by the real-model tests (candle and ONNX Runtime): where the provisioned
//! all-MiniLM-L6-v2 lies, the reference embeddings of `testdata/minilm-reference.json`, and
//! comparisons with messages that say which sentence and which component differ.
//!
//! Keep these signatures stable: both `minilm_candle.rs` and the ONNX test use them.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use bytes::Bytes;
use veraltheim_models::Tensor;

/// Per-component tolerance between a float32 backend and the float64 reference.
pub const TOLERANCE: f32 = 1e-4;

/// `max_seq_length` the reference was computed with (`sentence_bert_config.json`).
pub const REFERENCE_MAX_SEQ_LENGTH: usize = 256;

/// The workspace root (the folder above `models/`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The all-MiniLM-L6-v2 folder (sentence-transformers layout): `$VERALTHEIM_MINILM_DIR`, else
/// `<workspace>/.cache/models/all-MiniLM-L6-v2`. Panics, saying how to provision it, when it is
/// not there: a real-model test must not pass by skipping.
pub fn minilm_dir() -> PathBuf {
    let dir = match std::env::var_os("VERALTHEIM_MINILM_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join(".cache/models/all-MiniLM-L6-v2"),
    };
    for needed in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !dir.join(needed).is_file() {
            panic!(
                "all-MiniLM-L6-v2 is not provisioned: {} has no {needed}. Run \
                 `scripts/provision-models` from the workspace root (or set \
                 VERALTHEIM_MINILM_DIR to a folder in the sentence-transformers layout).",
                dir.display()
            );
        }
    }
    dir
}

/// The ONNX export of all-MiniLM-L6-v2 that `scripts/provision-models` writes:
/// `$VERALTHEIM_MINILM_ONNX`, else `<workspace>/.cache/models/all-MiniLM-L6-v2.onnx`. Panics,
/// saying how to provision it, when it is not there.
pub fn minilm_onnx() -> PathBuf {
    let path = match std::env::var_os("VERALTHEIM_MINILM_ONNX") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".cache/models/all-MiniLM-L6-v2.onnx"),
    };
    if !path.is_file() {
        panic!(
            "the ONNX export of all-MiniLM-L6-v2 is not there: {} is missing. Run \
             `scripts/provision-models` from the workspace root (or set VERALTHEIM_MINILM_ONNX).",
            path.display()
        );
    }
    path
}

fn reference_json() -> serde_json::Value {
    let path = workspace_root().join("testdata/minilm-reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The reference items, in file order: (text, input_ids with truncation at 256, embedding).
pub fn reference() -> Vec<(String, Vec<i64>, Vec<f32>)> {
    let json = reference_json();
    let items = json["items"]
        .as_array()
        .expect("minilm-reference.json: `items` is not an array");
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let text = item["text"]
                .as_str()
                .unwrap_or_else(|| panic!("minilm-reference.json: items[{i}].text is not a string"))
                .to_string();
            let ids = item["input_ids"]
                .as_array()
                .unwrap_or_else(|| panic!("minilm-reference.json: items[{i}].input_ids"))
                .iter()
                .map(|v| v.as_i64().expect("input id is not an integer"))
                .collect();
            let embedding = item["embedding"]
                .as_array()
                .unwrap_or_else(|| panic!("minilm-reference.json: items[{i}].embedding"))
                .iter()
                .map(|v| v.as_f64().expect("embedding component is not a number") as f32)
                .collect();
            (text, ids, embedding)
        })
        .collect()
}

/// The reference cosine similarity of sentence 0 and sentence 1 (about 0.7553).
pub fn reference_cosine() -> f32 {
    reference_json()["cosine_sentence0_sentence1"]
        .as_f64()
        .expect("minilm-reference.json: cosine_sentence0_sentence1 is not a number") as f32
}

/// Cosine similarity of two vectors of the same length.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

/// Asserts `actual` and `expected` have the same length and differ by at most `tol` in every
/// component; the message names `label`, the worst component and both values.
pub fn assert_close(label: &str, actual: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{label}: length {} != expected {}",
        actual.len(),
        expected.len()
    );
    let (worst, diff) = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .enumerate()
        .fold((0, 0.0f32), |best, (i, d)| {
            if d > best.1 || d.is_nan() {
                (i, d)
            } else {
                best
            }
        });
    assert!(
        diff <= tol,
        "{label}: component {worst} differs by {diff:e} (actual {}, expected {}; tolerance {tol:e})",
        actual[worst],
        expected[worst]
    );
}

/// A `TEXT` input tensor, BYTES `[n, 1]`, one sentence per row.
pub fn text_tensor(texts: &[&str]) -> Tensor {
    let elements = texts
        .iter()
        .map(|t| Bytes::copy_from_slice(t.as_bytes()))
        .collect();
    Tensor::from_elements("TEXT", &[texts.len() as i64, 1], elements)
        .expect("a BYTES tensor of n elements and shape [n, 1]")
}

/// Splits an `EMBEDDING` output (FP32 `[n, dim]`) into its rows.
pub fn embedding_rows(output: &Tensor) -> Vec<Vec<f32>> {
    assert_eq!(
        output.shape().len(),
        2,
        "EMBEDDING shape {:?}",
        output.shape()
    );
    let dim = output.shape()[1];
    let values = output.f32_values().expect("EMBEDDING is FP32");
    assert_eq!(values.len(), output.shape()[0] * dim);
    values.chunks(dim.max(1)).map(<[f32]>::to_vec).collect()
}

/// libonnxruntime: `from_env` (the value `ORT_DYLIB_PATH` had), else the onnxruntime wheel under
/// `<workspace>/.venv`; panics with how to provision it.
pub fn ort_library_from(from_env: Option<std::ffi::OsString>) -> PathBuf {
    if let Some(p) = from_env.filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let lib = workspace_root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|pythons| {
            pythons.flatten().find_map(|python| {
                let capi = python.path().join("site-packages/onnxruntime/capi");
                std::fs::read_dir(capi).ok()?.flatten().find_map(|f| {
                    f.file_name()
                        .to_str()?
                        .starts_with("libonnxruntime.so.")
                        .then(|| f.path())
                })
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "no libonnxruntime: set ORT_DYLIB_PATH to libonnxruntime.so.*, or run \
                 `scripts/test` (or `.venv/bin/pip install onnxruntime==1.32.0`) so that {} holds \
                 python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*",
                lib.display()
            )
        })
}

/// libonnxruntime: `$ORT_DYLIB_PATH`, else the onnxruntime wheel under `<workspace>/.venv`.
pub fn ort_library() -> PathBuf {
    ort_library_from(std::env::var_os("ORT_DYLIB_PATH"))
}
