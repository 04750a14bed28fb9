//! Sealing events after the chain head and inserting them, with the fast paths a batch of
//! nothing but appends (and the proof spends they carry) takes.

use std::sync::OnceLock;

use audit::{Event, EventBody};

use super::ops::{Outcome, WriteOp, apply, conflict_or};
use super::rows::{EVENT_COLUMNS, RowExt, to_i64};
use super::writer::Head;
use super::{Arg, Conn, db_error, wrong_outcome};
use crate::{ProofSpend, Result, StoreError};

/// Rows per multi-row `INSERT` into `audit_events`. A few fixed sizes keep the number of
/// distinct statements (and so of prepared statements) small whatever the batch size.
const EVENT_CHUNKS: [usize; 4] = [128, 32, 8, 1];

/// The common case made cheaper still where one query may hold several statements (SQLite):
/// a batch of appends of up to [`GUARDED_CHUNKS`] × [`PADDED_ROWS`] events, sealed after the
/// head this writer last committed, in one round trip: `BEGIN IMMEDIATE`, one insert per
/// chunk of rows, each kept only if the head read inside the transaction is still the one
/// the chunk was sealed after (so a chunk after one that inserted nothing inserts nothing
/// either), the count each inserted, `COMMIT`. If another writer moved the head, nothing was
/// inserted (an empty transaction commits) and the operations come back for the usual path;
/// likewise on any error.
pub(super) async fn appends_in_one_round_trip<C: Conn>(
    conn: &mut C,
    expected: Head,
    ops: Vec<WriteOp>,
) -> Result<(Vec<Result<Outcome>>, Head), Vec<WriteOp>> {
    let events_in = |op: &WriteOp| append_parts(op).map(|(_, events)| events);
    let Some(total) = ops.iter().map(events_in).sum::<Option<usize>>() else {
        return Err(ops);
    };
    if total == 0 || total > PADDED_ROWS * GUARDED_CHUNKS {
        return Err(ops);
    }
    let (spends, appends): (Vec<Option<ProofSpend>>, Vec<Vec<EventBody>>) =
        ops.into_iter().filter_map(into_append).unzip();
    let sizes: Vec<usize> = appends.iter().map(Vec::len).collect();
    let mut head = expected;
    let events = seal(&mut head, appends.into_iter().flatten());
    // Each chunk's guard is the head it was sealed after, as the guard reads it back: `seq`, a
    // space, the hash in SQLite's hexadecimal (none for an empty chain).
    let guard = |head: Head| {
        (head.seq > 0).then(|| format!("{} {}", head.seq, audit::to_hex_upper(&head.hash)))
    };
    let mut args = Vec::with_capacity(total.div_ceil(PADDED_ROWS) + events.len() * 10 + 2);
    // Spent proofs first, guarded by the same head: when it moved, they are not spent either.
    let spent = spends_json(&spends);
    if spent.is_some() {
        args.push(Arg::OptText(guard(expected)));
    }
    let mut before = expected;
    // The last chunk may be short: its padding rows' parameters stay unbound, as NULL.
    let built: Result<()> = events.chunks(PADDED_ROWS).try_for_each(|chunk| {
        args.push(Arg::OptText(guard(before)));
        for event in chunk {
            event_args(event, &mut args)?;
        }
        if let Some(last) = chunk.last() {
            before = Head {
                seq: last.seq,
                hash: last.hash,
            };
        }
        Ok(())
    });
    let inserted = match (built, spent) {
        (Ok(()), None) => conn.fetch_all(guarded_insert_sql(total), args).await.ok(),
        (Ok(()), Some(spent)) => {
            args.insert(1, Arg::Text(spent));
            let sql = guarded_insert_sql(total);
            let sql = format!(
                "BEGIN IMMEDIATE; {GUARDED_SPENDS_SQL}{}",
                sql.strip_prefix("BEGIN IMMEDIATE; ").unwrap_or(sql)
            );
            conn.fetch_all(&sql, args).await.ok()
        }
        (Err(_), _) => None,
    };
    // One `changes()` row per chunk.
    let inserted = inserted.map(|rows| {
        rows.iter()
            .map(|row| row.int_at(0).ok())
            .sum::<Option<i64>>()
    });
    let mut events = events.into_iter();
    if inserted == Some(i64::try_from(total).ok()) {
        let results = sizes
            .into_iter()
            .map(|size| Ok(Outcome::Events(events.by_ref().take(size).collect())))
            .collect();
        return Ok((results, head));
    }
    if inserted.is_none() {
        // An error: the transaction may still be open.
        let _ = conn.execute("ROLLBACK", vec![]).await;
    }
    let mut bodies = events.map(|event| event.body);
    Err(sizes
        .into_iter()
        .zip(spends)
        .map(|(size, spend)| from_append(spend, bodies.by_ref().take(size).collect()))
        .collect())
}

