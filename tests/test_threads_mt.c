/*
 * test_threads_mt.c - many threads of one process on one store; run again
 * under ThreadSanitizer by `make check` (the _mt suffix).
 *
 * Writer threads share one PRES_RDWR handle, reader threads one
 * PRES_RDONLY handle, and more threads open and close handles of their own
 * meanwhile.  As in test_multiproc.c, writer k only writes records whose
 * user ("tu<k>_<j>"), gateway ("tgw<k>") and TTL ((k + 1) * 100 s) agree,
 * so a reader that gets a mix of two states notices.  Threads never call
 * cmocka; the main thread asserts on what they recorded.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"
#include "presence.h"

#define NW        3
#define NR        2
#define NO        2         /* threads opening and closing handles */
#define PRIV      32        /* private devices per writer: "tp<k>_<i>" */
#define SHARED    16        /* devices all writers connect: "ts_<i>" */
#define USERS     4         /* users per writer: "tu<k>_<j>" */
#define MSG_LEN   256

static th_store_t g_store;

/* `presencectl check` passes (see th_check_ok). */
#define check_ok(when) assert_int_equal(th_check_ok(&g_store, (when)), 0)
static pres_t    *g_rw, *g_ro;
static uint64_t   g_run_ms;
static _Atomic int g_stop;

static _Atomic uint64_t g_errors;
static _Atomic int      g_msg_set;
static char             g_msg[MSG_LEN];

static _Atomic uint64_t g_connects, g_disconnects, g_heartbeats, g_enospc;
static _Atomic uint64_t g_reads, g_hits, g_route_devs, g_opens;
static _Atomic uint64_t g_max_read_ns;

__attribute__((format(printf, 1, 2)))
static void err(const char *fmt, ...)
{
    atomic_fetch_add(&g_errors, 1);
    if (atomic_exchange(&g_msg_set, 1) != 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, MSG_LEN, fmt, ap);
    va_end(ap);
}

