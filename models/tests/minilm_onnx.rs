//! all-MiniLM-L6-v2 on ONNX Runtime through the shared sentence-embedding pipeline: the ONNX
//! export (`$VERALTHEIM_MINILM_ONNX`, default `.cache/models/all-MiniLM-L6-v2.onnx`) with the
//! tokenizer and pooling files of the sentence-transformers folder, against the float64 reference
//! embeddings of `testdata/minilm-reference.json`.
//!
//! Needs libonnxruntime: `ORT_DYLIB_PATH`, else the onnxruntime wheel in `<workspace>/.venv`.
#![cfg(feature = "onnx")]

mod common;

use std::path::Path;
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
    let model = load_in(dir.path(), json, intra_op_threads);
    (model, dir)
}

/// Loads the MiniLM folder `dir` (its graph cache beside it).
fn load_in(dir: &Path, json: &str, intra_op_threads: usize) -> Arc<dyn Model> {
    let config = ModelConfig::from_json(json).expect("config");
    let options = OnnxOptions {
        library: Some(common::ort_library()),
        intra_op_threads,
        ..OnnxOptions::default()
    };
    onnx::load(config, dir, &options).expect("MiniLM (ONNX) loads")
}

fn param(model: &Arc<dyn Model>, key: &str) -> String {
    model
        .config()
        .parameter(key)
        .unwrap_or_else(|| panic!("no effective parameter '{key}'"))
        .to_string()
}

/// The reference sentences embedded in one batch, each row checked against the reference.
fn embed_reference(model: &Arc<dyn Model>, what: &str) -> Vec<Vec<f32>> {
    let reference = common::reference();
    let texts: Vec<&str> = reference.iter().map(|(t, _, _)| t.as_str()).collect();
    let out = model
        .execute(&[common::text_tensor(&texts)])
        .expect("a batch runs");
    let rows = common::embedding_rows(&out[0]);
    for (i, ((_, _, expected), row)) in reference.iter().zip(&rows).enumerate() {
        common::assert_close(
            &format!("{what}: sentence {i}"),
            row,
            expected,
            common::TOLERANCE,
        );
    }
    rows
}

const NO_SWEEP: &str = r#"{"name":"minilm","parameters":{"onnx_sweep":{"string_value":"false"}}}"#;

#[test]
fn the_fused_graph_is_checked_cached_and_reused() {
    let dir = embedder_folder();
    let first = load_in(dir.path(), NO_SWEEP, 0);
    assert_eq!(param(&first, onnx::PARAM_OPTIMIZATION), "all");
    let check = param(&first, onnx::PARAM_CHECK);
    assert!(
        check.starts_with("all kept") && check.contains("measured"),
        "{check}"
    );
    let cache = param(&first, onnx::PARAM_GRAPH_CACHE);
    assert!(cache.starts_with("built "), "{cache}");
    assert!(dir.path().join(".model.onnx.all.optimized.onnx").is_file());
    let rows = embed_reference(&first, "first load");
    drop(first);

    let again = load_in(dir.path(), NO_SWEEP, 0);
    assert!(param(&again, onnx::PARAM_GRAPH_CACHE).starts_with("hit "));
    let check = param(&again, onnx::PARAM_CHECK);
    assert!(
        check.contains("recorded"),
        "the check is not run again: {check}"
    );
    let cached_rows = embed_reference(&again, "cached graph");
    for (i, (a, b)) in rows.iter().zip(&cached_rows).enumerate() {
        common::assert_close(&format!("cached vs built, sentence {i}"), b, a, 1e-6);
    }

    // A corrupt cached graph is rebuilt, and the model still embeds right.
    let cached = dir.path().join(".model.onnx.all.optimized.onnx");
    let mut bytes = std::fs::read(&cached).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x55;
    std::fs::write(&cached, &bytes).unwrap();
    let rebuilt = load_in(dir.path(), NO_SWEEP, 0);
    let cache = param(&rebuilt, onnx::PARAM_GRAPH_CACHE);
    assert!(
        cache.starts_with("built ") && cache.contains("corrupt"),
        "{cache}"
    );
    embed_reference(&rebuilt, "rebuilt graph");

    // A record made from another source graph is stale.
    let record = dir.path().join(".model.onnx.all.optimized.json");
    let text = std::fs::read_to_string(&record).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["key"]["source_sha256"] = "0".repeat(64).into();
    std::fs::write(&record, json.to_string()).unwrap();
    let rebuilt = load_in(dir.path(), NO_SWEEP, 0);
    let cache = param(&rebuilt, onnx::PARAM_GRAPH_CACHE);
    assert!(cache.contains("stale: the source graph changed"), "{cache}");
}

