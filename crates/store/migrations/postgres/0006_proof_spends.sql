-- DPoP proofs spent by a forwarded call or a grant, so that a proof is accepted once by the
-- whole cluster and not once per replica: each row is inserted in the transaction that
-- records the call's decision or the grant, and a second insert of the same proof fails.
-- `proof` is the hexadecimal SHA-256 of the key's thumbprint, a dot and the proof's `jti`,
-- computed by the caller. `iat` leads the key so that inserts land at the right edge of the index (the
-- proofs of one batch are a few seconds apart) and the sweep of proofs too old to be accepted
-- anyway deletes from its left edge. Keep in step with ../sqlite/0006_proof_spends.sql.

CREATE TABLE proof_spends (
    iat   BIGINT NOT NULL,
    proof TEXT NOT NULL,
    PRIMARY KEY (iat, proof)
);
