//! Compact forms of what the call path keeps per task, so that a node holding every active
//! task's state and verified token stays small: identifiers as the bytes they encode, and the
//! strings that repeat across tasks (agents, owners, intents, scope sets) shared through an
//! interner instead of copied into every entry.
//!
//! Each compact form is exact: it turns back into the very string it came from, so a lookup
//! by compact form matches precisely when the strings are equal.

use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use model::TaskId;
use parking_lot::Mutex;

/// A task id (`task_` and 26 base-32 characters) as the 16 bytes it encodes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskKey([u8; 16]);

impl TaskKey {
    /// The key of `text` when it is a task id in the form remit issues (`TaskId::from_random`);
    /// `None` for anything else, which therefore names no task remit could have issued.
    pub fn parse(text: &str) -> Option<TaskKey> {
        let digits = text.strip_prefix("task_")?;
        if digits.len() != 26 {
            return None;
        }
        let mut bytes = [0u8; 16];
        let mut filled = 0;
        let mut buffer: u32 = 0;
        let mut bits = 0;
        for digit in digits.bytes() {
            let value = BASE32.iter().position(|&c| c == digit)?;
            buffer = (buffer << 5) | value as u32;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                if let Some(byte) = bytes.get_mut(filled) {
                    *byte = (buffer >> bits) as u8;
                    filled += 1;
                }
                buffer &= (1 << bits) - 1;
            }
        }
        // The last digit carries two padding bits; only the spelling remit writes (padding
        // zero) is accepted, so that the key turns back into exactly `text`.
        let key = TaskKey(bytes);
        (key.text().as_str() == text).then_some(key)
    }

    /// The task id, spelled on the stack: what the call path formats without allocating.
    pub fn text(&self) -> TaskIdText {
        let mut out = [0u8; TaskIdText::LEN];
        out[..5].copy_from_slice(b"task_");
        let mut digits = out[5..].iter_mut();
        let mut buffer: u32 = 0;
        let mut bits = 0;
        for &byte in &self.0 {
            buffer = (buffer << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                if let Some(digit) = digits.next() {
                    *digit = BASE32[((buffer >> bits) & 31) as usize];
                }
            }
        }
        // 128 bits are 25 digits and 3 bits, written with two zero bits of padding.
        if let Some(digit) = digits.next() {
            *digit = BASE32[((buffer << (5 - bits)) & 31) as usize];
        }
        TaskIdText(out)
    }

    pub fn task_id(&self) -> TaskId {
        TaskId::from_random(self.0)
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text().as_str())
    }
}

/// A task id as [`TaskKey::text`] spells it: `task_` and 26 base-32 digits, on the stack.
#[derive(Clone, Copy)]
pub struct TaskIdText([u8; TaskIdText::LEN]);

impl TaskIdText {
    const LEN: usize = 5 + 26;

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for TaskIdText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskKey({self})")
    }
}

/// The alphabet of `TaskId` (lowercase RFC 4648 base 32).
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A token's `jti`: 16 bytes when it is 32 lowercase hex digits (as remit issues them), its
/// text otherwise.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum TokenJti {
    Hex([u8; 16]),
    Text(Box<str>),
}

impl From<&str> for TokenJti {
    fn from(text: &str) -> TokenJti {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        if text.len() == 32 {
            let mut bytes = [0u8; 16];
            let decoded =
                text.as_bytes()
                    .chunks_exact(2)
                    .zip(bytes.iter_mut())
                    .all(|(pair, byte)| {
                        match (
                            pair.first().copied().and_then(digit),
                            pair.get(1).copied().and_then(digit),
                        ) {
                            (Some(high), Some(low)) => {
                                *byte = (high << 4) | low;
                                true
                            }
                            _ => false,
                        }
                    });
            if decoded {
                return TokenJti::Hex(bytes);
            }
        }
        TokenJti::Text(text.into())
    }
}

impl fmt::Display for TokenJti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenJti::Hex(bytes) => bytes.iter().try_for_each(|b| write!(f, "{b:02x}")),
            TokenJti::Text(text) => f.write_str(text),
        }
    }
}

/// An RFC 7638 key thumbprint (`cnf.jkt`) as the 32 bytes of its SHA-256.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Thumbprint([u8; 32]);

impl Thumbprint {
    /// The thumbprint spelled by `text` (unpadded base64url, 43 characters), `None` when it
    /// is not one: no key's thumbprint could then equal it.
    pub fn parse(text: &str) -> Option<Thumbprint> {
        let mut bytes = [0u8; 32];
        // The decoder refuses non-zero trailing bits, so only one spelling decodes to a given
        // thumbprint and encoding gives `text` back.
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(32) => Some(Thumbprint(bytes)),
            _ => None,
        }
    }

    /// The base64url spelling, as a proof's key thumbprint is compared with it.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
}

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({})", self.encode())
    }
}

