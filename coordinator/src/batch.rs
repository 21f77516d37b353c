//! Batch inference jobs: a model and a file of JSON lines in, a file of JSON lines out, run
//! through the same inference path as online requests (`Inference::infer`) but as background work
//! (`InferCall::background`): at the model's lowest priority level and with a bounded number of
//! requests in flight, so that online traffic is served first and the job never holds more than
//! its share of the queue. When the model has a latency objective (`latency_slo_p99_ms`), its
//! controller decides how many of the job's requests run at once (`veraltheim_fastpath::slo`).
//!
//! Input lines are one of
//! - `{"text": "a sentence"}` — for a model with one BYTES input (text embedders), or
//! - `{"inputs": {"NAME": <nested array>, ...}}` — any model; the nesting gives the shape
//!   (with the batch dimension for batching models), the model's config the datatype.
//!
//! Output line `n` (same order as the input) is `{"line": n, "outputs": {"NAME": {"datatype":
//! "FP32", "shape": [...], "data": [...]}}}`, or `{"line": n, "error": "..."}` for a line that
//! failed (a failed line does not fail the job; the summary counts it). The output is written to
//! a temporary file beside the target and renamed into place when the job ends, so a reader never
//! sees half a file.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use veraltheim_models::{DataType, ModelConfig, Tensor};

use futures::future::BoxFuture;
use veraltheim_slowpath::job::JobKind;
use veraltheim_slowpath::{ExecError, Execution, InferenceExecutor, JobSpec, Outcome, ProgressFn};

use crate::convert;
use veraltheim_serving::{InferCall, Inference};

/// The coordinator's [`InferenceExecutor`]: inference jobs run through [`run`], at most
/// `concurrency` requests of one job in flight.
pub struct BatchInference {
    ctx: Arc<Inference>,
    concurrency: usize,
}

impl BatchInference {
    pub fn new(ctx: Arc<Inference>, concurrency: usize) -> Self {
        BatchInference {
            ctx,
            concurrency: concurrency.max(1),
        }
    }
}

impl InferenceExecutor for BatchInference {
    fn start(
        &self,
        _job_id: &str,
        spec: &JobSpec,
        progress: ProgressFn,
    ) -> Result<Box<dyn Execution>, ExecError> {
        let JobKind::Inference {
            model,
            input_path,
            output_path,
        } = &spec.kind
        else {
            return Err(ExecError::Rejected("not an inference job".into()));
        };
        Ok(Box::new(InferenceRun {
            ctx: self.ctx.clone(),
            model: model.clone(),
            input: PathBuf::from(input_path),
            output: PathBuf::from(output_path),
            concurrency: self.concurrency,
            deadline: spec.deadline_seconds.map(std::time::Duration::from_secs),
            progress,
        }))
    }
}

struct InferenceRun {
    ctx: Arc<Inference>,
    model: String,
    input: PathBuf,
    output: PathBuf,
    concurrency: usize,
    deadline: Option<std::time::Duration>,
    progress: ProgressFn,
}

impl Execution for InferenceRun {
    fn describe(&self) -> String {
        format!("in-process inference on model '{}'", self.model)
    }

    fn wait(
        self: Box<Self>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<Outcome, ExecError>> {
        Box::pin(async move {
            let InferenceRun {
                ctx,
                model,
                input,
                output,
                concurrency,
                deadline,
                progress,
            } = *self;
            let job = run(
                ctx,
                &model,
                &input,
                &output,
                concurrency,
                move |done, total| progress(done, total),
                cancel.clone(),
            );
            let result = match deadline {
                Some(d) => match tokio::time::timeout(d, job).await {
                    Ok(r) => r,
                    Err(_) => return Ok(Outcome::TimedOut),
                },
                None => job.await,
            };
            Ok(match result {
                Ok(_) => Outcome::Exited(0),
                Err(_) if cancel.is_cancelled() => Outcome::Cancelled,
                Err(e) => Outcome::Failed(e),
            })
        })
    }
}

/// How a finished batch inference job went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub lines: u64,
    pub failed: u64,
}

