//! Task tokens: compact JWS signed ES256 with `kid`, shaped as a SPIFFE JWT-SVID and bound to
//! the agent's key (`cnf.jkt`). Minted by the grant path, verified on every call.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use aws_lc_rs::signature::ParsedPublicKey;
use model::{ScopeSet, Secret};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jws::{self, Compact, FramingError, MAX_COMPACT_LEN};
use crate::keys::{self, KeyError, SigningKey};

/// The claims of a task token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskClaims {
    pub iss: String,
    /// The agent's SPIFFE ID.
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    pub task: String,
    pub scope: ScopeSet,
    pub cnf: Confirmation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obo: Option<String>,
}

/// RFC 7800 confirmation: the token is only good with a proof from the key of this thumbprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    pub jkt: String,
}

/// RFC 8693 delegation chain: the current actor, and inside it the one that delegated to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

/// Why a task token was refused or could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("task token is too long: {0} bytes (at most {MAX_COMPACT_LEN})")]
    Oversized(usize),
    #[error("malformed task token: {0}")]
    Malformed(&'static str),
    #[error("task token algorithm `{0}` is not allowed: only `ES256`")]
    AlgorithmNotAllowed(String),
    #[error("task token `typ` is `{0}`: expected `JWT`")]
    WrongType(String),
    #[error("task token has no `kid` header")]
    MissingKid,
    #[error("task token is signed by unknown key `{0}`: hint: it may predate a key rotation")]
    UnknownKid(String),
    #[error("task token signature is invalid")]
    BadSignature,
    #[error("task token expired at `{exp}`: hint: request a new task")]
    Expired { exp: i64 },
    #[error("task token is not valid before `{nbf}`")]
    NotYetValid { nbf: i64 },
    #[error("task token is for audience `{0}`, not this service")]
    WrongAudience(String),
    #[error("task token was issued by `{0}`, not by this service")]
    WrongIssuer(String),
    #[error("task token could not be signed")]
    Signing,
}

impl TokenError {
    /// A stable identifier for this reason, for API answers, audit events and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Oversized(_) => "token_oversized",
            TokenError::Malformed(_) => "token_malformed",
            TokenError::AlgorithmNotAllowed(_) => "token_algorithm_not_allowed",
            TokenError::WrongType(_) => "token_wrong_type",
            TokenError::MissingKid => "token_missing_kid",
            TokenError::UnknownKid(_) => "token_unknown_kid",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired { .. } => "token_expired",
            TokenError::NotYetValid { .. } => "token_not_yet_valid",
            TokenError::WrongAudience(_) => "token_wrong_audience",
            TokenError::WrongIssuer(_) => "token_wrong_issuer",
            TokenError::Signing => "token_signing_failed",
        }
    }
}

/// Signs `claims` as a task token with `key`.
pub fn mint_task_token(
    key: &SigningKey,
    claims: &TaskClaims,
) -> Result<Secret<String>, TokenError> {
    let payload = jws::encode_json(claims).map_err(|_| TokenError::Signing)?;
    let token = jws::assemble(key.encoded_header(), &payload, |message| key.sign(message))
        .map_err(|_| TokenError::Signing)?;
    // Never hand out a token that our own verifier would refuse.
    if token.len() > MAX_COMPACT_LEN {
        return Err(TokenError::Oversized(token.len()));
    }
    Ok(Secret::new(token))
}

/// Verifies task tokens against remit's published keys. Clones share one key set, so that a
/// rotation reaches every clone at once.
#[derive(Clone)]
pub struct TokenVerifier {
    shared: Arc<Shared>,
}

