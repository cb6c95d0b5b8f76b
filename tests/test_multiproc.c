/*
 * test_multiproc.c - many processes on one store at once.
 *
 * Writer and reader processes are forked; each child opens its own handle
 * (a pres_t never crosses a fork).  Children never call cmocka: they record
 * what they saw in a shared anonymous page created before the fork, and the
 * parent asserts on it after they have exited.
 *
 * How a torn read is made visible: writer k only ever writes records whose
 * three facts agree with each other -- user "u<k>_<j>", gateway "gw<k>" and a
 * TTL of (k + 1) * 100 s -- so a reader that sees the user of one writer
 * with the gateway of another, or an expiry that does not fit the user's
 * TTL, has read a mix of two states (property 2).
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
#include "presence.h"

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */

#define MP_MAXW   4
#define MP_MAXR   4
#define MSG_LEN   256

typedef struct {
    _Atomic uint64_t stop;
    struct {
        _Atomic uint64_t connects, disconnects, heartbeats, enospc;
        _Atomic uint64_t progress;      /* churn: highest id connected */
        _Atomic uint64_t errors;
        _Atomic uint64_t done;
        _Atomic int      msg_set;
        char             msg[MSG_LEN];
    } w[MP_MAXW];
    struct {
        _Atomic uint64_t calls, hits, routes, route_devs, errors;
        _Atomic uint64_t max_call_ns;
        _Atomic int      msg_set;
        char             msg[MSG_LEN];
    } r[MP_MAXR];
} mp_shared_t;

static mp_shared_t *S;          /* the shared page of the running test */
static th_store_t   g_store;

/* `presencectl check` passes (see th_check_ok). */
#define check_ok(when) assert_int_equal(th_check_ok(&g_store, (when)), 0)
static pid_t        g_kids[MP_MAXW + MP_MAXR];
static int          g_nkids;

/* Record the first problem of a child in its message buffer, count all. */
/* The first problem found is the one told: later ones only count. */
#define note(set, msg, ...) th_note_first((set), (msg), MSG_LEN, __VA_ARGS__)

#define W_ERR(k, ...) do { \
        atomic_fetch_add(&S->w[k].errors, 1); \
        note(&S->w[k].msg_set, S->w[k].msg, __VA_ARGS__); \
    } while (0)
#define R_ERR(r, ...) do { \
        atomic_fetch_add(&S->r[r].errors, 1); \
        note(&S->r[r].msg_set, S->r[r].msg, __VA_ARGS__); \
    } while (0)

