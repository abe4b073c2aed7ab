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
source "$HERE/lib.sh"
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
init_cluster "$DATA" "$PORT"
sudo -u postgres "$PGBIN/pg_ctl" -D "$DATA" -l "$DATA/log" -w start >/dev/null
sudo -u postgres "$PGBIN/createdb" -h "$DATA" -p "$PORT" bench
"${PSQL[@]}" -c "CREATE EXTENSION liminal"

gen_data "$TESTS" "$RUNS"
"${PSQL[@]}" -At -c "SELECT 'sizes: results ' || pg_size_pretty(pg_total_relation_size('liminal.test_result_versions')) || ', signals ' || pg_size_pretty(pg_total_relation_size('liminal.signal_versions')) || ', rows ' || (SELECT count(*) FROM liminal.test_result_versions) || ' / ' || (SELECT count(*) FROM liminal.signal_versions)" | tee -a "$OUT"

"$HERE/measure.sh" "$DATA" "$PORT" bench "$OUT"
log "done"
