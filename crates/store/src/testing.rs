//! Support for other crates' tests and benchmarks that need a PostgreSQL of their own (a
//! throw-away schema on the server named by `REMIT_TEST_POSTGRES_URL`), a network cut, a
//! way around the store to tamper with its rows, or the test environment's Python. Compiled only with the
//! `testing` feature, so production builds carry none of it.

use sqlx::Executor;
use sqlx::postgres::PgPool;

use crate::{Result, StoreError};

/// The environment variable naming the PostgreSQL server tests use.
pub const POSTGRES_URL_VAR: &str = "REMIT_TEST_POSTGRES_URL";

/// The environment variable naming the Python interpreter of a virtual environment with the
/// test requirements installed (`crates/*/tests/python/requirements.txt`; `.ci/run` sets it
/// up): the official MCP SDK for the gateway, schemathesis for the OpenAPI document.
pub const PYTHON_VAR: &str = "REMIT_TEST_PYTHON";

/// The server URL from the environment for the test named `what` (the note a skipped test
/// prints names it); `None` when unset, except under `CI=true`, where a missing database must
/// fail the run instead of silently skipping PostgreSQL tests.
pub fn postgres_url(what: &str) -> Option<String> {
    required_under_ci(POSTGRES_URL_VAR, what)
}

/// The test virtual environment's Python for the test named `what`; `None` when unset,
/// except under `CI=true`.
pub fn python(what: &str) -> Option<String> {
    required_under_ci(PYTHON_VAR, what)
}

/// A test's environment variable: `None` (with a note naming `what` is skipped) when unset,
/// except under `CI=true`, where a missing one must fail the run instead of silently
/// skipping the test.
#[expect(
    clippy::panic,
    reason = "test support: a CI run without what its tests need must stop"
)]
pub fn required_under_ci(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{var} must be set under CI")
        }
        _ => {
            // Written to the process's stderr, not through `eprintln!`, which the test harness
            // captures and shows only for failing tests: a skip must be seen in a green run.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "note: skipped {what}: set {var} to run it"
            );
            None
        }
    }
}

/// A store URL with a password, for tests that check the password never shows: a fresh schema
/// on the tests' PostgreSQL (a server that trusts the test's connections ignores the
/// password), or nothing without one, where such a test runs on SQLite and checks the rest.
#[derive(Debug)]
pub struct PasswordStore {
    schema: Option<PostgresSchema>,
    password: Option<String>,
}

impl PasswordStore {
    /// `password` for the user the server's URL names (`postgres` if it names none), or the
    /// password that URL already carries.
    pub async fn create(password: &str) -> Result<PasswordStore> {
        let Some(base) = postgres_url("the password half of the redaction tests") else {
            return Ok(PasswordStore {
                schema: None,
                password: None,
            });
        };
        let (base, password) = with_password(&base, password);
        Ok(PasswordStore {
            schema: Some(PostgresSchema::create(&base).await?),
            password: Some(password),
        })
    }

    /// The store's URL, password included; `None` for a SQLite store of the test's own.
    pub fn url(&self) -> Option<String> {
        self.schema.as_ref().map(|schema| schema.url.clone())
    }

    /// Checks that `printed` names the store without its password.
    #[expect(
        clippy::panic,
        reason = "test support: a shown password fails the test"
    )]
    pub fn check_hidden(&self, printed: &str) {
        if let Some(password) = &self.password
            && (printed.contains(password.as_str()) || !printed.contains(":[redacted]@"))
        {
            panic!("the store's URL is printed with its password: {printed}");
        }
    }

    /// Drops the schema, if there is one.
    pub async fn drop_schema(self) -> Result<()> {
        match self.schema {
            Some(schema) => schema.drop_schema().await,
            None => Ok(()),
        }
    }
}

/// `url` with a password in its user information, and that password: `password` for the user
/// the URL names (`postgres` if it names none), or the password it already carries.
fn with_password(url: &str, password: &str) -> (String, String) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), password.to_string());
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user, _)) if user.contains(':') => {
            let existing = user.split_once(':').map_or("", |(_, p)| p);
            (url.to_string(), existing.to_string())
        }
        Some((user, host)) => (
            format!("{scheme}://{user}:{password}@{host}{tail}"),
            password.to_string(),
        ),
        None => (
            format!("{scheme}://postgres:{password}@{authority}{tail}"),
            password.to_string(),
        ),
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

/// A transaction, on a connection of its own, holding what every write of the store at `url`
/// needs, as a stuck process would: SQLite's write lock (`BEGIN IMMEDIATE`), or on PostgreSQL
/// an exclusive lock on `audit_events`, from which the writer reads the chain head. Released
/// by [`HeldWrites::release`] or when dropped.
#[derive(Debug)]
pub enum HeldWrites {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl HeldWrites {
    pub async fn take(url: &str) -> Result<HeldWrites> {
        use sqlx::Connection as _;
        let failed = |e: sqlx::Error| StoreError::Unavailable(format!("cannot lock: {e}"));
        if let Some(path) = crate::sqlite_path(url) {
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
            let mut conn = sqlx::SqliteConnection::connect_with(&options)
                .await
                .map_err(failed)?;
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut conn)
                .await
                .map_err(failed)?;
            Ok(HeldWrites::Sqlite(conn))
        } else {
            let mut conn = sqlx::PgConnection::connect(url).await.map_err(failed)?;
            sqlx::raw_sql("BEGIN; LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
                .execute(&mut conn)
                .await
                .map_err(failed)?;
            Ok(HeldWrites::Postgres(conn))
        }
    }

