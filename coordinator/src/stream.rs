//! Bidirectional inference streams, shared by both APIs: each request on the stream is handled
//! concurrently and its response sent as soon as it is ready (so responses may come out of order
//! and carry the request's id).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// Requests of one stream that may be in flight at once; beyond it the server stops reading the
/// stream, which pushes back on the client through HTTP/2 flow control.
const STREAM_INFLIGHT_LIMIT: usize = 1024;

pub type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Serves `inbound` with `handle`, which turns one request into its in-band response (errors of
/// one request travel inside its response, so the stream stays open).
pub fn serve<Req, Resp, F, Fut>(mut inbound: Streaming<Req>, handle: F) -> StreamOf<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_INFLIGHT_LIMIT);
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(STREAM_INFLIGHT_LIMIT));
        loop {
            match inbound.message().await {
                Ok(Some(req)) => {
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        break;
                    };
                    let (tx, handle) = (tx.clone(), handle.clone());
                    tokio::spawn(async move {
                        let response = handle(req).await;
                        let _ = tx.send(Ok(response)).await;
                        drop(permit);
                    });
                }
                Ok(None) => break,
                Err(status) => {
                    let _ = tx.send(Err(crate::context::as_client_error(status))).await;
                    break;
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
