/*
 * test_user_mp.c - privacy policies and typing under many processes, and
 * their writers killed at any instruction.
 *
 * Children open their own handles and never call cmocka: they record what
 * they saw in a shared anonymous page made before the fork, and the parent
 * asserts afterwards.
 *
 * How a torn policy is made visible: writers flip one user's policy
 * between two that differ in every part (flags, audiences, which list, who
 * is on it), and readers ask as two viewers for whom each policy gives a
 * known answer while every mix of the two gives another one.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "inspect.h"
#include "presence.h"

#define NW       3
#define NR       2
#define MSG_LEN  256
#define LONG_TTL 600000u
#define NCONV    4

typedef struct {
    _Atomic uint64_t stop;
    _Atomic uint64_t w_ops, w_enospc, w_errors, w_started;
    _Atomic int      w_msg_set;
    char             w_msg[MSG_LEN];
    _Atomic uint64_t r_calls, r_a, r_b, r_typing, r_errors;
    _Atomic int      r_msg_set;
    char             r_msg[MSG_LEN];
} mp_t;

static mp_t       *M;
static th_store_t  g_store;
static pid_t       g_kids[16];
static uint64_t    g_seed;

#define check_ok(when) assert_int_equal(th_check_ok(&g_store, (when)), 0)

/* The first problem found is the one told: later ones only count. */
#define note(set, msg, ...) th_note_first((set), (msg), MSG_LEN, __VA_ARGS__)

#define W_ERR(...) do { \
        atomic_fetch_add(&M->w_errors, 1); \
        note(&M->w_msg_set, M->w_msg, __VA_ARGS__); \
    } while (0)
#define R_ERR(...) do { \
        atomic_fetch_add(&M->r_errors, 1); \
        note(&M->r_msg_set, M->r_msg, __VA_ARGS__); \
    } while (0)

static void kid_add(pid_t pid)
{
    assert_true(pid > 0);
    for (size_t i = 0; i < sizeof g_kids / sizeof g_kids[0]; i++)
        if (g_kids[i] == 0) {
            g_kids[i] = pid;
            return;
        }
    fail_msg("too many children");
}

static void kid_forget(pid_t pid)
{
    for (size_t i = 0; i < sizeof g_kids / sizeof g_kids[0]; i++)
        if (g_kids[i] == pid)
            g_kids[i] = 0;
}

static pid_t spawn_kid(int (*fn)(void *), void *arg)
{
    pid_t pid = th_fork(fn, arg);
    kid_add(pid);
    return pid;
}

static void kill_kid(pid_t pid)
{
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    kid_forget(pid);
}

static int wait_kid(pid_t pid, int ms)
{
    int rc = th_wait_child(pid, ms);
    kid_forget(pid);
    return rc;
}

static int setup(void **state)
{
    (void)state;
    void *m = mmap(NULL, sizeof(mp_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                   -1, 0);
    assert_true(m != MAP_FAILED);
    memset(m, 0, sizeof(mp_t));
    M = m;
    memset(g_kids, 0, sizeof g_kids);
    const char *s = getenv("PRES_CRASH_SEED");
    g_seed = s && *s ? strtoull(s, NULL, 0) : 20240917;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    th_kill_children(g_kids, sizeof g_kids / sizeof g_kids[0]);
    th_store_destroy(&g_store);
    munmap(M, sizeof *M);
    M = NULL;
    return 0;
}

static void report(void)
{
    if (M->w_errors)
        fprintf(stderr, "writers: %llu errors, first: %s\n",
                (unsigned long long)M->w_errors, M->w_msg);
    if (M->r_errors)
        fprintf(stderr, "readers: %llu errors, first: %s\n",
                (unsigned long long)M->r_errors, M->r_msg);
}

static pres_t *open_or_die(int flags)
{
    pres_t *p = NULL;
    int rc;
    /* Client slots of children killed a moment ago may not be free yet. */
    while ((rc = pres_open(&p, g_store.name, flags)) != 0) {
        if (rc != -ENOSPC)
            return NULL;
        if (atomic_load(&M->stop))
            return NULL;
        th_nap_us(1000);
    }
    return p;
}

static uint64_t seed_of(uint64_t k)
{
    uint64_t s = g_seed ^ (k * UINT64_C(0x9e3779b97f4a7c15)) ^ (uint64_t)getpid();
    return s ? s : 1;
}

/* ------------------------------------------------------------------------ */
/* Two policies, never a mix                                                 */

/*
 * Target "tp" is connected and active.  Viewer "v1" is last on B's allow
 * list; viewer "v2" last on A's deny list.
 *   A: everyone sees both; deny list of 64 ("x0".."x62", "v2"); exact.
 *   B: nobody sees either; approximate; allow list of 64 ("y0".."y62", "v1").
 * v1 sees the truth under both.  v2 sees {offline, hidden} under A and
 * {offline, recently} under B.  A's flags with B's lists show v2 the truth;
 * B's flags with A's lists show v1 {offline, recently}: either mix is seen.
 */
static char g_ids[2][64][16];
static const char *g_list[2][64];

static void policies(pres_privacy_t *a, pres_privacy_t *b)
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
    memset(a, 0, sizeof *a);
    memset(b, 0, sizeof *b);
    a->last_seen = a->online = PRES_EVERYONE;
    a->deny = g_list[0];
    a->n_deny = 64;
    b->last_seen = b->online = PRES_NOBODY;
    b->approximate = 1;
    b->allow = g_list[1];
    b->n_allow = 64;
}

