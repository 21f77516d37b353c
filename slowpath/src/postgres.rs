//! [`PgJobStore`]: durable jobs in a PostgreSQL database, which several coordinators can share.
//!
//! Why not a [`veraltheim_storage::Store`] over PostgreSQL: the key-value [`crate::store::JobStore`] serializes
//! the writers of one job with in-process locks, which say nothing to another process. Here the
//! database does it: each read-modify-write of a job is one transaction that reads the row
//! `FOR UPDATE`, and idempotency keys are a UNIQUE column, so two nodes submitting with one key
//! get the same job (`INSERT … ON CONFLICT DO NOTHING`, then a read of the row that won).
//!
//! One table, `jobs`: the record (serde JSON, as the key-value store keeps it, history
//! included) as `bytea`, with the columns the filters and sweeps read kept beside it in the same
//! row and written by the same statement: `state`, `live` (not yet terminal: what
//! [`PgJobStore::recover`] reads), `queue`, `tenant`, `labels` (jsonb, GIN index), the
//! `idempotency_slot` (UNIQUE), `expires_ms` (finished jobs with a TTL, indexed in expiry order),
//! `wire_bytes` and a `version` that grows with each write. Ids are the key-value store's (16
//! digits of ms, 4 of a counter); two nodes that make one id in the same millisecond collide on
//! the primary key, and the loser takes its next id.
//!
//! A write is returned only after its `COMMIT` answered. A lost or refused connection is
//! [`StoreError::Unavailable`] (nothing was acknowledged; the pool drops the broken connection and
//! opens new ones when the database is back); so is an operation with no answer within the
//! configured timeout. When a `COMMIT` is lost with its connection, the job may exist
//! unacknowledged: a client retrying with its idempotency key gets it.
//!
//! The schema is created and upgraded at start ([`PgJobStore::connect`]) by the migrations
//! embedded in this binary, in one transaction holding an advisory lock, so that nodes starting
//! together apply each once; `schema_version` says which ran. A database whose schema is newer
//! than this binary knows is refused ([`StoreError::SchemaTooNew`]).
//!
//! For a cluster: the leader row (`leader.rs`) fences a leader's writes
//! ([`PgJobStore::update_as_leader`]), the `node` and `cancel_requested` columns say where a
//! job is placed and whether its node must stop it ([`PgJobStore::placed_on`],
//! [`PgJobStore::request_cancel`]), and a trigger announces every change
//! ([`PgJobStore::notices`]). [`PgJobStore::recover`] (every live job, as after a restart of
//! the only node) is the single-node path; a cluster's runner never calls it. Not yet: other
//! nodes' finishes lowering this node's [`PgJobStore::next_expiry_ms`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;

use crate::cluster::{JobNotice, LeaderFence, LiveEntry, LogPiece};
use crate::job::{JobSpec, JobState};
use crate::store::{
    Change, Clock, DEFAULT_PAGE_SIZE, Expired, IdGen, JobRecord, LOCK_SHARDS, ListFilter,
    MAX_PAGE_BYTES, MAX_PAGE_SIZE, Observer, Placement, StoreError, apply, expires_ms,
    idempotency_slot, is_id, mark_pause, new_record, system_clock,
};

