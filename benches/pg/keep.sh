#!/usr/bin/env bash
# A persistent benchmark cluster to iterate on (generate once, measure many
# times), without holding /work/pgrx.lock for more than a file copy.
#
#   benches/pg/keep.sh create [TESTS] [RUNS]   initdb + schema + gen.sql (~7 min at 10000 x 1000)
#   benches/pg/keep.sh swap [SO]               put a liminal.so (default: the release build) in
#                                              the cluster's private library dir and restart
#   benches/pg/keep.sh measure OUT             measure.sh on it (timings table emptied first)
#   benches/pg/keep.sh psql [ARGS]             psql on it
#   benches/pg/keep.sh destroy                 stop it and remove its data
#
# The schema is the installed extension script (liminal--<default>.sql) run
# as plain SQL with MODULE_PATHNAME bound to a private copy of liminal.so
# (KEEP_DIR/lib), which is also the preloaded library (dynamic_library_path
# names that dir first): a later `cargo pgrx install` by someone else never
# changes what this cluster runs, and `swap` replaces it by rename (never in
# place: running backends have the old file mapped), then restarts.
# Env: KEEP_DIR (/work/targets/pgbench-keep), KEEP_PORT (54330),
#      CARGO_TARGET_DIR (/work/targets/pg).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
KEEP=${KEEP_DIR:-/work/targets/pgbench-keep}
PORT=${KEEP_PORT:-54330}
DATA=$KEEP/data
LIB=$KEEP/lib
SHARE=$("$PGBIN/pg_config" --sharedir)/extension
PKGLIB=$("$PGBIN/pg_config" --pkglibdir)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/targets/pg}
PSQL=(sudo -u postgres "$PGBIN/psql" -X -q -h "$DATA" -p "$PORT" -d bench -v ON_ERROR_STOP=1)
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

put_lib() { # SO: atomic replace (a new inode; running backends keep theirs)
    install -d -m 0755 "$LIB"
    cp "$1" "$LIB/liminal.so.new"
    chmod a+rx "$LIB/liminal.so.new"
    mv -f "$LIB/liminal.so.new" "$LIB/liminal.so"
}
pg_running() { [ -f "$DATA/postmaster.pid" ]; }
start() { sudo -u postgres "$PGBIN/pg_ctl" -D "$DATA" -l "$DATA/log" -w start >/dev/null; }
stop() { ! pg_running || sudo -u postgres "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null; }

case "${1:-}" in
create)
    TESTS=${2:-10000}
    RUNS=${3:-1000}
    if [ -e "$DATA" ]; then echo "$DATA exists: keep.sh destroy first" >&2; exit 1; fi
    install -d -m 0755 "$KEEP"
    # The installed script and library, copied together under the lock.
    flock /work/pgrx.lock sh -c "cp '$PKGLIB/liminal.so' '$KEEP/liminal.so.installed' &&
        ver=\$(sed -n \"s/^default_version = '\\(.*\\)'/\\1/p\" '$SHARE/liminal.control') &&
        cp \"$SHARE/liminal--\$ver.sql\" '$KEEP/schema.sql'"
    put_lib "$KEEP/liminal.so.installed"
    # The private library dir first: this cluster runs its own copy.
    init_cluster "$DATA" "$PORT" "dynamic_library_path = '$LIB:\$libdir'"
    start
    sudo -u postgres "$PGBIN/createdb" -h "$DATA" -p "$PORT" bench
    "${PSQL[@]}" -c "CREATE SCHEMA liminal"
    # As CREATE EXTENSION would: unqualified objects go to schema liminal.
    { echo "SET search_path = liminal, public;"
      sed -e "s|MODULE_PATHNAME|liminal|g" -e '/^\\echo/d' "$KEEP/schema.sql"; } >"$KEEP/schema-bound.sql"
    chmod a+r "$KEEP/schema-bound.sql"
    "${PSQL[@]}" -f "$KEEP/schema-bound.sql" >/dev/null
    gen_data "$TESTS" "$RUNS"
    ;;
swap)
    SO=${2:-$CARGO_TARGET_DIR/release/libliminal.so}
    put_lib "$SO"
    stop
    start
    log "cluster restarted with $SO ($(stat -c %y "$SO"))"
    ;;
measure)
    OUT=${2:?OUT file}
    "${PSQL[@]}" -c "DROP TABLE IF EXISTS bench.timings, bench.failures, bench.warmup" 2>/dev/null || true
    "$HERE/measure.sh" "$DATA" "$PORT" bench "$OUT"
    ;;
psql)
    shift
    exec "${PSQL[@]}" "$@"
    ;;
destroy)
    stop
    rm -rf "$KEEP"
    ;;
*)
    sed -n '2,20p' "$0" >&2
    exit 2
    ;;
esac
