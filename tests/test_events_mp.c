/*
 * test_events_mp.c - the change feed under writers and watchers in many
 * processes at once.
 *
 * Writer processes connect, reconnect, heartbeat and disconnect devices of
 * their own (named by feedcheck.h's scheme) and count the events they
 * cause; then they close their handles, which ends their remaining
 * connections (one EXPIRE each, from the daemon).  Watcher processes read
 * the feed from before the first write to after the last event and check
 * that seqs follow each other with no gap, that every event's fields agree
 * with the scheme, and that they saw exactly the events each writer caused;
 * all of them read the same sequence.  Writers pace themselves on the
 * slowest watcher, so nobody falls a whole ring behind on a small machine.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <cmocka.h>

#include "feedcheck.h"
#include "harness.h"
#include "presence.h"

#define NW        3          /* writer processes */
#define NR        3          /* watcher processes */
#define NDEV      200        /* devices per writer */
#define AHEAD     65536      /* events writers may be ahead of the slowest watcher */
#define LONG_TTL  600000u

typedef struct {
    uint64_t start;                   /* the first seq watchers read */
    uint64_t stop_writers;
    uint64_t stop, until;             /* for the watchers (feedcheck.h) */
    uint64_t w_connects[NW], w_disconnects[NW], w_left[NW], w_errors[NW];
    char     w_err[NW][160];
    int      r_rc[NR];
    fc_t     r[NR];
} mp_t;

static mp_t *M;
static th_store_t S;
static pid_t kids[NW + NR];

static uint64_t slowest(void)
{
    uint64_t min = UINT64_MAX;
    for (int r = 0; r < NR; r++) {
        uint64_t n = __atomic_load_n(&M->r[r].next, __ATOMIC_RELAXED);
        if (n < min)
            min = n;
    }
    return min;
}

static void w_fail(int w, const char *what, int rc)
{
    if (M->w_errors[w]++ == 0)
        snprintf(M->w_err[w], sizeof M->w_err[w], "%s: %s", what, pres_strerror(rc));
}

static int writer(void *arg)
{
    int w = (int)(intptr_t)arg;
    pres_t *p = NULL;
    char gw[16], dev[32], user[32];
    uint8_t on[NDEV];
    uint64_t seed = UINT64_C(0x9e3779b97f4a7c15) * (uint64_t)(w + 1);
    int rc;
    if ((rc = pres_open(&p, S.name, PRES_RDWR)) != 0) {
        w_fail(w, "pres_open", rc);
        return 1;
    }
    snprintf(gw, sizeof gw, "g%d", w);
    if ((rc = pres_gateway_attach(p, gw)) != 0)
        w_fail(w, "attach", rc);
    memset(on, 0, sizeof on);
    for (uint64_t it = 0; !__atomic_load_n(&M->stop_writers, __ATOMIC_ACQUIRE); it++) {
        if ((it & 255) == 0) {
            pres_stats_t st;
            while (pres_stats(p, &st) == 0 && st.events > slowest() + AHEAD &&
                   !__atomic_load_n(&M->stop_writers, __ATOMIC_ACQUIRE))
                th_nap_us(500);
        }
        uint64_t x = th_rand(&seed);
        unsigned n = (unsigned)(x % NDEV), op = (unsigned)((x >> 20) % 10);
        snprintf(dev, sizeof dev, "d%d_%u", w, n);
        snprintf(user, sizeof user, "u%d_%u", w, n % FC_USERS);
        if (!on[n] || op < 2) {                   /* connect, or reconnect */
            if ((rc = pres_connect(p, user, dev, gw, LONG_TTL, NULL)) != 0) {
                w_fail(w, "connect", rc);
                continue;
            }
            M->w_connects[w]++;
            on[n] = 1;
        } else if (op < 6) {                      /* on time: no event */
            if ((rc = pres_heartbeat(p, dev, LONG_TTL)) != 0)
                w_fail(w, "heartbeat", rc);
        } else {
            if ((rc = pres_disconnect(p, dev)) != 0) {
                w_fail(w, "disconnect", rc);
                continue;
            }
            M->w_disconnects[w]++;
            on[n] = 0;
        }
    }
    for (unsigned n = 0; n < NDEV; n++)
        M->w_left[w] += on[n];
    /* The close ends the rest: the daemon's EXPIREs. */
    pres_close(p);
    return 0;
}

