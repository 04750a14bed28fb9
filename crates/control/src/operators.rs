//! Operators: the humans and CI that use the admin API. Operator tokens are random, shown
//! once and kept only as SHA-256 hashes; an agent's credentials never authenticate here.

use aws_lc_rs::digest;
use model::Role;
use serde::Serialize;

use crate::error::{Error, Result};

pub const TOKEN_PREFIX: &str = "remit_op_";
const MAX_TOKEN_LEN: usize = 256;

/// An authenticated operator (or the local command line, which acts as an admin because it
/// already holds the store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Operator {
    pub id: String,
    pub name: String,
    pub role: Role,
}

impl Operator {
    /// The command line on a machine that can open the store directly.
    pub fn local(user: &str) -> Operator {
        Operator {
            id: "local".to_string(),
            name: format!("cli:{user}"),
            role: Role::Admin,
        }
    }

    /// remit itself, acting on its own rules (containment).
    pub fn system() -> Operator {
        Operator {
            id: "remit".to_string(),
            name: "remit".to_string(),
            role: Role::Admin,
        }
    }

    /// How the operator appears as an audit event's actor.
    pub fn actor(&self) -> String {
        if self.id == "remit" {
            return "remit".to_string();
        }
        format!("operator:{}", self.id)
    }

    /// Admins may do everything; others only what their role names.
    pub fn require(&self, allowed: &[Role]) -> Result<()> {
        if self.role == Role::Admin || allowed.contains(&self.role) {
            return Ok(());
        }
        let names: Vec<_> = allowed.iter().map(|r| format!("`{r}`")).collect();
        Err(Error::forbidden(
            "operator_role",
            format!(
                "operator role `{}` may not do this; it needs `admin` or {}",
                self.role,
                names.join(", ")
            ),
        ))
    }
}

/// SHA-256 of an operator token, the only form in which it is stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    hash
}

/// Checks the token's shape before it costs a store lookup.
pub fn check_token_shape(token: &str) -> Result<()> {
    if token.len() > MAX_TOKEN_LEN || !token.starts_with(TOKEN_PREFIX) {
        return Err(Error::unauthorized(
            "operator_token_invalid",
            "the admin API needs an operator token (`Authorization: Bearer remit_op_…`); hint: create one with `remit operator create --role admin`",
        ));
    }
    Ok(())
}
