//! The sentence-embedding pipeline that the candle and ONNX Runtime backends share:
//! tokenizer (`tokenizer.json`) → encoder (the backend's transformer) → pooling (as
//! `1_Pooling/config.json` declares: mean, CLS or max) → L2 normalisation.
//!
//! Input `TEXT` (BYTES, `[-1, 1]`: one sentence per row), output `EMBEDDING` (FP32, `[-1, dim]`).
//! A batch is padded to its longest sentence; padding never changes a sentence's embedding
//! (pooling only sees the attention mask's tokens).

use std::path::{Path, PathBuf};

use tokenizers::{
    PaddingParams, PostProcessor, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::config::{DynamicBatching, ModelConfig, TensorConfig};
use crate::datatype::DataType;
use crate::error::{ConfigError, ModelError};
use crate::model::Model;
use crate::tensor::{Tensor, TensorData};

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
    fn encode(&self, batch: &TokenBatch) -> Result<Vec<f32>, ModelError>;
}

/// Name of a sentence embedder's input: BYTES, dims `[1]`, one UTF-8 sentence per row.
pub const TEXT_INPUT: &str = "TEXT";
/// Name of a sentence embedder's output: FP32, dims `[hidden_size]`, one embedding per row.
pub const EMBEDDING_OUTPUT: &str = "EMBEDDING";
/// `max_batch_size` a sentence embedder gets when its configuration says 0: text embedders batch.
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 64;
/// Token limit when neither `sentence_bert_config.json` nor `config.json` gives one.
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 512;

// ---------------------------------------------------------------------------------------------
// Pooling
// ---------------------------------------------------------------------------------------------

/// How token embeddings become one sentence embedding, as sentence-transformers'
/// `1_Pooling/config.json` declares it. Only the attention mask's real tokens count, except for
/// [`Pooling::Cls`], which takes the first token (`[CLS]`; batches are padded on the right).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of the real tokens (`pooling_mode_mean_tokens`).
    Mean,
    /// The first token's embedding (`pooling_mode_cls_token`).
    Cls,
    /// The component-wise maximum over the real tokens (`pooling_mode_max_tokens`).
    Max,
}

impl Pooling {
    /// Parses the text of a sentence-transformers pooling configuration. Exactly one of
    /// `pooling_mode_mean_tokens`, `pooling_mode_cls_token` and `pooling_mode_max_tokens` must be
    /// true; other modes (`mean_sqrt_len`, `weightedmean`, `lasttoken`) are refused. `file` only
    /// names the file in error messages.
    pub fn from_config_json(text: &str, file: &Path) -> Result<Pooling, String> {
        let file = file.display();
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("{file} is not valid JSON: {e}"))?;
        let Some(object) = value.as_object() else {
            return Err(format!("{file} is not a JSON object"));
        };
        let flag = |key: &str| -> Result<bool, String> {
            match object.get(key) {
                None | Some(serde_json::Value::Null) => Ok(false),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(other) => Err(format!("{file}: {key} is {other}, not true or false")),
            }
        };
        for unsupported in [
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
            "pooling_mode_lasttoken",
        ] {
            if flag(unsupported)? {
                return Err(format!(
                    "{file}: {unsupported} is not supported (only mean, cls and max pooling)"
                ));
            }
        }
        let modes = [
            ("pooling_mode_mean_tokens", Pooling::Mean),
            ("pooling_mode_cls_token", Pooling::Cls),
            ("pooling_mode_max_tokens", Pooling::Max),
        ];
        let mut chosen = Vec::new();
        for (key, mode) in modes {
            if flag(key)? {
                chosen.push((key, mode));
            }
        }
        match chosen.as_slice() {
            [(_, mode)] => Ok(*mode),
            [] => Err(format!(
                "{file} enables no pooling mode (expected one of pooling_mode_mean_tokens, \
                 pooling_mode_cls_token, pooling_mode_max_tokens set to true)"
            )),
            several => Err(format!(
                "{file} enables {} pooling modes at once ({}); only one is supported",
                several.len(),
                several
                    .iter()
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Reads `<dir>/<pooling folder>/config.json`; the folder is the one `modules.json` gives
    /// for its `sentence_transformers.models.Pooling` module, else `1_Pooling`. When the file
    /// does not exist the pooling is [`Pooling::Mean`] (what sentence-transformers does for a
    /// plain transformer folder).
    pub fn from_dir(dir: &Path) -> Result<Pooling, String> {
        let folder = Modules::read(dir)?
            .path_of("sentence_transformers.models.Pooling")
            .unwrap_or_else(|| "1_Pooling".to_string());
        let file = dir.join(folder).join("config.json");
        match std::fs::read_to_string(&file) {
            Ok(text) => Pooling::from_config_json(&text, &file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pooling::Mean),
            Err(e) => Err(format!("cannot read {}: {e}", file.display())),
        }
    }

    /// The `word_embedding_dimension` a pooling configuration declares, if any.
    fn declared_dimension(dir: &Path) -> Result<Option<usize>, String> {
        let folder = Modules::read(dir)?
            .path_of("sentence_transformers.models.Pooling")
            .unwrap_or_else(|| "1_Pooling".to_string());
        let file = dir.join(folder).join("config.json");
        let Some(value) = read_json(&file)? else {
            return Ok(None);
        };
        match value.get("word_embedding_dimension") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|d| Some(d as usize)).ok_or_else(|| {
                format!(
                    "{}: word_embedding_dimension is {v}, not a non-negative integer",
                    file.display()
                )
            }),
        }
    }
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
fn read_json(file: &Path) -> Result<Option<serde_json::Value>, String> {
    match std::fs::read_to_string(file) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{} is not valid JSON: {e}", file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", file.display())),
    }
}

