-- Auto top-up requests (docs/contract.md §5): per user a threshold and an amount, and the
-- request state, changed under the same row lock as the balance.
ALTER TABLE credit.balances
    ADD COLUMN auto_threshold    bigint CHECK (auto_threshold > 0),
    ADD COLUMN auto_amount       bigint CHECK (auto_amount > 0),
    -- requests made so far: the next one is AUTO-TOP-UP-{user}-{auto_requests + 1}
    ADD COLUMN auto_requests     bigint NOT NULL DEFAULT 0 CHECK (auto_requests >= 0),
    -- when the outstanding request was made; null when none is outstanding
    ADD COLUMN auto_requested_at timestamptz,
    ADD CONSTRAINT balances_auto_top_up_check
        CHECK ((auto_threshold IS NULL) = (auto_amount IS NULL));

ALTER TABLE credit.outbox DROP CONSTRAINT outbox_routing_key_check;
ALTER TABLE credit.outbox ADD CONSTRAINT outbox_routing_key_check
    CHECK (routing_key IN ('balance.changed', 'charge.rejected', 'balance.low',
                           'charge.uncollected', 'top_up.requested'));
