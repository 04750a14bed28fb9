//! Signed checkpoints of the audit chain, for auditors to keep outside remit's store. The
//! chain shows an edit, deletion, insertion or reordering inside the log; it cannot show that
//! its newest events were cut off, nor that someone able to write the store recomputed every
//! hash after an edit. A checkpoint of an earlier head, held elsewhere, shows both: the log
//! must still reach its sequence number, with the same hash there.

use credentials::CheckpointClaims;
use model::Role;
use serde::{Deserialize, Serialize};
use store::AuditFilter;

use crate::authority::{Authority, VerifyReport};
use crate::error::{Error, Result};
use crate::operators::Operator;

/// A signed statement of the audit chain's head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Checkpoint {
    /// The compact JWS (ES256, `typ: remit-checkpoint+jwt`) to keep; it verifies with remit's
    /// signing keys.
    pub checkpoint: String,
    /// Sequence number of the attested event (0 for an empty log).
    pub seq: u64,
    /// Its hash, hex.
    pub hash: String,
    /// The signing key.
    pub kid: String,
    /// When it was signed, Unix seconds.
    pub iat: i64,
}

impl Authority {
    /// Signs the chain's current head with the current signing key.
    pub async fn audit_checkpoint(&self, actor: &Operator) -> Result<Checkpoint> {
        actor.require(&[Role::Auditor])?;
        let newest = AuditFilter {
            limit: 1,
            newest: true,
            ..AuditFilter::default()
        };
        let head = self.store.query_events(&newest).await?;
        let (seq, hash) = head
            .first()
            .map_or((0, audit::GENESIS), |event| (event.seq, event.hash));
        let claims = CheckpointClaims {
            iss: self.settings.issuer().to_string(),
            seq,
            hash: audit::to_hex(&hash),
            iat: self.now(),
        };
        let (kid, checkpoint) = self.keys.sign_checkpoint(&claims)?;
        Ok(Checkpoint {
            checkpoint,
            seq,
            hash: claims.hash,
            kid,
            iat: claims.iat,
        })
    }

    /// Walks the chain as [`Authority::verify_audit`] does, then holds it against a checkpoint
    /// signed by this remit: the log must reach the checkpoint's sequence number with the same
    /// hash there. A checkpoint that does not verify (forged, altered, another remit's) is a
    /// client error, not a verdict on the log.
    pub async fn verify_audit_against(
        &self,
        actor: &Operator,
        checkpoint: &str,
    ) -> Result<VerifyReport> {
        actor.require(&[Role::Auditor])?;
        // Every key remit ever signed with, retired ones included: a checkpoint outlives the
        // publication of the key that signed it.
        let keys: Vec<_> = self
            .store
            .signing_keys(i64::MIN)
            .await?
            .into_iter()
            .map(|record| record.public_jwk)
            .collect();
        let claims = credentials::verify_checkpoint(checkpoint, &keys, self.settings.issuer())
            .map_err(|error| Error::bad_request("invalid_checkpoint", error.to_string()))?;
        let mut report = self.verify_audit(actor).await?;
        report.checkpoint_seq = Some(claims.seq);
        if !report.ok || claims.seq == 0 {
            // A break inside the log is reported first; the empty log's checkpoint holds
            // against any log.
            return Ok(report);
        }
        let attested = self.store.events_after(claims.seq - 1, 1).await?;
        match attested.first() {
            Some(event) if event.seq == claims.seq => {
                if audit::to_hex(&event.hash) != claims.hash {
                    report.ok = false;
                    report.first_bad_seq = Some(claims.seq);
                    report.reason = Some(format!(
                        "the hash of event {} differs from the one remit signed in the checkpoint: \
                         the log up to that event was rewritten",
                        claims.seq
                    ));
                }
            }
            _ => {
                let last = report.checked;
                report.ok = false;
                report.first_bad_seq = Some(last + 1);
                report.reason = Some(format!(
                    "the log ends at event {last}, but remit signed a checkpoint of event {}: \
                     events {} to {} were deleted",
                    claims.seq,
                    last + 1,
                    claims.seq
                ));
            }
        }
        Ok(report)
    }
}
