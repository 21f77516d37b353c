//! An ONNX text encoder under the shared sentence-embedding pipeline ([`crate::text`]).

use std::borrow::Cow;
use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef};

use super::OnnxOptions;
use super::graph::Graph;
use super::session::{SessionPool, Slot};
use crate::config::ModelConfig;
use crate::datatype::DataType;
use crate::error::Error;
use crate::text::{Encoder, TokenBatch};

/// The transformer of a text-embedding model on ONNX Runtime: `input_ids`, `attention_mask` and
/// (when the graph has it) `token_type_ids` in, as INT64 or INT32 `[batch, seq]`;
/// `last_hidden_state` (or else the graph's first rank-3 output) out, FP32 `[batch, seq, hidden]`.
pub struct OnnxEncoder {
    model: String,
    pool: SessionPool,
    /// Whether the graph takes `token_type_ids`.
    token_type_ids: bool,
    /// The element type of the id inputs (INT64 or INT32).
    ids: TensorElementType,
    output: String,
    hidden_size: usize,
}

impl OnnxEncoder {
    /// Opens `dir/model.onnx` (or the `model_filename` parameter's file) as an encoder, as
    /// [`load`](super::load) does for a text model (graph cache, reference check, thread and
    /// instance sweep); `options` as for [`load`](super::load). `config` is only read here.
    pub fn new(
        config: &ModelConfig,
        dir: &Path,
        options: &OnnxOptions,
    ) -> Result<OnnxEncoder, Error> {
        super::tune::open_encoder(config, dir, options).map(|(encoder, _)| encoder)
    }

    pub(super) fn from_sessions(
        model: &str,
        dir: &Path,
        sessions: Vec<Session>,
        graph: &Graph,
    ) -> Result<OnnxEncoder, Error> {
        let fail = |reason: String| Error::load(model, format!("as a text encoder: {reason}"));
        let input = |n: &str| graph.inputs.iter().find(|g| g.name == n);
        let mut ids = None;
        for n in ["input_ids", "attention_mask", "token_type_ids"] {
            let Some(g) = input(n) else {
                if n == "token_type_ids" {
                    continue;
                }
                return Err(fail(format!("the graph has no input '{n}'")));
            };
            let ty = match g.datatype {
                Ok(DataType::Int64) => TensorElementType::Int64,
                Ok(DataType::Int32) => TensorElementType::Int32,
                ref other => {
                    return Err(fail(format!(
                        "input '{n}' is {other:?}; it must be INT64 or INT32"
                    )));
                }
            };
            if g.dims.len() != 2 {
                return Err(fail(format!(
                    "input '{n}' has dims {:?}; it must be [batch, sequence]",
                    g.dims
                )));
            }
            if *ids.get_or_insert(ty) != ty {
                return Err(fail("the id inputs differ in element type".into()));
            }
        }
        if let Some(other) = graph
            .inputs
            .iter()
            .find(|g| !["input_ids", "attention_mask", "token_type_ids"].contains(&g.name.as_str()))
        {
            return Err(fail(format!(
                "the graph also needs input '{}', which a tokenizer does not give",
                other.name
            )));
        }
        let output = graph
            .outputs
            .iter()
            .find(|g| g.name == "last_hidden_state")
            .or_else(|| graph.outputs.iter().find(|g| g.dims.len() == 3))
            .ok_or_else(|| {
                fail("the graph has no output 'last_hidden_state' nor any rank-3 output".into())
            })?;
        if output.datatype != Ok(DataType::Fp32) || output.dims.len() != 3 {
            return Err(fail(format!(
                "output '{}' must be FP32 [batch, sequence, hidden]; it is {:?} {:?}",
                output.name, output.datatype, output.dims
            )));
        }
        let hidden_size = match output.dims[2] {
            d if d > 0 => d as usize,
            _ => hidden_size_from_config(dir).ok_or_else(|| {
                fail(format!(
                    "output '{}' has a dynamic hidden size and {}/config.json gives no hidden_size",
                    output.name,
                    dir.display()
                ))
            })?,
        };
        let pool = SessionPool::new(model, sessions, std::iter::once(output.name.as_str()))?;
        Ok(OnnxEncoder {
            model: model.to_string(),
            pool,
            token_type_ids: input("token_type_ids").is_some(),
            ids: ids.unwrap_or(TensorElementType::Int64),
            output: output.name.clone(),
            hidden_size,
        })
    }

