//! What policy answers, and why.

use serde::{Deserialize, Serialize};

/// The outcome of one authorization question.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    /// Denied only by policies a human may lift for this exact call (`@step_up`).
    ApprovalRequired,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::ApprovalRequired => "approval_required",
        }
    }
}

/// A decision with the policies that determined it and reasons a human can read.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionReport {
    pub decision: Decision,
    /// Ids of the determining policies (the satisfied forbids of a denial, the satisfied
    /// permits of an allow). Empty for a denial that no permit matched.
    pub policies: Vec<String>,
    pub reasons: Vec<String>,
}

impl DecisionReport {
    pub fn allow(policies: Vec<String>, reasons: Vec<String>) -> Self {
        DecisionReport {
            decision: Decision::Allow,
            policies,
            reasons,
        }
    }

    pub fn deny(reason: impl Into<String>) -> Self {
        DecisionReport {
            decision: Decision::Deny,
            policies: Vec::new(),
            reasons: vec![reason.into()],
        }
    }

    pub fn is_allow(&self) -> bool {
        self.decision == Decision::Allow
    }
}
