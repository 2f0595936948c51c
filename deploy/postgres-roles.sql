-- RateBox's PostgreSQL roles: run once as a superuser, BEFORE the first migration:
--     psql -v ON_ERROR_STOP=1 -d validator -f deploy/postgres-roles.sql
-- then migrate as ratebox_migrate (bin/ratebox-migrate with its DSN), then run
-- deploy/postgres-grants.sql (again after every migration that adds a table).
--
-- ratebox_migrate owns the schema and every table in it: it alone runs DDL.
-- ratebox_worker is what the supervisor, workers, sweeper, monitor and bridge log in as,
-- with postgres.migrate_on_start: false: it reads and writes rows, never changes the schema.
-- Replace the passwords (or use certificates: see the README's TLS section).
CREATE ROLE ratebox_migrate LOGIN PASSWORD 'change-me-migrate';
CREATE ROLE ratebox_worker LOGIN PASSWORD 'change-me-worker';

CREATE SCHEMA ratebox AUTHORIZATION ratebox_migrate;
ALTER ROLE ratebox_migrate SET search_path = ratebox;
ALTER ROLE ratebox_worker SET search_path = ratebox;
-- Nobody else may create objects in the schema (PostgreSQL 15 already denies it in public).
REVOKE CREATE ON SCHEMA ratebox FROM PUBLIC;
