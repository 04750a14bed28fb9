//! Configuration, in two stages: the raw form (`remit.toml` and command-line flags, every
//! field optional) and the validated `control::Settings` built from it once at start-up. A
//! bad value stops start-up with a message naming the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use control::Settings;
use control::settings::{ProofLimits, TaskLimits};
use serde::Deserialize;

/// The file read when present in the working directory and no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "remit.toml";
pub const DEFAULT_STORE: &str = "sqlite://remit.db";

/// `remit.toml` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub trust_domain: Option<String>,
    pub public_url: Option<String>,
    pub listen: Option<String>,
    pub store: Option<String>,
    pub policies: Option<PathBuf>,
    pub max_skew_seconds: Option<i64>,
    pub sync_interval_ms: Option<u64>,
    pub store_timeout_ms: Option<u64>,
    pub store_max_waiting: Option<usize>,
    pub store_sync: Option<String>,
    pub max_body_bytes: Option<usize>,
    #[serde(default)]
    pub tasks: RawTasks,
    #[serde(default)]
    pub proofs: RawProofs,
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub containment: RawContainment,
    #[serde(default)]
    pub approvals: RawApprovals,
    #[serde(default)]
    pub server: RawServer,
    /// The tools the gateway fronts (`[[tools]]`).
    #[serde(default)]
    pub tools: Vec<gateway::RawTool>,
}

/// `[containment]`: the rules that quarantine an agent going off-script.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContainment {
    pub max_denials: Option<u32>,
    pub window_seconds: Option<i64>,
    pub unknown_tool: Option<bool>,
    pub dead_token: Option<bool>,
    pub dead_token_grace_seconds: Option<i64>,
    pub wrong_key: Option<bool>,
    pub webhook: Option<String>,
}

/// `[approvals]`: step-up approvals (calls that `@step_up` policies hold for a human).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApprovals {
    pub ttl_seconds: Option<i64>,
    pub owner_may_approve: Option<bool>,
    pub hold_seconds: Option<u64>,
}

/// `[server]`: what a client may hold open before it has authenticated (see `server.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub header_read_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_header_bytes: Option<usize>,
}

/// `[gateway]`: rate limits per agent and per task (calls per second, and bursts).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub rate_per_agent: Option<f64>,
    pub burst_per_agent: Option<u32>,
    pub rate_per_task: Option<f64>,
    pub burst_per_task: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTasks {
    pub default_ttl_seconds: Option<i64>,
    pub max_ttl_seconds: Option<i64>,
    pub default_budget: Option<u32>,
    pub max_budget: Option<u32>,
    pub max_delegation_depth: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProofs {
    pub max_age_seconds: Option<i64>,
    pub max_future_seconds: Option<i64>,
    pub replay_capacity: Option<usize>,
}

/// Flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub store: Option<String>,
    pub listen: Option<String>,
    pub public_url: Option<String>,
    pub policies: Option<PathBuf>,
    pub trust_domain: Option<String>,
}

