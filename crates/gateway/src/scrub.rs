//! Upstream credentials never travel back to an agent: every spelling of every credential
//! ([`Needles`]) is replaced by `[redacted]`, in a body as it streams and in headers
//! ([`StreamScrubber`], byte for byte, across chunk boundaries) and in a JSON answer after
//! unescaping ([`JsonScrubber`], for MCP, which first checks whether the answer may pass
//! unchanged). Both scrubbers share one set of needles, built once per node.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use model::Secret;
use serde_json::Value;

use crate::mcp::TOOLS_KEY;

/// What replaces every occurrence of an upstream credential on its way back to an agent.
pub(crate) const REDACTED: &str = "[redacted]";

/// The strings to redact: every form in which an upstream credential could travel back to an
/// agent (the whole header value, the credential without its scheme, their JSON-escaped and
/// percent-encoded spellings), with a table of their first bytes so that scanning a body costs
/// one lookup per byte.
pub(crate) struct Needles {
    /// Longest first, so that the first match at a position is the longest.
    list: Vec<Secret<String>>,
    first: [bool; 256],
    longest: usize,
}

impl std::fmt::Debug for Needles {
    /// The count only: even the table of first bytes says something about the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Needles")
            .field("count", &self.list.len())
            .finish_non_exhaustive()
    }
}

impl Needles {
    /// `secrets` are the tools' credentials as sent upstream (`Bearer abc`, or a header value).
    pub(crate) fn new(secrets: &[&str]) -> Needles {
        let mut list: Vec<Secret<String>> = Vec::new();
        let mut add = |needle: String| {
            if !needle.is_empty() && !list.iter().any(|n| n.expose() == &needle) {
                list.push(Secret::new(needle));
            }
        };
        for secret in secrets {
            let mut forms = vec![secret.to_string()];
            // `Bearer abc`: an upstream that echoes the credential may echo `abc` alone.
            if let Some((_, credential)) = secret.split_once(' ') {
                forms.push(credential.trim().to_string());
            }
            for form in forms {
                add(json_escaped(&form));
                add(percent_encoded(&form));
                add(form);
            }
        }
        list.sort_by_key(|n| std::cmp::Reverse(n.expose().len()));
        let mut first = [false; 256];
        for needle in &list {
            if let Some(byte) = needle.expose().as_bytes().first() {
                first[usize::from(*byte)] = true;
            }
        }
        let longest = list.first().map_or(0, |n| n.expose().len());
        Needles {
            list,
            first,
            longest,
        }
    }

    /// True when there is anything to redact.
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The length of the longest needle at `at`, if any.
    fn match_at(&self, haystack: &[u8], at: usize) -> Option<usize> {
        let rest = &haystack[at..];
        self.list
            .iter()
            .map(|needle| needle.expose().as_bytes())
            .find(|needle| rest.starts_with(needle))
            .map(<[u8]>::len)
    }

    /// Replaces every needle in `input`, scanning positions before `safe` only. Returns the
    /// scrubbed output and how much of the input it consumed.
    fn scrub_prefix(&self, input: &[u8], safe: usize, out: &mut BytesMut) -> usize {
        let (mut at, mut literal) = (0, 0);
        while at < safe {
            if self.first[usize::from(input[at])]
                && let Some(length) = self.match_at(input, at)
            {
                out.extend_from_slice(&input[literal..at]);
                out.extend_from_slice(REDACTED.as_bytes());
                at += length;
                literal = at;
                continue;
            }
            at += 1;
        }
        out.extend_from_slice(&input[literal..at]);
        at
    }

    /// The whole of `input`, scrubbed; borrowed when there was nothing to redact.
    pub(crate) fn scrub<'a>(&self, input: &'a [u8]) -> Cow<'a, [u8]> {
        let found = (0..input.len())
            .any(|at| self.first[usize::from(input[at])] && self.match_at(input, at).is_some());
        if !found {
            return Cow::Borrowed(input);
        }
        let mut out = BytesMut::with_capacity(input.len());
        self.scrub_prefix(input, input.len(), &mut out);
        Cow::Owned(out.to_vec())
    }

    /// Whether `text` holds a needle.
    fn finds(&self, text: &str) -> bool {
        self.list
            .iter()
            .any(|needle| text.contains(needle.expose().as_str()))
    }

    /// `text` with every needle replaced, longest first, so that a secret containing another
    /// is replaced whole.
    fn replace(&self, text: &str) -> String {
        let mut out = text.to_string();
        for needle in &self.list {
            let needle = needle.expose().as_str();
            if out.contains(needle) {
                out = out.replace(needle, REDACTED);
            }
        }
        out
    }
}

