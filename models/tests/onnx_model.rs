//! The ONNX Runtime backend on real graphs: the small test graphs that `testdata/onnx_models.py`
//! writes (`scripts/provision-models` puts them in `.cache/models/onnx-test/`) and the ONNX export
//! of all-MiniLM-L6-v2 as a plain graph (no tokenizer beside it).
//!
//! Needs libonnxruntime: `ORT_DYLIB_PATH`, else the onnxruntime wheel in `<workspace>/.venv`.
#![cfg(feature = "onnx")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use veraltheim_models::onnx::{self, AUTO_MAX_BATCH_SIZE, GraphCache, OnnxOptions};
use veraltheim_models::{DataType, Error, Model, ModelConfig, Tensor, TensorData};

fn options() -> OnnxOptions {
    OnnxOptions {
        library: Some(common::ort_library()),
        intra_op_threads: 1,
        // These tests load the shared provisioned graphs: nothing is written beside them.
        cache: GraphCache::Off,
    }
}

/// `.cache/models/onnx-test/<name>`, written by `scripts/provision-models`.
fn graph_dir(name: &str) -> PathBuf {
    let dir = common::workspace_root()
        .join(".cache/models/onnx-test")
        .join(name);
    assert!(
        dir.join("model.onnx").is_file(),
        "{} is missing: run `scripts/provision-models` from the workspace root (it runs \
         testdata/onnx_models.py into .cache/models/onnx-test/)",
        dir.display()
    );
    dir
}

fn config(json: &str) -> ModelConfig {
    ModelConfig::from_json(json).expect("test config parses")
}

fn load(name: &str, json: &str) -> Result<Arc<dyn Model>, Error> {
    onnx::load(config(json), &graph_dir(name), &options())
}

fn raw(name: &str, datatype: DataType, shape: &[i64], bytes: Vec<u8>) -> Tensor {
    Tensor::from_raw(name, datatype, shape, Bytes::from(bytes)).expect("test tensor is valid")
}

fn i64_tensor(name: &str, shape: &[i64], values: &[i64]) -> Tensor {
    let mut b = BytesMut::new();
    values.iter().for_each(|v| b.put_i64_le(*v));
    raw(name, DataType::Int64, shape, b.to_vec())
}