static int flip_writer(void *arg)
{
    uint64_t seed = seed_of((uint64_t)(uintptr_t)arg);
    pres_privacy_t pol[2];
    policies(&pol[0], &pol[1]);
    pres_t *p = open_or_die(PRES_RDWR);
    if (!p) {
        W_ERR("open failed");
        return 1;
    }
    while (!atomic_load_explicit(&M->stop, memory_order_relaxed)) {
        int rc = pres_set_privacy(p, "tp", &pol[th_rand(&seed) & 1]);
        if (rc == -ENOSPC)
            atomic_fetch_add_explicit(&M->w_enospc, 1, memory_order_relaxed);
        else if (rc != 0)
            W_ERR("set_privacy: %s", pres_strerror(rc));
        else
            atomic_fetch_add_explicit(&M->w_ops, 1, memory_order_relaxed);
    }
    pres_close(p);
    return 0;
}

static int flip_reader(void *arg)
{
    (void)arg;
    pres_t *p = open_or_die(PRES_RDONLY);
    if (!p) {
        R_ERR("open failed");
        return 1;
    }
    pres_viewer_t v1 = { "v1", 0 }, v2 = { "v2", 1 };
    pres_user_view_t v;
    while (!atomic_load_explicit(&M->stop, memory_order_relaxed)) {
        int rc = pres_user(p, "tp", &v1, &v);
        if (rc != 0)
            R_ERR("pres_user as v1: %s", pres_strerror(rc));
        else if (v.status != PRES_ACTIVE_NOW || v.seen != PRES_SEEN_EXACT ||
                 v.devices != 1 || v.last_seen_ms == 0)
            R_ERR("v1 sees status %d seen %d devices %u: B's flags with A's lists",
                  v.status, v.seen, v.devices);
        rc = pres_user(p, "tp", &v2, &v);
        if (rc != 0) {
            R_ERR("pres_user as v2: %s", pres_strerror(rc));
        } else if (v.status == PRES_OFFLINE && v.devices == 0 && v.last_seen_ms == 0 &&
                   v.seen == PRES_SEEN_HIDDEN) {
            atomic_fetch_add_explicit(&M->r_a, 1, memory_order_relaxed);
        } else if (v.status == PRES_OFFLINE && v.devices == 0 && v.last_seen_ms == 0 &&
                   v.seen == PRES_SEEN_RECENTLY) {
            atomic_fetch_add_explicit(&M->r_b, 1, memory_order_relaxed);
        } else {
            R_ERR("v2 sees status %d seen %d devices %u last seen %llu: neither A nor B",
                  v.status, v.seen, v.devices, (unsigned long long)v.last_seen_ms);
        }
        atomic_fetch_add_explicit(&M->r_calls, 1, memory_order_relaxed);
    }
    pres_close(p);
    return 0;
}

struct in_use_arg { pres_t *p; uint64_t exc, typ; pres_inspect_info_t in; };