/// The migrations, in order: the schema after migration N is version N.
const MIGRATIONS: &[&str] = &[
    // 1: the jobs.
    "CREATE TABLE jobs (
        id text PRIMARY KEY,
        state text NOT NULL,
        live boolean NOT NULL,
        queue text NOT NULL,
        priority_class text NOT NULL,
        tenant text,
        labels jsonb NOT NULL,
        idempotency_slot bytea UNIQUE,
        created_ms bigint NOT NULL,
        updated_ms bigint NOT NULL,
        expires_ms bigint,
        wire_bytes integer NOT NULL,
        version bigint NOT NULL DEFAULT 1,
        record bytea NOT NULL
    );
    CREATE INDEX jobs_live ON jobs (id) WHERE live;
    CREATE INDEX jobs_expiry ON jobs (expires_ms, id) WHERE expires_ms IS NOT NULL;
    CREATE INDEX jobs_queue ON jobs (queue, id);
    CREATE INDEX jobs_tenant ON jobs (tenant, id) WHERE tenant IS NOT NULL;
    CREATE INDEX jobs_state ON jobs (state, id);
    CREATE INDEX jobs_labels ON jobs USING gin (labels jsonb_path_ops);",
    // 2: the node registry (`nodes.rs`). Times are the database's (`now()`), never a node's.
    "CREATE TABLE nodes (
        id text PRIMARY KEY,
        address text NOT NULL,
        state text NOT NULL,
        labels jsonb NOT NULL,
        version text NOT NULL,
        cores integer NOT NULL,
        memory_bytes bigint NOT NULL,
        gpus integer NOT NULL,
        models jsonb NOT NULL,
        running_jobs integer NOT NULL,
        incarnation text NOT NULL,
        lease_ms bigint NOT NULL,
        started_at timestamptz NOT NULL,
        last_heartbeat timestamptz NOT NULL,
        lease_expires timestamptz NOT NULL,
        draining boolean NOT NULL DEFAULT false,
        admitting boolean NOT NULL DEFAULT true
    );",
    // 3: the cluster's scheduler (`leader.rs`): one leader row with its epoch; where each job
    // is placed and whether a cancel was asked of its node; what each node offers jobs; and
    // an announcement of every job change, on commit, to the nodes listening (`notices`).
    "ALTER TABLE jobs ADD COLUMN node text;
    ALTER TABLE jobs ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
    CREATE INDEX jobs_node_live ON jobs (node) WHERE live;
    CREATE TABLE leader (
        id integer PRIMARY KEY CHECK (id = 1),
        node text NOT NULL,
        incarnation text NOT NULL,
        epoch bigint NOT NULL,
        acquired_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL
    );
    INSERT INTO leader VALUES (1, '', '', 0, to_timestamp(0), to_timestamp(0));
    ALTER TABLE nodes ADD COLUMN job_cpu_millis bigint NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN job_memory_bytes bigint NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN job_gpus integer NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN job_slots integer NOT NULL DEFAULT 0;
    CREATE FUNCTION veraltheim_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('veraltheim_jobs', NEW.id || ' ' || NEW.state || ' '
            || coalesce(NEW.node, '') || ' ' || NEW.cancel_requested::text);
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_changed AFTER INSERT OR UPDATE ON jobs
        FOR EACH ROW EXECUTE FUNCTION veraltheim_job_changed();",
    // 4: attempts' output, copied by the node that runs them so that any node can serve it
    // (`append_log`, `read_logs`); bounded by the executor's own cap per attempt and stream,
    // deleted with the job.
    "CREATE TABLE job_logs (
        job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        attempt integer NOT NULL,
        seq integer NOT NULL,
        stream text NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (job_id, attempt, seq)
    );",
];

/// The channel job changes are announced on (migration 3's trigger).
const JOB_CHANNEL: &str = "veraltheim_jobs";

/// The newest schema this binary knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The advisory lock migrations run under (any fixed number; "vrlthm" and a 1).
const MIGRATION_LOCK: i64 = 0x7672_6c74_686d_0001;

/// How a [`PgJobStore`] connects.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Most connections open at once.
    pub pool_size: usize,
    /// Longest wait for a connection, and for any one operation's answer; past it the operation
    /// fails as [`StoreError::Unavailable`].
    pub timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Durable jobs in PostgreSQL. See the module documentation.
pub struct PgJobStore {
    pool: Pool,
    /// Where the pool connects, for the notice listener's own connection (boxed: it is large,
    /// and read once).
    config: Box<tokio_postgres::Config>,
    timeout: Duration,
    clock: Clock,
    observer: Option<Observer>,
    ids: IdGen,
    /// Writers of one job in this process also hold its shard's lock across the commit, so
    /// that the observer sees each job's changes in commit order (the row lock alone orders
    /// the commits, not the calls to the observer that follow them).
    locks: Box<[tokio::sync::Mutex<()>]>,
    /// As [`crate::store::JobStore`]'s: no finished job expires before this (ms); `u64::MAX`: none does; 0
    /// until the first [`PgJobStore::delete_expired`].
    next_expiry: AtomicU64,
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The error of a failed statement: [`StoreError::Unavailable`] when the connection or the
/// server is the cause (the caller may try again), [`StoreError::Database`] otherwise.
fn db_error(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        // No SQLSTATE: the connection failed (closed, reset, timed out, refused).
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        return StoreError::Unavailable(msg);
    };
    let code = db.code().code();
    let msg = format!("{} ({code})", db.message());
    // 08: connection exception; 53: insufficient resources; 57P: operator intervention (shut
    // down, cannot connect now); 40001/40P01: serialization failure, deadlock (try again);
    // 55000: e.g. a database not accepting connections.
    if code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "40001"
        || code == "40P01"
        || code == "55000"
    {
        StoreError::Unavailable(msg)
    } else {
        StoreError::Database(msg)
    }
}

