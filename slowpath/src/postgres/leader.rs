//! [`PgLeader`]: which node is the cluster's scheduler leader, kept in the job database's
//! `leader` table (migration 3): one row holding the leader's node, process (incarnation),
//! epoch and lease end.
//!
//! Rules:
//! 1. **One leader at a time, by the database's clock.** A node takes the row only when its
//!    lease has ended (`expires_at <= now()`), and takes it with the next epoch; the holder
//!    renews it while it is valid, keeping its epoch. Every time compared is the database's
//!    `now()`, so no node's clock decides.
//! 2. **Epochs only grow.** Each takeover writes `epoch + 1`; a holder that let its lease run
//!    out and takes the row back gets a new epoch too, so its own earlier writes are fenced.
//! 3. **Fencing.** A leader's writes to jobs hold the row `FOR SHARE` in their transaction and
//!    check node, incarnation, epoch and `expires_at > now()` (`PgJobStore::update_as_leader`):
//!    a takeover, an UPDATE of the row, either commits before (and the write sees it and is
//!    refused) or waits for the write's commit. So once a new epoch is committed, no write of
//!    an older one can commit: a paused or partitioned old leader cannot admit or place.
//! 4. **Leaving.** A leader that stops ends its lease at once (`resign`), so that the next
//!    takes over without waiting for it to run out.

use std::time::Duration;

use deadpool_postgres::Pool;

use super::{db_error, pool_error};
use crate::cluster::LeaderFence;
use crate::store::StoreError;

/// The leader row; see the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct PgLeader {
    pool: Pool,
    timeout: Duration,
}

/// What a try for leadership found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// This process leads under `fence` until `remaining_ms` from now (database clock).
    Leader {
        fence: LeaderFence,
        remaining_ms: u64,
    },
    /// Another process leads (or led: `remaining_ms` is 0 when its lease ran out and nobody
    /// took over yet).
    Follower {
        node: String,
        epoch: u64,
        remaining_ms: u64,
    },
}

/// The leader row as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderRow {
    pub node: String,
    pub epoch: u64,
    /// Until its lease ends (0: ended), by the database's clock.
    pub remaining_ms: u64,
    /// Since when it leads, ms since the Unix epoch by the database's clock.
    pub since_ms: u64,
}

fn remaining(row: &tokio_postgres::Row, column: usize) -> u64 {
    u64::try_from(row.get::<_, i64>(column)).unwrap_or(0)
}

impl PgLeader {
    pub(super) fn new(pool: Pool, timeout: Duration) -> Self {
        Self { pool, timeout }
    }

    async fn timed<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        super::within(self.timeout, op).await
    }

    /// Takes the leadership for `node` (this process: `incarnation`) if the row's lease has
    /// ended, or renews it if this process holds it with a valid lease; one statement. Says
    /// who leads afterwards.
    pub async fn acquire_or_renew(
        &self,
        node: &str,
        incarnation: &str,
        lease: Duration,
    ) -> Result<Leadership, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        self.timed(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let st = client
                .prepare_cached(
                    "UPDATE leader SET
                        epoch = CASE WHEN incarnation = $2 AND expires_at > now()
                            THEN epoch ELSE epoch + 1 END,
                        acquired_at = CASE WHEN incarnation = $2 AND expires_at > now()
                            THEN acquired_at ELSE now() END,
                        node = $1, incarnation = $2,
                        expires_at = now() + $3::bigint * interval '1 millisecond'
                    WHERE id = 1 AND ((incarnation = $2 AND expires_at > now())
                        OR expires_at <= now())
                    RETURNING epoch, $3::bigint",
                )
                .await
                .map_err(db_error)?;
            if let Some(row) = client
                .query_opt(&st, &[&node, &incarnation, &lease_ms])
                .await
                .map_err(db_error)?
            {
                return Ok(Leadership::Leader {
                    fence: LeaderFence {
                        node: node.to_owned(),
                        incarnation: incarnation.to_owned(),
                        epoch: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                    },
                    remaining_ms: remaining(&row, 1),
                });
            }
            let row = current(&client).await?;
            Ok(Leadership::Follower {
                node: row.node,
                epoch: row.epoch,
                remaining_ms: row.remaining_ms,
            })
        })
        .await
    }

    /// Ends `fence`'s lease now, if it still holds it: the next node takes over at its next
    /// try.
    pub async fn resign(&self, fence: &LeaderFence) -> Result<(), StoreError> {
        let epoch = i64::try_from(fence.epoch).unwrap_or(i64::MAX);
        self.timed(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            client
                .execute(
                    "UPDATE leader SET expires_at = now()
                    WHERE id = 1 AND incarnation = $1 AND epoch = $2 AND expires_at > now()",
                    &[&fence.incarnation, &epoch],
                )
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// The leader row as it is now.
    pub async fn current(&self) -> Result<LeaderRow, StoreError> {
        self.timed(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            current(&client).await
        })
        .await
    }
}

async fn current(client: &deadpool_postgres::Object) -> Result<LeaderRow, StoreError> {
    let row = client
        .query_one(
            "SELECT node, epoch,
                greatest(0, (extract(epoch FROM expires_at - now()) * 1000)::bigint),
                (extract(epoch FROM acquired_at) * 1000)::bigint
            FROM leader WHERE id = 1",
            &[],
        )
        .await
        .map_err(db_error)?;
    Ok(LeaderRow {
        node: row.get(0),
        epoch: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        remaining_ms: remaining(&row, 2),
        since_ms: remaining(&row, 3),
    })
}
