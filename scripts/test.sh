#!/usr/bin/env bash
# The one test command of the project: formatting, lints and all tests (unit + integration).
# Integration tests use a real identity provider (tests/idp, Node.js) and real Azure SDK clients
# (tests/clients: Python venv in .venv-test, JavaScript in tests/clients/js, the Azure CLI in
# .venv-azcli), and schemathesis (.venv-contract) checks tokend against docs/openapi.yaml; all are
# installed here on first use and reused after.
#
# Usage: scripts/test.sh [ARGS...]    ARGS are passed to `cargo test` (e.g. a test-name filter).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

banner() {
    printf '\n==> %s\n' "$*"
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# ---- prerequisites ---------------------------------------------------------------------------
banner "Checking prerequisites"
command -v cargo >/dev/null 2>&1 \
    || die "cargo is required to build and test tokend: install Rust from https://rustup.rs (or apt-get install cargo)"
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
    || die "node and npm are required for the test IdP: apt-get install nodejs npm"
command -v python3 >/dev/null 2>&1 \
    || die "python3 is required for the Azure SDK test clients: apt-get install python3 python3-venv"

# ---- test identity provider (npm) --------------------------------------------------------------
IDP_DIR=tests/idp
if [[ ! -f $IDP_DIR/node_modules/.package-lock.json || $IDP_DIR/package-lock.json -nt $IDP_DIR/node_modules/.package-lock.json ]]; then
    banner "Installing the test IdP's npm dependencies ($IDP_DIR)"
    npm ci --prefix "$IDP_DIR" --no-audit --no-fund
else
    echo "test IdP dependencies are up to date ($IDP_DIR/node_modules)"
fi

# ---- Azure SDK client for JavaScript (npm) ------------------------------------------------------
JS_DIR=tests/clients/js
if [[ ! -f $JS_DIR/node_modules/.package-lock.json || $JS_DIR/package-lock.json -nt $JS_DIR/node_modules/.package-lock.json ]]; then
    banner "Installing the JavaScript Azure SDK test client's npm dependencies ($JS_DIR)"
    npm ci --prefix "$JS_DIR" --no-audit --no-fund
else
    echo "JavaScript Azure SDK test client dependencies are up to date ($JS_DIR/node_modules)"
fi

# ---- Azure SDK clients (Python venv) -----------------------------------------------------------
VENV=.venv-test
LOCK=tests/clients/requirements.lock
STAMP=$VENV/.installed
if [[ ! -x $VENV/bin/python || ! -f $STAMP || $LOCK -nt $STAMP ]]; then
    banner "Installing the Azure SDK test clients into $VENV ($LOCK)"
    if [[ ! -x $VENV/bin/python ]]; then
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV"; then
            rm -rf "$VENV"
            die "'python3 -m venv' failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
        fi
    fi
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$LOCK"
    touch "$STAMP"
else
    echo "Azure SDK test clients are up to date ($VENV)"
fi

# ---- Azure CLI (Python venv) ---------------------------------------------------------------------
AZ_VENV=.venv-azcli
AZ_LOCK=tests/clients/azcli/requirements.lock
AZ_STAMP=$AZ_VENV/.installed
if [[ ! -x $AZ_VENV/bin/az || ! -f $AZ_STAMP || $AZ_LOCK -nt $AZ_STAMP ]]; then
    banner "Installing the Azure CLI test client into $AZ_VENV ($AZ_LOCK)"
    if [[ ! -x $AZ_VENV/bin/python ]]; then
        rm -rf "$AZ_VENV"
        if ! python3 -m venv "$AZ_VENV"; then
            rm -rf "$AZ_VENV"
            die "'python3 -m venv' failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
        fi
    fi
    "$AZ_VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$AZ_LOCK"
    touch "$AZ_STAMP"
else
    echo "Azure CLI test client is up to date ($AZ_VENV)"
fi

# ---- schemathesis (Python venv), for the contract test against docs/openapi.yaml --------------------
ST_VENV=.venv-contract
ST_LOCK=tests/contract/requirements.lock
ST_STAMP=$ST_VENV/.installed
if [[ ! -x $ST_VENV/bin/st || ! -f $ST_STAMP || $ST_LOCK -nt $ST_STAMP ]]; then
    banner "Installing schemathesis into $ST_VENV ($ST_LOCK)"
    if [[ ! -x $ST_VENV/bin/python ]]; then
        rm -rf "$ST_VENV"
        if ! python3 -m venv "$ST_VENV"; then
            rm -rf "$ST_VENV"
            die "'python3 -m venv' failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
        fi
    fi
    "$ST_VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$ST_LOCK"
    touch "$ST_STAMP"
else
    echo "schemathesis is up to date ($ST_VENV)"
fi

export TOKEND_TEST_PYTHON=$ROOT/$VENV/bin/python
export TOKEND_TEST_AZ=$ROOT/$AZ_VENV/bin/az
export TOKEND_TEST_SCHEMATHESIS=$ROOT/$ST_VENV/bin/st
export TOKEND_TEST_IDP_DIR=$ROOT/$IDP_DIR
export TOKEND_TEST_JS_DIR=$ROOT/$JS_DIR

# ---- Rust ----------------------------------------------------------------------------------------
banner "cargo fmt --all -- --check"
cargo fmt --all -- --check

banner "cargo clippy --all-targets --locked -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

# The Rust SDK client the compatibility tests run (cargo test builds examples only in test mode).
banner "cargo build --locked --examples"
cargo build --locked --examples

banner "cargo test --locked --all-targets $*"
cargo test --locked --all-targets "$@"

banner "All checks passed"
