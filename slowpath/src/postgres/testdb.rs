//! A database of its own for each test, on the real PostgreSQL the tests run against
//! (`VERALTHEIM_TEST_PG`, default `postgres://postgres@127.0.0.1:5432/test`): created with a
//! random name, dropped when the test ends, so that tests run in parallel.

use std::sync::atomic::{AtomicU32, Ordering};

/// The database the test databases are created from.
pub(crate) fn admin_url() -> String {
    std::env::var("VERALTHEIM_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A connection to the admin database; panics, saying what to do, when PostgreSQL does not
/// answer.
pub(crate) async fn admin() -> tokio_postgres::Client {
    let url = admin_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL does not answer at {url} ({e}): start it (scripts/test does), or set VERALTHEIM_TEST_PG"
            )
        });
    tokio::spawn(conn);
    client
}

/// A fresh database, dropped (with any connection still open to it) on drop.
pub(crate) struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub(crate) async fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "vt_test_{}_{}_{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let admin = admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Self { name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime's reach (maybe inside one): a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client = admin().await;
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}
