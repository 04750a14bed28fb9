//! Row mapping: typed column access for both backends, the record decoders (each failure
//! named by its row and column), the column lists they read and the encoders for values.

use std::fmt::Display;
use std::str::FromStr;

use audit::{ChainVerifier, Detail, Event, EventBody, Hash, StoredEvent};
use model::Secret;
use serde::de::DeserializeOwned;
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{Arg, Conn, db_error};
use crate::{
    AgentRecord, ApprovalRecord, ApprovalStatus, OperatorRecord, Result, Revocation,
    RevocationKind, SigningKeyRecord, StoreError, TaskRecord,
};

/// Typed column access shared by both backends' row types.
pub(crate) trait RowExt {
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error>;
    fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error>;
    fn boolean(&self, column: &str) -> Result<bool, sqlx::Error>;
    /// Borrowed access by position, for the verifier's hot loop: no allocation, no name lookup.
    fn str_at(&self, index: usize) -> Result<&str, sqlx::Error>;
    fn opt_str_at(&self, index: usize) -> Result<Option<&str>, sqlx::Error>;
    fn bytes_at(&self, index: usize) -> Result<&[u8], sqlx::Error>;
    fn int_at(&self, index: usize) -> Result<i64, sqlx::Error>;
    fn opt_int_at(&self, index: usize) -> Result<Option<i64>, sqlx::Error>;
}

impl<R> RowExt for R
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r [u8]: Decode<'r, R::Database> + Type<R::Database>,
    usize: ColumnIndex<R>,
{
    fn text(&self, column: &str) -> Result<String, sqlx::Error> {
        self.try_get(column)
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(column)
    }
    fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(column)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error> {
        self.try_get(column)
    }
    fn boolean(&self, column: &str) -> Result<bool, sqlx::Error> {
        self.try_get(column)
    }
    fn str_at(&self, index: usize) -> Result<&str, sqlx::Error> {
        self.try_get(index)
    }
    fn opt_str_at(&self, index: usize) -> Result<Option<&str>, sqlx::Error> {
        self.try_get(index)
    }
    fn bytes_at(&self, index: usize) -> Result<&[u8], sqlx::Error> {
        self.try_get(index)
    }
    fn int_at(&self, index: usize) -> Result<i64, sqlx::Error> {
        self.try_get(index)
    }
    fn opt_int_at(&self, index: usize) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(index)
    }
}

/// Decodes one row's columns, turning any failure into `Corrupt` naming the record and key.
pub(super) struct Fields<'r, R> {
    row: &'r R,
    what: &'static str,
    pub(super) key: String,
}

impl<'r, R: RowExt> Fields<'r, R> {
    pub(super) fn keyed_by_text(row: &'r R, what: &'static str, column: &str) -> Result<Self> {
        let key = row.text(column).map_err(|error| {
            StoreError::Corrupt(format!("{what} with unreadable `{column}`: {error}"))
        })?;
        Ok(Fields { row, what, key })
    }

    pub(super) fn keyed_by_int(row: &'r R, what: &'static str, column: &str) -> Result<Self> {
        let key = row.int(column).map_err(|error| {
            StoreError::Corrupt(format!("{what} with unreadable `{column}`: {error}"))
        })?;
        Ok(Fields {
            row,
            what,
            key: key.to_string(),
        })
    }

    fn fail(&self, column: &str, problem: impl Display) -> StoreError {
        StoreError::Corrupt(format!(
            "{} `{}`, column `{column}`: {problem}",
            self.what, self.key
        ))
    }

    fn text(&self, column: &str) -> Result<String> {
        self.row
            .text(column)
            .map_err(|error| self.fail(column, error))
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        self.row
            .opt_text(column)
            .map_err(|error| self.fail(column, error))
    }

