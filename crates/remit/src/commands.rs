//! One function per subcommand. Admin commands open the store directly and act as the local
//! operator: whoever can open the store already holds everything it protects. They never
//! create one: only `serve` and `demo` do.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use control::clock::SystemClock;
use control::{Authority, Operator, Settings};
use model::Role;
use store::{AuditFilter, RevocationKind};

use crate::cli::{
    AgentCommand, ApprovalsCommand, AuditCommand, Cli, Command, Global, KeysCommand,
    OperatorCommand, PolicyCommand, RevokeKind, RoleArg,
};
use crate::config::{Overrides, RawConfig};
use crate::demo;

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            init_logging();
            let overrides = Overrides {
                listen: args.listen,
                public_url: args.public_url,
                trust_domain: args.trust_domain,
                ..overrides(&cli.global)
            };
            let raw = RawConfig::load(cli.global.config.as_deref())?;
            let (catalog, limits) = raw.gateway()?;
            let server = raw.server()?;
            serve(raw.settle(&overrides)?, catalog, limits, server).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo::run().await,
        Command::Policy(command) => policy(command),
        command => {
            let authority = open(&cli.global).await?;
            let operator =
                Operator::local(&std::env::var("USER").unwrap_or_else(|_| "unknown".to_string()));
            admin(&authority, &operator, command).await
        }
    }
}

/// Prints an error as one plain line (plus a hint line when the message carries one).
pub fn print_error(error: &anyhow::Error) {
    let text = format!("{error:#}");
    match text.split_once("; hint: ") {
        Some((message, hint)) => eprintln!("error: {message}\nhint: {hint}"),
        None => eprintln!("error: {text}"),
    }
}

fn overrides(global: &Global) -> Overrides {
    Overrides {
        store: global.store.clone(),
        policies: global.policies.clone(),
        ..Overrides::default()
    }
}

fn settings(global: &Global, overrides: &Overrides) -> Result<Settings> {
    RawConfig::load(global.config.as_deref())?.settle(overrides)
}

