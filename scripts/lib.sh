# Shared by scripts/*: paths and small helpers. Sourced, not run.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export LIMINAL_CACHE_DIR=${LIMINAL_CACHE_DIR:-$HOME/.cache/liminal}
# Build outputs may live outside the clone (CI sets this) and are rebuilt if absent.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
export PGRX_PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
export PATH=$HOME/.cargo/bin:/usr/lib/postgresql/15/bin:$PATH
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (sandboxes use namespaces and cgroups; apt installs packages)"; }

# --- private services, for the demo and the end-to-end tests -------------
# Each start_* registers its stop in the EXIT trap: nothing outlives the script.
_cleanups=()
_run_cleanups() { local i; for ((i=${#_cleanups[@]}-1; i>=0; i--)); do eval "${_cleanups[i]}" || true; done; }
trap _run_cleanups EXIT
on_exit() { _cleanups+=("$1"); }

# start_private_bus DIR: a dbus-daemon that root and postgres may both use.
# Sets BUS_ADDRESS (without ,guid=: a restarted bus has a new guid).
start_private_bus() {
  local dir=$1
  mkdir -p "$dir"; chmod 755 "$dir"
  cat > "$dir/bus.conf" <<XML
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>liminal-private</type>
  <listen>unix:path=$dir/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
XML
  dbus-daemon --config-file="$dir/bus.conf" --nofork --nopidfile --print-address=3 3>"$dir/address" &
  local pid=$!
  on_exit "kill $pid 2>/dev/null; wait $pid 2>/dev/null"
  for _ in $(seq 100); do [ -s "$dir/address" ] && break; sleep 0.05; done
  [ -s "$dir/address" ] || die "dbus-daemon did not start"
  BUS_ADDRESS=$(head -n1 "$dir/address"); BUS_ADDRESS=${BUS_ADDRESS%%,guid=*}
  chmod 666 "$dir/bus.sock"
  export BUS_ADDRESS
}

# start_private_pg DIR PORT: a throwaway cluster owned by postgres with the
# extension preloaded and its worker pointed at $BUS_ADDRESS. Sets PGHOST/PGPORT.
start_private_pg() {
  local dir=$1 port=$2
  install -d -o postgres -g postgres "$dir"
  runuser -u postgres -- initdb -D "$dir/data" --locale=C.UTF-8 -A trust -U postgres >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  cat >> "$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
shared_preload_libraries = 'liminal'
liminal.bus_address = '${BUS_ADDRESS:-}'
liminal.database = 'postgres'
shared_buffers = 256MB
fsync = on
CONF
  runuser -u postgres -- pg_ctl -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >/dev/null \
    || { tail -n 30 "$dir/postgres.log" >&2; die "PostgreSQL did not start"; }
  on_exit "runuser -u postgres -- pg_ctl -D '$dir/data' -m immediate -w stop >/dev/null 2>&1"
  export PGHOST=$dir PGPORT=$port PGUSER=postgres PGDATABASE=postgres
}
