//! Interoperability: an independent JOSE implementation (jsonwebtoken) accepts the tokens we
//! mint, using nothing but the published bundle, and the proofs we sign, using the key in
//! their header. DESIGN.md promises both.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::Value;

use crate::{AgentKeyPair, Confirmation, SigningKey, TaskClaims, jwks_bundle, mint_task_token};

#[test]
fn any_jose_library_verifies_minted_tokens_from_the_bundle() {
    let key = SigningKey::generate("k1").unwrap();
    let other = SigningKey::generate("k0").unwrap();
    let bundle = jwks_bundle(&[other.public_jwk(), key.public_jwk()], 1, 300);
    let claims = TaskClaims {
        iss: "https://remit.example.org".into(),
        sub: "spiffe://example.org/agent/triage-bot".into(),
        aud: "https://remit.example.org".into(),
        iat: 1_700_000_000,
        nbf: 1_700_000_000,
        exp: 4_000_000_000,
        jti: "tok_1".into(),
        task: "task_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        scope: model::ScopeSet(vec![model::Scope::new("github", &["read_issue"], &[])]),
        cnf: Confirmation { jkt: "jkt".into() },
        act: None,
        obo: None,
    };
    let token = mint_task_token(&key, &claims).unwrap();

    let set: JwkSet = serde_json::from_value(bundle).unwrap();
    let header = decode_header(token.expose()).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let jwk = set.find(header.kid.as_deref().unwrap()).unwrap();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&["https://remit.example.org"]);
    validation.set_issuer(&["https://remit.example.org"]);
    let decoded = decode::<TaskClaims>(
        token.expose(),
        &DecodingKey::from_jwk(jwk).unwrap(),
        &validation,
    )
    .unwrap();
    assert_eq!(decoded.claims, claims);
}

#[test]
fn any_jose_library_verifies_signed_proofs() {
    for agent in [
        AgentKeyPair::generate_p256().unwrap(),
        AgentKeyPair::generate_ed25519().unwrap(),
    ] {
        let proof = agent
            .sign_proof(
                "POST",
                "https://remit.example.org/mcp/x",
                Some("token"),
                4_000_000_000,
                "p",
            )
            .unwrap();
        let header = decode_header(&proof).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        let jwk: Jwk = header.jwk.unwrap();
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let decoded =
            decode::<Value>(&proof, &DecodingKey::from_jwk(&jwk).unwrap(), &validation).unwrap();
        assert_eq!(decoded.claims["htm"], "POST");
        assert_eq!(decoded.claims["ath"], super::sha256_b64(b"token"));
    }
}
