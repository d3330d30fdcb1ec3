#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests against the real
# PostgreSQL and RabbitMQ on 127.0.0.1 (started, or installed, when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/test-tools.sh   # chromium + chromedriver, promtool (when missing)
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo build --bins --locked
cargo test --locked -- --test-threads 2