    pub(super) fn int(&self, column: &str) -> Result<i64> {
        self.row
            .int(column)
            .map_err(|error| self.fail(column, error))
    }

    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        self.row
            .opt_int(column)
            .map_err(|error| self.fail(column, error))
    }

    fn u32(&self, column: &str) -> Result<u32> {
        let value = self.int(column)?;
        u32::try_from(value)
            .map_err(|_| self.fail(column, format_args!("`{value}` is out of range")))
    }

    pub(super) fn u64(&self, column: &str) -> Result<u64> {
        let value = self.int(column)?;
        u64::try_from(value)
            .map_err(|_| self.fail(column, format_args!("`{value}` is out of range")))
    }

    fn bytes(&self, column: &str) -> Result<Vec<u8>> {
        self.row
            .bytes(column)
            .map_err(|error| self.fail(column, error))
    }

    fn boolean(&self, column: &str) -> Result<bool> {
        self.row
            .boolean(column)
            .map_err(|error| self.fail(column, error))
    }

    pub(super) fn hash(&self, column: &str) -> Result<Hash> {
        let bytes = self.bytes(column)?;
        Hash::try_from(bytes.as_slice())
            .map_err(|_| self.fail(column, format_args!("{} bytes, expected 32", bytes.len())))
    }

    pub(super) fn parse<T: FromStr>(&self, column: &str) -> Result<T>
    where
        T::Err: Display,
    {
        self.text(column)?
            .parse()
            .map_err(|error| self.fail(column, error))
    }

    fn opt_parse<T: FromStr>(&self, column: &str) -> Result<Option<T>>
    where
        T::Err: Display,
    {
        self.opt_text(column)?
            .map(|text| text.parse().map_err(|error| self.fail(column, error)))
            .transpose()
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T> {
        serde_json::from_str(&self.text(column)?).map_err(|error| self.fail(column, error))
    }
}

pub(super) fn agent_from_row(row: &impl RowExt) -> Result<AgentRecord> {
    let fields = Fields::keyed_by_text(row, "agent", "name")?;
    Ok(AgentRecord {
        name: fields.parse("name")?,
        spiffe_id: fields.parse("spiffe_id")?,
        owner: fields.parse("owner")?,
        status: fields.parse("status")?,
        keys: fields.json("keys")?,
        created_at: fields.int("created_at")?,
    })
}

pub(super) fn operator_from_row(row: &impl RowExt) -> Result<OperatorRecord> {
    let fields = Fields::keyed_by_text(row, "operator", "id")?;
    Ok(OperatorRecord {
        id: fields.key.clone(),
        name: fields.text("name")?,
        role: fields.parse("role")?,
        token_hash: fields.hash("token_hash")?,
        created_at: fields.int("created_at")?,
        disabled: fields.boolean("disabled")?,
    })
}

pub(super) fn signing_key_from_row(row: &impl RowExt) -> Result<SigningKeyRecord> {
    let fields = Fields::keyed_by_text(row, "signing key", "kid")?;
    Ok(SigningKeyRecord {
        kid: fields.key.clone(),
        pkcs8: Secret::new(fields.bytes("pkcs8")?),
        public_jwk: fields.json("public_jwk")?,
        created_at: fields.int("created_at")?,
        retired_at: fields.opt_int("retired_at")?,
        publish_until: fields.opt_int("publish_until")?,
    })
}

pub(super) fn task_from_row(row: &impl RowExt) -> Result<TaskRecord> {
    let fields = Fields::keyed_by_text(row, "task", "id")?;
    Ok(TaskRecord {
        id: fields.parse("id")?,
        agent: fields.parse("agent")?,
        owner: fields.parse("owner")?,
        intent: fields.text("intent")?,
        scopes: fields.json("scopes")?,
        obo: fields.opt_text("obo")?,
        parent: fields.opt_parse("parent")?,
        depth: fields.u32("depth")?,
        status: fields.parse("status")?,
        created_at: fields.int("created_at")?,
        expires_at: fields.int("expires_at")?,
        budget: fields.u32("budget")?,
        calls_used: fields.u32("calls_used")?,
        token_jti: fields.text("token_jti")?,
        jkt: fields.text("jkt")?,
    })
}

pub(super) fn revocation_from_row(row: &impl RowExt) -> Result<Revocation> {
    let fields = Fields::keyed_by_int(row, "revocation", "seq")?;
    let kind = fields.text("kind")?;
    Ok(Revocation {
        seq: fields.int("seq")?,
        kind: RevocationKind::parse(&kind)
            .ok_or_else(|| fields.fail("kind", format_args!("unknown kind `{kind}`")))?,
        target: fields.text("target")?,
        reason: fields.text("reason")?,
        created_at: fields.int("created_at")?,
    })
}

pub(super) fn approval_from_row(row: &impl RowExt) -> Result<ApprovalRecord> {
    let fields = Fields::keyed_by_text(row, "approval", "id")?;
    let status = fields.text("status")?;
    Ok(ApprovalRecord {
        id: fields.key.clone(),
        task: fields.parse("task")?,
        agent: fields.parse("agent")?,
        owner: fields.parse("owner")?,
        tool: fields.text("tool")?,
        action: fields.text("action")?,
        resource: fields.text("resource")?,
        args_digest: fields.text("args_digest")?,
        status: ApprovalStatus::parse(&status)
            .ok_or_else(|| fields.fail("status", format_args!("unknown status `{status}`")))?,
        created_at: fields.int("created_at")?,
        expires_at: fields.int("expires_at")?,
        decided_by: fields.opt_text("decided_by")?,
        decision_reason: fields.opt_text("decision_reason")?,
        decided_at: fields.opt_int("decided_at")?,
    })
}

