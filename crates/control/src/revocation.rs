//! The in-memory revocation index the call path consults on every call, fed by the store's
//! revocation feed. A revocation made on this node is applied before the API answers, so the
//! very next call is denied; revocations written by other processes or replicas arrive with
//! the periodic catch-up.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::RwLock;
use store::{Revocation, RevocationKind, Store};

use crate::compact::{TaskKey, TokenJti};
use crate::error::Result;

/// Tokens and tasks are kept in the compact forms the call path holds them in, so that a
/// call is checked without turning its ids back into strings.
#[derive(Debug, Default)]
struct Sets {
    /// Token `jti` → time of its first revocation (when it died).
    tokens: HashMap<TokenJti, i64>,
    /// Task → time of its first revocation (completion is one too).
    tasks: HashMap<TaskKey, i64>,
    /// Task revocations whose target is not a task id remit issues: no task can match them,
    /// but they are kept (and counted) like the others.
    other_tasks: HashSet<String>,
    /// Agent name → time of its latest revocation: tokens issued until then are dead.
    agents: HashMap<String, i64>,
    /// Owner → time of its latest revocation.
    owners: HashMap<String, i64>,
}

/// Why a credential is revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub kind: RevocationKind,
    pub target: String,
    /// When the revocation was taken (Unix seconds): for a token or task the first one, for
    /// an agent or owner the latest.
    pub at: i64,
}

/// What the call path asks about one call.
#[derive(Clone, Copy, Debug)]
pub struct RevocationQuery<'a> {
    pub token_jti: &'a TokenJti,
    pub task: TaskKey,
    /// Every ancestor of the task, nearest first.
    pub ancestors: &'a [TaskKey],
    pub agent: &'a str,
    pub owner: &'a str,
    /// When the token was issued: agent and owner revocations cut tokens issued up to then.
    pub issued_at: i64,
}

#[derive(Debug, Default)]
pub struct RevocationIndex {
    sets: RwLock<Sets>,
    /// The highest feed sequence number applied.
    watermark: AtomicI64,
}

impl RevocationIndex {
    pub fn apply(&self, revocation: &Revocation) {
        let mut sets = self.sets.write();
        let target = revocation.target.clone();
        match revocation.kind {
            RevocationKind::Token => {
                earliest(
                    sets.tokens.entry(TokenJti::from(target.as_str())),
                    revocation.created_at,
                );
            }
            RevocationKind::Task => match TaskKey::parse(&target) {
                Some(task) => earliest(sets.tasks.entry(task), revocation.created_at),
                None => {
                    sets.other_tasks.insert(target);
                }
            },
            RevocationKind::Agent => {
                let at = sets.agents.entry(target).or_insert(revocation.created_at);
                *at = (*at).max(revocation.created_at);
            }
            RevocationKind::Owner => {
                let at = sets.owners.entry(target).or_insert(revocation.created_at);
                *at = (*at).max(revocation.created_at);
            }
        }
        self.watermark.fetch_max(revocation.seq, Ordering::SeqCst);
    }

    pub fn check(&self, query: &RevocationQuery<'_>) -> Option<Revoked> {
        let sets = self.sets.read();
        let revoked = |kind, target: &dyn std::fmt::Display, at: i64| {
            Some(Revoked {
                kind,
                target: target.to_string(),
                at,
            })
        };
        if let Some(&at) = sets.tokens.get(query.token_jti) {
            return revoked(RevocationKind::Token, query.token_jti, at);
        }
        if let Some((task, &at)) = std::iter::once(&query.task)
            .chain(query.ancestors)
            .find_map(|task| sets.tasks.get(task).map(|at| (task, at)))
        {
            return revoked(RevocationKind::Task, task, at);
        }
        if let Some(&at) = sets
            .agents
            .get(query.agent)
            .filter(|&&at| query.issued_at <= at)
        {
            return revoked(RevocationKind::Agent, &query.agent, at);
        }
        if let Some(&at) = sets
            .owners
            .get(query.owner)
            .filter(|&&at| query.issued_at <= at)
        {
            return revoked(RevocationKind::Owner, &query.owner, at);
        }
        None
    }

    /// Applies every revocation the store holds beyond the watermark.
    pub async fn catch_up(&self, store: &dyn Store) -> Result<usize> {
        let mut applied = 0;
        loop {
            let after = self.watermark.load(Ordering::SeqCst);
            let page = store.revocations_after(after, 10_000).await?;
            if page.is_empty() {
                return Ok(applied);
            }
            applied += page.len();
            page.iter().for_each(|r| self.apply(r));
        }
    }