static int watcher(void *arg)
{
    int r = (int)(intptr_t)arg;
    M->r_rc[r] = fc_watch(S.name, r == 0 ? PRES_RDWR : PRES_RDONLY, M->start, &M->stop,
                          &M->until, 10000, &M->r[r]);
    return 0;
}

struct quiet_arg { pres_t *p; uint64_t events, since; };

/* Nothing appended for 300 ms, and nothing connected. */
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

static void test_writers_and_watchers(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", "--offline-grace-ms", "0", NULL };
    assert_int_equal(th_store_start(&S, args), 0);
    M = mmap(NULL, sizeof *M, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(M != MAP_FAILED);
    memset(M, 0, sizeof *M);
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, S.name, PRES_RDONLY), 0);
    pres_stats_t st;
    assert_int_equal(pres_stats(p, &st), 0);
    M->start = st.events + 1;
    for (int r = 0; r < NR; r++)
        M->r[r].next = M->start;
    for (int r = 0; r < NR; r++)
        assert_true((kids[NW + r] = th_fork(watcher, (void *)(intptr_t)r)) > 0);
    for (int w = 0; w < NW; w++)
        assert_true((kids[w] = th_fork(writer, (void *)(intptr_t)w)) > 0);

    th_nap_us((long)th_scale(2000, 1000) * 1000);    /* the load runs this long */
    __atomic_store_n(&M->stop_writers, 1, __ATOMIC_RELEASE);
    for (int w = 0; w < NW; w++) {
        assert_int_equal(th_wait_child(kids[w], 30000), 0);
        kids[w] = 0;
    }
    struct quiet_arg qa = { p, 0, th_mono_ms() };
    assert_true(th_wait_until(settled, &qa, 20000));
    assert_int_equal(pres_stats(p, &st), 0);
    __atomic_store_n(&M->until, st.events + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&M->stop, 1, __ATOMIC_RELEASE);
    for (int r = 0; r < NR; r++) {
        assert_int_equal(th_wait_child(kids[NW + r], 30000), 0);
        kids[NW + r] = 0;
    }

    uint64_t conns = 0, discs = 0, left = 0;
    for (int w = 0; w < NW; w++) {
        if (M->w_errors[w])
            fail_msg("writer %d: %llu errors, first: %s", w,
                     (unsigned long long)M->w_errors[w], M->w_err[w]);
        conns += M->w_connects[w];
        discs += M->w_disconnects[w];
        left += M->w_left[w];
    }
    printf("events mp: %d writers: %llu connects, %llu disconnects, %llu ended by their "
           "close; %d watchers read %llu events (%llu status), longest wait %.1f ms\n",
           NW, (unsigned long long)conns, (unsigned long long)discs, (unsigned long long)left,
           NR, (unsigned long long)M->r[0].events, (unsigned long long)M->r[0].statuses,
           (double)M->r[0].longest_wait_ns / 1e6);
    for (int r = 0; r < NR; r++) {
        fc_t *f = &M->r[r];
        assert_int_equal(M->r_rc[r], 0);
        if (f->errors)
            fail_msg("watcher %d: %llu errors, first: %s", r, (unsigned long long)f->errors,
                     f->err);
        assert_int_equal(f->overflows, 0);
        assert_int_equal(f->lost, 0);
        assert_int_equal(f->first, M->start);
        assert_int_equal(f->next, st.events + 1);
        for (int w = 0; w < NW; w++) {
            assert_int_equal(f->connects[w], M->w_connects[w]);
            assert_int_equal(f->disconnects[w], M->w_disconnects[w]);
            assert_int_equal(f->expires[w], M->w_left[w]);
        }
        assert_true(f->hash == M->r[0].hash);
        assert_true(f->longest_wait_ns < UINT64_C(3000000000));
    }
    assert_int_equal(th_check_ok(&S, "after the writers and watchers"), 0);
    pres_close(p);
}

static int teardown(void **state)
{
    (void)state;
    th_kill_children(kids, sizeof kids / sizeof kids[0]);
    th_store_destroy(&S);
    if (M) {
        munmap(M, sizeof *M);
        M = NULL;
    }
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_writers_and_watchers, teardown),
    };
    return cmocka_run_group_tests_name("events_mp", tests, NULL, NULL);
}
