-- liminal 0.1.0 -> 0.2.0
-- Also part of the 0.2.0 install script (pg_ext/src/schema/mod.rs includes
-- this file), so a fresh 0.2.0 and an upgraded 0.1.0 are the same.

-- runs: duration_ms appended (CREATE OR REPLACE VIEW may only add columns at the end).
CREATE OR REPLACE VIEW liminal.runs AS
    SELECT run_id AS id, plan_name, status, input_digest, host, started_at, finished_at,
           exit_code, image_digest, reason,
           (extract(epoch FROM finished_at - started_at) * 1000)::bigint AS duration_ms
    FROM liminal.run_versions
    WHERE tx_to = 'infinity' AND valid_to = 'infinity';
COMMENT ON VIEW liminal.runs IS 'Current state of every run (one row per run); duration_ms is NULL until it finished.';

CREATE VIEW liminal.run_summary AS
    SELECT r.id, r.plan_name, r.status, r.started_at, r.finished_at, r.duration_ms,
           count(t.id) AS tests,
           count(t.id) FILTER (WHERE t.status = 'passed') AS passed,
           count(t.id) FILTER (WHERE t.status = 'failed') AS failed,
           count(t.id) FILTER (WHERE t.status = 'skipped') AS skipped,
           count(t.id) FILTER (WHERE t.status = 'error') AS errors
    FROM liminal.runs r
    LEFT JOIN liminal.test_results t ON t.run_id = r.id
    GROUP BY r.id, r.plan_name, r.status, r.started_at, r.finished_at, r.duration_ms;
COMMENT ON VIEW liminal.run_summary IS 'One row per run with its test counts by status (current state, corrections applied). Since 0.2.0.';
