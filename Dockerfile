# syntax=docker/dockerfile:1
#
# tokend container image: a static tokend binary, a CA bundle and a passwd/group entry for its user —
# no shell, no package manager, nothing else (FROM scratch).
#
# tokend serves tokens on LOOPBACK (127.0.0.1:50342 by default). Inside a container, that is the
# container's own loopback. It is useful as a SIDECAR: in a Kubernetes pod (or with
# `podman run --network container:<tokend>`) every container shares one network namespace, so the
# application reaches tokend at 127.0.0.1:50342. Publishing the port (`-p 50342:50342`) does NOT work
# with a loopback listener. A node-wide broker serves a unix socket on a hostPath instead
# (deploy/kubernetes/daemonset.yaml).
#
# Mount at run time (never baked in):
#   /etc/tokend/tokend.toml        configuration (see config/tokend.example.toml)
#   /etc/tokend/client-secret      client secret, readable by uid 10001 (or a federated token file)
#   /run/tokend                    writable: the identity header is created there (the root file system
#                                  can stay read-only); share it with the app for IDENTITY_HEADER
# Point the app at tokend with AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:50342 (IMDS), or with
# IDENTITY_ENDPOINT=http://127.0.0.1:50342/msi/token plus IDENTITY_HEADER (App Service; every SDK).
#
# Build: `podman build -t tokend .` (or docker build). The test suite builds this file with the build
# stage replaced by a locally built static binary (--build-arg BINARY_FROM=...; tests/integration/container.rs):
# the final stage is used exactly as shipped.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
# The stage (or image) that provides /out: tokend, ca-certificates.crt, passwd, group.
ARG BINARY_FROM=build

# ---- build ---------------------------------------------------------------------------------------
FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# `tokend --version` names this commit (.git is not in the build context).
ARG TOKEND_COMMIT=unknown
WORKDIR /src
# The whole tree (filtered by .dockerignore): Cargo.toml declares tests/integration/main.rs as a
# target, so the manifest does not load without it.
COPY . .
# A static glibc binary (no libc in the final image): +crt-static with an explicit --target, so build
# scripts and proc macros stay dynamic. glibc >= 2.34 resolves names (files, dns) without NSS modules.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --bin tokend --target x86_64-unknown-linux-gnu \
 && install -d /out \
 && install -m 0755 -s target/x86_64-unknown-linux-gnu/release/tokend /out/tokend \
 && cp /etc/ssl/certs/ca-certificates.crt /out/ca-certificates.crt \
 && echo 'tokend:x:10001:10001:tokend:/nonexistent:/sbin/nologin' > /out/passwd \
 && echo 'tokend:x:10001:' > /out/group

FROM ${BINARY_FROM} AS binary

# ---- runtime -------------------------------------------------------------------------------------
FROM scratch
COPY --from=binary /out/tokend /usr/local/bin/tokend
COPY --from=binary /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=binary /out/passwd /etc/passwd
COPY --from=binary /out/group /etc/group
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
