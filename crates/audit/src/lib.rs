//! The audit log's rules: what an event holds, how it is encoded canonically, how each event
//! is chained to its predecessor, and how a chain is verified. No IO: the store persists events,
//! this crate says whether they are intact.
//!
//! Canonical encoding (version 1) of the event with sequence number `seq`, as hashed:
//!
//! ```text
//! "remit-audit-v1\n"
//! u64 big-endian   seq
//! 32 bytes         prev_hash (all zero for the first event)
//! i64 big-endian   time_ms (milliseconds since the Unix epoch)
//! field            kind
//! field            actor
//! optional field   agent
//! optional field   task
//! optional field   decision
//! field            detail, as canonical JSON (object keys sorted by their UTF-8 bytes, no
//!                  insignificant white space, strings escaped as serde_json escapes them):
//!                  the text of [`Detail`]
//! ```
//!
//! where `field` is a u32 big-endian byte length followed by the UTF-8 bytes, and `optional
//! field` is the byte `0` when absent or the byte `1` followed by a `field`. The event's
//! `hash` is SHA-256 of that encoding. Because `seq` and `prev_hash` are inside the hash,
//! an edit, a deletion, an insertion or a reordering breaks the chain at the first event
//! touched, and [`ChainVerifier`] names that sequence number.

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod detail;

pub use detail::{Detail, DetailObject};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first event.
pub const GENESIS: Hash = [0; 32];

const DOMAIN: &[u8] = b"remit-audit-v1\n";

/// Event kinds written by remit. Kinds are open strings so that old logs stay readable.
pub mod kinds {
    pub const AGENT_REGISTERED: &str = "agent.registered";
    pub const AGENT_DISABLED: &str = "agent.disabled";
    pub const AGENT_QUARANTINED: &str = "agent.quarantined";
    pub const AGENT_RELEASED: &str = "agent.released";
    pub const OPERATOR_CREATED: &str = "operator.created";
    pub const OPERATOR_ACTION: &str = "operator.action";
    pub const TASK_GRANTED: &str = "task.granted";
    pub const TASK_REFUSED: &str = "task.refused";
    pub const TASK_DELEGATED: &str = "task.delegated";
    /// On the parent task: it handed part of itself to a child task.
    pub const DELEGATION: &str = "delegation";
    pub const TASK_COMPLETED: &str = "task.completed";
    pub const TASK_REVOKED: &str = "task.revoked";
    pub const REVOCATION: &str = "revocation";
    pub const KEY_CREATED: &str = "key.created";
    pub const KEY_ROTATED: &str = "key.rotated";
    pub const CALL_DECISION: &str = "call.decision";
    pub const CALL_OUTCOME: &str = "call.outcome";
    /// A step-up policy asked for a human: an approval was filed for the exact call.
    pub const APPROVAL_REQUESTED: &str = "approval.requested";
    pub const APPROVAL_APPROVED: &str = "approval.approved";
    pub const APPROVAL_DENIED: &str = "approval.denied";
    /// The approved call came back and spent its approval.
    pub const APPROVAL_CONSUMED: &str = "approval.consumed";
    /// Events (`detail.events`) that committed after their callers had stopped waiting and
    /// been answered that the store is unavailable: what they record did not take effect.
    pub const STORE_UNANSWERED: &str = "store.unanswered";
}

/// What the writer of an event supplies; the chain adds `seq`, `prev_hash` and `hash`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    pub time_ms: i64,
    pub kind: String,
    /// Who caused the event: an operator (`operator:<id>`), an agent's SPIFFE ID, or `remit`.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Structured detail, as the canonical JSON text that is hashed and stored. Never holds a
    /// secret: callers put ids and digests here, not tokens.
    #[serde(default)]
    pub detail: Detail,
}

impl EventBody {
    pub fn new(time_ms: i64, kind: &str, actor: impl Into<String>) -> EventBody {
        EventBody {
            time_ms,
            kind: kind.to_string(),
            actor: actor.into(),
            agent: None,
            task: None,
            decision: None,
            detail: Detail::empty(),
        }
    }

    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    pub fn task(mut self, task: impl Into<String>) -> Self {
        self.task = Some(task.into());
        self
    }

    pub fn decision(mut self, decision: impl Into<String>) -> Self {
        self.decision = Some(decision.into());
        self
    }

