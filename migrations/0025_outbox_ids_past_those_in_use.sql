-- The outbox's sequence is moved past the ids in use (the outbox's rows and the relays'
-- watermark) by every statement that writes events, before it draws its ids. A sequence
-- behind them (a restore, or a move by logical replication, that did not carry its value; a
-- hand edit) would otherwise fail inserts on the key where the ids are taken, or, where older
-- rows were pruned, give new events ids at or below the watermark: events the relays take as
-- published and never send. Under 0005's lock, which every inserting statement takes first,
-- so nothing draws an id meanwhile and the sequence only moves forward.
CREATE OR REPLACE FUNCTION credit.outbox_ids_in_commit_order() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    drawn bigint;
    in_use bigint;
BEGIN
    -- ("cred", "outb"): the two-key space, apart from the sweep's one-key lock.
    PERFORM pg_advisory_xact_lock(1668441444, 1869968482);
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
      INTO drawn FROM credit.outbox_id_seq;
    SELECT greatest((SELECT coalesce(max(id), 0) FROM credit.outbox),
                    (SELECT published_through FROM credit.outbox_relay))
      INTO in_use;
    IF in_use > drawn THEN
        PERFORM setval('credit.outbox_id_seq', in_use);
    END IF;
    RETURN NULL;
END $$;