    /// The encoder's sessions back (for another arrangement of them).
    pub(super) fn into_sessions(self) -> Vec<Session> {
        self.pool.into_sessions()
    }

    /// Sessions (instances) in the pool.
    pub(super) fn instances(&self) -> usize {
        self.pool.len()
    }

    /// One `[batch, seq]` id input as an ONNX Runtime value; INT64 data is lent, not copied.
    fn ids_value<'a>(
        &self,
        values: &'a [i64],
        batch: &TokenBatch,
    ) -> Result<SessionInputValue<'a>, Error> {
        let shape = vec![batch.batch, batch.seq];
        let err = |e: ort::Error| Error::execution(&self.model, format!("ONNX Runtime: {e}"));
        if values.len() != batch.batch * batch.seq {
            return Err(Error::execution(
                &self.model,
                format!(
                    "token batch holds {} ids for [{}, {}]",
                    values.len(),
                    batch.batch,
                    batch.seq
                ),
            ));
        }
        Ok(match self.ids {
            TensorElementType::Int32 => {
                let narrowed = values
                    .iter()
                    .map(|&v| i32::try_from(v))
                    .collect::<Result<Vec<i32>, _>>()
                    .map_err(|_| Error::execution(&self.model, "a token id does not fit INT32"))?;
                ort::value::Tensor::from_array((shape, narrowed))
                    .map_err(err)?
                    .into()
            }
            _ => TensorRef::from_array_view((shape, values))
                .map_err(err)?
                .into(),
        })
    }
}

/// `hidden_size` from a Hugging Face `config.json`, if there is one.
fn hidden_size_from_config(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("hidden_size")?
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
}

impl Encoder for OnnxEncoder {
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn encode(&self, batch: &TokenBatch) -> Result<Vec<f32>, Error> {
        let mut out = Vec::new();
        self.encode_with(batch, &mut |hidden| out = hidden.to_vec())?;
        Ok(out)
    }

    /// Hands ONNX Runtime's output buffer to `consume` as it is: the hidden states are not copied
    /// (the ids go in lent, INT64, or narrowed once to INT32 for a graph that takes those).
    fn encode_with(
        &self,
        batch: &TokenBatch,
        consume: &mut dyn FnMut(&[f32]),
    ) -> Result<(), Error> {
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("input_ids".into(), self.ids_value(&batch.input_ids, batch)?),
            (
                "attention_mask".into(),
                self.ids_value(&batch.attention_mask, batch)?,
            ),
        ];
        if self.token_type_ids {
            values.push((
                "token_type_ids".into(),
                self.ids_value(&batch.token_type_ids, batch)?,
            ));
        }
        let fail = |reason: String| Error::execution(&self.model, reason);
        self.pool.with(|slot| {
            let Slot {
                session,
                run_options,
            } = slot;
            let outputs = session
                .run_with_options(values, run_options)
                .map_err(|e| fail(format!("ONNX Runtime: {e}")))?;
            let value = outputs
                .get(&self.output)
                .ok_or_else(|| fail(format!("ONNX Runtime returned no '{}'", self.output)))?;
            let (shape, data) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| fail(format!("output '{}': {e}", self.output)))?;
            let want = [batch.batch, batch.seq, self.hidden_size].map(|d| d as i64);
            if shape[..] != want[..] {
                return Err(fail(format!(
                    "output '{}' has shape {shape}, expected {want:?}",
                    self.output
                )));
            }
            consume(data);
            Ok(())
        })
    }
}
