-- Plain-SQL heat map over [:'from', :'to') by 1 hour of the run's start:
-- infrastructure runs excluded, tests without a counted failure left out
-- (the same output as liminal.resonance_map).
WITH runs_in AS (
    SELECT id, started_at, status FROM liminal.runs
    WHERE started_at >= :'from'::timestamptz AND started_at < :'to'::timestamptz),
per_run AS (
    SELECT t.run_id, count(*) AS total, count(*) FILTER (WHERE t.status IN ('failed', 'error')) AS failed
    FROM liminal.test_results t JOIN runs_in r ON r.id = t.run_id GROUP BY t.run_id),
counted AS (
    SELECT r.id, r.started_at FROM runs_in r JOIN per_run p ON p.run_id = r.id
    WHERE r.status NOT IN ('error', 'timeout', 'interrupted')
      AND NOT (p.total >= current_setting('liminal.infra_min_tests')::int
               AND p.failed >= current_setting('liminal.infra_failure_threshold')::float8 * p.total)),
res AS (
    SELECT date_bin(interval '1 hour', c.started_at, :'from'::timestamptz) AS bucket, t.test_name,
           t.status <> 'passed' AS failed
    FROM liminal.test_results t JOIN counted c ON c.id = t.run_id
    WHERE t.status <> 'skipped'),
failing AS (SELECT DISTINCT test_name FROM res WHERE failed)
SELECT bucket, test_name, count(*) AS runs, count(*) FILTER (WHERE failed) AS failures,
       avg(failed::int)::float8 AS fail_rate
FROM res WHERE test_name IN (SELECT test_name FROM failing)
GROUP BY 1, 2 ORDER BY 1, 2;
