#!/usr/bin/env bash
# Builds the Debian package with `cargo deb` and checks it: contents (dpkg-deb -c), control
# data and conffiles (dpkg-deb -I), lintian (errors fail; SKIPPED when lintian is missing) and
# an unpack into a scratch root (dpkg-deb -x) whose turnd runs and accepts its shipped config.
# cargo-deb comes from crates.io (scripts/test-tools.sh installs it); without it this prints
# SKIPPED. README "Debian package". Output: target/debian/turnd_<version>_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'deb: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

if ! cargo deb --version >/dev/null 2>&1; then
  log "SKIPPED: cargo-deb is not installed (scripts/test-tools.sh installs it: cargo install cargo-deb)"
  exit 0
fi

# TURND_SHIP_PROFILE=dev checks the packaging with the debug build CI already has (the
# contents and scripts are the same; a release build would add minutes to CI).
profile=${TURND_SHIP_PROFILE:-release}
cargo build --profile "$profile" --locked --bin turnd --bin turnd-demo-worker
# Completions and man pages from the clap definitions; the packaged unit runs /usr/bin/turnd.
rm -rf target/assets
cargo run --profile "$profile" --locked -q --example assets -- target/assets
rm -f target/assets/man/*-help*.1
gzip -9n target/assets/man/*.1
sed 's|/usr/local/bin/turnd|/usr/bin/turnd|g' systemd/turnd.service > target/assets/turnd.service
grep -q '^ExecStart=/usr/bin/turnd run --config /etc/turnd/turnd.toml$' target/assets/turnd.service \
  || fail "the packaged unit's ExecStart"
rm -rf target/debian
cargo deb --profile "$profile" --no-build --locked --strip --output target/debian/ >/dev/null
deb=$(ls target/debian/turnd_*.deb)
log "built $deb"

contents=$(dpkg-deb -c "$deb")
for path in ./usr/bin/turnd ./usr/bin/turnd-demo-worker ./etc/turnd/turnd.toml \
    ./usr/lib/systemd/system/turnd.service ./usr/share/man/man1/turnd.1.gz \
    ./usr/share/man/man1/turnd-run.1.gz ./usr/share/bash-completion/completions/turnd \
    ./usr/share/zsh/vendor-completions/_turnd ./usr/share/fish/vendor_completions.d/turnd.fish \
    ./usr/share/doc/turnd/copyright; do
  grep -q " $path\$" <<<"$contents" || fail "$path is not in the package: $contents"
done
if grep -E ' \./usr/bin/turnd-(test-worker|bench|chaos)$' <<<"$contents"; then
  fail "a test or bench binary is in the package"
fi
info=$(dpkg-deb -I "$deb")
grep -q '^ Package: turnd$' <<<"$info" || fail "package name"
grep -Eq '^ Depends: .*adduser' <<<"$info" || fail "Depends lacks adduser (postinst creates the turnd user)"
grep -Eq '^ Depends: .*libc6' <<<"$info" || fail "Depends lacks libc6 (\$auto)"
[ "$(dpkg-deb -f "$deb" Package)" = turnd ] || fail "control"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -e "$deb" "$work/control"
grep -qx /etc/turnd/turnd.toml "$work/control/conffiles" || fail "/etc/turnd/turnd.toml is not a conffile"
grep -q 'adduser --system' "$work/control/postinst" || fail "postinst does not create the turnd user"
grep -q 'deb-systemd-helper' "$work/control/postinst" || fail "postinst does not register the unit"
sh -n "$work/control/postinst" && sh -n "$work/control/postrm" || fail "maintainer script syntax"

# A scratch root: the files as installed; turnd runs from there and takes its config.
dpkg-deb -x "$deb" "$work/root"
"$work/root/usr/bin/turnd" --version >/dev/null || fail "turnd --version from the scratch root"
env -i "$work/root/usr/bin/turnd" check-config --config "$work/root/etc/turnd/turnd.toml" >/dev/null \
  || fail "turnd check-config of the packaged config"
cmp -s "$work/root/etc/turnd/turnd.toml" config/turnd.toml || fail "the packaged config differs"
zcat "$work/root/usr/share/man/man1/turnd.1.gz" | grep -q 'config' || fail "man page"
grep -q -- '--config' "$work/root/usr/share/bash-completion/completions/turnd" || fail "bash completion"
if command -v systemd-analyze >/dev/null 2>&1; then
  # The unit as packaged, checked against the binary it names (from the scratch root).
  sed "s|/usr/bin/turnd|$work/root/usr/bin/turnd|" "$work/root/usr/lib/systemd/system/turnd.service" > "$work/turnd.service"
  systemd-analyze verify "$work/turnd.service" 2>&1 | grep -v -e 'network-online' -e 'postgresql' -e 'rabbitmq' -e 'Documentation' || true
fi

if command -v lintian >/dev/null 2>&1; then
  # Errors fail; warnings are shown. Suppressed: what a cargo-built package is by design
  # (no changelog of Debian's own, built outside Debian's infrastructure).
  lintian --tag-display-limit 0 --fail-on error \
    --suppress-tags no-changelog,debian-changelog-file-missing-or-wrong-name,unstripped-binary-or-object,no-manual-page,initial-upload-closes-no-bugs,maintainer-address-malformed,maintainer-address-is-on-localhost,changelog-file-missing-in-native-package \
    "$deb" || fail "lintian"
  log "lintian: no errors"
else
  log "SKIPPED lintian: not installed (apt-get install lintian)"
fi
log "checked $deb: contents, control, conffiles, maintainer scripts, scratch-root unpack"
