/*
 * presence-sim - a simulated load on a presence store, for the demo.
 *
 *   presence-sim [--name NAME] [--gateways N] [--devices N] [--users N]
 *                [--seconds S] [--ttl-ms MS] [--routes-per-s N] [--seed N]
 *
 * It forks N gateway processes and one delivery worker, all ordinary clients
 * of the public API (include/presence.h) on a store a presenced has created.
 *
 *  - Each gateway attaches gw_NN, connects its share of the devices and
 *    heartbeats them through pres_heartbeat_ref every TTL/3.  Now and then a
 *    device goes silent without disconnecting (an elevator: it expires when
 *    its TTL passes, then comes back with a late heartbeat or a reconnect,
 *    maybe on another gateway), disconnects cleanly and reconnects later, or
 *    goes idle / active.  Device d_0000000003 is the demo's elevator: it goes
 *    silent 5 s into the run for 3 TTLs, then reconnects on another gateway.
 *  - Once, the parent SIGKILLs one gateway, shows its devices stop being
 *    connected (the daemon sees the death), and restarts it.
 *  - The delivery worker routes messages to random users (pres_route on a
 *    read-only handle) and, when a routed device is in fact gone (the
 *    gateways publish that in a shared page), calls pres_report_stale.
 *
 * Device i is "d_%010u" of user "u_%010u" (i % users), first on gateway
 * i % gateways.  The parent prints one line a second.  SIGINT or SIGTERM
 * stops everything it started; it exits 0 unless a library call failed in
 * a way the simulation did not expect.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "presence.h"

#define MAX_GW        64       /* ids are gw_NN: two digits */
#define ELEVATOR      3u       /* the device the demo watches go silent */
#define ELEV_AT_MS    5000u    /* ... 5 s into the run, for 3 TTLs */
#define TICK_MS       20u      /* a gateway's scheduling step: < TTL/3 */
#define PARENT_TICK   250u     /* the parent's: 4 per printed line */
#define MAX_ERRORS_SHOWN 5     /* per process: a broken library would
                                  otherwise flood the demo */

/* Percent per heartbeat interval (TTL/3) of each thing a device may do. */
#define P_SILENT      0.6
#define P_DISCONNECT  0.6
#define P_IDLE        2.0
#define P_ACTIVE      2.0
#define P_MOVE        30.0     /* a returning device picks another gateway */
#define P_LATE_HB     30.0     /* a silent one resumes with a heartbeat */

/* ------------------------------------------------------------------------ */
/* What all processes share: one MAP_SHARED anonymous mapping made before
 * fork.  Each device is written only by its owner gateway; ownership moves
 * by the owner storing a new owner last (release), the new owner loading
 * it first (acquire). */

enum phase {
    PH_PENDING,      /* the owner connects it once `until` has passed */
    PH_ONLINE,       /* heartbeating */
    PH_SILENT,       /* gone without a word until `until` */
    PH_OFF,          /* disconnected cleanly until `until` */
};

typedef struct {
    atomic_uint      owner;       /* gateway index */
    atomic_uint      phase;       /* enum phase */
    _Atomic uint64_t until;       /* monotonic ms */
} simdev_t;

/* Counters: one set per process slot (gateways, then the worker), so no
 * two processes write one line of them. */
typedef struct {
    _Atomic uint64_t connects, heartbeats, disconnects, silences, revivals;
    _Atomic uint64_t idles, routes, routed, stale, recovered, errors;
    char pad[64 - (11 * 8) % 64];
} counters_t;

typedef struct {
    atomic_int       stop;
    uint64_t         start_ms;           /* monotonic ms of the run start */
    atomic_int       gw_alive[MAX_GW];
    _Atomic int      elev_state;         /* 0 before, 1 silent, 2 back */
    atomic_uint      elev_gw;            /* where it came back */
    counters_t       c[MAX_GW + 1];
    simdev_t         dev[];
} sim_t;

typedef struct {
    const char *name;
    unsigned    gateways, devices, users, seconds, ttl_ms, routes_per_s;
    uint64_t    seed;
} opts_t;

static opts_t        O = { NULL, 4, 5000, 2000, 20, 3000, 2000, 1 };
static sim_t        *S;
static const char   *g_who = "presence-sim";  /* this process, in messages */
static volatile sig_atomic_t g_signalled;

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */

static uint64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

    nanosleep(&ts, NULL);     /* a signal cuts it short: the loop checks */
}

