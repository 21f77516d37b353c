//! The HTTP/REST APIs on the HTTP port: KServe v2 as Triton serves it over HTTP (`kserve.rs`,
//! the tensors of its JSON and binary forms in `tensors.rs`) and OpenAI-compatible embeddings
//! (`openai.rs`).
//!
//! Both reach the models the way gRPC does, through [`Context::infer_as`] (the one inference
//! edge), so validation, queues, batching, statistics and the response cache cannot differ
//! between protocols; a serving error becomes an HTTP status in one place,
//! [`crate::context::http_status`]. Request bodies are read up to `server.max_message_bytes`
//! (gRPC's bound too) and refused beyond it with 413 before more is read.
//!
//! The routes live in the HTTP server's one router (`http.rs` merges them), so whatever layers
//! wrap that router (authentication) cover them too.

mod kserve;
mod openai;
pub(crate) mod tensors;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use veraltheim_bus::{TraceParent, with_trace};

pub use crate::refusal::json_response;

use crate::context::{Context, http_status};

/// The REST routes, without state: the HTTP router supplies the [`Context`].
pub fn router() -> Router<Arc<Context>> {
    kserve::routes().merge(openai::routes())
}

/// A refusal over HTTP: a status and a message naming what is wrong. KServe routes answer it as
/// Triton does, `{"error": "..."}`; the OpenAI routes wrap it in OpenAI's error shape.
#[derive(Debug)]
pub struct RestError {
    pub status: StatusCode,
    pub message: String,
    /// A full queue: the client should retry after a short back-off (`Retry-After`).
    pub retry: bool,
    /// The gRPC code of the refusal this one stands for, when it came from one: the audit log
    /// records it, so that a call is audited alike over both protocols.
    pub code: Option<tonic::Code>,
}

impl RestError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        RestError {
            status,
            message: message.into(),
            retry: false,
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A serving error, with its status from the one mapping ([`http_status`]).
    pub fn serving(e: veraltheim_serving::Error) -> Self {
        RestError {
            status: http_status(e.kind()),
            retry: e.is_queue_full(),
            message: e.to_string(),
            code: None,
        }
    }

    /// The answer with `body` as its JSON.
    pub fn with_body(&self, body: serde_json::Value) -> Response {
        let mut r = json_response(self.status, &body);
        if self.retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        self.with_body(crate::refusal::kserve_body(&self.message))
    }
}

/// The router's fallback: no route has this path.
pub async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    crate::refusal::refusal(
        path,
        StatusCode::NOT_FOUND,
        format!("{method} {path}: no such route"),
    )
}

/// The router's fallback for a route that does not take this method.
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    crate::refusal::refusal(
        path,
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{path} does not take {method}"),
    )
}

/// The caller the authentication layer left on the request (`crate::auth`); a request that did
/// not pass it is refused (500), never served unguarded.
pub fn caller(
    found: Option<axum::Extension<crate::auth::Caller>>,
) -> Result<crate::auth::Caller, RestError> {
    found.map(|axum::Extension(c)| c).ok_or_else(|| {
        RestError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request did not pass the authentication layer",
        )
    })
}

/// A refusal of the caller (`Caller::model` and friends) as an HTTP error: 403, or 401.
pub fn refused(s: tonic::Status) -> RestError {
    let status = match s.code() {
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    RestError::new(status, s.message())
}

/// A shared-memory refusal (a tonic status from `shm.rs`) as an HTTP error, with Triton's
/// statuses: 404 for a region not registered, 400 for a bad request (Triton answers an existing
/// name with 400 too, and an object that shrank under its region is the request's fault), 403
/// when the server does not allow client shared memory.
pub fn shm_refusal(s: tonic::Status) -> RestError {
    let status = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument
        | tonic::Code::AlreadyExists
        | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    RestError {
        code: Some(s.code()),
        ..RestError::new(status, s.message())
    }
}

/// The result an HTTP answer is audited with: the gRPC code's name its status stands for.
pub fn audit_result(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "OK",
        400 | 413 | 415 | 422 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ALREADY_EXISTS",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// `value` as a JSON answer (200).
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Response {
    json_response(StatusCode::OK, value)
}

/// Reads a request body of at most `limit` bytes: a larger declared length is refused before
/// anything is read, a longer stream as soon as it passes the limit (413 either way). A
/// compressed body is refused (415): the server reads bodies as they are.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, RestError> {
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
        let encoding = encoding.to_str().unwrap_or("?").trim();
        if !encoding.eq_ignore_ascii_case("identity") {
            return Err(RestError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding '{encoding}' is not supported; send the body uncompressed"
                ),
            ));
        }
    }
    let too_large = |n: &str| {
        RestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is {n} bytes, more than server.max_message_bytes ({limit})"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large(&len.to_string()));
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            RestError::bad_request(format!("the request body could not be read: {e}"))
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large("more than that"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Parses a JSON body into `T`; an empty body is `T`'s default (Triton's repository calls take
/// an empty body as "no options").
pub fn json_body<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    what: &str,
) -> Result<T, RestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| RestError::bad_request(format!("{what}: the body is not valid: {e}")))
}

/// The caller's W3C trace context (its `traceparent` header), when it sent a valid one (an
/// invalid one is ignored, as W3C trace context asks).
pub fn traceparent(headers: &HeaderMap) -> Option<TraceParent> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceParent::parse(v).ok())
}

/// Runs `work` under the caller's W3C trace context (its `traceparent` header), so that the
/// events it causes (model state changes) carry their cause, as over gRPC.
pub async fn traced<F: Future>(headers: &HeaderMap, work: F) -> F::Output {
    match traceparent(headers) {
        Some(parent) => with_trace(parent, work).await,
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veraltheim_fastpath::InferError;

    async fn read(
        headers: &[(&str, &str)],
        body: &'static [u8],
        limit: usize,
    ) -> Result<Bytes, RestError> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        read_body(&h, Body::from(body), limit).await
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413_whether_declared_or_streamed() {
        assert_eq!(read(&[], b"12345", 5).await.unwrap(), "12345");
        let e = read(&[("content-length", "6")], b"123456", 5)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            e.message.contains("server.max_message_bytes (5)"),
            "{}",
            e.message
        );
        // No length declared (a chunked body): refused once it passes the limit.
        let e = read(&[], b"123456", 5).await.unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        let e = read(&[("content-encoding", "gzip")], b"x", 5)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(e.message.contains("gzip"), "{}", e.message);
        assert!(
            read(&[("content-encoding", "identity")], b"x", 5)
                .await
                .is_ok()
        );
    }

    #[test]
    fn serving_errors_keep_their_message_and_a_full_queue_asks_for_a_retry() {
        let e = RestError::serving(veraltheim_serving::Error::Infer(InferError::QueueFull {
            model: "m".into(),
            capacity: 2,
        }));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.retry);
        let r = e.into_response();
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let e = RestError::serving(veraltheim_serving::Error::NotFound("nope".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("'nope'"), "{}", e.message);
        assert!(!e.retry);
        let e = RestError::serving(veraltheim_serving::Error::NotFound(String::new()));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn an_empty_body_is_the_default() {
        #[derive(serde::Deserialize, Default, Debug, PartialEq)]
        struct T {
            ready: bool,
        }
        assert_eq!(json_body::<T>(b"  ", "x").unwrap(), T::default());
        assert_eq!(
            json_body::<T>(br#"{"ready":true}"#, "x").unwrap(),
            T { ready: true }
        );
        let e = json_body::<T>(b"{", "index").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.starts_with("index: "), "{}", e.message);
    }
}
