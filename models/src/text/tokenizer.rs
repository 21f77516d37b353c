//! The tokenizer of a text model: a HuggingFace `tokenizer.json` set up for embedding.

use std::path::Path;

use tokenizers::{
    PaddingParams, PostProcessor, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use super::TokenBatch;

/// A HuggingFace `tokenizer.json` set up for embedding: truncation at the model's token limit
/// (special tokens included), no padding of its own (batches are padded here to their longest
/// sentence, on the right, with the tokenizer's pad id).
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    max_seq_length: usize,
    pad_id: i64,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_seq_length", &self.max_seq_length)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json` file and truncates at `max_seq_length` tokens.
    pub fn from_file(file: &Path, max_seq_length: usize) -> Result<TextTokenizer, String> {
        let bytes = std::fs::read(file).map_err(|e| {
            format!(
                "cannot read {}: {e} (a text model needs the HuggingFace tokenizer.json)",
                file.display()
            )
        })?;
        Self::from_bytes(&bytes, max_seq_length).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Builds the tokenizer from the text of a `tokenizer.json`.
    pub fn from_bytes(json: &[u8], max_seq_length: usize) -> Result<TextTokenizer, String> {
        if max_seq_length == 0 {
            return Err("the token limit (max_seq_length) is 0".into());
        }
        let mut tokenizer =
            Tokenizer::from_bytes(json).map_err(|e| format!("not a usable tokenizer: {e}"))?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p: &PaddingParams| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        // tokenizers subtracts the special tokens from the limit without checking (a panic in
        // debug builds): refuse a limit that leaves no room for them first.
        let special = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_seq_length <= special {
            return Err(format!(
                "the token limit (max_seq_length) {max_seq_length} leaves no room for text                  beside the tokenizer's {special} special tokens"
            ));
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| format!("cannot truncate at {max_seq_length} tokens: {e}"))?;
        let this = TextTokenizer {
            tokenizer,
            max_seq_length,
            pad_id: i64::from(pad_id),
        };
        // A limit too small for the special tokens only shows when encoding: find out now.
        this.encode(&["a"])
            .map_err(|e| format!("cannot tokenize a test sentence: {e}"))?;
        Ok(this)
    }

    /// The token limit (special tokens included).
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// The id that pads short sentences.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// One text at a time on the calling thread, never `encode_batch`. `encode_batch` splits the
    /// texts over the current rayon pool: called from a batch on the execution pool, the thread
    /// that waits for its share to come back takes other work from the pool meanwhile, which is
    /// another model's (or this model's next) whole batch, and its own batch is answered only
    /// when that one ends. Measured (docs/PERFORMANCE.md, session 13): MiniLM batches of 2–8
    /// sentences that execute in 10–30 ms took 100–450 ms now and then once both pool threads
    /// were busy, and each such batch broke a latency objective for a second. Tokenizing a batch
    /// of short sentences costs tens of microseconds a sentence: no parallelism is worth that.
    fn encodings(&self, texts: &[&str]) -> Result<Vec<tokenizers::Encoding>, String> {
        texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode(*t, true)
                    .map_err(|e| format!("tokenizer failed: {e}"))
            })
            .collect()
    }

    /// Tokenizes `texts` into one batch padded (on the right) to its longest sentence.
    /// `token_type_ids` are zeros when the tokenizer gives none.
    pub fn encode(&self, texts: &[&str]) -> Result<TokenBatch, String> {
        let encodings = self.encodings(texts)?;
        let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let total = texts.len() * seq;
        let mut batch = TokenBatch {
            batch: texts.len(),
            seq,
            input_ids: Vec::with_capacity(total),
            attention_mask: Vec::with_capacity(total),
            token_type_ids: Vec::with_capacity(total),
        };
        for encoding in &encodings {
            let ids = encoding.get_ids();
            let n = ids.len();
            batch.input_ids.extend(ids.iter().map(|&i| i64::from(i)));
            let mask = encoding.get_attention_mask();
            if mask.len() == n {
                batch
                    .attention_mask
                    .extend(mask.iter().map(|&m| i64::from(m)));
            } else {
                batch.attention_mask.extend(std::iter::repeat_n(1, n));
            }
            let types = encoding.get_type_ids();
            if types.len() == n {
                batch
                    .token_type_ids
                    .extend(types.iter().map(|&t| i64::from(t)));
            } else {
                batch.token_type_ids.extend(std::iter::repeat_n(0, n));
            }
            let pad = seq - n;
            batch
                .input_ids
                .extend(std::iter::repeat_n(self.pad_id, pad));
            batch.attention_mask.extend(std::iter::repeat_n(0, pad));
            batch.token_type_ids.extend(std::iter::repeat_n(0, pad));
        }
        Ok(batch)
    }

    /// The number of tokens (after truncation, special tokens included) of each text.
    ///
    /// One text at a time on the calling thread, as [`TextTokenizer::encode`]: this is also
    /// called off the execution pool (for an API's usage figures), where `encode_batch` would
    /// start rayon's global pool beside it.
    pub fn count_tokens(&self, texts: &[&str]) -> Result<Vec<usize>, String> {
        texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode(*t, true)
                    .map(|e| e.len())
                    .map_err(|e| format!("tokenizer failed: {e}"))
            })
            .collect()
    }
}
