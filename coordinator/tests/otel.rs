//! Traces over OTLP: the real binary exports to an OTLP/gRPC receiver started by the test (the
//! collector's `TraceService` from opentelemetry-proto, served by tonic: the real protocol), and
//! the spans that arrive are checked — the caller's trace continued, the server span's children,
//! the batch span's links, the attributes, and a job attempt's span.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tonic::transport::Channel;
use veraltheim_proto::inference::{
    self as kserve, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use veraltheim_proto::v1::{self, job_service_client::JobServiceClient};

use common::Server;

/// A span as received, with its resource's attributes.
#[derive(Clone, Debug)]
struct Received {
    resource: Vec<KeyValue>,
    span: Span,
}

/// The test's OTLP receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        {
            let mut spans = self.spans.lock();
            for rs in request.into_inner().resource_spans {
                let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                    spans.push(Received {
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves the collector on a free loopback port; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    /// Waits until `done` holds for the spans received (60 s at most, then fails the test with
    /// what did arrive).
    async fn until(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let arrived = self.arrived.notified();
            {
                let spans = self.spans.lock();
                if done(&spans) {
                    return spans.clone();
                }
                assert!(
                    Instant::now() < give_up,
                    "{what}: not among the spans received: {:#?}",
                    spans.iter().map(|r| &r.span).collect::<Vec<_>>()
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), arrived).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text<'a>(attributes: &'a [KeyValue], key: &str) -> &'a str {
    match attribute(attributes, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("attribute {key} is not a string: {other:?} in {attributes:?}"),
    }
}

fn int(attributes: &[KeyValue], key: &str) -> i64 {
    match attribute(attributes, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("attribute {key} is not an integer: {other:?} in {attributes:?}"),
    }
}

/// The spans of one trace, by name (a name seen twice is a failure: one request per trace).
fn by_name(spans: &[Received], trace: &str) -> HashMap<String, Received> {
    let mut out = HashMap::new();
    for r in spans.iter().filter(|r| hex(&r.span.trace_id) == trace) {
        assert!(
            out.insert(r.span.name.clone(), r.clone()).is_none(),
            "two '{}' spans in trace {trace}",
            r.span.name
        );
    }
    out
}

/// The batch span linking to `span` (a span id), if it arrived.
fn batch_linking<'a>(spans: &'a [Received], span: &[u8]) -> Option<&'a Received> {
    spans
        .iter()
        .find(|r| r.span.name == "batch" && r.span.links.iter().any(|l| l.span_id == span))
}

const REQUEST_SPANS: [&str; 4] = ["infer", "queue", "compute", "answer"];

/// One request's spans have all arrived, with the batch span that links to its server span.
fn request_done(spans: &[Received], trace: &str) -> bool {
    let mine = by_name(spans, trace);
    REQUEST_SPANS.iter().all(|n| mine.contains_key(*n))
        && batch_linking(spans, &mine["infer"].span.span_id).is_some()
}

/// Checks one traced request's spans: the server span continues the caller's span, the
/// children hang under it in order, the batch links to it and it back. Returns the server span.
fn check_request(
    spans: &[Received],
    trace: &str,
    caller_span: &str,
    model: &str,
    protocol: &str,
) -> Received {
    let mine = by_name(spans, trace);
    let server = &mine["infer"];
    let s = &server.span;
    assert_eq!(hex(&s.trace_id), trace, "the caller's trace is continued");
    assert_eq!(
        hex(&s.parent_span_id),
        caller_span,
        "a child of the caller's span"
    );
    assert_eq!(s.kind, SpanKind::Server as i32);
    assert_eq!(text(&s.attributes, "veraltheim.model.name"), model);
    assert_eq!(text(&s.attributes, "veraltheim.model.version"), "1");
    assert_eq!(text(&s.attributes, "veraltheim.protocol"), protocol);
    assert_eq!(
        text(&s.attributes, "veraltheim.node.id"),
        text(&server.resource, "veraltheim.node.id")
    );
    assert!(!text(&s.attributes, "veraltheim.node.id").is_empty());
    assert_eq!(text(&server.resource, "service.name"), "veraltheim");
    assert!(!text(&server.resource, "service.version").is_empty());

    let (queue, compute, answer) = (
        &mine["queue"].span,
        &mine["compute"].span,
        &mine["answer"].span,
    );
    for child in [queue, compute, answer] {
        assert_eq!(
            child.parent_span_id, s.span_id,
            "{} is a child of the server span",
            child.name
        );
        assert_eq!(text(&child.attributes, "veraltheim.model.name"), model);
        assert!(
            child.start_time_unix_nano <= child.end_time_unix_nano,
            "{child:?}"
        );
        assert!(
            s.start_time_unix_nano <= child.start_time_unix_nano
                && child.end_time_unix_nano <= s.end_time_unix_nano,
            "{} lies inside the server span",
            child.name
        );
    }
    // One after the other: the queue wait ends when the batch is taken, the compute when its
    // outputs are split, and the answer goes back from there.
    assert_eq!(queue.end_time_unix_nano, compute.start_time_unix_nano);
    assert_eq!(compute.end_time_unix_nano, answer.start_time_unix_nano);

    let batch = batch_linking(spans, &s.span_id).expect("a batch span links to the request");
    let b = &batch.span;
    assert!(b.parent_span_id.is_empty(), "a batch is a root of its own");
    assert_eq!(text(&b.attributes, "veraltheim.model.name"), model);
    assert!(int(&b.attributes, "veraltheim.batch.size") >= 1);
    let link = b.links.iter().find(|l| l.span_id == s.span_id).unwrap();
    assert_eq!(hex(&link.trace_id), trace);
    assert!(
        compute
            .links
            .iter()
            .any(|l| l.span_id == b.span_id && l.trace_id == b.trace_id),
        "compute links to its batch"
    );
    assert_eq!(
        (b.start_time_unix_nano, b.end_time_unix_nano),
        (compute.start_time_unix_nano, compute.end_time_unix_nano),
        "the batch ran when the request's compute did"
    );
    server.clone()
}

/// A fresh W3C `traceparent` (sampled), as its trace id and parent span id.
fn new_trace(n: u8) -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (
        format!("{:030x}{n:02x}", nanos & ((1 << 120) - 1)),
        format!("{:014x}{n:02x}", (nanos as u64) & ((1 << 56) - 1) | 1),
    )
}