/// Runs `op` within `timeout`; past it, [`StoreError::Unavailable`] (every statement of the
/// job store, the node registry and the leader row goes through it).
async fn within<T>(
    timeout: Duration,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, op).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "no answer from the database within {timeout:?}"
        )))
    })
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        e => StoreError::Unavailable(format!("no database connection: {e}")),
    }
}

/// PostgreSQL text holds no NUL: the filter columns carry U+FFFD instead (a listing checks
/// the record itself afterwards, so the substitute only widens what the index returns).
fn text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// The labels as a JSON object for the `labels` column and its `@>` filter.
fn labels_json<'a>(labels: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let map: serde_json::Map<String, serde_json::Value> = labels
        .map(|(k, v)| (text(k), serde_json::Value::String(text(v))))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn encode(rec: &JobRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(rec).map_err(|e| StoreError::Database(format!("cannot encode a job: {e}")))
}

fn decode(bytes: &[u8]) -> Result<JobRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Database(format!("a stored job cannot be read: {e}")))
}

fn tenant_of(spec: &JobSpec) -> Option<String> {
    spec.owner.as_ref().map(|o| text(&o.tenant))
}

const INSERT: &str = "INSERT INTO jobs (id, state, live, queue, priority_class, tenant, labels,
        idempotency_slot, created_ms, updated_ms, expires_ms, wire_bytes, record)
    VALUES ($1, $2, $3, $4, $5, $6, ($7::text)::jsonb, $8, $9, $9, $10, $11, $12)
    ON CONFLICT DO NOTHING RETURNING id";

const UPDATE: &str = "UPDATE jobs SET state = $2, live = $3, updated_ms = $4, expires_ms = $5,
        wire_bytes = $6, record = $7, node = $8, cancel_requested = $9, version = version + 1
    WHERE id = $1";

/// Holds the leader row, shared, for the rest of a transaction, if `fence` still leads: a new
/// leader's takeover (an UPDATE of that row) then waits for the transaction, and a takeover
/// that committed first is seen (a locking read sees the latest row version).
const FENCE: &str = "SELECT epoch FROM leader
    WHERE id = 1 AND node = $1 AND incarnation = $2 AND epoch = $3 AND expires_at > now()
    FOR SHARE";

