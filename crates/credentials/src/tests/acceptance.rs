//! The acceptance table: a task token and a DPoP proof as a gateway receives them, each case
//! built from one valid baseline with exactly one thing changed, against the exact reason it
//! is refused. The baseline itself must pass, so every refusal is caused by its one change.

use serde_json::{Value, json};

use super::{b64, sha256_b64};
use crate::proof::same_htu;
use crate::{
    AgentKeyPair, Confirmation, KeyError, ProofCheck, ProofVerifier, SigningKey, TaskClaims,
    TokenVerifier,
};
use model::{Scope, ScopeSet};

const NOW: i64 = 1_700_000_000;
const ISSUER: &str = "https://remit.example.org";
const URL: &str = "https://remit.example.org/mcp/github";
const SKEW: i64 = 30;
const MAX_AGE: i64 = 60;
const MAX_FUTURE: i64 = 5;

type AgentKind = fn() -> Result<AgentKeyPair, KeyError>;
const P256: AgentKind = AgentKeyPair::generate_p256;
const ED25519: AgentKind = AgentKeyPair::generate_ed25519;

/// One remit (signing key, verifiers) and the agents around it.
struct World {
    signing: SigningKey,
    tokens: TokenVerifier,
    proofs: ProofVerifier,
    agent: AgentKeyPair,
    intruder: AgentKeyPair,
}

impl World {
    fn new(agent: AgentKind) -> World {
        let signing = SigningKey::generate("k1").unwrap();
        let tokens = TokenVerifier::new(ISSUER, ISSUER, SKEW);
        tokens.set_keys(&[signing.public_jwk()]).unwrap();
        World {
            signing,
            tokens,
            proofs: ProofVerifier::new(MAX_AGE, MAX_FUTURE, 1000),
            agent: agent().unwrap(),
            intruder: AgentKeyPair::generate_p256().unwrap(),
        }
    }

