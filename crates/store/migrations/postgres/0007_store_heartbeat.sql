-- One row that the readiness probe rewrites when nothing else was written lately, so that a
-- node reports ready only while a write reaches the store. Nothing reads it back, and it
-- records no audit event: it changes nothing remit decides with.
CREATE TABLE store_heartbeat (
    id          INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    written_ms  BIGINT NOT NULL
);

INSERT INTO store_heartbeat (id, written_ms) VALUES (1, 0);
