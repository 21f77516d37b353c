//! The pipeline served as a [`Model`]: `TEXT` rows → tokenizer → [`Encoder`] → pooling →
//! (optionally) L2 normalisation → `EMBEDDING` rows; and the configuration a sentence embedder
//! gets or must agree with.

use std::path::{Path, PathBuf};

use super::folder::{max_seq_length_from_dir, normalize_from_modules};
use super::pooling::{Pooling, l2_normalize, pool};
use super::tokenizer::TextTokenizer;
use super::{DEFAULT_MAX_BATCH_SIZE, EMBEDDING_OUTPUT, Encoder, TEXT_INPUT};
use crate::config::{DynamicBatching, ModelConfig, TensorConfig};
use crate::datatype::DataType;
use crate::error::Error;
use crate::model::{Model, TokenCount};
use crate::tensor::{Tensor, TensorData};

/// The default configuration of a sentence embedder: input `TEXT` (BYTES, dims `[1]`), output
/// `EMBEDDING` (FP32, dims `[hidden_size]`), `max_batch_size` [`DEFAULT_MAX_BATCH_SIZE`] and
/// dynamic batching on.
pub fn default_config(name: &str, backend: &str, hidden_size: usize) -> ModelConfig {
    ModelConfig {
        name: name.to_string(),
        backend: backend.to_string(),
        max_batch_size: DEFAULT_MAX_BATCH_SIZE,
        input: vec![text_input()],
        output: vec![embedding_output(hidden_size)],
        dynamic_batching: Some(DynamicBatching::default()),
        ..ModelConfig::default()
    }
}

fn text_input() -> TensorConfig {
    TensorConfig {
        name: TEXT_INPUT.to_string(),
        data_type: DataType::Bytes.config_name(),
        dims: vec![1],
        optional: false,
    }
}

pub(super) fn embedding_output(hidden_size: usize) -> TensorConfig {
    TensorConfig {
        name: EMBEDDING_OUTPUT.to_string(),
        data_type: DataType::Fp32.config_name(),
        dims: vec![hidden_size as i64],
        optional: false,
    }
}

