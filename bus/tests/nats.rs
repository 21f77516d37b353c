//! The NATS bridge against the real NATS server with JetStream (`VERALTHEIM_TEST_NATS`, default
//! `nats://127.0.0.1:4222`; `scripts/test` starts it). No mock: two buses with a bridge each are
//! two nodes on one stream. Each test has a stream and a subject prefix of its own (so tests run
//! in parallel) and deletes its stream at the end.
//!
//! What is checked: an event crosses to the other node once, with the origin's node id and its
//! trace context, and never comes back; the stored message carries the de-duplication id, the
//! node and the traceparent as headers, and publishing it again is stored once; topics outside
//! `topics` stay local (both ways); a bridge that cannot reach NATS says so, buffers up to its
//! bound, then counts drops, and publishing never waits; a cut connection (a TCP relay between
//! the bridge and NATS, closed and opened again) is reported, buffered through and recovered
//! by itself, every buffered event delivered once and in order.
//!
//! Waits are bounded (a hung bridge fails the test) but never measure speed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use veraltheim_bus::nats::{
    BridgeOptions, BridgeStatus, Connection, NODE_ATTRIBUTE, NODE_HEADER, NatsBridge,
    TRACEPARENT_HEADER,
};
use veraltheim_bus::{Bus, Event, SubscribeOptions, Subscription, TraceParent, WhenFull};

/// Longest wait for anything: a bound for a hang, not a measure.
const BOUND: Duration = Duration::from_secs(60);

