/*
 * test_api.c - the public API of libpresence, call by call, against a real
 * presenced: every behaviour and error code that API.md promises for
 * handles, gateways, readers and counters.
 *
 * One store serves the group (a daemon start per test would dominate the
 * run time); every test uses its own ids, so tests do not see each other's
 * records, and counters are checked as differences.  Tests that need a
 * store of their own (a full one, a second name) start it themselves.
 */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "harness.h"
#include "presence.h"

/* Times from the library against our own clock: machines are noisy. */
#define TOL_MS    2000
/* Times the library derives from its monotonic clock at each read (expiry,
 * last interaction) move by a few ms between reads: its clock is
 * CLOCK_MONOTONIC_COARSE.  "Unchanged" means within this; tests that look
 * for a change make it several times larger. */
#define JITTER_MS 10
/* A TTL no test outlives, so that long-lived devices never expire while
 * another test counts connections. */
#define LONG_TTL  600000u
/* Deadline for something the library judges at read time, or the daemon
 * does within ~100 ms: generous, for loaded and sanitized runs. */
#define WAIT_MS   5000

static th_store_t S;
static pres_t *rw;   /* PRES_RDWR on S */
static pres_t *ro;   /* PRES_RDONLY on S */

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

#define assert_near(a, b, tol) do {                                          \
        int64_t a_ = (int64_t)(a), b_ = (int64_t)(b);                        \
        int64_t d_ = a_ > b_ ? a_ - b_ : b_ - a_;                            \
        if (d_ > (int64_t)(tol))                                             \
            fail_msg("%s = %lld and %s = %lld differ by %lld (> %lld)",      \
                     #a, (long long)a_, #b, (long long)b_, (long long)d_,    \
                     (long long)(tol));                                      \
    } while (0)

static pres_device_info_t dev(pres_t *p, const char *id)
{
    pres_device_info_t d;
    memset(&d, 0x5a, sizeof d);
    int rc = pres_device(p, id, &d);
    if (rc != 0)
        fail_msg("pres_device(%s) = %d (%s)", id, rc, pres_strerror(rc));
    return d;
}

static pres_stats_t stats(pres_t *p)
{
    pres_stats_t st;
    memset(&st, 0, sizeof st);
    assert_rc(pres_stats(p, &st), 0);
    return st;
}

struct dev_arg { pres_t *p; const char *id; };

static int dev_offline(void *arg)
{
    struct dev_arg *a = arg;
    pres_device_info_t d;
    return pres_device(a->p, a->id, &d) == 0 && !d.connected;
}

static void wait_offline(pres_t *p, const char *id)
{
    struct dev_arg a = { p, id };
    if (!th_wait_until(dev_offline, &a, WAIT_MS))
        fail_msg("device %s still connected after %d ms", id, WAIT_MS);
}

static int wall_reached(void *arg)
{
    return pres_now_ms() >= *(uint64_t *)arg;
}

/* Wait until the wall clock, as the library reads it, reaches t. */
static void wait_wall(uint64_t t)
{
    assert_true(th_wait_until(wall_reached, &t, WAIT_MS + 2000));
}

static size_t route_n(pres_t *p, const char *user)
{
    size_t n = (size_t)-1;
    assert_rc(pres_route(p, user, NULL, 0, &n), 0);
    return n;
}

/* A string of len copies of c. */
static char *rep(char *buf, char c, size_t len)
{
    memset(buf, c, len);
    buf[len] = '\0';
    return buf;
}

/* ------------------------------------------------------------------------ */
/* Group setup                                                               */