fn traceparent((trace, span): &(String, String), flags: &str) -> String {
    format!("00-{trace}-{span}-{flags}")
}

/// Starts the server exporting to `collector`, with a repository model `paired` that runs
/// only batches of two (its queue delay is long: two requests sent together share a batch).
async fn start(collector: &str) -> Server {
    start_with_env(collector, &[]).await
}

/// [`start`] with extra environment variables for the server.
async fn start_with_env(collector: &str, env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    write_paired(&dir.path().join("models"));
    let (mut command, grpc, http) = common::serve_command(
        dir.path(),
        &[
            "--otlp-endpoint",
            collector,
            "--max-queue-delay-us",
            "120000000",
        ],
        None,
    );
    // Exports every 100 ms instead of 5 s, so the test does not wait long.
    command
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = command.spawn().unwrap();
    let server = Server::adopt(child, grpc, http, dir);
    wait_ready(&server).await;
    server
}

fn write_paired(repo: &Path) {
    std::fs::create_dir_all(repo.join("paired/1")).unwrap();
    std::fs::write(
        repo.join("paired/config.json"),
        r#"{"backend": "builtin", "max_batch_size": 8,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
            "dynamic_batching": {"preferred_batch_size": [2],
                                 "max_queue_delay_microseconds": 120000000},
            "parameters": {"builtin": {"string_value": "identity"}}}"#,
    )
    .unwrap();
}