#[test]
fn a_fused_graph_beyond_the_tolerance_falls_back_to_basic() {
    // Tolerance 0: the fused graph sums in another order, so it differs in the last bits.
    let (model, dir) = load(
        r#"{"name":"minilm","parameters":{"onnx_sweep":{"string_value":"false"},
            "onnx_check_tolerance":{"string_value":"0"}}}"#,
        0,
    );
    assert_eq!(param(&model, onnx::PARAM_OPTIMIZATION), "basic");
    let check = param(&model, onnx::PARAM_CHECK);
    assert!(
        check.contains("refused") && check.contains("fell back to basic"),
        "{check}"
    );
    assert!(
        dir.path()
            .join(".model.onnx.basic.optimized.onnx")
            .is_file()
    );
    embed_reference(&model, "basic after the fallback");

    let basic = load_in(
        dir.path(),
        r#"{"name":"minilm","parameters":{"onnx_sweep":{"string_value":"false"},
            "onnx_optimization":{"string_value":"basic"}}}"#,
        0,
    );
    assert_eq!(param(&basic, onnx::PARAM_OPTIMIZATION), "basic");
    assert!(param(&basic, onnx::PARAM_CHECK).contains("nothing to check"));
    embed_reference(&basic, "basic asked for");
}

#[test]
fn the_sweep_picks_threads_and_instances_unless_they_are_set() {
    let (model, _dir) = load(r#"{"name":"minilm"}"#, 0);
    let sweep = param(&model, onnx::PARAM_SWEEP_RESULT);
    assert!(
        sweep.starts_with("chose ") && sweep.contains("/s"),
        "{sweep}"
    );
    let instances: usize = param(&model, onnx::PARAM_INSTANCES).parse().unwrap();
    assert!((1..=2).contains(&instances), "{instances}");
    assert_eq!(model.config().instance_count(), instances);
    embed_reference(&model, "after the sweep");

    let (set, _dir) = load(
        r#"{"name":"minilm","instance_group":[{"count":2}],
            "parameters":{"intra_op_threads":{"string_value":"1"}}}"#,
        0,
    );
    assert!(param(&set, onnx::PARAM_SWEEP_RESULT).starts_with("skipped"));
    assert_eq!(param(&set, onnx::PARAM_INTRA_OP_THREADS_CHOSEN), "1");
    assert_eq!(param(&set, onnx::PARAM_INSTANCES), "2");
    assert_eq!(set.config().instance_count(), 2);

    // Only the instance count set: threads × instances stay within the cores (on two cores,
    // one thread each, whether the sweep ran over what fits or one arrangement was left).
    let (count_only, _dir) = load(r#"{"name":"minilm","instance_group":[{"count":2}]}"#, 0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: usize = param(&count_only, onnx::PARAM_INTRA_OP_THREADS_CHOSEN)
        .parse()
        .unwrap_or_else(|_| {
            panic!(
                "ONNX Runtime's default threads beside a set count: {}",
                param(&count_only, onnx::PARAM_SWEEP_RESULT)
            )
        });
    assert_eq!(param(&count_only, onnx::PARAM_INSTANCES), "2");
    assert!(
        threads * 2 <= cores.max(2),
        "{threads} threads x 2 instances on {cores} cores"
    );
    embed_reference(&count_only, "one arrangement left");
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

/// In-process throughput at batch 1, 8 and 32 (short sentences, ~14 tokens), at the basic and
/// the full optimisation level (one instance, ONNX Runtime's default threads), and what the sweep
/// of a default load chooses. A report, not an assertion: `cargo test -p veraltheim-models
/// --features onnx --release --test minilm_onnx -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement; run by hand"]
fn throughput_report() {
    let sentences = [
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A woman is playing violin on the stage.",
        "Two men pushed carts through the woods.",
    ];
    let t0 = Instant::now();
    let (swept, _dir) = load(r#"{"name":"minilm"}"#, 0);
    eprintln!(
        "default load {:.2}s: {} | {} | {}",
        t0.elapsed().as_secs_f64(),
        param(&swept, onnx::PARAM_OPTIMIZATION),
        param(&swept, onnx::PARAM_CHECK),
        param(&swept, onnx::PARAM_SWEEP_RESULT)
    );
    drop(swept);
    for level in ["basic", "all", "basic", "all"] {
        let json = format!(
            r#"{{"name":"minilm","instance_group":[{{"count":1}}],
                "parameters":{{"onnx_optimization":{{"string_value":"{level}"}}}}}}"#
        );
        let (model, _dir) = load(&json, 0);
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
            eprintln!("MiniLM ONNX {level:>5} batch {batch:>2}: {rate:>7.1} sentences/s");
        }
    }
}