static int group_setup(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", NULL };
    if (th_store_start(&S, args) != 0)
        return -1;
    if (pres_open(&rw, S.name, PRES_RDWR) != 0 ||
        pres_open(&ro, S.name, PRES_RDONLY) != 0) {
        fprintf(stderr, "test_api: cannot open store %s\n", S.name);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    pres_close(ro);
    pres_close(rw);
    ro = rw = NULL;
    th_store_destroy(&S);
    return 0;
}

/* A test that SIGSTOPs the daemon resumes it even when it fails midway. */
static int resume_daemon(void **state)
{
    (void)state;
    if (S.pid > 0)
        kill(S.pid, SIGCONT);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Handles                                                                   */

static void test_open_missing_store(void **state)
{
    (void)state;
    pres_t *p = NULL;
    assert_rc(pres_open(&p, "nosuchstore", PRES_RDONLY), -ENOENT);
    assert_rc(pres_open(&p, "nosuchstore", PRES_RDWR), -ENOENT);
}

static void test_open_bad_names(void **state)
{
    (void)state;
    pres_t *p = NULL;
    char buf[256];

    assert_rc(pres_open(&p, "", PRES_RDONLY), -EINVAL);
    assert_rc(pres_open(&p, rep(buf, 'a', 64), PRES_RDONLY), -EINVAL);
    assert_rc(pres_open(&p, rep(buf, 'a', 200), PRES_RDONLY), -EINVAL);
    /* 63 characters is a good name: no store of that name, though. */
    assert_rc(pres_open(&p, rep(buf, 'a', 63), PRES_RDONLY), -ENOENT);
    assert_rc(pres_open(&p, "a.b-c_D9", PRES_RDONLY), -ENOENT);

    static const char *const bad[] = {
        ".hidden", ".", "..", "a/b", "../x", "/abs", "a b", "a*", "a:b",
        "tab\there", "nl\n", "caf\xc3\xa9", "a%b", "a\\b",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = pres_open(&p, bad[i], PRES_RDONLY);
        if (rc != -EINVAL)
            fail_msg("pres_open(\"%s\") = %d, expected -EINVAL", bad[i], rc);
    }

    /* Bad flags, on a name that exists. */
    assert_rc(pres_open(&p, S.name, 2), -EINVAL);
    assert_rc(pres_open(&p, S.name, -1), -EINVAL);
    assert_rc(pres_open(&p, S.name, 0x100), -EINVAL);
}

static void test_open_null_name(void **state)
{
    (void)state;
    pres_t *p = NULL;

    /* The harness set PRESENCE_NAME to our store. */
    assert_rc(pres_open(&p, NULL, PRES_RDWR), 0);
    assert_rc(pres_connect(p, "nn_u", "nn_d", "nn_gw", LONG_TTL, NULL), 0);
    pres_close(p);
    pres_device_info_t d = dev(ro, "nn_d");   /* the same store */
    assert_string_equal(d.user_id, "nn_u");

    /* Another name in the environment: that store, which is not there. */
    setenv("PRESENCE_NAME", "nn_elsewhere", 1);
    int rc = pres_open(&p, NULL, PRES_RDONLY);
    if (rc == 0)
        pres_close(p);
    assert_rc(rc, -ENOENT);

    /* No name anywhere: "default".  Absent at first, then served. */
    unsetenv("PRESENCE_NAME");
    rc = pres_open(&p, NULL, PRES_RDONLY);
    if (rc == 0)
        pres_close(p);
    assert_rc(rc, -ENOENT);

    th_store_t def = S;
    snprintf(def.name, sizeof def.name, "default");
    snprintf(def.db, sizeof def.db, "%s/db_default", S.dir);
    def.pid = 0;
    const char *small[] = { "--capacity", "4096", NULL };
    rc = th_daemon_start(&def, small);
    if (rc == 0) {
        pres_t *q = NULL;
        rc = pres_open(&q, NULL, PRES_RDWR);
        if (rc == 0) {
            /* Really "default", not our store under another name. */
            pres_device_info_t d2;
            rc = pres_device(q, "nn_d", &d2) == -ENOENT ? 0 : -1;
            pres_close(q);
        }
        th_daemon_stop(&def);
    }
    setenv("PRESENCE_NAME", S.name, 1);
    assert_int_equal(rc, 0);

    pres_close(NULL);   /* ignored */
}

static void check_strerror_named(int code, const char *name)
{
    const char *m = pres_strerror(-code);
    size_t len = strlen(name);
    if (!m)
        fail_msg("pres_strerror(-%s) is NULL", name);
    if (strncmp(m, name, len) != 0 ||
        (m[len] != ':' && m[len] != ' ' && m[len] != '\0'))
        fail_msg("pres_strerror(-%s) = \"%s\": not prefixed with %s",
                 name, m, name);
    if (strlen(m) < len + 3)
        fail_msg("pres_strerror(-%s) = \"%s\": no message", name, m);
}

static void test_strerror(void **state)
{
    (void)state;
#define NAMED(e) check_strerror_named(e, #e)
    /* The codes of API.md. */
    NAMED(EINVAL); NAMED(ENAMETOOLONG); NAMED(ENOENT); NAMED(EROFS);
    NAMED(ENOSPC); NAMED(EPROTO); NAMED(ESTALE); NAMED(EACCES);
    NAMED(E2BIG); NAMED(ETIMEDOUT); NAMED(EOVERFLOW); NAMED(ENOMEM);
    /* "or any negative errno" */
    NAMED(EBADF); NAMED(EAGAIN); NAMED(EPERM); NAMED(EEXIST); NAMED(EIO);
#undef NAMED
    /* Unknown values: a message all the same, never NULL or a crash. */
    static const int odd[] = { 0, 1, EINVAL, -4095, -99999, INT_MIN, INT_MAX };
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        const char *m = pres_strerror(odd[i]);
        if (!m || !*m)
            fail_msg("pres_strerror(%d) gives no message", odd[i]);
    }
    /* Distinct codes, distinct messages. */
    assert_string_not_equal(pres_strerror(-ENOENT), pres_strerror(-EINVAL));
}

static void test_now_ms(void **state)
{
    (void)state;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ours = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    assert_near(pres_now_ms(), ours, TOL_MS);
    assert_near(pres_now_ms() / 1000u, (uint64_t)time(NULL), 2);
}

/* ------------------------------------------------------------------------ */
/* Gateways                                                                  */

static void test_gateway_attach(void **state)
{
    (void)state;
    char buf[128];
    pres_t *p = NULL;
    /* A handle of its own: closing it ends its gateways (none have
     * devices here), and the group handle keeps no gateway bound. */
    assert_rc(pres_open(&p, S.name, PRES_RDWR), 0);
    assert_rc(pres_gateway_attach(p, "ga_gw"), 0);
    assert_rc(pres_gateway_attach(p, rep(buf, 'g', 63)), 0);
    assert_rc(pres_gateway_attach(p, rep(buf, 'g', 64)), -ENAMETOOLONG);
    assert_rc(pres_gateway_attach(p, ""), -EINVAL);
    assert_rc(pres_gateway_attach(p, NULL), -EINVAL);
    assert_rc(pres_gateway_attach(ro, "ga_gw2"), -EROFS);
    /* Attached or not, a gateway takes connections. */
    assert_rc(pres_connect(p, "ga_u", "ga_d", "ga_gw", LONG_TTL, NULL), 0);
    assert_true(dev(ro, "ga_d").connected);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Connect                                                                   */

static void test_connect_creates(void **state)
{
    (void)state;
    pres_stats_t s0 = stats(ro);
    uint64_t t0 = pres_now_ms();
    pres_ref_t ref = 0;
    assert_rc(pres_connect(rw, "cc_u", "cc_d", "cc_gw", 30000, &ref), 0);
    uint64_t t1 = pres_now_ms();

    pres_t *handles[] = { ro, rw };
    for (int h = 0; h < 2; h++) {
        pres_device_info_t d = dev(handles[h], "cc_d");
        assert_string_equal(d.device_id, "cc_d");
        assert_string_equal(d.user_id, "cc_u");
        assert_string_equal(d.gateway_id, "cc_gw");
        assert_int_equal(d.connected, 1);
        assert_int_equal(d.active, 1);
        assert_near(d.connected_at_ms, t0, TOL_MS);
        assert_near(d.expires_at_ms, t0 + 30000, TOL_MS);
        assert_near(d.last_seen_ms, pres_now_ms(), TOL_MS);
        assert_near(d.last_active_ms, t0, TOL_MS);
        assert_true(d.connected_at_ms <= t1 + 50);
        assert_true(d.last_active_ms <= d.last_seen_ms + 50);
    }

    /* API.md: only `connected` lags (the daemon's last pass); `devices`
     * and `users` are the records held, at once. */
    pres_stats_t s1 = stats(ro);
    assert_int_equal(s1.connects, s0.connects + 1);
    if (s1.devices != s0.devices + 1 || s1.users != s0.users + 1)
        fail_msg("right after a connect of a new device of a new user, "
                 "stats.devices went %llu -> %llu and stats.users %llu -> %llu "
                 "(expected +1 each, at once)",
                 (unsigned long long)s0.devices, (unsigned long long)s1.devices,
                 (unsigned long long)s0.users, (unsigned long long)s1.users);

    /* A second device of the same user creates no user. */
    assert_rc(pres_connect(rw, "cc_u", "cc_d2", "cc_gw", LONG_TTL, NULL), 0);
    pres_stats_t s2 = stats(ro);
    assert_int_equal(s2.connects, s0.connects + 2);
    assert_int_equal(s2.devices, s0.devices + 2);
    assert_int_equal(s2.users, s0.users + 1);

    /* A reconnect creates nothing. */
    assert_rc(pres_connect(rw, "cc_u", "cc_d2", "cc_gw", LONG_TTL, NULL), 0);
    pres_stats_t s3 = stats(ro);
    assert_int_equal(s3.connects, s0.connects + 3);
    assert_int_equal(s3.devices, s0.devices + 2);
    assert_int_equal(s3.users, s0.users + 1);
    assert_int_equal(route_n(ro, "cc_u"), 2);
}

static void test_connect_moves_user(void **state)
{
    (void)state;
    pres_ref_t r1 = 0, r2 = 0;
    assert_rc(pres_connect(rw, "mv_u1", "mv_d", "mv_gw1", LONG_TTL, &r1), 0);
    assert_int_equal(route_n(ro, "mv_u1"), 1);
    assert_rc(pres_connect(rw, "mv_u2", "mv_d", "mv_gw2", LONG_TTL, &r2), 0);

    pres_device_info_t d = dev(ro, "mv_d");
    assert_string_equal(d.user_id, "mv_u2");
    assert_string_equal(d.gateway_id, "mv_gw2");
    assert_int_equal(d.connected, 1);
    assert_int_equal(route_n(ro, "mv_u1"), 0);
    assert_int_equal(route_n(ro, "mv_u2"), 1);

    pres_device_info_t out[2];
    size_t n = 0;
    assert_rc(pres_route(ro, "mv_u2", out, 2, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(out[0].device_id, "mv_d");
    assert_string_equal(out[0].user_id, "mv_u2");

    /* The first connection's handle is no longer current. */
    assert_rc(pres_heartbeat_ref(rw, r1, LONG_TTL), -ESTALE);
    assert_rc(pres_heartbeat_ref(rw, r2, LONG_TTL), 0);

    /* A reconnect on the same gateway also replaces the handle. */
    pres_ref_t r3 = 0;
    assert_rc(pres_connect(rw, "mv_u2", "mv_d", "mv_gw2", LONG_TTL, &r3), 0);
    assert_rc(pres_heartbeat_ref(rw, r2, LONG_TTL), -ESTALE);
    assert_rc(pres_disconnect_ref(rw, r2), -ESTALE);
    assert_true(dev(ro, "mv_d").connected);
    assert_rc(pres_heartbeat_ref(rw, r3, LONG_TTL), 0);
}

static void test_connect_ttl_bounds(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "tb_u", "tb_d0", "tb_gw", 0, NULL), -EINVAL);
    assert_rc(pres_connect(rw, "tb_u", "tb_d0", "tb_gw", 86400001u, NULL), -EINVAL);
    assert_rc(pres_connect(rw, "tb_u", "tb_d0", "tb_gw", UINT32_MAX, NULL), -EINVAL);
    pres_device_info_t d;
    assert_rc(pres_device(ro, "tb_d0", &d), -ENOENT);   /* nothing created */

    uint64_t t0 = pres_now_ms();
    assert_rc(pres_connect(rw, "tb_u", "tb_dmax", "tb_gw", 86400000u, NULL), 0);
    d = dev(ro, "tb_dmax");
    assert_int_equal(d.connected, 1);
    assert_near(d.expires_at_ms, t0 + 86400000u, TOL_MS);

    assert_rc(pres_connect(rw, "tb_u", "tb_d1", "tb_gw", 1, NULL), 0);
    d = dev(ro, "tb_d1");
    assert_near(d.expires_at_ms, t0 + 1, TOL_MS);
    wait_offline(ro, "tb_d1");   /* a 1 ms TTL passes */

    /* The same bounds for heartbeats. */
    assert_rc(pres_heartbeat(rw, "tb_dmax", 0), -EINVAL);
    assert_rc(pres_heartbeat(rw, "tb_dmax", 86400001u), -EINVAL);
    assert_rc(pres_heartbeat(rw, "tb_dmax", 86400000u), 0);
    assert_true(dev(ro, "tb_dmax").connected);
}

static void test_connect_id_lengths(void **state)
{
    (void)state;
    char u63[64], d63[64], g63[64], long64[65];
    rep(u63, 'u', 63);
    rep(d63, 'd', 63);
    rep(g63, 'g', 63);
    rep(long64, 'x', 64);

    assert_rc(pres_connect(rw, u63, d63, g63, LONG_TTL, NULL), 0);
    pres_device_info_t d = dev(ro, d63);
    assert_string_equal(d.device_id, d63);
    assert_string_equal(d.user_id, u63);
    assert_string_equal(d.gateway_id, g63);
    assert_int_equal(route_n(ro, u63), 1);

    /* 64 bytes: too long, wherever an id goes. */
    assert_rc(pres_connect(rw, long64, "il_d", "il_gw", LONG_TTL, NULL), -ENAMETOOLONG);
    assert_rc(pres_connect(rw, "il_u", long64, "il_gw", LONG_TTL, NULL), -ENAMETOOLONG);
    assert_rc(pres_connect(rw, "il_u", "il_d", long64, LONG_TTL, NULL), -ENAMETOOLONG);
    assert_rc(pres_device(ro, "il_d", &d), -ENOENT);
    assert_rc(pres_device(ro, long64, &d), -ENAMETOOLONG);
    assert_rc(pres_heartbeat(rw, long64, 1000), -ENAMETOOLONG);
    assert_rc(pres_disconnect(rw, long64), -ENAMETOOLONG);
    assert_rc(pres_set_activity(rw, long64, PRES_ACTIVE), -ENAMETOOLONG);
    assert_rc(pres_report_stale(ro, long64), -ENAMETOOLONG);
    size_t n = 7;
    assert_rc(pres_route(ro, long64, NULL, 0, &n), -ENAMETOOLONG);

    /* Empty or NULL: invalid. */
    assert_rc(pres_connect(rw, "", "il_d", "il_gw", LONG_TTL, NULL), -EINVAL);
    assert_rc(pres_connect(rw, "il_u", "", "il_gw", LONG_TTL, NULL), -EINVAL);
    assert_rc(pres_connect(rw, "il_u", "il_d", "", LONG_TTL, NULL), -EINVAL);
    assert_rc(pres_connect(rw, NULL, "il_d", "il_gw", LONG_TTL, NULL), -EINVAL);
    assert_rc(pres_connect(rw, "il_u", NULL, "il_gw", LONG_TTL, NULL), -EINVAL);
    assert_rc(pres_connect(rw, "il_u", "il_d", NULL, LONG_TTL, NULL), -EINVAL);
    assert_rc(pres_device(ro, "il_d", &d), -ENOENT);
    assert_rc(pres_device(ro, "", &d), -EINVAL);
    assert_rc(pres_device(ro, NULL, &d), -EINVAL);
    assert_rc(pres_heartbeat(rw, "", 1000), -EINVAL);
    assert_rc(pres_heartbeat(rw, NULL, 1000), -EINVAL);
    assert_rc(pres_disconnect(rw, ""), -EINVAL);
    assert_rc(pres_disconnect(rw, NULL), -EINVAL);
    assert_rc(pres_set_activity(rw, "", PRES_ACTIVE), -EINVAL);
    assert_rc(pres_set_activity(rw, NULL, PRES_ACTIVE), -EINVAL);
    assert_rc(pres_report_stale(ro, ""), -EINVAL);
    assert_rc(pres_report_stale(ro, NULL), -EINVAL);
    assert_rc(pres_route(ro, "", NULL, 0, &n), -EINVAL);
    assert_rc(pres_route(ro, NULL, NULL, 0, &n), -EINVAL);

    /* Ids are bytes: anything but NUL, and distinct by every byte. */
    const char *odd = "il dev/\xff\x01\"\\:*";
    assert_rc(pres_connect(rw, "il u\xc3\xa9", odd, "il gw\t", LONG_TTL, NULL), 0);
    d = dev(ro, odd);
    assert_string_equal(d.device_id, odd);
    assert_string_equal(d.user_id, "il u\xc3\xa9");
    assert_string_equal(d.gateway_id, "il gw\t");
    /* Prefixes and near misses of an id are other ids. */
    char d62[64];
    rep(d62, 'd', 62);
    assert_rc(pres_device(ro, d62, &d), -ENOENT);
    assert_rc(pres_device(ro, "il dev/\xff\x01\"\\:", &d), -ENOENT);
}

static void test_rdonly_cannot_write(void **state)
{
    (void)state;
    pres_ref_t ref = 0;
    assert_rc(pres_connect(rw, "ro_u", "ro_d", "ro_gw", LONG_TTL, &ref), 0);
    pres_device_info_t before = dev(ro, "ro_d");
    pres_stats_t s0 = stats(ro);

    assert_rc(pres_gateway_attach(ro, "ro_gw"), -EROFS);
    assert_rc(pres_connect(ro, "ro_u", "ro_d", "ro_gw2", LONG_TTL, NULL), -EROFS);
    assert_rc(pres_connect(ro, "ro_u", "ro_new", "ro_gw", LONG_TTL, NULL), -EROFS);
    assert_rc(pres_heartbeat(ro, "ro_d", 1000), -EROFS);
    assert_rc(pres_heartbeat_ref(ro, ref, 1000), -EROFS);
    assert_rc(pres_disconnect(ro, "ro_d"), -EROFS);
    assert_rc(pres_disconnect_ref(ro, ref), -EROFS);
    assert_rc(pres_set_activity(ro, "ro_d", PRES_IDLE), -EROFS);

    pres_device_info_t after = dev(ro, "ro_d");
    assert_int_equal(after.connected, 1);
    assert_int_equal(after.active, 1);
    assert_string_equal(after.gateway_id, "ro_gw");
    assert_int_equal(after.connected_at_ms, before.connected_at_ms);
    assert_near(after.expires_at_ms, before.expires_at_ms, JITTER_MS);
    pres_device_info_t d;
    assert_rc(pres_device(ro, "ro_new", &d), -ENOENT);
    pres_stats_t s1 = stats(ro);
    assert_int_equal(s1.connects, s0.connects);
    assert_int_equal(s1.heartbeats, s0.heartbeats);
    assert_int_equal(s1.disconnects, s0.disconnects);
    /* The handle from the connect is still good for its owner. */
    assert_rc(pres_heartbeat_ref(rw, ref, LONG_TTL), 0);
}

/* ------------------------------------------------------------------------ */
/* Heartbeats                                                                */

static void test_heartbeat_extends_and_shortens(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "hb_u", "hb_d", "hb_gw", 2000, NULL), 0);
    pres_device_info_t d0 = dev(ro, "hb_d");
    pres_stats_t s0 = stats(ro);

    uint64_t t = pres_now_ms();
    assert_rc(pres_heartbeat(rw, "hb_d", 60000), 0);
    pres_device_info_t d1 = dev(ro, "hb_d");
    assert_near(d1.expires_at_ms, t + 60000, TOL_MS);
    assert_true(d1.expires_at_ms > d0.expires_at_ms + 50000);
    /* An on-time heartbeat is not a new connection nor an interaction. */
    assert_int_equal(d1.connected_at_ms, d0.connected_at_ms);
    assert_near(d1.last_active_ms, d0.last_active_ms, JITTER_MS);
    assert_string_equal(d1.gateway_id, "hb_gw");

    t = pres_now_ms();
    assert_rc(pres_heartbeat(rw, "hb_d", 3000), 0);   /* shorter: shortens */
    pres_device_info_t d2 = dev(ro, "hb_d");
    assert_near(d2.expires_at_ms, t + 3000, TOL_MS);
    assert_true(d2.expires_at_ms + 50000 < d1.expires_at_ms);
    assert_int_equal(d2.connected, 1);

    pres_stats_t s1 = stats(ro);
    assert_int_equal(s1.heartbeats, s0.heartbeats + 2);
    assert_int_equal(s1.late_heartbeats, s0.late_heartbeats);
    assert_int_equal(s1.connects, s0.connects);
    assert_rc(pres_heartbeat(rw, "hb_d", LONG_TTL), 0);
}

