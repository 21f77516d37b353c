//! A scratch PostgreSQL database for the cluster benchmarks (`jobs --cluster-nodes`,
//! `failover`): created fresh from an admin URL (`--pg`, default
//! `postgres://postgres@127.0.0.1:5432/test`, the database it connects to for CREATE/DROP),
//! named `vt_load_<pid>_<n>_<nanos>`, and dropped `WITH (FORCE)` (closing the connections the
//! coordinators may still hold) by [`ScratchDb::drop_now`] or, failing that, when dropped.
//!
//! The admin URL must be `postgres://…/<database>`, with no query string: the scratch
//! database's URL is the admin URL with its last path segment replaced, and the name is
//! made here from digits and letters only, so it is safe inside the SQL statements.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

/// The admin URL used when `--pg` is not given.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// `admin` with its database replaced by `name`; an error naming what is wrong when `admin`
/// is not `postgres://HOST…/DATABASE` (or `postgresql://`) without a query string.
pub fn url_for(admin: &str, name: &str) -> anyhow::Result<String> {
    let rest = admin
        .strip_prefix("postgres://")
        .or_else(|| admin.strip_prefix("postgresql://"))
        .with_context(|| format!("--pg {admin:?}: expected postgres://USER@HOST:PORT/DATABASE"))?;
    if admin.contains('?') {
        bail!("--pg {admin:?}: a query string is not supported here");
    }
    match rest.rsplit_once('/') {
        Some((host, db)) if !host.is_empty() && !db.is_empty() => {
            let scheme_len = admin.len() - rest.len();
            Ok(format!("{}{host}/{name}", &admin[..scheme_len]))
        }
        _ => bail!("--pg {admin:?}: expected postgres://USER@HOST:PORT/DATABASE"),
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("PostgreSQL does not answer at {url}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// A fresh database; see the module documentation.
pub struct ScratchDb {
    admin: String,
    name: String,
    url: String,
    dropped: bool,
}

impl ScratchDb {
    /// Creates a database from `admin` (see the module documentation).
    pub async fn create(admin: &str) -> anyhow::Result<ScratchDb> {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "vt_load_{}_{}_{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let url = url_for(admin, &name)?;
        connect(admin)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("CREATE DATABASE {name} through {admin}"))?;
        Ok(ScratchDb {
            admin: admin.to_owned(),
            name,
            url,
            dropped: false,
        })
    }

    /// The database's URL, for `veraltheim serve --store`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The scheduler leader's row as the database has it now: (node, epoch, milliseconds its
    /// lease has left by the database's clock).
    pub async fn leader_row(&self) -> anyhow::Result<(String, u64, i64)> {
        let row = connect(&self.url)
            .await?
            .query_one(
                "SELECT node, epoch,
                    (extract(epoch FROM expires_at - now()) * 1000)::bigint
                FROM leader WHERE id = 1",
                &[],
            )
            .await
            .with_context(|| format!("cannot read the leader row of {}", self.name))?;
        let epoch: i64 = row.get(1);
        Ok((row.get(0), u64::try_from(epoch).unwrap_or(0), row.get(2)))
    }

    /// Drops the database now (closing every connection to it).
    pub async fn drop_now(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        connect(&self.admin)
            .await?
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("DROP DATABASE {}", self.name))
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop may run inside a runtime, where blocking on another is refused: a thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(c) = connect(&admin).await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scratch_url_replaces_the_database() {
        assert_eq!(
            url_for("postgres://postgres@127.0.0.1:5432/test", "vt_x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/vt_x"
        );
        assert_eq!(
            url_for("postgresql://u:p@db/admin", "vt_y").unwrap(),
            "postgresql://u:p@db/vt_y"
        );
        for bad in [
            "mysql://h/db",
            "postgres://h/",
            "postgres://h",
            "postgres:///db",
            "postgres://h/db?sslmode=disable",
        ] {
            let e = url_for(bad, "vt").unwrap_err().to_string();
            assert!(e.contains("--pg"), "{bad}: {e}");
        }
    }
}
