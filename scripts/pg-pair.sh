#!/usr/bin/env bash
# A PostgreSQL primary and a streaming standby on this machine, beside the shared cluster 15/main
# (5432), which it never touches. For tests/it/past_one_machine.rs, turnd-chaos's pg-failover fault
# and README "Running past one machine".
#
#   scripts/pg-pair.sh up sync|async   primary 15/turnd_pa on 5441 and a standby 15/turnd_pb on
#                                      5442 (pg_basebackup -R); sync: synchronous_standby_names
#                                      = '*' on the primary, so a commit waits for the standby
#   scripts/pg-pair.sh failover [MS]   stop the primary as a crash would (immediate: no shutdown
#                                      checkpoint, the standby gets nothing more) and promote the
#                                      standby; prints the promoted port. With MS, replication
#                                      stalls first (the walsender is SIGSTOPped) for MS ms while
#                                      the primary keeps committing: the standby falls MS behind,
#                                      as across a congested or partitioned link before a crash
#   scripts/pg-pair.sh restandby       make the stopped one a standby of the promoted one again
#                                      (pg_basebackup), in the mode `up` chose; prints its port
#   scripts/pg-pair.sh primary         the port of the current primary
#   scripts/pg-pair.sh down            stop and drop both clusters
#   scripts/pg-pair.sh status          pg_lsclusters of the pair and the primary's replication
#
# Both accept trust connections from 127.0.0.1 (as the shared cluster does for the tests), with
# max_locks_per_transaction raised as README "Configuration" advises for many workers.
set -euo pipefail

PRIMARY=turnd_pa
STANDBY=turnd_pb
PRIMARY_PORT=5441
STANDBY_PORT=5442
# The mode `up` chose, for `restandby`.
MODE_FILE=/var/lib/postgresql/turnd-pair.mode

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_pg() { as_root runuser -u postgres -- "$@"; }
log() { printf 'pg-pair: %s\n' "$*" >&2; }

version() {
  if [ -d /etc/postgresql ] && ls /etc/postgresql >/dev/null 2>&1; then
    ls /etc/postgresql | sort -V | tail -n 1
  fi
}

ensure_installed() {
  if ! command -v pg_createcluster >/dev/null 2>&1 || [ -z "$(version)" ]; then
    log "installing postgresql"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null
  fi
}

exists() { [ -d "/etc/postgresql/$(version)/$1" ]; }

drop() {
  local name=$1
  if exists "$name"; then
    as_root pg_dropcluster --stop "$(version)" "$name"
  fi
}

trust_localhost() {
  local hba=/etc/postgresql/$(version)/$1/pg_hba.conf
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust' "$hba"
}

wait_ready() {
  local port=$1
  for _ in $(seq 1 120); do
    pg_isready -q -h 127.0.0.1 -p "$port" && return 0
    sleep 0.25
  done
  log "PostgreSQL on $port did not become ready"
  return 1
}

up() {
  local mode=${1:?sync or async}
  [ "$mode" = sync ] || [ "$mode" = async ] || { log "mode must be sync or async"; exit 2; }
  ensure_installed
  local v
  v=$(version)
  # A fresh pair every time: a pair that failed over has a promoted standby and a dead primary.
  drop "$STANDBY"
  drop "$PRIMARY"
  as_root pg_createcluster -q "$v" "$PRIMARY" -p "$PRIMARY_PORT" -- --auth=trust >/dev/null
  trust_localhost "$PRIMARY"
  local sync_names=""
  [ "$mode" = sync ] && sync_names="*"
  # wal_sender_timeout / wal_receiver_status_interval at their defaults: what users run.
  write_conf "$v" "$PRIMARY" "$sync_names"
  echo "$mode" | as_root tee "$MODE_FILE" >/dev/null
  as_root pg_ctlcluster --skip-systemctl-redirect "$v" "$PRIMARY" start
  wait_ready "$PRIMARY_PORT"

  as_root pg_createcluster -q "$v" "$STANDBY" -p "$STANDBY_PORT" -- --auth=trust >/dev/null
  trust_localhost "$STANDBY"
  write_conf "$v" "$STANDBY" ""
  basebackup "$v" "$STANDBY" "$STANDBY_PORT" "$PRIMARY_PORT"
  for _ in $(seq 1 120); do
    local state
    state=$(psql -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d postgres -tAc \
      "select sync_state from pg_stat_replication where state = 'streaming'")
    if [ "$mode" = sync ] && [ "$state" = sync ]; then break; fi
    if [ "$mode" = async ] && [ "$state" = async ]; then break; fi
    sleep 0.25
  done
  log "up ($mode): primary 127.0.0.1:$PRIMARY_PORT, standby 127.0.0.1:$STANDBY_PORT ($(psql -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d postgres -tAc 'select sync_state from pg_stat_replication'))"
}