/* Expire a device (short TTL) and wait until the daemon has counted it. */
struct exp_arg { pres_t *p; uint64_t want; };
static int expirations_reach(void *arg)
{
    struct exp_arg *a = arg;
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.expirations >= a->want;
}

static void test_heartbeat_late_revives(void **state)
{
    (void)state;
    pres_stats_t s0 = stats(ro);
    assert_rc(pres_connect(rw, "lh_u", "lh_d", "lh_gw", 300, NULL), 0);
    assert_rc(pres_set_activity(rw, "lh_d", PRES_IDLE), 0);
    pres_device_info_t d0 = dev(ro, "lh_d");
    assert_int_equal(d0.active, 0);
    wait_offline(ro, "lh_d");
    /* And the daemon has published the expiry: a reaped device is still
     * one that was not disconnected. */
    struct exp_arg ea = { ro, s0.expirations + 1 };
    assert_true(th_wait_until(expirations_reach, &ea, WAIT_MS));
    wait_wall(d0.connected_at_ms + 400);   /* so a new start time shows */

    uint64_t t = pres_now_ms();
    assert_rc(pres_heartbeat(rw, "lh_d", LONG_TTL), 0);
    pres_device_info_t d1 = dev(ro, "lh_d");
    assert_int_equal(d1.connected, 1);
    assert_string_equal(d1.gateway_id, "lh_gw");
    assert_string_equal(d1.user_id, "lh_u");
    assert_true(d1.connected_at_ms > d0.connected_at_ms);
    assert_near(d1.connected_at_ms, t, TOL_MS);
    assert_near(d1.expires_at_ms, t + LONG_TTL, TOL_MS);
    /* Not an interaction: still idle, last interaction unchanged. */
    assert_int_equal(d1.active, 0);
    assert_near(d1.last_active_ms, d0.last_active_ms, JITTER_MS);
    assert_int_equal(route_n(ro, "lh_u"), 1);

    pres_stats_t s1 = stats(ro);
    assert_int_equal(s1.late_heartbeats, s0.late_heartbeats + 1);
    assert_int_equal(s1.connects, s0.connects + 1);   /* only ours */
}

