//! The signing keys of task tokens: the current key signs, every key still published verifies.
//! Keys are generated on first start and kept in the store, so that every process and replica
//! signs and verifies with the same set.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use audit::{EventBody, kinds};
use credentials::{SigningKey, TaskClaims, TokenError, TokenVerifier};
use model::Secret;
use serde_json::{Value, json};
use store::{SigningKeyRecord, Store};

use crate::error::{Error, Result};
use crate::random;

#[derive(Debug)]
pub struct KeyRing {
    current: ArcSwap<SigningKey>,
    published: ArcSwap<Vec<Value>>,
    /// Bumped on every change of the published set (the bundle's `spiffe_sequence`).
    sequence: AtomicU64,
    verifier: TokenVerifier,
    /// When (milliseconds) a token naming a key this node did not know last made it re-read
    /// the keys: at most once per [`UNKNOWN_KID_RELOAD_MS`], so that tokens with made-up
    /// `kid`s cannot turn into a read of the store each.
    unknown_kid_reload_ms: AtomicI64,
}

/// Least time between two re-reads of the keys for tokens signed by an unknown key.
pub const UNKNOWN_KID_RELOAD_MS: i64 = 1_000;

fn new_kid() -> Result<String> {
    random::hex_id::<8>("k")
}

fn record_of(key: &SigningKey, now: i64) -> SigningKeyRecord {
    SigningKeyRecord {
        kid: key.kid().to_string(),
        pkcs8: Secret::new(key.pkcs8().expose().clone()),
        public_jwk: key.public_jwk(),
        created_at: now,
        retired_at: None,
        publish_until: None,
    }
}

impl KeyRing {
    /// Loads the published keys, generating the first key when the store has none.
    pub async fn load_or_create(
        store: &dyn Store,
        verifier: TokenVerifier,
        now: i64,
    ) -> Result<KeyRing> {
        let mut records = store.signing_keys(now).await?;
        if !records.iter().any(|r| r.retired_at.is_none()) {
            let key =
                SigningKey::generate(new_kid()?).map_err(|e| Error::internal(e.to_string()))?;
            let event = EventBody::new(now * 1000, kinds::KEY_CREATED, "remit")
                .detail(json!({ "kid": key.kid() }));
            match store.insert_signing_key(&record_of(&key, now), event).await {
                // Another process created the first key at the same moment: use theirs.
                Ok(_) | Err(store::StoreError::Conflict { .. }) => {}
                Err(error) => return Err(error.into()),
            }
            records = store.signing_keys(now).await?;
        }
        let (current, published) = Self::decode(&records)?;
        verifier
            .set_keys(&published)
            .map_err(|e| Error::internal(e.to_string()))?;
        Ok(KeyRing {
            current: ArcSwap::from_pointee(current),
            published: ArcSwap::from_pointee(published),
            sequence: AtomicU64::new(1),
            verifier,
            unknown_kid_reload_ms: AtomicI64::new(i64::MIN),
        })
    }

    fn decode(records: &[SigningKeyRecord]) -> Result<(SigningKey, Vec<Value>)> {
        let current = records
            .iter()
            .find(|r| r.retired_at.is_none())
            .ok_or_else(|| Error::internal("the store holds no current signing key"))?;
        let key =
            SigningKey::from_pkcs8(current.kid.clone(), current.pkcs8.expose()).map_err(|e| {
                Error::internal(format!(
                    "signing key `{}` cannot be loaded: {e}",
                    current.kid
                ))
            })?;
        let published = records.iter().map(|r| r.public_jwk.clone()).collect();
        Ok((key, published))
    }