static uint64_t rnd_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15u);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static uint32_t rnd_below(uint64_t *s, uint32_t n)
{
    return (uint32_t)(((rnd_next(s) >> 32) * n) >> 32);
}

static int chance(uint64_t *s, double percent)
{
    return (double)(rnd_next(s) >> 11) * 0x1.0p-53 * 100.0 < percent;
}

static void dev_id(char *buf, size_t n, uint32_t i)
{
    snprintf(buf, n, "d_%010u", i);
}

static void user_id(char *buf, size_t n, uint32_t i)
{
    snprintf(buf, n, "u_%010u", i % O.users);
}

static void gw_id(char *buf, size_t n, unsigned g)
{
    snprintf(buf, n, "gw_%02u", g);
}

static int stopping(void)
{
    return g_signalled || atomic_load_explicit(&S->stop,
                                               memory_order_relaxed);
}

static double since_start_s(void)
{
    return (double)(mono_ms() - S->start_ms) / 1000.0;
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* An event line of the parent, stamped with the run's time. */
static void note(const char *fmt, ...)
{
    va_list ap;

    printf("  t=%5.1fs  ", since_start_s());
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* A library call failed in a way the simulation did not expect: count it
 * (it makes the exit status 1) and show the first few. */
static void fail(counters_t *c, const char *call, const char *id, int rc)
{
    uint64_t n = atomic_fetch_add(&c->errors, 1);

    if (n < MAX_ERRORS_SHOWN)
        fprintf(stderr, "presence-sim: %s: %s(%s): %s\n", g_who, call, id,
                pres_strerror(rc));
}

static void on_signal(int sig)
{
    (void)sig;
    g_signalled = 1;
}

static void set_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;      /* no SA_RESTART: sleeps end early */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* ------------------------------------------------------------------------ */
/* A gateway process                                                         */

typedef struct {
    pres_t     *p;
    unsigned    me;
    char        gw[16];
    counters_t *c;
    uint64_t    seed;
    pres_ref_t *ref;        /* by device; valid where has_ref */
    uint8_t    *has_ref;
    uint64_t   *next_hb;    /* monotonic ms */
} gw_t;

static unsigned hb_interval(void)
{
    return O.ttl_ms / 3;
}

static void go_phase(uint32_t d, enum phase ph, uint64_t until)
{
    atomic_store(&S->dev[d].until, until);
    atomic_store_explicit(&S->dev[d].phase, ph, memory_order_release);
}

/* Hand a device to gateway `to`: phase and time first, the owner last, so
 * the new owner sees them once it sees itself as owner. */
static void hand_over(uint32_t d, unsigned to, uint64_t now)
{
    go_phase(d, PH_PENDING, now);
    atomic_store_explicit(&S->dev[d].owner, to, memory_order_release);
}

static unsigned other_gateway(gw_t *g)
{
    unsigned start = rnd_below(&g->seed, O.gateways);

    for (unsigned k = 0; k < O.gateways; k++) {
        unsigned o = (start + k) % O.gateways;
        if (o != g->me && atomic_load(&S->gw_alive[o]))
            return o;
    }
    return g->me;
}

static void connect_dev(gw_t *g, uint32_t d, uint64_t now)
{
    char dev[16], usr[16];
    int rc;

    dev_id(dev, sizeof dev, d);
    user_id(usr, sizeof usr, d);
    /* Online before the call: once connected, a delivery would succeed. */
    go_phase(d, PH_ONLINE, 0);
    rc = pres_connect(g->p, usr, dev, g->gw, O.ttl_ms, &g->ref[d]);
    if (rc < 0) {
        fail(g->c, "pres_connect", dev, rc);
        g->has_ref[d] = 0;
        go_phase(d, PH_PENDING, now + 1000);   /* try again in a while */
        return;
    }
    g->has_ref[d] = 1;
    /* The first heartbeat somewhere in the next interval: devices that
     * connected together (a gateway's start) do not beat in lockstep. */
    g->next_hb[d] = now + hb_interval() / 2 +
                    rnd_below(&g->seed, hb_interval() / 2 + 1);
    atomic_fetch_add_explicit(&g->c->connects, 1, memory_order_relaxed);
    if (d == ELEVATOR && atomic_load(&S->elev_state) == 1) {
        atomic_store(&S->elev_gw, g->me);
        atomic_store(&S->elev_state, 2);
    }
}

/* A device comes back after silence or a disconnect: here or elsewhere. */
static void come_back(gw_t *g, uint32_t d, uint64_t now)
{
    unsigned to = d == ELEVATOR || chance(&g->seed, P_MOVE)
                ? other_gateway(g) : g->me;

    g->has_ref[d] = 0;
    if (to == g->me)
        connect_dev(g, d, now);
    else
        hand_over(d, to, now);
}

static void end_silence(gw_t *g, uint32_t d, uint64_t now)
{
    char dev[16];
    int rc;

    if (d == ELEVATOR || !g->has_ref[d] || !chance(&g->seed, P_LATE_HB)) {
        come_back(g, d, now);
        return;
    }
    /* Its TTL has passed but it never disconnected: a heartbeat revives
     * it on this gateway (the store counts a late heartbeat). */
    go_phase(d, PH_ONLINE, 0);
    rc = pres_heartbeat_ref(g->p, g->ref[d], O.ttl_ms);
    if (rc == -ESTALE || rc == -ENOENT) {
        atomic_fetch_add_explicit(&g->c->recovered, 1, memory_order_relaxed);
        connect_dev(g, d, now);
        return;
    }
    if (rc < 0) {
        dev_id(dev, sizeof dev, d);
        fail(g->c, "pres_heartbeat_ref", dev, rc);
    }
    atomic_fetch_add_explicit(&g->c->revivals, 1, memory_order_relaxed);
    g->next_hb[d] = now + hb_interval();
}

static void heartbeat(gw_t *g, uint32_t d, uint64_t now)
{
    char dev[16];
    int rc = pres_heartbeat_ref(g->p, g->ref[d], O.ttl_ms);

    g->next_hb[d] = now + hb_interval();
    if (rc == 0) {
        atomic_fetch_add_explicit(&g->c->heartbeats, 1, memory_order_relaxed);
        return;
    }
    dev_id(dev, sizeof dev, d);
    if (rc == -ESTALE || rc == -ENOENT) {   /* replaced or ended: reconnect */
        atomic_fetch_add_explicit(&g->c->recovered, 1, memory_order_relaxed);
        connect_dev(g, d, now);
        return;
    }
    fail(g->c, "pres_heartbeat_ref", dev, rc);
}

static void set_activity(gw_t *g, uint32_t d, enum pres_activity a)
{
    char dev[16];
    int rc;

    dev_id(dev, sizeof dev, d);
    rc = pres_set_activity(g->p, dev, a);
    if (rc == -ENOENT)      /* its TTL passed under a slow tick: harmless */
        atomic_fetch_add_explicit(&g->c->recovered, 1, memory_order_relaxed);
    else if (rc < 0)
        fail(g->c, "pres_set_activity", dev, rc);
    else if (a == PRES_IDLE)
        atomic_fetch_add_explicit(&g->c->idles, 1, memory_order_relaxed);
}

static void disconnect(gw_t *g, uint32_t d, uint64_t now)
{
    char dev[16];
    int rc = pres_disconnect_ref(g->p, g->ref[d]);

    if (rc < 0 && rc != -ESTALE) {
        dev_id(dev, sizeof dev, d);
        fail(g->c, "pres_disconnect_ref", dev, rc);
    }
    atomic_fetch_add_explicit(&g->c->disconnects, 1, memory_order_relaxed);
    g->has_ref[d] = 0;
    go_phase(d, PH_OFF, now + 1000 + rnd_below(&g->seed, 3000));
}

static void go_silent(gw_t *g, uint32_t d, uint64_t now, uint64_t for_ms)
{
    atomic_fetch_add_explicit(&g->c->silences, 1, memory_order_relaxed);
    go_phase(d, PH_SILENT, now + for_ms);
    if (d == ELEVATOR)
        atomic_store(&S->elev_state, 1);
}

/* A heartbeat is due: usually it is sent; sometimes the device does
 * something else (see the P_* odds). */
static void device_turn(gw_t *g, uint32_t d, uint64_t now)
{
    double r;

    if (d == ELEVATOR) {
        if (atomic_load(&S->elev_state) == 0 &&
            now >= S->start_ms + ELEV_AT_MS) {
            go_silent(g, d, now, 3ull * O.ttl_ms);
            return;
        }
        heartbeat(g, d, now);
        return;
    }
    r = (double)(rnd_next(&g->seed) >> 11) * 0x1.0p-53 * 100.0;
    if (r < P_SILENT) {
        /* Longer than the TTL, so it expires; at most 3 TTLs. */
        go_silent(g, d, now, O.ttl_ms + 500 +
                  rnd_below(&g->seed, 2 * O.ttl_ms));
    } else if ((r -= P_SILENT) < P_DISCONNECT) {
        disconnect(g, d, now);
    } else {
        if ((r -= P_DISCONNECT) < P_IDLE)
            set_activity(g, d, PRES_IDLE);
        else if (r - P_IDLE < P_ACTIVE)
            set_activity(g, d, PRES_ACTIVE);
        heartbeat(g, d, now);
    }
}

static void gateway_tick(gw_t *g)
{
    uint64_t now = mono_ms();

    for (uint32_t d = 0; d < O.devices && !stopping(); d++) {
        simdev_t *v = &S->dev[d];
        if (atomic_load_explicit(&v->owner, memory_order_acquire) != g->me)
            continue;
        switch (atomic_load_explicit(&v->phase, memory_order_relaxed)) {
        case PH_PENDING:
            if (now >= atomic_load(&v->until))
                connect_dev(g, d, now);
            break;
        case PH_ONLINE:
            if (!g->has_ref[d])     /* a restarted gateway lost its refs */
                connect_dev(g, d, now);
            else if (now >= g->next_hb[d])
                device_turn(g, d, now);
            break;
        case PH_SILENT:
            if (now >= atomic_load(&v->until))
                end_silence(g, d, now);
            break;
        case PH_OFF:
            if (now >= atomic_load(&v->until))
                come_back(g, d, now);
            break;
        }
    }
}

static int gateway_main(unsigned me)
{
    static char who[32];
    gw_t g = { .me = me, .c = &S->c[me] };
    int rc;

    gw_id(g.gw, sizeof g.gw, me);
    snprintf(who, sizeof who, "gateway %s", g.gw);
    g_who = who;
    g.seed = O.seed * 1000003u + me * 7919u + (uint64_t)getpid();
    g.ref = calloc(O.devices, sizeof *g.ref);
    g.has_ref = calloc(O.devices, 1);
    g.next_hb = calloc(O.devices, sizeof *g.next_hb);
    if (!g.ref || !g.has_ref || !g.next_hb) {
        fprintf(stderr, "presence-sim: %s: out of memory\n", who);
        return 1;
    }
    if ((rc = pres_open(&g.p, O.name, PRES_RDWR)) < 0) {
        fprintf(stderr, "presence-sim: %s: pres_open: %s\n", who,
                pres_strerror(rc));
        return 1;
    }
    if ((rc = pres_gateway_attach(g.p, g.gw)) < 0) {
        fprintf(stderr, "presence-sim: %s: pres_gateway_attach: %s\n", who,
                pres_strerror(rc));
        pres_close(g.p);
        return 1;
    }
    while (!stopping()) {
        gateway_tick(&g);
        sleep_ms(TICK_MS);
    }
    pres_close(g.p);    /* ends this gateway's connections */
    free(g.ref);
    free(g.has_ref);
    free(g.next_hb);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The delivery worker                                                       */

/* Is the device behind this route entry really reachable?  The sim knows:
 * its owner says where it is, and the parent which gateways are alive. */
static int really_gone(const pres_device_info_t *e)
{
    unsigned long d, gw;
    char *end;

    d = strtoul(e->device_id + 2, &end, 10);
    if (strncmp(e->device_id, "d_", 2) || *end || d >= O.devices)
        return 0;
    gw = strtoul(e->gateway_id + 3, &end, 10);
    if (!strncmp(e->gateway_id, "gw_", 3) && !*end && gw < MAX_GW &&
        !atomic_load(&S->gw_alive[gw]))
        return 1;
    return atomic_load(&S->dev[d].phase) != PH_ONLINE;
}

static void route_one(pres_t *p, counters_t *c, uint64_t *seed)
{
    pres_device_info_t out[16];
    char usr[16];
    size_t n;
    int rc;

    user_id(usr, sizeof usr, rnd_below(seed, O.users));
    rc = pres_route(p, usr, out, 16, &n);
    if (rc < 0) {
        fail(c, "pres_route", usr, rc);
        return;
    }
    atomic_fetch_add_explicit(&c->routes, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->routed, n, memory_order_relaxed);
    for (size_t i = 0; i < n && i < 16; i++) {
        if (!really_gone(&out[i]))
            continue;
        /* The delivery to it failed: tell the store. */
        rc = pres_report_stale(p, out[i].device_id);
        if (rc < 0)
            fail(c, "pres_report_stale", out[i].device_id, rc);
        else
            atomic_fetch_add_explicit(&c->stale, 1, memory_order_relaxed);
    }
}

static int worker_main(void)
{
    counters_t *c = &S->c[MAX_GW];
    uint64_t seed = O.seed * 31337u + 17, next = mono_ms();
    unsigned per_step = (O.routes_per_s + 99) / 100;   /* 100 steps a s */
    pres_t *p;
    int rc;

    g_who = "delivery worker";
    if ((rc = pres_open(&p, O.name, PRES_RDONLY)) < 0) {
        fprintf(stderr, "presence-sim: %s: pres_open: %s\n", g_who,
                pres_strerror(rc));
        return 1;
    }
    while (!stopping()) {
        uint64_t now;
        for (unsigned k = 0; k < per_step; k++)
            route_one(p, c, &seed);
        next += 10;
        now = mono_ms();
        if (next > now)
            sleep_ms((unsigned)(next - now));
        else
            next = now;     /* fell behind: do not burst to catch up */
    }
    pres_close(p);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The parent: spawns, watches, prints, kills one gateway, stops all         */

typedef struct {
    pid_t    pid[MAX_GW + 1];     /* gateways, then the worker */
    int      failed;              /* a child exited unexpectedly */
    pres_t  *p;                   /* read-only: stats, device checks */
    /* the gateway kill */
    unsigned victim;
    uint64_t kill_at, killed_at, restart_after;
    int      kill_state;          /* 0 before, 1 dead, 2 restarted */
    uint64_t deaths_before;
    unsigned victim_connected;
    unsigned dead_ticks;          /* a progress line a second, not a tick */
    /* the elevator */
    int      elev_seen;
    int      elev_expired_shown;
    /* the last printed counters */
    counters_t last;
    uint64_t last_ms;
} parent_t;

static pid_t spawn(int (*fn)(unsigned), unsigned arg)
{
    pid_t parent = getpid(), pid;

    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid != 0)
        return pid;
    /* A child must not outlive the simulator, however it ends. */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent)
        _exit(0);
    _exit(fn(arg));
}

static int worker_entry(unsigned unused)
{
    (void)unused;
    return worker_main();
}

/* Sum of every process's counters. */
static void totals(counters_t *t)
{
    memset(t, 0, sizeof *t);
    for (unsigned i = 0; i <= MAX_GW; i++) {
        counters_t *c = &S->c[i];
        t->connects += c->connects;
        t->heartbeats += c->heartbeats;
        t->disconnects += c->disconnects;
        t->silences += c->silences;
        t->revivals += c->revivals;
        t->idles += c->idles;
        t->routes += c->routes;
        t->routed += c->routed;
        t->stale += c->stale;
        t->recovered += c->recovered;
        t->errors += c->errors;
    }
}

static unsigned count_silent(void)
{
    unsigned n = 0;

    for (uint32_t d = 0; d < O.devices; d++)
        n += atomic_load_explicit(&S->dev[d].phase, memory_order_relaxed) ==
             PH_SILENT;
    return n;
}

static void print_line(parent_t *P)
{
    uint64_t now = mono_ms();
    double dt = (double)(now - P->last_ms) / 1000.0;
    pres_stats_t st;
    counters_t t;
    int rc;

    if (dt < 0.1)           /* too short a span for a rate */
        return;
    totals(&t);
#define RATE(f) ((double)(t.f - P->last.f) / dt)
    printf("[%3.0fs] conn/s %5.0f  hb/s %6.0f  disc/s %4.0f  routes/s %5.0f"
           "  stale/s %4.0f  silent %4u", since_start_s(), RATE(connects),
           RATE(heartbeats), RATE(disconnects), RATE(routes), RATE(stale),
           count_silent());
#undef RATE
    rc = pres_stats(P->p, &st);
    if (rc < 0)
        printf(" | pres_stats: %s\n", pres_strerror(rc));
    else
        printf(" | connected %5" PRIu64 "/%" PRIu64 "  expired %5" PRIu64
               "  late_hb %4" PRIu64 "  gw_deaths %" PRIu64 "\n",
               st.connected, st.devices, st.expirations, st.late_heartbeats,
               st.gateway_deaths);
    fflush(stdout);
    P->last = t;
    P->last_ms = now;
}

/* Devices whose shared owner is gateway g that the store says connected. */
static unsigned connected_on(parent_t *P, unsigned g)
{
    pres_device_info_t info;
    char dev[16], gw[16];
    unsigned n = 0;

    gw_id(gw, sizeof gw, g);
    for (uint32_t d = 0; d < O.devices; d++) {
        if (atomic_load(&S->dev[d].owner) != g)
            continue;
        dev_id(dev, sizeof dev, d);
        if (pres_device(P->p, dev, &info) == 0 && info.connected &&
            !strcmp(info.gateway_id, gw))
            n++;
    }
    return n;
}

static uint64_t gateway_deaths(parent_t *P)
{
    pres_stats_t st;

    return pres_stats(P->p, &st) == 0 ? st.gateway_deaths : 0;
}

/* SIGKILL one gateway, watch its devices stop being connected (the daemon
 * notices the death: faster than their TTL), then start it again. */
static void gateway_kill_step(parent_t *P, uint64_t now)
{
    unsigned v = P->victim, left;
    char gw[16];
    int st;

    gw_id(gw, sizeof gw, v);
    if (P->kill_state == 0 && now >= P->kill_at) {
        P->victim_connected = connected_on(P, v);
        P->deaths_before = gateway_deaths(P);
        atomic_store(&S->gw_alive[v], 0);    /* deliveries there now fail */
        kill(P->pid[v], SIGKILL);
        waitpid(P->pid[v], &st, 0);
        P->pid[v] = 0;
        P->killed_at = now;
        P->kill_state = 1;
        note("SIGKILL %s: %u devices connected on it; they must stop being "
             "connected within 1 s (TTL %u ms)", gw, P->victim_connected,
             O.ttl_ms);
    } else if (P->kill_state == 1) {
        left = connected_on(P, v);
        if (left == 0 && P->victim_connected) {
            note("%s dead %.2f s: 0 of its %u devices connected; "
                 "gateway_deaths %" PRIu64 " -> %" PRIu64, gw,
                 (double)(now - P->killed_at) / 1000.0, P->victim_connected,
                 P->deaths_before, gateway_deaths(P));
            P->victim_connected = 0;
        } else if (left && ++P->dead_ticks % (1000 / PARENT_TICK) == 0) {
            note("%s dead %.2f s: %u devices still connected", gw,
                 (double)(now - P->killed_at) / 1000.0, left);
        }
        if (now >= P->killed_at + P->restart_after && !stopping()) {
            P->pid[v] = spawn(gateway_main, v);
            atomic_store(&S->gw_alive[v], 1);
            P->kill_state = 2;
            note("%s restarted (pid %d): its devices reconnect", gw,
                 (int)P->pid[v]);
        }
    }
}

/* Follow the demo's elevator device through the store's eyes. */
static void elevator_step(parent_t *P)
{
    pres_device_info_t info;
    char dev[16], gw[16];
    int es = atomic_load(&S->elev_state);

    if (O.devices <= ELEVATOR || es == P->elev_seen) {
        if (es == 1 && !P->elev_expired_shown) {
            dev_id(dev, sizeof dev, ELEVATOR);
            if (pres_device(P->p, dev, &info) == 0 && !info.connected) {
                note("%s expired (TTL passed): connected=0, last seen "
                     "%.1f s ago", dev, (double)(pres_now_ms() -
                     info.last_seen_ms) / 1000.0);
                P->elev_expired_shown = 1;
            }
        }
        return;
    }
    dev_id(dev, sizeof dev, ELEVATOR);
    if (es == 1)
        note("%s stopped heartbeating (elevator): still connected until "
             "its TTL passes", dev);
    if (es == 2) {
        gw_id(gw, sizeof gw, atomic_load(&S->elev_gw));
        note("%s reconnected on %s", dev, gw);
    }
    P->elev_seen = es;
}

/* A child that ended on its own: a failure (they run until told to stop). */
static void reap(parent_t *P)
{
    pid_t pid;
    int st;

    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (unsigned i = 0; i <= MAX_GW; i++) {
            if (P->pid[i] != pid)
                continue;
            P->pid[i] = 0;
            if (i < MAX_GW)
                atomic_store(&S->gw_alive[i], 0);
            fprintf(stderr, "presence-sim: %s %u (pid %d) ended: %s %d\n",
                    i < MAX_GW ? "gateway" : "worker", i, (int)pid,
                    WIFEXITED(st) ? "exit" : "signal",
                    WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
            P->failed = 1;
        }
    }
}

static void stop_all(parent_t *P)
{
    uint64_t end = mono_ms() + 3000;
    int st, left;

    atomic_store(&S->stop, 1);
    for (unsigned i = 0; i <= MAX_GW; i++)
        if (P->pid[i] > 0)
            kill(P->pid[i], SIGTERM);
    do {
        left = 0;
        for (unsigned i = 0; i <= MAX_GW; i++) {
            if (P->pid[i] <= 0)
                continue;
            if (waitpid(P->pid[i], &st, WNOHANG) == P->pid[i]) {
                if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                    P->failed = 1;
                P->pid[i] = 0;
            } else {
                left++;
            }
        }
        if (left)
            sleep_ms(20);
    } while (left && mono_ms() < end);
    for (unsigned i = 0; i <= MAX_GW; i++)
        if (P->pid[i] > 0) {        /* stuck: no clean exit to wait for */
            kill(P->pid[i], SIGKILL);
            waitpid(P->pid[i], &st, 0);
            P->failed = 1;
        }
}

static void print_summary(parent_t *P)
{
    counters_t t;
    pres_stats_t st;

    totals(&t);
    printf("presence-sim: %.1f s: %" PRIu64 " connects, %" PRIu64
           " heartbeats, %" PRIu64 " disconnects, %" PRIu64 " silences (%"
           PRIu64 " revived by a late heartbeat), %" PRIu64 " idle, %" PRIu64
           " routes (%.2f devices each), %" PRIu64 " stale reports, %" PRIu64
           " recovered, %" PRIu64 " unexpected errors\n", since_start_s(),
           t.connects, t.heartbeats, t.disconnects, t.silences, t.revivals,
           t.idles, t.routes, t.routes ? (double)t.routed / t.routes : 0.0,
           t.stale, t.recovered, t.errors);
    if (pres_stats(P->p, &st) == 0)
        printf("store: devices %" PRIu64 ", users %" PRIu64 ", connects %"
               PRIu64 ", disconnects %" PRIu64 ", heartbeats %" PRIu64
               ", late %" PRIu64 ", expirations %" PRIu64
               ", gateway_deaths %" PRIu64 ", stale_reports %" PRIu64
               ", events %" PRIu64 "\n", st.devices, st.users, st.connects,
               st.disconnects, st.heartbeats, st.late_heartbeats,
               st.expirations, st.gateway_deaths, st.stale_reports,
               st.events);
    if (t.errors)
        P->failed = 1;
}

static int run(void)
{
    static parent_t P;
    uint64_t end, next;
    unsigned tick = 0;
    int rc;

    if ((rc = pres_open(&P.p, O.name, PRES_RDONLY)) < 0) {
        fprintf(stderr, "presence-sim: pres_open(%s): %s (is presenced "
                "running?)\n", O.name ? O.name : "default",
                pres_strerror(rc));
        return 1;
    }
    S->start_ms = mono_ms();
    P.victim = O.gateways > 1 ? 1 : 0;
    /* Kill once the elevator is silent; restart after long enough to see
     * the death detected (<= 1 s) but before the TTLs would have. */
    P.kill_at = S->start_ms + (O.seconds && O.seconds < 20
                               ? O.seconds * 400u : 8000u);
    P.restart_after = 3000;
    for (unsigned g = 0; g < O.gateways; g++) {
        atomic_store(&S->gw_alive[g], 1);
        P.pid[g] = spawn(gateway_main, g);
    }
    P.pid[MAX_GW] = spawn(worker_entry, 0);
    P.last_ms = mono_ms();
    printf("presence-sim: %u gateways, %u devices, %u users, TTL %u ms, "
           "%u routes/s, ", O.gateways, O.devices, O.users, O.ttl_ms,
           O.routes_per_s);
    if (O.seconds)
        printf("%u s", O.seconds);
    else
        printf("until SIGINT");
    printf("; elevator device d_%010u (user u_%010u)\n", ELEVATOR,
           ELEVATOR % O.users);
    fflush(stdout);

    end = S->start_ms + (uint64_t)O.seconds * 1000u;
    next = S->start_ms;
    while (!g_signalled && (O.seconds == 0 || mono_ms() < end)) {
        uint64_t now;
        next += PARENT_TICK;
        now = mono_ms();
        if (next > now)
            sleep_ms((unsigned)(next - now));
        else
            next = now;     /* fell behind (a busy host): no burst of lines */
        if (g_signalled)
            break;
        now = mono_ms();
        reap(&P);
        gateway_kill_step(&P, now);
        elevator_step(&P);
        if (++tick % (1000 / PARENT_TICK) == 0)
            print_line(&P);
    }
    stop_all(&P);
    print_summary(&P);
    pres_close(P.p);
    return P.failed ? 1 : 0;
}

/* ------------------------------------------------------------------------ */
/* Command line                                                              */

static void usage(FILE *f)
{
    fprintf(f,
        "usage: presence-sim [--name NAME] [--gateways N] [--devices N] "
        "[--users N]\n"
        "                    [--seconds S] [--ttl-ms MS] [--routes-per-s N] "
        "[--seed N]\n"
        "  --gateways N      gateway processes, 1..%d (default 4)\n"
        "  --devices N       devices (default 5000)\n"
        "  --users N         users; device i belongs to user i %% N "
        "(default 2000)\n"
        "  --seconds S       run time; 0: until SIGINT/SIGTERM (default 20)\n"
        "  --ttl-ms MS       device TTL; heartbeats every TTL/3 "
        "(default 3000)\n"
        "  --routes-per-s N  the delivery worker's pace (default 2000)\n"
        "  --seed N          random seed (default 1)\n"
        "  --name NAME       the store (default $PRESENCE_NAME or "
        "\"default\")\n", MAX_GW);
}

static int num(const char *s, unsigned long long lo, unsigned long long hi,
               unsigned long long *out)
{
    char *end;

    errno = 0;
    *out = strtoull(s, &end, 10);
    return !errno && *s && !*end && *s != '-' && *out >= lo && *out <= hi;
}

static int parse(int argc, char **argv)
{
    static const struct option lo[] = {
        { "gateways", required_argument, NULL, 'g' },
        { "devices", required_argument, NULL, 'd' },
        { "users", required_argument, NULL, 'u' },
        { "seconds", required_argument, NULL, 's' },
        { "ttl-ms", required_argument, NULL, 't' },
        { "routes-per-s", required_argument, NULL, 'r' },
        { "seed", required_argument, NULL, 'S' },
        { "name", required_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    unsigned long long v;
    int c, ok;

    while ((c = getopt_long(argc, argv, "g:d:u:s:t:r:S:n:h", lo, NULL))
           != -1) {
        switch (c) {
        case 'g':
            ok = num(optarg, 1, MAX_GW, &v);
            O.gateways = (unsigned)v;
            break;
        case 'd':
            ok = num(optarg, 1, 10000000, &v);
            O.devices = (unsigned)v;
            break;
        case 'u':
            ok = num(optarg, 1, 10000000, &v);
            O.users = (unsigned)v;
            break;
        case 's':
            ok = num(optarg, 0, 86400, &v);
            O.seconds = (unsigned)v;
            break;
        case 't':   /* >= 300: a heartbeat every TTL/3 outpaces the tick */
            ok = num(optarg, 300, PRES_TTL_MAX_MS, &v);
            O.ttl_ms = (unsigned)v;
            break;
        case 'r':
            ok = num(optarg, 1, 10000000, &v);
            O.routes_per_s = (unsigned)v;
            break;
        case 'S':
            ok = num(optarg, 0, UINT64_MAX, &v);
            O.seed = v;
            break;
        case 'n':
            ok = 1;
            O.name = optarg;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            return -1;
        }
        if (!ok) {
            fprintf(stderr, "presence-sim: bad value for -%c: %s\n", c,
                    optarg);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "presence-sim: unexpected argument: %s\n",
                argv[optind]);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    size_t size;

    if (parse(argc, argv) < 0)
        return 2;
    size = sizeof *S + (size_t)O.devices * sizeof S->dev[0];
    S = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
             -1, 0);
    if (S == MAP_FAILED) {
        perror("presence-sim: mmap");
        return 1;
    }
    /* Zeroed: every device PH_PENDING from time 0 on gateway 0; spread. */
    for (uint32_t d = 0; d < O.devices; d++)
        atomic_store(&S->dev[d].owner, d % O.gateways);
    set_signals();
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    return run();
}