static void test_heartbeat_ref_late_revives(void **state)
{
    (void)state;
    pres_stats_t s0 = stats(ro);
    pres_ref_t ref = 0;
    assert_rc(pres_connect(rw, "lr_u", "lr_d", "lr_gw", 50, &ref), 0);
    pres_device_info_t d0 = dev(ro, "lr_d");
    wait_offline(ro, "lr_d");
    wait_wall(d0.connected_at_ms + 100);
    assert_rc(pres_heartbeat_ref(rw, ref, LONG_TTL), 0);
    pres_device_info_t d1 = dev(ro, "lr_d");
    assert_int_equal(d1.connected, 1);
    assert_string_equal(d1.gateway_id, "lr_gw");
    assert_true(d1.connected_at_ms > d0.connected_at_ms);
    assert_int_equal(stats(ro).late_heartbeats, s0.late_heartbeats + 1);
    /* The revival keeps the handle current. */
    assert_rc(pres_heartbeat_ref(rw, ref, LONG_TTL), 0);
}

static void test_heartbeat_unknown_or_disconnected(void **state)
{
    (void)state;
    assert_rc(pres_heartbeat(rw, "hu_nosuch", 1000), -ENOENT);

    pres_ref_t ref = 0;
    assert_rc(pres_connect(rw, "hu_u", "hu_d", "hu_gw", LONG_TTL, &ref), 0);
    assert_rc(pres_disconnect(rw, "hu_d"), 0);
    pres_stats_t s0 = stats(ro);
    assert_rc(pres_heartbeat(rw, "hu_d", 1000), -ENOENT);
    int rc = pres_heartbeat_ref(rw, ref, 1000);
    if (rc != -ENOENT && rc != -ESTALE)
        fail_msg("heartbeat_ref on a disconnected device = %d", rc);
    pres_device_info_t d = dev(ro, "hu_d");
    assert_int_equal(d.connected, 0);   /* not revived */
    pres_stats_t s1 = stats(ro);
    assert_int_equal(s1.late_heartbeats, s0.late_heartbeats);
    assert_int_equal(route_n(ro, "hu_u"), 0);
}

