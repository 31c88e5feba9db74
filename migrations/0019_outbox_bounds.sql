-- An event id is its AMQP message_id, which holds at most 255 bytes (migration 0017,
-- `events::bounded_id`), and a row holds at most 1,000 events (`runs::EVENTS_PER_ROW`), which
-- the relay's paging counts on. Checked for every new row; NOT VALID, so that the upgrade
-- neither scans the outbox nor fails on a row written before ids were bounded (0017), which
-- the retention removes in time.
ALTER TABLE credit.outbox
    ADD CONSTRAINT outbox_event_id_bounded CHECK (octet_length(event_id) <= 255) NOT VALID,
    ADD CONSTRAINT outbox_events_bounded CHECK (events <= 1000) NOT VALID;
