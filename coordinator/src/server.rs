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
    cluster_service_server::ClusterServiceServer, inference_service_server::InferenceServiceServer,
    job_service_server::JobServiceServer, model_service_server::ModelServiceServer,
    resource_service_server::ResourceServiceServer, system_service_server::SystemServiceServer,
};
use veraltheim_supervisor::ChildContext;

use crate::api::Api;
use crate::config::Config;
use crate::context::Context;
use crate::devices::Devices;
use crate::jobs::{Jobs, JobsApi};
use crate::kserve::KserveService;
use crate::ratelimit::ClientLimiter;
use crate::telemetry::Telemetry;
use crate::tree::{ServeFn, TreeHost, TreeParts};
use veraltheim_models::allocator::{Budget, DeviceId};
use veraltheim_models::backend::BackendOptions;
use veraltheim_serving::{Inference, ManagerDeps, ManagerOptions, ModelManager, ResponseCache};
use veraltheim_slowpath::Resources;
use veraltheim_slowpath::postgres::{PgJobStore, PgOptions};
use veraltheim_slowpath::{AnyJobStore, JobStore};
use veraltheim_storage::{RedbStore, StoreOptions};

/// Two refusals tonic makes before a handler runs carry the wrong code for gRPC clients:
/// - an oversize request is OUT_OF_RANGE; gRPC's convention (and what Triton clients expect) is
///   RESOURCE_EXHAUSTED;
/// - a request that is not valid protobuf (malformed, or a string field that is not UTF-8) is
///   INTERNAL, as if the server had failed; it is the caller's error: INVALID_ARGUMENT.
///
/// Both are trailers-only responses, so the status sits in the headers and can be rewritten here.
fn client_errors_get_their_codes<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers();
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default();
    let status = headers.get("grpc-status").and_then(|s| s.to_str().ok());
    if let Some(code) = status.and_then(|status| crate::context::client_code(status, message)) {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from_static(code));
    }
    // A message quoting the caller's input (a 64 KiB model name) would make a header larger than
    // clients accept (16 KiB in h2 and grpc-go): the client then sees a protocol error instead of
    // the status. Cut it, at a whole percent-escape.
    if let Some(cut) = resp
        .headers()
        .get("grpc-message")
        .and_then(|m| clip_message(m.as_bytes()))
    {
        resp.headers_mut().insert("grpc-message", cut);
    }
    resp
}

/// Longest `grpc-message` sent, in bytes of its percent-encoded form.
const MAX_STATUS_MESSAGE: usize = 4096;

/// `message` cut to [`MAX_STATUS_MESSAGE`] with a marker, or `None` when it is short enough.
fn clip_message(message: &[u8]) -> Option<HeaderValue> {
    if message.len() <= MAX_STATUS_MESSAGE {
        return None;
    }
    let mut end = MAX_STATUS_MESSAGE;
    // Not inside a `%XX` escape.
    if let Some(p) = message[end.saturating_sub(2)..end]
        .iter()
        .position(|b| *b == b'%')
    {
        end = end - 2 + p;
    }
    let mut cut = message[..end].to_vec();
    cut.extend_from_slice(b"%20[...%20cut]");
    HeaderValue::from_bytes(&cut).ok()
}

