//! Fresh databases for each test, raw SQL for tampering, and readable fixtures.

use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::Arc;

use audit::{ChainBreak, ChainVerifier, Event, EventBody};
use model::{AgentStatus, Owner, Scope, ScopeSet, SpiffeId, TaskId, TaskStatus, TrustDomain};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use store::{AgentRecord, Store, TaskRecord};

/// A direct connection to the test database, bypassing the store: the attacker's view.
#[derive(Debug)]
pub enum Raw {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Raw {
    pub async fn execute(&self, sql: &str) {
        match self {
            Raw::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
            Raw::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        }
        .unwrap_or_else(|error| panic!("raw SQL `{sql}` failed: {error}"));
    }

    /// The one integer `sql` selects.
    pub async fn number(&self, sql: &str) -> i64 {
        match self {
            Raw::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Raw::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .unwrap_or_else(|error| panic!("raw SQL `{sql}` failed: {error}"))
    }
}

/// A transaction holding the lock that every audit lookup fill takes.
pub enum HeldLookups {
    Sqlite(PoolConnection<sqlx::Sqlite>),
    Postgres(PoolConnection<sqlx::Postgres>),
}

impl Raw {
    /// Takes the lock that lookup fills take (SQLite: the lookup file's write lock;
    /// PostgreSQL: the lookup mark's row lock) and holds it until released.
    pub async fn hold_lookups(&self) -> HeldLookups {
        // Not BEGIN IMMEDIATE, which would lock the log's file too: a write to the lookup file
        // before any read of the log locks that file alone.
        self.hold(
            "BEGIN; UPDATE lookups.audit_lookup_mark SET id = 1",
            "BEGIN; SELECT 1 FROM audit_lookup_mark FOR UPDATE",
        )
        .await
    }

    /// Opens a transaction on a connection of its own with the statements of this backend,
    /// which take a lock, and keeps it open until released.
    async fn hold(&self, sqlite: &str, postgres: &str) -> HeldLookups {
        match self {
            Raw::Sqlite(pool) => {
                let mut conn = pool.acquire().await.unwrap();
                sqlx::raw_sql(sqlite).execute(&mut *conn).await.unwrap();
                HeldLookups::Sqlite(conn)
            }
            Raw::Postgres(pool) => {
                let mut conn = pool.acquire().await.unwrap();
                sqlx::raw_sql(postgres).execute(&mut *conn).await.unwrap();
                HeldLookups::Postgres(conn)
            }
        }
    }
}

impl HeldLookups {
    pub async fn release(self) {
        match self {
            HeldLookups::Sqlite(mut conn) => sqlx::raw_sql("ROLLBACK")
                .execute(&mut *conn)
                .await
                .map(drop),
            HeldLookups::Postgres(mut conn) => sqlx::raw_sql("ROLLBACK")
                .execute(&mut *conn)
                .await
                .map(drop),
        }
        .unwrap();
    }
}

/// A store on a database of its own, plus what a test needs to reach around it.
#[derive(Debug)]
pub struct TestDb {
    pub store: Arc<dyn Store>,
    pub raw: Raw,
    /// The URL the store was opened with, to open more stores on the same data.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres_schema: Option<(PgPool, String)>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remit.db");
        let url = format!("sqlite://{}", path.display());
        let store = store::open(&url).await.unwrap();
        // With the lookup file attached, as the store's readers have it.
        let lookups = store::sqlite_lookups_path(&path.display().to_string());
        let raw = SqlitePoolOptions::new()
            .after_connect(move |conn, _| {
                let lookups = lookups.clone();
                Box::pin(async move {
                    sqlx::query("ATTACH DATABASE ? AS lookups")
                        .bind(lookups)
                        .execute(&mut *conn)
                        .await
                        .map(drop)
                })
            })
            .connect_with(SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
        TestDb {
            store,
            raw: Raw::Sqlite(raw),
            url,
            _dir: Some(dir),
            postgres_schema: None,
        }
    }

    /// A fresh schema for the test named `test`; `None` (with a note naming it) when no
    /// PostgreSQL is configured, except under CI, where a missing server must not turn into
    /// silently skipped tests.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        let base = store::testing::postgres_url(&format!("the PostgreSQL test `{test}`"))?;
        let admin = PgPool::connect(&base).await.unwrap();
        let schema = format!("remit_test_{:016x}", random());
        sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .unwrap();
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        let store = store::open(&url).await.unwrap();
        let raw = PgPool::connect_with(PgConnectOptions::from_str(&url).unwrap())
            .await
            .unwrap();
        Some(TestDb {
            store,
            raw: Raw::Postgres(raw),
            url,
            _dir: None,
            postgres_schema: Some((admin, schema)),
        })
    }

