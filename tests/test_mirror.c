/*
 * test_mirror.c - presenced's LMDB mirror, end to end: what reaches LMDB
 * (every record of the region, compared field by field), SIGTERM's flush,
 * kill -9 of the daemon during a write storm, the rebuild of a store whose
 * region is gone, users evicted from memory answered from LMDB, and the
 * directories and maps the daemon must refuse or survive.
 *
 * LMDB is read two ways: while a daemon runs, through the library's
 * read-only handle (lib/db.h); once it has stopped, through the daemon's
 * own writer (daemon/db.h), which can also walk every record.  LMDB forbids
 * both on one environment in one process at once (closing one would drop
 * the other's locks), so a test closes every store handle before it opens
 * the writer, and writes LMDB directly only from a child process.
 *
 * Privacy policies are set the way pres_set_privacy sets them (a policy
 * word and a block of exception entries, lib/region.h), by set_policy
 * below.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <libgen.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "db.h"
#include "../daemon/db.h"
#include "harness.h"
#include "presence.h"
#include "store.h"

#define LONG_TTL   600000u
#define WAIT_MS    10000
#define DAY_MS     UINT64_C(86400000)
/* The store reads CLOCK_MONOTONIC_COARSE (lib/clock.h): a kernel tick, up
 * to 10 ms, behind the precise clock the test reads. */
#define COARSE_MS  20

static const char *const SMALL[] = { "--capacity", "4096", NULL };

static th_store_t S;
static pid_t kids[8];
static int nkids;

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

static int teardown(void **state)
{
    (void)state;
    th_kill_children(kids, (size_t)nkids);
    nkids = 0;
    if (S.dir[0])
        th_store_destroy(&S);
    memset(&S, 0, sizeof S);
    return 0;
}

static void start(const char *const *args)
{
    if (th_store_start(&S, args) != 0)
        fail_msg("the daemon did not start");
}

static pres_t *open_h(int flags)
{
    pres_t *p = NULL;
    int rc = pres_open(&p, S.name, flags);
    if (rc != 0)
        fail_msg("pres_open(%s) = %d (%s)", S.name, rc, pres_strerror(rc));
    return p;
}

static pres_stats_t stats(pres_t *p)
{
    pres_stats_t st;
    assert_rc(pres_stats(p, &st), 0);
    return st;
}

/* The mirror's directory as the daemon published it (its real path). */
static void db_dir(pres_t *p, char *out, size_t cap)
{
    snprintf(out, cap, "%s", p->m.hdr->db_dir);
}

/* The daemon's log, or "" when the daemon writes to our stderr. */
static void read_log(char *buf, size_t cap)
{
    char path[320];
    snprintf(path, sizeof path, "%s/presenced.log", S.dir);
    buf[0] = '\0';
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = '\0';
    fclose(f);
}

/* A privacy policy through pres_set_privacy.  flags: the PRES_PV_* bits
 * and audiences (an online audience narrower than last seen's is widened
 * to it, the one pres_set_privacy refuses). */
static void set_policy(pres_t *p, const char *user, uint64_t flags, const char *const *allow,
                       size_t na, const char *const *deny, size_t nd)
{
    int seen = PRES_PV_SEEN(flags), online = PRES_PV_ONLINE(flags);
    pres_privacy_t pol = {
        .last_seen = seen, .online = online > seen ? seen : online,
        .approximate = (flags & PRES_PV_APPROX) != 0,
        .reciprocal = (flags & PRES_PV_RECIP) != 0,
        .invisible = (flags & PRES_PV_INVISIBLE) != 0,
        .allow = allow, .n_allow = na, .deny = deny, .n_deny = nd,
    };
    assert_rc(pres_set_privacy(p, user, &pol), 0);
}

/* ------------------------------------------------------------------------ */
/* The region against LMDB                                                   */

typedef struct {
    int  (*dev)(void *h, const char *id, pres_db_dev_t *out);
    int  (*user)(void *h, const char *id, pres_db_user_t *out);
    void  *h;
} lmdb_t;

static int ro_dev(void *h, const char *id, pres_db_dev_t *o) { return pres__db_ro_device(h, id, o); }
static int ro_user(void *h, const char *id, pres_db_user_t *o) { return pres__db_ro_user(h, id, o); }
static int rw_dev(void *h, const char *id, pres_db_dev_t *o) { return pd_db_get_device(h, id, o); }
static int rw_user(void *h, const char *id, pres_db_user_t *o) { return pd_db_get_user(h, id, o); }

/* What the mirror must hold of a user: from the region, in a read section. */
typedef struct {
    char     id[PRES_ID_MAX + 1];
    int      connected;               /* a device is connected */
    uint64_t last_seen, frozen;
    uint32_t policy, n_allow, n_deny;
    char     allow[PRES_EXCEPTIONS_MAX][PRES_ID_MAX + 1];
    char     deny[PRES_EXCEPTIONS_MAX][PRES_ID_MAX + 1];
} want_user_t;

static int user_want(const pres_map_t *m, uint32_t u, want_user_t *w)
{
    const pres_user_t *r = &m->users[u];
    uint64_t a = pa_load(&r->alloc);
    if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED || a == PRES_ALLOC_RETIRED ||
        r->keylen < 1 || r->keylen > PRES_ID_MAX ||
        pres__idx_user_find(m, r->key, r->keylen, pres__hash(r->key, r->keylen, m->seed)) !=
            (int)u)
        return 0;
    memset(w, 0, sizeof *w);
    pres__key_out(w->id, r->keylen, r->key);
    uint64_t nm = pres__mono_ms();
    pres_agg_t agg;
    int rc = -EAGAIN;
    for (int k = 0; k < 8 && rc == -EAGAIN; k++)
        rc = pres__user_agg(m, u, nm, pres__wall_of(m, nm), &agg);
    if (rc < 0)
        return rc;
    w->connected = agg.devices > 0;
    w->last_seen = agg.last_seen_ms;
    uint64_t pw = pa_load_acquire(&r->privacy);
    if (!(pw & PRES_PV_SET))
        return 1;
    w->policy = (uint32_t)(pw & 0xff);
    if (!PRES_PV_HEAD(pw))
        return 1;
    const pres_exc_t *e = &m->excs[PRES_PV_HEAD(pw) - 1];
    w->n_allow = e->n_allow;
    w->n_deny = e->n_deny;
    w->frozen = e->frozen_seen;
    for (uint32_t k = 0; k < w->n_allow + w->n_deny; k++) {
        e = &m->excs[e->next - 1];
        pres__key_out(k < w->n_allow ? w->allow[k] : w->deny[k - w->n_allow], e->keylen, e->key);
    }
    return 1;
}

