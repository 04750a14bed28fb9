//! The committed OpenAPI document (`docs/openapi.json`) is the one the code generates, so a
//! change to the API cannot land without its document. Regenerate with
//! `REMIT_UPDATE_OPENAPI=1 cargo test -p control --test it openapi`.

use std::path::Path;

#[test]
fn the_committed_document_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let generated = serde_json::to_string_pretty(&control::api::openapi()).unwrap() + "\n";
    if std::env::var("REMIT_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date; regenerate it with `REMIT_UPDATE_OPENAPI=1 cargo test -p control --test it openapi`"
    );
}