static mp_shared_t *shared_new(void)
{
    void *m = mmap(NULL, sizeof(mp_shared_t), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(m != MAP_FAILED);
    memset(m, 0, sizeof(mp_shared_t));
    return m;
}

static pid_t spawn_kid(int (*fn)(void *), void *arg)
{
    pid_t pid = th_fork(fn, arg);
    assert_true(pid > 0);
    g_kids[g_nkids++] = pid;
    return pid;
}

static int teardown(void **state)
{
    (void)state;
    th_kill_children(g_kids, (size_t)g_nkids);
    g_nkids = 0;
    th_store_destroy(&g_store);
    if (S) {
        munmap(S, sizeof *S);
        S = NULL;
    }
    return 0;
}

static void print_child_msgs(int nw, int nr)
{
    for (int k = 0; k < nw; k++)
        if (S->w[k].errors)
            fprintf(stderr, "writer %d: %llu errors, first: %s\n", k,
                    (unsigned long long)S->w[k].errors, S->w[k].msg);
    for (int r = 0; r < nr; r++)
        if (S->r[r].errors)
            fprintf(stderr, "reader %d: %llu errors, first: %s\n", r,
                    (unsigned long long)S->r[r].errors, S->r[r].msg);
}

static pres_stats_t stats_now(void)
{
    pres_t *p = NULL;
    pres_stats_t st;
    assert_int_equal(pres_open(&p, g_store.name, PRES_RDONLY), 0);
    assert_int_equal(pres_stats(p, &st), 0);
    pres_close(p);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Consistency: writers and readers                                          */

#define MP_PRIV    48       /* private devices per writer: "p<k>_<i>" */
#define MP_SHARED  24       /* devices every writer connects: "s_<i>" */
#define MP_USERS   6        /* users per writer: "u<k>_<j>" */

static int      mp_nw = 3, mp_nr = 2;
static uint64_t mp_run_ms;

static uint32_t mp_ttl(int k) { return 100000u * (uint32_t)(k + 1); }

/* Parse "<prefix><k>" or "<prefix><k>_<rest>"; returns k or -1. */
static int parse_class(const char *s, const char *prefix)
{
    size_t pl = strlen(prefix);
    if (strncmp(s, prefix, pl) != 0)
        return -1;
    s += pl;
    if (*s < '0' || *s > '9')
        return -1;
    int k = 0;
    while (*s >= '0' && *s <= '9')
        k = k * 10 + (*s++ - '0');
    return (*s == '\0' || *s == '_') ? k : -1;
}

/*
 * Check one record as pres_device/pres_route returned it.  want_dev: the id
 * asked for (or NULL); want_class: the writer whose record it must be (-1:
 * any).  Returns 0, or -1 with the reason in why.
 */
static int mp_check(const pres_device_info_t *d, const char *want_dev,
                    int want_class, char *why, size_t cap)
{
    if (want_dev && strcmp(d->device_id, want_dev) != 0) {
        snprintf(why, cap, "asked for %s, got device %s", want_dev, d->device_id);
        return -1;
    }
    int k = parse_class(d->user_id, "u");
    if (k < 0 || k >= mp_nw) {
        snprintf(why, cap, "%s: user '%s' was never written", d->device_id,
                 d->user_id);
        return -1;
    }
    if (want_class >= 0 && k != want_class) {
        snprintf(why, cap, "%s: private device of writer %d has user %s",
                 d->device_id, want_class, d->user_id);
        return -1;
    }
    char gw[16];
    snprintf(gw, sizeof gw, "gw%d", k);
    if (strcmp(d->gateway_id, gw) != 0) {
        snprintf(why, cap, "torn read: %s has user %s with gateway %s",
                 d->device_id, d->user_id, d->gateway_id);
        return -1;
    }
    if (d->active && !d->connected) {
        snprintf(why, cap, "%s: active but not connected", d->device_id);
        return -1;
    }
    if (d->connected) {
        /* expiry - start of connection = the writer's TTL plus however much
         * later the last heartbeat came (the run is far shorter than the
         * 100 s between two writers' TTLs); 2 s of slack for the two clocks. */
        uint64_t lo = d->connected_at_ms + mp_ttl(k) - 2000;
        uint64_t hi = d->connected_at_ms + mp_ttl(k) + mp_run_ms + 10000;
        if (d->expires_at_ms < lo || d->expires_at_ms > hi) {
            snprintf(why, cap, "torn read: %s of user %s (TTL %u ms) connected "
                     "at %llu expires at %llu (%+lld ms)", d->device_id,
                     d->user_id, mp_ttl(k),
                     (unsigned long long)d->connected_at_ms,
                     (unsigned long long)d->expires_at_ms,
                     (long long)(d->expires_at_ms - d->connected_at_ms));
            return -1;
        }
    }
    return 0;
}

static int mp_writer(void *arg)
{
    int k = (int)(intptr_t)arg;
    uint64_t seed = UINT64_C(0x9e3779b97f4a7c15) * (uint64_t)(k + 1);
    pres_t *p = NULL;
    int rc = pres_open(&p, g_store.name, PRES_RDWR);
    if (rc != 0) {
        W_ERR(k, "pres_open: %s", pres_strerror(rc));
        return 1;
    }
    char gw[16];
    snprintf(gw, sizeof gw, "gw%d", k);
    rc = pres_gateway_attach(p, gw);
    if (rc != 0)
        W_ERR(k, "attach %s: %s", gw, pres_strerror(rc));

    int        pconn[MP_PRIV] = { 0 };
    pres_ref_t pref[MP_PRIV];
    int        shave[MP_SHARED] = { 0 };
    pres_ref_t sref[MP_SHARED];
    uint64_t conns = 0, discs = 0, hbs = 0, enospc = 0;
    uint32_t ttl = mp_ttl(k);
    uint64_t deadline = th_mono_ms() + mp_run_ms;
    char dev[32], user[32];

    for (uint64_t it = 0; ; it++) {
        if ((it & 255) == 0 && th_mono_ms() >= deadline)
            break;
        uint64_t x = th_rand(&seed);
        unsigned op = (unsigned)(x % 100);
        unsigned i = (unsigned)((x >> 8) % MP_PRIV);
        unsigned si = (unsigned)((x >> 8) % MP_SHARED);
        snprintf(user, sizeof user, "u%d_%u", k, (unsigned)((x >> 24) % MP_USERS));
        if (op < 75)
            snprintf(dev, sizeof dev, "p%d_%u", k, i);
        else
            snprintf(dev, sizeof dev, "s_%u", si);

        if (op < 20) {                      /* connect a private device */
            rc = pres_connect(p, user, dev, gw, ttl, &pref[i]);
            if (rc == -ENOSPC)  /* superseded records wait for a grace period */
                enospc++;
            else if (rc != 0)
                W_ERR(k, "connect %s: %s", dev, pres_strerror(rc));
            else {
                conns++;
                pconn[i] = 1;
            }
        } else if (op < 35) {               /* heartbeat by id */
            rc = pres_heartbeat(p, dev, ttl);
            if (pconn[i] ? rc != 0 : rc != -ENOENT)
                W_ERR(k, "heartbeat %s (%s): %s", dev,
                      pconn[i] ? "connected" : "not connected", pres_strerror(rc));
            if (rc == 0)
                hbs++;
        } else if (op < 45) {               /* heartbeat by ref */
            if (!pconn[i])
                continue;
            rc = pres_heartbeat_ref(p, pref[i], ttl);
            if (rc != 0)
                W_ERR(k, "heartbeat_ref %s: %s", dev, pres_strerror(rc));
            else
                hbs++;
        } else if (op < 55) {               /* disconnect by id */
            if (!pconn[i])
                continue;
            rc = pres_disconnect(p, dev);
            if (rc != 0)
                W_ERR(k, "disconnect %s: %s", dev, pres_strerror(rc));
            else {
                discs++;
                pconn[i] = 0;
            }
        } else if (op < 75) {               /* activity */
            if (!pconn[i])
                continue;
            rc = pres_set_activity(p, dev, (x >> 40) & 1 ? PRES_IDLE : PRES_ACTIVE);
            if (rc != 0)
                W_ERR(k, "set_activity %s: %s", dev, pres_strerror(rc));
        } else if (op < 85) {               /* connect a shared device: moves */
            rc = pres_connect(p, user, dev, gw, ttl, &sref[si]);
            if (rc == -ENOSPC)
                enospc++;
            else if (rc != 0)
                W_ERR(k, "connect %s: %s", dev, pres_strerror(rc));
            else {
                conns++;
                shave[si] = 1;
            }
        } else if (op < 95) {               /* heartbeat our connection */
            if (!shave[si])
                continue;
            /* Only our own connection may be refreshed: the ref goes stale
             * when another writer connects the device, and a heartbeat that
             * slipped through would pair our TTL with their gateway. */
            rc = pres_heartbeat_ref(p, sref[si], ttl);
            if (rc == 0)
                hbs++;
            else if (rc == -ESTALE)
                shave[si] = 0;
            else
                W_ERR(k, "heartbeat_ref %s: %s", dev, pres_strerror(rc));
        } else {                            /* close our socket */
            if (!shave[si])
                continue;
            rc = pres_disconnect_ref(p, sref[si]);
            if (rc == 0)
                discs++;
            else if (rc != -ESTALE)
                W_ERR(k, "disconnect_ref %s: %s", dev, pres_strerror(rc));
            shave[si] = 0;
        }
    }
    atomic_store(&S->w[k].connects, conns);
    atomic_store(&S->w[k].disconnects, discs);
    atomic_store(&S->w[k].heartbeats, hbs);
    atomic_store(&S->w[k].enospc, enospc);
    atomic_store(&S->w[k].done, 1);
    /* Closing the handle that attached gw<k> ends its connections. */
    pres_close(p);
    return 0;
}

static void reader_time(int r, uint64_t t0)
{
    uint64_t d = th_now_ns() - t0;
    if (d > atomic_load_explicit(&S->r[r].max_call_ns, memory_order_relaxed))
        atomic_store_explicit(&S->r[r].max_call_ns, d, memory_order_relaxed);
}

static int mp_reader(void *arg)
{
    int r = (int)(intptr_t)arg;
    uint64_t seed = UINT64_C(0xdeadbeefcafe) + (uint64_t)r * 7919;
    pres_t *p = NULL;
    int rc = pres_open(&p, g_store.name, PRES_RDONLY);
    if (rc != 0) {
        R_ERR(r, "pres_open: %s", pres_strerror(rc));
        return 1;
    }
    pres_device_info_t d, out[64];
    char dev[32], user[32], why[512];
    uint64_t calls = 0, hits = 0, routes = 0, rdevs = 0;

    while (!atomic_load_explicit(&S->stop, memory_order_relaxed)) {
        uint64_t x = th_rand(&seed);
        int k = (int)(x % (uint64_t)mp_nw);
        if ((x >> 8) % 4 != 0) {
            int cls = -1;
            if ((x >> 12) & 1) {
                snprintf(dev, sizeof dev, "p%d_%u", k, (unsigned)((x >> 16) % MP_PRIV));
                cls = k;
            } else {
                snprintf(dev, sizeof dev, "s_%u", (unsigned)((x >> 16) % MP_SHARED));
            }
            uint64_t t0 = th_now_ns();
            rc = pres_device(p, dev, &d);
            reader_time(r, t0);
            calls++;
            if (rc == 0) {
                hits++;
                if (mp_check(&d, dev, cls, why, sizeof why) != 0)
                    R_ERR(r, "pres_device: %s", why);
            } else if (rc != -ENOENT) {
                R_ERR(r, "pres_device %s: %s", dev, pres_strerror(rc));
            }
        } else {
            snprintf(user, sizeof user, "u%d_%u", k, (unsigned)((x >> 16) % MP_USERS));
            size_t n = 0;
            uint64_t t0 = th_now_ns();
            rc = pres_route(p, user, out, 64, &n);
            reader_time(r, t0);
            calls++;
            routes++;
            if (rc != 0) {
                R_ERR(r, "pres_route %s: %s", user, pres_strerror(rc));
                continue;
            }
            size_t m = n < 64 ? n : 64;
            rdevs += m;
            for (size_t i = 0; i < m; i++) {
                if (!out[i].connected)
                    R_ERR(r, "route %s gave %s, not connected", user, out[i].device_id);
                if (strcmp(out[i].user_id, user) != 0)
                    R_ERR(r, "route %s gave %s of user %s", user,
                          out[i].device_id, out[i].user_id);
                else if (mp_check(&out[i], NULL, k, why, sizeof why) != 0)
                    R_ERR(r, "route %s: %s", user, why);
                int pc = parse_class(out[i].device_id, "p");
                if (pc >= 0 && pc != k)
                    R_ERR(r, "route %s gave %s, a device of writer %d", user,
                          out[i].device_id, pc);
                for (size_t j = 0; j < i; j++)
                    if (strcmp(out[i].device_id, out[j].device_id) == 0)
                        R_ERR(r, "route %s gave %s twice", user, out[i].device_id);
            }
        }
    }
    atomic_store(&S->r[r].calls, calls);
    atomic_store(&S->r[r].hits, hits);
    atomic_store(&S->r[r].routes, routes);
    atomic_store(&S->r[r].route_devs, rdevs);
    pres_close(p);
    return 0;
}

struct all_off_arg { pres_t *p; };

/* No device of any writer is connected (their gateways closed). */
static int none_connected(void *arg)
{
    struct all_off_arg *a = arg;
    pres_device_info_t d;
    char dev[32];
    for (int k = 0; k < mp_nw; k++) {
        for (int i = 0; i < MP_PRIV; i++) {
            snprintf(dev, sizeof dev, "p%d_%d", k, i);
            if (pres_device(a->p, dev, &d) == 0 && d.connected)
                return 0;
        }
    }
    for (int i = 0; i < MP_SHARED; i++) {
        snprintf(dev, sizeof dev, "s_%d", i);
        if (pres_device(a->p, dev, &d) == 0 && d.connected)
            return 0;
    }
    return 1;
}

struct gw_deaths_arg { pres_t *p; uint64_t want; };

static int gw_deaths_reached(void *arg)
{
    struct gw_deaths_arg *a = arg;
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.gateway_deaths >= a->want;
}

/*
 * Writers connect, heartbeat, move and disconnect overlapping sets of
 * devices while readers check every record they get: never a mix of two
 * states, route results connected, of the routed user, each once.  Readers
 * never wait: their longest call is reported and bounded (generously).
 * Counters add up to what the writers did.
 */
static void test_concurrent_consistency(void **state)
{
    (void)state;
    S = shared_new();
    mp_run_ms = (uint64_t)th_scale(3000, 1500);
    const char *args[] = { "--capacity", "65536", NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);
    pres_stats_t st0 = stats_now();

    for (int r = 0; r < mp_nr; r++)
        spawn_kid(mp_reader, (void *)(intptr_t)r);
    for (int k = 0; k < mp_nw; k++)
        spawn_kid(mp_writer, (void *)(intptr_t)k);

    /* Writers stop on their own; then the readers. */
    for (int k = 0; k < mp_nw; k++) {
        int rc = th_wait_child(g_kids[mp_nr + k], (int)mp_run_ms + 30000);
        g_kids[mp_nr + k] = 0;
        assert_int_equal(rc, 0);
    }
    atomic_store(&S->stop, 1);
    for (int r = 0; r < mp_nr; r++) {
        int rc = th_wait_child(g_kids[r], 30000);
        g_kids[r] = 0;
        assert_int_equal(rc, 0);
    }
    g_nkids = 0;

    uint64_t conns = 0, discs = 0, hbs = 0, calls = 0, hits = 0, routes = 0,
             rdevs = 0, maxns = 0, errs = 0, enospc = 0;
    for (int k = 0; k < mp_nw; k++) {
        enospc += S->w[k].enospc;
        conns += S->w[k].connects;
        discs += S->w[k].disconnects;
        hbs += S->w[k].heartbeats;
        errs += S->w[k].errors;
    }
    for (int r = 0; r < mp_nr; r++) {
        calls += S->r[r].calls;
        hits += S->r[r].hits;
        routes += S->r[r].routes;
        rdevs += S->r[r].route_devs;
        errs += S->r[r].errors;
        if (S->r[r].max_call_ns > maxns)
            maxns = S->r[r].max_call_ns;
    }
    printf("multiproc: %d writers: %llu connects (%llu refused -ENOSPC), "
           "%llu heartbeats, %llu disconnects; %d readers: %llu calls (%llu found, %llu routes "
           "giving %llu devices); longest read %.3f ms\n", mp_nw,
           (unsigned long long)conns, (unsigned long long)enospc,
           (unsigned long long)hbs, (unsigned long long)discs, mp_nr, (unsigned long long)calls,
           (unsigned long long)hits, (unsigned long long)routes,
           (unsigned long long)rdevs, (double)maxns / 1e6);
    print_child_msgs(mp_nw, mp_nr);
    assert_int_equal(errs, 0);
    assert_true(conns > 0 && hbs > 0 && discs > 0);
    assert_true(hits > 0 && rdevs > 0);
    /* Generous: a read that waited for a writer would show up as seconds;
     * scheduling noise on a loaded machine stays far below. */
    assert_true(maxns < UINT64_C(1000000000));

    pres_stats_t st1 = stats_now();
    assert_int_equal(st1.connects - st0.connects, conns);
    assert_int_equal(st1.heartbeats - st0.heartbeats, hbs);
    assert_int_equal(st1.disconnects - st0.disconnects, discs);
    assert_int_equal(st1.late_heartbeats - st0.late_heartbeats, 0);

    /* The writers closed the handles that attached their gateways: each
     * close counts as a gateway death, and ends the connections. */
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, g_store.name, PRES_RDONLY), 0);
    struct gw_deaths_arg ga = { p, st0.gateway_deaths + (uint64_t)mp_nw };
    assert_true(th_wait_until(gw_deaths_reached, &ga, 3000));
    struct all_off_arg oa = { p };
    assert_true(th_wait_until(none_connected, &oa, 3000));
    pres_stats_t st2;
    assert_int_equal(pres_stats(p, &st2), 0);
    assert_int_equal(st2.gateway_deaths - st0.gateway_deaths, (uint64_t)mp_nw);
    pres_close(p);

    check_ok("at the end");

    /* A few hundred devices in a store of 65536: it is never full, however
     * the records are managed (API.md: -ENOSPC means the store is full).
     * Last, so that everything above is checked in any case. */
    assert_int_equal(enospc, 0);
}

