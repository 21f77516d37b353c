//! Every request of the Kubernetes client passes the circuit breaker: a tower layer at the top of
//! kube's service stack, so the watcher's own list and watch calls are guarded too, not only ours.
//!
//! A transport error or a 5xx answer counts as a failure; any other answer (4xx included: the
//! server is up and speaking) as a success. While the breaker is open no request leaves: the
//! call fails at once with [`BreakerOpen`], which kube hands back as `kube::Error::Service`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{BoxError, Layer, Service};
use veraltheim_supervisor::{BreakerError, CircuitBreaker};

/// The error of a request the breaker did not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker open for the Kubernetes API{}", retry_hint(*.retry_after))]
pub struct BreakerOpen {
    /// Until a probe may pass, when known.
    pub retry_after: Option<Duration>,
}

fn retry_hint(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("; next try in {} ms", d.as_millis()),
        None => "; a probe is in flight".to_owned(),
    }
}

/// The layer; cheap to clone (one breaker shared by every request).
#[derive(Clone)]
pub struct BreakerLayer {
    breaker: Arc<CircuitBreaker>,
}

impl BreakerLayer {
    pub fn new(breaker: Arc<CircuitBreaker>) -> Self {
        Self { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Arc<CircuitBreaker>,
}

/// A failed request, as the breaker sees it.
enum Failed<B> {
    /// A 5xx answer: passed on to kube, which turns it into its own error.
    Status(Response<B>),
    Transport(BoxError),
}

impl<S, ReqBody, B> Service<Request<ReqBody>> for BreakerService<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<B>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The inner future does nothing until polled, and it is polled only once the breaker
        // lets the call through.
        let fut = self.inner.call(req);
        let breaker = self.breaker.clone();
        Box::pin(async move {
            let result = breaker
                .call(|| async move {
                    match fut.await {
                        Ok(resp) if resp.status().is_server_error() => Err(Failed::Status(resp)),
                        Ok(resp) => Ok(resp),
                        Err(e) => Err(Failed::Transport(e.into())),
                    }
                })
                .await;
            match result {
                Ok(resp) | Err(BreakerError::Inner(Failed::Status(resp))) => Ok(resp),
                Err(BreakerError::Inner(Failed::Transport(e))) => Err(e),
                Err(BreakerError::Open { retry_after }) => Err(Box::new(BreakerOpen {
                    retry_after: Some(retry_after),
                }) as BoxError),
                Err(BreakerError::ProbeInFlight) => {
                    Err(Box::new(BreakerOpen { retry_after: None }) as BoxError)
                }
            }
        })
    }
}

/// The [`BreakerOpen`] inside a kube error, if that is what it is.
pub fn breaker_open(e: &kube::Error) -> Option<&BreakerOpen> {
    match e {
        kube::Error::Service(inner) => find::<BreakerOpen>(inner.as_ref()),
        _ => None,
    }
}

fn find<'a, T: std::error::Error + 'static>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    loop {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        e = e.source()?;
    }
}
