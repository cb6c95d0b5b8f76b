/*
 * test_user_mt.c - privacy policies and typing from many threads of one
 * process; run again under ThreadSanitizer by `make check` (the _mt
 * suffix).
 *
 * Setter threads share one PRES_RDWR handle and flip a user's policy
 * between two (as test_user_mp.c: each viewer's answer under either is
 * known, and any mix of the two gives another); reader threads share a
 * PRES_RDONLY handle; typer threads type, move and stop on devices of their
 * own, and lister threads check every list.  Threads never call cmocka;
 * the main thread asserts on what they recorded.
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

#include "harness.h"
#include "inspect.h"
#include "presence.h"

#define NSET     2
#define NREAD    2
#define NTYPE    2
#define NLIST    1
#define LONG_TTL 600000u
#define NCONV    3
#define MSG_LEN  256

static th_store_t  g_store;
static pres_t     *g_rw, *g_ro;
static _Atomic int g_stop;
static _Atomic uint64_t g_errors, g_sets, g_enospc, g_reads, g_as_a, g_as_b, g_typed,
                        g_lists, g_seen_typing;
static _Atomic int g_msg_set;
static char        g_msg[MSG_LEN];

static char        g_ids[2][64][16];
static const char *g_list[2][64];
static pres_privacy_t g_pol[2];

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

/* A: everyone, deny list ending in v2.  B: nobody, approximate, allow list
 * ending in v1.  v1 sees the truth under both; v2 {offline, hidden} under
 * A and {offline, recently} under B; a mix shows either something else. */
static void make_policies(void)
{
    for (int k = 0; k < 63; k++) {
        snprintf(g_ids[0][k], 16, "x%d", k);
        snprintf(g_ids[1][k], 16, "y%d", k);
    }
    strcpy(g_ids[0][63], "v2");
    strcpy(g_ids[1][63], "v1");
    for (int k = 0; k < 64; k++) {
        g_list[0][k] = g_ids[0][k];
        g_list[1][k] = g_ids[1][k];
    }
    memset(g_pol, 0, sizeof g_pol);
    g_pol[0].deny = g_list[0];
    g_pol[0].n_deny = 64;
    g_pol[1].last_seen = g_pol[1].online = PRES_NOBODY;
    g_pol[1].approximate = 1;
    g_pol[1].allow = g_list[1];
    g_pol[1].n_allow = 64;
}

static void *setter(void *arg)
{
    uint64_t seed = 77 + (uint64_t)(uintptr_t)arg;
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        int rc = pres_set_privacy(g_rw, "mt_target", &g_pol[th_rand(&seed) & 1]);
        if (rc == 0)
            atomic_fetch_add_explicit(&g_sets, 1, memory_order_relaxed);
        else if (rc == -ENOSPC)
            atomic_fetch_add_explicit(&g_enospc, 1, memory_order_relaxed);
        else
            err("set_privacy: %s", pres_strerror(rc));
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    pres_viewer_t v1 = { "v1", 0 }, v2 = { "v2", 1 };
    pres_user_view_t v;
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        int rc = pres_user(g_ro, "mt_target", &v1, &v);
        if (rc != 0)
            err("pres_user as v1: %s", pres_strerror(rc));
        else if (v.status != PRES_ACTIVE_NOW || v.seen != PRES_SEEN_EXACT || v.devices != 1)
            err("v1 sees status %d seen %d devices %u", v.status, v.seen, v.devices);
        if ((rc = pres_user(g_ro, "mt_target", &v2, &v)) != 0)
            err("pres_user as v2: %s", pres_strerror(rc));
        else if (v.status != PRES_OFFLINE || v.devices != 0 || v.last_seen_ms != 0)
            err("v2 sees status %d devices %u last seen %llu", v.status, v.devices,
                (unsigned long long)v.last_seen_ms);
        else if (v.seen == PRES_SEEN_HIDDEN)
            atomic_fetch_add_explicit(&g_as_a, 1, memory_order_relaxed);
        else if (v.seen == PRES_SEEN_RECENTLY)
            atomic_fetch_add_explicit(&g_as_b, 1, memory_order_relaxed);
        else
            err("v2 sees seen %d: neither policy", v.seen);
        atomic_fetch_add_explicit(&g_reads, 1, memory_order_relaxed);
    }
    return NULL;
}

static void *typer(void *arg)
{
    int k = (int)(intptr_t)arg;
    uint64_t seed = 1234 + (uint64_t)k;
    char dev[2][32], conv[32], user[32];
    snprintf(user, sizeof user, "mt_u%d", k);
    for (int d = 0; d < 2; d++)
        snprintf(dev[d], sizeof dev[d], "mt_u%d_d%d", k, d);
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        uint64_t x = th_rand(&seed);
        const char *dv = dev[x & 1];
        unsigned op = (unsigned)((x >> 8) % 100);
        int rc;
        snprintf(conv, sizeof conv, "mt_c%u", (unsigned)((x >> 16) % NCONV));
        if (op < 70)
            rc = pres_typing(g_rw, dv, conv, 20 + (uint32_t)((x >> 24) % 500));
        else if (op < 90)
            rc = pres_typing(g_rw, dv, conv, 0);
        else if (op < 95)
            rc = pres_disconnect(g_rw, dv);
        else
            rc = pres_connect(g_rw, user, dv, "mt_gw", LONG_TTL, NULL);
        if (rc != 0 && rc != -ENOENT && rc != -ENOSPC)
            err("typer op %u on %s: %s", op, dv, pres_strerror(rc));
        atomic_fetch_add_explicit(&g_typed, 1, memory_order_relaxed);
        th_nap_us(100);              /* pacing: each move takes a record */
    }
    return NULL;
}

