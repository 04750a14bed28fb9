//! Opening: which URLs are accepted, and that an unreachable database is a prompt
//! `Unavailable` (the call path's fail-closed signal), never a hang or a panic.

use std::time::{Duration, Instant};

use store::{OpenOptions, StoreError};

#[tokio::test]
async fn refuses_urls_it_cannot_honour() {
    for url in [
        "",
        "remit.db",
        "mysql://remit@localhost/remit",
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite:",
        "sqlite://",
        "sqlite://remit.db?mode=memory",
        "sqlite://remit.db?cache=shared",
    ] {
        let error = store::open(url).await.unwrap_err();
        assert!(matches!(error, StoreError::BadUrl(_)), "`{url}`: {error:?}");
    }
}

#[tokio::test]
async fn never_repeats_a_password() {
    let error = store::open("mysql://remit:hunter2@localhost/remit")
        .await
        .unwrap_err();
    assert!(!error.to_string().contains("hunter2"), "{error}");
    let options = OpenOptions {
        connect_timeout: Duration::from_secs(3),
        ..OpenOptions::default()
    };
    let error = store::open_with("postgres://remit:hunter2@127.0.0.1:1/remit", &options)
        .await
        .unwrap_err();
    assert!(!error.to_string().contains("hunter2"), "{error}");
}

#[tokio::test]
async fn unreachable_postgres_is_unavailable_quickly() {
    let options = OpenOptions {
        connect_timeout: Duration::from_secs(3),
        ..OpenOptions::default()
    };
    let started = Instant::now();
    let error = store::open_with("postgres://postgres@127.0.0.1:1/test", &options)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn sqlite_in_a_missing_directory_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        dir.path().join("no/such/dir/remit.db").display()
    );
    let error = store::open(&url).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
}

#[tokio::test]
async fn sqlite_accepts_both_url_forms() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        format!("sqlite://{}", dir.path().join("a.db").display()),
        format!("sqlite:{}", dir.path().join("b.db").display()),
        format!("sqlite://{}?mode=rwc", dir.path().join("c.db").display()),
    ] {
        let store = store::open(&url).await.unwrap();
        assert_eq!(store.kind(), "sqlite");
        store.ping().await.unwrap();
    }
    assert!(dir.path().join("b.db").exists());
}
