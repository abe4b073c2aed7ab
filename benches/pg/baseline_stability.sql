-- Plain-SQL stability of every test over the last 30 days (window functions):
-- the same counts, Beta posterior mean, exponentially weighted flip rate
-- (half-life 20 runs), infrastructure runs excluded, same-input
-- disagreements, classification. One difference: plain SQL has no inverse
-- incomplete beta, so the 95% interval uses the normal approximation.
WITH w AS (SELECT now() - interval '30 days' AS cutoff),
runs AS (SELECT id, status, input_digest FROM liminal.runs),
per_run AS (
    SELECT t.run_id, count(*) AS total,
           count(*) FILTER (WHERE t.status IN ('failed', 'error')) AS failed
    FROM liminal.test_results t, w WHERE t.started_at >= w.cutoff GROUP BY t.run_id),
infra AS (
    SELECT p.run_id FROM per_run p LEFT JOIN runs r ON r.id = p.run_id
    WHERE r.status IN ('error', 'timeout', 'interrupted')
       OR (p.total >= current_setting('liminal.infra_min_tests')::int
           AND p.failed >= current_setting('liminal.infra_failure_threshold')::float8 * p.total)),
seq AS (
    SELECT t.test_name, t.status = 'passed' AS passed, r.input_digest,
           row_number() OVER win AS rn,
           count(*) OVER (PARTITION BY t.test_name) AS n,
           lag(t.status = 'passed') OVER win AS prev
    FROM liminal.test_results t
    LEFT JOIN runs r ON r.id = t.run_id, w
    WHERE t.started_at >= w.cutoff AND t.status <> 'skipped'
      AND NOT EXISTS (SELECT 1 FROM infra i WHERE i.run_id = t.run_id)
    WINDOW win AS (PARTITION BY t.test_name ORDER BY t.started_at)),
agg AS (
    SELECT test_name, max(n) AS runs, count(*) FILTER (WHERE passed) AS passes,
           sum(CASE WHEN prev IS DISTINCT FROM passed AND prev IS NOT NULL THEN power(0.5, (n - rn) / 20.0) ELSE 0 END) AS fw,
           sum(CASE WHEN prev IS NOT NULL THEN power(0.5, (n - rn) / 20.0) ELSE 0 END) AS ww,
           bool_and(NOT passed) FILTER (WHERE rn > n - 5) AS last5_failed
    FROM seq GROUP BY test_name),
dis AS (
    SELECT test_name, count(*) AS d FROM (
        SELECT test_name, input_digest FROM seq WHERE input_digest IS NOT NULL
        GROUP BY 1, 2 HAVING bool_or(passed) AND NOT bool_and(passed)) x
    GROUP BY 1),
est AS (
    SELECT a.*, coalesce(d.d, 0) AS d,
           (a.passes + 1.0) / (a.runs + 2.0) AS p,
           coalesce(a.fw / nullif(a.ww, 0), 0) AS flip
    FROM agg a LEFT JOIN dis d USING (test_name)),
ci AS (
    SELECT e.*, sqrt(p * (1 - p) / (runs + 3.0)) AS sd FROM est e)
SELECT test_name, p * (1 - flip) AS score,
       CASE WHEN runs < 5 THEN 'insufficient_data'
            WHEN least(1, p + 1.96 * sd) < 0.2 OR (runs >= 5 AND last5_failed) THEN 'broken'
            WHEN flip > 0 OR d > 0 THEN 'flaky' ELSE 'healthy' END AS classification,
       runs, p AS pass_probability, greatest(0, p - 1.96 * sd) AS ci_low, least(1, p + 1.96 * sd) AS ci_high,
       flip AS flip_rate, d AS same_input_disagreements
FROM ci ORDER BY test_name;
