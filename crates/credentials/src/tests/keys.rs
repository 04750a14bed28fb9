//! Keys: round trips, thumbprints against values computed elsewhere, validation of public
//! JWKs, rotation of the token key set, and `Debug` output without key material.

use serde_json::{Value, json};

use super::{b64, sha256_b64};
use crate::{
    AgentKey, AgentKeyPair, Confirmation, ProofCheck, ProofVerifier, SigningKey, TaskClaims,
    TokenVerifier, jwks_bundle, mint_task_token,
};

const NOW: i64 = 1_700_000_000;
const ISSUER: &str = "https://remit.example.org";

fn claims() -> TaskClaims {
    TaskClaims {
        iss: ISSUER.into(),
        sub: "spiffe://example.org/agent/triage-bot".into(),
        aud: ISSUER.into(),
        iat: NOW,
        nbf: NOW,
        exp: NOW + 300,
        jti: "tok_1".into(),
        task: "task_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        scope: model::ScopeSet(vec![model::Scope::new("github", &["*"], &[])]),
        cnf: Confirmation { jkt: "jkt".into() },
        act: None,
        obo: None,
    }
}

fn token_by(key: &SigningKey) -> String {
    mint_task_token(key, &claims()).unwrap().expose().clone()
}

fn verify_code(verifier: &TokenVerifier, token: &str) -> Result<(), &'static str> {
    verifier
        .verify(token, NOW)
        .map(|_| ())
        .map_err(|e| e.code())
}

#[test]
fn signing_key_round_trips_through_pkcs8() {
    let key = SigningKey::generate("k1").unwrap();
    let restored = SigningKey::from_pkcs8("k1", key.pkcs8().expose()).unwrap();
    assert_eq!(restored.public_jwk(), key.public_jwk());

    let verifier = TokenVerifier::new(ISSUER, ISSUER, 0);
    verifier.set_keys(&[key.public_jwk()]).unwrap();
    assert_eq!(verify_code(&verifier, &token_by(&restored)), Ok(()));

    assert_eq!(
        SigningKey::from_pkcs8("k1", b"not a key")
            .unwrap_err()
            .code(),
        "key_rejected"
    );
    assert_eq!(
        SigningKey::generate("has space").unwrap_err().code(),
        "key_invalid_kid"
    );
    assert_eq!(
        SigningKey::generate("").unwrap_err().code(),
        "key_invalid_kid"
    );
}

#[test]
fn signing_key_publishes_a_spiffe_bundle_entry() {
    let key = SigningKey::generate("k1").unwrap();
    let jwk = key.public_jwk();
    for (member, value) in [
        ("kty", "EC"),
        ("crv", "P-256"),
        ("kid", "k1"),
        ("use", "jwt-svid"),
        ("alg", "ES256"),
    ] {
        assert_eq!(jwk[member], json!(value), "{member}");
    }
    assert!(jwk.get("d").is_none());
    assert_eq!(
        jwks_bundle(std::slice::from_ref(&jwk), 7, 300),
        json!({ "keys": [jwk], "spiffe_sequence": 7, "spiffe_refresh_hint": 300 })
    );
}

#[test]
fn agent_keys_round_trip_through_private_jwks() {
    for generate in [AgentKeyPair::generate_p256, AgentKeyPair::generate_ed25519] {
        let original = generate().unwrap();
        let restored = AgentKeyPair::from_private_jwk(original.to_private_jwk().expose()).unwrap();
        assert_eq!(restored.public(), original.public());
        assert_eq!(restored.public().to_jwk(), original.public().to_jwk());

        // The restored private key really is the same key: its proofs verify as the original's.
        let proof = restored
            .sign_proof("GET", "https://remit.example.org/x", None, NOW, "j")
            .unwrap();
        let check = ProofCheck {
            method: "GET",
            url: "https://remit.example.org/x",
            access_token: None,
            expected_jkt: Some(original.public().thumbprint()),
            now: NOW,
        };
        ProofVerifier::new(60, 5, 10)
            .verify(&proof, &check)
            .unwrap();

        // Registering the public half: round trip through its JWK.
        assert_eq!(
            AgentKey::from_jwk(&original.public().to_jwk()).unwrap(),
            *original.public()
        );
    }
}

