-- Keyset paging of a user's history (the `history` command): the primary key (user_id, seq)
-- serves unfiltered pages; these serve the filtered ones, walked backwards from `before_seq`,
-- so a page costs its own rows however long the user's ledger is.
-- Plain CREATE INDEX (migrations run in a transaction, which CONCURRENTLY cannot): it holds
-- ledger writes back while it builds, once, at the upgrade.
CREATE INDEX transactions_graph_exec_idx
    ON credit.transactions (user_id, (metadata->>'graph_exec_id'), seq);
CREATE INDEX transactions_type_idx
    ON credit.transactions (user_id, type, seq);
