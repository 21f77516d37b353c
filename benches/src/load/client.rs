//! The load itself: KServe `ModelInfer` calls through the generated tonic client, in a closed
//! loop (N clients, one request in flight each) or an open loop (a fixed schedule, latency from
//! each request's due time, bounded outstanding requests).
//!
//! With several requests to send (the `text` benchmark's sentences), closed-loop client `c`
//! sends request `(c + k × N) % n` as its k-th call, so that every client goes through the mix
//! and the server sees a changing set of requests; the successes in the window are counted per
//! request ([`LoadReport::payload_requests`]). Open-loop request `i` sends request `i % n`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use veraltheim_proto::inference::{
    self as pb, grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor,
};

use super::args::{LoadSpec, Mode, Shape, TlsOpts};
use super::cpu::{self, CpuUse};
use super::http::{HttpClient, HttpRequest, Protocol, http_request};
use super::report::{BAD_RESPONSE, CLIENT_TIMEOUT, LoadReport, Recorder, code_name, throughput};
use super::schedule::Schedule;

/// Largest message the client takes or sends.
const MAX_MESSAGE: usize = 64 << 20;
/// A closed-loop client sends at most one request per microsecond of the run: a count bound on
/// its loop besides the time bound (no real server answers that fast).
const MAX_REQUESTS_PER_CLIENT_US: f64 = 1.0;

pub type Client = GrpcInferenceServiceClient<Channel>;

/// The `authorization` value of `--token`, sent with every inference request.
static BEARER: std::sync::OnceLock<tonic::metadata::AsciiMetadataValue> =
    std::sync::OnceLock::new();

/// The request every call sends: INPUT0, FP32, `shape`, values 0, 1, 2… as little-endian
/// `raw_input_contents` (what `tritonclient` sends with binary data).
pub fn infer_request(model: &str, shape: &Shape) -> pb::ModelInferRequest {
    let n = shape.elements();
    let mut raw = Vec::with_capacity(n * 4);
    for i in 0..n {
        raw.extend_from_slice(&((i % 1024) as f32).to_le_bytes());
    }
    pb::ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: shape.0.iter().map(|d| *d as i64).collect(),
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(raw)],
        ..Default::default()
    }
}

/// `n` HTTP/2 connections to `addr` (HOST:PORT, or a URL), each its own tonic `Channel`; over
/// TLS as `tls` says.
pub async fn connect(addr: &str, n: usize, tls: &TlsOpts) -> anyhow::Result<Vec<Channel>> {
    if let Some(token) = &tls.token {
        let value = format!("Bearer {token}")
            .parse()
            .context("the token is not a valid header value")?;
        // One token per process: the first connection's (every run of one invocation shares it).
        let _ = BEARER.set(value);
    }
    let url = tls.url(addr).map_err(anyhow::Error::msg)?;
    let mut endpoint = Endpoint::from_shared(url)
        .with_context(|| format!("bad server address '{addr}'"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &tls.ca {
        let read = |path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(config).context("cannot set up TLS")?;
    }
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr}"))?,
        );
    }
    Ok(channels)
}

