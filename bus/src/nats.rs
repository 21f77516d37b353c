//! The bridge between this bus and NATS JetStream: how events cross nodes (feature `nats`).
//!
//! **Why here.** The bridge is bus semantics carried over a wire: which events leave (topic
//! patterns), what they look like there ([`Event`]'s protobuf encoding), and how the ones that
//! come back are delivered (local subscriptions, their policies). It needs nothing from above:
//! the coordinator turns its configuration into [`BridgeOptions`] and runs
//! [`NatsBridge::run`] as a supervised worker, so the arrows stay downward. It is a feature
//! because only the binary needs it; the crates between (fastpath, serving) build without
//! async-nats.
//!
//! **Out.** Every local event whose topic matches one of [`BridgeOptions::topics`] is taken by
//! a bus subscription of its own with [`WhenFull::Reject`] and [`BridgeOptions::buffer`] room:
//! the publisher of an event (the fast path among them) never waits on NATS. A full buffer drops
//! the new event and counts it (`dropped_full`). One task publishes the buffered events in
//! order to the subject `<subject_prefix>.<topic>` with
//! - the payload: the protobuf [`Event`], with the attribute `node` set to this node;
//! - `Nats-Msg-Id`: `<node>:<incarnation>:<sequence>`, unique per event of this process and
//!   the same on every retry of that event, so the stream stores it once (its duplicate
//!   window is two minutes); the incarnation (the process's start time and pid) keeps a
//!   restarted node's sequence from colliding with its previous life's;
//! - `Veraltheim-Node`: this node's id; `traceparent`: the event's W3C trace context, if any.
//!
//! A publish whose acknowledgement fails is counted (`publish_errors`) and tried again, at most
//! [`PUBLISH_ATTEMPTS`] times while connected; then the event is dropped (`dropped_failed`) and
//! the session is set up again. An event too large for the server is dropped at once.
//!
//! **In.** An ephemeral ordered push consumer reads the stream's `<subject_prefix>.>` subjects
//! from the first sequence after those stored when the bridge first connected: a live feed, as
//! `WatchEvents` is. No durable consumer: nothing on a node needs events from before it started,
//! and a durable one would replay a flood after every restart. After a lost connection or a
//! new session the consumer resumes after the last event it delivered (events of the outage
//! come, within the stream's retention), never before the first one. Events whose
//! `Veraltheim-Node` is this node (its own, coming back) are skipped; the others are decoded,
//! checked against this node's own topic patterns, given the attribute `node` (the origin) and
//! published on the local bus. Undecodable ones are counted (`invalid`) and skipped.
//!
//! **No loops.** The out-going subscription takes no event whose `node` attribute names another
//! node: the bridge sets it on every event it delivers, so an event from NATS never goes back.
//! A local component must therefore not set `node` to another node's id on its own events.
//!
//! **Outages are states, not failures.** The worker connects (again and again, with backoff,
//! while NATS does not answer), creates the stream if it is absent (subjects
//! `<subject_prefix>.>`, at most one hour and 256 MiB of events, file storage, oldest dropped
//! first), starts the consumer and runs both directions until something fails; then it records
//! the error, waits (backoff, at most five seconds) and sets up again. async-nats reconnects a
//! lost connection by itself. Meanwhile events keep being buffered up to the bound, then
//! dropped and counted. [`NatsBridge::status`] says which state it is in and the last error,
//! for `veraltheim status` and `/metrics`. What does end the worker abnormally (a panic) is the
//! supervisor's to restart; the buffer and the counters live in [`NatsBridge`] and survive it.
//!
//! **Shutdown** publishes what is buffered for at most two seconds if connected, then leaves.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use async_nats::{HeaderMap, ServerAddr, header::NATS_MESSAGE_ID};
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::subscription::Shared;
use crate::{Bus, BusError, Event, Pattern, SubscribeOptions, Subscription, TraceParent, WhenFull};

