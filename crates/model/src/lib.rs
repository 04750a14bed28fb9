//! The vocabulary every other crate speaks: names, scopes and their attenuation, decisions,
//! roles, states, the redacting `Secret` and `SecretUrl`. No IO, no clock: `now` is always an argument.

mod decision;
mod ids;
mod scope;
mod secret;

pub use decision::{Decision, DecisionReport};
pub use ids::{
    ActionClass, AgentName, AgentStatus, IdError, Owner, Role, SpiffeId, TaskId, TaskStatus,
    TrustDomain,
};
pub use scope::{Scope, ScopeError, ScopeSet, pattern_covers, pattern_matches};
pub use secret::{Secret, SecretUrl, redact_url};

/// Seconds since the Unix epoch. Every time in remit's core is one of these, passed in.
pub type UnixSeconds = i64;
