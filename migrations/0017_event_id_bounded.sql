-- An event id is the event's AMQP `message_id` too, which holds at most 255 bytes: an id that
-- would be longer (long user ids, node_exec_ids or keys) is `{routing_key}:sha256:{hex}` of
-- the id it would have been, deterministic as before. Kept in step with `events::bounded_id`.
--
-- The id of a `balance.changed` event, the one kind SQL writes (the sweep) and checks (the
-- audit). Written so that PostgreSQL inlines it into the statement rather than call it per
-- row (about 2 µs a call): not STRICT, arguments that are columns or parameters, and STABLE,
-- as `convert_to` is.
CREATE FUNCTION credit.balance_changed_id(user_id text, transaction_key text) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN octet_length(credit.event_user(user_id)) + octet_length(transaction_key)
                           <= 255 - length('balance.changed::')
                      THEN 'balance.changed:' || credit.event_user(user_id) || ':' || transaction_key
                      ELSE 'balance.changed:sha256:' || encode(sha256(convert_to(
                               'balance.changed:' || credit.event_user(user_id) || ':' || transaction_key,
                               'UTF8')), 'hex')
                 END $$;