impl PgJobStore {
    /// Connects to the database at `url` (`postgres://user[:password]@host[:port]/db`, or
    /// libpq's `key=value` form), brings its schema up to this binary's ([`SCHEMA_VERSION`])
    /// and returns the store. Fails when the URL is malformed, the database cannot be reached,
    /// or its schema is newer than this binary knows.
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Database(format!("invalid database URL '{}': {e}", redacted(url)))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.timeout);
        }
        // A peer that vanished without a reset (a partition) shows within a minute.
        config.keepalives_idle(Duration::from_secs(30));
        let manager = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .build()
            .map_err(|e| StoreError::Database(format!("cannot make the pool: {e}")))?;
        let store = Self {
            pool,
            config: Box::new(config),
            timeout: options.timeout,
            clock: system_clock(),
            observer: None,
            ids: IdGen::default(),
            locks: (0..LOCK_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            next_expiry: AtomicU64::new(0),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The node registry in the same database, sharing this store's connections.
    pub fn nodes(&self) -> nodes::PgNodes {
        nodes::PgNodes::new(self.pool.clone(), self.timeout)
    }

    /// The scheduler leader's row in the same database, sharing this store's connections.
    pub fn leader(&self) -> leader::PgLeader {
        leader::PgLeader::new(self.pool.clone(), self.timeout)
    }

    /// Reads time from `clock` (for tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Calls `observer` with every record written from now on, once durable.
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    fn notify(&self, rec: &JobRecord) {
        if let Some(observer) = &self.observer {
            observer(rec);
        }
    }

    fn lock_of(&self, name: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        &self.locks[(h.finish() % self.locks.len() as u64) as usize]
    }

    /// Runs `op` within the timeout; past it, [`StoreError::Unavailable`].
    async fn timed<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        within(self.timeout, op).await
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Brings the schema to [`SCHEMA_VERSION`] in one transaction under an advisory lock;
    /// returns the version found before.
    async fn migrate(&self) -> Result<i32, StoreError> {
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db_error)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(db_error)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_version (
                    version integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
            )
            .await
            .map_err(db_error)?;
            let found: i32 = tx
                .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
                .await
                .map_err(db_error)?
                .get(0);
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    found,
                    known: SCHEMA_VERSION,
                });
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                let version = i as i32 + 1;
                tx.batch_execute(sql).await.map_err(db_error)?;
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    &[&version],
                )
                .await
                .map_err(db_error)?;
                tracing::info!(version, "job database schema migrated");
            }
            tx.commit().await.map_err(db_error)?;
            Ok(found)
        })
        .await
    }

    /// Now, by this store's clock.
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    /// As [`crate::store::JobStore::submit`].
    pub async fn submit(&self, spec: JobSpec) -> Result<JobRecord, StoreError> {
        self.submit_traced(spec, None).await
    }

    /// As [`crate::store::JobStore::submit_traced`]; the job is returned once its row is committed. Two
    /// stores (nodes) submitting with one idempotency key return the same job.
    pub async fn submit_traced(
        &self,
        spec: JobSpec,
        traceparent: Option<String>,
    ) -> Result<JobRecord, StoreError> {
        spec.validate()?;
        let slot = idempotency_slot(&spec);
        // One writer at a time in this process per key (see `locks`); across processes the
        // unique index decides.
        let _guard = match &slot {
            Some(slot) => Some(self.lock_of(slot).lock().await),
            None => None,
        };
        let now = self.now_ms();
        let (rec, inserted) = self
            .timed(async {
                let client = self.client().await?;
                let insert = client.prepare_cached(INSERT).await.map_err(db_error)?;
                let mut rec = new_record(String::new(), spec, now, traceparent);
                let tenant = tenant_of(&rec.spec);
                let labels = labels_json(rec.spec.labels.iter());
                let slot_bytes = slot.as_ref().map(|s| s.as_bytes().to_vec());
                // An id another node took in the same millisecond, or a key whose job expired
                // between the insert and the read: try again with the next id.
                for _ in 0..100 {
                    rec.id = self.ids.next(now);
                    let bytes = encode(&rec)?;
                    let wire = i32::try_from(rec.wire_bytes()).unwrap_or(i32::MAX);
                    let inserted = client
                        .query(
                            &insert,
                            &[
                                &rec.id,
                                &rec.state.as_str(),
                                &true,
                                &text(&rec.spec.queue),
                                &text(&rec.spec.priority_class),
                                &tenant,
                                &labels,
                                &slot_bytes,
                                &ms(now),
                                &None::<i64>,
                                &wire,
                                &bytes,
                            ],
                        )
                        .await
                        .map_err(db_error)?;
                    if !inserted.is_empty() {
                        return Ok((rec, true));
                    }
                    let Some(slot) = &slot_bytes else {
                        continue;
                    };
                    let existing = client
                        .query_opt(
                            "SELECT record FROM jobs WHERE idempotency_slot = $1",
                            &[slot],
                        )
                        .await
                        .map_err(db_error)?;
                    if let Some(row) = existing {
                        let existing = decode(row.get(0))?;
                        return if existing.spec == rec.spec {
                            Ok((existing, false))
                        } else {
                            Err(StoreError::IdempotencyConflict {
                                key: rec.spec.idempotency_key.clone().unwrap_or_default(),
                                existing: existing.id,
                            })
                        };
                    }
                }
                Err(StoreError::Unavailable(
                    "no free job id after 100 tries".into(),
                ))
            })
            .await?;
        if inserted {
            // A repeated submit returns the first one's job, already told of.
            self.notify(&rec);
        }
        Ok(rec)
    }

    /// The job with `id`.
    pub async fn get(&self, id: &str) -> Result<JobRecord, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let st = client
                .prepare_cached("SELECT record FROM jobs WHERE id = $1")
                .await
                .map_err(db_error)?;
            match client.query_opt(&st, &[&id]).await.map_err(db_error)? {
                Some(row) => decode(row.get(0)),
                None => Err(StoreError::NotFound(id.to_owned())),
            }
        })
        .await
    }

    /// As [`crate::store::JobStore::list`]: one page of the jobs matching `filter` and the next page's token.
    /// The filters run in SQL on the indexed columns; each row is checked against the filter
    /// again, so pages are exactly the key-value store's.
    pub async fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<(Vec<JobRecord>, Option<String>), StoreError> {
        let page_size = match filter.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        if !filter.page_token.is_empty() && !is_id(&filter.page_token) {
            return Err(StoreError::InvalidPageToken(filter.page_token.clone()));
        }
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        let queue = filter.queue.as_deref().map(text);
        let tenant = filter.tenant.as_deref().map(text);
        let labels = labels_json(filter.labels.iter());
        let chunk = (page_size + 1).min(128) as i64;
        let (cmp, order) = if filter.newest_first {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        let mut sql = format!("SELECT id, record FROM jobs WHERE id {cmp} $1");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        let mut after = if filter.page_token.is_empty() {
            // Before every id (digits) in either direction.
            if filter.newest_first { "~" } else { "" }.to_owned()
        } else {
            filter.page_token.clone()
        };
        if !states.is_empty() {
            params.push(&states);
            sql.push_str(&format!(" AND state = ANY(${})", params.len() + 1));
        }
        if let Some(q) = &queue {
            params.push(q);
            sql.push_str(&format!(" AND queue = ${}", params.len() + 1));
        }
        if let Some(t) = &tenant {
            params.push(t);
            sql.push_str(&format!(" AND tenant = ${}", params.len() + 1));
        }
        if !filter.labels.is_empty() {
            params.push(&labels);
            sql.push_str(&format!(
                " AND labels @> (${}::text)::jsonb",
                params.len() + 1
            ));
        }
        params.push(&chunk);
        sql.push_str(&format!(" ORDER BY id {order} LIMIT ${}", params.len() + 1));
        self.timed(async {
            let client = self.client().await?;
            let st = client.prepare_cached(&sql).await.map_err(db_error)?;
            let mut page = Vec::new();
            let mut page_bytes = 0usize;
            loop {
                let mut all: Vec<&(dyn ToSql + Sync)> = vec![&after];
                all.extend(params.iter().copied());
                let rows = client.query(&st, &all).await.map_err(db_error)?;
                let exhausted = (rows.len() as i64) < chunk;
                let mut last = None;
                for row in rows {
                    let id: String = row.get(0);
                    last = Some(id.clone());
                    let rec = decode(row.get(1))?;
                    if !filter.matches(&rec) {
                        continue;
                    }
                    let bytes = rec.wire_bytes();
                    if !page.is_empty() && page_bytes.saturating_add(bytes) > MAX_PAGE_BYTES {
                        let last = page.last().map(|r: &JobRecord| r.id.clone());
                        return Ok((page, last));
                    }
                    page_bytes = page_bytes.saturating_add(bytes);
                    page.push(rec);
                    if page.len() == page_size {
                        return Ok((page, Some(id)));
                    }
                }
                match last {
                    Some(id) if !exhausted => after = id,
                    _ => return Ok((page, None)),
                }
            }
        })
        .await
    }

    /// Reads job `id` `FOR UPDATE`, lets `f` change it (returning whether it did), writes it if
    /// changed and commits; returns the job as it is after. With a `fence`, the transaction
    /// first holds the leader row and fails with [`StoreError::Fenced`] unless the fence still
    /// leads. The observer is told after the commit.
    async fn modify<F>(
        &self,
        id: &str,
        fence: Option<&LeaderFence>,
        f: F,
    ) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&mut JobRecord) -> Result<bool, StoreError>,
    {
        self.modify_telling(id, fence, true, f).await
    }

    /// [`PgJobStore::modify`], telling the observer of a change only when `tell`.
    async fn modify_telling<F>(
        &self,
        id: &str,
        fence: Option<&LeaderFence>,
        tell: bool,
        f: F,
    ) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&mut JobRecord) -> Result<bool, StoreError>,
    {
        let _guard = self.lock_of(id).lock().await;
        let (rec, changed) = self
            .timed(async {
                let mut client = self.client().await?;
                let select = client
                    .prepare_cached("SELECT record FROM jobs WHERE id = $1 FOR UPDATE")
                    .await
                    .map_err(db_error)?;
                let update = client.prepare_cached(UPDATE).await.map_err(db_error)?;
                let fenced = match fence {
                    Some(_) => Some(client.prepare_cached(FENCE).await.map_err(db_error)?),
                    None => None,
                };
                let tx = client.transaction().await.map_err(db_error)?;
                if let (Some(fence), Some(st)) = (fence, &fenced) {
                    let epoch = i64::try_from(fence.epoch).unwrap_or(i64::MAX);
                    let held = tx
                        .query_opt(st, &[&fence.node, &fence.incarnation, &epoch])
                        .await
                        .map_err(db_error)?;
                    if held.is_none() {
                        return Err(StoreError::Fenced(format!(
                            "node {} no longer leads with epoch {} (a newer leader exists, or its lease ran out)",
                            fence.node, fence.epoch
                        )));
                    }
                }
                let Some(row) = tx.query_opt(&select, &[&id]).await.map_err(db_error)? else {
                    return Err(StoreError::NotFound(id.to_owned()));
                };
                let mut rec = decode(row.get(0))?;
                if !f(&mut rec)? {
                    return Ok((rec, false));
                }
                let wire = i32::try_from(rec.wire_bytes()).unwrap_or(i32::MAX);
                let node = rec.placement.as_ref().map(|p| text(&p.node));
                tx.execute(
                    &update,
                    &[
                        &id,
                        &rec.state.as_str(),
                        &!rec.state.is_terminal(),
                        &ms(self.now_ms()),
                        &expires_ms(&rec).map(ms),
                        &wire,
                        &encode(&rec)?,
                        &node,
                        &rec.cancel_requested,
                    ],
                )
                .await
                .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                Ok((rec, true))
            })
            .await?;
        if changed {
            if let Some(at) = expires_ms(&rec) {
                self.next_expiry.fetch_min(at, Ordering::AcqRel);
            }
            if tell {
                self.notify(&rec);
            }
        }
        Ok(rec)
    }

    /// As [`crate::store::JobStore::update`], in one transaction holding the job's row.
    pub async fn update<F>(&self, id: &str, f: F) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError>,
    {
        let now = self.now_ms();
        self.modify(id, None, |rec| {
            let change = f(rec)?;
            apply(rec, change, now)?;
            Ok(true)
        })
        .await
    }

    /// As [`crate::store::JobStore::mark_paused`]: not a change of state, the observer is not
    /// told.
    pub async fn mark_paused(
        &self,
        id: &str,
        why: Option<&str>,
        placed: Option<&Placement>,
    ) -> Result<Option<JobRecord>, StoreError> {
        let now = self.now_ms();
        let mut changed = false;
        let rec = self
            .modify_telling(id, None, false, |rec| {
                changed = mark_pause(rec, why, placed, now);
                Ok(changed)
            })
            .await?;
        Ok(changed.then_some(rec))
    }

    /// [`PgJobStore::update`] by a cluster leader: refused ([`StoreError::Fenced`]) in the
    /// same transaction unless `fence` still leads.
    pub async fn update_as_leader<F>(
        &self,
        id: &str,
        fence: &LeaderFence,
        f: F,
    ) -> Result<JobRecord, StoreError>
    where
        F: FnOnce(&JobRecord) -> Result<Change, StoreError>,
    {
        let now = self.now_ms();
        self.modify(id, Some(fence), |rec| {
            let change = f(rec)?;
            apply(rec, change, now)?;
            Ok(true)
        })
        .await
    }

    /// Cancels job `id` for a node that does not run it: a waiting job is CANCELLED at once;
    /// an admitted or running one is marked `cancel_requested`, for its node to stop.
    pub async fn request_cancel(&self, id: &str) -> Result<JobRecord, StoreError> {
        let now = self.now_ms();
        self.modify(id, None, |rec| match rec.state {
            JobState::Admitted | JobState::Running => {
                let asked = !rec.cancel_requested;
                rec.cancel_requested = true;
                Ok(asked)
            }
            _ => {
                apply(rec, Change::to(JobState::Cancelled, "cancelled"), now)?;
                Ok(true)
            }
        })
        .await
    }

    /// Every live job as it is.
    pub async fn live(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.records("SELECT record FROM jobs WHERE live ORDER BY id", &[])
            .await
    }

    /// The live jobs placed on `node` that are ADMITTED or asked to cancel.
    pub async fn placed_on(&self, node: &str) -> Result<Vec<JobRecord>, StoreError> {
        let node = text(node);
        self.records(
            "SELECT record FROM jobs WHERE live AND node = $1
                AND (state = 'ADMITTED' OR cancel_requested) ORDER BY id",
            &[&node],
        )
        .await
    }

    async fn records(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<JobRecord>, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let st = client.prepare_cached(sql).await.map_err(db_error)?;
            let rows = client.query(&st, params).await.map_err(db_error)?;
            rows.iter().map(|r| decode(r.get(0))).collect()
        })
        .await
    }

    /// Stores piece `seq` of the output of attempt `attempt` of job `id` (`stream`: stdout,
    /// stderr, combined, or `crate::cluster::LOG_END` after the last piece). A piece stored before is kept
    /// (a retried call changes nothing).
    pub async fn append_log(
        &self,
        id: &str,
        attempt: u32,
        seq: u32,
        stream: &str,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
        let seq = i32::try_from(seq).unwrap_or(i32::MAX);
        self.timed(async {
            let client = self.client().await?;
            let st = client
                .prepare_cached(
                    "INSERT INTO job_logs (job_id, attempt, seq, stream, data)
                    VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(db_error)?;
            client
                .execute(&st, &[&id, &attempt, &seq, &stream, &data])
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// Up to `limit` pieces of an attempt's output after piece `after` (all: `None`), in order.
    pub async fn read_logs(
        &self,
        id: &str,
        attempt: u32,
        after: Option<u32>,
        limit: usize,
    ) -> Result<Vec<LogPiece>, StoreError> {
        let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
        let after = after.map_or(-1, |a| i32::try_from(a).unwrap_or(i32::MAX));
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        self.timed(async {
            let client = self.client().await?;
            let st = client
                .prepare_cached(
                    "SELECT seq, stream, data FROM job_logs
                    WHERE job_id = $1 AND attempt = $2 AND seq > $3 ORDER BY seq LIMIT $4",
                )
                .await
                .map_err(db_error)?;
            let rows = client
                .query(&st, &[&id, &attempt, &after, &limit])
                .await
                .map_err(db_error)?;
            Ok(rows
                .iter()
                .map(|r| LogPiece {
                    seq: u32::try_from(r.get::<_, i32>(0)).unwrap_or(0),
                    stream: r.get(1),
                    data: r.get(2),
                })
                .collect())
        })
        .await
    }

    /// The live jobs' ids, states and nodes (the columns only).
    pub async fn live_index(&self) -> Result<Vec<LiveEntry>, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT id, state, node FROM jobs WHERE live ORDER BY id",
                    &[],
                )
                .await
                .map_err(db_error)?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let state: &str = r.get(1);
                    Some(LiveEntry {
                        id: r.get(0),
                        state: JobState::ALL.into_iter().find(|s| s.as_str() == state)?,
                        node: r.get(2),
                    })
                })
                .collect())
        })
        .await
    }

    /// The job changes every node commits, as the database announces them (migration 3's
    /// trigger), from a connection of their own: [`JobNotice::Resync`] first and after every
    /// reconnection (announcements made while disconnected are lost). Ends when the receiver
    /// is dropped.
    pub fn notices(&self) -> tokio::sync::mpsc::Receiver<JobNotice> {
        let (tx, rx) = tokio::sync::mpsc::channel(NOTICE_BACKLOG);
        tokio::spawn(listen((*self.config).clone(), tx));
        rx
    }

    /// [`PgJobStore::update`] to `to` for `reason`.
    pub async fn transition(
        &self,
        id: &str,
        to: JobState,
        reason: impl Into<String>,
    ) -> Result<JobRecord, StoreError> {
        let change = Change::to(to, reason);
        self.update(id, |_| Ok(change)).await
    }

    /// As [`crate::store::JobStore::recover`], over every live job of the database.
    pub async fn recover(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.recover_with(false).await
    }

    /// As [`crate::store::JobStore::recover_adopting`].
    pub async fn recover_adopting(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.recover_with(true).await
    }

    async fn recover_with(&self, keep_running: bool) -> Result<Vec<JobRecord>, StoreError> {
        let ids: Vec<String> = self
            .timed(async {
                let client = self.client().await?;
                let rows = client
                    .query("SELECT id FROM jobs WHERE live ORDER BY id", &[])
                    .await
                    .map_err(db_error)?;
                Ok(rows.into_iter().map(|r| r.get(0)).collect())
            })
            .await?;
        let now = self.now_ms();
        let mut live = Vec::with_capacity(ids.len());
        for id in ids {
            let rec = self
                .modify(&id, None, |rec| {
                    let reason = format!("coordinator restarted; attempt {}", rec.attempt + 1);
                    Ok(match rec.state {
                        JobState::Running if !keep_running => {
                            apply(rec, Change::to(JobState::RetryWait, reason.clone()), now)?;
                            apply(rec, Change::to(JobState::Queued, reason), now)?;
                            true
                        }
                        JobState::Admitted => {
                            apply(rec, Change::to(JobState::Queued, reason), now)?;
                            true
                        }
                        _ => false,
                    })
                })
                .await;
            match rec {
                Ok(rec) if !rec.state.is_terminal() => live.push(rec),
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(live)
    }

    /// As [`crate::store::JobStore::next_expiry_ms`] (this store's own writes and sweeps only).
    pub fn next_expiry_ms(&self) -> Option<u64> {
        match self.next_expiry.load(Ordering::Acquire) {
            u64::MAX => None,
            at => Some(at),
        }
    }

    /// As [`crate::store::JobStore::delete_expired`]: up to `limit` finished jobs whose TTL ran out by
    /// `now_ms` are deleted in one statement (their idempotency keys with them), skipping rows
    /// another transaction holds.
    pub async fn delete_expired(&self, now_ms: u64, limit: usize) -> Result<Expired, StoreError> {
        self.next_expiry.store(u64::MAX, Ordering::Release);
        let result = self
            .timed(async {
                let client = self.client().await?;
                let rows = client
                    .query(
                        "DELETE FROM jobs WHERE id IN (
                            SELECT id FROM jobs
                            WHERE expires_ms <= $1 AND NOT live
                            ORDER BY expires_ms, id LIMIT $2
                            FOR UPDATE SKIP LOCKED)
                        RETURNING expires_ms, id",
                        &[&ms(now_ms), &(limit.max(1) as i64)],
                    )
                    .await
                    .map_err(db_error)?;
                let mut deleted: Vec<(i64, String)> =
                    rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
                deleted.sort();
                let next: Option<i64> = client
                    .query_one(
                        "SELECT min(expires_ms) FROM jobs WHERE expires_ms IS NOT NULL",
                        &[],
                    )
                    .await
                    .map_err(db_error)?
                    .get(0);
                Ok((deleted, next))
            })
            .await;
        match result {
            Ok((deleted, next)) => {
                let next = next.map_or(u64::MAX, |n| u64::try_from(n).unwrap_or(0));
                self.next_expiry.fetch_min(next, Ordering::AcqRel);
                Ok(Expired {
                    deleted: deleted.into_iter().map(|(_, id)| id).collect(),
                    next_ms: self.next_expiry_ms(),
                })
            }
            Err(e) => {
                self.next_expiry.store(0, Ordering::Release);
                Err(e)
            }
        }
    }
}

