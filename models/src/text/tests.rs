//! The pipeline's tests: pooling, the folder's files, the tokenizer, configuration and the
//! model, with a word-level tokenizer and a fake encoder that shows any padding it is given.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use std::path::{Path, PathBuf};

use super::embedder::embedding_output;
use super::*;
use crate::config::ModelConfig;
use crate::model::{Model, TokenCount};
use crate::tensor::Tensor;

/// A temporary model folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "veraltheim-text-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, file: &str, text: &str) -> &TempDir {
        let path = self.0.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        self
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The word-level tokenizer of these tests, padded to 16 tokens.
fn tokenizer() -> String {
    super::word_level_tokenizer_json(&["hello", "world", "big", "cat"], Some(16))
}

const MEAN: &str = r#"{"word_embedding_dimension": 2, "pooling_mode_mean_tokens": true,
    "pooling_mode_cls_token": false, "pooling_mode_max_tokens": false}"#;

const NORMALIZE_MODULES: &str = r#"[
  {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
  {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
]"#;

/// A fake encoder (hidden size 2): a real token at position t with id i becomes [i, t]; a
/// padding position becomes [1000, -1000], which would show in any pooling that saw it.
#[derive(Default)]
struct FakeEncoder {
    seen: Mutex<Vec<TokenBatch>>,
    wrong_length: bool,
}

impl Encoder for FakeEncoder {
    fn hidden_size(&self) -> usize {
        2
    }

    fn encode(&self, batch: &TokenBatch) -> Result<Vec<f32>, Error> {
        self.seen.lock().unwrap().push(batch.clone());
        let mut out = Vec::new();
        for b in 0..batch.batch {
            for t in 0..batch.seq {
                let at = b * batch.seq + t;
                if batch.attention_mask[at] == 1 {
                    out.extend([batch.input_ids[at] as f32, t as f32]);
                } else {
                    out.extend([1000.0, -1000.0]);
                }
            }
        }
        if self.wrong_length {
            out.pop();
        }
        Ok(out)
    }
}

fn model_dir() -> TempDir {
    let dir = TempDir::new();
    dir.write("tokenizer.json", &tokenizer())
        .write("1_Pooling/config.json", MEAN);
    dir
}

fn embedder(dir: &TempDir, config: ModelConfig) -> SentenceEmbedder<FakeEncoder> {
    SentenceEmbedder::new(config, &dir.0, FakeEncoder::default()).unwrap()
}

fn text(rows: &[&[u8]]) -> Tensor {
    let elements = rows.iter().map(|r| Bytes::copy_from_slice(r)).collect();
    Tensor::from_elements(TEXT_INPUT, &[rows.len() as i64, 1], elements).unwrap()
}

fn assert_close(actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() < 1e-6, "{actual:?} vs {expected:?}");
    }
}

/// Two sentences, seq 3, dim 2: the first has 3 real tokens, the second 1 (then padding,
/// filled with values that would win every pooling if it were counted).
fn padded_batch() -> (Vec<f32>, TokenBatch) {
    let hidden = vec![
        1.0, -2.0, 3.0, 4.0, 5.0, -6.0, // sentence 0
        -1.0, -3.0, 99.0, 99.0, 99.0, 99.0, // sentence 1: one token, then padding
    ];
    let batch = TokenBatch {
        batch: 2,
        seq: 3,
        input_ids: vec![2, 4, 3, 2, 0, 0],
        attention_mask: vec![1, 1, 1, 1, 0, 0],
        token_type_ids: vec![0; 6],
    };
    (hidden, batch)
}

#[test]
fn mean_pooling_counts_only_real_tokens() {
    let (hidden, batch) = padded_batch();
    let pooled = pool(&hidden, &batch, 2, Pooling::Mean);
    assert_close(&pooled, &[3.0, -4.0 / 3.0, -1.0, -3.0]);
}

#[test]
fn cls_pooling_takes_the_first_token() {
    let (hidden, batch) = padded_batch();
    let pooled = pool(&hidden, &batch, 2, Pooling::Cls);
    assert_close(&pooled, &[1.0, -2.0, -1.0, -3.0]);
}

