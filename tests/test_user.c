/*
 * test_user.c - what a person sees of a user, end to end through a real
 * presenced (API.md "What a person sees of a user"): the aggregate of a
 * user's devices and its timers (idle after, offline grace), the privacy
 * rules as several viewers see them, policies replaced and reclaimed,
 * typing, and every error code these calls promise.
 *
 * The pure privacy decision is tested over every combination in
 * test_privacy.c; here the store's side is: that the policy a viewer is
 * judged against is the one set, read whole, with its lists, its frozen
 * time and the viewer's own policy.
 *
 * One store serves most tests (idle after ten minutes, no offline grace,
 * so nothing moves unless a test moves it); tests of the timers start
 * stores of their own with short ones.  Every test uses its own ids.
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
#include <unistd.h>
#include <cmocka.h>

#include "harness.h"
#include "inspect.h"
#include "presence.h"

#define LONG_TTL  600000u
#define WAIT_MS   5000
#define TOL_MS    2000

static th_store_t S;          /* the shared store */
static th_store_t T;          /* a test's own store, when it needs one */
static pres_t *rw, *ro;       /* handles on S */

#define assert_near(a, b, tol) do {                                          \
        int64_t a_ = (int64_t)(a), b_ = (int64_t)(b);                        \
        int64_t d_ = a_ > b_ ? a_ - b_ : b_ - a_;                            \
        if (d_ > (int64_t)(tol))                                             \
            fail_msg("%s = %lld and %s = %lld differ by %lld (> %lld)",      \
                     #a, (long long)a_, #b, (long long)b_, (long long)d_,    \
                     (long long)(tol));                                      \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

static pres_user_view_t view_as(pres_t *p, const char *user, const char *viewer, int contact)
{
    pres_user_view_t v;
    pres_viewer_t who = { viewer, contact };
    memset(&v, 0x5a, sizeof v);
    int rc = pres_user(p, user, viewer ? &who : NULL, &v);
    if (rc != 0)
        fail_msg("pres_user(%s, viewer %s) = %d (%s)", user, viewer ? viewer : "(system)",
                 rc, pres_strerror(rc));
    /* API.md: an exact time only with EXACT; no devices without a status. */
    if (v.seen != PRES_SEEN_EXACT && v.last_seen_ms != 0)
        fail_msg("%s as %s sees: seen %d with last_seen_ms %llu", user,
                 viewer ? viewer : "(system)", v.seen, (unsigned long long)v.last_seen_ms);
    if (v.status == PRES_OFFLINE && v.devices != 0 && viewer)
        fail_msg("%s as %s sees: offline with %u devices", user, viewer, v.devices);
    return v;
}

static pres_user_view_t sys_view(pres_t *p, const char *user)
{
    return view_as(p, user, NULL, 0);
}

static void expect_view(pres_t *p, const char *user, const char *viewer, int contact,
                        int status, int seen, unsigned devices)
{
    pres_user_view_t v = view_as(p, user, viewer, contact);
    if (v.status != status || v.seen != seen || v.devices != devices)
        fail_msg("%s as seen by %s%s: status %d seen %d devices %u; expected %d %d %u",
                 user, viewer ? viewer : "(system)", contact ? " (contact)" : "",
                 v.status, v.seen, v.devices, status, seen, devices);
}

static pres_privacy_t policy(int last_seen, int online)
{
    pres_privacy_t pol;
    memset(&pol, 0, sizeof pol);
    pol.last_seen = last_seen;
    pol.online = online;
    return pol;
}

static void set_policy(pres_t *p, const char *user, const pres_privacy_t *pol)
{
    int rc = pres_set_privacy(p, user, pol);
    if (rc != 0)
        fail_msg("pres_set_privacy(%s) = %d (%s)", user, rc, pres_strerror(rc));
}

/* n ids "<prefix><k>" in ids (room for 64), pointed to by ptrs. */
static void make_ids(char ids[][PRES_ID_MAX + 1], const char **ptrs, size_t n, const char *prefix)
{
    for (size_t k = 0; k < n; k++) {
        snprintf(ids[k], PRES_ID_MAX + 1, "%s%zu", prefix, k);
        ptrs[k] = ids[k];
    }
}

static size_t typing_n(pres_t *p, const char *conv)
{
    size_t n = (size_t)-1;
    assert_rc(pres_typing_list(p, conv, NULL, 0, &n), 0);
    return n;
}

struct typing_arg { pres_t *p; const char *conv; size_t want; };

static int typing_is(void *arg)
{
    struct typing_arg *a = arg;
    size_t n = 99;
    return pres_typing_list(a->p, a->conv, NULL, 0, &n) == 0 && n == a->want;
}

static void wait_typing(pres_t *p, const char *conv, size_t want)
{
    struct typing_arg a = { p, conv, want };
    if (!th_wait_until(typing_is, &a, WAIT_MS))
        fail_msg("%s: %zu typing after %d ms, expected %zu", conv, typing_n(p, conv),
                 WAIT_MS, want);
}

struct status_arg { pres_t *p; const char *user; int want; };

static int status_is(void *arg)
{
    struct status_arg *a = arg;
    pres_user_view_t v;
    return pres_user(a->p, a->user, NULL, &v) == 0 && v.status == a->want;
}

static void wait_status(pres_t *p, const char *user, int want)
{
    struct status_arg a = { p, user, want };
    if (!th_wait_until(status_is, &a, WAIT_MS))
        fail_msg("%s: status %d after %d ms, expected %d", user, sys_view(p, user).status,
                 WAIT_MS, want);
}

/* A store of the test's own, with the daemon's timers given. */
static pres_t *own_store(const char *idle_after, const char *grace, const char *exceptions)
{
    const char *args[10] = { "--capacity", "4096" };
    int k = 2;
    if (idle_after) {
        args[k++] = "--idle-after-ms";
        args[k++] = idle_after;
    }
    if (grace) {
        args[k++] = "--offline-grace-ms";
        args[k++] = grace;
    }
    if (exceptions) {
        args[k++] = "--exceptions";
        args[k++] = exceptions;
    }
    args[k] = NULL;
    assert_int_equal(th_store_start(&T, args), 0);
    pres_t *p = NULL;
    assert_rc(pres_open(&p, T.name, PRES_RDWR), 0);
    return p;
}

