//! An event's `detail`: JSON held as the text that is hashed and stored.
//!
//! remit writes it in canonical form (object keys sorted by their UTF-8 bytes, no
//! insignificant white space, strings escaped as serde_json escapes them), either from a
//! [`Value`] or, on the call path, field by field with [`Detail::object`], which never builds
//! a map. Read back from a store it is the stored text, unchanged: if that text is not
//! canonical the event's hash says so, not a silent re-encoding.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// An event's structured detail as JSON text. Never holds a secret: callers put ids and
/// digests here, not tokens.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Detail(String);

impl Detail {
    /// `{}`.
    pub fn empty() -> Detail {
        Detail("{}".to_string())
    }

    /// `value` in canonical form.
    pub fn from_value(value: &Value) -> Detail {
        // A call's detail is some 200 bytes: one allocation, not a doubling series.
        let mut out = String::with_capacity(256);
        crate::canonical_json(value, &mut out);
        Detail(out)
    }

    /// The text a store holds, kept byte for byte: it must be JSON, and whether it is
    /// canonical is for the chain's verification to say.
    pub fn stored(text: String) -> Result<Detail, serde_json::Error> {
        serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        Ok(Detail(text))
    }

    /// A JSON object written field by field, with no map in between. Give the fields in
    /// the byte order of their keys: then the text is canonical as written. Out of order
    /// (or repeated) keys are still correct, at the price of one parse and sort at the end.
    pub fn object() -> DetailObject {
        let mut out = Vec::with_capacity(256);
        out.push(b'{');
        DetailObject {
            out,
            last_key: None,
            sorted: true,
        }
    }

    /// The JSON text, as hashed and stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The detail parsed, for readers that look into it.
    pub fn to_value(&self) -> Value {
        // Always JSON: written from a `Value` or the builder, or checked by `stored`.
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

impl Default for Detail {
    fn default() -> Self {
        Detail::empty()
    }
}

impl From<&Value> for Detail {
    fn from(value: &Value) -> Self {
        Detail::from_value(value)
    }
}

impl From<Value> for Detail {
    fn from(value: Value) -> Self {
        Detail::from_value(&value)
    }
}

impl fmt::Debug for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Detail {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Detail {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Detail::from_value(&Value::deserialize(deserializer)?))
    }
}

/// A [`Detail`] object under construction; see [`Detail::object`].
#[derive(Debug)]
pub struct DetailObject {
    out: Vec<u8>,
    last_key: Option<&'static str>,
    sorted: bool,
}

impl DetailObject {
    pub fn str(mut self, key: &'static str, value: &str) -> Self {
        self.key(key);
        crate::write_scalar(value, &mut self.out);
        self
    }

    /// `null` when absent, as serde_json writes `None`.
    pub fn opt_str(self, key: &'static str, value: Option<&str>) -> Self {
        match value {
            Some(value) => self.str(key, value),
            None => self.null(key),
        }
    }

    pub fn u64(mut self, key: &'static str, value: u64) -> Self {
        self.key(key);
        crate::write_scalar(&value, &mut self.out);
        self
    }

    /// `null` when absent.
    pub fn opt_u64(self, key: &'static str, value: Option<u64>) -> Self {
        match value {
            Some(value) => self.u64(key, value),
            None => self.null(key),
        }
    }

    pub fn bool(mut self, key: &'static str, value: bool) -> Self {
        self.key(key);
        crate::write_scalar(&value, &mut self.out);
        self
    }

    /// An array of strings.
    pub fn strs<S: AsRef<str>>(mut self, key: &'static str, values: &[S]) -> Self {
        self.key(key);
        self.out.push(b'[');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            crate::write_scalar(value.as_ref(), &mut self.out);
        }
        self.out.push(b']');
        self
    }

    /// Any JSON value, written in canonical form.
    pub fn value(mut self, key: &'static str, value: &Value) -> Self {
        self.key(key);
        crate::write_canonical(value, &mut self.out);
        self
    }

    pub fn finish(mut self) -> Detail {
        self.out.push(b'}');
        // Only UTF-8 was written: keys and strings come from `&str`, escaped by serde_json.
        let text = crate::utf8_text(self.out);
        if self.sorted {
            return Detail(text);
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(value) => Detail::from_value(&value),
            // Unreachable (the builder writes JSON); keep the text rather than lose it.
            Err(_) => Detail(text),
        }
    }

    fn null(mut self, key: &'static str) -> Self {
        self.key(key);
        self.out.extend_from_slice(b"null");
        self
    }

    fn key(&mut self, key: &'static str) {
        match self.last_key {
            None => {}
            Some(last) => {
                if last.as_bytes() >= key.as_bytes() {
                    self.sorted = false;
                }
                self.out.push(b',');
            }
        }
        self.last_key = Some(key);
        // Keys are names in the code: written as they are unless JSON needs an escape.
        if key.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.out.push(b'"');
            self.out.extend_from_slice(key.as_bytes());
            self.out.extend_from_slice(b"\":");
        } else {
            crate::write_scalar(key, &mut self.out);
            self.out.push(b':');
        }
    }
}
