//! Nothing secret reaches a `Debug` print of a node's state: not the store URL's password, not
//! the quarantine webhook's token, not a task token the node has seen.

use control::Settings;
use model::{ActionClass, Secret};

use crate::harness::Harness;

const WEBHOOK_TOKEN: &str = "whk-t0ken-4f2a9c";
const STORE_PASSWORD: &str = "st0re-pa55-81d3";

fn webhook() -> Secret<String> {
    Secret::new(format!(
        "https://hooks.example.org/remit?token={WEBHOOK_TOKEN}"
    ))
}

#[test]
fn settings_print_the_store_url_without_its_password_and_no_webhook() {
    let mut settings = Settings::local(format!(
        "postgres://remit:{STORE_PASSWORD}@db.example.org:5432/remit"
    ));
    settings.containment.webhook = Some(webhook());
    let printed = format!("{settings:?}");
    assert!(!printed.contains(STORE_PASSWORD), "{printed}");
    assert!(!printed.contains(WEBHOOK_TOKEN), "{printed}");
    assert!(!printed.contains("hooks.example.org"), "{printed}");
    // The database is still named, for whoever reads a log.
    assert!(
        printed.contains("postgres://remit:[redacted]@db.example.org:5432/remit"),
        "{printed}"
    );
}

#[tokio::test]
async fn the_authority_prints_no_secret() {
    // On PostgreSQL (when the tests have one), with a password in the store URL.
    let store = store::testing::PasswordStore::create(STORE_PASSWORD)
        .await
        .unwrap();
    let adjust = |settings: &mut Settings| settings.containment.webhook = Some(webhook());
    let h = match store.url() {
        Some(url) => {
            Harness::with_store_configured(url, tempfile::tempdir().unwrap(), adjust).await
        }
        None => Harness::configured(adjust).await,
    };
    // A task token the node has verified and cached.
    let agent = h.agent("printed", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    let verdict = h
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert!(verdict.is_allow(), "{}", verdict.code);

    let printed = format!("{:?}", h.authority);
    assert!(printed.starts_with("Authority"), "{printed}");
    assert!(
        !printed.contains(WEBHOOK_TOKEN),
        "the webhook's token: {printed}"
    );
    assert!(
        !printed.contains(grant.token.expose().as_str()),
        "a task token: {printed}"
    );
    store.check_hidden(&printed);
    drop(h);
    store.drop_schema().await.unwrap();
}