/// Runs one batch inference job. `progress(done, total)` is called as lines complete. Returns
/// an error (the job fails) when the input cannot be read, the model is unknown, or the output
/// cannot be written; a line that fails is reported in the output instead.
pub async fn run(
    ctx: Arc<Inference>,
    model: &str,
    input: &Path,
    output: &Path,
    concurrency: usize,
    progress: impl Fn(u64, u64) + Send + Sync,
    cancel: CancellationToken,
) -> Result<Summary, String> {
    let lines = read_lines(input, &cancel).await?;
    let total = lines.len() as u64;
    progress(0, total);
    let (_, _) = ctx
        .models()
        .acquire_or_load(model, None)
        .await
        .map_err(|e| e.to_string())?;
    let config = ctx.models().info(model).map_err(|e| e.to_string())?.config;
    let priority = background_priority(&config);
    // On a model with a latency objective its controller decides how many of the job's requests
    // run at once: the job offers it as many as the controller may allow.
    let concurrency = match ctx.models().worker(model).ok().and_then(|w| w.slo()) {
        Some(objective) => concurrency.max(objective.max_limit),
        None => concurrency,
    };
    let tmp = temp_path(output);
    let file =
        std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut summary = Summary::default();
    let mut results = futures::stream::iter(lines.into_iter().enumerate())
        .map(|(n, line)| {
            let ctx = ctx.clone();
            let config = &config;
            async move { (n, infer_line(&ctx, model, config, &line, priority).await) }
        })
        .buffered(concurrency.max(1));
    let outcome = loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break Err("cancelled".to_string()),
            next = results.next() => next,
        };
        let Some((n, result)) = next else {
            break Ok(());
        };
        let record = match result {
            Ok(outputs) => json!({"line": n, "outputs": outputs}),
            Err(e) => {
                summary.failed += 1;
                json!({"line": n, "error": e})
            }
        };
        if let Err(e) = writeln!(out, "{record}") {
            break Err(format!("cannot write {}: {e}", tmp.display()));
        }
        summary.lines += 1;
        progress(summary.lines, total);
    };
    drop(results);
    let finished = outcome.and_then(|()| {
        out.flush()
            .and_then(|()| out.get_ref().sync_all())
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))
    });
    match finished {
        Ok(()) => {
            std::fs::rename(&tmp, output)
                .map_err(|e| format!("cannot move the output to {}: {e}", output.display()))?;
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The longest input line an inference job may have, and the most input it may read: the
/// input is held in memory while the job runs.
pub const MAX_LINE_BYTES: u64 = 4 << 20;
pub const MAX_INPUT_BYTES: u64 = 256 << 20;

/// Reads the input's non-empty lines. Only a regular file is read (a device such as
/// `/dev/zero` never ends, a FIFO blocks until someone writes), each line at most
/// [`MAX_LINE_BYTES`], all of it at most [`MAX_INPUT_BYTES`]; `cancel` stops the wait at once.
async fn read_lines(input: &Path, cancel: &CancellationToken) -> Result<Vec<String>, String> {
    let path = input.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        read_lines_limited(&path, MAX_LINE_BYTES, MAX_INPUT_BYTES)
    });
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err("cancelled".to_string()),
        read = read => read.map_err(|e| e.to_string())?,
    }
}