static int in_use_at_most(void *arg)
{
    struct in_use_arg *a = arg;
    return pres__inspect_info(a->p, &a->in) == 0 && a->in.exceptions_in_use <= a->exc &&
           a->in.typing_in_use <= a->typ;
}

static void test_policy_never_torn(void **state)
{
    (void)state;
    const int run_ms = th_scale(2000, 1000);
    const char *args[] = { "--capacity", "4096", "--exceptions", "65536", NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, g_store.name, PRES_RDWR), 0);
    assert_int_equal(pres_gateway_attach(p, "gw_tp"), 0);
    assert_int_equal(pres_connect(p, "tp", "tp_d", "gw_tp", LONG_TTL, NULL), 0);
    pres_privacy_t a, b;
    policies(&a, &b);
    assert_int_equal(pres_set_privacy(p, "tp", &a), 0);

    pid_t kids[NW + NR];
    for (int r = 0; r < NR; r++)
        kids[r] = spawn_kid(flip_reader, NULL);
    for (int k = 0; k < NW - 1; k++)
        kids[NR + k] = spawn_kid(flip_writer, (void *)(uintptr_t)k);
    th_nap_us((long)run_ms * 1000);     /* the length of the run */
    atomic_store(&M->stop, 1);
    for (int k = 0; k < NR + NW - 1; k++)
        assert_int_equal(wait_kid(kids[k], 30000), 0);

    printf("policies: %llu replaced (%llu -ENOSPC while the daemon caught up); "
           "%llu reads: %llu as A, %llu as B\n", (unsigned long long)M->w_ops,
           (unsigned long long)M->w_enospc, (unsigned long long)M->r_calls,
           (unsigned long long)M->r_a, (unsigned long long)M->r_b);
    report();
    assert_int_equal(M->w_errors, 0);
    assert_int_equal(M->r_errors, 0);
    assert_true(M->w_ops > 100);
    assert_true(M->r_a > 0 && M->r_b > 0);
    check_ok("after the flips");

    /* Every replaced policy's entries come back: only the last one's 65
     * stay in use. */
    struct in_use_arg u = { .p = p, .exc = 65, .typ = UINT64_MAX };
    if (!th_wait_until(in_use_at_most, &u, 5000))
        fail_msg("%llu exception entries in use, expected 65",
                 (unsigned long long)u.in.exceptions_in_use);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Typing: writers type, move, stop and reconnect; readers list             */

static int typer(void *arg)
{
    int k = (int)(intptr_t)arg;
    uint64_t seed = seed_of((uint64_t)k + 100);
    pres_t *p = open_or_die(PRES_RDWR);
    if (!p) {
        W_ERR("open failed");
        return 1;
    }
    char gw[32], user[32], dev[2][32], conv[32];
    snprintf(gw, sizeof gw, "tgw%d", k);
    snprintf(user, sizeof user, "tw%d", k);
    for (int d = 0; d < 2; d++)
        snprintf(dev[d], sizeof dev[d], "tw%d_d%d", k, d);
    int rc = pres_gateway_attach(p, gw);
    for (int d = 0; d < 2 && rc == 0; d++)
        rc = pres_connect(p, user, dev[d], gw, LONG_TTL, NULL);
    if (rc != 0) {
        W_ERR("setup: %s", pres_strerror(rc));
        pres_close(p);
        return 1;
    }
    while (!atomic_load_explicit(&M->stop, memory_order_relaxed)) {
        uint64_t x = th_rand(&seed);
        const char *dv = dev[x & 1];
        unsigned op = (unsigned)((x >> 8) % 100);
        snprintf(conv, sizeof conv, "tc%u", (unsigned)((x >> 16) % NCONV));
        if (op < 70) {
            rc = pres_typing(p, dv, conv, 50 + (uint32_t)((x >> 24) % 2000));
        } else if (op < 90) {
            rc = pres_typing(p, dv, conv, 0);
        } else if (op < 95) {
            rc = pres_disconnect(p, dv);
        } else {
            rc = pres_connect(p, user, dv, gw, LONG_TTL, NULL);
        }
        /* A disconnected device cannot type: -ENOENT until it connects. */
        if (rc == -ENOSPC)
            atomic_fetch_add_explicit(&M->w_enospc, 1, memory_order_relaxed);
        else if (rc != 0 && rc != -ENOENT)
            W_ERR("op %u on %s: %s", op, dv, pres_strerror(rc));
        atomic_fetch_add_explicit(&M->w_ops, 1, memory_order_relaxed);
        /* Pacing: every move takes a record, freed a tick or two later;
         * unpaced, three typers empty the table and mostly hear -ENOSPC. */
        th_nap_us(50);
    }
    pres_close(p);
    return 0;
}

