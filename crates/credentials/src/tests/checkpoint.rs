//! Signed audit checkpoints: one valid checkpoint verifies, and each change an attacker could
//! make to it — another key, another payload, another type, another issuer — is refused for
//! its own reason. A checkpoint and a task token never pass for one another.

use serde_json::json;

use crate::checkpoint::{CHECKPOINT_TYP, CheckpointClaims, CheckpointError};
use crate::{SigningKey, TokenError, TokenVerifier, jws, mint_checkpoint, verify_checkpoint};

const ISSUER: &str = "https://remit.example.org";

fn claims() -> CheckpointClaims {
    CheckpointClaims {
        iss: ISSUER.into(),
        seq: 42,
        hash: "ab".repeat(32),
        iat: 1_700_000_000,
    }
}

/// Signs an arbitrary header and payload with `key`, as an attacker holding it could.
fn signed(key: &SigningKey, header: serde_json::Value, payload: serde_json::Value) -> String {
    let header = jws::encode_json(&header).unwrap();
    let payload = jws::encode_json(&payload).unwrap();
    jws::assemble(&header, &payload, |m| key.sign(m)).unwrap()
}

fn check(text: &str, key: &SigningKey) -> Result<CheckpointClaims, CheckpointError> {
    verify_checkpoint(text, &[key.public_jwk()], ISSUER)
}

#[test]
fn a_checkpoint_verifies_with_the_key_that_signed_it() {
    let key = SigningKey::generate("k1").unwrap();
    let text = mint_checkpoint(&key, &claims()).unwrap();
    assert_eq!(check(&text, &key).unwrap(), claims());
    // Surrounding white space (a file's final newline) is not part of the checkpoint.
    assert_eq!(check(&format!("{text}\n"), &key).unwrap(), claims());
}

#[test]
fn a_retired_key_still_verifies_among_several() {
    let old = SigningKey::generate("k-old").unwrap();
    let new = SigningKey::generate("k-new").unwrap();
    let text = mint_checkpoint(&old, &claims()).unwrap();
    let keys = [new.public_jwk(), old.public_jwk()];
    assert_eq!(verify_checkpoint(&text, &keys, ISSUER).unwrap(), claims());
}

#[test]
fn each_change_is_refused_for_its_reason() {
    let key = SigningKey::generate("k1").unwrap();
    let other = SigningKey::generate("k2").unwrap();
    let impostor = SigningKey::generate("k1").unwrap();
    let good = mint_checkpoint(&key, &claims()).unwrap();
    let header = json!({ "alg": "ES256", "kid": "k1", "typ": CHECKPOINT_TYP });
    let payload = serde_json::to_value(claims()).unwrap();

    let mut later = claims();
    later.seq = 41;
    let parts: Vec<&str> = good.split('.').collect();
    let swapped_payload = format!(
        "{}.{}.{}",
        parts[0],
        jws::encode_json(&later).unwrap(),
        parts[2]
    );
    let unsigned = format!(
        "{}.{}.",
        jws::encode_json(&json!({ "alg": "none", "typ": CHECKPOINT_TYP })).unwrap(),
        parts[1]
    );
    let mut foreign = claims();
    foreign.iss = "https://elsewhere.example".into();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "another key's signature",
            mint_checkpoint(&other, &claims()).unwrap(),
            "checkpoint_unknown_kid",
        ),
        (
            "same kid, another key",
            mint_checkpoint(&impostor, &claims()).unwrap(),
            "checkpoint_bad_signature",
        ),
        (
            "payload swapped",
            swapped_payload,
            "checkpoint_bad_signature",
        ),
        ("alg none", unsigned, "checkpoint_alg_not_allowed"),
        (
            "typed as a JWT",
            signed(
                &key,
                json!({ "alg": "ES256", "kid": "k1", "typ": "JWT" }),
                payload.clone(),
            ),
            "checkpoint_wrong_type",
        ),
        (
            "untyped",
            signed(
                &key,
                json!({ "alg": "ES256", "kid": "k1" }),
                payload.clone(),
            ),
            "checkpoint_wrong_type",
        ),
        (
            "no kid",
            signed(
                &key,
                json!({ "alg": "ES256", "typ": CHECKPOINT_TYP }),
                payload.clone(),
            ),
            "checkpoint_missing_kid",
        ),
        (
            "another issuer",
            mint_checkpoint(&key, &foreign).unwrap(),
            "checkpoint_wrong_issuer",
        ),
        (
            "hash not hex",
            signed(
                &key,
                header.clone(),
                json!({ "iss": ISSUER, "seq": 1, "hash": "zz", "iat": 0 }),
            ),
            "checkpoint_malformed",
        ),
        ("not a JWS", "abc".to_string(), "checkpoint_malformed"),
        ("oversized", "a".repeat(9000), "checkpoint_malformed"),
    ];
    for (what, text, code) in cases {
        let error = check(&text, &key).expect_err(what);
        assert_eq!(error.code(), code, "{what}: {error}");
    }
    assert!(check(&good, &key).is_ok(), "the baseline must pass");
}

#[test]
fn a_checkpoint_is_not_a_task_token() {
    let key = SigningKey::generate("k1").unwrap();
    let text = mint_checkpoint(&key, &claims()).unwrap();
    let tokens = TokenVerifier::new(ISSUER, ISSUER, 30);
    tokens.set_keys(&[key.public_jwk()]).unwrap();
    let error = tokens.verify(&text, 1_700_000_000).unwrap_err();
    assert!(matches!(error, TokenError::WrongType(_)), "{error}");
}

#[test]
fn minting_refuses_a_hash_that_is_not_hex() {
    let key = SigningKey::generate("k1").unwrap();
    let mut bad = claims();
    bad.hash = "AB".repeat(32);
    assert_eq!(
        mint_checkpoint(&key, &bad).unwrap_err().code(),
        "checkpoint_malformed"
    );
}
