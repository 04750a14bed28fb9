//! Serializes a secret's value on purpose, for the one field where it must reach its holder
//! (a freshly minted token in its grant). `Secret` itself has no `Serialize`, so that no
//! secret reaches JSON by accident.

use model::Secret;
use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(secret: &Secret<String>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose())
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Secret<String>, D::Error> {
    String::deserialize(deserializer).map(Secret::new)
}
