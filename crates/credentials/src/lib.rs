//! Credentials: remit's signing keys and bundle, agents' keys, task tokens (SPIFFE JWT-SVID
//! shaped, key-bound), DPoP proofs with their replay cache, and signed audit checkpoints. Pure: no IO, no clock; `now`
//! is always an argument. Every signature goes through aws-lc-rs.

mod checkpoint;
mod jws;
mod keys;
mod proof;
mod replay;
mod token;

pub use checkpoint::{
    CHECKPOINT_TYP, CheckpointClaims, CheckpointError, mint_checkpoint, verify_checkpoint,
};
pub use jws::MAX_COMPACT_LEN;
pub use keys::{AgentKey, AgentKeyPair, JWT_SVID_USE, KeyError, SigningKey, jwks_bundle};
pub use proof::{MAX_JTI_LEN, PROOF_TYP, ProofCheck, ProofError, ProofVerifier, VerifiedProof};
pub use replay::{Admission, ReplayCache};
pub use token::{Actor, Confirmation, TaskClaims, TokenError, TokenVerifier, mint_task_token};

#[cfg(test)]
mod tests;
