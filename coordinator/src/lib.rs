//! `veraltheim`: the coordinator (`serve`) and its command-line client (`infer`, `models`,
//! `jobs`, `nodes`, `gpus`, `events`, `health`, `status`, `kill`, `config`). Configuration is read here
//! and passed down as typed structs; the crates below know nothing of flags, files or gRPC.
//!
//! A library with a thin binary (`main.rs`): the binary calls [`run`]; the fuzz targets
//! (`fuzz/`) call the parsers of untrusted input through [`fuzz`]. Nothing else is public.

mod api;
mod audit;
mod auth;
mod batch;
mod cli;
mod cluster;
mod config;
mod context;
mod convert;
mod devices;
mod gpujobs;
mod http;
mod jobs;
mod kserve;
mod logging;
mod node;
mod objectives;
mod page;
mod params;
mod peer;
mod pressure;
mod ratelimit;
mod refusal;
mod rest;
mod server;
mod shm;
mod stream;
mod telemetry;
mod tls;
mod tree;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, ServeArgs};

/// Veraltheim: an AI workload coordinator. Online inference on the fast path (dynamic batching),
/// served over gRPC: our own `veraltheim.v1` API and the KServe v2 / Triton protocol.
#[derive(Parser)]
#[command(name = "veraltheim", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve(Box<ServeArgs>),
    /// Send one inference request.
    Infer(cli::InferArgs),
    /// List, inspect, load and unload models; show their statistics.
    Models(cli::ModelsArgs),
    /// Is the coordinator live and ready? (exit status 0 when it is)
    Health(cli::ClientArgs),
    /// The coordinator's components and their states.
    Status(cli::ClientArgs),
    /// Batch jobs: submit, list, get, cancel, logs, watch.
    Jobs(cli::JobsArgs),
    /// The coordinators sharing the job database (`--json` for scripts); `nodes drain ID` stops
    /// new work on one, letting its running jobs finish.
    Nodes(cli::NodesArgs),
    /// GPUs: memory, utilization, temperature, power (`--json` for scripts, `--watch` to follow).
    Gpus(cli::GpusArgs),
    /// Stream lifecycle events (model states, restarts...), filtered by topic.
    Events(cli::EventsArgs),
    /// Abort a supervised task as if it crashed, e.g. `API/http` (fault injection: the server
    /// must run with --enable-fault-injection).
    Kill {
        /// Path in the tree below the root, as `status` shows it.
        path: String,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The audit log: every state-changing call and every refusal the server recorded, oldest
    /// first (needs system.admin when the server authenticates its callers).
    Audit(cli::AuditArgs),
    /// Authentication helpers.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Read a token on stdin and print the `token_sha256 = "..."` line of an auth file's
    /// [[principal]] (the server keeps only the hash).
    HashToken,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the full default configuration file, commented.
    Default,
    /// Print, as JSON, the batch/v1 Job that the Kubernetes executor creates for an example
    /// command job under this configuration (`--config` and `serve`'s flags), so that its pod
    /// can be checked before a job runs (deploy/validate.py checks it against Pod Security
    /// "restricted").
    JobPod(Box<JobPodArgs>),
}

#[derive(clap::Args)]
struct JobPodArgs {
    /// The example job asks for a writable root filesystem (`jobs submit --writable-root`).
    #[arg(long)]
    writable_root: bool,
    #[command(flatten)]
    serve: ServeArgs,
}

