//! The harness's table: every run of one section (`http`, `mcp`) against the `nginx` run of the
//! same section, and the targets of DESIGN.md ("Performance budgets") met or missed; each remit
//! run also as a share of the plain hyper proxy's run (forwarding alone), where there is one.

use std::path::Path;

use anyhow::{Context, Result};

use crate::load::Outcome;

/// Bearer mode: at least this share of nginx's throughput…
const BEARER_THROUGHPUT: f64 = 0.50;
/// …with an added p99 at most this multiple of nginx's added p99.
const BEARER_ADDED_P99: f64 = 1.5;
/// A fresh proof per call: at least this share of nginx's throughput.
const DPOP_THROUGHPUT: f64 = 0.35;

pub fn print(results: &Path, rss_kib: Option<u64>, hwm_kib: Option<u64>) -> Result<()> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("cannot read `{}`", results.display()))?;
    let outcomes: Vec<Outcome> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a results line is not an outcome")?;
    let mut groups: Vec<&str> = Vec::new();
    for outcome in &outcomes {
        if !groups.contains(&outcome.group.as_str()) {
            groups.push(&outcome.group);
        }
    }
    println!(
        "| call | path | req/s | p50 µs | p99 µs | errors | × nginx req/s | added p99 µs | added p99 × nginx | server CPU µs/req | client CPU µs/req | client signing µs/req | cores busy: server / client / machine |"
    );
    println!(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut verdicts = Vec::new();
    for group in &groups {
        let rows: Vec<&Outcome> = outcomes.iter().filter(|o| o.group == *group).collect();
        let direct = rows.iter().find(|o| o.label == "direct");
        let nginx = rows.iter().find(|o| o.label == "nginx");
        let plain = rows.iter().find(|o| o.label == "hyper proxy");
        let added = |o: &Outcome| direct.map(|d| o.p99_us as f64 - d.p99_us as f64);
        let nginx_added = nginx.and_then(|n| added(n));
        for row in &rows {
            let throughput = nginx.map(|n| row.rps / n.rps);
            let row_added = added(row);
            let added_ratio = match (row_added, nginx_added) {
                (Some(a), Some(n)) if n > 0.0 && row.label != "direct" => Some(a / n),
                _ => None,
            };
            println!(
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {:.2} / {:.2} / {:.2} |",
                group,
                row.label,
                row.rps,
                row.p50_us,
                row.p99_us,
                row.errors,
                fmt(throughput, 2),
                if row.label == "direct" {
                    "–".to_string()
                } else {
                    fmt(row_added, 0)
                },
                fmt(added_ratio, 2),
                row.server_cpu_us,
                row.client_cpu_us,
                if row.sign_us > 0.0 {
                    format!("{:.1}", row.sign_us)
                } else {
                    "–".to_string()
                },
                row.server_cores,
                row.client_cores,
                row.machine_cores,
            );
            let (Some(throughput), true) = (throughput, row.label.starts_with("remit")) else {
                continue;
            };
            if let Some(plain) = plain {
                verdicts.push(format!(
                    "{group} {}: {:.0}% of the hyper proxy's throughput (forwarding alone, no target: what the checks and the durable audit record leave of it)",
                    row.label,
                    row.rps / plain.rps * 100.0,
                ));
            }
            match row.mode.as_str() {
                "bearer" => {
                    let rps_ok = throughput >= BEARER_THROUGHPUT;
                    let p99_verdict = match added_ratio {
                        Some(ratio) => met(ratio <= BEARER_ADDED_P99),
                        None => "undetermined: nginx's added p99 is not positive in this run",
                    };
                    verdicts.push(format!(
                        "{group} {}: {:.0}% of nginx's throughput (target ≥ {:.0}%: {}), added p99 {}× nginx's (target ≤ {BEARER_ADDED_P99}×: {})",
                        row.label,
                        throughput * 100.0,
                        BEARER_THROUGHPUT * 100.0,
                        met(rps_ok),
                        fmt(added_ratio, 2),
                        p99_verdict,
                    ));
                }
                "dpop" => {
                    if let Some(bearer) = rows.iter().find(|o| o.mode == "bearer") {
                        verdicts.push(format!(
                            "{group} {}: a proof per call costs remit {:.1} µs of CPU per call more than bearer mode (the generator spent {:.1} µs signing it)",
                            row.label,
                            row.server_cpu_us - bearer.server_cpu_us,
                            row.sign_us,
                        ));
                    }
                    verdicts.push(format!(
                        "{group} {}: {:.0}% of nginx's throughput (target ≥ {:.0}%: {})",
                        row.label,
                        throughput * 100.0,
                        DPOP_THROUGHPUT * 100.0,
                        met(throughput >= DPOP_THROUGHPUT),
                    ));
                }
                _ => {}
            }
        }
    }
    println!();
    for verdict in verdicts {
        println!("- {verdict}");
    }
    if let Some(rss) = rss_kib {
        print!("- remit RSS at the end: {:.1} MiB", rss as f64 / 1024.0);
        if let Some(hwm) = hwm_kib {
            print!(" (peak {:.1} MiB)", hwm as f64 / 1024.0);
        }
        println!();
    }
    Ok(())
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.decimals$}"))
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
