-- The credit ledger. Invariants live here as constraints; `credit-worker audit` checks the
-- cross-row ones (Σ amount = balance = last running_balance, gap-free seq).
CREATE SCHEMA IF NOT EXISTS credit;

CREATE TYPE credit.transaction_type AS ENUM ('TOP_UP', 'USAGE', 'GRANT', 'REFUND');

-- One row per user: the materialised balance and the per-user counters that must change under
-- the same row lock as the balance.
CREATE TABLE credit.balances (
    user_id      text        PRIMARY KEY CHECK (octet_length(user_id) BETWEEN 1 AND 255),
    balance      bigint      NOT NULL DEFAULT 0 CHECK (balance >= 0),
    last_seq     bigint      NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    -- first day of the latest month whose refill was evaluated (granted or not)
    refill_month date        CHECK (refill_month IS NULL OR extract(day FROM refill_month) = 1),
    -- node executions counted for the execution fee on fee_day (UTC)
    fee_day      date,
    fee_count    bigint      NOT NULL DEFAULT 0 CHECK (fee_count >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50); -- room on each page, so balance updates are HOT (no index writes)

-- Immutable ledger rows (a trigger below refuses UPDATE and DELETE).
CREATE TABLE credit.transactions (
    user_id         text                    NOT NULL REFERENCES credit.balances (user_id),
    seq             bigint                  NOT NULL CHECK (seq >= 1),
    transaction_key text                    NOT NULL CHECK (octet_length(transaction_key) BETWEEN 1 AND 512),
    type            credit.transaction_type NOT NULL,
    amount          bigint                  NOT NULL,
    running_balance bigint                  NOT NULL CHECK (running_balance >= 0),
    metadata        jsonb                   NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz             NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, seq),
    UNIQUE (user_id, transaction_key),
    CHECK (CASE type WHEN 'USAGE' THEN amount < 0
                     WHEN 'REFUND' THEN amount < 0
                     ELSE amount > 0 END)
);

CREATE FUNCTION credit.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit.transactions is append-only (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER transactions_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON credit.transactions
    FOR EACH STATEMENT EXECUTE FUNCTION credit.refuse_change();

-- Exactly one decision per node execution.
CREATE TABLE credit.decisions (
    node_exec_id    text        PRIMARY KEY CHECK (octet_length(node_exec_id) BETWEEN 1 AND 255),
    user_id         text        NOT NULL,
    block_id        text        NOT NULL,
    graph_exec_id   text        NOT NULL,
    outcome         text        NOT NULL CHECK (outcome IN ('charged', 'free', 'rejected')),
    -- block cost (without the execution fee)
    cost            bigint      NOT NULL CHECK (cost >= 0),
    -- execution fee posted with this execution (0 when none was due)
    fee             bigint      NOT NULL DEFAULT 0 CHECK (fee >= 0),
    transaction_key text,
    fee_key         text,
    decided_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((outcome = 'charged') = (transaction_key IS NOT NULL)),
    CHECK (outcome <> 'charged' OR cost > 0),
    CHECK (outcome <> 'free' OR cost = 0),
    CHECK ((fee > 0) = (fee_key IS NOT NULL)),
    CHECK (outcome <> 'rejected' OR fee = 0)
);

-- Transactional outbox: written in the ledger transaction, published by the relay.
CREATE TABLE credit.outbox (
    id           bigserial   PRIMARY KEY,
    event_id     text        NOT NULL UNIQUE,
    routing_key  text        NOT NULL CHECK (routing_key IN ('balance.changed', 'charge.rejected', 'balance.low')),
    -- json, not jsonb: stored and published as the exact text written, with no conversion
    payload      json        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON credit.outbox (id) WHERE published_at IS NULL;
