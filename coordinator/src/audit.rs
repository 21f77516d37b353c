//! The audit log: every state-changing call (model load and unload, job submit and cancel,
//! KillChild, shared-memory registration, log settings changes) and every refusal of a caller
//! (no or unknown credentials, a verb its roles do not grant) becomes one [`AuditRecord`]. It is
//! written at once as a log line (target `veraltheim::audit`, one JSON object per line under
//! `--log-format json`), then the `AuditLog` worker in the supervision tree keeps it in the store
//! (table `audit.events`) for `server.audit_retention_days`, where ListAuditEvents
//! (`veraltheim audit`) reads it, and then publishes it on the bus as `audit.<verb>` (so an
//! event seen is a record kept).
//!
//! Recording never waits: records go through a bounded channel, and when the worker falls that
//! far behind the newest are dropped and counted (logged). Refusals are also throttled to
//! [`REFUSALS_PER_SECOND`], so a client hammering the server with a bad token cannot turn each
//! of its calls into a disk write; the next refusal recorded says how many were left out.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use veraltheim_bus::{Bus, Event};
use veraltheim_storage::{Batch, RedbStore, Table};
use veraltheim_supervisor::{ChildContext, ChildSpec};

/// Audit records by key: 16 digits of milliseconds, then 6 of a counter (time order).
pub const AUDIT: Table<str, AuditRecord> = Table::new("audit.events");

/// Records waiting for the writer; beyond it they are dropped and counted.
const BACKLOG: usize = 4096;
/// Records the writer commits together at most.
const BATCH: usize = 256;
/// Refusals recorded per second at most; the rest are counted and reported.
pub const REFUSALS_PER_SECOND: u32 = 100;
/// How often expired records are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The default and the most records of one ListAuditEvents page.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// One audited call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The principal, or "anonymous".
    pub principal: String,
    /// The principal's tenant; empty without authentication.
    pub tenant: String,
    /// The verb the call needed ("none" for a method no rule knows).
    pub verb: String,
    /// What it acted on: `model:NAME`, `queue:NAME`, `job:ID`, `server`.
    pub resource: String,
    /// The gRPC status code's name.
    pub result: String,
    /// The method or HTTP path.
    pub action: String,
    /// The caller's address.
    pub peer: String,
    /// The trace id of the call's `traceparent`, or empty.
    pub trace_id: String,
    /// Why it failed, when it did.
    #[serde(default)]
    pub message: String,
    /// Refusals left out (throttled) just before this one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed_before: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl AuditRecord {
    /// The bus event: topic `audit.<verb>`, every field an attribute.
    pub fn event(&self) -> Event {
        let mut e = Event::new(
            format!("audit.{}", self.verb),
            format!(
                "{} {} {} by {}{}: {}",
                self.action,
                self.verb,
                self.resource,
                self.principal,
                if self.tenant.is_empty() {
                    String::new()
                } else {
                    format!(" (tenant {})", self.tenant)
                },
                self.result
            ),
        )
        .with_attribute("principal", &self.principal)
        .with_attribute("tenant", &self.tenant)
        .with_attribute("verb", &self.verb)
        .with_attribute("resource", &self.resource)
        .with_attribute("result", &self.result)
        .with_attribute("action", &self.action)
        .with_attribute("peer", &self.peer)
        .with_attribute("trace_id", &self.trace_id);
        if !self.message.is_empty() {
            e = e.with_attribute("message", &self.message);
        }
        if self.suppressed_before > 0 {
            e = e.with_attribute("suppressed_before", self.suppressed_before.to_string());
        }
        e
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The refusal throttle: a one-second window.
struct Throttle {
    window: Instant,
    count: u32,
    suppressed: u64,
}

impl Throttle {
    fn new(now: Instant) -> Self {
        Throttle {
            window: now,
            count: 0,
            suppressed: 0,
        }
    }

    /// Whether a refusal at `now` is recorded: `Some(refusals left out since the last one
    /// recorded)`, or `None` when this one is left out.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        if self.count >= REFUSALS_PER_SECOND {
            self.suppressed += 1;
            return None;
        }
        self.count += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Records audit events; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<AuditRecord>,
    store: Arc<RedbStore>,
    throttle: Mutex<Throttle>,
    dropped: AtomicU64,
}

/// The receiving end, for the `AuditLog` worker.
pub struct Writer {
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<AuditRecord>>>,
    store: Arc<RedbStore>,
    bus: Bus,
    retention: Option<Duration>,
}

impl Audit {
    /// The audit log over `store`, and its writer; records older than `retention_days` are
    /// deleted (`None`: kept).
    pub fn new(store: Arc<RedbStore>, bus: Bus, retention_days: Option<u64>) -> (Audit, Writer) {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let audit = Audit {
            inner: Arc::new(Inner {
                tx,
                store: store.clone(),
                throttle: Mutex::new(Throttle::new(Instant::now())),
                dropped: AtomicU64::new(0),
            }),
        };
        let writer = Writer {
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
            store,
            bus,
            retention: retention_days.map(|d| Duration::from_secs(d.saturating_mul(86_400))),
        };
        (audit, writer)
    }

