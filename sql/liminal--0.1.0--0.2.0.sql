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

-- ---------------------------------------------------------------------------
-- Reproducibility (issue 6): verdicts per input digest, and the artifacts
-- that stopped reproducing.

-- The latest verdict per input digest, with how often those inputs were
-- verified and how often they reproduced.
CREATE OR REPLACE VIEW liminal.reproducibility AS
    SELECT DISTINCT ON (v.input_digest)
           v.input_digest,
           r.plan_name,
           v.reproducible,
           v.variations,
           v.culprit,
           v.artifacts_compared,
           ARRAY(SELECT d->>'path' FROM jsonb_array_elements(v.differing) d ORDER BY 1) AS differing_paths,
           v.differing,
           v.run_id AS last_run_id,
           v.decided_at,
           count(*) OVER (PARTITION BY v.input_digest) AS verifications,
           count(*) FILTER (WHERE v.reproducible) OVER (PARTITION BY v.input_digest) AS reproducible_verifications
    FROM liminal.repro_verdicts v
    LEFT JOIN liminal.runs r ON r.id = v.run_id
    ORDER BY v.input_digest, v.decided_at DESC, v.run_id DESC;
COMMENT ON VIEW liminal.reproducibility IS 'Per input digest: the latest reproducibility verdict (variations, culprit, differing artifacts) and how many verifications reproduced.';

-- Artifacts that stopped reproducing: per plan, verdicts in time order; an
-- artifact the previous verification built and reproduced (it was among
-- that run''s artifacts and not among its differing ones) that differs in
-- the next one.
CREATE OR REPLACE FUNCTION liminal.repro_regressions(since timestamptz DEFAULT '-infinity')
RETURNS TABLE(plan_name text, path text,
              reproduced_run_id text, reproduced_at timestamptz, reproduced_input_digest text,
              broke_run_id text, broke_at timestamptz, broke_input_digest text,
              culprit text, culprits text[], digests text[])
LANGUAGE sql STABLE
AS $$
    WITH v AS (
        SELECT rv.run_id, rv.decided_at, rv.input_digest, rv.differing, rv.culprit, r.plan_name,
               lag(rv.run_id) OVER w AS prev_run,
               lag(rv.decided_at) OVER w AS prev_at,
               lag(rv.input_digest) OVER w AS prev_digest,
               lag(rv.differing) OVER w AS prev_differing
        FROM liminal.repro_verdicts rv
        JOIN liminal.runs r ON r.id = rv.run_id
        WINDOW w AS (PARTITION BY r.plan_name ORDER BY rv.decided_at, rv.run_id)
    )
    SELECT v.plan_name, d->>'path',
           v.prev_run, v.prev_at, v.prev_digest,
           v.run_id, v.decided_at, v.input_digest,
           v.culprit,
           ARRAY(SELECT jsonb_array_elements_text(coalesce(d->'culprits', '[]'::jsonb))),
           ARRAY(SELECT jsonb_array_elements_text(coalesce(d->'digests', '[]'::jsonb)))
    FROM v
    CROSS JOIN LATERAL jsonb_array_elements(v.differing) d
    WHERE v.prev_run IS NOT NULL
      AND v.decided_at >= repro_regressions.since
      AND EXISTS (SELECT 1 FROM liminal.artifacts a
                  WHERE a.run_id = v.prev_run AND a.path = d->>'path')
      AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v.prev_differing) pd
                      WHERE pd->>'path' = d->>'path')
    ORDER BY v.decided_at DESC, d->>'path';
$$;
COMMENT ON FUNCTION liminal.repro_regressions(timestamptz) IS 'Artifacts that stopped reproducing: reproduced in a plan''s previous verification, differ in the next (decided at or after since), with the culprit variations and both digests.';