impl RawConfig {
    /// Reads `--config FILE`, or `remit.toml` when it exists, or nothing.
    pub fn load(path: Option<&Path>) -> Result<RawConfig> {
        let (path, required) = match path {
            Some(path) => (path.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        if !required && !path.exists() {
            return Ok(RawConfig::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read configuration `{}`", path.display()))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "invalid configuration `{}`: {}",
                path.display(),
                one_line(&e.to_string())
            )
        })?;
        // Relative policy paths are relative to the configuration file.
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(RawConfig {
            policies: raw
                .policies
                .map(|p| if p.is_relative() { base.join(p) } else { p }),
            ..raw
        })
    }

    /// The gateway's tools and limits, validated; credentials are read from the environment
    /// or files now, so a missing one stops start-up.
    pub fn gateway(&self) -> Result<(gateway::Catalog, gateway::Limits)> {
        let catalog =
            gateway::Catalog::from_raw(&self.tools).map_err(|e| anyhow::anyhow!("`tools`: {e}"))?;
        let defaults = gateway::Limits::default();
        let rate = |name: &str, value: Option<f64>, default: f64| -> Result<f64> {
            let value = value.unwrap_or(default);
            if !(value > 0.0 && value <= 1_000_000.0) {
                bail!(
                    "`gateway.{name}` must be a positive number of calls per second, at most 1000000"
                );
            }
            Ok(value)
        };
        let burst = |name: &str, value: Option<u32>, default: u32| -> Result<u32> {
            let value = value.unwrap_or(default);
            if !(1..=1_000_000).contains(&value) {
                bail!("`gateway.{name}` must be between 1 and 1000000");
            }
            Ok(value)
        };
        let g = &self.gateway;
        let limits = gateway::Limits {
            per_agent: gateway::Rate {
                per_second: rate(
                    "rate_per_agent",
                    g.rate_per_agent,
                    defaults.per_agent.per_second,
                )?,
                burst: burst(
                    "burst_per_agent",
                    g.burst_per_agent,
                    defaults.per_agent.burst,
                )?,
            },
            per_task: gateway::Rate {
                per_second: rate(
                    "rate_per_task",
                    g.rate_per_task,
                    defaults.per_task.per_second,
                )?,
                burst: burst("burst_per_task", g.burst_per_task, defaults.per_task.burst)?,
            },
        };
        Ok((catalog, limits))
    }

    /// The listener's limits, validated (the open file limit is checked when serving).
    pub fn server(&self) -> Result<crate::server::ServerLimits> {
        let defaults = crate::server::ServerLimits::default();
        let s = &self.server;
        let millis = |name: &str, value: Option<u64>, default: Duration, max: u64| {
            let Some(ms) = value else {
                return Ok(default);
            };
            if !(100..=max).contains(&ms) {
                bail!("`server.{name}` must be between 100 and {max}, not {ms}");
            }
            Ok(Duration::from_millis(ms))
        };
        let max_connections = s.max_connections.unwrap_or(defaults.max_connections);
        if !(1..=1_000_000).contains(&max_connections) {
            bail!("`server.max_connections` must be between 1 and 1000000, not {max_connections}");
        }
        // hyper's read buffer cannot be smaller than 8 KiB.
        let max_header_bytes = s.max_header_bytes.unwrap_or(defaults.max_header_bytes);
        if !(8192..=1024 * 1024).contains(&max_header_bytes) {
            bail!(
                "`server.max_header_bytes` must be between 8192 and 1048576, not {max_header_bytes}"
            );
        }
        Ok(crate::server::ServerLimits {
            header_read_timeout: millis(
                "header_read_timeout_ms",
                s.header_read_timeout_ms,
                defaults.header_read_timeout,
                600_000,
            )?,
            idle_timeout: millis(
                "idle_timeout_ms",
                s.idle_timeout_ms,
                defaults.idle_timeout,
                3_600_000,
            )?,
            max_connections,
            max_connections_configured: s.max_connections.is_some(),
            max_header_bytes,
        })
    }

    /// Applies the flags and validates everything.
    pub fn settle(self, overrides: &Overrides) -> Result<Settings> {
        let store = overrides
            .store
            .clone()
            .or(self.store)
            .unwrap_or_else(|| DEFAULT_STORE.to_string());
        check_store_directory(&store)?;
        let mut settings = Settings::local(store);
        if let Some(domain) = overrides.trust_domain.clone().or(self.trust_domain) {
            settings.trust_domain = domain
                .parse()
                .map_err(|e| anyhow::anyhow!("`trust_domain`: {e}"))?;
        }
        if let Some(listen) = overrides.listen.clone().or(self.listen) {
            settings.listen = listen.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!("`listen`: `{listen}` is not an address such as `127.0.0.1:8470`")
            })?;
        }
        let public_url = overrides
            .public_url
            .clone()
            .or(self.public_url)
            .unwrap_or_else(|| format!("http://{}", settings.listen));
        settings.public_url = check_public_url(&public_url, settings.listen)?;
        settings.policy_dir = overrides.policies.clone().or(self.policies);
        if let Some(dir) = &settings.policy_dir
            && !dir.is_dir()
        {
            bail!(
                "`policies`: `{}` is not a directory; hint: omit it to use the built-in example policies",
                dir.display()
            );
        }