static int lister(void *arg)
{
    (void)arg;
    pres_t *p = open_or_die(PRES_RDONLY);
    if (!p) {
        R_ERR("open failed");
        return 1;
    }
    char ids[8][PRES_ID_MAX + 1], conv[16];
    unsigned c = 0;
    while (!atomic_load_explicit(&M->stop, memory_order_relaxed)) {
        size_t n = 99;
        snprintf(conv, sizeof conv, "tc%u", c++ % NCONV);
        int rc = pres_typing_list(p, conv, ids, 8, &n);
        atomic_fetch_add_explicit(&M->r_calls, 1, memory_order_relaxed);
        if (rc != 0) {
            R_ERR("typing_list %s: %s", conv, pres_strerror(rc));
            continue;
        }
        if (n > NW)
            R_ERR("%s: %zu typing, of %d users", conv, n, NW);
        for (size_t i = 0; i < n && i < 8; i++) {
            int k = -1, len = 0;
            if (sscanf(ids[i], "tw%d%n", &k, &len) != 1 || ids[i][len] != '\0' || k < 0 ||
                k >= NW)
                R_ERR("%s lists '%s', never a typer", conv, ids[i]);
            for (size_t j = 0; j < i; j++)
                if (strcmp(ids[i], ids[j]) == 0)
                    R_ERR("%s lists %s twice", conv, ids[i]);
        }
        if (n)
            atomic_fetch_add_explicit(&M->r_typing, 1, memory_order_relaxed);
    }
    pres_close(p);
    return 0;
}

static void test_typing_never_wrong(void **state)
{
    (void)state;
    const int run_ms = th_scale(2000, 1000);
    const char *args[] = { "--capacity", "16384", NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);
    pid_t kids[NW + NR];
    for (int r = 0; r < NR; r++)
        kids[r] = spawn_kid(lister, NULL);
    for (int k = 0; k < NW; k++)
        kids[NR + k] = spawn_kid(typer, (void *)(intptr_t)k);
    th_nap_us((long)run_ms * 1000);     /* the length of the run */
    atomic_store(&M->stop, 1);
    for (int k = 0; k < NR + NW; k++)
        assert_int_equal(wait_kid(kids[k], 30000), 0);
    printf("typing: %llu writes (%llu -ENOSPC); %llu lists, %llu with someone typing\n",
           (unsigned long long)M->w_ops, (unsigned long long)M->w_enospc,
           (unsigned long long)M->r_calls, (unsigned long long)M->r_typing);
    report();
    assert_int_equal(M->w_errors, 0);
    assert_int_equal(M->r_errors, 0);
    assert_true(M->r_typing > 0);
    check_ok("after the typing");

    /* The writers closed their handles: their gateways' devices went
     * offline, and every typing record comes back. */
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, g_store.name, PRES_RDONLY), 0);
    struct in_use_arg u = { .p = p, .exc = UINT64_MAX, .typ = 0 };
    if (!th_wait_until(in_use_at_most, &u, 8000))
        fail_msg("%llu typing records in use", (unsigned long long)u.in.typing_in_use);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Writers killed at any instruction                                         */

#define CR_USERS 16
#define CR_DEVS  8          /* devices a writer types on */

