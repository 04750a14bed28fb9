//! Integration tests of the control plane: the grant path and the call-path decision against a
//! real SQLite file (and PostgreSQL where a test needs a network store), and the HTTP API
//! in-process.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support fails loudly"
)]

mod api;
mod approvals;
mod budgets;
mod calls;
mod checkpoint;
mod containment;
mod delegation;
mod events;
mod failclosed;
mod harness;
mod openapi;
mod redaction;
mod replicas;
mod tasks;
mod timeline;
