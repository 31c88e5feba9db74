-- A completion that overtakes its start with `settlement.allow_debt = false` may find a balance
-- that cannot hold the execution fee due: the fee is not taken and is reported, with what the
-- price left behind, in `charge.uncollected`. Kept with its settlement, so that the database
-- accounts for every credit such an event reports (before, only the event said so).
-- A new column with a constant default is not written into existing rows; the check is
-- NOT VALID for the same reason as migration 0020's (every row before it holds 0).
ALTER TABLE credit.settlements ADD COLUMN fee_uncollected bigint NOT NULL DEFAULT 0;
ALTER TABLE credit.settlements
    ADD CONSTRAINT settlements_fee_uncollected_check CHECK (fee_uncollected >= 0) NOT VALID;
