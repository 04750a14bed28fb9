-- The agent and task lookups move to a file of their own, `<file>-lookups`, which the store
-- creates and fills from the log (see src/sqlite.rs): in this file every fill held the write
-- lock that each call's decision commit waits for. They are derived data, rebuilt from the log
-- in the new file, so they are dropped here rather than copied.

DROP TABLE audit_agent_events;
DROP TABLE audit_task_events;
DROP TABLE audit_lookup_mark;
