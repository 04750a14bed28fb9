//! Compact JWS plumbing shared by task tokens and DPoP proofs: split once, decode each part
//! once, encode with a precomputed header. Both verifiers build their checks on top of this.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Longest token or proof we look at. Real ones are well under 2 KiB; the bound keeps a
/// hostile header from costing more than a glance.
pub const MAX_COMPACT_LEN: usize = 8 * 1024;

/// The three parts of a compact JWS, still encoded, borrowed from the input.
#[derive(Debug, Clone, Copy)]
pub struct Compact<'a> {
    pub header: &'a str,
    pub payload: &'a str,
    pub signature: &'a str,
    /// `header.payload`: the bytes the signature covers.
    pub signing_input: &'a str,
}

/// The protected header of remit's own JWS kinds (task tokens, checkpoints): what each
/// verifier inspects before it looks at a key. Unknown members are ignored; `crit` is kept so
/// that a verifier can refuse extensions it does not understand.
#[derive(Debug, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub typ: Option<String>,
    #[serde(default)]
    pub crit: Option<serde::de::IgnoredAny>,
}

/// Why the JWS framing was rejected; each caller turns it into its own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    NotThreeParts,
    HeaderEncoding,
    HeaderJson,
    PayloadEncoding,
    PayloadJson,
    SignatureEncoding,
}

impl FramingError {
    pub fn reason(self) -> &'static str {
        match self {
            FramingError::NotThreeParts => "expected three `.`-separated parts",
            FramingError::HeaderEncoding => "header is not base64url",
            FramingError::HeaderJson => "header is not the expected JSON object",
            FramingError::PayloadEncoding => "payload is not base64url",
            FramingError::PayloadJson => "payload is not the expected JSON object",
            FramingError::SignatureEncoding => "signature is not base64url of the right length",
        }
    }
}

impl<'a> Compact<'a> {
    pub fn split(text: &'a str) -> Result<Compact<'a>, FramingError> {
        let mut parts = text.splitn(4, '.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(FramingError::NotThreeParts);
        };
        let signing_input = &text[..header.len() + 1 + payload.len()];
        Ok(Compact {
            header,
            payload,
            signature,
            signing_input,
        })
    }

    pub fn header<T: DeserializeOwned>(&self) -> Result<T, FramingError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(self.header)
            .map_err(|_| FramingError::HeaderEncoding)?;
        serde_json::from_slice(&bytes).map_err(|_| FramingError::HeaderJson)
    }

    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, FramingError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| FramingError::PayloadEncoding)?;
        serde_json::from_slice(&bytes).map_err(|_| FramingError::PayloadJson)
    }

    /// The signature bytes, which must be exactly `N` long (64 for ES256 and EdDSA).
    pub fn signature<const N: usize>(&self) -> Result<[u8; N], FramingError> {
        let mut out = [0u8; N];
        // A valid base64url string of N bytes is exactly this long; checking first also keeps
        // `decode_slice` from writing past the buffer.
        if self.signature.len() != encoded_len(N) {
            return Err(FramingError::SignatureEncoding);
        }
        match URL_SAFE_NO_PAD.decode_slice(self.signature, &mut out) {
            Ok(n) if n == N => Ok(out),
            _ => Err(FramingError::SignatureEncoding),
        }
    }
}

/// Encodes `value` as base64url JSON: a header computed once per key, or a payload.
pub fn encode_json<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    Ok(URL_SAFE_NO_PAD.encode(serde_json::to_vec(value)?))
}

/// `header.payload.signature`, where `sign` signs `header.payload`.
pub fn assemble<E>(
    encoded_header: &str,
    encoded_payload: &str,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    let mut out = String::with_capacity(encoded_header.len() + encoded_payload.len() + 90);
    out.push_str(encoded_header);
    out.push('.');
    out.push_str(encoded_payload);
    let signature = sign(out.as_bytes())?;
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut out);
    Ok(out)
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url into exactly `N` bytes, rejecting padding and non-canonical encodings.
pub fn b64_exact<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != encoded_len(N) {
        return None;
    }
    let mut out = [0u8; N];
    match URL_SAFE_NO_PAD.decode_slice(text, &mut out) {
        Ok(n) if n == N => Some(out),
        _ => None,
    }
}

/// base64url(SHA-256(bytes)): JWK thumbprints and `ath`.
pub fn sha256_b64(bytes: &[u8]) -> String {
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

/// For messages: an attacker-chosen value cut short and stripped of control characters, so
/// that an error stays one readable line.
pub fn shown(value: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = value
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if value.chars().count() > MAX {
        out.push('…');
    }
    out
}

const fn encoded_len(bytes: usize) -> usize {
    (bytes * 4).div_ceil(3)
}