/// The stream's name unless configured.
pub const DEFAULT_STREAM: &str = "VERALTHEIM_EVENTS";
/// Events go to `<prefix>.<topic>`, unless configured.
pub const DEFAULT_SUBJECT_PREFIX: &str = "veraltheim.events";
/// The topics bridged unless configured: the cluster's lifecycle and audit events.
pub const DEFAULT_TOPICS: [&str; 5] = ["jobs.>", "models.>", "devices.>", "nodes.>", "audit.>"];
/// Events buffered while NATS is slow or away, unless configured.
pub const DEFAULT_BUFFER: usize = 10_000;
/// The largest buffer accepted.
pub const MAX_BUFFER: usize = 10_000_000;
/// The attribute naming the node an event happened on, set on every bridged event.
pub const NODE_ATTRIBUTE: &str = "node";
/// The header naming the node that published a message.
pub const NODE_HEADER: &str = "Veraltheim-Node";
/// The header carrying the event's W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Attempts to store one event, while connected, before it is dropped.
pub const PUBLISH_ATTEMPTS: u32 = 5;

/// The stream keeps events this long (it is created so; an existing stream keeps its limits).
const STREAM_MAX_AGE: Duration = Duration::from_secs(3600);
/// And at most this many bytes of them.
const STREAM_MAX_BYTES: i64 = 256 << 20;
/// The same `Nats-Msg-Id` within this window is stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long shutdown spends publishing what is buffered.
const FLUSH_GRACE: Duration = Duration::from_secs(2);
/// Waits between attempts: from this, doubling...
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// ... up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long starts the backoff afresh when it ends.
const BACKOFF_RESET: Duration = Duration::from_secs(30);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the bridge is told: where NATS is, who this node is, which stream and topics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeOptions {
    /// NATS server URL(s), comma-separated: `nats://host:port` or `tls://host:port`.
    pub url: String,
    /// This node's id: the `node` attribute and header of its events.
    pub node: String,
    /// The JetStream stream, created if absent.
    pub stream: String,
    /// Events go to `<subject_prefix>.<topic>`; the stream holds `<subject_prefix>.>`.
    pub subject_prefix: String,
    /// Topic patterns bridged, both ways.
    pub topics: Vec<String>,
    /// Events buffered (beyond the one being published) before new ones are dropped.
    pub buffer: usize,
}

impl BridgeOptions {
    /// The defaults, for NATS at `url` and this node `node`.
    pub fn new(url: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            node: node.into(),
            stream: DEFAULT_STREAM.to_string(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_string(),
            topics: DEFAULT_TOPICS.iter().map(|t| t.to_string()).collect(),
            buffer: DEFAULT_BUFFER,
        }
    }

    /// Checks every option; the error names the option and what is wrong with it.
    pub fn validate(&self) -> Result<(), OptionError> {
        let fail = |option, value: &str, reason: String| {
            Err(OptionError {
                option,
                value: value.to_string(),
                reason,
            })
        };
        if let Err(reason) = check_url(&self.url) {
            return fail(BridgeOption::Url, &self.url, reason);
        }
        if let Err(reason) = check_node(&self.node) {
            return fail(BridgeOption::Node, &self.node, reason);
        }
        if let Err(reason) = check_stream_name(&self.stream) {
            return fail(BridgeOption::Stream, &self.stream, reason);
        }
        if let Err(reason) = check_subject_prefix(&self.subject_prefix) {
            return fail(BridgeOption::SubjectPrefix, &self.subject_prefix, reason);
        }
        if self.topics.is_empty() {
            return fail(
                BridgeOption::Topics,
                "",
                "no topic pattern: nothing would cross (turn the bridge off instead)".to_string(),
            );
        }
        for topic in &self.topics {
            if let Err(e) = Pattern::parse(topic) {
                return fail(BridgeOption::Topics, topic, e.to_string());
            }
        }
        if !(1..=MAX_BUFFER).contains(&self.buffer) {
            return fail(
                BridgeOption::Buffer,
                &self.buffer.to_string(),
                format!("it must be 1 to {MAX_BUFFER}"),
            );
        }
        Ok(())
    }
}

/// Which option of [`BridgeOptions`] an [`OptionError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BridgeOption {
    /// [`BridgeOptions::url`].
    Url,
    /// [`BridgeOptions::node`].
    Node,
    /// [`BridgeOptions::stream`].
    Stream,
    /// [`BridgeOptions::subject_prefix`].
    SubjectPrefix,
    /// [`BridgeOptions::topics`].
    Topics,
    /// [`BridgeOptions::buffer`].
    Buffer,
}