/// Fills in what a sentence embedder's configuration leaves out and checks what it states.
/// Errors are reasons (without the model name).
fn complete_config(mut config: ModelConfig, hidden_size: usize) -> Result<ModelConfig, String> {
    if config.max_batch_size == 0 {
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE;
        if config.dynamic_batching.is_none() {
            config.dynamic_batching = Some(DynamicBatching::default());
        }
    }
    if config.input.is_empty() {
        config.input = vec![text_input()];
    }
    if config.output.is_empty() {
        config.output = vec![embedding_output(hidden_size)];
    }
    let names = |list: &[TensorConfig]| {
        list.iter()
            .map(|t| format!("'{}'", t.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if config.input.len() != 1 {
        return Err(format!(
            "a sentence embedder has one input, '{TEXT_INPUT}'; the config lists {}",
            names(&config.input)
        ));
    }
    if config.output.len() != 1 {
        return Err(format!(
            "a sentence embedder has one output, '{EMBEDDING_OUTPUT}'; the config lists {}",
            names(&config.output)
        ));
    }
    let check = |kind: &str,
                 t: &TensorConfig,
                 name: &str,
                 dtype: DataType,
                 dims_ok: &dyn Fn(&[i64]) -> bool,
                 dims_want: String| {
        if t.name != name {
            return Err(format!(
                "{kind} '{}' is not the sentence embedder's {kind} '{name}'",
                t.name
            ));
        }
        if DataType::from_config_name(&t.data_type).ok() != Some(dtype) {
            return Err(format!(
                "{kind} '{}' has data_type '{}', expected {}",
                t.name,
                t.data_type,
                dtype.config_name()
            ));
        }
        if !dims_ok(&t.dims) {
            return Err(format!(
                "{kind} '{}' has dims {:?}, expected {dims_want}",
                t.name, t.dims
            ));
        }
        Ok(())
    };
    check(
        "input",
        &config.input[0],
        TEXT_INPUT,
        DataType::Bytes,
        &|d| d == [1],
        "[1] (one sentence per row)".into(),
    )?;
    let hidden = hidden_size as i64;
    check(
        "output",
        &config.output[0],
        EMBEDDING_OUTPUT,
        DataType::Fp32,
        &|d| d == [hidden] || d == [-1],
        format!("[{hidden}] (the encoder's hidden size)"),
    )?;
    config.validate().map_err(|e| match e {
        Error::InvalidConfig { reason, .. } => reason,
        other => other.to_string(),
    })?;
    Ok(config)
}

/// A sentence-transformers model: tokenizer, an [`Encoder`], pooling and (optionally) L2
/// normalisation, served as a [`Model`] with input `TEXT` and output `EMBEDDING`.
pub struct SentenceEmbedder<E: Encoder> {
    config: ModelConfig,
    tokenizer: TextTokenizer,
    encoder: E,
    pooling: Pooling,
    normalize: bool,
    dim: usize,
}

impl<E: Encoder> std::fmt::Debug for SentenceEmbedder<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEmbedder")
            .field("model", &self.config.name)
            .field("tokenizer", &self.tokenizer)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl<E: Encoder> SentenceEmbedder<E> {
    /// Builds the embedder from a model folder in the sentence-transformers layout:
    /// `tokenizer.json` (required), `1_Pooling/config.json` (absent: mean pooling),
    /// `sentence_bert_config.json` / `config.json` (the token limit, see
    /// [`max_seq_length_from_dir`]) and `modules.json` (a `Normalize` module turns on L2
    /// normalisation; the config parameter `normalize` = `true`/`false` overrides it).
    ///
    /// The configuration is completed: input `TEXT` and output `EMBEDDING` when it lists none
    /// (when it lists them, their names, types and dims must agree), `max_batch_size`
    /// [`DEFAULT_MAX_BATCH_SIZE`] with dynamic batching when it says 0. Name and backend are kept.
    pub fn new(config: ModelConfig, dir: &Path, encoder: E) -> Result<SentenceEmbedder<E>, Error> {
        let model = config.name.clone();
        let fail = |reason: String| Error::load(&model, reason);
        let dim = encoder.hidden_size();
        if dim == 0 {
            return Err(fail("the encoder's hidden size is 0".into()));
        }
        let config = complete_config(config, dim).map_err(fail)?;
        if let Some(declared) = Pooling::declared_dimension(dir).map_err(fail)?
            && declared != dim
        {
            return Err(fail(format!(
                "the pooling configuration's word_embedding_dimension is {declared}, but the \
                 encoder's hidden size is {dim}"
            )));
        }
        let pooling = Pooling::from_dir(dir).map_err(fail)?;
        let normalize = match config.parameter("normalize").map(str::trim) {
            None | Some("") => normalize_from_modules(dir).map_err(fail)?,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                return Err(fail(format!(
                    "parameter 'normalize' is '{v}', expected 'true' or 'false'"
                )));
            }
        };
        let max_seq_length = max_seq_length_from_dir(dir).map_err(fail)?;
        let tokenizer_file: PathBuf = dir.join("tokenizer.json");
        let tokenizer = TextTokenizer::from_file(&tokenizer_file, max_seq_length).map_err(fail)?;
        Ok(SentenceEmbedder {
            config,
            tokenizer,
            encoder,
            pooling,
            normalize,
            dim,
        })
    }

    /// The pooling in use.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether embeddings are L2-normalised.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// The embedding dimension (the encoder's hidden size).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The tokenizer (truncation at the model's token limit).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The encoder.
    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    /// The number of tokens each text costs the encoder (after truncation, special tokens
    /// included); a batch costs `batch × max` of these, since it is padded to its longest.
    pub fn count_tokens(&self, texts: &[&str]) -> Result<Vec<usize>, Error> {
        self.tokenizer
            .count_tokens(texts)
            .map_err(|e| Error::execution(&self.config.name, e))
    }

    /// Embeds `texts`: `texts.len()` rows of [`dim`](Self::dim) values, row-major.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>, Error> {
        let model = &self.config.name;
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let batch = self
            .tokenizer
            .encode(texts)
            .map_err(|e| Error::execution(model, e))?;
        let mut pooled = if batch.seq == 0 {
            pool(&[], &batch, self.dim, self.pooling)
        } else {
            let expected = batch.batch * batch.seq * self.dim;
            let mut pooled = Err(0);
            // Pooled straight from the encoder's buffer (for ONNX Runtime: its output, uncopied).
            self.encoder.encode_with(&batch, &mut |hidden| {
                pooled = if hidden.len() == expected {
                    Ok(pool(hidden, &batch, self.dim, self.pooling))
                } else {
                    Err(hidden.len())
                };
            })?;
            pooled.map_err(|got| {
                Error::execution(
                    model,
                    format!(
                        "the encoder returned {got} values for a batch of {} × {} tokens × {} \
                         (expected {expected})",
                        batch.batch, batch.seq, self.dim
                    ),
                )
            })?
        };
        if self.normalize {
            l2_normalize(&mut pooled, self.dim);
        }
        Ok(pooled)
    }
}

/// The sentences of a `TEXT` tensor (BYTES, shape `[batch, 1]` or `[batch]`), row by row.
fn decode_text<'t>(model: &str, tensor: &'t Tensor) -> Result<Vec<&'t str>, Error> {
    let name = &tensor.name();
    let TensorData::Bytes(elements) = &tensor.data() else {
        return Err(Error::execution(
            model,
            format!("input '{name}' is {}, expected BYTES", tensor.datatype()),
        ));
    };
    let rows = match tensor.shape() {
        [rows] | [rows, 1] => *rows,
        other => {
            return Err(Error::execution(
                model,
                format!("input '{name}' has shape {other:?}, expected [batch, 1] or [batch]"),
            ));
        }
    };
    if elements.len() != rows {
        return Err(Error::execution(
            model,
            format!(
                "input '{name}' has {} elements for {rows} rows",
                elements.len()
            ),
        ));
    }
    elements
        .iter()
        .enumerate()
        .map(|(row, bytes)| {
            std::str::from_utf8(bytes).map_err(|e| {
                Error::execution(
                    model,
                    format!("input '{name}' row {row} is not valid UTF-8: {e}"),
                )
            })
        })
        .collect()
}

