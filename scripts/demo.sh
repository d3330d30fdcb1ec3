#!/usr/bin/env bash
# Runs turnd against the local services with the bundled demo worker, sends one turn and
# prints its reply, then keeps the daemon in the foreground (Ctrl-C stops it gracefully).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo build --release --bins --locked
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'turnd'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE turnd'

export TURND_DATABASE__URL=${TURND_DATABASE__URL:-postgres://postgres@127.0.0.1:5432/turnd}
export TURND_DAEMON__STATE_DIR=${TURND_DAEMON__STATE_DIR:-$PWD/target/demo-state}
bin=$PWD/target/release
"$bin/turnd" run --config config/turnd.toml &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon' INT TERM
"$bin/turnd" send --config config/turnd.toml --wait --timeout 30s hello
cat <<MSG

turnd is running (pid $daemon). In another terminal:
  $bin/turnd send --config config/turnd.toml --wait "your text"
  $bin/turnd status --config config/turnd.toml
  curl -s 127.0.0.1:9187/metrics
Ctrl-C stops it.
MSG
wait $daemon
