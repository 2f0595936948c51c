-- 001: the database contract of SPEC §6.
--
-- Applied by ratebox-migrate in one transaction together with its schema_migrations record,
-- so this file has no BEGIN/COMMIT. Names are unqualified: they land in the first schema of
-- the connection's search_path. Never edit this file once applied: add 002_*.sql instead.

-- Exactly one row per stream message: the workers upsert on (stream_name, stream_id), so a
-- redelivered entry updates its row instead of adding one.
CREATE TABLE raw_items (
    id              bigserial PRIMARY KEY,
    data            jsonb NOT NULL,
    source          text,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'done', 'error')),
    error_code      integer,
    error_message   text,
    errors          jsonb NOT NULL DEFAULT '[]'::jsonb
                    CHECK (jsonb_typeof(errors) = 'array'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    stream_name     text NOT NULL,
    stream_id       text NOT NULL,
    consumer_name   text,
    delivery_count  integer,
    batch_id        text,
    producer        text,
    produced_at     timestamptz,
    processing_ms   double precision,
    CONSTRAINT raw_items_stream_entry_key UNIQUE (stream_name, stream_id)
);

CREATE INDEX raw_items_processed_at_idx ON raw_items (processed_at);

-- Small: only the failures, for "recent errors" lookups by time and code.
CREATE INDEX raw_items_recent_errors_idx ON raw_items (processed_at, error_code)
    WHERE status = 'error';

-- One row per consumer, updated in each batch transaction.
CREATE TABLE stream_consumer_stats (
    stream_name          text NOT NULL,
    consumer_name        text NOT NULL,
    group_name           text,
    processed            bigint NOT NULL DEFAULT 0,
    errors               bigint NOT NULL DEFAULT 0,
    dead_lettered        bigint NOT NULL DEFAULT 0,
    total_processing_ms  double precision NOT NULL DEFAULT 0,
    avg_processing_ms    double precision
                         GENERATED ALWAYS AS (total_processing_ms / NULLIF(processed, 0)) STORED,
    last_active          timestamptz,
    hostname             text,
    pid                  integer,
    started_at           timestamptz,
    PRIMARY KEY (stream_name, consumer_name)
);

-- Per minute (date_trunc('minute', ...)) and consumer. processed counts every verdict
-- written; errors and dead_lettered are subsets of it.
CREATE TABLE stream_processing_metrics (
    minute               timestamptz NOT NULL,
    stream_name          text NOT NULL,
    consumer_name        text NOT NULL,
    processed            bigint NOT NULL DEFAULT 0,
    errors               bigint NOT NULL DEFAULT 0,
    dead_lettered        bigint NOT NULL DEFAULT 0,
    total_processing_ms  double precision NOT NULL DEFAULT 0,
    avg_processing_ms    double precision
                         GENERATED ALWAYS AS (total_processing_ms / NULLIF(processed, 0)) STORED,
    max_processing_ms    double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, stream_name, consumer_name)
);

-- Per minute, code and field, maintained in the batch transaction, so that "top errors
-- (1 hour)" reads at most 60 small groups instead of scanning raw_items. field is '' for
-- pipeline errors (900 and above) that concern no field.
CREATE TABLE stream_error_metrics (
    minute          timestamptz NOT NULL,
    stream_name     text NOT NULL,
    error_code      integer NOT NULL,
    field           text NOT NULL DEFAULT '',
    count           bigint NOT NULL DEFAULT 0,
    sample_message  text,
    PRIMARY KEY (minute, stream_name, error_code, field)
);

CREATE VIEW v_stream_status AS
SELECT status, count(*) AS count
FROM raw_items
GROUP BY status;

-- From the per-minute metrics, not raw_items, so it stays cheap on millions of rows. Only an
-- overall average is recorded, so both statuses show the same average duration.
CREATE VIEW v_recent_activity AS
SELECT s.status, s.count, s.avg_processing_ms
FROM (
    SELECT sum(processed)::bigint AS processed,
           sum(errors)::bigint AS errors,
           sum(total_processing_ms) / NULLIF(sum(processed), 0) AS avg_processing_ms
    FROM stream_processing_metrics
    WHERE minute >= now() - interval '1 hour'
) AS m
CROSS JOIN LATERAL (
    VALUES ('done', m.processed - m.errors, m.avg_processing_ms),
           ('error', m.errors, m.avg_processing_ms)
) AS s (status, count, avg_processing_ms)
WHERE s.count > 0;

CREATE VIEW v_top_errors AS
SELECT error_code,
       field,
       sum(count)::bigint AS count,
       (array_agg(sample_message ORDER BY minute DESC)
            FILTER (WHERE sample_message IS NOT NULL))[1] AS sample_message
FROM stream_error_metrics
WHERE minute >= now() - interval '1 hour'
GROUP BY error_code, field
ORDER BY count DESC, error_code, field;