/// Announcements waiting for the runner; beyond it the listener waits (the database buffers).
const NOTICE_BACKLOG: usize = 4096;

/// The notice listener: LISTENs on its own connection and forwards announcements; on a lost
/// connection, reconnects with a growing pause (100 ms to 5 s) and says [`JobNotice::Resync`].
async fn listen(config: tokio_postgres::Config, tx: tokio::sync::mpsc::Sender<JobNotice>) {
    let mut pause = Duration::from_millis(100);
    loop {
        if tx.is_closed() {
            return;
        }
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                // The connection's messages (the announcements among them) come from polling
                // it; the client's LISTEN goes through it too.
                let (msgs_tx, mut msgs) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut stream =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    use futures::StreamExt;
                    while let Some(msg) = stream.next().await {
                        match msg {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if msgs_tx.send(n.payload().to_owned()).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "job notice connection lost");
                                return;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {JOB_CHANNEL}")).await {
                    tracing::warn!(error = %e, "cannot listen for job notices");
                    driver.abort();
                } else {
                    pause = Duration::from_millis(100);
                    if tx.send(JobNotice::Resync).await.is_err() {
                        driver.abort();
                        return;
                    }
                    while let Some(payload) = msgs.recv().await {
                        match JobNotice::parse(&payload) {
                            Some(notice) => {
                                if tx.send(notice).await.is_err() {
                                    driver.abort();
                                    return;
                                }
                            }
                            None => tracing::warn!(%payload, "a job notice could not be read"),
                        }
                    }
                    drop(client);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect for job notices"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

pub mod leader;
pub mod nodes;
#[cfg(test)]
pub(crate) mod testdb;
#[cfg(test)]
mod tests;