    /// Re-reads the keys from the store (another process may have rotated them).
    pub async fn reload(&self, store: &dyn Store, now: i64) -> Result<()> {
        let records = store.signing_keys(now).await?;
        // The common case, every catch-up: nothing changed, and the private key is not parsed
        // again (which costs a scalar multiplication).
        let unchanged = records
            .iter()
            .find(|r| r.retired_at.is_none())
            .is_some_and(|r| r.kid == self.current.load().kid())
            && records
                .iter()
                .map(|r| &r.public_jwk)
                .eq(self.published.load().iter());
        if unchanged {
            return Ok(());
        }
        let (current, published) = Self::decode(&records)?;
        self.verifier
            .set_keys(&published)
            .map_err(|e| Error::internal(e.to_string()))?;
        self.current.store(Arc::new(current));
        self.published.store(Arc::new(published));
        self.sequence.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Verifies a task token; when it names a key this node does not know (another replica
    /// may have just rotated), re-reads the keys from the store first, at most once per
    /// [`UNKNOWN_KID_RELOAD_MS`] (`now_ms`), and verifies again. The rotating replica also
    /// announces the new key (`Store::revocation_signal`), so this is the fallback for a
    /// token that arrives before the announcement does.
    pub async fn verify_or_reload(
        &self,
        store: &dyn Store,
        token: &str,
        now: i64,
        now_ms: i64,
    ) -> std::result::Result<TaskClaims, TokenError> {
        match self.verifier.verify(token, now) {
            Err(TokenError::UnknownKid(kid)) => {
                let last = self.unknown_kid_reload_ms.load(Ordering::Acquire);
                let due = now_ms.saturating_sub(last) >= UNKNOWN_KID_RELOAD_MS
                    && self
                        .unknown_kid_reload_ms
                        .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                if !due {
                    return Err(TokenError::UnknownKid(kid));
                }
                if let Err(error) = self.reload(store, now).await {
                    tracing::warn!(
                        code = error.code,
                        "cannot re-read the signing keys: {error}"
                    );
                    return Err(TokenError::UnknownKid(kid));
                }
                self.verifier.verify(token, now)
            }
            other => other,
        }
    }

    /// Replaces the signing key. The old key stays published until every token it signed has
    /// expired: `publish_for_seconds` is the longest task lifetime plus the clock skew.
    pub async fn rotate(
        &self,
        store: &dyn Store,
        actor: &str,
        now: i64,
        publish_for_seconds: i64,
    ) -> Result<String> {
        let key = SigningKey::generate(new_kid()?).map_err(|e| Error::internal(e.to_string()))?;
        let old_kid = self.current.load().kid().to_string();
        let event = EventBody::new(now * 1000, kinds::KEY_ROTATED, actor).detail(json!({
            "kid": key.kid(),
            "previous_kid": old_kid,
            "previous_published_until": now + publish_for_seconds,
        }));
        store
            .rotate_signing_key(&record_of(&key, now), now, now + publish_for_seconds, event)
            .await?;
        self.reload(store, now).await?;
        Ok(key.kid().to_string())
    }

    pub fn sign(&self, claims: &TaskClaims) -> Result<Secret<String>> {
        credentials::mint_task_token(&self.current.load(), claims)
            .map_err(|e| Error::internal(e.to_string()))
    }

    /// Signs an audit checkpoint with the current key; returns the key's id and the JWS.
    pub fn sign_checkpoint(
        &self,
        claims: &credentials::CheckpointClaims,
    ) -> Result<(String, String)> {
        let key = self.current.load();
        let text = credentials::mint_checkpoint(&key, claims)
            .map_err(|e| Error::internal(e.to_string()))?;
        Ok((key.kid().to_string(), text))
    }

    pub fn current_kid(&self) -> String {
        self.current.load().kid().to_string()
    }

    pub fn verifier(&self) -> &TokenVerifier {
        &self.verifier
    }

    /// The SPIFFE bundle served at `/.well-known/jwks.json`.
    pub fn bundle(&self, refresh_hint_seconds: u64) -> Value {
        credentials::jwks_bundle(
            &self.published.load(),
            self.sequence.load(Ordering::SeqCst),
            refresh_hint_seconds,
        )
    }
}
