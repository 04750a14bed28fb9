-- Which audit events concern which agent and which task, for queries by either. They were
-- indexes on `audit_events`, rewritten at every commit of the call path (with many tasks in
-- flight, a leaf page per task per commit); these tables are filled from the log in batches by
-- the writer instead, up to `audit_lookup_mark.through_seq`, and queries read the short tail
-- after the mark from the log itself. Keep in step with ../postgres/0003_audit_lookups.sql.

CREATE TABLE audit_agent_events (
    agent TEXT NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (agent, seq)
) WITHOUT ROWID;

CREATE TABLE audit_task_events (
    task TEXT NOT NULL,
    seq  INTEGER NOT NULL,
    PRIMARY KEY (task, seq)
) WITHOUT ROWID;

-- One row: every event up to `through_seq` is in the two tables above.
CREATE TABLE audit_lookup_mark (
    id          INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    through_seq INTEGER NOT NULL
);

INSERT INTO audit_agent_events (agent, seq) SELECT agent, seq FROM audit_events WHERE agent IS NOT NULL;
INSERT INTO audit_task_events (task, seq) SELECT task, seq FROM audit_events WHERE task IS NOT NULL;
INSERT INTO audit_lookup_mark (id, through_seq) SELECT 1, COALESCE(MAX(seq), 0) FROM audit_events;

DROP INDEX audit_events_agent;
DROP INDEX audit_events_task;