fn json_escaped(text: &str) -> String {
    let quoted = serde_json::Value::String(text.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

fn percent_encoded(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Redacts credentials from a body as it streams. Each chunk's last `longest - 1` bytes are
/// held back until the next chunk (or the end) shows whether a credential starts there.
#[derive(Debug)]
pub(crate) struct StreamScrubber {
    needles: Arc<Needles>,
    carry: BytesMut,
}

impl StreamScrubber {
    pub(crate) fn new(needles: &Arc<Needles>) -> StreamScrubber {
        StreamScrubber {
            needles: Arc::clone(needles),
            carry: BytesMut::new(),
        }
    }

    /// Scrubs the next chunk; returns what may be sent now.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.run(chunk, false)
    }

    /// Scrubs and returns everything still held back.
    pub(crate) fn finish(&mut self) -> Bytes {
        self.run(&[], true)
    }

    fn run(&mut self, chunk: &[u8], last: bool) -> Bytes {
        let mut input = std::mem::take(&mut self.carry);
        input.extend_from_slice(chunk);
        let hold = if last {
            0
        } else {
            self.needles.longest.saturating_sub(1)
        };
        let safe = input.len().saturating_sub(hold);
        let mut out = BytesMut::with_capacity(input.len());
        let consumed = self.needles.scrub_prefix(&input, safe, &mut out);
        self.carry = input.split_off(consumed);
        out.freeze()
    }
}

/// Replaces upstream credentials in a JSON answer (or any text) going back to the agent,
/// comparing strings after JSON unescaping, so that an escaped secret cannot slip past a
/// byte comparison.
#[derive(Debug, Clone)]
pub(crate) struct JsonScrubber {
    needles: Arc<Needles>,
}

impl JsonScrubber {
    pub(crate) fn new(needles: &Arc<Needles>) -> JsonScrubber {
        JsonScrubber {
            needles: Arc::clone(needles),
        }
    }

    /// Whether `text` holds a credential.
    pub(crate) fn finds(&self, text: &str) -> bool {
        self.needles.finds(text)
    }

    /// Whether a JSON text may go back to the agent byte for byte: it is one JSON value, no
    /// string and no key in it holds a credential (compared after unescaping, as [`value`]
    /// compares), and no key is `tools` (a result the `tools/list` filter may narrow). Checked
    /// in one pass that builds no tree; an answer that fails it (invalid JSON included) takes
    /// the careful path, which parses, filters, scrubs and writes it out again.
    ///
    /// [`value`]: JsonScrubber::value
    pub(crate) fn passes_unchanged(&self, json: &[u8]) -> bool {
        let mut deserializer = serde_json::Deserializer::from_slice(json);
        let scan = Scan {
            needles: &self.needles,
            key: false,
        };
        serde::de::DeserializeSeed::deserialize(scan, &mut deserializer).is_ok()
            && deserializer.end().is_ok()
    }

    pub(crate) fn text(&self, text: &str) -> String {
        self.needles.replace(text)
    }

    /// Scrubs every string and key of a JSON value, after JSON unescaping.
    pub(crate) fn value(&self, value: &mut Value) {
        if self.needles.is_empty() {
            return;
        }
        match value {
            Value::String(text) if self.finds(text) => *text = self.text(text),
            Value::Array(items) => items.iter_mut().for_each(|item| self.value(item)),
            Value::Object(object) => {
                if object.keys().any(|key| self.finds(key)) {
                    let entries = std::mem::take(object);
                    for (key, value) in entries {
                        object.insert(self.text(&key), value);
                    }
                }
                object.values_mut().for_each(|item| self.value(item));
            }
            _ => {}
        }
    }
}

/// [`JsonScrubber::passes_unchanged`]'s walk over a JSON value (`key: false`) or an object's
/// key (`key: true`). It fails (and so stops) at the first string or key that needs the
/// careful path: a credential in either, or a key naming a tool list.
#[derive(Clone, Copy)]
struct Scan<'a> {
    needles: &'a Needles,
    key: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for Scan<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<(), E> {
        if (self.key && text == TOOLS_KEY) || self.needles.finds(text) {
            Err(E::custom("the answer needs rewriting"))
        } else {
            Ok(())
        }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        let key = Scan { key: true, ..self };
        let value = Scan { key: false, ..self };
        while entries.next_key_seed(key)?.is_some() {
            entries.next_value_seed(value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needles(secrets: &[&str]) -> Arc<Needles> {
        Arc::new(Needles::new(secrets))
    }

    /// Feeds `input` cut at every pair of points and checks the result equals one pass.
    fn check_splits(secrets: &[&str], input: &str, expected: &str) {
        let needles = needles(secrets);
        let whole = String::from_utf8(needles.scrub(input.as_bytes()).into_owned()).unwrap();
        assert_eq!(whole, expected, "whole input");
        let bytes = input.as_bytes();
        for first in 0..=bytes.len() {
            for second in first..=bytes.len() {
                let mut scrubber = StreamScrubber::new(&needles);
                let mut out = Vec::new();
                for chunk in [&bytes[..first], &bytes[first..second], &bytes[second..]] {
                    out.extend_from_slice(&scrubber.push(chunk));
                }
                out.extend_from_slice(&scrubber.finish());
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    expected,
                    "cut at {first} and {second}"
                );
            }
        }
    }

    #[test]
    fn scrubs_across_every_chunk_boundary() {
        check_splits(
            &["Bearer s3cret-t0ken"],
            "a s3cret-t0ken b",
            "a [redacted] b",
        );
        check_splits(
            &["Bearer s3cret-t0ken"],
            "Authorization: Bearer s3cret-t0ken",
            "Authorization: [redacted]",
        );
        check_splits(
            &["Bearer s3cret-t0ken"],
            "s3cret-t0kens3cret-t0ken",
            "[redacted][redacted]",
        );
        check_splits(
            &["Bearer s3cret-t0ken"],
            "s3cret-t0ke s3cret-t0",
            "s3cret-t0ke s3cret-t0",
        );
        check_splits(&["Bearer s3cret-t0ken"], "", "");
    }

    #[test]
    fn a_secret_that_extends_another_is_redacted_whole() {
        check_splits(
            &["abcd", "abcdefgh"],
            "xabcdefghx abcdx",
            "x[redacted]x [redacted]x",
        );
    }

    #[test]
    fn escaped_spellings_are_redacted_too() {
        let needles = needles(&["Bearer a+b/c\"d"]);
        for spelling in ["a+b/c\"d", "a+b/c\\\"d", "a%2Bb%2Fc%22d"] {
            let scrubbed = needles
                .scrub(format!("?t={spelling}&").as_bytes())
                .into_owned();
            assert_eq!(scrubbed, b"?t=[redacted]&", "{spelling}");
        }
    }

    #[test]
    fn needles_never_print_a_credential() {
        let needles = needles(&["Bearer s3cret-t0ken"]);
        let printed = format!("{needles:?} {:?}", JsonScrubber::new(&needles));
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("count: 3"), "{printed}");
    }

    const SECRET: &str = "sk-upstream-77";

    fn json_scrubber() -> JsonScrubber {
        JsonScrubber::new(&needles(&[&format!("Bearer {SECRET}")]))
    }

    #[test]
    fn answers_that_need_nothing_pass_unchanged() {
        let scrubber = json_scrubber();
        for clean in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"{\"id\":42}"}]}}"#,
            r#"{"jsonrpc": "2.0", "id": 7, "result": {"isError": false, "n": [1, -2, 3.5e3, null, true]}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"error":{"code":-1,"message":"tool\n"}}]"#,
            r#"{"result":{"toolsets":"sk-upstream"}}"#,
            r#""a string""#,
        ] {
            assert!(scrubber.passes_unchanged(clean.as_bytes()), "{clean}");
        }
    }

    #[test]
    fn answers_with_a_credential_a_tool_list_or_no_json_take_the_careful_path() {
        let scrubber = json_scrubber();
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for needs in [
            // The credential in a value, plain, inside a longer string, escaped, nested.
            format!(r#"{{"result":{{"text":"{SECRET}"}}}}"#),
            format!(r#"{{"result":{{"text":"header: Bearer {SECRET}\n"}}}}"#),
            r#"{"result":{"text":"\u0073k-upstream-77"}}"#.to_string(),
            format!(r#"{{"a":[1,{{"b":["x","{SECRET}"]}}]}}"#),
            // The credential as a key, plain and escaped.
            format!(r#"{{"{SECRET}":1}}"#),
            r#"{"sk-upstream-\u0037\u0037":1}"#.to_string(),
            // A tool list, at any depth and however the key is spelled.
            r#"{"result":{"tools":[]}}"#.to_string(),
            r#"[{"id":1,"result":{"tool\u0073":[{"name":"x"}]}}]"#.to_string(),
            // Not one JSON value.
            String::new(),
            "not json".to_string(),
            r#"{"a":1"#.to_string(),
            r#"{"a":1} {"b":2}"#.to_string(),
            deep,
        ] {
            assert!(!scrubber.passes_unchanged(needs.as_bytes()), "{needs}");
        }
    }
}
