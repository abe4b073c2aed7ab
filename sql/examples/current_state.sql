-- Current state: the views show one row per entity, corrections applied.
-- Latest 10 runs with their test counts.
SELECT r.id, r.plan_name, r.status, r.started_at,
       count(t.id) AS tests,
       count(t.id) FILTER (WHERE t.status = 'failed') AS failed
FROM liminal.runs r
LEFT JOIN liminal.test_results t ON t.run_id = r.id
GROUP BY r.id, r.plan_name, r.status, r.started_at
ORDER BY r.started_at DESC
LIMIT 10;

-- The log of one failed test (signals attached to it), oldest first.
SELECT s.at, s.name, s.value #>> '{}' AS line
FROM liminal.test_results t
JOIN liminal.signals s ON s.test_result_id = t.id
WHERE t.status = 'failed'
  AND t.id = (SELECT id FROM liminal.test_results WHERE status = 'failed' ORDER BY started_at DESC LIMIT 1)
ORDER BY s.at;
