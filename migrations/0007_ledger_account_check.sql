-- Every ledger row belongs to an account: checked once per statement instead of once per row.
--
-- The foreign key from credit.transactions to credit.balances ran one look-up (with a row
-- lock) per inserted ledger row; for the refill sweep, which writes a row for nearly every
-- user, that was about a quarter of the database's work. The same guarantee now holds as:
--   * every statement that inserts ledger rows is followed by one set-based check that each of
--     its rows has a balance row (a constraint violation otherwise, rolling the statement
--     back), and
--   * a balance row never goes away or changes its user_id, so a row that had its account
--     keeps it (the foreign key's other half, which also needed its row locks).
ALTER TABLE credit.transactions DROP CONSTRAINT transactions_user_id_fkey;

CREATE FUNCTION credit.ledger_rows_have_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    orphan text;
BEGIN
    SELECT n.user_id INTO orphan FROM new_rows n
     WHERE NOT EXISTS (SELECT 1 FROM credit.balances b WHERE b.user_id = n.user_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'credit.transactions: user_id % has no row in credit.balances', orphan
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER transactions_have_accounts
    AFTER INSERT ON credit.transactions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION credit.ledger_rows_have_accounts();

CREATE FUNCTION credit.accounts_stay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit.balances: an account is never removed or renamed (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER balances_stay
    BEFORE DELETE OR TRUNCATE ON credit.balances
    FOR EACH STATEMENT EXECUTE FUNCTION credit.accounts_stay();

-- Fires only for statements that name user_id in their SET list, which no writer does.
CREATE TRIGGER balances_keep_user_id
    BEFORE UPDATE OF user_id ON credit.balances
    FOR EACH STATEMENT EXECUTE FUNCTION credit.accounts_stay();
