//! Nothing secret reaches a `Debug` print of the gateway (and the node's state it holds): not
//! an upstream credential in any spelling the scrubbers look for, not the store URL's password,
//! not the quarantine webhook's token.

use model::Secret;

use crate::harness::Remit;

const UPSTREAM_SECRET: &str = "sk/up+stream=9f3e";
const WEBHOOK_TOKEN: &str = "whk-t0ken-77b1";
const STORE_PASSWORD: &str = "st0re-pa55-0c4e";

#[tokio::test]
async fn the_gateway_prints_no_secret() {
    let tools = r#"
[[tools]]
name = "vault"
kind = "mcp"
upstream = "http://127.0.0.1:9/mcp"
auth = { bearer = "env:VAULT_TOKEN" }

[[tools]]
name = "tracker"
kind = "http"
upstream = "http://127.0.0.1:9/api"
auth = { header = "X-Api-Key", value = "env:TRACKER_KEY" }
"#;
    let tracker_key = format!("{UPSTREAM_SECRET}-tracker");
    let env = [
        ("VAULT_TOKEN", UPSTREAM_SECRET),
        ("TRACKER_KEY", tracker_key.as_str()),
    ];
    // On PostgreSQL (when the tests have one), with a password in the store URL.
    let store = store::testing::PasswordStore::create(STORE_PASSWORD)
        .await
        .unwrap();
    let remit = Remit::start_configured(tools, &env, store.url(), |settings| {
        settings.containment.webhook = Some(Secret::new(format!(
            "https://hooks.example.org/remit?token={WEBHOOK_TOKEN}"
        )));
    })
    .await;

    let printed = format!("{:?}", remit.gateway);
    assert!(printed.starts_with("Gateway"), "{printed}");
    // The credentials as configured, and the spellings the scrubbers derive from them.
    for spelling in [
        UPSTREAM_SECRET,
        "sk%2Fup%2Bstream%3D9f3e",
        tracker_key.as_str(),
    ] {
        assert!(!printed.contains(spelling), "`{spelling}`: {printed}");
    }
    assert!(
        !printed.contains(WEBHOOK_TOKEN),
        "the webhook's token: {printed}"
    );
    store.check_hidden(&printed);
    drop(remit);
    store.drop_schema().await.unwrap();
}
