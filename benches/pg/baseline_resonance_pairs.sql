-- Plain-SQL co-failing pairs over [:'from', :'to') by self-join of the
-- failed results of counted runs (infrastructure runs excluded), support 3.
WITH runs_in AS (
    SELECT id, status FROM liminal.runs
    WHERE started_at >= :'from'::timestamptz AND started_at < :'to'::timestamptz),
per_run AS (
    SELECT t.run_id, count(*) AS total, count(*) FILTER (WHERE t.status IN ('failed', 'error')) AS failed
    FROM liminal.test_results t JOIN runs_in r ON r.id = t.run_id GROUP BY t.run_id),
counted AS (
    SELECT r.id FROM runs_in r JOIN per_run p ON p.run_id = r.id
    WHERE r.status NOT IN ('error', 'timeout', 'interrupted')
      AND NOT (p.total >= current_setting('liminal.infra_min_tests')::int
               AND p.failed >= current_setting('liminal.infra_failure_threshold')::float8 * p.total)),
f AS (
    SELECT DISTINCT t.run_id, t.test_name FROM liminal.test_results t JOIN counted c ON c.id = t.run_id
    WHERE t.status IN ('failed', 'error')),
n AS (SELECT count(*)::float8 AS n FROM counted),
k AS (SELECT test_name, count(*)::float8 AS k FROM f GROUP BY 1),
p AS (
    SELECT a.test_name AS test_a, b.test_name AS test_b, count(*) AS both_failed
    FROM f a JOIN f b ON a.run_id = b.run_id AND a.test_name < b.test_name
    GROUP BY 1, 2 HAVING count(*) >= 3)
SELECT p.test_a, p.test_b, p.both_failed,
       p.both_failed * n.n / (ka.k * kb.k) AS lift,
       (p.both_failed * (n.n - ka.k - kb.k + p.both_failed) - (ka.k - p.both_failed) * (kb.k - p.both_failed))
         / nullif(sqrt(ka.k * (n.n - ka.k) * kb.k * (n.n - kb.k)), 0) AS phi
FROM p JOIN k ka ON ka.test_name = p.test_a JOIN k kb ON kb.test_name = p.test_b, n
ORDER BY lift DESC, phi DESC NULLS LAST, test_a, test_b;
