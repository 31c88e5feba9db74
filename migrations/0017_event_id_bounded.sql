-- An event id is the event's AMQP `message_id` too, which holds at most 255 bytes: an id that
-- would be longer (long user ids, node_exec_ids or keys) is `{routing_key}:%sha256:{hex}`, the
-- SHA-256 of the id it would have been (its UTF-8 bytes), deterministic as before. No user
-- part starts with a bare `%` (`credit.event_user` encodes it), so no other id takes that
-- form. Kept in step with `events::bounded_id`.
--
-- The id of a `balance.changed` event, the one kind SQL writes (the sweep) and checks (the
-- audit). Written so that PostgreSQL inlines it into the statement rather than call it per
-- row (about 2 µs a call): not STRICT, arguments that are columns or parameters, and STABLE,
-- as `convert_to` is. Lengths are counted in UTF-8, as the Rust side counts them, whatever
-- the database's encoding.
CREATE FUNCTION credit.balance_changed_id(user_id text, transaction_key text) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN octet_length(convert_to(credit.event_user(user_id) || transaction_key, 'UTF8'))
                           <= 255 - length('balance.changed::')
                      THEN 'balance.changed:' || credit.event_user(user_id) || ':' || transaction_key
                      ELSE 'balance.changed:%sha256:' || encode(sha256(convert_to(
                               'balance.changed:' || credit.event_user(user_id) || ':' || transaction_key,
                               'UTF8')), 'hex')
                 END $$;
