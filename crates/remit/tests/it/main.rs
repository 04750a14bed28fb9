//! End-to-end tests: the real `remit` binary, spawned as a user would run it, against real
//! SQLite files, talking HTTP on loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support fails loudly"
)]

mod cli;
mod demo;
mod listener;
mod openapi;
mod replicas;
mod support;
