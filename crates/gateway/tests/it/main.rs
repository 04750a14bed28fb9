//! Integration tests of the gateway: remit serving on loopback in front of real upstream
//! servers started by the tests, called over real HTTP.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support fails loudly"
)]

mod harness;
mod http;
mod mcp;
mod mcp_client;
mod redaction;