fn read_lines_limited(path: &Path, max_line: u64, max_total: u64) -> Result<Vec<String>, String> {
    let fail = |why: String| format!("cannot read the input {}: {why}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() > max_total {
        return Err(fail(format!(
            "{} bytes is more than the {max_total} an inference job may read",
            meta.len()
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    // Bounded even if the file grows while it is read.
    let mut reader = std::io::BufReader::new(file.take(max_total));
    let mut lines = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(max_line + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            return Ok(lines);
        }
        if line.len() as u64 > max_line && line.last() != Some(&b'\n') {
            return Err(fail(format!(
                "line {} is longer than {max_line} bytes",
                lines.len() + 1
            )));
        }
        let text = std::str::from_utf8(&line)
            .map_err(|_| fail(format!("line {} is not UTF-8", lines.len() + 1)))?
            .trim_end_matches(['\n', '\r']);
        if !text.trim().is_empty() {
            lines.push(text.to_string());
        }
    }
}

fn temp_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    output.with_file_name(format!(".{name}.partial"))
}

/// The model's lowest priority level (the largest number), so that online requests at the
/// default level go first; 0 (the default level) for a model without priority levels.
pub fn background_priority(config: &ModelConfig) -> u32 {
    config
        .dynamic_batching
        .as_ref()
        .map_or(0, |d| u32::try_from(d.priority_levels).unwrap_or(u32::MAX))
}

async fn infer_line(
    ctx: &Inference,
    model: &str,
    config: &ModelConfig,
    line: &str,
    priority: u32,
) -> Result<Value, String> {
    let inputs = parse_line(config, line)?;
    let out = ctx
        .infer(InferCall {
            model: model.to_string(),
            version: String::new(),
            id: String::new(),
            inputs,
            outputs: Vec::new(),
            priority,
            timeout: None,
            deadline: None,
            received: Instant::now(),
            // A job's lines are not traced one by one; its attempt has a span of its own.
            trace: None,
            background: true,
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut outputs = serde_json::Map::new();
    for t in &out.outputs {
        outputs.insert(t.name().to_string(), tensor_json(t)?);
    }
    Ok(Value::Object(outputs))
}

/// One input line as the model's tensors.
pub fn parse_line(config: &ModelConfig, line: &str) -> Result<Vec<Tensor>, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let batch = config.batching();
    if let Some(text) = value.get("text") {
        let text = text.as_str().ok_or("\"text\" must be a string")?;
        let [input] = config.input.as_slice() else {
            return Err(format!(
                "\"text\" lines need a model with one input; '{}' has {}",
                config.name,
                config.input.len()
            ));
        };
        if ModelConfig::datatype_of(input) != DataType::Bytes {
            return Err(format!(
                "input '{}' is not BYTES: give \"inputs\"",
                input.name
            ));
        }
        let shape: &[i64] = if batch { &[1, 1] } else { &[1] };
        return Tensor::from_elements(&input.name, shape, vec![Bytes::from(text.to_string())])
            .map(|t| vec![t])
            .map_err(|e| e.to_string());
    }
    let Some(Value::Object(given)) = value.get("inputs") else {
        return Err("a line needs \"text\" or an \"inputs\" object".into());
    };
    if let Some(unknown) = given
        .keys()
        .find(|k| !config.input.iter().any(|i| &i.name == *k))
    {
        return Err(format!("model '{}' has no input '{unknown}'", config.name));
    }
    config
        .input
        .iter()
        .filter(|i| given.contains_key(&i.name) || !i.optional)
        .map(|i| {
            let v = given
                .get(&i.name)
                .ok_or_else(|| format!("input '{}' is missing", i.name))?;
            json_tensor(&i.name, ModelConfig::datatype_of(i), v)
        })
        .collect()
}

/// A nested JSON array as a tensor of `datatype` (the nesting gives the shape).
fn json_tensor(name: &str, datatype: DataType, value: &Value) -> Result<Tensor, String> {
    let wire = convert::json_to_v1(name, convert::v1_datatype(datatype) as i32, value)?;
    convert::from_v1(wire).map_err(|s| s.message().to_string())
}

/// An output tensor as `{"datatype", "shape", "data"}` with the data flat, row-major.
fn tensor_json(t: &Tensor) -> Result<Value, String> {
    if matches!(t.datatype(), DataType::Fp16 | DataType::Bf16) {
        return Err(format!(
            "output '{}': {} has no JSON form here",
            t.name(),
            t.datatype()
        ));
    }
    let data = convert::v1_values_json(&convert::to_v1(t, false));
    Ok(json!({"datatype": t.datatype().as_str(), "shape": t.shape(), "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use veraltheim_models::builtin;

    #[test]
    fn input_is_read_only_from_a_regular_file_within_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.jsonl");
        std::fs::write(&ok, "{\"a\": 1}\n\n  \r\n{\"b\": 2}\r\n{\"c\": 3}").unwrap();
        assert_eq!(
            read_lines_limited(&ok, 64, 1024).unwrap(),
            ["{\"a\": 1}", "{\"b\": 2}", "{\"c\": 3}"]
        );
        // A device never ends: refused before a byte is read (it used to be read into memory
        // until the process aborted).
        let err = read_lines_limited(Path::new("/dev/zero"), 64, 1024).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let long = dir.path().join("long.jsonl");
        std::fs::write(&long, format!("{{}}\n{}\n", "x".repeat(100))).unwrap();
        let err = read_lines_limited(&long, 64, 1024).unwrap_err();
        assert!(err.contains("line 2 is longer than 64 bytes"), "{err}");
        let err = read_lines_limited(&long, 1024, 50).unwrap_err();
        assert!(err.contains("more than the 50"), "{err}");
        // Exactly at the limit is fine.
        std::fs::write(&long, format!("{}\n", "y".repeat(64))).unwrap();
        assert_eq!(read_lines_limited(&long, 64, 1024).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_fifo_nobody_writes_is_refused_and_cancel_is_immediate() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("in.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let cancel = CancellationToken::new();
        let err = read_lines(&fifo, &cancel).await.unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        cancel.cancel();
        let ok = dir.path().join("ok.jsonl");
        std::fs::write(&ok, "{}\n").unwrap();
        assert_eq!(read_lines(&ok, &cancel).await.unwrap_err(), "cancelled");
    }

    #[test]
    fn lines_become_the_models_tensors() {
        let identity = builtin::config("identity").unwrap();
        let t = &parse_line(&identity, r#"{"inputs": {"INPUT0": [[1, 2.5], [3, 4]]}}"#).unwrap()[0];
        assert_eq!(t.shape(), vec![2, 2]);
        assert_eq!(t.f32_values().unwrap(), vec![1.0, 2.5, 3.0, 4.0]);
        let json = tensor_json(t).unwrap();
        assert_eq!(json["shape"], json!([2, 2]));
        assert_eq!(json["data"], json!([1.0, 2.5, 3.0, 4.0]));
        let bad = |line: &str| parse_line(&identity, line).unwrap_err();
        assert!(bad("nope").contains("not JSON"));
        assert!(bad(r#"{"inputs": {"X": [1]}}"#).contains("no input 'X'"));
        assert!(bad(r#"{"inputs": {"INPUT0": [[1], [2, 3]]}}"#).contains("ragged"));
        assert!(bad(r#"{"inputs": {"INPUT0": [["a"]]}}"#).contains("not a FP32"));
        assert!(bad(r#"{"text": "hi"}"#).contains("not BYTES"));
        assert!(bad(r#"{}"#).contains("\"text\" or an \"inputs\""));
    }

    #[test]
    fn text_lines_fill_the_one_bytes_input() {
        let mut c = builtin::config("identity").unwrap();
        c.input[0].data_type = "TYPE_STRING".into();
        let t = &parse_line(&c, r#"{"text": "naïve café"}"#).unwrap()[0];
        assert_eq!(t.shape(), vec![1, 1]);
        assert_eq!(tensor_json(t).unwrap()["data"], json!(["naïve café"]));
    }

    #[test]
    fn background_work_takes_the_lowest_level() {
        let c = builtin::config("cost").unwrap();
        assert_eq!(background_priority(&c), 0);
        let c = c
            .with_override(
                r#"{"dynamic_batching": {"priority_levels": 3, "default_priority_level": 1}}"#,
            )
            .unwrap();
        assert_eq!(background_priority(&c), 3);
    }
}
