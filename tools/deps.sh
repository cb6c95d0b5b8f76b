#!/bin/sh
# Checks for the Debian packages libpresence builds and tests with.  As root
# it installs the missing ones; otherwise it names the command and fails.
set -u
need=""
[ -f /usr/include/urcu/uatomic.h ] || need="$need liburcu-dev"
[ -f /usr/include/lmdb.h ]         || need="$need liblmdb-dev"
[ -f /usr/include/cmocka.h ]       || need="$need libcmocka-dev"
command -v cc >/dev/null 2>&1      || need="$need gcc"
command -v pkg-config >/dev/null 2>&1 || need="$need pkg-config"
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
