-- An outbox row may carry a run of events with the same routing key: `events` of them, held
-- in `run` as a JSON array of the event objects in publication order (`payload` is then
-- NULL). The relay publishes each element as its own message (message_id = the element's
-- event_id); the row's event_id is the first element's.
--
-- Every event used to be a row of its own: a heap tuple, two index entries and ~550 bytes of
-- WAL each, a third of the refill sweep's database work and a quarter of a decision batch's
-- write statement. The writers now put consecutive events of one routing key in one row, up
-- to a thousand; the events go out the same.
--
-- A run is not stored in `payload` so that a relay of an earlier version, still running
-- during a rolling upgrade, cannot publish it as one message: it reads `payload` only, fails
-- on the NULL and stops at the row (its session ends, and with it its lead), which an
-- upgraded relay then publishes.
--
-- Adding columns rewrites nothing, nor does dropping NOT NULL. The CHECK is NOT VALID so that
-- the upgrade does not scan the outbox: every existing row is one event (an object in
-- `payload`, which the writers have always produced), and new rows are checked. json_typeof
-- reads only the first token.
ALTER TABLE credit.outbox
    ADD COLUMN events integer NOT NULL DEFAULT 1,
    ADD COLUMN run json,
    ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE credit.outbox
    ADD CONSTRAINT outbox_events_check CHECK (
        CASE WHEN events = 1
             THEN run IS NULL AND payload IS NOT NULL AND json_typeof(payload) = 'object'
             ELSE events > 1 AND payload IS NULL AND run IS NOT NULL AND json_typeof(run) = 'array'
        END) NOT VALID;
