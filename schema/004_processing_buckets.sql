-- 004: a processing-time histogram per consumer, counted in the batch transaction.
--
-- One count per bucket of ratebox/buckets.py (BOUNDS_MS, by position, the last one for
-- "slower than every bound"), added element by element with each batch's counts, so
-- /metrics serves ratebox_processing_seconds as true cumulative buckets without reading
-- raw_items. Existing rows start empty: an empty array counts as zeros.
ALTER TABLE stream_consumer_stats
    ADD COLUMN processing_buckets bigint[] NOT NULL DEFAULT '{}';
