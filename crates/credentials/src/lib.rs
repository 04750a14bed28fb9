//! Credentials: remit's signing keys and bundle, agents' keys, task tokens (SPIFFE JWT-SVID
//! shaped, key-bound) and DPoP proofs with their replay cache. Pure: no IO, no clock; `now`
//! is always an argument. Every signature goes through aws-lc-rs.

mod jws;
mod keys;
mod proof;
mod replay;
mod token;

pub use jws::MAX_COMPACT_LEN;
pub use keys::{AgentKey, AgentKeyPair, JWT_SVID_USE, KeyError, SigningKey, jwks_bundle};
pub use proof::{MAX_JTI_LEN, PROOF_TYP, ProofCheck, ProofError, ProofVerifier, VerifiedProof};
pub use replay::{Admission, ReplayCache};
pub use token::{Actor, Confirmation, TaskClaims, TokenError, TokenVerifier, mint_task_token};

#[cfg(test)]
mod tests;