#[test]
fn max_pooling_ignores_padding() {
    let (hidden, batch) = padded_batch();
    let pooled = pool(&hidden, &batch, 2, Pooling::Max);
    assert_close(&pooled, &[5.0, 4.0, -1.0, -3.0]);
}

#[test]
fn pooling_without_tokens_or_with_short_input_does_not_panic() {
    let (hidden, mut batch) = padded_batch();
    batch.attention_mask = vec![0; 6];
    for mode in [Pooling::Mean, Pooling::Max] {
        assert_eq!(pool(&hidden, &batch, 2, mode), vec![0.0; 4]);
    }
    let (_, batch) = padded_batch();
    // Only sentence 0's first token is there; the rest counts as padding.
    let pooled = pool(&[1.0, 2.0], &batch, 2, Pooling::Mean);
    assert_close(&pooled, &[1.0, 2.0, 0.0, 0.0]);
    assert!(pool(&[], &batch, 0, Pooling::Cls).is_empty());
}

#[test]
fn l2_normalizes_each_row() {
    let mut rows = vec![3.0, 4.0, 0.0, 0.0, -1.0, 0.0];
    l2_normalize(&mut rows, 2);
    assert_close(&rows, &[0.6, 0.8, 0.0, 0.0, -1.0, 0.0]);
    l2_normalize(&mut rows, 0); // nothing to do, no panic
}

