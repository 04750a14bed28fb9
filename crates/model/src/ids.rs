//! Names and states, each validated once where it enters the system.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "invalid trust domain `{0}`: use lowercase letters, digits, `.`, `-` and `_` (at most 255)"
    )]
    TrustDomain(String),
    #[error(
        "invalid agent name `{0}`: use 1 to 64 lowercase letters, digits, `.`, `-` and `_`, starting with a letter or digit"
    )]
    AgentName(String),
    #[error("invalid SPIFFE ID `{0}`: expected `spiffe://<trust-domain>/agent/<name>`")]
    SpiffeId(String),
    #[error(
        "invalid owner `{0}`: an owner is a non-empty accountable identity such as an email address (at most 256 characters, no spaces or control characters)"
    )]
    Owner(String),
    #[error("invalid task id `{0}`")]
    TaskId(String),
    #[error("unknown {kind} `{value}`: expected one of {expected}")]
    Unknown {
        kind: &'static str,
        value: String,
        expected: String,
    },
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                value.parse()
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
    };
}

/// The naming root of every SPIFFE ID remit issues, e.g. `example.org`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String))]
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);
string_newtype!(TrustDomain);

impl Default for TrustDomain {
    /// `remit.local`, the quick start's trust domain.
    fn default() -> Self {
        TrustDomain("remit.local".to_string())
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > 255 || !s.chars().all(is_name_char) {
            return Err(IdError::TrustDomain(s.to_string()));
        }
        Ok(TrustDomain(s.to_string()))
    }
}

/// A registered agent's short name, the last segment of its SPIFFE ID.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String))]
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentName(String);
string_newtype!(AgentName);

impl FromStr for AgentName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let starts_well = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !starts_well || s.len() > 64 || !s.chars().all(is_name_char) {
            return Err(IdError::AgentName(s.to_string()));
        }
        Ok(AgentName(s.to_string()))
    }
}

/// `spiffe://<trust-domain>/agent/<name>`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String))]
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId(String);
string_newtype!(SpiffeId);

impl SpiffeId {
    pub fn for_agent(trust_domain: &TrustDomain, agent: &AgentName) -> SpiffeId {
        SpiffeId(format!("spiffe://{trust_domain}/agent/{agent}"))
    }

    /// The trust domain and agent name this ID names.
    pub fn parts(&self) -> (TrustDomain, AgentName) {
        // Validated at construction, so both halves are well formed.
        let rest = &self.0["spiffe://".len()..];
        let (domain, name) = rest.split_once("/agent/").unwrap_or((rest, ""));
        (TrustDomain(domain.to_string()), AgentName(name.to_string()))
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::SpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (domain, name) = rest.split_once("/agent/").ok_or_else(bad)?;
        domain.parse::<TrustDomain>().map_err(|_| bad())?;
        name.parse::<AgentName>().map_err(|_| bad())?;
        Ok(SpiffeId(s.to_string()))
    }
}

/// The accountable human or team behind an agent, typically an email address.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String))]
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Owner(String);
string_newtype!(Owner);

impl FromStr for Owner {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(IdError::Owner(s.to_string()));
        }
        Ok(Owner(s.to_string()))
    }
}

/// A task's identifier: `task_` followed by 26 lowercase base-32 characters (128 random bits).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String))]
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);
string_newtype!(TaskId);

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

impl TaskId {
    /// Builds an id from 16 random bytes supplied by the caller (the core draws no randomness).
    pub fn from_random(bytes: [u8; 16]) -> TaskId {
        TaskId(format!("task_{}", base32(&bytes)))
    }
}

/// Lowercase RFC 4648 base 32 without padding: compact, case-insensitive-safe identifiers.
pub(crate) fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(BASE32[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(BASE32[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

impl FromStr for TaskId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = s
            .strip_prefix("task_")
            .is_some_and(|rest| rest.len() == 26 && rest.bytes().all(|b| BASE32.contains(&b)));
        if !ok {
            return Err(IdError::TaskId(s.to_string()));
        }
        Ok(TaskId(s.to_string()))
    }
}

macro_rules! string_enum {
    ($name:ident, $kind:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(IdError::Unknown {
                        kind: $kind,
                        value: s.to_string(),
                        expected: $name::ALL
                            .iter()
                            .map(|v| format!("`{}`", v.as_str()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                }
            }
        }
    };
}

string_enum!(AgentStatus, "agent status", {
    Active => "active",
    Quarantined => "quarantined",
    Disabled => "disabled",
});

string_enum!(TaskStatus, "task status", {
    Active => "active",
    Completed => "completed",
    Revoked => "revoked",
    Expired => "expired",
});

string_enum!(Role, "role", {
    Admin => "admin",
    Approver => "approver",
    Auditor => "auditor",
});

string_enum!(ActionClass, "action class", {
    Read => "read",
    Write => "write",
    Admin => "admin",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip() {
        let domain: TrustDomain = "example.org".parse().unwrap();
        let name: AgentName = "triage-bot".parse().unwrap();
        let id = SpiffeId::for_agent(&domain, &name);
        assert_eq!(id.as_str(), "spiffe://example.org/agent/triage-bot");
        assert_eq!(id.as_str().parse::<SpiffeId>().unwrap(), id);
        assert_eq!(id.parts(), (domain, name));
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "Upper", "-leading", "has space", "a/b", &"x".repeat(65)] {
            assert!(bad.parse::<AgentName>().is_err(), "{bad:?} was accepted");
        }
        for bad in [
            "spiffe://example.org/bot",
            "http://example.org/agent/x",
            "spiffe://Ex/agent/x",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} was accepted");
        }
        assert!("".parse::<Owner>().is_err());
        assert!("alice @example.org".parse::<Owner>().is_err());
        assert!("alice@example.org".parse::<Owner>().is_ok());
    }

    #[test]
    fn task_ids_are_base32() {
        let id = TaskId::from_random([0xff; 16]);
        assert_eq!(id.as_str().len(), 31);
        assert_eq!(id.as_str().parse::<TaskId>().unwrap(), id);
        assert!("task_short".parse::<TaskId>().is_err());
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
    }

    #[test]
    fn enums_parse_and_name_the_choices() {
        assert_eq!("approver".parse::<Role>().unwrap(), Role::Approver);
        let error = "root".parse::<Role>().unwrap_err().to_string();
        assert_eq!(
            error,
            "unknown role `root`: expected one of `admin`, `approver`, `auditor`"
        );
    }
}
