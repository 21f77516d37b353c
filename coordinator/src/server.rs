//! `veraltheim serve`: builds the coordinator from its configuration and runs it until SIGTERM or
//! SIGINT, then shuts down in order: stop accepting, let in-flight work finish within the grace
//! period, drain the model workers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::serve::ListenerExt;
use http::HeaderValue;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tower::util::MapResponseLayer;
use veraltheim_bus::Bus;
use veraltheim_fastpath::{ExecutionPool, WorkerOptions};
use veraltheim_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use veraltheim_proto::v1::{
    inference_service_server::InferenceServiceServer, job_service_server::JobServiceServer,
    model_service_server::ModelServiceServer, resource_service_server::ResourceServiceServer,
    system_service_server::SystemServiceServer,
};

use crate::api::Api;
use crate::config::Config;
use crate::context::Context;
use crate::kserve::KserveService;
use crate::manager::ModelManager;

/// tonic refuses an oversize request with OUT_OF_RANGE; gRPC's convention (and what Triton
/// clients expect) is RESOURCE_EXHAUSTED. The refusal is a trailers-only response, so its status
/// sits in the headers and can be rewritten here.
fn oversize_is_resource_exhausted<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers();
    let oversize = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("length%20too%20large") || m.contains("length too large"));
    if oversize {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("8"));
    }
    resp
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.storage.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.storage.data_dir.display()
        )
    })?;
    let pool =
        ExecutionPool::new(config.execution.threads).context("cannot start the execution pool")?;
    let threads = pool.threads();
    let bus = Bus::new();
    let models = Arc::new(ModelManager::new(
        pool,
        WorkerOptions {
            default_max_queue_size: config.models.default_max_queue_size,
        },
        Duration::from_secs(config.models.unload_grace_seconds),
        config.models.enable_fault_injection,
        bus.clone(),
    )?);
    let ctx = Arc::new(Context::new(models.clone(), bus));

    let grpc_addr = config.server.grpc_addr;
    let http_addr = config.server.http_addr;
    let grpc_listener = TcpListener::bind(grpc_addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {grpc_addr}"))?;
    let http_listener = TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {http_addr}"))?;

    let startup: Vec<String> = if config.models.load.is_empty() {
        models.names()
    } else {
        config.models.load.clone()
    };
    for name in &startup {
        if models.info(name).is_err() {
            bail!(
                "--load-model {name}: no such model (known: {})",
                models.names().join(", ")
            );
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let max = config.server.max_message_bytes;
    let api = Api::new(ctx.clone());
    let routes = Routes::new(
        GrpcInferenceServiceServer::new(KserveService::new(ctx.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
    .add_service(
        InferenceServiceServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
    .add_service(ModelServiceServer::new(api.clone()))
    .add_service(SystemServiceServer::new(api.clone()))
    .add_service(JobServiceServer::new(api.clone()))
    .add_service(ResourceServiceServer::new(api));
    // gRPC is served by hyper through axum rather than tonic's transport server: that server
    // always enforces `grpc-timeout` itself and answers CANCELLED, racing our own deadline
    // handling, which answers DEADLINE_EXCEEDED as the gRPC spec says.
    let grpc_router = routes
        .prepare()
        .into_axum_router()
        // Oversize requests get RESOURCE_EXHAUSTED, as gRPC clients expect.
        .layer(MapResponseLayer::new(oversize_is_resource_exhausted));
    let grpc = axum::serve(
        grpc_listener.tap_io(|tcp| {
            // Small unary calls: send each response at once.
            let _ = tcp.set_nodelay(true);
        }),
        grpc_router,
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let http = axum::serve(http_listener, crate::http::router(ctx.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let grpc_task = tokio::spawn(async move { grpc.await });
    let http_task = tokio::spawn(async move { http.await });
    tracing::info!(%grpc_addr, %http_addr, execution_threads = threads, "serving");

    let loading = {
        let models = models.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            for name in startup {
                if let Err(e) = models.load(&name, None).await {
                    tracing::error!(model = %name, error = %e, "start-up load failed");
                }
            }
            ctx.set_ready(true);
            tracing::info!("ready");
        })
    };

    shutdown_signal().await;
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    tracing::info!(grace_seconds = grace.as_secs(), "shutting down");
    ctx.set_ready(false);
    loading.abort();
    let _ = stop_tx.send(true);
    // Servers stop accepting at once and finish their in-flight calls; long-lived streams get
    // the grace period, then are cut.
    let servers = async {
        let _ = grpc_task.await;
        let _ = http_task.await;
    };
    if tokio::time::timeout(grace, servers).await.is_err() {
        tracing::warn!("in-flight calls outlived the grace period; closing them");
    }
    models.shutdown(grace).await;
    tracing::info!("stopped");
    Ok(())
}