/// `models import --quantize int8` on the real export: the int8 graph replaces the FP32 one, the
/// configuration records the accuracy measured against it, and the served model stays close to
/// the float64 reference on every reference sentence.
#[test]
fn an_int8_import_records_its_accuracy_and_stays_close_to_the_reference() {
    use veraltheim_models::onnx::quantize;
    use veraltheim_models::repository::{
        ImportBackend, ImportOptions, ImportQuantize, Repository, import_sentence_transformers,
    };
    let repo = tempfile::tempdir().expect("temp dir");
    let options = ImportOptions {
        name: "minilm-int8".into(),
        backend: ImportBackend::OnnxRuntime,
        onnx: Some(common::minilm_onnx()),
        max_batch_size: 16,
        force: false,
        quantize: Some(ImportQuantize::Int8),
        onnxruntime_library: Some(common::ort_library()),
    };
    let dir = import_sentence_transformers(&common::minilm_dir(), repo.path(), &options)
        .expect("the int8 import");
    let version = dir.join("1");
    let names: Vec<String> = std::fs::read_dir(&version)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".onnx"))
        .collect();
    assert_eq!(names, ["model.onnx"], "only the int8 graph is left");
    let graph = std::fs::read(version.join("model.onnx")).unwrap();
    let fp32 = std::fs::metadata(common::minilm_onnx()).unwrap().len();
    // The 36 weight matrices (10.6 M values) shrink to a quarter; the word-embedding table
    // (11.7 M values, read by a Gather) stays FP32: about 59 MB of 91.
    assert!(
        (graph.len() as u64) < fp32 * 7 / 10,
        "int8 weights: {} bytes against {fp32}",
        graph.len()
    );
    let again = quantize::quantize_int8(&graph).unwrap_err().to_string();
    assert!(again.contains("already quantised"), "{again}");

    let model = Repository::new(repo.path()).model("minilm-int8").unwrap();
    let p = |k: &str| model.config.parameter(k).unwrap_or_default().to_string();
    assert_eq!(p(quantize::PARAM_QUANTIZATION), "int8");
    // The 36 products by a weight matrix; the 12 of attention multiply two activations.
    assert_eq!(p(quantize::PARAM_MATMULS), "36 of 48");
    let sentences: usize = p(quantize::PARAM_SENTENCES).parse().unwrap();
    assert_eq!(sentences, quantize::accuracy_texts().len());
    let min: f64 = p(quantize::PARAM_COSINE_MIN).parse().unwrap();
    let mean: f64 = p(quantize::PARAM_COSINE_MEAN).parse().unwrap();
    assert!(min <= mean && mean < 1.0, "min {min}, mean {mean}");
    // Measured here: min 0.9515 (the shortest texts: a few tokens, padded in a batch of 16,
    // share one activation scale with longer ones), mean 0.991. A wrong scale or a wrong
    // operand order gives cosines far below these bounds.
    assert!(min > 0.9 && mean > 0.98, "min {min}, mean {mean}");

    // Served as the server would (the config as written), against the float64 reference.
    let served = load_in(&version, &serde_json::to_string(&model.config).unwrap(), 0);
    let reference = common::reference();
    let texts: Vec<&str> = reference.iter().map(|(t, _, _)| t.as_str()).collect();
    let out = served
        .execute(&[common::text_tensor(&texts)])
        .expect("a batch runs");
    for (i, (row, (text, _, expected))) in common::embedding_rows(&out[0])
        .iter()
        .zip(&reference)
        .enumerate()
    {
        let c = common::cosine(row, expected);
        assert!(
            c > 0.95,
            "sentence {i} ({text:?}): cosine {c} to the reference"
        );
    }
}

/// ONNX Runtime's profile of the encoder: the products dominate MiniLM's kernel time (the
/// linear layers are ~21 MFLOP per token against a few thousand element-wise operations), the
/// element-wise and normalisation kernels are there too, and the profile file is removed.
#[test]
fn the_profile_names_the_operator_types_and_the_products_lead() {
    let dir = embedder_folder();
    let scratch = tempfile::tempdir().expect("scratch");
    let config = ModelConfig::from_json(r#"{"name": "minilm"}"#).expect("config");
    let options = OnnxOptions {
        library: Some(common::ort_library()),
        intra_op_threads: 1,
        ..OnnxOptions::default()
    };
    let p = onnx::profile::profile_encoder(&config, dir.path(), &options, 4, 12, 3, scratch.path())
        .expect("the encoder is profiled");
    assert_eq!((p.rows, p.seq, p.runs, p.intra_op_threads), (4, 12, 3, 1));
    assert_eq!(
        p.ops[0].op, "MatMul",
        "the largest operator type: {:?}",
        p.ops
    );
    assert!(
        p.ops.iter().any(|o| o.op.contains("LayerNormalization")),
        "{:?}",
        p.ops
    );
    // Every node ran once per profiled run: 6 layers × (Q, K, V, output, two FFN) linear
    // products at least, per run.
    let matmul_calls: u64 = p
        .ops
        .iter()
        .filter(|o| onnx::profile::MATMUL_OPS.contains(&o.op.as_str()))
        .map(|o| o.calls)
        .sum();
    assert!(
        matmul_calls >= 36 * 3,
        "{matmul_calls} product calls in 3 runs"
    );
    assert_eq!(matmul_calls % 3, 0, "each run calls the same nodes");
    let (wall, kernels) = (p.matmul_share_of_wall(), p.matmul_share_of_kernels());
    assert!(
        wall > 0.0 && wall <= kernels && kernels < 1.0,
        "{wall} {kernels}"
    );
    assert_eq!(
        std::fs::read_dir(scratch.path()).expect("scratch").count(),
        0,
        "the profile file is removed"
    );
}