    /// Records `rec`: a log line now; the bus and the store through the writer.
    pub fn record(&self, mut rec: AuditRecord) {
        let refused = rec.result == "UNAUTHENTICATED" || rec.result == "PERMISSION_DENIED";
        if refused {
            match self.inner.throttle.lock().admit(Instant::now()) {
                Some(suppressed) => rec.suppressed_before = suppressed,
                None => return,
            }
        }
        if refused {
            tracing::warn!(
                target: "veraltheim::audit",
                principal = %rec.principal, tenant = %rec.tenant, verb = %rec.verb,
                resource = %rec.resource, result = %rec.result, action = %rec.action,
                peer = %rec.peer, trace_id = %rec.trace_id, message = %rec.message,
                suppressed_before = rec.suppressed_before,
                "audit"
            );
        } else {
            tracing::info!(
                target: "veraltheim::audit",
                principal = %rec.principal, tenant = %rec.tenant, verb = %rec.verb,
                resource = %rec.resource, result = %rec.result, action = %rec.action,
                peer = %rec.peer, trace_id = %rec.trace_id, message = %rec.message,
                "audit"
            );
        }
        if self.inner.tx.try_send(rec).is_err() {
            let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "audit backlog full: records dropped from the bus and the store (the log has them)"
                );
            }
        }
    }

    /// One page of the records at or after `since_ms`, oldest first, and the next page's token.
    pub fn list(
        &self,
        since_ms: u64,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<AuditRecord>, Option<String>), tonic::Status> {
        let size = match page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let is_key = page_token.len() == 22 && page_token.bytes().all(|b| b.is_ascii_digit());
        if !page_token.is_empty() && !is_key {
            return Err(tonic::Status::invalid_argument(format!(
                "page token '{}' is not one this service gave out",
                page_token.chars().take(64).collect::<String>()
            )));
        }
        let since = format!("{:016}", since_ms.min(9_999_999_999_999_999));
        let lower = if page_token.is_empty() || page_token < since.as_str() {
            Bound::Included(since.as_str())
        } else {
            Bound::Excluded(page_token)
        };
        let rows = AUDIT
            .range_limit(&*self.inner.store, (lower, Bound::Unbounded), size + 1)
            .map_err(|e| tonic::Status::unavailable(format!("the audit log: {e}")))?;
        let more = rows.len() > size;
        let mut page: Vec<(String, AuditRecord)> = rows;
        page.truncate(size);
        let next = more.then(|| page.last().map(|(k, _)| k.clone())).flatten();
        Ok((page.into_iter().map(|(_, r)| r).collect(), next))
    }
}

/// Keys: unique within the process (the counter) and ordered by time.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn key(time_ms: u64) -> String {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed) % 1_000_000;
    format!("{:016}{seq:06}", time_ms.min(9_999_999_999_999_999))
}

/// Deletes the records older than `retention`; how many.
async fn prune(store: &RedbStore, retention: Duration) -> Result<usize, String> {
    let cutoff = format!(
        "{:016}",
        now_ms().saturating_sub(retention.as_millis() as u64)
    );
    let mut deleted = 0;
    loop {
        let old = AUDIT
            .range_limit(
                store,
                (Bound::Unbounded, Bound::Excluded(cutoff.as_str())),
                1000,
            )
            .map_err(|e| e.to_string())?;
        if old.is_empty() {
            return Ok(deleted);
        }
        let mut batch = Batch::new();
        for (k, _) in &old {
            batch
                .delete(&AUDIT, k.as_str())
                .map_err(|e| e.to_string())?;
        }
        veraltheim_storage::Store::commit(store, batch)
            .await
            .map_err(|e| e.to_string())?;
        deleted += old.len();
        if old.len() < 1000 {
            return Ok(deleted);
        }
    }
}

