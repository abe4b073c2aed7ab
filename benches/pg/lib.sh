# Shared by run.sh and keep.sh (sourced; both define PSQL, HERE and log).

# init_cluster DATA PORT [EXTRA]: initdb a private cluster owned by postgres
# with the benchmark's settings (socket in DATA only, no TCP), plus EXTRA
# lines for postgresql.conf. Settings that only speed up the load (fsync and
# friends) have no effect on the read-only measurements.
init_cluster() {
    install -d -o postgres -g postgres "$1"
    sudo -u postgres "${PGBIN:?}/initdb" -D "$1" --locale=C.UTF-8 -A trust >/dev/null
    cat >>"$1/postgresql.conf" <<EOF
port = $2
listen_addresses = ''
unix_socket_directories = '$1'
shared_buffers = 2GB
work_mem = 256MB
maintenance_work_mem = 1GB
max_parallel_maintenance_workers = 2
max_parallel_workers_per_gather = 2
max_wal_size = 20GB
checkpoint_timeout = 30min
fsync = off
synchronous_commit = off
full_page_writes = off
jit = off
# The extension's _PG_init defines PGC_POSTMASTER settings: it must be
# preloaded. Its ingest worker then waits in the (schema-less) postgres
# database and retries the absent system bus: harmless here.
shared_preload_libraries = 'liminal'
liminal.database = 'postgres'
${3:-}
EOF
}

# gen_data TESTS RUNS: fill the schema with gen.sql. The secondary indexes of
# the two big tables are dropped during the load and rebuilt after it (much
# faster than maintaining them row by row), then the tables are analyzed.
gen_data() {
    "${PSQL[@]}" <<'SQL'
CREATE TABLE public.saved_indexes AS
SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE c.oid IN ('liminal.test_result_versions'::regclass, 'liminal.signal_versions'::regclass)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid);
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT name FROM public.saved_indexes LOOP EXECUTE 'DROP INDEX ' || r.name; END LOOP;
END $$;
SQL
    local t0 t1 t2
    t0=$(date +%s)
    "${PSQL[@]}" -v tests="$1" -v runs="$2" -f "$HERE/gen.sql"
    t1=$(date +%s)
    log "generated in $((t1 - t0)) s"
    "${PSQL[@]}" <<'SQL'
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT def FROM public.saved_indexes LOOP EXECUTE r.def; END LOOP;
END $$;
VACUUM (ANALYZE) liminal.run_versions, liminal.test_result_versions, liminal.signal_versions;
SQL
    t2=$(date +%s)
    log "indexes + VACUUM ANALYZE in $((t2 - t1)) s"
}