    fn claims(&self) -> TaskClaims {
        TaskClaims {
            iss: ISSUER.into(),
            sub: "spiffe://example.org/agent/triage-bot".into(),
            aud: ISSUER.into(),
            iat: NOW - 10,
            nbf: NOW - 10,
            exp: NOW + 290,
            jti: "tok_1".into(),
            task: "task_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            scope: ScopeSet(vec![Scope::new("github", &["read_issue"], &["acme/*"])]),
            cnf: Confirmation {
                jkt: self.agent.public().thumbprint().into(),
            },
            act: None,
            obo: None,
        }
    }

    /// A valid call: a token bound to the agent and a fresh proof for it.
    fn baseline(&self) -> Case {
        Case {
            token: Some(Jws {
                header: json!({ "alg": "ES256", "kid": self.signing.kid(), "typ": "JWT" }),
                claims: serde_json::to_value(self.claims()).unwrap(),
                signer: Signer::Remit,
                presented_claims: None,
            }),
            proof: Jws {
                header: json!({
                    "typ": "dpop+jwt",
                    "alg": self.agent.public().algorithm(),
                    "jwk": self.agent.public().to_jwk(),
                }),
                claims: json!({ "htm": "POST", "htu": URL, "iat": NOW, "jti": "proof-1" }),
                signer: Signer::Agent,
                presented_claims: None,
            },
            ath: Ath::OfToken,
            edit_token: None,
            replay: Replay::No,
        }
    }
}

/// A JWS as JSON parts, how it is signed, and optionally other claims shown in place of the
/// signed ones (tampering).
struct Jws {
    header: Value,
    claims: Value,
    signer: Signer,
    presented_claims: Option<Value>,
}

enum Signer {
    /// The world's published ES256 signing key.
    Remit,
    /// Another ES256 key that is not published.
    StrangerEs256(SigningKey),
    /// HMAC-SHA256 with these bytes as the secret: the classic key-confusion attack.
    Hs256(Vec<u8>),
    /// No signature at all (`alg: none`).
    Unsigned,
    Agent,
    Intruder,
}

enum Ath {
    OfToken,
    Absent,
    Of(&'static str),
}

enum Replay {
    No,
    /// The very same proof was accepted once before.
    SameProof,
    /// A proof with the same `jti`, signed anew (ECDSA signatures differ each time), was
    /// accepted once before.
    SameJti,
}

struct Case {
    /// `None` on the grant path, where only a proof is sent.
    token: Option<Jws>,
    proof: Jws,
    ath: Ath,
    edit_token: Option<fn(String) -> String>,
    replay: Replay,
}

impl Case {
    fn token(&mut self) -> &mut Jws {
        self.token.as_mut().unwrap()
    }
}

impl Jws {
    /// Signs the JWS; `ath`, when given, is added to the claims (signed and presented).
    fn build(&self, world: &World, ath: Option<&str>) -> String {
        let with_ath = |claims: &Value| {
            let mut claims = claims.clone();
            if let Some(ath) = ath {
                claims["ath"] = json!(ath);
            }
            b64(claims.to_string().as_bytes())
        };
        let header = b64(self.header.to_string().as_bytes());
        let payload = with_ath(&self.claims);
        let input = format!("{header}.{payload}");
        let signature = match &self.signer {
            Signer::Remit => world.signing.sign(input.as_bytes()).unwrap(),
            Signer::StrangerEs256(key) => key.sign(input.as_bytes()).unwrap(),
            Signer::Hs256(secret) => {
                let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
                aws_lc_rs::hmac::sign(&key, input.as_bytes())
                    .as_ref()
                    .to_vec()
            }
            Signer::Unsigned => Vec::new(),
            Signer::Agent => world.agent.sign(input.as_bytes()).unwrap(),
            Signer::Intruder => world.intruder.sign(input.as_bytes()).unwrap(),
        };
        let payload = self.presented_claims.as_ref().map_or(payload, with_ath);
        format!("{header}.{payload}.{}", b64(&signature))
    }
}

/// Presents the case to the verifiers the way the gateway does (token, then a proof bound to
/// it; on the grant path, a proof from the agent's registered key) and returns the code of
/// the first refusal. Also checks that no refusal repeats the token's or proof's bytes and
/// that its message keeps the house style.
fn check(world: &World, case: &Case) -> Result<(), &'static str> {
    let token = case
        .token
        .as_ref()
        .map(|token| token.build(world, None))
        .map(|token| match case.edit_token {
            Some(edit) => edit(token),
            None => token,
        });
    let ath = match (&case.ath, &token) {
        (Ath::OfToken, Some(token)) => Some(sha256_b64(token.as_bytes())),
        (Ath::Of(other), _) => Some(sha256_b64(other.as_bytes())),
        _ => None,
    };
    let proof = case.proof.build(world, ath.as_deref());
    let registered = world.agent.public().thumbprint().to_string();
    fn presented<'a>(token: &'a Option<String>, jkt: &'a str) -> ProofCheck<'a> {
        ProofCheck {
            method: "POST",
            url: URL,
            access_token: token.as_deref(),
            expected_jkt: Some(jkt),
            now: NOW,
        }
    }
    match case.replay {
        Replay::No => {}
        Replay::SameProof => {
            world
                .proofs
                .verify(&proof, &presented(&token, &registered))
                .unwrap();
        }
        Replay::SameJti => {
            world
                .proofs
                .verify(
                    &case.proof.build(world, ath.as_deref()),
                    &presented(&token, &registered),
                )
                .unwrap();
        }
    }

    let secrets: Vec<&str> = token
        .iter()
        .chain([&proof])
        .flat_map(|jws| jws.split('.'))
        .collect();
    let refuse = |code: &'static str, message: String| {
        for secret in &secrets {
            assert!(
                secret.len() < 16 || !message.contains(secret),
                "{code}: message `{message}` leaks input"
            );
        }
        let lowercase = message.chars().next().is_some_and(char::is_lowercase);
        assert!(
            lowercase && !message.ends_with('.') && !message.contains('\n'),
            "{code}: `{message}`"
        );
        code
    };
    let expected_jkt = match &token {
        Some(token) => {
            world
                .tokens
                .verify(token, NOW)
                .map_err(|e| refuse(e.code(), e.to_string()))?
                .cnf
                .jkt
        }
        None => registered,
    };
    world
        .proofs
        .verify(&proof, &presented(&token, &expected_jkt))
        .map_err(|e| refuse(e.code(), e.to_string()))?;
    Ok(())
}

type Change = fn(&World, &mut Case);

/// reason, agent key type, the one change from the baseline, expected outcome.
const TABLE: &[(&str, AgentKind, Change, Result<(), &str>)] = &[
    // Accepted.
    (
        "baseline: ES256 token, ES256 proof",
        P256,
        |_, _| {},
        Ok(()),
    ),
    (
        "baseline with an Ed25519 agent key",
        ED25519,
        |_, _| {},
        Ok(()),
    ),
    (
        "htu: query and fragment are ignored",
        P256,
        |_, c| c.proof.claims["htu"] = json!(format!("{URL}?page=2#top")),
        Ok(()),
    ),
    (
        "htu: scheme and host case, explicit default port",
        P256,
        |_, c| c.proof.claims["htu"] = json!("HTTPS://Remit.Example.ORG:443/mcp/github"),
        Ok(()),
    ),
    (
        "grant path: proof from the registered key, no token, no ath",
        P256,
        |_, c| {
            c.token = None;
            c.ath = Ath::Absent;
        },
        Ok(()),
    ),
    (
        "token expired less than the skew ago",
        P256,
        |_, c| c.token().claims["exp"] = json!(NOW - SKEW + 1),
        Ok(()),
    ),
    (
        "token nbf ahead by the skew",
        P256,
        |_, c| c.token().claims["nbf"] = json!(NOW + SKEW),
        Ok(()),
    ),
    (
        "proof exactly max age old",
        P256,
        |_, c| c.proof.claims["iat"] = json!(NOW - MAX_AGE),
        Ok(()),
    ),
    (
        "proof ahead by the allowed skew",
        P256,
        |_, c| c.proof.claims["iat"] = json!(NOW + MAX_FUTURE),
        Ok(()),
    ),
    (
        "token with a delegation chain and obo",
        P256,
        |_, c| {
            c.token().claims["act"] = json!({ "sub": "spiffe://example.org/agent/a", "act": { "sub": "spiffe://example.org/agent/b" } });
            c.token().claims["obo"] = json!("alice@example.org");
        },
        Ok(()),
    ),
    // Task token refused.
    (
        "token alg none, no signature",
        P256,
        |_, c| {
            c.token().header["alg"] = json!("none");
            c.token().signer = Signer::Unsigned;
        },
        Err("token_algorithm_not_allowed"),
    ),
    (
        "token HS256 keyed with the public key's point bytes",
        P256,
        |w, c| {
            let jwk = w.signing.public_jwk();
            let point = [vec![4], decode(&jwk["x"]), decode(&jwk["y"])].concat();
            c.token().header["alg"] = json!("HS256");
            c.token().signer = Signer::Hs256(point);
        },
        Err("token_algorithm_not_allowed"),
    ),
    (
        "token HS256 keyed with the published JWK text",
        P256,
        |w, c| {
            c.token().header["alg"] = json!("HS256");
            c.token().signer = Signer::Hs256(w.signing.public_jwk().to_string().into_bytes());
        },
        Err("token_algorithm_not_allowed"),
    ),
    (
        "token alg RS256",
        P256,
        |_, c| c.token().header["alg"] = json!("RS256"),
        Err("token_algorithm_not_allowed"),
    ),
    (
        "token kid not in the key set",
        P256,
        |_, c| c.token().header["kid"] = json!("k0"),
        Err("token_unknown_kid"),
    ),
    (
        "token without kid",
        P256,
        |_, c| {
            c.token().header.as_object_mut().unwrap().remove("kid");
        },
        Err("token_missing_kid"),
    ),
    (
        "token payload tampered: scope widened after signing",
        P256,
        |_, c| {
            let mut widened = c.token().claims.clone();
            widened["scope"] = json!([{ "tool": "github", "actions": ["*"] }]);
            c.token().presented_claims = Some(widened);
        },
        Err("token_bad_signature"),
    ),
    (
        "token payload tampered: shown as expired (the reason must not be the payload's)",
        P256,
        |_, c| {
            let mut expired = c.token().claims.clone();
            expired["exp"] = json!(NOW - 3600);
            c.token().presented_claims = Some(expired);
        },
        Err("token_bad_signature"),
    ),
    (
        "token payload tampered: shown from another issuer",
        P256,
        |_, c| {
            let mut foreign = c.token().claims.clone();
            foreign["iss"] = json!("https://evil.example.org");
            c.token().presented_claims = Some(foreign);
        },
        Err("token_bad_signature"),
    ),
    (
        "token payload tampered: not JSON at all",
        P256,
        |_, c| {
            c.edit_token = Some(|t| {
                let (header, rest) = t.split_once('.').unwrap();
                let signature = rest.rsplit_once('.').unwrap().1;
                format!("{header}.bm90IGpzb24.{signature}")
            })
        },
        Err("token_bad_signature"),
    ),
    (
        "token signed by an unpublished key under a published kid",
        P256,
        |_, c| {
            c.token().signer = Signer::StrangerEs256(SigningKey::generate("k1").unwrap());
        },
        Err("token_bad_signature"),
    ),
    (
        "token signature stripped",
        P256,
        |_, c| c.edit_token = Some(|t| format!("{}.", t.rsplit_once('.').unwrap().0)),
        Err("token_malformed"),
    ),
    (
        "token in two parts",
        P256,
        |_, c| c.edit_token = Some(|t| t.rsplit_once('.').unwrap().0.to_string()),
        Err("token_malformed"),
    ),
    (
        "token without cnf",
        P256,
        |_, c| {
            c.token().claims.as_object_mut().unwrap().remove("cnf");
        },
        Err("token_malformed"),
    ),
    (
        "token with a crit header",
        P256,
        |_, c| c.token().header["crit"] = json!(["exp"]),
        Err("token_malformed"),
    ),
    (
        "token typ dpop+jwt (a proof passed off as a token)",
        P256,
        |_, c| c.token().header["typ"] = json!("dpop+jwt"),
        Err("token_wrong_type"),
    ),
    (
        "token expired by the skew",
        P256,
        |_, c| c.token().claims["exp"] = json!(NOW - SKEW),
        Err("token_expired"),
    ),
    (
        "token nbf beyond the skew",
        P256,
        |_, c| c.token().claims["nbf"] = json!(NOW + SKEW + 1),
        Err("token_not_yet_valid"),
    ),
    (
        "token for another audience",
        P256,
        |_, c| c.token().claims["aud"] = json!("https://other.example.org"),
        Err("token_wrong_audience"),
    ),
    (
        "token from another issuer",
        P256,
        |_, c| c.token().claims["iss"] = json!("https://evil.example.org"),
        Err("token_wrong_issuer"),
    ),
    (
        "token over 8 KiB",
        P256,
        |_, c| c.token().claims["obo"] = json!("x".repeat(8 * 1024)),
        Err("token_oversized"),
    ),
    // Proof refused.
    (
        "proof signed by another key, with that key's jwk",
        P256,
        |w, c| {
            c.proof.header["jwk"] = w.intruder.public().to_jwk();
            c.proof.header["alg"] = json!("ES256");
            c.proof.signer = Signer::Intruder;
        },
        Err("proof_key_mismatch"),
    ),
    (
        "proof showing the bound key's jwk, signed by another key",
        P256,
        |_, c| c.proof.signer = Signer::Intruder,
        Err("proof_bad_signature"),
    ),
    (
        "proof naming another key in its jwk, signed by the bound key",
        P256,
        |w, c| {
            c.proof.header["jwk"] = w.intruder.public().to_jwk();
            c.proof.header["alg"] = json!("ES256");
        },
        Err("proof_bad_signature"),
    ),
    (
        "proof naming another key in its jwk, signed by a third key",
        P256,
        |_, c| {
            let stranger = AgentKeyPair::generate_p256().unwrap();
            c.proof.header["jwk"] = stranger.public().to_jwk();
        },
        Err("proof_bad_signature"),
    ),
    (
        "proof payload tampered: jti changed after signing",
        P256,
        |_, c| {
            let mut changed = c.proof.claims.clone();
            changed["jti"] = json!("proof-2");
            c.proof.presented_claims = Some(changed);
        },
        Err("proof_bad_signature"),
    ),
    (
        "proof replayed as is",
        P256,
        |_, c| c.replay = Replay::SameProof,
        Err("proof_replayed"),
    ),
    (
        "proof jti reused with a fresh signature",
        P256,
        |_, c| c.replay = Replay::SameJti,
        Err("proof_replayed"),
    ),
    (
        "proof for another method",
        P256,
        |_, c| c.proof.claims["htm"] = json!("GET"),
        Err("proof_wrong_method"),
    ),
    (
        "proof for another path",
        P256,
        |_, c| c.proof.claims["htu"] = json!("https://remit.example.org/mcp/jira"),
        Err("proof_wrong_url"),
    ),
    (
        "proof for another host",
        P256,
        |_, c| c.proof.claims["htu"] = json!("https://evil.example.org/mcp/github"),
        Err("proof_wrong_url"),
    ),
    (
        "proof for plain http",
        P256,
        |_, c| c.proof.claims["htu"] = json!("http://remit.example.org/mcp/github"),
        Err("proof_wrong_url"),
    ),
    (
        "proof older than max age",
        P256,
        |_, c| c.proof.claims["iat"] = json!(NOW - MAX_AGE - 1),
        Err("proof_iat_too_old"),
    ),
    (
        "proof from the future",
        P256,
        |_, c| c.proof.claims["iat"] = json!(NOW + MAX_FUTURE + 1),
        Err("proof_iat_in_future"),
    ),
    (
        "proof without ath although a token is sent",
        P256,
        |_, c| c.ath = Ath::Absent,
        Err("proof_missing_ath"),
    ),
    (
        "proof ath of another token",
        P256,
        |_, c| c.ath = Ath::Of("another token"),
        Err("proof_wrong_ath"),
    ),
    (
        "grant path proof carrying ath",
        P256,
        |_, c| {
            c.token = None;
            c.ath = Ath::Of("some token");
        },
        Err("proof_unexpected_ath"),
    ),
    (
        "proof typ JWT",
        P256,
        |_, c| c.proof.header["typ"] = json!("JWT"),
        Err("proof_wrong_type"),
    ),
    (
        "proof without typ",
        P256,
        |_, c| {
            c.proof.header.as_object_mut().unwrap().remove("typ");
        },
        Err("proof_wrong_type"),
    ),
    (
        "proof alg none, no signature",
        P256,
        |_, c| {
            c.proof.header["alg"] = json!("none");
            c.proof.signer = Signer::Unsigned;
        },
        Err("proof_algorithm_not_allowed"),
    ),
    (
        "proof HS256 keyed with the jwk text",
        P256,
        |w, c| {
            c.proof.header["alg"] = json!("HS256");
            c.proof.signer = Signer::Hs256(w.agent.public().to_jwk().to_string().into_bytes());
        },
        Err("proof_algorithm_not_allowed"),
    ),
    (
        "proof jwk including the private d",
        P256,
        |w, c| {
            c.proof.header["jwk"] =
                serde_json::from_str(w.agent.to_private_jwk().expose()).unwrap();
        },
        Err("proof_invalid_jwk"),
    ),
    (
        "proof without jwk",
        P256,
        |_, c| {
            c.proof.header.as_object_mut().unwrap().remove("jwk");
        },
        Err("proof_missing_jwk"),
    ),
    (
        "proof alg EdDSA over a P-256 key",
        P256,
        |_, c| c.proof.header["alg"] = json!("EdDSA"),
        Err("proof_algorithm_mismatch"),
    ),
    (
        "proof without jti",
        P256,
        |_, c| {
            c.proof.claims.as_object_mut().unwrap().remove("jti");
        },
        Err("proof_missing_jti"),
    ),
    (
        "proof jti over 128 bytes",
        P256,
        |_, c| c.proof.claims["jti"] = json!("j".repeat(129)),
        Err("proof_malformed"),
    ),
    (
        "proof without iat",
        P256,
        |_, c| {
            c.proof.claims.as_object_mut().unwrap().remove("iat");
        },
        Err("proof_malformed"),
    ),
    (
        "proof over 8 KiB",
        P256,
        |_, c| c.proof.claims["pad"] = json!("x".repeat(8 * 1024)),
        Err("proof_oversized"),
    ),
];

fn decode(value: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.as_str().unwrap())
        .unwrap()
}

#[test]
fn acceptance_table() {
    let mut failures = Vec::new();
    for (reason, agent, change, expected) in TABLE {
        let world = World::new(*agent);
        let mut case = world.baseline();
        change(&world, &mut case);
        let outcome = check(&world, &case);
        if outcome != *expected {
            failures.push(format!("{reason}: expected {expected:?}, got {outcome:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        TABLE.len(),
        failures.join("\n")
    );
}

/// Every refusal in the table must come from its change: the unchanged baseline passes, for
/// each agent key type.
#[test]
fn baselines_pass() {
    for agent in [P256, ED25519] {
        let world = World::new(agent);
        assert_eq!(check(&world, &world.baseline()), Ok(()));
    }
}

#[test]
fn minted_tokens_and_signed_proofs_pass() {
    for agent in [P256, ED25519] {
        let world = World::new(agent);
        let claims = world.claims();
        let token = crate::mint_task_token(&world.signing, &claims).unwrap();
        assert_eq!(world.tokens.verify(token.expose(), NOW).unwrap(), claims);

        let proof = world
            .agent
            .sign_proof("POST", URL, Some(token.expose()), NOW, "p-1")
            .unwrap();
        let check = ProofCheck {
            method: "POST",
            url: URL,
            access_token: Some(token.expose()),
            expected_jkt: Some(&claims.cnf.jkt),
            now: NOW,
        };
        let verified = world.proofs.verify(&proof, &check).unwrap();
        assert_eq!(verified.jkt, claims.cnf.jkt);
        assert_eq!((verified.jti.as_str(), verified.iat), ("p-1", NOW));
        assert_eq!(&verified.key, world.agent.public());
        assert_eq!(
            world.proofs.verify(&proof, &check).unwrap_err().code(),
            "proof_replayed"
        );
    }
}

#[test]
fn one_proof_accepted_once_across_threads() {
    let world = World::new(P256);
    let proof = world
        .agent
        .sign_proof("POST", URL, None, NOW, "p-1")
        .unwrap();
    let check = ProofCheck {
        method: "POST",
        url: URL,
        access_token: None,
        expected_jkt: None,
        now: NOW,
    };
    let accepted: usize = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| world.proofs.verify(&proof, &check).is_ok()))
            .collect();
        runs.into_iter()
            .map(|run| usize::from(run.join().unwrap()))
            .sum()
    });
    assert_eq!(accepted, 1);
}

#[test]
fn htu_comparison() {
    let base = "https://remit.example.org/mcp/github";
    let same = [
        base,
        "https://remit.example.org/mcp/github?x=1",
        "https://remit.example.org/mcp/github#frag",
        "HTTPS://REMIT.example.org/mcp/github",
        "https://remit.example.org:443/mcp/github",
    ];
    for presented in same {
        assert!(same_htu(presented, base), "{presented} should match");
    }
    let different = [
        "https://remit.example.org/mcp/GitHub",
        "https://remit.example.org/mcp/github/",
        "https://remit.example.org:8443/mcp/github",
        "http://remit.example.org/mcp/github",
        "https://user@remit.example.org/mcp/github",
        "https://remit.example.org.evil.org/mcp/github",
        "ftp://remit.example.org/mcp/github",
        "remit.example.org/mcp/github",
        "https://remit.example.org:44x3/mcp/github",
        "",
    ];
    for presented in different {
        assert!(!same_htu(presented, base), "{presented} should not match");
    }
    assert!(same_htu("http://localhost", "http://LOCALHOST:80/"));
    assert!(same_htu(
        "http://[::1]:8080/a%2fb",
        "http://[::1]:8080/a%2Fb"
    ));
    assert!(!same_htu("http://[::1]:8080/a", "http://[::1]:8081/a"));
    assert!(!same_htu("http://[::1/a", "http://[::1/a"));
}
