#!/usr/bin/env bash
# Builds (once, then reuses) a Debian root file system the systemd test boots with systemd-nspawn
# (tests/integration/systemd.rs): Debian 12 "bookworm" (systemd 252, the default) or Debian 13 "trixie"
# (systemd 257), with curl and iproute2, from Debian's packages with mmdebstrap. Prints its path. The
# cache key is the suite and this file's content, so a change here rebuilds both roots.
#
# Usage: scripts/nspawn-rootfs.sh CACHE_DIR [bookworm|trixie]
set -euo pipefail

cache=${1:?usage: nspawn-rootfs.sh CACHE_DIR [bookworm|trixie]}
suite=${2:-bookworm}
case $suite in
    bookworm | trixie) ;;
    *) echo "suite $suite: use bookworm (Debian 12) or trixie (Debian 13)" >&2; exit 64 ;;
esac
packages=systemd,systemd-sysv,dbus,libnss-systemd,ca-certificates,curl,iproute2,procps
mirror=http://deb.debian.org/debian

key=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
root=$cache/rootfs-$suite-$key
if [[ -f $root/.complete ]]; then
    echo "$root"
    exit 0
fi
command -v mmdebstrap >/dev/null 2>&1 || { echo "mmdebstrap is required: apt-get install mmdebstrap" >&2; exit 1; }
mkdir -p "$cache"
# Older roots of this suite (and the roots of before the suite was in the name).
rm -rf "$cache"/rootfs-"$suite"-* "$cache"/rootfs-????????????????  "$root.tmp"
echo "building the systemd test root file system in $root (mmdebstrap $suite: $packages)" >&2
mmdebstrap --variant=minbase --include="$packages" --format=directory "$suite" "$root.tmp" "$mirror" >&2
mv "$root.tmp" "$root"
touch "$root/.complete"
echo "$root"
