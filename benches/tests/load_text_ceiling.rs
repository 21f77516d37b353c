//! The pieces of `veraltheim-load text`'s hardware limit (issue 19): FLOPs per token from a
//! model's `config.json`, the GEMM measurement, the sentence mix and its token counts. No model
//! files or server needed; asserts behaviour, never timings.

use std::path::Path;
use std::time::Duration;

use clap::Parser as _;
use veraltheim_benches::load::args::{Cli, Command};
use veraltheim_benches::load::ceiling::{self, Ceiling, GemmShape, ModelFlops};
use veraltheim_benches::load::client::closed_loop_payload;
use veraltheim_benches::load::sentences::{TokenStats, sentences, weighted_mean};
use veraltheim_benches::load::text::{count_tokens, run_sentences};

/// all-MiniLM-L6-v2's `config.json`, the fields that matter and some that do not.
const MINILM: &str = r#"{"architectures": ["BertModel"], "hidden_size": 384,
    "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 12,
    "max_position_embeddings": 512, "model_type": "bert"}"#;

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

#[test]
fn minilm_linear_layers_cost_21_2_mflop_per_token() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.json", MINILM);
    let f = ModelFlops::from_dir(dir.path()).unwrap();
    assert_eq!(
        (f.hidden_size, f.intermediate_size, f.num_hidden_layers),
        (384, 1536, 6)
    );
    // 2 × (4·384·384 + 2·384·1536) × 6, by hand.
    assert_eq!(f.linear_per_token, 21_233_664.0);
    // Attention at 16 tokens: 4·384·16·6.
    assert_eq!(f.attention_per_token(16.0), 147_456.0);
    let shapes: Vec<(usize, usize, usize, u32)> = f
        .shapes(1024)
        .iter()
        .map(|(s, per)| (s.m, s.k, s.n, *per))
        .collect();
    assert_eq!(
        shapes,
        vec![
            (1024, 384, 384, 4),
            (1024, 384, 1536, 1),
            (1024, 1536, 384, 1)
        ]
    );
    // A layer's products are exactly the linear FLOPs of its tokens.
    let per_layer: f64 = f
        .shapes(1024)
        .iter()
        .map(|(s, per)| s.flops() * *per as f64)
        .sum();
    assert_eq!(per_layer * 6.0, f.linear_per_token * 1024.0);
}

#[test]
fn a_config_without_the_fields_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = ModelFlops::from_dir(dir.path()).unwrap_err();
    assert!(format!("{e:#}").contains("config.json"), "{e:#}");

    // (config.json, what the error must say)
    let cases: [(&str, &[&str]); 4] = [
        (
            r#"{"hidden_size": 384, "num_hidden_layers": 6}"#,
            &["intermediate_size is missing", "config.json"],
        ),
        (
            r#"{"hidden_size": "384", "intermediate_size": 1536, "num_hidden_layers": 6}"#,
            &["hidden_size", "not a positive integer"],
        ),
        (
            r#"{"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 0}"#,
            &["num_hidden_layers"],
        ),
        ("not json", &["not JSON"]),
    ];
    for (config, says) in cases {
        write(dir.path(), "config.json", config);
        let e = format!("{:#}", ModelFlops::from_dir(dir.path()).unwrap_err());
        assert!(says.iter().all(|s| e.contains(s)), "{config}: {e}");
    }
}

#[test]
fn multiply_is_row_major_and_checks_lengths() {
    // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
    let s = GemmShape { m: 2, k: 2, n: 2 };
    let mut c = vec![0f32; 4];
    ceiling::multiply(s, &[1., 2., 3., 4.], &[5., 6., 7., 8.], &mut c, 1).unwrap();
    assert_eq!(c, vec![19.0, 22.0, 43.0, 50.0]);
    // 1×3 · 3×2 on two threads.
    let s = GemmShape { m: 1, k: 3, n: 2 };
    let mut c = vec![0f32; 2];
    ceiling::multiply(s, &[1., 2., 3.], &[1., 0., 0., 1., 1., 1.], &mut c, 2).unwrap();
    assert_eq!(c, vec![4.0, 5.0]);
    let e = ceiling::multiply(s, &[1., 2.], &[0.; 6], &mut c, 1).unwrap_err();
    assert!(e.to_string().contains("a holds 2 values, not 3"), "{e}");
}

