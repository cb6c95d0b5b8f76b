/*
 * test_crash.c - clients killed at any instruction (property 3).
 *
 * Writer processes are SIGKILLed at random points of their work, readers
 * in the middle of their reads, and afterwards the store must be intact
 * (`presencectl check`), nothing may have leaked (every device is
 * eventually evicted, every reader slot comes back, the full capacity is
 * usable again) and no reader may ever have stalled.  Two deterministic
 * tests pin down the reader side: a reader killed inside a read section
 * stops holding back grace periods, and a reader that is merely stopped is
 * never taken for dead.
 *
 * Children never call cmocka: they record what they saw in a shared
 * anonymous page created before the fork; the parent asserts.
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
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "inspect.h"
#include "presence.h"

#define MSG_LEN   256
#define NWRITERS  3         /* writer processes alive at once */
#define NREADERS  2         /* reader processes of the random-kill test */
#define NSLOTS    (NREADERS + 1)
#define NDEV      1024      /* the shared device id space: "d0000".."d1023" */
#define NUSERS    100       /* users "u<r>", r < NUSERS */
#define NCLASS    4         /* TTL classes of writers */
#define RING      16        /* a writer's own recent connections */

typedef struct {
    _Atomic uint64_t stop;
    _Atomic uint64_t w_started, w_attached, w_ops, w_open_refused, w_errors;
    _Atomic uint64_t w_enospc, w_ebusy;
    _Atomic int      w_busy_set;
    char             w_busy[MSG_LEN];
    _Atomic int      w_msg_set;
    char             w_msg[MSG_LEN];
    struct {
        _Atomic uint64_t progress;      /* calls of this incarnation */
        _Atomic uint64_t last_done_ns;  /* when its last call returned */
        _Atomic uint64_t max_gap_ns;    /* longest between two returns */
        _Atomic uint64_t open_refused;
        _Atomic uint64_t errors;        /* all incarnations */
        _Atomic int      msg_set;
        char             msg[MSG_LEN];
    } r[NSLOTS];
} cr_shared_t;

static cr_shared_t *C;
static th_store_t   g_store;

/* `presencectl check` passes (see th_check_ok). */
#define check_ok(when) assert_int_equal(th_check_ok(&g_store, (when)), 0)
static uint64_t     g_seed;
static uint64_t     g_capacity;
static pid_t        g_kids[16];

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

static uint64_t mix(uint64_t a, uint64_t b)
{
    uint64_t s = a ^ (b * UINT64_C(0x9e3779b97f4a7c15));
    return s ? s : 1;
}

/* The first problem found is the one told: later ones only count. */
#define note(set, msg, ...) th_note_first((set), (msg), MSG_LEN, __VA_ARGS__)

#define W_ERR(...) do { \
        atomic_fetch_add(&C->w_errors, 1); \
        note(&C->w_msg_set, C->w_msg, __VA_ARGS__); \
    } while (0)
/* -EBUSY is not among the answers API.md allows; counted apart so that the
 * rest of the test still says what it found. */
#define W_BUSY(...) do { \
        atomic_fetch_add(&C->w_ebusy, 1); \
        note(&C->w_busy_set, C->w_busy, __VA_ARGS__); \
    } while (0)
#define W_FAIL(rc, ...) do { \
        if ((rc) == -EBUSY) \
            W_BUSY(__VA_ARGS__); \
        else \
            W_ERR(__VA_ARGS__); \
    } while (0)
#define R_ERR(r, ...) do { \
        atomic_fetch_add(&C->r[r].errors, 1); \
        note(&C->r[r].msg_set, C->r[r].msg, __VA_ARGS__); \
    } while (0)

