# turnd's container image. Multi-stage: the build on Debian's Rust image, the runtime on
# debian-slim of the same release (same glibc), running as the non-root user turnd (10001).
# CI cannot run a docker engine: scripts/image.sh builds the same root filesystem without
# one and lints this file (README "Container image").
#
#   docker build -t turnd:0.1.0 .
#   docker run --rm -e TURND_DATABASE__URL=... -e TURND_AMQP__URL=... -p 9188:9188 turnd:0.1.0
#
# To add a worker's runtime (Python, Node, …) build FROM this image:
# deploy/container/python-worker.Dockerfile.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The manifests first: the dependency build is cached until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock build.rs ./
# Patched crates ([patch.crates-io] in Cargo.toml).
COPY patches patches
COPY migrations migrations
COPY src src
COPY examples examples
# The workspace's tool crates (bench, chaos, test harness): cargo reads every member's manifest
# to resolve the workspace, though only turnd's binaries are built here.
COPY tools tools
RUN cargo build --release --locked --bin turnd --bin turnd-demo-worker

FROM debian:bookworm-slim
# The user and the paths below are the ones scripts/image.sh lays out (and checks).
RUN groupadd --system --gid 10001 turnd \
 && useradd --system --uid 10001 --gid turnd --home-dir /var/lib/turnd --no-create-home \
      --shell /usr/sbin/nologin turnd \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/turnd
COPY --from=build /src/target/release/turnd /src/target/release/turnd-demo-worker /usr/bin/
COPY config/turnd.toml /etc/turnd/turnd.toml
# Probes and Prometheus reach the ops listener (only /metrics, /healthz, /readyz); the console
# stays on the pod's loopback (http.listen).
ENV TURND_HTTP__OPS_LISTEN=0.0.0.0:9188
EXPOSE 9188
USER 10001:10001
WORKDIR /var/lib/turnd
# turnd is PID 1: it reaps every orphan of the container (a subreaper anyway), so no init.
# SIGTERM drains (shutdown.grace), SIGHUP reloads log.level and the HTTP tokens.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/turnd"]
CMD ["run", "--config", "/etc/turnd/turnd.toml"]
