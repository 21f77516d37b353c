//! `veraltheim-load`: end-to-end load generator for Veraltheim (KServe `ModelInfer` over gRPC),
//! with its baselines measured in the same run. `veraltheim-load --help` describes the modes.

use std::process::ExitCode;

// The coordinator's allocator (see coordinator/src/main.rs), so that the echo baseline and the
// client are measured under the same allocator as the server they are compared with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context as _;
use clap::Parser;
use veraltheim_benches::load::args::{Cli, Command, RunArgs, compute_plan};
use veraltheim_benches::load::client::run_load;
use veraltheim_benches::load::compute::compute_ceiling;
use veraltheim_benches::load::echo::EchoServer;
use veraltheim_benches::load::suite::suite;

async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let mut spec = args.load.spec().map_err(anyhow::Error::msg)?;
    spec.tls = args.tls.clone();
    spec.protocol = args.protocol;
    let (echo, target, addr) = if args.echo {
        let server = EchoServer::start(0)?;
        let addr = server.addr().to_string();
        (Some(server), "echo".to_string(), addr)
    } else {
        let addr = args
            .server
            .clone()
            .context("--server or --echo is required")?;
        (None, addr.clone(), addr)
    };
    let report = run_load(&target, &addr, &spec, None, None).await?;
    if let Some(server) = echo {
        server.stop()?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.line());
    }
    Ok(report.requests > 0)
}

/// Prints a report: one JSON object with `--json`, else its text.
fn emit(report: &impl serde::Serialize, json: bool, text: String) -> anyhow::Result<bool> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{text}");
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("load-client");
    if cli.client_threads > 0 {
        builder.worker_threads(cli.client_threads);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<bool> = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Suite(args) => {
                let report = suite(&args).await?;
                emit(&report, args.json, report.text())
            }
            Command::Jobs(args) => {
                let report = veraltheim_benches::load::jobs::jobs(&args).await?;
                emit(&report, args.json, report.text())
            }
            Command::Failover(args) => {
                let report = veraltheim_benches::load::failover::failover(&args).await?;
                emit(&report, args.json, report.text())
            }
            Command::Restart(args) => {
                let report = veraltheim_benches::load::restart::restart(&args).await?;
                emit(&report, args.json, report.text())
            }
            Command::Text(args) => {
                let report = veraltheim_benches::load::text::text(&args).await?;
                emit(&report, args.json, report.text())
            }
            Command::Cosched(args) => {
                let report = veraltheim_benches::load::cosched::cosched(&args).await?;
                emit(&report, args.json, report.text())
            }
            Command::Overload(args) => {
                let report = veraltheim_benches::load::overload::overload(&args).await?;
                emit(&report, args.json, report.text())
            }
            Command::Compute(args) => {
                let (sizes, per_size) = compute_plan(&args.batch_sizes, args.compute_duration)
                    .map_err(anyhow::Error::msg)?;
                let report = tokio::task::spawn_blocking(move || {
                    compute_ceiling(&args.model, &args.shape, &sizes, per_size)
                        .map(|r| (r, args.json))
                })
                .await??;
                if report.1 {
                    println!("{}", serde_json::to_string(&report.0)?);
                } else {
                    print!("{}", report.0.lines());
                }
                Ok(true)
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: no request succeeded");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
