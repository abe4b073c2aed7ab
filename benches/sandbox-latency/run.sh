#!/usr/bin/env bash
# Sandbox latency: create + start + wait + delete of /bin/true in the busybox
# rootfs, RUNS times each (default 200), all peers in the same run:
#   bwrap, runc run, crun run (in a mount namespace with
#   /sys/fs/cgroup/unified unmounted: crun 1.8 refuses the hybrid layout),
#   liminal raw helper loop (one liminal-sandbox process, N containers),
#   liminal engine path (liminal_engine::run per run, as liminald does:
#   input digest, facts, cleanup included), through the warm fork server
#   (the default) and with a helper spawned per run
#   (LIMINAL_SANDBOX_PREFORK=0); the raw loop also once with every cgroup
#   v1 hierarchy (LIMINAL_SANDBOX_ALL_CGROUPS=1, as before the trim),
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

hf() { hyperfine -N --style none --runs "$RUNS" --warmup "$WARMUP" --export-json "$@" >/dev/null; }
echo "host /bin/true ..." >&2
hf "$OUT/host.json" /bin/true
echo "bwrap ..." >&2
hf "$OUT/bwrap.json" "bwrap --unshare-all --die-with-parent --ro-bind $rootfs / --proc /proc --dev /dev /bin/true"
echo "runc ..." >&2
hf "$OUT/runc.json" "runc run --bundle $OUT/runc liminal-bench-runc"
echo "crun ..." >&2
unshare -m bash -c "umount /sys/fs/cgroup/unified && $(declare -f hf); RUNS=$RUNS WARMUP=$WARMUP; hf $OUT/crun.json 'crun run --bundle $OUT/runc liminal-bench-crun'"

echo "liminal raw helper loop ..." >&2
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
"$bin/liminal-sandbox" --bench-loop $((RUNS + WARMUP)) < "$OUT/raw/job.json" 5>/dev/null 6>/dev/null 7>/dev/null \
  | tail -n "$RUNS" > "$OUT/raw.jsonl"
echo "liminal raw helper loop, every cgroup v1 hierarchy (before the trim) ..." >&2
LIMINAL_SANDBOX_ALL_CGROUPS=1 "$bin/liminal-sandbox" --bench-loop $((RUNS + WARMUP)) < "$OUT/raw/job.json" \
  5>/dev/null 6>/dev/null 7>/dev/null | tail -n "$RUNS" > "$OUT/raw-allcg.jsonl"

echo "liminal engine path (warm fork server) ..." >&2
"$bin/examples/sandbox-latency" --helper "$bin/liminal-sandbox" --rootfs "$rootfs" \
  --state "$OUT/state" --runs "$RUNS" > "$OUT/engine.json"
echo "liminal engine path (a helper spawned per run) ..." >&2
LIMINAL_SANDBOX_PREFORK=0 "$bin/examples/sandbox-latency" --helper "$bin/liminal-sandbox" \
  --rootfs "$rootfs" --state "$OUT/state" --runs "$RUNS" > "$OUT/engine-spawn.json"

python3 - "$OUT" <<'PY'
import json, sys, statistics
out = sys.argv[1]
def q(xs, p):
    xs = sorted(xs); k = (len(xs) - 1) * p; f = int(k); c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)
rows = {}
for name in ["host", "bwrap", "runc", "crun"]:
    rows[name] = [t * 1e3 for t in json.load(open(f"{out}/{name}.json"))["results"][0]["times"]]
raw = [json.loads(l) for l in open(f"{out}/raw.jsonl")]
raw_all = [json.loads(l) for l in open(f"{out}/raw-allcg.jsonl")]
rows["liminal raw loop"] = [r["total_us"] / 1e3 for r in raw]
rows["raw, all cgroups"] = [r["total_us"] / 1e3 for r in raw_all]
eng = json.load(open(f"{out}/engine.json"))
rows["liminal engine"] = eng["engine_ms"]
eng_spawn = json.load(open(f"{out}/engine-spawn.json"))
rows["engine, spawn/run"] = eng_spawn["engine_ms"]
med = {k: statistics.median(v) for k, v in rows.items()}
print(f"{'':18} {'n':>4} {'median ms':>10} {'p95 ms':>8} {'/crun':>6} {'/bwrap':>7}")
for k, v in rows.items():
    print(f"{k:18} {len(v):4} {med[k]:10.2f} {q(v, .95):8.2f} {med[k]/med['crun']:6.2f} {med[k]/med['bwrap']:7.2f}")
def part(rs, key): return statistics.median(r[key] for r in rs) / 1e3
for name, rs in [("raw loop", raw), ("raw, all cgroups", raw_all)]:
    print(f"{name} phases (median ms): create {part(rs, 'create_us'):.2f}, start {part(rs, 'start_us'):.2f}, wait {part(rs, 'wait_us'):.2f}, delete {part(rs, 'delete_us'):.2f}")
print(f"engine: image resolve (rootfs tree digest) median {statistics.median(eng['image_resolve_ms']):.2f} ms per run")
print(f"raw numbers in {out}")
PY
