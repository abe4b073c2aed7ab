#!/usr/bin/env bash
# Ingest end to end with a real dbus-daemon, a private PostgreSQL cluster and
# the fact emitter: exactly once across a terminated worker backend, a
# kill -9 of the worker (the postmaster restarts the whole cluster), a bus
# restart and an emitter restart; gaps; malformed facts; trimmed spools;
# the worker starting before CREATE EXTENSION.
#
# Run (as root, from the repo root), after building and installing:
#   export CARGO_TARGET_DIR=/work/targets/pg
#   flock /work/pgrx.lock cargo pgrx install -p liminal --pg-config /usr/lib/postgresql/15/bin/pg_config
#   cargo build --release -p liminal-fact-emitter
#   flock /work/pgrx.lock tests/ingest/exactly_once.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EMITTER=${EMITTER:-${CARGO_TARGET_DIR:-/work/targets/pg}/release/fact-emitter}
[ -x "$EMITTER" ] || { echo "build the emitter first: cargo build --release -p liminal-fact-emitter" >&2; exit 2; }
source "$HERE/lib.sh"

N=${N:-120000}
MAL=997      # every 997th fact is malformed
RATE=${RATE:-20000}

start_bus
start_cluster
# The worker is up before the extension exists: it must wait, not fail.
wait_worker >/dev/null
sleep 1.5
create_ext

start_emitter --seed 7 --count "$N" --rate "$RATE" --malformed-every $MAL --emit-log "$T/emit1.log" \
    --skip-announce 3000-3100
SRC=$(for _ in $(seq 50); do spool_id 2>/dev/null && break; sleep 0.1; done)
echo "spool $SRC"

# 1. Terminate the worker's backend mid-stream; the postmaster restarts it.
wait_cursor "$SRC" 20000 60
P=$(worker_pid); psql_q "SELECT pg_terminate_backend($P)" >/dev/null
echo "terminated worker $P at cursor $(cursor "$SRC")"

# 2. kill -9 the worker: the postmaster resets the whole cluster (crash recovery).
wait_cursor "$SRC" 45000 60
P=$(wait_worker); kill -9 "$P"
echo "killed -9 worker $P"
sleep 2
wait_worker >/dev/null

# 3. Restart the bus (the emitter dies with it) and the emitter, which serves
#    the same spool and goes on from where it was.
wait_cursor "$SRC" 70000 90
stop_emitter
stop_bus
EMITTED=$(tail -n 1 "$T/emit1.log" | cut -d' ' -f1)
echo "bus down, emitter had announced up to $EMITTED"
sleep 1
start_bus
start_emitter --seed 7 --already "$EMITTED" --count "$N" --rate "$RATE" --malformed-every $MAL --exit-when-acked
wait_cursor "$SRC" "$N" 120

# Every seq stored exactly once: as a version (re-stated copies have no
# fact_id) or as an ingest error.
read -r TOTAL DISTINCT LO HI <<<"$(psql_q "
  SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM (
    SELECT seq FROM liminal.run_versions WHERE fact_id IS NOT NULL
    UNION ALL SELECT seq FROM liminal.test_result_versions WHERE fact_id IS NOT NULL
    UNION ALL SELECT seq FROM liminal.signal_versions WHERE fact_id IS NOT NULL
    UNION ALL SELECT seq FROM liminal.artifact_versions WHERE fact_id IS NOT NULL
    UNION ALL SELECT seq FROM liminal.ingest_errors WHERE source = '$SRC') s" | tr '|' ' ')"
check "rows + errors = facts emitted" "$TOTAL" "$N"
check "no duplicate seq" "$DISTINCT" "$N"
check "no gap (min seq)" "$LO" 1
check "no gap (max seq)" "$HI" "$N"
check "malformed facts in ingest_errors" "$(psql_q "SELECT count(*) FROM liminal.ingest_errors WHERE source = '$SRC'")" $((N / MAL))
check "errors carry the payload" "$(psql_q "SELECT count(*) FROM liminal.ingest_errors WHERE payload = '' OR reason = ''")" 0
GROUP=$((2 + 10 * 9))
RUNS=$(( (N + GROUP - 1) / GROUP ))
check "one current row per run" "$(psql_q "SELECT count(*) FROM liminal.runs")" "$RUNS"
check "runs whose final fact was stored are final" \
  "$(psql_q "SELECT count(*) FROM liminal.run_versions v WHERE fact_id IS NOT NULL AND status <> 'running' AND NOT EXISTS (SELECT 1 FROM liminal.runs r WHERE r.id = v.run_id AND r.status = v.status)")" 0
check "progression re-stated the running version" \
  "$(psql_q "SELECT count(*) = count(*) FILTER (WHERE valid_to < 'infinity') FROM liminal.run_versions WHERE restated_from IS NOT NULL")" t
check "ingest_status: lag 0" "$(psql_q "SELECT lag FROM liminal.ingest_status WHERE source = '$SRC'")" 0
# The emitter exits once AckFacts reached N.
for _ in $(seq 100); do kill -0 "$EMITTER_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$EMITTER_PID" 2>/dev/null; then echo "FAIL: AckFacts never reached $N" >&2; exit 1; fi
echo "ok: AckFacts reached $N"
wait "$EMITTER_PID" 2>/dev/null || true; EMITTER_PID=""

# 4. A spool that trimmed facts 1..49 before the worker saw them: the loss is
#    recorded, the rest ingested.
start_emitter --seed 8 --count 500 --first-available 50 --exit-when-acked
SRC2=$(for _ in $(seq 50); do spool_id 2>/dev/null && break; sleep 0.1; done)
wait_cursor "$SRC2" 500 60
check "trimmed range recorded" "$(psql_q "SELECT kind || ':' || seq FROM liminal.ingest_errors WHERE source = '$SRC2'")" "trimmed:1"
check "facts after the trimmed range stored" "$(psql_q "SELECT count(*) FROM liminal.signal_versions WHERE source = '$SRC2'")" \
  "$(psql_q "SELECT count(*) FROM generate_series(50, 500) s WHERE (s - 1) % 92 NOT IN (0, 91) AND ((s - 1) % 92 - 1) % 9 <> 8")"
# The documented examples and BI views run on this data.
ROOT=$(cd "$HERE/../.." && pwd)
for f in "$ROOT"/sql/examples/*.sql "$ROOT"/sql/bi/views.sql; do
    "${AS_PG[@]}" "$PG_BIN/psql" -h "$T" -p "$PORT" -d postgres -Xq -v ON_ERROR_STOP=1 -f "$f" >/dev/null
    echo "ok: $(basename "$f") runs"
done
check "BI view rows" "$(psql_q "SELECT count(*) FROM liminal_bi.test_outcomes")" "$(psql_q "SELECT count(*) FROM liminal.test_results")"
echo "PASS: ingest exactly once"
