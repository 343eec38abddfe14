#!/usr/bin/env bash
# The one test command of the project: formatting, lints and all tests (unit + integration).
# Integration tests use a real identity provider (tests/idp, Node.js) and real Azure SDK clients
# (tests/clients: Python venv in .venv-test, JavaScript in tests/clients/js, the Azure CLI in
# .venv-azcli, the Rust SDK crate tests/clients/rust built into target/rust-sdk-client), and
# schemathesis (.venv-contract) checks tokend against docs/openapi.yaml; a Debian root file system
# (target/nspawn) and the static release binary serve the real-systemd and container tests, and
# kubernetes-validate (.venv-k8s) the manifests; all are installed or built here on first use and
# reused after.
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
    || die "cargo is required to build and test tokend: install Rust >= 1.95 with rustup (https://rustup.rs); Debian's cargo is too old"
# Edition 2024 and the crates' MSRVs need Rust >= 1.95 (Debian 12's packaged cargo is 1.65).
rust_version=$(rustc --version | sed -n 's/^rustc \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r rust_major rust_minor <<<"$rust_version"
if [[ -z ${rust_major:-} ]] || (( rust_major < 1 || (rust_major == 1 && rust_minor < 95) )); then
    die "Rust >= 1.95 is required ($(rustc --version)): rustup update stable (or install rustup from https://rustup.rs)"
fi
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing: rustup component add clippy"
command -v ip >/dev/null 2>&1 || die "ip is required for the network-namespace tests: apt-get install iproute2"
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
    || die "node and npm are required for the test IdP: apt-get install nodejs npm"
command -v python3 >/dev/null 2>&1 \
    || die "python3 is required for the Azure SDK test clients: apt-get install python3 python3-venv"

# Debian packages the tests run: systemd-nspawn (the real-systemd test), mmdebstrap (its root file
# system), promtool (the metrics check), podman with runc and catatonit (the container image, pods).
# Installed here when missing and this runs as root with apt.
missing=()
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v logrotate >/dev/null 2>&1 || missing+=(logrotate)
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v catatonit >/dev/null 2>&1 || [[ -x /usr/libexec/podman/catatonit ]] || missing+=(catatonit)
[[ -e /usr/lib/softhsm/libsofthsm2.so ]] || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || missing+=(opensc)
[[ -n "$(find /usr/lib -name pkcs11.so -path '*engines*' 2>/dev/null | head -1)" ]] || missing+=(libengine-pkcs11-openssl)
command -v swtpm >/dev/null 2>&1 || missing+=(swtpm)
command -v tpm2-abrmd >/dev/null 2>&1 || missing+=(tpm2-abrmd)
command -v dbus-daemon >/dev/null 2>&1 || missing+=(dbus)
command -v tpm2_ptool >/dev/null 2>&1 || missing+=(libtpm2-pkcs11-tools)
[[ -e /usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so ]] || missing+=(libtpm2-pkcs11-1)
[[ -n "$(find /usr/lib -name 'libtss2-tcti-swtpm.so*' 2>/dev/null | head -1)" ]] || missing+=(libtss2-tcti-swtpm0)
[[ -n "$(find /usr/lib -name 'libtss2-tcti-tabrmd.so*' 2>/dev/null | head -1)" ]] || missing+=(libtss2-tcti-tabrmd0)
if ((${#missing[@]})); then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        banner "Installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "${missing[@]}" \
            || { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
            || die "cannot install ${missing[*]}: apt-get install ${missing[*]}"
    else
        die "the tests need ${missing[*]}: apt-get install ${missing[*]} (as root)"
    fi
fi

# ---- installs, each redone only when its lock file changed -------------------------------------
# npm_install DIR WHAT: `npm ci` in DIR when node_modules is missing or older than the lock.
npm_install() {
    local dir=$1 what=$2
    if [[ ! -f $dir/node_modules/.package-lock.json || $dir/package-lock.json -nt $dir/node_modules/.package-lock.json ]]; then
        banner "Installing $what ($dir, npm ci)"
        npm ci --prefix "$dir" --no-audit --no-fund
    else
        echo "$what: up to date ($dir/node_modules)"
    fi
}

# venv_install VENV LOCK PROBE WHAT: a Python venv from a fully pinned lock; PROBE is a file under
# VENV/bin whose absence means an incomplete install.
venv_install() {
    local venv=$1 lock=$2 probe=$3 what=$4
    if [[ ! -x $venv/bin/$probe || ! -f $venv/.installed || $lock -nt $venv/.installed ]]; then
        banner "Installing $what into $venv ($lock)"
        if [[ ! -x $venv/bin/python ]]; then
            rm -rf "$venv"
            if ! python3 -m venv "$venv"; then
                rm -rf "$venv"
                die "'python3 -m venv' failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
            fi
        fi
        "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$lock"
        touch "$venv/.installed"
    else
        echo "$what: up to date ($venv)"
    fi
}

IDP_DIR=tests/idp
JS_DIR=tests/clients/js
VENV=.venv-test
AZ_VENV=.venv-azcli
ST_VENV=.venv-contract
npm_install "$IDP_DIR" "the test IdP"
npm_install "$JS_DIR" "the JavaScript Azure SDK client"
venv_install "$VENV" tests/clients/requirements.lock python "the Python Azure SDK clients"
venv_install "$AZ_VENV" tests/clients/azcli/requirements.lock az "the Azure CLI"
venv_install "$ST_VENV" tests/contract/requirements.lock st "schemathesis"
venv_install .venv-k8s tests/k8s/requirements.lock kubernetes-validate "kubernetes-validate"
export TOKEND_TEST_KUBERNETES_VALIDATE=$ROOT/.venv-k8s/bin/kubernetes-validate

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

# The Rust SDK client the compatibility tests run: its own crate with its own Cargo.lock, so the SDK's
# dependencies stay out of tokend's builds.
banner "cargo build --locked --manifest-path tests/clients/rust/Cargo.toml --target-dir target/rust-sdk-client"
cargo build --locked --manifest-path tests/clients/rust/Cargo.toml --target-dir target/rust-sdk-client
export TOKEND_TEST_RUST_SDK=$ROOT/target/rust-sdk-client/debug/rust_sdk_token

# The real-systemd test boots two Debian root file systems (built once with mmdebstrap, cached under
# target/nspawn), Debian 12 (systemd 252) and Debian 13 (systemd 257): the credential directory's
# modes differ between them. Both are built at once (mostly downloads and dpkg).
banner "Debian 12 and 13 root file systems for the systemd test (scripts/nspawn-rootfs.sh)"
scripts/nspawn-rootfs.sh target/nspawn trixie >target/nspawn-trixie.path &
trixie=$!
TOKEND_TEST_NSPAWN_ROOT_12=$ROOT/$(scripts/nspawn-rootfs.sh target/nspawn bookworm)
wait "$trixie" || die "cannot build the Debian 13 root: scripts/nspawn-rootfs.sh target/nspawn trixie"
TOKEND_TEST_NSPAWN_ROOT_13=$ROOT/$(cat target/nspawn-trixie.path)
export TOKEND_TEST_NSPAWN_ROOT_12 TOKEND_TEST_NSPAWN_ROOT_13
echo "$TOKEND_TEST_NSPAWN_ROOT_12 $TOKEND_TEST_NSPAWN_ROOT_13"

# One release build serves the systemd test and the container image: static (+crt-static, with an
# explicit --target so that build scripts and proc macros stay dynamic), as the Dockerfile builds it.
HOST_TARGET=$(rustc -vV | sed -n 's/^host: //p')
banner "RUSTFLAGS=-Ctarget-feature=+crt-static cargo build --release --locked --target $HOST_TARGET --bin tokend"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$HOST_TARGET" --bin tokend
export TOKEND_TEST_STATIC_BIN=$ROOT/target/$HOST_TARGET/release/tokend
export TOKEND_TEST_RELEASE_BIN=$TOKEND_TEST_STATIC_BIN

# The fuzz targets' corpus and regression inputs (fuzz/corpus, fuzz/regressions) replayed through the
# same checks the fuzzers run, on stable Rust without cargo-fuzz (docs/fuzzing.md).
banner "cargo test --locked --features fuzzing --test fuzz_corpus"
cargo test --locked --features fuzzing --test fuzz_corpus

banner "cargo test --locked --all-targets $*"
cargo test --locked --all-targets "$@"

banner "All checks passed"
