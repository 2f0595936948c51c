-- 003: raw_items.processed_at gets a BRIN index instead of a B-tree.
--
-- Rows arrive in processed_at order, so a BRIN index (a few pages, however large the table)
-- serves the time-range queries an operator runs on raw_items -- retention deletes, "what
-- came in last hour" -- while costing almost nothing per insert. The B-tree cost every
-- batch write 2-3 us of PostgreSQL CPU per row, about a tenth of the whole write
-- (bench/pg_paths.py).
--
-- Applied in one transaction: DROP INDEX takes raw_items' exclusive lock until the BRIN
-- index is built, which reads the table once (about a second per few million rows).
DROP INDEX IF EXISTS raw_items_processed_at_idx;
CREATE INDEX raw_items_processed_at_brin ON raw_items USING brin (processed_at);
