# Shared helpers for the ingest tests and benchmark: a private PostgreSQL
# cluster with `liminal` preloaded, a private dbus-daemon, the fact emitter.
# Everything runs as the postgres user (initdb refuses root; a bus only
# accepts the user that started it) inside a temp dir removed on exit.
#
# Callers hold /work/pgrx.lock (or $LIMINAL_PG_LOCK) — the extension is
# installed into the one system PostgreSQL — and set:
#   EMITTER  path to the fact-emitter binary
#   EXTRA_PG_CONF  optional lines appended to postgresql.conf (e.g. auto_explain)
#   KEEP_TMP       keep the temp dir (logs, data) for a look afterwards
# The extension must be installed: `cargo pgrx install --pg-config ...`.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PORT=${PORT:-54399}
AS_PG=(sudo -u postgres --)

T=$(mktemp -d /tmp/liminal-ingest.XXXXXX)
chown postgres:postgres "$T"
chmod 0755 "$T"
BUS_SOCK="$T/bus.sock"
BUS_ADDR="unix:path=$BUS_SOCK"
PGDATA="$T/pgdata"
BUS_PID=""
EMITTER_PID=""

cleanup() {
    local rc=$?
    [ -n "$EMITTER_PID" ] && kill "$EMITTER_PID" 2>/dev/null || true
    if [ -f "$PGDATA/postmaster.pid" ]; then
        "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
    fi
    [ -n "$BUS_PID" ] && kill "$BUS_PID" 2>/dev/null || true
    if [ "$rc" -ne 0 ] && [ -f "$T/pg.log" ]; then
        echo "---- last lines of the server log ----" >&2
        tail -n 40 "$T/pg.log" >&2 || true
    fi
    if [ -z "${KEEP_TMP:-}" ]; then rm -rf "$T"; else echo "kept $T" >&2; fi
    exit "$rc"
}
trap cleanup EXIT INT TERM

start_bus() {
    rm -f "$BUS_SOCK"
    "${AS_PG[@]}" dbus-daemon --session --address="$BUS_ADDR" --nofork --nopidfile >"$T/bus.log" 2>&1 &
    BUS_PID=$!
    for _ in $(seq 100); do [ -S "$BUS_SOCK" ] && return 0; sleep 0.05; done
    echo "dbus-daemon did not start" >&2; return 1
}

stop_bus() {
    # sudo forwards the signal to dbus-daemon.
    if [ -n "$BUS_PID" ]; then
        kill $(pgrep -P "$BUS_PID") "$BUS_PID" 2>/dev/null || true
        wait "$BUS_PID" 2>/dev/null || true
    fi
    BUS_PID=""
}

start_cluster() {
    if [ -n "${PRIVATE_SO:-}" ]; then
        install -d -o postgres -g postgres "$T/lib"
        install -m 0755 "$PRIVATE_SO" "$T/lib/liminal.so"
    fi
    "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PGDATA" --locale=C.UTF-8 -A trust >/dev/null
    cat >>"$PGDATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$T'
shared_preload_libraries = 'liminal'
${PRIVATE_SO:+dynamic_library_path = '$T/lib:\$libdir'}
liminal.bus_address = '$BUS_ADDR'
liminal.database = 'postgres'
restart_after_crash = on
synchronous_commit = ${SYNC_COMMIT:-on}
shared_buffers = '256MB'
max_wal_size = '4GB'
${EXTRA_PG_CONF:-}
CONF
    "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$T/pg.log" -w start >/dev/null
}

psql_q() {
    "${AS_PG[@]}" "$PG_BIN/psql" -h "$T" -p "$PORT" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"
}

# Runs the emitter as postgres in the background; args are passed through.
start_emitter() {
    "${AS_PG[@]}" "$EMITTER" --bus "$BUS_ADDR" "$@" >>"$T/emitter.log" 2>&1 &
    EMITTER_PID=$!
}

stop_emitter() {
    # Signal the emitter itself (sudo's child): sudo does not always relay.
    # TERM, not INT: a background job of a non-interactive shell ignores
    # SIGINT, and the emitter inherits that through sudo.
    if [ -n "$EMITTER_PID" ]; then
        kill -TERM $(pgrep -P "$EMITTER_PID") "$EMITTER_PID" 2>/dev/null || true
        wait "$EMITTER_PID" 2>/dev/null || true
    fi
    EMITTER_PID=""
}

cursor() {
    psql_q "SELECT coalesce(max(last_seq), 0) FROM liminal.ingest_cursor WHERE source = '$1'" 2>/dev/null || echo 0
}

# wait_cursor SOURCE SEQ TIMEOUT_S
wait_cursor() {
    local deadline=$((SECONDS + $3)) c
    while :; do
        c=$(cursor "$1")
        [ "$c" -ge "$2" ] && return 0
        if [ $SECONDS -ge $deadline ]; then
            echo "timeout: cursor of $1 at $c, wanted $2" >&2
            psql_q "SELECT * FROM liminal.ingest_status" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

worker_pid() {
    psql_q "SELECT pid FROM pg_stat_activity WHERE backend_type = 'liminal ingest'"
}

wait_worker() {
    for _ in $(seq 100); do
        local p; p=$(worker_pid 2>/dev/null || true)
        [ -n "$p" ] && { echo "$p"; return 0; }
        sleep 0.1
    done
    echo "no ingest worker" >&2; return 1
}

# The spool id the emitter derives from --seed N (property SpoolId).
spool_id() {
    "${AS_PG[@]}" busctl --address="$BUS_ADDR" get-property org.liminalqa.Liminal1 \
        /org/liminalqa/Liminal1 org.liminalqa.Liminal1.Manager SpoolId | sed 's/^s "\(.*\)"$/\1/'
}

check() { # check "what" ACTUAL EXPECTED
    if [ "$2" != "$3" ]; then echo "FAIL: $1: got $2, expected $3" >&2; exit 1; fi
    echo "ok: $1 ($2)"
}

# CREATE EXTENSION liminal, or, with PRIVATE_SO set (a freshly built
# libliminal.so, used without installing it into the system PostgreSQL),
# the schema from the source SQL files; new_ulid() is then a SQL stand-in.
create_ext() {
    if [ -z "${PRIVATE_SO:-}" ]; then psql_q "CREATE EXTENSION liminal"; return; fi
    local src; src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    install -m 0644 "$src/pg_ext/src/schema/schema.sql" "$src/pg_ext/src/schema/functions.sql" \
        "$src/sql/liminal--0.1.0--0.2.0.sql" "$T/"
    psql_q "CREATE SCHEMA liminal; CREATE FUNCTION liminal.new_ulid() RETURNS text LANGUAGE sql AS \$\$ SELECT upper(substr(md5(random()::text), 1, 26)) \$\$"
    for f in schema.sql functions.sql liminal--0.1.0--0.2.0.sql; do
        "${AS_PG[@]}" "$PG_BIN/psql" -h "$T" -p "$PORT" -d postgres -Xq -v ON_ERROR_STOP=1 -f "$T/$f" >/dev/null
    done
}
