#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, from Debian's package, beside the shared node
# rabbit@localhost (5672), which it never touches. For tests/it/past_one_machine.rs, turnd-chaos's
# node-stop and leader-stop faults, and README "Running past one machine".
#
#   scripts/rabbit-cluster.sh up            start (or finish starting) all three nodes, clustered
#   scripts/rabbit-cluster.sh down          stop every node and remove its directories
#   scripts/rabbit-cluster.sh stop N        stop node N (1-3) as an outage would (its data kept)
#   scripts/rabbit-cluster.sh start N       start node N again (it rejoins the cluster)
#   scripts/rabbit-cluster.sh urls          the AMQP URLs, comma-separated (TURND_AMQP__URL form)
#   scripts/rabbit-cluster.sh status        cluster status as node 1 sees it
#
# Node N: name turnd-rN@localhost, AMQP port 5680+N, distribution port 25680+N, everything in
# $TURND_RABBIT_CLUSTER_DIR/rN (default /tmp/turnd-rabbit-cluster, owned by the rabbitmq user,
# which the Debian wrapper runs the server as). Same Erlang cookie as the shared node (the
# rabbitmq user's). Nodes are stopped by name, never by a process pattern.
set -euo pipefail

DIR=${TURND_RABBIT_CLUSTER_DIR:-/tmp/turnd-rabbit-cluster}
NODES=(1 2 3)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -E "$@"; fi; }
log() { printf 'rabbit-cluster: %s\n' "$*" >&2; }
name() { echo "turnd-r$1@localhost"; }
amqp_port() { echo $((5680 + $1)); }
dist_port() { echo $((25680 + $1)); }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ctl() { local n=$1; shift; as_root rabbitmqctl -q -n "$(name "$n")" "$@"; }

# The environment of node N (the Debian wrapper keeps RABBITMQ_* through `su`; these win over
# /etc/rabbitmq/rabbitmq-env.conf, which names the shared node).
node_env() {
  local n=$1 d="$DIR/r$1"
  echo RABBITMQ_NODENAME="$(name "$n")" \
    RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
    RABBITMQ_DIST_PORT="$(dist_port "$n")" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$d/pid" \
    RABBITMQ_FEATURE_FLAGS_FILE="$d/feature_flags" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
}

ensure_installed() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  fi
}

prepare() {
  local n=$1 d="$DIR/r$1"
  as_root mkdir -p "$d/mnesia" "$d/log"
  # listeners.tcp.local: the system rabbitmq.conf pins 5672, so every node needs its own file.
  # The management plugin stays off (not needed; it would want a port of its own).
  as_root sh -c "cat > '$d/rabbitmq.conf'" <<EOF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$n")
loopback_users = none
# Quorum queues spread their leaders over the nodes (default on 3.10 is client-local).
queue_leader_locator = balanced
EOF
  as_root sh -c "echo '[].' > '$d/enabled_plugins'"
  as_root chown -R rabbitmq:rabbitmq "$DIR"
}

start_node() {
  local n=$1
  if port_open "$(amqp_port "$n")"; then return 0; fi
  prepare "$n"
  # shellcheck disable=SC2046
  as_root env $(node_env "$n") rabbitmq-server -detached
}

await_node() {
  local n=$1
  for _ in $(seq 1 120); do
    if port_open "$(amqp_port "$n")" && ctl "$n" await_startup >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "node $(name "$n") did not start; its log: $DIR/r$n/log"
  return 1
}

joined() { ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"$(name "$1")\""; }

up() {
  ensure_installed
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for n in 2 3; do
    # `running_nodes` lists only nodes of one cluster, so a node already joined is left alone.
    if ! ctl 1 cluster_status --formatter json | grep -q "running_nodes.*$(name "$n")"; then
      log "joining $(name "$n") to $(name 1)"
      # Quiet unless it fails: a joining node logs expected errors about itself being down.
      local out
      if ! out=$({ ctl "$n" stop_app && ctl "$n" reset && ctl "$n" join_cluster "$(name 1)" \
        && ctl "$n" start_app; } 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
      fi
    fi
  done
  for n in "${NODES[@]}"; do await_node "$n"; done
  log "up: $(urls)"
}

stop_node() {
  local n=$1
  if ctl "$n" status >/dev/null 2>&1; then
    ctl "$n" stop >/dev/null 2>&1 || true
  fi
  for _ in $(seq 1 60); do
    port_open "$(amqp_port "$n")" || return 0
    sleep 0.5
  done
  log "node $(name "$n") still listens after stop"
  return 1
}

down() {
  for n in "${NODES[@]}"; do stop_node "$n" || true; done
  # Every node stopped by name above; a node whose beam is still alive is named here, not killed
  # by pattern (it would be a bug to chase, not something to hide).
  local left
  left=$(pgrep -f -- "-sname turnd-r[123]@localhost" || true)
  if [ -n "$left" ]; then
    log "still running after stop: $left ($(name 1)…$(name 3)); not removing $DIR"
    return 1
  fi
  as_root rm -rf "$DIR"
  log "down"
}

urls() {
  local out=()
  for n in "${NODES[@]}"; do out+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
  (IFS=,; echo "${out[*]}")
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  stop) stop_node "${2:?node 1-3}" ;;
  start) ensure_installed; start_node "${2:?node 1-3}"; await_node "$2" ;;
  urls) urls ;;
  status) ctl 1 cluster_status ;;
  *) echo "usage: $0 up|down|stop N|start N|urls|status" >&2; exit 2 ;;
esac