fn nats_url() -> String {
    std::env::var("VERALTHEIM_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// Deletes a test's stream when dropped, whether the test passed or panicked.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let name = self.0.clone();
        // Its own thread and runtime: a Drop cannot await, and may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let client = async_nats::connect(nats_url()).await.ok()?;
                async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A stream name and a subject prefix no other test (or run) uses; the stream is deleted when
/// the guard goes.
fn unique(tag: &str) -> (String, String, Cleanup) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let id = format!("{}_{nanos:x}", std::process::id());
    let stream = format!("VT_TEST_{tag}_{id}");
    let prefix = format!("vt-test.{tag}-{id}");
    (stream.clone(), prefix, Cleanup(stream))
}

/// A raw client, to look at the stream.
async fn jetstream() -> async_nats::jetstream::Context {
    let client = async_nats::connect(nats_url())
        .await
        .unwrap_or_else(|e| panic!("NATS does not answer at {}: {e}", nats_url()));
    async_nats::jetstream::new(client)
}

/// A bridge running on its own task until `stop` is called.
struct Running {
    bridge: Arc<NatsBridge>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    fn start(bus: &Bus, options: BridgeOptions) -> Running {
        let bridge = Arc::new(NatsBridge::new(bus, options).expect("valid options"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let bridge = bridge.clone();
            async move {
                bridge
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
            }
        });
        Running {
            bridge,
            stop: Some(stop),
            task,
        }
    }

    fn status(&self) -> BridgeStatus {
        self.bridge.status()
    }

    /// Polls the status until `pred` holds.
    async fn until(&self, what: &str, pred: impl Fn(&BridgeStatus) -> bool) -> BridgeStatus {
        let end = Instant::now() + BOUND;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < end, "the bridge never {what}: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn connected(&self) {
        self.until("connected", |s| s.connection == Connection::Connected)
            .await;
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("the bridge's task did not panic");
    }
}

fn options(node: &str, stream: &str, prefix: &str, url: &str) -> BridgeOptions {
    let mut o = BridgeOptions::new(url, node);
    o.stream = stream.to_string();
    o.subject_prefix = prefix.to_string();
    o
}

fn watch(bus: &Bus) -> Subscription {
    bus.subscribe(">", SubscribeOptions::new(256, WhenFull::Reject))
        .expect("valid")
}

/// The next event on `sub` (bounded wait).
async fn next(sub: &mut Subscription) -> Event {
    tokio::time::timeout(BOUND, sub.recv())
        .await
        .expect("an event within the bound")
        .expect("the bus lives")
}

async fn with_bound<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within the bound"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_crosses_once_with_its_node_and_trace_and_never_comes_back() {
    let (stream, prefix, _cleanup) = unique("cross");
    let url = nats_url();
    let (bus_a, bus_b) = (Bus::new(), Bus::new());
    let (mut seen_a, mut seen_b) = (watch(&bus_a), watch(&bus_b));
    let a = Running::start(&bus_a, options("a", &stream, &prefix, &url));
    let b = Running::start(&bus_b, options("b", &stream, &prefix, &url));
    a.connected().await;
    b.connected().await;

    let trace = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .expect("the W3C example");
    bus_a
        .publish(
            Event::new("jobs.7.state", "job 7 is RUNNING")
                .with_attribute("state", "RUNNING")
                .with_trace(trace),
        )
        .await
        .expect("valid");
    let own = next(&mut seen_a).await;
    assert_eq!(own.topic, "jobs.7.state");
    assert_eq!(own.attributes.get(NODE_ATTRIBUTE), None, "local: no node");

    let got = next(&mut seen_b).await;
    assert_eq!(got.topic, "jobs.7.state");
    assert_eq!(got.message, "job 7 is RUNNING");
    assert_eq!(
        got.attributes.get(NODE_ATTRIBUTE).map(String::as_str),
        Some("a")
    );
    assert_eq!(
        got.attributes.get("state").map(String::as_str),
        Some("RUNNING")
    );
    assert_eq!(got.trace(), Some(trace));
    assert_eq!(got.time_ms, own.time_ms);

    // B's answer comes to A; before it, nothing: A's own event did not come back, neither
    // from the stream nor through B (the stream is ordered, so an echo would come first).
    bus_b
        .publish(Event::new("jobs.8.state", "job 8 is QUEUED"))
        .await
        .expect("valid");
    assert_eq!(
        next(&mut seen_b).await.topic,
        "jobs.8.state",
        "B's own, local"
    );
    let answer = next(&mut seen_a).await;
    assert_eq!(answer.topic, "jobs.8.state");
    assert_eq!(
        answer.attributes.get(NODE_ATTRIBUTE).map(String::as_str),
        Some("b")
    );
    // Likewise B never gets its own jobs.8 back: the next thing it sees is A's next event.
    bus_a
        .publish(Event::new("jobs.9.state", "job 9"))
        .await
        .expect("valid");
    assert_eq!(next(&mut seen_b).await.topic, "jobs.9.state");

    // The stored message: the de-duplication id, the node and the trace as headers.
    let js = jetstream().await;
    let mut nats_stream = js.get_stream(&stream).await.expect("the bridge made it");
    let stored = nats_stream
        .get_raw_message(1)
        .await
        .expect("the first event");
    assert_eq!(stored.subject.as_str(), format!("{prefix}.jobs.7.state"));
    let header = |name: &str| {
        stored
            .headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    let id = header("Nats-Msg-Id");
    assert!(id.starts_with("a:"), "{id}");
    assert_eq!(header(NODE_HEADER), "a");
    assert_eq!(header(TRACEPARENT_HEADER), trace.to_string());
    let decoded = Event::from_protobuf(&stored.payload).expect("a protobuf event");
    assert_eq!(decoded.topic, "jobs.7.state");

    // The same message id again (what a retry after a lost acknowledgement sends) is stored
    // once: the stream says duplicate, keeps three messages, and B gets no second copy.
    let ack = js
        .publish_with_headers(
            stored.subject.to_string(),
            stored.headers.clone(),
            stored.payload.clone(),
        )
        .await
        .expect("sent")
        .await
        .expect("acknowledged");
    assert!(ack.duplicate, "{ack:?}");
    let info = nats_stream.info().await.expect("info");
    assert_eq!(info.state.messages, 3);

    // Something that is not an event is counted and skipped.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(NODE_HEADER, "c");
    js.publish_with_headers(
        format!("{prefix}.jobs.x"),
        headers,
        bytes::Bytes::from_static(b"\xff\xff\xff"),
    )
    .await
    .expect("sent")
    .await
    .expect("stored");
    bus_a
        .publish(Event::new("jobs.10.state", "job 10"))
        .await
        .expect("valid");
    assert_eq!(
        next(&mut seen_b).await.topic,
        "jobs.10.state",
        "no second jobs.7, nothing for the garbage"
    );
    b.until("counted the garbage", |s| s.invalid == 1).await;
    let sb = b
        .until("counted what it received", |s| s.received == 3)
        .await;
    assert_eq!(
        (sb.published, sb.dropped_full, sb.dropped_failed),
        (1, 0, 0)
    );
    let sa = a
        .until("counted what it published and received", |s| {
            s.published == 3 && s.received == 1
        })
        .await;
    assert_eq!((sa.buffered, sa.publish_errors), (0, 0));

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_outside_the_bridged_ones_stay_local_both_ways() {
    let (stream, prefix, _cleanup) = unique("topics");
    let url = nats_url();
    let (bus_a, bus_b) = (Bus::new(), Bus::new());
    let mut seen_b = watch(&bus_b);
    let mut oa = options("a", &stream, &prefix, &url);
    oa.topics = vec!["jobs.>".into(), "models.>".into()];
    let mut ob = options("b", &stream, &prefix, &url);
    ob.topics = vec!["jobs.>".into()];
    let a = Running::start(&bus_a, oa);
    let b = Running::start(&bus_b, ob);
    a.connected().await;
    b.connected().await;

    // Not A's topic: never leaves A. A's, not B's: stored, but B does not take it in.
    for topic in ["supervisor.restarted", "models.m.state", "jobs.1.state"] {
        bus_a.publish(Event::new(topic, "x")).await.expect("valid");
    }
    let first = next(&mut seen_b).await;
    assert_eq!(first.topic, "jobs.1.state", "the first B sees: {first:?}");
    let sa = a.until("published both", |s| s.published == 2).await;
    assert_eq!(sa.dropped_full, 0);
    let js = jetstream().await;
    let mut nats_stream = js.get_stream(&stream).await.expect("made");
    let info = nats_stream.info().await.expect("info");
    assert_eq!(info.state.messages, 2, "models.m.state and jobs.1.state");
    assert!(seen_b.try_recv().is_none());

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_it_says_so_buffers_to_its_bound_then_counts_drops_and_never_blocks() {
    let (stream, prefix, _cleanup) = unique("outage");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let bus = Bus::new();
    let mut o = options("a", &stream, &prefix, &url);
    o.buffer = 3;
    let a = Running::start(&bus, o);
    let down = a
        .until("reported the failed connection", |s| {
            s.connection == Connection::Disconnected && s.last_error.is_some()
        })
        .await;
    let error = down.last_error.unwrap_or_default();
    assert!(
        error.contains("cannot connect") && error.contains(&url),
        "{error}"
    );

    for n in 0..5 {
        // Publishing completes at its first poll: it never waits on NATS.
        let report = bus
            .publish(Event::new(format!("jobs.{n}.state"), "x"))
            .now_or_never()
            .expect("publishing never waits on the bridge")
            .expect("valid");
        assert_eq!(report.rejected.len(), usize::from(n >= 3), "event {n}");
    }
    let s = a.status();
    assert_eq!(s.connection, Connection::Disconnected);
    assert_eq!((s.buffered, s.capacity), (3, 3));
    assert_eq!(s.dropped_full, 2);
    assert_eq!((s.published, s.dropped_failed), (0, 0));
    a.stop().await;
}

/// A TCP relay to NATS that the test can cut (closing every connection) and open again on the
/// same port: a real outage, between a real client and a real server.
struct Relay {
    addr: SocketAddr,
    upstream: String,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    async fn start(upstream: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut relay = Relay {
            addr,
            upstream,
            task: None,
        };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
            // Dropping the set aborts (and closes) every relayed connection.
        }));
    }

    /// Closes the listener and every relayed connection.
    async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn reopen(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("the same port again");
        self.serve(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_reported_buffered_through_and_recovered() {
    let (stream, prefix, _cleanup) = unique("relay");
    let url = nats_url();
    let upstream = url
        .trim_start_matches("nats://")
        .split(',')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut relay = Relay::start(upstream).await;
    let (bus_a, bus_b) = (Bus::new(), Bus::new());
    let mut seen_b = watch(&bus_b);
    let a = Running::start(
        &bus_a,
        options("a", &stream, &prefix, &format!("nats://{}", relay.addr)),
    );
    let b = Running::start(&bus_b, options("b", &stream, &prefix, &url));
    a.connected().await;
    b.connected().await;
    bus_a
        .publish(Event::new("jobs.0.state", "before"))
        .await
        .expect("valid");
    assert_eq!(next(&mut seen_b).await.topic, "jobs.0.state");
    // B may see the event before A has its acknowledgement; cut only once A has it, or the
    // event stays buffered (to be sent again, and dropped by NATS as a duplicate).
    a.until("its first event acknowledged", |s| s.published == 1)
        .await;

    relay.cut().await;
    a.until("noticed the cut", |s| {
        s.connection == Connection::Disconnected
    })
    .await;
    for n in 1..=4 {
        bus_a
            .publish(Event::new(format!("jobs.{n}.state"), "during"))
            .now_or_never()
            .expect("publishing never waits on the bridge")
            .expect("valid");
    }
    let s = a.status();
    assert_eq!((s.buffered, s.dropped_full), (4, 0), "{s:?}");

    relay.reopen().await;
    a.connected().await;
    for n in 1..=4 {
        let got = next(&mut seen_b).await;
        assert_eq!(got.topic, format!("jobs.{n}.state"), "in order, once");
        assert_eq!(
            got.attributes.get(NODE_ATTRIBUTE).map(String::as_str),
            Some("a")
        );
    }
    let s = a
        .until("emptied its buffer", |s| {
            s.buffered == 0 && s.published + s.duplicates == 5
        })
        .await;
    assert_eq!((s.dropped_full, s.dropped_failed), (0, 0), "{s:?}");
    assert!(s.last_error.is_some(), "the outage is remembered: {s:?}");
    // Nothing more: a marker after them comes next.
    bus_a
        .publish(Event::new("jobs.5.state", "after"))
        .await
        .expect("valid");
    assert_eq!(next(&mut seen_b).await.topic, "jobs.5.state");

    with_bound("stopping A", a.stop()).await;
    with_bound("stopping B", b.stop()).await;
    relay.cut().await;
}
