-- A decision and a settlement are facts the ledger's rows stand on (the audit reads a debit
-- against its decision): like the ledger, they are only ever added to.
CREATE FUNCTION credit.refuse_change_of() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit.% is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER decisions_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON credit.decisions
    FOR EACH STATEMENT EXECUTE FUNCTION credit.refuse_change_of();

CREATE TRIGGER settlements_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON credit.settlements
    FOR EACH STATEMENT EXECUTE FUNCTION credit.refuse_change_of();