pub(super) fn event_from_row(row: &impl RowExt) -> Result<Event> {
    let fields = Fields::keyed_by_int(row, "audit event", "seq")?;
    Ok(Event {
        seq: fields.u64("seq")?,
        body: EventBody {
            time_ms: fields.int("time_ms")?,
            kind: fields.text("kind")?,
            actor: fields.text("actor")?,
            agent: fields.opt_text("agent")?,
            task: fields.opt_text("task")?,
            decision: fields.opt_text("decision")?,
            detail: Detail::stored(fields.text("detail")?)
                .map_err(|error| fields.fail("detail", error))?,
        },
        prev_hash: fields.hash("prev_hash")?,
        hash: fields.hash("hash")?,
    })
}

/// An audit row as stored, borrowed from the row: what [`ChainVerifier::push_stored`] hashes.
/// Columns by position, in [`EVENT_COLUMNS`] order.
pub(super) fn stored_event_from_row(row: &impl RowExt) -> Result<StoredEvent<'_>> {
    let seq = row.int_at(0).map_err(|error| {
        StoreError::Corrupt(format!("audit event with unreadable `seq`: {error}"))
    })?;
    let fail = |column: &str, problem: &dyn Display| {
        StoreError::Corrupt(format!("audit event `{seq}`, column `{column}`: {problem}"))
    };
    let hash = |index: usize, column: &str| -> Result<Hash> {
        let bytes = row.bytes_at(index).map_err(|error| fail(column, &error))?;
        Hash::try_from(bytes)
            .map_err(|_| fail(column, &format_args!("{} bytes, expected 32", bytes.len())))
    };
    Ok(StoredEvent {
        seq: u64::try_from(seq).map_err(|_| fail("seq", &"negative"))?,
        time_ms: row.int_at(1).map_err(|error| fail("time_ms", &error))?,
        kind: row.str_at(2).map_err(|error| fail("kind", &error))?,
        actor: row.str_at(3).map_err(|error| fail("actor", &error))?,
        agent: row.opt_str_at(4).map_err(|error| fail("agent", &error))?,
        task: row.opt_str_at(5).map_err(|error| fail("task", &error))?,
        decision: row
            .opt_str_at(6)
            .map_err(|error| fail("decision", &error))?,
        detail: row.str_at(7).map_err(|error| fail("detail", &error))?,
        prev_hash: hash(8, "prev_hash")?,
        hash: hash(9, "hash")?,
    })
}

/// Feeds the events of one packed page to `verifier`; `true` when the page held at least one
/// event, all in the expected format and all verified. The format, per event and with no
/// separator between events: `seq`, a space, `time_ms`, a space, `prev_hash` and `hash` in
/// hexadecimal each followed by a space, then `kind`, `actor`, `agent`, `task`, `decision`
/// and `detail`, each as its length in bytes (-1 for NULL), a colon and the bytes. Lengths
/// come from the database, so no content can be mistaken for framing.
pub(super) fn unpack_events(page: &str, verifier: &mut ChainVerifier) -> bool {
    let mut rest = page;
    let mut any = false;
    while !rest.is_empty() {
        let Some(event) = unpack_event(&mut rest) else {
            return false;
        };
        if verifier.push_stored(&event).is_err() {
            return false;
        }
        any = true;
    }
    any
}

fn unpack_event<'a>(rest: &mut &'a str) -> Option<StoredEvent<'a>> {
    fn until<'a>(rest: &mut &'a str, separator: char) -> Option<&'a str> {
        let (value, tail) = rest.split_once(separator)?;
        *rest = tail;
        Some(value)
    }
    fn field<'a>(rest: &mut &'a str) -> Option<Option<&'a str>> {
        let len: i64 = until(rest, ':')?.parse().ok()?;
        if len == -1 {
            return Some(None);
        }
        let len = usize::try_from(len).ok()?;
        let value = rest.get(..len)?;
        *rest = rest.get(len..)?;
        Some(Some(value))
    }
    let seq = until(rest, ' ')?.parse().ok()?;
    let time_ms = until(rest, ' ')?.parse().ok()?;
    let prev_hash = audit::from_hex(until(rest, ' ')?)?;
    let hash = audit::from_hex(until(rest, ' ')?)?;
    Some(StoredEvent {
        seq,
        time_ms,
        kind: field(rest)??,
        actor: field(rest)??,
        agent: field(rest)?,
        task: field(rest)?,
        decision: field(rest)?,
        detail: field(rest)??,
        prev_hash,
        hash,
    })
}