/// Chunks of [`PADDED_ROWS`] rows that [`appends_in_one_round_trip`] sends at most: enough
/// for a batch that carries a few milliseconds of deferred call outcomes under load.
const GUARDED_CHUNKS: usize = 4;

/// The room a padded insert has for a chunk of rows, the smallest that holds them: each
/// padding row still costs SQLite its parameters' clearing and a pass of the insert, which at
/// 128 rows was most of the insert's work for a batch of one event.
const PADDED_SHAPES: [usize; 6] = [4, 16, 32, 64, 96, PADDED_ROWS];

/// The index in [`PADDED_SHAPES`] of the shape that holds `rows` (at most [`PADDED_ROWS`]).
fn padded_shape(rows: usize) -> usize {
    PADDED_SHAPES
        .iter()
        .position(|&room| room >= rows)
        .unwrap_or(PADDED_SHAPES.len() - 1)
}

/// `rows` rows of ten anonymous parameters, for `VALUES`.
fn padded_values(rows: usize) -> String {
    vec![format!("({})", ["?"; 10].join(", ")); rows].join(", ")
}

/// [`appends_in_one_round_trip`]'s statements for `total` events (1 to [`GUARDED_CHUNKS`] ×
/// [`PADDED_ROWS`]): full chunks of [`PADDED_ROWS`] rows, the last one in its
/// [`PADDED_SHAPES`] shape. In each insert the guard comes first, so that its parameter is
/// the chunk's first one, and the padding rows' parameters of the last chunk, at the very end,
/// can stay unbound.
///
/// `OR ROLLBACK` keeps SQLite from keeping a statement journal (a copy of every page the
/// insert touches, made so that one failing row of a multi-row insert can be undone alone):
/// the transaction holds these inserts alone, so a failing row may take all of it. The guard
/// is a scalar subquery, evaluated once, rather than a join with the rows.
fn guarded_insert_sql(total: usize) -> &'static str {
    static SQL: OnceLock<Vec<Vec<String>>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        let insert = |rows: usize| {
            format!(
                "WITH head (unmoved) AS (SELECT ({}) IS ?) \
                 INSERT OR ROLLBACK INTO audit_events ({EVENT_COLUMNS}) \
                 SELECT batch.* FROM (VALUES {}) AS batch \
                 WHERE batch.column1 IS NOT NULL AND (SELECT unmoved FROM head); \
                 SELECT changes(); ",
                "SELECT seq || ' ' || hex(hash) FROM audit_events ORDER BY seq DESC LIMIT 1",
                padded_values(rows)
            )
        };
        let full = insert(PADDED_ROWS);
        (1..=GUARDED_CHUNKS)
            .map(|chunks| {
                PADDED_SHAPES
                    .iter()
                    .map(|&rows| {
                        let leading = full.repeat(chunks - 1);
                        format!("BEGIN IMMEDIATE; {leading}{}COMMIT", insert(rows))
                    })
                    .collect()
            })
            .collect()
    });
    let chunks = total.div_ceil(PADDED_ROWS).clamp(1, GUARDED_CHUNKS);
    let last_rows = total.saturating_sub((chunks - 1) * PADDED_ROWS);
    all.get(chunks - 1)
        .and_then(|shapes| shapes.get(padded_shape(last_rows)))
        .map_or("", String::as_str)
}

/// A batch of nothing but appends, the call path's common case: no savepoint (an append
/// conflicts with nothing, so there is nothing to undo alone), and on SQLite the last insert
/// and the COMMIT share one round trip. On failure the bodies come back, to be retried one
/// append per savepoint.
pub(super) async fn appends_only<C: Conn>(
    conn: &mut C,
    mut head: Head,
    spends: Vec<Option<ProofSpend>>,
    appends: Vec<Vec<EventBody>>,
) -> Result<(Vec<Result<Outcome>>, Head), (StoreError, Vec<Option<ProofSpend>>, Vec<Vec<EventBody>>)>
{
    let sizes: Vec<usize> = appends.iter().map(Vec::len).collect();
    let events = seal(&mut head, appends.into_iter().flatten());
    let spent = match spends_json(&spends) {
        Some(spent) => insert_spends::<C>(conn, spent).await,
        None => Ok(()),
    };
    let inserted = match spent {
        Ok(()) => insert_events(conn, &events, C::MULTI_STATEMENT).await,
        Err(error) => Err(error),
    };
    let inserted = match inserted {
        Ok(()) if !C::MULTI_STATEMENT => conn
            .execute("COMMIT", vec![])
            .await
            .map(drop)
            .map_err(db_error),
        other => other,
    };
    let mut events = events.into_iter();
    match inserted {
        Ok(()) => Ok((
            sizes
                .into_iter()
                .map(|size| Ok(Outcome::Events(events.by_ref().take(size).collect())))
                .collect(),
            head,
        )),
        Err(error) => {
            let mut bodies = events.map(|event| event.body);
            let appends = sizes
                .into_iter()
                .map(|size| bodies.by_ref().take(size).collect())
                .collect();
            Err((error, spends, appends))
        }
    }
}

