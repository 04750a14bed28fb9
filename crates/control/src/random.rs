//! Randomness for identifiers and secrets, from aws-lc-rs's system generator.

use crate::error::{Error, Result};

pub fn bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    aws_lc_rs::rand::fill(&mut out)
        .map_err(|_| Error::internal("the system random generator failed"))?;
    Ok(out)
}

/// `prefix` followed by `N` random bytes in lowercase hexadecimal.
pub fn hex_id<const N: usize>(prefix: &str) -> Result<String> {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(prefix.len() + 2 * N);
    out.push_str(prefix);
    for byte in bytes::<N>()? {
        let _ = write!(out, "{byte:02x}");
    }
    Ok(out)
}
