-- Step-up approvals: a human's leave for one exact call, used at most once. Keep in step with
-- ../postgres/0002_approvals.sql.

CREATE TABLE approvals (
    id              TEXT PRIMARY KEY NOT NULL,
    task            TEXT NOT NULL REFERENCES tasks (id),
    agent           TEXT NOT NULL,
    owner           TEXT NOT NULL,
    tool            TEXT NOT NULL,
    action          TEXT NOT NULL,
    resource        TEXT NOT NULL,
    args_digest     TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'consumed', 'expired')),
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    decided_by      TEXT,
    decision_reason TEXT,
    decided_at      INTEGER
);
-- The call path looks approvals up by the exact call they are bound to.
CREATE INDEX approvals_call ON approvals (task, tool, action, resource, args_digest, status);
CREATE INDEX approvals_status ON approvals (status, created_at);
