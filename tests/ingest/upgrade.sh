#!/usr/bin/env bash
# Upgrade test: CREATE EXTENSION liminal VERSION '0.1.0', ingest facts through
# the worker, ALTER EXTENSION liminal UPDATE TO '0.2.0', then check that the
# data survived, the 0.2.0 objects work on it, the worker keeps ingesting,
# and the upgraded extension has exactly the objects of a fresh 0.2.0.
#
# `scripts/test pg` runs it after `cargo pgrx install` of the 0.2.0 build
# (which installs the upgrade script from sql/); this script installs the
# frozen 0.1.0 install script, sql/liminal--0.1.0.sql, next to it. By hand:
#   (cd pg_ext && cargo pgrx install --pg-config /usr/lib/postgresql/15/bin/pg_config)
#   cargo build -p liminal-fact-emitter
#   EMITTER=$CARGO_TARGET_DIR/debug/fact-emitter tests/ingest/upgrade.sh
# sql/liminal--0.1.0.sql was generated once, at the 0.1.0 release, with
#   cargo pgrx schema -p liminal pg15 --features v0_1 -o sql/liminal--0.1.0.sql
# and is never regenerated: a release's install script is frozen.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
EMITTER=${EMITTER:-${CARGO_TARGET_DIR:-/work/targets/pg}/release/fact-emitter}
[ -x "$EMITTER" ] || { echo "build the emitter first" >&2; exit 2; }
source "$HERE/lib.sh"

EXT_DIR="$("$PG_BIN/pg_config" --sharedir)/extension"
[ -f "$EXT_DIR/liminal--0.2.0.sql" ] || { echo "install the 0.2.0 build first (cargo pgrx install)" >&2; exit 2; }
[ -f "$EXT_DIR/liminal--0.1.0--0.2.0.sql" ] || { echo "upgrade script not installed" >&2; exit 2; }
install -m 0644 "$ROOT/sql/liminal--0.1.0.sql" "$EXT_DIR/liminal--0.1.0.sql"

start_bus
start_cluster
psql_q "CREATE EXTENSION liminal VERSION '0.1.0'"
check "installed version" "$(psql_q "SELECT extversion FROM pg_extension WHERE extname = 'liminal'")" 0.1.0
check "0.1.0 has no run_summary" "$(psql_q "SELECT to_regclass('liminal.run_summary') IS NULL")" t

start_emitter --seed 21 --count 2000 --exit-when-acked
SRC=$(for _ in $(seq 50); do spool_id 2>/dev/null && break; sleep 0.1; done)
wait_cursor "$SRC" 2000 60
wait "$EMITTER_PID" 2>/dev/null || true; EMITTER_PID=""
# A correction made under 0.1.0 must survive too.
psql_q "SELECT liminal.correct_test_result((SELECT id FROM liminal.test_results ORDER BY id LIMIT 1), 'skipped', 'before upgrade')" >/dev/null
BEFORE=$(psql_q "SELECT (SELECT count(*) FROM liminal.run_versions) || '/' || (SELECT count(*) FROM liminal.test_result_versions) || '/' || (SELECT count(*) FROM liminal.signal_versions) || '/' || (SELECT last_seq FROM liminal.ingest_cursor)")

psql_q "ALTER EXTENSION liminal UPDATE TO '0.2.0'"
check "updated version" "$(psql_q "SELECT extversion FROM pg_extension WHERE extname = 'liminal'")" 0.2.0
AFTER=$(psql_q "SELECT (SELECT count(*) FROM liminal.run_versions) || '/' || (SELECT count(*) FROM liminal.test_result_versions) || '/' || (SELECT count(*) FROM liminal.signal_versions) || '/' || (SELECT last_seq FROM liminal.ingest_cursor)")
check "data survived (runs/tests/signals/cursor)" "$AFTER" "$BEFORE"
check "correction survived" "$(psql_q "SELECT count(*) FROM liminal.test_results WHERE correction_reason = 'before upgrade'")" 1
check "run_summary on old data" "$(psql_q "SELECT sum(tests) FROM liminal.run_summary")" "$(psql_q "SELECT count(*) FROM liminal.test_results")"
check "runs.duration_ms on old data" "$(psql_q "SELECT count(*) FROM liminal.runs WHERE status <> 'running' AND duration_ms IS NULL")" 0

# The worker keeps going on the upgraded schema.
start_emitter --seed 21 --already 2000 --count 3000 --exit-when-acked
wait_cursor "$SRC" 3000 60
wait "$EMITTER_PID" 2>/dev/null || true; EMITTER_PID=""
echo "ok: ingest continues after the upgrade"

# Same objects as a fresh 0.2.0 install.
OBJS="SELECT pg_describe_object(classid, objid, objsubid) FROM pg_depend
      WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
        AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'liminal') ORDER BY 1"
psql_q "$OBJS" >"$T/upgraded.txt"
psql_q "CREATE DATABASE fresh"
"${AS_PG[@]}" "$PG_BIN/psql" -h "$T" -p "$PORT" -d fresh -XAtq -v ON_ERROR_STOP=1 -c "CREATE EXTENSION liminal" -c "$OBJS" >"$T/fresh.txt"
if ! diff -u "$T/fresh.txt" "$T/upgraded.txt"; then echo "FAIL: upgraded objects differ from a fresh 0.2.0" >&2; exit 1; fi
echo "ok: upgraded = fresh 0.2.0 ($(wc -l <"$T/fresh.txt") objects)"
# Column lists of the views too.
COLS="SELECT table_name || '(' || string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) || ')'
      FROM information_schema.columns WHERE table_schema = 'liminal' GROUP BY table_name ORDER BY 1"
diff -u <("${AS_PG[@]}" "$PG_BIN/psql" -h "$T" -p "$PORT" -d fresh -XAtq -c "$COLS") <(psql_q "$COLS") \
  || { echo "FAIL: columns differ" >&2; exit 1; }
echo "ok: same columns"
echo "PASS: upgrade 0.1.0 -> 0.2.0"
