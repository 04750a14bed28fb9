//! DPoP proofs (RFC 9449): evidence, fresh for each request, that the caller holds the private
//! key a task token is bound to. A token without such a proof is worthless.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::jws::{self, Compact, FramingError, MAX_COMPACT_LEN};
use crate::keys::{AgentKey, KeyError};
use crate::replay::{Admission, ReplayCache};

/// The `typ` header of a DPoP proof.
pub const PROOF_TYP: &str = "dpop+jwt";

/// Longest `jti` accepted: enough for any random id, short enough to keep the cache small.
pub const MAX_JTI_LEN: usize = 128;

/// What one request expects of its proof.
#[derive(Debug, Clone, Copy)]
pub struct ProofCheck<'a> {
    /// The request's method, compared exactly with `htm`.
    pub method: &'a str,
    /// remit's public URL of the route (never the request's own `Host`), compared with `htu`
    /// without query and fragment, scheme and host case-insensitively, default ports elided.
    pub url: &'a str,
    /// The task token sent with the proof: the proof must carry its hash in `ath`. Without a
    /// token, the proof must carry no `ath`.
    pub access_token: Option<&'a str>,
    /// The thumbprint the proof's key must have: the token's `cnf.jkt`, or the thumbprint of
    /// the agent's registered key.
    pub expected_jkt: Option<&'a str>,
    pub now: i64,
}

/// A proof that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
    pub key: AgentKey,
}

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("proof is too long: {0} bytes (at most {MAX_COMPACT_LEN})")]
    Oversized(usize),
    #[error("malformed proof: {0}")]
    Malformed(&'static str),
    #[error("proof `typ` must be `{PROOF_TYP}`")]
    WrongType,
    #[error("proof algorithm `{0}` is not allowed: use `ES256` or `EdDSA`")]
    AlgorithmNotAllowed(String),
    #[error("proof has no `jwk` header")]
    MissingJwk,
    #[error("proof `jwk` header is not acceptable: {0}")]
    InvalidJwk(KeyError),
    #[error("proof algorithm `{alg}` does not match its `{key}` key")]
    AlgorithmMismatch { alg: String, key: &'static str },
    #[error("proof signature is invalid")]
    BadSignature,
    #[error("proof is signed by a key other than the one the token is bound to")]
    KeyMismatch,
    #[error("proof is for method `{0}`, not this request's")]
    WrongMethod(String),
    #[error("proof is for another URL: hint: `htu` must be remit's public URL of this route")]
    WrongUrl,
    #[error(
        "proof was issued at `{iat}`, more than {max_age} seconds ago: hint: sign a fresh proof for each request"
    )]
    IatTooOld { iat: i64, max_age: i64 },
    #[error("proof was issued at `{iat}`, in the future: hint: check the agent's clock")]
    IatInFuture { iat: i64 },
    #[error("proof has no `jti`")]
    MissingJti,
    #[error("proof `jti` was already used: hint: sign a fresh proof for each request")]
    Replayed,
    #[error("proof has no `ath` although a token was sent")]
    MissingAth,
    #[error("proof `ath` does not match the token sent with it")]
    WrongAth,
    #[error("proof carries `ath` although no token was sent")]
    UnexpectedAth,
    #[error("too many recent proofs to check for replay: try again shortly")]
    ReplayCacheFull,
}

impl ProofError {
    /// A stable identifier for this reason, for API answers, audit events and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ProofError::Oversized(_) => "proof_oversized",
            ProofError::Malformed(_) => "proof_malformed",
            ProofError::WrongType => "proof_wrong_type",
            ProofError::AlgorithmNotAllowed(_) => "proof_algorithm_not_allowed",
            ProofError::MissingJwk => "proof_missing_jwk",
            ProofError::InvalidJwk(_) => "proof_invalid_jwk",
            ProofError::AlgorithmMismatch { .. } => "proof_algorithm_mismatch",
            ProofError::BadSignature => "proof_bad_signature",
            ProofError::KeyMismatch => "proof_key_mismatch",
            ProofError::WrongMethod(_) => "proof_wrong_method",
            ProofError::WrongUrl => "proof_wrong_url",
            ProofError::IatTooOld { .. } => "proof_iat_too_old",
            ProofError::IatInFuture { .. } => "proof_iat_in_future",
            ProofError::MissingJti => "proof_missing_jti",
            ProofError::Replayed => "proof_replayed",
            ProofError::MissingAth => "proof_missing_ath",
            ProofError::WrongAth => "proof_wrong_ath",
            ProofError::UnexpectedAth => "proof_unexpected_ath",
            ProofError::ReplayCacheFull => "proof_replay_cache_full",
        }
    }
}

