//! Support for other crates' tests and benchmarks that need a PostgreSQL of their own: a
//! throw-away schema on the server named by `REMIT_TEST_POSTGRES_URL`. Compiled only with the
//! `testing` feature, so production builds carry none of it.

use sqlx::Executor;
use sqlx::postgres::PgPool;

use crate::{Result, StoreError};

/// The environment variable naming the PostgreSQL server tests use.
pub const POSTGRES_URL_VAR: &str = "REMIT_TEST_POSTGRES_URL";

/// The server URL from the environment; `None` when unset, except under `CI=true`, where a
/// missing database must fail the run instead of silently skipping PostgreSQL tests.
#[expect(
    clippy::panic,
    reason = "test support: a CI run without its database must stop"
)]
pub fn postgres_url() -> Option<String> {
    match std::env::var(POSTGRES_URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{POSTGRES_URL_VAR} must be set under CI")
        }
        _ => {
            eprintln!("note: skipping a PostgreSQL test: set {POSTGRES_URL_VAR} to run it");
            None
        }
    }
}

/// A schema created for one test; `url` opens a store whose tables live in it.
#[derive(Debug)]
pub struct PostgresSchema {
    pub url: String,
    pub name: String,
    admin: PgPool,
}

impl PostgresSchema {
    pub async fn create(base_url: &str) -> Result<PostgresSchema> {
        let unavailable = |e: sqlx::Error| StoreError::Unavailable(e.to_string());
        let admin = PgPool::connect(base_url).await.map_err(unavailable)?;
        let name = format!("remit_test_{:016x}", random_u64());
        admin
            .execute(format!("CREATE SCHEMA {name}").as_str())
            .await
            .map_err(unavailable)?;
        let separator = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{separator}options=-c%20search_path%3D{name}");
        Ok(PostgresSchema { url, name, admin })
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(self) -> Result<()> {
        self.admin
            .execute(format!("DROP SCHEMA {} CASCADE", self.name).as_str())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(())
    }
}

/// Enough randomness to keep concurrent tests' schema names apart.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.finish()
}
