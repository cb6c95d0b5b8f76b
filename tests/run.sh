#!/bin/sh
# run.sh - run test binaries, each under a timeout, and summarise.
#
#   sh tests/run.sh BUILD_DIR test_a test_b ...
#
# Runs BUILD_DIR/tests/test_a ... one after another with PRES_BUILD set to
# BUILD_DIR (absolute), prints each one's result, then one line
# "N passed, N failed" (N counts test binaries).  Exits 1 if any failed.
#
# Each binary gets a private TMPDIR, removed afterwards (kept, and named,
# when PRES_TEST_KEEP is set).  `timeout` signals the test's whole process group on expiry, so daemons the
# test started (they stay in its group) go with it.
set -u

if [ $# -lt 1 ]; then
    echo "usage: sh tests/run.sh BUILD_DIR TEST..." >&2
    exit 2
fi
build=$1
shift
PRES_BUILD=$(cd "$build" 2>/dev/null && pwd) || {
    echo "run.sh: no build directory $build" >&2
    exit 2
}
export PRES_BUILD
# A store name or directory from the caller's environment must not leak in:
# the harness gives every test its own.
unset PRESENCE_NAME PRESENCE_SHM_DIR

passed=0
failed=0
for t in "$@"; do
    t=${t##*/}
    bin=$PRES_BUILD/tests/$t
    echo "==== $t"
    if [ ! -x "$bin" ]; then
        echo "FAIL $t (no such test binary: $bin)"
        failed=$((failed + 1))
        continue
    fi
    # A private TMPDIR: the harness makes its stores there, so what a test
    # that crashed could not remove goes with the directory.
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/presrun.XXXXXX") || exit 2
    start=$(date +%s)
    TMPDIR=$tmp timeout -k 10 600 "$bin"
    rc=$?
    if [ -n "${PRES_TEST_KEEP:-}" ]; then
        echo "kept $tmp"
    else
        rm -rf "$tmp"
    fi
    secs=$(( $(date +%s) - start ))
    if [ "$rc" -eq 0 ]; then
        echo "PASS $t (${secs} s)"
        passed=$((passed + 1))
    else
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            why="timed out after 600 s"
        elif [ "$rc" -gt 128 ]; then
            why="killed by signal $((rc - 128))"
        else
            why="exit status $rc"
        fi
        echo "FAIL $t ($why, ${secs} s)"
        failed=$((failed + 1))
    fi
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
