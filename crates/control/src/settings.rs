//! Validated settings of the control plane. The binary parses raw configuration (flags,
//! environment, `remit.toml`) and builds these once at start-up; nothing here reads files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use model::{SecretUrl, TrustDomain};

/// Everything the control plane needs to know, already checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub trust_domain: TrustDomain,
    /// What agents dial, without a trailing slash, e.g. `https://remit.example.org`. Token
    /// `iss` and `aud` are this URI; a proof's `htu` is compared with it, never with `Host`.
    pub public_url: String,
    pub listen: SocketAddr,
    /// The store's URL, which may carry a password: printed without it.
    pub store_url: SecretUrl,
    /// How long any store operation (a connection, a read, a write and its commit) may take
    /// before it fails closed.
    pub store_timeout: Duration,
    /// Most store operations waiting at once; any more are refused at once.
    pub store_max_waiting: usize,
    /// Whether opening may create a missing SQLite file: `serve` and `demo` only.
    pub store_create: bool,
    /// What a SQLite commit waits for (see [`store::SqliteSync`]).
    pub store_sync: store::SqliteSync,
    /// Where the Cedar schema and policies live; `None` uses the built-in examples.
    pub policy_dir: Option<PathBuf>,
    pub tasks: TaskLimits,
    pub proofs: ProofLimits,
    /// Bounded clock skew accepted on token `nbf`/`exp`.
    pub max_skew_seconds: i64,
    /// How often the node catches up with revocations and keys written by other processes.
    pub sync_interval: Duration,
    /// Largest request body accepted on the API.
    pub max_body_bytes: usize,
    /// Rules that quarantine an agent going off-script.
    pub containment: crate::containment::ContainmentRules,
    /// Step-up approvals: their lifetime, who may approve, how long a call waits for one.
    pub approvals: crate::approvals::ApprovalRules,
}

/// Bounds on the tasks agents may ask for.
#[derive(Clone, Copy, Debug)]
pub struct TaskLimits {
    pub default_ttl_seconds: i64,
    pub max_ttl_seconds: i64,
    pub default_budget: u32,
    pub max_budget: u32,
    /// How many delegations deep a task may be (a root task is depth 0).
    pub max_delegation_depth: u32,
}

/// Bounds on DPoP proofs.
#[derive(Clone, Copy, Debug)]
pub struct ProofLimits {
    /// Oldest accepted `iat`.
    pub max_age_seconds: i64,
    /// Newest accepted `iat` ahead of our clock.
    pub max_future_seconds: i64,
    /// Entries in the `jti` replay cache; when full of live entries, proofs are refused.
    pub replay_capacity: usize,
}

impl Settings {
    /// The defaults of the embedded quick start: loopback, a SQLite file, built-in policies.
    pub fn local(store_url: impl Into<String>) -> Settings {
        let listen = SocketAddr::from(([127, 0, 0, 1], 8470));
        Settings {
            trust_domain: TrustDomain::default(),
            public_url: format!("http://{listen}"),
            listen,
            store_url: SecretUrl::new(store_url),
            store_timeout: Duration::from_secs(2),
            store_max_waiting: 1024,
            store_create: true,
            store_sync: store::SqliteSync::Full,
            policy_dir: None,
            tasks: TaskLimits::default(),
            proofs: ProofLimits::default(),
            max_skew_seconds: 30,
            sync_interval: Duration::from_millis(100),
            max_body_bytes: 64 * 1024,
            containment: crate::containment::ContainmentRules::default(),
            approvals: crate::approvals::ApprovalRules::default(),
        }
    }

    /// Token issuer: the public URL.
    pub fn issuer(&self) -> &str {
        &self.public_url
    }

    /// Token audience: the public URL (RFC 8707 canonical resource URI).
    pub fn audience(&self) -> &str {
        &self.public_url
    }

    /// The public URL of an API path, as agents must put it in a proof's `htu`.
    pub fn url_of(&self, path: &str) -> String {
        format!("{}{path}", self.public_url)
    }
}

impl Default for TaskLimits {
    fn default() -> Self {
        TaskLimits {
            default_ttl_seconds: 300,
            max_ttl_seconds: 3600,
            default_budget: 100,
            max_budget: 10_000,
            max_delegation_depth: 3,
        }
    }
}

impl Default for ProofLimits {
    fn default() -> Self {
        ProofLimits {
            max_age_seconds: 60,
            max_future_seconds: 5,
            replay_capacity: 1_000_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_defaults_are_valid() {
        let settings = Settings::local("sqlite://remit.db");
        assert_eq!(settings.trust_domain.as_str(), "remit.local");
        assert_eq!(settings.public_url, "http://127.0.0.1:8470");
        assert_eq!(
            settings.url_of("/v1/tasks"),
            "http://127.0.0.1:8470/v1/tasks"
        );
    }
}
