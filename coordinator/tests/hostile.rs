//! The hostile probe (issue 18): hostile input to every RPC, every HTTP route and every numeric
//! field of a model configuration, against the real binary running under an address-space limit
//! (RLIMIT_AS, what `prlimit --as` sets), so that a runaway allocation aborts the server and fails
//! the test instead of exhausting the machine.
//!
//! - **Every RPC** is enumerated from the compiled descriptors of both APIs
//!   (`veraltheim_proto::FILE_DESCRIPTOR_SET`): an RPC added later is probed without anyone
//!   remembering to. Each gets four messages built by reflection from its request type:
//!   undecodable bytes, the empty message, a *huge* one (long strings, long lists, maximal
//!   numbers, nested three deep) and an *extreme* one (minimal and maximal numbers, unknown enum
//!   values, path-traversal and NUL strings). The status of each is compared with the table
//!   [`EXPECTED`] — the documented answer, reviewed row by row — and after every call the process
//!   must be alive and still serve an inference.
//! - **Every HTTP route** gets the hostile requests a client can send over HTTP/1.1.
//! - **Every numeric field of `inference.ModelConfig`**, at any depth (enumerated from its
//!   descriptor), is set to the largest and the smallest value of its type in a load: the load
//!   is refused with INVALID_ARGUMENT, or it loads and the model answers within its deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;
use veraltheim_proto::v1::{self, model_service_client::ModelServiceClient};

mod common;

use common::raw::{Method, Raw, methods};
use common::{Server, channel, fp32, start_limited};

/// The server's address space: idle, it maps about 1.4 GiB of *virtual* memory (thread stacks,
/// allocator reservations, the executable; 47 MB resident); 3 GiB leaves room for every honest
/// request while a runaway one (the 250,000-topic watch took 2.6 GiB) hits the wall.
const ADDRESS_SPACE: u64 = 3 << 30;

/// Bytes that are not a protobuf message: field 1, length-delimited, with a length that runs
/// past the end.
const GARBAGE: &[u8] = b"\x0a\xff\xff\xff\x0f";

// ---------------------------------------------------------------------------------------------
// Raw gRPC calls

