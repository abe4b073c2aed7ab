#!/usr/bin/env bash
# The VM test: Liminal's Debian packages on a real systemd host.
# Builds the two .debs (packaging/build-debs), installs them on the cached
# Debian 12 base booted in systemd-nspawn (vm-images/nspawn-check: the
# maintainer scripts on a running host, bus policy, preload), then layers them
# onto a disk image of the same base (vm-images/make-image), boots it under
# qemu (TCG) and checks:
#   1. liminald is active after boot (Type=notify: READY=1 really sent)
#   2. the extension is preloaded and its ingest worker runs (CREATE EXTENSION)
#   3. a run started with busctl by alice (group liminal) passes, and its
#      facts (run, test results, signal) reach PostgreSQL
#   4. mallory (not in liminal) is refused: org.freedesktop.DBus.Error.AccessDenied
#   5. the polkit path: polkitd is asked (a polkit rule denying alice makes
#      liminald answer AccessDenied "by polkit")
#   6. the journal carries the run's structured fields (journalctl RUN_ID=...)
#   7. systemctl stop liminald during a run: the run finishes, no sandbox
#      process, cgroup or mount is left
#   8. D-Bus activation starts the stopped service on the next call
#   9. the watchdog restarts a hung liminald (test-only fault switch)
# Prints boot and run times. Everything it starts it stops (qemu on every exit).
#   tests/vm/run.sh
# Environment: LIMINAL_VM_DEBS=DIR uses .debs already built there (no build);
# LIMINAL_CACHE_DIR (base image cache), CARGO_TARGET_DIR, PGRX_TARGET_DIR,
# PGRX_LOCK (see packaging/build-debs); LIMINAL_VM_KEEP=1 keeps the work dir;
# LIMINAL_VM_NSPAWN=0 skips the nspawn stage.
source "$(dirname "$0")/../../vm-images/lib.sh"
[ "$(id -u)" = 0 ] || vm_die "tests/vm/run.sh needs root (debootstrap, chroot)"
for tool in qemu-system-x86_64 debootstrap mkfs.ext4 cpio python3; do
  command -v "$tool" >/dev/null || vm_die "$tool missing (scripts/install-deps lists the apt packages)"
done
t_all=$(date +%s.%N)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

