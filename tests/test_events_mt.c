/*
 * test_events_mt.c - the change feed under writer and watcher threads of
 * one process; run again under ThreadSanitizer by `make check` (the _mt
 * suffix).
 *
 * Writer threads (two sharing one handle, one with its own) connect,
 * reconnect, heartbeat and disconnect devices named by feedcheck.h's
 * scheme and count the events they cause; watcher threads (read-only
 * handles, one sleeping with no timeout) check every event and count them
 * per writer.  As test_events_mp.c, without processes: what ThreadSanitizer
 * sees of appends, waits and wakeups racing each other.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "feedcheck.h"
#include "harness.h"
#include "presence.h"

#define NW        3
#define NR        3
#define NDEV      64
#define AHEAD     32768
#define LONG_TTL  600000u

static th_store_t S;
static pres_t *g_shared;               /* writers 0 and 1 */
static uint64_t g_start, g_stop_writers, g_stop, g_until;
static uint64_t w_connects[NW], w_disconnects[NW], w_errors[NW];
static int r_rc[NR];
static fc_t R[NR];

static uint64_t slowest(void)
{
    uint64_t min = UINT64_MAX;
    for (int r = 0; r < NR; r++) {
        uint64_t n = __atomic_load_n(&R[r].next, __ATOMIC_RELAXED);
        if (n < min)
            min = n;
    }
    return min;
}

static void *writer(void *arg)
{
    int w = (int)(intptr_t)arg;
    pres_t *own = NULL, *p = g_shared;
    char gw[16], dev[32], user[32];
    uint8_t on[NDEV];
    uint64_t seed = UINT64_C(0x2545f4914f6cdd1d) * (uint64_t)(w + 1);
    if (w == NW - 1) {
        if (pres_open(&own, S.name, PRES_RDWR) != 0) {
            __atomic_fetch_add(&w_errors[w], 1, __ATOMIC_RELAXED);
            return NULL;
        }
        p = own;
    }
    snprintf(gw, sizeof gw, "g%d", w);
    memset(on, 0, sizeof on);
    for (uint64_t it = 0; !__atomic_load_n(&g_stop_writers, __ATOMIC_ACQUIRE); it++) {
        if ((it & 63) == 0) {
            pres_stats_t st;
            while (pres_stats(p, &st) == 0 && st.events > slowest() + AHEAD &&
                   !__atomic_load_n(&g_stop_writers, __ATOMIC_ACQUIRE))
                th_nap_us(500);
        }
        uint64_t x = th_rand(&seed);
        unsigned n = (unsigned)(x % NDEV), op = (unsigned)((x >> 20) % 10);
        snprintf(dev, sizeof dev, "d%d_%u", w, n);
        snprintf(user, sizeof user, "u%d_%u", w, n % FC_USERS);
        int rc;
        if (!on[n] || op < 2) {
            if ((rc = pres_connect(p, user, dev, gw, LONG_TTL, NULL)) == 0) {
                w_connects[w]++;
                on[n] = 1;
            }
        } else if (op < 6) {
            rc = pres_heartbeat(p, dev, LONG_TTL);
        } else if ((rc = pres_disconnect(p, dev)) == 0) {
            w_disconnects[w]++;
            on[n] = 0;
        }
        if (rc != 0)
            __atomic_fetch_add(&w_errors[w], 1, __ATOMIC_RELAXED);
    }
    /* The rest ends by explicit disconnects here (the gateways stay
     * unattached: their handles outlive the threads). */
    for (unsigned n = 0; n < NDEV; n++)
        if (on[n]) {
            snprintf(dev, sizeof dev, "d%d_%u", w, n);
            if (pres_disconnect(p, dev) == 0)
                w_disconnects[w]++;
            else
                __atomic_fetch_add(&w_errors[w], 1, __ATOMIC_RELAXED);
        }
    if (own)
        pres_close(own);
    return NULL;
}

static void *watcher(void *arg)
{
    int r = (int)(intptr_t)arg;
    r_rc[r] = fc_watch(S.name, PRES_RDONLY, g_start, &g_stop, &g_until, 10000, &R[r]);
    return NULL;
}

struct quiet_arg { pres_t *p; uint64_t events, since; };

static int settled(void *arg)
{
    struct quiet_arg *a = arg;
    pres_stats_t st;
    if (pres_stats(a->p, &st) != 0)
        return 0;
    uint64_t now = th_mono_ms();
    if (st.events != a->events || st.connected != 0) {
        a->events = st.events;
        a->since = now;
        return 0;
    }
    return now - a->since >= 300;
}

static void test_threads_write_and_watch(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", "--offline-grace-ms", "0", NULL };
    assert_int_equal(th_store_start(&S, args), 0);
    assert_int_equal(pres_open(&g_shared, S.name, PRES_RDWR), 0);
    pres_stats_t st;
    assert_int_equal(pres_stats(g_shared, &st), 0);
    g_start = st.events + 1;
    for (int r = 0; r < NR; r++)
        R[r].next = g_start;
    pthread_t wt[NW], rt[NR];
    for (int r = 0; r < NR; r++)
        assert_int_equal(pthread_create(&rt[r], NULL, watcher, (void *)(intptr_t)r), 0);
    for (int w = 0; w < NW; w++)
        assert_int_equal(pthread_create(&wt[w], NULL, writer, (void *)(intptr_t)w), 0);
    th_nap_us((long)th_scale(1500, 1500) * 1000);     /* the load runs this long */
    __atomic_store_n(&g_stop_writers, 1, __ATOMIC_RELEASE);
    for (int w = 0; w < NW; w++)
        pthread_join(wt[w], NULL);
    struct quiet_arg qa = { g_shared, 0, th_mono_ms() };
    assert_true(th_wait_until(settled, &qa, 20000));
    assert_int_equal(pres_stats(g_shared, &st), 0);
    __atomic_store_n(&g_until, st.events + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&g_stop, 1, __ATOMIC_RELEASE);
    for (int r = 0; r < NR; r++)
        pthread_join(rt[r], NULL);

    printf("events mt: %d writer threads, %d watcher threads: %llu events (%llu status), "
           "longest wait %.1f ms\n", NW, NR, (unsigned long long)R[0].events,
           (unsigned long long)R[0].statuses, (double)R[0].longest_wait_ns / 1e6);
    for (int w = 0; w < NW; w++)
        assert_int_equal(w_errors[w], 0);
    for (int r = 0; r < NR; r++) {
        if (R[r].errors)
            fail_msg("watcher %d: %llu errors, first: %s", r, (unsigned long long)R[r].errors,
                     R[r].err);
        assert_int_equal(r_rc[r], 0);
        assert_int_equal(R[r].overflows, 0);
        assert_int_equal(R[r].lost, 0);
        assert_int_equal(R[r].next, st.events + 1);
        for (int w = 0; w < NW; w++) {
            assert_int_equal(R[r].connects[w], w_connects[w]);
            assert_int_equal(R[r].disconnects[w], w_disconnects[w]);
            assert_int_equal(R[r].expires[w], 0);
        }
        assert_true(R[r].hash == R[0].hash);
    }
    assert_int_equal(th_check_ok(&S, "after the threads"), 0);
    pres_close(g_shared);
    th_store_destroy(&S);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads_write_and_watch),
    };
    return cmocka_run_group_tests_name("events_mt", tests, NULL, NULL);
}
