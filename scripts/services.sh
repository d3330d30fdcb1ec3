#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ run on 127.0.0.1 the way turnd's demo and tests expect
# (PostgreSQL on 5432 with trust auth for local TCP, RabbitMQ on 5672 with guest/guest).
# Installs Debian's packages when they are missing. Safe to run again: it changes nothing
# that already works.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
log() { printf 'services: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  log "$what did not open port $port"; return 1
}

missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql postgresql-client)
command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# PostgreSQL
if ! port_open 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_port 5432 PostgreSQL
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  log "allowing trust auth for 127.0.0.1 in $hba (local development only)"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  for _ in $(seq 1 40); do
    psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1 && break
    sleep 0.25
  done
  psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null
fi

# RabbitMQ
if ! port_open 5672; then
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached
  wait_port 5672 RabbitMQ
  as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
log "PostgreSQL and RabbitMQ are up"
