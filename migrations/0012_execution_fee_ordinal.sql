-- The execution fees charged on `fee_day`, so that the next fee's key carries its ordinal of
-- the day even when `execution_fee.every` changed during the day (its key was the execution
-- count divided by `every`, which then repeats an ordinal already used and collides).
-- NULL on rows written before: their fees followed the `every` in force, so the count
-- divided by it is what they charged.
ALTER TABLE credit.balances
    ADD COLUMN fee_n int8 CHECK (fee_n >= 0);