/// Verifies DPoP proofs and remembers the accepted ones. Shared by all request threads.
#[derive(Debug)]
pub struct ProofVerifier {
    max_age_seconds: i64,
    max_future_seconds: i64,
    replay: ReplayCache,
}

impl ProofVerifier {
    /// Proofs are accepted from `max_age_seconds` before `now` to `max_future_seconds` after
    /// it (clock skew); the replay cache holds up to `replay_capacity` recent proofs.
    pub fn new(
        max_age_seconds: i64,
        max_future_seconds: i64,
        replay_capacity: usize,
    ) -> ProofVerifier {
        ProofVerifier {
            max_age_seconds: max_age_seconds.max(0),
            max_future_seconds: max_future_seconds.max(0),
            replay: ReplayCache::new(replay_capacity),
        }
    }

    /// Checks `proof` against what the request expects: framing and header, the signature
    /// by the header's key, that key against the expected one, the claims, and last the
    /// replay cache, so that only proofs that passed every other check take a place in it.
    pub fn verify(&self, proof: &str, check: &ProofCheck<'_>) -> Result<VerifiedProof, ProofError> {
        if proof.len() > MAX_COMPACT_LEN {
            return Err(ProofError::Oversized(proof.len()));
        }
        let compact = Compact::split(proof).map_err(malformed)?;
        let header: ProofHeader = compact.header().map_err(malformed)?;
        if header.typ.as_deref() != Some(PROOF_TYP) {
            return Err(ProofError::WrongType);
        }
        if !matches!(header.alg.as_str(), "ES256" | "EdDSA") {
            return Err(ProofError::AlgorithmNotAllowed(jws::shown(&header.alg)));
        }
        if header.crit.is_some() {
            return Err(ProofError::Malformed(
                "`crit` header names extensions remit does not understand",
            ));
        }
        let key = AgentKey::from_jwk(&header.jwk.ok_or(ProofError::MissingJwk)?)
            .map_err(ProofError::InvalidJwk)?;
        if key.algorithm() != header.alg {
            return Err(ProofError::AlgorithmMismatch {
                alg: header.alg,
                key: key.algorithm(),
            });
        }
        // The signature first: until the proof is shown to be signed by the key its `jwk`
        // names, neither that key nor the claims are the sender's. A proof whose `jwk` is not
        // the key that signed it is a bad proof, never evidence that another key holds the
        // token (which would quarantine the token's agent).
        let signature = compact.signature::<64>().map_err(malformed)?;
        if !key.verifies(compact.signing_input.as_bytes(), &signature) {
            return Err(ProofError::BadSignature);
        }
        if let Some(expected) = check.expected_jkt
            && !bool::from(key.thumbprint().as_bytes().ct_eq(expected.as_bytes()))
        {
            return Err(ProofError::KeyMismatch);
        }

        let claims: ProofClaims = compact.payload().map_err(malformed)?;
        let jti = claims
            .jti
            .filter(|jti| !jti.is_empty())
            .ok_or(ProofError::MissingJti)?;
        if jti.len() > MAX_JTI_LEN {
            return Err(ProofError::Malformed("`jti` is longer than 128 bytes"));
        }
        if claims.htm != check.method {
            return Err(ProofError::WrongMethod(jws::shown(&claims.htm)));
        }
        if !same_htu(&claims.htu, check.url) {
            return Err(ProofError::WrongUrl);
        }
        self.check_iat(claims.iat, check.now)?;
        check_ath(claims.ath.as_deref(), check.access_token)?;

        // A jti need only be unique per key, so the key's thumbprint is part of the entry.
        // The proof is acceptable until `iat + max_age`, so it is remembered until then.
        let replay_key = format!("{}.{jti}", key.thumbprint());
        let expires_at = claims.iat.saturating_add(self.max_age_seconds);
        match self
            .replay
            .check_and_insert(&replay_key, expires_at, check.now)
        {
            Admission::Fresh => {}
            Admission::Replayed => return Err(ProofError::Replayed),
            Admission::Full => return Err(ProofError::ReplayCacheFull),
        }
        Ok(VerifiedProof {
            jkt: key.thumbprint().to_string(),
            jti,
            iat: claims.iat,
            key,
        })
    }