pub fn client(channel: Channel) -> Client {
    GrpcInferenceServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// One call; `Err` names the failure as the report counts it.
pub async fn call(
    client: &mut Client,
    payload: &pb::ModelInferRequest,
    timeout: Duration,
) -> Result<(), &'static str> {
    let mut request = tonic::Request::new(payload.clone());
    if let Some(bearer) = BEARER.get() {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
    }
    match tokio::time::timeout(timeout, client.model_infer(request)).await {
        Err(_) => Err(CLIENT_TIMEOUT),
        Ok(Err(status)) => Err(code_name(status.code())),
        Ok(Ok(r)) if r.get_ref().outputs.is_empty() => Err(BAD_RESPONSE),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Runs `spec` against `addr`. `server_pid`, if given, is the server process whose CPU use is
/// sampled over the measured window (else the in-process echo server's threads, if running).
/// `on_measure`, if given, is told when the measured window starts (the suite reads the
/// server's statistics then).
pub async fn run_load(
    target: &str,
    addr: &str,
    spec: &LoadSpec,
    server_pid: Option<u32>,
    on_measure: Option<oneshot::Sender<()>>,
) -> anyhow::Result<LoadReport> {
    let payload = infer_request(&spec.model, &spec.shape);
    run_load_with(target, addr, spec, vec![payload], server_pid, on_measure).await
}

/// [`run_load`] with the caller's requests: closed-loop client `c` sends `payloads[(c + k × N)
/// % n]` as its k-th call (N clients), open-loop request `i` sends `payloads[i % n]` (the `text`
/// benchmark cycles sentences so).
pub async fn run_load_with(
    target: &str,
    addr: &str,
    spec: &LoadSpec,
    payloads: Vec<pb::ModelInferRequest>,
    server_pid: Option<u32>,
    on_measure: Option<oneshot::Sender<()>>,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!payloads.is_empty(), "no request to send");
    if spec.protocol != Protocol::Grpc {
        let Mode::Closed { concurrency, .. } = spec.mode else {
            anyhow::bail!("--protocol http runs a closed loop only (give --concurrency)");
        };
        anyhow::ensure!(
            spec.tls.ca.is_none(),
            "--protocol http speaks plain HTTP; TLS options are for gRPC"
        );
        let binary = spec.protocol == Protocol::HttpBinary;
        let requests = payloads
            .iter()
            .map(|p| http_request(p, binary))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut callers = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let mut http = HttpClient::new(addr, spec.tls.token.as_deref());
            http.connect().await?;
            callers.push(Caller::Http(http));
        }
        let payloads = Arc::new(Payloads::Http(requests));
        let mut report =
            closed_loop(callers, payloads, spec, concurrency, server_pid, on_measure).await?;
        report.target = target.to_string();
        return Ok(report);
    }
    let channels = connect(addr, spec.mode.channels(), &spec.tls).await?;
    let mut report = match spec.mode {
        Mode::Closed {
            concurrency,
            clients_per_channel,
        } => {
            let callers = (0..concurrency)
                .map(|c| Caller::Grpc(client(channels[c / clients_per_channel].clone())))
                .collect();
            let payloads = Arc::new(Payloads::Grpc(payloads));
            let mut report =
                closed_loop(callers, payloads, spec, concurrency, server_pid, on_measure).await?;
            report.channels = channels.len();
            report
        }
        Mode::Open {
            rate,
            max_outstanding,
            ..
        } => {
            open_loop(
                &channels,
                Arc::new(payloads),
                spec,
                rate,
                max_outstanding,
                server_pid,
                on_measure,
            )
            .await?
        }
    };
    report.target = target.to_string();
    Ok(report)
}

/// What closed-loop clients send: the k-th call of client `c` of N sends request
/// `(c + k × N) % n` of these.
enum Payloads {
    Grpc(Vec<pb::ModelInferRequest>),
    Http(Vec<HttpRequest>),
}

/// One closed-loop client's connection.
enum Caller {
    Grpc(Client),
    Http(HttpClient),
}

impl Caller {
    /// Sends request `i` of `payloads`.
    async fn call(
        &mut self,
        payloads: &Payloads,
        i: usize,
        timeout: Duration,
    ) -> Result<(), &'static str> {
        match (self, payloads) {
            (Caller::Grpc(client), Payloads::Grpc(p)) => call(client, &p[i], timeout).await,
            (Caller::Http(http), Payloads::Http(p)) => http.call(&p[i], timeout).await,
            _ => Err(BAD_RESPONSE),
        }
    }
}

impl Payloads {
    fn len(&self) -> usize {
        match self {
            Payloads::Grpc(p) => p.len(),
            Payloads::Http(p) => p.len(),
        }
    }
}

/// The request that the k-th call of closed-loop client `c` (of `clients`) sends, of `n`.
pub fn closed_loop_payload(c: usize, k: u64, clients: usize, n: usize) -> usize {
    let n64 = n.max(1) as u64;
    ((c as u64 % n64 + (k % n64) * (clients as u64 % n64)) % n64) as usize
}

fn base_report(spec: &LoadSpec, channels: usize) -> LoadReport {
    LoadReport {
        target: String::new(),
        model: spec.model.clone(),
        shape: spec.shape.to_string(),
        mode: "closed",
        concurrency: None,
        rate: None,
        channels,
        window_s: 0.0,
        requests: 0,
        throughput_rps: 0.0,
        latency_us: Default::default(),
        errors: Default::default(),
        error_latency_us: None,
        client_shed: None,
        send_lag_us: None,
        cpu: None,
        payload_requests: Vec::new(),
    }
}

