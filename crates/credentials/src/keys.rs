//! Keys: remit's ES256 signing keys and their SPIFFE bundle, agents' registered public keys
//! (P-256 or Ed25519 JWKs) with their RFC 7638 thumbprints, and agent key pairs for acting as
//! an agent in demos, tests and benchmarks.

use std::fmt;

use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair, ParsedPublicKey,
};
use model::Secret;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::jws;

/// Why a key was refused or could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not a JSON object")]
    NotAnObject,
    #[error("key is too large: at most {MAX_JWK_MEMBERS} members and {MAX_JWK_TEXT} bytes")]
    Oversized,
    #[error("key member `{0}` is missing or not a string")]
    MissingMember(&'static str),
    #[error("public key contains the private member `{0}`: hint: register only the public half")]
    PrivateMember(&'static str),
    #[error("unsupported key type `{0}`: use `EC` (P-256) or `OKP` (Ed25519)")]
    UnsupportedKeyType(String),
    #[error("unsupported curve `{0}`: use `P-256` for `EC` keys and `Ed25519` for `OKP` keys")]
    UnsupportedCurve(String),
    #[error("key coordinates are not a valid `{0}` public key")]
    InvalidPublicKey(&'static str),
    #[error("key `alg` is `{found}` but the key is for `{expected}`")]
    WrongAlgorithm {
        found: String,
        expected: &'static str,
    },
    #[error("key `use` is `{0}`: expected `sig` or `jwt-svid`")]
    WrongUse(String),
    #[error("invalid key id `{0}`: use 1 to 64 letters, digits, `.`, `-` and `_`")]
    InvalidKid(String),
    #[error("key id `{0}` appears twice in the key set")]
    DuplicateKid(String),
    #[error("private key rejected: not a P-256 key in PKCS#8 form")]
    Rejected,
    #[error("private key does not match its public members")]
    Inconsistent,
    #[error("key generation failed")]
    Generation,
    #[error("signing failed")]
    Signing,
}

impl KeyError {
    /// A stable identifier for this reason, for API answers and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            KeyError::NotAnObject => "key_malformed",
            KeyError::Oversized => "key_oversized",
            KeyError::MissingMember(_) => "key_missing_member",
            KeyError::PrivateMember(_) => "key_private_member",
            KeyError::UnsupportedKeyType(_) => "key_unsupported_type",
            KeyError::UnsupportedCurve(_) => "key_unsupported_curve",
            KeyError::InvalidPublicKey(_) => "key_invalid_public_key",
            KeyError::WrongAlgorithm { .. } => "key_wrong_algorithm",
            KeyError::WrongUse(_) => "key_wrong_use",
            KeyError::InvalidKid(_) => "key_invalid_kid",
            KeyError::DuplicateKid(_) => "key_duplicate_kid",
            KeyError::Rejected => "key_rejected",
            KeyError::Inconsistent => "key_inconsistent",
            KeyError::Generation => "key_generation_failed",
            KeyError::Signing => "key_signing_failed",
        }
    }
}

/// Bounds on a JWK we accept: a public key has four or five members, a private one six.
pub const MAX_JWK_MEMBERS: usize = 16;
pub const MAX_JWK_TEXT: usize = 4096;

/// The `use` remit's signing keys carry in the bundle, as the SPIFFE bundle format requires.
pub const JWT_SVID_USE: &str = "jwt-svid";

/// An ES256 (P-256) key that signs task tokens.
pub struct SigningKey {
    kid: String,
    pkcs8: Secret<Vec<u8>>,
    key_pair: EcdsaKeyPair,
    public_jwk: Value,
    /// base64url of `{"alg":"ES256","kid":…,"typ":"JWT"}`: the same for every token it signs.
    encoded_header: String,
}