/// The module list of a sentence-transformers folder (`modules.json`); empty when absent.
struct Modules(Vec<(String, String)>);

impl Modules {
    fn read(dir: &Path) -> Result<Modules, String> {
        let file = dir.join("modules.json");
        let Some(value) = read_json(&file)? else {
            return Ok(Modules(Vec::new()));
        };
        let Some(list) = value.as_array() else {
            return Err(format!("{} is not a JSON array of modules", file.display()));
        };
        let mut modules = Vec::with_capacity(list.len());
        for (i, module) in list.iter().enumerate() {
            let Some(kind) = module.get("type").and_then(|t| t.as_str()) else {
                return Err(format!(
                    "{}: module {i} has no \"type\" string",
                    file.display()
                ));
            };
            let path = module.get("path").and_then(|p| p.as_str()).unwrap_or("");
            modules.push((kind.to_string(), path.to_string()));
        }
        Ok(Modules(modules))
    }

    fn contains(&self, kind: &str) -> bool {
        self.0.iter().any(|(k, _)| k == kind)
    }

    fn path_of(&self, kind: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, p)| k == kind && !p.is_empty())
            .map(|(_, p)| p.clone())
    }
}

/// Whether the folder's `modules.json` lists a `sentence_transformers.models.Normalize` module
/// (false when there is no `modules.json`).
pub fn normalize_from_modules(dir: &Path) -> Result<bool, String> {
    Ok(Modules::read(dir)?.contains("sentence_transformers.models.Normalize"))
}

/// The token limit of a model folder: `max_seq_length` of `sentence_bert_config.json` when
/// present, else `max_position_embeddings` of `config.json`, else [`DEFAULT_MAX_SEQ_LENGTH`];
/// never more than `max_position_embeddings` (the encoder has no positions beyond it).
pub fn max_seq_length_from_dir(dir: &Path) -> Result<usize, String> {
    let positive = |file: &Path, key: &str| -> Result<Option<usize>, String> {
        let Some(value) = read_json(file)? else {
            return Ok(None);
        };
        match value.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(format!(
                    "{}: {key} is {v}, not a positive integer",
                    file.display()
                )),
            },
        }
    };
    let sbert = positive(&dir.join("sentence_bert_config.json"), "max_seq_length")?;
    let positions = positive(&dir.join("config.json"), "max_position_embeddings")?;
    Ok(match (sbert, positions) {
        (Some(s), Some(p)) => s.min(p),
        (Some(s), None) => s,
        (None, Some(p)) => p,
        (None, None) => DEFAULT_MAX_SEQ_LENGTH,
    })
}

