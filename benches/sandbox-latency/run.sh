#!/usr/bin/env bash
# Sandbox latency: create + start + wait + delete of /bin/true in the busybox
# rootfs, RUNS times each (default 200), all peers in the same run:
#   bwrap, runc run, crun run (in a mount namespace with
#   /sys/fs/cgroup/unified unmounted: crun 1.8 refuses the hybrid layout),
#   liminal raw helper loop (one liminal-sandbox process, N containers),
#   liminal sandbox layer through the warm fork server (the raw loop's job
#   handed over as the engine does, timed to the helper's report),
#   liminal engine path (liminal_engine::run per run, as liminald does:
#   input digest, facts, cleanup included), through the warm fork server
#   (the default) and with a helper spawned per run
#   (LIMINAL_SANDBOX_PREFORK=0), alternating run by run; the raw loop also
#   with every cgroup v1 hierarchy (LIMINAL_SANDBOX_ALL_CGROUPS=1, as before
#   the helper detached the unused ones),
# plus host /bin/true as the floor. Prints medians, p95 and ratios; writes
# raw numbers to $OUT (default a temp dir, kept). Needs root, hyperfine,
# runc, crun, bubblewrap, python3.
set -euo pipefail
RUNS=${RUNS:-200}
WARMUP=${WARMUP:-10}
root=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
[ "$(id -u)" = 0 ] || { echo "run.sh: needs root" >&2; exit 2; }
for t in hyperfine runc crun bwrap python3; do
  command -v $t >/dev/null || { echo "run.sh: missing $t" >&2; exit 2; }
done
(cd "$root" && cargo build -q --release -p liminal-sandbox --bin liminal-sandbox \
  && cargo build -q --release -p liminal-engine --example sandbox-latency)
bin=$CARGO_TARGET_DIR/release
rootfs=$(bash "$root/oci/images/busybox.sh")
OUT=${OUT:-$(mktemp -d /tmp/liminal-bench.XXXXXX)}
mkdir -p "$OUT"; chmod 755 "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.jsonl
mkdir -p "$OUT/state" "$OUT/runc/rootfs"

# runc/crun bundle: runc's default spec, /bin/true, read-only busybox rootfs
# (runc needs an absolute rootfs path).
(cd "$OUT/runc" && rm -f config.json && runc spec)
python3 - "$OUT/runc/config.json" "$rootfs" <<'PY'
import json, sys
p, rootfs = sys.argv[1], sys.argv[2]
c = json.load(open(p))
c["root"] = {"path": rootfs, "readonly": True}
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/true"]
json.dump(c, open(p, "w"))
PY

# The candidates run in ROUNDS rounds (default 4) of RUNS/ROUNDS runs each,
# so a change in the machine's load (other builds on it) spreads over all of
# them instead of hitting whichever ran at that moment.
ROUNDS=${ROUNDS:-4}
per=$(( (RUNS + ROUNDS - 1) / ROUNDS ))
# PACE_MS: a pause before every run of every candidate (untimed), i.e. runs
# arriving one at a time as a daemon gets them, instead of back to back.
PACE_MS=${PACE_MS:-0}
pace_s=$(python3 -c "print($PACE_MS / 1000)")
hf() { hyperfine -N --style none --runs "$per" --warmup "$WARMUP" --prepare "sleep $pace_s" --export-json "$@" >/dev/null 2>&1; }

mkdir -p "$OUT/raw/work" "$OUT/raw/tmp"
chown 100000:100000 "$OUT/raw/work" "$OUT/raw/tmp"
cg=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup)
cat > "$OUT/raw/job.json" <<JSON
{"version":1,"container_id":"liminal-bench-raw","state_root":"$OUT/raw/containers","bundle":"$OUT/raw/bundle","rootfs":"$rootfs",
"args":["/bin/true"],"env":{"PATH":"/bin","HOME":"/tmp","TZ":"UTC","LC_ALL":"C.UTF-8","SOURCE_DATE_EPOCH":"0"},"cwd":"/workspace",
"hostname":"liminal","domainname":"liminal.invalid","umask":18,
"mounts":[{"source":"$OUT/raw/work","target":"/workspace","readonly":false},{"source":"$OUT/raw/tmp","target":"/tmp","readonly":false}],
"network":"none","id_map":{"host_id":100000,"size":65536},"resources":{"memory_bytes":1073741824,"pids":1024,"cpus":1},
"cgroup_path":"${cg%/}/liminal-bench-raw","preserved_fds":0,"stdout_fd":5,"stderr_fd":6,"report_fd":7,"timeout_ms":60000,"kill_grace_ms":2000,
"rlimits":[{"kind":"RLIMIT_NOFILE","soft":4096,"hard":4096}],"writable_paths":["/workspace","/tmp"],"reset_clocks":true}
JSON
raw_loop() {
  "$bin/liminal-sandbox" --bench-loop $((per + WARMUP)) "$PACE_MS" < "$OUT/raw/job.json" 5>/dev/null 6>/dev/null 7>/dev/null \
    | tail -n "$per"
}