static void *lister(void *arg)
{
    (void)arg;
    char ids[4][PRES_ID_MAX + 1], conv[16];
    unsigned c = 0;
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        size_t n = 99;
        snprintf(conv, sizeof conv, "mt_c%u", c++ % NCONV);
        int rc = pres_typing_list(g_ro, conv, ids, 4, &n);
        atomic_fetch_add_explicit(&g_lists, 1, memory_order_relaxed);
        if (rc != 0) {
            err("typing_list: %s", pres_strerror(rc));
            continue;
        }
        if (n > NTYPE)
            err("%s: %zu typing, of %d users", conv, n, NTYPE);
        for (size_t i = 0; i < n && i < 4; i++) {
            int k = -1, len = 0;
            if (sscanf(ids[i], "mt_u%d%n", &k, &len) != 1 || ids[i][len] || k < 0 ||
                k >= NTYPE)
                err("%s lists '%s'", conv, ids[i]);
            for (size_t j = 0; j < i; j++)
                if (strcmp(ids[i], ids[j]) == 0)
                    err("%s lists %s twice", conv, ids[i]);
        }
        if (n)
            atomic_fetch_add_explicit(&g_seen_typing, 1, memory_order_relaxed);
    }
    return NULL;
}

struct in_use_arg { pres_t *p; pres_inspect_info_t in; };

static int back_to_one_policy(void *arg)
{
    struct in_use_arg *a = arg;
    return pres__inspect_info(a->p, &a->in) == 0 && a->in.exceptions_in_use <= 65 &&
           a->in.typing_in_use == 0;
}

static void test_threads(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", "--exceptions", "16384", NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);
    assert_int_equal(pres_open(&g_rw, g_store.name, PRES_RDWR), 0);
    assert_int_equal(pres_open(&g_ro, g_store.name, PRES_RDONLY), 0);
    assert_int_equal(pres_gateway_attach(g_rw, "mt_gw"), 0);
    make_policies();
    assert_int_equal(pres_connect(g_rw, "mt_target", "mt_target_d", "mt_gw", LONG_TTL, NULL), 0);
    assert_int_equal(pres_set_privacy(g_rw, "mt_target", &g_pol[0]), 0);
    char dev[32], user[16];
    for (int k = 0; k < NTYPE; k++)
        for (int d = 0; d < 2; d++) {
            snprintf(user, sizeof user, "mt_u%d", k);
            snprintf(dev, sizeof dev, "mt_u%d_d%d", k, d);
            assert_int_equal(pres_connect(g_rw, user, dev, "mt_gw", LONG_TTL, NULL), 0);
        }

    pthread_t t[NSET + NREAD + NTYPE + NLIST];
    int n = 0;
    for (int k = 0; k < NSET; k++)
        assert_int_equal(pthread_create(&t[n++], NULL, setter, (void *)(intptr_t)k), 0);
    for (int k = 0; k < NREAD; k++)
        assert_int_equal(pthread_create(&t[n++], NULL, reader, NULL), 0);
    for (int k = 0; k < NTYPE; k++)
        assert_int_equal(pthread_create(&t[n++], NULL, typer, (void *)(intptr_t)k), 0);
    for (int k = 0; k < NLIST; k++)
        assert_int_equal(pthread_create(&t[n++], NULL, lister, NULL), 0);
    th_nap_us((long)th_scale(1500, 1500) * 1000);    /* the length of the run */
    atomic_store(&g_stop, 1);
    for (int k = 0; k < n; k++)
        pthread_join(t[k], NULL);

    printf("threads: %llu policies set (%llu -ENOSPC), %llu reads (%llu as A, %llu as B); "
           "%llu typing writes, %llu lists (%llu with someone typing)\n",
           (unsigned long long)g_sets, (unsigned long long)g_enospc,
           (unsigned long long)g_reads, (unsigned long long)g_as_a,
           (unsigned long long)g_as_b, (unsigned long long)g_typed,
           (unsigned long long)g_lists, (unsigned long long)g_seen_typing);
    if (g_errors)
        fprintf(stderr, "%llu errors, first: %s\n", (unsigned long long)g_errors, g_msg);
    assert_int_equal(g_errors, 0);
    assert_true(g_sets > 10 && g_reads > 10 && g_as_a > 0 && g_as_b > 0);
    assert_true(g_seen_typing > 0);
    assert_int_equal(th_check_ok(&g_store, "after the threads"), 0);

    /* Disconnected, the typers' records go; replaced policies' too. */
    for (int k = 0; k < NTYPE; k++)
        for (int d = 0; d < 2; d++) {
            snprintf(dev, sizeof dev, "mt_u%d_d%d", k, d);
            int rc = pres_disconnect(g_rw, dev);
            assert_true(rc == 0 || rc == -ENOENT);
        }
    struct in_use_arg a = { .p = g_ro };
    if (!th_wait_until(back_to_one_policy, &a, 8000)) {
        static char out[65536];
        th_ctl(&g_store, out, sizeof out, (const char *const[]){ "check", "--verbose", NULL });
        fprintf(stderr, "%s", out);
        th_store_dump_log(&g_store);
        fail_msg("%llu exception entries, %llu typing records still in use",
                 (unsigned long long)a.in.exceptions_in_use,
                 (unsigned long long)a.in.typing_in_use);
    }
    pres_close(g_ro);
    pres_close(g_rw);
    th_store_destroy(&g_store);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests_name("user_mt", tests, NULL, NULL);
}
