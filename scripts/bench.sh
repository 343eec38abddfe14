#!/usr/bin/env bash
# The benchmark command (BENCHMARKS.md): builds the release tokend and the baseline server, makes sure
# the test IdP's packages and wrk are there, then runs scripts/bench.py (a few minutes). Never part of
# the test suite's pass/fail: timing on a shared machine is noisy.
#
# Usage: scripts/bench.sh          (BENCH_ROUNDS=5 BENCH_SECONDS=4 by default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v wrk >/dev/null 2>&1 || {
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk
    else
        echo "wrk is required: apt-get install wrk" >&2
        exit 1
    fi
}
[[ -d tests/idp/node_modules/oidc-provider ]] || npm ci --prefix tests/idp --no-audit --no-fund
# Two builds: an example pulls in dev-dependencies, whose features would then be unified into the
# tokend binary too (tokio's test-util among them: 0.5 MiB more than the binary users build).
cargo build --release --locked --bin tokend
cargo build --release --locked --example baseline
exec python3 scripts/bench.py "$@"