fn i64_values(t: &Tensor) -> Vec<i64> {
    let TensorData::Fixed(b) = &t.data() else {
        panic!("{} is BYTES", t.name())
    };
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

#[test]
fn config_is_completed_from_the_graph() {
    let model = load("add_mul", r#"{"name":"add_mul"}"#).expect("add_mul loads");
    let c = model.config();
    assert_eq!(c.max_batch_size, AUTO_MAX_BATCH_SIZE);
    let names = |l: &[veraltheim_models::config::TensorConfig]| {
        l.iter()
            .map(|t| (t.name.clone(), t.data_type.clone(), t.dims.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&c.input),
        vec![
            ("A".into(), "TYPE_FP32".into(), vec![4]),
            ("B".into(), "TYPE_FP32".into(), vec![4])
        ]
    );
    assert_eq!(
        names(&c.output),
        vec![
            ("SUM".into(), "TYPE_FP32".into(), vec![4]),
            ("PRODUCT".into(), "TYPE_FP32".into(), vec![4])
        ]
    );

    let fixed = load("fixed_shape", r#"{"name":"fixed"}"#).expect("fixed_shape loads");
    assert_eq!(
        fixed.config().max_batch_size,
        0,
        "a fixed first dim is no batch dim"
    );
    assert_eq!(fixed.config().input[0].dims, vec![2, 3]);
}

#[test]
fn a_batch_computes_the_right_values() {
    let model = load("add_mul", r#"{"name":"add_mul","max_batch_size":8}"#).expect("loads");
    assert_eq!(
        model.config().max_batch_size,
        8,
        "an explicit bound is kept"
    );
    let a: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let b: Vec<f32> = (0..12).map(|v| 0.5 - v as f32 * 2.0).collect();
    let out = model
        .execute(&[
            Tensor::from_f32("A", vec![3, 4], &a).unwrap(),
            Tensor::from_f32("B", vec![3, 4], &b).unwrap(),
        ])
        .expect("runs");
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].name(), "SUM");
    assert_eq!(out[0].shape(), vec![3, 4]);
    assert_eq!(out[1].name(), "PRODUCT");
    let sum = out[0].f32_values().expect("FP32");
    let product = out[1].f32_values().expect("FP32");
    for i in 0..12 {
        assert_eq!(sum[i], a[i] + b[i], "SUM[{i}]");
        assert_eq!(product[i], a[i] * b[i], "PRODUCT[{i}]");
    }

    // A configured subset of outputs: only PRODUCT comes back.
    let only = load(
        "add_mul",
        r#"{"name":"add_mul","max_batch_size":8,
            "output":[{"name":"PRODUCT","data_type":"TYPE_FP32","dims":[4]}]}"#,
    )
    .expect("loads with a subset of outputs");
    let out = only
        .execute(&[
            Tensor::from_f32("A", vec![1, 4], &a[..4]).unwrap(),
            Tensor::from_f32("B", vec![1, 4], &b[..4]).unwrap(),
        ])
        .expect("runs");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name(), "PRODUCT");
    assert_eq!(out[0].f32_values().expect("FP32"), product[..4].to_vec());
}

#[test]
fn int64_and_fp16_outputs() {
    let model = load("int64_double", r#"{"name":"int64_double"}"#).expect("loads");
    let c = model.config();
    assert_eq!(c.input[0].data_type, "TYPE_INT64");
    assert_eq!(c.output[1].data_type, "TYPE_FP16");
    let x = [1i64, -2, 3, 1 << 40, 0, -7];
    let out = model
        .execute(&[i64_tensor("X", &[2, 3], &x)])
        .expect("runs");
    assert_eq!(out[0].datatype(), DataType::Int64);
    assert_eq!(
        i64_values(&out[0]),
        x.iter().map(|v| v * 2).collect::<Vec<_>>()
    );
    // FP16 of 1, -2, 3: 0x3C00, 0xC000, 0x4200.
    assert_eq!(out[1].datatype(), DataType::Fp16);
    assert_eq!(out[1].shape(), vec![2, 3]);
    let TensorData::Fixed(h) = &out[1].data() else {
        panic!("FP16 is fixed-size")
    };
    assert_eq!(&h[..6], &[0x00, 0x3C, 0x00, 0xC0, 0x00, 0x42]);
}

#[test]
fn every_fixed_size_type_round_trips() {
    let model = load("identity_types", r#"{"name":"identity_types"}"#).expect("loads");
    let inputs: Vec<Tensor> = model
        .config()
        .input
        .iter()
        .map(|t| {
            let datatype = ModelConfig::datatype_of(t);
            let size = datatype.element_size().expect("fixed size");
            let bytes: Vec<u8> = (0..(3 * 2 * size) as u8)
                .map(|i| match datatype {
                    DataType::Bool => i % 2,
                    // Keep FP16/BF16/FP32/FP64 patterns away from NaN (exponent all ones).
                    _ => i.wrapping_mul(7) & 0x3F,
                })
                .collect();
            raw(&t.name, datatype, &[3, 2], bytes)
        })
        .collect();
    assert_eq!(inputs.len(), 13, "one input per fixed-size type");
    let out = model.execute(&inputs).expect("runs");
    for (i, o) in inputs.iter().zip(&out) {
        assert_eq!(o.name(), i.name().replace("IN_", "OUT_"));
        assert_eq!(o.datatype(), i.datatype(), "{}", o.name());
        assert_eq!(o.shape(), i.shape(), "{}", o.name());
        assert_eq!(o.data(), i.data(), "{} changed its bytes", o.name());
    }
}

#[test]
fn a_config_naming_a_wrong_input_or_type_fails_naming_it() {
    let e = load(
        "add_mul",
        r#"{"name":"m","max_batch_size":4,"input":[
            {"name":"A","data_type":"TYPE_FP32","dims":[4]},
            {"name":"WRONG","data_type":"TYPE_FP32","dims":[4]}]}"#,
    )
    .err()
    .expect("a config naming an input the graph lacks is refused");
    let msg = e.to_string();
    assert!(matches!(e, Error::Load { .. }), "{msg}");
    assert!(
        msg.contains("'WRONG'") && msg.contains("not in the graph"),
        "{msg}"
    );

    let e = load(
        "add_mul",
        r#"{"name":"m","max_batch_size":4,"input":[
            {"name":"A","data_type":"TYPE_FP32","dims":[4]},
            {"name":"B","data_type":"TYPE_INT32","dims":[4]}]}"#,
    )
    .err()
    .expect("a config with the wrong type is refused");
    let msg = e.to_string();
    assert!(
        msg.contains("'B'") && msg.contains("TYPE_INT32") && msg.contains("TYPE_FP32"),
        "{msg}"
    );

    let e = load(
        "add_mul",
        r#"{"name":"m","max_batch_size":4,"output":[{"name":"SUM","data_type":"TYPE_FP32","dims":[3]}]}"#,
    )
    .err()
    .expect("incompatible dims are refused");
    assert!(e.to_string().contains("'SUM'"), "{e}");
}