/// Runs one operation in its own savepoint. `Err` means the transaction itself failed.
pub(super) async fn in_savepoint<C: Conn>(
    conn: &mut C,
    head: &mut Head,
    op: WriteOp,
) -> Result<Result<Outcome>> {
    conn.execute("SAVEPOINT remit_op", vec![])
        .await
        .map_err(db_error)?;
    let before = *head;
    let outcome = apply(conn, head, op).await;
    if outcome.is_err() {
        *head = before;
        conn.execute("ROLLBACK TO SAVEPOINT remit_op", vec![])
            .await
            .map_err(db_error)?;
    }
    conn.execute("RELEASE SAVEPOINT remit_op", vec![])
        .await
        .map_err(db_error)?;
    Ok(outcome)
}

pub(super) async fn append_run<C: Conn>(
    conn: &mut C,
    head: &mut Head,
    run: Vec<Vec<EventBody>>,
    results: &mut Vec<Result<Outcome>>,
) -> Result<()> {
    let sizes: Vec<usize> = run.iter().map(Vec::len).collect();
    let before = *head;
    conn.execute("SAVEPOINT remit_run", vec![])
        .await
        .map_err(db_error)?;
    let events = seal(head, run.into_iter().flatten());
    match insert_events(conn, &events, false).await {
        Ok(()) => {
            conn.execute("RELEASE SAVEPOINT remit_run", vec![])
                .await
                .map_err(db_error)?;
            let mut events = events.into_iter();
            for size in sizes {
                results.push(Ok(Outcome::Events(events.by_ref().take(size).collect())));
            }
        }
        Err(_) => {
            *head = before;
            conn.execute("ROLLBACK TO SAVEPOINT remit_run", vec![])
                .await
                .map_err(db_error)?;
            conn.execute("RELEASE SAVEPOINT remit_run", vec![])
                .await
                .map_err(db_error)?;
            let mut bodies = events.into_iter().map(|event| event.body);
            for size in sizes {
                let op = WriteOp::Append(bodies.by_ref().take(size).collect());
                results.push(in_savepoint(conn, head, op).await?);
            }
        }
    }
    Ok(())
}

/// Chains `bodies` after `head`, advancing it.
pub(super) fn seal(head: &mut Head, bodies: impl IntoIterator<Item = EventBody>) -> Vec<Event> {
    let bodies = bodies.into_iter();
    let mut events = Vec::with_capacity(bodies.size_hint().0);
    let mut scratch = Vec::new();
    for body in bodies {
        let event = Event::seal_in(head.seq + 1, head.hash, body, &mut scratch);
        *head = Head {
            seq: event.seq,
            hash: event.hash,
        };
        events.push(event);
    }
    events
}

pub(super) async fn append_one<C: Conn>(
    conn: &mut C,
    head: &mut Head,
    body: EventBody,
) -> Result<Event> {
    let mut events = seal(head, [body]);
    insert_events(conn, &events, false).await?;
    events.pop().ok_or_else(wrong_outcome)
}

/// Inserts `events` in multi-row statements; with `commit`
/// (only where [`Conn::MULTI_STATEMENT`]) the last one also commits, in the same round trip.
pub(super) async fn insert_events<C: Conn>(
    conn: &mut C,
    events: &[Event],
    commit: bool,
) -> Result<()> {
    let mut rest = events;
    while !rest.is_empty() {
        let (rows, padded) = if C::MULTI_STATEMENT {
            // A few statement shapes whatever the count: unbound parameters read as NULL and
            // the statement skips rows without a `seq`, so a short chunk needs no shape of
            // its own (and no prepare, and no eviction from the statement cache).
            (rest.len().min(PADDED_ROWS), true)
        } else {
            let rows = EVENT_CHUNKS
                .into_iter()
                .find(|&size| size <= rest.len())
                .unwrap_or(1);
            (rows, false)
        };
        let (chunk, tail) = rest.split_at(rows);
        let mut args = Vec::with_capacity(rows * 10);
        for event in chunk {
            event_args(event, &mut args)?;
        }
        let sql = if padded {
            padded_insert_sql(rows, commit && tail.is_empty())
        } else {
            insert_events_sql(rows, C::ANONYMOUS_PARAMS)
        };
        conn.execute(sql, args).await.map_err(db_error)?;
        rest = tail;
    }
    Ok(())
}

