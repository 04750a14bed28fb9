-- The lookups are filled beside the chain's writers rather than under their lock, and the mark
-- keeps the hash of the event it stands at: lookups that no longer match the log (restored
-- from another backup than the log, say) are noticed and refilled. Keep in step with the
-- lookup file's schema in ../../src/sqlite.rs.

ALTER TABLE audit_lookup_mark ADD COLUMN through_hash BYTEA;
UPDATE audit_lookup_mark SET through_hash = COALESCE(
    (SELECT hash FROM audit_events WHERE seq = through_seq),
    '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
ALTER TABLE audit_lookup_mark ALTER COLUMN through_hash SET NOT NULL;
