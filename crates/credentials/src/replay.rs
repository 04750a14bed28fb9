//! The replay cache: remembers each accepted proof until it would be too old anyway, so that a
//! captured proof cannot be sent twice. Bounded, and closed rather than forgetful when full.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use parking_lot::Mutex;

/// What the cache says about one proof.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Not seen before; now remembered until its expiry.
    Fresh,
    /// Seen before and not yet expired.
    Replayed,
    /// Every slot holds an unexpired entry: refuse, since forgetting one would reopen a replay.
    Full,
}

/// A bounded set of recently accepted proof ids, each with its expiry.
///
/// Entries are kept as the first 128 bits of the SHA-256 of their key, so that every entry
/// has the same small size whatever the key (24 bytes with its expiry). 128 bits keep
/// collisions out of reach: finding a key that collides with a given entry takes about 2^128
/// hashes, and even two colliding proofs would only make the second one look replayed, which
/// refuses it; no collision can make a replayed proof pass. Large caches are split into shards, each with its own lock and its
/// share of the capacity, so that threads rarely wait on each other; the shard is chosen with
/// a per-process random hash, so that nobody can aim their entries at one shard.
#[derive(Debug)]
pub struct ReplayCache {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    hasher: RandomState,
}

impl ReplayCache {
    /// A cache of at most `capacity` entries (rounded up to a multiple of the shard count
    /// for large caches; small caches are one exact shard).
    pub fn new(capacity: usize) -> ReplayCache {
        let shard_count = if capacity >= SHARDED_FROM { SHARDS } else { 1 };
        let shard_capacity = capacity.div_ceil(shard_count).max(1);
        let shards = (0..shard_count)
            .map(|_| Mutex::new(Shard::default()))
            .collect();
        ReplayCache {
            shards,
            shard_capacity,
            hasher: RandomState::new(),
        }
    }

    /// Remembers `key` until `expires_at` unless it is already remembered. An entry counts
    /// until `now` passes its expiry; expired entries make room before the cache says full.
    pub fn check_and_insert(&self, key: &str, expires_at: i64, now: i64) -> Admission {
        let digest = digest(key);
        let index = (self.hasher.hash_one(digest) % self.shards.len() as u64) as usize;
        self.shards[index]
            .lock()
            .admit(digest, expires_at, now, self.shard_capacity)
    }

    /// Entries held, expired or not.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.shard_capacity * self.shards.len()
    }
}

const SHARDS: usize = 16;
/// Below this, sharding would make each shard's share too small to be useful.
const SHARDED_FROM: usize = 1024;

#[derive(Debug)]
struct Shard {
    entries: HashMap<Digest, i64>,
    /// No entry expires before this, so a sweep before then would find nothing: a full shard
    /// under load is swept once per expiry, not once per request.
    earliest_expiry: i64,
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            entries: HashMap::new(),
            earliest_expiry: i64::MAX,
        }
    }
}

impl Shard {
    fn admit(&mut self, digest: Digest, expires_at: i64, now: i64, capacity: usize) -> Admission {
        match self.entries.get(&digest) {
            Some(&expiry) if expiry >= now => return Admission::Replayed,
            // An expired entry for the same key is simply overwritten below.
            Some(_) => {}
            None if self.entries.len() >= capacity => {
                if self.earliest_expiry < now {
                    self.entries.retain(|_, expiry| *expiry >= now);
                    self.earliest_expiry = self.entries.values().copied().min().unwrap_or(i64::MAX);
                }
                if self.entries.len() >= capacity {
                    return Admission::Full;
                }
            }
            None => {}
        }
        self.entries.insert(digest, expires_at);
        self.earliest_expiry = self.earliest_expiry.min(expires_at);
        Admission::Fresh
    }
}

/// How many bytes of a key's SHA-256 an entry keeps.
const DIGEST_BYTES: usize = 16;
const _: () = assert!(
    DIGEST_BYTES * 8 >= 128,
    "replay digests must keep at least 128 bits"
);

type Digest = [u8; DIGEST_BYTES];

fn digest(key: &str) -> Digest {
    let mut out = [0u8; DIGEST_BYTES];
    let full = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
    for (byte, full) in out.iter_mut().zip(full.as_ref()) {
        *byte = *full;
    }
    out
}