        let defaults = TaskLimits::default();
        let tasks = TaskLimits {
            default_ttl_seconds: self
                .tasks
                .default_ttl_seconds
                .unwrap_or(defaults.default_ttl_seconds),
            max_ttl_seconds: self
                .tasks
                .max_ttl_seconds
                .unwrap_or(defaults.max_ttl_seconds),
            default_budget: self.tasks.default_budget.unwrap_or(defaults.default_budget),
            max_budget: self.tasks.max_budget.unwrap_or(defaults.max_budget),
            max_delegation_depth: self
                .tasks
                .max_delegation_depth
                .unwrap_or(defaults.max_delegation_depth),
        };
        if tasks.max_delegation_depth > 8 {
            bail!(
                "`tasks.max_delegation_depth` must be between 0 and 8, not {}",
                tasks.max_delegation_depth
            );
        }
        if tasks.max_ttl_seconds < 1 || tasks.max_ttl_seconds > 86_400 {
            bail!(
                "`tasks.max_ttl_seconds` must be between 1 and 86400, not {}",
                tasks.max_ttl_seconds
            );
        }
        if !(1..=tasks.max_ttl_seconds).contains(&tasks.default_ttl_seconds) {
            bail!(
                "`tasks.default_ttl_seconds` must be between 1 and `tasks.max_ttl_seconds` ({})",
                tasks.max_ttl_seconds
            );
        }
        if tasks.max_budget < 1 || !(1..=tasks.max_budget).contains(&tasks.default_budget) {
            bail!(
                "`tasks.default_budget` must be between 1 and `tasks.max_budget` ({})",
                tasks.max_budget
            );
        }
        settings.tasks = tasks;

        let defaults = ProofLimits::default();
        let proofs = ProofLimits {
            max_age_seconds: self
                .proofs
                .max_age_seconds
                .unwrap_or(defaults.max_age_seconds),
            max_future_seconds: self
                .proofs
                .max_future_seconds
                .unwrap_or(defaults.max_future_seconds),
            replay_capacity: self
                .proofs
                .replay_capacity
                .unwrap_or(defaults.replay_capacity),
        };
        if !(1..=600).contains(&proofs.max_age_seconds)
            || !(0..=60).contains(&proofs.max_future_seconds)
        {
            bail!(
                "`proofs.max_age_seconds` must be 1 to 600 and `proofs.max_future_seconds` 0 to 60"
            );
        }
        if !(1_000..=100_000_000).contains(&proofs.replay_capacity) {
            bail!("`proofs.replay_capacity` must be between 1000 and 100000000");
        }
        settings.proofs = proofs;

        let defaults = control::containment::ContainmentRules::default();
        let c = &self.containment;
        let containment = control::containment::ContainmentRules {
            max_denials: c.max_denials.unwrap_or(defaults.max_denials),
            window_seconds: c.window_seconds.unwrap_or(defaults.window_seconds),
            unknown_tool: c.unknown_tool.unwrap_or(defaults.unknown_tool),
            dead_token: c.dead_token.unwrap_or(defaults.dead_token),
            dead_token_grace_seconds: c
                .dead_token_grace_seconds
                .unwrap_or(defaults.dead_token_grace_seconds),
            wrong_key: c.wrong_key.unwrap_or(defaults.wrong_key),
            webhook: c.webhook.clone().map(model::Secret::new),
        };
        if !(1..=86_400).contains(&containment.window_seconds) {
            bail!(
                "`containment.window_seconds` must be between 1 and 86400, not {}",
                containment.window_seconds
            );
        }
        if !(0..=3_600).contains(&containment.dead_token_grace_seconds) {
            bail!(
                "`containment.dead_token_grace_seconds` must be between 0 and 3600, not {}",
                containment.dead_token_grace_seconds
            );
        }
        if let Some(url) = containment.webhook.as_ref().map(model::Secret::expose)
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            bail!(
                "`containment.webhook` must be an http:// or https:// URL, not `{}`",
                model::redact_url(url)
            );
        }
        settings.containment = containment;

        let defaults = control::approvals::ApprovalRules::default();
        let a = &self.approvals;
        let approvals = control::approvals::ApprovalRules {
            ttl_seconds: a.ttl_seconds.unwrap_or(defaults.ttl_seconds),
            owner_may_approve: a.owner_may_approve.unwrap_or(defaults.owner_may_approve),
            hold_seconds: a.hold_seconds.unwrap_or(defaults.hold_seconds),
        };
        if !(10..=86_400).contains(&approvals.ttl_seconds) {
            bail!(
                "`approvals.ttl_seconds` must be between 10 and 86400, not {}",
                approvals.ttl_seconds
            );
        }
        // A held call keeps its HTTP request open; agents' clients time out long before this.
        if approvals.hold_seconds > 300 {
            bail!(
                "`approvals.hold_seconds` must be between 0 and 300, not {}",
                approvals.hold_seconds
            );
        }
        settings.approvals = approvals;

        if let Some(skew) = self.max_skew_seconds {
            if !(0..=300).contains(&skew) {
                bail!("`max_skew_seconds` must be between 0 and 300, not {skew}");
            }
            settings.max_skew_seconds = skew;
        }
        if let Some(ms) = self.sync_interval_ms {
            if !(10..=60_000).contains(&ms) {
                bail!("`sync_interval_ms` must be between 10 and 60000, not {ms}");
            }
            settings.sync_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = self.store_timeout_ms {
            if !(100..=60_000).contains(&ms) {
                bail!("`store_timeout_ms` must be between 100 and 60000, not {ms}");
            }
            settings.store_timeout = Duration::from_millis(ms);
        }
        if let Some(waiting) = self.store_max_waiting {
            if !(1..=65_536).contains(&waiting) {
                bail!("`store_max_waiting` must be between 1 and 65536, not {waiting}");
            }
            settings.store_max_waiting = waiting;
        }
        if let Some(sync) = &self.store_sync {
            let Some(parsed) = store::SqliteSync::parse(sync) else {
                bail!("`store_sync` must be \"full\" or \"normal\", not {sync:?}");
            };
            if store::sqlite_path(settings.store_url.expose()).is_none() {
                bail!(
                    "`store_sync` applies to a SQLite store only; PostgreSQL's durability is its \
                     server's `synchronous_commit`"
                );
            }
            settings.store_sync = parsed;
        }
        if let Some(bytes) = self.max_body_bytes {
            if !(1024..=16 * 1024 * 1024).contains(&bytes) {
                bail!("`max_body_bytes` must be between 1024 and 16777216, not {bytes}");
            }
            settings.max_body_bytes = bytes;
        }
        Ok(settings)
    }
}

