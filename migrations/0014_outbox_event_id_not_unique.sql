-- An event id is derived from its fact (balance.changed: the user and the ledger row's key),
-- and the ledger's own keys already make each fact once. The id's unique constraint only
-- added a way to fail: an id of the form before migration 0013 (user `a%3Ab`, key K) reads
-- exactly as the newer form of another user's (user `a:b`, key K) while it stays in the
-- outbox, which refused that user's every ledger write and stalled the month's sweep. Ids are
-- still indexed for lookups.
ALTER TABLE credit.outbox DROP CONSTRAINT outbox_event_id_key;
CREATE INDEX outbox_event_id ON credit.outbox (event_id);