static void kid_add(pid_t pid)
{
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
    assert_true(pid > 0);
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

static int setup(void **state)
{
    (void)state;
    void *m = mmap(NULL, sizeof(cr_shared_t), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(m != MAP_FAILED);
    memset(m, 0, sizeof(cr_shared_t));
    C = m;
    memset(g_kids, 0, sizeof g_kids);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    th_kill_children(g_kids, sizeof g_kids / sizeof g_kids[0]);
    th_store_destroy(&g_store);
    if (C) {
        munmap(C, sizeof *C);
        C = NULL;
    }
    return 0;
}

static pres_stats_t stats_of(pres_t *p)
{
    pres_stats_t st;
    assert_int_equal(pres_stats(p, &st), 0);
    return st;
}

static pres_inspect_info_t info_of(pres_t *p)
{
    pres_inspect_info_t in;
    assert_int_equal(pres__inspect_info(p, &in), 0);
    return in;
}

static void report_children(void)
{
    if (C->w_errors)
        fprintf(stderr, "writers: %llu errors, first: %s\n",
                (unsigned long long)C->w_errors, C->w_msg);
    if (C->w_ebusy)
        fprintf(stderr, "writers: %llu calls answered -EBUSY, first: %s\n",
                (unsigned long long)C->w_ebusy, C->w_busy);
    for (int r = 0; r < NSLOTS; r++)
        if (C->r[r].errors)
            fprintf(stderr, "reader %d: %llu errors, first: %s\n", r,
                    (unsigned long long)C->r[r].errors, C->r[r].msg);
}

/* ------------------------------------------------------------------------ */
/* What writers write, and how readers check it                              */

/*
 * Writer generation g attaches gateway "gw<g>" and connects with a TTL of
 * cr_ttl(g % NCLASS), for user "u<r>": mostly the device's own user
 * (i % NUSERS: a reconnect in place), sometimes another (a move).  A
 * connected record whose gateway and expiry disagree about the class is a
 * mix of two writes: a torn read, or a half-done write of a killed writer
 * left visible.
 */
static uint32_t cr_ttl(unsigned c) { return 30000u + 15000u * c; }

static int cr_check(const pres_device_info_t *d, const char *want_dev,
                    const char *want_user, char *why, size_t cap)
{
    unsigned ur, gg;
    int n1 = -1, n2 = -1;
    if (want_dev && strcmp(d->device_id, want_dev) != 0) {
        snprintf(why, cap, "asked for %s, got %s", want_dev, d->device_id);
        return -1;
    }
    if (want_user && strcmp(d->user_id, want_user) != 0) {
        snprintf(why, cap, "%s: user %s, expected %s", d->device_id,
                 d->user_id, want_user);
        return -1;
    }
    if (sscanf(d->user_id, "u%u%n", &ur, &n1) != 1 || d->user_id[n1] != '\0' ||
        ur >= NUSERS) {
        snprintf(why, cap, "%s: user '%s' was never written", d->device_id,
                 d->user_id);
        return -1;
    }
    if (sscanf(d->gateway_id, "gw%u%n", &gg, &n2) != 1 || d->gateway_id[n2] != '\0') {
        snprintf(why, cap, "%s: gateway '%s' was never written", d->device_id,
                 d->gateway_id);
        return -1;
    }
    if (d->active && !d->connected) {
        snprintf(why, cap, "%s: active but not connected", d->device_id);
        return -1;
    }
    if (d->connected) {
        /* A writer lives a few ms, so its heartbeats move the expiry far
         * less than the 15 s between two classes' TTLs. */
        unsigned c = gg % NCLASS;
        uint64_t lo = d->connected_at_ms + cr_ttl(c) - 2000;
        uint64_t hi = d->connected_at_ms + cr_ttl(c) + 10000;
        if (d->expires_at_ms < lo || d->expires_at_ms > hi) {
            snprintf(why, cap, "torn: %s of user %s on %s (TTL %u) connected "
                     "at %llu, expires at %llu (%+lld ms)", d->device_id,
                     d->user_id, d->gateway_id, cr_ttl(c),
                     (unsigned long long)d->connected_at_ms,
                     (unsigned long long)d->expires_at_ms,
                     (long long)(d->expires_at_ms - d->connected_at_ms));
            return -1;
        }
    }
    return 0;
}

static int cr_writer(void *arg)
{
    uint64_t g = (uint64_t)(uintptr_t)arg;
    uint64_t seed = mix(g_seed, g + 1);
    unsigned c = (unsigned)(g % NCLASS);
    uint32_t ttl = cr_ttl(c);
    pres_t *p = NULL;
    int rc;

    atomic_fetch_add(&C->w_started, 1);
    /* Client slots of writers killed a moment ago may not be reclaimed
     * yet: a gateway retries, as a real one would. */
    while ((rc = pres_open(&p, g_store.name, PRES_RDWR)) != 0) {
        atomic_fetch_add(&C->w_open_refused, 1);
        if (rc != -ENOSPC && rc != -EAGAIN && rc != -EBUSY)
            W_ERR("pres_open: %s", pres_strerror(rc));
        if (atomic_load(&C->stop))
            return 0;
        th_nap_us(1000);
    }
    char gw[32], dev[32], user[32], why[512];
    snprintf(gw, sizeof gw, "gw%llu", (unsigned long long)g);
    rc = pres_gateway_attach(p, gw);
    if (rc != 0) {
        /* Without the gateway, its connections would outlive the process
         * for their whole TTL: gateways of the dead must be recycled. */
        W_ERR("attach %s: %s", gw, pres_strerror(rc));
        pres_close(p);
        return 0;
    }
    atomic_fetch_add(&C->w_attached, 1);

    struct { unsigned i; pres_ref_t ref; } ring[RING];
    unsigned nring = 0;
    pres_device_info_t d;
    for (uint64_t it = 1; ; it++) {
        if ((it & 63) == 0) {
            atomic_fetch_add_explicit(&C->w_ops, 64, memory_order_relaxed);
            if (atomic_load_explicit(&C->stop, memory_order_relaxed))
                break;
        }
        uint64_t x = th_rand(&seed);
        unsigned i = (unsigned)(x % NDEV);
        unsigned op = (unsigned)((x >> 16) % 100);
        unsigned ri = nring ? (unsigned)((x >> 32) % nring) : 0;
        snprintf(dev, sizeof dev, "d%04u", i);

        if (op < 35) {                          /* connect, or move */
            pres_ref_t ref;
            unsigned ur = (x >> 24) % 100 < 85 ? i % NUSERS
                                               : (unsigned)((x >> 32) % NUSERS);
            snprintf(user, sizeof user, "u%u", ur);
            rc = pres_connect(p, user, dev, gw, ttl, &ref);
            if (rc == -ENOSPC) {
                /* Records superseded or evicted wait for a grace period
                 * before their slots come back, and a reader killed inside
                 * a section holds that up for up to a second: a full store
                 * may refuse for a while.  (No leak: checked at the end.) */
                atomic_fetch_add_explicit(&C->w_enospc, 1, memory_order_relaxed);
                continue;
            }
            if (rc != 0) {
                W_FAIL(rc, "connect %s: %s", dev, pres_strerror(rc));
                continue;
            }
            unsigned slot = nring < RING ? nring++ : (unsigned)(it % RING);
            ring[slot].i = i;
            ring[slot].ref = ref;
        } else if (op < 60) {                   /* heartbeat our connection */
            if (!nring)
                continue;
            rc = pres_heartbeat_ref(p, ring[ri].ref, ttl);
            if (rc != 0 && rc != -ESTALE && rc != -ENOENT)
                W_FAIL(rc, "heartbeat_ref d%04u: %s", ring[ri].i, pres_strerror(rc));
        } else if (op < 70) {                   /* our socket closed */
            if (!nring)
                continue;
            rc = pres_disconnect_ref(p, ring[ri].ref);
            if (rc != 0 && rc != -ESTALE && rc != -ENOENT)
                W_FAIL(rc, "disconnect_ref d%04u: %s", ring[ri].i, pres_strerror(rc));
            ring[ri] = ring[--nring];
        } else if (op < 85) {                   /* disconnect by id */
            rc = pres_disconnect(p, dev);
            if (rc != 0 && rc != -ENOENT)
                W_FAIL(rc, "disconnect %s: %s", dev, pres_strerror(rc));
        } else if (op < 92) {                   /* activity */
            rc = pres_set_activity(p, dev, (x >> 40) & 1 ? PRES_IDLE : PRES_ACTIVE);
            if (rc != 0 && rc != -ENOENT)
                W_FAIL(rc, "set_activity %s: %s", dev, pres_strerror(rc));
        } else {                                /* writers read too */
            rc = pres_device(p, dev, &d);
            if (rc == 0 && cr_check(&d, dev, NULL, why, sizeof why) != 0)
                W_ERR("writer read: %s", why);
            else if (rc != 0 && rc != -ENOENT)
                W_ERR("pres_device %s: %s", dev, pres_strerror(rc));
        }
    }
    pres_close(p);
    return 0;
}

static void reader_done(int r)
{
    uint64_t t = th_now_ns();
    uint64_t last = atomic_load_explicit(&C->r[r].last_done_ns, memory_order_relaxed);
    if (t > last && t - last > atomic_load_explicit(&C->r[r].max_gap_ns, memory_order_relaxed))
        atomic_store_explicit(&C->r[r].max_gap_ns, t - last, memory_order_relaxed);
    atomic_store_explicit(&C->r[r].last_done_ns, t, memory_order_relaxed);
    atomic_fetch_add_explicit(&C->r[r].progress, 1, memory_order_relaxed);
}

static int cr_reader(void *arg)
{
    int r = (int)(intptr_t)arg;
    uint64_t seed = mix(g_seed ^ UINT64_C(0x5eed), (uint64_t)getpid());
    pres_t *p = NULL;
    int rc;
    while ((rc = pres_open(&p, g_store.name, PRES_RDONLY)) != 0) {
        atomic_fetch_add(&C->r[r].open_refused, 1);
        if (rc != -ENOSPC && rc != -EAGAIN && rc != -EBUSY)
            R_ERR(r, "pres_open: %s", pres_strerror(rc));
        if (atomic_load(&C->stop))
            return 0;
        th_nap_us(1000);
    }
    pres_device_info_t d, out[64];
    pres_stats_t st;
    char dev[32], user[32], why[512];

    while (!atomic_load_explicit(&C->stop, memory_order_relaxed)) {
        uint64_t x = th_rand(&seed);
        unsigned op = (unsigned)(x % 100);
        if (op < 70) {
            snprintf(dev, sizeof dev, "d%04u", (unsigned)((x >> 8) % NDEV));
            rc = pres_device(p, dev, &d);
            reader_done(r);
            if (rc == 0) {
                if (cr_check(&d, dev, NULL, why, sizeof why) != 0)
                    R_ERR(r, "pres_device: %s", why);
            } else if (rc != -ENOENT) {
                R_ERR(r, "pres_device %s: %s", dev, pres_strerror(rc));
            }
        } else if (op < 95) {
            size_t n = 0;
            snprintf(user, sizeof user, "u%u", (unsigned)((x >> 8) % NUSERS));
            rc = pres_route(p, user, out, 64, &n);
            reader_done(r);
            if (rc != 0) {
                R_ERR(r, "pres_route %s: %s", user, pres_strerror(rc));
                continue;
            }
            size_t m = n < 64 ? n : 64;
            for (size_t i = 0; i < m; i++) {
                if (!out[i].connected)
                    R_ERR(r, "route %s gave %s, not connected", user, out[i].device_id);
                if (cr_check(&out[i], NULL, user, why, sizeof why) != 0)
                    R_ERR(r, "route %s: %s", user, why);
                for (size_t j = 0; j < i; j++)
                    if (strcmp(out[i].device_id, out[j].device_id) == 0)
                        R_ERR(r, "route %s gave %s twice", user, out[i].device_id);
            }
        } else {
            rc = pres_stats(p, &st);
            reader_done(r);
            if (rc != 0)
                R_ERR(r, "pres_stats: %s", pres_strerror(rc));
            else if (st.devices > st.capacity)
                R_ERR(r, "stats: %llu devices of %llu",
                      (unsigned long long)st.devices, (unsigned long long)st.capacity);
        }
    }
    pres_close(p);
    return 0;
}

/* Start reader slot r afresh; its progress and gap start now. */
static pid_t start_reader(int r)
{
    atomic_store(&C->r[r].progress, 0);
    atomic_store(&C->r[r].max_gap_ns, 0);
    atomic_store(&C->r[r].last_done_ns, th_now_ns());
    return spawn_kid(cr_reader, (void *)(intptr_t)r);
}

/* The longest gap of reader slot r so far, including the current one. */
static uint64_t reader_gap(int r)
{
    uint64_t t = th_now_ns();
    uint64_t last = atomic_load(&C->r[r].last_done_ns);
    uint64_t cur = t > last ? t - last : 0;
    uint64_t mx = atomic_load(&C->r[r].max_gap_ns);
    return cur > mx ? cur : mx;
}

/* ------------------------------------------------------------------------ */
/* Conditions polled under deadlines                                         */

static int no_devices(void *arg)
{
    pres_stats_t st;
    return pres_stats(arg, &st) == 0 && st.devices == 0;
}

struct count_arg { pres_t *p; uint64_t want; };

static int devices_are(void *arg)
{
    struct count_arg *a = arg;
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.devices == a->want;
}

struct slots_arg { pres_t *p; uint64_t baseline; uint64_t now; };

static int slots_back(void *arg)
{
    struct slots_arg *a = arg;
    pres_inspect_info_t in;
    if (pres__inspect_info(a->p, &in) != 0)
        return 0;
    a->now = in.reader_slots_used;
    return in.reader_slots_used <= a->baseline;
}

/* ------------------------------------------------------------------------ */
/* The crash test                                                            */

static uint64_t seed_from_env(void)
{
    const char *s = getenv("PRES_CRASH_SEED");
    if (s && *s)
        return strtoull(s, NULL, 0);
    return 20240611;
}

/*
 * For th_scale(10, 4) seconds: writers killed 0-20 ms after their fork
 * (replaced at once), readers killed every 250 ms in the middle of their
 * reads (replaced at once).  Then: no reader ever stalled, the store
 * checks clean, every device of the dead gateways is disconnected and
 * evicted, every reader slot is back, and the full capacity is usable.
 */
static void test_crash_random_kills(void **state)
{
    (void)state;
    g_seed = seed_from_env();
    uint64_t seed = g_seed;
    const int run_ms = th_scale(10000, 4000);
    const uint64_t reader_kill_ns = 250 * UINT64_C(1000000);
    printf("crash: seed %llu (set PRES_CRASH_SEED to repeat), %d ms\n",
           (unsigned long long)g_seed, run_ms);

    const char *args[] = { "--capacity", "4096", "--retain-ms", "100", NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, g_store.name, PRES_RDONLY), 0);
    pres_stats_t st0 = stats_of(p);
    g_capacity = st0.capacity;
    uint64_t slots0 = info_of(p).reader_slots_used;

    pid_t wpid[NWRITERS], rpid[NREADERS];
    uint64_t wdeadline[NWRITERS];
    uint64_t gen = 0, wkilled = 0, rkilled = 0, max_gap = 0, max_oldest = 0;
    int max_gap_reader = -1;

    for (int r = 0; r < NREADERS; r++)
        rpid[r] = start_reader(r);
    uint64_t t0 = th_now_ns();
    for (int i = 0; i < NWRITERS; i++) {
        wpid[i] = spawn_kid(cr_writer, (void *)(uintptr_t)gen++);
        wdeadline[i] = th_now_ns() + (th_rand(&seed) % 21) * UINT64_C(1000000);
    }
    uint64_t end = t0 + (uint64_t)run_ms * UINT64_C(1000000);
    uint64_t next_rkill = t0 + reader_kill_ns;
    uint64_t next_info = t0;

    for (uint64_t now = th_now_ns(); now < end; now = th_now_ns()) {
        for (int i = 0; i < NWRITERS; i++) {
            if (now < wdeadline[i])
                continue;
            kill_kid(wpid[i]);
            wkilled++;
            wpid[i] = spawn_kid(cr_writer, (void *)(uintptr_t)gen++);
            wdeadline[i] = th_now_ns() + (th_rand(&seed) % 21) * UINT64_C(1000000);
        }
        for (int r = 0; r < NREADERS; r++) {
            uint64_t gap = reader_gap(r);
            if (gap > max_gap) {
                max_gap = gap;
                max_gap_reader = r;
            }
        }
        if (now >= next_rkill) {
            /* Readers are inside a read almost all the time: a kill at a
             * random moment mostly lands in one. */
            int r = (int)(rkilled % NREADERS);
            kill_kid(rpid[r]);
            rkilled++;
            rpid[r] = start_reader(r);
            next_rkill += reader_kill_ns;
        }
        if (now >= next_info) {
            /* A dead reader's open section must stop counting within 1 s
             * of its death. */
            uint64_t o = info_of(p).oldest_reader_ms;
            if (o > max_oldest)
                max_oldest = o;
            next_info = now + 10 * UINT64_C(1000000);
        }
        th_nap_us(200);
    }
    double secs = (double)(th_now_ns() - t0) / 1e9;

    atomic_store(&C->stop, 1);
    for (int i = 0; i < NWRITERS; i++) {
        kill_kid(wpid[i]);
        wkilled++;
    }
    for (int r = 0; r < NREADERS; r++) {
        uint64_t gap = reader_gap(r);
        if (gap > max_gap) {
            max_gap = gap;
            max_gap_reader = r;
        }
        int rc = th_wait_child(rpid[r], 10000);
        kid_forget(rpid[r]);
        assert_int_equal(rc, 0);
    }
    pres_stats_t st1 = stats_of(p);

    printf("crash: %llu writers and %llu readers killed in %.1f s\n",
           (unsigned long long)wkilled, (unsigned long long)rkilled, secs);
    printf("crash: writers: %llu started, %llu attached, ~%llu ops, %llu "
           "connects refused (-ENOSPC), %llu opens refused; readers: %llu opens refused; longest reader gap "
           "%.1f ms (reader %d); oldest read section seen %llu ms; during the "
           "run %llu grace periods, %llu evictions, %llu gateway deaths\n",
           (unsigned long long)C->w_started, (unsigned long long)C->w_attached,
           (unsigned long long)C->w_ops, (unsigned long long)C->w_enospc,
           (unsigned long long)C->w_open_refused,
           (unsigned long long)(C->r[0].open_refused + C->r[1].open_refused),
           (double)max_gap / 1e6, max_gap_reader,
           (unsigned long long)max_oldest,
           (unsigned long long)(st1.grace_periods - st0.grace_periods),
           (unsigned long long)(st1.evictions - st0.evictions),
           (unsigned long long)(st1.gateway_deaths - st0.gateway_deaths));
    report_children();

    assert_int_equal(C->w_errors, 0);
    for (int r = 0; r < NREADERS; r++)
        assert_int_equal(C->r[r].errors, 0);
    assert_true(wkilled >= 50);
    assert_true(C->w_attached >= 10 && C->w_ops > 0);
    /* Readers never wait: not for a writer, not for a dead one. */
    assert_true(max_gap < UINT64_C(1000000000));
    /* Grace periods went on while readers died inside their sections. */
    assert_true(st1.grace_periods > st0.grace_periods);
    assert_true(max_oldest < (uint64_t)th_scale(2000, 3000));

    /* Everything the dead left behind is swept up: their gateways' devices
     * disconnected, then (with 100 ms retention) evicted. */
    uint64_t t_sweep = th_mono_ms();
    int swept = th_wait_until(no_devices, p, th_scale(5000, 8000));
    pres_stats_t st2 = stats_of(p);
    printf("crash: swept in %llu ms: %llu devices, %llu users, %llu "
           "connected left; %llu gateway deaths in all\n",
           (unsigned long long)(th_mono_ms() - t_sweep),
           (unsigned long long)st2.devices, (unsigned long long)st2.users,
           (unsigned long long)st2.connected,
           (unsigned long long)(st2.gateway_deaths - st0.gateway_deaths));
    if (!swept)
        th_store_dump_log(&g_store);
    assert_true(swept);
    check_ok("after the sweep");
    assert_true(st2.users <= NUSERS);

    /* Every client and reader slot of the dead comes back. */
    struct slots_arg sa = { p, slots0, 0 };
    int back = th_wait_until(slots_back, &sa, 3000);
    if (!back)
        fprintf(stderr, "reader slots in use: %llu, before the run %llu\n",
                (unsigned long long)sa.now, (unsigned long long)slots0);
    assert_true(back);

    /* And the whole capacity is usable again: no device slot leaked (in a
     * dead client's cache, a half-done insert, a retired list). */
    pres_t *w = NULL;
    assert_int_equal(pres_open(&w, g_store.name, PRES_RDWR), 0);
    assert_int_equal(pres_gateway_attach(w, "gwfresh"), 0);
    char dev[32], user[32];
    for (uint64_t i = 0; i < g_capacity; i++) {
        snprintf(dev, sizeof dev, "f%05llu", (unsigned long long)i);
        snprintf(user, sizeof user, "fu%llu", (unsigned long long)(i % 64));
        int rc = pres_connect(w, user, dev, "gwfresh", 60000, NULL);
        if (rc != 0)
            fail_msg("fresh connect %llu of %llu: %s", (unsigned long long)i,
                     (unsigned long long)g_capacity, pres_strerror(rc));
    }
    assert_int_equal(pres_connect(w, "fu0", "f_one_more", "gwfresh", 60000, NULL),
                     -ENOSPC);
    /* stats.devices is the daemon's count, as of its last pass. */
    struct count_arg ca = { p, g_capacity };
    assert_true(th_wait_until(devices_are, &ca, 1000));
    check_ok("with the store full");
    pres_close(w);
    pres_close(p);

    /* Last, so that everything above is still checked: API.md gives writes
     * no -EBUSY answer (a writer killed holding a record's latch must not
     * make other gateways' writes fail). */
    assert_int_equal(C->w_ebusy, 0);
}

/* ------------------------------------------------------------------------ */
/* Readers stopped or killed inside a read section                           */

#define LOOP_SLOT  NREADERS     /* the reader slot of the tests below */
#define LOOP_DEVS  16

/* A reader that loops over one user's devices; the parent never changes
 * them while it runs, so every answer must be exactly what was written. */
static int loop_reader(void *arg)
{
    (void)arg;
    const int r = LOOP_SLOT;
    pres_t *p = NULL;
    int rc = pres_open(&p, g_store.name, PRES_RDONLY);
    if (rc != 0) {
        R_ERR(r, "pres_open: %s", pres_strerror(rc));
        return 1;
    }
    pres_device_info_t d, out[64];
    char dev[32];
    for (unsigned it = 0; !atomic_load_explicit(&C->stop, memory_order_relaxed); it++) {
        size_t n = 0;
        rc = pres_route(p, "uloop", out, 64, &n);
        if (rc != 0)
            R_ERR(r, "pres_route: %s", pres_strerror(rc));
        else if (n != LOOP_DEVS)
            R_ERR(r, "pres_route gave %zu devices, expected %d", n, LOOP_DEVS);
        for (size_t i = 0; rc == 0 && i < n && i < 64; i++)
            if (!out[i].connected || strcmp(out[i].user_id, "uloop") != 0 ||
                strcmp(out[i].gateway_id, "gwloop") != 0 ||
                strncmp(out[i].device_id, "loop", 4) != 0)
                R_ERR(r, "route gave %s of %s on %s (connected %d)",
                      out[i].device_id, out[i].user_id, out[i].gateway_id,
                      out[i].connected);
        snprintf(dev, sizeof dev, "loop%u", it % LOOP_DEVS);
        rc = pres_device(p, dev, &d);
        if (rc != 0)
            R_ERR(r, "pres_device %s: %s", dev, pres_strerror(rc));
        else if (strcmp(d.device_id, dev) != 0 || strcmp(d.user_id, "uloop") != 0 ||
                 strcmp(d.gateway_id, "gwloop") != 0 || !d.connected ||
                 d.expires_at_ms < d.connected_at_ms + 600000 - 2000 ||
                 d.expires_at_ms > d.connected_at_ms + 600000 + 60000)
            R_ERR(r, "pres_device %s: %s of %s on %s, connected %d, "
                  "%+lld ms", dev, d.device_id, d.user_id, d.gateway_id,
                  d.connected, (long long)(d.expires_at_ms - d.connected_at_ms));
        reader_done(r);
    }
    pres_close(p);
    return 0;
}

/* Start the store, connect the loop reader's devices, and start it. */
static pid_t loop_setup(pres_t **w, pres_t **p)
{
    g_seed = seed_from_env();
    const char *args[] = { "--capacity", "1024", "--retain-ms", "100", NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);
    assert_int_equal(pres_open(w, g_store.name, PRES_RDWR), 0);
    assert_int_equal(pres_open(p, g_store.name, PRES_RDONLY), 0);
    char dev[32];
    for (int i = 0; i < LOOP_DEVS; i++) {
        snprintf(dev, sizeof dev, "loop%d", i);
        assert_int_equal(pres_connect(*w, "uloop", dev, "gwloop", 600000, NULL), 0);
    }
    atomic_store(&C->r[LOOP_SLOT].last_done_ns, th_now_ns());
    return spawn_kid(loop_reader, NULL);
}

struct progress_arg { uint64_t want; };

static int progressed(void *arg)
{
    struct progress_arg *a = arg;
    return atomic_load(&C->r[LOOP_SLOT].progress) >= a->want;
}

/*
 * SIGSTOP pid, and keep it stopped only if it stopped inside a read
 * section: the store's oldest open read section then grows with the time
 * it stays stopped.  Otherwise let it run a moment and try again.
 * Returns 1 when it is stopped inside a section, 0 (running) if never.
 */
static int stop_inside_section(pres_t *p, pid_t pid, uint64_t *seed, int tries)
{
    for (int t = 0; t < tries; t++) {
        int st;
        assert_int_equal(kill(pid, SIGSTOP), 0);
        assert_int_equal(waitpid(pid, &st, WUNTRACED), pid);
        assert_true(WIFSTOPPED(st));
        /* The daemon publishes the age on its passes: give it a few. */
        th_nap_us(150000);
        uint64_t a1 = info_of(p).oldest_reader_ms;
        if (a1 >= 100) {
            th_nap_us(100000);
            uint64_t a2 = info_of(p).oldest_reader_ms;
            if (a2 >= a1 + 50)
                return 1;
        }
        assert_int_equal(kill(pid, SIGCONT), 0);
        th_nap_us((long)(th_rand(seed) % 3000));
    }
    return 0;
}

struct evict_arg { pres_t *p; const char *prefix; int n; uint64_t ev_want, gp_want; };

/* All devices prefix0..prefix<n-1> are gone, and the counters show the
 * evictions and the grace periods they needed. */
static int evicted(void *arg)
{
    struct evict_arg *a = arg;
    pres_device_info_t d;
    char dev[32];
    for (int i = 0; i < a->n; i++) {
        snprintf(dev, sizeof dev, "%s%d", a->prefix, i);
        if (pres_device(a->p, dev, &d) != -ENOENT)
            return 0;
    }
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.evictions >= a->ev_want &&
           st.grace_periods >= a->gp_want;
}

/*
 * A reader SIGKILLed inside a read section (made certain by stopping it
 * there first) must not hold back grace periods: within about a second its
 * death is noticed, evictions complete, their slots are reused, and its
 * reader slot comes back.
 */
static void test_dead_reader_releases_grace_periods(void **state)
{
    (void)state;
    pres_t *w = NULL, *p = NULL;
    uint64_t seed = mix(seed_from_env(), 2);
    pid_t pid = loop_setup(&w, &p);
    struct progress_arg pa = { 200 };
    assert_true(th_wait_until(progressed, &pa, 10000));
    /* Both our handles take their reader slots (on their first read), the
     * reader has its own. */
    pres_device_info_t d;
    assert_int_equal(pres_device(p, "loop0", &d), 0);
    assert_int_equal(pres_device(w, "loop0", &d), 0);
    uint64_t slots0 = info_of(p).reader_slots_used;

    if (!stop_inside_section(p, pid, &seed, 40))
        fail_msg("could not stop the reader inside a read section in 40 tries: "
                 "the store's oldest_reader_ms never grew while it was stopped");
    uint64_t held = info_of(p).oldest_reader_ms;
    kill_kid(pid);
    uint64_t t_kill = th_mono_ms();
    pres_stats_t st0 = stats_of(p);

    /* Work that needs a grace period: disconnected devices are evicted
     * after 100 ms, and their slots may be reused only after one. */
    char dev[32];
    for (int i = 0; i < LOOP_DEVS; i++) {
        snprintf(dev, sizeof dev, "loop%d", i);
        assert_int_equal(pres_disconnect(w, dev), 0);
    }
    struct evict_arg ea = { p, "loop", LOOP_DEVS,
                            st0.evictions + LOOP_DEVS, st0.grace_periods + 1 };
    int done = th_wait_until(evicted, &ea, th_scale(3000, 5000));
    pres_stats_t st1 = stats_of(p);
    printf("dead reader: killed inside a section open %llu ms; %s after %llu "
           "ms: %llu evictions, %llu grace periods\n",
           (unsigned long long)held, done ? "released" : "NOT released",
           (unsigned long long)(th_mono_ms() - t_kill),
           (unsigned long long)(st1.evictions - st0.evictions),
           (unsigned long long)(st1.grace_periods - st0.grace_periods));
    if (!done)
        th_store_dump_log(&g_store);
    assert_true(done);

    /* The freed slots are usable: fill the store to its capacity. */
    uint64_t cap = st1.capacity, have = st1.devices;
    uint64_t deadline = th_mono_ms() + 3000;
    for (uint64_t i = 0; have < cap; i++) {
        snprintf(dev, sizeof dev, "fill%llu", (unsigned long long)i);
        int rc = pres_connect(w, "ufill", dev, "gwfill", 60000, NULL);
        if (rc == -ENOSPC && th_mono_ms() < deadline) {
            i--;
            th_nap_us(1000);
            continue;
        }
        if (rc != 0)
            fail_msg("connect %s with %llu of %llu held: %s", dev,
                     (unsigned long long)have, (unsigned long long)cap,
                     pres_strerror(rc));
        have++;
    }

    /* More grace periods complete: nothing holds them back any more. */
    for (int i = 0; i < 4; i++) {
        snprintf(dev, sizeof dev, "fill%d", i);
        assert_int_equal(pres_disconnect(w, dev), 0);
    }
    struct evict_arg eb = { p, "fill", 4, st1.evictions + 4, st1.grace_periods + 1 };
    assert_true(th_wait_until(evicted, &eb, 3000));

    struct slots_arg sa = { p, slots0 - 1, 0 };
    int back = th_wait_until(slots_back, &sa, 3000);
    if (!back)
        fprintf(stderr, "reader slots in use: %llu, with the reader %llu\n",
                (unsigned long long)sa.now, (unsigned long long)slots0);
    assert_true(back);
    assert_int_equal(C->r[LOOP_SLOT].errors, 0);
    check_ok("after the dead reader");
    pres_close(p);
    pres_close(w);
}

/*
 * A stopped reader is alive: while it is stopped inside a read section no
 * grace period that needs it completes (a daemon that judged it dead on a
 * timeout would free records under it), and once continued it goes on
 * reading, without an error and with consistent data.
 */
static void test_stopped_reader_is_not_dead(void **state)
{
    (void)state;
    pres_t *w = NULL, *p = NULL;
    uint64_t seed = mix(seed_from_env(), 3);
    pid_t pid = loop_setup(&w, &p);
    struct progress_arg pa = { 200 };
    assert_true(th_wait_until(progressed, &pa, 10000));

    if (!stop_inside_section(p, pid, &seed, 40))
        fail_msg("could not stop the reader inside a read section in 40 tries: "
                 "the store's oldest_reader_ms never grew while it was stopped");
    /* Whatever was already due has completed by now. */
    th_nap_us(200000);
    pres_stats_t st0 = stats_of(p);

    /* 1.5 s of work that needs grace periods -- longer than any dead
     * reader's slot may hold them back -- while the reader stays stopped. */
    char dev[32];
    int n = 0;
    uint64_t until = th_mono_ms() + 1500;
    while (th_mono_ms() < until) {
        snprintf(dev, sizeof dev, "z%d", n++);
        assert_int_equal(pres_connect(w, "uz", dev, "gwz", 60000, NULL), 0);
        assert_int_equal(pres_disconnect(w, dev), 0);
        th_nap_us(50000);   /* pacing the load, not waiting for a condition */
    }
    pres_stats_t st1 = stats_of(p);
    uint64_t held = info_of(p).oldest_reader_ms;
    printf("stopped reader: section open %llu ms; while stopped %d devices "
           "churned, %llu evictions, %llu grace periods\n",
           (unsigned long long)held, n,
           (unsigned long long)(st1.evictions - st0.evictions),
           (unsigned long long)(st1.grace_periods - st0.grace_periods));
    assert_true(st1.grace_periods <= st0.grace_periods + 1);
    assert_true(held >= 1500);

    /* Continued, it reads on and the held-back grace periods complete. */
    uint64_t prog = atomic_load(&C->r[LOOP_SLOT].progress);
    assert_int_equal(kill(pid, SIGCONT), 0);
    pa.want = prog + 200;
    assert_true(th_wait_until(progressed, &pa, 5000));
    struct evict_arg ea = { p, "z", n, st0.evictions + (uint64_t)n,
                            st1.grace_periods + 1 };
    assert_true(th_wait_until(evicted, &ea, 3000));

    atomic_store(&C->stop, 1);
    int rc = th_wait_child(pid, 10000);
    kid_forget(pid);
    report_children();
    assert_int_equal(rc, 0);
    assert_int_equal(C->r[LOOP_SLOT].errors, 0);
    check_ok("after the stopped reader");
    pres_close(p);
    pres_close(w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_dead_reader_releases_grace_periods,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_stopped_reader_is_not_dead,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_random_kills, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
