-- An event id is the event's AMQP `message_id` too, which holds at most 255 bytes: an id that
-- would be longer (long user ids, node_exec_ids or keys) is `{routing_key}:sha256:{hex}` of
-- the id it would have been, deterministic as before. Kept in step with `events::bounded_id`.
CREATE FUNCTION credit.event_id(routing_key text, id text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT CASE WHEN octet_length(id) <= 255 THEN id
                      ELSE routing_key || ':sha256:' || encode(sha256(convert_to(id, 'UTF8')), 'hex')
                 END $$;
