//! Signed checkpoints of the audit chain: remit's statement "event `seq` of my log has hash
//! `hash`", signed ES256 with its token-signing key. A hash chain alone cannot show that its
//! tail was cut off, nor that someone with write access recomputed every hash after an edit;
//! a checkpoint kept outside remit's store (by an auditor, a ticket, a log shipper) can, since
//! the hash at `seq` commits to every event before it. Its `typ` keeps it from passing for a
//! task token, and a task token from passing for a checkpoint.

use std::collections::HashMap;

use aws_lc_rs::signature::ParsedPublicKey;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use thiserror::Error;

use crate::jws::{self, Compact, FramingError};
use crate::keys::{self, KeyError, SigningKey};

/// The JOSE `typ` of a checkpoint (RFC 8725 §3.11: explicit typing).
pub const CHECKPOINT_TYP: &str = "remit-checkpoint+jwt";

/// What a checkpoint attests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointClaims {
    /// remit's issuer (its public URL), as in task tokens.
    pub iss: String,
    /// The sequence number of the attested event (0: the empty log).
    pub seq: u64,
    /// The attested event's hash, 64 lowercase hex digits.
    pub hash: String,
    /// When the checkpoint was signed, in Unix seconds.
    pub iat: i64,
}

/// Why a checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CheckpointError {
    #[error("the checkpoint is malformed: {0}")]
    Malformed(&'static str),
    #[error("the checkpoint's algorithm `{0}` is not ES256")]
    AlgorithmNotAllowed(String),
    #[error("the checkpoint's `typ` is `{0}`, not `{CHECKPOINT_TYP}`")]
    WrongType(String),
    #[error("the checkpoint names no `kid`")]
    MissingKid,
    #[error("the checkpoint is signed by key `{0}`, which is not one of remit's signing keys")]
    UnknownKid(String),
    #[error("the checkpoint's issuer `{0}` is not this remit")]
    WrongIssuer(String),
    #[error("the checkpoint's signature does not verify")]
    BadSignature,
    #[error("a signing key cannot be used: {0}")]
    Key(#[from] KeyError),
    #[error("the checkpoint cannot be signed")]
    Signing,
}

impl CheckpointError {
    /// A stable code for logs and API answers.
    pub fn code(&self) -> &'static str {
        match self {
            CheckpointError::Malformed(_) => "checkpoint_malformed",
            CheckpointError::AlgorithmNotAllowed(_) => "checkpoint_alg_not_allowed",
            CheckpointError::WrongType(_) => "checkpoint_wrong_type",
            CheckpointError::MissingKid => "checkpoint_missing_kid",
            CheckpointError::UnknownKid(_) => "checkpoint_unknown_kid",
            CheckpointError::WrongIssuer(_) => "checkpoint_wrong_issuer",
            CheckpointError::BadSignature => "checkpoint_bad_signature",
            CheckpointError::Key(_) => "checkpoint_key_invalid",
            CheckpointError::Signing => "checkpoint_signing_failed",
        }
    }
}

/// Signs `claims` with `key` as a compact JWS.
pub fn mint_checkpoint(
    key: &SigningKey,
    claims: &CheckpointClaims,
) -> Result<String, CheckpointError> {
    if !is_hash_hex(&claims.hash) {
        return Err(CheckpointError::Malformed(
            "`hash` must be 64 lowercase hex digits",
        ));
    }
    let header = json!({ "alg": "ES256", "kid": key.kid(), "typ": CHECKPOINT_TYP });
    let header = jws::encode_json(&header).map_err(|_| CheckpointError::Signing)?;
    let payload = jws::encode_json(claims).map_err(|_| CheckpointError::Signing)?;
    jws::assemble(&header, &payload, |message| key.sign(message))
        .map_err(|_| CheckpointError::Signing)
}

/// Verifies a checkpoint against remit's signing keys (`public_jwks`: P-256 JWKs with `kid`,
/// retired ones included, since a checkpoint outlives the key's publication) and its issuer.
pub fn verify_checkpoint(
    text: &str,
    public_jwks: &[Value],
    issuer: &str,
) -> Result<CheckpointClaims, CheckpointError> {
    let text = text.trim();
    if text.len() > jws::MAX_COMPACT_LEN {
        return Err(CheckpointError::Malformed(
            "it is longer than remit accepts",
        ));
    }
    let compact = Compact::split(text).map_err(malformed)?;
    let header: jws::Header = compact.header().map_err(malformed)?;
    if header.alg != "ES256" {
        return Err(CheckpointError::AlgorithmNotAllowed(jws::shown(
            &header.alg,
        )));
    }
    match header.typ.as_deref() {
        Some(CHECKPOINT_TYP) => {}
        Some(other) => return Err(CheckpointError::WrongType(jws::shown(other))),
        None => return Err(CheckpointError::WrongType(String::new())),
    }
    if header.crit.is_some() {
        return Err(CheckpointError::Malformed(
            "`crit` names extensions remit does not understand",
        ));
    }
    let kid = header.kid.ok_or(CheckpointError::MissingKid)?;
    let mut keys: HashMap<String, ParsedPublicKey> = HashMap::with_capacity(public_jwks.len());
    for jwk in public_jwks {
        let (kid, key) = keys::bundle_key(jwk)?;
        keys.insert(kid, key);
    }
    let key = keys
        .get(&kid)
        .ok_or_else(|| CheckpointError::UnknownKid(jws::shown(&kid)))?;
    let signature = compact.signature::<64>().map_err(malformed)?;
    key.verify_sig(compact.signing_input.as_bytes(), &signature)
        .map_err(|_| CheckpointError::BadSignature)?;
    // Claims are read only once the signature holds: nothing unauthenticated is reported.
    let claims: CheckpointClaims = compact.payload().map_err(malformed)?;
    if claims.iss != issuer {
        return Err(CheckpointError::WrongIssuer(jws::shown(&claims.iss)));
    }
    if !is_hash_hex(&claims.hash) {
        return Err(CheckpointError::Malformed(
            "`hash` is not 64 lowercase hex digits",
        ));
    }
    Ok(claims)
}

fn malformed(error: FramingError) -> CheckpointError {
    CheckpointError::Malformed(error.reason())
}

fn is_hash_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