static void test_heartbeat_ref(void **state)
{
    (void)state;
    pres_ref_t ref = 0;
    assert_rc(pres_connect(rw, "hr_u", "hr_d", "hr_gw", 2000, &ref), 0);
    pres_stats_t s0 = stats(ro);
    uint64_t t = pres_now_ms();
    assert_rc(pres_heartbeat_ref(rw, ref, 60000), 0);
    pres_device_info_t d = dev(ro, "hr_d");
    assert_near(d.expires_at_ms, t + 60000, TOL_MS);
    assert_rc(pres_heartbeat_ref(rw, ref, 0), -EINVAL);
    assert_rc(pres_heartbeat_ref(rw, ref, 86400001u), -EINVAL);
    assert_int_equal(stats(ro).heartbeats, s0.heartbeats + 1);

    /* Reconnected elsewhere: the old handle is stale and ends nothing. */
    pres_ref_t ref2 = 0;
    assert_rc(pres_connect(rw, "hr_u", "hr_d", "hr_gw2", LONG_TTL, &ref2), 0);
    assert_rc(pres_heartbeat_ref(rw, ref, 5), -ESTALE);
    d = dev(ro, "hr_d");
    assert_true(d.expires_at_ms > pres_now_ms() + 60000);   /* not shortened */
    assert_rc(pres_heartbeat_ref(rw, ref2, LONG_TTL), 0);

    /* Made-up handles: refused, never a crash or a write elsewhere. */
    static const uint64_t bogus[] = {
        0, UINT64_MAX, 0xdeadbeefdeadbeefull, 0x7fffffffffffffffull,
        1ull << 63, 0x00000000ffffffffull, 0xffffffff00000000ull,
    };
    for (size_t i = 0; i < sizeof bogus / sizeof bogus[0]; i++) {
        if (bogus[i] == ref2)
            continue;
        int rc = pres_heartbeat_ref(rw, bogus[i], 1000);
        if (rc != -ESTALE && rc != -EINVAL)
            fail_msg("pres_heartbeat_ref(0x%llx) = %d", (unsigned long long)bogus[i], rc);
        rc = pres_disconnect_ref(rw, bogus[i]);
        if (rc != -ESTALE && rc != -EINVAL)
            fail_msg("pres_disconnect_ref(0x%llx) = %d", (unsigned long long)bogus[i], rc);
    }
    assert_true(dev(ro, "hr_d").connected);
}

/* ------------------------------------------------------------------------ */
/* Disconnect                                                                */

static void test_disconnect(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "dc_u", "dc_d", "dc_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, "dc_u", "dc_d2", "dc_gw", LONG_TTL, NULL), 0);
    pres_stats_t s0 = stats(ro);
    uint64_t t = pres_now_ms();
    assert_rc(pres_disconnect(rw, "dc_d"), 0);
    pres_device_info_t d = dev(ro, "dc_d");
    assert_int_equal(d.connected, 0);
    assert_int_equal(d.active, 0);
    assert_near(d.last_seen_ms, t, TOL_MS);
    assert_string_equal(d.gateway_id, "dc_gw");   /* last gateway, offline too */
    assert_string_equal(d.user_id, "dc_u");
    assert_int_equal(stats(ro).disconnects, s0.disconnects + 1);
    assert_int_equal(route_n(ro, "dc_u"), 1);

    /* Offline, last seen is the disconnect, not the time of the call. */
    wait_wall(d.last_seen_ms + 30);
    assert_int_equal(dev(ro, "dc_d").last_seen_ms, d.last_seen_ms);

    assert_rc(pres_disconnect(rw, "dc_nosuch"), -ENOENT);
    /* A disconnected device connects again. */
    assert_rc(pres_connect(rw, "dc_u", "dc_d", "dc_gw3", LONG_TTL, NULL), 0);
    d = dev(ro, "dc_d");
    assert_int_equal(d.connected, 1);
    assert_string_equal(d.gateway_id, "dc_gw3");
    assert_int_equal(route_n(ro, "dc_u"), 2);
}