static int crash_writer(void *arg)
{
    uint64_t g = (uint64_t)(uintptr_t)arg;
    uint64_t seed = seed_of(g + 1000);
    atomic_fetch_add(&M->w_started, 1);
    pres_t *p = open_or_die(PRES_RDWR);
    if (!p)
        return 0;
    static char ids[64][16];
    static const char *list[64];
    for (int k = 0; k < 64; k++) {
        snprintf(ids[k], sizeof ids[k], "cx%d", k);
        list[k] = ids[k];
    }
    char gw[24], dev[24], user[24], conv[24];
    snprintf(gw, sizeof gw, "cgw%llu", (unsigned long long)g);
    if (pres_gateway_attach(p, gw) != 0) {
        W_ERR("attach %s", gw);
        pres_close(p);
        return 0;
    }
    for (uint64_t it = 0;; it++) {
        uint64_t x = th_rand(&seed);
        int rc;
        snprintf(user, sizeof user, "cu%u", (unsigned)(x % CR_USERS));
        snprintf(dev, sizeof dev, "cd%llu_%u", (unsigned long long)g,
                 (unsigned)((x >> 8) % CR_DEVS));
        snprintf(conv, sizeof conv, "cc%u", (unsigned)((x >> 12) % 5));
        unsigned op = (unsigned)((x >> 16) % 100);
        if (op < 50) {
            pres_privacy_t pol = { .last_seen = (int)((x >> 24) % 3), .online = 0 };
            pol.online = (int)((x >> 26) % (unsigned)(pol.last_seen + 1));
            pol.approximate = (x >> 28) & 1;
            pol.reciprocal = (x >> 29) & 1;
            pol.invisible = ((x >> 30) & 7) == 0;
            pol.n_allow = (size_t)((x >> 32) % 65);
            pol.n_deny = (size_t)((x >> 40) % 65);
            pol.allow = list;
            pol.deny = list;
            rc = pres_set_privacy(p, user, &pol);
        } else if (op < 60) {
            rc = pres_connect(p, user, dev, gw, LONG_TTL, NULL);
        } else if (op < 90) {
            rc = pres_typing(p, dev, conv, (x >> 48) & 1 ? 0 : 60000);
        } else {
            pres_user_view_t v;
            pres_viewer_t who = { list[(x >> 48) % 64], 0 };
            rc = pres_user(p, user, &who, &v);
        }
        if (rc != 0 && rc != -ENOENT && rc != -ENOSPC)
            W_ERR("op %u: %s", op, pres_strerror(rc));
        if ((it & 15) == 0)
            atomic_fetch_add_explicit(&M->w_ops, 16, memory_order_relaxed);
    }
    return 0;
}

struct set_arg { pres_t *p; const char *user; const pres_privacy_t *pol; int rc; };

static int set_succeeds(void *arg)
{
    struct set_arg *a = arg;
    a->rc = pres_set_privacy(a->p, a->user, a->pol);
    return a->rc == 0;
}

struct type_arg { pres_t *p; const char *dev, *conv; int rc; };

static int type_succeeds(void *arg)
{
    struct type_arg *a = arg;
    a->rc = pres_typing(a->p, a->dev, a->conv, 60000);
    return a->rc == 0;
}

/*
 * Writers that set policies (lists of up to 64 each way, invisibility) and
 * type, SIGKILLed 0-20 ms after they start, again and again.  Afterwards
 * the store checks clean, and every exception entry and every typing
 * record comes back: the whole capacity of each can be taken again.
 */
