//! Pooling: how token embeddings become one sentence embedding (`1_Pooling/config.json`), and
//! the L2 normalisation after it.

use std::path::Path;

use super::TokenBatch;
use super::folder::{Modules, read_json};

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
    pub(super) fn declared_dimension(dir: &Path) -> Result<Option<usize>, String> {
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