static void test_disconnect_expired_keeps_last_seen(void **state)
{
    (void)state;
    /* Connected at c, heartbeated at h with a short TTL, expired at h+150;
     * a disconnect long after leaves last seen at h. */
    assert_rc(pres_connect(rw, "de_u", "de_d", "de_gw", LONG_TTL, NULL), 0);
    pres_device_info_t d0 = dev(ro, "de_d");
    wait_wall(d0.connected_at_ms + 300);
    uint64_t h = pres_now_ms();
    assert_rc(pres_heartbeat(rw, "de_d", 150), 0);
    wait_offline(ro, "de_d");
    pres_device_info_t d1 = dev(ro, "de_d");
    assert_near(d1.last_seen_ms, h, 100);
    assert_near(d1.last_seen_ms, d1.expires_at_ms - 150, 100);
    assert_true(d1.last_seen_ms >= d0.connected_at_ms + 200);

    wait_wall(d1.expires_at_ms + 500);
    uint64_t t = pres_now_ms();
    assert_rc(pres_disconnect(rw, "de_d"), 0);
    pres_device_info_t d2 = dev(ro, "de_d");
    assert_int_equal(d2.connected, 0);
    assert_near(d2.last_seen_ms, d1.last_seen_ms, 20);
    assert_true(d2.last_seen_ms + 400 < t);
    /* Once disconnected, no heartbeat revives it. */
    assert_rc(pres_heartbeat(rw, "de_d", 1000), -ENOENT);
}

static void test_disconnect_ref(void **state)
{
    (void)state;
    pres_ref_t ra = 0, rb = 0;
    assert_rc(pres_connect(rw, "dr_u", "dr_d", "dr_gwA", LONG_TTL, &ra), 0);
    assert_rc(pres_connect(rw, "dr_u", "dr_d", "dr_gwB", LONG_TTL, &rb), 0);
    pres_stats_t s0 = stats(ro);

    /* gwA closes its old socket: stale, and nothing ends. */
    assert_rc(pres_disconnect_ref(rw, ra), -ESTALE);
    pres_device_info_t d = dev(ro, "dr_d");
    assert_int_equal(d.connected, 1);
    assert_string_equal(d.gateway_id, "dr_gwB");
    assert_int_equal(route_n(ro, "dr_u"), 1);
    assert_int_equal(stats(ro).disconnects, s0.disconnects);

    uint64_t t = pres_now_ms();
    assert_rc(pres_disconnect_ref(rw, rb), 0);
    d = dev(ro, "dr_d");
    assert_int_equal(d.connected, 0);
    assert_near(d.last_seen_ms, t, TOL_MS);
    assert_int_equal(stats(ro).disconnects, s0.disconnects + 1);
    assert_int_equal(route_n(ro, "dr_u"), 0);
}

/* ------------------------------------------------------------------------ */
/* Activity                                                                  */

static void test_set_activity(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "sa_u", "sa_d", "sa_gw", LONG_TTL, NULL), 0);
    pres_device_info_t d0 = dev(ro, "sa_d");
    assert_int_equal(d0.active, 1);

    assert_rc(pres_set_activity(rw, "sa_d", PRES_IDLE), 0);
    pres_device_info_t d1 = dev(ro, "sa_d");
    assert_int_equal(d1.active, 0);
    assert_int_equal(d1.connected, 1);
    /* Idle devices are still routed to, and show as idle there. */
    pres_device_info_t out[1];
    size_t n = 0;
    assert_rc(pres_route(ro, "sa_u", out, 1, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(out[0].active, 0);

    /* A heartbeat is not an interaction: still idle. */
    assert_rc(pres_heartbeat(rw, "sa_d", LONG_TTL), 0);
    assert_int_equal(dev(ro, "sa_d").active, 0);

    wait_wall(d0.last_active_ms + 100);
    uint64_t t = pres_now_ms();
    assert_rc(pres_set_activity(rw, "sa_d", PRES_ACTIVE), 0);
    pres_device_info_t d2 = dev(ro, "sa_d");
    assert_int_equal(d2.active, 1);
    assert_true(d2.last_active_ms > d0.last_active_ms + 50);
    assert_near(d2.last_active_ms, t, TOL_MS);

    /* ... nor does a heartbeat move the last interaction. */
    wait_wall(d2.last_active_ms + 100);
    assert_rc(pres_heartbeat(rw, "sa_d", LONG_TTL), 0);
    pres_device_info_t d3 = dev(ro, "sa_d");
    assert_near(d3.last_active_ms, d2.last_active_ms, JITTER_MS);
    assert_int_equal(d3.active, 1);

    /* Bad enum values. */
    assert_rc(pres_set_activity(rw, "sa_d", (enum pres_activity)0), -EINVAL);
    assert_rc(pres_set_activity(rw, "sa_d", (enum pres_activity)3), -EINVAL);
    assert_rc(pres_set_activity(rw, "sa_d", (enum pres_activity)-1), -EINVAL);
    assert_int_equal(dev(ro, "sa_d").active, 1);

    /* Not connected: unknown, disconnected, or expired. */
    assert_rc(pres_set_activity(rw, "sa_nosuch", PRES_ACTIVE), -ENOENT);
    assert_rc(pres_disconnect(rw, "sa_d"), 0);
    assert_rc(pres_set_activity(rw, "sa_d", PRES_ACTIVE), -ENOENT);
    assert_rc(pres_set_activity(rw, "sa_d", PRES_IDLE), -ENOENT);
    assert_rc(pres_connect(rw, "sa_u", "sa_e", "sa_gw", 30, NULL), 0);
    wait_offline(ro, "sa_e");
    assert_rc(pres_set_activity(rw, "sa_e", PRES_ACTIVE), -ENOENT);
    assert_int_equal(dev(ro, "sa_e").active, 0);   /* active needs connected */

    /* A new connect counts as an interaction and makes it active. */
    assert_rc(pres_connect(rw, "sa_u", "sa_f", "sa_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_set_activity(rw, "sa_f", PRES_IDLE), 0);
    assert_rc(pres_connect(rw, "sa_u", "sa_f", "sa_gw", LONG_TTL, NULL), 0);
    assert_int_equal(dev(ro, "sa_f").active, 1);
}

/* ------------------------------------------------------------------------ */
/* Readers                                                                   */

static void test_device_unknown(void **state)
{
    (void)state;
    pres_device_info_t d;
    assert_rc(pres_device(ro, "du_nosuch", &d), -ENOENT);
    assert_rc(pres_device(rw, "du_nosuch", &d), -ENOENT);
}

static void test_route(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "rt_u", "rt_d1", "rt_gw1", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, "rt_u", "rt_d2", "rt_gw2", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, "rt_u", "rt_d3", "rt_gw1", LONG_TTL, NULL), 0);
    assert_rc(pres_disconnect(rw, "rt_d3"), 0);
    assert_rc(pres_connect(rw, "rt_u", "rt_d4", "rt_gw1", 30, NULL), 0);
    assert_rc(pres_connect(rw, "rt_other", "rt_o1", "rt_gw1", LONG_TTL, NULL), 0);
    wait_offline(ro, "rt_d4");

    pres_device_info_t out[4];
    size_t n = 99;
    assert_rc(pres_route(ro, "rt_u", out, 4, &n), 0);
    assert_int_equal(n, 2);
    int seen1 = 0, seen2 = 0;
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(out[i].user_id, "rt_u");
        assert_int_equal(out[i].connected, 1);
        if (strcmp(out[i].device_id, "rt_d1") == 0) {
            seen1++;
            assert_string_equal(out[i].gateway_id, "rt_gw1");
        } else if (strcmp(out[i].device_id, "rt_d2") == 0) {
            seen2++;
            assert_string_equal(out[i].gateway_id, "rt_gw2");
        } else {
            fail_msg("route lists %s", out[i].device_id);
        }
    }
    assert_int_equal(seen1, 1);
    assert_int_equal(seen2, 1);

    /* cap smaller than the count: *n says all, only cap entries written. */
    memset(out, 0xab, sizeof out);
    n = 0;
    assert_rc(pres_route(rw, "rt_u", out, 1, &n), 0);
    assert_int_equal(n, 2);
    assert_true(strcmp(out[0].device_id, "rt_d1") == 0 ||
                strcmp(out[0].device_id, "rt_d2") == 0);
    unsigned char *tail = (unsigned char *)&out[1];
    for (size_t i = 0; i < sizeof out - sizeof out[0]; i++)
        if (tail[i] != 0xab)
            fail_msg("pres_route wrote past cap (byte %zu)", i);
    n = 0;
    assert_rc(pres_route(ro, "rt_u", NULL, 0, &n), 0);
    assert_int_equal(n, 2);

    /* Unknown user; a user with none connected. */
    n = 5;
    assert_rc(pres_route(ro, "rt_nosuch", out, 4, &n), 0);
    assert_int_equal(n, 0);
    assert_rc(pres_disconnect(rw, "rt_o1"), 0);
    n = 5;
    assert_rc(pres_route(ro, "rt_other", out, 4, &n), 0);
    assert_int_equal(n, 0);
}