/// One shared copy of each distinct value in use. Values nobody else holds any more are
/// dropped by [`Interner::sweep`], so the interner never outgrows the caches that use it.
#[derive(Debug)]
pub struct Interner<T>(Mutex<HashSet<Arc<T>>>);

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner(Mutex::new(HashSet::new()))
    }
}

impl<T: Eq + Hash + Clone> Interner<T> {
    /// The shared copy of `value`, made on first sight. The copy is a fresh clone, so it
    /// carries no spare capacity from deserialization.
    pub fn intern(&self, value: &T) -> Arc<T> {
        let mut values = self.0.lock();
        if let Some(shared) = values.get(value) {
            return Arc::clone(shared);
        }
        let shared = Arc::new(value.clone());
        values.insert(Arc::clone(&shared));
        shared
    }

    /// Forgets the values only the interner still holds. A value is handed out only under
    /// the lock, so one held by nobody else cannot gain a holder while this runs.
    pub fn sweep(&self) {
        let mut values = self.0.lock();
        values.retain(|value| Arc::strong_count(value) > 1);
        // Give memory back after a burst, but not on every sweep: shrinking rehashes.
        if values.capacity() > 4 * values.len().max(64) {
            values.shrink_to_fit();
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_keys_turn_back_into_their_id() {
        let mut seeds = vec![[0u8; 16], [0xff; 16], *b"0123456789abcdef"];
        // Every digit value in every position (the last, with its padding, holds eight).
        seeds.extend(
            (0..=255u8).map(|i| std::array::from_fn(|j| i.wrapping_mul(31) ^ (j as u8 * 17))),
        );
        for seed in seeds {
            let id = TaskId::from_random(seed);
            let key = TaskKey::parse(id.as_str()).unwrap();
            assert_eq!(key.text().as_str(), id.as_str());
            assert_eq!(key.to_string(), id.as_str());
            assert_eq!(key.task_id(), id);
        }
    }

    #[test]
    fn only_the_spelling_remit_issues_is_a_task_key() {
        let id = TaskId::from_random([7; 16]).to_string();
        // The same 128 bits with a padding bit set: a valid `TaskId`, but not one remit
        // issues, so it must not share a key with the real one.
        let mut padded = id.clone().into_bytes();
        let last = padded.last_mut().unwrap();
        let position = BASE32.iter().position(|c| c == last).unwrap();
        *last = BASE32[position | 1];
        let padded = String::from_utf8(padded).unwrap();
        assert!(padded.parse::<TaskId>().is_ok());
        assert_ne!(padded, id);
        assert_eq!(TaskKey::parse(&padded), None);
        for other in [
            "",
            "task_",
            "task_short",
            &id.to_uppercase(),
            &format!("{id}a"),
        ] {
            assert_eq!(TaskKey::parse(other), None, "{other}");
        }
    }

    #[test]
    fn token_ids_are_exact() {
        let hex = "00112233445566778899aabbccddeeff";
        let jti = TokenJti::from(hex);
        assert!(matches!(jti, TokenJti::Hex(_)));
        assert_eq!(jti.to_string(), hex);
        // Upper case or any other text stays text, so it never equals the lowercase one.
        for text in [
            "00112233445566778899AABBCCDDEEFF",
            "jti-1",
            "00112233445566778899aabbccddeef",
        ] {
            let other = TokenJti::from(text);
            assert!(matches!(other, TokenJti::Text(_)), "{text}");
            assert_eq!(other.to_string(), text);
            assert_ne!(other, jti);
        }
    }

    #[test]
    fn thumbprints_are_exact() {
        let text = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";
        let thumbprint = Thumbprint::parse(text).unwrap();
        assert_eq!(thumbprint.encode(), text);
        // The same bytes but for the two trailing bits the last character cannot carry.
        assert_eq!(
            Thumbprint::parse("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xt"),
            None
        );
        for other in ["", "short", &format!("{text}A"), &text.replace('-', "+")] {
            assert_eq!(Thumbprint::parse(other), None, "{other}");
        }
    }

    #[test]
    fn the_interner_shares_and_forgets() {
        let interner = Interner::<Box<str>>::default();
        let first = interner.intern(&Box::from("alice@example.org"));
        let second = interner.intern(&Box::from("alice@example.org"));
        assert!(Arc::ptr_eq(&first, &second));
        let other = interner.intern(&Box::from("bob@example.org"));
        drop(other);
        interner.sweep();
        assert_eq!(interner.len(), 1);
        drop((first, second));
        interner.sweep();
        assert_eq!(interner.len(), 0);
    }
}
