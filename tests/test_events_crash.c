/*
 * test_events_crash.c - writers killed at any instruction while they
 * append to the change feed (property 3, for the feed).
 *
 * Writer processes connect, reconnect, heartbeat (some late, reviving
 * devices whose short TTL passed) and disconnect devices named by
 * feedcheck.h's scheme, and are SIGKILLed a few milliseconds into their
 * work, some after being stopped first; new ones take their place.
 * Watcher processes, never killed, read the whole feed meanwhile.  Then:
 *
 *  - no watcher ever waited long at a seq that had been claimed: a claim
 *    of a dead writer is declared lost within the daemon's liveness check
 *    (the bound asserted is generous);
 *  - seqs came one after the other, with no gap and no overflow, every
 *    event's fields agreeing with the scheme, the same for every watcher;
 *  - every PRES_EV_LOST is a seq claimed during the life of a writer that
 *    was killed, and there are no more of them than kills;
 *  - `presencectl check` passes: no slot is left claimed by the dead.
 *
 * Children never call cmocka: they record what they saw in a shared
 * anonymous mapping made before the fork; the parent asserts.
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
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "feedcheck.h"
#include "harness.h"
#include "presence.h"

#define NW        3          /* writers alive at once */
#define NR        2          /* watchers */
#define NDEV      64         /* devices per writer number */
#define MAX_GEN   4096       /* writer generations recorded */
#define AHEAD     8192       /* events writers may be ahead of the slowest watcher */
#define EVENTS    "16384"    /* the ring: laps several times in the test */
#define LONG_TTL  600000u
#define SHORT_TTL 30u

typedef struct {
    uint64_t from, to;       /* seqs that may have been claimed in its life */
    int      killed;
} gen_t;

typedef struct {
    uint64_t start, stop, until;
    uint64_t w_errors;
    char     w_err[160];
    int      r_rc[NR];
    fc_t     r[NR];
    gen_t    gen[MAX_GEN];
} cr_t;

static cr_t *C;
static th_store_t S;
static pid_t kids[NW + NR];

static uint64_t slowest(void)
{
    uint64_t min = UINT64_MAX;
    for (int r = 0; r < NR; r++) {
        uint64_t n = __atomic_load_n(&C->r[r].next, __ATOMIC_RELAXED);
        if (n < min)
            min = n;
    }
    return min;
}

static void w_fail(const char *what, int rc)
{
    if (__atomic_fetch_add(&C->w_errors, 1, __ATOMIC_RELAXED) == 0)
        snprintf(C->w_err, sizeof C->w_err, "%s: %s", what, pres_strerror(rc));
}

/* Writer generation g writes as writer number g % FC_WRITERS, on that
 * number's gateway (a later generation takes the gateway over). */
static int writer(void *arg)
{
    uint64_t g = (uint64_t)(uintptr_t)arg;
    unsigned w = (unsigned)(g % FC_WRITERS);
    uint64_t seed = UINT64_C(0x9e3779b97f4a7c15) * (g + 1);
    pres_t *p = NULL;
    char gw[16], dev[32], user[32];
    int rc;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    while ((rc = pres_open(&p, S.name, PRES_RDWR)) != 0) {
        if (rc != -ENOSPC) {
            w_fail("pres_open", rc);
            return 1;
        }
        th_nap_us(1000);             /* client slots of the dead: soon back */
    }
    snprintf(gw, sizeof gw, "g%u", w);
    if ((rc = pres_gateway_attach(p, gw)) != 0)
        w_fail("attach", rc);
    for (uint64_t it = 0;; it++) {
        if ((it & 63) == 0) {
            pres_stats_t st;
            while (pres_stats(p, &st) == 0 && st.events > slowest() + AHEAD)
                th_nap_us(200);
        }
        uint64_t x = th_rand(&seed);
        unsigned n = (unsigned)(x % NDEV), op = (unsigned)((x >> 20) % 10);
        uint32_t ttl = (x >> 40) % 5 == 0 ? SHORT_TTL : LONG_TTL;
        snprintf(dev, sizeof dev, "d%u_%u", w, n);
        snprintf(user, sizeof user, "u%u_%u", w, n % FC_USERS);
        if (op < 4) {
            rc = pres_connect(p, user, dev, gw, ttl, NULL);
            if (rc != 0 && rc != -ENOSPC)
                w_fail("connect", rc);
        } else if (op < 7) {
            rc = pres_heartbeat(p, dev, ttl);       /* late ones revive */
            if (rc != 0 && rc != -ENOENT)
                w_fail("heartbeat", rc);
        } else {
            rc = pres_disconnect(p, dev);
            if (rc != 0 && rc != -ENOENT)
                w_fail("disconnect", rc);
        }
    }
}

static int watcher(void *arg)
{
    int r = (int)(intptr_t)arg;
    C->r_rc[r] = fc_watch(S.name, PRES_RDONLY, C->start, &C->stop, &C->until, 20000, &C->r[r]);
    return 0;
}

static uint64_t events_now(pres_t *p)
{
    pres_stats_t st;
    assert_int_equal(pres_stats(p, &st), 0);
    return st.events;
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
    return now - a->since >= 500;
}