/// What a call came to: `OK` (a unary answer, or a stream's first message), `OPEN` (a stream
/// that has said nothing after a while, as a watch does), `END` (a stream closed without a
/// message), or the status code's name.
async fn call(ch: &Channel, method: &Method, payload: Bytes) -> String {
    let mut grpc = tonic::client::Grpc::new(ch.clone())
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    grpc.ready().await.expect("the server's channel is ready");
    let path: http::uri::PathAndQuery = method.path.parse().unwrap();
    let code = |s: tonic::Status| {
        if std::env::var_os("HOSTILE_VERBOSE").is_some() {
            eprintln!(
                "{} -> {:?}: {}",
                method.path,
                s.code(),
                s.message().chars().take(300).collect::<String>()
            );
        }
        format!("{:?}", s.code())
    };
    let first = |r: Result<Option<Bytes>, tonic::Status>| match r {
        Ok(Some(_)) => "OK".to_string(),
        Ok(None) => "END".to_string(),
        Err(s) => code(s),
    };
    let answer = async {
        if method.client_streaming {
            let requests = tokio_stream::iter(vec![payload]);
            match grpc
                .streaming(tonic::Request::new(requests), path, Raw)
                .await
            {
                Ok(r) => {
                    let mut stream = r.into_inner();
                    match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
                        Ok(r) => first(r),
                        Err(_) => "OPEN".to_string(),
                    }
                }
                Err(s) => code(s),
            }
        } else if method.server_streaming {
            match grpc
                .server_streaming(tonic::Request::new(payload), path, Raw)
                .await
            {
                Ok(r) => {
                    let mut stream = r.into_inner();
                    match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
                        Ok(r) => first(r),
                        Err(_) => "OPEN".to_string(),
                    }
                }
                Err(s) => code(s),
            }
        } else {
            match grpc.unary(tonic::Request::new(payload), path, Raw).await {
                Ok(_) => "OK".to_string(),
                Err(s) => code(s),
            }
        }
    };
    // A unary call, or a stream's head, that takes this long is hung.
    match tokio::time::timeout(Duration::from_secs(20), answer).await {
        Ok(outcome) => outcome,
        Err(_) => "HUNG".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile messages, built by reflection

#[derive(Clone, Copy, Debug)]
enum Style {
    /// Long strings and bytes, long lists and maps, maximal numbers.
    Huge {
        text: usize,
        list: usize,
        depth: usize,
    },
    /// One of everything: minimal numbers, unknown enum values, strings that are paths out of
    /// any folder and carry a NUL.
    Extreme,
}

const HOSTILE_TEXT: &str = "../../../../../../etc/passwd\0*?";

fn scalar(kind: &Kind, style: Style, i: usize) -> Option<Value> {
    let huge = matches!(style, Style::Huge { .. });
    Some(match kind {
        Kind::Double => Value::F64(if huge { f64::MAX } else { f64::NAN }),
        Kind::Float => Value::F32(if huge { f32::MAX } else { f32::NEG_INFINITY }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(if huge { i32::MAX } else { i32::MIN })
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(if huge { i64::MAX } else { i64::MIN })
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(u32::MAX),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(u64::MAX),
        Kind::Bool => Value::Bool(true),
        Kind::String => Value::String(match style {
            // Distinct strings, so that map keys and names do not collapse into one.
            Style::Huge { text, .. } => format!("{i:08}{}", "x".repeat(text)),
            Style::Extreme => HOSTILE_TEXT.to_string(),
        }),
        Kind::Bytes => Value::Bytes(match style {
            Style::Huge { text, .. } => Bytes::from(vec![0xff; text]),
            Style::Extreme => Bytes::from_static(&[0xff; 16]),
        }),
        Kind::Enum(_) => Value::EnumNumber(if huge { i32::MAX } else { 12345 }),
        Kind::Message(_) => return None,
    })
}

fn map_key(kind: &Kind, style: Style, i: usize) -> MapKey {
    match scalar(kind, style, i) {
        Some(Value::String(s)) => MapKey::String(s),
        Some(Value::I32(_)) => MapKey::I32(i as i32),
        Some(Value::I64(_)) => MapKey::I64(i as i64),
        Some(Value::U32(_)) => MapKey::U32(i as u32),
        Some(Value::U64(_)) => MapKey::U64(i as u64),
        Some(Value::Bool(b)) => MapKey::Bool(b),
        _ => MapKey::String(i.to_string()),
    }
}

/// Builds a message of `style`, spending at most about `budget` bytes on it (strings, bytes
/// and list elements are cut when it runs out), so that nesting cannot multiply it without bound.
fn fill(
    message: &MessageDescriptor,
    style: Style,
    depth: usize,
    budget: &mut usize,
) -> DynamicMessage {
    let (list, max_depth) = match style {
        Style::Huge { list, depth, .. } => (list, depth),
        Style::Extreme => (1, 3),
    };
    let mut out = DynamicMessage::new(message.clone());
    let mut oneofs_set = Vec::new();
    for field in message.fields() {
        if *budget == 0 {
            break;
        }
        // One member per oneof: setting another would only replace it.
        if let Some(oneof) = field.containing_oneof() {
            if oneofs_set.contains(&oneof.name().to_string()) {
                continue;
            }
            oneofs_set.push(oneof.name().to_string());
        }
        if let Some(v) = field_value(&field, style, depth, list, max_depth, budget) {
            out.set_field(&field, v);
        }
    }
    out
}

fn element(
    kind: &Kind,
    style: Style,
    depth: usize,
    max_depth: usize,
    i: usize,
    budget: &mut usize,
) -> Option<Value> {
    if *budget == 0 {
        return None;
    }
    let value = match kind {
        Kind::Message(m) if depth < max_depth => Value::Message(fill(m, style, depth + 1, budget)),
        Kind::Message(_) => return None,
        other => scalar(other, style, i)?,
    };
    let cost = match &value {
        Value::String(s) => s.len(),
        Value::Bytes(b) => b.len(),
        _ => 8,
    };
    *budget = budget.saturating_sub(cost);
    Some(value)
}

fn field_value(
    field: &FieldDescriptor,
    style: Style,
    depth: usize,
    list: usize,
    max_depth: usize,
    budget: &mut usize,
) -> Option<Value> {
    // Lists of messages shrink with depth, so that the budget is not all spent on the first.
    let items = |kind: &Kind| match kind {
        Kind::Message(_) => (list >> (4 * (depth + 1))).max(1),
        _ => list,
    };
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return None;
        };
        let key = entry.map_entry_key_field().kind();
        let value = entry.map_entry_value_field().kind();
        let mut map = std::collections::HashMap::new();
        for i in 0..items(&value) {
            match element(&value, style, depth, max_depth, i, budget) {
                Some(v) => {
                    let key = map_key(&key, style, i);
                    if let MapKey::String(k) = &key {
                        *budget = budget.saturating_sub(k.len());
                    }
                    map.insert(key, v)
                }
                None => break,
            };
        }
        return Some(Value::Map(map));
    }
    let kind = field.kind();
    if field.is_list() {
        let mut values = Vec::new();
        for i in 0..items(&kind) {
            match element(&kind, style, depth, max_depth, i, budget) {
                Some(v) => values.push(v),
                None => break,
            }
        }
        return Some(Value::List(values));
    }
    element(&kind, style, depth, max_depth, 0, budget)
}

