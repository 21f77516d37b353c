//! all-MiniLM-L6-v2 on ONNX Runtime through the shared sentence-embedding pipeline: the ONNX
//! export (`$VERALTHEIM_MINILM_ONNX`, default `.cache/models/all-MiniLM-L6-v2.onnx`) with the
//! tokenizer and pooling files of the sentence-transformers folder, against the float64 reference
//! embeddings of `testdata/minilm-reference.json`.
//!
//! Needs libonnxruntime: `ORT_DYLIB_PATH`, else the onnxruntime wheel in `<workspace>/.venv`.
#![cfg(feature = "onnx")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use veraltheim_models::onnx::{self, OnnxOptions};
use veraltheim_models::{Model, ModelConfig};

/// A model folder as the repository would hold it: `model.onnx` (a link to the export) beside
/// links to the sentence-transformers files (tokenizer, pooling, configs; not the safetensors).
fn embedder_folder() -> tempfile::TempDir {
    let source = common::minilm_dir();
    let onnx_file = common::minilm_onnx();
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(&source)
        .expect("read the MiniLM folder")
        .flatten()
    {
        let name = entry.file_name();
        if name == "model.safetensors" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), dir.path().join(&name)).expect("symlink");
    }
    std::os::unix::fs::symlink(&onnx_file, dir.path().join("model.onnx")).expect("symlink");
    dir
}

fn load(json: &str, intra_op_threads: usize) -> (Arc<dyn Model>, tempfile::TempDir) {
    let dir = embedder_folder();
    let config = ModelConfig::from_json(json).expect("config");
    let options = OnnxOptions {
        library: Some(common::ort_library()),
        intra_op_threads,
    };
    let model = onnx::load(config, dir.path(), &options).expect("MiniLM (ONNX) loads");
    (model, dir)
}

#[test]
fn embeddings_match_the_reference_batched_and_singly() {
    let (model, _dir) = load(r#"{"name":"minilm"}"#, 0);
    let c = model.config();
    assert_eq!(c.input.len(), 1);
    assert_eq!(c.input[0].name, "TEXT");
    assert_eq!(c.output[0].name, "EMBEDDING");
    assert_eq!(c.output[0].dims, vec![384]);

    let reference = common::reference();
    assert!(reference.len() >= 10, "the reference has its sentences");
    let texts: Vec<&str> = reference.iter().map(|(t, _, _)| t.as_str()).collect();
    let out = model
        .execute(&[common::text_tensor(&texts)])
        .expect("one mixed-length batch runs");
    assert_eq!(out.len(), 1);
    let rows = common::embedding_rows(&out[0]);
    assert_eq!(rows.len(), texts.len());
    for (i, ((text, _, expected), row)) in reference.iter().zip(&rows).enumerate() {
        common::assert_close(
            &format!("batched sentence {i} {text:.40?}"),
            row,
            expected,
            common::TOLERANCE,
        );
    }
    let cos = common::cosine(&rows[0], &rows[1]);
    assert!(
        (cos - common::reference_cosine()).abs() < 1e-4,
        "cosine {cos}"
    );

    for (i, (text, _, expected)) in reference.iter().enumerate() {
        let out = model
            .execute(&[common::text_tensor(&[text])])
            .expect("a single sentence runs");
        let rows = common::embedding_rows(&out[0]);
        assert_eq!(rows.len(), 1);
        common::assert_close(
            &format!("single sentence {i} {text:.40?}"),
            &rows[0],
            expected,
            common::TOLERANCE,
        );
    }
}

#[test]
fn two_instances_embed_concurrently() {
    let (model, _dir) = load(r#"{"name":"minilm","instance_group":[{"count":2}]}"#, 1);
    let reference = common::reference();
    std::thread::scope(|s| {
        for k in 0..2 {
            let (model, reference) = (&model, &reference);
            s.spawn(move || {
                for (i, (text, _, expected)) in reference.iter().enumerate().skip(k).step_by(2) {
                    let out = model
                        .execute(&[common::text_tensor(&[text])])
                        .expect("runs");
                    let rows = common::embedding_rows(&out[0]);
                    common::assert_close(
                        &format!("thread {k} sentence {i}"),
                        &rows[0],
                        expected,
                        common::TOLERANCE,
                    );
                }
            });
        }
    });
}

/// In-process throughput at batch 1, 8 and 32 (short sentences, ~14 tokens). A report, not an
/// assertion: `cargo test -p veraltheim-models --features onnx --release --test minilm_onnx --
/// --ignored --nocapture`.
#[test]
#[ignore = "a measurement; run by hand"]
fn throughput_report() {
    let (model, _dir) = load(r#"{"name":"minilm"}"#, 0);
    let sentences = [
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A woman is playing violin on the stage.",
        "Two men pushed carts through the woods.",
    ];
    for batch in [1usize, 8, 32] {
        let texts: Vec<&str> = (0..batch).map(|i| sentences[i % sentences.len()]).collect();
        let input = [common::text_tensor(&texts)];
        model.execute(&input).expect("warm-up");
        let start = Instant::now();
        let mut done = 0usize;
        while start.elapsed() < Duration::from_secs(3) {
            model.execute(&input).expect("runs");
            done += batch;
        }
        let rate = done as f64 / start.elapsed().as_secs_f64();
        eprintln!("MiniLM ONNX batch {batch:>2}: {rate:>7.1} sentences/s");
    }
}