/// The public URL must be absolute, without path, query or trailing slash; plain HTTP only
/// for loopback, because tokens and proofs would otherwise cross the network in clear.
fn check_public_url(url: &str, listen: SocketAddr) -> Result<String> {
    let url = url.trim_end_matches('/');
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        anyhow::anyhow!(
            "`public_url`: `{url}` is not an absolute URL such as `https://remit.example.org`"
        )
    })?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        bail!(
            "`public_url`: `{url}` must be scheme and host only, such as `https://remit.example.org`"
        );
    }
    match scheme {
        "https" => {}
        "http" => {
            let host = rest.rsplit_once(':').map_or(rest, |(host, _)| host);
            let loopback_host =
                matches!(host, "localhost" | "127.0.0.1" | "[::1]") || host.starts_with("127.");
            if !loopback_host || !listen.ip().is_loopback() {
                bail!(
                    "`public_url`: plain HTTP is for loopback only; hint: serve behind a TLS-terminating proxy and set `public_url = \"https://…\"`"
                );
            }
        }
        other => bail!("`public_url`: scheme `{other}` is not `https` or `http`"),
    }
    Ok(url.to_string())
}

/// A SQLite file can only be created in a directory that exists; SQLite itself would say only
/// "unable to open database file", naming neither the setting nor the path.
fn check_store_directory(store: &str) -> Result<()> {
    let Some(path) = store::sqlite_path(store) else {
        return Ok(());
    };
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    let directory = match Path::new(path).parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => return Ok(()),
    };
    if !directory.is_dir() {
        bail!(
            "`store`: the directory `{}` of `{path}` does not exist; hint: create it, or point `store` at a file in an existing directory",
            directory.display()
        );
    }
    Ok(())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(toml_text: &str) -> Result<Settings> {
        let raw: RawConfig = toml::from_str(toml_text)?;
        raw.settle(&Overrides::default())
    }

    #[test]
    fn defaults_are_the_quick_start() {
        let settings = settle("").unwrap();
        assert_eq!(settings.store_url.expose(), DEFAULT_STORE);
        assert_eq!(settings.public_url, "http://127.0.0.1:8470");
        assert_eq!(settings.tasks.default_ttl_seconds, 300);
        assert_eq!(
            settings.approvals,
            control::approvals::ApprovalRules {
                ttl_seconds: 600,
                owner_may_approve: false,
                hold_seconds: 0,
            }
        );
        let configured =
            settle("[approvals]\nttl_seconds = 120\nowner_may_approve = true\nhold_seconds = 5")
                .unwrap();
        assert_eq!(configured.approvals.ttl_seconds, 120);
        assert!(configured.approvals.owner_may_approve);
        assert_eq!(configured.approvals.hold_seconds, 5);
    }

    #[test]
    fn bad_values_name_the_field() {
        let error = |text: &str| settle(text).unwrap_err().to_string();
        assert!(error("listen = \"nowhere\"").contains("`listen`"));
        assert!(error("[tasks]\nmax_ttl_seconds = 0").contains("`tasks.max_ttl_seconds`"));
        assert!(error("public_url = \"http://remit.example.org\"").contains("loopback only"));
        assert!(
            error("public_url = \"https://remit.example.org/x\"").contains("scheme and host only")
        );
        assert!(error("trust_domain = \"Bad Domain\"").contains("`trust_domain`"));
        assert!(toml::from_str::<RawConfig>("unknown = 1").is_err());
        assert!(error("[approvals]\nttl_seconds = 0").contains("`approvals.ttl_seconds`"));
        assert!(error("[approvals]\nhold_seconds = 301").contains("`approvals.hold_seconds`"));
        assert!(toml::from_str::<RawConfig>("[approvals]\nhold = 1").is_err());
        assert!(error("store_max_waiting = 0").contains("`store_max_waiting`"));
    }

    #[test]
    fn the_store_bounds_are_configured_together() {
        let settings = settle("").unwrap();
        assert_eq!(settings.store_timeout, Duration::from_secs(2));
        assert_eq!(settings.store_max_waiting, 1024);
        let settings = settle("store_timeout_ms = 500\nstore_max_waiting = 64").unwrap();
        assert_eq!(settings.store_timeout, Duration::from_millis(500));
        assert_eq!(settings.store_max_waiting, 64);
    }

    #[test]
    fn server_limits_have_defaults_and_bounds() {
        let server = |text: &str| toml::from_str::<RawConfig>(text).unwrap().server();
        assert_eq!(
            server("").unwrap(),
            crate::server::ServerLimits {
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                max_connections: 10_000,
                max_connections_configured: false,
                max_header_bytes: 16_384,
            }
        );
        let set = server(
            "[server]\nheader_read_timeout_ms = 250\nidle_timeout_ms = 1000\nmax_connections = 50\nmax_header_bytes = 8192",
        )
        .unwrap();
        assert_eq!(set.header_read_timeout, Duration::from_millis(250));
        assert_eq!(set.idle_timeout, Duration::from_secs(1));
        assert_eq!(
            (set.max_connections, set.max_connections_configured),
            (50, true)
        );
        assert_eq!(set.max_header_bytes, 8192);
        let error = |text: &str| server(text).unwrap_err().to_string();
        assert_eq!(
            error("[server]\nheader_read_timeout_ms = 0"),
            "`server.header_read_timeout_ms` must be between 100 and 600000, not 0"
        );
        assert!(error("[server]\nidle_timeout_ms = 99").starts_with("`server.idle_timeout_ms`"));
        assert!(error("[server]\nmax_connections = 0").starts_with("`server.max_connections`"));
        assert!(
            error("[server]\nmax_header_bytes = 4096").starts_with("`server.max_header_bytes`")
        );
        assert!(toml::from_str::<RawConfig>("[server]\ntimeout = 1").is_err());
    }

    #[test]
    fn https_public_url_allows_any_listener() {
        let settings =
            settle("listen = \"0.0.0.0:8470\"\npublic_url = \"https://remit.example.org/\"")
                .unwrap();
        assert_eq!(settings.public_url, "https://remit.example.org");
    }

    #[test]
    fn store_sync_is_full_unless_a_sqlite_store_says_normal() {
        assert_eq!(settle("").unwrap().store_sync, store::SqliteSync::Full);
        let normal = settle("store_sync = \"normal\"").unwrap();
        assert_eq!(normal.store_sync, store::SqliteSync::Normal);
        let full = settle("store = \"sqlite:remit.db\"\nstore_sync = \"full\"").unwrap();
        assert_eq!(full.store_sync, store::SqliteSync::Full);
        let error = |text: &str| settle(text).unwrap_err().to_string();
        assert!(error("store_sync = \"off\"").contains("`store_sync` must be"));
        let postgres = "store = \"postgres://remit@db/remit\"\nstore_sync = \"normal\"";
        assert!(error(postgres).contains("SQLite store only"));
    }
}
