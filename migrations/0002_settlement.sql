-- Post-flight settlement (docs/contract.md §3): once per node execution, the difference
-- between what its decision charged and what the run really cost, recorded in the same
-- transaction as its ledger row.

-- A balance may be negative now, but only through a post-flight charge. The balance row
-- follows the ledger (audit: balance = the last running balance), so the rule lives on the
-- ledger rows: a debit that leaves a negative running balance must be a settlement row or a
-- row of a decision made from a completion; credits may leave a debt smaller.
ALTER TABLE credit.balances DROP CONSTRAINT balances_balance_check;
ALTER TABLE credit.transactions DROP CONSTRAINT transactions_running_balance_check;
ALTER TABLE credit.transactions ADD CONSTRAINT transactions_running_balance_check
    CHECK (running_balance >= 0 OR amount > 0
           OR transaction_key LIKE 'SETTLE-%' OR metadata @> '{"phase": "completed"}');

-- USAGE rows are debits, except settlement rows that give credit back.
ALTER TABLE credit.transactions DROP CONSTRAINT transactions_check;
ALTER TABLE credit.transactions ADD CONSTRAINT transactions_amount_sign_check
    CHECK (CASE type WHEN 'USAGE' THEN amount < 0 OR (amount > 0 AND transaction_key LIKE 'SETTLE-%')
                     WHEN 'REFUND' THEN amount < 0
                     ELSE amount > 0 END);

CREATE TABLE credit.settlements (
    node_exec_id    text        PRIMARY KEY CHECK (octet_length(node_exec_id) BETWEEN 1 AND 255),
    user_id         text        NOT NULL,
    block_id        text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('COMPLETED', 'FAILED', 'TERMINATED')),
    -- block cost the decision charged, the post-flight price, and their difference
    pre             bigint      NOT NULL CHECK (pre >= 0),
    post            bigint      NOT NULL CHECK (post >= 0),
    delta           bigint      NOT NULL,
    -- the part of an extra charge not taken (settlement.allow_debt = false)
    uncollected     bigint      NOT NULL DEFAULT 0 CHECK (uncollected >= 0 AND uncollected <= greatest(delta, 0)),
    -- the SETTLE-{node_exec_id} row; none when nothing moved
    transaction_key text,
    settled_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (delta = post - pre),
    CHECK ((transaction_key IS NULL) = (delta - uncollected = 0))
);

ALTER TABLE credit.outbox DROP CONSTRAINT outbox_routing_key_check;
ALTER TABLE credit.outbox ADD CONSTRAINT outbox_routing_key_check
    CHECK (routing_key IN ('balance.changed', 'charge.rejected', 'balance.low', 'charge.uncollected'));