/// Pools the encoder's last hidden state (`[batch.batch, batch.seq, dim]` row-major) into one
/// `dim`-vector per sentence, looking only at the tokens the attention mask marks real (except
/// [`Pooling::Cls`], which takes position 0). A sentence without real tokens pools to zeros.
/// Values missing from a short `hidden` count as padding, so this never panics.
pub fn pool(hidden: &[f32], batch: &TokenBatch, dim: usize, pooling: Pooling) -> Vec<f32> {
    let mut out = vec![0.0f32; batch.batch * dim];
    if dim == 0 {
        return out;
    }
    let token = |b: usize, t: usize| -> Option<&[f32]> {
        let start = (b * batch.seq + t).checked_mul(dim)?;
        hidden.get(start..start.checked_add(dim)?)
    };
    let real = |b: usize, t: usize| batch.attention_mask.get(b * batch.seq + t) == Some(&1);
    for (b, row) in out.chunks_exact_mut(dim).enumerate() {
        match pooling {
            Pooling::Cls => {
                if batch.seq > 0
                    && let Some(first) = token(b, 0)
                {
                    row.copy_from_slice(first);
                }
            }
            Pooling::Mean => {
                let mut sum = vec![0.0f64; dim];
                let mut count = 0usize;
                for t in 0..batch.seq {
                    if let (true, Some(values)) = (real(b, t), token(b, t)) {
                        for (s, v) in sum.iter_mut().zip(values) {
                            *s += f64::from(*v);
                        }
                        count += 1;
                    }
                }
                if count > 0 {
                    for (r, s) in row.iter_mut().zip(&sum) {
                        *r = (*s / count as f64) as f32;
                    }
                }
            }
            Pooling::Max => {
                let mut any = false;
                for t in 0..batch.seq {
                    if let (true, Some(values)) = (real(b, t), token(b, t)) {
                        for (r, v) in row.iter_mut().zip(values) {
                            *r = if any { r.max(*v) } else { *v };
                        }
                        any = true;
                    }
                }
            }
        }
    }
    out
}