impl SigningKey {
    pub fn generate(kid: impl Into<String>) -> Result<SigningKey, KeyError> {
        let document =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| KeyError::Generation)?;
        SigningKey::from_pkcs8(kid, document.as_ref())
    }

    pub fn from_pkcs8(kid: impl Into<String>, der: &[u8]) -> Result<SigningKey, KeyError> {
        let kid = valid_kid(kid.into())?;
        let key_pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| KeyError::Rejected)?;
        let (x, y) = p256_coordinates(key_pair.public_key().as_ref()).ok_or(KeyError::Rejected)?;
        let public_jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": x,
            "y": y,
            "kid": kid,
            "use": JWT_SVID_USE,
            "alg": "ES256",
        });
        let encoded_header = jws::encode_json(&json!({ "alg": "ES256", "kid": kid, "typ": "JWT" }))
            .map_err(|_| KeyError::Rejected)?;
        Ok(SigningKey {
            kid,
            pkcs8: Secret::new(der.to_vec()),
            key_pair,
            public_jwk,
            encoded_header,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 DER, for storing it.
    pub fn pkcs8(&self) -> &Secret<Vec<u8>> {
        &self.pkcs8
    }

    /// The public half as it appears in the bundle.
    pub fn public_jwk(&self) -> Value {
        self.public_jwk.clone()
    }

    pub(crate) fn encoded_header(&self) -> &str {
        &self.encoded_header
    }

    /// An ES256 signature in JWS form (`r || s`, 64 bytes).
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let signature = self
            .key_pair
            .sign(&SystemRandom::new(), message)
            .map_err(|_| KeyError::Signing)?;
        Ok(signature.as_ref().to_vec())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The SPIFFE trust bundle served at `/.well-known/jwks.json`: a JWK Set plus the bundle's
/// sequence number and how often relying parties should refresh it.
pub fn jwks_bundle(public_jwks: &[Value], sequence: u64, refresh_hint_seconds: u64) -> Value {
    json!({
        "keys": public_jwks,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_seconds,
    })
}

/// An agent's registered public key: P-256 (`EC`) or Ed25519 (`OKP`). Validated, parsed for
/// verification and thumbprinted once, when it is built.
#[derive(Clone)]
pub struct AgentKey {
    curve: Curve,
    x: String,
    /// Present for P-256 only.
    y: Option<String>,
    thumbprint: String,
    verifier: ParsedPublicKey,
}

impl AgentKey {
    /// Reads a public JWK, refusing private members, other key types and curves, and
    /// coordinates that are not a point of the curve.
    pub fn from_jwk(jwk: &Value) -> Result<AgentKey, KeyError> {
        let members = jwk.as_object().ok_or(KeyError::NotAnObject)?;
        if let Some(private) = PRIVATE_MEMBERS
            .iter()
            .find(|name| members.contains_key(**name))
        {
            return Err(KeyError::PrivateMember(private));
        }
        AgentKey::from_members(members)
    }

    /// RFC 7638 thumbprint: base64url SHA-256 of the canonical public members.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The public members only, whatever the key was registered with.
    pub fn to_jwk(&self) -> Value {
        match (&self.curve, &self.y) {
            (Curve::P256, Some(y)) => json!({ "kty": "EC", "crv": "P-256", "x": self.x, "y": y }),
            _ => json!({ "kty": "OKP", "crv": "Ed25519", "x": self.x }),
        }
    }

    /// The JWS `alg` this key signs with: `ES256` or `EdDSA`.
    pub fn algorithm(&self) -> &'static str {
        self.curve.algorithm()
    }

    /// Does `signature` (64 bytes: `r || s` for ES256) sign `message` under this key?
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.verifier.verify_sig(message, signature).is_ok()
    }

    fn from_members(members: &Map<String, Value>) -> Result<AgentKey, KeyError> {
        if members.len() > MAX_JWK_MEMBERS {
            return Err(KeyError::Oversized);
        }
        let text = |name: &'static str| {
            members
                .get(name)
                .and_then(Value::as_str)
                .ok_or(KeyError::MissingMember(name))
        };
        let curve = match text("kty")? {
            "EC" => Curve::P256,
            "OKP" => Curve::Ed25519,
            kty => return Err(KeyError::UnsupportedKeyType(jws::shown(kty))),
        };
        let crv = text("crv")?;
        if crv != curve.name() {
            return Err(KeyError::UnsupportedCurve(jws::shown(crv)));
        }
        if let Some(alg) = members.get("alg")
            && alg.as_str() != Some(curve.algorithm())
        {
            let found = shown_member(alg);
            return Err(KeyError::WrongAlgorithm {
                found,
                expected: curve.algorithm(),
            });
        }
        if let Some(usage) = members.get("use")
            && !matches!(usage.as_str(), Some("sig" | JWT_SVID_USE))
        {
            return Err(KeyError::WrongUse(shown_member(usage)));
        }
        let invalid = || KeyError::InvalidPublicKey(curve.name());
        let x = jws::b64_exact::<32>(text("x")?).ok_or_else(invalid)?;
        match curve {
            Curve::P256 => {
                let y = jws::b64_exact::<32>(text("y")?).ok_or_else(invalid)?;
                AgentKey::new(Curve::P256, &uncompressed_point(&x, &y))
            }
            Curve::Ed25519 => {
                if members.contains_key("y") {
                    return Err(invalid());
                }
                AgentKey::new(Curve::Ed25519, &x)
            }
        }
    }

    /// From raw public key bytes: the uncompressed SEC1 point for P-256, 32 bytes for Ed25519.
    fn new(curve: Curve, public_key: &[u8]) -> Result<AgentKey, KeyError> {
        let invalid = KeyError::InvalidPublicKey(curve.name());
        let (x, y, verifier) = match curve {
            Curve::P256 => {
                let (x, y) = p256_coordinates(public_key).ok_or(invalid.clone())?;
                // Parsing checks that the point lies on the curve, once, instead of per signature.
                let verifier = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key)
                    .map_err(|_| invalid)?;
                (x, Some(y), verifier)
            }
            Curve::Ed25519 => {
                let verifier = ParsedPublicKey::new(&ED25519, public_key).map_err(|_| invalid)?;
                (jws::b64(public_key), None, verifier)
            }
        };
        // RFC 7638 §3.2: the required members only, in lexicographic order, no whitespace.
        // Every value is base64url or a fixed name, so none needs JSON escaping.
        let canonical = match &y {
            Some(y) => format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
            None => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
        };
        let thumbprint = jws::sha256_b64(canonical.as_bytes());
        Ok(AgentKey {
            curve,
            x,
            y,
            thumbprint,
            verifier,
        })
    }
}

