//! One harness for every test: a fresh store, a clock the test moves, the example policies, and
//! helpers that act as an agent (keys, proofs) or an operator.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use control::clock::{Clock, ManualClock};
use control::{Authority, CallAttempt, CallVerdict, Grant, Operator, Settings, TaskRequest};
use credentials::AgentKeyPair;
use model::ActionClass;
use serde_json::{Value, json};

pub const BASE: &str = "http://127.0.0.1:8470";

pub struct Harness {
    pub authority: Arc<Authority>,
    pub clock: Arc<ManualClock>,
    pub admin: Operator,
    _dir: tempfile::TempDir,
}

pub struct Agent {
    pub name: String,
    pub key: AgentKeyPair,
}

pub fn unique(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{label}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

impl Harness {
    pub async fn new() -> Harness {
        Harness::configured(|_| {}).await
    }

    /// A fresh SQLite store with settings adjusted by `adjust`.
    pub async fn configured(adjust: impl FnOnce(&mut Settings)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("remit.db").display());
        Harness::build(url, dir, adjust).await
    }

    pub async fn with_store(store_url: String, dir: tempfile::TempDir) -> Harness {
        Harness::build(store_url, dir, |_| {}).await
    }

    /// A harness on `store_url` with settings adjusted by `adjust`: a second replica.
    pub async fn with_store_configured(
        store_url: String,
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut Settings),
    ) -> Harness {
        Harness::build(store_url, dir, adjust).await
    }

    async fn build(
        store_url: String,
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut Settings),
    ) -> Harness {
        let clock = Arc::new(ManualClock::new(wall_clock_ms()));
        let mut settings = Settings::local(store_url);
        settings.public_url = BASE.to_string();
        settings.store_timeout = std::time::Duration::from_millis(500);
        adjust(&mut settings);
        let authority = Authority::open(settings, clock.clone()).await.unwrap();
        Harness {
            authority,
            clock,
            admin: Operator::local("test"),
            _dir: dir,
        }
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    pub async fn agent(&self, name: &str, owner: &str) -> Agent {
        let key = AgentKeyPair::generate_p256().unwrap();
        self.authority
            .register_agent(&self.admin, name, owner, &[key.public().to_jwk()])
            .await
            .unwrap();
        Agent {
            name: name.to_string(),
            key,
        }
    }

    pub fn task_proof(&self, agent: &Agent) -> String {
        agent
            .key
            .sign_proof(
                "POST",
                &format!("{BASE}/v1/tasks"),
                None,
                self.now(),
                &unique("jti"),
            )
            .unwrap()
    }

    pub async fn request(
        &self,
        agent: &Agent,
        scopes: Value,
        ttl: Option<i64>,
        budget: Option<u32>,
    ) -> control::Result<Grant> {
        let request: TaskRequest = serde_json::from_value(json!({
            "agent": agent.name,
            "intent": "triage new issues",
            "scopes": scopes,
            "ttl_seconds": ttl,
            "budget": budget,
        }))
        .unwrap();
        self.authority
            .request_task(Some(&self.task_proof(agent)), request)
            .await
    }

    pub async fn grant(&self, agent: &Agent) -> Grant {
        self.request(agent, github_scopes(), None, None)
            .await
            .unwrap()
    }

    /// A call with a fresh proof from `agent`'s key.
    pub async fn call(
        &self,
        agent: &Agent,
        grant: &Grant,
        action: &str,
        class: ActionClass,
    ) -> CallVerdict {
        let url = format!("{BASE}/http/github/{action}");
        let token = grant.token.expose();
        let proof = agent
            .key
            .sign_proof("POST", &url, Some(token), self.now(), &unique("call"))
            .unwrap();
        self.attempt(
            token,
            Some(&proof),
            &url,
            "github",
            action,
            "acme/api",
            class,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn attempt(
        &self,
        token: &str,
        proof: Option<&str>,
        url: &str,
        tool: &str,
        action: &str,
        resource: &str,
        class: ActionClass,
    ) -> CallVerdict {
        let attempt = CallAttempt {
            token,
            proof,
            bearer_allowed: false,
            method: "POST",
            url,
            tool,
            action,
            resource,
            class,
            sensitivity: &[],
            arguments: "{}",
            limiter: None,
        };
        self.authority.authorize(&attempt).await
    }
}

pub fn github_scopes() -> Value {
    json!([{ "tool": "github", "actions": ["read_issue", "create_issue"], "resources": ["acme/*"] }])
}