/// A bad option: which, its value, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?}: {reason}")]
pub struct OptionError {
    /// The option.
    pub option: BridgeOption,
    /// Its value as given (for `topics`, the bad pattern).
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Checks NATS server URLs: comma-separated `nats://host[:port]` or `tls://host[:port]` (a bare
/// `host[:port]` means `nats://`).
pub fn check_url(url: &str) -> Result<(), String> {
    if url.trim().is_empty() {
        return Err("it is empty".to_string());
    }
    for one in url.split(',') {
        let one = one.trim();
        if one.is_empty() {
            return Err("it has an empty entry between commas".to_string());
        }
        let addr: ServerAddr = one.parse().map_err(|e| format!("'{one}': {e}"))?;
        if !matches!(addr.scheme(), "nats" | "tls") {
            return Err(format!(
                "'{one}': the scheme must be nats:// or tls:// (websockets are not built in)"
            ));
        }
        if addr.host().is_empty() {
            return Err(format!("'{one}' has no host"));
        }
    }
    Ok(())
}

fn check_node(node: &str) -> Result<(), String> {
    if node.is_empty() {
        return Err("it is empty".to_string());
    }
    if node.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace or a control character".to_string());
    }
    Ok(())
}

/// Checks a stream name: 1 to 64 letters, digits, `-` and `_` (NATS forbids `.`, `*`, `>`,
/// path separators and whitespace; this is the portable subset).
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("it must be 1 to 64 characters".to_string());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("it may hold only letters, digits, '-' and '_'".to_string());
    }
    Ok(())
}

/// Checks a subject prefix: dot-separated tokens of letters, digits, `-` and `_`, at most
/// 128 bytes.
pub fn check_subject_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.len() > 128 {
        return Err("it must be 1 to 128 bytes".to_string());
    }
    for token in prefix.split('.') {
        if token.is_empty() {
            return Err("it has an empty token (leading, trailing or doubled '.')".to_string());
        }
        if !token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "token '{token}' may hold only letters, digits, '-' and '_'"
            ));
        }
    }
    Ok(())
}

/// Where the bridge stands with NATS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Not connected yet, no attempt has failed.
    Connecting,
    /// Connected, with the stream and the consumer set up: events move both ways.
    Connected,
    /// Not moving events: a connection or set-up attempt failed, or the connection was lost
    /// (the last error says which). Events are buffered up to the bound meanwhile.
    Disconnected,
}

impl Connection {
    /// `connecting`, `connected` or `disconnected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Connecting => "connecting",
            Connection::Connected => "connected",
            Connection::Disconnected => "disconnected",
        }
    }
}

/// The bridge's state and counters (since it was made).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeStatus {
    /// The NATS URL(s).
    pub url: String,
    /// The stream.
    pub stream: String,
    /// This node's id.
    pub node: String,
    /// Connected or not.
    pub connection: Connection,
    /// The last error met (connecting, setting up, publishing or consuming), kept after a
    /// recovery.
    pub last_error: Option<String>,
    /// Events waiting to be published (the buffer and the one in flight).
    pub buffered: u64,
    /// The buffer's bound.
    pub capacity: u64,
    /// Events stored in the stream.
    pub published: u64,
    /// Publishes the stream acknowledged as duplicates (an earlier attempt had stored them).
    pub duplicates: u64,
    /// Events from other nodes delivered on the local bus.
    pub received: u64,
    /// Events dropped because the buffer was full.
    pub dropped_full: u64,
    /// Events dropped after their publish attempts failed (or at once: too large).
    pub dropped_failed: u64,
    /// Failed publish attempts.
    pub publish_errors: u64,
    /// Messages from the stream that were not valid events (skipped).
    pub invalid: u64,
}

/// The bridge of one bus to NATS JetStream. See the module documentation.
pub struct NatsBridge {
    inner: Arc<Inner>,
}

struct Inner {
    options: BridgeOptions,
    patterns: Arc<[Pattern]>,
    bus: Bus,
    /// The buffer: a subscription taking the bridged topics' local events.
    intake: tokio::sync::Mutex<Subscription>,
    /// The same subscription's queue, for its counters while `run` holds `intake`.
    intake_queue: Arc<Shared>,
    /// The event being published, kept here so that a session that ends (or a worker that is
    /// stopped) mid-publish loses nothing: the next publishes it again under the same id.
    pending: Mutex<Option<Outbound>>,
    /// This process's life, in message ids.
    incarnation: String,
    next_sequence: AtomicU64,
    link: watch::Sender<Link>,
    /// Which connection's events the client callback may report (older ones are ignored).
    generation: AtomicU64,
    /// The first stream sequence delivered: the first after those stored when the bridge
    /// first connected (0: not yet known).
    floor: AtomicU64,
    /// The last stream sequence delivered (0: none).
    last_seen: AtomicU64,
    counters: Counters,
}

