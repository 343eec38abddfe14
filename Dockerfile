# syntax=docker/dockerfile:1
#
# tokend container image.
#
# tokend serves tokens on LOOPBACK (127.0.0.1:50342 by default). Inside a container, that is the
# container's own loopback. It is useful as a SIDECAR: in a Kubernetes pod (or with
# `docker run --network container:<app>`) every container shares one network namespace, so the
# application reaches tokend at 127.0.0.1:50342. Publishing the port (`-p 50342:50342`) does NOT work
# with a loopback listener: Docker forwards to the container's eth0 address. Any other setup needs
# `[server] allow_non_loopback = true` plus a listen address on that interface. Then anyone who can
# reach that address gets tokens, so restrict it at the network level.
#
# Mount at run time:
#   /etc/tokend/tokend.toml        configuration (see config/tokend.example.toml)
#   /etc/tokend/client-secret      client secret, readable by uid 10001 (tokend logs a harmless warning
#                                  when its group or others can read it too, as with most secret volumes)
#   /run/tokend                    optional: share it (emptyDir) with the app so it can read IDENTITY_HEADER
#                                  from /run/tokend/identity-header; the IMDS route needs no secret
# Point the app at tokend with AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:50342 (IMDS), or with
# IDENTITY_ENDPOINT=http://127.0.0.1:50342/msi/token plus IDENTITY_HEADER (App Service; works with every SDK).
#
# No HEALTHCHECK: the runtime image has no curl/wget and tokend has no probe subcommand (`tokend token`
# is NOT one: it prints a live token, which Docker would keep in the health log). Use orchestrator
# probes on GET /healthz (liveness) and /readyz (readiness), run inside the pod's network namespace.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build ---------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole tree (filtered by .dockerignore): Cargo.toml declares tests/integration/main.rs as a
# target, so the manifest does not load without it.
COPY . .
# The cache mounts keep the registry and target/ between builds; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tokend \
 && install -m 0755 target/release/tokend /usr/local/bin/tokend

# ---- runtime -------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tokend \
 && useradd --system --uid 10001 --gid tokend --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin tokend \
 && install -d -m 0755 /etc/tokend \
 && install -d -m 0750 -o tokend -g tokend /run/tokend
COPY --from=build /usr/local/bin/tokend /usr/local/bin/tokend

USER 10001:10001
ENV TOKEND_LOG=info
# Documentation only: the listener is on loopback (see above).
EXPOSE 50342
# Exit codes: 0 stopped by SIGTERM/SIGINT, 1 runtime failure, 64 configuration error (do not restart-loop).
STOPSIGNAL SIGTERM
# Healthy once every configured token is cached (/readyz); one line, exit 0 or 1, never a token.
HEALTHCHECK --interval=30s --timeout=12s --start-period=60s \
    CMD ["/usr/local/bin/tokend", "health", "--config", "/etc/tokend/tokend.toml"]
ENTRYPOINT ["/usr/local/bin/tokend"]
CMD ["serve", "--config", "/etc/tokend/tokend.toml"]
