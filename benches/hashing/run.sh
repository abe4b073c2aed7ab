#!/usr/bin/env bash
# BLAKE3 of one large file: liminal's artifacts::hash_file (through the
# hash_file example) against Debian's b3sum, in the same run, interleaved.
#
#   benches/hashing/run.sh                 # 1 GiB, 10 timed runs each
#   SIZE_MIB=256 RUNS=20 benches/hashing/run.sh
#   SCAN=1 benches/hashing/run.sh          # also the mmap threshold scan
#
# Page cache: the file is read once and each tool runs once untimed before
# timing, so both hash from memory; this measures hashing, not the disk
# (1 GiB stays cached on a 24 GiB machine). Runs alternate between the two
# tools so background load hits both alike. Reported: median wall time,
# throughput (GiB/s), median CPU time, and ratio = b3sum time / hash_file
# time (>= 1 means hash_file is at least as fast; the target is >= 0.9).
#
# Needs: b3sum (apt: b3sum), cargo. Writes its file under BENCH_DIR
# (default /var/tmp/liminal-hashbench) and removes it unless KEEP=1.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-10}
DIR=${BENCH_DIR:-/var/tmp/liminal-hashbench}
repo=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}

command -v b3sum >/dev/null || { echo "b3sum not found (apt-get install b3sum)" >&2; exit 2; }

(cd "$repo" && cargo build --quiet --release -p liminal-engine --example hash_file)
bin=$CARGO_TARGET_DIR/release/examples/hash_file

mkdir -p "$DIR"
file=$DIR/blob-${SIZE_MIB}M.bin
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -f "$file"; }
trap cleanup EXIT
if [ ! -f "$file" ] || [ "$(stat -c %s "$file")" -ne $((SIZE_MIB << 20)) ]; then
    head -c $((SIZE_MIB << 20)) /dev/urandom >"$file.tmp"
    mv "$file.tmp" "$file"
fi

# Warm the page cache, and check that both agree on the digest.
cat "$file" >/dev/null
want=$(b3sum --no-names "$file")
got=$("$bin" "$file" | cut -d' ' -f1)
if [ "$want" != "$got" ]; then
    echo "digest mismatch: b3sum $want, hash_file $got" >&2
    exit 1
fi

# Bash's `time` gives wall and CPU (user+sys) seconds. CPU time is reported
# too: on a loaded machine wall time mostly measures the other load, while
# CPU time per GiB still compares the work each tool does.
TIMEFORMAT='%3R %3U %3S'
b3=() hf=() b3cpu=() hfcpu=()
run() { { time "$@" >/dev/null; } 2>&1; }
for ((i = 0; i < RUNS; i++)); do
    # Alternate which tool goes first.
    for tool in $([ $((i % 2)) = 0 ] && echo "b3 hf" || echo "hf b3"); do
        if [ "$tool" = b3 ]; then
            read -r r u s < <(run b3sum --no-names "$file")
            b3+=("$r") b3cpu+=("$(awk -v u="$u" -v s="$s" 'BEGIN{print u+s}')")
        else
            read -r r u s < <(run "$bin" "$file")
            hf+=("$r") hfcpu+=("$(awk -v u="$u" -v s="$s" 'BEGIN{print u+s}')")
        fi
    done
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mb3=$(median "${b3[@]}") mhf=$(median "${hf[@]}")
cb3=$(median "${b3cpu[@]}") chf=$(median "${hfcpu[@]}")
gib=$(awk -v m="$SIZE_MIB" 'BEGIN{print m/1024}')
echo "machine: $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg), $(b3sum --version)"
echo "file: $SIZE_MIB MiB, $RUNS timed runs each, page cache warm"
awk -v g="$gib" -v t1="$mb3" -v t2="$mhf" -v c1="$cb3" -v c2="$chf" 'BEGIN {
    printf "b3sum      median wall %7.3f s  %6.2f GiB/s   cpu %6.3f s\n", t1, g/t1, c1
    printf "hash_file  median wall %7.3f s  %6.2f GiB/s   cpu %6.3f s\n", t2, g/t2, c2
    printf "ratio wall (b3sum / hash_file): %.3f   ratio cpu: %.3f\n", t1/t2, c1/c2
}'
echo "b3sum wall (s):     ${b3[*]}"
echo "hash_file wall (s): ${hf[*]}"

if [ "${SCAN:-0}" = 1 ]; then
    echo
    echo "mmap threshold scan (best-of-N microseconds; ratio > 1: mmap+rayon wins):"
    "$bin" --threshold-scan "$DIR/scan"
    rmdir "$DIR/scan" 2>/dev/null || true
fi
