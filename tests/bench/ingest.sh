#!/usr/bin/env bash
# Ingest benchmark: liminal's worker moving facts from a real dbus-daemon into
# committed rows of a private PostgreSQL 15 cluster.
#   1. throughput: the emitter announces N facts as fast as it can
#      (FactsAppended, 512 a signal); time from the first announcement to the
#      cursor reaching N (all rows committed). Reported beside the emitter's
#      own announce rate (the bus's ceiling) in the same run.
#   2. latency: 5,000 facts/s in signals of 50; per signal, emit time to the
#      first moment a poller (psql \watch every 2 ms) sees the cursor cover it.
#      p50/p99/max; the poll interval bounds the resolution.
# Run as root from the repo root (see tests/ingest/exactly_once.sh for the
# build and install steps):
#   flock /work/pgrx.lock tests/bench/ingest.sh
# Knobs: N (default 300000), LAT_N (default 50000), SYNC_COMMIT (default on).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EMITTER=${EMITTER:-${CARGO_TARGET_DIR:-/work/targets/pg}/release/fact-emitter}
[ -x "$EMITTER" ] || { echo "build the emitter first: cargo build --release -p liminal-fact-emitter" >&2; exit 2; }
source "$HERE/../ingest/lib.sh"
N=${N:-300000}
LAT_N=${LAT_N:-50000}

now_us() { date +%s%6N; }

start_bus
start_cluster
create_ext
wait_worker >/dev/null

echo "== throughput: $N facts (signals 8/9 of them, test results, runs), synchronous_commit=${SYNC_COMMIT:-on}"
start_emitter --seed 11 --count "$N" --rate 0 --delay-ms 1000 --exit-when-acked
SRC=$(for _ in $(seq 50); do spool_id 2>/dev/null && break; sleep 0.1; done)
sleep 0.5
T0=$(( $(now_us) + 500000 ))   # the emitter starts announcing 1 s after taking the name
while [ "$(cursor "$SRC")" -lt "$N" ]; do sleep 0.05; done
T1=$(now_us)
wait "$EMITTER_PID" 2>/dev/null || true; EMITTER_PID=""
ANNOUNCE=$(grep -o 'announced [0-9]* facts in [0-9.]*s ([0-9]*/s)' "$T/emitter.log" | tail -n 1)
awk -v n="$N" -v t0="$T0" -v t1="$T1" -v a="$ANNOUNCE" 'BEGIN {
  s = (t1 - t0) / 1e6; printf "ingest: %d facts committed in %.2f s = %.0f facts/s (emitter %s)\n", n, s, n / s, a }'
psql_q "SELECT 'rows: ' || (SELECT count(*) FROM liminal.signal_versions) || ' signal versions, '
        || (SELECT count(*) FROM liminal.test_result_versions) || ' test result versions, '
        || (SELECT count(*) FROM liminal.run_versions) || ' run versions'"

echo "== latency: $LAT_N facts at 5000 facts/s, FactsAppended of 50"
printf '%s\n\\watch 0.002\n' "SELECT coalesce(max(last_seq), 0), (extract(epoch FROM clock_timestamp()) * 1e6)::bigint FROM liminal.ingest_cursor WHERE source <> '$SRC'" \
  | "${AS_PG[@]}" "$PG_BIN/psql" -h "$T" -p "$PORT" -d postgres -XAtq -F ' ' >"$T/watch.log" 2>/dev/null &
WATCH_PID=$!
start_emitter --seed 12 --count "$LAT_N" --rate 5000 --batch 50 --delay-ms 1500 --emit-log "$T/emit.log" --exit-when-acked
wait "$EMITTER_PID" 2>/dev/null || true; EMITTER_PID=""
sleep 0.3
kill "$WATCH_PID" 2>/dev/null || true; wait "$WATCH_PID" 2>/dev/null || true
python3 - "$T/emit.log" "$T/watch.log" <<'PY'
import sys, bisect
emits = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
watch = []
for l in open(sys.argv[2]):
    p = l.split()
    if len(p) == 2 and p[0].isdigit():
        watch.append((int(p[1]), int(p[0])))
watch.sort()
times = [w[0] for w in watch]
# Cursor as seen over time is monotonic: first sample at or after emit with cursor >= seq.
lat = []
for seq, t in emits:
    i = bisect.bisect_left(times, t)
    while i < len(watch) and watch[i][1] < seq:
        i += 1
    if i < len(watch):
        lat.append((watch[i][0] - t) / 1000.0)
lat.sort()
if not lat:
    sys.exit("no latency samples")
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
gaps = [b - a for a, b in zip(times, times[1:])]
gaps.sort()
print(f"emit-to-visible over {len(lat)} signals of 50 facts: p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {lat[-1]:.1f} ms"
      f" (poll interval median {gaps[len(gaps)//2]/1000:.1f} ms)")
PY
