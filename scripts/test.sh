#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests against the real
# PostgreSQL and RabbitMQ on 127.0.0.1 (started, or installed, when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/test-tools.sh   # chromium + chromedriver, promtool, cargo-deb, lintian, kubernetes-validate, hadolint (when missing)
cargo fmt --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every binary of the workspace, the tools' too: the integration tests run turnd and
# turnd-test-worker (a bin of tools/harness, which `cargo test` does not build for them).
# All targets at once: the same dependency features as `cargo test --workspace` below, so
# nothing is compiled twice.
cargo build --workspace --all-targets --locked
# Shipping (README "Container image", "Kubernetes", "Debian package"): the image's root
# filesystem, the Debian package and the kustomize base, each built and checked. The debug
# build stands in for the release one (same paths and contents; a release build would add
# minutes). A missing optional tool prints SKIPPED.
TURND_SHIP_PROFILE=dev bash scripts/image.sh
TURND_SHIP_PROFILE=dev bash scripts/deb.sh
bash scripts/kubernetes.sh
cargo test --workspace --locked -- --test-threads 2
# The CI-sized chaos run: 3 daemons, a few hundred turns, every fault at least once. It restarts
# the shared RabbitMQ and PostgreSQL, so it runs after every other test, alone. Seeded (a
# failure prints the seed to replay; TURND_CHAOS_SEED picks another); README "Chaos".
target/debug/turnd-chaos --seed "${TURND_CHAOS_SEED:-8}" --turns 300 --conversations 30 --duration 2m
