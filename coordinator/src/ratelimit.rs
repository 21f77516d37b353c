//! Per-client rate limiting of the gRPC API: a token bucket (governor's GCRA) per client, where a
//! client is its peer IP address — something it cannot choose per request. (A metadata value
//! such as a tenant header can be fresh on every call, which gave every request a full bucket;
//! the authenticated tenant takes the address's place once callers are authenticated.) Excess
//! requests get RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms` saying when a token comes back.
//! Health RPCs are exempt, so probes keep working under load.

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

pub async fn limit(
    State(limiter): State<Arc<ClientLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    if exempt(request.uri().path()) {
        return next.run(request).await;
    }
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string());
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

    #[test]
    fn health_rpcs_are_exempt() {
        assert!(exempt("/inference.GRPCInferenceService/ServerReady"));
        assert!(exempt("/veraltheim.v1.SystemService/Health"));
        assert!(!exempt("/inference.GRPCInferenceService/ModelInfer"));
    }
}