# The cluster that runs and is not in recovery, and its port.
roles() {
  local name port
  for name in "$PRIMARY" "$STANDBY"; do
    port=$PRIMARY_PORT
    [ "$name" = "$STANDBY" ] && port=$STANDBY_PORT
    if [ "$(psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc 'select pg_is_in_recovery()' 2>/dev/null)" = f ]; then
      echo "$name $port"
      return 0
    fi
  done
  log "no primary is running"
  return 1
}

other() { if [ "$1" = "$PRIMARY" ]; then echo "$STANDBY $STANDBY_PORT"; else echo "$PRIMARY $PRIMARY_PORT"; fi; }

failover() {
  local stall_ms=${1:-0} v primary port standby standby_port
  v=$(version)
  read -r primary port < <(roles)
  read -r standby standby_port < <(other "$primary")
  if [ "$stall_ms" -gt 0 ]; then
    local sender
    sender=$(psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc 'select pid from pg_stat_replication limit 1')
    [ -n "$sender" ] || { log "no walsender to stall"; exit 1; }
    as_root kill -STOP "$sender"
    sleep "$(awk -v ms="$stall_ms" 'BEGIN { printf "%.3f", ms / 1000 }')"
    # Killed, not continued: it must not send what it holds. The postmaster then resets every
    # backend, and the immediate stop below ends it.
    as_root kill -KILL "$sender"
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$v" "$primary" stop -m immediate
  as_root pg_ctlcluster --skip-systemctl-redirect "$v" "$standby" promote
  for _ in $(seq 1 120); do
    [ "$(psql -h 127.0.0.1 -p "$standby_port" -U postgres -d postgres -tAc 'select pg_is_in_recovery()')" = f ] && break
    sleep 0.1
  done
  echo "$standby_port"
}

write_conf() {
  local v=$1 name=$2 sync_names=$3
  as_root tee "/etc/postgresql/$v/$name/conf.d/turnd-pair.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
max_locks_per_transaction = 1024
wal_level = replica
hot_standby = on
synchronous_standby_names = '$sync_names'
EOF
}

# Makes cluster NAME (port PORT) a streaming standby of the server on FROM, and starts it.
basebackup() {
  local v=$1 name=$2 port=$3 from=$4
  local data=/var/lib/postgresql/$v/$name
  # Emptied, not removed: the postgres user may not create directories beside it.
  as_root find "$data" -mindepth 1 -delete
  # -R writes standby.signal and primary_conninfo (application_name = the cluster name).
  as_pg pg_basebackup -h 127.0.0.1 -p "$from" -U postgres -D "$data" -R -X stream -c fast
  as_root pg_ctlcluster --skip-systemctl-redirect "$v" "$name" start
  wait_ready "$port"
}

restandby() {
  local v primary port old old_port mode sync_names=""
  v=$(version)
  read -r primary port < <(roles)
  read -r old old_port < <(other "$primary")
  mode=$(cat "$MODE_FILE" 2>/dev/null || echo async)
  [ "$mode" = sync ] && sync_names="*"
  as_root pg_ctlcluster --skip-systemctl-redirect "$v" "$old" stop -m immediate >/dev/null 2>&1 || true
  # The promoted server now waits for the rebuilt standby as the old primary did.
  write_conf "$v" "$primary" "$sync_names"
  write_conf "$v" "$old" ""
  basebackup "$v" "$old" "$old_port" "$port"
  as_root pg_ctlcluster --skip-systemctl-redirect "$v" "$primary" reload
  echo "$old_port"
}

down() {
  drop "$STANDBY"
  drop "$PRIMARY"
  as_root rm -f "$MODE_FILE"
  log "down"
}

status() {
  pg_lsclusters | awk -v a="$PRIMARY" -v b="$STANDBY" 'NR == 1 || $2 == a || $2 == b'
  local primary port
  read -r primary port < <(roles) || return 0
  psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -c \
    'select application_name, state, sync_state, write_lag, flush_lag, replay_lag from pg_stat_replication' 2>/dev/null || true
}

case "${1:-}" in
  up) up "${2:-}" ;;
  failover) failover "${2:-0}" ;;
  restandby) restandby ;;
  primary) roles | cut -d' ' -f2 ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up sync|async|failover [MS]|restandby|primary|down|status" >&2; exit 2 ;;
esac
