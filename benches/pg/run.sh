#!/usr/bin/env bash
# Benchmark of the liminal analytics against plain SQL on the same data.
#
#   benches/pg/run.sh [TESTS] [RUNS]        default 10000 tests x 1000 runs
#
# Builds the extension (release), then, holding /work/pgrx.lock (the system
# PostgreSQL dirs are shared, see CONTRACTS), installs it, starts a private
# PostgreSQL 15 cluster as user postgres, generates TESTS x RUNS results and
# as many signals with generate_series (gen.sql), and times the plain-SQL
# formulations (baseline_*.sql) and the functions in the same session.
# The cluster is stopped and its data removed on exit, even on failure.
# Results: benches/pg/results-TESTSxRUNS.txt (and stdout).
# Env: BENCH_PGDATA, BENCH_PORT, BENCH_DEADLINE (UTC HH:MM after which
# remaining measurements are skipped), CARGO_TARGET_DIR (/work/targets/pg).
set -euo pipefail

TESTS=${1:-10000}
RUNS=${2:-1000}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
DATA=${BENCH_PGDATA:-/work/targets/pgbench/data}
PORT=${BENCH_PORT:-54329}
OUT=${BENCH_OUT:-$HERE/results-${TESTS}x${RUNS}.txt}
DEADLINE=${BENCH_DEADLINE:-}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/targets/pg}

if [ -z "${LIMINAL_BENCH_LOCKED:-}" ]; then
    # Compile outside the lock; only installing and running need it.
    (cd "$ROOT/pg_ext" && cargo build --release --lib --features pg15)
    export LIMINAL_BENCH_LOCKED=1
    exec flock /work/pgrx.lock "$0" "$@"
fi

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT"; }
past_deadline() {
    [ -n "$DEADLINE" ] && [ "$(date -u +%H:%M)" \> "$DEADLINE" ]
}
PSQL=(sudo -u postgres "$PGBIN/psql" -X -q -h "$DATA" -p "$PORT" -d bench -v ON_ERROR_STOP=1)

cleanup() {
    if [ -f "$DATA/postmaster.pid" ]; then
        sudo -u postgres "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$DATA"
}
trap cleanup EXIT

: >"$OUT"
log "scale: $TESTS tests x $RUNS runs = $((TESTS * RUNS)) results and as many signals"
(cd "$ROOT/pg_ext" && cargo pgrx install --release --pg-config "$PGBIN/pg_config" >/dev/null)
log "extension installed"

cleanup
install -d -o postgres -g postgres "$DATA"
sudo -u postgres "$PGBIN/initdb" -D "$DATA" --locale=C.UTF-8 -A trust >/dev/null
cat >>"$DATA/postgresql.conf" <<EOF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DATA'
shared_buffers = 2GB
work_mem = 256MB
maintenance_work_mem = 1GB
max_parallel_maintenance_workers = 2
max_parallel_workers_per_gather = 2
max_wal_size = 20GB
checkpoint_timeout = 30min
# Generation speed only; no effect on the read-only measurements.
fsync = off
synchronous_commit = off
full_page_writes = off
jit = off
EOF
sudo -u postgres "$PGBIN/pg_ctl" -D "$DATA" -l "$DATA/log" -w start >/dev/null
sudo -u postgres "$PGBIN/createdb" -h "$DATA" -p "$PORT" bench
"${PSQL[@]}" -c "CREATE EXTENSION liminal"

# Load without the secondary indexes, then build them (much faster).
"${PSQL[@]}" <<'EOF'
CREATE TABLE public.saved_indexes AS
SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE c.oid IN ('liminal.test_result_versions'::regclass, 'liminal.signal_versions'::regclass)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid);
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT name FROM public.saved_indexes LOOP EXECUTE 'DROP INDEX ' || r.name; END LOOP;
END $$;
EOF
t0=$(date +%s)
"${PSQL[@]}" -v tests="$TESTS" -v runs="$RUNS" -f "$HERE/gen.sql"
t1=$(date +%s)
log "generated in $((t1 - t0)) s"
"${PSQL[@]}" <<'EOF'
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT def FROM public.saved_indexes LOOP EXECUTE r.def; END LOOP;
END $$;
VACUUM (ANALYZE) liminal.run_versions, liminal.test_result_versions, liminal.signal_versions;
EOF
t2=$(date +%s)
log "indexes + VACUUM ANALYZE in $((t2 - t1)) s"
"${PSQL[@]}" -At -c "SELECT 'sizes: results ' || pg_size_pretty(pg_total_relation_size('liminal.test_result_versions')) || ', signals ' || pg_size_pretty(pg_total_relation_size('liminal.signal_versions')) || ', rows ' || (SELECT count(*) FROM liminal.test_result_versions) || ' / ' || (SELECT count(*) FROM liminal.signal_versions)" | tee -a "$OUT"

"${PSQL[@]}" -f "$HERE/bench.sql"
"${PSQL[@]}" -f "$HERE/baseline_causality.sql"

FROM=$("${PSQL[@]}" -At -c "SELECT now() - interval '30 days'")
TO=$("${PSQL[@]}" -At -c "SELECT now()")
ONE=$("${PSQL[@]}" -At -c "SELECT test_name FROM liminal.test_results WHERE test_name LIKE '%::test_00502' LIMIT 1")

