-- Data that must go. Try inside a transaction; in real use COMMIT, then
-- VACUUM the tables it names (old tuples stay on disk until then).
BEGIN;
-- A secret that leaked into logs: replaced by *** in every version.
SELECT * FROM liminal.erase(secret => 'hunter2-leaked-token');
-- A run and everything it produced, every version.
SELECT * FROM liminal.erase(run_id => (SELECT id FROM liminal.runs ORDER BY started_at LIMIT 1));
ROLLBACK;
