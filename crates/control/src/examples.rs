//! The example Cedar schema and policies shipped in `policies/`, built into the binary so that
//! `remit serve` and `remit demo` work from any directory. `--policies DIR` replaces them.

use policy::PolicyEngine;

use crate::error::{Error, Result};

/// The schema file's name and text.
pub const EXAMPLE_SCHEMA: (&str, &str) = (
    "remit.cedarschema",
    include_str!("../../../policies/remit.cedarschema"),
);

/// Every shipped `.cedar` file, by name.
pub const EXAMPLE_POLICIES: &[(&str, &str)] = &[
    ("calls.cedar", include_str!("../../../policies/calls.cedar")),
    ("tasks.cedar", include_str!("../../../policies/tasks.cedar")),
];

/// A policy test file for the example policies (`policies/tests/`), by name: what
/// `remit policy init` writes under `DIR/tests/` to start from.
pub const EXAMPLE_TESTS: (&str, &str) = (
    "examples.toml",
    include_str!("../../../policies/tests/examples.toml"),
);

/// The example policies, validated against the example schema.
pub fn engine() -> Result<PolicyEngine> {
    PolicyEngine::from_sources(EXAMPLE_SCHEMA.1, EXAMPLE_POLICIES)
        .map_err(|e| Error::internal(format!("the built-in example policies do not load: {e}")))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn built_in_policies_are_the_shipped_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".cedar"))
            .collect();
        shipped.sort();
        let embedded: Vec<_> = EXAMPLE_POLICIES
            .iter()
            .map(|(name, _)| name.to_string())
            .collect();
        assert_eq!(
            shipped, embedded,
            "embed every file of policies/ in examples.rs"
        );
        let engine = engine().unwrap();
        let from_dir = PolicyEngine::load_dir(&dir).unwrap();
        assert_eq!(engine.policy_count(), from_dir.policy_count());
    }
}