/// Two keys are the same key exactly when their thumbprints are equal.
impl PartialEq for AgentKey {
    fn eq(&self, other: &AgentKey) -> bool {
        self.thumbprint == other.thumbprint
    }
}

impl Eq for AgentKey {}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentKey")
            .field("algorithm", &self.algorithm())
            .field("thumbprint", &self.thumbprint)
            .finish()
    }
}

/// An agent's private key, for acting as an agent: `remit demo`, tests and benchmarks.
pub struct AgentKeyPair {
    private: PrivateKey,
    public: AgentKey,
    /// base64url of the proof header `{"alg":…,"jwk":…,"typ":"dpop+jwt"}`, the same for
    /// every proof this key signs.
    encoded_proof_header: String,
    /// Built with the key, so that exporting it cannot fail.
    private_jwk: Secret<String>,
}

impl AgentKeyPair {
    pub fn generate_p256() -> Result<AgentKeyPair, KeyError> {
        let key_pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| KeyError::Generation)?;
        AgentKeyPair::new(PrivateKey::P256(key_pair))
    }

    pub fn generate_ed25519() -> Result<AgentKeyPair, KeyError> {
        let key_pair = Ed25519KeyPair::generate().map_err(|_| KeyError::Generation)?;
        AgentKeyPair::new(PrivateKey::Ed25519(key_pair))
    }

    pub fn public(&self) -> &AgentKey {
        &self.public
    }

    /// The key as a JWK including its private member `d`.
    pub fn to_private_jwk(&self) -> Secret<String> {
        self.private_jwk.clone()
    }

    /// Reads a private JWK as written by [`AgentKeyPair::to_private_jwk`], checking that the
    /// private member matches the public ones.
    pub fn from_private_jwk(text: &str) -> Result<AgentKeyPair, KeyError> {
        if text.len() > MAX_JWK_TEXT {
            return Err(KeyError::Oversized);
        }
        let mut value: Value = serde_json::from_str(text).map_err(|_| KeyError::NotAnObject)?;
        let members = value.as_object_mut().ok_or(KeyError::NotAnObject)?;
        let d = match members.remove("d") {
            Some(Value::String(d)) => Secret::new(d),
            _ => return Err(KeyError::MissingMember("d")),
        };
        if let Some(other) = PRIVATE_MEMBERS
            .iter()
            .find(|name| members.contains_key(**name))
        {
            return Err(KeyError::PrivateMember(other));
        }
        let public = AgentKey::from_members(members)?;
        let d = jws::b64_exact::<32>(d.expose())
            .map(|bytes| Secret::new(bytes.to_vec()))
            .ok_or(KeyError::Inconsistent)?;
        let private = match public.curve {
            Curve::P256 => {
                let point = p256_point(&public).ok_or(KeyError::Inconsistent)?;
                EcdsaKeyPair::from_private_key_and_public_key(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    d.expose(),
                    &point,
                )
                .map(PrivateKey::P256)
            }
            Curve::Ed25519 => {
                let x = jws::b64_exact::<32>(&public.x).ok_or(KeyError::Inconsistent)?;
                Ed25519KeyPair::from_seed_and_public_key(d.expose(), &x).map(PrivateKey::Ed25519)
            }
        };
        AgentKeyPair::new(private.map_err(|_| KeyError::Inconsistent)?)
    }

    /// A DPoP proof (RFC 9449) for one request. With `access_token`, the proof carries its
    /// hash (`ath`), binding the proof to that token.
    pub fn sign_proof(
        &self,
        htm: &str,
        htu: &str,
        access_token: Option<&str>,
        iat: i64,
        jti: &str,
    ) -> Result<String, KeyError> {
        let ath = access_token.map(|token| jws::sha256_b64(token.as_bytes()));
        let claims = ProofClaimsOut {
            jti,
            htm,
            htu,
            iat,
            ath: ath.as_deref(),
        };
        let payload = jws::encode_json(&claims).map_err(|_| KeyError::Signing)?;
        jws::assemble(&self.encoded_proof_header, &payload, |message| {
            self.sign(message)
        })
    }

    /// A raw JWS signature over `message` with this key.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.private {
            PrivateKey::P256(key_pair) => key_pair
                .sign(&SystemRandom::new(), message)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| KeyError::Signing),
            PrivateKey::Ed25519(key_pair) => Ok(key_pair.sign(message).as_ref().to_vec()),
        }
    }

    fn new(private: PrivateKey) -> Result<AgentKeyPair, KeyError> {
        let (public, d) = match &private {
            PrivateKey::P256(key_pair) => (
                AgentKey::new(Curve::P256, key_pair.public_key().as_ref())?,
                key_pair
                    .private_key()
                    .as_be_bytes()
                    .map(|d| jws::b64(d.as_ref())),
            ),
            PrivateKey::Ed25519(key_pair) => (
                AgentKey::new(Curve::Ed25519, key_pair.public_key().as_ref())?,
                key_pair
                    .seed()
                    .and_then(|seed| seed.as_be_bytes())
                    .map(|d| jws::b64(d.as_ref())),
            ),
        };
        let d = Secret::new(d.map_err(|_| KeyError::Generation)?);
        let private_jwk = Secret::new(match &public.y {
            Some(y) => format!(
                r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{y}","d":"{}"}}"#,
                public.x,
                d.expose()
            ),
            None => format!(
                r#"{{"kty":"OKP","crv":"Ed25519","x":"{}","d":"{}"}}"#,
                public.x,
                d.expose()
            ),
        });
        let header = json!({ "alg": public.algorithm(), "jwk": public.to_jwk(), "typ": crate::proof::PROOF_TYP });
        let encoded_proof_header = jws::encode_json(&header).map_err(|_| KeyError::Generation)?;
        Ok(AgentKeyPair {
            private,
            public,
            encoded_proof_header,
            private_jwk,
        })
    }
}

