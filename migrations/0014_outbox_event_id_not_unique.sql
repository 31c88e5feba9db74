-- no-transaction
-- An event id is derived from its fact (balance.changed: the user and the ledger row's key),
-- and the ledger's own keys already make each fact once. The id's unique constraint only
-- added a way to fail: an id of the form before migration 0013 (user `a%3Ab`, key K) reads
-- exactly as the newer form of another user's (user `a:b`, key K) while it stays in the
-- outbox, which refused that user's every ledger write and stalled the month's sweep.
-- Ids stay indexed for lookups: the index is built first, without blocking the outbox's
-- writers (outside a transaction, so that it can be built concurrently), and migration 0015
-- then drops the constraint, which only takes a moment.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_event_id ON credit.outbox (event_id);
