-- remit's schema for SQLite. Times are Unix seconds, except audit times (milliseconds);
-- JSON is TEXT; hashes are 32-byte BLOBs. Keep in step with ../postgres/0001_initial.sql.

CREATE TABLE agents (
    name       TEXT PRIMARY KEY NOT NULL,
    spiffe_id  TEXT NOT NULL UNIQUE,
    owner      TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('active', 'quarantined', 'disabled')),
    keys       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX agents_owner ON agents (owner);

CREATE TABLE operators (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at INTEGER NOT NULL,
    disabled   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY NOT NULL,
    pkcs8         BLOB NOT NULL,
    public_jwk    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    retired_at    INTEGER,
    publish_until INTEGER
);
-- At most one current (unretired) key.
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((retired_at IS NULL)) WHERE retired_at IS NULL;

CREATE TABLE tasks (
    id         TEXT PRIMARY KEY NOT NULL,
    agent      TEXT NOT NULL REFERENCES agents (name),
    owner      TEXT NOT NULL,
    intent     TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    obo        TEXT,
    parent     TEXT REFERENCES tasks (id),
    depth      INTEGER NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('active', 'completed', 'revoked', 'expired')),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    budget     INTEGER NOT NULL,
    calls_used INTEGER NOT NULL DEFAULT 0,
    token_jti  TEXT NOT NULL,
    jkt        TEXT NOT NULL
);
CREATE INDEX tasks_agent_status ON tasks (agent, status);
CREATE INDEX tasks_parent ON tasks (parent);

-- The revocation feed: replicas follow it by `seq`.
CREATE TABLE revocations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL CHECK (kind IN ('token', 'task', 'agent', 'owner')),
    target     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX revocations_target ON revocations (kind, target);

-- The audit chain. `seq` is assigned by the writer (never AUTOINCREMENT): it is part of the hash.
CREATE TABLE audit_events (
    seq       INTEGER PRIMARY KEY NOT NULL,
    time_ms   INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    agent     TEXT,
    task      TEXT,
    decision  TEXT,
    detail    TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);
CREATE INDEX audit_events_agent ON audit_events (agent, seq);
CREATE INDEX audit_events_task ON audit_events (task, seq);
CREATE INDEX audit_events_time ON audit_events (time_ms);