    /// A [`Value`] (put in canonical form) or a [`Detail`] already written.
    pub fn detail(mut self, detail: impl Into<Detail>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// An event as stored: its body, its place in the chain and its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    #[serde(flatten)]
    pub body: EventBody,
    #[serde(with = "hex_hash")]
    pub prev_hash: Hash,
    #[serde(with = "hex_hash")]
    pub hash: Hash,
}

impl Event {
    /// Chains `body` after the event with `prev_hash` at position `seq`.
    pub fn seal(seq: u64, prev_hash: Hash, body: EventBody) -> Event {
        Event::seal_in(seq, prev_hash, body, &mut Vec::new())
    }

    /// [`Event::seal`], encoding in `scratch` (cleared first) so that a writer sealing many
    /// events allocates once.
    pub fn seal_in(seq: u64, prev_hash: Hash, body: EventBody, scratch: &mut Vec<u8>) -> Event {
        let hash = stored_form(seq, &prev_hash, &body).compute_hash(scratch);
        Event {
            seq,
            body,
            prev_hash,
            hash,
        }
    }

    /// The event as a store holds it, `detail` as its text: the form that is hashed.
    pub fn stored(&self) -> StoredEvent<'_> {
        StoredEvent {
            hash: self.hash,
            ..stored_form(self.seq, &self.prev_hash, &self.body)
        }
    }
}

/// An event's hashed fields, borrowed, with `detail` as canonical JSON text: what a store
/// holds. Hashing this form costs no JSON work, which is why a store verifies its rows through
/// it (and why a `detail` stored in any other form than the canonical one fails to verify).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredEvent<'a> {
    pub seq: u64,
    pub time_ms: i64,
    pub kind: &'a str,
    pub actor: &'a str,
    pub agent: Option<&'a str>,
    pub task: Option<&'a str>,
    pub decision: Option<&'a str>,
    /// Canonical JSON, as [`canonical_json`] writes it.
    pub detail: &'a str,
    pub prev_hash: Hash,
    pub hash: Hash,
}

impl StoredEvent<'_> {
    /// Appends the canonical encoding described in the crate documentation to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(128 + self.kind.len() + self.actor.len() + self.detail.len());
        out.extend_from_slice(DOMAIN);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.prev_hash);
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        field(out, self.kind);
        field(out, self.actor);
        optional_field(out, self.agent);
        optional_field(out, self.task);
        optional_field(out, self.decision);
        field(out, self.detail);
    }

    /// SHA-256 of the canonical encoding, computed in `scratch` (cleared first) so that a
    /// caller hashing many events allocates once.
    pub fn compute_hash(&self, scratch: &mut Vec<u8>) -> Hash {
        scratch.clear();
        self.encode(scratch);
        sha256(scratch)
    }
}

/// `body` at `seq` after `prev_hash` as a store holds it; its own `hash` is not yet known.
fn stored_form<'a>(seq: u64, prev_hash: &Hash, body: &'a EventBody) -> StoredEvent<'a> {
    StoredEvent {
        seq,
        time_ms: body.time_ms,
        kind: &body.kind,
        actor: &body.actor,
        agent: body.agent.as_deref(),
        task: body.task.as_deref(),
        decision: body.decision.as_deref(),
        detail: body.detail.as_str(),
        prev_hash: *prev_hash,
        hash: GENESIS,
    }
}

fn sha256(bytes: &[u8]) -> Hash {
    let digest = digest::digest(&digest::SHA256, bytes);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

fn field(out: &mut Vec<u8>, text: &str) {
    // Bodies are bounded far below 4 GiB by the request limits; saturate rather than wrap.
    let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn optional_field(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        None => out.push(0),
        Some(text) => {
            out.push(1);
            field(out, text);
        }
    }
}

/// JSON with object keys sorted and no white space, whatever map type serde_json was built with.
pub fn canonical_json(value: &Value, out: &mut String) {
    let mut bytes = std::mem::take(out).into_bytes();
    write_canonical(value, &mut bytes);
    *out = utf8_text(bytes);
}

/// Bytes that only serde_json and `&str`s wrote, so UTF-8, as a `String`; the fallback is for
/// the impossible case and never panics.
fn utf8_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// [`canonical_json`] into bytes: object keys and strings are escaped by serde_json straight
/// into `out`, so that a warm buffer takes no allocation but one for each object's key order.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(key, out);
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => write_scalar(other, out),
    }
}

/// A string, number, boolean or null as serde_json writes it (writing into a `Vec` cannot
/// fail for these).
fn write_scalar(value: &(impl serde::Serialize + ?Sized), out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(out, value);
}