/* Kill writer slot k (generation g), some of them stopped first: a claim
 * held by a stopped process that then dies. */
static void kill_writer(pres_t *p, int k, uint64_t g, uint64_t *seed)
{
    if (th_rand(seed) % 10 == 0) {
        kill(kids[k], SIGSTOP);
        th_nap_us(20000);
    }
    kill(kids[k], SIGKILL);
    while (waitpid(kids[k], NULL, 0) < 0 && errno == EINTR)
        ;
    kids[k] = 0;
    /* Claimed seqs of the dead are below the head now (plus the one claim
     * ev_next may trail). */
    C->gen[g].to = events_now(p) + 1;
    C->gen[g].killed = 1;
}

static void test_writers_killed_mid_append(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", "--events", EVENTS, "--offline-grace-ms", "0",
                           NULL };
    assert_int_equal(th_store_start(&S, args), 0);
    C = mmap(NULL, sizeof *C, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(C != MAP_FAILED);
    memset(C, 0, sizeof *C);
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, S.name, PRES_RDONLY), 0);
    C->start = events_now(p) + 1;
    for (int r = 0; r < NR; r++)
        C->r[r].next = C->start;
    for (int r = 0; r < NR; r++)
        assert_true((kids[NW + r] = th_fork(watcher, (void *)(intptr_t)r)) > 0);

    uint64_t seed = th_mono_ms() | 1, gens = 0, kills = 0;
    uint64_t gen_of[NW] = { 0 }, due[NW] = { 0 };
    printf("events crash: seed %llu\n", (unsigned long long)seed);
    uint64_t end = th_mono_ms() + (uint64_t)th_scale(5000, 3000);
    while (th_mono_ms() < end && gens < MAX_GEN - NW) {
        for (int k = 0; k < NW; k++) {
            if (kids[k] && th_mono_ms() >= due[k]) {
                kill_writer(p, k, gen_of[k], &seed);
                kills++;
            }
            if (!kids[k]) {
                uint64_t g = gens++;
                C->gen[g].from = events_now(p) + 1;
                assert_true((kids[k] = th_fork(writer, (void *)(uintptr_t)g)) > 0);
                gen_of[k] = g;
                due[k] = th_mono_ms() + 1 + th_rand(&seed) % 40;
            }
        }
        th_nap_us(1000);
    }
    for (int k = 0; k < NW; k++)
        if (kids[k]) {
            kill_writer(p, k, gen_of[k], &seed);
            kills++;
        }
    /* The dead gateways' connections end (EXPIREs), their users go
     * offline; then the feed is quiet. */
    struct quiet_arg qa = { p, 0, th_mono_ms() };
    assert_true(th_wait_until(settled, &qa, 30000));
    uint64_t last = events_now(p);
    __atomic_store_n(&C->until, last + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&C->stop, 1, __ATOMIC_RELEASE);
    for (int r = 0; r < NR; r++) {
        assert_int_equal(th_wait_child(kids[NW + r], 60000), 0);
        kids[NW + r] = 0;
    }

    fc_t *f0 = &C->r[0];
    printf("events crash: %llu writers, %llu killed; %llu events (%llu lost, %llu status), "
           "longest wait at a claimed seq %.1f ms\n", (unsigned long long)gens,
           (unsigned long long)kills, (unsigned long long)f0->events,
           (unsigned long long)f0->lost, (unsigned long long)f0->statuses,
           (double)f0->longest_wait_ns / 1e6);
    if (C->w_errors)
        fail_msg("writers: %llu errors, first: %s", (unsigned long long)C->w_errors, C->w_err);
    for (int r = 0; r < NR; r++) {
        fc_t *f = &C->r[r];
        assert_int_equal(C->r_rc[r], 0);
        if (f->errors)
            fail_msg("watcher %d: %llu errors, first: %s", r, (unsigned long long)f->errors,
                     f->err);
        assert_int_equal(f->overflows, 0);
        assert_int_equal(f->next, last + 1);
        assert_true(f->hash == f0->hash);
        /* Generous: the daemon repairs within a tick or two. */
        assert_true(f->longest_wait_ns < UINT64_C(5000000000));
    }
    assert_true(f0->lost <= kills);
    for (uint64_t k = 0; k < f0->lost && k < FC_LOST_MAX; k++) {
        uint64_t s = f0->lost_seq[k];
        int owner = 0;
        for (uint64_t g = 0; g < gens && !owner; g++)
            owner = C->gen[g].killed && C->gen[g].from <= s && s <= C->gen[g].to;
        if (!owner)
            fail_msg("seq %llu is lost, and no killed writer was alive when it was claimed",
                     (unsigned long long)s);
    }
    assert_int_equal(th_check_ok(&S, "after writers were killed mid-append"), 0);
    pres_close(p);
}

static int teardown(void **state)
{
    (void)state;
    th_kill_children(kids, sizeof kids / sizeof kids[0]);
    th_store_destroy(&S);
    if (C) {
        munmap(C, sizeof *C);
        C = NULL;
    }
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_writers_killed_mid_append, teardown),
    };
    return cmocka_run_group_tests_name("events_crash", tests, NULL, NULL);
}
