//! The control plane: the grant path (agents, tasks, keys, revocation, audit queries), the
//! admin API over HTTP, and the call-path decision the gateway asks for every tool call.

pub mod api;
pub mod approvals;
mod authority;
mod budget;
mod check;
mod checkpoint;
pub mod clock;
mod compact;
pub mod containment;
pub mod delegation;
mod error;
mod examples;
mod keyring;
mod operators;
mod random;
mod revocation;
mod secret_serde;
pub mod settings;
pub mod timeline;

pub use authority::{Authority, Grant, TaskRequest, VerifyReport, load_policies};
pub use check::{CallAttempt, CallLimiter, CallVerdict, ProofMode, VerifiedToken};
pub use checkpoint::Checkpoint;
pub use error::{Error, ErrorKind, Result};
pub use examples::{EXAMPLE_POLICIES, EXAMPLE_SCHEMA, EXAMPLE_TESTS, engine as example_policies};
pub use keyring::KeyRing;
pub use operators::Operator;
pub use settings::Settings;