async fn closed_loop(
    callers: Vec<Caller>,
    payload: Arc<Payloads>,
    spec: &LoadSpec,
    concurrency: usize,
    server_pid: Option<u32>,
    on_measure: Option<oneshot::Sender<()>>,
) -> anyhow::Result<LoadReport> {
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let measure_to = measure_from + spec.duration;
    let cap =
        ((spec.warmup + spec.duration).as_secs_f64() * 1e6 * MAX_REQUESTS_PER_CLIENT_US) as u64 + 1;
    let (first_sample, begin) = oneshot::channel();
    tokio::spawn(async move {
        sleep_until(measure_from).await;
        let _ = first_sample.send(cpu::sample(server_pid));
        if let Some(tx) = on_measure {
            let _ = tx.send(());
        }
    });
    let mut tasks = Vec::with_capacity(concurrency);
    for (c, mut caller) in callers.into_iter().enumerate() {
        let payload = payload.clone();
        let timeout = spec.request_timeout;
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::new();
            let n = payload.len();
            let mut sent_ok = vec![0u64; if n > 1 { n } else { 0 }];
            for k in 0..cap {
                let sent = Instant::now();
                if sent >= measure_to {
                    break;
                }
                let i = closed_loop_payload(c, k, concurrency, n);
                let outcome = caller.call(&payload, i, timeout).await;
                let done = Instant::now();
                // A request counts when it completes inside the measured window.
                if done >= measure_from && done <= measure_to {
                    match outcome {
                        Ok(()) => {
                            rec.ok(done - sent);
                            if let Some(s) = sent_ok.get_mut(i) {
                                *s += 1;
                            }
                        }
                        Err(e) => rec.error_after(e, done - sent),
                    }
                }
            }
            (rec, sent_ok)
        }));
    }
    let mut all = Recorder::new();
    let mut payload_requests: Vec<u64> = Vec::new();
    for t in tasks {
        let (rec, sent_ok) = t.await.context("a load client panicked")?;
        all.merge(&rec);
        if payload_requests.is_empty() {
            payload_requests = sent_ok;
        } else {
            for (a, b) in payload_requests.iter_mut().zip(sent_ok) {
                *a += b;
            }
        }
    }
    let end = cpu::sample(server_pid);
    // One connection per client over HTTP; gRPC's caller sets its channel count.
    let mut report = base_report(spec, concurrency);
    report.mode = "closed";
    report.concurrency = Some(concurrency);
    report.window_s = spec.duration.as_secs_f64();
    report.requests = all.successes();
    report.throughput_rps = throughput(all.successes(), spec.duration);
    report.latency_us = all.latency();
    report.errors = all.errors().clone();
    report.error_latency_us = (all.error_total() > 0).then(|| all.error_latency());
    report.cpu = begin.await.ok().map(|b| CpuUse::between(&b, &end));
    report.payload_requests = payload_requests;
    Ok(report)
}

struct Outcome {
    measured: bool,
    result: Result<(), &'static str>,
    /// From the due time to the answer.
    latency: Duration,
    /// From the due time to the actual send.
    lag: Duration,
    done: std::time::Instant,
}

/// Sleeps shorter than this are skipped: the request is sent at once (it is due within the
/// timer's own precision).
const MIN_SLEEP: Duration = Duration::from_micros(20);