static int differ(char *why, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int differ(char *why, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, cap, fmt, ap);
    va_end(ap);
    return 0;
}

static int dev_matches(const pres_device_info_t *d, const pres_db_dev_t *r, char *why, size_t cap)
{
    if (strcmp(d->user_id, r->user_id) || strcmp(d->gateway_id, r->gateway_id))
        return differ(why, cap, "device %s: user %s gateway %s, LMDB %s %s", d->device_id,
                      d->user_id, d->gateway_id, r->user_id, r->gateway_id);
    if (d->connected != (int)r->connected || d->connected_at_ms != r->connected_at_ms ||
        d->last_active_ms != r->last_active_ms ||
        (!d->connected && d->last_seen_ms != r->last_seen_ms))
        return differ(why, cap, "device %s: connected %d at %llu seen %llu active %llu; "
                      "LMDB %u at %llu seen %llu active %llu", d->device_id, d->connected,
                      (unsigned long long)d->connected_at_ms,
                      (unsigned long long)d->last_seen_ms, (unsigned long long)d->last_active_ms,
                      r->connected, (unsigned long long)r->connected_at_ms,
                      (unsigned long long)r->last_seen_ms, (unsigned long long)r->last_active_ms);
    return 1;
}

static int user_matches(const want_user_t *w, const pres_db_user_t *r, char *why, size_t cap)
{
    if ((!w->connected && w->last_seen != r->last_seen_ms) || w->policy != r->policy ||
        w->n_allow != r->n_allow || w->n_deny != r->n_deny || w->frozen != r->frozen_seen_ms)
        return differ(why, cap, "user %s: seen %llu policy %#x lists %u/%u frozen %llu; LMDB "
                      "%llu %#x %u/%u %llu", w->id, (unsigned long long)w->last_seen, w->policy,
                      w->n_allow, w->n_deny, (unsigned long long)w->frozen,
                      (unsigned long long)r->last_seen_ms, r->policy, r->n_allow, r->n_deny,
                      (unsigned long long)r->frozen_seen_ms);
    for (uint32_t k = 0; k < w->n_allow; k++)
        if (strcmp(w->allow[k], r->allow[k]))
            return differ(why, cap, "user %s: allow[%u] %s, LMDB %s", w->id, k, w->allow[k],
                          r->allow[k]);
    for (uint32_t k = 0; k < w->n_deny; k++)
        if (strcmp(w->deny[k], r->deny[k]))
            return differ(why, cap, "user %s: deny[%u] %s, LMDB %s", w->id, k, w->deny[k],
                          r->deny[k]);
    return 1;
}

/* Every device and user of the region, as LMDB holds it?  *n counts the
 * records compared. */
static int region_in_lmdb(pres_t *p, const lmdb_t *db, char *why, size_t cap, size_t *n)
{
    pres_map_t *m = &p->m;
    pres_db_dev_t r;
    static pres_db_user_t ur;
    static want_user_t w;
    *n = 0;
    for (uint32_t i = 0; i < m->dev_cap; i++) {
        pres_rs_t *t = pres__gp_enter(p);
        const pres_dev_t *d = &m->devs[i];
        uint64_t a = pa_load(&d->alloc);
        pres_snap_t s;
        pres_device_info_t info;
        int live = a != PRES_ALLOC_FREE && a != PRES_ALLOC_POOLED && a != PRES_ALLOC_RETIRED &&
                   pres__dev_snap(m, i, &s) == 0 && d->keylen >= 1 && d->keylen <= PRES_ID_MAX &&
                   pres__idx_dev_find(m, d->key, d->keylen,
                                      pres__hash(d->key, d->keylen, m->seed)) == (int)i;
        if (live) {
            uint64_t nm = pres__mono_ms();
            pres__dev_info(m, i, &s, nm, pres__wall_of(m, nm), &info);
        }
        pres__gp_leave(t);
        if (!live)
            continue;
        int rc = db->dev(db->h, info.device_id, &r);
        if (rc != 0)
            return differ(why, cap, "device %s: not in LMDB (%d)", info.device_id, rc);
        if (!dev_matches(&info, &r, why, cap))
            return 0;
        ++*n;
    }
    for (uint32_t u = 0; u < m->user_cap; u++) {
        pres_rs_t *t = pres__gp_enter(p);
        int rc = user_want(m, u, &w);
        pres__gp_leave(t);
        if (rc <= 0)
            continue;
        if ((rc = db->user(db->h, w.id, &ur)) != 0)
            return differ(why, cap, "user %s: not in LMDB (%d)", w.id, rc);
        if (!user_matches(&w, &ur, why, cap))
            return 0;
        ++*n;
    }
    return 1;
}

/* Poll, under a deadline, until the running daemon's LMDB matches the
 * region (the mirror lags by design). */
struct match_arg {
    pres_t *p;
    lmdb_t  db;
    char    why[512];
    size_t  n;
};

static int matches(void *arg)
{
    struct match_arg *a = arg;
    return region_in_lmdb(a->p, &a->db, a->why, sizeof a->why, &a->n);
}

static size_t wait_lmdb_matches(pres_t *p, const char *when)
{
    char dir[PATH_MAX];
    db_dir(p, dir, sizeof dir);
    pres_db_ro_t *ro = NULL;
    assert_rc(pres__db_ro_open(dir, S.name, &ro), 0);
    struct match_arg a = { p, { ro_dev, ro_user, ro }, "", 0 };
    int ok = th_wait_until(matches, &a, WAIT_MS);
    pres__db_ro_close(ro);
    if (!ok) {
        th_store_dump_log(&S);
        fail_msg("%s: LMDB does not match the region after %d ms: %s", when, WAIT_MS, a.why);
    }
    return a.n;
}

/* Every record of LMDB is one of the region's (with the daemon stopped and
 * every store handle closed: the writer's walk). */
struct back_arg {
    pres_t *p;
    size_t  devs, users;
    char    why[256];
};

static int lmdb_dev_in_region(void *ctx, const char *id, const pres_db_dev_t *r)
{
    struct back_arg *a = ctx;
    pres_device_info_t d;
    if (pres_device(a->p, id, &d) != 0 || strcmp(d.user_id, r->user_id)) {
        snprintf(a->why, sizeof a->why, "LMDB device %s (user %s) is not in the region", id,
                 r->user_id);
        return -1;
    }
    a->devs++;
    return 0;
}

static int lmdb_user_in_region(void *ctx, const char *id, const pres_db_user_t *r)
{
    struct back_arg *a = ctx;
    (void)r;
    pres_rs_t *t = pres__gp_enter(a->p);
    int u = pres__idx_user_find(&a->p->m, id, strlen(id),
                                pres__hash(id, strlen(id), a->p->m.seed));
    pres__gp_leave(t);
    if (u < 0) {
        snprintf(a->why, sizeof a->why, "LMDB user %s is not in the region", id);
        return -1;
    }
    a->users++;
    return 0;
}