fn strings<E: AsRef<[u8]>>(name: &str, shape: &[i64], elements: &[E]) -> Tensor {
    let elements = elements
        .iter()
        .map(|e| Bytes::copy_from_slice(e.as_ref()))
        .collect();
    Tensor::from_elements(name, shape, elements).expect("test BYTES tensor is valid")
}

fn elements(t: &Tensor) -> Vec<Vec<u8>> {
    let TensorData::Bytes(e) = t.data() else {
        panic!("{} is not BYTES", t.name())
    };
    e.iter().map(|b| b.to_vec()).collect()
}

#[test]
fn string_tensors_pass_through_as_bytes_unchanged() {
    let model = load("simple_identity", r#"{"name":"simple_identity"}"#).expect("loads");
    let c = model.config();
    assert_eq!(c.input[0].data_type, "TYPE_STRING");
    assert_eq!(c.output[0].data_type, "TYPE_STRING");
    assert_eq!(c.max_batch_size, AUTO_MAX_BATCH_SIZE);
    // Empty, ASCII, UTF-8 and bytes that are not UTF-8 come back as they went in, in a [2, 3]
    // batch.
    let given: [&[u8]; 6] = [
        b"",
        b"hello",
        "naïve café ✓".as_bytes(),
        b"\xff\xfe\x80",
        b"a longer element, with spaces and punctuation!",
        b"x",
    ];
    let out = model
        .execute(&[strings("INPUT0", &[2, 3], &given)])
        .expect("identity on strings runs");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name(), "OUTPUT0");
    assert_eq!(out[0].datatype(), DataType::Bytes);
    assert_eq!(out[0].shape(), &[2, 3]);
    assert_eq!(elements(&out[0]), given.map(<[u8]>::to_vec).to_vec());
}

#[test]
fn strings_cast_to_numbers_and_back() {
    let model = load(
        "simple_string",
        r#"{"name":"simple_string","max_batch_size":8}"#,
    )
    .expect("loads");
    let a: Vec<String> = (0..32).map(|i| (i * 7 - 50).to_string()).collect();
    let b: Vec<String> = (0..32).map(|i| (3 - i).to_string()).collect();
    let out = model
        .execute(&[
            strings("INPUT0", &[2, 16], &a),
            strings("INPUT1", &[2, 16], &b),
        ])
        .expect("add/sub on strings runs");
    let numbers = |t: &Tensor| -> Vec<i64> {
        elements(t)
            .iter()
            .map(|e| std::str::from_utf8(e).unwrap().parse().unwrap())
            .collect()
    };
    let want_sum: Vec<i64> = (0..32).map(|i| (i * 7 - 50) + (3 - i)).collect();
    let want_diff: Vec<i64> = (0..32).map(|i| (i * 7 - 50) - (3 - i)).collect();
    assert_eq!(out[0].name(), "OUTPUT0");
    assert_eq!(out[0].shape(), &[2, 16]);
    assert_eq!(numbers(&out[0]), want_sum);
    assert_eq!(numbers(&out[1]), want_diff);
}