/// Opens an existing store for an admin command. Only `serve` and `demo` create a store: a
/// command pointed at the wrong path must say so, not report on an empty store it just made.
async fn open(global: &Global) -> Result<Arc<Authority>> {
    let mut settings = settings(global, &overrides(global))?;
    settings.store_create = false;
    // Printed without its password.
    let store_url = settings.store_url.clone();
    Authority::open(settings, Arc::new(SystemClock))
        .await
        .map_err(|e| {
            if e.code == "store_missing" {
                anyhow!(
                    "{e}; hint: `remit serve` creates it; give an existing store with \
                     `--store` or `store` in remit.toml"
                )
            } else {
                anyhow!("cannot open the store `{store_url}`: {e}")
            }
        })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(crate::cli::env::LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(
    settings: Settings,
    catalog: gateway::Catalog,
    limits: gateway::Limits,
    server: crate::server::ServerLimits,
) -> Result<()> {
    let listen = settings.listen;
    // Printed without its password.
    let store_url = settings.store_url.clone();
    let authority = Authority::open(settings, Arc::new(SystemClock))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    // After the configuration's own mistakes, which are reported first.
    let server = server.fit_open_files()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on `{listen}`"))?;
    let sync = authority.spawn_sync();
    tracing::info!(
        "remit listening on {} (public URL {}, store {store_url}, {} policies, signing key {})",
        listener.local_addr()?,
        authority.settings().public_url,
        authority.policy().policy_count(),
        authority.keys().current_kid(),
    );
    let tools = catalog.len();
    let gateway = gateway::Gateway::new(Arc::clone(&authority), catalog, limits)
        .map_err(|e| anyhow!("{e}"))?;
    tracing::info!("gateway fronting {tools} tools at /mcp/{{tool}} and /http/{{tool}}/{{*path}}");
    // One span per request (method and path; never headers, which carry tokens and proofs).
    let app = control::api::router(Arc::clone(&authority))
        .merge(gateway::router(gateway))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    crate::server::serve(listener, app, server, shutdown_signal()).await;
    sync.abort();
    authority.flush_call_counts().await;
    authority.flush_deferred().await;
    tracing::info!("remit stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn admin(authority: &Authority, operator: &Operator, command: Command) -> Result<ExitCode> {
    let fail = |e: control::Error| anyhow!("{e}");
    match command {
        Command::Operator(OperatorCommand::Create { role, name }) => {
            let role = match role {
                RoleArg::Admin => Role::Admin,
                RoleArg::Approver => Role::Approver,
                RoleArg::Auditor => Role::Auditor,
            };
            let (record, token) = authority
                .create_operator(operator, &name, role)
                .await
                .map_err(fail)?;
            println!(
                "operator {} ({}, role {})",
                record.id, record.name, record.role
            );
            println!("token: {}", token.expose());
            eprintln!("this token is shown once; remit keeps only its hash");
        }
        Command::Agent(AgentCommand::Create { name, owner, keys }) => {
            let mut jwks = Vec::with_capacity(keys.len());
            for path in &keys {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read key file `{}`", path.display()))?;
                let jwk: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| anyhow!("key file `{}` is not a JSON JWK: {e}; hint: it should hold one public JWK object", path.display()))?;
                jwks.push(jwk);
            }
            let agent = authority
                .register_agent(operator, &name, &owner, &jwks)
                .await
                .map_err(fail)?;
            println!("{}", agent.spiffe_id);
        }
        Command::Agent(AgentCommand::List) => {
            for agent in authority.list_agents(operator).await.map_err(fail)? {
                println!(
                    "{}\t{}\t{}\t{}",
                    agent.name, agent.status, agent.owner, agent.spiffe_id
                );
            }
        }
        Command::Agent(AgentCommand::Show { name }) => {
            let agent = authority.get_agent(operator, &name).await.map_err(fail)?;
            print_json(&control::api::AgentView::from(agent))?;
        }
        Command::Agent(AgentCommand::Disable { name, reason }) => {
            let agent = authority
                .disable_agent(operator, &name, &reason)
                .await
                .map_err(fail)?;
            println!("agent {} disabled", agent.name);
        }
        Command::Agent(AgentCommand::Release { name, reason }) => {
            let agent = authority
                .release_agent(operator, &name, &reason)
                .await
                .map_err(fail)?;
            println!("agent {} released", agent.name);
        }
        Command::Keys(KeysCommand::Rotate) => {
            let kid = authority.rotate_keys(operator).await.map_err(fail)?;
            println!(
                "new signing key {kid}; the previous key stays published until its tokens have expired"
            );
        }
        Command::Approvals(ApprovalsCommand::List { status, json }) => {
            let status = match status.as_str() {
                "all" => None,
                text => Some(store::ApprovalStatus::parse(text).ok_or_else(|| {
                    anyhow!("unknown approval status `{text}`: expected `pending`, `approved`, `denied`, `consumed`, `expired` or `all`")
                })?),
            };
            for approval in authority
                .list_approvals(operator, status, 1000)
                .await
                .map_err(fail)?
            {
                if json {
                    println!("{}", serde_json::to_string(&approval)?);
                } else {
                    println!("{}", approval_line(&approval));
                }
            }
        }
        Command::Approvals(ApprovalsCommand::Approve { id, reason }) => {
            let approval = authority
                .decide_approval(operator, &id, true, &reason)
                .await
                .map_err(fail)?;
            println!(
                "approved {}: the same call may pass once before {}",
                approval.id, approval.expires_at
            );
        }
        Command::Approvals(ApprovalsCommand::Deny { id, reason }) => {
            let approval = authority
                .decide_approval(operator, &id, false, &reason)
                .await
                .map_err(fail)?;
            println!("denied {}", approval.id);
        }
        Command::Revoke(args) => {
            let kind = match args.kind {
                RevokeKind::Token => RevocationKind::Token,
                RevokeKind::Task => RevocationKind::Task,
                RevokeKind::Agent => RevocationKind::Agent,
                RevokeKind::Owner => RevocationKind::Owner,
            };
            let revocation = authority
                .revoke(operator, kind, &args.target, &args.reason)
                .await
                .map_err(fail)?;
            println!(
                "revoked {} {} (revocation #{})",
                revocation.kind.as_str(),
                revocation.target,
                revocation.seq
            );
        }
        Command::Audit(AuditCommand::Verify { checkpoint }) => {
            let report = match checkpoint {
                Some(path) => {
                    let text = read_checkpoint(&path)?;
                    authority
                        .verify_audit_against(operator, &text)
                        .await
                        .map_err(fail)?
                }
                None => authority.verify_audit(operator).await.map_err(fail)?,
            };
            if let Some(seq) = report.first_bad_seq {
                eprintln!(
                    "error: audit chain broken at sequence number {seq}: {}",
                    report.reason.as_deref().unwrap_or("unknown reason")
                );
                eprintln!("{} events verified before it", report.checked);
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "audit chain intact: {} events, head {}",
                report.checked, report.head
            );
            if let Some(seq) = report.checkpoint_seq {
                println!("the log matches the signed checkpoint of event {seq}");
            }
        }
        Command::Audit(AuditCommand::Checkpoint) => {
            let checkpoint = authority.audit_checkpoint(operator).await.map_err(fail)?;
            println!("{}", checkpoint.checkpoint);
            eprintln!(
                "checkpoint of event {} (hash {}), signed by key {}; keep it outside remit's store \
                 and check the log against it with `remit audit verify --checkpoint FILE`",
                checkpoint.seq, checkpoint.hash, checkpoint.kid
            );
        }
        Command::Audit(AuditCommand::Timeline { task, json }) => {
            for entry in authority.timeline(operator, &task).await.map_err(fail)? {
                if json {
                    println!("{}", serde_json::to_string(&entry)?);
                } else {
                    let decision = entry
                        .decision
                        .as_deref()
                        .map(|d| format!(" [{d}]"))
                        .unwrap_or_default();
                    println!(
                        "#{:<6} {} {:<16}{decision} {}",
                        entry.seq, entry.task, entry.kind, entry.summary
                    );
                }
            }
        }
        Command::Audit(AuditCommand::Tail { count, agent, task }) => {
            let agent = agent.map(|a| {
                if a.starts_with("spiffe://") {
                    a
                } else {
                    format!("spiffe://{}/agent/{a}", authority.settings().trust_domain)
                }
            });
            let filter = AuditFilter {
                agent,
                task,
                limit: count.clamp(1, 1000),
                newest: true,
                ..AuditFilter::default()
            };
            for event in authority
                .audit_events(operator, &filter)
                .await
                .map_err(fail)?
            {
                println!("{}", serde_json::to_string(&event)?);
            }
        }
        Command::Serve(_) | Command::Demo | Command::Policy(_) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// One approval as a line of text: id, status, what, for whom, until when.
fn approval_line(approval: &control::approvals::ApprovalView) -> String {
    format!(
        "{}\t{}\t{} {} on {}\ttask {}\tagent {}\targs sha256 {}\texpires {}",
        approval.id,
        approval.status,
        approval.tool,
        approval.action,
        approval.resource,
        approval.task,
        approval.agent,
        approval.args_digest,
        approval.expires_at
    )
}

fn policy(command: PolicyCommand) -> Result<ExitCode> {
    match command {
        PolicyCommand::Init { dir } => {
            for path in policy_init(&dir)? {
                println!("wrote {}", path.display());
            }
            println!(
                "next: edit them, check them with `remit policy test {0}`, and serve them with `policies = \"{0}\"` in remit.toml",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Validate { dir } => {
            let engine = policy::PolicyEngine::load_dir(&dir).map_err(|e| anyhow!("{e}"))?;
            println!(
                "{}: {} policies valid against the schema",
                dir.display(),
                engine.policy_count()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test { dir } => {
            let engine = policy::PolicyEngine::load_dir(&dir).map_err(|e| anyhow!("{e}"))?;
            let tests = dir.join("tests");
            if !tests.is_dir() {
                return Err(anyhow!(
                    "no tests: `{}` is not a directory; hint: write `[[case]]` entries in `{}`, or start from the example that `remit policy init NEW_DIR` writes",
                    tests.display(),
                    tests.join("NAME.toml").display()
                ));
            }
            let report = policy::run_policy_tests(&engine, &tests).map_err(|e| anyhow!("{e}"))?;
            for failure in &report.failures {
                println!(
                    "FAIL {} / {}: expected {}, got {} ({})",
                    failure.file,
                    failure.case,
                    failure.expected,
                    failure.got,
                    failure.reasons.join("; ")
                );
            }
            println!("{} passed, {} failed", report.passed, report.failures.len());
            Ok(if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `remit policy init DIR`: the embedded example schema, policies and policy tests, written
/// into `DIR` (created if missing). Every target is checked before anything is written, and
/// each file is created only if absent, so an existing file is never overwritten.
fn policy_init(dir: &Path) -> Result<Vec<PathBuf>> {
    use control::{EXAMPLE_POLICIES, EXAMPLE_SCHEMA, EXAMPLE_TESTS};
    let tests = dir.join("tests");
    let mut files: Vec<(PathBuf, &str)> = vec![(dir.join(EXAMPLE_SCHEMA.0), EXAMPLE_SCHEMA.1)];
    files.extend(
        EXAMPLE_POLICIES
            .iter()
            .map(|(name, text)| (dir.join(name), *text)),
    );
    files.push((tests.join(EXAMPLE_TESTS.0), EXAMPLE_TESTS.1));
    if let Some((path, _)) = files.iter().find(|(path, _)| path.exists()) {
        return Err(anyhow!(
            "`{}` already exists, and `remit policy init` never overwrites a file; hint: choose a new directory, or move the existing files away",
            path.display()
        ));
    }
    std::fs::create_dir_all(&tests)
        .with_context(|| format!("cannot create the directory `{}`", tests.display()))?;
    for (path, text) in &files {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("cannot create `{}`", path.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    Ok(files.into_iter().map(|(path, _)| path).collect())
}

/// A checkpoint file's text, read with a bound: a checkpoint is well under 1 KiB.
fn read_checkpoint(path: &std::path::Path) -> Result<String> {
    const MAX: u64 = 16 * 1024;
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the checkpoint `{}`", path.display()))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX + 1), &mut text)
        .with_context(|| format!("cannot read the checkpoint `{}`", path.display()))?;
    if text.len() as u64 > MAX {
        return Err(anyhow!(
            "the checkpoint `{}` is larger than 16 KiB; hint: give the file that `remit audit checkpoint` printed",
            path.display()
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvals_list_one_per_line() {
        let view = control::approvals::ApprovalView {
            id: "apr_01".to_string(),
            task: "task_x".to_string(),
            agent: "spiffe://remit.local/agent/ops-bot".to_string(),
            owner: "alice@example.org".to_string(),
            tool: "iam".to_string(),
            action: "attach_policy".to_string(),
            resource: "roles/admin".to_string(),
            args_digest: "ab".repeat(32),
            status: "pending".to_string(),
            created_at: 1,
            expires_at: 601,
            decided_by: None,
            reason: None,
            decided_at: None,
        };
        let line = approval_line(&view);
        assert!(
            line.starts_with("apr_01\tpending\tiam attach_policy on roles/admin\ttask task_x"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