    /// The cache of accepted proofs, for metrics.
    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    fn check_iat(&self, iat: i64, now: i64) -> Result<(), ProofError> {
        if now.saturating_sub(iat) > self.max_age_seconds {
            return Err(ProofError::IatTooOld {
                iat,
                max_age: self.max_age_seconds,
            });
        }
        if iat.saturating_sub(now) > self.max_future_seconds {
            return Err(ProofError::IatInFuture { iat });
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ProofHeader {
    #[serde(default)]
    typ: Option<String>,
    alg: String,
    #[serde(default)]
    jwk: Option<Value>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ProofClaims {
    htm: String,
    htu: String,
    iat: i64,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    ath: Option<String>,
}

fn malformed(error: FramingError) -> ProofError {
    ProofError::Malformed(error.reason())
}

fn check_ath(ath: Option<&str>, access_token: Option<&str>) -> Result<(), ProofError> {
    match (ath, access_token) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(ProofError::UnexpectedAth),
        (None, Some(_)) => Err(ProofError::MissingAth),
        (Some(ath), Some(token)) => {
            let expected = jws::sha256_b64(token.as_bytes());
            if bool::from(ath.as_bytes().ct_eq(expected.as_bytes())) {
                Ok(())
            } else {
                Err(ProofError::WrongAth)
            }
        }
    }
}

/// RFC 9449 §4.3: `htu` matches the request's URI ignoring query and fragment, after the
/// syntax- and scheme-based normalisation of RFC 3986 §6.2.2–6.2.3 (case of scheme, host and
/// percent-escapes; default port; empty path).
pub(crate) fn same_htu(presented: &str, expected: &str) -> bool {
    match (HttpUri::parse(presented), HttpUri::parse(expected)) {
        (Some(presented), Some(expected)) => presented.same_as(&expected),
        _ => false,
    }
}

/// An `http` or `https` URI cut into the parts that `htu` comparison looks at.
struct HttpUri<'a> {
    secure: bool,
    host: &'a str,
    /// `None` for the scheme's default port.
    port: Option<u16>,
    path: &'a str,
}

impl<'a> HttpUri<'a> {
    fn parse(uri: &'a str) -> Option<HttpUri<'a>> {
        let uri = uri.split(['?', '#']).next().unwrap_or_default();
        let (scheme, rest) = uri.split_once("://")?;
        let secure = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            return None;
        };
        let (authority, path) = rest
            .find('/')
            .map_or((rest, ""), |slash| rest.split_at(slash));
        // Credentials in a URL have no place in a proof, and would make two spellings of one
        // host compare unequal in confusing ways.
        if authority.contains('@') {
            return None;
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (address, after) = bracketed.split_once(']')?;
                (&authority[..address.len() + 2], after.strip_prefix(':'))
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return None;
        }
        let port = match port {
            None | Some("") => None,
            Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => {
                Some(digits.parse::<u16>().ok()?)
            }
            Some(_) => return None,
        };
        let default_port = if secure { 443 } else { 80 };
        let port = port.filter(|port| *port != default_port);
        let path = if path.is_empty() { "/" } else { path };
        Some(HttpUri {
            secure,
            host,
            port,
            path,
        })
    }

    fn same_as(&self, other: &HttpUri<'_>) -> bool {
        self.secure == other.secure
            && self.host.eq_ignore_ascii_case(other.host)
            && self.port == other.port
            && same_path(self.path, other.path)
    }
}

/// Paths compare byte for byte, except that the hex digits of percent-escapes are
/// case-insensitive (`%2f` is `%2F`).
fn same_path(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut escape = 0;
    for (x, y) in a.iter().zip(b) {
        let same = if escape > 0 {
            escape -= 1;
            x.eq_ignore_ascii_case(y)
        } else {
            if *x == b'%' {
                escape = 2;
            }
            x == y
        };
        if !same {
            return false;
        }
    }
    true
}