/// An execution error's reason, without the model's name (the caller names it).
fn reason(e: Error) -> String {
    match e {
        Error::Execution { reason, .. } => reason,
        other => other.to_string(),
    }
}

impl<E: Encoder> Model for SentenceEmbedder<E> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The encoder's weights (the tokenizer's tables, a few MiB at most, are not counted).
    fn memory_bytes(&self) -> Option<u64> {
        self.encoder.memory_bytes()
    }

    /// The request's rows tokenized one at a time (the same tokenizer and truncation as
    /// [`embed`](SentenceEmbedder::embed), so the counts are the lengths `execute` pads).
    fn request_tokens(&self, inputs: &[Tensor]) -> Option<Result<TokenCount, String>> {
        let model = &self.config.name;
        let counted = inputs
            .first()
            .ok_or_else(|| format!("no '{TEXT_INPUT}' input given"))
            .and_then(|text| {
                let texts = decode_text(model, text).map_err(reason)?;
                self.tokenizer.count_tokens(&texts)
            })
            .map(|counts| TokenCount {
                longest: counts.iter().copied().max().unwrap_or(0),
                total: counts.iter().sum(),
            });
        Some(counted)
    }

    fn count_tokens(&self, texts: &[&str]) -> Option<Result<Vec<usize>, Error>> {
        Some(SentenceEmbedder::count_tokens(self, texts))
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        let model = &self.config.name;
        let Some(text) = inputs.first() else {
            return Err(Error::execution(
                model,
                format!("no '{TEXT_INPUT}' input given"),
            ));
        };
        let texts = decode_text(model, text)?;
        let embeddings = self.embed(&texts)?;
        let output = self
            .config
            .output
            .first()
            .map_or(EMBEDDING_OUTPUT, |o| o.name.as_str());
        let embeddings = Tensor::from_f32(output, vec![texts.len(), self.dim], &embeddings)
            .map_err(|e| Error::bad_output(model, e))?;
        Ok(vec![embeddings])
    }
}