pub(super) const AGENT_COLUMNS: &str = "name, spiffe_id, owner, status, keys, created_at";
pub(super) const OPERATOR_COLUMNS: &str = "id, name, role, token_hash, created_at, disabled";
pub(super) const SIGNING_KEY_COLUMNS: &str =
    "kid, pkcs8, public_jwk, created_at, retired_at, publish_until";
pub(super) const TASK_COLUMNS: &str = "id, agent, owner, intent, scopes, obo, parent, depth, status, created_at, expires_at, budget, calls_used, token_jti, jkt";
pub(super) const APPROVAL_COLUMNS: &str = "id, task, agent, owner, tool, action, resource, args_digest, status, \
     created_at, expires_at, decided_by, decision_reason, decided_at";
pub(super) const EVENT_COLUMNS: &str =
    "seq, time_ms, kind, actor, agent, task, decision, detail, prev_hash, hash";

/// Runs `sql`, which finds at most one row, and decodes that row with `decode`: `None` when
/// there is none. The one form of a read by key (a record, a count, a mark), so that a missing
/// row and a database error read the same way everywhere.
pub(super) async fn fetch_row<C: Conn, T>(
    conn: &mut C,
    sql: &str,
    args: Vec<Arg>,
    decode: impl FnOnce(&C::Row) -> Result<T>,
) -> Result<Option<T>> {
    let row = conn.fetch_optional(sql, args).await.map_err(db_error)?;
    row.as_ref().map(decode).transpose()
}

pub(super) fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{what} number `{value}` is out of range")))
}

pub(super) fn to_json(value: &impl serde::Serialize, what: &str) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|error| StoreError::Corrupt(format!("cannot encode {what}: {error}")))
}

#[cfg(test)]
mod tests {
    use audit::{ChainVerifier, EventBody};
    use sqlx::{Connection as _, Row as _};

    use super::{Fields, fetch_row, unpack_events};
    use crate::StoreError;
    use crate::engine::test_stores::sqlite_store;
    use crate::engine::{Arg, Backend as _};
    use crate::sqlite::SqliteBackend;

    /// A row found is decoded, no row is `None` (not an error), and a row that does not decode
    /// is `Corrupt`, named by its row and column.
    #[tokio::test]
    async fn fetch_row_decodes_one_row_or_none() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let sql = "SELECT id, n FROM (SELECT 'a' AS id, 7 AS n UNION ALL SELECT 'b', 'seven') \
                   WHERE id = $1";
        let n = |id: &str| vec![Arg::Text(id.to_string())];
        let decode =
            |row: &sqlx::sqlite::SqliteRow| Fields::keyed_by_text(row, "thing", "id")?.int("n");

        let found = fetch_row(&mut conn, sql, n("a"), decode).await.unwrap();
        assert_eq!(found, Some(7));
        let missing = fetch_row(&mut conn, sql, n("c"), decode).await.unwrap();
        assert_eq!(missing, None);
        let corrupt = fetch_row(&mut conn, sql, n("b"), decode).await.unwrap_err();
        assert!(
            matches!(&corrupt, StoreError::Corrupt(message) if message.starts_with("thing `b`, column `n`")),
            "{corrupt:?}"
        );
    }

    /// The packed page is only an accelerator (any failure falls back to rows), so a broken
    /// query would go unnoticed by the chain tests: check that real SQLite output unpacks.
    #[tokio::test]
    async fn sqlite_packs_pages_that_verify() {
        let (_dir, url, store) = sqlite_store().await;
        let bodies: Vec<_> = (0..1_500)
            .map(|i| {
                // Spaces, colons, multi-byte text and absent fields must not upset the framing.
                let body = EventBody::new(1_700_000_000_000 - i, "call.decision", "a: b c")
                    .detail(serde_json::json!({"note": "é: 1 -1:x", "i": i}));
                if i % 2 == 0 {
                    body.agent("bot ü").decision("allow")
                } else {
                    body.task("")
                }
            })
            .collect();
        store.append_events(bodies).await.unwrap();
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let sql = SqliteBackend::PACKED_EVENTS_SQL.unwrap();
        let mut verifier = ChainVerifier::default();
        for (from, last) in [(i64::MIN, 1_000), (1_001, 1_500)] {
            let row = sqlx::query(sql).bind(from).fetch_one(&pool).await.unwrap();
            let page: String = row.get(0);
            assert!(unpack_events(&page, &mut verifier));
            assert_eq!(row.get::<i64, _>(1), last);
        }
        assert_eq!(verifier.checked(), 1_500);
        let past_the_head = sqlx::query(sql)
            .bind(1_501i64)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(past_the_head.get::<Option<String>, _>(0), None);
    }
}