#[test]
fn gemm_measures_a_positive_finite_rate() {
    let shape = GemmShape { m: 8, k: 4, n: 3 };
    for threads in [1, 2] {
        let (products, gflops) =
            ceiling::measure_shape(shape, threads, Duration::from_millis(20)).unwrap();
        assert!(products >= 5, "{products}");
        assert!(gflops.is_finite() && gflops > 0.0, "{gflops}");
    }
    assert!(ceiling::measure_shape(GemmShape { m: 0, k: 4, n: 3 }, 1, Duration::ZERO).is_err());

    let tiny = ModelFlops::from_config(&serde_json::json!({
        "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2
    }))
    .unwrap();
    // No ONNX Runtime at this path: each shape says why it has only the `gemm` crate's rate.
    let missing = Path::new("/nonexistent/libonnxruntime.so");
    let report = ceiling::measure(&tiny, 3, 2, Duration::from_millis(10), Some(missing)).unwrap();
    assert_eq!(report.threads, 2);
    assert_eq!(report.shapes.len(), 3);
    for p in &report.shapes {
        assert_eq!(p.library, ceiling::GEMM_CRATE);
        assert_eq!(p.gflops, p.gemm_crate_gflops);
        let why = p.onnx_runtime_gflops.clone().unwrap_err();
        assert!(why.contains("/nonexistent/libonnxruntime.so"), "{why}");
    }
    let rates: Vec<f64> = report.shapes.iter().map(|p| p.gflops).collect();
    assert!(rates.iter().all(|r| r.is_finite() && *r > 0.0), "{rates:?}");
    let max = rates.iter().cloned().fold(0.0, f64::max);
    let min = rates.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(report.best_gflops, max);
    assert!(
        (min * 0.999999..=max * 1.000001).contains(&report.layer_mix_gflops),
        "{report:?}"
    );
    // The ceiling divides the rate by the FLOPs of a token, then of a sentence.
    let c = Ceiling::new(report.clone(), tiny.clone(), 4.0);
    assert!((c.tokens_per_s - report.best_gflops * 1e9 / tiny.linear_per_token).abs() < 1e-6);
    assert!((c.sentences_per_s * 4.0 - c.tokens_per_s).abs() < 1e-6);
    assert!(ceiling::measure(&tiny, 0, 1, Duration::from_millis(1), Some(missing)).is_err());
}

#[test]
fn the_sentence_mix_varies_and_is_seeded() {
    let a = sentences(500, 42);
    assert_eq!(a.len(), 500);
    assert_eq!(a, sentences(500, 42));
    assert_ne!(a, sentences(500, 43));
    let mut lengths: Vec<usize> = a.iter().map(|s| s.split_whitespace().count()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    assert!(lengths.len() >= 6, "word counts {lengths:?}");
    let stats = TokenStats::of(&a.iter().map(String::len).collect::<Vec<_>>()).unwrap();
    assert!(stats.p10 < stats.p50 && stats.p50 < stats.p90, "{stats:?}");
}

#[test]
fn tokens_are_counted_with_the_folders_tokenizer_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        count_tokens(dir.path(), &["hello".to_string()]).unwrap_err()
    );
    assert!(e.contains("tokenizer.json"), "{e}");
    write(
        dir.path(),
        "tokenizer.json",
        &veraltheim_models::text::word_level_tokenizer_json(&["hello", "world"], None),
    );
    write(
        dir.path(),
        "sentence_bert_config.json",
        r#"{"max_seq_length": 6}"#,
    );
    let s: Vec<String> = ["hello", "hello world", "a b c d e f g h"]
        .map(String::from)
        .to_vec();
    // [CLS] + words + [SEP], truncated at 6.
    assert_eq!(count_tokens(dir.path(), &s).unwrap(), vec![3, 4, 6]);
}

#[test]
fn text_uses_the_generated_mix_unless_given_a_file() {
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "veraltheim-load",
            "text",
            "--model-dir",
            "m",
            "--onnx",
            "m.onnx",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Text(a) => a,
            _ => unreachable!("parsed as text"),
        }
    };
    let a = parse(&[]);
    let (s, source) = run_sentences(&a).unwrap();
    assert_eq!(s.len(), 1000);
    assert_eq!(s, sentences(1000, 1));
    assert!(source.contains("generated"), "{source}");
    let (s7, _) = run_sentences(&parse(&["--seed", "7", "--sentences", "50"])).unwrap();
    assert_eq!(s7, sentences(50, 7));
    assert!(run_sentences(&parse(&["--sentences", "0"])).is_err());

    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/minilm-reference.json");
    let a = parse(&[
        "--sentences-file",
        file.to_str().unwrap(),
        "--sentences",
        "3",
    ]);
    let (s, source) = run_sentences(&a).unwrap();
    assert_eq!(s.len(), 3);
    assert!(source.ends_with("minilm-reference.json"), "{source}");
}

#[test]
fn token_stats_take_nearest_rank_percentiles() {
    let counts: Vec<usize> = (1..=10).rev().collect();
    let s = TokenStats::of(&counts).unwrap();
    assert_eq!((s.sentences, s.total), (10, 55));
    assert_eq!(s.mean, 5.5);
    assert_eq!((s.min, s.p10, s.p50, s.p90, s.max), (1, 1, 5, 9, 10));
    assert_eq!(TokenStats::of(&[7]).unwrap().p90, 7);
    assert!(TokenStats::of(&[]).is_none());
}

#[test]
fn served_tokens_weigh_each_sentence_by_its_requests() {
    assert_eq!(weighted_mean(&[10, 20], &[3, 1]), Some(12.5));
    assert_eq!(weighted_mean(&[10, 20], &[0, 0]), None);
    assert_eq!(weighted_mean(&[10, 20], &[1]), None);
}

#[test]
fn closed_loop_clients_go_through_the_mix() {
    // One request: always it.
    assert!((0..10).all(|k| closed_loop_payload(3, k, 64, 1) == 0));
    // Client c starts at c and steps by the client count.
    let seq =
        |c: usize| -> Vec<usize> { (0..5).map(|k| closed_loop_payload(c, k, 2, 5)).collect() };
    assert_eq!(seq(0), vec![0, 2, 4, 1, 3]);
    assert_eq!(seq(1), vec![1, 3, 0, 2, 4]);
    // Far calls stay in range (no overflow).
    assert!(closed_loop_payload(63, u64::MAX, 64, 1000) < 1000);
}