    pub async fn release(self) -> Result<()> {
        use sqlx::Connection as _;
        let failed = |e: sqlx::Error| StoreError::Unavailable(format!("cannot unlock: {e}"));
        match self {
            HeldWrites::Sqlite(conn) => conn.close().await.map_err(failed),
            HeldWrites::Postgres(conn) => conn.close().await.map_err(failed),
        }
    }
}

/// Runs `sql` on the database at `url` (`sqlite://…` or `postgres://…`) behind the store's
/// back, as someone with write access to the database could: for tamper tests.
pub async fn tamper(url: &str, sql: &str) -> Result<()> {
    let failed = |e: sqlx::Error| StoreError::Unavailable(format!("tampering failed: {e}"));
    if let Some(path) = url.strip_prefix("sqlite://") {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
        let pool = sqlx::SqlitePool::connect_with(options)
            .await
            .map_err(failed)?;
        sqlx::raw_sql(sql).execute(&pool).await.map_err(failed)?;
        pool.close().await;
    } else {
        let pool = PgPool::connect(url).await.map_err(failed)?;
        sqlx::raw_sql(sql).execute(&pool).await.map_err(failed)?;
        pool.close().await;
    }
    Ok(())
}

/// A TCP relay to a database that a test can cut, which is what a network partition looks
/// like from remit's side: every open connection drops and new ones are refused.
#[derive(Debug)]
pub struct Relay {
    address: String,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    /// Listens on a loopback port and forwards every connection to `target` (`host:port`).
    pub async fn start(target: String) -> Result<Relay> {
        let unavailable = |e: std::io::Error| StoreError::Unavailable(e.to_string());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(unavailable)?;
        let address = listener.local_addr().map_err(unavailable)?.to_string();
        let tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let registry = std::sync::Arc::clone(&tasks);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                if let Ok(mut tasks) = registry.lock() {
                    tasks.push(pipe);
                }
            }
        });
        if let Ok(mut list) = tasks.lock() {
            list.push(accept);
        }
        Ok(Relay { address, tasks })
    }

    /// `url` (a database URL naming the relay's target) rerouted through the relay.
    pub fn reroute(&self, url: &str) -> String {
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_string();
        };
        let (at, end) = authority_span(rest);
        format!("{scheme}://{}{}{}", &rest[..at], self.address, &rest[end..])
    }

    /// Drops every connection and stops accepting.
    pub fn cut(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

/// The `host:port` a database URL names.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (at, end) = authority_span(rest);
    rest[at..end].to_string()
}

/// Where `host:port` starts and ends after the scheme (past any `user@`).
fn authority_span(rest: &str) -> (usize, usize) {
    let at = rest.find('@').map_or(0, |i| i + 1);
    let end = rest[at..].find(['/', '?']).map_or(rest.len(), |i| at + i);
    (at, end)
}

/// The filters snapshot tests apply (as `insta`'s `filters` setting), in order, so that a
/// snapshot holds what stays the same from run to run: times, hashes, ids, ports and the
/// paths of temporary directories become `[TIME]`, `[HASH]`, `[ID]`, `[PORT]` and `[PATH]`.
pub const SNAPSHOT_FILTERS: &[(&str, &str)] = &[
    // RFC 3339 times, then Unix times in seconds or milliseconds (2023 to 2033).
    (
        r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})",
        "[TIME]",
    ),
    (r"\b1[7-9]\d{8}(?:\d{3})?\b", "[TIME]"),
    // SHA-256 digests (event hashes, token hashes, key thumbprints in hex).
    (r"\b[0-9a-f]{64}\b", "[HASH]"),
    // JWK thumbprints (base64url SHA-256, as JSON strings).
    (r#""[A-Za-z0-9_-]{43}""#, r#""[HASH]""#),
    // Task, approval, operator and signing-key ids, and the 128-bit ids remit issues in hex
    // (`jti`s).
    (r"\btask_[a-z2-7]{26}\b", "[ID]"),
    (r"\bapr_[0-9a-f]{32}\b", "[ID]"),
    (r"\bop[-_][0-9a-f]+\b", "[ID]"),
    (r"\bk[0-9a-f]{16}\b", "[ID]"),
    (r"\b[0-9a-f]{32}\b", "[ID]"),
    (r"127\.0\.0\.1:\d+", "127.0.0.1:[PORT]"),
    (r"sqlite://[^\s`'\x22,;)]+", "sqlite://[PATH]"),
    (r"/tmp/[^\s`'\x22,;)]+", "[PATH]"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_are_rerouted_through_the_relay() {
        let url = "postgres://postgres@127.0.0.1:5432/test?options=x";
        assert_eq!(host_port(url), "127.0.0.1:5432");
        assert_eq!(host_port("postgres://db:5432/x"), "db:5432");
        let relay = Relay::start("127.0.0.1:9".into()).await.unwrap();
        let rerouted = relay.reroute(url);
        assert!(
            rerouted.starts_with("postgres://postgres@127.0.0.1:")
                && rerouted.ends_with("/test?options=x")
        );
        assert_ne!(host_port(&rerouted), "127.0.0.1:5432");
        relay.cut();
    }
}
