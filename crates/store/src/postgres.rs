//! PostgreSQL, for several remit replicas sharing one database. Every write transaction takes
//! one advisory lock first, so the replicas' writers take turns and together keep a single
//! verifiable audit chain (and a revocation feed whose `seq` values become visible in order).

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use tokio::sync::{Notify, oneshot};

use crate::bounded::Bounded;
use crate::engine::{self, Backend, Conn, RowExt, SqlStore};
use crate::{OpenOptions, Result, Store, StoreError, redact_url};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The advisory lock's first key, `remi` in ASCII: remit's chain lock. The second key is
/// derived from the schema, so that deployments in different schemas of one database do not
/// wait for each other.
const LOCK_CLASS: i32 = 0x7265_6d69;

engine::impl_conn!(
    PgConnection,
    PgRow,
    anonymous_params = false,
    multi_statement = false,
    notify_revocation = Some("SELECT pg_notify('remit_revocations', '')")
);

/// The `LISTEN/NOTIFY` channel on which writers announce revocations.
const REVOCATION_CHANNEL: &str = "remit_revocations";

#[derive(Debug)]
pub(crate) struct PostgresBackend {
    pool: PgPool,
    /// `BEGIN; SELECT pg_advisory_xact_lock(…)` with this schema's keys.
    begin_sql: String,
}

#[async_trait]
impl Backend for PostgresBackend {
    type Db = sqlx::Postgres;
    type Conn = PgConnection;

    const KIND: &'static str = "postgres";

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn begin_fill(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        // The mark's row lock orders the replicas' fills; the chain lock is not taken.
        conn.execute_raw("BEGIN; SELECT 1 FROM audit_lookup_mark FOR UPDATE")
            .await
    }

    async fn begin_write(&self, conn: &mut PgConnection) -> Result<Option<PgRow>, sqlx::Error> {
        // One round trip for both (a simple query may hold several statements). The lock is
        // released by COMMIT or ROLLBACK; the head is read by a later statement, whose
        // snapshot is taken only once the lock is held.
        conn.execute_raw(&self.begin_sql).await?;
        conn.fetch_optional(engine::head_sql!(), vec![]).await
    }
}

/// Connects to `url`, migrates the schema and starts the writer.
pub(crate) async fn open(url: &str, options: &OpenOptions) -> Result<Arc<dyn Store>> {
    let connect =
        PgConnectOptions::from_str(url).map_err(|_| StoreError::BadUrl(redact_url(url)))?;
    let unavailable = |error: sqlx::Error| {
        StoreError::Unavailable(format!("cannot connect to `{}`: {error}", redact_url(url)))
    };
    // Migrations first, on a connection of their own without the lock timeout below: they
    // wait for the migration lock of the whole database, which other deployments (in other
    // schemas) may hold for longer than a call may wait.
    let migrating = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(options.connect_timeout)
        .connect_with(connect.clone())
        .await
        .map_err(unavailable)?;
    if !options.create_if_missing {
        // A schema remit never migrated holds no store: say so rather than create one.
        let migrated: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&migrating)
                .await
                .map_err(unavailable)?;
        if !migrated {
            return Err(StoreError::Missing(redact_url(url)));
        }
    }
    MIGRATOR
        .run(&migrating)
        .await
        .map_err(engine::migrate_error)?;
    migrating.close().await;
    // Then the server gives up on any lock it waits for as soon as remit would (a table
    // locked by someone else, or the chain's advisory lock held by a stuck replica).
    let timeout_ms = options.operation_timeout.as_millis().max(1).to_string();
    let pool = PgPoolOptions::new()
        // Three more than the readers need: one for the writer task, one for the lookup
        // filler, one that the revocation listener holds for as long as the store lives.
        .max_connections(options.max_connections.max(1) + 3)
        .acquire_timeout(options.connect_timeout)
        .connect_with(connect.options([("lock_timeout", timeout_ms.as_str())]))
        .await
        .map_err(unavailable)?;
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let row = conn
        .fetch_optional(
            "SELECT hashtext(COALESCE(current_schema(), ''))::bigint AS key",
            vec![],
        )
        .await
        .map_err(engine::db_error)?
        .ok_or_else(|| {
            StoreError::Unavailable("reading the current schema returned no row".to_string())
        })?;
    let key = row.int("key").map_err(engine::db_error)?;
    drop(conn);
    // A write transaction is bounded as a whole; readers are not (the chain walk streams the
    // whole log in one statement), beyond the lock timeout and the caller's own bound.
    let begin_sql = format!(
        "BEGIN; SET LOCAL statement_timeout = {timeout_ms}; \
         SELECT pg_advisory_xact_lock({LOCK_CLASS}, {key})"
    );
    let mut listener = PgListener::connect_with(&pool).await.map_err(unavailable)?;
    listener
        .listen(REVOCATION_CHANNEL)
        .await
        .map_err(unavailable)?;
    let signal = Arc::new(Notify::new());
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(listen(listener, Arc::clone(&signal), stopped));
    let store = SqlStore::start(PostgresBackend { pool, begin_sql });
    let store = store.with_revocation_signal(signal, stop);
    Ok(Arc::new(Bounded::new(store, options, None)))
}

/// Turns every notification of a revocation into a permit of `signal`, until the store is
/// dropped. `PgListener` reconnects by itself after a lost connection; what was announced
/// meanwhile is found by the periodic catch-up.
async fn listen(mut listener: PgListener, signal: Arc<Notify>, mut stopped: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            received = listener.recv() => match received {
                Ok(_) => signal.notify_one(),
                Err(error) => {
                    tracing::warn!(%error, "lost the revocation notifications; retrying in 1 s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            },
        }
    }
}