static void test_report_stale(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "rs_u", "rs_d", "rs_gw", LONG_TTL, NULL), 0);
    pres_stats_t s0 = stats(ro);
    assert_rc(pres_report_stale(ro, "rs_d"), 0);   /* read-only handles may */
    assert_int_equal(stats(ro).stale_reports, s0.stale_reports + 1);
    assert_rc(pres_report_stale(rw, "rs_d"), 0);
    assert_int_equal(stats(ro).stale_reports, s0.stale_reports + 2);
    assert_rc(pres_report_stale(ro, "rs_nosuch"), -ENOENT);
    /* A report is a hint: the device stays as it was. */
    pres_device_info_t d = dev(ro, "rs_d");
    assert_int_equal(d.connected, 1);
}

struct du_arg { pres_t *p; uint64_t devices, users; };

static int du_reach(void *arg)
{
    struct du_arg *a = arg;
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.devices >= a->devices &&
           st.users >= a->users;
}

static void wait_devices_users(struct du_arg *a)
{
    if (!th_wait_until(du_reach, a, WAIT_MS)) {
        pres_stats_t st = stats(a->p);
        fail_msg("stats.devices %llu, users %llu: expected at least %llu, %llu",
                 (unsigned long long)st.devices, (unsigned long long)st.users,
                 (unsigned long long)a->devices, (unsigned long long)a->users);
    }
}

struct conn_arg { pres_t *p; uint64_t want; };

static int connected_is(void *arg)
{
    struct conn_arg *a = arg;
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.connected == a->want;
}

static void wait_connected(struct conn_arg *c)
{
    if (!th_wait_until(connected_is, c, WAIT_MS))
        fail_msg("stats.connected is %llu, expected %llu after %d ms",
                 (unsigned long long)stats(c->p).connected,
                 (unsigned long long)c->want, WAIT_MS);
}

