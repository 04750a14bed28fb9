//! Acting as an agent: generating its key and asking remit for tasks.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use credentials::AgentKeyPair;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

pub fn keygen(private: &Path, public: &Path, ed25519: bool) -> Result<()> {
    let key = if ed25519 {
        AgentKeyPair::generate_ed25519()
    } else {
        AgentKeyPair::generate_p256()
    }
    .map_err(|e| anyhow!("cannot generate a key: {e}"))?;
    std::fs::write(private, key.to_private_jwk().expose())
        .with_context(|| format!("cannot write `{}`", private.display()))?;
    std::fs::write(public, key.public().to_jwk().to_string())
        .with_context(|| format!("cannot write `{}`", public.display()))?;
    println!("{}", key.public().thumbprint());
    Ok(())
}

pub fn read_key(path: &Path) -> Result<AgentKeyPair> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    AgentKeyPair::from_private_jwk(text.trim())
        .map_err(|e| anyhow!("`{}` is not a private JWK: {e}", path.display()))
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[derive(Debug)]
pub struct GrantArgs {
    pub remit: String,
    pub agent: String,
    pub key: PathBuf,
    pub scopes: String,
    pub count: usize,
    pub budget: u32,
    pub ttl: i64,
    pub out: PathBuf,
}

pub async fn grant(args: &GrantArgs) -> Result<()> {
    let key = read_key(&args.key)?;
    let scopes: Value = serde_json::from_str(&args.scopes).context("`--scopes` is not JSON")?;
    let base = args.remit.trim_end_matches('/');
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("`--remit` must be an http:// URL"))?
        .to_string();
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(connection);
    let url = format!("{base}/v1/tasks");
    let nonce = std::process::id();
    let mut tokens = String::new();
    for index in 0..args.count {
        let proof = key
            .sign_proof(
                "POST",
                &url,
                None,
                now(),
                &format!("grant-{nonce}-{index}-{}", now()),
            )
            .map_err(|e| anyhow!("cannot sign: {e}"))?;
        let body = json!({
            "agent": args.agent,
            "intent": "load harness",
            "scopes": scopes,
            "ttl_seconds": args.ttl,
            "budget": args.budget,
        });
        let request = Request::post("/v1/tasks")
            .header("host", &authority)
            .header("content-type", "application/json")
            .header("dpop", proof)
            .body(Full::new(Bytes::from(body.to_string())))?;
        sender.ready().await.context("connection to remit")?;
        let response = sender
            .send_request(request)
            .await
            .context("POST /v1/tasks")?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "task {index} refused ({status}): {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let answer: Value = serde_json::from_slice(&bytes)?;
        let token = answer
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("no token in the grant"))?;
        tokens.push_str(token);
        tokens.push('\n');
    }
    std::fs::write(&args.out, tokens)
        .with_context(|| format!("cannot write `{}`", args.out.display()))?;
    Ok(())
}
