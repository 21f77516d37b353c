//! `veraltheim serve`: builds the coordinator from its configuration, starts it as a supervision
//! tree (see `tree.rs`), and runs until SIGTERM or SIGINT. Shutdown goes in order: stop taking
//! work (the API servers finish their in-flight calls), drain the model workers, then stop the
//! rest of the tree in reverse start order — all within the grace period.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use axum::serve::ListenerExt;
use http::HeaderValue;
use tokio::net::TcpListener;
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
use veraltheim_supervisor::ChildContext;

use crate::api::Api;
use crate::config::Config;
use crate::context::Context;
use crate::devices::Devices;
use crate::jobs::{Jobs, JobsApi};
use crate::kserve::KserveService;
use crate::ratelimit::ClientLimiter;
use crate::tree::{ServeFn, TreeHost, TreeParts};
use veraltheim_models::allocator::{Budget, DeviceId};
use veraltheim_models::backend::BackendOptions;
use veraltheim_serving::{Inference, ManagerDeps, ManagerOptions, ModelManager, ResponseCache};
use veraltheim_slowpath::Resources;
use veraltheim_storage::{RedbStore, StoreOptions};

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

fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen for {what} on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A server as a supervised worker. The listening socket is bound once, before the tree starts
/// (so a busy port fails the start with a clear message); each (re)start builds its router (it
/// may need the tree it runs in, from its context) and serves a duplicate of the socket until
/// the worker is told to stop.
fn server_worker(
    listener: std::net::TcpListener,
    router: impl Fn(&ChildContext) -> axum::Router + Send + Sync + 'static,
) -> ServeFn {
    let listener = Arc::new(listener);
    Arc::new(move |ctx: ChildContext| {
        let listener = listener.clone();
        let router = router(&ctx);
        Box::pin(async move {
            let listener = TcpListener::from_std(listener.try_clone()?)?;
            axum::serve(
                listener.tap_io(|tcp| {
                    // Small unary calls: send each response at once.
                    let _ = tcp.set_nodelay(true);
                }),
                router
                    .clone()
                    .into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { ctx.cancelled().await })
            .await?;
            Ok(())
        })
    })
}

