-- Timings: plain SQL (baseline_*.sql) against the extension's functions on
-- the same data, in the same session. psql variables: from, to (30 days).
\set ON_ERROR_STOP on
SET client_min_messages = notice;
SET max_parallel_workers_per_gather = 2;
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.timings (what text, impl text, rep int, ms float8, rows bigint);

-- Runs `q` (a query), counting its rows on the server, `reps` times.
CREATE OR REPLACE PROCEDURE bench.time_it(what text, impl text, q text, reps int) LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; n bigint;
BEGIN
  FOR i IN 1..reps LOOP
    t0 := clock_timestamp();
    EXECUTE 'SELECT count(*) FROM (' || q || ') x' INTO n;
    INSERT INTO bench.timings VALUES (what, impl, i, extract(epoch FROM clock_timestamp() - t0) * 1000, n);
    COMMIT;
  END LOOP;
END $$;