impl TokenVerifier {
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        max_skew_seconds: i64,
    ) -> TokenVerifier {
        TokenVerifier {
            shared: Arc::new(Shared {
                issuer: issuer.into(),
                audience: audience.into(),
                max_skew_seconds: max_skew_seconds.max(0),
                keys: RwLock::new(Arc::new(HashMap::new())),
            }),
        }
    }

    /// Replaces the key set with `public_jwks` (P-256 JWKs, each with a `kid`). All or
    /// nothing: on an error the previous set stays in force.
    pub fn set_keys(&self, public_jwks: &[Value]) -> Result<(), KeyError> {
        let mut keys = HashMap::with_capacity(public_jwks.len());
        for jwk in public_jwks {
            let (kid, key) = keys::bundle_key(jwk)?;
            if keys.contains_key(&kid) {
                return Err(KeyError::DuplicateKid(kid));
            }
            keys.insert(kid, key);
        }
        *self.shared.keys.write() = Arc::new(keys);
        Ok(())
    }

    /// Checks `token` at time `now`: framing, algorithm and key from the header, then the
    /// signature, and only then the claims, which are believed once they are authenticated.
    pub fn verify(&self, token: &str, now: i64) -> Result<TaskClaims, TokenError> {
        if token.len() > MAX_COMPACT_LEN {
            return Err(TokenError::Oversized(token.len()));
        }
        let compact = Compact::split(token).map_err(malformed)?;
        let header: jws::Header = compact.header().map_err(malformed)?;
        // The algorithm is fixed by remit, never chosen by the token: `none`, HMAC with the
        // public key as secret and every other confusion stop here.
        if header.alg != "ES256" {
            return Err(TokenError::AlgorithmNotAllowed(jws::shown(&header.alg)));
        }
        if header.crit.is_some() {
            return Err(TokenError::Malformed(
                "`crit` header names extensions remit does not understand",
            ));
        }
        // JWT-SVID allows `JWT` or `JOSE`; anything else (a DPoP proof, say) is another kind
        // of object that must not pass for a token.
        if let Some(typ) = header
            .typ
            .as_deref()
            .filter(|typ| !matches!(*typ, "JWT" | "JOSE"))
        {
            return Err(TokenError::WrongType(jws::shown(typ)));
        }
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        // Clone the map's handle and release the lock before the signature check, so that a
        // rotation never waits behind verifications.
        let keys = Arc::clone(&self.shared.keys.read());
        let key = keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKid(jws::shown(&kid)))?;

        // The signature before the claims: until it verifies, the payload is the sender's
        // word, and a refusal must not repeat it (an expired or foreign-looking payload on a
        // forged token is refused as a bad signature, not as what it claims to be).
        let signature = compact.signature::<64>().map_err(malformed)?;
        verify_es256(key, compact.signing_input.as_bytes(), &signature)?;

        let claims: TaskClaims = compact.payload().map_err(malformed)?;
        self.check_claims(&claims, now)?;
        Ok(claims)
    }

    fn check_claims(&self, claims: &TaskClaims, now: i64) -> Result<(), TokenError> {
        let shared = &*self.shared;
        if claims.iss != shared.issuer {
            return Err(TokenError::WrongIssuer(jws::shown(&claims.iss)));
        }
        if claims.aud != shared.audience {
            return Err(TokenError::WrongAudience(jws::shown(&claims.aud)));
        }
        // Saturating, so that no claimed value can overflow.
        if now >= claims.exp.saturating_add(shared.max_skew_seconds) {
            return Err(TokenError::Expired { exp: claims.exp });
        }
        if claims.nbf > now.saturating_add(shared.max_skew_seconds) {
            return Err(TokenError::NotYetValid { nbf: claims.nbf });
        }
        Ok(())
    }
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<String> = self.shared.keys.read().keys().cloned().collect();
        kids.sort();
        f.debug_struct("TokenVerifier")
            .field("issuer", &self.shared.issuer)
            .field("audience", &self.shared.audience)
            .field("max_skew_seconds", &self.shared.max_skew_seconds)
            .field("kids", &kids)
            .finish()
    }
}

struct Shared {
    issuer: String,
    audience: String,
    max_skew_seconds: i64,
    keys: RwLock<Arc<HashMap<String, ParsedPublicKey>>>,
}

fn malformed(error: FramingError) -> TokenError {
    TokenError::Malformed(error.reason())
}

fn verify_es256(key: &ParsedPublicKey, message: &[u8], signature: &[u8]) -> Result<(), TokenError> {
    key.verify_sig(message, signature)
        .map_err(|_| TokenError::BadSignature)
}