/* ------------------------------------------------------------------------ */
/* Slot reuse under grace periods                                            */

#define CH_WINDOW  16       /* devices a churn writer keeps connected */
#define CH_LOOK    400      /* how far behind a writer readers look */
#define CH_USERS   7

static int ch_nw = 2, ch_nr = 2;

/* Device "c<k>_<n>" always belongs to user "cu<k>_<n % 7>" on gateway
 * "cgw<k>": a record read under a reused slot names the wrong user. */
static int ch_writer(void *arg)
{
    int k = (int)(intptr_t)arg;
    pres_t *p = NULL;
    int rc = pres_open(&p, g_store.name, PRES_RDWR);
    if (rc != 0) {
        W_ERR(k, "pres_open: %s", pres_strerror(rc));
        return 1;
    }
    char gw[16], dev[32], user[32];
    snprintf(gw, sizeof gw, "cgw%d", k);
    rc = pres_gateway_attach(p, gw);
    if (rc != 0)
        W_ERR(k, "attach: %s", pres_strerror(rc));
    uint64_t deadline = th_mono_ms() + mp_run_ms;
    uint64_t conns = 0, discs = 0, enospc = 0;
    uint64_t n = 0;       /* next id to connect */
    uint64_t oldest = 0;  /* oldest id still connected */

    while (th_mono_ms() < deadline) {
        snprintf(dev, sizeof dev, "c%d_%llu", k, (unsigned long long)n);
        snprintf(user, sizeof user, "cu%d_%llu", k, (unsigned long long)(n % CH_USERS));
        rc = pres_connect(p, user, dev, gw, 60000, NULL);
        if (rc == -ENOSPC) {
            /* Full: the daemon frees slots once evicted records' grace
             * periods end.  Give it a moment and try again. */
            enospc++;
            th_nap_us(500);
            continue;
        }
        if (rc != 0) {
            W_ERR(k, "connect %s: %s", dev, pres_strerror(rc));
            break;
        }
        conns++;
        atomic_store(&S->w[k].progress, n);
        n++;
        if (n - oldest > CH_WINDOW) {
            snprintf(dev, sizeof dev, "c%d_%llu", k, (unsigned long long)oldest);
            rc = pres_disconnect(p, dev);
            if (rc != 0)
                W_ERR(k, "disconnect %s: %s", dev, pres_strerror(rc));
            else
                discs++;
            oldest++;
        }
        /* Pace: about 5k connects a second, so that evictions (after
         * --retain-ms) keep up with most of them and slots get reused. */
        th_nap_us(100);
    }
    for (; oldest < n; oldest++) {
        snprintf(dev, sizeof dev, "c%d_%llu", k, (unsigned long long)oldest);
        rc = pres_disconnect(p, dev);
        if (rc != 0)
            W_ERR(k, "disconnect %s: %s", dev, pres_strerror(rc));
        else
            discs++;
    }
    atomic_store(&S->w[k].connects, conns);
    atomic_store(&S->w[k].disconnects, discs);
    atomic_store(&S->w[k].enospc, enospc);
    pres_close(p);
    return 0;
}

