#!/bin/sh
# Checks for the Debian packages libpresence builds and tests with.  As root
# it installs the missing ones; otherwise it names the command and fails.
set -u
need=""
for pkg in liburcu-dev liblmdb-dev libcmocka-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
        need="$need $pkg"
done
command -v cc >/dev/null 2>&1 || need="$need gcc"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ]; then
    echo "installing missing packages:$need" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq $need >/dev/null || {
        echo "apt-get install failed for:$need" >&2; exit 1; }
    exit 0
fi
echo "missing Debian packages:$need" >&2
echo "install them with:  sudo apt-get install -y$need" >&2
exit 1
