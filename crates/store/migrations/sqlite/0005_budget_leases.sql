-- Budgets and containment counted across nodes. A task's `calls_used` becomes the count of its
-- allowed calls in the audit log up to `calls_seq`, so that any node (after a crash, or a
-- replica seeing the task for the first time) adds the calls recorded since and knows the
-- exact count. Counts written before were added late by each node and may be short, so they
-- are dropped here: the next count rebuilds them from the log. Keep in step with
-- ../postgres/0005_budget_leases.sql.

ALTER TABLE tasks ADD COLUMN calls_seq INTEGER NOT NULL DEFAULT 0;
UPDATE tasks SET calls_used = 0;

-- Denied calls that containment's `max_denials` rule counts, added by every node at each
-- catch-up, so that the rule sees the sum of what an agent did wherever it did it.
CREATE TABLE containment_denials (
    agent   TEXT NOT NULL,
    time_ms INTEGER NOT NULL
);
CREATE INDEX containment_denials_agent ON containment_denials (agent, time_ms);
CREATE INDEX containment_denials_time ON containment_denials (time_ms);