/// Rows in the one multi-row `INSERT` used where unbound parameters read as NULL.
pub(super) const PADDED_ROWS: usize = 128;

fn padded_insert_sql(rows: usize, commit: bool) -> &'static str {
    static SQL: OnceLock<Vec<[String; 2]>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        PADDED_SHAPES
            .iter()
            .map(|&room| {
                let plain = format!(
                    "INSERT INTO audit_events ({EVENT_COLUMNS}) \
                     SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL",
                    padded_values(room)
                );
                let committing = format!("{plain}; COMMIT");
                [plain, committing]
            })
            .collect()
    });
    match all.get(padded_shape(rows)) {
        Some([_, committing]) if commit => committing,
        Some([plain, _]) => plain,
        None => "",
    }
}

fn insert_events_sql(rows: usize, anonymous: bool) -> &'static str {
    static NUMBERED: OnceLock<Vec<(usize, String)>> = OnceLock::new();
    static ANONYMOUS: OnceLock<Vec<(usize, String)>> = OnceLock::new();
    let build = || {
        EVENT_CHUNKS
            .iter()
            .map(|&rows| {
                let values: Vec<String> = (0..rows)
                    .map(|row| {
                        let params: Vec<String> = (1..=10)
                            .map(|col| {
                                if anonymous {
                                    "?".to_string()
                                } else {
                                    format!("${}", row * 10 + col)
                                }
                            })
                            .collect();
                        format!("({})", params.join(", "))
                    })
                    .collect();
                let sql = format!(
                    "INSERT INTO audit_events ({EVENT_COLUMNS}) VALUES {}",
                    values.join(", ")
                );
                (rows, sql)
            })
            .collect()
    };
    let all = if anonymous {
        ANONYMOUS.get_or_init(build)
    } else {
        NUMBERED.get_or_init(build)
    };
    all.iter()
        .find(|(size, _)| *size == rows)
        .map_or("", |(_, sql)| sql.as_str())
}

fn event_args(event: &Event, args: &mut Vec<Arg>) -> Result<()> {
    args.extend([
        Arg::Int(to_i64(event.seq, "audit event")?),
        Arg::Int(event.body.time_ms),
        Arg::Text(event.body.kind.clone()),
        Arg::Text(event.body.actor.clone()),
        Arg::OptText(event.body.agent.clone()),
        Arg::OptText(event.body.task.clone()),
        Arg::OptText(event.body.decision.clone()),
        Arg::Text(event.body.detail.as_str().to_owned()),
        Arg::Bytes(event.prev_hash.to_vec()),
        Arg::Bytes(event.hash.to_vec()),
    ]);
    Ok(())
}

/// Whether `op` can take an append fast path: an append, alone or spending a proof. Its spend
/// and its number of events.
pub(super) fn append_parts(op: &WriteOp) -> Option<(Option<ProofSpend>, usize)> {
    match op {
        WriteOp::Append(bodies) => Some((None, bodies.len())),
        WriteOp::Spending(spend, op) => match &**op {
            WriteOp::Append(bodies) => Some((Some(*spend), bodies.len())),
            _ => None,
        },
        _ => None,
    }
}

/// An operation that [`append_parts`] accepts, taken apart.
pub(super) fn into_append(op: WriteOp) -> Option<(Option<ProofSpend>, Vec<EventBody>)> {
    match op {
        WriteOp::Append(bodies) => Some((None, bodies)),
        WriteOp::Spending(spend, op) => match *op {
            WriteOp::Append(bodies) => Some((Some(spend), bodies)),
            _ => None,
        },
        _ => None,
    }
}

/// [`into_append`] undone.
pub(super) fn from_append(spend: Option<ProofSpend>, bodies: Vec<EventBody>) -> WriteOp {
    match spend {
        Some(spend) => WriteOp::Spending(spend, Box::new(WriteOp::Append(bodies))),
        None => WriteOp::Append(bodies),
    }
}

