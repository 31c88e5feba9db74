-- A refund or a lost dispute of a purchase (the `refund` command) takes back credits the user
-- may have spent already: its REFUND row may leave a debt, as AutoGPT's `deduct_credits`
-- (fail_insufficient=False) does. The new check only adds a case to the old, so every row
-- already meets it: NOT VALID, so the upgrade does not read the ledger under the table's lock.
ALTER TABLE credit.transactions DROP CONSTRAINT transactions_running_balance_check;
ALTER TABLE credit.transactions ADD CONSTRAINT transactions_running_balance_check
    CHECK (running_balance >= 0 OR amount > 0 OR type = 'REFUND'
           OR transaction_key LIKE 'SETTLE-%' OR metadata @> '{"phase": "completed"}') NOT VALID;
