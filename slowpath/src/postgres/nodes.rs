//! [`PgNodes`]: the node registry in the job database (table `nodes`, migration 2), shared by
//! every coordinator on it.
//!
//! Each node has one row, keyed by its id, holding what it last said of itself
//! ([`NodeReport`]), its lease and the operator's `draining` flag. Leases are the database's:
//! `lease_expires` is written as `now() + lease` by the database and compared with its `now()`
//! when listed, so no node's clock decides another's state (the leader election to come reads
//! the same clock). A row also names the process that holds it (`incarnation`, random per
//! start): a second process with the same id can take the row only once the holder's lease
//! has lapsed (or it left), so two live processes never share an id, and a process that lost
//! its row learns it at its next renewal.

use std::time::Duration;

use deadpool_postgres::Pool;

use super::{db_error, pool_error};
use crate::cluster::{NodeRecord, NodeReport, node_state};
use crate::job::Resources;
use crate::store::StoreError;

/// The node registry; see the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct PgNodes {
    pool: Pool,
    timeout: Duration,
}

/// What a registration found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// The row is this process's; `draining` is the operator's flag (kept across restarts).
    Registered { draining: bool },
    /// Another process holds the id with a valid lease.
    Held {
        address: String,
        /// Until its lease ends, by the database's clock.
        remaining_ms: u64,
    },
}

/// What a renewal found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed; the operator's drain flag as it is now.
    Renewed { draining: bool },
    /// The row is gone or another process took the id: this process no longer holds it.
    Lost,
}

/// A timestamp column as ms since the Unix epoch.
fn ms_of(column: &str) -> String {
    format!("(extract(epoch FROM {column}) * 1000)::bigint")
}

fn labels_text(report: &NodeReport) -> String {
    serde_json::to_string(&report.labels).unwrap_or_else(|_| "{}".into())
}

fn models_text(report: &NodeReport) -> String {
    serde_json::to_string(&report.models).unwrap_or_else(|_| "[]".into())
}

fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PgNodes {
    pub(super) fn new(pool: Pool, timeout: Duration) -> Self {
        Self { pool, timeout }
    }

    async fn timed<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        super::within(self.timeout, op).await
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Registers this process (`incarnation`) as node `report.id` with a lease of `lease`, in
    /// one statement: a new row, or the id's row when it is this process's, its holder's lease
    /// has lapsed, or its holder left. The drain flag of an existing row is kept.
    pub async fn register(
        &self,
        report: &NodeReport,
        incarnation: &str,
        lease: Duration,
    ) -> Result<Registration, StoreError> {
        let lease_ms = big(lease.as_millis() as u64);
        self.timed(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "INSERT INTO nodes (id, address, state, labels, version, cores, memory_bytes,
                        gpus, models, running_jobs, incarnation, lease_ms, started_at,
                        last_heartbeat, lease_expires, admitting, job_cpu_millis,
                        job_memory_bytes, job_gpus, job_slots)
                    VALUES ($1, $2, 'up', ($3::text)::jsonb, $4, $5, $6, $7, ($8::text)::jsonb,
                        $9, $10, $11::bigint, now(), now(), now() + $11::bigint * interval '1 millisecond', $12,
                        $13, $14, $15, $16)
                    ON CONFLICT (id) DO UPDATE SET
                        address = EXCLUDED.address, state = 'up', labels = EXCLUDED.labels,
                        version = EXCLUDED.version, cores = EXCLUDED.cores,
                        memory_bytes = EXCLUDED.memory_bytes, gpus = EXCLUDED.gpus,
                        models = EXCLUDED.models, running_jobs = EXCLUDED.running_jobs,
                        incarnation = EXCLUDED.incarnation, lease_ms = EXCLUDED.lease_ms,
                        started_at = CASE WHEN nodes.incarnation = EXCLUDED.incarnation
                            THEN nodes.started_at ELSE now() END,
                        last_heartbeat = now(), lease_expires = EXCLUDED.lease_expires,
                        admitting = EXCLUDED.admitting, job_cpu_millis = EXCLUDED.job_cpu_millis,
                        job_memory_bytes = EXCLUDED.job_memory_bytes,
                        job_gpus = EXCLUDED.job_gpus, job_slots = EXCLUDED.job_slots
                    WHERE nodes.incarnation = EXCLUDED.incarnation
                        OR nodes.lease_expires <= now() OR nodes.state = 'left'
                    RETURNING draining",
                    &[
                        &report.id,
                        &report.address,
                        &labels_text(report),
                        &report.version,
                        &int(report.cores),
                        &big(report.memory_bytes),
                        &int(report.gpus),
                        &models_text(report),
                        &int(report.running_jobs),
                        &incarnation,
                        &lease_ms,
                        &report.admitting,
                        &big(report.job_capacity.cpu_millis),
                        &big(report.job_capacity.memory_bytes),
                        &int(report.job_capacity.gpus),
                        &int(report.job_slots),
                    ],
                )
                .await
                .map_err(db_error)?;
            if let Some(row) = row {
                return Ok(Registration::Registered {
                    draining: row.get(0),
                });
            }
            let holder = client
                .query_opt(
                    &format!(
                        "SELECT address, {} - {} FROM nodes WHERE id = $1",
                        ms_of("lease_expires"),
                        ms_of("now()")
                    ),
                    &[&report.id],
                )
                .await
                .map_err(db_error)?;
            Ok(match holder {
                Some(row) => Registration::Held {
                    address: row.get(0),
                    remaining_ms: unsigned(row.get(1)),
                },
                // Deleted in between: the next try takes it.
                None => Registration::Held {
                    address: String::new(),
                    remaining_ms: 0,
                },
            })
        })
        .await
    }

    /// Renews this process's lease for another lease from the database's `now()` and records
    /// what it says of itself now (models, running jobs, whether it admits, the CPU it offers
    /// jobs: the configured capacity less what its fast path uses).
    pub async fn renew(
        &self,
        report: &NodeReport,
        incarnation: &str,
    ) -> Result<Renewal, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let st = client
                .prepare_cached(
                    "UPDATE nodes SET last_heartbeat = now(),
                        lease_expires = now() + lease_ms * interval '1 millisecond',
                        models = ($3::text)::jsonb, running_jobs = $4, admitting = $5,
                        address = $6, state = 'up', job_cpu_millis = $7
                    WHERE id = $1 AND incarnation = $2
                    RETURNING draining",
                )
                .await
                .map_err(db_error)?;
            let row = client
                .query_opt(
                    &st,
                    &[
                        &report.id,
                        &incarnation,
                        &models_text(report),
                        &int(report.running_jobs),
                        &report.admitting,
                        &report.address,
                        &big(report.job_capacity.cpu_millis),
                    ],
                )
                .await
                .map_err(db_error)?;
            Ok(match row {
                Some(row) => Renewal::Renewed {
                    draining: row.get(0),
                },
                None => Renewal::Lost,
            })
        })
        .await
    }

    /// Gives the id up at shutdown: the node is DEAD at once (its lease set one lease in the
    /// past), and another process may take the id.
    pub async fn leave(&self, id: &str, incarnation: &str) -> Result<(), StoreError> {
        self.timed(async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE nodes SET state = 'left',
                        lease_expires = now() - lease_ms * interval '1 millisecond'
                    WHERE id = $1 AND incarnation = $2",
                    &[&id, &incarnation],
                )
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// Deletes the rows of nodes whose lease ended more than `after` ago (by the database's
    /// clock): with a new id per pod, the registry would otherwise only grow. Returns how many.
    pub async fn prune(&self, after: Duration) -> Result<u64, StoreError> {
        let after_ms = big(after.as_millis() as u64);
        self.timed(async {
            let client = self.client().await?;
            client
                .execute(
                    "DELETE FROM nodes
                    WHERE lease_expires < now() - $1::bigint * interval '1 millisecond'",
                    &[&after_ms],
                )
                .await
                .map_err(db_error)
        })
        .await
    }

    /// Every node, by id, its state computed against the database's clock.
    pub async fn list(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.select(None).await
    }

    /// Node `id`, if it is registered.
    pub async fn get(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self.select(Some(id)).await?.into_iter().next())
    }

    async fn select(&self, id: Option<&str>) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = format!(
            "SELECT id, address, labels::text, version, cores, memory_bytes, gpus, models::text,
                running_jobs, lease_ms, {}, {}, {}, draining, admitting, {}, incarnation,
                job_cpu_millis, job_memory_bytes, job_gpus, job_slots
            FROM nodes WHERE $1::text IS NULL OR id = $1 ORDER BY id",
            ms_of("started_at"),
            ms_of("last_heartbeat"),
            ms_of("lease_expires"),
            ms_of("now()"),
        );
        self.timed(async {
            let client = self.client().await?;
            let st = client.prepare_cached(&sql).await.map_err(db_error)?;
            let rows = client.query(&st, &[&id]).await.map_err(db_error)?;
            rows.into_iter()
                .map(|row| {
                    let labels: String = row.get(2);
                    let models: String = row.get(7);
                    let lease_ms: i64 = row.get(9);
                    let expires: i64 = row.get(12);
                    let draining: bool = row.get(13);
                    let now: i64 = row.get(15);
                    Ok(NodeRecord {
                        report: NodeReport {
                            id: row.get(0),
                            address: row.get(1),
                            labels: serde_json::from_str(&labels).map_err(|e| {
                                StoreError::Database(format!("a node's labels cannot be read: {e}"))
                            })?,
                            version: row.get(3),
                            cores: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
                            memory_bytes: unsigned(row.get(5)),
                            gpus: u32::try_from(row.get::<_, i32>(6)).unwrap_or(0),
                            models: serde_json::from_str(&models).map_err(|e| {
                                StoreError::Database(format!("a node's models cannot be read: {e}"))
                            })?,
                            running_jobs: u32::try_from(row.get::<_, i32>(8)).unwrap_or(0),
                            admitting: row.get(14),
                            job_capacity: Resources {
                                cpu_millis: unsigned(row.get(17)),
                                memory_bytes: unsigned(row.get(18)),
                                gpus: u32::try_from(row.get::<_, i32>(19)).unwrap_or(0),
                                gpu_memory_bytes: 0,
                            },
                            job_slots: u32::try_from(row.get::<_, i32>(20)).unwrap_or(0),
                        },
                        state: node_state(now, expires, lease_ms, draining),
                        draining,
                        lease_ms: unsigned(lease_ms),
                        started_ms: unsigned(row.get(10)),
                        last_heartbeat_ms: unsigned(row.get(11)),
                        lease_expires_ms: unsigned(expires),
                        now_ms: unsigned(now),
                        incarnation: row.get(16),
                    })
                })
                .collect()
        })
        .await
    }

    /// Sets (`true`) or clears the drain flag of node `id`; `false` when no such node is
    /// registered. The node applies it at its next renewal.
    pub async fn set_draining(&self, id: &str, draining: bool) -> Result<bool, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let n = client
                .execute(
                    "UPDATE nodes SET draining = $2 WHERE id = $1",
                    &[&id, &draining],
                )
                .await
                .map_err(db_error)?;
            Ok(n > 0)
        })
        .await
    }
}
