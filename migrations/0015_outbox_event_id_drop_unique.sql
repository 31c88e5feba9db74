-- The second step of migration 0014: with the plain index in place, the unique constraint
-- (and its index) goes.
ALTER TABLE credit.outbox DROP CONSTRAINT outbox_event_id_key;