static int ch_reader(void *arg)
{
    int r = (int)(intptr_t)arg;
    uint64_t seed = UINT64_C(0x1234567) + (uint64_t)r * 104729;
    pres_t *p = NULL;
    int rc = pres_open(&p, g_store.name, PRES_RDONLY);
    if (rc != 0) {
        R_ERR(r, "pres_open: %s", pres_strerror(rc));
        return 1;
    }
    pres_device_info_t d, out[64];
    char dev[32], user[64], gw[16];
    uint64_t calls = 0, hits = 0, rdevs = 0;

    while (!atomic_load_explicit(&S->stop, memory_order_relaxed)) {
        uint64_t x = th_rand(&seed);
        int k = (int)(x % (uint64_t)ch_nw);
        uint64_t hi = atomic_load_explicit(&S->w[k].progress, memory_order_relaxed);
        uint64_t back = (x >> 8) % CH_LOOK;
        uint64_t n = hi > back ? hi - back : 0;
        snprintf(gw, sizeof gw, "cgw%d", k);
        if ((x >> 20) % 8 != 0) {
            snprintf(dev, sizeof dev, "c%d_%llu", k, (unsigned long long)n);
            snprintf(user, sizeof user, "cu%d_%llu", k, (unsigned long long)(n % CH_USERS));
            uint64_t t0 = th_now_ns();
            rc = pres_device(p, dev, &d);
            reader_time(r, t0);
            calls++;
            if (rc == 0) {
                hits++;
                if (strcmp(d.device_id, dev) != 0 || strcmp(d.user_id, user) != 0 ||
                    strcmp(d.gateway_id, gw) != 0)
                    R_ERR(r, "asked for %s (user %s, gateway %s), got %s of user "
                          "%s on %s", dev, user, gw, d.device_id, d.user_id,
                          d.gateway_id);
            } else if (rc != -ENOENT) {
                R_ERR(r, "pres_device %s: %s", dev, pres_strerror(rc));
            }
        } else {
            unsigned m7 = (unsigned)((x >> 24) % CH_USERS);
            snprintf(user, sizeof user, "cu%d_%u", k, m7);
            size_t cnt = 0;
            uint64_t t0 = th_now_ns();
            rc = pres_route(p, user, out, 64, &cnt);
            reader_time(r, t0);
            calls++;
            if (rc != 0) {
                R_ERR(r, "pres_route %s: %s", user, pres_strerror(rc));
                continue;
            }
            size_t m = cnt < 64 ? cnt : 64;
            rdevs += m;
            for (size_t i = 0; i < m; i++) {
                unsigned long long dn;
                int dk;
                if (sscanf(out[i].device_id, "c%d_%llu", &dk, &dn) != 2 ||
                    dk != k || dn % CH_USERS != m7 || !out[i].connected ||
                    strcmp(out[i].user_id, user) != 0 ||
                    strcmp(out[i].gateway_id, gw) != 0)
                    R_ERR(r, "route %s gave %s of user %s on %s (connected %d)",
                          user, out[i].device_id, out[i].user_id,
                          out[i].gateway_id, out[i].connected);
                for (size_t j = 0; j < i; j++)
                    if (strcmp(out[i].device_id, out[j].device_id) == 0)
                        R_ERR(r, "route %s gave %s twice", user, out[i].device_id);
            }
        }
    }
    atomic_store(&S->r[r].calls, calls);
    atomic_store(&S->r[r].hits, hits);
    atomic_store(&S->r[r].route_devs, rdevs);
    pres_close(p);
    return 0;
}

