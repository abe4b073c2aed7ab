#!/usr/bin/env bash
# benches/repro: the same two-build reproducibility check of the same small
# builds (tests/fixtures/repro) by Debian's reprotest and by
# `limctl verify --local`, in the same run, with the same variations.
#
#   benches/repro/run.sh [REPS]        (root; apt: reprotest disorderfs faketime
#                                       diffoscope-minimal busybox-static)
#
# Per fixture it measures
#   check:   the two-build comparison alone (reprotest --no-diffoscope vs
#            limctl verify --no-culprit-search --no-diffoscope), REPS times,
#            median wall time, and whether both give the same verdict;
#   explain: finding the culprit (reprotest --auto-build vs limctl verify,
#            both without diffoscope), once, with the culprit each names.
# Writes a table to stdout and to benches/repro/results.txt.
#
# Both run the fixture build with busybox tools: limctl in the busybox
# rootfs, reprotest on the host with busybox applets first on PATH.
# user_group is left out for both (reprotest needs a list of users for it).
set -euo pipefail
REPS=${1:-3}
repo=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
ALL_VARY=build_path,domain_host,time,umask,locales,timezone,num_cpus,environment,home,exec_path,aslr,kernel,fileordering
rt_vary() { echo "-all,$(echo "$1" | sed 's/\([a-z_]*\)/+\1/g')"; }
VARY=$ALL_VARY
KINDS=${KINDS:-"reproducible date hostname build_path umask num_cpus random"}

command -v reprotest >/dev/null || { echo "reprotest not installed (apt-get install reprotest)" >&2; exit 2; }
cargo build --release --quiet -p limctl -p liminal-sandbox
limctl=$CARGO_TARGET_DIR/release/limctl
export LIMINAL_SANDBOX_HELPER=$CARGO_TARGET_DIR/release/liminal-sandbox

work=$(mktemp -d /tmp/liminal-repro-bench.XXXXXX)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
export LIMINAL_STATE_DIR=$work/state LIMINAL_CACHE_DIR=$work/cache
mkdir -p "$LIMINAL_STATE_DIR" "$work/bb"
rootfs=$(bash "$repo/oci/images/busybox.sh")
for a in sh cp mkdir rm printf date hostname pwd nproc head od stat awk sort find sed cat gzip; do
    ln -s "$(command -v busybox)" "$work/bb/$a"
done

# The fixture plans with this rootfs and an absolute input folder.
fixtures=$repo/tests/fixtures/repro
for k in $KINDS; do
    sed -e "s|^image = .*|image = \"$rootfs\"|" -e "s|^source = \".\"|source = \"$fixtures\"|" \
        "$fixtures/$k.toml" >"$work/$k.toml"
done

now() { date +%s.%N; }
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

reprotest_run() { # KIND EXTRA...: prints "exit seconds"; output in $work/rt.log
    local kind=$1
    shift
    rm -rf "$work/src"
    cp -r "$fixtures" "$work/src"
    local t0 rc=0
    t0=$(now)
    (cd "$work/src" && reprotest "$@" --vary="$(rt_vary "$VARY")" \
        -c "PATH=$work/bb:\$PATH FIXTURE_SRC=. sh build.sh $kind" . 'out/*.tar.gz') >"$work/rt.log" 2>&1 || rc=$?
    echo "$rc $(echo "$(now) - $t0" | bc)"
}

limctl_run() { # KIND EXTRA...: prints "exit seconds"; JSON in $work/lim.json
    local kind=$1
    shift
    local t0 rc=0
    t0=$(now)
    "$limctl" verify --local --json --vary "$VARY" "$@" "$work/$kind.toml" >"$work/lim.json" 2>"$work/lim.err" || rc=$?
    echo "$rc $(echo "$(now) - $t0" | bc)"
}

verdict() { case $1 in 0) echo reproducible ;; 1) echo not-reproducible ;; *) echo "error($1)" ;; esac; }

rt_culprit() {
    if grep -q "Observed unreproducibility when varying each of the following" "$work/rt.log"; then
        sed -n '/Observed unreproducibility when varying each of the following/,/^The build/p' "$work/rt.log" |
            sed '1d;$d' | tr '\n' ',' | sed 's/,$//'
    elif grep -q "even when fixing as much as" "$work/rt.log"; then
        echo nondeterministic
    elif grep -q "Reproduction successful" "$work/rt.log"; then
        echo -
    else
        echo "?"
    fi
}

lim_culprit() {
    python3 - "$work/lim.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["repro"]
except Exception:
    print("?"); sys.exit()
if r.get("reproducible"):
    print("-")
elif r.get("culprit"):
    print(r["culprit"])
elif r.get("nondeterministic"):
    print("nondeterministic")
else:
    print(",".join(r.get("culprits", [])) or "?")
PY
}

out=$repo/benches/repro/results.txt
{
    echo "# benches/repro/run.sh $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPUs, $(uname -r); reps=$REPS"
    echo "# reprotest $(dpkg-query -W -f '${Version}' reprotest 2>/dev/null), limctl $(git -C "$repo" rev-parse --short HEAD)"
    echo "# variations (both): $ALL_VARY"
} | tee "$out"
# The check twice: with every variation, and without time (whose wall-clock
# second costs limctl up to 1 s of waiting; see docs/reproducibility.md).
for VARY in "$ALL_VARY" "${ALL_VARY/time,/}"; do
{
    echo
    echo "## check: two builds, compare (no diffoscope, no culprit search); median wall seconds"
    echo "## vary: $VARY"
    printf '%-13s %12s %12s %7s  %-18s %-18s %s\n' fixture reprotest limctl ratio reprotest-verdict limctl-verdict same
} | tee -a "$out"
for k in $KINDS; do
    rts=() lims=() rtv="" limv=""
    for _ in $(seq "$REPS"); do
        read -r rc t < <(reprotest_run "$k" --no-diffoscope)
        rts+=("$t") rtv=$(verdict "$rc")
        read -r rc t < <(limctl_run "$k" --no-culprit-search --no-diffoscope)
        lims+=("$t") limv=$(verdict "$rc")
    done
    rt=$(printf '%s\n' "${rts[@]}" | median)
    li=$(printf '%s\n' "${lims[@]}" | median)
    same=$([ "$rtv" = "$limv" ] && echo yes || echo NO)
    printf '%-13s %12.3f %12.3f %6.1fx  %-18s %-18s %s\n' "$k" "$rt" "$li" "$(echo "$rt / $li" | bc -l)" "$rtv" "$limv" "$same" | tee -a "$out"
done
done
VARY=$ALL_VARY
{
    echo
    echo "## explain: find the culprit (reprotest --auto-build vs limctl verify), once; wall seconds"
    printf '%-13s %12s %12s %7s  %-24s %-24s\n' fixture reprotest limctl ratio reprotest-culprit limctl-culprit
} | tee -a "$out"
for k in $KINDS; do
    read -r _ rt < <(reprotest_run "$k" --no-diffoscope --auto-build)
    rtc=$(rt_culprit)
    read -r _ li < <(limctl_run "$k" --no-diffoscope)
    lic=$(lim_culprit)
    printf '%-13s %12.3f %12.3f %6.1fx  %-24s %-24s\n' "$k" "$rt" "$li" "$(echo "$rt / $li" | bc -l)" "$rtc" "$lic" | tee -a "$out"
done
