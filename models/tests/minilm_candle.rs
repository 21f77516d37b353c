//! all-MiniLM-L6-v2 on candle against the float64 reference (`testdata/minilm-reference.json`).
//! Needs the provisioned model (`scripts/provision-models`; or `VERALTHEIM_MINILM_DIR`): without
//! it these tests fail, saying so, rather than skip.
//!
//! Run: `cargo test -p veraltheim-models --features candle --test minilm_candle`.
#![cfg(feature = "candle")]

mod common;

use std::sync::{Arc, OnceLock};

use candle_core::Device;
use common::{
    REFERENCE_MAX_SEQ_LENGTH, TOLERANCE, assert_close, cosine, embedding_rows, minilm_dir,
    reference, reference_cosine, text_tensor,
};
use veraltheim_models::Model;
use veraltheim_models::candle_bert::{self, CandleBertEncoder};
use veraltheim_models::text::{self, Pooling, SentenceEmbedder};

/// The model as the coordinator gets it: `candle_bert::load` on the CPU.
fn model() -> &'static Arc<dyn Model> {
    static MODEL: OnceLock<Arc<dyn Model>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let config = text::default_config("minilm", candle_bert::BACKEND, 384);
        candle_bert::load(config, &minilm_dir(), None).expect("all-MiniLM-L6-v2 loads")
    })
}

fn embedder() -> SentenceEmbedder<CandleBertEncoder> {
    let dir = minilm_dir();
    let encoder = CandleBertEncoder::load(&dir, Device::Cpu).expect("the encoder loads");
    let config = text::default_config("minilm", candle_bert::BACKEND, 384);
    SentenceEmbedder::new(config, &dir, encoder).expect("the embedder loads")
}

#[test]
fn the_folder_configures_the_pipeline() {
    let m = embedder();
    assert_eq!(m.pooling(), Pooling::Mean, "1_Pooling/config.json");
    assert!(m.normalizes(), "modules.json lists Normalize");
    assert_eq!(m.dim(), 384);
    assert_eq!(
        m.tokenizer().max_seq_length(),
        REFERENCE_MAX_SEQ_LENGTH,
        "sentence_bert_config.json max_seq_length"
    );
    let config = model().config();
    assert_eq!(config.output[0].name, "EMBEDDING");
    assert_eq!(config.output[0].dims, vec![384]);
    assert_eq!(config.max_batch_size, 64);
}

#[test]
fn token_ids_match_the_reference() {
    let m = embedder();
    let items = reference();
    let texts: Vec<&str> = items.iter().map(|(t, _, _)| t.as_str()).collect();
    let batch = m
        .tokenizer()
        .encode(&texts)
        .expect("the reference tokenizes");
    let longest = items.iter().map(|(_, ids, _)| ids.len()).max().unwrap();
    assert_eq!(batch.seq, longest);
    assert_eq!(
        longest, REFERENCE_MAX_SEQ_LENGTH,
        "the long sentence is truncated"
    );
    for (row, (text, ids, _)) in items.iter().enumerate() {
        let got = &batch.input_ids[row * batch.seq..(row + 1) * batch.seq];
        let mask = &batch.attention_mask[row * batch.seq..(row + 1) * batch.seq];
        assert_eq!(&got[..ids.len()], ids.as_slice(), "token ids of {text:?}");
        assert!(
            got[ids.len()..].iter().all(|&p| p == 0),
            "padding of {text:?}"
        );
        assert_eq!(
            mask.iter().sum::<i64>() as usize,
            ids.len(),
            "mask of {text:?}"
        );
    }
    let counts = m.count_tokens(&texts).unwrap();
    let expected: Vec<usize> = items.iter().map(|(_, ids, _)| ids.len()).collect();
    assert_eq!(counts, expected);
}

#[test]
fn one_mixed_length_batch_matches_the_reference() {
    let items = reference();
    let texts: Vec<&str> = items.iter().map(|(t, _, _)| t.as_str()).collect();
    let out = model()
        .execute(&[text_tensor(&texts)])
        .expect("the batch runs");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].shape, vec![items.len(), 384]);
    for ((text, _, expected), got) in items.iter().zip(embedding_rows(&out[0])) {
        assert_close(&format!("batched {text:?}"), &got, expected, TOLERANCE);
    }
}

#[test]
fn each_sentence_alone_matches_the_reference() {
    for (text, _, expected) in reference() {
        let out = model()
            .execute(&[text_tensor(&[text.as_str()])])
            .expect("the sentence runs");
        let rows = embedding_rows(&out[0]);
        assert_eq!(rows.len(), 1);
        assert_close(&format!("alone {text:?}"), &rows[0], &expected, TOLERANCE);
    }
}

#[test]
fn similar_sentences_have_the_reference_cosine() {
    let items = reference();
    let out = model()
        .execute(&[text_tensor(&[&items[0].0, &items[1].0])])
        .unwrap();
    let rows = embedding_rows(&out[0]);
    let c = cosine(&rows[0], &rows[1]);
    assert!((c - 0.7553).abs() < 1e-3, "cosine {c}");
    assert!((c - reference_cosine()).abs() < 1e-4, "cosine {c}");
    for row in &rows {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
}
