-- AS-OF on both axes.
-- Valid time: which runs were still running an hour ago, as we know it now?
SELECT id, plan_name, status
FROM liminal.runs_as_of(now() - interval '1 hour')
WHERE status = 'running';

-- Transaction time: the failures as the database believed them yesterday
-- (before any re-classification made since), for results valid now.
SELECT test_name, status
FROM liminal.test_results_as_of(now(), now() - interval '1 day')
WHERE status = 'failed';

-- The full history of one test result: every version, both time ranges.
SELECT status, correction_reason, valid_from, valid_to, tx_from, tx_to, source
FROM liminal.test_result_versions
WHERE id = (SELECT id FROM liminal.test_result_versions ORDER BY version_id LIMIT 1)
ORDER BY tx_from, valid_from;