/// How long a stopping server waits for its last spans to be exported.
const TRACES_FLUSH: Duration = Duration::from_secs(5);

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
/// the worker is told to stop. With `tls`, connections are served by `tls::serve`; without,
/// by `axum::serve`, with no TLS code on the way.
fn server_worker(
    listener: std::net::TcpListener,
    tls: Option<Arc<crate::tls::Tls>>,
    router: impl Fn(&ChildContext) -> axum::Router + Send + Sync + 'static,
) -> ServeFn {
    let listener = Arc::new(listener);
    Arc::new(move |ctx: ChildContext| {
        let listener = listener.clone();
        let tls = tls.clone();
        let router = router(&ctx);
        Box::pin(async move {
            let listener = TcpListener::from_std(listener.try_clone()?)?;
            if let Some(tls) = tls {
                crate::tls::serve(listener, router, tls, async move { ctx.cancelled().await })
                    .await?;
                return Ok(());
            }
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
    gate: &Arc<crate::auth::Gate>,
    cluster: &Arc<crate::cluster::Cluster>,
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
    .add_service(ClusterServiceServer::new(crate::cluster::ClusterApi::new(
        cluster.clone(),
    )))
    .add_service(ResourceServiceServer::new(api));
    // gRPC is served by hyper through axum rather than tonic's transport server: that server
    // always enforces `grpc-timeout` itself and answers CANCELLED, racing our own deadline
    // handling, which answers DEADLINE_EXCEEDED as the gRPC spec says.
    let router = routes
        .prepare()
        .into_axum_router()
        // Oversize requests get RESOURCE_EXHAUSTED and undecodable ones INVALID_ARGUMENT.
        .layer(MapResponseLayer::new(client_errors_get_their_codes));
    let router = match ClientLimiter::new(
        config.server.rate_limit_per_second,
        config.server.rate_limit_burst,
    ) {
        // Before decoding: a client over its rate costs us no decoding.
        Some(limiter) => router.layer(axum::middleware::from_fn_with_state(
            limiter,
            crate::ratelimit::limit,
        )),
        None => router,
    };
    // Outermost: the caller is known (its tenant is the rate limiter's key) before anything
    // else runs, and a call without credentials costs one hash.
    router.layer(axum::middleware::from_fn_with_state(
        gate.clone(),
        crate::auth::grpc_layer,
    ))
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    // Who this node is, before anything (traces, the registry) reads it.
    let node_id = crate::node::init(config.cluster.node_id.as_deref());
    veraltheim_slowpath::cluster::check_node_id(node_id).map_err(|e| {
        anyhow!("this node's id (the host name): {e}; give one with --node-id (cluster.node_id)")
    })?;
    let advertised = config.cluster.advertised(
        config.server.grpc_addr,
        &crate::node::hostname().unwrap_or_else(|| node_id.to_string()),
        config.storage.url.is_some(),
    )?;
    // The certificate files first: a wrong path fails the start before anything else runs.
    let tls = match config.server.tls.files()? {
        Some(files) => Some(Arc::new(
            crate::tls::Tls::load(files).context("cannot serve TLS ([server.tls])")?,
        )),
        None => None,
    };
    // The auth file next: a mistake in it is reported before anything starts.
    let auth = Arc::new(match &config.server.auth_file {
        Some(path) => crate::auth::Auth::from_file(path)?,
        None => crate::auth::Auth::off(),
    });
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
    // The bridge of events to NATS (`--nats-url`) subscribes now, so that the events of the
    // start (models loading, jobs recovered) are buffered until it connects.
    let nats_bridge = match config.bus.bridge(node_id) {
        Some(options) => {
            let bridge = veraltheim_bus::nats::NatsBridge::new(&bus, options)
                .map_err(|e| anyhow!("the NATS bridge ([bus]): {e}"))?;
            tracing::info!(
                url = %bridge.options().url,
                stream = %bridge.options().stream,
                topics = %bridge.options().topics.join(","),
                node = node_id,
                "bridging events to NATS JetStream"
            );
            Some(Arc::new(bridge))
        }
        None => None,
    };
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
                inline_below: (config.models.inline_execution_us > 0)
                    .then(|| Duration::from_micros(config.models.inline_execution_us)),
                batcher_below: (config.models.batcher_execution_us > 0)
                    .then(|| Duration::from_micros(config.models.batcher_execution_us)),
                ..WorkerOptions::default()
            },
            unload_grace: Duration::from_secs(config.models.unload_grace_seconds),
            fault_injection: config.models.enable_fault_injection,
            repository: Some(config.models.repository.clone()),
            backend: BackendOptions {
                onnxruntime_library: config.models.onnxruntime_library.clone(),
                // 0: ONNX Runtime's default, the backend's spelling of an unset value.
                intra_op_threads: config.models.onnx_intra_op_threads.unwrap_or(0),
                // Optimised ONNX graphs of models whose folder is read-only.
                onnx_cache_dir: Some(config.storage.data_dir.join("onnx-cache")),
                limits: config.limits.models(),
                simulated_gpus: devices.simulated(),
            },
            max_concurrent_loads: config.models.max_concurrent_loads,
            load_timeout: Duration::from_secs(config.models.load_timeout_seconds),
            budgets,
            gpu_reserve_bytes: config.models.gpu_memory_reserve_bytes,
            size_factor: config.models.size_factor,
            latency_slo_ms: config.models.latency_slo_ms().map_err(|e| anyhow!(e))?,
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
            gpu_memory_bytes: 0,
        }
    };
    // Inference jobs go through the same model queues as online requests, behind them.
    let batch_inference = Arc::new(crate::batch::BatchInference::new(
        inference.clone(),
        config.jobs.inference_concurrency,
    ));
    // Local jobs as root need jobs.local.run_as once authentication is on.
    crate::jobs::check_run_as(&config.jobs, auth.enabled())?;
    // Traces, when an OTLP receiver is configured; without one no span is ever made.
    let telemetry = match &config.telemetry.otlp_endpoint {
        Some(endpoint) => {
            let t = Arc::new(Telemetry::start(endpoint)?);
            tracing::info!(%endpoint, node = crate::node::node_id(), "exporting traces over OTLP");
            Some(t)
        }
        None => None,
    };
    // Batch jobs: in the embedded store, or in the PostgreSQL database `storage.url` names
    // (which also holds the node registry).
    let mut node_registry = None;
    let mut leader_row = None;
    // This process, as the registry tells it from another with the same id.
    let incarnation = crate::cluster::new_incarnation();
    let job_store = match &config.storage.url {
        None => AnyJobStore::Kv(JobStore::new(store.clone())),
        Some(url) => {
            if config.storage.pool_size == 0 {
                bail!("storage.pool_size (--store-pool-size) must be at least 1");
            }
            let options = PgOptions {
                pool_size: config.storage.pool_size,
                ..PgOptions::default()
            };
            let pg = PgJobStore::connect(url, options)
                .await
                .context("cannot open the job database (--store)")?;
            node_registry = Some(pg.nodes());
            leader_row = Some(pg.leader());
            tracing::info!(
                pool_size = config.storage.pool_size,
                schema = veraltheim_slowpath::postgres::SCHEMA_VERSION,
                "batch jobs live in PostgreSQL"
            );
            AnyJobStore::Postgres(pg)
        }
    };
    // What the fast path tells the job runner about this node's cores (crate::pressure).
    let pressure = crate::pressure::PressureFeed::new();
    let (jobs, job_events) = Jobs::start(
        &config.jobs,
        job_store,
        &config.storage.data_dir,
        capacity,
        batch_inference,
        telemetry.clone(),
        node_registry
            .as_ref()
            .map(|_| veraltheim_slowpath::runner::ClusterSelf {
                node: node_id.to_string(),
                incarnation: incarnation.clone(),
            }),
        // Local GPU jobs hold their memory in the models' allocator.
        Some(Arc::new(crate::gpujobs::ManagerGpus::new(models.clone()))),
        pressure.subscribe(),
    )
    .await
    .context("cannot start the job runner")?;
    let jobs = Arc::new(jobs);
    let cluster = crate::cluster::Cluster::new(crate::cluster::ClusterParts {
        id: node_id.to_string(),
        address: advertised,
        labels: config.cluster.label_map(),
        lease: Duration::from_secs(config.cluster.lease_seconds),
        incarnation,
        nodes: node_registry,
        leader: leader_row,
        jobs: jobs.clone(),
        models: models.clone(),
        devices: devices.clone(),
    });
    // Registered before the tree starts: a node id held by a live node fails the start, and
    // the drain flag it kept applies before the runner admits anything.
    cluster
        .register()
        .await
        .context("cannot register in the node registry")?;
    let (audit, audit_log) = crate::audit::Audit::new(
        store.clone(),
        bus.clone(),
        config.server.audit_retention_days,
    );
    let gate = |protocol| {
        Arc::new(crate::auth::Gate {
            auth: auth.clone(),
            audit: audit.clone(),
            metrics_public: config.server.metrics_public,
            protocol,
        })
    };
    let (grpc_gate, http_gate) = (
        gate(crate::auth::Protocol::Grpc),
        gate(crate::auth::Protocol::Http),
    );
    let mut ctx = Context::new(
        inference,
        bus.clone(),
        devices.clone(),
        config.models.enable_fault_injection,
        crate::shm::SharedMemory::new(config.server.allow_client_shm),
    );
    ctx.limits = config.limits.api();
    ctx.audit = Some(audit);
    ctx.max_body_bytes = config.server.max_message_bytes;
    ctx.telemetry = telemetry.clone();
    ctx.jobs = Some(jobs.clone() as Arc<dyn crate::context::JobCounts>);
    ctx.bridge = nats_bridge.clone();
    let ctx = Arc::new(ctx);

    let grpc_addr = config.server.grpc_addr;
    let http_addr = config.server.http_addr;
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let grpc = server_worker(bind(grpc_addr, "gRPC")?, tls.clone(), {
        let (ctx, jobs, config, cluster) =
            (ctx.clone(), jobs.clone(), config.clone(), cluster.clone());
        move |child: &ChildContext| {
            grpc_router(&ctx, &jobs, &config, child.root(), &grpc_gate, &cluster)
        }
    });
    let http = server_worker(bind(http_addr, "HTTP")?, tls.clone(), {
        let (ctx, jobs) = (ctx.clone(), JobsApi::new(jobs.clone()));
        // Built at each (re)start, like gRPC's: the status page reads the tree it runs in.
        move |child: &ChildContext| {
            let page = crate::page::PageState {
                ctx: ctx.clone(),
                jobs: jobs.clone(),
                tree: child.root().clone(),
            };
            crate::http::router(ctx.clone(), page, http_gate.clone())
        }
    });
    let bus_for_auth = bus.clone();
    let objectives = crate::objectives::watcher(
        models.clone(),
        bus.clone(),
        // The job side follows it (issue 17, item 3): local command jobs pause while any
        // objective is at risk (crate::pressure).
        Arc::new({
            let pressure = pressure.clone();
            move |model: &str, why: Option<String>, gpus: Vec<u32>| {
                match &why {
                    Some(why) => tracing::info!(model, %why, "latency objective at risk"),
                    None => tracing::info!(model, "latency objective kept again"),
                }
                pressure.set_at_risk(model, why, &gpus);
            }
        }),
    );
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
        audit_log: audit_log.worker(),
        node_registry: cluster.worker(),
        pressure: pressure.worker(),
        auth_file: auth
            .enabled()
            .then(|| auth.clone().worker(bus_for_auth.clone())),
        nats_bridge,
        objectives,
        shutdown_grace: grace,
    })
    .await
    .context("the supervision tree did not start")?;
    let _ = ctx.tree.set(root.clone());
    let tls_mode = match &tls {
        None => "off",
        Some(tls) if tls.mutual() => "mutual",
        Some(_) => "on",
    };
    tracing::info!(
        %grpc_addr,
        %http_addr,
        tls = tls_mode,
        authentication = auth.enabled(),
        execution_threads = threads,
        "serving"
    );

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
    if let Some(t) = telemetry {
        // The spans still queued go out (bounded); exporting blocks, so off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || t.shutdown(TRACES_FLUSH)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: &str, message: &str) -> http::Response<()> {
        let mut r = http::Response::new(());
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_str(code).unwrap());
        r.headers_mut()
            .insert("grpc-message", HeaderValue::from_str(message).unwrap());
        r
    }

    fn code_after(code: &str, message: &str) -> String {
        let r = client_errors_get_their_codes(refusal(code, message));
        r.headers()["grpc-status"].to_str().unwrap().to_string()
    }

    #[test]
    fn decode_and_size_refusals_get_the_callers_codes() {
        assert_eq!(
            code_after(
                "13",
                "failed%20to%20decode%20Protobuf%20message:%20invalid%20varint"
            ),
            "3"
        );
        assert_eq!(
            code_after("11", "decoded%20message%20length%20too%20large"),
            "8"
        );
        // Any other INTERNAL is the server's own failure and stays INTERNAL.
        assert_eq!(code_after("13", "model%20'x'%20failed"), "13");
        assert_eq!(code_after("11", "something%20else"), "11");
        // The same for a request stream's refusal.
        let s = crate::context::as_client_error(tonic::Status::internal(
            "failed to decode Protobuf message: invalid varint",
        ));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s = crate::context::as_client_error(tonic::Status::internal("model 'x' failed"));
        assert_eq!(s.code(), tonic::Code::Internal);
    }

    #[test]
    fn long_status_messages_are_cut_at_a_whole_escape() {
        let long = "x%20".repeat(5000);
        let r = client_errors_get_their_codes(refusal("5", &long));
        let m = r.headers()["grpc-message"].to_str().unwrap();
        assert!(
            m.len() < 4200 && m.ends_with("%20[...%20cut]"),
            "{}",
            m.len()
        );
        let body = m.trim_end_matches("%20[...%20cut]");
        assert!(
            !body.ends_with('%') && !body[..body.len() - 1].ends_with('%'),
            "{body}"
        );
        // Short ones are left alone.
        let r = client_errors_get_their_codes(refusal("5", "unknown%20model%20'x'"));
        assert_eq!(r.headers()["grpc-message"], "unknown%20model%20'x'");
    }
}
