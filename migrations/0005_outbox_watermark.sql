-- The outbox relay publishes from a watermark on the outbox's id instead of marking every row
-- it published: one row update per published batch instead of one per event (each of which
-- was a new row version with index entries of its own).
--
-- For a watermark to be safe, a row must never become visible with an id below one the relay
-- already passed. Ids come from the sequence, drawn when a row is inserted; the trigger below
-- makes every inserting transaction take one transaction-level lock first, before any id of
-- the statement is drawn, and hold it until it commits or rolls back. So the transactions
-- that write events draw their ids one after the other, in the order they commit: once a row
-- is visible, every row with a smaller id is visible too or was rolled back.

CREATE FUNCTION credit.outbox_ids_in_commit_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- ("cred", "outb"): the two-key space, apart from the sweep's one-key lock.
    PERFORM pg_advisory_xact_lock(1668441444, 1869968482);
    RETURN NULL;
END $$;

-- A statement trigger fires before the statement draws its rows' default ids.
CREATE TRIGGER outbox_ids_in_commit_order
    BEFORE INSERT ON credit.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION credit.outbox_ids_in_commit_order();

-- Every event with id <= published_through was published (at least once). One row; relays
-- take turns by locking it, so a user's events go out in order whichever replica publishes.
CREATE TABLE credit.outbox_relay (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    published_through bigint  NOT NULL CHECK (published_through >= 0),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Events not yet marked published stay ahead of the watermark (published ones above the
-- first unpublished one are published again: at least once, consumers dedupe by event_id).
INSERT INTO credit.outbox_relay (published_through)
SELECT coalesce((SELECT min(id) - 1 FROM credit.outbox WHERE published_at IS NULL),
                (SELECT max(id) FROM credit.outbox),
                0);

-- Publication is the watermark now: the per-row mark and its index go.
DROP INDEX credit.outbox_unpublished;
ALTER TABLE credit.outbox DROP COLUMN published_at;
