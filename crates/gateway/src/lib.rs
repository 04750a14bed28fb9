//! The call path's edge: the gateway every tool call passes. It maps each HTTP or MCP request
//! to an action on a declared tool, asks `control::Authority::authorize` (token, proof,
//! revocation, scope, policy, a durable audit record), and only then forwards the call with
//! the upstream credential injected.

pub mod catalog;
