-- Re-classify a failure caused by the infrastructure. A correction adds a
-- version with the same valid time and closes the old one's transaction
-- time; nothing is overwritten. Run inside a transaction to try it out.
BEGIN;
SELECT liminal.correct_test_result(id, 'skipped', 'runner ran out of disk, not a test failure')
FROM liminal.test_results
WHERE status = 'failed'
ORDER BY started_at DESC
LIMIT 1;
SELECT id, status, correction_reason FROM liminal.test_results WHERE correction_reason IS NOT NULL;
ROLLBACK;
