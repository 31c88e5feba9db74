-- The history-by-run index holds only the rows that belong to a run: grants, top-ups and every
-- other row without a graph_exec_id are never looked up by it (the by-run history asks for a
-- given id), so they no longer pay an index entry. That is one write less per user for the
-- monthly refill sweep, whose GRANT rows have no run. Plain DROP/CREATE, as in 0003: it holds
-- ledger writes back while it builds, once, at the upgrade.
DROP INDEX credit.transactions_graph_exec_idx;
CREATE INDEX transactions_graph_exec_idx
    ON credit.transactions (user_id, (metadata->>'graph_exec_id'), seq)
    WHERE (metadata->>'graph_exec_id') IS NOT NULL;