async fn wait_ready(server: &Server) {
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{}", server.grpc))
            .unwrap()
            .connect()
            .await
        {
            let ready = v1::system_service_client::SystemServiceClient::new(ch)
                .health(v1::HealthRequest {})
                .await
                .is_ok_and(|r| r.into_inner().ready);
            if ready {
                return;
            }
        }
        // A bound for a hung start, not a measure of speed.
        assert!(Instant::now() < give_up, "the server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kserve_request(
    model: &str,
    parent: Option<String>,
) -> tonic::Request<kserve::ModelInferRequest> {
    let mut req = tonic::Request::new(kserve::ModelInferRequest {
        model_name: model.into(),
        id: "traced-1".into(),
        inputs: vec![kserve::model_infer_request::InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, 2],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from([1.0f32, 2.0].map(f32::to_le_bytes).concat())],
        ..Default::default()
    });
    if let Some(p) = parent {
        req.metadata_mut().insert("traceparent", p.parse().unwrap());
    }
    req
}

/// One HTTP/1.1 POST with a `traceparent` header: the status and the body.
async fn http_post(addr: &str, path: &str, traceparent: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntraceparent: {traceparent}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_and_jobs_are_traced_over_otlp() {
    let collector = Collector::default();
    let url = collector.start().await;
    let server = start(&url).await;
    let ch = common::channel(&server).await;
    let mut kserve = GrpcInferenceServiceClient::new(ch.clone());

    // A caller that does not sample its trace: nothing is recorded for it.
    let unsampled = new_trace(1);
    kserve
        .model_infer(kserve_request(
            "identity",
            Some(traceparent(&unsampled, "00")),
        ))
        .await
        .unwrap();

    // KServe over gRPC, continuing the caller's trace.
    let grpc = new_trace(2);
    let answer = kserve
        .model_infer(kserve_request("identity", Some(traceparent(&grpc, "01"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.raw_output_contents.len(), 1);
    let spans = collector
        .until("the gRPC request's spans", |s| request_done(s, &grpc.0))
        .await;
    let server_span = check_request(&spans, &grpc.0, &grpc.1, "identity", "grpc");
    assert_eq!(
        text(&server_span.span.attributes, "veraltheim.request.id"),
        "traced-1"
    );
    assert_eq!(
        int(&server_span.span.attributes, "veraltheim.batch.size"),
        1
    );
    // The unsampled call ended before this one: its spans would have been exported by now.
    assert!(
        !spans.iter().any(|r| hex(&r.span.trace_id) == unsampled.0),
        "an unsampled trace is not recorded"
    );

    // Our own API's Infer, continuing the caller's trace too.
    let own = new_trace(7);
    let mut req = tonic::Request::new(v1::InferRequest {
        model: "identity".into(),
        inputs: vec![common::fp32("INPUT0", vec![1, 2], vec![5.0, 6.0])],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", traceparent(&own, "01").parse().unwrap());
    v1::inference_service_client::InferenceServiceClient::new(ch.clone())
        .infer(req)
        .await
        .unwrap();
    let spans = collector
        .until("the v1 request's spans", |s| request_done(s, &own.0))
        .await;
    check_request(&spans, &own.0, &own.1, "identity", "grpc");

    // Two requests in one batch, one over gRPC and one over HTTP, each in its own trace: the
    // batch span links to both.
    let (a, b) = (new_trace(3), new_trace(4));
    let body = r#"{"inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"FP32","data":[3.0,4.0]}]}"#;
    let b_parent = traceparent(&b, "01");
    let over_http = http_post(&server.http, "/v2/models/paired/infer", &b_parent, body);
    let over_grpc = {
        let mut kserve = kserve.clone();
        let req = kserve_request("paired", Some(traceparent(&a, "01")));
        async move { kserve.model_infer(req).await }
    };
    let (http_answer, grpc_answer) = tokio::join!(over_http, over_grpc);
    assert_eq!(http_answer.0, 200, "{}", http_answer.1);
    grpc_answer.unwrap();
    let spans = collector
        .until("the paired requests' spans", |s| {
            request_done(s, &a.0) && request_done(s, &b.0)
        })
        .await;
    let sa = check_request(&spans, &a.0, &a.1, "paired", "grpc");
    let sb = check_request(&spans, &b.0, &b.1, "paired", "http");
    let batch = batch_linking(&spans, &sa.span.span_id).unwrap();
    assert!(
        batch
            .span
            .links
            .iter()
            .any(|l| l.span_id == sb.span.span_id),
        "one batch span links to both requests: {:?}",
        batch.span
    );
    assert_eq!(int(&batch.span.attributes, "veraltheim.batch.requests"), 2);
    assert_eq!(int(&batch.span.attributes, "veraltheim.batch.size"), 2);
    assert_eq!(
        spans
            .iter()
            .filter(|r| r.span.name == "batch"
                && r.span.links.iter().any(|l| l.span_id == sa.span.span_id))
            .count(),
        1,
        "one span per batch"
    );

    // A refused request: the server span says why, with the gRPC code.
    let missing = new_trace(5);
    let refused = kserve
        .model_infer(kserve_request(
            "no-such-model",
            Some(traceparent(&missing, "01")),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    let spans = collector
        .until("the refused request's span", |s| {
            by_name(s, &missing.0).contains_key("infer")
        })
        .await;
    let failed = &by_name(&spans, &missing.0)["infer"].span;
    assert_eq!(hex(&failed.parent_span_id), missing.1);
    let status = failed.status.as_ref().expect("a status");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(status.message.contains("no-such-model"), "{status:?}");
    assert_eq!(
        int(&failed.attributes, "rpc.grpc.status_code"),
        tonic::Code::NotFound as i64
    );
    assert_eq!(text(&failed.attributes, "error.type"), "NOT_FOUND");

    // A job: its attempt's span continues the submitter's trace.
    let submit = new_trace(6);
    let mut jobs = JobServiceClient::new(ch);
    let mut req = tonic::Request::new(common::command("traced-job", &["true"]));
    req.metadata_mut()
        .insert("traceparent", traceparent(&submit, "01").parse().unwrap());
    let job = jobs.submit_job(req).await.unwrap().into_inner();
    common::wait_for(&mut jobs, &job.id, v1::JobState::Succeeded).await;
    let spans = collector
        .until("the job attempt's span", |s| {
            by_name(s, &submit.0).contains_key("job.attempt")
        })
        .await;
    let attempt = &by_name(&spans, &submit.0)["job.attempt"];
    let a = &attempt.span;
    assert_eq!(hex(&a.parent_span_id), submit.1);
    assert_eq!(text(&a.attributes, "veraltheim.job.id"), job.id);
    assert_eq!(text(&a.attributes, "veraltheim.job.kind"), "command");
    assert_eq!(text(&a.attributes, "veraltheim.job.outcome"), "SUCCEEDED");
    assert_eq!(int(&a.attributes, "veraltheim.job.attempt"), 1);
    assert_eq!(int(&a.attributes, "veraltheim.job.exit_code"), 0);
    assert_eq!(text(&attempt.resource, "service.name"), "veraltheim");
    assert!(a.start_time_unix_nano <= a.end_time_unix_nano);
}

/// The standard sampler variables decide which new traces are recorded: with
/// `parentbased_traceidratio` at 0, a call without a `traceparent` makes no span, while a call
/// whose caller sampled its trace is still recorded (the parent decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_sampler_variables_choose_which_new_traces_are_recorded() {
    let collector = Collector::default();
    let url = collector.start().await;
    let server = start_with_env(
        &url,
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    )
    .await;
    let mut kserve = GrpcInferenceServiceClient::new(common::channel(&server).await);
    for _ in 0..5 {
        kserve
            .model_infer(kserve_request("identity", None))
            .await
            .unwrap();
    }
    let sampled = new_trace(9);
    kserve
        .model_infer(kserve_request(
            "identity",
            Some(traceparent(&sampled, "01")),
        ))
        .await
        .unwrap();
    let spans = collector
        .until("the sampled request's spans", |s| {
            request_done(s, &sampled.0)
        })
        .await;
    // Every span exported belongs to the sampled call's trace, or is the batch that ran it.
    for r in &spans {
        assert!(
            hex(&r.span.trace_id) == sampled.0 || r.span.name == "batch",
            "a span of an unsampled new trace was exported: {:?}",
            r.span
        );
    }
    assert_eq!(
        spans.iter().filter(|r| r.span.name == "infer").count(),
        1,
        "only the sampled call's server span"
    );
}