/* With the daemon stopped: the region and LMDB hold the same records, both
 * ways.  Opens its own (read-only) store handle; the caller has none open. */
static void stopped_lmdb_matches(const char *when)
{
    pres_t *p = open_h(PRES_RDONLY);
    char dir[PATH_MAX], err[512], why[512];
    db_dir(p, dir, sizeof dir);
    pd_db_t *db = NULL;
    if (pd_db_open(&db, dir, S.name, 1 << 20, 1 << 20, err, sizeof err) != 0)
        fail_msg("%s: pd_db_open: %s", when, err);
    lmdb_t l = { rw_dev, rw_user, db };
    size_t n = 0;
    if (!region_in_lmdb(p, &l, why, sizeof why, &n))
        fail_msg("%s: %s", when, why);
    struct back_arg b = { p, 0, 0, "" };
    if (pd_db_each_device(db, lmdb_dev_in_region, &b) != 0 ||
        pd_db_each_user(db, lmdb_user_in_region, &b) != 0)
        fail_msg("%s: %s", when, b.why);
    if (b.devs + b.users != n)
        fail_msg("%s: LMDB holds %zu records, the region %zu", when, b.devs + b.users, n);
    pd_db_close(db);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Mirror correctness: random operations, SIGTERM, every record compared     */

#define R_USERS   120
#define R_DEVS    3               /* devices per user, fixed */
#define R_GWS     4
#define R_OPS     20000

static void dev_id(char *out, unsigned i) { snprintf(out, 32, "md_%04u", i); }
static void user_id(char *out, unsigned u) { snprintf(out, 32, "mu_%04u", u); }

/* One random operation; short TTLs (every 7th device) let some expire. */
static void random_op(pres_t *p, uint64_t *seed)
{
    static const char *const names[] = { "mu_0001", "mu_0002", "mu_0003", "friend", "foe" };
    unsigned i = (unsigned)(th_rand(seed) % (R_USERS * R_DEVS)), u = i / R_DEVS;
    char d[32], usr[32], gw[32];
    dev_id(d, i);
    user_id(usr, u);
    snprintf(gw, sizeof gw, "mg_%u", (unsigned)(th_rand(seed) % R_GWS));
    uint32_t ttl = i % 7 == 0 ? 30 : LONG_TTL;
    switch (th_rand(seed) % 8) {
    case 0: case 1: case 2:
        assert_rc(pres_connect(p, usr, d, gw, ttl, NULL), 0);
        break;
    case 3:
        (void)pres_disconnect(p, d);
        break;
    case 4:
        (void)pres_heartbeat(p, d, th_rand(seed) % 2 ? ttl : ttl + 1);
        break;
    case 5:
        (void)pres_set_activity(p, d, th_rand(seed) % 3 ? PRES_ACTIVE : PRES_IDLE);
        break;
    case 6: {
        uint64_t f = th_rand(seed);
        int seen = (int)(f % 3), online = (int)((f >> 2) % (unsigned)(seen + 1));
        uint64_t flags = (uint64_t)seen | ((uint64_t)online << 2) | (f & 0x70);
        size_t na = (f >> 8) % 3, nd = (f >> 10) % 3;
        set_policy(p, usr, flags, names, na, names + 2, nd);
        break;
    }
    default: {
        pres_device_info_t info;
        (void)pres_device(p, d, &info);
        break;
    }
    }
}

struct short_arg { pres_t *p; };

/* Every short-TTL device has expired (or was never connected). */
static int shorts_expired(void *arg)
{
    struct short_arg *a = arg;
    for (unsigned i = 0; i < R_USERS * R_DEVS; i += 7) {
        char d[32];
        pres_device_info_t info;
        dev_id(d, i);
        if (pres_device(a->p, d, &info) == 0 && info.connected)
            return 0;
    }
    return 1;
}

static void test_mirror_matches_region(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t seed = th_mono_ms() | 1;
    print_message("    seed %llu\n", (unsigned long long)seed);
    int ops = th_scale(R_OPS, R_OPS / 4);
    for (int k = 0; k < ops; k++) {
        random_op(p, &seed);
        if (k == ops / 2)
            wait_lmdb_matches(p, "half way");
    }
    struct short_arg sa = { p };
    assert_true(th_wait_until(shorts_expired, &sa, WAIT_MS));
    size_t n = wait_lmdb_matches(p, "after the operations");
    assert_true(n > R_USERS);
    /* Interactions on active devices write no note: SIGTERM's last sweep
     * finds them. */
    for (unsigned i = 1; i < R_USERS * R_DEVS; i += 7) {
        char d[32];
        dev_id(d, i);
        (void)pres_set_activity(p, d, PRES_ACTIVE);
    }
    pres_close(p);
    assert_int_equal(th_daemon_stop(&S), 0);
    stopped_lmdb_matches("after SIGTERM");
}

/* More changes than the ring of change notes holds, made while the daemon
 * cannot read it (stopped): the notes are lost, the daemon knows it, and
 * its sweep brings every change to LMDB all the same. */
struct lost_arg { pres_t *p; uint64_t before; };

static int notes_were_lost(void *arg)
{
    struct lost_arg *a = arg;
    return pa_load(&a->p->m.hdr->dc.notes_lost) > a->before;
}

static void test_notes_overflow(void **state)
{
    (void)state;
    enum { DEVS = 64, EARLY = 16 };
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    char d[32], u[32], g[32];
    for (unsigned i = 0; i < DEVS; i++) {
        snprintf(d, sizeof d, "no_d%u", i);
        snprintf(u, sizeof u, i < EARLY ? "no_u%u" : "no_s%u", i);
        assert_rc(pres_connect(p, u, d, "no_g0", LONG_TTL, NULL), 0);
    }
    wait_lmdb_matches(p, "before the overflow");
    struct lost_arg la = { p, pa_load(&p->m.hdr->dc.notes_lost) };
    uint64_t ring = p->m.note_mask + 1;
    assert_int_equal(kill(S.pid, SIGSTOP), 0);
    /* First changes whose notes the storm below will overwrite: only the
     * daemon's sweep can find them. */
    for (unsigned i = 0; i < EARLY; i++) {
        snprintf(d, sizeof d, "no_d%u", i);
        snprintf(u, sizeof u, "no_u%u", i);
        if (i % 2)
            assert_rc(pres_disconnect(p, d), 0);
        else
            assert_rc(pres_connect(p, u, d, "no_g_early", LONG_TTL, NULL), 0);
    }
    const char *deny[] = { "no_nosy" };
    pres_privacy_t pol = { .last_seen = PRES_CONTACTS, .online = PRES_EVERYONE,
                           .deny = deny, .n_deny = 1 };
    assert_rc(pres_set_privacy(p, "no_u0", &pol), 0);
    /* Then more notes than the ring holds, on other devices and users: a
     * device disconnected and connected again, on another gateway each
     * round. */
    for (uint64_t k = 0; k < ring + 1000; k++) {
        unsigned i = EARLY + (unsigned)(k % (DEVS - EARLY));
        unsigned round = (unsigned)(k / (DEVS - EARLY));
        snprintf(d, sizeof d, "no_d%u", i);
        snprintf(u, sizeof u, "no_s%u", i);
        snprintf(g, sizeof g, "no_g%u", round % 3);
        if (round & 1)
            assert_rc(pres_connect(p, u, d, g, LONG_TTL, NULL), 0);
        else
            assert_rc(pres_disconnect(p, d), 0);
    }
    assert_int_equal(kill(S.pid, SIGCONT), 0);
    if (!th_wait_until(notes_were_lost, &la, WAIT_MS))
        fail_msg("%llu notes written past a ring of %llu, and none counted lost",
                 (unsigned long long)ring + 1000 + EARLY + 1, (unsigned long long)ring);
    wait_lmdb_matches(p, "after the overflow");
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Crash: kill -9 of the daemon during a write storm, 20 times               */

#define C_WRITERS  2
#define C_DEVS     200            /* per writer */
#define C_ANCHORS  100            /* connected by the test, never touched */
#define C_ROUNDS   20

typedef struct {
    volatile int pause;           /* the test asks writers to hold still */
    volatile int paused[C_WRITERS];
    volatile int stop;
} storm_ctl_t;

static storm_ctl_t *ctl;
static int writer_no;

/* A gateway storming its own devices (each of a fixed user) until told to
 * stop; between operations it holds still while asked to. */
static int writer_main(void *arg)
{
    (void)arg;
    pres_t *p = NULL;
    if (pres_open(&p, S.name, PRES_RDWR) != 0)
        return 10;
    uint64_t seed = (uint64_t)getpid() * 7919 + 1;
    char d[32], u[32];
    for (unsigned i = 0; i < C_DEVS; i++) {
        snprintf(d, sizeof d, "cw%d_%u", writer_no, i);
        snprintf(u, sizeof u, "cu%d_%u", writer_no, i / 2);
        if (pres_connect(p, u, d, "cgw", LONG_TTL, NULL) != 0)
            return 11;
    }
    while (!ctl->stop) {
        if (ctl->pause) {
            ctl->paused[writer_no] = 1;
            while (ctl->pause && !ctl->stop)
                th_nap_us(200);
            ctl->paused[writer_no] = 0;
            continue;
        }
        unsigned i = (unsigned)(th_rand(&seed) % C_DEVS);
        snprintf(d, sizeof d, "cw%d_%u", writer_no, i);
        snprintf(u, sizeof u, "cu%d_%u", writer_no, i / 2);
        switch (th_rand(&seed) % 4) {
        case 0:
            (void)pres_connect(p, u, d, "cgw", LONG_TTL, NULL);
            break;
        case 1:
            (void)pres_disconnect(p, d);
            break;
        case 2:
            (void)pres_heartbeat(p, d, LONG_TTL);
            break;
        default:
            (void)pres_set_activity(p, d, th_rand(&seed) % 2 ? PRES_ACTIVE : PRES_IDLE);
            break;
        }
    }
    pres_close(p);
    return 0;
}

static int writers_paused(void *arg)
{
    (void)arg;
    for (int w = 0; w < C_WRITERS; w++)
        if (!ctl->paused[w])
            return 0;
    return 1;
}

struct count_arg { pres_t *p; uint64_t devices, users; };

static int counts_are(void *arg)
{
    struct count_arg *a = arg;
    pres_stats_t st = stats(a->p);
    return st.devices == a->devices && st.users == a->users;
}

static void anchors_connected(pres_t *p, int round)
{
    for (unsigned i = 0; i < C_ANCHORS; i++) {
        char d[32];
        pres_device_info_t info;
        snprintf(d, sizeof d, "ca_%u", i);
        assert_rc(pres_device(p, d, &info), 0);
        if (!info.connected)
            fail_msg("round %d: anchor %s is not connected after the restart", round, d);
    }
}

static void test_crash_during_storm(void **state)
{
    (void)state;
    start(SMALL);
    ctl = mmap(NULL, sizeof *ctl, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(ctl != MAP_FAILED);
    memset((void *)ctl, 0, sizeof *ctl);
    pres_t *p = open_h(PRES_RDWR);
    for (unsigned i = 0; i < C_ANCHORS; i++) {
        char d[32];
        snprintf(d, sizeof d, "ca_%u", i);
        assert_rc(pres_connect(p, "ca_user", d, "cgw_anchor", LONG_TTL, NULL), 0);
    }
    for (int w = 0; w < C_WRITERS; w++) {
        writer_no = w;
        kids[nkids++] = th_fork(writer_main, NULL);
    }
    struct count_arg ca = { p, C_ANCHORS + C_WRITERS * C_DEVS, 1 + C_WRITERS * C_DEVS / 2 };
    assert_true(th_wait_until(counts_are, &ca, WAIT_MS));
    uint64_t seed = th_mono_ms() | 1;
    print_message("    seed %llu\n", (unsigned long long)seed);
    for (int round = 0; round < C_ROUNDS; round++) {
        /* The storm runs; the daemon dies at a random moment of it. */
        th_nap_us((long)(5000 + th_rand(&seed) % 150000));
        th_daemon_kill(&S);
        th_nap_us((long)(th_rand(&seed) % 20000));
        if (th_daemon_start(&S, SMALL) != 0)
            fail_msg("round %d: the daemon did not start again", round);
        ctl->pause = 1;
        assert_true(th_wait_until(writers_paused, NULL, WAIT_MS));
        anchors_connected(p, round);
        if (!th_wait_until(counts_are, &ca, WAIT_MS))
            fail_msg("round %d: stats say %llu devices %llu users, expected %llu %llu", round,
                     (unsigned long long)stats(p).devices, (unsigned long long)stats(p).users,
                     (unsigned long long)ca.devices, (unsigned long long)ca.users);
        char when[64];
        snprintf(when, sizeof when, "after crash %d", round);
        assert_int_equal(th_check_ok(&S, when), 0);
        wait_lmdb_matches(p, when);
        ctl->pause = 0;
    }
    ctl->stop = 1;
    for (int w = 0; w < nkids; w++) {
        assert_int_equal(th_wait_child(kids[w], WAIT_MS), 0);
        kids[w] = 0;
    }
    nkids = 0;
    munmap((void *)ctl, sizeof *ctl);
    pres_close(p);
    assert_int_equal(th_daemon_stop(&S), 0);
}

/* ------------------------------------------------------------------------ */
/* Cold rebuild: the region is gone, LMDB remains                            */

#define B_USERS 40
#define B_DEVS  3

static void remove_region(void)
{
    char path[600];
    snprintf(path, sizeof path, "%s/presence.%s", S.dir, S.name);
    assert_int_equal(unlink(path), 0);
    snprintf(path, sizeof path, "%s/presence.%s.readers", S.dir, S.name);
    assert_int_equal(unlink(path), 0);
}

static void test_cold_rebuild(void **state)
{
    (void)state;
    static const char *const lst[] = { "ra", "rb", "rc", "rd" };
    static pres_device_info_t before[B_USERS * B_DEVS];
    static want_user_t ubefore[B_USERS];
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    for (unsigned i = 0; i < B_USERS * B_DEVS; i++) {
        char d[32], u[32], g[32];
        snprintf(d, sizeof d, "bd_%u", i);
        snprintf(u, sizeof u, "bu_%u", i / B_DEVS);
        snprintf(g, sizeof g, "bg_%u", i % 3);
        assert_rc(pres_connect(p, u, d, g, LONG_TTL, NULL), 0);
        if (i % 2)
            assert_rc(pres_disconnect(p, d), 0);
        else if (i % 4 == 0)
            assert_rc(pres_set_activity(p, d, PRES_IDLE), 0);
    }
    for (unsigned u = 0; u < B_USERS; u += 3) {
        char id[32];
        snprintf(id, sizeof id, "bu_%u", u);
        set_policy(p, id, (u % 3) | ((uint64_t)(u % 2) << 2) | (u % 5 == 0 ? PRES_PV_INVISIBLE : 0)
                              | PRES_PV_APPROX, lst, u % 3, lst + 2, u % 2);
    }
    /* A user with a policy and no device outlives its devices. */
    assert_rc(pres_connect(p, "bu_lonely", "bd_lonely", "bg_0", LONG_TTL, NULL), 0);
    set_policy(p, "bu_lonely", PRES_NOBODY | (PRES_NOBODY << 2), lst, 1, NULL, 0);
    wait_lmdb_matches(p, "before the stop");
    for (unsigned i = 0; i < B_USERS * B_DEVS; i++) {
        char d[32];
        snprintf(d, sizeof d, "bd_%u", i);
        assert_rc(pres_device(p, d, &before[i]), 0);
    }
    for (unsigned u = 0; u < B_USERS; u++) {
        char id[32];
        snprintf(id, sizeof id, "bu_%u", u);
        pres_rs_t *t = pres__gp_enter(p);
        int ui = pres__idx_user_find(&p->m, id, strlen(id), pres__hash(id, strlen(id), p->m.seed));
        assert_true(ui >= 0);
        assert_int_equal(user_want(&p->m, (uint32_t)ui, &ubefore[u]), 1);
        pres__gp_leave(t);
    }
    pres_stats_t st0 = stats(p);
    pres_close(p);
    uint64_t stopped = pres_now_ms();
    assert_int_equal(th_daemon_stop(&S), 0);

    /* A reboot: the region is gone. */
    remove_region();
    uint64_t t0 = th_mono_ms();
    assert_int_equal(th_daemon_start(&S, SMALL), 0);
    print_message("    rebuilt and usable in %llu ms\n", (unsigned long long)(th_mono_ms() - t0));
    assert_int_equal(th_check_ok(&S, "after the rebuild"), 0);
    p = open_h(PRES_RDWR);
    pres_stats_t st = stats(p);
    assert_int_equal(st.devices, st0.devices);
    assert_int_equal(st.users, st0.users);
    assert_int_equal(st.connected, 0);
    uint64_t now = pres_now_ms();
    for (unsigned i = 0; i < B_USERS * B_DEVS; i++) {
        pres_device_info_t d;
        assert_rc(pres_device(p, before[i].device_id, &d), 0);
        assert_int_equal(d.connected, 0);
        assert_string_equal(d.user_id, before[i].user_id);
        assert_string_equal(d.gateway_id, before[i].gateway_id);
        assert_int_equal(d.connected_at_ms, before[i].connected_at_ms);
        assert_int_equal(d.last_active_ms, before[i].last_active_ms);
        if (before[i].connected) {
            /* Connected until the daemon's last commit, at its stop (on
             * the store's coarse clock: a tick or two early). */
            if (d.last_seen_ms + COARSE_MS < stopped || d.last_seen_ms > now)
                fail_msg("%s: last seen %llu, stopped at %llu", d.device_id,
                         (unsigned long long)d.last_seen_ms, (unsigned long long)stopped);
        } else {
            assert_int_equal(d.last_seen_ms, before[i].last_seen_ms);
        }
    }
    for (unsigned u = 0; u < B_USERS; u++) {
        want_user_t w;
        pres_rs_t *t = pres__gp_enter(p);
        const char *id = ubefore[u].id;
        int ui = pres__idx_user_find(&p->m, id, strlen(id), pres__hash(id, strlen(id), p->m.seed));
        assert_true(ui >= 0);
        assert_int_equal(user_want(&p->m, (uint32_t)ui, &w), 1);
        pres__gp_leave(t);
        assert_int_equal(w.connected, 0);
        assert_int_equal(w.policy, ubefore[u].policy);
        assert_int_equal(w.frozen, ubefore[u].frozen);
        assert_int_equal(w.n_allow, ubefore[u].n_allow);
        assert_int_equal(w.n_deny, ubefore[u].n_deny);
        for (uint32_t k = 0; k < w.n_allow; k++)
            assert_string_equal(w.allow[k], ubefore[u].allow[k]);
        for (uint32_t k = 0; k < w.n_deny; k++)
            assert_string_equal(w.deny[k], ubefore[u].deny[k]);
        if (!ubefore[u].connected)
            assert_int_equal(w.last_seen, ubefore[u].last_seen);
        else if (w.last_seen + COARSE_MS < stopped)
            fail_msg("user %s: last seen %llu, before the stop", id,
                     (unsigned long long)w.last_seen);
    }
    /* LMDB learns that the devices it had connected are offline. */
    wait_lmdb_matches(p, "after the rebuild");

    /* Gateways attach, devices connect again, new ones too. */
    assert_rc(pres_gateway_attach(p, "bg_1"), 0);
    assert_rc(pres_connect(p, "bu_0", "bd_0", "bg_1", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(p, "bu_new", "bd_new", "bg_1", LONG_TTL, NULL), 0);
    pres_device_info_t d;
    assert_rc(pres_device(p, "bd_0", &d), 0);
    assert_int_equal(d.connected, 1);
    assert_string_equal(d.gateway_id, "bg_1");
    assert_rc(pres_device(p, "bd_new", &d), 0);
    assert_int_equal(d.connected, 1);
    assert_int_equal(th_check_ok(&S, "after new connects"), 0);
    wait_lmdb_matches(p, "after new connects");
    pres_close(p);
}

static pres_user_view_t view(pres_t *p, const char *user, const char *viewer, int contact);

/* What LMDB holds of devices offline longer than --retain-ms stays there:
 * the rebuild leaves them out (they would be evicted at once), and corrects
 * one LMDB still had connected when its daemon's last commit is that old. */
static int write_old_devices(void *arg)
{
    const char *dir = arg;
    char err[512];
    pd_db_t *db = NULL;
    if (pd_db_open(&db, dir, S.name, 1 << 20, 1 << 20, err, sizeof err) != 0)
        return 10;
    uint64_t now = pres_now_ms();
    pres_db_dev_t d = { "rk_ou1", "rk_gw", now - 42 * DAY_MS, now - 41 * DAY_MS,
                        now - 41 * DAY_MS, 1 };
    pres_db_dev_t e = { "rk_ou2", "rk_gw", now - 51 * DAY_MS, now - 50 * DAY_MS,
                        now - 51 * DAY_MS, 0 };
    static pres_db_user_t u1, u2;
    u1.last_seen_ms = now - 41 * DAY_MS;
    u2.last_seen_ms = now - 50 * DAY_MS;
    if (pd_db_put_device(db, "rk_old1", &d) || pd_db_put_device(db, "rk_old2", &e) ||
        pd_db_put_user(db, "rk_ou1", &u1) || pd_db_put_user(db, "rk_ou2", &u2))
        return 11;
    /* As if the last daemon had died 40 days ago. */
    int rc = pd_db_commit(db, now - 40 * DAY_MS);
    pd_db_close(db);
    return rc == 0 ? 0 : 12;
}

struct lmdb_dev_arg { pres_db_ro_t *ro; const char *id; pres_db_dev_t d; };

static int lmdb_dev_offline(void *arg)
{
    struct lmdb_dev_arg *a = arg;
    return pres__db_ro_device(a->ro, a->id, &a->d) == 0 && !a->d.connected;
}

static void test_rebuild_leaves_old_devices(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    char dir[PATH_MAX];
    db_dir(p, dir, sizeof dir);
    assert_rc(pres_connect(p, "rk_u", "rk_d", "rk_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_disconnect(p, "rk_d"), 0);
    pres_close(p);
    assert_int_equal(th_daemon_stop(&S), 0);
    remove_region();
    pid_t w = th_fork(write_old_devices, dir);
    assert_int_equal(th_wait_child(w, WAIT_MS), 0);
    uint64_t alive = pres_now_ms() - 40 * DAY_MS;
    assert_int_equal(th_daemon_start(&S, SMALL), 0);

    p = open_h(PRES_RDONLY);
    pres_device_info_t d;
    assert_rc(pres_device(p, "rk_d", &d), 0);
    assert_rc(pres_device(p, "rk_old1", &d), -ENOENT);
    assert_rc(pres_device(p, "rk_old2", &d), -ENOENT);
    /* LMDB learns, with the first commit, that the one it had connected
     * was last seen at the daemon's last commit... */
    pres_db_ro_t *ro = NULL;
    assert_rc(pres__db_ro_open(dir, S.name, &ro), 0);
    struct lmdb_dev_arg a = { ro, "rk_old1", { "", "", 0, 0, 0, 0 } };
    assert_true(th_wait_until(lmdb_dev_offline, &a, WAIT_MS));
    if (a.d.last_seen_ms > alive + 60000 || a.d.last_seen_ms + 60000 < alive)
        fail_msg("rk_old1 last seen %llu, the last commit was at %llu",
                 (unsigned long long)a.d.last_seen_ms, (unsigned long long)alive);
    /* ... and so was its user, answered from LMDB; the other as it was. */
    pres_user_view_t v = view(p, "rk_ou1", NULL, 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_int_equal(v.last_seen_ms, a.d.last_seen_ms);
    v = view(p, "rk_ou2", "stranger", 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_true(v.last_seen_ms + 49 * DAY_MS < pres_now_ms());
    pres__db_ro_close(ro);
    assert_int_equal(th_check_ok(&S, "after a rebuild that left devices out"), 0);
    pres_close(p);
}

/* A rebuild that LMDB overfills is refused, not cut short. */
static void test_rebuild_refuses_overflow(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    for (unsigned i = 0; i < 100; i++) {
        char d[32];
        snprintf(d, sizeof d, "od_%u", i);
        assert_rc(pres_connect(p, "ou", d, "og", LONG_TTL, NULL), 0);
    }
    pres_close(p);
    assert_int_equal(th_daemon_stop(&S), 0);
    remove_region();
    char err[4096];
    const char *args[] = { "--foreground", "--name", S.name, "--db", S.db, "--capacity", "64",
                           NULL };
    assert_int_equal(th_daemon_run_expect_exit(args, WAIT_MS, err, sizeof err), 1);
    if (!strstr(err, "--capacity"))
        fail_msg("no word of the capacity: %s", err);
    /* Nothing was published. */
    pres_t *q = NULL;
    assert_rc(pres_open(&q, S.name, PRES_RDONLY), -ENOENT);
}

/* ------------------------------------------------------------------------ */
/* Users evicted from memory, answered from LMDB                             */

static pres_user_view_t view(pres_t *p, const char *user, const char *viewer, int contact)
{
    pres_viewer_t v = { viewer, contact };
    pres_user_view_t out;
    memset(&out, 0xff, sizeof out);
    int rc = pres__user_from_db(p, user, strlen(user), viewer ? &v : NULL, &out);
    if (rc != 0)
        fail_msg("pres__user_from_db(%s, viewer %s) = %d (%s)", user, viewer ? viewer : "-",
                 rc, pres_strerror(rc));
    return out;
}

struct in_mem_arg { pres_t *p; const char *id; };

static int user_left_memory(void *arg)
{
    struct in_mem_arg *a = arg;
    pres_rs_t *t = pres__gp_enter(a->p);
    int u = pres__idx_user_find(&a->p->m, a->id, strlen(a->id),
                                pres__hash(a->id, strlen(a->id), a->p->m.seed));
    pres__gp_leave(t);
    return u == -ENOENT;
}

/* Users written into LMDB directly, as a mirror that has known them for a
 * long time holds them: seen weeks ago. */
typedef struct {
    const char *id;
    uint64_t    age_ms;
    uint32_t    policy;
    const char *allow;
} old_user_t;

static const old_user_t OLD[] = {
    { "ou_month", 20 * DAY_MS, (uint32_t)(PRES_PV_SET | PRES_PV_APPROX | PRES_NOBODY |
                                          (PRES_NOBODY << 2)), "friend" },
    { "ou_long", 60 * DAY_MS, (uint32_t)(PRES_PV_SET | PRES_CONTACTS | (PRES_CONTACTS << 2)),
      NULL },
    { "ou_long_approx", 60 * DAY_MS, (uint32_t)(PRES_PV_SET | PRES_PV_APPROX | PRES_NOBODY |
                                                (PRES_NOBODY << 2)), NULL },
    { "ou_week", 5 * DAY_MS, 0, NULL },
    /* a viewer who hides their own last seen, reciprocally */
    { "ou_recip", 1 * DAY_MS, (uint32_t)(PRES_PV_SET | PRES_PV_RECIP | PRES_NOBODY |
                                         (PRES_EVERYONE << 2)), NULL },
};
#define N_OLD (sizeof OLD / sizeof OLD[0])

static int write_old_users(void *arg)
{
    const char *dir = arg;
    char err[512];
    pd_db_t *db = NULL;
    if (pd_db_open(&db, dir, S.name, 1 << 20, 1 << 20, err, sizeof err) != 0)
        return 10;
    static pres_db_user_t u;
    for (size_t k = 0; k < N_OLD; k++) {
        memset(&u, 0, sizeof u);
        u.last_seen_ms = pres_now_ms() - OLD[k].age_ms;
        u.policy = OLD[k].policy;
        if (OLD[k].allow) {
            u.n_allow = 1;
            snprintf(u.allow[0], sizeof u.allow[0], "%s", OLD[k].allow);
        }
        if (pd_db_put_user(db, OLD[k].id, &u) != 0)
            return 11;
    }
    int rc = pd_db_commit(db, pres_now_ms());
    pd_db_close(db);
    return rc == 0 ? 0 : 12;
}

static void test_evicted_users_from_lmdb(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", "--retain-ms", "100", NULL };
    start(args);
    pres_t *p = open_h(PRES_RDWR);
    char dir[PATH_MAX];
    db_dir(p, dir, sizeof dir);

    /* A user whose only device is evicted leaves memory; LMDB answers. */
    assert_rc(pres_connect(p, "eu_gone", "ed_gone", "eg", LONG_TTL, NULL), 0);
    assert_rc(pres_disconnect(p, "ed_gone"), 0);
    pres_device_info_t d;
    assert_rc(pres_device(p, "ed_gone", &d), 0);
    uint64_t seen = d.last_seen_ms;
    struct in_mem_arg ia = { p, "eu_gone" };
    assert_true(th_wait_until(user_left_memory, &ia, WAIT_MS));
    assert_rc(pres_device(p, "ed_gone", &d), -ENOENT);
    pres_user_view_t v = view(p, "eu_gone", NULL, 0);
    assert_int_equal(v.status, PRES_OFFLINE);
    assert_int_equal(v.devices, 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_int_equal(v.last_seen_ms, seen);
    v = view(p, "eu_gone", "someone", 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);

    /* Users LMDB has known for weeks, with policies. */
    pid_t w = th_fork(write_old_users, dir);
    assert_int_equal(th_wait_child(w, WAIT_MS), 0);
    uint64_t now = pres_now_ms();
    v = view(p, "ou_month", NULL, 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_true(v.last_seen_ms + 20 * DAY_MS <= now && v.last_seen_ms + 20 * DAY_MS + 60000 > now);
    v = view(p, "ou_month", "stranger", 0);          /* refused, approximate */
    assert_int_equal(v.seen, PRES_SEEN_MONTH);
    assert_int_equal(v.last_seen_ms, 0);
    assert_int_equal(v.status, PRES_OFFLINE);
    v = view(p, "ou_month", "friend", 0);            /* on the allow list */
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    v = view(p, "ou_long", "stranger", 0);           /* refused, not approximate */
    assert_int_equal(v.seen, PRES_SEEN_HIDDEN);
    v = view(p, "ou_long", "stranger", 1);           /* a contact */
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    v = view(p, "ou_long_approx", "stranger", 1);
    assert_int_equal(v.seen, PRES_SEEN_LONG_AGO);
    v = view(p, "ou_week", "stranger", 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_int_equal(v.status, PRES_OFFLINE);
    /* Reciprocity, the viewer's own policy from LMDB: a contact hiding
     * their own last seen gets nobody's. */
    v = view(p, "ou_long", "ou_recip", 1);
    assert_int_equal(v.seen, PRES_SEEN_HIDDEN);
    /* ... and from shared memory, for a viewer who is there. */
    assert_rc(pres_connect(p, "eu_recip", "ed_recip", "eg", LONG_TTL, NULL), 0);
    set_policy(p, "eu_recip", PRES_PV_RECIP | PRES_NOBODY, NULL, 0, NULL, 0);
    v = view(p, "ou_long", "eu_recip", 1);
    assert_int_equal(v.seen, PRES_SEEN_HIDDEN);
    v = view(p, "ou_long_approx", "eu_recip", 1);
    assert_int_equal(v.seen, PRES_SEEN_LONG_AGO);
    v = view(p, "ou_long", "eu_other", 1);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);

    /* Nobody ever heard of this one. */
    pres_user_view_t out;
    assert_rc(pres__user_from_db(p, "eu_never", 8, NULL, &out), -ENOENT);
    pres_close(p);
}

/* A reader that may not open the LMDB directory: -ENOENT, no crash.  As
 * root, permission bits do not bite: the reader runs as nobody (keeping
 * group 0, which the store's files are shared with). */
struct noaccess_arg { const char *name; };

static int reader_without_access(void *arg)
{
    struct noaccess_arg *a = arg;
    if (geteuid() == 0 && (setgroups(0, NULL) != 0 || setgid(0) != 0 || setuid(65534) != 0))
        return 10;
    pres_t *p = NULL;
    if (pres_open(&p, a->name, PRES_RDONLY) != 0)
        return 11;
    pres_user_view_t out;
    int rc = pres__user_from_db(p, "eu_gone", 7, NULL, &out);
    int rc2 = pres__user_from_db(p, "eu_never", 8, NULL, &out);
    pres_close(p);
    return rc == -ENOENT && rc2 == -ENOENT ? 0 : 12;
}

static void test_reader_without_access(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", "--retain-ms", "100", NULL };
    start(args);
    pres_t *p = open_h(PRES_RDWR);
    assert_rc(pres_connect(p, "eu_gone", "ed_gone", "eg", LONG_TTL, NULL), 0);
    assert_rc(pres_disconnect(p, "ed_gone"), 0);
    struct in_mem_arg ia = { p, "eu_gone" };
    assert_true(th_wait_until(user_left_memory, &ia, WAIT_MS));
    view(p, "eu_gone", NULL, 0);                  /* there, for who may look */
    pres_close(p);

    /* The store's directory (and the one above it) let group 0 in; the
     * mirror's lets nobody but its owner in (as root) or nobody (not). */
    char up[300];
    snprintf(up, sizeof up, "%s", S.dir);
    const char *parent = dirname(up);
    struct stat st_dir, st_parent;
    assert_int_equal(stat(S.dir, &st_dir), 0);
    assert_int_equal(stat(parent, &st_parent), 0);
    int root = geteuid() == 0;
    if (root) {
        assert_int_equal(chmod(S.dir, 0750), 0);
        assert_int_equal(chmod(parent, (st_parent.st_mode & 07777) | 0050), 0);
    }
    assert_int_equal(chmod(S.db, root ? 0700 : 0), 0);
    struct noaccess_arg a = { S.name };
    pid_t pid = th_fork(reader_without_access, &a);
    int rc = th_wait_child(pid, WAIT_MS);
    chmod(S.db, 0770);
    chmod(S.dir, st_dir.st_mode & 07777);
    chmod(parent, st_parent.st_mode & 07777);
    assert_int_equal(rc, 0);
}

/* ------------------------------------------------------------------------ */
/* What the daemon refuses, and a full map                                   */

static void expect_refused(const char *db, const char *name, const char *says)
{
    char err[4096];
    const char *args[] = { "--foreground", "--name", name, "--db", db, "--capacity", "4096",
                           NULL };
    int rc = th_daemon_run_expect_exit(args, WAIT_MS, err, sizeof err);
    if (rc != 1 || !strstr(err, says))
        fail_msg("presenced --db %s: exit %d, expected 1 saying '%s'; it said:\n%s", db, rc,
                 says, err);
}

static void test_bad_directories(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    assert_rc(pres_connect(p, "bu", "bd", "bg", LONG_TTL, NULL), 0);
    pres_close(p);
    assert_int_equal(th_daemon_stop(&S), 0);

    /* Damaged: a data.mdb of garbage, left as it was. */
    char bad[400], path[500];
    snprintf(bad, sizeof bad, "%s/damaged", S.dir);
    assert_int_equal(mkdir(bad, 0770), 0);
    snprintf(path, sizeof path, "%s/data.mdb", bad);
    static uint8_t junk[65536];
    uint64_t seed = 12345;
    for (size_t k = 0; k < sizeof junk; k++)
        junk[k] = (uint8_t)th_rand(&seed);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(junk, 1, sizeof junk, f), sizeof junk);
    fclose(f);
    expect_refused(bad, S.name, "damaged");
    static uint8_t back[sizeof junk];
    f = fopen(path, "r");
    assert_non_null(f);
    assert_int_equal(fread(back, 1, sizeof back, f), sizeof back);
    fclose(f);
    assert_memory_equal(junk, back, sizeof junk);

    /* Foreign: another store's mirror. */
    expect_refused(S.db, "some_other_store", "belongs to");
    /* A directory of other files, no data.mdb. */
    snprintf(bad, sizeof bad, "%s/others", S.dir);
    assert_int_equal(mkdir(bad, 0770), 0);
    snprintf(path, sizeof path, "%s/notes.txt", bad);
    f = fopen(path, "w");
    assert_non_null(f);
    fclose(f);
    expect_refused(bad, S.name, "not a libpresence database");
    /* Unwritable: a file where the directory should be. */
    snprintf(bad, sizeof bad, "%s/afile", S.dir);
    f = fopen(bad, "w");
    assert_non_null(f);
    fclose(f);
    expect_refused(bad, S.name, "not a directory");
    if (geteuid() != 0) {
        snprintf(bad, sizeof bad, "%s/readonly", S.dir);
        assert_int_equal(mkdir(bad, 0500), 0);
        expect_refused(bad, S.name, "not writable");
    }
    /* The store's own mirror still serves it. */
    assert_int_equal(th_daemon_start(&S, SMALL), 0);
}

struct lag_arg { pres_t *p; uint64_t above; };

static int lag_above(void *arg)
{
    struct lag_arg *a = arg;
    return stats(a->p).mirror_lag_ms > a->above;
}

static int lag_zero(void *arg)
{
    struct lag_arg *a = arg;
    return stats(a->p).mirror_lag_ms == 0;
}

static void test_full_map(void **state)
{
    (void)state;
    /* A map of 64 pages holds the meta and a few hundred records. */
    const char *args[] = { "--capacity", "4096", "--db-map-max", "262144", NULL };
    start(args);
    pres_t *p = open_h(PRES_RDWR);
    for (unsigned i = 0; i < 3000; i++) {
        char d[32], u[32];
        snprintf(d, sizeof d, "fd_%u", i);
        snprintf(u, sizeof u, "fu_%u", i);
        assert_rc(pres_connect(p, u, d, "fg", LONG_TTL, NULL), 0);
    }
    struct lag_arg la = { p, 1500 };
    assert_true(th_wait_until(lag_above, &la, WAIT_MS));
    /* The store keeps serving. */
    int st;
    assert_int_equal(waitpid(S.pid, &st, WNOHANG), 0);
    assert_rc(pres_connect(p, "fu_more", "fd_more", "fg", LONG_TTL, NULL), 0);
    pres_device_info_t d;
    assert_rc(pres_device(p, "fd_more", &d), 0);
    assert_int_equal(d.connected, 1);
    static char log[1 << 16];
    read_log(log, sizeof log);
    if (!getenv("PRES_TEST_VERBOSE") && !strstr(log, "is full"))
        fail_msg("no word of the full map in the log:\n%s", log);
    /* SIGTERM cannot flush into a full map: it says so, and exits 1. */
    assert_int_equal(th_daemon_stop(&S), 1);
    /* Without the cap, the next daemon adopts the store and writes it all. */
    assert_int_equal(th_daemon_start(&S, SMALL), 0);
    assert_true(th_wait_until(lag_zero, &la, WAIT_MS));
    wait_lmdb_matches(p, "once the map may grow");
    pres_close(p);
}

int main(void)
{
#define T(f) cmocka_unit_test_teardown(f, teardown)
    const struct CMUnitTest tests[] = {
        T(test_mirror_matches_region),
        T(test_notes_overflow),
        T(test_crash_during_storm),
        T(test_cold_rebuild),
        T(test_rebuild_leaves_old_devices),
        T(test_rebuild_refuses_overflow),
        T(test_evicted_users_from_lmdb),
        T(test_reader_without_access),
        T(test_bad_directories),
        T(test_full_map),
    };
#undef T
    return cmocka_run_group_tests_name("mirror", tests, NULL, NULL);
}
