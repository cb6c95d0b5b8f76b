#!/bin/sh
# demo.sh BUILD_DIR - a daemon and a simulated load on a private store.
#
# `make demo` runs this after building.  It creates a store in a fresh
# directory (PRESENCE_SHM_DIR, name "demo"), starts presenced on it, runs
# presence-sim for about 20 s, and every few seconds shows what presencectl
# sees: the store's counters, the routes of a few fixed users, and the
# device the simulator sends into an elevator (d_0000000003: silent 5 s in,
# expired by its TTL, back on another gateway later).  The simulator also
# SIGKILLs one gateway (gw_01, the gateway of every device of u_0000000001)
# and restarts it.  Everything it started is stopped on exit, however it
# exits.
set -u

BUILD=${1:-build}
NAME=demo
SECONDS_RUN=20
EVERY=4                 # seconds between snapshots
USERS="u_0000000001 u_0000000002 u_0000000003"
DEVICE=d_0000000003     # the simulator's elevator

for prog in presenced presencectl presence-sim; do
    if [ ! -x "$BUILD/$prog" ]; then
        echo "demo: $BUILD/$prog is missing (run make first)" >&2
        exit 1
    fi
done

# The region lives in memory when it can (tmpfs), as it would in /dev/shm.
base=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
dir=$(mktemp -d "$base/presence-demo.XXXXXX") || exit 1
export PRESENCE_SHM_DIR="$dir"
unset PRESENCE_NAME
daemon_pid=
sim_pid=

# Stop the simulator, then the daemon (SIGTERM: it flushes its mirror and
# exits 0), then remove the store.  Bounded: a stuck process gets SIGKILL.
stop() {
    pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

cleanup() {
    status=$?
    trap - EXIT INT TERM HUP
    trap '' PIPE        # a closed stdout must not cut the cleanup short
    stop "$sim_pid"
    stop "$daemon_pid"
    rm -rf "$dir"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
# A closed stdout (`make demo | head`) must still end in cleanup.
trap 'exit 141' PIPE

ctl() {
    "$BUILD/presencectl" --name "$NAME" "$@"
}

echo "demo: store '$NAME' in $dir"
"$BUILD/presenced" --foreground --name "$NAME" --db "$dir/db" \
    --capacity 65536 --idle-after-ms 8000 --offline-grace-ms 2000 \
    2>"$dir/presenced.log" &
daemon_pid=$!

# Bounded wait for the store: 10 s at most.
i=0
until ctl stats >/dev/null 2>&1; do
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        echo "demo: presenced exited before creating the store:" >&2
        cat "$dir/presenced.log" >&2
        daemon_pid=
        exit 1
    fi
    i=$((i + 1))
    if [ $i -gt 100 ]; then
        echo "demo: no store after 10 s; presenced says:" >&2
        cat "$dir/presenced.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "demo: presenced (pid $daemon_pid) is up"

"$BUILD/presence-sim" --name "$NAME" --seconds "$SECONDS_RUN" \
    --gateways 4 --devices 5000 --users 2000 --ttl-ms 3000 &
sim_pid=$!

# The counters that move during the demo, on one line; everything when
# the output has none of them (a format this script does not know).
counters() {
    ctl stats >"$dir/stats.txt" 2>&1
    awk '$1 ~ /^(devices|connected|users|connects|disconnects|heartbeats|late_heartbeats|expirations|gateway_deaths|stale_reports|events)$/ {
             printf "%s%s=%s", sep, $1, $2; sep = "  "; n++ }
         END { if (n) printf "\n"; exit n == 0 }' "$dir/stats.txt" ||
        cat "$dir/stats.txt"
}

# One snapshot, gathered first and printed at once so the simulator's
# lines do not land in the middle of it.
snapshot() {
    out=$(
        echo "---------------- snapshot at ${1}s ----------------"
        echo "\$ presencectl stats   (the counters that move)"
        counters
        for u in $USERS; do
            echo "\$ presencectl route $u"
            ctl route "$u" 2>&1
        done
        echo "\$ presencectl device $DEVICE"
        ctl device "$DEVICE" 2>&1
        u=${USERS%% *}
        echo "\$ presencectl user $u --viewer u_1   (what another user sees)"
        ctl user "$u" --viewer u_1 2>&1
        echo "\$ presencectl watch   (the change feed, a few events as they come)"
        timeout 1 "$BUILD/presencectl" --name "$NAME" watch 2>&1 | head -n 4
        echo "----------------------------------------------------"
    )
    printf '%s\n' "$out"
}

t=0
while kill -0 "$sim_pid" 2>/dev/null; do
    sleep 1
    t=$((t + 1))
    if [ $((t % EVERY)) -eq 2 ] && kill -0 "$sim_pid" 2>/dev/null; then
        snapshot $t
    fi
done
wait "$sim_pid"
sim_status=$?
sim_pid=

echo "demo: simulator exited with status $sim_status; final state:"
ctl stats
echo "\$ presencectl check"
ctl check
check_status=$?
if [ "$sim_status" -ne 0 ] || [ "$check_status" -ne 0 ]; then
    echo "demo: FAILED (simulator $sim_status, check $check_status);" \
         "presenced log:" >&2
    tail -n 20 "$dir/presenced.log" >&2
    exit 1
fi
echo "demo: done"
