//! Per-client rate limiting of the gRPC API: a token bucket (governor's GCRA) per client. With
//! authentication on, a client is its authenticated tenant (every principal of a tenant shares
//! its bucket, wherever it calls from); without, its peer IP address — something it cannot
//! choose per request. A metadata value such as an `x-veraltheim-tenant` header is never the
//! key: it can be fresh on every call, which gave every request a full bucket. Excess requests
//! get RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms` saying when a token comes back. Health
//! RPCs are exempt, so probes keep working under load.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Keys remembered before the limiter forgets the idle ones (bounded memory under many clients).
const MAX_TRACKED_CLIENTS: usize = 10_000;

pub struct ClientLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    per_second: u32,
}

impl ClientLimiter {
    /// `None` when no rate is set (no limit); an unset burst is one second's worth.
    pub fn new(per_second: Option<u32>, burst: Option<u32>) -> Option<Arc<Self>> {
        let rate = NonZeroU32::new(per_second?)?;
        let burst = burst.and_then(NonZeroU32::new).unwrap_or(rate);
        Some(Arc::new(ClientLimiter {
            limiter: RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
            per_second: rate.get(),
        }))
    }

    /// `Err(wait)` when the client must wait.
    pub fn check(&self, client: &str) -> Result<(), std::time::Duration> {
        if self.limiter.len() > MAX_TRACKED_CLIENTS {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&client.to_string())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

fn exempt(path: &str) -> bool {
    ["/ServerLive", "/ServerReady", "/Health"]
        .iter()
        .any(|rpc| path.ends_with(rpc))
}

/// The bucket's key: `tenant <name>` for an authenticated caller (the authentication layer runs
/// first), else the peer's IP address ("unknown" without one).
fn client_of(request: &Request) -> String {
    if let Some(tenant) =
        crate::auth::Caller::from_extensions(request.extensions()).and_then(|c| c.tenant())
    {
        return format!("tenant {tenant}");
    }
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string())
}

pub async fn limit(
    State(limiter): State<Arc<ClientLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    if exempt(request.uri().path()) {
        return next.run(request).await;
    }
    let client = client_of(&request);
    match limiter.check(&client) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let ms = wait.as_millis().max(1);
            let mut status = tonic::Status::resource_exhausted(format!(
                "rate limit of {} requests/s for client '{client}' exceeded; retry in {ms} ms",
                limiter.per_second
            ));
            if let Ok(v) = ms.to_string().parse() {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
            status.into_http()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rate_means_no_limiter() {
        assert!(ClientLimiter::new(None, Some(10)).is_none());
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let l = ClientLimiter::new(Some(1), Some(2)).unwrap();
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let wait = l.check("a").unwrap_err();
        assert!(wait > std::time::Duration::ZERO);
        assert!(
            l.check("b").is_ok(),
            "another client is not limited by a's use"
        );
    }

    /// The middleware in front of a stand-in service, with one request per second and no burst:
    /// a client's second call is refused.
    fn limited_router() -> axum::Router {
        let limiter = ClientLimiter::new(Some(1), Some(1)).unwrap();
        axum::Router::new()
            .route(
                "/inference.GRPCInferenceService/ModelInfer",
                axum::routing::post(|| async { "ok" }),
            )
            .route(
                "/inference.GRPCInferenceService/ServerLive",
                axum::routing::post(|| async { "ok" }),
            )
            .layer(axum::middleware::from_fn_with_state(limiter, limit))
    }

    /// Sends one call from `peer` (none: no connection info, as without
    /// `into_make_service_with_connect_info`) with a tenant header; `None` when it passed, else
    /// the refusal's gRPC status.
    async fn call(
        router: &axum::Router,
        path: &str,
        peer: Option<&str>,
        tenant: &str,
    ) -> Option<tonic::Status> {
        use tower::ServiceExt;
        let mut request = axum::http::Request::post(path)
            .header("x-tenant", tenant)
            .body(axum::body::Body::empty())
            .unwrap();
        if let Some(peer) = peer {
            let addr: SocketAddr = peer.parse().unwrap();
            request.extensions_mut().insert(ConnectInfo(addr));
        }
        let response = router.clone().oneshot(request).await.unwrap();
        tonic::Status::from_header_map(response.headers())
    }

    const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

    #[tokio::test]
    async fn without_a_peer_address_every_caller_shares_one_bucket() {
        let router = limited_router();
        assert!(call(&router, INFER, None, "a").await.is_none());
        // Another caller without an address (and with another tenant header) is the same
        // client, "unknown": its bucket is already empty.
        let refused = call(&router, INFER, None, "b")
            .await
            .expect("the second unaddressed call is refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("client 'unknown'"),
            "{}",
            refused.message()
        );
        assert!(
            refused.metadata().get("grpc-retry-pushback-ms").is_some(),
            "{refused:?}"
        );
        // Callers with an address have their own buckets, and health checks pass regardless.
        assert!(
            call(&router, INFER, Some("10.0.0.7:4000"), "b")
                .await
                .is_none()
        );
        let live = "/inference.GRPCInferenceService/ServerLive";
        assert!(call(&router, live, None, "c").await.is_none());
    }

    #[tokio::test]
    async fn the_client_is_its_peer_ip_not_its_port_nor_a_header() {
        let router = limited_router();
        assert!(
            call(&router, INFER, Some("10.0.0.1:1000"), "a")
                .await
                .is_none()
        );
        // A new connection (another port) with a fresh tenant header is still the same client.
        let refused = call(&router, INFER, Some("10.0.0.1:2000"), "fresh")
            .await
            .expect("same IP, same bucket");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("client '10.0.0.1'"),
            "{}",
            refused.message()
        );
        assert!(
            call(&router, INFER, Some("10.0.0.2:1000"), "a")
                .await
                .is_none()
        );
        assert!(
            call(&router, INFER, Some("[::1]:1000"), "a")
                .await
                .is_none()
        );
    }

    #[test]
    fn health_rpcs_are_exempt() {
        assert!(exempt("/inference.GRPCInferenceService/ServerReady"));
        assert!(exempt("/veraltheim.v1.SystemService/Health"));
        assert!(!exempt("/inference.GRPCInferenceService/ModelInfer"));
    }
}
