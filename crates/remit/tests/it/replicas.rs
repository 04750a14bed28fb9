//! Three `remit serve` replicas on one PostgreSQL behind one public URL, as a load balancer
//! would present them: a proof is accepted once whichever replica receives it, a key rotated on
//! one verifies at once on the others, revocation and quarantine reach the others, and a
//! replica killed under load leaves the others serving and no call forwarded without its
//! decision. The periodic catch-up is set to a minute, so that only the store's notifications
//! and the replicas' own look-ups can explain what arrives within the test. Runs only with
//! `REMIT_TEST_POSTGRES_URL` (required under CI).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use credentials::AgentKeyPair;
use serde_json::{Value, json};

use crate::support::{Server, ok};

/// What agents dial and what proofs name (`htu`): the load balancer's address. Nothing
/// listens there; the test plays the balancer and sends each request to a replica itself.
const PUBLIC_URL: &str = "http://127.0.0.1:8470";
const REPLICAS: usize = 3;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn unique(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{label}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

struct Cluster {
    replicas: Vec<Option<Server>>,
    client: reqwest::Client,
    operator: String,
    key: AgentKeyPair,
}

impl Cluster {
    fn base(&self, replica: usize) -> &str {
        &self.replicas[replica].as_ref().unwrap().base
    }

    /// `POST /v1/tasks` on `replica` with `proof` (signed for the public URL).
    async fn request_task(&self, replica: usize, proof: &str, budget: u32) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}/v1/tasks", self.base(replica)))
            .header("dpop", proof)
            .json(&json!({
                "agent": "triage-bot",
                "intent": "triage new issues",
                "scopes": [{ "tool": "tracker", "actions": ["read_issue"], "resources": ["*"] }],
                "budget": budget,
            }))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    fn task_proof(&self) -> String {
        self.key
            .sign_proof(
                "POST",
                &format!("{PUBLIC_URL}/v1/tasks"),
                None,
                now(),
                &unique("task"),
            )
            .unwrap()
    }

    /// A granted task's token, from `replica`.
    async fn grant(&self, replica: usize, budget: u32) -> (String, String) {
        let (status, grant) = self.request_task(replica, &self.task_proof(), budget).await;
        assert_eq!(status, 201, "{grant}");
        (
            grant["task_id"].as_str().unwrap().to_string(),
            grant["token"].as_str().unwrap().to_string(),
        )
    }

    fn call_proof(&self, token: &str, path: &str) -> String {
        self.key
            .sign_proof(
                "GET",
                &format!("{PUBLIC_URL}{path}"),
                Some(token),
                now(),
                &unique("call"),
            )
            .unwrap()
    }

    /// A call through `replica`'s gateway with `proof`: the status and the error code, if any.
    async fn call_with(
        &self,
        replica: usize,
        token: &str,
        path: &str,
        proof: &str,
    ) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base(replica)))
            .header("authorization", format!("DPoP {token}"))
            .header("dpop", proof)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["error"].as_str().unwrap_or("").to_string();
        (status, code)
    }

    async fn call(&self, replica: usize, token: &str) -> (u16, String) {
        let path = "/http/tracker/issues/42";
        let proof = self.call_proof(token, path);
        self.call_with(replica, token, path, &proof).await
    }

    async fn admin(&self, replica: usize, path: &str, body: Value) -> Value {
        let response = self
            .client
            .post(format!("{}{path}", self.base(replica)))
            .bearer_auth(&self.operator)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// The kids `replica` publishes.
    async fn published_kids(&self, replica: usize) -> Vec<String> {
        let jwks: Value = self
            .client
            .get(format!("{}/.well-known/jwks.json", self.base(replica)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|key| key["kid"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Polls `check` on every replica but `origin` until each holds, and returns how long the
/// slowest took, from `since`. Fails after 5 s, far short of the minute-long catch-up.
async fn reached_others<F, Fut>(origin: usize, since: Instant, mut check: F) -> Duration
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut slowest = Duration::ZERO;
    for replica in (0..REPLICAS).filter(|&r| r != origin) {
        while !check(replica).await {
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "replica {replica} did not hear from replica {origin} within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        slowest = slowest.max(since.elapsed());
    }
    slowest
}

/// Waits for the wall clock's next second.
async fn next_second() {
    let second = now();
    while now() == second {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn summary(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "propagation across replicas: {what}: p50 {:.1} ms, max {:.1} ms ({} runs)",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
        times.len()
    );
}

fn write_config(dir: &Path, upstream: std::net::SocketAddr) {
    std::fs::write(
        dir.join("remit.toml"),
        format!(
            r#"
trust_domain = "example.org"
public_url = "{PUBLIC_URL}"
sync_interval_ms = 60000

# Polling a revoked token until it is refused must not quarantine the agent; a call to an
# unknown tool still does.
[containment]
dead_token = false

[gateway]
rate_per_agent = 100000
burst_per_agent = 100000
rate_per_task = 100000
burst_per_task = 100000

[[tools]]
name = "tracker"
kind = "http"
upstream = "http://{upstream}/api"
auth = "none"
routes = [{{ method = "GET", path = "/issues/{{id}}", action = "read_issue", class = "read", resource = "{{id}}" }}]
"#
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_behave_as_one_node() {
    let Some(base) = store::testing::postgres_url(
        "the PostgreSQL test `replicas::three_replicas_behave_as_one_node`",
    ) else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
    let started = Instant::now();

    // An upstream that counts what reaches it.
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_address = upstream.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            axum::Json(json!({ "ok": true }))
        }
    });
    tokio::spawn(async move { axum::serve(upstream, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_config(d, upstream_address);
    let store_flag = schema.url.as_str();
    // The first start creates the store (admin commands never do).
    Server::start(d, &["--store", store_flag]).stop();
    let out = ok(
        d,
        &[
            "--store", store_flag, "operator", "create", "--role", "admin",
        ],
    );
    let operator = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_string();
    let key = AgentKeyPair::generate_p256().unwrap();
    let key_file = d.join("agent.jwk");
    std::fs::write(&key_file, key.public().to_jwk().to_string()).unwrap();
    ok(
        d,
        &[
            "--store",
            store_flag,
            "agent",
            "create",
            "triage-bot",
            "--owner",
            "alice@example.org",
            "--key",
            key_file.to_str().unwrap(),
        ],
    );
    let replicas = (0..REPLICAS)
        .map(|_| Some(Server::start(d, &["--store", store_flag])))
        .collect();
    let cluster = Cluster {
        replicas,
        client: reqwest::Client::new(),
        operator,
        key,
    };

    // 1. One proof, accepted once across the three: a grant, then a call sent to all three
    //    at once.
    let proof = cluster.task_proof();
    let (status, grant) = cluster.request_task(0, &proof, 10_000).await;
    assert_eq!(status, 201, "{grant}");
    for replica in 1..REPLICAS {
        let (status, body) = cluster.request_task(replica, &proof, 10_000).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("proof_replayed"))
        );
    }
    let token = grant["token"].as_str().unwrap().to_string();
    let path = "/http/tracker/issues/42";
    let proof = cluster.call_proof(&token, path);
    let before = received.load(Ordering::SeqCst);
    let (a, b, c) = tokio::join!(
        cluster.call_with(0, &token, path, &proof),
        cluster.call_with(1, &token, path, &proof),
        cluster.call_with(2, &token, path, &proof),
    );
    let answers = [a, b, c];
    let forwarded = answers.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(
        forwarded, 1,
        "one proof was forwarded {forwarded} times: {answers:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(status, code)| *status == 200 || code == "proof_replayed"),
        "{answers:?}"
    );
    assert_eq!(received.load(Ordering::SeqCst), before + 1);

    // 2. A key rotated on one replica: its tokens verify at once on the others (a replica
    //    meeting the unknown `kid` looks it up), and the others publish it within moments
    //    (`NOTIFY`), long before their minute-long catch-up.
    for origin in 0..REPLICAS {
        cluster.admin(origin, "/v1/keys/rotate", json!({})).await;
        let (_, fresh) = cluster.grant(origin, 100).await;
        for replica in (0..REPLICAS).filter(|&r| r != origin) {
            assert_eq!(cluster.call(replica, &fresh).await, (200, String::new()));
        }
    }
    let mut rotations = Vec::new();
    for round in 0..5 {
        let origin = round % REPLICAS;
        let rotated = cluster.admin(origin, "/v1/keys/rotate", json!({})).await;
        let kid = rotated["kid"].as_str().unwrap().to_string();
        let since = Instant::now();
        let cluster = &cluster;
        let kid = &kid;
        rotations.push(
            reached_others(origin, since, |replica| async move {
                cluster.published_kids(replica).await.contains(kid)
            })
            .await,
        );
    }
    summary("key rotation (published)", rotations);

    // 3. A revocation taken on one replica denies on the others.
    let mut revocations = Vec::new();
    for round in 0..5 {
        let origin = round % REPLICAS;
        let (task, token) = cluster.grant(origin, 1_000).await;
        cluster
            .admin(
                origin,
                "/v1/revocations",
                json!({ "kind": "task", "target": task, "reason": "replica test" }),
            )
            .await;
        let since = Instant::now();
        let cluster = &cluster;
        let token = &token;
        revocations.push(
            reached_others(origin, since, |replica| async move {
                cluster.call(replica, token).await.1 == "revoked"
            })
            .await,
        );
    }
    summary("revocation", revocations);

    // 4. Quarantine: a call to a tool remit does not front, on one replica, quarantines the
    //    agent; its other tasks die on every replica, and no replica grants it a new one
    //    until an operator releases it.
    let mut quarantines = Vec::new();
    for round in 0..3 {
        let origin = round % REPLICAS;
        let (_, token) = cluster.grant(origin, 1_000).await;
        let (_, other) = cluster.grant((origin + 1) % REPLICAS, 1_000).await;
        let unknown = "/http/no-such-tool/x";
        let proof = cluster.call_proof(&token, unknown);
        let (status, code) = cluster.call_with(origin, &token, unknown, &proof).await;
        assert_eq!((status, code.as_str()), (404, "tool_unknown"));
        let since = Instant::now();
        let cluster_ref = &cluster;
        let other = &other;
        quarantines.push(
            reached_others(origin, since, |replica| async move {
                cluster_ref.call(replica, other).await.1 == "revoked"
            })
            .await,
        );
        for replica in 0..REPLICAS {
            let (status, body) = cluster
                .request_task(replica, &cluster.task_proof(), 10)
                .await;
            assert_eq!(
                (status, body["error"].as_str()),
                (403, Some("agent_not_active"))
            );
        }
        cluster
            .admin(
                origin,
                "/v1/agents/triage-bot/release",
                json!({ "reason": "test" }),
            )
            .await;
        // The quarantine revoked every token issued up to its second.
        next_second().await;
    }
    summary("quarantine (other task revoked)", quarantines);

    // 5. A budget counted across replicas: a task with a budget of 30 whose calls go round
    //    robin over the three makes at most 30 + (3 - 1) x max(1, 30 / 20) = 32 calls, and
    //    the upstream sees exactly the calls that were allowed. (Denials summed across
    //    replicas are shared at each catch-up, which this test sets to a minute; the control
    //    crate's replica tests cover them.)
    let (_, token) = cluster.grant(0, 30).await;
    let before = received.load(Ordering::SeqCst);
    let mut allowed = 0;
    for round in 0..45 {
        let (status, code) = cluster.call(round % REPLICAS, &token).await;
        match status {
            200 => allowed += 1,
            _ => assert_eq!(code, "budget_exhausted", "call {round}: {status}"),
        }
    }
    assert!(
        (30..=32).contains(&allowed),
        "{allowed} calls of a budget of 30"
    );
    assert_eq!(received.load(Ordering::SeqCst), before + allowed);

    // 6. A replica killed with `kill -9` under load: the others keep serving, and no call
    //    reached the upstream without its allowed decision in the audit log.
    let (_, token) = cluster.grant(0, 10_000).await;
    let cluster = Arc::new(tokio::sync::RwLock::new(cluster));
    let killed = Arc::new(AtomicBool::new(false));
    let served_after_kill = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for worker in 0..6usize {
        let (cluster, token, killed, served_after_kill) = (
            Arc::clone(&cluster),
            token.clone(),
            Arc::clone(&killed),
            Arc::clone(&served_after_kill),
        );
        loops.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(3);
            let mut round = worker;
            while Instant::now() < until {
                round += 1;
                let replica = round % REPLICAS;
                let path = "/http/tracker/issues/42";
                // The lock is let go before the call, so that the kill can land mid-call.
                let (client, url, proof) = {
                    let cluster = cluster.read().await;
                    if cluster.replicas[replica].is_none() {
                        continue;
                    }
                    let url = format!("{}{path}", cluster.base(replica));
                    (
                        cluster.client.clone(),
                        url,
                        cluster.call_proof(&token, path),
                    )
                };
                let response = client
                    .get(url)
                    .header("authorization", format!("DPoP {token}"))
                    .header("dpop", proof)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                // Calls in flight to the killed replica fail; every other must succeed.
                match response {
                    Ok(response) if response.status() == 200 => {
                        if killed.load(Ordering::SeqCst) {
                            served_after_kill.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(response) => panic!("replica {replica} answered {}", response.status()),
                    Err(_) if replica == REPLICAS - 1 => {}
                    Err(error) => panic!("replica {replica} failed: {error}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    {
        // Calls in flight to the victim die with it.
        let victim = cluster.write().await.replicas[REPLICAS - 1].take().unwrap();
        victim.kill_hard();
        killed.store(true, Ordering::SeqCst);
    }
    for worker in loops {
        worker.await.unwrap();
    }
    assert!(
        served_after_kill.load(Ordering::SeqCst) > 0,
        "the surviving replicas served nothing after the kill"
    );

    // Every call the upstream received has its allowed decision in the log. A replica killed
    // between committing a decision and forwarding leaves a decision without a call, never
    // the reverse.
    let store = store::open(&schema.url).await.unwrap();
    let mut allowed = 0u64;
    let mut after = 0;
    loop {
        let page = store.events_after(after, 10_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        allowed += page
            .iter()
            .filter(|event| {
                event.body.kind == "call.decision"
                    && event.body.decision.as_deref() == Some("allow")
                    && event.body.detail.as_str().contains("\"tool\":\"tracker\"")
            })
            .count() as u64;
    }
    let upstream_calls = received.load(Ordering::SeqCst);
    eprintln!(
        "upstream received {upstream_calls} calls; the log holds {allowed} allowed decisions"
    );
    assert!(
        upstream_calls <= allowed,
        "{upstream_calls} calls reached the upstream with {allowed} allowed decisions"
    );
    assert!(
        allowed - upstream_calls <= 6,
        "more decisions without a call ({}) than calls were in flight at the kill",
        allowed - upstream_calls
    );
    let mut verifier = audit::ChainVerifier::default();
    assert_eq!(store.verify_chain(&mut verifier).await.unwrap(), Ok(()));
    drop(store);

    let cluster = Arc::try_unwrap(cluster).ok().unwrap().into_inner();
    for server in cluster.replicas.into_iter().flatten() {
        server.stop();
    }
    eprintln!("the replica test took {:?}", started.elapsed());
    schema.drop_schema().await.unwrap();
}
