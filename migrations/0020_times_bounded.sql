-- Every date and time the worker reads back into its own types is one it wrote from its
-- clock. A value outside the years 1–9999, or ±infinity, which only a write by hand can store,
-- cannot be read into them: the read fails, so a decision for that user is dead-lettered as a
-- defect, and an outbox row's stops the relay. Refused here at the write instead. NOT VALID:
-- checked for every new or changed row, so the upgrade neither scans the tables nor fails on a
-- row written before.
ALTER TABLE credit.balances
    ADD CONSTRAINT balances_times_bounded CHECK (
            refill_month BETWEEN '0001-01-01' AND '9999-12-01'
        AND fee_day BETWEEN '0001-01-01' AND '9999-12-31'
        AND auto_requested_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00')
    NOT VALID;
ALTER TABLE credit.transactions
    ADD CONSTRAINT transactions_created_at_bounded CHECK (
        created_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00') NOT VALID;
ALTER TABLE credit.outbox
    ADD CONSTRAINT outbox_created_at_bounded CHECK (
        created_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00') NOT VALID;
