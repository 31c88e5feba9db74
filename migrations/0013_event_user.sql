-- The user part of a `balance.changed` event id: `%` and `:` percent-encoded, so the id
-- `balance.changed:{user}:{transaction_key}` names one (user, key) pair even when both hold
-- colons (user `a` with key `x:y` and user `a:x` with key `y` gave the same id). An id of a
-- user without either character is unchanged. Kept in step with `events::event_user`.
CREATE FUNCTION credit.event_user(user_id text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT replace(replace(user_id, '%', '%25'), ':', '%3A') $$;