/// The open loop. Requests are released by a dedicated dispatcher thread that sleeps with the
/// OS's high-resolution timer (tokio's timer ticks in whole milliseconds, which would make every
/// request up to 1 ms late) and spawns each call onto the runtime.
async fn open_loop(
    channels: &[Channel],
    payload: Arc<Vec<pb::ModelInferRequest>>,
    spec: &LoadSpec,
    rate: f64,
    max_outstanding: usize,
    server_pid: Option<u32>,
    mut on_measure: Option<oneshot::Sender<()>>,
) -> anyhow::Result<LoadReport> {
    let schedule = Schedule::new(rate, spec.warmup, spec.duration);
    let clients: Vec<Client> = channels.iter().cloned().map(client).collect();
    let permits = Arc::new(Semaphore::new(max_outstanding));
    let (tx, mut rx) = mpsc::channel::<Outcome>(max_outstanding);
    let collector = tokio::spawn(async move {
        let mut rec = Recorder::new();
        let mut lag = Recorder::new();
        let mut last_done: Option<std::time::Instant> = None;
        while let Some(o) = rx.recv().await {
            if !o.measured {
                continue;
            }
            lag.ok(o.lag);
            match o.result {
                Ok(()) => rec.ok(o.latency),
                Err(e) => rec.error_after(e, o.latency),
            }
            last_done = Some(last_done.map_or(o.done, |d| d.max(o.done)));
        }
        (rec, lag, last_done)
    });
    // A short lead so that the first requests are not late by the set-up.
    let start = std::time::Instant::now() + Duration::from_millis(10);
    let (window_from, window_to) = schedule.measured_window();
    let handle = tokio::runtime::Handle::current();
    let timeout = spec.request_timeout;
    let (dispatched, dispatch_done) = oneshot::channel();
    std::thread::Builder::new()
        // Named as a client thread (the CPU accounting groups by this prefix).
        .name(format!("{}-dispatch", cpu::CLIENT_THREADS))
        .spawn(move || {
            let mut shed = 0u64;
            let mut begin = None;
            for i in 0..schedule.total() {
                let due = start + schedule.offset(i);
                let now = std::time::Instant::now();
                if due > now + MIN_SLEEP {
                    std::thread::sleep(due - now);
                }
                let measured = schedule.is_measured(i);
                if measured && begin.is_none() {
                    begin = Some(cpu::sample(server_pid));
                    if let Some(tx) = on_measure.take() {
                        let _ = tx.send(());
                    }
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    if measured {
                        shed += 1;
                    }
                    continue;
                };
                let mut client = clients[(i % clients.len() as u64) as usize].clone();
                let payload = payload.clone();
                let tx = tx.clone();
                handle.spawn(async move {
                    let sent = std::time::Instant::now();
                    let request = &payload[(i % payload.len() as u64) as usize];
                    let result = call(&mut client, request, timeout).await;
                    let done = std::time::Instant::now();
                    let _ = tx
                        .send(Outcome {
                            measured,
                            result,
                            latency: done.saturating_duration_since(due),
                            lag: sent.saturating_duration_since(due),
                            done,
                        })
                        .await;
                    drop(permit);
                });
            }
            // `tx` is dropped here: the collector ends when the last call has reported.
            let _ = dispatched.send((shed, begin));
        })
        .context("cannot start the dispatcher thread")?;
    let (shed, begin) = dispatch_done
        .await
        .context("the dispatcher thread panicked")?;
    // Every request in flight ends within the request timeout, so this wait is bounded.
    let (rec, lag, last_done) = collector.await.context("the collector panicked")?;
    let end = cpu::sample(server_pid);
    let nominal = window_to - window_from;
    let window = last_done
        .map(|d| d.saturating_duration_since(start + window_from))
        .map_or(nominal, |w| w.max(nominal));
    let mut report = base_report(spec, channels.len());
    report.mode = "open";
    report.rate = Some(rate);
    report.window_s = window.as_secs_f64();
    report.requests = rec.successes();
    report.throughput_rps = throughput(rec.successes(), window);
    report.latency_us = rec.latency();
    report.errors = rec.errors().clone();
    report.error_latency_us = (rec.error_total() > 0).then(|| rec.error_latency());
    report.client_shed = Some(shed);
    report.send_lag_us = Some(lag.latency());
    report.cpu = begin.map(|b| CpuUse::between(&b, &end));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_raw_fp32() {
        let r = infer_request("cost", &"2x3".parse().unwrap());
        assert_eq!(r.model_name, "cost");
        assert_eq!(r.inputs[0].shape, vec![2, 3]);
        assert_eq!(r.inputs[0].datatype, "FP32");
        assert!(r.inputs[0].contents.is_none());
        assert_eq!(r.raw_input_contents[0].len(), 6 * 4);
        assert_eq!(&r.raw_input_contents[0][4..8], &1.0f32.to_le_bytes());
    }
}
