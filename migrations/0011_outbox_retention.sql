-- Published events are deleted once older than `outbox.retention_s`, by the leading relay.
-- `pruned_before` is the horizon: events stamped before it may be gone, so the audit looks
-- for the events of ledger rows from then on only. Writers stamp an event with its ledger
-- row's time (created_at), so that the horizon means the same instant for both.
ALTER TABLE credit.outbox_relay
    ADD COLUMN pruned_before timestamptz NOT NULL DEFAULT '-infinity';
