#!/usr/bin/env bash
# Measures on an existing cluster whose schema `liminal` was created from
# the extension's schema SQL and filled by gen.sql *without* the extension
# (so a full-scale data set can be generated without holding the lock).
# Holding /work/pgrx.lock: installs the release build, copies liminal.so to
# a private directory, creates the five analytics functions bound to that
# copy (definitions taken from the installed extension script), runs
# measure.sh, then drops the functions. The cluster must preload the library
# (shared_preload_libraries = 'liminal', dynamic_library_path naming the
# private directory first): the ingest GUCs can only be defined at startup.
#   benches/pg/attach.sh SOCKET_DIR PORT DB OUT
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/targets/pg}
if [ -z "${LIMINAL_BENCH_LOCKED:-}" ]; then
    (cd "$ROOT/pg_ext" && cargo build --release --lib --features pg15)
    export LIMINAL_BENCH_LOCKED=1
    exec flock /work/pgrx.lock "$0" "$@"
fi
DATA=$1; PORT=$2; DB=$3; OUT=$4
PSQL=(sudo -u postgres "$PGBIN/psql" -X -q -h "$DATA" -p "$PORT" -d "$DB" -v ON_ERROR_STOP=1)
(cd "$ROOT/pg_ext" && cargo pgrx install --release --pg-config "$PGBIN/pg_config" >/dev/null)
PRIV=${BENCH_LIBDIR:-/work/targets/pgbench-ext}
mkdir -p "$PRIV"
cp "$("$PGBIN/pg_config" --pkglibdir)/liminal.so" "$PRIV/liminal.so"
chmod -R a+rX "$PRIV"
SCRIPT=$(ls -t "$("$PGBIN/pg_config" --sharedir)"/extension/liminal--*.sql | grep -v -- '--[0-9.]*--' | head -1)
python3 - "$SCRIPT" "$PRIV/liminal" >"$PRIV/functions.sql" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
names = {"test_stability", "test_stability_score", "causality_walk", "resonance_map", "resonance_pairs"}
print("SET search_path = liminal, public;")
for m in re.finditer(r'CREATE\s+(?:OR REPLACE\s+)?FUNCTION\s+(?:"?liminal"?\.)?"?(\w+)"?\s*\(.*?_wrapper\';', text, re.S):
    if m.group(1) in names:
        print(m.group(0).replace("MODULE_PATHNAME", sys.argv[2]).replace("CREATE  FUNCTION", "CREATE OR REPLACE FUNCTION").replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"))
PY
"${PSQL[@]}" -f "$PRIV/functions.sql"
"${PSQL[@]}" -At -c "SELECT 'functions: ' || string_agg(proname, ', ') FROM pg_proc WHERE pronamespace = 'liminal'::regnamespace AND prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')" | tee -a "$OUT"
"$HERE/measure.sh" "$DATA" "$PORT" "$DB" "$OUT"
"${PSQL[@]}" -c "DROP FUNCTION IF EXISTS liminal.test_stability, liminal.test_stability_score, liminal.causality_walk, liminal.resonance_map, liminal.resonance_pairs"
