//! Why a policy directory, a policy set or a policy test file was refused.

use std::path::PathBuf;

/// Everything that can stop policies (or their tests) from loading. Decisions themselves
/// never fail: an evaluation problem is a denial, reported in the decision.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A schema or policy that does not parse, or a policy the schema rejects.
    #[error("{file}:{line}: {reason}")]
    Invalid {
        file: String,
        line: usize,
        reason: String,
    },

    /// The directory does not hold exactly one schema.
    #[error("{reason}")]
    Schema { reason: String },

    #[error(
        "{file}:{line}: duplicate policy id `{id}`, first used at {first}; hint: give each policy its own `@id(\"…\")`"
    )]
    DuplicateId {
        id: String,
        file: String,
        line: usize,
        first: String,
    },

    /// A policy test file that cannot be read as test cases.
    #[error("{file}: {}{reason}", case_prefix(.case))]
    BadTest {
        file: String,
        case: Option<String>,
        reason: String,
    },
}

fn case_prefix(case: &Option<String>) -> String {
    match case {
        Some(case) => format!("case `{case}`: "),
        None => String::new(),
    }
}