# The file's query with psql variables substituted, without the final ';'.
query() {
    sed -e "s/:'from'/'$FROM'/g" -e "s/:'to'/'$TO'/g" -e "s/:'test'/'$ONE'/g" "$HERE/$1" \
        | sed -e 's/--.*$//' | tr '\n' ' ' | sed -e 's/;[[:space:]]*$//'
}
time_it() { # what impl reps query
    past_deadline && { log "skipped $1/$2: past $DEADLINE"; return 0; }
    log "timing $1 / $2"
    "${PSQL[@]}" -c "CALL bench.time_it('$1', '$2', \$q\$$4\$q\$, $3)" || log "failed: $1 / $2"
}

time_it stability_all function 3 "SELECT * FROM liminal.test_stability('30 days')"
time_it stability_all plain_sql 2 "$(query baseline_stability.sql)"
time_it stability_one function 5 "SELECT liminal.test_stability_score('$ONE', '30 days')"
time_it stability_one plain_sql 3 "$(query baseline_stability_one.sql)"
time_it resonance_map_30d function 3 "SELECT * FROM liminal.resonance_map('$FROM', '$TO', '1 hour')"
time_it resonance_map_30d plain_sql 2 "$(query baseline_resonance_map.sql)"
time_it resonance_pairs_30d function 3 "SELECT * FROM liminal.resonance_pairs('$FROM', '$TO', 3)"
time_it resonance_pairs_30d plain_sql 1 "$(query baseline_resonance_pairs.sql)"

# causality_walk: 50 failures of correlated and flaky tests in counted runs
# (function), the first 10 of them for the recursive CTE.
if ! past_deadline; then
    log "timing causality"
    "${PSQL[@]}" <<EOF
CREATE TABLE bench.failures AS
SELECT t.id FROM liminal.test_results t JOIN liminal.runs r ON r.id = t.run_id
WHERE t.status IN ('failed', 'error') AND t.started_at >= '$FROM'
  AND r.status <> 'error' AND right(r.id, 2) <> '33'
  AND (t.test_name LIKE '%::test_%50_' OR t.test_name LIKE '%::test_%0_' )
ORDER BY hashtext(t.id) LIMIT 50;
DO \$\$ DECLARE f record; t0 timestamptz; n bigint; k int := 0; BEGIN
  FOR f IN SELECT id FROM bench.failures LOOP
    t0 := clock_timestamp();
    SELECT count(*) INTO n FROM liminal.causality_walk(f.id);
    INSERT INTO bench.timings VALUES ('causality_walk', 'function', k, extract(epoch FROM clock_timestamp() - t0) * 1000, n);
    k := k + 1;
  END LOOP;
END \$\$;
SET statement_timeout = '60s';
DO \$\$ DECLARE f record; t0 timestamptz; n bigint; k int := 0; BEGIN
  FOR f IN SELECT id FROM bench.failures LIMIT 10 LOOP
    t0 := clock_timestamp();
    SELECT count(*) INTO n FROM bench.causality_sql(f.id);
    INSERT INTO bench.timings VALUES ('causality_walk', 'plain_sql', k, extract(epoch FROM clock_timestamp() - t0) * 1000, n);
    k := k + 1;
  END LOOP;
END \$\$;
EOF
fi

# Same answers? (row counts and spot checks, computed once more)
"${PSQL[@]}" -At <<EOF | tee -a "$OUT"
SELECT 'check stability: rows function ' || (SELECT count(*) FROM liminal.test_stability('30 days'))
    || ', plain ' || (SELECT count(*) FROM ($(query baseline_stability.sql)) b)
    || ', same classification ' || (SELECT count(*) FROM liminal.test_stability('30 days') f
         JOIN ($(query baseline_stability.sql)) b USING (test_name) WHERE f.classification = b.classification)
    || ', max |score diff| ' || (SELECT round(max(abs(f.score - b.score))::numeric, 12) FROM liminal.test_stability('30 days') f
         JOIN ($(query baseline_stability.sql)) b USING (test_name));
SELECT 'check map: rows function ' || (SELECT count(*) FROM liminal.resonance_map('$FROM', '$TO'))
    || ', plain ' || (SELECT count(*) FROM ($(query baseline_resonance_map.sql)) b)
    || ', failures ' || (SELECT sum(failures) FROM liminal.resonance_map('$FROM', '$TO'))
    || ' / ' || (SELECT sum(failures) FROM ($(query baseline_resonance_map.sql)) b);
SELECT 'check pairs: rows function ' || (SELECT count(*) FROM liminal.resonance_pairs('$FROM', '$TO'))
    || ', top ' || (SELECT test_a || ' ' || test_b || ' lift ' || round(lift::numeric, 4) FROM liminal.resonance_pairs('$FROM', '$TO') LIMIT 1);
SELECT 'check causality: top cause of ' || f.id || ' = ' || (SELECT kind || '/' || name || ' depth ' || depth FROM liminal.causality_walk(f.id) LIMIT 1)
FROM (SELECT id FROM bench.failures LIMIT 3) f;
EOF

"${PSQL[@]}" -At -F ' | ' <<'EOF' | tee -a "$OUT"
SELECT 'what | impl | n | min ms | median ms | p95 ms | rows';
SELECT what, impl, count(*), round(min(ms)::numeric, 1),
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::numeric, 1),
       round((percentile_cont(0.95) WITHIN GROUP (ORDER BY ms))::numeric, 1), max(rows)
FROM bench.timings GROUP BY 1, 2 ORDER BY 1, 2;
SELECT 'ratio (plain median / function median): ' || string_agg(what || ' ' || round(r::numeric, 1) || 'x', ', ' ORDER BY what)
FROM (SELECT what, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FILTER (WHERE impl = 'plain_sql')
                 / nullif(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FILTER (WHERE impl = 'function'), 0) AS r
      FROM bench.timings GROUP BY 1) x WHERE r IS NOT NULL;
EOF
log "done"