fn run_client<F: std::future::Future<Output = anyhow::Result<bool>>>(f: F) -> ExitCode {
    logging::init(LogFormat::Text, "warn");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            logging::report(format_args!("error: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            logging::report(format_args!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The `veraltheim` command: parses the command line and runs what it asks.
pub fn run() -> ExitCode {
    // The job shim (between the local executor and a job's program) before anything else: no
    // runtime, no logging, no parsing of the job's own arguments by clap.
    let mut args = std::env::args_os();
    if args
        .nth(1)
        .is_some_and(|a| a == veraltheim_slowpath::shim::ARG)
    {
        return veraltheim_slowpath::shim::main(args);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config =
                match Config::resolve(&args).and_then(|c| c.server.check_exposure().map(|()| c)) {
                    Ok(c) => c,
                    Err(e) => {
                        logging::report(format_args!("error: {e:#}"));
                        return ExitCode::from(2);
                    }
                };
            logging::init(config.logging.format, &config.logging.level);
            // A panic (a model backend's, contained by the fast path) goes to the log as one
            // structured line instead of a raw backtrace on stderr.
            std::panic::set_hook(Box::new(|info| {
                tracing::error!(
                    thread = std::thread::current().name().unwrap_or("?"),
                    "panic: {info}"
                );
            }));
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.server.runtime_worker_threads())
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    logging::report(format_args!("error: cannot start the runtime: {e}"));
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(server::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    logging::report(format_args!("error: {e:#}"));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Infer(args) => run_client(async { cli::infer(args).await.map(|_| true) }),
        Command::Models(args) => run_client(async { cli::models(args).await.map(|_| true) }),
        Command::Health(args) => run_client(cli::health(args)),
        Command::Status(args) => run_client(async { cli::status(args).await.map(|_| true) }),
        Command::Jobs(args) => run_client(cli::jobs(args)),
        Command::Nodes(args) => run_client(async { cli::nodes(args).await.map(|_| true) }),
        Command::Gpus(args) => run_client(async { cli::gpus(args).await.map(|_| true) }),
        Command::Events(args) => run_client(async { cli::events(args).await.map(|_| true) }),
        Command::Kill { path, client } => {
            run_client(async { cli::kill(path, client).await.map(|_| true) })
        }
        Command::Audit(args) => run_client(async { cli::audit(args).await.map(|_| true) }),
        Command::Auth {
            command: AuthCommand::HashToken,
        } => match auth::client::hash_token_line(std::io::stdin().lock()) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                logging::report(format_args!("error: {e:#}"));
                ExitCode::FAILURE
            }
        },
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::Config {
            command: ConfigCommand::JobPod(args),
        } => {
            let job = Config::resolve(&args.serve)
                .and_then(|c| jobs::example_job_object(&c.jobs, args.writable_root));
            match job {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    logging::report(format_args!("error: {e:#}"));
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Entry points for the fuzz targets (`fuzz/fuzz_targets/`): each takes arbitrary bytes, runs
/// one parser of untrusted input the way the server or the CLI runs it, and must never panic,
/// hang or allocate without bound whatever the bytes (refusals are fine).
#[doc(hidden)]
pub mod fuzz {
    use prost::Message;
    use veraltheim_proto::inference::ModelInferRequest;

    /// A KServe `ModelInferRequest` off the wire, then its tensors (raw and typed, BYTES
    /// included), with shared memory off as the server's default.
    pub fn kserve_infer_request(data: &[u8]) {
        let Ok(request) = ModelInferRequest::decode(data) else {
            return;
        };
        let shm = crate::shm::SharedMemory::new(false);
        let _ = crate::convert::kserve_inputs(
            request.inputs,
            request.raw_input_contents,
            &shm,
            1 << 30,
        );
    }

    /// An HTTP inference request (KServe v2 JSON, with the binary-data extension): the first
    /// byte says whether the next two give `Inference-Header-Content-Length`.
    pub fn rest_infer_request(data: &[u8]) {
        let mut headers = axum::http::HeaderMap::new();
        let body = match data {
            [flag, a, b, rest @ ..] if flag & 1 == 1 => {
                let length = u16::from_le_bytes([*a, *b]);
                headers.insert(crate::rest::tensors::HEADER_LENGTH, length.into());
                rest
            }
            _ => data,
        };
        let shm = crate::shm::SharedMemory::new(false);
        let _ = crate::rest::tensors::parse_request(
            "m".into(),
            String::new(),
            &headers,
            bytes::Bytes::copy_from_slice(body),
            std::time::Instant::now(),
            &shm,
            1 << 30,
        );
    }

    /// An auth file (`server.auth_file`), as TOML text.
    pub fn auth_file(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = crate::auth::Table::parse(text);
        }
    }

    /// A job file (`jobs submit -f`), as TOML text.
    pub fn job_file(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = crate::cli::fuzz_job_file(text);
        }
    }
}