#[derive(Clone, Debug, Default)]
struct Link {
    /// The client's connection is up.
    up: bool,
    /// The stream and the consumer are set up on it.
    ready: bool,
    /// A connection or a session has failed at least once.
    failed: bool,
    last_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    duplicates: AtomicU64,
    received: AtomicU64,
    dropped_failed: AtomicU64,
    publish_errors: AtomicU64,
    invalid: AtomicU64,
}

/// One event ready to go out.
#[derive(Clone)]
struct Outbound {
    id: String,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    attempts: u32,
}

/// Why one publish did not store its event.
enum PublishFailure {
    /// Worth another attempt.
    Transient(String),
    /// Never will be stored (too large).
    Permanent(String),
}

fn backoff(failures: u32) -> Duration {
    let doubled = BACKOFF_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(BACKOFF_MAX)
}

fn incarnation() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", std::process::id())
}

impl NatsBridge {
    /// A bridge for `bus`. The options are checked, and the buffer subscribes at once: events
    /// published from now on are kept (up to the bound) until [`NatsBridge::run`] sends them.
    pub fn new(bus: &Bus, options: BridgeOptions) -> Result<Self, OptionError> {
        options.validate()?;
        let patterns: Arc<[Pattern]> = options
            .topics
            .iter()
            .map(|t| Pattern::parse(t))
            .collect::<Result<Vec<_>, BusError>>()
            .map_err(|e| OptionError {
                option: BridgeOption::Topics,
                value: options.topics.join(","),
                reason: e.to_string(),
            })?
            .into();
        let accept = {
            let patterns = Arc::clone(&patterns);
            let node = options.node.clone();
            move |event: &Event| {
                patterns.iter().any(|p| p.matches(&event.topic))
                    && event
                        .attributes
                        .get(NODE_ATTRIBUTE)
                        .is_none_or(|origin| *origin == node)
            }
        };
        let intake = bus
            .subscribe_where(
                ">",
                SubscribeOptions::new(options.buffer, WhenFull::Reject).named("nats-bridge"),
                accept,
            )
            .map_err(|e| OptionError {
                option: BridgeOption::Buffer,
                value: options.buffer.to_string(),
                reason: e.to_string(),
            })?;
        let intake_queue = intake.shared();
        Ok(Self {
            inner: Arc::new(Inner {
                options,
                patterns,
                bus: bus.clone(),
                intake: tokio::sync::Mutex::new(intake),
                intake_queue,
                pending: Mutex::new(None),
                incarnation: incarnation(),
                next_sequence: AtomicU64::new(0),
                link: watch::Sender::new(Link::default()),
                generation: AtomicU64::new(0),
                floor: AtomicU64::new(0),
                last_seen: AtomicU64::new(0),
                counters: Counters::default(),
            }),
        })
    }

    /// The options it runs with.
    pub fn options(&self) -> &BridgeOptions {
        &self.inner.options
    }

    /// Its state and counters now.
    pub fn status(&self) -> BridgeStatus {
        let inner = &self.inner;
        let link = inner.link.borrow().clone();
        let queue = inner.intake_queue.stats();
        let pending = u64::from(inner.pending.lock().is_some());
        let c = &inner.counters;
        BridgeStatus {
            url: inner.options.url.clone(),
            stream: inner.options.stream.clone(),
            node: inner.options.node.clone(),
            connection: if link.up && link.ready {
                Connection::Connected
            } else if link.failed {
                Connection::Disconnected
            } else {
                Connection::Connecting
            },
            last_error: link.last_error,
            buffered: queue.queued as u64 + pending,
            capacity: queue.capacity as u64,
            published: c.published.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            dropped_full: queue.dropped,
            dropped_failed: c.dropped_failed.load(Ordering::Relaxed),
            publish_errors: c.publish_errors.load(Ordering::Relaxed),
            invalid: c.invalid.load(Ordering::Relaxed),
        }
    }

