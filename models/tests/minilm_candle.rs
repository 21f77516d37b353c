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
    assert_eq!(out[0].shape(), vec![items.len(), 384]);
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

/// The model reports the bytes of the weights it holds: every tensor of `model.safetensors` that
/// BERT reads, as F32 on the CPU. The expected sum is taken from the file's own header (8 bytes
/// of header length, then JSON with each tensor's dtype and byte range), independently of candle:
/// all its tensors but the pooler (sentence-transformers does not use it; `BertModel` does not
/// load it) and `embeddings.position_ids` (a buffer, not a weight). Cross-checked against the
/// parameter count that `config.json` implies.
#[test]
fn memory_is_the_bytes_of_the_safetensors_weights() {
    let dir = minilm_dir();
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[..8]);
    let header_len = usize::try_from(u64::from_le_bytes(len)).expect("header length");
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + header_len]).expect("safetensors header is JSON");
    let mut expected = 0u64;
    let mut not_read = Vec::new();
    for (name, tensor) in header.as_object().expect("header is an object") {
        if name == "__metadata__" {
            continue;
        }
        if name.starts_with("pooler.") || name == "embeddings.position_ids" {
            not_read.push(name.clone());
            continue;
        }
        assert_eq!(
            tensor["dtype"], "F32",
            "{name}: loaded as F32, so its size is the file's"
        );
        let range = &tensor["data_offsets"];
        let (start, end) = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
        expected += end - start;
    }
    not_read.sort();
    assert_eq!(
        not_read,
        [
            "embeddings.position_ids",
            "pooler.dense.bias",
            "pooler.dense.weight"
        ]
    );

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let n = |k: &str| {
        config[k]
            .as_u64()
            .unwrap_or_else(|| panic!("config.json: {k}"))
    };
    let (h, i) = (n("hidden_size"), n("intermediate_size"));
    let embeddings =
        (n("vocab_size") + n("max_position_embeddings") + n("type_vocab_size")) * h + 2 * h;
    let layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h;
    let parameters = embeddings + n("num_hidden_layers") * layer;
    assert_eq!(
        expected,
        4 * parameters,
        "the file holds what config.json implies"
    );

    assert_eq!(model().memory_bytes(), Some(expected));
    let encoder = CandleBertEncoder::load(&dir, Device::Cpu).expect("the encoder loads");
    assert_eq!(encoder.weight_bytes(), expected);
}