#[test]
fn private_jwks_must_be_consistent() {
    let one = AgentKeyPair::generate_p256().unwrap();
    let other = AgentKeyPair::generate_p256().unwrap();
    let mut jwk: Value = serde_json::from_str(one.to_private_jwk().expose()).unwrap();
    let foreign: Value = serde_json::from_str(other.to_private_jwk().expose()).unwrap();
    assert!(AgentKeyPair::from_private_jwk(&jwk.to_string()).is_ok());
    jwk["d"] = foreign["d"].clone();
    assert_eq!(
        AgentKeyPair::from_private_jwk(&jwk.to_string())
            .unwrap_err()
            .code(),
        "key_inconsistent"
    );
    jwk.as_object_mut().unwrap().remove("d");
    assert_eq!(
        AgentKeyPair::from_private_jwk(&jwk.to_string())
            .unwrap_err()
            .code(),
        "key_missing_member"
    );
    assert_eq!(
        AgentKeyPair::from_private_jwk(&" ".repeat(5000))
            .unwrap_err()
            .code(),
        "key_oversized"
    );
}

/// RFC 8037 §A.1–A.4: the Ed25519 example key, its thumbprint and its (deterministic) JWS.
#[test]
fn ed25519_matches_rfc_8037_examples() {
    let private = r#"{"kty":"OKP","crv":"Ed25519",
        "d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
        "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
    let key = AgentKeyPair::from_private_jwk(private).unwrap();
    assert_eq!(
        key.public().thumbprint(),
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    );
    assert_eq!(key.public().algorithm(), "EdDSA");
    let input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
    assert_eq!(
        b64(&key.sign(input.as_bytes()).unwrap()),
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    );
}

#[test]
fn p256_thumbprints_match_independent_values() {
    // RFC 7515 §A.3's ES256 key; the value was computed outside this crate (Python hashlib).
    let example = json!({
        "kty": "EC",
        "crv": "P-256",
        "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        "kid": "ignored",
        "use": "sig",
    });
    let key = AgentKey::from_jwk(&example).unwrap();
    assert_eq!(
        key.thumbprint(),
        "oKIywvGUpTVTyxMQ3bwIIeQUudfr_CkLMjCE19ECD-U"
    );
    assert_eq!(key.algorithm(), "ES256");

    // A fresh key, hashed here by hand from RFC 7638's canonical form.
    let fresh = AgentKeyPair::generate_p256().unwrap();
    let jwk = fresh.public().to_jwk();
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap()
    );
    assert_eq!(
        fresh.public().thumbprint(),
        sha256_b64(canonical.as_bytes())
    );
}

/// Each row changes one member of a valid public JWK.
#[test]
fn public_jwks_are_validated() {
    let p256 = AgentKeyPair::generate_p256().unwrap().public().to_jwk();
    let ed25519 = AgentKeyPair::generate_ed25519().unwrap().public().to_jwk();
    let x = p256["x"].as_str().unwrap().to_string();
    let with = |base: &Value, member: &str, value: Value| {
        let mut jwk = base.clone();
        jwk[member] = value;
        jwk
    };
    let without = |base: &Value, member: &str| {
        let mut jwk = base.clone();
        jwk.as_object_mut().unwrap().remove(member);
        jwk
    };
    let mut crowded = p256.clone();
    for i in 0..13 {
        crowded[format!("extra{i}")] = json!(i);
    }
    let cases: Vec<(&str, Value, Result<(), &str>)> = vec![
        ("valid P-256", p256.clone(), Ok(())),
        ("valid Ed25519", ed25519.clone(), Ok(())),
        (
            "with alg and use",
            with(&with(&p256, "alg", json!("ES256")), "use", json!("sig")),
            Ok(()),
        ),
        (
            "private d",
            with(&p256, "d", json!(x)),
            Err("key_private_member"),
        ),
        (
            "Ed25519 private d",
            with(&ed25519, "d", json!(x)),
            Err("key_private_member"),
        ),
        (
            "RSA",
            with(&p256, "kty", json!("RSA")),
            Err("key_unsupported_type"),
        ),
        (
            "symmetric",
            with(&p256, "kty", json!("oct")),
            Err("key_unsupported_type"),
        ),
        (
            "P-384",
            with(&p256, "crv", json!("P-384")),
            Err("key_unsupported_curve"),
        ),
        (
            "X25519",
            with(&ed25519, "crv", json!("X25519")),
            Err("key_unsupported_curve"),
        ),
        (
            "x too short",
            with(&p256, "x", json!(&x[2..])),
            Err("key_invalid_public_key"),
        ),
        (
            "x padded",
            with(&p256, "x", json!(format!("{x}="))),
            Err("key_invalid_public_key"),
        ),
        (
            "x not base64url",
            with(
                &p256,
                "x",
                json!(x.replace(|c: char| c.is_ascii_alphabetic(), "+")),
            ),
            Err("key_invalid_public_key"),
        ),
        (
            "point off the curve",
            with(&p256, "y", json!(x)),
            Err("key_invalid_public_key"),
        ),
        (
            "Ed25519 with y",
            with(&ed25519, "y", json!(x)),
            Err("key_invalid_public_key"),
        ),
        ("missing y", without(&p256, "y"), Err("key_missing_member")),
        (
            "missing kty",
            without(&p256, "kty"),
            Err("key_missing_member"),
        ),
        (
            "alg of another family",
            with(&p256, "alg", json!("EdDSA")),
            Err("key_wrong_algorithm"),
        ),
        (
            "use enc",
            with(&p256, "use", json!("enc")),
            Err("key_wrong_use"),
        ),
        ("not an object", json!([p256.clone()]), Err("key_malformed")),
        ("too many members", crowded, Err("key_oversized")),
    ];
    for (reason, jwk, expected) in cases {
        let outcome = AgentKey::from_jwk(&jwk).map(|_| ()).map_err(|e| e.code());
        assert_eq!(outcome, expected, "{reason}");
    }
}

