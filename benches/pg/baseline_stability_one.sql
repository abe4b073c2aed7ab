-- Plain-SQL stability score of one test (:'test'), 30 days, infrastructure
-- runs excluded (per-run counts of the runs the test ran in).
WITH w AS (SELECT now() - interval '30 days' AS cutoff),
mine AS (
    SELECT t.run_id, t.started_at, t.status = 'passed' AS passed, r.input_digest, r.status AS run_status
    FROM liminal.test_results t LEFT JOIN liminal.runs r ON r.id = t.run_id, w
    WHERE t.test_name = :'test' AND t.started_at >= w.cutoff AND t.status <> 'skipped'),
per_run AS (
    SELECT m.run_id,
           (SELECT count(*) FROM liminal.test_results x WHERE x.run_id = m.run_id) AS total,
           (SELECT count(*) FROM liminal.test_results x WHERE x.run_id = m.run_id AND x.status IN ('failed', 'error')) AS failed
    FROM mine m),
seq AS (
    SELECT m.*, row_number() OVER (ORDER BY m.started_at) AS rn, count(*) OVER () AS n,
           lag(m.passed) OVER (ORDER BY m.started_at) AS prev
    FROM mine m JOIN per_run p USING (run_id)
    WHERE coalesce(m.run_status, '') NOT IN ('error', 'timeout', 'interrupted')
      AND NOT (p.total >= current_setting('liminal.infra_min_tests')::int
               AND p.failed >= current_setting('liminal.infra_failure_threshold')::float8 * p.total))
SELECT (count(*) FILTER (WHERE passed) + 1.0) / (count(*) + 2.0)
       * (1 - coalesce(sum(CASE WHEN prev IS NOT NULL AND prev <> passed THEN power(0.5, (n - rn) / 20.0) ELSE 0 END)
                       / nullif(sum(CASE WHEN prev IS NOT NULL THEN power(0.5, (n - rn) / 20.0) ELSE 0 END), 0), 0)) AS score
FROM seq;
