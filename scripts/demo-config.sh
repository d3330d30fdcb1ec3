#!/usr/bin/env bash
# Writes the demo's config: config/turnd.toml with the local PostgreSQL's `postgres` user (the
# example's URL names no user; scripts/services.sh lets `postgres` in over 127.0.0.1) and a
# state directory under target/demo. The demo and every command it and the README print use
# this file, so they work exactly as printed. Usage: scripts/demo-config.sh [OUT_DIR]
# (default target/demo; run from anywhere).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/target/demo}
mkdir -p "$out/state"
out=$(cd "$out" && pwd)
sed -e 's|^url = "postgres://127.0.0.1:5432/turnd"$|url = "postgres://postgres@127.0.0.1:5432/turnd"|' \
    -e "s|^state_dir = \"/var/lib/turnd\"\$|state_dir = \"$out/state\"|" \
    "$repo/config/turnd.toml" > "$out/turnd.toml.new"
grep -q '^url = "postgres://postgres@' "$out/turnd.toml.new" \
  || { echo "demo-config: config/turnd.toml's database.url changed; update $0" >&2; exit 1; }
mv "$out/turnd.toml.new" "$out/turnd.toml"
echo "$out/turnd.toml"
