#!/usr/bin/env bash
# End to end under faults: limctl → liminald → sandbox → spool → bus →
# extension → SQL, with liminald killed -9 mid-run, PostgreSQL stopped during
# runs and the dbus-daemon restarted. Afterwards every fact the spool holds is
# in the database exactly once (counted against the daemon's LastSeq), no run
# is left "running", and no sandbox is left behind.
source "$(dirname "$0")/../../scripts/lib.sh"
need_root "tests/e2e/exactly-once.sh"
bin=$CARGO_TARGET_DIR/debug
if [ -z "${LIMINAL_E2E_PREBUILT:-}" ]; then
  cargo build --quiet -p liminald -p limctl -p liminal-sandbox
  (cd "$repo/pg_ext" && cargo pgrx install --pg-config "$PGRX_PG_CONFIG" >/dev/null)
fi
plan=$repo/tests/fixtures/chatty/plan.toml
"$repo/oci/images/busybox.sh" "$repo/examples/images/busybox" >/dev/null

work=$(mktemp -d /tmp/liminal-e2e.XXXXXX); chmod 755 "$work"
on_exit "rm -rf '$work'"
start_private_bus "$work/bus"; bus_pid=$(pgrep -f "config-file=$work/bus/bus.conf" | head -n1)
start_private_pg "$work/pg" 55433
psql -qX -v ON_ERROR_STOP=1 -c "CREATE EXTENSION liminal" >/dev/null
export LIMINAL_BUS_ADDRESS=$BUS_ADDRESS

daemon=
start_daemon() {
  "$bin/liminald" --bus-address "$BUS_ADDRESS" --state-dir "$work/state" >>"$work/liminald.log" 2>&1 &
  daemon=$!
  on_exit "kill -9 $daemon 2>/dev/null; wait $daemon 2>/dev/null"
  for _ in $(seq 100); do
    busctl --address="$BUS_ADDRESS" status org.liminalqa.Liminal1 >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  tail -n 30 "$work/liminald.log" >&2; die "liminald did not come up"
}
runs_in_background() {
  local n=$1 i
  for i in $(seq "$n"); do "$bin/limctl" run "$plan" --json >"$work/bg-$RANDOM.json" 2>&1 & done
}
last_seq() {
  busctl --address="$BUS_ADDRESS" get-property org.liminalqa.Liminal1 /org/liminalqa/Liminal1 \
    org.liminalqa.Liminal1.Manager LastSeq | awk '{print $2}'
}
fail() { echo "FAIL: $*" >&2; tail -n 40 "$work/liminald.log" >&2; exit 1; }

start_daemon

echo "phase 1: kill -9 liminald while 3 runs are going"
runs_in_background 3
sleep 1.2
kill -9 "$daemon"; wait "$daemon" 2>/dev/null || true
wait $(jobs -p | grep -v "^$bus_pid$") 2>/dev/null || true
start_daemon

echo "phase 2: PostgreSQL stopped during 2 runs, then started again"
runuser -u postgres -- pg_ctl -D "$work/pg/data" -m fast -w stop >/dev/null
"$bin/limctl" run "$plan" --json >/dev/null || fail "run with PostgreSQL down"
"$bin/limctl" run "$plan" --json >/dev/null || fail "run with PostgreSQL down"
runuser -u postgres -- pg_ctl -D "$work/pg/data" -l "$work/pg/postgres.log" -w start >/dev/null

echo "phase 3: the dbus-daemon restarted"
kill "$bus_pid"; sleep 0.3
start_private_bus "$work/bus"; bus_pid=$(pgrep -f "config-file=$work/bus/bus.conf" | head -n1)
kill -0 "$daemon" 2>/dev/null && ! busctl --address="$BUS_ADDRESS" status org.liminalqa.Liminal1 >/dev/null 2>&1 \
  && { kill "$daemon"; wait "$daemon" 2>/dev/null || true; }
kill -0 "$daemon" 2>/dev/null || start_daemon
"$bin/limctl" run "$plan" --json >/dev/null || fail "run after the bus restart"

want=$(last_seq)
echo "waiting for the database to reach seq $want"
got=0
for _ in $(seq 600); do
  got=$(psql -qAtX -c "SELECT coalesce(max(last_seq),0) FROM liminal.ingest_status")
  [ "$got" -ge "$want" ] && break
  sleep 0.1
done
[ "$got" -ge "$want" ] || fail "ingest stopped at seq $got of $want"

read -r total distinct lo hi errors < <(psql -qAtX -F' ' -c "
  WITH f AS (
    SELECT seq FROM liminal.run_versions WHERE fact_id IS NOT NULL
    UNION ALL SELECT seq FROM liminal.test_result_versions WHERE fact_id IS NOT NULL
    UNION ALL SELECT seq FROM liminal.signal_versions WHERE fact_id IS NOT NULL
    UNION ALL SELECT seq FROM liminal.artifact_versions WHERE fact_id IS NOT NULL)
  SELECT count(*), count(DISTINCT seq), min(seq), max(seq),
         (SELECT count(*) FROM liminal.ingest_errors) FROM f")
echo "spool LastSeq=$want; database: $total facts, $distinct distinct seqs ($lo..$hi), $errors ingest errors"
[ "$total" -eq "$distinct" ] || fail "duplicates: $total rows for $distinct sequence numbers"
[ $((total + errors)) -eq "$want" ] || fail "gap: $total facts + $errors errors != $want"
[ "$errors" -eq 0 ] || fail "ingest errors: $(psql -qAtX -c 'SELECT reason FROM liminal.ingest_errors LIMIT 3')"
running=$(psql -qAtX -c "SELECT count(*) FROM liminal.runs WHERE status IN ('running','queued')")
[ "$running" -eq 0 ] || fail "$running runs still shown as running after recovery"
interrupted=$(psql -qAtX -c "SELECT count(*) FROM liminal.runs WHERE status = 'interrupted'")
[ "$interrupted" -ge 1 ] || fail "the runs killed with liminald are not marked interrupted"
kill "$daemon"; wait "$daemon" 2>/dev/null || true
for id in $(psql -qAtX -c "SELECT lower(id) FROM liminal.runs"); do
  left=$(find /sys/fs/cgroup -maxdepth 8 -type d -name "*$id*" 2>/dev/null)
  [ -z "$left" ] || fail "cgroup left behind by run $id: $left"
done
ls "$work/state/runs" 2>/dev/null | grep -q . && fail "run folders left: $(ls "$work/state/runs")"
echo "exactly-once: 1 passed, 0 failed"
