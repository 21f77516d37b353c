//! The sentence-embedding pipeline that the candle and ONNX Runtime backends share:
//! tokenizer (`tokenizer.json`) → encoder (the backend's transformer) → pooling (as
//! `1_Pooling/config.json` declares: mean, CLS or max) → L2 normalisation.
//!
//! Input `TEXT` (BYTES, `[-1, 1]`: one sentence per row), output `EMBEDDING` (FP32, `[-1, dim]`).
//! A batch is padded to its longest sentence; padding never changes a sentence's embedding
//! (pooling only sees the attention mask's tokens). One exception: a graph quantised to int8
//! (`models import --quantize int8`) quantises each product's activations with one scale per
//! batch, so the other rows of a batch, padding included, move a sentence's embedding slightly
//! (within the cosine its configuration records).
//!
//! The parts, one module each: `folder` reads what a sentence-transformers folder declares
//! (`modules.json`, the token limit), `pooling` turns token embeddings into one vector per
//! sentence, `tokenizer` wraps `tokenizer.json`, and `embedder` is the pipeline served as a
//! [`Model`](crate::model::Model).

mod embedder;
mod folder;
mod pooling;
mod tokenizer;

use crate::error::Error;

pub use embedder::{SentenceEmbedder, default_config};
pub use folder::{max_seq_length_from_dir, normalize_from_modules};
pub use pooling::{Pooling, l2_normalize, pool};
pub use tokenizer::TextTokenizer;

/// A batch of tokenized sentences, padded to the longest one. Row-major `[batch, seq]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenBatch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<i64>,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
}

/// The transformer of a text-embedding model: token ids in, the last hidden state out.
///
/// `encode` returns `[batch, seq, hidden_size]` row-major FP32 values. It runs on an
/// execution-pool thread and must not block on I/O.
pub trait Encoder: Send + Sync + 'static {
    fn hidden_size(&self) -> usize;
    fn encode(&self, batch: &TokenBatch) -> Result<Vec<f32>, Error>;

    /// Runs `batch` and lends the `[batch, seq, hidden_size]` values to `consume`. An encoder
    /// whose runtime owns the output buffer overrides this to lend it without a copy; the
    /// default lends what [`encode`](Self::encode) returns.
    fn encode_with(
        &self,
        batch: &TokenBatch,
        consume: &mut dyn FnMut(&[f32]),
    ) -> Result<(), Error> {
        consume(&self.encode(batch)?);
        Ok(())
    }

    /// The bytes of the weights the encoder holds, when it knows them (the sentence embedder
    /// reports this as the model's memory).
    fn memory_bytes(&self) -> Option<u64> {
        None
    }
}

/// Name of a sentence embedder's input: BYTES, dims `[1]`, one UTF-8 sentence per row.
pub const TEXT_INPUT: &str = "TEXT";
/// Name of a sentence embedder's output: FP32, dims `[hidden_size]`, one embedding per row.
pub const EMBEDDING_OUTPUT: &str = "EMBEDDING";
/// `max_batch_size` a sentence embedder gets when its configuration says 0: text embedders batch.
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 64;
/// Token limit when neither `sentence_bert_config.json` nor `config.json` gives one.
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 512;

/// A word-level `tokenizer.json` for tests (this crate's and others'): lowercases, splits on
/// whitespace, wraps a sentence in `[CLS]` … `[SEP]`; ids 0–3 are `[PAD]`, `[UNK]`, `[CLS]`,
/// `[SEP]` and `words` follow from 4. `pad_to`: every encoding padded to that many tokens.
#[doc(hidden)]
pub fn word_level_tokenizer_json(words: &[&str], pad_to: Option<usize>) -> String {
    let mut vocab = serde_json::Map::new();
    for (id, word) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .chain(words)
        .enumerate()
    {
        vocab.insert((*word).to_string(), id.into());
    }
    let special = |id: &str, type_id: u32| serde_json::json!({"SpecialToken": {"id": id, "type_id": type_id}});
    let sequence =
        |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    let padding = pad_to.map(|n| {
        serde_json::json!({"strategy": {"Fixed": n}, "direction": "Right", "pad_to_multiple_of": null,
                           "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"})
    });
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": padding, "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [special("[CLS]", 0), sequence("A", 0), special("[SEP]", 0)],
            "pair": [special("[CLS]", 0), sequence("A", 0), special("[SEP]", 0),
                     sequence("B", 1), special("[SEP]", 1)],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": vocab}
    })
    .to_string()
}

#[cfg(test)]
mod tests;
