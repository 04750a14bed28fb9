//! How long the call path's credential checks take: task token verification, DPoP proof
//! verification (ES256 and EdDSA, a fresh proof each time) and both together, one thread.
//! Run with `cargo bench -p credentials --bench verify`.

use std::error::Error;
use std::hint::black_box;
use std::time::Instant;

use credentials::{
    AgentKey, AgentKeyPair, Confirmation, ProofCheck, ProofVerifier, SigningKey, TaskClaims,
    TokenVerifier, mint_task_token,
};
use hdrhistogram::Histogram;
use model::{Scope, ScopeSet};

const WARMUP: usize = 2_000;
const ITERATIONS: usize = 20_000;
const NOW: i64 = 1_700_000_000;
const ORIGIN: &str = "https://remit.example.org";
const URL: &str = "https://remit.example.org/mcp/github";

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

fn main() -> Result<()> {
    let signing = SigningKey::generate("k1")?;
    let tokens = TokenVerifier::new(ORIGIN, ORIGIN, 30);
    tokens.set_keys(&[signing.public_jwk()])?;
    println!("{ITERATIONS} timed iterations after {WARMUP} warm-up, one thread");

    let agent = AgentKeyPair::generate_p256()?;
    let token = mint_task_token(&signing, &claims(&agent))?;
    let token = token.expose().as_str();

    measure("mint task token (ES256 sign)", |_| {
        black_box(mint_task_token(&signing, &claims(&agent)).is_ok());
    })?;
    measure("token verify (ES256)", |_| {
        black_box(tokens.verify(token, NOW).is_ok());
    })?;
    floor(&signing, token)?;
    reference_decode(&signing, token)?;

    for (name, agent) in [
        ("ES256", &agent),
        ("EdDSA", &AgentKeyPair::generate_ed25519()?),
    ] {
        let token = mint_task_token(&signing, &claims(agent))?;
        let token = token.expose().as_str();
        let jkt = agent.public().thumbprint();
        let proofs = presign(agent, token)?;
        let verifier = ProofVerifier::new(60, 5, 2 * proofs.len());
        measure(&format!("proof verify ({name}, fresh proof)"), |i| {
            black_box(verifier.verify(&proofs[i], &check(token, jkt)).is_ok());
        })?;
    }

    let jwk = agent.public().to_jwk();
    measure("  agent key from jwk (P-256, per proof)", |_| {
        black_box(AgentKey::from_jwk(&jwk).is_ok());
    })?;

    let proofs = presign(&agent, token)?;
    let verifier = ProofVerifier::new(60, 5, 2 * proofs.len());
    measure("token + proof (ES256 + ES256)", |i| {
        let accepted = tokens.verify(token, NOW).ok().and_then(|claims| {
            verifier
                .verify(&proofs[i], &check(token, &claims.cnf.jkt))
                .ok()
        });
        black_box(accepted.is_some());
    })?;
    measure("sign proof (ES256, agent side)", |i| {
        black_box(
            agent
                .sign_proof("POST", URL, Some(token), NOW, &i.to_string())
                .is_ok(),
        );
    })?;
    Ok(())
}

/// The signature check alone, with a pre-parsed key: the cost no verifier can go below.
fn floor(signing: &SigningKey, token: &str) -> Result<()> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ParsedPublicKey};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = signing.public_jwk();
    let coordinate = |name: &str| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap_or_default());
    let point = [vec![4], coordinate("x")?, coordinate("y")?].concat();
    let key = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).map_err(|e| e.to_string())?;
    let (input, signature) = token.rsplit_once('.').ok_or("token without signature")?;
    let signature = URL_SAFE_NO_PAD.decode(signature)?;
    measure("  floor: aws-lc-rs ES256 verify alone", |_| {
        black_box(key.verify_sig(input.as_bytes(), &signature).is_ok());
    })
}

/// The same token through jsonwebtoken's `decode`, for comparison: it parses the header
/// twice, the claims twice and the public key on every call.
fn reference_decode(signing: &SigningKey, token: &str) -> Result<()> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, jwk::Jwk};
    let jwk: Jwk = serde_json::from_value(signing.public_jwk())?;
    let key = DecodingKey::from_jwk(&jwk)?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[ORIGIN]);
    validation.set_issuer(&[ORIGIN]);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    decode::<TaskClaims>(token, &key, &validation)?;
    measure("  reference: jsonwebtoken::decode", |_| {
        black_box(decode::<TaskClaims>(token, &key, &validation).is_ok());
    })
}

fn claims(agent: &AgentKeyPair) -> TaskClaims {
    TaskClaims {
        iss: ORIGIN.into(),
        sub: "spiffe://example.org/agent/triage-bot".into(),
        aud: ORIGIN.into(),
        iat: NOW,
        nbf: NOW,
        exp: NOW + 300,
        jti: "tok_01hzy3k8m2v6q9w4t7r5n1c0xa".into(),
        task: "task_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        scope: ScopeSet(vec![Scope::new(
            "github",
            &["read_issue", "create_issue"],
            &["acme/*"],
        )]),
        cnf: Confirmation {
            jkt: agent.public().thumbprint().into(),
        },
        act: None,
        obo: None,
    }
}

fn check<'a>(token: &'a str, jkt: &'a str) -> ProofCheck<'a> {
    ProofCheck {
        method: "POST",
        url: URL,
        access_token: Some(token),
        expected_jkt: Some(jkt),
        now: NOW,
    }
}

/// One fresh proof per iteration, signed before the clock starts.
fn presign(agent: &AgentKeyPair, token: &str) -> Result<Vec<String>> {
    (0..WARMUP + ITERATIONS)
        .map(|i| Ok(agent.sign_proof("POST", URL, Some(token), NOW, &format!("proof-{i:08}"))?))
        .collect()
}

/// Runs `operation(i)` for the warm-up, then times each of the measured iterations alone.
fn measure(name: &str, mut operation: impl FnMut(usize)) -> Result<()> {
    for i in 0..WARMUP {
        operation(i);
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let started = Instant::now();
    for i in WARMUP..WARMUP + ITERATIONS {
        let one = Instant::now();
        operation(i);
        histogram.record(u64::try_from(one.elapsed().as_nanos())?)?;
    }
    let total = started.elapsed().as_secs_f64();
    let micros = |nanos: u64| nanos as f64 / 1000.0;
    println!(
        "{name:<40} p50 {:>7.1} µs   p99 {:>7.1} µs   mean {:>7.1} µs   {:>8.0} ops/s",
        micros(histogram.value_at_quantile(0.50)),
        micros(histogram.value_at_quantile(0.99)),
        histogram.mean() / 1000.0,
        ITERATIONS as f64 / total,
    );
    Ok(())
}