static void own_store_done(pres_t *p)
{
    assert_int_equal(th_check_ok(&T, "at the end of the test"), 0);
    pres_close(p);
    th_store_destroy(&T);
    memset(&T, 0, sizeof T);
    /* The harness points the environment at the latest store. */
    setenv("PRESENCE_SHM_DIR", S.dir, 1);
    setenv("PRESENCE_NAME", S.name, 1);
}

static int group_setup(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", "--idle-after-ms", "600000",
                           "--offline-grace-ms", "0", NULL };
    if (th_store_start(&S, args) != 0)
        return -1;
    if (pres_open(&rw, S.name, PRES_RDWR) != 0 || pres_open(&ro, S.name, PRES_RDONLY) != 0)
        return -1;
    return pres_gateway_attach(rw, "gw_user") == 0 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    int rc = th_check_ok(&S, "at the end of the group");
    pres_close(ro);
    pres_close(rw);
    th_store_destroy(&S);
    return rc == 0 ? 0 : -1;
}

static int test_teardown(void **state)
{
    (void)state;
    if (T.dir[0]) {
        th_store_destroy(&T);
        memset(&T, 0, sizeof T);
        setenv("PRESENCE_SHM_DIR", S.dir, 1);
        setenv("PRESENCE_NAME", S.name, 1);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The aggregate                                                             */

/* Three devices in every combination that matters: active wins over idle,
 * idle over offline; devices counts the connected ones; last seen is the
 * call's time while one is connected, else the latest device's. */
static void test_aggregate_three_devices(void **state)
{
    (void)state;
    const char *u = "ag_u";
    assert_rc(pres_connect(rw, u, "ag_d1", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, u, "ag_d2", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, u, "ag_d3", "gw_user", LONG_TTL, NULL), 0);
    pres_user_view_t v = sys_view(ro, u);
    assert_int_equal(v.status, PRES_ACTIVE_NOW);
    assert_int_equal(v.devices, 3);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_near(v.last_seen_ms, pres_now_ms(), TOL_MS);

    /* All idle: idle.  One active again: active. */
    assert_rc(pres_set_activity(rw, "ag_d1", PRES_IDLE), 0);
    assert_rc(pres_set_activity(rw, "ag_d2", PRES_IDLE), 0);
    assert_int_equal(sys_view(ro, u).status, PRES_ACTIVE_NOW);
    assert_rc(pres_set_activity(rw, "ag_d3", PRES_IDLE), 0);
    expect_view(ro, u, NULL, 0, PRES_IDLE_NOW, PRES_SEEN_EXACT, 3);
    assert_rc(pres_set_activity(rw, "ag_d2", PRES_ACTIVE), 0);
    expect_view(ro, u, NULL, 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 3);

    /* The active one goes: idle, with two devices. */
    assert_rc(pres_disconnect(rw, "ag_d2"), 0);
    expect_view(ro, u, NULL, 0, PRES_IDLE_NOW, PRES_SEEN_EXACT, 2);
    /* A connect counts as active. */
    assert_rc(pres_connect(rw, u, "ag_d2", "gw_user", LONG_TTL, NULL), 0);
    expect_view(ro, u, NULL, 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 3);

    /* All gone: offline (no grace on this store); last seen is the latest
     * of the three. */
    assert_rc(pres_disconnect(rw, "ag_d2"), 0);
    assert_rc(pres_disconnect(rw, "ag_d1"), 0);
    th_nap_us(20000);     /* so that the last disconnect is distinctly later */
    assert_rc(pres_disconnect(rw, "ag_d3"), 0);
    pres_device_info_t d3;
    assert_rc(pres_device(ro, "ag_d3", &d3), 0);
    v = sys_view(ro, u);
    assert_int_equal(v.status, PRES_OFFLINE);
    assert_int_equal(v.devices, 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_int_equal(v.last_seen_ms, d3.last_seen_ms);
    for (int k = 1; k <= 2; k++) {
        char id[16];
        pres_device_info_t d;
        snprintf(id, sizeof id, "ag_d%d", k);
        assert_rc(pres_device(ro, id, &d), 0);
        assert_true(d.last_seen_ms <= v.last_seen_ms);
    }
}

static void test_idle_then_active(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "ia_u", "ia_d", "gw_user", LONG_TTL, NULL), 0);
    assert_int_equal(sys_view(ro, "ia_u").status, PRES_ACTIVE_NOW);
    assert_rc(pres_set_activity(rw, "ia_d", PRES_IDLE), 0);
    assert_int_equal(sys_view(ro, "ia_u").status, PRES_IDLE_NOW);
    assert_int_equal(sys_view(ro, "ia_u").devices, 1);
    assert_rc(pres_set_activity(rw, "ia_d", PRES_ACTIVE), 0);
    assert_int_equal(sys_view(ro, "ia_u").status, PRES_ACTIVE_NOW);
}

/* --idle-after-ms: a connected device without interaction turns idle by
 * itself, and an interaction (activity, typing) makes it active again. */
static void test_idle_by_timer(void **state)
{
    (void)state;
    pres_t *p = own_store("200", "0", NULL);
    assert_rc(pres_connect(p, "it_u", "it_d", "gw_it", LONG_TTL, NULL), 0);
    wait_status(p, "it_u", PRES_IDLE_NOW);
    pres_device_info_t d;
    assert_rc(pres_device(p, "it_d", &d), 0);
    assert_true(d.connected && !d.active);
    assert_rc(pres_set_activity(p, "it_d", PRES_ACTIVE), 0);
    assert_int_equal(sys_view(p, "it_u").status, PRES_ACTIVE_NOW);
    wait_status(p, "it_u", PRES_IDLE_NOW);
    assert_rc(pres_typing(p, "it_d", "it_c", 60000), 0);
    assert_int_equal(sys_view(p, "it_u").status, PRES_ACTIVE_NOW);
    own_store_done(p);
}

/* --offline-grace-ms: the status holds after the last device goes, while
 * seen, last_seen_ms and devices tell the truth at once, and pres_route
 * never applies the grace.  Then it is offline. */
static void test_grace_then_offline(void **state)
{
    (void)state;
    pres_t *p = own_store("600000", "3000", NULL);
    assert_rc(pres_connect(p, "gr_u", "gr_d", "gw_gr", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(p, "gr_u", "gr_e", "gw_gr", LONG_TTL, NULL), 0);
    assert_rc(pres_set_activity(p, "gr_e", PRES_IDLE), 0);
    assert_rc(pres_disconnect(p, "gr_d"), 0);
    th_nap_us(20000);     /* so that gr_e is distinctly the last to go */
    assert_rc(pres_disconnect(p, "gr_e"), 0);
    pres_device_info_t e;
    assert_rc(pres_device(p, "gr_e", &e), 0);
    /* The last device to go was idle: idle it stays for the grace. */
    pres_user_view_t v = sys_view(p, "gr_u");
    assert_int_equal(v.status, PRES_IDLE_NOW);
    assert_int_equal(v.devices, 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_int_equal(v.last_seen_ms, e.last_seen_ms);
    size_t n = 9;
    assert_rc(pres_route(p, "gr_u", NULL, 0, &n), 0);
    assert_int_equal(n, 0);
    wait_status(p, "gr_u", PRES_OFFLINE);
    own_store_done(p);
}

struct expired_arg { pres_t *p; const char *dev; };

static int device_expired(void *arg)
{
    struct expired_arg *a = arg;
    pres_device_info_t d;
    return pres_device(a->p, a->dev, &d) == 0 && !d.connected;
}

/* A device whose TTL passed stopped being connected at its expiry, also
 * when its gateway reports the disconnect later: the grace runs from the
 * expiry, not from its last sign of life (a TTL earlier). */
static void test_grace_after_late_disconnect(void **state)
{
    (void)state;
    pres_t *p = own_store("600000", "3000", NULL);
    assert_rc(pres_connect(p, "gl_u", "gl_d", "gw_gl", 4000, NULL), 0);
    struct expired_arg a = { p, "gl_d" };
    if (!th_wait_until(device_expired, &a, WAIT_MS))
        fail_msg("gl_d never expired");
    assert_int_equal(sys_view(p, "gl_u").status, PRES_ACTIVE_NOW);
    assert_rc(pres_disconnect(p, "gl_d"), 0);
    pres_device_info_t d;
    assert_rc(pres_device(p, "gl_d", &d), 0);
    assert_true(d.last_seen_ms + 3000 < pres_now_ms());    /* its last sign of life */
    assert_int_equal(sys_view(p, "gl_u").status, PRES_ACTIVE_NOW);
    wait_status(p, "gl_u", PRES_OFFLINE);
    own_store_done(p);
}

/* A reconnect inside the grace is invisible: the status never drops, over
 * many disconnect/reconnect cycles (each far shorter than the grace). */
static void test_reconnect_within_grace(void **state)
{
    (void)state;
    pres_t *p = own_store("600000", "5000", NULL);
    assert_rc(pres_connect(p, "rg_u", "rg_d", "gw_rg", LONG_TTL, NULL), 0);
    for (int k = 0; k < 200; k++) {
        assert_rc(pres_disconnect(p, "rg_d"), 0);
        pres_user_view_t v = view_as(p, "rg_u", "rg_viewer", 0);
        if (v.status != PRES_ACTIVE_NOW)
            fail_msg("cycle %d: status %d right after the disconnect", k, v.status);
        assert_int_equal(v.devices, 0);
        assert_rc(pres_connect(p, "rg_u", "rg_d", "gw_rg", LONG_TTL, NULL), 0);
        v = view_as(p, "rg_u", "rg_viewer", 0);
        assert_int_equal(v.status, PRES_ACTIVE_NOW);
        assert_int_equal(v.devices, 1);
    }
    own_store_done(p);
}

/* SIGHUP reloads --offline-grace-ms and --idle-after-ms from the config
 * file, and pres_user follows. */
static void test_timers_reload(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    char cfg[320];
    snprintf(cfg, sizeof cfg, "%s/usercfg.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemp(cfg);
    assert_true(fd >= 0);
    static const char before[] = "offline-grace-ms = 600000\nidle-after-ms = 600000\n";
    assert_int_equal(write(fd, before, sizeof before - 1), (ssize_t)(sizeof before - 1));
    close(fd);
    const char *args[] = { "--capacity", "4096", "--config", cfg, NULL };
    assert_int_equal(th_store_start(&T, args), 0);
    pres_t *p = NULL;
    assert_rc(pres_open(&p, T.name, PRES_RDWR), 0);
    assert_rc(pres_connect(p, "hr_u", "hr_d", "gw_hr", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(p, "hr_v", "hr_e", "gw_hr", LONG_TTL, NULL), 0);
    assert_rc(pres_disconnect(p, "hr_d"), 0);
    assert_int_equal(sys_view(p, "hr_u").status, PRES_ACTIVE_NOW);   /* held */
    assert_int_equal(sys_view(p, "hr_v").status, PRES_ACTIVE_NOW);

    FILE *f = fopen(cfg, "w");
    assert_non_null(f);
    fputs("offline-grace-ms = 100\nidle-after-ms = 100\n", f);
    fclose(f);
    assert_int_equal(kill(T.pid, SIGHUP), 0);
    wait_status(p, "hr_u", PRES_OFFLINE);
    wait_status(p, "hr_v", PRES_IDLE_NOW);
    unlink(cfg);
    own_store_done(p);
}

/* ------------------------------------------------------------------------ */
/* Privacy                                                                   */

static void test_no_policy_shows_all(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "np_u", "np_d", "gw_user", LONG_TTL, NULL), 0);
    expect_view(ro, "np_u", "np_stranger", 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    expect_view(ro, "np_u", "np_contact", 1, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
}

/* Audiences, as a stranger, a contact, the user and the system see them. */
static void test_audiences(void **state)
{
    (void)state;
    const char *u = "au_u";
    assert_rc(pres_connect(rw, u, "au_d", "gw_user", LONG_TTL, NULL), 0);

    pres_privacy_t pol = policy(PRES_CONTACTS, PRES_CONTACTS);
    set_policy(rw, u, &pol);
    expect_view(ro, u, "au_stranger", 0, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    expect_view(ro, u, "au_contact", 1, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    expect_view(ro, u, u, 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);     /* self */
    expect_view(ro, u, NULL, 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);  /* system */

    /* Online wider than last seen: strangers see the status, not the time. */
    pol = policy(PRES_NOBODY, PRES_EVERYONE);
    set_policy(rw, u, &pol);
    expect_view(ro, u, "au_stranger", 0, PRES_ACTIVE_NOW, PRES_SEEN_HIDDEN, 1);
    expect_view(ro, u, "au_contact", 1, PRES_ACTIVE_NOW, PRES_SEEN_HIDDEN, 1);

    pol = policy(PRES_NOBODY, PRES_NOBODY);
    set_policy(rw, u, &pol);
    expect_view(ro, u, "au_contact", 1, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    /* Routing is unaffected by any policy. */
    size_t n = 0;
    assert_rc(pres_route(ro, u, NULL, 0, &n), 0);
    assert_int_equal(n, 1);

    /* Approximate: those refused see a bucket. */
    pol.approximate = 1;
    set_policy(rw, u, &pol);
    expect_view(ro, u, "au_contact", 1, PRES_OFFLINE, PRES_SEEN_RECENTLY, 0);

    pol = policy(PRES_EVERYONE, PRES_EVERYONE);
    set_policy(rw, u, &pol);
    expect_view(ro, u, "au_stranger", 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
}

/* Lists: deny before allow before the audience, for both audiences. */
static void test_allow_and_deny_lists(void **state)
{
    (void)state;
    const char *u = "ls_u";
    assert_rc(pres_connect(rw, u, "ls_d", "gw_user", LONG_TTL, NULL), 0);
    static char ids[64][PRES_ID_MAX + 1];
    const char *allow[64], *deny[3] = { "ls_foe", "ls_both", "ls_x" };
    make_ids(ids, allow, 63, "ls_friend");
    allow[63] = "ls_both";
    pres_privacy_t pol = policy(PRES_NOBODY, PRES_NOBODY);
    pol.allow = allow;
    pol.n_allow = 64;
    pol.deny = deny;
    pol.n_deny = 3;
    set_policy(rw, u, &pol);
    expect_view(ro, u, "ls_friend0", 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    expect_view(ro, u, "ls_friend62", 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    expect_view(ro, u, "ls_friend63", 1, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    expect_view(ro, u, "ls_both", 0, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);   /* deny wins */
    expect_view(ro, u, "ls_foe", 1, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);

    /* Everyone, but not the deny list; approximate for the refused. */
    pol = policy(PRES_EVERYONE, PRES_EVERYONE);
    pol.approximate = 1;
    make_ids(ids, allow, 64, "ls_enemy");
    pol.deny = allow;
    pol.n_deny = 64;
    set_policy(rw, u, &pol);
    expect_view(ro, u, "ls_enemy63", 1, PRES_OFFLINE, PRES_SEEN_RECENTLY, 0);
    expect_view(ro, u, "ls_enemy0", 0, PRES_OFFLINE, PRES_SEEN_RECENTLY, 0);
    expect_view(ro, u, "ls_friend0", 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    expect_view(ro, u, "ls_foe", 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
}

/* Reciprocal is read from the viewer's own policy, and no allow list
 * overrides it; the target's approximate decides bucket or hidden. */
static void test_reciprocal(void **state)
{
    (void)state;
    const char *u = "rc_u";
    assert_rc(pres_connect(rw, u, "rc_d", "gw_user", LONG_TTL, NULL), 0);
    const char *allow[] = { "rc_hider", "rc_shy" };
    pres_privacy_t pol = policy(PRES_EVERYONE, PRES_EVERYONE);
    pol.allow = allow;
    pol.n_allow = 2;
    set_policy(rw, u, &pol);

    /* rc_hider hides their last seen from everybody, reciprocally. */
    pres_privacy_t own = policy(PRES_NOBODY, PRES_EVERYONE);
    own.reciprocal = 1;
    set_policy(rw, "rc_hider", &own);
    expect_view(ro, u, "rc_hider", 0, PRES_ACTIVE_NOW, PRES_SEEN_HIDDEN, 1);
    /* rc_shy hides both, reciprocally: refused both. */
    own = policy(PRES_NOBODY, PRES_NOBODY);
    own.reciprocal = 1;
    set_policy(rw, "rc_shy", &own);
    expect_view(ro, u, "rc_shy", 1, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    /* Without reciprocal, hiding one's own costs nothing. */
    own.reciprocal = 0;
    set_policy(rw, "rc_shy", &own);
    expect_view(ro, u, "rc_shy", 1, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    /* The target's approximate: a bucket instead of hidden. */
    pol.approximate = 1;
    set_policy(rw, u, &pol);
    expect_view(ro, u, "rc_hider", 0, PRES_ACTIVE_NOW, PRES_SEEN_RECENTLY, 1);
}

/* Invisible: offline to every viewer, last seen frozen at the moment it was
 * set (kept when the policy is replaced by another invisible one), routing
 * and the system's view unaffected; turned off, the truth again. */
static void test_invisible(void **state)
{
    (void)state;
    const char *u = "iv_u";
    assert_rc(pres_connect(rw, u, "iv_d", "gw_user", LONG_TTL, NULL), 0);
    uint64_t t0 = pres_now_ms();
    pres_privacy_t pol = policy(PRES_EVERYONE, PRES_EVERYONE);
    pol.invisible = 1;
    set_policy(rw, u, &pol);
    uint64_t t1 = pres_now_ms();
    pres_user_view_t v = view_as(ro, u, "iv_friend", 1);
    assert_int_equal(v.status, PRES_OFFLINE);
    assert_int_equal(v.devices, 0);
    assert_int_equal(v.seen, PRES_SEEN_EXACT);
    assert_true(v.last_seen_ms + 50 >= t0 && v.last_seen_ms <= t1 + 50);
    uint64_t frozen = v.last_seen_ms;
    expect_view(ro, u, NULL, 0, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    size_t n = 0;
    assert_rc(pres_route(ro, u, NULL, 0, &n), 0);
    assert_int_equal(n, 1);

    /* Time passes, the device stays on; another invisible policy (now with
     * a list) keeps the frozen time. */
    th_nap_us(30000);
    const char *deny[] = { "iv_foe" };
    pol.deny = deny;
    pol.n_deny = 1;
    set_policy(rw, u, &pol);
    v = view_as(ro, u, "iv_friend", 1);
    assert_int_equal(v.status, PRES_OFFLINE);
    assert_int_equal(v.last_seen_ms, frozen);
    expect_view(ro, u, "iv_foe", 0, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);

    /* Visible again: the truth. */
    pol = policy(PRES_EVERYONE, PRES_EVERYONE);
    set_policy(rw, u, &pol);
    v = view_as(ro, u, "iv_friend", 1);
    assert_int_equal(v.status, PRES_ACTIVE_NOW);
    assert_int_equal(v.devices, 1);
    assert_near(v.last_seen_ms, pres_now_ms(), TOL_MS);
    assert_true(v.last_seen_ms > frozen);
}

struct gp_arg { pres_t *p; uint64_t want; };

/* The daemon completes a grace period a tick: so many ticks passed. */
static int passes_done(void *arg)
{
    struct gp_arg *a = arg;
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.grace_periods >= a->want;
}

/* pres_set_privacy creates a user the store has not seen: never seen, and
 * hidden or long ago to those refused.  The daemon keeps such a user (it
 * retires users without devices, but not with a policy). */
static void test_policy_creates_user(void **state)
{
    (void)state;
    pres_user_view_t v;
    assert_rc(pres_user(ro, "pc_new", NULL, &v), -ENOENT);
    pres_privacy_t pol = policy(PRES_CONTACTS, PRES_EVERYONE);
    set_policy(rw, "pc_new", &pol);
    expect_view(ro, "pc_new", NULL, 0, PRES_OFFLINE, PRES_SEEN_NEVER, 0);
    expect_view(ro, "pc_new", "pc_contact", 1, PRES_OFFLINE, PRES_SEEN_NEVER, 0);
    expect_view(ro, "pc_new", "pc_stranger", 0, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    pol.approximate = 1;
    set_policy(rw, "pc_new", &pol);
    expect_view(ro, "pc_new", "pc_stranger", 0, PRES_OFFLINE, PRES_SEEN_LONG_AGO, 0);

    /* Many daemon passes later, still there. */
    pres_stats_t st0;
    assert_rc(pres_stats(ro, &st0), 0);
    struct gp_arg g = { ro, st0.grace_periods + 10 };
    assert_true(th_wait_until(passes_done, &g, WAIT_MS));
    expect_view(ro, "pc_new", "pc_stranger", 0, PRES_OFFLINE, PRES_SEEN_LONG_AGO, 0);

    /* A device later: seen. */
    assert_rc(pres_connect(rw, "pc_new", "pc_d", "gw_user", LONG_TTL, NULL), 0);
    expect_view(ro, "pc_new", "pc_contact", 1, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    expect_view(ro, "pc_new", "pc_stranger", 0, PRES_ACTIVE_NOW, PRES_SEEN_RECENTLY, 1);
}

/* ------------------------------------------------------------------------ */
/* Bad input                                                                 */

static void test_user_errors(void **state)
{
    (void)state;
    pres_user_view_t v;
    char longid[PRES_ID_MAX + 2];
    memset(longid, 'x', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    assert_rc(pres_user(ro, "ue_nobody_knows", NULL, &v), -ENOENT);
    pres_viewer_t who = { "ue_viewer", 0 };
    assert_rc(pres_user(ro, "ue_nobody_knows", &who, &v), -ENOENT);
    assert_rc(pres_user(ro, NULL, NULL, &v), -EINVAL);
    assert_rc(pres_user(ro, "", NULL, &v), -EINVAL);
    assert_rc(pres_user(ro, longid, NULL, &v), -ENAMETOOLONG);
    assert_rc(pres_user(ro, "ue_u", NULL, NULL), -EINVAL);
    assert_rc(pres_user(NULL, "ue_u", NULL, &v), -EINVAL);
    assert_rc(pres_connect(rw, "ue_u", "ue_d", "gw_user", LONG_TTL, NULL), 0);
    who.viewer_id = longid;
    assert_rc(pres_user(ro, "ue_u", &who, &v), -ENAMETOOLONG);
    who.viewer_id = "";
    assert_rc(pres_user(ro, "ue_u", &who, &v), -EINVAL);
    /* A viewer struct without an id is the system's view. */
    who.viewer_id = NULL;
    assert_rc(pres_user(ro, "ue_u", &who, &v), 0);
    assert_int_equal(v.devices, 1);
}

static void test_set_privacy_errors(void **state)
{
    (void)state;
    const char *u = "pe_u";
    assert_rc(pres_connect(rw, u, "pe_d", "gw_user", LONG_TTL, NULL), 0);
    const char *deny[] = { "pe_foe" };
    pres_privacy_t good = policy(PRES_CONTACTS, PRES_EVERYONE);
    good.deny = deny;
    good.n_deny = 1;
    set_policy(rw, u, &good);

    pres_privacy_t bad = good;
    bad.last_seen = 3;
    assert_rc(pres_set_privacy(rw, u, &bad), -EINVAL);
    bad = good;
    bad.online = -1;
    assert_rc(pres_set_privacy(rw, u, &bad), -EINVAL);
    bad = policy(PRES_EVERYONE, PRES_CONTACTS);      /* online narrower */
    assert_rc(pres_set_privacy(rw, u, &bad), -EINVAL);
    bad = policy(PRES_CONTACTS, PRES_NOBODY);
    assert_rc(pres_set_privacy(rw, u, &bad), -EINVAL);
    bad = good;
    bad.allow = NULL;
    bad.n_allow = 2;
    assert_rc(pres_set_privacy(rw, u, &bad), -EINVAL);
    bad = good;
    bad.deny = NULL;
    assert_rc(pres_set_privacy(rw, u, &bad), -EINVAL);
    const char *bad_ids[] = { "pe_ok", "" };
    bad = good;
    bad.allow = bad_ids;
    bad.n_allow = 2;
    assert_rc(pres_set_privacy(rw, u, &bad), -EINVAL);
    char longid[PRES_ID_MAX + 2];
    memset(longid, 'y', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    const char *long_ids[] = { longid };
    bad.allow = long_ids;
    bad.n_allow = 1;
    assert_rc(pres_set_privacy(rw, u, &bad), -ENAMETOOLONG);
    assert_rc(pres_set_privacy(rw, u, NULL), -EINVAL);
    assert_rc(pres_set_privacy(rw, NULL, &good), -EINVAL);
    assert_rc(pres_set_privacy(rw, longid, &good), -ENAMETOOLONG);
    assert_rc(pres_set_privacy(NULL, u, &good), -EINVAL);
    assert_rc(pres_set_privacy(ro, u, &good), -EROFS);

    /* Lists of 65: -E2BIG, whatever else is wrong or right. */
    static char ids[65][PRES_ID_MAX + 1];
    const char *many[65];
    make_ids(ids, many, 65, "pe_many");
    bad = policy(PRES_NOBODY, PRES_NOBODY);
    bad.allow = many;
    bad.n_allow = 65;
    assert_rc(pres_set_privacy(rw, u, &bad), -E2BIG);
    bad.n_allow = 0;
    bad.deny = many;
    bad.n_deny = 65;
    assert_rc(pres_set_privacy(rw, u, &bad), -E2BIG);
    bad.n_deny = 64;
    bad.n_allow = 64;
    bad.allow = many + 1;
    bad.last_seen = PRES_EVERYONE;
    bad.online = PRES_EVERYONE;
    bad.n_deny = 65;
    assert_rc(pres_set_privacy(rw, u, &bad), -E2BIG);

    /* After every refusal the first policy holds, lists and all. */
    expect_view(ro, u, "pe_stranger", 0, PRES_ACTIVE_NOW, PRES_SEEN_HIDDEN, 1);
    expect_view(ro, u, "pe_friend", 1, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    expect_view(ro, u, "pe_foe", 1, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    expect_view(ro, u, "pe_many0", 1, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
}

/* --exceptions is a capacity: a policy that does not fit is -ENOSPC with
 * the old policy intact; the entries of replaced policies (and of a policy
 * that did not fit) come back, so replacing policies goes on forever. */
struct set_arg { pres_t *p; const char *user; const pres_privacy_t *pol; int rc; };

static int set_succeeds(void *arg)
{
    struct set_arg *a = arg;
    a->rc = pres_set_privacy(a->p, a->user, a->pol);
    return a->rc == 0;
}

static void test_exceptions_capacity(void **state)
{
    (void)state;
    pres_t *p = own_store(NULL, NULL, "24");
    static char ids[10][PRES_ID_MAX + 1];
    const char *deny[10];
    make_ids(ids, deny, 10, "cap_foe");
    pres_privacy_t pol = policy(PRES_EVERYONE, PRES_EVERYONE);
    pol.deny = deny;
    pol.n_deny = 10;                 /* 11 entries with the HEAD */
    set_policy(p, "cap_a", &pol);
    set_policy(p, "cap_b", &pol);    /* 22 of 24 */
    pol.n_deny = 2;
    assert_rc(pres_set_privacy(p, "cap_c", &pol), -ENOSPC);
    expect_view(p, "cap_a", "cap_foe9", 0, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    expect_view(p, "cap_b", "cap_foe0", 0, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    /* cap_b drops its lists: its 11 entries come back (a grace period). */
    pres_privacy_t plain = policy(PRES_EVERYONE, PRES_EVERYONE);
    set_policy(p, "cap_b", &plain);
    expect_view(p, "cap_b", "cap_foe0", 0, PRES_OFFLINE, PRES_SEEN_NEVER, 0);

    /* Replace cap_a's and cap_c's policies far more often than the
     * capacity holds; each replacement may wait for the daemon. */
    for (int k = 0; k < 100; k++) {
        /* At most 8 entries a policy: two held and one being written fit. */
        pol.n_deny = 2 + (size_t)(k % 6);
        pol.approximate = k & 1;
        struct set_arg a = { p, k % 3 ? "cap_a" : "cap_c", &pol, 0 };
        if (!th_wait_until(set_succeeds, &a, WAIT_MS))
            fail_msg("replacement %d: %s for %d ms", k, pres_strerror(a.rc), WAIT_MS);
        expect_view(p, a.user, deny[pol.n_deny - 1], 0, PRES_OFFLINE,
                    pol.approximate ? PRES_SEEN_LONG_AGO : PRES_SEEN_HIDDEN, 0);
    }
    own_store_done(p);
}

/* Policies live in the store: a restarted daemon adopts them as they are
 * (lists, frozen time), and frees what they held once replaced. */
struct exc_arg { pres_t *p; uint64_t max, now; };

static int exceptions_at_most(void *arg)
{
    struct exc_arg *a = arg;
    pres_inspect_info_t in;
    if (pres__inspect_info(a->p, &in) != 0)
        return 0;
    a->now = in.exceptions_in_use;
    return in.exceptions_in_use <= a->max;
}

static void test_policy_survives_restart(void **state)
{
    (void)state;
    pres_t *p = own_store(NULL, "0", "4096");
    assert_rc(pres_connect(p, "rs_u", "rs_d", "gw_rs", LONG_TTL, NULL), 0);
    const char *deny[] = { "rs_foe", "rs_other" };
    pres_privacy_t pol = policy(PRES_CONTACTS, PRES_EVERYONE);
    pol.deny = deny;
    pol.n_deny = 2;
    pol.invisible = 1;
    set_policy(p, "rs_u", &pol);
    pres_user_view_t before = view_as(p, "rs_u", "rs_friend", 1);
    assert_int_equal(th_daemon_stop(&T), 0);
    assert_int_equal(th_daemon_start(&T, (const char *const[]){ "--capacity", "4096",
                                          "--offline-grace-ms", "0", "--exceptions",
                                          "4096", NULL }), 0);
    pres_user_view_t after = view_as(p, "rs_u", "rs_friend", 1);
    assert_int_equal(after.status, PRES_OFFLINE);
    assert_int_equal(after.seen, PRES_SEEN_EXACT);
    assert_int_equal(after.last_seen_ms, before.last_seen_ms);
    expect_view(p, "rs_u", "rs_foe", 1, PRES_OFFLINE, PRES_SEEN_HIDDEN, 0);
    assert_int_equal(th_check_ok(&T, "after the restart"), 0);
    /* The adopted block is the new daemon's to free once replaced. */
    pres_privacy_t plain = policy(PRES_EVERYONE, PRES_EVERYONE);
    set_policy(p, "rs_u", &plain);
    struct exc_arg a = { p, 0, 0 };
    if (!th_wait_until(exceptions_at_most, &a, WAIT_MS))
        fail_msg("%llu exception entries still in use", (unsigned long long)a.now);
    expect_view(p, "rs_u", "rs_foe", 1, PRES_ACTIVE_NOW, PRES_SEEN_EXACT, 1);
    own_store_done(p);
}

/* ------------------------------------------------------------------------ */
/* Typing                                                                    */

static void test_typing_list(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "ty_u1", "ty_d1", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, "ty_u2", "ty_d2", "gw_user", LONG_TTL, NULL), 0);
    assert_int_equal(typing_n(ro, "ty_c"), 0);
    assert_rc(pres_typing(rw, "ty_d1", "ty_c", 60000), 0);
    char ids[4][PRES_ID_MAX + 1];
    size_t n = 0;
    assert_rc(pres_typing_list(ro, "ty_c", ids, 4, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(ids[0], "ty_u1");
    assert_rc(pres_typing(rw, "ty_d2", "ty_c", 60000), 0);
    assert_rc(pres_typing_list(ro, "ty_c", ids, 4, &n), 0);
    assert_int_equal(n, 2);
    assert_true((strcmp(ids[0], "ty_u1") == 0 && strcmp(ids[1], "ty_u2") == 0) ||
                (strcmp(ids[0], "ty_u2") == 0 && strcmp(ids[1], "ty_u1") == 0));
    /* cap bounds what is written, not the count. */
    memset(ids, 0x5a, sizeof ids);
    assert_rc(pres_typing_list(ro, "ty_c", ids, 1, &n), 0);
    assert_int_equal(n, 2);
    assert_true(strcmp(ids[0], "ty_u1") == 0 || strcmp(ids[0], "ty_u2") == 0);
    assert_int_equal((unsigned char)ids[1][0], 0x5a);
    assert_int_equal(typing_n(ro, "ty_other"), 0);

    /* Stop (ttl 0): only in that conversation. */
    assert_rc(pres_typing(rw, "ty_d1", "ty_elsewhere", 0), 0);
    assert_int_equal(typing_n(ro, "ty_c"), 2);
    assert_rc(pres_typing(rw, "ty_d1", "ty_c", 0), 0);
    assert_rc(pres_typing_list(ro, "ty_c", ids, 4, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(ids[0], "ty_u2");
    assert_rc(pres_typing(rw, "ty_d1", "ty_c", 0), 0);     /* again: nothing */
}

static void test_typing_ttl_and_extend(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "tt_u", "tt_d", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_typing(rw, "tt_d", "tt_c", 300), 0);
    assert_int_equal(typing_n(ro, "tt_c"), 1);
    wait_typing(ro, "tt_c", 0);

    /* Repeats within the TTL extend the one record: no new ones. */
    pres_inspect_info_t in0, in1;
    assert_rc(pres_typing(rw, "tt_d", "tt_c", 60000), 0);
    assert_rc(pres__inspect_info(ro, &in0), 0);
    for (int k = 0; k < 50; k++) {
        assert_rc(pres_typing(rw, "tt_d", "tt_c", 60000), 0);
        assert_int_equal(typing_n(ro, "tt_c"), 1);
    }
    assert_rc(pres__inspect_info(ro, &in1), 0);
    assert_true(in1.typing_in_use <= in0.typing_in_use);

    /* A repeat with a short TTL shortens it. */
    assert_rc(pres_typing(rw, "tt_d", "tt_c", 200), 0);
    wait_typing(ro, "tt_c", 0);
}

static void test_typing_moves(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "tm_u", "tm_d", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_typing(rw, "tm_d", "tm_c1", 60000), 0);
    assert_int_equal(typing_n(ro, "tm_c1"), 1);
    assert_rc(pres_typing(rw, "tm_d", "tm_c2", 60000), 0);
    assert_int_equal(typing_n(ro, "tm_c1"), 0);
    assert_int_equal(typing_n(ro, "tm_c2"), 1);
    assert_rc(pres_typing(rw, "tm_d", "tm_c1", 60000), 0);
    assert_int_equal(typing_n(ro, "tm_c1"), 1);
    assert_int_equal(typing_n(ro, "tm_c2"), 0);
}

/* Typing ends with the connection it was typed on: a disconnect, a
 * reconnect, an expiry; and a device not connected cannot type. */
static void test_typing_ends_with_connection(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "te_u", "te_d", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_typing(rw, "te_d", "te_c", 60000), 0);
    assert_rc(pres_disconnect(rw, "te_d"), 0);
    assert_int_equal(typing_n(ro, "te_c"), 0);
    assert_rc(pres_typing(rw, "te_d", "te_c", 60000), -ENOENT);
    assert_rc(pres_typing(rw, "te_d", "te_c", 0), -ENOENT);
    assert_rc(pres_connect(rw, "te_u", "te_d", "gw_user", LONG_TTL, NULL), 0);
    assert_int_equal(typing_n(ro, "te_c"), 0);

    assert_rc(pres_connect(rw, "te_u", "te_short", "gw_user", 300, NULL), 0);
    assert_rc(pres_typing(rw, "te_short", "te_c", 60000), 0);
    assert_int_equal(typing_n(ro, "te_c"), 1);
    wait_typing(ro, "te_c", 0);
    assert_rc(pres_typing(rw, "te_short", "te_c", 60000), -ENOENT);
    assert_rc(pres_typing(rw, "te_never_seen", "te_c", 60000), -ENOENT);
}

static void test_typing_dedupe(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "td_u", "td_phone", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(rw, "td_u", "td_laptop", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_typing(rw, "td_phone", "td_c", 60000), 0);
    assert_rc(pres_typing(rw, "td_laptop", "td_c", 60000), 0);
    char ids[4][PRES_ID_MAX + 1];
    size_t n = 0;
    assert_rc(pres_typing_list(ro, "td_c", ids, 4, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(ids[0], "td_u");
    assert_rc(pres_typing(rw, "td_phone", "td_c", 0), 0);
    assert_int_equal(typing_n(ro, "td_c"), 1);       /* the laptop still types */
}

/* Typing is an interaction; stopping is not. */
static void test_typing_is_interaction(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "tx_u", "tx_d", "gw_user", LONG_TTL, NULL), 0);
    assert_rc(pres_set_activity(rw, "tx_d", PRES_IDLE), 0);
    assert_int_equal(sys_view(ro, "tx_u").status, PRES_IDLE_NOW);
    assert_rc(pres_typing(rw, "tx_d", "tx_c", 60000), 0);
    assert_int_equal(sys_view(ro, "tx_u").status, PRES_ACTIVE_NOW);
    pres_device_info_t d;
    assert_rc(pres_device(ro, "tx_d", &d), 0);
    assert_true(d.active);
    assert_rc(pres_set_activity(rw, "tx_d", PRES_IDLE), 0);
    assert_rc(pres_typing(rw, "tx_d", "tx_c", 0), 0);
    assert_int_equal(sys_view(ro, "tx_u").status, PRES_IDLE_NOW);
}

static void test_typing_errors(void **state)
{
    (void)state;
    assert_rc(pres_connect(rw, "tr_u", "tr_d", "gw_user", LONG_TTL, NULL), 0);
    char longid[PRES_ID_MAX + 2];
    memset(longid, 'z', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    size_t n;
    char ids[1][PRES_ID_MAX + 1];
    assert_rc(pres_typing(rw, "tr_d", "tr_c", PRES_TTL_MAX_MS + 1), -EINVAL);
    assert_rc(pres_typing(rw, "tr_d", NULL, 1000), -EINVAL);
    assert_rc(pres_typing(rw, "tr_d", "", 1000), -EINVAL);
    assert_rc(pres_typing(rw, "tr_d", longid, 1000), -ENAMETOOLONG);
    assert_rc(pres_typing(rw, NULL, "tr_c", 1000), -EINVAL);
    assert_rc(pres_typing(rw, longid, "tr_c", 1000), -ENAMETOOLONG);
    assert_rc(pres_typing(ro, "tr_d", "tr_c", 1000), -EROFS);
    assert_rc(pres_typing(NULL, "tr_d", "tr_c", 1000), -EINVAL);
    assert_rc(pres_typing_list(ro, "tr_c", NULL, 0, NULL), -EINVAL);
    assert_rc(pres_typing_list(ro, "tr_c", NULL, 1, &n), -EINVAL);
    assert_rc(pres_typing_list(ro, NULL, ids, 1, &n), -EINVAL);
    assert_rc(pres_typing_list(ro, longid, ids, 1, &n), -ENAMETOOLONG);
    assert_rc(pres_typing_list(NULL, "tr_c", ids, 1, &n), -EINVAL);
    assert_int_equal(typing_n(ro, "tr_c"), 0);
    /* The longest TTL is allowed. */
    assert_rc(pres_typing(rw, "tr_d", "tr_c", PRES_TTL_MAX_MS), 0);
    assert_int_equal(typing_n(ro, "tr_c"), 1);
}

/* Typing records come back: ended, moved, expired and disconnected ones
 * are freed by the daemon, so a store's few records serve forever. */
struct in_use_arg { pres_t *p; uint64_t max; uint64_t now; };

static int typing_back(void *arg)
{
    struct in_use_arg *a = arg;
    pres_inspect_info_t in;
    if (pres__inspect_info(a->p, &in) != 0)
        return 0;
    a->now = in.typing_in_use;
    return in.typing_in_use <= a->max;
}

struct typing_try { pres_t *p; const char *dev, *conv; int rc; };

static int typing_ok(void *arg)
{
    struct typing_try *t = arg;
    t->rc = pres_typing(t->p, t->dev, t->conv, 60000);
    return t->rc == 0;
}

static void test_typing_records_reclaimed(void **state)
{
    (void)state;
    pres_t *p = own_store(NULL, NULL, NULL);
    pres_inspect_info_t in;
    assert_rc(pres__inspect_info(p, &in), 0);
    uint64_t cap = in.typing_capacity;
    char dev[32], conv[32];
    for (uint64_t k = 0; k < 3 * cap; k++) {
        snprintf(dev, sizeof dev, "tg_d%llu", (unsigned long long)(k % 64));
        snprintf(conv, sizeof conv, "tg_c%llu", (unsigned long long)(k % 7));
        if (k < 64)
            assert_rc(pres_connect(p, "tg_u", dev, "gw_tg", LONG_TTL, NULL), 0);
        /* The daemon frees the moved ones: a full table waits for it. */
        struct typing_try t = { p, dev, conv, 0 };
        if (!th_wait_until(typing_ok, &t, WAIT_MS))
            fail_msg("typing %llu of %llu: %s", (unsigned long long)k,
                     (unsigned long long)(3 * cap), pres_strerror(t.rc));
    }
    for (int k = 0; k < 64; k++) {
        snprintf(dev, sizeof dev, "tg_d%d", k);
        assert_rc(pres_disconnect(p, dev), 0);
    }
    struct in_use_arg a = { p, 0, 0 };
    if (!th_wait_until(typing_back, &a, WAIT_MS))
        fail_msg("%llu typing records still in use", (unsigned long long)a.now);
    own_store_done(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_aggregate_three_devices),
        cmocka_unit_test(test_idle_then_active),
        cmocka_unit_test_teardown(test_idle_by_timer, test_teardown),
        cmocka_unit_test_teardown(test_grace_then_offline, test_teardown),
        cmocka_unit_test_teardown(test_grace_after_late_disconnect, test_teardown),
        cmocka_unit_test_teardown(test_reconnect_within_grace, test_teardown),
        cmocka_unit_test_teardown(test_timers_reload, test_teardown),
        cmocka_unit_test(test_no_policy_shows_all),
        cmocka_unit_test(test_audiences),
        cmocka_unit_test(test_allow_and_deny_lists),
        cmocka_unit_test(test_reciprocal),
        cmocka_unit_test(test_invisible),
        cmocka_unit_test(test_policy_creates_user),
        cmocka_unit_test(test_user_errors),
        cmocka_unit_test(test_set_privacy_errors),
        cmocka_unit_test_teardown(test_exceptions_capacity, test_teardown),
        cmocka_unit_test_teardown(test_policy_survives_restart, test_teardown),
        cmocka_unit_test(test_typing_list),
        cmocka_unit_test(test_typing_ttl_and_extend),
        cmocka_unit_test(test_typing_moves),
        cmocka_unit_test(test_typing_ends_with_connection),
        cmocka_unit_test(test_typing_dedupe),
        cmocka_unit_test(test_typing_is_interaction),
        cmocka_unit_test(test_typing_errors),
        cmocka_unit_test_teardown(test_typing_records_reclaimed, test_teardown),
    };
    return cmocka_run_group_tests_name("user", tests, group_setup, group_teardown);
}
