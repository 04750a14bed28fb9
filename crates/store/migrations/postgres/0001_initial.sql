-- remit's schema for PostgreSQL. Times are Unix seconds, except audit times (milliseconds);
-- JSON is TEXT (hashed and compared as written, so never re-encoded as JSONB); hashes are
-- 32-byte BYTEA. Every integer is BIGINT so both backends decode the same Rust types.
-- Keep in step with ../sqlite/0001_initial.sql.

CREATE TABLE agents (
    name       TEXT PRIMARY KEY,
    spiffe_id  TEXT NOT NULL UNIQUE,
    owner      TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('active', 'quarantined', 'disabled')),
    keys       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX agents_owner ON agents (owner);

CREATE TABLE operators (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    token_hash BYTEA NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at BIGINT NOT NULL,
    disabled   BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY,
    pkcs8         BYTEA NOT NULL,
    public_jwk    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    retired_at    BIGINT,
    publish_until BIGINT
);
-- At most one current (unretired) key.
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((retired_at IS NULL)) WHERE retired_at IS NULL;

CREATE TABLE tasks (
    id         TEXT PRIMARY KEY,
    agent      TEXT NOT NULL REFERENCES agents (name),
    owner      TEXT NOT NULL,
    intent     TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    obo        TEXT,
    parent     TEXT REFERENCES tasks (id),
    depth      BIGINT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('active', 'completed', 'revoked', 'expired')),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    budget     BIGINT NOT NULL,
    calls_used BIGINT NOT NULL DEFAULT 0,
    token_jti  TEXT NOT NULL,
    jkt        TEXT NOT NULL
);
CREATE INDEX tasks_agent_status ON tasks (agent, status);
CREATE INDEX tasks_parent ON tasks (parent);

-- The revocation feed: replicas follow it by `seq`. Writers hold the chain lock, so `seq`
-- values become visible in order and a follower reading `seq > after` misses none.
CREATE TABLE revocations (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('token', 'task', 'agent', 'owner')),
    target     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX revocations_target ON revocations (kind, target);

-- The audit chain. `seq` is assigned by the writer (never a sequence): it is part of the hash.
CREATE TABLE audit_events (
    seq       BIGINT PRIMARY KEY,
    time_ms   BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    agent     TEXT,
    task      TEXT,
    decision  TEXT,
    detail    TEXT NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash      BYTEA NOT NULL
);
CREATE INDEX audit_events_agent ON audit_events (agent, seq);
CREATE INDEX audit_events_task ON audit_events (task, seq);
CREATE INDEX audit_events_time ON audit_events (time_ms);
