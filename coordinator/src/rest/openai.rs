//! OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models[/{model}]`, the shape
//! the `openai` package, LangChain and LlamaIndex speak.
//!
//! Any text model qualifies that takes one BYTES input (one text per row), answers one FP32
//! embedding per row, and has a tokenizer (so that `usage` holds real token counts, from the
//! model's own tokenizer). The texts go through the inference edge like any request, in calls of
//! at most the model's `max_batch_size` rows, which the dynamic batcher may join with other
//! requests; the tokens are counted on a blocking thread while the model computes.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use veraltheim_fastpath::ModelWorker;
use veraltheim_models::{DataType, ModelConfig, ModelState, Tensor};
use veraltheim_serving::InferCall;

use super::{RestError, caller, read_body, refused};
use crate::auth::Caller;
use crate::context::Context;

pub fn routes() -> Router<Arc<Context>> {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
}

/// A refusal in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.
struct OpenAiError {
    error: RestError,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl OpenAiError {
    fn bad(message: impl Into<String>, param: &'static str) -> Self {
        OpenAiError {
            error: RestError::bad_request(message),
            param: Some(param),
            code: None,
        }
    }
}

impl From<RestError> for OpenAiError {
    fn from(error: RestError) -> Self {
        let code = (error.status == StatusCode::NOT_FOUND).then_some("model_not_found");
        OpenAiError {
            error,
            param: None,
            code,
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = crate::refusal::openai_body(
            &self.error.message,
            self.error.status,
            self.param,
            self.code,
        );
        self.error.with_body(body)
    }
}

/// How a model serves embeddings, read from its configuration.
#[derive(Debug, PartialEq)]
struct EmbeddingModel {
    input: String,
    output: String,
    /// The input's shape after the rows (each dimension 1: one text per row).
    row_shape: Vec<i64>,
    /// Most rows in one call: `max_batch_size`, or the fixed row count of a model that does not
    /// batch (`None`: any).
    rows_per_call: Option<usize>,
    dim: usize,
}

/// Whether `c` is an embedding model, and if not, why (the 400's message).
fn embedding_model(c: &ModelConfig) -> Result<EmbeddingModel, String> {
    let name = &c.name;
    let [input] = &c.input[..] else {
        return Err(format!(
            "model '{name}' has {} inputs; an embedding model takes one, the text (BYTES)",
            c.input.len()
        ));
    };
    let [output] = &c.output[..] else {
        return Err(format!(
            "model '{name}' has {} outputs; an embedding model has one, the embedding (FP32)",
            c.output.len()
        ));
    };
    let in_type = ModelConfig::datatype_of(input);
    if in_type != DataType::Bytes {
        return Err(format!(
            "model '{name}' takes {in_type} input '{}'; an embedding model takes text (BYTES)",
            input.name
        ));
    }
    let out_type = ModelConfig::datatype_of(output);
    if out_type != DataType::Fp32 {
        return Err(format!(
            "model '{name}' answers {out_type} output '{}'; embeddings are served from FP32 \
             outputs",
            output.name
        ));
    }
    // Rows come first: the batch dimension, or the first dimension of a model that does not
    // batch (variable, or exactly 1).
    let (in_rest, out_rest, rows_per_call) = if c.max_batch_size > 0 {
        (
            &input.dims[..],
            &output.dims[..],
            Some(c.max_batch_size as usize),
        )
    } else {
        let (Some(&ir), Some(&or)) = (input.dims.first(), output.dims.first()) else {
            return Err(format!(
                "model '{name}' does not batch and its input or output has no dimensions; an \
                 embedding model has a row per text"
            ));
        };
        if !matches!((ir, or), (-1, -1) | (1, 1) | (-1, 1) | (1, -1)) {
            return Err(format!(
                "model '{name}' does not batch and its first dimensions are {ir} (input) and \
                 {or} (output); an embedding model has a row per text"
            ));
        }
        let rows = (ir == 1 || or == 1).then_some(1);
        (&input.dims[1..], &output.dims[1..], rows)
    };
    if in_rest.iter().any(|&d| d != 1 && d != -1) {
        return Err(format!(
            "model '{name}''s input '{}' has dims {:?}; an embedding model takes one text per \
             row",
            input.name, input.dims
        ));
    }
    let dim = match out_rest {
        [d] if *d > 0 => *d as usize,
        _ => {
            return Err(format!(
                "model '{name}''s output '{}' has dims {:?}; an embedding is one vector of a \
                 fixed size per row",
                output.name, output.dims
            ));
        }
    };
    Ok(EmbeddingModel {
        input: input.name.clone(),
        output: output.name.clone(),
        row_shape: vec![1; in_rest.len()],
        rows_per_call,
        dim,
    })
}

fn no_tokenizer(name: &str) -> OpenAiError {
    OpenAiError::bad(
        format!(
            "model '{name}' has no tokenizer, so the tokens of its input cannot be counted; \
             embeddings are served for text models (a sentence-transformers folder)"
        ),
        "model",
    )
}

/// Refuses a loaded model without a tokenizer: its token usage could not be counted.
fn check_tokenizer(name: &str, w: &ModelWorker) -> Result<(), OpenAiError> {
    match w.count_tokens(&[]) {
        Some(_) => Ok(()),
        None => Err(no_tokenizer(name)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsRequest {
    model: String,
    input: Input,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<Value>,
    /// Accepted and not used.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// Most texts in one request (OpenAI's own bound).
const MAX_INPUTS: usize = 2048;

/// `input` as it was read: its texts, or why it is refused. Read without building JSON values,
/// and without keeping anything past the first refusal, so a hostile `input` costs no more than
/// its accepted texts.
#[derive(Debug, PartialEq)]
enum Input {
    Texts(Vec<Bytes>),
    Refused(String),
}

/// One element of an `input` list.
enum Item {
    Text(String),
    /// A token id, or a list of them.
    Token,
    /// Anything else, described.
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a text")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
                Ok(Item::Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Item, E> {
                Ok(Item::Text(v))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Item, E> {
                Ok(Item::Token)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Item, E> {
                Ok(Item::Token)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Item, E> {
                Ok(Item::Token)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Item, E> {
                Ok(Item::Other("a boolean"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Item, E> {
                Ok(Item::Other("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Item::Token)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Item::Other("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Input;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Input, E> {
                Ok(Input::Texts(vec![Bytes::from(v.to_string())]))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Input, E> {
                Ok(Input::Texts(vec![Bytes::from(v)]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Input, A::Error> {
                let mut texts = Vec::new();
                let mut refused = None;
                while let Some(item) = seq.next_element::<Item>()? {
                    if refused.is_some() {
                        continue;
                    }
                    match item {
                        Item::Text(_) if texts.len() == MAX_INPUTS => {
                            refused = Some(format!(
                                "'input' holds more than {MAX_INPUTS} texts; send at most \
                                 {MAX_INPUTS} per request"
                            ));
                        }
                        Item::Text(t) => texts.push(Bytes::from(t)),
                        Item::Token => {
                            refused = Some(
                                "'input' holds token ids; this server takes text (a string or \
                                 a list of strings) and tokenizes it with the model's own \
                                 tokenizer"
                                    .to_string(),
                            );
                        }
                        Item::Other(what) => {
                            refused =
                                Some(format!("'input'[{}] is {what}, not a string", texts.len()));
                        }
                    }
                    if refused.is_some() {
                        texts = Vec::new();
                    }
                }
                Ok(match refused {
                    Some(why) => Input::Refused(why),
                    None if texts.is_empty() => {
                        Input::Refused("'input' is an empty list; give at least one text".into())
                    }
                    None => Input::Texts(texts),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Input, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(not_text("an object"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Input, E> {
                Ok(not_text("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Input, E> {
                Ok(not_text("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Input, E> {
                Ok(not_text("a number"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Input, E> {
                Ok(not_text("a boolean"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Input, E> {
                Ok(not_text("null"))
            }
        }
        d.deserialize_any(V)
    }
}

fn not_text(what: &str) -> Input {
    Input::Refused(format!(
        "'input' must be a string or a list of strings, not {what}"
    ))
}

/// The texts of `input`, or a 400 naming why there are none.
fn texts(input: Input) -> Result<Vec<Bytes>, OpenAiError> {
    match input {
        Input::Texts(t) => Ok(t),
        Input::Refused(why) => Err(OpenAiError::bad(why, "input")),
    }
}

/// Standard base64 with padding (RFC 4648), what OpenAI's `encoding_format: base64` carries.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

type Counting = tokio::task::JoinHandle<Option<Result<Vec<usize>, veraltheim_models::Error>>>;

/// Starts counting the tokens of `texts` with the model's tokenizer, on a blocking thread.
fn start_counting(w: Arc<ModelWorker>, texts: Vec<Bytes>) -> Counting {
    tokio::task::spawn_blocking(move || {
        // The texts came from JSON strings: always UTF-8.
        let strs: Vec<&str> = texts
            .iter()
            .map(|t| std::str::from_utf8(t).unwrap_or_default())
            .collect();
        w.count_tokens(&strs)
    })
}

/// The tokens of all the texts together.
async fn tokens(name: &str, counting: Counting) -> Result<usize, OpenAiError> {
    let internal = |m: String| {
        OpenAiError::from(RestError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("counting the tokens for model '{name}' failed: {m}"),
        ))
    };
    match counting.await {
        Ok(Some(Ok(counts))) => Ok(counts.iter().sum()),
        Ok(Some(Err(e))) => Err(internal(e.to_string())),
        Ok(None) => Err(no_tokenizer(name)),
        Err(e) => Err(internal(e.to_string())),
    }
}

async fn embeddings(
    State(ctx): State<Arc<Context>>,
    found: Option<axum::Extension<Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    let received = Instant::now();
    let trace = super::traceparent(&headers);
    let caller = caller(found)?;
    let body = read_body(&headers, body, ctx.max_body_bytes).await?;
    let r: EmbeddingsRequest = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::bad(format!("the request body is not valid: {e}"), "body"))?;
    // The model is named in the body.
    caller.model(&r.model).map_err(refused)?;
    let base64_wanted = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(OpenAiError::bad(
                format!("'encoding_format' is '{other}'; use 'float' or 'base64'"),
                "encoding_format",
            ));
        }
    };
    let info = ctx.models.info(&r.model).map_err(RestError::serving)?;
    let m = embedding_model(&info.config).map_err(|e| OpenAiError::bad(e, "model"))?;
    if let Some(d) = &r.dimensions
        && d.as_u64() != Some(m.dim as u64)
    {
        return Err(OpenAiError::bad(
            format!(
                "model '{}' makes {}-dimensional embeddings and cannot shorten them; leave out \
                 'dimensions' or set it to {} (it is {d})",
                r.model, m.dim, m.dim
            ),
            "dimensions",
        ));
    }
    let texts = texts(r.input)?;
    let worker = ctx.models.worker(&r.model).ok();
    if let Some(w) = &worker {
        check_tokenizer(&r.model, w)?;
    }
    // Calls of at most `rows_per_call` texts, all submitted before any is awaited, so that the
    // batcher sees them together.
    let per_call = m.rows_per_call.unwrap_or(texts.len()).max(1);
    let calls: Vec<_> = texts
        .chunks(per_call)
        .map(|chunk| {
            let mut shape = vec![chunk.len() as i64];
            shape.extend_from_slice(&m.row_shape);
            let input = Tensor::from_elements(&m.input, &shape, chunk.to_vec())
                .map_err(|e| OpenAiError::bad(e.to_string(), "input"))?;
            Ok(ctx.infer_as(
                InferCall {
                    model: r.model.clone(),
                    version: String::new(),
                    id: String::new(),
                    inputs: vec![input],
                    outputs: vec![m.output.clone()],
                    priority: 0,
                    timeout: None,
                    deadline: None,
                    received,
                    trace,
                    background: false,
                },
                RestError::serving,
            ))
        })
        .collect::<Result<_, OpenAiError>>()?;
    // Counted while the model computes, when it is loaded already (else once it is).
    let counting = worker.map(|w| start_counting(w, texts.clone()));
    let answers = futures::future::try_join_all(calls).await?;
    let counting = match counting {
        Some(counting) => counting,
        None => start_counting(
            ctx.models.worker(&r.model).map_err(RestError::serving)?,
            texts.clone(),
        ),
    };
    let tokens = tokens(&r.model, counting).await?;

    let mut vectors: Vec<f32> = Vec::with_capacity(texts.len() * m.dim);
    for out in &answers {
        let t = out
            .outputs
            .iter()
            .find(|t| t.name() == m.output)
            .ok_or_else(|| {
                OpenAiError::from(RestError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("model '{}' answered without output '{}'", r.model, m.output),
                ))
            })?;
        let values = t.f32_values().map_err(|e| {
            OpenAiError::from(RestError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            ))
        })?;
        vectors.extend(values);
    }
    if vectors.len() != texts.len() * m.dim {
        return Err(OpenAiError::from(RestError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "model '{}' answered {} values for {} texts of {} dimensions",
                r.model,
                vectors.len(),
                texts.len(),
                m.dim
            ),
        )));
    }
    let data = vectors
        .chunks(m.dim)
        .enumerate()
        .map(|(index, row)| Embedding {
            object: "embedding",
            index,
            embedding: if base64_wanted {
                let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
                Vector::Base64(base64(&bytes))
            } else {
                Vector::Float(row)
            },
        })
        .collect();
    Ok(super::json(&EmbeddingsResponse {
        object: "list",
        data,
        model: &r.model,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

#[derive(Serialize)]
struct EmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<Embedding<'a>>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(Serialize)]
struct Embedding<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

/// An embedding as float32 numbers (written in f32's shortest exact form) or base64.
#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    Float(&'a [f32]),
    Base64(String),
}

/// OpenAI's model object. `created` is when this server started (the models it lists are the
/// ones it serves now).
fn model_object(ctx: &Context, name: &str) -> Value {
    let started = SystemTime::now()
        .checked_sub(ctx.started.elapsed())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    json!({"id": name, "object": "model", "created": started, "owned_by": "veraltheim"})
}

/// Why `name` cannot serve embeddings now, or `None` when it can: READY, an embedding model,
/// with a tokenizer.
fn not_served(ctx: &Context, name: &str) -> Result<Option<String>, RestError> {
    let info = ctx.models.info(name).map_err(RestError::serving)?;
    if let Err(why) = embedding_model(&info.config) {
        return Ok(Some(why));
    }
    if info.state != ModelState::Ready {
        return Ok(Some(format!(
            "model '{name}' is not ready (state {})",
            info.state
        )));
    }
    match ctx.models.worker(name) {
        Ok(w) if w.count_tokens(&[]).is_some() => Ok(None),
        Ok(_) => Ok(Some(format!("model '{name}' has no tokenizer"))),
        Err(e) => Ok(Some(e.to_string())),
    }
}

/// The embedding models this server serves now.
async fn list_models(
    State(ctx): State<Arc<Context>>,
    found: Option<axum::Extension<Caller>>,
) -> Result<Response, OpenAiError> {
    let caller = caller(found)?;
    let data: Vec<Value> = ctx
        .models
        .names()
        .iter()
        .filter(|n| caller.sees_model(n))
        .filter(|n| matches!(not_served(&ctx, n), Ok(None)))
        .map(|n| model_object(&ctx, n))
        .collect();
    Ok(super::json(&json!({"object": "list", "data": data})))
}

async fn get_model(
    State(ctx): State<Arc<Context>>,
    found: Option<axum::Extension<Caller>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, OpenAiError> {
    let Path(name) =
        path.map_err(|e| OpenAiError::bad(format!("the model path: {}", e.body_text()), "model"))?;
    caller(found)?.model(&name).map_err(refused)?;
    match not_served(&ctx, &name)? {
        None => Ok(super::json(&model_object(&ctx, &name))),
        Some(why) => Err(OpenAiError::from(RestError::new(
            StatusCode::NOT_FOUND,
            why,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::from_json(json).unwrap()
    }

    #[test]
    fn base64_matches_rfc_4648() {
        // The RFC's test vectors.
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded, "{plain}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn text_models_qualify_and_others_are_told_why() {
        let m = embedding_model(&config(
            r#"{"name":"e","max_batch_size":64,
                "input":[{"name":"TEXT","data_type":"TYPE_STRING","dims":[1]}],
                "output":[{"name":"EMBEDDING","data_type":"TYPE_FP32","dims":[384]}]}"#,
        ))
        .unwrap();
        assert_eq!(
            m,
            EmbeddingModel {
                input: "TEXT".into(),
                output: "EMBEDDING".into(),
                row_shape: vec![1],
                rows_per_call: Some(64),
                dim: 384,
            }
        );
        // A model that does not batch takes every text in one call, rows first.
        let m = embedding_model(&config(
            r#"{"name":"e","input":[{"name":"T","data_type":"TYPE_STRING","dims":[-1]}],
                "output":[{"name":"E","data_type":"TYPE_FP32","dims":[-1,8]}]}"#,
        ))
        .unwrap();
        assert_eq!((m.rows_per_call, m.dim, m.row_shape.len()), (None, 8, 0));
        for (json, why) in [
            (
                r#"{"name":"identity","max_batch_size":8,"input":[{"name":"INPUT0","data_type":"TYPE_FP32","dims":[-1]}],"output":[{"name":"OUTPUT0","data_type":"TYPE_FP32","dims":[-1]}]}"#,
                "takes FP32 input 'INPUT0'",
            ),
            (
                r#"{"name":"x","max_batch_size":8,"input":[{"name":"T","data_type":"TYPE_STRING","dims":[1]}],"output":[{"name":"E","data_type":"TYPE_FP32","dims":[-1]}]}"#,
                "fixed size",
            ),
            (
                r#"{"name":"x","max_batch_size":8,"input":[{"name":"T","data_type":"TYPE_STRING","dims":[1]}],"output":[{"name":"E","data_type":"TYPE_INT64","dims":[4]}]}"#,
                "FP32",
            ),
            (
                r#"{"name":"x","max_batch_size":8,"input":[{"name":"T","data_type":"TYPE_STRING","dims":[3]}],"output":[{"name":"E","data_type":"TYPE_FP32","dims":[4]}]}"#,
                "one text per row",
            ),
            (
                r#"{"name":"x","max_batch_size":8,"input":[{"name":"A","data_type":"TYPE_STRING","dims":[1]},{"name":"B","data_type":"TYPE_STRING","dims":[1]}],"output":[{"name":"E","data_type":"TYPE_FP32","dims":[4]}]}"#,
                "has 2 inputs",
            ),
            (
                r#"{"name":"x","input":[{"name":"T","data_type":"TYPE_STRING","dims":[2]}],"output":[{"name":"E","data_type":"TYPE_FP32","dims":[2,4]}]}"#,
                "first dimensions are 2",
            ),
        ] {
            let e = embedding_model(&config(json)).unwrap_err();
            assert!(e.contains(why), "{e:?} should say {why:?}");
        }
    }

    #[test]
    fn input_is_text_and_token_arrays_are_refused() {
        let read = |v: Value| texts(serde_json::from_value::<Input>(v).unwrap());
        assert_eq!(read(json!("a")).ok().unwrap(), vec![Bytes::from("a")]);
        assert_eq!(read(json!(["a", ""])).ok().unwrap().len(), 2);
        let most: Vec<String> = (0..MAX_INPUTS).map(|i| i.to_string()).collect();
        assert_eq!(read(json!(most)).ok().unwrap().len(), MAX_INPUTS);
        let too_many: Vec<String> = (0..=MAX_INPUTS).map(|i| i.to_string()).collect();
        for (bad, why) in [
            (json!([1, 2, 3]), "token ids"),
            (json!([[1, 2], [3]]), "token ids"),
            (json!(["a", 7]), "token ids"),
            (json!([]), "empty list"),
            (json!(["a", null]), "'input'[1] is null"),
            (json!(["a", {"b": [1]}]), "'input'[1] is an object"),
            (json!({"a": 1}), "not an object"),
            (json!(5), "not a number"),
            (json!(too_many), "more than 2048 texts"),
        ] {
            let e = read(bad).err().unwrap();
            assert_eq!(e.error.status, StatusCode::BAD_REQUEST);
            assert!(e.error.message.contains(why), "{}", e.error.message);
            assert_eq!(e.param, Some("input"));
        }
    }

    #[tokio::test]
    async fn errors_have_openais_shape() {
        let r = OpenAiError::from(RestError::new(StatusCode::NOT_FOUND, "unknown model 'x'"))
            .into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"error": {"message": "unknown model 'x'", "type": "invalid_request_error",
                             "param": null, "code": "model_not_found"}})
        );
    }
}
