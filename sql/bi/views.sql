-- Flat, BI-friendly views (Metabase, Superset, Grafana, Tableau): no jsonb,
-- no bi-temporal columns, one row per fact in current state. Apply with
--   psql -d DB -f sql/bi/views.sql
-- after CREATE EXTENSION liminal; re-runnable. Grant SELECT on schema
-- liminal_bi to a read-only BI role rather than on liminal itself.
CREATE SCHEMA IF NOT EXISTS liminal_bi;
COMMENT ON SCHEMA liminal_bi IS 'Flat read-only views of liminal for BI tools.';

CREATE OR REPLACE VIEW liminal_bi.test_outcomes AS
SELECT t.id AS test_result_id, t.test_name, t.status AS test_status, t.duration_ms,
       t.started_at, (t.started_at AT TIME ZONE 'UTC')::date AS day,
       r.id AS run_id, r.plan_name, r.status AS run_status, r.host, r.input_digest,
       (t.correction_reason IS NOT NULL) AS corrected
FROM liminal.test_results t
JOIN liminal.runs r ON r.id = t.run_id;
COMMENT ON VIEW liminal_bi.test_outcomes IS 'One row per test result with its run''s plan, host and status.';

CREATE OR REPLACE VIEW liminal_bi.daily_pass_rate AS
SELECT day, plan_name, test_name,
       count(*) AS runs,
       count(*) FILTER (WHERE test_status = 'passed') AS passed,
       count(*) FILTER (WHERE test_status IN ('failed', 'error')) AS failed,
       round(count(*) FILTER (WHERE test_status = 'passed')::numeric / nullif(count(*) FILTER (WHERE test_status <> 'skipped'), 0), 4) AS pass_rate
FROM liminal_bi.test_outcomes
GROUP BY day, plan_name, test_name;
COMMENT ON VIEW liminal_bi.daily_pass_rate IS 'Pass rate per test, plan and UTC day (skipped results excluded from the rate).';

CREATE OR REPLACE VIEW liminal_bi.run_durations AS
SELECT id AS run_id, plan_name, status, host, started_at, finished_at,
       extract(epoch FROM finished_at - started_at) AS duration_s
FROM liminal.runs
WHERE finished_at IS NOT NULL;
COMMENT ON VIEW liminal_bi.run_durations IS 'Finished runs with their wall-clock duration in seconds.';

CREATE OR REPLACE VIEW liminal_bi.artifact_digests AS
SELECT a.run_id, r.input_digest, a.path, a.blake3, a.size
FROM liminal.artifacts a JOIN liminal.runs r ON r.id = a.run_id;
COMMENT ON VIEW liminal_bi.artifact_digests IS 'Artifacts with their run''s input digest: equal input digests should give equal artifact digests.';