impl fmt::Debug for AgentKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentKeyPair")
            .field("algorithm", &self.public.algorithm())
            .field("thumbprint", &self.public.thumbprint)
            .finish_non_exhaustive()
    }
}

/// JWK members that only a private key has (RFC 7518 §6.2.2, §6.3.2, §6.4).
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Curve {
    P256,
    Ed25519,
}

impl Curve {
    fn algorithm(self) -> &'static str {
        match self {
            Curve::P256 => "ES256",
            Curve::Ed25519 => "EdDSA",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::Ed25519 => "Ed25519",
        }
    }
}

enum PrivateKey {
    P256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

#[derive(Serialize)]
struct ProofClaimsOut<'a> {
    jti: &'a str,
    htm: &'a str,
    htu: &'a str,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ath: Option<&'a str>,
}

/// base64url `x` and `y` of an uncompressed SEC1 P-256 point.
fn p256_coordinates(point: &[u8]) -> Option<(String, String)> {
    match point {
        [0x04, rest @ ..] if rest.len() == 64 => {
            Some((jws::b64(&rest[..32]), jws::b64(&rest[32..])))
        }
        _ => None,
    }
}

fn p256_point(key: &AgentKey) -> Option<[u8; 65]> {
    let x = jws::b64_exact::<32>(&key.x)?;
    let y = jws::b64_exact::<32>(key.y.as_deref()?)?;
    Some(uncompressed_point(&x, &y))
}

fn uncompressed_point(x: &[u8; 32], y: &[u8; 32]) -> [u8; 65] {
    let mut point = [0u8; 65];
    point[0] = 0x04;
    point[1..33].copy_from_slice(x);
    point[33..].copy_from_slice(y);
    point
}

/// A member's value for a message: strings without their quotes, anything else as JSON.
fn shown_member(value: &Value) -> String {
    match value.as_str() {
        Some(text) => jws::shown(text),
        None => jws::shown(&value.to_string()),
    }
}

fn valid_kid(kid: String) -> Result<String, KeyError> {
    let ok = !kid.is_empty()
        && kid.len() <= 64
        && kid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(kid)
    } else {
        Err(KeyError::InvalidKid(jws::shown(&kid)))
    }
}

/// Reads one key of remit's own bundle for verifying task tokens: a P-256 public JWK with a
/// `kid`, for ES256.
pub(crate) fn bundle_key(jwk: &Value) -> Result<(String, ParsedPublicKey), KeyError> {
    let key = AgentKey::from_jwk(jwk)?;
    if key.curve != Curve::P256 {
        return Err(KeyError::UnsupportedCurve(key.curve.name().to_string()));
    }
    let kid = jwk
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(KeyError::MissingMember("kid"))?;
    Ok((valid_kid(kid.to_string())?, key.verifier))
}