    /// Drops the PostgreSQL schema. A failed test skips this and leaves its schema to inspect.
    pub async fn finish(self) {
        let TestDb {
            store,
            raw,
            postgres_schema,
            ..
        } = self;
        drop(store);
        drop(raw);
        if let Some((admin, schema)) = postgres_schema {
            // The store's tasks end soon after it is dropped, not at once: a lookup fill may
            // still hold locks, and the drop may meet it in a deadlock. Retry a few times.
            let drop_schema = format!("DROP SCHEMA {schema} CASCADE");
            let mut attempts = 0;
            while let Err(error) = sqlx::raw_sql(&drop_schema).execute(&admin).await {
                attempts += 1;
                assert!(attempts < 5, "`{drop_schema}` failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.raw, Raw::Postgres(_))
    }
}

pub fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    hasher.finish()
}

/// Verifies the whole chain the way remit does (`Store::verify_chain`, hashing rows as stored)
/// and checks that reading it in pages through the API and verifying those events agrees.
pub async fn verify(store: &dyn Store) -> Result<u64, ChainBreak> {
    let stored = verify_stored(store).await;
    assert_eq!(
        verify_paged(store).await,
        stored,
        "verifying in the store and through the API disagree"
    );
    assert_eq!(
        verify_read(store).await,
        stored,
        "verifying in the store and the events read back disagree"
    );
    stored
}

/// `Store::verify_chain` from the genesis.
pub async fn verify_stored(store: &dyn Store) -> Result<u64, ChainBreak> {
    let mut verifier = ChainVerifier::default();
    store.verify_chain(&mut verifier).await.unwrap()?;
    Ok(verifier.checked())
}

/// Reads the whole chain in pages, as an investigator with the API would, and verifies the
/// events (through JSON, as the API sends them: their `detail` parsed and re-encoded).
pub async fn verify_paged(store: &dyn Store) -> Result<u64, ChainBreak> {
    verify_pages(store, |event| {
        let json = serde_json::to_string(&event).unwrap();
        serde_json::from_str(&json).unwrap()
    })
    .await
}

/// Reads the whole chain in pages and verifies the events as the store returned them, their
/// `detail` the stored text.
pub async fn verify_read(store: &dyn Store) -> Result<u64, ChainBreak> {
    verify_pages(store, |event| event).await
}

async fn verify_pages(
    store: &dyn Store,
    receive: impl Fn(Event) -> Event,
) -> Result<u64, ChainBreak> {
    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = store.events_after(after, 1_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        for event in page {
            verifier.push(&receive(event))?;
        }
    }
    Ok(verifier.checked())
}

pub async fn all_events(store: &dyn Store) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let after = events.last().map_or(0, |e: &Event| e.seq);
        let page = store.events_after(after, 1_000).await.unwrap();
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

pub fn event(kind: &str) -> EventBody {
    EventBody::new(1_700_000_000_000, kind, "operator:op-1")
        .detail(serde_json::json!({"why": kind, "n": 1}))
}

pub fn agent(name: &str) -> AgentRecord {
    let domain = TrustDomain::from_str("example.org").unwrap();
    let name = name.parse().unwrap();
    AgentRecord {
        spiffe_id: SpiffeId::for_agent(&domain, &name),
        name,
        owner: Owner::from_str("alice@example.org").unwrap(),
        status: AgentStatus::Active,
        keys: vec![
            serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
        ],
        created_at: 1_700_000_000,
    }
}

pub fn task_id(n: u8) -> TaskId {
    TaskId::from_random([n; 16])
}

pub fn task(n: u8, agent: &str) -> TaskRecord {
    TaskRecord {
        id: task_id(n),
        agent: agent.parse().unwrap(),
        owner: Owner::from_str("alice@example.org").unwrap(),
        intent: "triage the open issues".to_string(),
        scopes: ScopeSet(vec![Scope::new(
            "github",
            &["issues.read", "issues.comment"],
            &["repo/remit/*"],
        )]),
        obo: Some("bob@example.org".to_string()),
        parent: None,
        depth: 0,
        status: TaskStatus::Active,
        created_at: 1_700_000_000 + i64::from(n),
        expires_at: 1_700_000_300,
        budget: 100,
        calls_used: 0,
        token_jti: format!("jti-{n}"),
        jkt: "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I".to_string(),
    }
}

/// Whether `check` holds within 10 s, asked every 50 ms: for what the store's background tasks
/// (the lookup filler) do in their own time.
pub async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// A transaction holding what every write of the chain needs, so that the store's writer
/// waits: SQLite's write lock (`BEGIN IMMEDIATE`, as another process would hold it), or on
/// PostgreSQL an exclusive lock on `audit_events`, which the writer reads the head from.
pub struct HeldWrites(HeldLookups);

impl Raw {
    pub async fn hold_writes(&self) -> HeldWrites {
        HeldWrites(
            self.hold(
                "BEGIN IMMEDIATE",
                "BEGIN; LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE",
            )
            .await,
        )
    }
}

impl HeldWrites {
    pub async fn release(self) {
        self.0.release().await;
    }
}