/// The four hostile payloads of a request type, named.
fn payloads(input: &MessageDescriptor) -> Vec<(&'static str, Bytes)> {
    use prost::Message;
    // Huge, but under the smallest message limit of any service (4 MiB, the job and system
    // services), so that it reaches the handler.
    let huge = Style::Huge {
        text: 64 << 10,
        list: 4096,
        depth: 3,
    };
    let huge_bytes = fill(input, huge, 0, &mut (3 << 20)).encode_to_vec();
    assert!(
        huge_bytes.len() < 4 << 20,
        "{}: {} bytes",
        input.full_name(),
        huge_bytes.len()
    );
    vec![
        ("garbage", Bytes::from_static(GARBAGE)),
        ("empty", Bytes::new()),
        ("huge", Bytes::from(huge_bytes)),
        (
            "extreme",
            Bytes::from(fill(input, Style::Extreme, 0, &mut { usize::MAX }).encode_to_vec()),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The server stays whole

async fn assert_whole(server: &mut Server, ch: &Channel, after: &str) {
    if let Ok(Some(status)) = server.child.try_wait() {
        panic!("the server died after {after}: {status}");
    }
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        veraltheim_proto::v1::inference_service_client::InferenceServiceClient::new(ch.clone())
            .infer(v1::InferRequest {
                model: "identity".into(),
                inputs: vec![fp32("INPUT0", vec![1, 2], vec![1.0, 2.0])],
                ..Default::default()
            }),
    )
    .await;
    match answer {
        Ok(Ok(r)) => assert_eq!(r.into_inner().batch_size, 1, "after {after}"),
        Ok(Err(e)) => panic!("identity no longer answers after {after}: {e}"),
        Err(_) => panic!("identity hung after {after}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Every RPC

/// The answer each hostile message gets: (method, [garbage, empty, huge, extreme]), reviewed row
/// by row. The rules behind it:
/// - undecodable bytes are INVALID_ARGUMENT everywhere, streams included;
/// - an empty model name is INVALID_ARGUMENT; a name of nothing known is NOT_FOUND (its echo in
///   the message is cut, so that a 64 KiB name cannot make the status header unreadable);
/// - an empty request that means "all" answers OK (statistics, lists, status, an empty watch
///   stays OPEN); values out of their enum or over a `[limits]` bound are INVALID_ARGUMENT;
/// - streams answer per message in-band (OK), their errors inside the responses;
/// - log settings outside their values are INVALID_ARGUMENT, the empty update reads them (OK);
/// - client shared memory is off by default (PERMISSION_DENIED); CUDA shared memory is answered
///   as Triton answers it without a GPU (no region: the list is empty, a named one NOT_FOUND,
///   unregistering OK, registering INVALID_ARGUMENT); the trace settings are not offered
///   (UNIMPLEMENTED), KillChild is fault injection
///   (FAILED_PRECONDITION unless the server enables it); the audit log refuses a page token it
///   did not give out (INVALID_ARGUMENT); a node id that is empty, longer than a host name or
///   not made of a host name's characters is INVALID_ARGUMENT (so no probe drains the node).
const EXPECTED: &[(&str, [&str; 4])] = &[
    (
        "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
        [
            "InvalidArgument",
            "InvalidArgument",
            "InvalidArgument",
            "InvalidArgument",
        ],
    ),
    (
        "/inference.GRPCInferenceService/CudaSharedMemoryStatus",
        ["InvalidArgument", "OK", "NotFound", "NotFound"],
    ),
    (
        "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/inference.GRPCInferenceService/LogSettings",
        [
            "InvalidArgument",
            "OK",
            "InvalidArgument",
            "InvalidArgument",
        ],
    ),
    (
        "/inference.GRPCInferenceService/ModelConfig",
        ["InvalidArgument", "InvalidArgument", "NotFound", "NotFound"],
    ),
    (
        "/inference.GRPCInferenceService/ModelInfer",
        [
            "InvalidArgument",
            "InvalidArgument",
            "NotFound",
            "InvalidArgument",
        ],
    ),
    (
        "/inference.GRPCInferenceService/ModelMetadata",
        ["InvalidArgument", "InvalidArgument", "NotFound", "NotFound"],
    ),
    (
        "/inference.GRPCInferenceService/ModelReady",
        ["InvalidArgument", "InvalidArgument", "NotFound", "NotFound"],
    ),
    (
        "/inference.GRPCInferenceService/ModelStatistics",
        ["InvalidArgument", "OK", "NotFound", "NotFound"],
    ),
    (
        "/inference.GRPCInferenceService/ModelStreamInfer",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/inference.GRPCInferenceService/RepositoryIndex",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        ["InvalidArgument", "InvalidArgument", "NotFound", "NotFound"],
    ),
    (
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        ["InvalidArgument", "InvalidArgument", "NotFound", "NotFound"],
    ),
    (
        "/inference.GRPCInferenceService/ServerLive",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/inference.GRPCInferenceService/ServerMetadata",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/inference.GRPCInferenceService/ServerReady",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
        [
            "InvalidArgument",
            "PermissionDenied",
            "PermissionDenied",
            "PermissionDenied",
        ],
    ),
    (
        "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
        [
            "InvalidArgument",
            "PermissionDenied",
            "PermissionDenied",
            "PermissionDenied",
        ],
    ),
    (
        "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
        [
            "InvalidArgument",
            "PermissionDenied",
            "PermissionDenied",
            "PermissionDenied",
        ],
    ),
    (
        "/inference.GRPCInferenceService/TraceSetting",
        [
            "InvalidArgument",
            "Unimplemented",
            "Unimplemented",
            "Unimplemented",
        ],
    ),
    (
        "/veraltheim.v1.ClusterService/DrainNode",
        [
            "InvalidArgument",
            "InvalidArgument",
            "InvalidArgument",
            "InvalidArgument",
        ],
    ),
    (
        "/veraltheim.v1.ClusterService/ListNodes",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/veraltheim.v1.InferenceService/Infer",
        [
            "InvalidArgument",
            "InvalidArgument",
            "InvalidArgument",
            "InvalidArgument",
        ],
    ),
    (
        "/veraltheim.v1.InferenceService/InferStream",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/veraltheim.v1.JobService/CancelJob",
        ["InvalidArgument", "NotFound", "NotFound", "NotFound"],
    ),
    (
        "/veraltheim.v1.JobService/GetJob",
        ["InvalidArgument", "NotFound", "NotFound", "NotFound"],
    ),
    (
        "/veraltheim.v1.JobService/JobLogs",
        ["InvalidArgument", "NotFound", "NotFound", "NotFound"],
    ),
    (
        "/veraltheim.v1.JobService/ListJobs",
        [
            "InvalidArgument",
            "OK",
            "InvalidArgument",
            "InvalidArgument",
        ],
    ),
    (
        "/veraltheim.v1.JobService/SubmitJob",
        [
            "InvalidArgument",
            "InvalidArgument",
            "InvalidArgument",
            "InvalidArgument",
        ],
    ),
    (
        "/veraltheim.v1.JobService/WatchJob",
        ["InvalidArgument", "NotFound", "NotFound", "NotFound"],
    ),
    (
        "/veraltheim.v1.ModelService/GetModel",
        ["InvalidArgument", "InvalidArgument", "NotFound", "NotFound"],
    ),
    (
        "/veraltheim.v1.ModelService/GetModelMemory",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/veraltheim.v1.ModelService/GetModelStatistics",
        ["InvalidArgument", "OK", "NotFound", "NotFound"],
    ),
    (
        "/veraltheim.v1.ModelService/ListModels",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/veraltheim.v1.ModelService/LoadModel",
        ["InvalidArgument", "InvalidArgument", "NotFound", "NotFound"],
    ),
    (
        "/veraltheim.v1.ModelService/UnloadModel",
        ["InvalidArgument", "InvalidArgument", "NotFound", "NotFound"],
    ),
    (
        "/veraltheim.v1.ResourceService/GetResources",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/veraltheim.v1.ResourceService/WatchResources",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/veraltheim.v1.SystemService/GetStatus",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/veraltheim.v1.SystemService/Health",
        ["InvalidArgument", "OK", "OK", "OK"],
    ),
    (
        "/veraltheim.v1.SystemService/KillChild",
        [
            "InvalidArgument",
            "FailedPrecondition",
            "FailedPrecondition",
            "FailedPrecondition",
        ],
    ),
    (
        "/veraltheim.v1.SystemService/ListAuditEvents",
        [
            "InvalidArgument",
            "OK",
            "InvalidArgument",
            "InvalidArgument",
        ],
    ),
    (
        "/veraltheim.v1.SystemService/WatchEvents",
        [
            "InvalidArgument",
            "OPEN",
            "InvalidArgument",
            "InvalidArgument",
        ],
    ),
];

#[tokio::test]
async fn every_rpc_answers_hostile_messages_with_its_documented_status_and_stays_whole() {
    let mut server = start_limited(&[], ADDRESS_SPACE).await;
    let ch = channel(&server).await;
    let mut seen: BTreeMap<String, [String; 4]> = BTreeMap::new();
    for method in methods() {
        let mut row: [String; 4] = Default::default();
        for (i, (name, payload)) in payloads(&method.input).into_iter().enumerate() {
            row[i] = call(&ch, &method, payload).await;
            assert_whole(&mut server, &ch, &format!("{} {name}", method.path)).await;
        }
        seen.insert(method.path.clone(), row);
    }
    let expected: BTreeMap<String, [String; 4]> = EXPECTED
        .iter()
        .map(|(m, r)| (m.to_string(), r.map(String::from)))
        .collect();
    if seen != expected {
        let mut table = String::new();
        for (m, r) in &seen {
            table.push_str(&format!("    (\"{m}\", {r:?}),\n"));
        }
        let diff: Vec<String> = seen
            .iter()
            .filter(|(m, r)| expected.get(*m) != Some(r))
            .map(|(m, r)| format!("{m}: got {r:?}, expected {:?}", expected.get(m)))
            .chain(
                expected
                    .keys()
                    .filter(|m| !seen.contains_key(*m))
                    .map(|m| format!("{m}: expected but not among the descriptors")),
            )
            .collect();
        panic!(
            "hostile answers differ:\n{}\n\nwhat was seen, as a table:\n{table}",
            diff.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Every HTTP route

/// Sends raw bytes to the HTTP port and returns the status line's code (0 when the connection
/// closed without an answer).
async fn http_raw(addr: &str, request: &[u8]) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may refuse before it has read everything: a write error is an answer too.
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the HTTP server hung on {:?}",
        &request[..request.len().min(80)]
    );
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// One HTTP route: its method, a path that exists, a body it takes, and what that plain request
/// answers on the probe's server (built-in models only, so the embeddings route refuses the
/// `identity` model with 400 and has no model to retrieve).
struct Route {
    method: &'static str,
    path: &'static str,
    body: &'static str,
    status: u16,
}

const fn get(path: &'static str) -> Route {
    Route {
        method: "GET",
        path,
        body: "",
        status: 200,
    }
}

const fn post(path: &'static str, body: &'static str, status: u16) -> Route {
    Route {
        method: "POST",
        path,
        body,
        status,
    }
}

const IDENTITY_JSON: &str =
    r#"{"inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#;

/// The HTTP routes (coordinator/src/http.rs, coordinator/src/rest/ and coordinator/src/page/);
/// a route added there is added here.
const ROUTES: &[Route] = &[
    get("/v2/health/live"),
    get("/v2/health/ready"),
    get("/live"),
    get("/ready"),
    get("/metrics"),
    // KServe v2 over REST.
    get("/v2"),
    get("/v2/models/stats"),
    get("/v2/models/identity"),
    get("/v2/models/identity/versions/1"),
    get("/v2/models/identity/ready"),
    get("/v2/models/identity/versions/1/ready"),
    get("/v2/models/identity/config"),
    get("/v2/models/identity/versions/1/config"),
    get("/v2/models/identity/stats"),
    get("/v2/models/identity/versions/1/stats"),
    post("/v2/models/identity/infer", IDENTITY_JSON, 200),
    post("/v2/models/identity/versions/1/infer", IDENTITY_JSON, 200),
    post("/v2/repository/index", "", 200),
    post(
        "/v2/repository/models/cost/load",
        r#"{"parameters":{"config":"{\"max_batch_size\":4}"}}"#,
        200,
    ),
    post("/v2/repository/models/cost/unload", "", 200),
    // System shared memory: off on the probe's server (no --allow-client-shm), so 403 once the
    // body is read and found well-formed.
    Route {
        method: "GET",
        path: "/v2/systemsharedmemory/status",
        body: "",
        status: 403,
    },
    Route {
        method: "GET",
        path: "/v2/systemsharedmemory/region/r/status",
        body: "",
        status: 403,
    },
    post(
        "/v2/systemsharedmemory/region/r/register",
        r#"{"key":"/veraltheim-probe","offset":0,"byte_size":64}"#,
        403,
    ),
    post("/v2/systemsharedmemory/unregister", "", 403),
    post("/v2/systemsharedmemory/region/r/unregister", "", 403),
    // CUDA shared memory (none: registering is refused).
    get("/v2/cudasharedmemory/status"),
    Route {
        method: "GET",
        path: "/v2/cudasharedmemory/region/r/status",
        body: "",
        status: 404,
    },
    post(
        "/v2/cudasharedmemory/region/r/register",
        r#"{"raw_handle":{"b64":"AAAA"},"device_id":0,"byte_size":64}"#,
        400,
    ),
    post("/v2/cudasharedmemory/unregister", "", 200),
    post("/v2/cudasharedmemory/region/r/unregister", "", 200),
    // OpenAI embeddings.
    post("/v1/embeddings", r#"{"model":"identity","input":"x"}"#, 400),
    get("/v1/models"),
    // The status page (coordinator/src/page/): its files and its data.
    get("/"),
    get("/page/app.js"),
    get("/page/style.css"),
    get("/api/status"),
    get("/api/jobs"),
    Route {
        method: "GET",
        path: "/api/jobs/00000000000000000000/logs",
        body: "",
        status: 404,
    },
];

/// The largest body the probe's server reads (`--max-message-bytes`).
const HTTP_BODY_LIMIT: usize = 1 << 20;

/// A request with `body` (and `Content-Length`) and `headers`.
fn request(method: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Hostile bodies for a route that reads one: (case, request, expected status).
fn hostile_bodies(route: &Route) -> Vec<(String, Vec<u8>, u16)> {
    let (m, p) = (route.method, route.path);
    let mut chunked = format!(
        "{m} {p} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..(2 * HTTP_BODY_LIMIT / 4096) {
        chunked.extend_from_slice(format!("1000\r\n{}\r\n", "z".repeat(4096)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut cases = vec![
        // Over the body limit, declared: refused before it is read.
        (
            "body over the limit".into(),
            request(m, p, "", &vec![b'{'; 2 * HTTP_BODY_LIMIT]),
            413,
        ),
        // Over the body limit, chunked (no length given): refused once past it.
        ("chunked body over the limit".into(), chunked, 413),
        ("not JSON".into(), request(m, p, "", b"{\"a\": [1, 2"), 400),
        // Nesting deeper than the JSON parser follows.
        (
            "JSON nested 100,000 deep".into(),
            request(m, p, "", "[".repeat(100_000).as_bytes()),
            400,
        ),
        (
            "JSON of the wrong shape".into(),
            request(
                m,
                p,
                "",
                br#"{"inputs":"x","model":5,"parameters":7,"ready":"y"}"#,
            ),
            400,
        ),
        (
            "compressed body".into(),
            request(m, p, "Content-Encoding: gzip\r\n", b"\x1f\x8b"),
            415,
        ),
    ];
    if p.ends_with("/infer") {
        let huge_shape = br#"{"inputs":[{"name":"INPUT0","shape":[4611686018427387904,4611686018427387904],"datatype":"FP32","parameters":{"binary_data_size":0}}]}"#;
        let huge_binary = br#"{"inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":18446744073709551615}}]}"#;
        // About 900 KB of JSON zeros in one tensor: within the limit, answered.
        let n = 400_000;
        let big = format!(
            r#"{{"inputs":[{{"name":"INPUT0","shape":[1,{n}],"datatype":"FP32","data":[{}0]}}],"outputs":[{{"name":"OUTPUT0","parameters":{{"binary_data":true}}}}]}}"#,
            "0,".repeat(n - 1)
        );
        cases.extend([
            (
                "header length past the body".into(),
                request(m, p, "Inference-Header-Content-Length: 99999\r\n", b"{}"),
                400,
            ),
            (
                "header length not a number".into(),
                request(m, p, "Inference-Header-Content-Length: -1\r\n", b"{}"),
                400,
            ),
            (
                "shape of 2^124 elements".into(),
                request(m, p, "", huge_shape),
                400,
            ),
            (
                "binary_data_size of 2^64 - 1".into(),
                request(
                    m,
                    p,
                    &format!("Inference-Header-Content-Length: {}\r\n", huge_binary.len()),
                    huge_binary,
                ),
                400,
            ),
            (
                "400,000 JSON values".into(),
                request(m, p, "", big.as_bytes()),
                200,
            ),
        ]);
    }
    cases
}

#[tokio::test]
async fn every_http_route_answers_hostile_requests_and_stays_whole() {
    let limit = HTTP_BODY_LIMIT.to_string();
    let mut server = start_limited(&["--max-message-bytes", &limit], ADDRESS_SPACE).await;
    let ch = channel(&server).await;
    let addr = server.http.clone();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for route in ROUTES {
        let (method, path) = (route.method, route.path);
        // Each route answers its plain request (the server is ready).
        let plain = request(method, path, "", route.body.as_bytes());
        assert_eq!(
            http_raw(&addr, &plain).await,
            route.status,
            "{method} {path}"
        );
        let long_query = format!("{path}?{}", "a=b&".repeat(16 << 10));
        let other = if method == "GET" { "POST" } else { "PUT" };
        let mut cases: Vec<(String, Vec<u8>, u16)> = vec![
            // A 64 KiB query string: URI too long.
            ("long query".into(), get(&long_query).into_bytes(), 414),
            // A method the route does not take.
            (
                format!("{other} with a body"),
                request(other, path, "", "x".repeat(1 << 20).as_bytes()),
                405,
            ),
            // A header larger than the server reads.
            (
                "1 MiB header".into(),
                format!(
                    "{method} {path} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
                    "y".repeat(1 << 20)
                )
                .into_bytes(),
                431,
            ),
            // A request line that is not HTTP.
            (
                "bad request line".into(),
                format!("{method} {path}\0 HTTP/9.9\r\n\r\n").into_bytes(),
                400,
            ),
            // A path out of the tree.
            (
                "traversal".into(),
                get(&format!("{path}/../../../../etc/passwd")).into_bytes(),
                404,
            ),
        ];
        if method == "POST" {
            cases.extend(hostile_bodies(route));
        }
        for (name, request, want) in cases {
            let got = http_raw(&addr, &request).await;
            assert_eq!(got, want, "{method} {path} {name}");
            assert_whole(&mut server, &ch, &format!("HTTP {method} {path} {name}")).await;
        }
    }
    // Many connections that send nothing hold no request slot: a real request still answers.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    assert_eq!(http_raw(&addr, get("/ready").as_bytes()).await, 200);
    drop(idle);
    assert_whole(&mut server, &ch, "200 idle HTTP connections").await;
}

// ---------------------------------------------------------------------------------------------
// Every numeric field of a model configuration

/// A numeric field of `inference.ModelConfig`, by its path of field names.
struct NumericField {
    path: Vec<FieldDescriptor>,
}

/// Every numeric field reachable from `message`, at most `depth` messages down, not through a
/// message type already on the path (the schema has no cycle today; this keeps it finite if one
/// appears).
fn numeric_fields(
    message: &MessageDescriptor,
    depth: usize,
    on_path: &mut Vec<String>,
) -> Vec<NumericField> {
    let mut out = Vec::new();
    on_path.push(message.full_name().to_string());
    for field in message.fields() {
        let kind = if field.is_map() {
            match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                _ => continue,
            }
        } else {
            field.kind()
        };
        match kind {
            Kind::Message(inner) => {
                if depth == 0 || on_path.contains(&inner.full_name().to_string()) {
                    continue;
                }
                for mut sub in numeric_fields(&inner, depth - 1, on_path) {
                    sub.path.insert(0, field.clone());
                    out.push(sub);
                }
            }
            Kind::Int32
            | Kind::Int64
            | Kind::Uint32
            | Kind::Uint64
            | Kind::Sint32
            | Kind::Sint64
            | Kind::Fixed32
            | Kind::Fixed64
            | Kind::Sfixed32
            | Kind::Sfixed64
            | Kind::Float
            | Kind::Double => out.push(NumericField {
                path: vec![field.clone()],
            }),
            _ => {}
        }
    }
    on_path.pop();
    out
}

/// The JSON value of a numeric leaf: the extremes of its type, as protobuf's JSON mapping
/// writes them (64-bit integers as strings).
fn extremes(kind: &Kind) -> Vec<serde_json::Value> {
    use serde_json::json;
    match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            vec![json!(i32::MAX), json!(i32::MIN), json!(-1)]
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => vec![
            json!(i64::MAX.to_string()),
            json!(i64::MIN.to_string()),
            json!(-1),
        ],
        Kind::Uint32 | Kind::Fixed32 => vec![json!(u32::MAX)],
        Kind::Uint64 | Kind::Fixed64 => vec![json!(u64::MAX.to_string())],
        Kind::Float => vec![json!(f32::MAX), json!(-1.0)],
        Kind::Double => vec![json!(f64::MAX), json!(-1.0)],
        _ => vec![],
    }
}

/// The override that sets `field` to `value`, with the fields above it as one-element lists and
/// one-entry maps (a warm-up's inputs are keyed by the model's input name).
fn override_json(field: &NumericField, value: serde_json::Value) -> serde_json::Value {
    let mut v = value;
    for (i, f) in field.path.iter().enumerate().rev() {
        let leaf = i + 1 == field.path.len();
        if leaf && f.is_list() {
            v = serde_json::Value::Array(vec![v]);
        }
        if !leaf {
            if f.is_map() {
                let key = if f.name() == "inputs" { "INPUT0" } else { "1" };
                v = serde_json::json!({ key: v });
            } else if f.is_list() {
                v = serde_json::Value::Array(vec![v]);
            }
        }
        if leaf && f.is_map() {
            v = serde_json::json!({ "1": v });
        }
        v = serde_json::json!({ f.name(): v });
    }
    v
}

#[tokio::test]
async fn every_numeric_model_config_field_at_its_extremes_is_refused_or_served() {
    let mut server = start_limited(&["--load-model", "identity,cost"], ADDRESS_SPACE).await;
    let ch = channel(&server).await;
    let mut models = ModelServiceClient::new(ch.clone());
    let pool = DescriptorPool::decode(veraltheim_proto::FILE_DESCRIPTOR_SET).unwrap();
    let config = pool.get_message_by_name("inference.ModelConfig").unwrap();
    let fields = numeric_fields(&config, 5, &mut Vec::new());
    assert!(
        fields.len() > 30,
        "only {} numeric fields found",
        fields.len()
    );
    let mut refused = 0;
    let mut served = 0;
    for field in &fields {
        let leaf = field.path.last().unwrap();
        let name: Vec<&str> = field.path.iter().map(|f| f.name()).collect();
        let name = name.join(".");
        for value in extremes(&leaf.kind()) {
            let json = override_json(field, value).to_string();
            let what = format!("load of cost with {json}");
            let load = tokio::time::timeout(
                Duration::from_secs(30),
                models.load_model(v1::LoadModelRequest {
                    name: "cost".into(),
                    config_json: json.clone(),
                }),
            )
            .await
            .unwrap_or_else(|_| panic!("{what} hung"));
            match load {
                Ok(_) => {
                    served += 1;
                    if std::env::var_os("HOSTILE_VERBOSE").is_some() {
                        eprintln!("served: {json}");
                    }
                    let mut request = tonic::Request::new(v1::InferRequest {
                        model: "cost".into(),
                        inputs: vec![fp32("INPUT0", vec![1, 1], vec![1.0])],
                        ..Default::default()
                    });
                    request.set_timeout(Duration::from_secs(10));
                    let answer = veraltheim_proto::v1::inference_service_client::InferenceServiceClient::new(ch.clone())
                        .infer(request)
                        .await;
                    if let Err(e) = answer {
                        panic!("{what} loaded, but the model does not answer: {e}");
                    }
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::InvalidArgument, "{what} ({name}): {e}");
                    refused += 1;
                }
            }
            assert_whole(&mut server, &ch, &what).await;
        }
    }
    eprintln!(
        "{} numeric fields: {refused} loads refused, {served} loaded and served",
        fields.len()
    );
    // Both outcomes occur: the probe reaches fields that are checked and fields that are not used.
    assert!(
        refused > 0 && served > 0,
        "refused {refused}, served {served}"
    );
}

// ---------------------------------------------------------------------------------------------
// Every numeric server setting

/// Every integer setting of the default configuration (set or commented out as an example),
/// with its `serve` flag: the file declares each key once, its flag in parentheses in the
/// comment above it. Keys inside `[[...]]` tables (one per queue) have no flag.
fn numeric_settings() -> Vec<(String, String)> {
    let text = include_str!("../src/default.toml");
    let mut out = Vec::new();
    let mut section = String::new();
    let mut flag: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_string();
            flag = None;
            continue;
        }
        if let Some(start) = line.find("(--") {
            let rest = &line[start + 3..];
            flag = rest.find(')').map(|end| rest[..end].to_string());
            continue;
        }
        let body = line.trim_start_matches('#').trim();
        if let Some((key, value)) = body.split_once(" = ")
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            if value.parse::<i64>().is_ok()
                && let Some(f) = flag.take()
            {
                out.push((format!("{section}.{key}"), f));
            }
            flag = None;
        }
    }
    out
}

/// Starts `serve` with one flag set and waits until it is ready or has exited. Returns the exit
/// (with its standard error) or the running server.
async fn start_or_exit(flag: &str, value: &str) -> Result<Server, String> {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("stderr")).unwrap();
    let arg = format!("--{flag}={value}");
    let (mut command, grpc, http) = common::serve_command(dir.path(), &[&arg], Some(ADDRESS_SPACE));
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server::adopt(child, grpc, http, dir);
    let started = std::time::Instant::now();
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            let err = std::fs::read_to_string(server.dir().join("stderr")).unwrap_or_default();
            return Err(format!("{status}: {err}"));
        }
        if let Ok(ch) = Channel::from_shared(format!("http://{}", server.grpc))
            .unwrap()
            .connect()
            .await
            && v1::system_service_client::SystemServiceClient::new(ch)
                .health(v1::HealthRequest {})
                .await
                .is_ok_and(|r| r.into_inner().ready)
        {
            return Ok(server);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{arg}: neither ready nor exited in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_numeric_server_setting_at_its_extremes_is_refused_by_name_or_served() {
    let settings = numeric_settings();
    assert!(
        settings.len() > 30,
        "only {} settings found",
        settings.len()
    );
    let mut failures = Vec::new();
    for (key, flag) in &settings {
        for value in ["0", "-1", &i64::MAX.to_string()] {
            match start_or_exit(flag, value).await {
                Ok(mut server) => {
                    let ch = channel(&server).await;
                    assert_whole(&mut server, &ch, &format!("--{flag}={value}")).await;
                }
                Err(exit) => {
                    let last = key.rsplit('.').next().unwrap();
                    if !(exit.contains(last) || exit.contains(flag.as_str()))
                        || exit.contains("panicked")
                    {
                        let exit: String = exit.chars().take(400).collect();
                        failures.push(format!("--{flag}={value} ({key}): {exit}"));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "settings that stopped the server without a clear refusal naming them:\n{}",
        failures.join("\n")
    );
}
