#!/usr/bin/env bash
# Makes the local PostgreSQL (the Debian cluster on 127.0.0.1:5432, see `pg_lsclusters`) load
# pg_stat_statements, for `turnd-bench --statements` (README "Performance"):
#
#   - adds pg_stat_statements to shared_preload_libraries with ALTER SYSTEM, keeping every
#     library already listed there (running or configured);
#   - restarts the cluster (a preload library needs a restart) and waits until it answers;
#   - CREATE EXTENSION IF NOT EXISTS pg_stat_statements in the database `postgres` (its view
#     there covers every database).
#
# Safe to run again: when the library is loaded and the extension exists it changes nothing.
# pg_stat_statements.track stays as it is ('top', the default: statements a client sent, not
# the ones inside functions); only 'none' is raised to 'top' (a reload, no restart).
#
# A restart cuts every session on the server: the script refuses while other clients are
# connected (it lists them) unless --force is given.
#
#   scripts/pg-statements.sh [--force]
set -euo pipefail

PORT=5432
force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) printf 'pg-statements: unknown argument %s (see --help)\n' "$arg" >&2; exit 2 ;;
  esac
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
log() { printf 'pg-statements: %s\n' "$*" >&2; }
sql() { psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -XqAtc "$1"; }

command -v pg_lsclusters >/dev/null 2>&1 || { log "pg_lsclusters not found (Debian's postgresql-common; see scripts/services.sh)"; exit 1; }
# The cluster that listens on $PORT: "<version> <name>".
read -r version cluster < <(pg_lsclusters -h | awk -v p="$PORT" '$3 == p { print $1, $2; exit }') || true
if [ -z "${version:-}" ]; then
  log "no PostgreSQL cluster on port $PORT in pg_lsclusters (scripts/services.sh sets one up)"
  exit 1
fi
if ! sql 'SELECT 1' >/dev/null 2>&1; then
  log "cluster $version/$cluster does not answer on 127.0.0.1:$PORT as postgres (trust); start it: pg_ctlcluster --skip-systemctl-redirect $version $cluster start"
  exit 1
fi

loaded() { sql "SELECT current_setting('shared_preload_libraries')" | tr ',' '\n' | tr -d ' "' | grep -qx pg_stat_statements; }

if loaded; then
  log "pg_stat_statements is already in shared_preload_libraries of $version/$cluster: no restart"
else
  # What runs now and what the files say (an ALTER SYSTEM waiting for a restart), merged.
  running=$(sql "SELECT current_setting('shared_preload_libraries')")
  configured=$(sql "SELECT coalesce((SELECT setting FROM pg_file_settings
                                     WHERE name = 'shared_preload_libraries' AND error IS NULL
                                     ORDER BY seqno DESC LIMIT 1), '')")
  libs=()
  while IFS= read -r lib; do
    [ -n "$lib" ] || continue
    [[ " ${libs[*]-} " == *" $lib "* ]] || libs+=("$lib")
  done < <(printf '%s,%s,pg_stat_statements\n' "$running" "$configured" | tr ',' '\n' | tr -d ' "')
  list=""
  for lib in "${libs[@]}"; do
    list+="${list:+, }'${lib//\'/\'\'}'"
  done
  others=$(sql "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
  if [ "$others" != 0 ] && [ "$force" = 0 ]; then
    log "a restart is needed, but $others other client session(s) are connected; they would be cut:"
    sql "SELECT '  ' || coalesce(nullif(datname, ''), '?') || ' ' || coalesce(nullif(application_name, ''), '(no application_name)') || ' ' || coalesce(state, '')
         FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() ORDER BY 1" >&2
    log "run again when they are gone, or with --force"
    exit 3
  fi
  sql "ALTER SYSTEM SET shared_preload_libraries = $list"
  log "ALTER SYSTEM SET shared_preload_libraries = $list (was '${running}')"
  log "restarting $version/$cluster"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" restart
  ready=0
  for _ in $(seq 1 120); do
    if pg_isready -q -h 127.0.0.1 -p "$PORT"; then ready=1; break; fi
    sleep 0.5
  done
  [ "$ready" = 1 ] || { log "$version/$cluster did not accept connections within 60 s after the restart"; exit 1; }
  loaded || { log "restarted, but pg_stat_statements is still not loaded (see /var/log/postgresql/postgresql-$version-$cluster.log)"; exit 1; }
  log "restarted: pg_stat_statements is loaded"
fi

if [ "$(sql "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'")" = 1 ]; then
  log "extension pg_stat_statements already exists in database postgres"
else
  sql 'CREATE EXTENSION IF NOT EXISTS pg_stat_statements'
  log "CREATE EXTENSION pg_stat_statements in database postgres"
fi

track=$(sql "SELECT current_setting('pg_stat_statements.track')")
if [ "$track" = none ]; then
  sql "ALTER SYSTEM SET pg_stat_statements.track = 'top'"
  sql 'SELECT pg_reload_conf()' >/dev/null
  log "pg_stat_statements.track was 'none': ALTER SYSTEM SET it to 'top' and reloaded"
else
  log "pg_stat_statements.track = '$track' (left as it is)"
fi
sql 'SELECT count(*) FROM pg_stat_statements' >/dev/null
log "ready: turnd-bench --statements can read pg_stat_statements on $version/$cluster"