#[test]
fn bad_string_inputs_are_refused_by_name() {
    let model = load("simple_identity", r#"{"name":"simple_identity"}"#).expect("loads");
    let nul = strings("INPUT0", &[1, 2], &[b"ok" as &[u8], b"nul\0inside"]);
    // Before the request is queued (so that it fails alone, not its batch)...
    let reason = model
        .check_request(std::slice::from_ref(&nul))
        .expect_err("refused before the queue");
    assert!(
        reason.contains("'INPUT0'") && reason.contains("element 1") && reason.contains("NUL"),
        "{reason}"
    );
    let ok = strings("INPUT0", &[1, 2], &["a", "b"]);
    model.check_request(&[ok]).expect("no NUL, no refusal");
    // ...and by the batch, should one reach it.
    let e = model
        .execute(&[nul])
        .expect_err("a NUL byte cannot go into an ONNX string");
    let msg = e.to_string();
    assert!(
        msg.contains("'INPUT0'") && msg.contains("element 1") && msg.contains("NUL"),
        "{msg}"
    );
    // A string that is not a number: ONNX Runtime's Cast fails, the batch fails with its word.
    let model = load("simple_string", r#"{"name":"simple_string"}"#).expect("loads");
    let mut a = vec!["1"; 16];
    a[3] = "three";
    let e = model
        .execute(&[
            strings("INPUT0", &[1, 16], &a),
            strings("INPUT1", &[1, 16], &["1"; 16]),
        ])
        .expect_err("Cast of 'three' to INT32 fails");
    assert!(
        matches!(e, Error::Execution { .. }) && e.to_string().contains("ONNX Runtime"),
        "{e}"
    );
    // BYTES where the model takes FP32, and FP32 where it takes BYTES.
    let add_mul = load("add_mul", r#"{"name":"add_mul"}"#).expect("loads");
    let b = Tensor::from_f32("B", vec![1, 4], &[0.0; 4]).unwrap();
    let e = add_mul
        .execute(&[strings("A", &[1, 4], &["1"; 4]), b.clone()])
        .expect_err("BYTES input to an FP32 graph input");
    assert!(
        e.to_string().contains("'A'") && e.to_string().contains("FP32"),
        "{e}"
    );
    let identity = load("string_input", r#"{"name":"strings"}"#).expect("loads");
    let e = identity
        .execute(&[b.renamed("S")])
        .expect_err("FP32 input to a string graph input");
    assert!(
        e.to_string().contains("'S'") && e.to_string().contains("BYTES"),
        "{e}"
    );
}

#[test]
fn bad_batches_fail_without_panicking() {
    let model = load("add_mul", r#"{"name":"add_mul","max_batch_size":2}"#).expect("loads");
    let ones = |rows: usize| Tensor::from_f32("A", vec![rows, 4], &vec![1.0; rows * 4]).unwrap();
    let e = model.execute(&[ones(1)]).expect_err("one input of two");
    assert!(e.to_string().contains("expected 2 inputs"), "{e}");
    let b = ones(2).renamed("B");
    let e = model.execute(&[ones(1), b]).expect_err("row counts differ");
    assert!(e.to_string().contains("rows"), "{e}");
    let b = ones(3).renamed("B");
    let e = model
        .execute(&[ones(3), b])
        .expect_err("above max_batch_size");
    assert!(e.to_string().contains("max_batch_size 2"), "{e}");
    let wrong_width = Tensor::from_f32("B", vec![1, 3], &[1.0; 3]).unwrap();
    let e = model
        .execute(&[ones(1), wrong_width])
        .expect_err("ONNX Runtime refuses a wrong width");
    assert!(
        matches!(e, Error::Execution { .. }) && e.to_string().contains("ONNX Runtime"),
        "{e}"
    );
    let int = i64_tensor("A", &[1, 4], &[1, 2, 3, 4]);
    let e = model
        .execute(&[int, ones(1)])
        .expect_err("INT64 where FP32 is configured");
    assert!(e.to_string().contains("FP32"), "{e}");
}

#[test]
fn instances_run_batches_concurrently() {
    let model = load(
        "add_mul",
        r#"{"name":"add_mul","max_batch_size":4,"instance_group":[{"count":2}]}"#,
    )
    .expect("loads two instances");
    std::thread::scope(|s| {
        for k in 0..4 {
            let model = &model;
            s.spawn(move || {
                for i in 0..50 {
                    let v = (k * 1000 + i) as f32;
                    let out = model
                        .execute(&[
                            Tensor::from_f32("A", vec![1, 4], &[v; 4]).unwrap(),
                            Tensor::from_f32("B", vec![1, 4], &[2.0; 4]).unwrap(),
                        ])
                        .expect("runs");
                    assert_eq!(out[0].f32_values().expect("FP32"), vec![v + 2.0; 4]);
                    assert_eq!(out[1].f32_values().expect("FP32"), vec![v * 2.0; 4]);
                }
            });
        }
    });
}

#[test]
fn missing_graph_and_odd_file_names_fail_at_load() {
    let empty = tempfile::tempdir().expect("temp dir");
    let e = onnx::load(config(r#"{"name":"m"}"#), empty.path(), &options())
        .err()
        .expect("no model.onnx");
    assert!(e.to_string().contains("model.onnx"), "{e}");
    std::fs::write(empty.path().join("model.onnx"), b"not a graph").expect("write");
    let e = onnx::load(config(r#"{"name":"m"}"#), empty.path(), &options())
        .err()
        .expect("a file that is not ONNX");
    assert!(
        matches!(e, Error::Load { .. }) && e.to_string().contains("ONNX Runtime cannot open"),
        "{e}"
    );
    let e = load(
        "add_mul",
        r#"{"name":"m","parameters":{"model_filename":{"string_value":"../fixed_shape/model.onnx"}}}"#,
    )
    .err()
    .expect("a path outside the folder");
    assert!(e.to_string().contains("model_filename"), "{e}");
    let e = load(
        "add_mul",
        r#"{"name":"m","parameters":{"intra_op_threads":{"string_value":"many"}}}"#,
    )
    .err()
    .expect("a bad thread count");
    assert!(e.to_string().contains("intra_op_threads"), "{e}");
}

/// A folder holding only `model.onnx` (a link to `target`): no tokenizer, so a plain graph.
fn folder_with_graph(target: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(target, dir.path().join("model.onnx")).expect("symlink");
    dir
}

#[test]
fn minilm_as_a_plain_graph() {
    let onnx_file = common::minilm_onnx();
    let dir = folder_with_graph(&onnx_file);
    let model = onnx::load(config(r#"{"name":"minilm_raw"}"#), dir.path(), &options())
        .expect("the MiniLM export loads as a plain graph");
    let c = model.config();
    assert_eq!(c.max_batch_size, AUTO_MAX_BATCH_SIZE);
    let inputs: Vec<&str> = c.input.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(inputs, ["input_ids", "attention_mask", "token_type_ids"]);
    for t in &c.input {
        assert_eq!(t.data_type, "TYPE_INT64", "{}", t.name);
        assert_eq!(c.full_shape(t), vec![-1, -1], "{}", t.name);
    }
    assert_eq!(c.output.len(), 1);
    assert_eq!(c.output[0].name, "last_hidden_state");
    assert_eq!(c.output[0].data_type, "TYPE_FP32");
    assert_eq!(c.full_shape(&c.output[0]), vec![-1, -1, 384]);

    // Sentence 0 of the reference, by hand: its ids, mean pooling, L2 norm.
    let (text, ids, expected) = common::reference().swap_remove(0);
    let n = ids.len();
    let out = model
        .execute(&[
            i64_tensor("input_ids", &[1, n as i64], &ids),
            i64_tensor("attention_mask", &[1, n as i64], &vec![1; n]),
            i64_tensor("token_type_ids", &[1, n as i64], &vec![0; n]),
        ])
        .expect("runs");
    assert_eq!(out[0].shape(), vec![1, n, 384]);
    let hidden = out[0].f32_values().expect("FP32");
    let mut pooled = vec![0f32; 384];
    for row in hidden.chunks(384) {
        pooled
            .iter_mut()
            .zip(row)
            .for_each(|(p, h)| *p += h / n as f32);
    }
    let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt();
    pooled.iter_mut().for_each(|v| *v /= norm);
    common::assert_close(&format!("'{text}'"), &pooled, &expected, common::TOLERANCE);
}

#[test]
fn a_tokenizer_beside_a_graph_without_token_inputs_is_refused_as_an_encoder() {
    let dir = folder_with_graph(&graph_dir("add_mul").join("model.onnx"));
    std::os::unix::fs::symlink(
        common::minilm_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .expect("symlink");
    let e = onnx::load(config(r#"{"name":"m"}"#), dir.path(), &options())
        .err()
        .expect("add_mul is no text encoder");
    let msg = e.to_string();
    assert!(
        msg.contains("text encoder") && msg.contains("'input_ids'"),
        "{msg}"
    );
    // Naming the graph's inputs in the configuration asks for the plain graph instead.
    let plain = onnx::load(
        config(
            r#"{"name":"m","max_batch_size":2,"input":[
                {"name":"A","data_type":"TYPE_FP32","dims":[4]},
                {"name":"B","data_type":"TYPE_FP32","dims":[4]}]}"#,
        ),
        dir.path(),
        &options(),
    )
    .expect("a plain graph despite the tokenizer");
    assert_eq!(plain.config().output.len(), 2);
}

/// A writable folder holding a copy of `name`'s graph (the cache is written beside it).
fn copied_graph(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        graph_dir(name).join("model.onnx"),
        dir.path().join("model.onnx"),
    )
    .expect("copy the graph");
    dir
}

fn cached_load(dir: &Path, json: &str) -> Arc<dyn Model> {
    let options = OnnxOptions {
        cache: GraphCache::default(),
        ..options()
    };
    onnx::load(config(json), dir, &options).expect("loads")
}

fn cache_note(model: &Arc<dyn Model>) -> String {
    model
        .config()
        .parameter(onnx::PARAM_GRAPH_CACHE)
        .expect("the cache's outcome is in the effective parameters")
        .to_string()
}

fn assert_add_mul_computes(model: &Arc<dyn Model>) {
    let a = [1.0f32, 2.0, 3.0, 4.0];
    let b = [0.5f32, -1.0, 2.0, 8.0];
    let out = model
        .execute(&[
            Tensor::from_f32("A", vec![1, 4], &a).unwrap(),
            Tensor::from_f32("B", vec![1, 4], &b).unwrap(),
        ])
        .expect("runs");
    let sum = out[0].f32_values().expect("FP32");
    let product = out[1].f32_values().expect("FP32");
    for i in 0..4 {
        assert_eq!(sum[i], a[i] + b[i], "SUM[{i}]");
        assert_eq!(product[i], a[i] * b[i], "PRODUCT[{i}]");
    }
}

#[test]
fn the_optimised_graph_is_cached_beside_the_model_and_reused() {
    let dir = copied_graph("add_mul");
    let json = r#"{"name":"add_mul","max_batch_size":4}"#;
    let first = cached_load(dir.path(), json);
    let note = cache_note(&first);
    assert!(note.starts_with("built "), "{note}");
    assert_eq!(
        first.config().parameter(onnx::PARAM_OPTIMIZATION),
        Some("all")
    );
    assert!(dir.path().join(".model.onnx.all.optimized.onnx").is_file());
    assert!(dir.path().join(".model.onnx.all.optimized.json").is_file());
    assert_add_mul_computes(&first);

    let again = cached_load(dir.path(), json);
    let note = cache_note(&again);
    assert!(note.starts_with("hit "), "{note}");
    assert_add_mul_computes(&again);

    // Another level is another cache entry; `none` is never cached.
    let basic = cached_load(
        dir.path(),
        r#"{"name":"add_mul","max_batch_size":4,"parameters":{"onnx_optimization":{"string_value":"basic"}}}"#,
    );
    assert!(cache_note(&basic).starts_with("built "));
    assert!(
        dir.path()
            .join(".model.onnx.basic.optimized.onnx")
            .is_file()
    );
    let none = cached_load(
        dir.path(),
        r#"{"name":"add_mul","max_batch_size":4,"parameters":{"onnx_optimization":{"string_value":"none"}}}"#,
    );
    assert_eq!(cache_note(&none), "off");
    assert_add_mul_computes(&none);
    let e = onnx::load(
        config(r#"{"name":"m","parameters":{"onnx_optimization":{"string_value":"max"}}}"#),
        dir.path(),
        &options(),
    )
    .err()
    .expect("an unknown level");
    assert!(e.to_string().contains("onnx_optimization"), "{e}");
}

#[test]
fn a_corrupt_or_stale_cached_graph_is_rebuilt_not_served() {
    let dir = copied_graph("add_mul");
    let json = r#"{"name":"add_mul","max_batch_size":4}"#;
    cached_load(dir.path(), json);
    let cached = dir.path().join(".model.onnx.all.optimized.onnx");

    // Corrupt: one byte changed in the middle, same length.
    let mut bytes = std::fs::read(&cached).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&cached, &bytes).unwrap();
    let model = cached_load(dir.path(), json);
    let note = cache_note(&model);
    assert!(
        note.starts_with("built ") && note.contains("corrupt"),
        "{note}"
    );
    assert_add_mul_computes(&model);
    // Truncated.
    let len = std::fs::metadata(&cached).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&cached)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let model = cached_load(dir.path(), json);
    assert!(
        cache_note(&model).contains("corrupt"),
        "{}",
        cache_note(&model)
    );
    assert_add_mul_computes(&model);
    assert!(cache_note(&cached_load(dir.path(), json)).starts_with("hit "));

    // Stale: the source graph is replaced by another; the new one is served.
    std::fs::copy(
        graph_dir("fixed_shape").join("model.onnx"),
        dir.path().join("model.onnx"),
    )
    .unwrap();
    let model = cached_load(dir.path(), r#"{"name":"fixed"}"#);
    let note = cache_note(&model);
    assert!(note.contains("stale: the source graph changed"), "{note}");
    assert_eq!(model.config().input[0].dims, vec![2, 3], "the new graph");
}

/// The ceiling's second GEMM: ONNX Runtime's own `MatMul` on a graph written in memory. The
/// warm-up product is checked against dot products inside `matmul_rate`, so a wrong graph or a
/// wrong product is an error here, not a rate.
#[test]
fn onnx_runtime_matmul_is_measured_on_a_graph_written_in_memory() {
    let rate = onnx::matmul::matmul_rate(
        (48, 32, 40),
        1,
        std::time::Duration::from_millis(40),
        2,
        Some(&common::ort_library()),
    )
    .expect("the product runs and matches the dot products");
    assert!(rate.products >= 2, "{rate:?}");
    assert!(rate.gflops > 0.0 && rate.gflops.is_finite(), "{rate:?}");
}
