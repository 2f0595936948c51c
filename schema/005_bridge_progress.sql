-- ratebox-bridge's mark: every pending legacy row at or below last_id has been published to
-- the stream. Created here, not by the bridge, so that the bridge runs with the workers' role.
CREATE TABLE IF NOT EXISTS bridge_progress (
    stream_name  text PRIMARY KEY,
    last_id      bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