static void test_stats(void **state)
{
    (void)state;
    pres_stats_t s0 = stats(ro);
    assert_true(s0.capacity >= 4096);
    assert_true(s0.devices <= s0.capacity);
    assert_true(s0.connected <= s0.devices);

    assert_rc(pres_connect(rw, "st_u1", "st_d1", "st_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, "st_u1", "st_d2", "st_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, "st_u2", "st_d3", "st_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_heartbeat(rw, "st_d1", LONG_TTL), 0);
    assert_rc(pres_heartbeat(rw, "st_d2", LONG_TTL), 0);
    assert_rc(pres_heartbeat(rw, "st_d3", LONG_TTL), 0);
    pres_stats_t s1 = stats(rw);
    assert_int_equal(s1.capacity, s0.capacity);
    assert_int_equal(s1.connects, s0.connects + 3);
    assert_int_equal(s1.heartbeats, s0.heartbeats + 3);
    /* devices and users: at once per API.md (test_connect_creates holds
     * that); here only that they move, whenever the daemon counts. */
    struct du_arg du = { ro, s0.devices + 3, s0.users + 2 };
    wait_devices_users(&du);

    assert_rc(pres_disconnect(rw, "st_d1"), 0);
    assert_rc(pres_disconnect(rw, "st_d2"), 0);
    pres_stats_t s2 = stats(ro);
    assert_int_equal(s2.disconnects, s1.disconnects + 2);
    assert_true(s2.devices >= s0.devices + 3);   /* still held, offline */
    /* stats.connected is checked in test_full_store, where the number of
     * connected devices is known. */
}

/* Liveness is judged at read time: with the daemon stopped, a TTL still
 * passes for every reader, and writers keep working. */
static void test_liveness_without_daemon(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "lv_u", "lv_d", "lv_gw", 50, NULL), 0);
    assert_rc(pres_connect(rw, "lv_u", "lv_keep", "lv_gw", LONG_TTL, NULL), 0);
    assert_int_equal(kill(S.pid, SIGSTOP), 0);

    wait_offline(ro, "lv_d");
    wait_offline(rw, "lv_d");
    pres_device_info_t d = dev(ro, "lv_d");
    assert_int_equal(d.active, 0);
    assert_true(d.last_seen_ms < pres_now_ms());
    pres_device_info_t out[2];
    size_t n = 0;
    assert_rc(pres_route(ro, "lv_u", out, 2, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(out[0].device_id, "lv_keep");

    /* Writes go on without the daemon. */
    assert_rc(pres_connect(rw, "lv_u", "lv_new", "lv_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_heartbeat(rw, "lv_keep", LONG_TTL), 0);
    assert_rc(pres_heartbeat(rw, "lv_d", LONG_TTL), 0);   /* late: revived */
    assert_true(dev(ro, "lv_d").connected);
    assert_rc(pres_disconnect(rw, "lv_new"), 0);
    assert_int_equal(route_n(ro, "lv_u"), 2);

    assert_int_equal(kill(S.pid, SIGCONT), 0);
}

/* ------------------------------------------------------------------------ */
/* A full store                                                              */

static th_store_t F;   /* the full store; its teardown removes it */

static int destroy_full(void **state)
{
    (void)state;
    if (F.dir[0])
        th_store_destroy(&F);
    setenv("PRESENCE_SHM_DIR", S.dir, 1);
    setenv("PRESENCE_NAME", S.name, 1);
    return 0;
}

static void test_full_store(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "64", NULL };
    assert_int_equal(th_store_start(&F, args), 0);
    pres_t *p = NULL, *r = NULL;
    int ok = pres_open(&p, F.name, PRES_RDWR) == 0 &&
             pres_open(&r, F.name, PRES_RDONLY) == 0;
    setenv("PRESENCE_SHM_DIR", S.dir, 1);   /* back to the group's store */
    setenv("PRESENCE_NAME", S.name, 1);
    if (!ok)
        fail_msg("cannot open the store");

    pres_stats_t st;
    assert_rc(pres_stats(r, &st), 0);
    uint64_t cap = st.capacity;
    assert_true(cap >= 64);
    /* Rounding up is allowed; more than a few times over is not a
     * capacity of 64 any more, and would make this test slow. */
    assert_true(cap <= 65536);

    char dev_id[32], user_id[32];
    uint64_t held = 0;
    int rc = 0;
    for (uint64_t i = 0; i < 2 * cap + 64; i++) {
        snprintf(dev_id, sizeof dev_id, "fs_d%llu", (unsigned long long)i);
        snprintf(user_id, sizeof user_id, "fs_u%llu", (unsigned long long)(i % 8));
        rc = pres_connect(p, user_id, dev_id, "fs_gw", LONG_TTL, NULL);
        if (rc != 0)
            break;
        held++;
    }
    assert_rc(rc, -ENOSPC);
    assert_true(held >= 64);
    assert_true(held <= cap);
    /* Full stays full. */
    assert_rc(pres_connect(p, "fs_u0", "fs_extra", "fs_gw", LONG_TTL, NULL), -ENOSPC);
    pres_device_info_t d;
    assert_rc(pres_device(r, "fs_extra", &d), -ENOENT);

    /* Everything held keeps working. */
    for (uint64_t i = 0; i < held; i++) {
        snprintf(dev_id, sizeof dev_id, "fs_d%llu", (unsigned long long)i);
        rc = pres_heartbeat(p, dev_id, LONG_TTL);
        if (rc != 0)
            fail_msg("heartbeat %s in a full store: %d", dev_id, rc);
        rc = pres_device(r, dev_id, &d);
        if (rc != 0 || !d.connected)
            fail_msg("read %s in a full store: %d", dev_id, rc);
    }
    size_t n = 0;
    assert_rc(pres_route(r, "fs_u0", NULL, 0, &n), 0);
    assert_int_equal(n, (held + 7) / 8);
    /* A reconnect needs no new record; disconnect and activity work. */
    assert_rc(pres_connect(p, "fs_u0", "fs_d0", "fs_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_set_activity(p, "fs_d0", PRES_IDLE), 0);
    assert_rc(pres_disconnect(p, "fs_d1"), 0);
    assert_rc(pres_stats(r, &st), 0);
    assert_int_equal(st.connects, held + 1);
    struct du_arg du = { r, held, 8 };
    wait_devices_users(&du);
    assert_rc(pres_stats(r, &st), 0);
    assert_int_equal(st.devices, held);
    assert_int_equal(st.users, 8);
    /* The daemon's count of connected devices follows within its pass. */
    struct conn_arg c = { r, held - 1 };
    wait_connected(&c);
    assert_rc(pres_disconnect(p, "fs_d2"), 0);
    c.want = held - 2;
    wait_connected(&c);

    pres_close(r);
    pres_close(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_missing_store),
        cmocka_unit_test(test_open_bad_names),
        cmocka_unit_test(test_open_null_name),
        cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_now_ms),
        cmocka_unit_test(test_gateway_attach),
        cmocka_unit_test(test_connect_creates),
        cmocka_unit_test(test_connect_moves_user),
        cmocka_unit_test(test_connect_ttl_bounds),
        cmocka_unit_test(test_connect_id_lengths),
        cmocka_unit_test(test_rdonly_cannot_write),
        cmocka_unit_test(test_heartbeat_extends_and_shortens),
        cmocka_unit_test(test_heartbeat_late_revives),
        cmocka_unit_test(test_heartbeat_ref_late_revives),
        cmocka_unit_test(test_heartbeat_unknown_or_disconnected),
        cmocka_unit_test(test_heartbeat_ref),
        cmocka_unit_test(test_disconnect),
        cmocka_unit_test(test_disconnect_expired_keeps_last_seen),
        cmocka_unit_test(test_disconnect_ref),
        cmocka_unit_test(test_set_activity),
        cmocka_unit_test(test_device_unknown),
        cmocka_unit_test(test_route),
        cmocka_unit_test(test_report_stale),
        cmocka_unit_test(test_stats),
        cmocka_unit_test_teardown(test_liveness_without_daemon, resume_daemon),
        cmocka_unit_test_teardown(test_full_store, destroy_full),
    };
    return cmocka_run_group_tests_name("api", tests, group_setup, group_teardown);
}