static void test_crash_policies_and_typing(void **state)
{
    (void)state;
    uint64_t seed = g_seed;
    const int run_ms = th_scale(5000, 3000);
    const unsigned exc = 129 * 24;   /* 24 full policies */
    char exc_s[16];
    snprintf(exc_s, sizeof exc_s, "%u", exc);
    printf("crash: seed %llu (PRES_CRASH_SEED), %d ms\n", (unsigned long long)g_seed, run_ms);
    const char *args[] = { "--capacity", "4096", "--exceptions", exc_s, "--retain-ms", "100",
                           NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);

    pid_t w[NW];
    uint64_t deadline[NW], gen = 0, killed = 0;
    for (int i = 0; i < NW; i++) {
        w[i] = spawn_kid(crash_writer, (void *)(uintptr_t)gen++);
        deadline[i] = th_mono_ms() + th_rand(&seed) % 21;
    }
    for (uint64_t end = th_mono_ms() + (uint64_t)run_ms; th_mono_ms() < end;) {
        for (int i = 0; i < NW; i++) {
            if (th_mono_ms() < deadline[i])
                continue;
            kill_kid(w[i]);
            killed++;
            w[i] = spawn_kid(crash_writer, (void *)(uintptr_t)gen++);
            deadline[i] = th_mono_ms() + th_rand(&seed) % 21;
        }
        th_nap_us(200);
    }
    atomic_store(&M->stop, 1);
    for (int i = 0; i < NW; i++) {
        kill_kid(w[i]);
        killed++;
    }
    printf("crash: %llu writers killed, %llu started, ~%llu ops\n", (unsigned long long)killed,
           (unsigned long long)M->w_started, (unsigned long long)M->w_ops);
    report();
    assert_int_equal(M->w_errors, 0);
    assert_true(killed >= 50);
    check_ok("after the kills");

    /* Policies without lists free every block the dead left in use. */
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, g_store.name, PRES_RDWR), 0);
    pres_privacy_t plain = { .last_seen = PRES_EVERYONE, .online = PRES_EVERYONE };
    char user[24];
    for (int u = 0; u < CR_USERS; u++) {
        snprintf(user, sizeof user, "cu%d", u);
        assert_int_equal(pres_set_privacy(p, user, &plain), 0);
    }
    struct in_use_arg ua = { .p = p, .exc = 0, .typ = 0 };
    if (!th_wait_until(in_use_at_most, &ua, 8000))
        fail_msg("after the sweep: %llu exception entries and %llu typing records in use",
                 (unsigned long long)ua.in.exceptions_in_use,
                 (unsigned long long)ua.in.typing_in_use);
    check_ok("after the sweep");

    /* The whole capacity, again: 24 full policies, then no room. */
    static char ids[2][64][16];
    static const char *lists[2][64];
    for (int k = 0; k < 64; k++) {
        snprintf(ids[0][k], 16, "fa%d", k);
        snprintf(ids[1][k], 16, "fd%d", k);
        lists[0][k] = ids[0][k];
        lists[1][k] = ids[1][k];
    }
    pres_privacy_t full = { .last_seen = PRES_CONTACTS, .online = PRES_EVERYONE,
                            .allow = lists[0], .n_allow = 64, .deny = lists[1], .n_deny = 64 };
    for (unsigned k = 0; k < exc / 129; k++) {
        snprintf(user, sizeof user, "full%u", k);
        struct set_arg sa = { p, user, &full, 0 };
        if (!th_wait_until(set_succeeds, &sa, 5000))
            fail_msg("full policy %u of %u: %s", k, exc / 129, pres_strerror(sa.rc));
    }
    full.n_allow = 0;
    full.n_deny = 0;
    full.invisible = 1;              /* one entry, the HEAD: none left */
    assert_int_equal(pres_set_privacy(p, "full_last", &full), -ENOSPC);

    /* And every typing record. */
    pres_inspect_info_t in;
    assert_int_equal(pres__inspect_info(p, &in), 0);
    assert_int_equal(pres_gateway_attach(p, "gw_fresh"), 0);
    char dev[40];
    for (uint64_t k = 0; k < in.typing_capacity; k++) {
        snprintf(dev, sizeof dev, "fresh%llu", (unsigned long long)k);
        assert_int_equal(pres_connect(p, "fresh_u", dev, "gw_fresh", LONG_TTL, NULL), 0);
        struct type_arg ta = { p, dev, "fresh_c", 0 };
        if (!th_wait_until(type_succeeds, &ta, 5000))
            fail_msg("typing record %llu of %llu: %s", (unsigned long long)k,
                     (unsigned long long)in.typing_capacity, pres_strerror(ta.rc));
    }
    assert_int_equal(pres_connect(p, "fresh_u", "fresh_more", "gw_fresh", LONG_TTL, NULL), 0);
    assert_int_equal(pres_typing(p, "fresh_more", "fresh_c", 60000), -ENOSPC);
    size_t n = 0;
    assert_int_equal(pres_typing_list(p, "fresh_c", NULL, 0, &n), 0);
    assert_int_equal(n, 1);
    check_ok("with both tables full");
    pres_close(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_policy_never_torn, setup, teardown),
        cmocka_unit_test_setup_teardown(test_typing_never_wrong, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_policies_and_typing, setup, teardown),
    };
    return cmocka_run_group_tests_name("user_mp", tests, NULL, NULL);
}