for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS: host, bwrap, runc, crun, liminal raw loop (trimmed and all cgroups), liminal engine (fork server and spawn) ..." >&2
  hf "$OUT/host.$r.json" /bin/true
  hf "$OUT/bwrap.$r.json" "bwrap --unshare-all --die-with-parent --ro-bind $rootfs / --proc /proc --dev /dev /bin/true"
  hf "$OUT/runc.$r.json" "runc run --bundle $OUT/runc liminal-bench-runc"
  unshare -m bash -c "umount /sys/fs/cgroup/unified && $(declare -f hf); per=$per WARMUP=$WARMUP pace_s=$pace_s; hf $OUT/crun.$r.json 'crun run --bundle $OUT/runc liminal-bench-crun'"
  raw_loop >> "$OUT/raw.jsonl"
  LIMINAL_SANDBOX_ALL_CGROUPS=1 raw_loop >> "$OUT/raw-allcg.jsonl"
  # The sandbox layer as the engine drives it: the raw loop's job handed to
  # the fork server (warm slots), hand-over to report, no engine work.
  "$bin/examples/sandbox-latency" --helper "$bin/liminal-sandbox" --rootfs "$rootfs" \
    --state "$OUT/state" --runs "$per" --modes sandbox --job "$OUT/raw/job.json" \
    --pace-ms "$PACE_MS" > "$OUT/sandbox.$r.json"
  # Warm sandboxes alone (the default): each run's container was made
  # while the previous run went on; then, without them, the fork server's
  # cold path alternating with a helper spawned per run.
  "$bin/examples/sandbox-latency" --helper "$bin/liminal-sandbox" --rootfs "$rootfs" \
    --state "$OUT/state" --runs "$per" --modes server --pace-ms "$PACE_MS" > "$OUT/warm.$r.json"
  LIMINAL_SANDBOX_WARM=0 "$bin/examples/sandbox-latency" --helper "$bin/liminal-sandbox" --rootfs "$rootfs" \
    --state "$OUT/state" --runs "$per" --modes server,spawn --pace-ms "$PACE_MS" > "$OUT/engine.$r.json"
done

PACE_MS=$PACE_MS python3 - "$OUT" <<'PY'
import json, sys, statistics
out = sys.argv[1]
def q(xs, p):
    xs = sorted(xs); k = (len(xs) - 1) * p; f = int(k); c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)
import glob
rows = {}
for name in ["host", "bwrap", "runc", "crun"]:
    rows[name] = [t * 1e3 for f in sorted(glob.glob(f"{out}/{name}.*.json"))
                  for t in json.load(open(f))["results"][0]["times"]]
raw = [json.loads(l) for l in open(f"{out}/raw.jsonl")]
raw_all = [json.loads(l) for l in open(f"{out}/raw-allcg.jsonl")]
rows["liminal raw loop"] = [r["total_us"] / 1e3 for r in raw]
rows["raw, all cgroups"] = [r["total_us"] / 1e3 for r in raw_all]
rows["sandbox, warm server"] = [x for f in sorted(glob.glob(f"{out}/sandbox.*.json"))
                                for x in json.load(open(f))["sandbox_ms"]]
warms = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/warm.*.json"))]
engs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/engine.*.json"))]
rows["liminal engine"] = [x for e in warms for x in e["engine_ms"]]
rows["engine, cold server"] = [x for e in engs for x in e["engine_ms"]]
rows["engine, spawn/run"] = [x for e in engs for x in e["spawn_ms"]]
med = {k: statistics.median(v) for k, v in rows.items()}
import os
print(f"pace {os.environ.get('PACE_MS', '0')} ms before each run")
print(f"{'':20} {'n':>4} {'median ms':>10} {'p95 ms':>8} {'/crun':>6} {'/bwrap':>7}")
for k, v in rows.items():
    print(f"{k:20} {len(v):4} {med[k]:10.2f} {q(v, .95):8.2f} {med[k]/med['crun']:6.2f} {med[k]/med['bwrap']:7.2f}")
def part(rs, key): return statistics.median(r[key] for r in rs) / 1e3
for name, rs in [("raw loop", raw), ("raw, all cgroups", raw_all)]:
    print(f"{name} phases (median ms): create {part(rs, 'create_us'):.2f}, start {part(rs, 'start_us'):.2f}, wait {part(rs, 'wait_us'):.2f}, delete {part(rs, 'delete_us'):.2f}")
print(f"engine: image resolve (rootfs tree digest) median {statistics.median(x for e in warms + engs for x in e['image_resolve_ms']):.2f} ms per run")
print(f"raw numbers in {out}")
PY
