//! `call.outcome`: what became of a forwarded call, in one shape for HTTP and MCP tools, so that
//! an auditor reads both the same way. It is recorded once the answer is complete (or the
//! upstream failed), off the response path: the decision was already durable.

use std::sync::Arc;
use std::time::Duration;

use control::CallVerdict;

/// The parts of a call its outcome names, taken when the call is forwarded.
#[derive(Debug)]
pub(crate) struct CallOutcome {
    authority: Arc<control::Authority>,
    agent: Option<String>,
    task: Option<String>,
    tool: String,
    action: String,
    /// The sequence number of the call's decision.
    audit_seq: Option<u64>,
}

/// How the answer ended.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ending {
    /// The status the upstream answered with (or remit's, when it answered in its place).
    pub(crate) status: u16,
    /// Bytes of the answer's body sent to the agent.
    pub(crate) bytes: u64,
    /// The answer reached the agent whole.
    pub(crate) complete: bool,
    /// The upstream was reached (sent a response head).
    pub(crate) upstream_reached: bool,
    /// From forwarding to the end of the answer.
    pub(crate) took: Duration,
}

impl CallOutcome {
    pub(crate) fn new(
        authority: &Arc<control::Authority>,
        verdict: &CallVerdict,
        tool: &str,
        action: &str,
    ) -> CallOutcome {
        CallOutcome {
            authority: Arc::clone(authority),
            agent: verdict.agent.clone(),
            task: verdict.task.clone(),
            tool: tool.to_string(),
            action: action.to_string(),
            audit_seq: verdict.audit_seq,
        }
    }

    /// Appends the `call.outcome` event, batched with others a few milliseconds apart: an
    /// agent must not wait for the record of what it already received. The time is the
    /// authority's clock, in milliseconds; the actor is the agent, as for its decision.
    pub(crate) fn finish(self, ending: Ending) {
        let actor = self
            .agent
            .clone()
            .unwrap_or_else(|| "unauthenticated".to_string());
        let mut event =
            audit::EventBody::new(self.authority.now_ms(), audit::kinds::CALL_OUTCOME, actor)
                .detail(
                    // Keys in byte order: written as the canonical text, with no map in between.
                    audit::Detail::object()
                        .str("action", &self.action)
                        .opt_u64("audit_seq", self.audit_seq)
                        .u64("bytes", ending.bytes)
                        .bool("complete", ending.complete)
                        .u64(
                            "duration_ms",
                            u64::try_from(ending.took.as_millis()).unwrap_or(u64::MAX),
                        )
                        .u64("status", ending.status.into())
                        .str("tool", &self.tool)
                        .bool("upstream_reached", ending.upstream_reached)
                        .finish(),
                );
        if let Some(agent) = self.agent {
            event = event.agent(agent);
        }
        if let Some(task) = self.task {
            event = event.task(task);
        }
        self.authority.record_later(event);
    }
}