fn grpc_router(
    ctx: &Arc<Context>,
    jobs: &Arc<Jobs>,
    config: &Config,
    tree: &veraltheim_supervisor::SupervisorHandle,
) -> axum::Router {
    let max = config.server.max_message_bytes;
    let api = Api::new(ctx.clone(), tree.clone());
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
    .add_service(JobServiceServer::new(JobsApi::new(jobs.clone())))
    .add_service(ResourceServiceServer::new(api));
    // gRPC is served by hyper through axum rather than tonic's transport server: that server
    // always enforces `grpc-timeout` itself and answers CANCELLED, racing our own deadline
    // handling, which answers DEADLINE_EXCEEDED as the gRPC spec says.
    let router = routes
        .prepare()
        .into_axum_router()
        // Oversize requests get RESOURCE_EXHAUSTED, as gRPC clients expect.
        .layer(MapResponseLayer::new(oversize_is_resource_exhausted));
    match ClientLimiter::new(
        config.server.rate_limit_per_second,
        config.server.rate_limit_burst,
    ) {
        // Outermost: a client over its rate costs us no decoding.
        Some(limiter) => router.layer(axum::middleware::from_fn_with_state(
            limiter,
            crate::ratelimit::limit,
        )),
        None => router,
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
        // 0: one thread per core, the pool's spelling of an unset `execution.threads`.
        ExecutionPool::new(config.execution.threads.unwrap_or(0))
            .context("cannot start the execution pool")?;
    let threads = pool.threads();
    let bus = Bus::new();
    let devices = Arc::new(
        Devices::detect(
            config.devices.simulate_gpus.as_deref(),
            Duration::from_millis(config.devices.sample_interval_ms),
        )
        .map_err(|e| anyhow!("--simulate-gpus: {e}"))?,
    );
    let budgets = {
        let snap = devices.snapshot();
        let cpu = config
            .models
            .cpu_memory_bytes
            .unwrap_or(snap.host.memory_total_bytes);
        let mut budgets = vec![Budget::new(
            DeviceId::Cpu,
            cpu,
            config.models.memory_reserve_bytes,
        )];
        budgets.extend(snap.gpus.iter().filter(|g| !g.lost).map(|g| {
            Budget::new(
                DeviceId::Gpu(g.index),
                g.memory_total_bytes,
                config.models.gpu_memory_reserve_bytes,
            )
        }));
        budgets
    };
    let host = Arc::new(TreeHost::new());
    let models = Arc::new(ModelManager::new(
        ManagerOptions {
            worker: WorkerOptions {
                default_max_queue_size: config.models.default_max_queue_size,
                ..WorkerOptions::default()
            },
            unload_grace: Duration::from_secs(config.models.unload_grace_seconds),
            fault_injection: config.models.enable_fault_injection,
            repository: Some(config.models.repository.clone()),
            backend: BackendOptions {
                onnxruntime_library: config.models.onnxruntime_library.clone(),
                // 0: ONNX Runtime's default, the backend's spelling of an unset value.
                intra_op_threads: config.models.onnx_intra_op_threads.unwrap_or(0),
                limits: config.limits.models(),
            },
            max_concurrent_loads: config.models.max_concurrent_loads,
            load_timeout: Duration::from_secs(config.models.load_timeout_seconds),
            budgets,
            gpu_reserve_bytes: config.models.gpu_memory_reserve_bytes,
            size_factor: config.models.size_factor,
        },
        ManagerDeps {
            pool,
            bus: bus.clone(),
            host: host.clone(),
            gauge: devices.clone(),
        },
    )?);
    let cache = ResponseCache::new(
        config.cache.max_bytes,
        config.cache.ttl_seconds.map(Duration::from_secs),
    );
    let inference = Arc::new(Inference::new(models.clone(), cache.clone()));

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

    // The durable store, opened before anything runs so that jobs acknowledged before a crash
    // are recovered first.
    let store_path = config.storage.data_dir.join("state.redb");
    let store = Arc::new(
        tokio::task::spawn_blocking({
            let path = store_path.clone();
            move || RedbStore::open(&path, StoreOptions::default())
        })
        .await?
        .with_context(|| format!("cannot open the store {}", store_path.display()))?,
    );
    let capacity = {
        let snap = devices.snapshot();
        Resources {
            cpu_millis: u64::from(snap.host.cores) * 1000,
            memory_bytes: snap.host.memory_total_bytes,
            gpus: snap.gpus.iter().filter(|g| !g.lost).count() as u32,
        }
    };
    // Inference jobs go through the same model queues as online requests, behind them.
    let batch_inference = Arc::new(crate::batch::BatchInference::new(
        inference.clone(),
        config.jobs.inference_concurrency,
    ));
    let (jobs, job_events) = Jobs::start(
        &config.jobs,
        store.clone(),
        &config.storage.data_dir,
        capacity,
        batch_inference,
    )
    .await
    .context("cannot start the job runner")?;
    let jobs = Arc::new(jobs);
    let mut ctx = Context::new(
        inference,
        bus.clone(),
        devices.clone(),
        config.models.enable_fault_injection,
        crate::shm::SharedMemory::new(config.server.allow_client_shm),
    );
    ctx.limits = config.limits.api();
    let ctx = Arc::new(ctx);

    let grpc_addr = config.server.grpc_addr;
    let http_addr = config.server.http_addr;
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let grpc = server_worker(bind(grpc_addr, "gRPC")?, {
        let (ctx, jobs, config) = (ctx.clone(), jobs.clone(), config.clone());
        move |child: &ChildContext| grpc_router(&ctx, &jobs, &config, child.root())
    });
    let http = server_worker(bind(http_addr, "HTTP")?, {
        let router = crate::http::router(ctx.clone());
        move |_: &ChildContext| router.clone()
    });
    let root = crate::tree::start(TreeParts {
        bus,
        models: models.clone(),
        host,
        devices,
        cache,
        store,
        jobs: jobs.runner.clone(),
        job_events,
        grpc,
        http,
        shutdown_grace: grace,
    })
    .await
    .context("the supervision tree did not start")?;
    tracing::info!(%grpc_addr, %http_addr, execution_threads = threads, "serving");

    let loading = {
        let models = models.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Concurrently; the manager's load slots bound how many build at once.
            futures::future::join_all(startup.iter().map(|name| {
                let models = models.clone();
                async move {
                    if let Err(e) = models.load(name, None).await {
                        tracing::error!(model = %name, error = %e, "start-up load failed");
                    }
                }
            }))
            .await;
            ctx.set_ready(true);
            tracing::info!("ready");
        })
    };

    let failure = tokio::select! {
        _ = shutdown_signal() => None,
        ended = root.wait() => Some(ended),
    };
    ctx.set_ready(false);
    loading.abort();
    if let Some(ended) = failure {
        models.shutdown(Duration::ZERO).await;
        return Err(match ended {
            Ok(()) => anyhow!("the supervision tree stopped on its own"),
            Err(e) => anyhow!("the supervision tree gave up: {e}"),
        });
    }
    tracing::info!(grace_seconds = grace.as_secs(), "shutting down");
    // The API first: stop accepting and finish in-flight calls (bounded by the servers'
    // shutdown timeout in the tree).
    if let Err(e) = root.terminate_child("API").await {
        tracing::warn!(error = %e, "stopping the API servers");
    }
    models.shutdown(grace).await;
    if let Err(e) = root.shutdown().await {
        tracing::warn!(error = %e, "stopping the supervision tree");
    }
    tracing::info!("stopped");
    Ok(())
}