static int store_empty(void *arg)
{
    pres_t *p = arg;
    pres_stats_t st;
    return pres_stats(p, &st) == 0 && st.devices == 0;
}

/*
 * A small store with a short retention: writers churn through many
 * distinct device ids, so records are evicted and their slots reused while
 * readers look the old ids up.  A reader must never get another device's
 * record for the id it asked; slots are reused only after grace periods
 * (which must complete, and be counted); a full store answers -ENOSPC and
 * keeps working.
 */
static void test_slot_reuse(void **state)
{
    (void)state;
    S = shared_new();
    mp_run_ms = (uint64_t)th_scale(3000, 1500);
    const char *args[] = { "--capacity", "256", "--retain-ms", "50", NULL };
    assert_int_equal(th_store_start(&g_store, args), 0);
    pres_stats_t st0 = stats_now();

    for (int r = 0; r < ch_nr; r++)
        spawn_kid(ch_reader, (void *)(intptr_t)r);
    for (int k = 0; k < ch_nw; k++)
        spawn_kid(ch_writer, (void *)(intptr_t)k);
    for (int k = 0; k < ch_nw; k++) {
        int rc = th_wait_child(g_kids[ch_nr + k], (int)mp_run_ms + 30000);
        g_kids[ch_nr + k] = 0;
        assert_int_equal(rc, 0);
    }
    atomic_store(&S->stop, 1);
    for (int r = 0; r < ch_nr; r++) {
        int rc = th_wait_child(g_kids[r], 30000);
        g_kids[r] = 0;
        assert_int_equal(rc, 0);
    }
    g_nkids = 0;

    uint64_t conns = 0, discs = 0, enospc = 0, calls = 0, hits = 0, rdevs = 0,
             errs = 0, maxns = 0;
    for (int k = 0; k < ch_nw; k++) {
        conns += S->w[k].connects;
        discs += S->w[k].disconnects;
        enospc += S->w[k].enospc;
        errs += S->w[k].errors;
    }
    for (int r = 0; r < ch_nr; r++) {
        calls += S->r[r].calls;
        hits += S->r[r].hits;
        rdevs += S->r[r].route_devs;
        errs += S->r[r].errors;
        if (S->r[r].max_call_ns > maxns)
            maxns = S->r[r].max_call_ns;
    }
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, g_store.name, PRES_RDONLY), 0);
    pres_stats_t st1;
    assert_int_equal(pres_stats(p, &st1), 0);
    printf("slot reuse: capacity %llu: %llu connects (%llu refused -ENOSPC), "
           "%llu evictions, %llu grace periods; readers: %llu calls, %llu "
           "found, %llu routed devices, longest read %.3f ms\n",
           (unsigned long long)st1.capacity, (unsigned long long)conns,
           (unsigned long long)enospc,
           (unsigned long long)(st1.evictions - st0.evictions),
           (unsigned long long)(st1.grace_periods - st0.grace_periods),
           (unsigned long long)calls, (unsigned long long)hits,
           (unsigned long long)rdevs, (double)maxns / 1e6);
    print_child_msgs(ch_nw, ch_nr);
    assert_int_equal(errs, 0);
    assert_true(hits > 0);
    assert_true(maxns < UINT64_C(1000000000));
    /* Far more devices went through than the store holds: slots were
     * evicted and reused, each after a grace period. */
    assert_true(conns > 2 * st1.capacity);
    assert_true(st1.evictions - st0.evictions >= conns - st1.capacity);
    assert_true(st1.grace_periods > st0.grace_periods);
    assert_int_equal(st1.connects - st0.connects, conns);
    assert_int_equal(st1.disconnects - st0.disconnects, discs);

    /* Everything was disconnected: with 50 ms retention the store empties,
     * and nothing is left half-done. */
    assert_true(th_wait_until(store_empty, p, 5000));
    pres_close(p);
    check_ok("at the end");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_concurrent_consistency, teardown),
        cmocka_unit_test_teardown(test_slot_reuse, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