#[test]
fn pooling_config_parses_modes() {
    let file = Path::new("1_Pooling/config.json");
    assert_eq!(Pooling::from_config_json(MEAN, file), Ok(Pooling::Mean));
    assert_eq!(
        Pooling::from_config_json(r#"{"pooling_mode_cls_token": true}"#, file),
        Ok(Pooling::Cls)
    );
    assert_eq!(
        Pooling::from_config_json(
            r#"{"pooling_mode_max_tokens": true, "pooling_mode_mean_tokens": false}"#,
            file
        ),
        Ok(Pooling::Max)
    );
}

#[test]
fn pooling_config_errors_name_the_file_and_the_problem() {
    let file = Path::new("m/1_Pooling/config.json");
    let cases = [
        ("{", "not valid JSON"),
        ("[true]", "not a JSON object"),
        (r#"{"pooling_mode_mean_tokens": false}"#, "no pooling mode"),
        (
            r#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#,
            "2 pooling modes",
        ),
        (
            r#"{"pooling_mode_mean_sqrt_len_tokens": true}"#,
            "pooling_mode_mean_sqrt_len_tokens is not supported",
        ),
        (
            r#"{"pooling_mode_cls_token": "yes"}"#,
            "pooling_mode_cls_token is \"yes\", not true or false",
        ),
    ];
    for (text, wanted) in cases {
        let e = Pooling::from_config_json(text, file).unwrap_err();
        assert!(e.contains("m/1_Pooling/config.json"), "{e}");
        assert!(e.contains(wanted), "{text}: {e}");
    }
}

#[test]
fn pooling_defaults_to_mean_without_a_file_and_follows_modules_json() {
    let dir = TempDir::new();
    assert_eq!(Pooling::from_dir(&dir.0), Ok(Pooling::Mean));
    dir.write(
        "modules.json",
        r#"[{"path": "pool", "type": "sentence_transformers.models.Pooling"}]"#,
    )
    .write("pool/config.json", r#"{"pooling_mode_cls_token": true}"#);
    assert_eq!(Pooling::from_dir(&dir.0), Ok(Pooling::Cls));
    dir.write("modules.json", r#"{"not": "a list"}"#);
    let e = Pooling::from_dir(&dir.0).unwrap_err();
    assert!(e.contains("modules.json"), "{e}");
}

#[test]
fn token_limit_comes_from_sentence_bert_then_model_config() {
    let dir = TempDir::new();
    assert_eq!(max_seq_length_from_dir(&dir.0), Ok(DEFAULT_MAX_SEQ_LENGTH));
    dir.write("config.json", r#"{"max_position_embeddings": 128}"#);
    assert_eq!(max_seq_length_from_dir(&dir.0), Ok(128));
    dir.write("sentence_bert_config.json", r#"{"max_seq_length": 64}"#);
    assert_eq!(max_seq_length_from_dir(&dir.0), Ok(64));
    dir.write("sentence_bert_config.json", r#"{"max_seq_length": 1024}"#);
    assert_eq!(max_seq_length_from_dir(&dir.0), Ok(128));
    dir.write("sentence_bert_config.json", r#"{"max_seq_length": 0}"#);
    let e = max_seq_length_from_dir(&dir.0).unwrap_err();
    assert!(
        e.contains("sentence_bert_config.json: max_seq_length is 0"),
        "{e}"
    );
}

#[test]
fn tokenizer_pads_to_the_longest_and_truncates() {
    let tok = TextTokenizer::from_bytes(tokenizer().as_bytes(), 4).unwrap();
    let batch = tok
        .encode(&["Hello world", "cat", "big big big big big"])
        .unwrap();
    assert_eq!(batch.batch, 3);
    assert_eq!(batch.seq, 4, "padded to the longest, truncated at 4");
    #[rustfmt::skip]
    assert_eq!(batch.input_ids, vec![
        2, 4, 5, 3,
        2, 7, 3, 0,
        2, 6, 6, 3,
    ]);
    assert_eq!(
        batch.attention_mask,
        vec![1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    );
    assert_eq!(batch.token_type_ids, vec![0; 12]);
    assert_eq!(
        tok.count_tokens(&["cat", "", "big big big"]).unwrap(),
        vec![3, 2, 4]
    );
    for limit in [0, 1, 2] {
        let e = TextTokenizer::from_bytes(tokenizer().as_bytes(), limit).unwrap_err();
        assert!(e.contains("token limit"), "{limit}: {e}");
    }
    assert!(TextTokenizer::from_bytes(tokenizer().as_bytes(), 3).is_ok());
    assert!(TextTokenizer::from_bytes(b"{}", 8).is_err());
}

#[test]
fn a_batch_is_tokenized_on_the_calling_thread_without_rayon() {
    // A batch executes on a thread of the execution pool (a rayon pool): tokenizing it in
    // parallel there lets the waiting thread run another batch inside this one (see
    // `TextTokenizer::encodings`). The tokenizers crate notes any use of its parallel
    // iterators in a process-wide flag; nothing in this crate may set it.
    let tok = TextTokenizer::from_bytes(tokenizer().as_bytes(), 16).unwrap();
    let texts: Vec<String> = (0..64)
        .map(|i| ["hello world", "big cat", "cat"][i % 3].repeat(1 + i % 4))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let batch = pool.install(|| tok.encode(&refs)).unwrap();
    assert_eq!(batch.batch, 64);
    assert!(
        !tokenizers::utils::parallelism::has_parallelism_been_used(),
        "TextTokenizer::encode split its texts over a rayon pool"
    );
}

#[test]
fn config_is_completed_when_it_lists_nothing() {
    let dir = model_dir();
    let config = ModelConfig {
        name: "minilm".into(),
        backend: "candle".into(),
        ..ModelConfig::default()
    };
    let m = embedder(&dir, config);
    let want = default_config("minilm", "candle", 2);
    assert_eq!(m.config(), &want);
    assert_eq!(want.input[0].data_type, "TYPE_STRING");
    assert_eq!(want.output[0].dims, vec![2]);
    assert_eq!(want.max_batch_size, 64);
    // A config that says what the model is passes unchanged.
    let mut listed = want.clone();
    listed.max_batch_size = 8;
    listed.dynamic_batching = None;
    assert_eq!(embedder(&dir, listed.clone()).config(), &listed);
}

#[test]
fn config_mismatches_name_the_tensor() {
    let dir = model_dir();
    let base = default_config("m", "candle", 2);
    type Change = Box<dyn Fn(&mut ModelConfig)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|c| c.input[0].name = "INPUT0".into()),
            "input 'INPUT0'",
        ),
        (
            Box::new(|c| c.input[0].data_type = "TYPE_FP32".into()),
            "input 'TEXT' has data_type 'TYPE_FP32', expected TYPE_STRING",
        ),
        (
            Box::new(|c| c.input[0].dims = vec![-1]),
            "input 'TEXT' has dims [-1]",
        ),
        (
            Box::new(|c| c.output[0].dims = vec![384]),
            "output 'EMBEDDING' has dims [384], expected [2]",
        ),
        (
            Box::new(|c| c.output[0].data_type = "TYPE_FP16".into()),
            "output 'EMBEDDING' has data_type 'TYPE_FP16'",
        ),
        (
            Box::new(|c| c.output.push(embedding_output(2))),
            "'EMBEDDING', 'EMBEDDING'",
        ),
        (
            Box::new(|c| {
                c.parameters.insert(
                    "normalize".into(),
                    crate::config::Parameter {
                        string_value: "yes".into(),
                    },
                );
            }),
            "parameter 'normalize' is 'yes'",
        ),
    ];
    for (change, wanted) in cases {
        let mut config = base.clone();
        change(&mut config);
        let e = SentenceEmbedder::new(config, &dir.0, FakeEncoder::default()).unwrap_err();
        assert!(matches!(e, Error::Load { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("model 'm'"), "{e}");
        assert!(e.contains(wanted), "wanted {wanted:?} in: {e}");
    }
}

#[test]
fn folder_problems_are_load_errors() {
    let dir = TempDir::new();
    let e = SentenceEmbedder::new(default_config("m", "x", 2), &dir.0, FakeEncoder::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    let dir = model_dir();
    dir.write(
        "1_Pooling/config.json",
        r#"{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": true}"#,
    );
    let e = SentenceEmbedder::new(default_config("m", "x", 2), &dir.0, FakeEncoder::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("word_embedding_dimension is 384"), "{e}");
}

#[test]
fn execute_pools_real_tokens_and_padding_changes_nothing() {
    let dir = model_dir();
    let m = embedder(&dir, default_config("m", "x", 2));
    assert!(!m.normalizes(), "no modules.json: no normalisation");
    assert_eq!(m.pooling(), Pooling::Mean);
    let out = m.execute(&[text(&[b"hello world", b"cat"])]).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name(), EMBEDDING_OUTPUT);
    assert_eq!(out[0].shape(), vec![2, 2]);
    // [CLS]=2 hello=4 world=5 [SEP]=3 at positions 0..3; [CLS] cat=7 [SEP] at 0..2.
    let mixed = out[0].f32_values().unwrap();
    assert_close(&mixed, &[3.5, 1.5, 4.0, 1.0]);
    let alone = m.execute(&[text(&[b"cat"])]).unwrap()[0]
        .f32_values()
        .unwrap();
    assert_close(&alone, &mixed[2..]);
    let seen = m.encoder().seen.lock().unwrap();
    assert_eq!(
        seen[0].seq, 4,
        "the batch is padded to its longest sentence"
    );
    assert_eq!(seen[1].seq, 3);
}

#[test]
fn normalisation_follows_modules_json_and_the_parameter() {
    let dir = model_dir();
    dir.write("modules.json", NORMALIZE_MODULES);
    let m = embedder(&dir, default_config("m", "x", 2));
    assert!(m.normalizes());
    let v = m.embed(&["hello world"]).unwrap();
    let norm = (3.5f32 * 3.5 + 1.5 * 1.5).sqrt();
    assert_close(&v, &[3.5 / norm, 1.5 / norm]);
    let mut config = default_config("m", "x", 2);
    config.parameters.insert(
        "normalize".into(),
        crate::config::Parameter {
            string_value: "false".into(),
        },
    );
    let m = embedder(&dir, config);
    assert!(!m.normalizes());
    assert_close(&m.embed(&["hello world"]).unwrap(), &[3.5, 1.5]);
}

#[test]
fn bad_inputs_are_errors_naming_what_is_wrong() {
    let dir = model_dir();
    let m = embedder(&dir, default_config("m", "x", 2));
    let e = m
        .execute(&[text(&[b"hello", b"caf\xc3", b"ok"])])
        .unwrap_err();
    assert!(matches!(e, Error::Execution { .. }));
    assert!(e.to_string().contains("row 1 is not valid UTF-8"), "{e}");
    let e = m.execute(&[]).unwrap_err().to_string();
    assert!(e.contains("no 'TEXT' input"), "{e}");
    let e = m
        .execute(&[Tensor::from_f32(TEXT_INPUT, vec![1, 1], &[1.0]).unwrap()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected BYTES"), "{e}");
    let wide = Tensor::from_elements(
        TEXT_INPUT,
        &[1, 2],
        vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
    )
    .unwrap();
    let e = m.execute(&[wide]).unwrap_err().to_string();
    assert!(e.contains("shape [1, 2]"), "{e}");
    // A flat [batch] tensor is accepted, and an empty batch gives no rows.
    let flat = Tensor::from_elements(TEXT_INPUT, &[1], vec![Bytes::from_static(b"cat")]).unwrap();
    assert_eq!(m.execute(&[flat]).unwrap()[0].shape(), vec![1, 2]);
    let empty = Tensor::from_elements(TEXT_INPUT, &[0, 1], vec![]).unwrap();
    assert_eq!(m.execute(&[empty]).unwrap()[0].shape(), vec![0, 2]);
}

#[test]
fn an_encoder_returning_the_wrong_size_is_an_error() {
    let dir = model_dir();
    let encoder = FakeEncoder {
        wrong_length: true,
        ..FakeEncoder::default()
    };
    let m = SentenceEmbedder::new(default_config("m", "x", 2), &dir.0, encoder).unwrap();
    let e = m.execute(&[text(&[b"cat"])]).unwrap_err().to_string();
    assert!(e.contains("the encoder returned 5 values"), "{e}");
}

#[test]
fn count_tokens_reports_truncated_lengths() {
    let dir = model_dir();
    dir.write("sentence_bert_config.json", r#"{"max_seq_length": 5}"#);
    let m = embedder(&dir, default_config("m", "x", 2));
    assert_eq!(m.tokenizer().max_seq_length(), 5);
    assert_eq!(
        m.count_tokens(&["hello", "big big big big big big"])
            .unwrap(),
        vec![3, 5]
    );
    // The same counts through the Model trait (what the API's usage figures read); a model
    // without a tokenizer has none.
    let as_model: &dyn Model = &m;
    assert_eq!(
        as_model
            .count_tokens(&["hello", "big big big big big big"])
            .map(Result::unwrap),
        Some(vec![3, 5])
    );
    let identity =
        crate::builtin::instantiate(crate::builtin::config("identity").unwrap()).unwrap();
    assert!(identity.count_tokens(&["hello"]).is_none());
}

#[test]
fn request_tokens_are_the_lengths_execute_pads() {
    let dir = model_dir();
    dir.write("sentence_bert_config.json", r#"{"max_seq_length": 6}"#);
    let m = embedder(&dir, default_config("m", "x", 2));
    let input = text(&[b"hello", b"big big", b"big big big big big big big"]);
    let counts = m
        .count_tokens(&["hello", "big big", "big big big big big big big"])
        .unwrap();
    assert_eq!(
        counts,
        vec![3, 4, 6],
        "truncated at the limit, special tokens included"
    );
    assert_eq!(
        m.request_tokens(std::slice::from_ref(&input)).unwrap(),
        Ok(TokenCount {
            longest: 6,
            total: 13
        })
    );
    // The batch execute pads has the longest row's length.
    let batch = m
        .tokenizer()
        .encode(&["hello", "big big", "big big big big big big big"])
        .unwrap();
    assert_eq!(batch.seq, 6);
    assert_eq!(batch.attention_mask.iter().sum::<i64>(), 13);
    let bad = text(&[&[0xff, 0xfe]]);
    let e = m.request_tokens(&[bad]).unwrap().unwrap_err();
    assert!(e.contains("not valid UTF-8"), "{e}");
    assert!(m.request_tokens(&[]).unwrap().is_err());
    let identity =
        crate::builtin::instantiate(crate::builtin::config("identity").unwrap()).unwrap();
    assert!(identity.request_tokens(&[]).is_none());
}
