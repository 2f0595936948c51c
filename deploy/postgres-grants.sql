-- What ratebox_worker may do, table by table: run as a superuser (TEMPORARY on the database
-- needs its owner) after bin/ratebox-migrate, and again after every migration adding a table:
--     psql -v ON_ERROR_STOP=1 -d validator -f deploy/postgres-grants.sql
SET search_path = ratebox;
GRANT USAGE ON SCHEMA ratebox TO ratebox_worker;

-- Verdicts: COPY/INSERT by workers and the sweeper, SELECT ... FOR UPDATE and UPDATE by
-- ratebox-replay and by the bridge's legacy rows; never DELETE.
GRANT SELECT, INSERT, UPDATE ON raw_items TO ratebox_worker;
GRANT USAGE ON SEQUENCE raw_items_id_seq TO ratebox_worker;

-- Statistics, upserted in each batch transaction; read by the monitor.
GRANT SELECT, INSERT, UPDATE ON stream_consumer_stats, stream_processing_metrics,
    stream_error_metrics TO ratebox_worker;

-- ratebox-bridge's mark (read, then moved forward).
GRANT SELECT, INSERT, UPDATE ON bridge_progress TO ratebox_worker;

-- The monitor's views.
GRANT SELECT ON v_stream_status, v_recent_activity, v_top_errors TO ratebox_worker;

-- A batch that meets existing rows is staged in a temporary table (ON COMMIT DELETE ROWS).
DO $$ BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO ratebox_worker', current_database());
END $$;