#[test]
fn rotation_replaces_the_key_set() {
    let old = SigningKey::generate("k1").unwrap();
    let new = SigningKey::generate("k2").unwrap();
    let (old_token, new_token) = (token_by(&old), token_by(&new));
    let verifier = TokenVerifier::new(ISSUER, ISSUER, 0);
    // Clones share the key set: a rotation reaches every holder of the verifier.
    let clone = verifier.clone();

    verifier.set_keys(&[old.public_jwk()]).unwrap();
    assert_eq!(verify_code(&clone, &old_token), Ok(()));
    assert_eq!(verify_code(&clone, &new_token), Err("token_unknown_kid"));

    verifier
        .set_keys(&[old.public_jwk(), new.public_jwk()])
        .unwrap();
    assert_eq!(verify_code(&clone, &old_token), Ok(()));
    assert_eq!(verify_code(&clone, &new_token), Ok(()));

    verifier.set_keys(&[new.public_jwk()]).unwrap();
    assert_eq!(verify_code(&clone, &old_token), Err("token_unknown_kid"));
    assert_eq!(verify_code(&clone, &new_token), Ok(()));
}

#[test]
fn a_bad_key_set_changes_nothing() {
    let key = SigningKey::generate("k1").unwrap();
    let token = token_by(&key);
    let verifier = TokenVerifier::new(ISSUER, ISSUER, 0);
    verifier.set_keys(&[key.public_jwk()]).unwrap();

    let other = SigningKey::generate("k2").unwrap().public_jwk();
    let mut no_kid = other.clone();
    no_kid.as_object_mut().unwrap().remove("kid");
    let ed25519 = AgentKeyPair::generate_ed25519().unwrap().public().to_jwk();
    let mut ed25519_with_kid = ed25519.clone();
    ed25519_with_kid["kid"] = json!("k3");
    let refused = [
        (vec![no_kid], "key_missing_member"),
        (vec![other.clone(), other.clone()], "key_duplicate_kid"),
        (vec![ed25519_with_kid], "key_unsupported_curve"),
        (vec![json!({ "d": "x" })], "key_private_member"),
    ];
    for (set, code) in refused {
        assert_eq!(verifier.set_keys(&set).unwrap_err().code(), code);
        assert_eq!(
            verify_code(&verifier, &token),
            Ok(()),
            "after a refused set with {code}"
        );
    }
}

#[test]
fn debug_never_shows_key_material() {
    let signing = SigningKey::generate("k1").unwrap();
    let printed = format!("{signing:?}");
    assert!(printed.contains("k1"), "{printed}");
    let pkcs8 = signing.pkcs8().expose();
    assert!(
        !printed.contains(&b64(pkcs8)) && !printed.contains(&format!("{pkcs8:?}")),
        "{printed}"
    );
    assert!(
        !printed.contains(&format!("{:?}", &pkcs8[pkcs8.len() - 16..])),
        "{printed}"
    );
    assert_eq!(format!("{:?}", signing.pkcs8()), "[redacted]");

    for generate in [AgentKeyPair::generate_p256, AgentKeyPair::generate_ed25519] {
        let agent = generate().unwrap();
        let private: Value = serde_json::from_str(agent.to_private_jwk().expose()).unwrap();
        let d = private["d"].as_str().unwrap();
        for printed in [
            format!("{agent:?}"),
            format!("{:#?}", agent),
            format!("{:?}", agent.to_private_jwk()),
        ] {
            assert!(!printed.contains(d), "{printed}");
        }
        assert!(format!("{agent:?}").contains(agent.public().thumbprint()));
    }

    let verifier = TokenVerifier::new(ISSUER, ISSUER, 0);
    verifier.set_keys(&[signing.public_jwk()]).unwrap();
    assert!(format!("{verifier:?}").contains("k1"));
}

#[test]
fn shared_types_are_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<TokenVerifier>();
    shared::<ProofVerifier>();
    shared::<SigningKey>();
    shared::<AgentKey>();
    shared::<AgentKeyPair>();
}