fn content_break(seq: u64) -> ChainBreak {
    ChainBreak {
        seq,
        reason: BreakReason::Content,
    }
}

/// Why a chain failed verification, at which event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at sequence number {seq}: {reason}")]
pub struct ChainBreak {
    /// The first sequence number that is not what an intact chain would hold there.
    pub seq: u64,
    pub reason: BreakReason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakReason {
    #[error(
        "expected sequence number {expected}, found {found} (an event was deleted, inserted or moved)"
    )]
    Sequence { expected: u64, found: u64 },
    #[error("its previous-hash does not match the hash of the event before it")]
    PrevHash,
    #[error("its content does not match its hash (the event was edited)")]
    Content,
}

/// Walks events in the order they are stored and reports the first one that breaks the chain.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: u64,
    prev_hash: Hash,
    checked: u64,
    /// Reused for each event's encoding.
    scratch: Vec<u8>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            next_seq: 1,
            prev_hash: GENESIS,
            checked: 0,
            scratch: Vec::new(),
        }
    }
}

impl ChainVerifier {
    /// Checks one event. After a break, the verifier's state is unspecified: stop there.
    /// Its `detail` is hashed as the text it holds, as [`ChainVerifier::push_stored`] does.
    pub fn push(&mut self, event: &Event) -> Result<(), ChainBreak> {
        self.push_stored(&event.stored())
    }

    /// Checks one event as a store holds it, hashing its `detail` text as stored: a `detail`
    /// edited into any non-canonical form (even one with the same meaning) is a break.
    /// After a break, the verifier's state is unspecified: stop there.
    pub fn push_stored(&mut self, event: &StoredEvent<'_>) -> Result<(), ChainBreak> {
        self.check_link(event.seq, &event.prev_hash)?;
        if event.compute_hash(&mut self.scratch) != event.hash {
            return Err(content_break(event.seq));
        }
        self.advance(event.hash);
        Ok(())
    }

    /// The sequence number the next event must carry: where a store starts reading.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn check_link(&self, seq: u64, prev_hash: &Hash) -> Result<(), ChainBreak> {
        let expected = self.next_seq;
        if seq != expected {
            // A missing or extra event shows as the first position holding the wrong number.
            return Err(ChainBreak {
                seq: expected.min(seq),
                reason: BreakReason::Sequence {
                    expected,
                    found: seq,
                },
            });
        }
        if *prev_hash != self.prev_hash {
            return Err(ChainBreak {
                seq,
                reason: BreakReason::PrevHash,
            });
        }
        Ok(())
    }

    fn advance(&mut self, hash: Hash) {
        self.prev_hash = hash;
        self.next_seq += 1;
        self.checked += 1;
    }

    /// How many events have verified so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The hash of the last verified event (the chain head).
    pub fn head(&self) -> Hash {
        self.prev_hash
    }
}

/// Verifies a whole slice of events, starting from the genesis.
pub fn verify(events: &[Event]) -> Result<u64, ChainBreak> {
    let mut verifier = ChainVerifier::default();
    events.iter().try_for_each(|e| verifier.push(e))?;
    Ok(verifier.checked())
}

/// Lowercase hexadecimal, for hashes in JSON and SQL.
pub fn to_hex(hash: &Hash) -> String {
    hex_with(hash, b"0123456789abcdef")
}

/// Uppercase hexadecimal, as SQLite's `hex()` spells a blob.
pub fn to_hex_upper(hash: &Hash) -> String {
    hex_with(hash, b"0123456789ABCDEF")
}

/// Two digits a byte from a table: the store's writer spells a head once per batch, and the
/// API two hashes per event it shows, where `write!` per byte cost some 8,000 instructions.
fn hex_with(hash: &Hash, digits: &[u8; 16]) -> String {
    let mut out = String::with_capacity(hash.len() * 2);
    for byte in hash {
        out.push(char::from(digits[usize::from(byte >> 4)]));
        out.push(char::from(digits[usize::from(byte & 0x0f)]));
    }
    out
}

/// A hash from 64 hexadecimal digits, either case.
pub fn from_hex(text: &str) -> Option<Hash> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(hash)
}

fn nibble(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(hash: &super::Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(hash))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Hash, D::Error> {
        let text = String::deserialize(d)?;
        super::from_hex(&text).ok_or_else(|| D::Error::custom("expected 64 hexadecimal digits"))
    }
}

#[cfg(test)]
mod tests;