mkdir -p "$vm_cache"
work=$(mktemp -d "$vm_cache/run.XXXXXX")
cleanup() {
  vm_kill
  if [ -n "${LIMINAL_VM_KEEP:-}" ]; then vm_say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${LIMINAL_VM_DEBS:-}" ]; then
  debs=$LIMINAL_VM_DEBS
else
  debs=$work/debs
  t=$(date +%s.%N)
  "$vm_repo/packaging/build-debs" "$debs" >/dev/null
  vm_say "packages built in $(since "$t") s"
fi
t=$(date +%s.%N)
"$vm_repo/vm-images/build-base" >/dev/null
vm_say "base image ready in $(since "$t") s (cached in $vm_cache)"
# Fast first: the packages installed on a running host, in nspawn.
if [ "${LIMINAL_VM_NSPAWN:-1}" = 1 ] && command -v systemd-nspawn >/dev/null; then
  t=$(date +%s.%N)
  "$vm_repo/vm-images/nspawn-check" "$debs" || vm_die "nspawn checks failed (vm-images/nspawn-check)"
  vm_say "nspawn checks passed in $(since "$t") s"
else
  vm_say "nspawn checks skipped (LIMINAL_VM_NSPAWN=0 or no systemd-nspawn)"
fi
t=$(date +%s.%N)
"$vm_repo/vm-images/make-image" "$debs" "$work" >/dev/null
vm_say "packages layered, disk written in $(since "$t") s"

failures=()
pass() { printf '  ok    %s\n' "$*"; }
fail() { printf '  FAIL  %s\n' "$*"; failures+=("$1"); }
# g CMD...: run in the guest (as root), output on stdout.
g() { vm_exec --timeout "${G_TIMEOUT:-120}" -- "$@"; }
# wait_for SECONDS CMD: until the guest command succeeds.
wait_for() {
  local secs=$1; shift
  local deadline=$(( $(date +%s) + secs ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    g "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}
psql_q() { g "runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -c \"$1\""; }
mgr='org.liminalqa.Liminal1 /org/liminalqa/Liminal1 org.liminalqa.Liminal1.Manager'
start_run() { # USER PLAN -> run id on stdout
  g "runuser -u $1 -- busctl call $mgr StartRun 'sa{sh}a{sv}' \"\$(cat /srv/liminal/vmtest/$2)\" 0 1 plan_path s /srv/liminal/vmtest/$2"
}

# --- boot -------------------------------------------------------------------
t_boot=$(date +%s.%N)
vm_boot "$work"
vm_wait_agent 300 || { tail -40 "$work/console.log" >&2; vm_die "the guest agent never answered"; }
state=$(G_TIMEOUT=300 g "systemctl is-system-running --wait" || true)
boot_s=$(since "$t_boot")
vm_say "booted in $boot_s s (system $state)"
[ "$state" = running ] || g "systemctl --failed --no-legend" >&2 || true

echo "VM test (Debian 12, qemu TCG, packages $(ls "$debs" | tr '\n' ' '))"
# 1. Type=notify: active means READY=1 arrived.
if [ "$(g 'systemctl is-active liminald' || true)" = active ]; then
  pass "liminald active after boot ($(g 'systemctl show -P Type liminald'), NRestarts=$(g 'systemctl show -P NRestarts liminald'))"
else
  fail "liminald-active" "liminald not active after boot"; g "systemctl status liminald --no-pager; journalctl -b -u liminald --no-pager | tail -30" >&2 || true
fi

# 2. The extension, preloaded by the conf.d snippet the package ships.
psql_q "CREATE EXTENSION liminal" >/dev/null || fail "create-extension" "CREATE EXTENSION liminal"
spl=$(psql_q "SHOW shared_preload_libraries" || true)
if [ "$spl" = liminal ] && wait_for 30 "[ \$(runuser -u postgres -- psql -XAtq -c \"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'liminal ingest'\") -ge 1 ]"; then
  pass "extension created, shared_preload_libraries=$spl, ingest worker running"
else
  fail "ingest-worker" "shared_preload_libraries='$spl' or no ingest worker"
  g "journalctl -b -u postgresql@15-main --no-pager | tail -20" >&2 || true
fi

# 3. A run started over the bus by a member of group liminal.
t_run=$(date +%s.%N)
reply=$(start_run alice smoke.toml 2>&1) || true
run_id=$(sed -n 's/^so "\([0-9A-Z]\{26\}\)".*/\1/p' <<<"$reply")
if [ -z "$run_id" ]; then
  fail "start-run" "alice's StartRun: $reply"
else
  if wait_for 120 "[ \"\$(runuser -u postgres -- psql -XAtq -c \"SELECT status FROM liminal.runs WHERE id = '$run_id'\")\" = passed ]"; then
    run_s=$(since "$t_run")
    pass "alice's run $run_id passed; facts in PostgreSQL $run_s s after StartRun"
  else
    fail "run-passed" "run $run_id did not reach status passed in PostgreSQL"
    g "busctl call $mgr GetRun s $run_id; journalctl -b -u liminald --no-pager | tail -30" >&2 || true
  fi
  counts=$(psql_q "SELECT (SELECT count(*) FROM liminal.test_results WHERE run_id = '$run_id' AND status = 'passed') || ' ' || (SELECT count(*) FROM liminal.signals WHERE run_id = '$run_id' AND name = 'answer')" || true)
  [ "$counts" = "2 1" ] && pass "test results (2 passed) and the signal are in liminal.test_results / liminal.signals" \
    || fail "facts" "expected '2 1' (passed tests, answer signal), got '$counts'"
fi

# 4. Outside group liminal: refused.
out=$(start_run mallory smoke.toml 2>&1) && fail "mallory-start" "mallory could StartRun: $out" \
  || pass "mallory's StartRun refused ($(tr -d '\n' <<<"$out"))"
out=$(g "runuser -u mallory -- dbus-send --system --print-reply --dest=org.liminalqa.Liminal1 /org/liminalqa/Liminal1 org.liminalqa.Liminal1.Manager.ListRuns" 2>&1 || true)
grep -q 'org.freedesktop.DBus.Error.AccessDenied' <<<"$out" && pass "mallory's ListRuns: org.freedesktop.DBus.Error.AccessDenied" \
  || fail "mallory-denied" "mallory's ListRuns: $out"

# 5. polkit decides for callers the bus lets through.
if [ "$(g 'systemctl is-active polkit' || true)" = active ]; then
  pass "polkitd was activated by liminald's CheckAuthorization"
else
  fail "polkit-active" "polkitd not running after alice's call"
fi
g "printf '%s\n' 'polkit.addRule(function(action, subject) {' '  if (action.id == \"org.liminalqa.liminal.read\" && subject.user == \"alice\") return polkit.Result.NO;' '});' > /etc/polkit-1/rules.d/00-vmtest-deny.rules"
denied=
for _ in $(seq 20); do
  out=$(g "runuser -u alice -- dbus-send --system --print-reply --dest=org.liminalqa.Liminal1 /org/liminalqa/Liminal1 org.liminalqa.Liminal1.Manager.ListRuns" 2>&1 || true)
  if grep -q 'AccessDenied' <<<"$out" && grep -q 'polkit' <<<"$out"; then denied=1; break; fi
  sleep 0.5
done
g "rm -f /etc/polkit-1/rules.d/00-vmtest-deny.rules"
[ -n "$denied" ] && pass "a polkit rule denying alice: $(grep -o 'Error.*' <<<"$out" | head -1)" \
  || fail "polkit-deny" "polkit rule not applied by liminald: $out"

# 6. The journal: structured fields of the run's events.
if [ -n "$run_id" ]; then
  n=$(g "journalctl -b -o json RUN_ID=$run_id | wc -l" || echo 0)
  plan=$(g "journalctl -b -o json RUN_ID=$run_id | grep -c '\"PLAN\":\"vm-smoke\"'" || echo 0)
  if [ "${n:-0}" -ge 1 ] && [ "${plan:-0}" -ge 1 ]; then
    pass "journalctl RUN_ID=$run_id: $n entries, PLAN=vm-smoke"
  else
    fail "journal" "journalctl RUN_ID=$run_id: $n entries, $plan with PLAN=vm-smoke"
    g "journalctl -b -u liminald -o verbose --no-pager | tail -40" >&2 || true
  fi
fi

# 7. systemctl stop during a run. PostgreSQL is stopped first: its ingest
#    worker would otherwise re-activate liminald within a second.
g "systemctl stop postgresql@15-main"
slow=$(start_run root slow.toml 2>&1 | sed -n 's/^so "\([0-9A-Z]\{26\}\)".*/\1/p')
if [ -z "$slow" ] || ! wait_for 60 "pgrep -f '[v]mtest-slow-marker'"; then
  fail "slow-start" "the slow run did not start"
fi
t_stop=$(date +%s.%N)
g "systemctl stop liminald" || fail "stop" "systemctl stop liminald failed"
stop_s=$(since "$t_stop")
left=$(g "pgrep -a -f '[l]iminal-sandbox|[v]mtest-slow-marker'; find /sys/fs/cgroup -path '*liminal*' -type d; grep -c liminal /proc/1/mountinfo | grep -v '^0$'; ls /run/liminal 2>/dev/null" || true)
st=$(g "systemctl is-active liminald" || true)
if [ "$st" = inactive ] && [ -z "$left" ]; then
  pass "systemctl stop liminald during a run: took $stop_s s (run allowed to finish), nothing left behind"
else
  fail "stop-leftovers" "after stop: state $st, left: $left"
fi

# 8. D-Bus activation of the stopped service.
t_act=$(date +%s.%N)
if g "busctl call $mgr GetRun s $slow" >"$work/slow.json" 2>&1 && [ "$(g 'systemctl is-active liminald')" = active ]; then
  pass "D-Bus activation: GetRun started liminald again in $(since "$t_act") s"
  grep -q '\\"status\\":\\"passed\\"' "$work/slow.json" && pass "the run cut by the stop finished: passed" \
    || fail "slow-finished" "slow run after stop: $(head -c 300 "$work/slow.json")"
else
  fail "activation" "GetRun after stop: $(head -c 300 "$work/slow.json")"
fi
g "systemctl start postgresql@15-main"
if wait_for 60 "[ \"\$(runuser -u postgres -- psql -XAtq -c \"SELECT status FROM liminal.runs WHERE id = '$slow'\")\" = passed ]"; then
  pass "PostgreSQL back: the slow run's facts caught up (passed)"
else
  fail "catch-up" "slow run not ingested after PostgreSQL restart"
fi

# 9. Watchdog: a hung liminald (test-only fault switch) is restarted.
g "mkdir -p /run/systemd/system/liminald.service.d && cp /srv/liminal/vmtest/dropins/fault.conf /run/systemd/system/liminald.service.d/ && systemctl daemon-reload && systemctl restart liminald"
pid0=$(g "systemctl show -P MainPID liminald"); n0=$(g "systemctl show -P NRestarts liminald")
t_wd=$(date +%s.%N)
if wait_for 60 "[ \$(systemctl show -P NRestarts liminald) -gt $n0 ] && [ \$(systemctl show -P MainPID liminald) != $pid0 ] && systemctl is-active -q liminald"; then
  wd=$(g "journalctl -b -u liminald --no-pager | grep -c 'Watchdog timeout'" || echo 0)
  [ "${wd:-0}" -ge 1 ] && pass "watchdog: hung liminald killed and restarted $(since "$t_wd") s after the fault was armed" \
    || fail "watchdog-journal" "restarted, but no 'Watchdog timeout' in the journal"
else
  fail "watchdog" "liminald not restarted by the watchdog"
  g "systemctl status liminald --no-pager | head -20" >&2 || true
fi
# The faulty daemon is hung for real (a stop would wait TimeoutStopSec): drop
# the switch, kill it, and check the next one keeps its watchdog fed.
g "rm -rf /run/systemd/system/liminald.service.d && systemctl daemon-reload && systemctl kill -s KILL liminald; sleep 1; systemctl reset-failed liminald; systemctl restart liminald"
n1=$(g "systemctl show -P NRestarts liminald")
sleep 8
if [ "$(g 'systemctl is-active liminald' || true)" = active ] && [ "$(g 'systemctl show -P NRestarts liminald')" = "$n1" ]; then
  pass "without the fault switch liminald stays up (no watchdog restart in 8 s)"
else
  fail "restore" "liminald not stable after the fault switch was removed"
fi

echo "times: boot ${boot_s} s, run (StartRun to facts in SQL) ${run_s:-?} s, stop ${stop_s:-?} s, whole test $(since "$t_all") s"
if [ ${#failures[@]} -gt 0 ]; then
  echo "VM test FAILED: ${failures[*]}"
  exit 1
fi
echo "VM test passed"