    /// Moves events both ways until `shutdown` completes (see the module documentation): NATS
    /// being away is a state it waits out, not an error it returns. One `run` at a time; a
    /// second waits for the first to end.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let inner = &self.inner;
        let mut intake = inner.intake.lock().await;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut failures = 0u32;
        loop {
            let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
            let client = tokio::select! {
                _ = &mut shutdown => return,
                client = self.connect(generation) => client,
            };
            let began = Instant::now();
            let error = tokio::select! {
                _ = &mut shutdown => {
                    self.flush(&client, &mut intake).await;
                    return;
                }
                error = self.session(&client, &mut intake) => error,
            };
            inner.link.send_modify(|l| {
                l.ready = false;
                l.failed = true;
                l.last_error = Some(error.clone());
            });
            tracing::warn!(
                url = %inner.options.url,
                stream = %inner.options.stream,
                %error,
                "NATS bridge interrupted; setting it up again"
            );
            drop(client);
            failures = if began.elapsed() >= BACKOFF_RESET {
                1
            } else {
                failures.saturating_add(1)
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(backoff(failures)) => {}
            }
        }
    }

    /// Connects, trying again (with backoff) until NATS answers.
    async fn connect(&self, generation: u64) -> async_nats::Client {
        let inner = &self.inner;
        let mut failures = 0u32;
        loop {
            let weak: Weak<Inner> = Arc::downgrade(inner);
            let options = async_nats::ConnectOptions::new()
                .name(format!("veraltheim {}", inner.options.node))
                .connection_timeout(CONNECT_TIMEOUT)
                .event_callback(move |event| {
                    let weak = weak.clone();
                    async move {
                        if let Some(inner) = weak.upgrade() {
                            inner.on_client_event(generation, event);
                        }
                    }
                });
            match async_nats::connect_with_options(inner.options.url.as_str(), options).await {
                Ok(client) => {
                    inner.link.send_modify(|l| l.up = true);
                    return client;
                }
                Err(e) => {
                    let error = format!("cannot connect to {}: {e}", inner.options.url);
                    if failures == 0 {
                        tracing::warn!(%error, "NATS bridge: connecting; retrying");
                    }
                    inner.link.send_modify(|l| {
                        l.up = false;
                        l.failed = true;
                        l.last_error = Some(error);
                    });
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    /// Sets up the stream and the consumer on `client`, then moves events both ways; returns
    /// the error that ended it.
    async fn session(&self, client: &async_nats::Client, intake: &mut Subscription) -> String {
        let inner = &self.inner;
        let o = &inner.options;
        let js = jetstream::new(client.clone());
        let stream = match js
            .get_or_create_stream(stream::Config {
                name: o.stream.clone(),
                subjects: vec![format!("{}.>", o.subject_prefix)],
                max_age: STREAM_MAX_AGE,
                max_bytes: STREAM_MAX_BYTES,
                duplicate_window: DUPLICATE_WINDOW,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::Old,
                description: Some("Veraltheim events across nodes".to_string()),
                ..Default::default()
            })
            .await
        {
            Ok(stream) => stream,
            Err(e) => return format!("cannot open or create the stream {}: {e}", o.stream),
        };
        let last = stream.cached_info().state.last_sequence;
        let start = inner.start_sequence(last);
        let consumer = match stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: format!("{}.>", o.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
        {
            Ok(consumer) => consumer,
            Err(e) => return format!("cannot create a consumer on the stream {}: {e}", o.stream),
        };
        let messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => return format!("cannot consume the stream {}: {e}", o.stream),
        };
        inner.link.send_modify(|l| l.ready = true);
        tracing::info!(
            url = %o.url,
            stream = %o.stream,
            subjects = %format!("{}.>", o.subject_prefix),
            from_sequence = start,
            "NATS bridge connected"
        );
        tokio::select! {
            error = self.outbound(&js, intake) => error,
            error = self.inbound(messages) => error,
        }
    }

    /// Publishes the buffered events in order, each until stored or given up.
    async fn outbound(&self, js: &jetstream::Context, intake: &mut Subscription) -> String {
        let inner = &self.inner;
        let c = &inner.counters;
        let mut link = inner.link.subscribe();
        loop {
            let held = inner.pending.lock().clone();
            let out = match held {
                Some(out) => out,
                None => {
                    let Some(event) = intake.recv().await else {
                        // The bus is gone: the process is ending; nothing more will come.
                        return std::future::pending::<String>().await;
                    };
                    let out = inner.prepare(event);
                    *inner.pending.lock() = Some(out.clone());
                    out
                }
            };
            // While the connection is down the event waits here, and the buffer fills.
            if link.wait_for(|l| l.up).await.is_err() {
                return "the bridge's state went away".to_string();
            }
            match publish(js, &out).await {
                Ok(duplicate) => {
                    *inner.pending.lock() = None;
                    if duplicate {
                        c.duplicates.fetch_add(1, Ordering::Relaxed);
                    } else {
                        c.published.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(PublishFailure::Permanent(error)) => {
                    *inner.pending.lock() = None;
                    c.publish_errors.fetch_add(1, Ordering::Relaxed);
                    c.dropped_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(id = %out.id, subject = %out.subject, %error, "NATS bridge dropped an event");
                    inner.note_error(format!("event {} dropped: {error}", out.id));
                }
                Err(PublishFailure::Transient(error)) => {
                    c.publish_errors.fetch_add(1, Ordering::Relaxed);
                    let attempts = out.attempts + 1;
                    if attempts >= PUBLISH_ATTEMPTS {
                        *inner.pending.lock() = None;
                        c.dropped_failed.fetch_add(1, Ordering::Relaxed);
                        return format!(
                            "event {} dropped after {attempts} failed publishes: {error}",
                            out.id
                        );
                    }
                    if let Some(p) = inner.pending.lock().as_mut() {
                        p.attempts = attempts;
                    }
                    inner.note_error(format!("publishing event {}: {error}", out.id));
                    tokio::time::sleep(backoff(attempts)).await;
                }
            }
        }
    }

    /// Delivers other nodes' events on the local bus.
    async fn inbound(&self, mut messages: consumer::push::Ordered) -> String {
        let inner = &self.inner;
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => return format!("the stream's consumer failed: {e}"),
            };
            let sequence = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(e) => return format!("a message without stream metadata: {e}"),
            };
            // A consumer set up again may start before what was already delivered.
            if sequence < inner.floor.load(Ordering::Acquire)
                || sequence <= inner.last_seen.load(Ordering::Acquire)
            {
                continue;
            }
            inner.last_seen.store(sequence, Ordering::Release);
            inner.deliver(&message.headers, &message.payload).await;
        }
        "the stream's consumer ended".to_string()
    }

    /// Publishes what is buffered, for at most [`FLUSH_GRACE`], when connected.
    async fn flush(&self, client: &async_nats::Client, intake: &mut Subscription) {
        let inner = &self.inner;
        {
            let link = inner.link.borrow();
            if !(link.up && link.ready) {
                return;
            }
        }
        let js = jetstream::new(client.clone());
        let sent = tokio::time::timeout(FLUSH_GRACE, async {
            loop {
                let held = inner.pending.lock().take();
                let out = match held {
                    Some(out) => out,
                    None => match intake.try_recv() {
                        Some(delivery) => inner.prepare(delivery.event),
                        None => return true,
                    },
                };
                match publish(&js, &out).await {
                    Ok(true) => inner.counters.duplicates.fetch_add(1, Ordering::Relaxed),
                    Ok(false) => inner.counters.published.fetch_add(1, Ordering::Relaxed),
                    Err(_) => return false,
                };
            }
        })
        .await;
        if !matches!(sent, Ok(true)) {
            let left = self.status().buffered;
            tracing::warn!(left, "NATS bridge stopped with events still buffered");
        }
    }
}

/// One publish and its acknowledgement: whether the stream had it already.
async fn publish(js: &jetstream::Context, out: &Outbound) -> Result<bool, PublishFailure> {
    let sent = js
        .publish_with_headers(
            out.subject.clone(),
            out.headers.clone(),
            out.payload.clone(),
        )
        .await;
    let ack = match sent {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    match ack {
        Ok(ack) => Ok(ack.duplicate),
        Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
            Err(PublishFailure::Permanent(e.to_string()))
        }
        Err(e) => Err(PublishFailure::Transient(e.to_string())),
    }
}

impl Inner {
    /// Where the consumer starts: after what was stored when the bridge first connected, and
    /// after what it has delivered since.
    fn start_sequence(&self, last: u64) -> u64 {
        let mut floor = self.floor.load(Ordering::Acquire);
        let seen = self.last_seen.load(Ordering::Acquire);
        if floor == 0 || last.saturating_add(1) < floor.max(seen.saturating_add(1)) {
            // First connection, or the stream was made anew (its sequences went back).
            floor = last.saturating_add(1);
            self.floor.store(floor, Ordering::Release);
            self.last_seen.store(0, Ordering::Release);
            return floor;
        }
        floor.max(seen.saturating_add(1))
    }

    fn prepare(&self, mut event: Event) -> Outbound {
        let o = &self.options;
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}:{}:{sequence}", o.node, self.incarnation);
        event
            .attributes
            .insert(NODE_ATTRIBUTE.to_string(), o.node.clone());
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, id.as_str());
        headers.insert(NODE_HEADER, o.node.as_str());
        if !event.traceparent.is_empty() {
            headers.insert(TRACEPARENT_HEADER, event.traceparent.as_str());
        }
        Outbound {
            subject: format!("{}.{}", o.subject_prefix, event.topic),
            payload: Bytes::from(event.to_protobuf()),
            headers,
            id,
            attempts: 0,
        }
    }

    /// One message from the stream onto the local bus, unless it is this node's own or is not
    /// a bridged event.
    async fn deliver(&self, headers: &Option<HeaderMap>, payload: &[u8]) {
        let header = |name: &str| {
            headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let origin = header(NODE_HEADER);
        if origin.as_deref() == Some(self.options.node.as_str()) {
            return;
        }
        let mut event = match Event::from_protobuf(payload) {
            Ok(event) => event,
            Err(e) => {
                self.counters.invalid.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "NATS bridge skipped a message that is not an event");
                return;
            }
        };
        let origin = origin
            .or_else(|| event.attributes.get(NODE_ATTRIBUTE).cloned())
            .filter(|o| check_node(o).is_ok());
        let Some(origin) = origin else {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(topic = %event.topic, "NATS bridge skipped an event that names no node");
            return;
        };
        if origin == self.options.node || !self.patterns.iter().any(|p| p.matches(&event.topic)) {
            return;
        }
        if event.traceparent.is_empty()
            && let Some(trace) = header(TRACEPARENT_HEADER)
            && TraceParent::parse(&trace).is_ok()
        {
            event.traceparent = trace;
        }
        event.attributes.insert(NODE_ATTRIBUTE.to_string(), origin);
        match self.bus.publish(event).await {
            Ok(_) => {
                self.counters.received.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.invalid.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "NATS bridge could not deliver an event");
            }
        }
    }

    fn note_error(&self, error: String) {
        self.link.send_modify(|l| l.last_error = Some(error));
    }

    /// What the client reports about its connection (only the current connection's).
    fn on_client_event(&self, generation: u64, event: async_nats::Event) {
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        match event {
            async_nats::Event::Connected => {
                let mut again = false;
                self.link.send_modify(|l| {
                    again = !l.up && l.failed;
                    l.up = true;
                });
                if again {
                    tracing::info!(url = %self.options.url, "NATS bridge reconnected");
                }
            }
            async_nats::Event::Disconnected => {
                self.link.send_modify(|l| {
                    l.up = false;
                    l.failed = true;
                    l.last_error = Some(format!(
                        "lost the connection to {}; reconnecting",
                        self.options.url
                    ));
                });
                tracing::warn!(url = %self.options.url, "NATS bridge lost its connection; buffering");
            }
            async_nats::Event::ClientError(e) => {
                self.note_error(format!("connection to {}: {e}", self.options.url));
            }
            async_nats::Event::ServerError(e) => {
                self.note_error(format!("server {}: {e}", self.options.url));
            }
            other => tracing::debug!(event = %other, "NATS client event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_the_error_names_the_option() {
        let good = BridgeOptions::new("nats://127.0.0.1:4222", "node-1");
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(
            BridgeOptions::new("127.0.0.1:4222,tls://nats.example", "n").validate(),
            Ok(())
        );
        let bad = |options: BridgeOptions| options.validate().expect_err("invalid").option;
        assert_eq!(
            bad(BridgeOptions::new("http://x:4222", "n")),
            BridgeOption::Url
        );
        assert_eq!(bad(BridgeOptions::new("", "n")), BridgeOption::Url);
        assert_eq!(
            bad(BridgeOptions::new("nats://a,,nats://b", "n")),
            BridgeOption::Url
        );
        assert_eq!(
            bad(BridgeOptions::new("nats://a b", "n")),
            BridgeOption::Url
        );
        assert_eq!(bad(BridgeOptions::new("nats://a", "")), BridgeOption::Node);
        let with = |f: fn(&mut BridgeOptions)| {
            let mut o = good.clone();
            f(&mut o);
            o
        };
        assert_eq!(bad(with(|o| o.stream = "a.b".into())), BridgeOption::Stream);
        assert_eq!(
            bad(with(|o| o.stream = String::new())),
            BridgeOption::Stream
        );
        assert_eq!(
            bad(with(|o| o.subject_prefix = "a..b".into())),
            BridgeOption::SubjectPrefix
        );
        assert_eq!(
            bad(with(|o| o.subject_prefix = "a.*".into())),
            BridgeOption::SubjectPrefix
        );
        assert_eq!(bad(with(|o| o.topics = vec![])), BridgeOption::Topics);
        let e = with(|o| o.topics = vec!["jobs.>".into(), "a.>.b".into()])
            .validate()
            .expect_err("a `>` in the middle");
        assert_eq!(
            (e.option, e.value.as_str()),
            (BridgeOption::Topics, "a.>.b")
        );
        assert_eq!(bad(with(|o| o.buffer = 0)), BridgeOption::Buffer);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(1), BACKOFF_MIN);
        assert_eq!(backoff(2), BACKOFF_MIN * 2);
        assert_eq!(backoff(40), BACKOFF_MAX);
    }

    #[test]
    fn the_consumer_starts_after_what_was_there_and_after_what_it_delivered() {
        let bus = Bus::new();
        let bridge =
            NatsBridge::new(&bus, BridgeOptions::new("nats://127.0.0.1:1", "a")).expect("valid");
        let inner = &bridge.inner;
        // First connection: after the 10 stored events.
        assert_eq!(inner.start_sequence(10), 11);
        // Set up again before anything came: still from 11, though 5 more arrived.
        assert_eq!(inner.start_sequence(15), 11);
        // After delivering 13: from 14.
        inner.last_seen.store(13, Ordering::Release);
        assert_eq!(inner.start_sequence(15), 14);
        // The stream was made anew (its last sequence went back): from its next one.
        assert_eq!(inner.start_sequence(2), 3);
        assert_eq!(inner.last_seen.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn the_buffer_takes_only_bridged_topics_and_not_other_nodes_events() {
        let bus = Bus::new();
        let mut options = BridgeOptions::new("nats://127.0.0.1:1", "a");
        options.topics = vec!["jobs.>".into(), "models.*.state".into()];
        options.buffer = 10;
        let bridge = NatsBridge::new(&bus, options).expect("valid");
        for event in [
            Event::new("jobs.1.state", "mine"),
            Event::new("models.m.state", "mine"),
            Event::new("models.m.loaded", "not bridged"),
            Event::new("supervisor.restarted", "not bridged"),
            Event::new("jobs.2.state", "from b").with_attribute(NODE_ATTRIBUTE, "b"),
            Event::new("jobs.3.state", "mine, named").with_attribute(NODE_ATTRIBUTE, "a"),
        ] {
            bus.publish(event).await.expect("valid");
        }
        let mut intake = bridge.inner.intake.lock().await;
        let mut topics = Vec::new();
        while let Some(d) = intake.try_recv() {
            topics.push(d.event.topic);
        }
        assert_eq!(topics, ["jobs.1.state", "models.m.state", "jobs.3.state"]);
    }

    #[test]
    fn an_outbound_event_carries_its_id_node_and_trace() {
        let bus = Bus::new();
        let mut options = BridgeOptions::new("nats://127.0.0.1:1", "a");
        options.subject_prefix = "t.events".into();
        let bridge = NatsBridge::new(&bus, options).expect("valid");
        let trace = TraceParent::new([1; 16], [2; 8], true).expect("valid");
        let first = bridge
            .inner
            .prepare(Event::new("jobs.1.state", "x").with_trace(trace));
        let second = bridge.inner.prepare(Event::new("jobs.1.state", "y"));
        assert_eq!(first.subject, "t.events.jobs.1.state");
        assert_ne!(first.id, second.id);
        assert!(first.id.starts_with("a:"), "{}", first.id);
        let h = &first.headers;
        assert_eq!(
            h.get(NATS_MESSAGE_ID).map(|v| v.as_str()),
            Some(first.id.as_str())
        );
        assert_eq!(h.get(NODE_HEADER).map(|v| v.as_str()), Some("a"));
        let traceparent = trace.to_string();
        assert_eq!(
            h.get(TRACEPARENT_HEADER).map(|v| v.as_str()),
            Some(traceparent.as_str())
        );
        assert!(second.headers.get(TRACEPARENT_HEADER).is_none());
        let event = Event::from_protobuf(&first.payload).expect("our encoding");
        assert_eq!(
            event.attributes.get(NODE_ATTRIBUTE).map(String::as_str),
            Some("a")
        );
        assert_eq!(event.trace(), Some(trace));
    }
}
