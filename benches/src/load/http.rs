//! KServe v2 inference over HTTP/1.1 for the load generator (`--protocol http|http-binary`):
//! the same `ModelInferRequest` the gRPC loops send, written as Triton's REST body — JSON
//! tensors (what curl and most languages send) or the binary-data extension (what
//! `tritonclient.http` sends with `binary_data=True`: a JSON header, then the raw tensor bytes,
//! `Inference-Header-Content-Length` saying where the header ends, and binary outputs).
//!
//! One keep-alive HTTP/1.1 connection per closed-loop client (HTTP/1.1 has one request in flight
//! per connection, as `tritonclient.http`'s pool does), with hyper's client connection: a
//! connection that fails is opened again on the next request.

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use veraltheim_proto::inference as pb;

use super::report::{BAD_RESPONSE, CLIENT_TIMEOUT};

/// How requests travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// KServe `ModelInfer` over gRPC (HTTP/2), as `tritonclient.grpc` sends it.
    Grpc,
    /// KServe over HTTP/1.1 with JSON tensors.
    Http,
    /// KServe over HTTP/1.1 with the binary-data extension, inputs and outputs.
    HttpBinary,
}

/// One request as bytes on the wire: path, body, and the header length of a binary body.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub path: String,
    pub body: Bytes,
    pub header_length: Option<usize>,
}

/// The REST form of `request` (inputs given as `raw_input_contents`, FP32 or BYTES, as the
/// load generator builds them).
pub fn http_request(request: &pb::ModelInferRequest, binary: bool) -> anyhow::Result<HttpRequest> {
    anyhow::ensure!(
        request.inputs.len() == request.raw_input_contents.len(),
        "every input needs raw contents"
    );
    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut raw = Vec::new();
    for (input, bytes) in request.inputs.iter().zip(&request.raw_input_contents) {
        let mut tensor = json!({
            "name": input.name,
            "shape": input.shape,
            "datatype": input.datatype,
        });
        if binary {
            tensor["parameters"] = json!({"binary_data_size": bytes.len()});
            raw.extend_from_slice(bytes);
        } else {
            tensor["data"] = json_data(&input.datatype, bytes)
                .with_context(|| format!("input {}", input.name))?;
        }
        inputs.push(tensor);
    }
    let mut head = json!({"inputs": inputs});
    if binary {
        head["parameters"] = json!({"binary_data_output": true});
    }
    let head = serde_json::to_vec(&head)?;
    let header_length = binary.then_some(head.len());
    let mut body = head;
    body.extend_from_slice(&raw);
    Ok(HttpRequest {
        path: format!("/v2/models/{}/infer", request.model_name),
        body: Bytes::from(body),
        header_length,
    })
}

/// Raw little-endian contents as a JSON `data` array.
fn json_data(datatype: &str, bytes: &[u8]) -> anyhow::Result<Value> {
    match datatype {
        "FP32" => Ok(Value::from(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect::<Vec<f64>>(),
        )),
        "BYTES" => {
            // Each element: a 4-byte little-endian length, then the bytes.
            let mut out = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                anyhow::ensure!(rest.len() >= 4, "a BYTES element is cut short");
                let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                anyhow::ensure!(rest.len() >= 4 + n, "a BYTES element is cut short");
                out.push(Value::from(
                    String::from_utf8_lossy(&rest[4..4 + n]).into_owned(),
                ));
                rest = &rest[4 + n..];
            }
            Ok(Value::from(out))
        }
        other => anyhow::bail!("the HTTP load sends FP32 or BYTES, not {other}"),
    }
}

/// One HTTP/1.1 connection to the server, opened again after a failure.
pub struct HttpClient {
    addr: String,
    authorization: Option<String>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    /// `addr` is HOST:PORT (plain HTTP; the load generator's TLS options are gRPC's).
    pub fn new(addr: &str, token: Option<&str>) -> Self {
        HttpClient {
            addr: addr
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            authorization: token.map(|t| format!("Bearer {t}")),
            sender: None,
        }
    }

    async fn open(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("cannot connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Checks that the server can be reached (before a run starts).
    pub async fn connect(&mut self) -> anyhow::Result<()> {
        self.sender = Some(self.open().await?);
        Ok(())
    }

    /// One call; `Err` names the failure as the report counts it.
    pub async fn call(&mut self, r: &HttpRequest, timeout: Duration) -> Result<(), &'static str> {
        match tokio::time::timeout(timeout, self.send(r)).await {
            Err(_) => {
                // The answer may still come on this connection: never reuse it.
                self.sender = None;
                Err(CLIENT_TIMEOUT)
            }
            Ok(outcome) => outcome,
        }
    }

    async fn send(&mut self, r: &HttpRequest) -> Result<(), &'static str> {
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.open().await.map_err(|_| "CONNECT")?,
        };
        sender.ready().await.map_err(|_| "CONNECT")?;
        let mut request = hyper::Request::post(r.path.as_str())
            .header(hyper::header::HOST, self.addr.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(n) = r.header_length {
            request = request
                .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
                .header("inference-header-content-length", n);
        }
        if let Some(auth) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, auth.as_str());
        }
        let request = request
            .body(Full::new(r.body.clone()))
            .map_err(|_| BAD_RESPONSE)?;
        let response = sender.send_request(request).await.map_err(|_| "HTTP")?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| "HTTP")?
            .to_bytes();
        self.sender = Some(sender);
        if !status.is_success() {
            return Err(http_code_name(status.as_u16()));
        }
        if body.is_empty() {
            return Err(BAD_RESPONSE);
        }
        Ok(())
    }
}

/// The report's name of a refusal's HTTP status (the gRPC code Triton maps it from).
fn http_code_name(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        413 => "RESOURCE_EXHAUSTED",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "HTTP_ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::client::infer_request;

    #[test]
    fn json_body_holds_the_values() {
        let r = http_request(&infer_request("identity", &"1x3".parse().unwrap()), false).unwrap();
        assert_eq!(r.path, "/v2/models/identity/infer");
        assert_eq!(r.header_length, None);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["inputs"][0]["data"], json!([0.0, 1.0, 2.0]));
        assert_eq!(v["inputs"][0]["shape"], json!([1, 3]));
        assert_eq!(v["inputs"][0]["datatype"], "FP32");
    }

    #[test]
    fn binary_body_is_header_then_raw_bytes() {
        let grpc = infer_request("identity", &"1x3".parse().unwrap());
        let r = http_request(&grpc, true).unwrap();
        let n = r.header_length.unwrap();
        let head: Value = serde_json::from_slice(&r.body[..n]).unwrap();
        assert_eq!(head["inputs"][0]["parameters"]["binary_data_size"], 12);
        assert_eq!(head["parameters"]["binary_data_output"], true);
        assert_eq!(&r.body[n..], &grpc.raw_input_contents[0][..]);
    }

    #[test]
    fn bytes_become_strings() {
        let mut raw = Vec::new();
        for s in ["a b", "ccc"] {
            raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
            raw.extend_from_slice(s.as_bytes());
        }
        assert_eq!(json_data("BYTES", &raw).unwrap(), json!(["a b", "ccc"]));
        assert!(json_data("BYTES", &raw[..5]).is_err());
        assert!(json_data("INT8", &raw).is_err());
    }
}
