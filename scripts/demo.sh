#!/usr/bin/env bash
# Runs turnd against the local services with the bundled demo worker, sends one turn and
# prints its reply, then keeps the daemon in the foreground (Ctrl-C stops it gracefully).
# Everything it prints works as printed from the repository's root, in another terminal:
# the config is a file (target/demo/turnd.toml, by scripts/demo-config.sh), not this shell's
# environment. tests/it/as_printed.rs runs those commands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo build --release --bins --locked
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'turnd'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE turnd'
bash scripts/demo-config.sh >/dev/null

target/release/turnd run --config target/demo/turnd.toml &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon' INT TERM
target/release/turnd send --config target/demo/turnd.toml --wait --timeout 30s hello
cat <<'MSG'

turnd is running. In another terminal, from the repository's root:
  target/release/turnd send --config target/demo/turnd.toml --wait "your text"
  target/release/turnd status --config target/demo/turnd.toml
  curl -s 127.0.0.1:9187/metrics | grep turnd_
Ctrl-C stops it.
MSG
wait $daemon