    pub fn len(&self) -> usize {
        let sets = self.sets.read();
        sets.tokens.len()
            + sets.tasks.len()
            + sets.other_tasks.len()
            + sets.agents.len()
            + sets.owners.len()
    }
}

/// Keeps the earliest time a target was revoked: the moment it died.
fn earliest<K>(entry: Entry<'_, K, i64>, at: i64) {
    let slot = entry.or_insert(at);
    *slot = (*slot).min(at);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(seq: i64, kind: RevocationKind, target: &str, created_at: i64) -> Revocation {
        Revocation {
            seq,
            kind,
            target: target.into(),
            reason: "test".into(),
            created_at,
        }
    }

    fn task(n: u8) -> TaskKey {
        TaskKey::parse(model::TaskId::from_random([n; 16]).as_str()).unwrap()
    }

    #[test]
    fn each_kind_bites() {
        let index = RevocationIndex::default();
        let (child, parent, other) = (task(1), task(2), task(3));
        let jti = TokenJti::from("0123456789abcdef0123456789abcdef");
        let query = RevocationQuery {
            token_jti: &jti,
            task: child,
            ancestors: &[parent],
            agent: "bot",
            owner: "alice",
            issued_at: 100,
        };
        assert_eq!(index.check(&query), None);

        index.apply(&revocation(
            1,
            RevocationKind::Task,
            &parent.to_string(),
            50,
        ));
        assert_eq!(
            index.check(&query).map(|r| r.target),
            Some(parent.to_string())
        );

        let fresh = RevocationQuery {
            task: other,
            ancestors: &[],
            ..query
        };
        assert_eq!(index.check(&fresh), None);
        index.apply(&revocation(2, RevocationKind::Agent, "bot", 100));
        assert_eq!(
            index.check(&fresh).map(|r| r.kind),
            Some(RevocationKind::Agent)
        );
        // A token issued after the agent's revocation is not cut by it.
        assert_eq!(
            index.check(&RevocationQuery {
                issued_at: 101,
                ..fresh
            }),
            None
        );

        index.apply(&revocation(3, RevocationKind::Owner, "alice", 200));
        assert_eq!(
            index
                .check(&RevocationQuery {
                    issued_at: 150,
                    ..fresh
                })
                .map(|r| r.kind),
            Some(RevocationKind::Owner)
        );

        index.apply(&revocation(4, RevocationKind::Token, "jti-9", 0));
        let text_jti = TokenJti::from("jti-9");
        let by_token = RevocationQuery {
            token_jti: &text_jti,
            issued_at: 300,
            ..fresh
        };
        assert_eq!(
            index.check(&by_token).map(|r| (r.kind, r.target)),
            Some((RevocationKind::Token, "jti-9".to_string()))
        );
        assert_eq!(index.watermark.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn compact_ids_match_exactly_their_own_spelling() {
        let index = RevocationIndex::default();
        let hex = "0123456789abcdef0123456789abcdef";
        index.apply(&revocation(1, RevocationKind::Token, hex, 0));
        let jti = TokenJti::from(hex);
        let upper = TokenJti::from(hex.to_uppercase().as_str());
        let query = RevocationQuery {
            token_jti: &jti,
            task: task(1),
            ancestors: &[],
            agent: "bot",
            owner: "alice",
            issued_at: 100,
        };
        assert_eq!(index.check(&query).map(|r| r.target), Some(hex.to_string()));
        assert_eq!(
            index.check(&RevocationQuery {
                token_jti: &upper,
                ..query
            }),
            None
        );

        // A task id with a padding bit set parses as a `TaskId` but is another string than
        // the real id, so revoking it must not revoke the task.
        let id = task(1).to_string();
        let mut padded = id.into_bytes();
        if let Some(last) = padded.last_mut() {
            *last = if *last == b'a' { b'b' } else { b'a' };
        }
        let padded = String::from_utf8(padded).unwrap();
        assert!(padded.parse::<model::TaskId>().is_ok());
        index.apply(&revocation(2, RevocationKind::Task, &padded, 0));
        let other = TokenJti::from("other");
        let by_task = RevocationQuery {
            token_jti: &other,
            ..query
        };
        assert_eq!(index.check(&by_task), None);
        assert_eq!(index.len(), 2);
    }
}
