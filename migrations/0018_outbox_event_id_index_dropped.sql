-- no-transaction
-- Nothing reads the outbox by event id: the relay reads by id, the audit compares whole sets,
-- and a run's row carries only its first event's id. The index migration 0014 kept therefore
-- only cost every outbox insert an index entry. Dropped without blocking the outbox's writers;
-- an index left invalid by a cancelled build of 0014 goes the same way.
DROP INDEX CONCURRENTLY IF EXISTS credit.outbox_event_id;
