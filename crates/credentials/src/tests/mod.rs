//! Tests of the crate through its public API: the acceptance table of tokens and proofs, keys,
//! the replay cache and interoperability with an independent JOSE implementation.

mod acceptance;
mod checkpoint;
mod interop;
mod keys;
mod replay;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn sha256_b64(bytes: &[u8]) -> String {
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}