/// The spent proofs among `spends` as one JSON array of `[iat, "digest"]` pairs, the one
/// parameter of the statements that insert them (one statement shape whatever their number),
/// or `None` when there are none.
pub(super) fn spends_json(spends: &[Option<ProofSpend>]) -> Option<String> {
    let mut text = String::from("[");
    for spend in spends.iter().flatten() {
        if text.len() > 1 {
            text.push(',');
        }
        text.push_str(&format!(
            "[{},\"{}\"]",
            spend.iat,
            audit::to_hex(&spend.digest)
        ));
    }
    (text.len() > 1).then(|| text + "]")
}

/// Inserts the spent proofs of [`spends_json`] text: `Conflict` (`what` = `"proof"`) when one
/// of them was already spent, in this transaction or an earlier one.
pub(super) async fn insert_spends<C: Conn>(conn: &mut C, spent: String) -> Result<()> {
    // SQLite, the dialect that runs several statements in one query, reads the pairs with
    // `json_each`; PostgreSQL with `jsonb_array_elements`.
    let sql = if C::MULTI_STATEMENT {
        "INSERT INTO proof_spends (iat, proof) \
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)"
    } else {
        "INSERT INTO proof_spends (iat, proof) \
         SELECT (pair ->> 0)::bigint, pair ->> 1 FROM jsonb_array_elements($1::jsonb) AS pair"
    };
    conn.execute(sql, vec![Arg::Text(spent)])
        .await
        .map(drop)
        .map_err(|error| conflict_or(error, "proof", "already spent"))
}

/// [`insert_spends`] for [`appends_in_one_round_trip`] (SQLite): its first parameter is the
/// head the batch was sealed after, and nothing is inserted if the head moved. `OR ROLLBACK`
/// for the same reason as the events' inserts: a proof spent twice fails the whole batch,
/// which is then retried the careful way, operation by operation.
const GUARDED_SPENDS_SQL: &str = "WITH head (unmoved) AS (SELECT (SELECT seq || ' ' || hex(hash) \
     FROM audit_events ORDER BY seq DESC LIMIT 1) IS ?) \
     INSERT OR ROLLBACK INTO proof_spends (iat, proof) \
     SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?) \
     WHERE (SELECT unmoved FROM head); ";

#[cfg(test)]
mod tests {
    use audit::{ChainVerifier, EventBody};

    use super::{PADDED_ROWS, appends_in_one_round_trip};
    use crate::engine::test_stores::sqlite_store;
    use crate::engine::{WriteOp, writer::Head};

    /// The one-round-trip append is only a shortcut (any failure falls back to the careful
    /// path), so the chain tests cannot tell whether it works: drive it directly, across chunk
    /// sizes, then with a head that moved, which must insert nothing at all.
    #[tokio::test]
    async fn sqlite_appends_many_chunks_in_one_round_trip() {
        let (_dir, url, store) = sqlite_store().await;
        let first = store
            .append_events(vec![EventBody::new(1, "call.decision", "remit")])
            .await
            .unwrap()
            .remove(0);
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let ops = |count: usize| {
            (0..count)
                .map(|i| WriteOp::Append(vec![EventBody::new(i as i64, "call.outcome", "remit")]))
                .collect::<Vec<_>>()
        };
        let mut head = Head {
            seq: first.seq,
            hash: first.hash,
        };
        // Every shape of the last chunk, full and padded, alone and after full chunks.
        let counts = [
            1,
            4,
            5,
            16,
            17,
            33,
            64,
            65,
            97,
            PADDED_ROWS,
            PADDED_ROWS + 1,
        ];
        for count in counts
            .into_iter()
            .chain([2 * PADDED_ROWS + 96, 3 * PADDED_ROWS + 5])
        {
            let Ok((results, after)) = appends_in_one_round_trip(&mut conn, head, ops(count)).await
            else {
                panic!("{count} appends fell back to the careful path");
            };
            assert_eq!(results.len(), count);
            assert_eq!(after.seq, head.seq + count as u64);
            head = after;
        }
        // Sealed after a head that is no longer the head: nothing may be inserted.
        let stale = Head {
            seq: first.seq,
            hash: first.hash,
        };
        let refused = appends_in_one_round_trip(&mut conn, stale, ops(2 * PADDED_ROWS + 1)).await;
        assert!(matches!(refused, Err(ref ops) if ops.len() == 2 * PADDED_ROWS + 1));
        let mut verifier = ChainVerifier::default();
        assert_eq!(store.verify_chain(&mut verifier).await.unwrap(), Ok(()));
        assert_eq!(verifier.checked(), head.seq);
    }
}
