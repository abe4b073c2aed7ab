#!/bin/sh
# A tiny TAP test suite with one test of each kind the analytics tell apart.
# Signals go to $LIMINAL_SIGNALS_FD as JSON lines (see DESIGN.md).
set -u
report=/workspace/report.tap
signal() { [ -n "${LIMINAL_SIGNALS_FD:-}" ] && echo "$1" >&"$LIMINAL_SIGNALS_FD"; return 0; }
rand() { od -An -N1 -tu1 /dev/urandom | tr -d ' '; }

exec 7>"$report"  # fd 3 is LIMINAL_SIGNALS_FD: keep it
echo "TAP version 13" >&7
echo "1..4" >&7

# 1. stable: arithmetic never changes.
if [ $((6 * 7)) -eq 42 ]; then echo "ok 1 - math::multiplication" >&7; else echo "not ok 1 - math::multiplication" >&7; fi

# 2. flaky: depends on a race we model with a coin toss (same inputs, different outcomes).
if [ "$(rand)" -lt 160 ]; then
  echo "ok 2 - net::fetch_with_retry" >&7
else
  echo "fetch: connection reset by peer" >&2
  echo "not ok 2 - net::fetch_with_retry" >&7
fi

# 3. broken: a migration that always fails.
echo "applying migration 0042_add_index" 
echo "not ok 3 - db::migration_0042" >&7
printf '  ---\n  message: "relation users_idx already exists"\n  ...\n' >&7

# 4. fails only after memory pressure: the telling signal precedes the failure.
if [ "$(rand)" -lt 90 ]; then
  signal '{"kind":"event","name":"cache.pressure","value":0.93,"attrs":{"component":"cache"}}'
  signal '{"kind":"metric","name":"cache.evictions","value":1200,"attrs":{"component":"cache"}}'
  echo "cache: evicting 1200 entries"
  echo "not ok 4 - cache::eviction_keeps_hot_keys" >&7
else
  signal '{"kind":"metric","name":"cache.evictions","value":3,"attrs":{"component":"cache"}}'
  echo "ok 4 - cache::eviction_keeps_hot_keys" >&7
fi
signal '{"kind":"event","name":"suite.done","value":null,"attrs":{}}'

# A deterministic artifact: sorted names, fixed mtime and owner, gzip -n.
mkdir -p /workspace/out /tmp/pkg
echo "demo 1.0" > /tmp/pkg/VERSION
cp /src/run-tests.sh /tmp/pkg/
touch -d @0 /tmp/pkg/VERSION /tmp/pkg/run-tests.sh /tmp/pkg
(cd /tmp && tar -c pkg/VERSION pkg/run-tests.sh | gzip -n > /workspace/out/demo.tar.gz)
exit 0
