//! Prometheus metrics of the gateway, in the text exposition format: decisions by outcome,
//! tool and reason, latency histograms for the decision and for the upstream, and the store
//! writer's counters (the call path's one serial stage).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use parking_lot::Mutex;
use store::WriterStats;

/// Histogram bucket bounds in seconds: from 10 µs to 10 s.
const BOUNDS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.5, 1.0, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BOUNDS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BOUNDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct State {
    /// Tool → (outcome, reason) → count. Outcomes and reasons are the call path's fixed
    /// codes, so once a tool has been seen, counting a decision allocates nothing.
    decisions: BTreeMap<String, BTreeMap<(&'static str, &'static str), u64>>,
    decision_latency: Histogram,
    upstream_latency: BTreeMap<String, Histogram>,
    upstream_errors: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

/// Label values are ours (tool names, decision codes), but escape them anyway.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Applies `change` to the value of `key`, allocating the owned key only the first time the
/// key is seen.
fn update<V: Default>(map: &mut BTreeMap<String, V>, key: &str, change: impl FnOnce(&mut V)) {
    match map.get_mut(key) {
        Some(value) => change(value),
        None => {
            let mut value = V::default();
            change(&mut value);
            map.insert(key.to_string(), value);
        }
    }
}

impl Metrics {
    pub fn decision(
        &self,
        outcome: &'static str,
        tool: &str,
        reason: &'static str,
        took: Duration,
    ) {
        let mut state = self.state.lock();
        update(&mut state.decisions, tool, |counts| {
            *counts.entry((outcome, reason)).or_insert(0) += 1;
        });
        state.decision_latency.observe(took.as_secs_f64());
    }

    pub fn upstream(&self, tool: &str, took: Duration, failed: bool) {
        let mut state = self.state.lock();
        update(&mut state.upstream_latency, tool, |histogram| {
            histogram.observe(took.as_secs_f64());
        });
        if failed {
            update(&mut state.upstream_errors, tool, |count| *count += 1);
        }
    }

    /// The text exposition of the gateway's metrics and of `writer`, the store's.
    pub fn render(&self, writer: &WriterStats) -> String {
        let state = self.state.lock();
        let mut out = String::new();
        out.push_str("# HELP remit_decisions_total Call decisions by outcome, tool and reason.\n");
        out.push_str("# TYPE remit_decisions_total counter\n");
        for (tool, counts) in &state.decisions {
            for ((outcome, reason), count) in counts {
                let _ = writeln!(
                    out,
                    "remit_decisions_total{{outcome=\"{}\",tool=\"{}\",reason=\"{}\"}} {count}",
                    label(outcome),
                    label(tool),
                    label(reason)
                );
            }
        }
        out.push_str("# HELP remit_decision_seconds Time to decide a call (token, proof, revocation, scope, policy, audit).\n");
        out.push_str("# TYPE remit_decision_seconds histogram\n");
        state
            .decision_latency
            .render(&mut out, "remit_decision_seconds", "");
        out.push_str("# HELP remit_upstream_seconds Time from forwarding a call to the upstream's response head.\n");
        out.push_str("# TYPE remit_upstream_seconds histogram\n");
        for (tool, histogram) in &state.upstream_latency {
            histogram.render(
                &mut out,
                "remit_upstream_seconds",
                &format!("tool=\"{}\"", label(tool)),
            );
        }
        out.push_str(
            "# HELP remit_upstream_errors_total Upstream calls that failed before a response.\n",
        );
        out.push_str("# TYPE remit_upstream_errors_total counter\n");
        for (tool, count) in &state.upstream_errors {
            let _ = writeln!(
                out,
                "remit_upstream_errors_total{{tool=\"{}\"}} {count}",
                label(tool)
            );
        }
        drop(state);
        render_writer(&mut out, writer);
        out
    }
}

/// The store writer's counters. Busy share of the writer = the rate of the three `_seconds`
/// counters together; batch size = operations / batches.
fn render_writer(out: &mut String, writer: &WriterStats) {
    let counters: [(&str, &str, f64); 7] = [
        (
            "remit_store_write_batches_total",
            "Transactions the store's writer ran for queued writes (group commits).",
            writer.batches as f64,
        ),
        (
            "remit_store_write_operations_total",
            "Writes those transactions carried (a call's decision is one).",
            writer.operations as f64,
        ),
        (
            "remit_store_write_gathering_seconds_total",
            "Time the writer let a batch grow before starting its transaction.",
            writer.gathering.as_secs_f64(),
        ),
        (
            "remit_store_write_committing_seconds_total",
            "Time the writer spent running and committing batches.",
            writer.committing.as_secs_f64(),
        ),
        (
            "remit_store_write_chain_lock_held_seconds_total",
            "Of that, time the writer held the audit chain's lock, which every writer of the \
             chain (every replica's) takes in turn.",
            writer.chain_lock_held.as_secs_f64(),
        ),
        (
            "remit_store_lookup_fills_total",
            "Transactions that filled the audit log's per-agent and per-task lookups.",
            writer.lookup_fills as f64,
        ),
        (
            "remit_store_lookup_filling_seconds_total",
            "Time those took, beside the writer (fills do not hold the chain lock).",
            writer.lookup_filling.as_secs_f64(),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let metrics = Metrics::default();
        metrics.decision("allow", "github", "allowed", Duration::from_micros(40));
        metrics.decision("deny", "github", "out_of_scope", Duration::from_micros(30));
        metrics.decision("allow", "github", "allowed", Duration::from_micros(60));
        metrics.upstream("github", Duration::from_millis(3), false);
        let writer = WriterStats {
            batches: 3,
            operations: 7,
            gathering: Duration::from_micros(250),
            committing: Duration::from_millis(2),
            chain_lock_held: Duration::from_micros(1_250),
            lookup_fills: 1,
            lookup_filling: Duration::from_micros(1_500),
        };
        let text = metrics.render(&writer);
        assert!(
            text.contains(
                "remit_decisions_total{outcome=\"allow\",tool=\"github\",reason=\"allowed\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "remit_decisions_total{outcome=\"deny\",tool=\"github\",reason=\"out_of_scope\"} 1\n"
        ));
        assert!(
            text.contains("remit_decision_seconds_bucket{le=\"0.00005\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("remit_decision_seconds_count 3\n"));
        assert!(text.contains("remit_upstream_seconds_bucket{tool=\"github\",le=\"0.005\"} 1\n"));
        for line in [
            "remit_store_write_batches_total 3\n",
            "remit_store_write_operations_total 7\n",
            "remit_store_write_gathering_seconds_total 0.00025\n",
            "remit_store_write_committing_seconds_total 0.002\n",
            "remit_store_write_chain_lock_held_seconds_total 0.00125\n",
            "remit_store_lookup_fills_total 1\n",
            "remit_store_lookup_filling_seconds_total 0.0015\n",
            "# TYPE remit_store_write_batches_total counter\n",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }
}
