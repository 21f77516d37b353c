//! The client side of the binary — `infer`, `models` (list, get, load, unload, stats, memory,
//! import), `jobs` (`cli/jobfile.rs`, `cli/watch.rs`), `nodes` (`cli/nodes.rs`), `gpus`, `events`, `health`, `status`,
//! `kill`, `config default` — talking `veraltheim.v1` to a running coordinator. Tables for
//! people, `--json` for scripts.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use tonic::transport::Channel;
use veraltheim_models::allocator::format_bytes;
use veraltheim_models::repository::{
    ImportBackend, ImportOptions, ImportQuantize, import_sentence_transformers,
};
use veraltheim_proto::v1::{
    self, inference_service_client::InferenceServiceClient, job_service_client::JobServiceClient,
    model_service_client::ModelServiceClient, resource_service_client::ResourceServiceClient,
    system_service_client::SystemServiceClient,
};

#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// The coordinator's gRPC address: HOST:PORT, http://HOST:PORT or, for TLS, https://HOST:PORT.
    #[arg(
        long,
        env = "VERALTHEIM_SERVER",
        default_value = "127.0.0.1:8001",
        global = true
    )]
    pub server: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The bearer token sent as `authorization: Bearer <token>`, for a coordinator that
    /// authenticates its callers (serve --auth-file).
    #[arg(long, env = "VERALTHEIM_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// TLS: the CA certificates (PEM) to trust for the server instead of the system's; makes a
    /// bare HOST:PORT https.
    #[arg(long, env = "VERALTHEIM_CA", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate (PEM), with --key.
    #[arg(long, env = "VERALTHEIM_CERT", global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Mutual TLS: the private key (PEM) of --cert.
    #[arg(long, env = "VERALTHEIM_KEY", global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug, clap::Args)]
pub struct InferArgs {
    /// Model name.
    pub model: String,
    /// An input as NAME=JSON (a nested JSON array; its nesting gives the shape), or just JSON when
    /// the model has one input. Repeatable.
    #[arg(short, long = "input")]
    pub inputs: Vec<String>,
    /// A text for a text model (repeatable); becomes the model's BYTES input.
    #[arg(short, long = "text")]
    pub texts: Vec<String>,
    /// Outputs to return (default: all).
    #[arg(short, long = "output")]
    pub outputs: Vec<String>,
    /// Priority level, 1 is highest (default: the model's default).
    #[arg(long, default_value_t = 0)]
    pub priority: u32,
    /// Queue timeout in milliseconds (default: the model's).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// List known models and their state (the default).
    List,
    /// Show one model with its configuration.
    Get { name: String },
    /// Load (or reload) a model, optionally with a Triton-style config JSON override.
    Load {
        name: String,
        /// Config override as JSON, or @FILE to read it from a file.
        #[arg(long)]
        config: Option<String>,
    },
    /// Unload a model (queued requests finish first).
    Unload { name: String },
    /// Request counts and timings per model.
    Stats { name: Option<String> },
    /// Each device's model-memory budget and the models holding it.
    Memory,
    /// Write a ready model folder into a repository from a sentence-transformers folder
    /// (config.json, model.safetensors, tokenizer.json, 1_Pooling/). Local: needs no server.
    Import {
        /// The sentence-transformers folder.
        src: PathBuf,
        /// The model's name (its folder in the repository).
        #[arg(long)]
        name: String,
        /// The repository (default: the server's default, ./models).
        #[arg(long, default_value = "./models", env = "VERALTHEIM_MODEL_REPOSITORY")]
        repository: PathBuf,
        /// candle (from model.safetensors) or onnxruntime (needs an ONNX export, --onnx).
        #[arg(long, default_value = "candle")]
        backend: String,
        /// The ONNX export of the encoder, for --backend onnxruntime.
        #[arg(long)]
        onnx: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        max_batch_size: u32,
        /// Replace the model's version 1 if it exists.
        #[arg(long)]
        force: bool,
        /// `int8`: quantise the ONNX graph's weight matrices (dynamic int8, --backend onnxruntime)
        /// and record its measured accuracy against the FP32 graph in the config. Off by default.
        #[arg(long)]
        quantize: Option<String>,
    },
}

#[derive(Clone, Debug, clap::Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: Option<ModelsCommand>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// A connection to the coordinator `args` name (TLS as they say), sending their token.
async fn connect(client: &ClientArgs) -> anyhow::Result<crate::auth::client::Connection> {
    let channel = connect_channel(client).await?;
    crate::auth::client::with_token(channel, client.token.as_deref())
}

async fn connect_channel(client: &ClientArgs) -> anyhow::Result<Channel> {
    let endpoint = crate::tls::client_endpoint(
        &client.server,
        client.ca.as_deref(),
        client.cert.as_deref(),
        client.key.as_deref(),
    )?;
    let url = endpoint.uri().to_string();
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", s.code(), s.message())
}

fn datatype_name(d: i32) -> String {
    v1::DataType::try_from(d)
        .map(|d| d.as_str_name().trim_start_matches("DATA_TYPE_").to_string())
        .unwrap_or_else(|_| d.to_string())
}

