-- Is the ingest worker keeping up?
SELECT source, last_seq, lag, connected, last_error, updated_at FROM liminal.ingest_status;
-- Facts it could not store, newest first.
SELECT source, seq, kind, reason, left(payload, 80) AS payload, at
FROM liminal.ingest_errors ORDER BY at DESC LIMIT 20;
-- The worker process.
SELECT pid, backend_start, state FROM pg_stat_activity WHERE backend_type = 'liminal ingest';
