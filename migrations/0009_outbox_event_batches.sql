-- An outbox row may carry a run of events with the same routing key: `events` of them, the
-- payload then being a JSON array of the event objects in publication order. The relay
-- publishes each element as its own message (message_id = the element's event_id); the row's
-- event_id is the first element's.
--
-- Every event used to be a row of its own: a heap tuple, two index entries and ~550 bytes of
-- WAL each, a third of the refill sweep's database work and a quarter of a decision batch's
-- write statement. The writers now put consecutive events of one routing key in one row, up
-- to a thousand; the events go out the same.
--
-- Adding a column with a constant default rewrites nothing. The CHECK is NOT VALID so that
-- the upgrade does not scan the outbox: every existing row is one event (an object, which the
-- writers have always produced), and new rows are checked. json_typeof reads only the
-- payload's first token.
ALTER TABLE credit.outbox ADD COLUMN events integer NOT NULL DEFAULT 1;
ALTER TABLE credit.outbox
    ADD CONSTRAINT outbox_events_check
        CHECK (events >= 1
               AND json_typeof(payload) = CASE WHEN events = 1 THEN 'object' ELSE 'array' END)
        NOT VALID;