fn state_name(s: i32) -> String {
    v1::ModelState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("MODEL_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| s.to_string())
}

fn to_tensor(name: &str, datatype: i32, text: &str) -> anyhow::Result<v1::Tensor> {
    let parsed: Value =
        serde_json::from_str(text).with_context(|| format!("input '{name}': not valid JSON"))?;
    crate::convert::json_to_v1(name, datatype, &parsed).map_err(|e| anyhow!(e))
}

fn nest(values: &[Value], shape: &[i64]) -> Value {
    match shape.split_first() {
        None => values.first().cloned().unwrap_or(Value::Null),
        Some((_, [])) => Value::Array(values.to_vec()),
        Some((&n, rest)) => {
            let step: usize = rest.iter().map(|d| *d as usize).product();
            Value::Array(
                (0..n as usize)
                    .map(|i| {
                        nest(
                            &values
                                [(i * step).min(values.len())..((i + 1) * step).min(values.len())],
                            rest,
                        )
                    })
                    .collect(),
            )
        }
    }
}

fn tensor_json(t: &v1::Tensor) -> Value {
    let values = crate::convert::v1_values_json(t);
    json!({
        "name": t.name,
        "datatype": datatype_name(t.datatype),
        "shape": t.shape,
        "data": nest(&values, &t.shape),
    })
}

pub async fn infer(args: InferArgs) -> anyhow::Result<()> {
    let channel = connect(&args.client).await?;
    let model = ModelServiceClient::new(channel.clone())
        .get_model(v1::GetModelRequest {
            name: args.model.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut inputs = Vec::new();
    for spec in &args.inputs {
        let (name, text) = match spec.split_once('=') {
            Some((n, t)) if model.inputs.iter().any(|i| i.name == n) => (n.to_string(), t),
            _ => match model.inputs.as_slice() {
                [only] => (only.name.clone(), spec.as_str()),
                _ => bail!(
                    "model '{}' has several inputs; write NAME=JSON (inputs: {})",
                    model.name,
                    model
                        .inputs
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        };
        let datatype = model
            .inputs
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.datatype)
            .unwrap_or_default();
        inputs.push(to_tensor(&name, datatype, text)?);
    }
    let response = InferenceServiceClient::new(channel)
        .infer(v1::InferRequest {
            model: args.model,
            inputs,
            texts: args.texts,
            outputs: args.outputs,
            priority: args.priority,
            timeout_us: args.timeout_ms.unwrap_or(0) * 1000,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let timing = response.timing.unwrap_or_default();
    if args.client.json {
        let out = json!({
            "model": response.model,
            "version": response.version,
            "outputs": response.outputs.iter().map(tensor_json).collect::<Vec<_>>(),
            "batch_size": response.batch_size,
            "timing": {"queue_us": timing.queue_us, "compute_us": timing.compute_us, "total_us": timing.total_us},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for t in &response.outputs {
            let j = tensor_json(t);
            println!(
                "{} {} {:?}",
                t.name,
                j["datatype"].as_str().unwrap_or(""),
                t.shape
            );
            println!("{}", j["data"]);
        }
        println!(
            "batch {}  queue {} µs  compute {} µs  total {} µs",
            response.batch_size, timing.queue_us, timing.compute_us, timing.total_us
        );
    }
    Ok(())
}

fn model_json(m: &v1::Model) -> Value {
    let specs = |list: &[v1::TensorSpec]| {
        list.iter()
            .map(|s| json!({"name": s.name, "datatype": datatype_name(s.datatype), "shape": s.shape}))
            .collect::<Vec<_>>()
    };
    json!({
        "name": m.name,
        "version": m.version,
        "backend": m.backend,
        "state": state_name(m.state),
        "reason": m.reason,
        "max_batch_size": m.max_batch_size,
        "device": m.device,
        "memory_bytes": m.memory_bytes,
        "versions": m.versions,
        "pinned": m.pinned,
        "inputs": specs(&m.inputs),
        "outputs": specs(&m.outputs),
        "config": serde_json::from_str::<Value>(&m.config_json).unwrap_or(Value::Null),
    })
}

fn print_models(models: &[v1::Model], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let list: Vec<Value> = models.iter().map(model_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<8} {:<12} {:<12} {:>9} {:<6} {:>10}  REASON",
        "NAME", "VERSION", "STATE", "BACKEND", "MAX_BATCH", "DEVICE", "MEMORY"
    );
    for m in models {
        println!(
            "{:<20} {:<8} {:<12} {:<12} {:>9} {:<6} {:>10}  {}",
            m.name,
            m.version,
            state_name(m.state),
            m.backend,
            m.max_batch_size,
            if m.device.is_empty() { "-" } else { &m.device },
            if m.memory_bytes == 0 {
                "-".to_string()
            } else {
                format_bytes(m.memory_bytes)
            },
            m.reason
        );
    }
    Ok(())
}

fn import(command: ModelsCommand) -> anyhow::Result<()> {
    let ModelsCommand::Import {
        src,
        name,
        repository,
        backend,
        onnx,
        max_batch_size,
        force,
        quantize,
    } = command
    else {
        bail!("not an import");
    };
    let quantize = quantize
        .as_deref()
        .map(ImportQuantize::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let backend = match backend.as_str() {
        "candle" => ImportBackend::Candle,
        "onnxruntime" | "onnx" | "ort" => ImportBackend::OnnxRuntime,
        other => bail!("--backend {other}: expected candle or onnxruntime"),
    };
    let dir = import_sentence_transformers(
        &src,
        &repository,
        &ImportOptions {
            name: name.clone(),
            backend,
            onnx,
            max_batch_size,
            force,
            quantize,
            onnxruntime_library: None,
        },
    )?;
    #[cfg(feature = "onnx")]
    if quantize.is_some() {
        use veraltheim_models::onnx::quantize as q;
        let model = veraltheim_models::repository::Repository::new(&repository).model(&name)?;
        let p = |k: &str| model.config.parameter(k).unwrap_or("?").to_string();
        eprintln!(
            "int8: {} MatMul quantised; cosine to the FP32 graph over {} sentences: min {}, mean {}",
            p(q::PARAM_MATMULS),
            p(q::PARAM_SENTENCES),
            p(q::PARAM_COSINE_MIN),
            p(q::PARAM_COSINE_MEAN)
        );
    }
    println!("{}", dir.display());
    Ok(())
}

fn print_memory(r: &v1::GetModelMemoryResponse, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let list: Vec<Value> = r
            .devices
            .iter()
            .map(|d| {
                json!({
                    "device": d.device, "capacity_bytes": d.capacity_bytes,
                    "reserve_bytes": d.reserve_bytes, "budget_bytes": d.budget_bytes,
                    "held_bytes": d.held_bytes, "free_bytes": d.free_bytes,
                    "holders": d.holders.iter().map(|h| json!({
                        "key": h.key, "bytes": h.bytes, "pinned": h.pinned,
                        "in_flight": h.in_flight, "state": h.state,
                        "estimate_bytes": h.estimate_bytes, "measurement": h.measurement,
                    })).collect::<Vec<_>>(),
                    "jobs": d.jobs.iter().map(|j| json!({"job_id": j.job_id, "bytes": j.bytes})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>12}  HOLDERS",
        "DEVICE", "BUDGET", "HELD", "FREE", "RESERVE"
    );
    for d in &r.devices {
        let holders: Vec<String> = d
            .holders
            .iter()
            .map(|h| {
                let mut s = format!("{} {}", h.key, format_bytes(h.bytes));
                if !h.measurement.is_empty() {
                    s.push_str(&format!(
                        " ({}, estimate {})",
                        h.measurement,
                        format_bytes(h.estimate_bytes)
                    ));
                }
                if h.pinned {
                    s.push_str(" pinned");
                }
                if h.state != "READY" {
                    s.push_str(&format!(" {}", h.state));
                }
                s
            })
            .chain(
                d.jobs
                    .iter()
                    .map(|j| format!("job {} {}", j.job_id, format_bytes(j.bytes))),
            )
            .collect();
        println!(
            "{:<8} {:>12} {:>12} {:>12} {:>12}  {}",
            d.device,
            format_bytes(d.budget_bytes),
            format_bytes(d.held_bytes),
            format_bytes(d.free_bytes),
            format_bytes(d.reserve_bytes),
            holders.join(", ")
        );
    }
    Ok(())
}

pub async fn models(args: ModelsArgs) -> anyhow::Result<()> {
    if let Some(command @ ModelsCommand::Import { .. }) = args.command {
        return import(command);
    }
    let mut client = ModelServiceClient::new(connect(&args.client).await?);
    let as_json = args.client.json;
    match args.command.unwrap_or(ModelsCommand::List) {
        ModelsCommand::List => {
            let r = client
                .list_models(v1::ListModelsRequest { ready_only: false })
                .await
                .map_err(status_error)?;
            print_models(&r.into_inner().models, as_json)
        }
        ModelsCommand::Get { name } => {
            let m = client
                .get_model(v1::GetModelRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            if as_json {
                println!("{}", serde_json::to_string_pretty(&model_json(&m))?);
                Ok(())
            } else {
                print_models(std::slice::from_ref(&m), false)?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&model_json(&m)["config"])?
                );
                Ok(())
            }
        }
        ModelsCommand::Load { name, config } => {
            let config_json = match config {
                Some(c) if c.starts_with('@') => std::fs::read_to_string(&c[1..])
                    .with_context(|| format!("cannot read {}", &c[1..]))?,
                Some(c) => c,
                None => String::new(),
            };
            let m = client
                .load_model(v1::LoadModelRequest { name, config_json })
                .await
                .map_err(status_error)?
                .into_inner();
            print_models(std::slice::from_ref(&m), as_json)
        }
        ModelsCommand::Unload { name } => {
            let m = client
                .unload_model(v1::UnloadModelRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            print_models(std::slice::from_ref(&m), as_json)
        }
        ModelsCommand::Import { .. } => bail!("import runs without a server"),
        ModelsCommand::Memory => {
            let r = client
                .get_model_memory(v1::GetModelMemoryRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print_memory(&r, as_json)
        }
        ModelsCommand::Stats { name } => {
            let r = client
                .get_model_statistics(v1::GetModelStatisticsRequest {
                    name: name.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let avg_us = |d: &Option<v1::DurationStat>| {
                d.as_ref()
                    .filter(|d| d.count > 0)
                    .map_or(0.0, |d| d.total_ns as f64 / d.count as f64 / 1000.0)
            };
            if as_json {
                let list: Vec<Value> = r
                    .models
                    .iter()
                    .map(|m| {
                        let c = |d: &Option<v1::DurationStat>| d.as_ref().map_or(0, |d| d.count);
                        json!({
                            "name": m.name, "version": m.version,
                            "success": c(&m.success), "failure": c(&m.failure),
                            "inference_count": m.inference_count, "execution_count": m.execution_count,
                            "avg_queue_us": avg_us(&m.queue), "avg_compute_us": avg_us(&m.compute),
                            "pending": m.pending, "rejected": m.rejected, "expired": m.expired,
                            "cache_hits": m.cache_hits,
                            "padded_tokens": m.padded_tokens,
                            "real_tokens": m.real_tokens,
                            "p50_us": m.total_latency.map_or(0, |l| l.p50_us),
                            "p99_us": m.total_latency.map_or(0, |l| l.p99_us),
                            "last_inference_ms": m.last_inference_ms,
                            "objective": m.objective.as_ref().map(|o| json!({
                                "slo_p99_ms": o.slo_p99_ms,
                                "window_requests": o.window_requests,
                                "online_p99_us": o.online_p99_us,
                                "background_limit": o.background_limit,
                                "background_max": o.background_max,
                                "background_batch_rows": o.background_batch_rows,
                                "background_in_flight": o.background_in_flight,
                                "decision": o.decision,
                                "reason": o.reason,
                                "at_risk": o.at_risk,
                                "grows": o.grows,
                                "shrinks": o.shrinks,
                            })),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<20} {:>9} {:>7} {:>10} {:>9} {:>9} {:>12} {:>14} {:>8} {:>8} {:>9} {:>9}",
                    "NAME",
                    "SUCCESS",
                    "FAIL",
                    "INFERENCES",
                    "BATCHES",
                    "AVG_BATCH",
                    "AVG_QUEUE_US",
                    "AVG_COMPUTE_US",
                    "PENDING",
                    "REJECTED",
                    "P50_US",
                    "P99_US"
                );
                for m in &r.models {
                    let avg_batch = if m.execution_count == 0 {
                        0.0
                    } else {
                        m.inference_count as f64 / m.execution_count as f64
                    };
                    println!(
                        "{:<20} {:>9} {:>7} {:>10} {:>9} {:>9.2} {:>12.1} {:>14.1} {:>8} {:>8} {:>9} {:>9}",
                        m.name,
                        m.success.as_ref().map_or(0, |d| d.count),
                        m.failure.as_ref().map_or(0, |d| d.count),
                        m.inference_count,
                        m.execution_count,
                        avg_batch,
                        avg_us(&m.queue),
                        avg_us(&m.compute),
                        m.pending,
                        m.rejected,
                        m.total_latency.map_or(0, |l| l.p50_us),
                        m.total_latency.map_or(0, |l| l.p99_us)
                    );
                }
                let texts: Vec<_> = r.models.iter().filter(|m| m.real_tokens > 0).collect();
                if !texts.is_empty() {
                    println!();
                    println!(
                        "{:<20} {:>14} {:>14} {:>14}",
                        "NAME", "REAL_TOKENS", "PADDED_TOKENS", "PADDED/REAL"
                    );
                    for m in texts {
                        println!(
                            "{:<20} {:>14} {:>14} {:>14.3}",
                            m.name,
                            m.real_tokens,
                            m.padded_tokens,
                            m.padded_tokens as f64 / m.real_tokens as f64
                        );
                    }
                }
                let objectives: Vec<_> = r
                    .models
                    .iter()
                    .filter_map(|m| m.objective.as_ref().map(|o| (m, o)))
                    .collect();
                if !objectives.is_empty() {
                    println!();
                    println!(
                        "{:<20} {:>8} {:>14} {:>8} {:>10} {:>8} {:<8} REASON",
                        "NAME",
                        "SLO_MS",
                        "ONLINE_P99_MS",
                        "AT_RISK",
                        "BG_LIMIT",
                        "BG_NOW",
                        "DECISION"
                    );
                    for (m, o) in objectives {
                        println!(
                            "{:<20} {:>8} {:>14.1} {:>8} {:>10} {:>8} {:<8} {}",
                            m.name,
                            o.slo_p99_ms,
                            o.online_p99_us as f64 / 1000.0,
                            if o.at_risk { "yes" } else { "no" },
                            format!("{}/{}", o.background_limit, o.background_max),
                            o.background_in_flight,
                            o.decision,
                            o.reason
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

/// Exit status: success only when the server is live and ready.
pub async fn health(args: ClientArgs) -> anyhow::Result<bool> {
    let r = SystemServiceClient::new(connect(&args).await?)
        .health(v1::HealthRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        println!(
            "{}",
            json!({"live": r.live, "ready": r.ready, "version": r.version})
        );
    } else {
        println!(
            "live: {}  ready: {}  version: {}",
            r.live, r.ready, r.version
        );
    }
    Ok(r.live && r.ready)
}

pub(crate) fn node_json(n: &v1::SupervisorNode) -> Value {
    json!({
        "name": n.name, "kind": n.kind, "state": n.state, "restarts": n.restarts,
        "last_failure": if n.last_failure.is_empty() { Value::Null } else { json!(n.last_failure) },
        "children": n.children.iter().map(node_json).collect::<Vec<_>>(),
        "detail": if n.detail.is_empty() { Value::Null } else { json!(n.detail) },
    })
}

fn print_node(n: &v1::SupervisorNode, depth: usize) {
    let failure = if n.last_failure.is_empty() {
        String::new()
    } else {
        format!("  last failure: {}", n.last_failure)
    };
    let detail = if n.detail.is_empty() {
        String::new()
    } else {
        format!("  ({})", n.detail)
    };
    println!(
        "{}{} [{}] {}  restarts {}{}{}",
        "  ".repeat(depth),
        n.name,
        n.kind,
        n.state,
        n.restarts,
        failure,
        detail
    );
    for c in &n.children {
        print_node(c, depth + 1);
    }
}

/// The NATS bridge's state as `status --json` prints it.
pub(crate) fn nats_json(n: &v1::NatsBridgeStatus) -> Value {
    json!({
        "url": n.url, "stream": n.stream, "state": n.state,
        "last_error": if n.last_error.is_empty() { Value::Null } else { json!(n.last_error) },
        "buffered": n.buffered, "capacity": n.capacity, "published": n.published,
        "duplicates": n.duplicates, "received": n.received, "dropped_full": n.dropped_full,
        "dropped_failed": n.dropped_failed, "publish_errors": n.publish_errors,
        "invalid": n.invalid,
    })
}

/// The NATS bridge's state as `status` prints it: a line, and the last error under it.
fn nats_lines(n: &v1::NatsBridgeStatus) -> Vec<String> {
    let mut lines = vec![format!(
        "NATS bridge {} stream {}: {}  buffered {}/{}  published {}  received {}  dropped {} \
         (buffer full {}, publish failed {})  publish errors {}  duplicates {}  invalid {}",
        n.url,
        n.stream,
        n.state,
        n.buffered,
        n.capacity,
        n.published,
        n.received,
        n.dropped_full + n.dropped_failed,
        n.dropped_full,
        n.dropped_failed,
        n.publish_errors,
        n.duplicates,
        n.invalid
    )];
    if !n.last_error.is_empty() {
        lines.push(format!("  last error: {}", n.last_error));
    }
    lines
}

pub async fn status(args: ClientArgs) -> anyhow::Result<()> {
    let r = SystemServiceClient::new(connect(&args).await?)
        .get_status(v1::GetStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        let out = json!({
            "version": r.version,
            "uptime_ms": r.uptime_ms,
            "root": r.root.as_ref().map(node_json),
            "nats": r.nats.as_ref().map(nats_json),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "veraltheim {}  up {:.1} s",
            r.version,
            r.uptime_ms as f64 / 1000.0
        );
        if let Some(root) = &r.root {
            print_node(root, 0);
        }
        for line in r.nats.as_ref().map(nats_lines).unwrap_or_default() {
            println!("{line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_gives_shape_and_refuses_ragged() {
        let (shape, leaves) = crate::convert::flatten(&json!([[1, 2, 3], [4, 5, 6]])).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(leaves.len(), 6);
        assert!(crate::convert::flatten(&json!([[1, 2], [3]])).is_err());
        assert_eq!(nest(&leaves, &shape), json!([[1, 2, 3], [4, 5, 6]]));
    }

    #[test]
    fn to_tensor_checks_types() {
        let t = to_tensor("x", v1::DataType::Fp32 as i32, "[[1.5, 2]]").unwrap();
        assert_eq!(t.shape, vec![1, 2]);
        let err = to_tensor("x", v1::DataType::Int32 as i32, "[1.5]").unwrap_err();
        assert!(err.to_string().contains("'x'"), "{err}");
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct EventsArgs {
    /// Topic filter, repeatable: `*` matches one segment, `>` the rest (e.g. `models.>`,
    /// `models.*.state`). Default: every topic.
    #[arg(short, long = "topic")]
    pub topics: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<usize>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Streams lifecycle events until interrupted (or `--count` events). `--json` prints one JSON
/// object per line.
pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let mut stream = SystemServiceClient::new(connect(&args.client).await?)
        .watch_events(v1::WatchEventsRequest {
            topics: args.topics,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut seen = 0;
    while let Some(e) = stream.message().await.map_err(status_error)? {
        if args.client.json {
            let attrs: serde_json::Map<String, Value> = e
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            println!(
                "{}",
                json!({"topic": e.topic, "time_ms": e.time_ms, "message": e.message, "attributes": attrs, "traceparent": e.traceparent, "node": e.node})
            );
        } else {
            println!("{} {:<12} {:<28} {}", e.time_ms, e.node, e.topic, e.message);
        }
        seen += 1;
        if args.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

/// Aborts a supervised task as if it had crashed (the server needs --enable-fault-injection).
pub async fn kill(path: String, args: ClientArgs) -> anyhow::Result<()> {
    SystemServiceClient::new(connect(&args).await?)
        .kill_child(v1::KillChildRequest { path: path.clone() })
        .await
        .map_err(status_error)?;
    println!("killed {path}");
    Ok(())
}

#[derive(Clone, Debug, clap::Args)]
pub struct GpusArgs {
    /// Refresh every sampling interval until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: stop after this many snapshots.
    #[arg(long)]
    pub count: Option<usize>,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub(crate) fn gpu_json(g: &v1::Gpu) -> Value {
    json!({
        "index": g.index, "name": g.name, "uuid": g.uuid,
        "memory_total_bytes": g.memory_total_bytes, "memory_used_bytes": g.memory_used_bytes,
        "memory_free_bytes": g.memory_free_bytes,
        "utilization_percent": g.utilization_percent,
        "memory_utilization_percent": g.memory_utilization_percent,
        "temperature_celsius": g.temperature_celsius,
        "power_draw_watts": f64::from(g.power_draw_milliwatts) / 1000.0,
        "power_limit_watts": f64::from(g.power_limit_milliwatts) / 1000.0,
        "energy_millijoules": g.energy_millijoules,
        "simulated": g.simulated, "lost": g.lost, "models": g.models, "notes": g.notes,
        "processes": g.processes.iter().map(|p| json!({"pid": p.pid, "used_memory_bytes": p.used_memory_bytes})).collect::<Vec<_>>(),
        "placed_models": g.placed_models.iter().map(|p| json!({"name": p.name, "bytes": p.bytes, "state": p.state})).collect::<Vec<_>>(),
        "jobs": g.jobs.iter().map(|j| json!({"job_id": j.job_id, "bytes": j.bytes})).collect::<Vec<_>>(),
    })
}

fn print_gpus(out: &mut dyn Write, s: &v1::ResourceSnapshot, as_json: bool) -> std::io::Result<()> {
    if as_json {
        let list: Vec<Value> = s.gpus.iter().map(gpu_json).collect();
        writeln!(out, "{}", Value::Array(list))?;
        return out.flush();
    }
    if s.gpus.is_empty() {
        let why = if s.gpu_probe_error.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.gpu_probe_error)
        };
        writeln!(out, "no GPUs{why}")?;
        return out.flush();
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    writeln!(
        out,
        "{:>3}  {:<28} {:>17} {:>5} {:>6} {:>9}  MODELS, JOBS",
        "GPU", "NAME", "MEMORY USED/TOTAL", "UTIL", "TEMP", "POWER"
    )?;
    for g in &s.gpus {
        let name = if g.simulated {
            format!("{} (simulated)", g.name)
        } else if g.lost {
            format!("{} (LOST)", g.name)
        } else {
            g.name.clone()
        };
        writeln!(
            out,
            "{:>3}  {:<28} {:>7.1}/{:>5.1} GiB {:>4}% {:>5}C {:>8.1}W  {}",
            g.index,
            name,
            gib(g.memory_used_bytes),
            gib(g.memory_total_bytes),
            g.utilization_percent,
            g.temperature_celsius,
            f64::from(g.power_draw_milliwatts) / 1000.0,
            g.models
                .iter()
                .cloned()
                .chain(g.jobs.iter().map(|j| format!("job {}", j.job_id)))
                .collect::<Vec<_>>()
                .join(",")
        )?;
    }
    out.flush()
}

/// Prints a snapshot on stdout; `Ok(false)` when nobody reads it any more (the pipe was closed,
/// as `gpus --watch | head -n 2` does): the end of a watch, not an error.
fn show_gpus(s: &v1::ResourceSnapshot, as_json: bool) -> anyhow::Result<bool> {
    match print_gpus(&mut std::io::stdout().lock(), s, as_json) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `veraltheim gpus`: the GPUs the coordinator sees (`--json`: an array of objects).
pub async fn gpus(args: GpusArgs) -> anyhow::Result<()> {
    let mut client = ResourceServiceClient::new(connect(&args.client).await?);
    if !args.watch {
        let s = client
            .get_resources(v1::GetResourcesRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
        return show_gpus(&s, args.client.json).map(|_| ());
    }
    let mut stream = client
        .watch_resources(v1::WatchResourcesRequest { interval_ms: 0 })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut seen = 0;
    while let Some(s) = stream.message().await.map_err(status_error)? {
        if !show_gpus(&s, args.client.json)? {
            break;
        }
        seen += 1;
        if args.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

mod jobfile;
mod nodes;
mod watch;

pub use nodes::{NodesArgs, nodes};

/// The fuzz entry for job files: parsed, then turned into a spec as `jobs submit -f` does.
pub(crate) fn fuzz_job_file(text: &str) -> anyhow::Result<v1::JobSpec> {
    use clap::Parser;
    #[derive(Parser)]
    struct Submit {
        #[command(flatten)]
        args: jobfile::SubmitArgs,
    }
    let submit = Submit::try_parse_from(["submit", "-f", "job.toml"])?;
    let file = jobfile::JobFile::parse(text, "job.toml")?;
    jobfile::build_spec(&submit.args, Some(file))
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Submit a job (a command after `--`, or a TOML job file with -f, or both: flags override
    /// the file); prints the new job's id alone on stdout.
    Submit(Box<jobfile::SubmitArgs>),
    /// List jobs (newest last).
    List {
        /// Only jobs in this state (repeatable), e.g. RUNNING.
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long, default_value = "")]
        queue: String,
    },
    Get {
        id: String,
    },
    Cancel {
        id: String,
    },
    /// The job's output (stdout and stderr) of its latest attempt.
    Logs {
        id: String,
        #[arg(long)]
        follow: bool,
    },
    /// Follow the job's state and progress until it ends: a live progress line on a terminal,
    /// one line per change otherwise (one JSON object with --json). Exit status 0 when the job
    /// SUCCEEDED, 1 otherwise.
    Watch {
        id: String,
    },
}

#[derive(Clone, Debug, clap::Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn job_state_name(s: i32) -> String {
    v1::JobState::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_string())
        .unwrap_or_else(|_| s.to_string())
}

pub(crate) fn job_json(j: &v1::Job) -> Value {
    let spec = j.spec.clone().unwrap_or_default();
    json!({
        "id": j.id, "name": spec.name, "queue": spec.queue, "state": job_state_name(j.state),
        "reason": j.reason, "attempt": j.attempt, "exit_code": j.exit_code,
        "created_ms": j.created_ms, "started_ms": j.started_ms, "finished_ms": j.finished_ms,
        "progress": j.progress, "ttl_seconds_after_finished": spec.ttl_seconds_after_finished,
        "app_failures": j.app_failures, "infra_failures": j.infra_failures,
        "node": j.node, "leader_epoch": j.leader_epoch,
        "paused": j.paused, "paused_since_ms": j.paused_since_ms,
        "paused_reason": j.paused_reason, "paused_ms": j.paused_ms, "pauses": j.pauses,
        "pausable": spec.pausable,
    })
}

/// A job's reason for the table: a paused job says so first, with for how long and why.
fn job_reason(j: &v1::Job) -> String {
    if j.paused {
        format!(
            "PAUSED ({:.1} s in all): {}; {}",
            j.paused_ms as f64 / 1000.0,
            j.paused_reason,
            j.reason
        )
    } else {
        j.reason.clone()
    }
}

fn print_jobs(jobs: &[v1::Job], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let list: Vec<Value> = jobs.iter().map(job_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<22} {:<16} {:<10} {:<11} {:>7}  REASON",
        "ID", "NAME", "QUEUE", "STATE", "ATTEMPT"
    );
    for j in jobs {
        let spec = j.spec.clone().unwrap_or_default();
        println!(
            "{:<22} {:<16} {:<10} {:<11} {:>7}  {}",
            j.id,
            spec.name,
            spec.queue,
            job_state_name(j.state),
            j.attempt,
            job_reason(j)
        );
    }
    Ok(())
}

pub async fn jobs(args: JobsArgs) -> anyhow::Result<bool> {
    let as_json = args.client.json;
    if let JobsCommand::Submit(submit) = &args.command {
        // A bad job file or flag is refused before any connection is made.
        let file = match &submit.file {
            Some(path) => Some(jobfile::JobFile::read(path)?),
            None => None,
        };
        let spec = jobfile::build_spec(submit, file)?;
        let mut client = JobServiceClient::new(connect(&args.client).await?);
        let job = client
            .submit_job(v1::SubmitJobRequest { spec: Some(spec) })
            .await
            .map_err(status_error)?
            .into_inner();
        if as_json {
            println!("{}", job_json(&job));
        } else {
            println!("{}", job.id);
        }
        return Ok(true);
    }
    let mut client = JobServiceClient::new(connect(&args.client).await?);
    match args.command {
        // Submitted above, before connecting.
        JobsCommand::Submit(_) => {}
        JobsCommand::List { states, queue } => {
            let states = states
                .iter()
                .map(|s| {
                    v1::JobState::from_str_name(&format!("JOB_STATE_{}", s.to_uppercase()))
                        .map(|s| s as i32)
                        .ok_or_else(|| anyhow!("--state '{s}' is not a job state"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let page = client
                    .list_jobs(v1::ListJobsRequest {
                        queue: queue.clone(),
                        states: states.clone(),
                        page_token: token,
                        ..Default::default()
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                all.extend(page.jobs);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            print_jobs(&all, as_json)?;
        }
        JobsCommand::Get { id } => {
            let job = client
                .get_job(v1::GetJobRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            if as_json {
                println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
            } else {
                print_jobs(std::slice::from_ref(&job), false)?;
            }
        }
        JobsCommand::Cancel { id } => {
            let mut job = client
                .cancel_job(v1::CancelJobRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            // A running job is told to stop and ends a moment later: wait for that, so that
            // what is printed is the state it ended in rather than RUNNING.
            if !watch::is_terminal(job.state) {
                let mut stream = client
                    .watch_job(v1::WatchJobRequest { id: job.id.clone() })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                while let Some(next) = stream.message().await.map_err(status_error)? {
                    let ended = watch::is_terminal(next.state);
                    job = next;
                    if ended {
                        break;
                    }
                }
            }
            print_jobs(std::slice::from_ref(&job), as_json)?;
        }
        JobsCommand::Logs { id, follow } => {
            let mut stream = client
                .job_logs(v1::JobLogsRequest { id, follow })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(chunk) = stream.message().await.map_err(status_error)? {
                if chunk.stream == "stderr" {
                    std::io::stderr().write_all(&chunk.data)?;
                } else {
                    std::io::stdout().write_all(&chunk.data)?;
                }
            }
        }
        JobsCommand::Watch { id } => {
            use std::io::IsTerminal;
            let stream = client
                .watch_job(v1::WatchJobRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            let mode = if as_json {
                watch::Mode::Json
            } else if std::io::stdout().is_terminal() {
                watch::Mode::Bar
            } else {
                watch::Mode::Plain
            };
            let last = watch::watch(stream, mode, &mut std::io::stdout().lock()).await?;
            return Ok(last == v1::JobState::Succeeded as i32);
        }
    }
    Ok(true)
}

#[derive(Clone, Debug, clap::Args)]
pub struct AuditArgs {
    /// Only records since this long ago (`90s`, `30m`, `2h`, `7d`) or since this time
    /// (milliseconds since the Unix epoch). Default: every record kept.
    #[arg(long)]
    pub since: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `--since`: a duration ago, or a time in milliseconds since the Unix epoch.
fn since_ms(text: &str, now_ms: u64) -> anyhow::Result<u64> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .with_context(|| format!("--since {text}: not a time in milliseconds"));
    }
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = digits.parse().map_err(|_| {
        anyhow!("--since '{text}': give a duration such as 30m, 2h or 7d, or milliseconds since the Unix epoch")
    })?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("--since '{text}': the unit must be s, m, h or d"),
    };
    Ok(now_ms.saturating_sub(n.saturating_mul(seconds).saturating_mul(1000)))
}

/// Milliseconds since the Unix epoch as a UTC time, `2025-01-02T03:04:05.678Z`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn audit_json(e: &v1::AuditEvent) -> Value {
    json!({
        "time_ms": e.time_ms, "time": utc(e.time_ms), "principal": e.principal,
        "tenant": e.tenant, "verb": e.verb, "resource": e.resource, "result": e.result,
        "action": e.action, "peer": e.peer, "trace_id": e.trace_id, "message": e.message,
    })
}

/// `veraltheim audit`: the audit log kept by the server, oldest first (`--json`: one object per
/// line). Needs system.admin.
pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let since = match &args.since {
        Some(s) => since_ms(s, now)?,
        None => 0,
    };
    let mut client = SystemServiceClient::new(connect(&args.client).await?);
    let mut token = String::new();
    let mut out = std::io::stdout().lock();
    if !args.client.json {
        writeln!(
            out,
            "{:<24} {:<16} {:<12} {:<13} {:<28} {:<18} PEER",
            "TIME", "PRINCIPAL", "TENANT", "VERB", "RESOURCE", "RESULT"
        )?;
    }
    loop {
        let page = client
            .list_audit_events(v1::ListAuditEventsRequest {
                since_ms: since,
                page_size: 1000,
                page_token: token,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for e in &page.events {
            let written = if args.client.json {
                writeln!(out, "{}", audit_json(e))
            } else {
                writeln!(
                    out,
                    "{:<24} {:<16} {:<12} {:<13} {:<28} {:<18} {}",
                    utc(e.time_ms),
                    e.principal,
                    if e.tenant.is_empty() { "-" } else { &e.tenant },
                    e.verb,
                    e.resource,
                    e.result,
                    e.peer
                )
            };
            match written {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                other => other?,
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        token = page.next_page_token;
    }
}

#[cfg(test)]
mod audit_tests {
    use super::*;

    #[test]
    fn since_takes_durations_or_epoch_milliseconds() {
        let now = 10_000_000_000;
        assert_eq!(since_ms("90s", now).unwrap(), now - 90_000);
        assert_eq!(since_ms("30m", now).unwrap(), now - 1_800_000);
        assert_eq!(since_ms("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(since_ms("1d", now).unwrap(), now - 86_400_000);
        assert_eq!(since_ms("1700000000000", now).unwrap(), 1_700_000_000_000);
        let e = since_ms("3w", now).unwrap_err().to_string();
        assert!(e.contains("'3w'") && e.contains("s, m, h or d"), "{e}");
        assert!(since_ms("yesterday", now).is_err());
        assert!(since_ms("", now).is_err());
    }

    #[test]
    fn utc_times_are_civil_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
    }
}
