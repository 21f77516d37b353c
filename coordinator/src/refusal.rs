//! The JSON bodies of HTTP refusals, in one place: Triton's `{"error": "..."}` for KServe and
//! everything else, OpenAI's `{"error": {"message", "type", "param", "code"}}` under `/v1/`.
//! The REST handlers' errors (`rest::RestError`) and the answers made before any handler runs
//! (the authentication layer, the router's fallbacks: [`refusal`]) use them; this module knows
//! nothing of either, so the authentication layer does not depend on the REST handlers.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// `value` as a JSON answer with `status`.
pub fn json_response<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    match serde_json::to_vec(value) {
        Ok(body) => (status, content_type, body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            content_type,
            json!({ "error": format!("the answer cannot be written as JSON: {e}") }).to_string(),
        )
            .into_response(),
    }
}

/// Triton's error body.
pub fn kserve_body(message: &str) -> Value {
    json!({ "error": message })
}

/// OpenAI's error body; its `type` follows the status (a fault of the server or of the request).
pub fn openai_body(
    message: &str,
    status: StatusCode,
    param: Option<&str>,
    code: Option<&str>,
) -> Value {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
        }
    })
}

/// A refusal made outside a handler (authentication, no such route, a method the route does not
/// take): OpenAI's shape under `/v1/`, Triton's everywhere else.
pub fn refusal(path: &str, status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    let body = if path.starts_with("/v1/") {
        openai_body(&message, status, None, None)
    } else {
        kserve_body(&message)
    };
    json_response(status, &body)
}