/// Divides each `dim`-row of `rows` by its Euclidean norm (rows of norm below 1e-12 are divided
/// by 1e-12, as sentence-transformers does, so a zero row stays zero).
pub fn l2_normalize(rows: &mut [f32], dim: usize) {
    if dim == 0 {
        return;
    }
    for row in rows.chunks_mut(dim) {
        let norm = row
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        for v in row.iter_mut() {
            *v = (f64::from(*v) / norm) as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

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

    fn encodings(&self, texts: &[&str]) -> Result<Vec<tokenizers::Encoding>, String> {
        // encode_batch runs on the current rayon pool (the execution pool, when called from it).
        self.tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| format!("tokenizer failed: {e}"))
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
    pub fn count_tokens(&self, texts: &[&str]) -> Result<Vec<usize>, String> {
        Ok(self.encodings(texts)?.iter().map(|e| e.len()).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

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

fn embedding_output(hidden_size: usize) -> TensorConfig {
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
        ConfigError::Invalid { reason, .. } => reason,
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
    pub fn new(
        config: ModelConfig,
        dir: &Path,
        encoder: E,
    ) -> Result<SentenceEmbedder<E>, ModelError> {
        let model = config.name.clone();
        let fail = |reason: String| ModelError::load(&model, reason);
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
    pub fn count_tokens(&self, texts: &[&str]) -> Result<Vec<usize>, ModelError> {
        self.tokenizer
            .count_tokens(texts)
            .map_err(|e| ModelError::execution(&self.config.name, e))
    }

    /// Embeds `texts`: `texts.len()` rows of [`dim`](Self::dim) values, row-major.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>, ModelError> {
        let model = &self.config.name;
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let batch = self
            .tokenizer
            .encode(texts)
            .map_err(|e| ModelError::execution(model, e))?;
        let hidden = if batch.seq == 0 {
            Vec::new()
        } else {
            let hidden = self.encoder.encode(&batch)?;
            let expected = batch.batch * batch.seq * self.dim;
            if hidden.len() != expected {
                return Err(ModelError::execution(
                    model,
                    format!(
                        "the encoder returned {} values for a batch of {} × {} tokens × {} \
                         (expected {expected})",
                        hidden.len(),
                        batch.batch,
                        batch.seq,
                        self.dim
                    ),
                ));
            }
            hidden
        };
        let mut pooled = pool(&hidden, &batch, self.dim, self.pooling);
        if self.normalize {
            l2_normalize(&mut pooled, self.dim);
        }
        Ok(pooled)
    }
}

/// The sentences of a `TEXT` tensor (BYTES, shape `[batch, 1]` or `[batch]`), row by row.
fn decode_text<'t>(model: &str, tensor: &'t Tensor) -> Result<Vec<&'t str>, ModelError> {
    let name = &tensor.name;
    let TensorData::Bytes(elements) = &tensor.data else {
        return Err(ModelError::execution(
            model,
            format!("input '{name}' is {}, expected BYTES", tensor.datatype),
        ));
    };
    let rows = match tensor.shape.as_slice() {
        [rows] | [rows, 1] => *rows,
        other => {
            return Err(ModelError::execution(
                model,
                format!("input '{name}' has shape {other:?}, expected [batch, 1] or [batch]"),
            ));
        }
    };
    if elements.len() != rows {
        return Err(ModelError::execution(
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
                ModelError::execution(
                    model,
                    format!("input '{name}' row {row} is not valid UTF-8: {e}"),
                )
            })
        })
        .collect()
}

impl<E: Encoder> Model for SentenceEmbedder<E> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The longest row's tokens, estimated from its UTF-8 length (WordPiece averages about four
    /// bytes of English per token; a third of the bytes errs on the high side, so batches come
    /// out small rather than over budget) plus the two special tokens, capped at the truncation
    /// length. Cheap enough for an async thread: no tokenizing.
    fn estimate_tokens(&self, inputs: &[Tensor]) -> Option<usize> {
        let TensorData::Bytes(rows) = &inputs.first()?.data else {
            return None;
        };
        let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        Some((longest / 3 + 2).min(self.tokenizer.max_seq_length()))
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let model = &self.config.name;
        let Some(text) = inputs.first() else {
            return Err(ModelError::execution(
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
        Ok(vec![Tensor::from_f32(
            output,
            vec![texts.len(), self.dim],
            &embeddings,
        )])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;

    use super::*;

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

    /// A word-level tokenizer.json: lowercases, splits on whitespace, wraps in [CLS] … [SEP].
    const TOKENIZER: &str = r#"{
      "version": "1.0", "truncation": null,
      "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
      "added_tokens": [],
      "normalizer": {"type": "Lowercase"},
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                           "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
      "decoder": null,
      "model": {"type": "WordLevel", "unk_token": "[UNK]",
                "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5,
                          "big": 6, "cat": 7}}
    }"#;

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

        fn encode(&self, batch: &TokenBatch) -> Result<Vec<f32>, ModelError> {
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
        dir.write("tokenizer.json", TOKENIZER)
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
        let tok = TextTokenizer::from_bytes(TOKENIZER.as_bytes(), 4).unwrap();
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
            let e = TextTokenizer::from_bytes(TOKENIZER.as_bytes(), limit).unwrap_err();
            assert!(e.contains("token limit"), "{limit}: {e}");
        }
        assert!(TextTokenizer::from_bytes(TOKENIZER.as_bytes(), 3).is_ok());
        assert!(TextTokenizer::from_bytes(b"{}", 8).is_err());
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
            assert!(matches!(e, ModelError::Load { .. }), "{e}");
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
        assert_eq!(out[0].name, EMBEDDING_OUTPUT);
        assert_eq!(out[0].shape, vec![2, 2]);
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
        assert!(matches!(e, ModelError::Execution { .. }));
        assert!(e.to_string().contains("row 1 is not valid UTF-8"), "{e}");
        let e = m.execute(&[]).unwrap_err().to_string();
        assert!(e.contains("no 'TEXT' input"), "{e}");
        let e = m
            .execute(&[Tensor::from_f32(TEXT_INPUT, vec![1, 1], &[1.0])])
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
        let flat =
            Tensor::from_elements(TEXT_INPUT, &[1], vec![Bytes::from_static(b"cat")]).unwrap();
        assert_eq!(m.execute(&[flat]).unwrap()[0].shape, vec![1, 2]);
        let empty = Tensor::from_elements(TEXT_INPUT, &[0, 1], vec![]).unwrap();
        assert_eq!(m.execute(&[empty]).unwrap()[0].shape, vec![0, 2]);
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
    }

    #[test]
    fn token_estimates_take_the_longest_row_capped_at_the_limit() {
        let dir = model_dir();
        dir.write("sentence_bert_config.json", r#"{"max_seq_length": 20}"#);
        let m = embedder(&dir, default_config("m", "x", 2));
        let input = text(&[b"hello", b"hello big big world"]);
        assert_eq!(
            m.estimate_tokens(std::slice::from_ref(&input)),
            Some(19 / 3 + 2)
        );
        let long = text(&[&[b'a'; 300]]);
        assert_eq!(m.estimate_tokens(&[long]), Some(20));
        assert_eq!(m.estimate_tokens(&[]), None);
    }
}