static void timed(uint64_t t0)
{
    uint64_t d = th_now_ns() - t0;
    uint64_t cur = atomic_load_explicit(&g_max_read_ns, memory_order_relaxed);
    while (d > cur &&
           !atomic_compare_exchange_weak_explicit(&g_max_read_ns, &cur, d,
                                                  memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
}

static uint32_t ttl_of(int k) { return 100000u * (uint32_t)(k + 1); }

/* Returns 0 when the record is one writer's consistent write; want_class:
 * the writer it must come from (-1: any). */
static int check(const pres_device_info_t *d, const char *want_dev,
                 int want_class, char *why, size_t cap)
{
    int k = -1, j = -1, n = -1;
    if (want_dev && strcmp(d->device_id, want_dev) != 0) {
        snprintf(why, cap, "asked for %s, got %s", want_dev, d->device_id);
        return -1;
    }
    if (sscanf(d->user_id, "tu%d_%d%n", &k, &j, &n) != 2 || d->user_id[n] != '\0' ||
        k < 0 || k >= NW) {
        snprintf(why, cap, "%s: user '%s' was never written", d->device_id, d->user_id);
        return -1;
    }
    if (want_class >= 0 && k != want_class) {
        snprintf(why, cap, "%s: user %s, a user of another writer", d->device_id,
                 d->user_id);
        return -1;
    }
    char gw[16];
    snprintf(gw, sizeof gw, "tgw%d", k);
    if (strcmp(d->gateway_id, gw) != 0) {
        snprintf(why, cap, "torn: %s has user %s with gateway %s", d->device_id,
                 d->user_id, d->gateway_id);
        return -1;
    }
    if (d->active && !d->connected) {
        snprintf(why, cap, "%s: active but not connected", d->device_id);
        return -1;
    }
    if (d->connected &&
        (d->expires_at_ms < d->connected_at_ms + ttl_of(k) - 2000 ||
         d->expires_at_ms > d->connected_at_ms + ttl_of(k) + g_run_ms + 10000)) {
        snprintf(why, cap, "torn: %s of %s (TTL %u) connected at %llu expires "
                 "at %llu", d->device_id, d->user_id, ttl_of(k),
                 (unsigned long long)d->connected_at_ms,
                 (unsigned long long)d->expires_at_ms);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Threads                                                                   */

static void *writer(void *arg)
{
    int k = (int)(intptr_t)arg;
    uint64_t seed = UINT64_C(0x9e3779b97f4a7c15) * (uint64_t)(k + 1);
    int pconn[PRIV] = { 0 };
    pres_ref_t pref[PRIV];
    int shave[SHARED] = { 0 };
    pres_ref_t sref[SHARED];
    uint64_t conns = 0, discs = 0, hbs = 0;
    char dev[32], user[32], gw[16];
    uint32_t ttl = ttl_of(k);
    int rc;
    snprintf(gw, sizeof gw, "tgw%d", k);

    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        uint64_t x = th_rand(&seed);
        unsigned op = (unsigned)(x % 100);
        unsigned i = (unsigned)((x >> 8) % PRIV);
        unsigned si = (unsigned)((x >> 8) % SHARED);
        snprintf(user, sizeof user, "tu%d_%u", k, (unsigned)((x >> 24) % USERS));
        if (op < 60)
            snprintf(dev, sizeof dev, "tp%d_%u", k, i);
        else
            snprintf(dev, sizeof dev, "ts_%u", si);

        if (op < 20) {
            rc = pres_connect(g_rw, user, dev, gw, ttl, &pref[i]);
            if (rc == 0) {
                conns++;
                pconn[i] = 1;
            } else if (rc == -ENOSPC) {
                atomic_fetch_add(&g_enospc, 1);
            } else {
                err("connect %s: %s", dev, pres_strerror(rc));
            }
        } else if (op < 35) {
            if (!pconn[i])
                continue;
            rc = (x >> 40) & 1 ? pres_heartbeat(g_rw, dev, ttl)
                               : pres_heartbeat_ref(g_rw, pref[i], ttl);
            if (rc != 0)
                err("heartbeat %s: %s", dev, pres_strerror(rc));
            else
                hbs++;
        } else if (op < 45) {
            if (!pconn[i])
                continue;
            rc = (x >> 40) & 1 ? pres_disconnect(g_rw, dev)
                               : pres_disconnect_ref(g_rw, pref[i]);
            if (rc != 0)
                err("disconnect %s: %s", dev, pres_strerror(rc));
            else {
                discs++;
                pconn[i] = 0;
            }
        } else if (op < 60) {
            if (!pconn[i])
                continue;
            rc = pres_set_activity(g_rw, dev, (x >> 40) & 1 ? PRES_IDLE : PRES_ACTIVE);
            if (rc != 0)
                err("set_activity %s: %s", dev, pres_strerror(rc));
        } else if (op < 75) {
            rc = pres_connect(g_rw, user, dev, gw, ttl, &sref[si]);
            if (rc == 0) {
                conns++;
                shave[si] = 1;
            } else if (rc == -ENOSPC) {
                atomic_fetch_add(&g_enospc, 1);
            } else {
                err("connect %s: %s", dev, pres_strerror(rc));
            }
        } else if (op < 92) {
            if (!shave[si])
                continue;
            /* Only through our own, current connection: a heartbeat by id
             * would pair our TTL with another writer's gateway. */
            rc = pres_heartbeat_ref(g_rw, sref[si], ttl);
            if (rc == 0)
                hbs++;
            else if (rc == -ESTALE)
                shave[si] = 0;
            else
                err("heartbeat_ref %s: %s", dev, pres_strerror(rc));
        } else {
            if (!shave[si])
                continue;
            rc = pres_disconnect_ref(g_rw, sref[si]);
            if (rc == 0)
                discs++;
            else if (rc != -ESTALE)
                err("disconnect_ref %s: %s", dev, pres_strerror(rc));
            shave[si] = 0;
        }
    }
    atomic_fetch_add(&g_connects, conns);
    atomic_fetch_add(&g_disconnects, discs);
    atomic_fetch_add(&g_heartbeats, hbs);
    return NULL;
}

static void *reader(void *arg)
{
    uint64_t seed = UINT64_C(0xabcdef12345) + (uint64_t)(intptr_t)arg * 7919;
    pres_device_info_t d, out[64];
    char dev[32], user[32], why[512];
    uint64_t reads = 0, hits = 0, rdevs = 0;
    int rc;

    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        uint64_t x = th_rand(&seed);
        int k = (int)(x % NW);
        reads++;
        if ((x >> 8) % 4 != 0) {
            int cls = -1;
            if ((x >> 12) & 1) {
                snprintf(dev, sizeof dev, "tp%d_%u", k, (unsigned)((x >> 16) % PRIV));
                cls = k;
            } else {
                snprintf(dev, sizeof dev, "ts_%u", (unsigned)((x >> 16) % SHARED));
            }
            uint64_t t0 = th_now_ns();
            rc = pres_device(g_ro, dev, &d);
            timed(t0);
            if (rc == 0) {
                hits++;
                if (check(&d, dev, cls, why, sizeof why) != 0)
                    err("pres_device: %s", why);
            } else if (rc != -ENOENT) {
                err("pres_device %s: %s", dev, pres_strerror(rc));
            }
        } else {
            size_t n = 0;
            snprintf(user, sizeof user, "tu%d_%u", k, (unsigned)((x >> 16) % USERS));
            uint64_t t0 = th_now_ns();
            rc = pres_route(g_ro, user, out, 64, &n);
            timed(t0);
            if (rc != 0) {
                err("pres_route %s: %s", user, pres_strerror(rc));
                continue;
            }
            size_t m = n < 64 ? n : 64;
            rdevs += m;
            for (size_t i = 0; i < m; i++) {
                if (!out[i].connected)
                    err("route %s gave %s, not connected", user, out[i].device_id);
                if (strcmp(out[i].user_id, user) != 0)
                    err("route %s gave %s of %s", user, out[i].device_id, out[i].user_id);
                else if (check(&out[i], NULL, k, why, sizeof why) != 0)
                    err("route %s: %s", user, why);
                for (size_t j = 0; j < i; j++)
                    if (strcmp(out[i].device_id, out[j].device_id) == 0)
                        err("route %s gave %s twice", user, out[i].device_id);
            }
        }
    }
    atomic_fetch_add(&g_reads, reads);
    atomic_fetch_add(&g_hits, hits);
    atomic_fetch_add(&g_route_devs, rdevs);
    return NULL;
}

/* Open a handle, use it, close it, again and again, beside the others. */
static void *opener(void *arg)
{
    int t = (int)(intptr_t)arg;
    uint64_t seed = UINT64_C(0x51ed) + (uint64_t)t;
    uint64_t opens = 0, conns = 0, discs = 0;
    pres_device_info_t d;
    char dev[32], user[32], why[512];
    snprintf(user, sizeof user, "tou%d", t);

    for (unsigned n = 0; !atomic_load_explicit(&g_stop, memory_order_relaxed); n++) {
        pres_t *p = NULL;
        int flags = (n & 1) ? PRES_RDWR : PRES_RDONLY;
        int rc = pres_open(&p, g_store.name, flags);
        if (rc != 0) {
            err("pres_open (%s): %s", flags ? "rdwr" : "rdonly", pres_strerror(rc));
            continue;
        }
        opens++;
        snprintf(dev, sizeof dev, "ts_%u", (unsigned)(th_rand(&seed) % SHARED));
        rc = pres_device(p, dev, &d);
        if (rc == 0 && check(&d, dev, -1, why, sizeof why) != 0)
            err("opener read: %s", why);
        else if (rc != 0 && rc != -ENOENT)
            err("opener pres_device %s: %s", dev, pres_strerror(rc));
        if (flags == PRES_RDWR) {
            snprintf(dev, sizeof dev, "to%d_%u", t, n % 8);
            rc = pres_connect(p, user, dev, "togw", 60000, NULL);
            if (rc == 0) {
                conns++;
                rc = pres_disconnect(p, dev);
                if (rc != 0)
                    err("opener disconnect %s: %s", dev, pres_strerror(rc));
                else
                    discs++;
            } else if (rc == -ENOSPC) {
                atomic_fetch_add(&g_enospc, 1);
            } else {
                err("opener connect %s: %s", dev, pres_strerror(rc));
            }
        } else {
            rc = pres_connect(p, user, "to_ro", "togw", 60000, NULL);
            if (rc != -EROFS)
                err("connect through a read-only handle: %s", pres_strerror(rc));
        }
        pres_close(p);
    }
    atomic_fetch_add(&g_opens, opens);
    atomic_fetch_add(&g_connects, conns);
    atomic_fetch_add(&g_disconnects, discs);
    return NULL;
}

/* ------------------------------------------------------------------------ */

static int teardown(void **state)
{
    (void)state;
    if (g_rw)
        pres_close(g_rw);
    if (g_ro)
        pres_close(g_ro);
    g_rw = g_ro = NULL;
    th_store_destroy(&g_store);
    return 0;
}

/*
 * Writers, readers and openers run together for a second or two: every
 * read is one writer's consistent write, route results are connected
 * devices of the routed user, each once, handles open and close beside
 * them without error, and the counters add up to what the threads did.
 */
static void test_threads_share_handles(void **state)
{
    (void)state;
    g_run_ms = (uint64_t)th_scale(1500, 1000);
    const char *args[] = { "--capacity", "65536", NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);
    assert_int_equal(pres_open(&g_rw, g_store.name, PRES_RDWR), 0);
    assert_int_equal(pres_open(&g_ro, g_store.name, PRES_RDONLY), 0);
    pres_stats_t st0;
    assert_int_equal(pres_stats(g_ro, &st0), 0);

    pthread_t th[NW + NR + NO];
    int nth = 0;
    for (int k = 0; k < NW; k++)
        assert_int_equal(pthread_create(&th[nth++], NULL, writer, (void *)(intptr_t)k), 0);
    for (int r = 0; r < NR; r++)
        assert_int_equal(pthread_create(&th[nth++], NULL, reader, (void *)(intptr_t)r), 0);
    for (int t = 0; t < NO; t++)
        assert_int_equal(pthread_create(&th[nth++], NULL, opener, (void *)(intptr_t)t), 0);

    uint64_t end = th_mono_ms() + g_run_ms;
    while (th_mono_ms() < end) {
        struct timespec ts = { 0, 10 * 1000000L };
        nanosleep(&ts, NULL);   /* the run's length, not a condition */
    }
    atomic_store(&g_stop, 1);
    for (int i = 0; i < nth; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);

    pres_stats_t st1;
    assert_int_equal(pres_stats(g_ro, &st1), 0);
    printf("threads: %llu connects (%llu refused -ENOSPC), %llu heartbeats, %llu disconnects; %llu "
           "reads (%llu found, %llu routed devices), longest %.3f ms; %llu "
           "handles opened and closed\n",
           (unsigned long long)g_connects, (unsigned long long)g_enospc,
           (unsigned long long)g_heartbeats,
           (unsigned long long)g_disconnects, (unsigned long long)g_reads,
           (unsigned long long)g_hits, (unsigned long long)g_route_devs,
           (double)g_max_read_ns / 1e6, (unsigned long long)g_opens);
    if (g_errors)
        fprintf(stderr, "%llu errors, first: %s\n", (unsigned long long)g_errors, g_msg);
    assert_int_equal(g_errors, 0);
    /* 124 devices in a store of 65536: never full (API.md: -ENOSPC means
     * the store is full). */
    assert_int_equal(g_enospc, 0);
    assert_true(g_connects > 0 && g_heartbeats > 0 && g_disconnects > 0);
    assert_true(g_hits > 0 && g_route_devs > 0 && g_opens >= 2);
    assert_true(g_max_read_ns < UINT64_C(1000000000));
    assert_int_equal(st1.connects - st0.connects, g_connects);
    assert_int_equal(st1.heartbeats - st0.heartbeats, g_heartbeats);
    assert_int_equal(st1.disconnects - st0.disconnects, g_disconnects);

    pres_close(g_rw);
    pres_close(g_ro);
    g_rw = g_ro = NULL;
    check_ok("at the end");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_threads_share_handles, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
