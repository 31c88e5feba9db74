-- The ledger's identity. One database serves one `amqp.namespace`: its outbox holds every
-- event of its ledger, and whichever worker leads the relay publishes them to its own
-- namespace's `credit.events`, so a second namespace's workers on this database would take
-- the first's events. The namespace is NULL until the first `run` binds it; `migrate
-- --rebind-namespace` moves it. The id marks the namespace on the broker as this ledger's
-- (exchange `credit.ledger`), so a second database on one namespace, which would bill part of
-- its traffic a second time, is refused as well.
CREATE TABLE credit.ledger_identity (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    ledger_id uuid NOT NULL DEFAULT gen_random_uuid(),
    namespace text CHECK (octet_length(namespace) <= 255),
    bound_at timestamptz,
    CHECK ((namespace IS NULL) = (bound_at IS NULL))
);
INSERT INTO credit.ledger_identity DEFAULT VALUES;
