#!/usr/bin/env bash
# Builds (once, then reuses) the Debian root file system the systemd test boots with systemd-nspawn
# (tests/integration/systemd.rs): Debian 12 with systemd 252, curl and iproute2, from Debian's packages
# with mmdebstrap. Prints its path. The cache key is this file's content, so a change here rebuilds it.
#
# Usage: scripts/nspawn-rootfs.sh CACHE_DIR
set -euo pipefail

cache=${1:?usage: nspawn-rootfs.sh CACHE_DIR}
packages=systemd,systemd-sysv,dbus,libnss-systemd,ca-certificates,curl,iproute2,procps
suite=bookworm
mirror=http://deb.debian.org/debian

key=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
root=$cache/rootfs-$key
if [[ -f $root/.complete ]]; then
    echo "$root"
    exit 0
fi
command -v mmdebstrap >/dev/null 2>&1 || { echo "mmdebstrap is required: apt-get install mmdebstrap" >&2; exit 1; }
mkdir -p "$cache"
rm -rf "$cache"/rootfs-* "$root.tmp"
echo "building the systemd test root file system in $root (mmdebstrap $suite: $packages)" >&2
mmdebstrap --variant=minbase --include="$packages" --format=directory "$suite" "$root.tmp" "$mirror" >&2
mv "$root.tmp" "$root"
touch "$root/.complete"
echo "$root"
