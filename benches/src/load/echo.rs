//! The gRPC ceiling: a bare tonic unary server for the KServe `ModelInfer` RPC that echoes each
//! request's inputs back as outputs — no queue, no model, no validation. It is served by tonic's
//! own transport server (the plain way to serve a tonic service; the coordinator serves through
//! hyper/axum instead, see docs/ARCHITECTURE.md) on its own tokio runtime and threads, so that it
//! competes with the load generator for the cores the way the coordinator process does.

use std::net::SocketAddr;
use std::thread::JoinHandle;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use veraltheim_proto::inference::{
    self as pb,
    grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer},
    model_infer_response::InferOutputTensor,
};

/// Largest message the echo server takes or sends (the coordinator's default).
const MAX_MESSAGE: usize = 64 << 20;

/// The echo service; every RPC but `ModelInfer` and the health checks is UNIMPLEMENTED.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

/// The echo of a request: each input as an output `OUTPUTi` with the same datatype, shape and
/// data (raw contents are passed through as the same `Bytes`, not copied).
pub fn echo_response(r: pb::ModelInferRequest) -> pb::ModelInferResponse {
    let outputs = r
        .inputs
        .into_iter()
        .enumerate()
        .map(|(i, t)| InferOutputTensor {
            name: format!("OUTPUT{i}"),
            datatype: t.datatype,
            shape: t.shape,
            parameters: Default::default(),
            contents: t.contents,
        })
        .collect();
    pb::ModelInferResponse {
        model_name: r.model_name,
        model_version: r.model_version,
        id: r.id,
        parameters: Default::default(),
        outputs,
        raw_output_contents: r.raw_input_contents,
    }
}

/// Emits the service impl: the hand-written methods given first, then every listed RPC as
/// UNIMPLEMENTED. (`async_trait` must see the methods already expanded, so the macro writes the
/// whole impl block.)
macro_rules! echo_service {
    ({ $($written:tt)* } $($name:ident($req:ident) -> $resp:ident;)*) => {
        #[tonic::async_trait]
        impl GrpcInferenceService for Echo {
            $($written)*
            $(
                async fn $name(
                    &self,
                    _: Request<pb::$req>,
                ) -> Result<Response<pb::$resp>, Status> {
                    Err(Status::unimplemented(concat!(
                        "the echo server answers ModelInfer only, not ",
                        stringify!($name)
                    )))
                }
            )*
        }
    };
}

echo_service! {
    {
        async fn model_infer(
            &self,
            request: Request<pb::ModelInferRequest>,
        ) -> Result<Response<pb::ModelInferResponse>, Status> {
            Ok(Response::new(echo_response(request.into_inner())))
        }

        async fn server_live(
            &self,
            _: Request<pb::ServerLiveRequest>,
        ) -> Result<Response<pb::ServerLiveResponse>, Status> {
            Ok(Response::new(pb::ServerLiveResponse { live: true }))
        }

        async fn server_ready(
            &self,
            _: Request<pb::ServerReadyRequest>,
        ) -> Result<Response<pb::ServerReadyResponse>, Status> {
            Ok(Response::new(pb::ServerReadyResponse { ready: true }))
        }

        async fn model_ready(
            &self,
            _: Request<pb::ModelReadyRequest>,
        ) -> Result<Response<pb::ModelReadyResponse>, Status> {
            Ok(Response::new(pb::ModelReadyResponse { ready: true }))
        }

        type ModelStreamInferStream =
            futures::stream::BoxStream<'static, Result<pb::ModelStreamInferResponse, Status>>;

        async fn model_stream_infer(
            &self,
            _: Request<Streaming<pb::ModelInferRequest>>,
        ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
            Err(Status::unimplemented(
                "the echo server answers ModelInfer only, not model_stream_infer",
            ))
        }
    }
    server_metadata(ServerMetadataRequest) -> ServerMetadataResponse;
    model_metadata(ModelMetadataRequest) -> ModelMetadataResponse;
    model_config(ModelConfigRequest) -> ModelConfigResponse;
    model_statistics(ModelStatisticsRequest) -> ModelStatisticsResponse;
    repository_index(RepositoryIndexRequest) -> RepositoryIndexResponse;
    repository_model_load(RepositoryModelLoadRequest) -> RepositoryModelLoadResponse;
    repository_model_unload(RepositoryModelUnloadRequest) -> RepositoryModelUnloadResponse;
    system_shared_memory_status(SystemSharedMemoryStatusRequest) -> SystemSharedMemoryStatusResponse;
    system_shared_memory_register(SystemSharedMemoryRegisterRequest) -> SystemSharedMemoryRegisterResponse;
    system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest) -> SystemSharedMemoryUnregisterResponse;
    cuda_shared_memory_status(CudaSharedMemoryStatusRequest) -> CudaSharedMemoryStatusResponse;
    cuda_shared_memory_register(CudaSharedMemoryRegisterRequest) -> CudaSharedMemoryRegisterResponse;
    cuda_shared_memory_unregister(CudaSharedMemoryUnregisterRequest) -> CudaSharedMemoryUnregisterResponse;
    trace_setting(TraceSettingRequest) -> TraceSettingResponse;
    log_settings(LogSettingsRequest) -> LogSettingsResponse;
}

/// A running echo server on 127.0.0.1; stopped (gracefully) when dropped.
pub struct EchoServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl EchoServer {
    /// Binds a free loopback port and serves on a new tokio runtime with `threads` workers
    /// (0 = one per core) on threads of its own.
    pub fn start(threads: usize) -> anyhow::Result<EchoServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("cannot bind a loopback port for the echo server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name("echo-server");
        if threads > 0 {
            builder.worker_threads(threads);
        }
        let runtime = builder
            .build()
            .context("cannot start the echo server's runtime")?;
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("echo-server-main".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                    Server::builder()
                        .tcp_nodelay(true)
                        .add_service(
                            GrpcInferenceServiceServer::new(Echo)
                                .max_decoding_message_size(MAX_MESSAGE)
                                .max_encoding_message_size(MAX_MESSAGE),
                        )
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = rx.await;
                        })
                        .await?;
                    Ok(())
                })
            })?;
        Ok(EchoServer {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets in-flight calls finish, and joins the server's thread.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the echo server's thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use veraltheim_proto::inference::model_infer_request::InferInputTensor;

    #[test]
    fn echo_passes_tensors_through() {
        let raw = Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let r = pb::ModelInferRequest {
            model_name: "identity".into(),
            id: "7".into(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![raw.clone()],
            ..Default::default()
        };
        let out = echo_response(r);
        assert_eq!(out.model_name, "identity");
        assert_eq!(out.id, "7");
        assert_eq!(out.outputs.len(), 1);
        assert_eq!(out.outputs[0].name, "OUTPUT0");
        assert_eq!(out.outputs[0].datatype, "FP32");
        assert_eq!(out.outputs[0].shape, vec![1, 2]);
        assert_eq!(out.raw_output_contents, vec![raw.clone()]);
        // The same buffer, not a copy.
        assert_eq!(out.raw_output_contents[0].as_ptr(), raw.as_ptr());
    }
}
