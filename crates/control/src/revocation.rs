//! The in-memory revocation index the call path consults on every call, fed by the store's
//! revocation feed. A revocation made on this node is applied before the API answers, so the
//! very next call is denied; revocations written by other processes or replicas arrive with
//! the periodic catch-up.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::RwLock;
use store::{Revocation, RevocationKind, Store};

use crate::error::Result;

#[derive(Debug, Default)]
struct Sets {
    tokens: HashSet<String>,
    tasks: HashSet<String>,
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
}

/// What the call path asks about one call.
#[derive(Clone, Copy, Debug)]
pub struct RevocationQuery<'a> {
    pub token_jti: &'a str,
    /// The task and every ancestor task.
    pub task_chain: &'a [String],
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
                sets.tokens.insert(target);
            }
            RevocationKind::Task => {
                sets.tasks.insert(target);
            }
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
        let revoked = |kind, target: &str| {
            Some(Revoked {
                kind,
                target: target.to_string(),
            })
        };
        if sets.tokens.contains(query.token_jti) {
            return revoked(RevocationKind::Token, query.token_jti);
        }
        if let Some(task) = query
            .task_chain
            .iter()
            .find(|t| sets.tasks.contains(t.as_str()))
        {
            return revoked(RevocationKind::Task, task);
        }
        if sets
            .agents
            .get(query.agent)
            .is_some_and(|&at| query.issued_at <= at)
        {
            return revoked(RevocationKind::Agent, query.agent);
        }
        if sets
            .owners
            .get(query.owner)
            .is_some_and(|&at| query.issued_at <= at)
        {
            return revoked(RevocationKind::Owner, query.owner);
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
        sets.tokens.len() + sets.tasks.len() + sets.agents.len() + sets.owners.len()
    }
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

    #[test]
    fn each_kind_bites() {
        let index = RevocationIndex::default();
        let chain = vec!["task_child".to_string(), "task_parent".to_string()];
        let query = RevocationQuery {
            token_jti: "jti-1",
            task_chain: &chain,
            agent: "bot",
            owner: "alice",
            issued_at: 100,
        };
        assert_eq!(index.check(&query), None);

        index.apply(&revocation(1, RevocationKind::Task, "task_parent", 50));
        assert_eq!(
            index.check(&query).map(|r| r.target),
            Some("task_parent".into())
        );

        let other_chain = vec!["task_other".to_string()];
        let fresh = RevocationQuery {
            task_chain: &other_chain,
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
        let by_token = RevocationQuery {
            token_jti: "jti-9",
            issued_at: 300,
            ..fresh
        };
        assert_eq!(
            index.check(&by_token).map(|r| r.kind),
            Some(RevocationKind::Token)
        );
        assert_eq!(index.watermark.load(Ordering::SeqCst), 4);
    }
}
