-- Plain-SQL causality trail (recursive CTE): the same candidate signals
-- (the run and the runs on its host that overlapped it, max_depth × window
-- before the failure), depth 1 = the window,
-- deeper hops through shared attribute values (jsonb_each), rarity against
-- the last 20 passing runs of the same test, weight = recency × rarity × hop
-- decay. Declared causes (attrs.cause) are left out: the benchmark data has
-- none. A recursive CTE has no global visited set: UNION de-duplicates
-- (id, depth, gap) rows only, then the best row per signal is kept.
CREATE SCHEMA IF NOT EXISTS bench;
CREATE OR REPLACE FUNCTION bench.causality_sql(rid text, max_depth int DEFAULT 5, win interval DEFAULT '5 minutes')
RETURNS TABLE(depth int, signal_id text, kind text, name text, at timestamptz, weight float8)
LANGUAGE sql STABLE AS $$
WITH RECURSIVE f AS (
    SELECT r.run_id, r.test_name, r.started_at + r.duration_ms * interval '1 ms' AS t, ru.host,
           least(ru.started_at, r.started_at) AS run_start
    FROM liminal.test_results r JOIN liminal.runs ru ON ru.id = r.run_id WHERE r.id = rid),
hr AS (
    SELECT ru.id FROM liminal.runs ru, f
    WHERE ru.id = f.run_id OR (ru.host = f.host AND ru.started_at <= f.t
                               AND coalesce(ru.finished_at, 'infinity') >= f.run_start)),
pool AS MATERIALIZED (
    SELECT s.id, s.kind, s.name, s.at, s.attrs FROM liminal.signals s JOIN hr ON s.run_id = hr.id, f
    WHERE s.at BETWEEN f.t - max_depth * win AND f.t),
walk(id, depth, gap) AS (
    SELECT p.id, 1, extract(epoch FROM f.t - p.at)::float8 FROM pool p, f WHERE p.at >= f.t - win
  UNION
    SELECT p.id, w.depth + 1, extract(epoch FROM a.at - p.at)::float8
    FROM walk w JOIN pool a ON a.id = w.id
    JOIN pool p ON p.at <= a.at AND p.at >= a.at - win AND p.id <> a.id
    WHERE w.depth < max_depth AND a.attrs <> '{}' AND p.attrs <> '{}'
      AND EXISTS (SELECT 1 FROM jsonb_each(a.attrs) e WHERE e.key <> 'cause' AND p.attrs -> e.key = e.value)),
best AS (SELECT DISTINCT ON (id) id, depth, gap FROM walk ORDER BY id, depth, gap),
base AS (
    SELECT t.run_id FROM liminal.test_results t, f
    WHERE t.test_name = f.test_name AND t.status = 'passed' AND t.started_at < f.t AND t.run_id <> f.run_id
    ORDER BY t.started_at DESC LIMIT 20),
kn AS (SELECT DISTINCT p.kind, p.name FROM best b JOIN pool p USING (id)),
rar AS (
    SELECT kn.kind, kn.name,
           ln(((SELECT count(*) FROM base) + 2.0) / ((SELECT count(*) FROM base WHERE EXISTS (
               SELECT 1 FROM liminal.signals s WHERE s.run_id = base.run_id AND s.kind = kn.kind AND s.name = kn.name))
           + 1.0)) AS r
    FROM kn)
SELECT b.depth, p.id, p.kind, p.name, p.at,
       exp(-3 * b.gap / extract(epoch FROM win)::float8) * rar.r * power(0.5, b.depth - 1)
FROM best b JOIN pool p USING (id) JOIN rar USING (kind, name)
ORDER BY 6 DESC, 1, 5 DESC, 2 LIMIT 1000
$$;
