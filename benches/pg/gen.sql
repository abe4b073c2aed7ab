-- Synthetic Liminal facts for the analytics benchmark (plain SQL, generate_series).
-- psql variables: tests (tests per run), runs (number of runs).
-- Shape (deterministic: pseudo-random draws are hashes of (run, test)):
--   runs one an hour on two alternating hosts, the newest an hour ago; each
--   run lasts 25 minutes whatever the test count; input digest changes every
--   10 runs. Run r % 50 = 7: status error (infrastructure by status);
--   r % 100 = 33: 80 % of its tests fail (infrastructure by share).
--   Tests: i % 97 = 0 skipped; i % 200 = 1 broken in the newer half of the
--   runs; i % 100 in (2,3,4) flaky (fail 3 %); i % 1000 in 500..504 fail
--   together, per group of 1000 tests, in 2 % of the runs; the rest pass.
--   One signal per result, 50 ms before it: 90 % log/stdout without
--   attributes, 10 % events 'ev.N' (200 names) with {"worker": "wK"};
--   a correlated group's failure is preceded by a rare 'disk.pressure'.
\set ON_ERROR_STOP on
SET client_min_messages = warning;
SET synchronous_commit = off;
CREATE TEMP TABLE bench_params AS
SELECT :tests::int AS tests, :runs::int AS runs,
       date_trunc('hour', now()) AS t0,
       (1500.0 / :tests) AS spacing_s;   -- seconds between tests of a run

-- Uniform in [0,1) from (run, test, salt).
CREATE OR REPLACE FUNCTION pg_temp.u(r int, i int, salt int) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ((hashint8((r::bigint << 32) + (i::bigint << 4) + salt)::bigint & 2147483647) % 1000000) / 1000000.0;

INSERT INTO liminal.run_versions (run_id, plan_name, status, input_digest, host, started_at, finished_at, valid_from, source)
SELECT 'R' || lpad(r::text, 25, '0'), 'bench',
       CASE WHEN r % 50 = 7 THEN 'error' ELSE 'failed' END,
       'blake3:' || (r / 10), 'host-' || (r % 2),
       p.t0 - (p.runs - r + 1) * interval '1 hour',
       p.t0 - (p.runs - r + 1) * interval '1 hour' + interval '1510 s',
       p.t0 - (p.runs - r + 1) * interval '1 hour', 'bench'
FROM bench_params p, generate_series(1, p.runs) r;

INSERT INTO liminal.test_result_versions (id, run_id, test_name, status, started_at, duration_ms, valid_from, source)
SELECT 'T' || lpad((r::bigint * p.tests + i)::text, 25, '0'),
       'R' || lpad(r::text, 25, '0'),
       'suite' || lpad((i / 100)::text, 3, '0') || '::test_' || lpad(i::text, 5, '0'),
       st.status, ts, 100, ts, 'bench'
FROM bench_params p, generate_series(1, p.runs) r, generate_series(0, p.tests - 1) i,
LATERAL (SELECT p.t0 - (p.runs - r + 1) * interval '1 hour' + (i * p.spacing_s) * interval '1 s' AS ts) t,
LATERAL (SELECT CASE
    WHEN i % 97 = 0 THEN 'skipped'
    WHEN r % 50 = 7 THEN CASE WHEN pg_temp.u(r, i, 1) < 0.9 THEN 'failed' ELSE 'passed' END
    WHEN r % 100 = 33 THEN CASE WHEN pg_temp.u(r, i, 1) < 0.8 THEN 'failed' ELSE 'passed' END
    WHEN i % 200 = 1 AND r > p.runs / 2 THEN 'failed'
    WHEN i % 100 IN (2, 3, 4) AND pg_temp.u(r, i, 2) < 0.03 THEN 'error'
    WHEN i % 1000 BETWEEN 500 AND 504 AND pg_temp.u(r, i / 1000, 3) < 0.02 THEN 'failed'
    ELSE 'passed' END AS status) st;

INSERT INTO liminal.signal_versions (id, run_id, test_result_id, kind, name, at, attrs, valid_from, source)
SELECT 'S' || lpad((r::bigint * p.tests + i)::text, 25, '0'),
       'R' || lpad(r::text, 25, '0'),
       'T' || lpad((r::bigint * p.tests + i)::text, 25, '0'),
       CASE WHEN g.rare OR g.x < 0.1 THEN 'event' ELSE 'log' END,
       CASE WHEN g.rare THEN 'disk.pressure' WHEN g.x < 0.1 THEN 'ev.' || (i % 200) ELSE 'stdout' END,
       ts,
       CASE WHEN g.rare OR g.x < 0.1 THEN jsonb_build_object('worker', 'w' || (i % 8)) ELSE '{}'::jsonb END,
       ts, 'bench'
FROM bench_params p, generate_series(1, p.runs) r, generate_series(0, p.tests - 1) i,
LATERAL (SELECT p.t0 - (p.runs - r + 1) * interval '1 hour' + (i * p.spacing_s) * interval '1 s' - interval '50 ms' AS ts) t,
LATERAL (SELECT pg_temp.u(r, i, 5) AS x,
                (i % 1000 = 500 AND r % 50 <> 7 AND r % 100 <> 33 AND pg_temp.u(r, i / 1000, 3) < 0.02) AS rare) g;