impl Writer {
    /// The records waiting for the worker, taken (tests read what was recorded).
    #[cfg(test)]
    pub fn take(&self) -> Vec<AuditRecord> {
        let mut rx = self.rx.try_lock().expect("no worker runs in a test");
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push(r);
        }
        out
    }

    /// The `AuditLog` worker: keeps each record in the store, then publishes it as
    /// `audit.<verb>`; deletes expired records at start and every hour.
    pub fn worker(self) -> ChildSpec {
        let Writer {
            rx,
            store,
            bus,
            retention,
        } = self;
        ChildSpec::worker("AuditLog", move |ctx: ChildContext| {
            let (rx, store, bus) = (rx.clone(), store.clone(), bus.clone());
            async move {
                let mut rx = rx.lock().await;
                let mut next_prune = Instant::now();
                let mut records = Vec::with_capacity(BATCH);
                loop {
                    if let Some(retention) = retention
                        && Instant::now() >= next_prune
                    {
                        match prune(&store, retention).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(deleted = n, "expired audit records deleted"),
                            Err(e) => tracing::warn!(error = %e, "deleting expired audit records"),
                        }
                        next_prune = Instant::now() + PRUNE_EVERY;
                    }
                    records.clear();
                    tokio::select! {
                        _ = ctx.cancelled() => return Ok(()),
                        n = rx.recv_many(&mut records, BATCH) => if n == 0 { return Ok(()) },
                        _ = tokio::time::sleep_until(next_prune.into()), if retention.is_some() => continue,
                    }
                    let mut batch = Batch::new();
                    for rec in &records {
                        if let Err(e) = batch.put(&AUDIT, key(rec.time_ms).as_str(), rec) {
                            tracing::warn!(error = %e, "audit record not stored");
                        }
                    }
                    // Stored first, then published: whoever sees the event finds the record.
                    if let Err(e) = veraltheim_storage::Store::commit(&*store, batch).await {
                        tracing::warn!(error = %e, records = records.len(), "audit records not stored");
                    }
                    for rec in &records {
                        if let Err(e) = bus.publish(rec.event()).await {
                            tracing::warn!(error = %e, "audit event not published");
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(time_ms: u64, result: &str) -> AuditRecord {
        AuditRecord {
            time_ms,
            principal: "alice".into(),
            tenant: "search".into(),
            verb: "models.admin".into(),
            resource: "model:identity".into(),
            result: result.into(),
            action: "/veraltheim.v1.ModelService/LoadModel".into(),
            peer: "127.0.0.1:5000".into(),
            ..AuditRecord::default()
        }
    }

    #[test]
    fn the_event_carries_every_field_under_its_verb() {
        let e = record(5, "OK").event();
        assert_eq!(e.topic, "audit.models.admin");
        for (k, v) in [
            ("principal", "alice"),
            ("tenant", "search"),
            ("verb", "models.admin"),
            ("resource", "model:identity"),
            ("result", "OK"),
            ("peer", "127.0.0.1:5000"),
            ("trace_id", ""),
        ] {
            assert_eq!(e.attributes.get(k).map(String::as_str), Some(v), "{k}");
        }
    }

    #[tokio::test]
    async fn records_are_listed_in_time_order_by_page_and_pruned_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(RedbStore::open(dir.path().join("s.redb"), Default::default()).unwrap());
        let (audit, _writer) = Audit::new(store.clone(), Bus::new(), Some(1));
        let now = now_ms();
        let old = now - 3 * 86_400_000;
        let mut batch = Batch::new();
        for (i, t) in [old, old + 1, now - 2, now - 1, now]
            .into_iter()
            .enumerate()
        {
            let mut r = record(t, "OK");
            r.resource = format!("model:m{i}");
            batch.put(&AUDIT, key(t).as_str(), &r).unwrap();
        }
        veraltheim_storage::Store::commit(&*store, batch)
            .await
            .unwrap();
        let (page, next) = audit.list(0, 2, "").unwrap();
        assert_eq!(
            page.iter().map(|r| r.resource.as_str()).collect::<Vec<_>>(),
            ["model:m0", "model:m1"]
        );
        let (page, next) = audit.list(0, 2, &next.unwrap()).unwrap();
        assert_eq!(
            page.iter().map(|r| r.resource.as_str()).collect::<Vec<_>>(),
            ["model:m2", "model:m3"]
        );
        let (page, next) = audit.list(0, 2, &next.unwrap()).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(next, None);
        let (page, _) = audit.list(now - 1, 10, "").unwrap();
        assert_eq!(page.len(), 2);
        let e = audit.list(0, 10, "../x").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("page token"), "{e:?}");
        assert_eq!(prune(&store, Duration::from_secs(86_400)).await.unwrap(), 2);
        let (page, _) = audit.list(0, 10, "").unwrap();
        assert_eq!(page.len(), 3);
    }

    #[test]
    fn refusals_beyond_the_rate_are_counted_and_reported_with_the_next() {
        let start = Instant::now();
        let mut t = Throttle::new(start);
        for _ in 0..REFUSALS_PER_SECOND {
            assert_eq!(t.admit(start), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(t.admit(start + Duration::from_millis(999)), None);
        }
        // The next window records again, and says how many were left out.
        assert_eq!(t.admit(start + Duration::from_secs(1)), Some(7));
        assert_eq!(t.admit(start + Duration::from_secs(1)), Some(0));
    }

    #[tokio::test]
    async fn calls_that_change_state_are_never_throttled() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(RedbStore::open(dir.path().join("s.redb"), Default::default()).unwrap());
        let (audit, writer) = Audit::new(store, Bus::new(), None);
        let n = REFUSALS_PER_SECOND as usize + 10;
        for _ in 0..n {
            audit.record(record(1, "OK"));
        }
        let mut rx = writer.rx.lock().await;
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, n);
    }
}
