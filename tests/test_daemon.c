/*
 * test_daemon.c - presenced as its users see it: its command line and
 * config file, one daemon per name, shutdown and restart, gateway death,
 * eviction, and the permissions of the files it creates.
 *
 * Every test starts its own store (the daemon is the subject); the teardown
 * kills any child the test forked and removes the store, also when the
 * test failed midway.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "harness.h"
#include "presence.h"

#define TOL_MS     2000
#define LONG_TTL   600000u
/* API.md: a dead gateway's devices stop being connected within 1 s; the
 * deadline leaves room for a loaded machine. */
#define DEATH_MS   3000
#define WAIT_MS    5000
#define START_MS   10000

/* A store that starts in milliseconds; the default capacity (1M devices,
 * ~500 MB of records to lay out) takes a second or more, so only the tests
 * about defaults use it. */
static const char *const SMALL[] = { "--capacity", "4096", NULL };

static th_store_t S;
static pid_t kids[8];
static int nkids;
static char cfg_path[320];

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

static int teardown(void **state)
{
    (void)state;
    th_kill_children(kids, (size_t)nkids);
    nkids = 0;
    if (S.dir[0])
        th_store_destroy(&S);
    memset(&S, 0, sizeof S);
    if (cfg_path[0]) {
        unlink(cfg_path);
        cfg_path[0] = '\0';
    }
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

static pres_device_info_t dev(pres_t *p, const char *id)
{
    pres_device_info_t d;
    int rc = pres_device(p, id, &d);
    if (rc != 0)
        fail_msg("pres_device(%s) = %d (%s)", id, rc, pres_strerror(rc));
    return d;
}

static pres_stats_t stats(pres_t *p)
{
    pres_stats_t st;
    assert_rc(pres_stats(p, &st), 0);
    return st;
}

/* Devices that must all read as not connected. */
struct offline_arg { pres_t *p; const char *const *ids; };

static int all_offline(void *arg)
{
    struct offline_arg *a = arg;
    for (size_t i = 0; a->ids[i]; i++) {
        pres_device_info_t d;
        if (pres_device(a->p, a->ids[i], &d) != 0 || d.connected)
            return 0;
    }
    return 1;
}

static void wait_all_offline(pres_t *p, const char *const *ids, int ms)
{
    struct offline_arg a = { p, ids };
    if (!th_wait_until(all_offline, &a, ms)) {
        for (size_t i = 0; ids[i]; i++) {
            pres_device_info_t d;
            int rc = pres_device(p, ids[i], &d);
            fprintf(stderr, "  %s: rc %d connected %d\n", ids[i], rc,
                    rc == 0 ? d.connected : -1);
        }
        fail_msg("devices still connected after %d ms", ms);
    }
}

struct gone_arg { pres_t *p; const char *const *ids; };

static int all_gone(void *arg)
{
    struct gone_arg *a = arg;
    for (size_t i = 0; a->ids[i]; i++) {
        pres_device_info_t d;
        if (pres_device(a->p, a->ids[i], &d) != -ENOENT)
            return 0;
    }
    return 1;
}

/* A gateway process: attaches its gateways, connects its devices (each
 * device i on gateway i % ngw), says so on the pipe, and waits to die. */
struct gw_child {
    const char        *name;
    const char *const *gws;     /* NULL-terminated */
    const char *const *devs;    /* NULL-terminated */
    int                ready_fd;
};

static int gw_child_main(void *arg)
{
    struct gw_child *c = arg;
    prctl(PR_SET_PDEATHSIG, SIGKILL);   /* never outlive the test */
    pres_t *p = NULL;
    if (pres_open(&p, c->name, PRES_RDWR) != 0)
        return 10;
    size_t ngw = 0;
    for (; c->gws[ngw]; ngw++)
        if (pres_gateway_attach(p, c->gws[ngw]) != 0)
            return 11;
    for (size_t i = 0; c->devs[i]; i++)
        if (pres_connect(p, "gwc_user", c->devs[i], c->gws[i % ngw],
                         LONG_TTL, NULL) != 0)
            return 12;
    if (write(c->ready_fd, "R", 1) != 1)
        return 13;
    for (;;)
        pause();
}

/* Fork a gateway child and wait (<= 10 s) until its devices are connected. */
static pid_t spawn_gateway(const char *const *gws, const char *const *devs)
{
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    struct gw_child c = { S.name, gws, devs, fds[1] };
    pid_t pid = th_fork(gw_child_main, &c);
    assert_true(pid > 0);
    kids[nkids++] = pid;
    close(fds[1]);
    struct pollfd pfd = { fds[0], POLLIN, 0 };
    char b = 0;
    int ok = poll(&pfd, 1, START_MS) == 1 && read(fds[0], &b, 1) == 1 && b == 'R';
    close(fds[0]);
    if (!ok)
        fail_msg("gateway child did not get ready (exit %d)",
                 th_wait_child(pid, 1000));
    return pid;
}

static void kill_kid(pid_t pid)
{
    assert_int_equal(kill(pid, SIGKILL), 0);
    assert_int_equal(th_wait_child(pid, 5000), 128 + SIGKILL);
    for (int i = 0; i < nkids; i++)
        if (kids[i] == pid)
            kids[i] = 0;
}

static int daemon_alive(void)
{
    int st;
    return S.pid > 0 && waitpid(S.pid, &st, WNOHANG) == 0;
}

/* ------------------------------------------------------------------------ */
/* Command line                                                              */

static void test_second_daemon_refused(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    assert_rc(pres_connect(p, "sd_u", "sd_d", "sd_gw", LONG_TTL, NULL), 0);

    char db2[320], err[4096];
    snprintf(db2, sizeof db2, "%s/db2", S.dir);
    const char *other_db[] = { "--foreground", "--name", S.name, "--db", db2, NULL };
    const char *same_db[] = { "--foreground", "--name", S.name, "--db", S.db, NULL };

    err[0] = '\0';
    assert_int_equal(th_daemon_run_expect_exit(other_db, START_MS, err, sizeof err), 1);
    if (strlen(err) < 5)
        fail_msg("no message from the refused daemon: \"%s\"", err);
    err[0] = '\0';
    assert_int_equal(th_daemon_run_expect_exit(same_db, START_MS, err, sizeof err), 1);
    if (strlen(err) < 5)
        fail_msg("no message from the refused daemon: \"%s\"", err);

    /* The first daemon and its store are untouched. */
    assert_true(daemon_alive());
    pres_device_info_t d = dev(p, "sd_d");
    assert_int_equal(d.connected, 1);
    pres_t *q = open_h(PRES_RDONLY);
    assert_int_equal(dev(q, "sd_d").connected, 1);
    pres_close(q);
    pres_close(p);
    assert_int_equal(th_daemon_stop(&S), 0);
}

static void expect_usage(const char *const *args, const char *what)
{
    char err[4096] = "";
    int rc = th_daemon_run_expect_exit(args, START_MS, err, sizeof err);
    if (rc != 2)
        fail_msg("%s: exit status %d, expected 2 (stderr: %s)", what, rc, err);
    if (strlen(err) < 5)
        fail_msg("%s: no message on stderr", what);
}

static void test_bad_usage(void **state)
{
    (void)state;
    start(SMALL);   /* for its directory: PRESENCE_SHM_DIR points there */
    char name[80], db[320], n64[65];
    snprintf(name, sizeof name, "%s_bad", S.name);
    snprintf(db, sizeof db, "%s/dbbad", S.dir);
    memset(n64, 'n', 64);
    n64[64] = '\0';

#define USAGE(...) do {                                                      \
        const char *a_[] = { "--foreground", "--db", db, __VA_ARGS__, NULL }; \
        expect_usage(a_, #__VA_ARGS__);                                      \
    } while (0)
    USAGE("--name", name, "--no-such-option");
    USAGE("--name", name, "--capacity", "abc");
    USAGE("--name", name, "--capacity", "-5");
    USAGE("--name", name, "--capacity", "12abc");
    USAGE("--name", name, "--capacity", "");
    USAGE("--name", name, "--idle-after-ms", "soon");
    USAGE("--name", name, "--retain-ms", "-1");
    USAGE("--name", name, "--capacity");   /* missing value */
    USAGE("--name", "");
    USAGE("--name", ".hidden");
    USAGE("--name", "a/b");
    USAGE("--name", "a b");
    USAGE("--name", n64);
#undef USAGE

    /* The same rules in a config file. */
    snprintf(cfg_path, sizeof cfg_path, "%s/bad.conf", S.dir);
    static const char *const bad_cfg[] = {
        "no-such-key = 1\n",
        "capacity = lots\n",
        "idle-after-ms = soon\n",
        "retain-ms = 10 20\n",
    };
    for (size_t i = 0; i < sizeof bad_cfg / sizeof bad_cfg[0]; i++) {
        FILE *f = fopen(cfg_path, "w");
        assert_non_null(f);
        fputs(bad_cfg[i], f);
        fclose(f);
        const char *a[] = { "--foreground", "--db", db, "--name", name,
                            "--config", cfg_path, NULL };
        expect_usage(a, bad_cfg[i]);
    }
    cfg_path[0] = '\0';

    /* None of them disturbed the running one. */
    assert_true(daemon_alive());
}

struct idle_arg { pres_t *p; const char *id; };

static int went_idle(void *arg)
{
    struct idle_arg *a = arg;
    pres_device_info_t d;
    return pres_device(a->p, a->id, &d) == 0 && d.connected && !d.active;
}

static void test_config_file(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(cfg_path, sizeof cfg_path, "%s/prescfg.XXXXXX",
             tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemp(cfg_path);
    assert_true(fd >= 0);
    static const char cfg[] =
        "# presenced test configuration\n"
        "\n"
        "capacity = 5000   # device records\n"
        "   # an indented comment: idle-after-ms = 600000\n"
        "idle-after-ms = 200\n"
        "#retain-ms = 1\n";
    assert_int_equal(write(fd, cfg, sizeof cfg - 1), (ssize_t)(sizeof cfg - 1));
    close(fd);

    /* The file alone. */
    const char *a1[] = { "--config", cfg_path, NULL };
    start(a1);
    pres_t *p = open_h(PRES_RDWR);
    pres_stats_t st = stats(p);
    if (st.capacity < 5000 || st.capacity >= 100000)
        fail_msg("capacity %llu: the config file's 5000 was not applied",
                 (unsigned long long)st.capacity);
    /* idle-after-ms = 200: a connected device with no interaction for
     * 200 ms counts as idle. */
    assert_rc(pres_connect(p, "cf_u", "cf_d", "cf_gw", LONG_TTL, NULL), 0);
    struct idle_arg ia = { p, "cf_d" };
    assert_true(th_wait_until(went_idle, &ia, WAIT_MS));
    pres_close(p);
    th_store_destroy(&S);
    memset(&S, 0, sizeof S);

    /* The command line wins over the file; the rest of the file holds. */
    const char *a2[] = { "--config", cfg_path, "--capacity", "100000", NULL };
    start(a2);
    p = open_h(PRES_RDWR);
    st = stats(p);
    if (st.capacity < 100000)
        fail_msg("capacity %llu: the command line's 100000 lost to the file",
                 (unsigned long long)st.capacity);
    assert_rc(pres_connect(p, "cf_u", "cf_d", "cf_gw", LONG_TTL, NULL), 0);
    ia.p = p;
    assert_true(th_wait_until(went_idle, &ia, WAIT_MS));
    pres_close(p);
}

/* SIGHUP reloads what can change on a running store: with idle-after-ms
 * at ten minutes a device stays active; rewritten to 100 ms and reloaded,
 * the same device, untouched, turns idle. */
static void test_sighup_reloads(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(cfg_path, sizeof cfg_path, "%s/prescfg.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemp(cfg_path);
    assert_true(fd >= 0);
    static const char before[] = "idle-after-ms = 600000\n";
    assert_int_equal(write(fd, before, sizeof before - 1), (ssize_t)(sizeof before - 1));
    close(fd);
    const char *args[] = { "--config", cfg_path, NULL };
    start(args);
    pres_t *p = open_h(PRES_RDWR);
    assert_rc(pres_connect(p, "hup_u", "hup_d", "hup_gw", LONG_TTL, NULL), 0);
    struct idle_arg ia = { p, "hup_d" };
    assert_false(th_wait_until(went_idle, &ia, 300));

    FILE *f = fopen(cfg_path, "w");
    assert_non_null(f);
    fputs("idle-after-ms = 100   # reloaded\n", f);
    fclose(f);
    assert_int_equal(kill(S.pid, SIGHUP), 0);
    assert_true(th_wait_until(went_idle, &ia, WAIT_MS));
    assert_true(daemon_alive());
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Shutdown and restart                                                      */

static void test_sigterm_leaves_store_usable(void **state)
{
    (void)state;
    start(NULL);
    pres_t *p = open_h(PRES_RDWR);
    pres_t *r = open_h(PRES_RDONLY);
    assert_rc(pres_connect(p, "st_u", "st_d1", "st_gw", LONG_TTL, NULL), 0);

    assert_int_equal(th_daemon_stop(&S), 0);

    /* Open handles read and write without the daemon. */
    assert_int_equal(dev(r, "st_d1").connected, 1);
    assert_rc(pres_connect(p, "st_u", "st_d2", "st_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_heartbeat(p, "st_d1", LONG_TTL), 0);
    assert_rc(pres_set_activity(p, "st_d1", PRES_IDLE), 0);
    size_t n = 0;
    assert_rc(pres_route(r, "st_u", NULL, 0, &n), 0);
    assert_int_equal(n, 2);
    assert_rc(pres_disconnect(p, "st_d2"), 0);
    assert_int_equal(dev(r, "st_d2").connected, 0);
    pres_stats_t st = stats(r);
    assert_int_equal(st.connects, 2);
    assert_int_equal(st.disconnects, 1);

    /* New clients attach too: the store is left usable. */
    pres_t *q = open_h(PRES_RDONLY);
    assert_int_equal(dev(q, "st_d1").connected, 1);
    pres_close(q);
    q = open_h(PRES_RDWR);
    assert_rc(pres_connect(q, "st_u", "st_d3", "st_gw", LONG_TTL, NULL), 0);
    pres_close(q);
    assert_int_equal(dev(r, "st_d3").connected, 1);

    pres_close(r);
    pres_close(p);
}

static void check_adopted(pres_t *p, const pres_stats_t *before,
                          const pres_device_info_t *d2_before)
{
    pres_device_info_t d1 = dev(p, "ra_d1");
    assert_int_equal(d1.connected, 1);
    assert_string_equal(d1.gateway_id, "ra_gw");
    assert_string_equal(d1.user_id, "ra_u");
    pres_device_info_t d2 = dev(p, "ra_d2");
    assert_int_equal(d2.connected, 0);
    assert_int_equal(d2.last_seen_ms, d2_before->last_seen_ms);
    pres_stats_t st = stats(p);
    assert_int_equal(st.connects, before->connects);
    assert_int_equal(st.heartbeats, before->heartbeats);
    assert_int_equal(st.disconnects, before->disconnects);
    assert_int_equal(st.devices, before->devices);
    assert_int_equal(st.users, before->users);
    assert_int_equal(st.capacity, before->capacity);
    assert_true(st.events >= before->events);
}

static void test_restart_adopts_region(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    assert_rc(pres_connect(p, "ra_u", "ra_d1", "ra_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(p, "ra_u", "ra_d2", "ra_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_heartbeat(p, "ra_d1", LONG_TTL), 0);
    assert_rc(pres_disconnect(p, "ra_d2"), 0);
    pres_device_info_t d2 = dev(p, "ra_d2");
    pres_stats_t before = stats(p);
    assert_int_equal(before.connects, 2);

    /* A clean stop and start. */
    assert_int_equal(th_daemon_stop(&S), 0);
    assert_int_equal(th_daemon_start(&S, SMALL), 0);
    check_adopted(p, &before, &d2);
    pres_t *q = open_h(PRES_RDONLY);
    check_adopted(q, &before, &d2);
    pres_close(q);

    /* A crash and start. */
    th_daemon_kill(&S);
    assert_int_equal(th_daemon_start(&S, SMALL), 0);
    q = open_h(PRES_RDONLY);
    check_adopted(q, &before, &d2);
    pres_close(q);

    /* And the adopted store takes writes as before. */
    assert_rc(pres_heartbeat(p, "ra_d1", LONG_TTL), 0);
    assert_rc(pres_connect(p, "ra_u", "ra_d3", "ra_gw", LONG_TTL, NULL), 0);
    assert_int_equal(stats(p).connects, before.connects + 1);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Gateway death                                                             */

static void test_gateway_death_sigkill(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    static const char *const gws[] = { "gd_gwx", NULL };
    static const char *const devs[] = { "gd_x1", "gd_x2", "gd_x3", NULL };
    pid_t kid = spawn_gateway(gws, devs);
    /* A device on gw_x connected by another process is gw_x's as well. */
    assert_rc(pres_connect(p, "gd_u", "gd_x4", "gd_gwx", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(p, "gd_u", "gd_y1", "gd_gwy", LONG_TTL, NULL), 0);
    pres_stats_t s0 = stats(p);

    uint64_t t_kill = pres_now_ms();
    uint64_t m_kill = th_mono_ms();
    kill_kid(kid);
    static const char *const dead[] = { "gd_x1", "gd_x2", "gd_x3", "gd_x4", NULL };
    wait_all_offline(p, dead, DEATH_MS);
    uint64_t t_seen = pres_now_ms();
    fprintf(stderr, "  gateway death noticed after %llu ms\n",
            (unsigned long long)(th_mono_ms() - m_kill));

    for (size_t i = 0; dead[i]; i++) {
        pres_device_info_t d = dev(p, dead[i]);
        assert_int_equal(d.active, 0);
        assert_string_equal(d.gateway_id, "gd_gwx");
        /* Last seen: the moment the death was detected. */
        if (d.last_seen_ms + 100 < t_kill || d.last_seen_ms > t_seen + 100)
            fail_msg("%s: last seen %llu outside [%llu, %llu]", dead[i],
                     (unsigned long long)d.last_seen_ms,
                     (unsigned long long)t_kill, (unsigned long long)t_seen);
    }
    assert_int_equal(dev(p, "gd_y1").connected, 1);
    size_t n = 0;
    assert_rc(pres_route(p, "gwc_user", NULL, 0, &n), 0);
    assert_int_equal(n, 0);
    assert_rc(pres_route(p, "gd_u", NULL, 0, &n), 0);
    assert_int_equal(n, 1);

    pres_stats_t s1 = stats(p);
    assert_int_equal(s1.gateway_deaths, s0.gateway_deaths + 1);
    assert_true(s1.expirations >= s0.expirations + 4);
    assert_int_equal(s1.disconnects, s0.disconnects);
    pres_close(p);
}

static void test_gateway_close(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDWR);
    pres_t *g = open_h(PRES_RDWR);
    assert_rc(pres_gateway_attach(g, "gc_gw"), 0);
    assert_rc(pres_connect(g, "gc_u", "gc_d1", "gc_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(p, "gc_u", "gc_d2", "gc_gw", LONG_TTL, NULL), 0);
    assert_rc(pres_connect(g, "gc_u", "gc_d3", "gc_other", LONG_TTL, NULL), 0);
    pres_stats_t s0 = stats(p);

    uint64_t t_close = pres_now_ms();
    pres_close(g);
    static const char *const gone[] = { "gc_d1", "gc_d2", NULL };
    wait_all_offline(p, gone, DEATH_MS);
    uint64_t t_seen = pres_now_ms();
    for (size_t i = 0; gone[i]; i++) {
        pres_device_info_t d = dev(p, gone[i]);
        assert_true(d.last_seen_ms + 100 >= t_close && d.last_seen_ms <= t_seen + 100);
    }
    /* Only the attached gateway's devices end. */
    assert_int_equal(dev(p, "gc_d3").connected, 1);
    pres_stats_t s1 = stats(p);
    assert_int_equal(s1.gateway_deaths, s0.gateway_deaths + 1);
    assert_true(s1.expirations >= s0.expirations + 2);
    pres_close(p);
}

static void test_gateway_takeover(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *p = open_h(PRES_RDONLY);
    /* Process A attaches gt_shared and gt_own, a device on each. */
    static const char *const gws[] = { "gt_shared", "gt_own", NULL };
    static const char *const devs[] = { "gt_d_shared", "gt_d_own", NULL };
    pid_t a = spawn_gateway(gws, devs);

    /* This process takes gt_shared over. */
    pres_t *b = open_h(PRES_RDWR);
    assert_rc(pres_gateway_attach(b, "gt_shared"), 0);
    pres_stats_t s0 = stats(p);

    kill_kid(a);
    /* A's death is handled once its own gateway's device goes ... */
    static const char *const own[] = { "gt_d_own", NULL };
    wait_all_offline(p, own, DEATH_MS);
    pres_stats_t s1 = stats(p);
    assert_int_equal(s1.gateway_deaths, s0.gateway_deaths + 1);
    /* ... while the taken-over gateway's device stays. */
    assert_int_equal(dev(p, "gt_d_shared").connected, 1);

    /* The new owner's close ends it. */
    pres_close(b);
    static const char *const shared[] = { "gt_d_shared", NULL };
    wait_all_offline(p, shared, DEATH_MS);
    assert_int_equal(stats(p).gateway_deaths, s0.gateway_deaths + 2);
    pres_close(p);
}

static void test_gateway_death_while_daemon_down(void **state)
{
    (void)state;
    start(SMALL);
    static const char *const gws[] = { "gz_gw", NULL };
    static const char *const devs[] = { "gz_d1", "gz_d2", NULL };
    pid_t kid = spawn_gateway(gws, devs);
    pres_t *p = open_h(PRES_RDONLY);
    pres_stats_t s0 = stats(p);

    assert_int_equal(th_daemon_stop(&S), 0);
    kill_kid(kid);
    /* Nobody to notice: the next daemon does, within 1 s of its start. */
    assert_int_equal(th_daemon_start(&S, SMALL), 0);
    wait_all_offline(p, devs, DEATH_MS);
    pres_stats_t s1 = stats(p);
    assert_int_equal(s1.gateway_deaths, s0.gateway_deaths + 1);
    assert_true(s1.expirations >= s0.expirations + 2);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Eviction                                                                  */

struct evict_arg { pres_t *p; uint64_t want; };

static int evictions_reach(void *arg)
{
    struct evict_arg *a = arg;
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.evictions >= a->want;
}

struct dev_count_arg { pres_t *p; uint64_t want; };

static int devices_are(void *arg)
{
    struct dev_count_arg *a = arg;
    pres_stats_t st;
    return pres_stats(a->p, &st) == 0 && st.devices == a->want;
}

static void wait_devices(struct dev_count_arg *a)
{
    if (!th_wait_until(devices_are, a, WAIT_MS))
        fail_msg("stats.devices is %llu, expected %llu",
                 (unsigned long long)stats(a->p).devices,
                 (unsigned long long)a->want);
}

static void test_eviction(void **state)
{
    (void)state;
    const char *args[] = { "--retain-ms", "200", NULL };
    start(args);
    pres_t *p = open_h(PRES_RDWR);
    pres_ref_t ref = 0;
    assert_rc(pres_connect(p, "ev_u", "ev_disc", "ev_gw", LONG_TTL, &ref), 0);
    assert_rc(pres_connect(p, "ev_u", "ev_exp", "ev_gw", 100, NULL), 0);
    assert_rc(pres_connect(p, "ev_u", "ev_keep", "ev_gw", LONG_TTL, NULL), 0);
    /* stats.devices may lag by the daemon's pass (test_api holds it to
     * "at once"); here it is only a witness of eviction. */
    struct dev_count_arg dc = { p, 3 };
    wait_devices(&dc);
    pres_stats_t s0 = stats(p);
    assert_rc(pres_disconnect(p, "ev_disc"), 0);

    /* Offline (disconnected or expired) longer than --retain-ms: gone. */
    static const char *const gone[] = { "ev_disc", "ev_exp", NULL };
    struct gone_arg ga = { p, gone };
    if (!th_wait_until(all_gone, &ga, WAIT_MS))
        fail_msg("offline devices not evicted within %d ms", WAIT_MS);
    struct evict_arg ea = { p, s0.evictions + 2 };
    assert_true(th_wait_until(evictions_reach, &ea, WAIT_MS));
    dc.want = 1;
    wait_devices(&dc);

    /* A connected device stays, and so does its route. */
    assert_int_equal(dev(p, "ev_keep").connected, 1);
    size_t n = 0;
    assert_rc(pres_route(p, "ev_u", NULL, 0, &n), 0);
    assert_int_equal(n, 1);

    /* Handles to an evicted device are stale; the id can come back. */
    assert_rc(pres_heartbeat_ref(p, ref, 1000), -ESTALE);
    assert_rc(pres_heartbeat(p, "ev_disc", 1000), -ENOENT);
    assert_rc(pres_connect(p, "ev_u", "ev_disc", "ev_gw", LONG_TTL, NULL), 0);
    assert_int_equal(dev(p, "ev_disc").connected, 1);
    dc.want = 2;
    wait_devices(&dc);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Files and handles                                                         */

static void test_region_permissions(void **state)
{
    (void)state;
    /* With no umask to hide behind, the modes are the daemon's own. */
    mode_t old = umask(0);
    int rc = th_store_start(&S, NULL);
    umask(old);
    assert_int_equal(rc, 0);

    char prefix[80];
    snprintf(prefix, sizeof prefix, "presence.%s", S.name);
    DIR *d = opendir(S.dir);
    assert_non_null(d);
    struct dirent *e;
    int files = 0;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0)
            continue;
        char path[600];
        snprintf(path, sizeof path, "%s/%s", S.dir, e->d_name);
        struct stat st;
        assert_int_equal(lstat(path, &st), 0);
        if (S_ISLNK(st.st_mode))
            fail_msg("%s is a symbolic link", e->d_name);
        if (st.st_uid != getuid())
            fail_msg("%s is owned by uid %d", e->d_name, (int)st.st_uid);
        if (st.st_mode & S_IWOTH)
            fail_msg("%s is world-writable (mode %o)", e->d_name,
                     (unsigned)(st.st_mode & 07777));
        if (S_ISREG(st.st_mode)) {
            files++;
            if ((st.st_mode & 07777) != 0660)
                fail_msg("%s has mode %o, expected 660", e->d_name,
                         (unsigned)(st.st_mode & 07777));
        }
    }
    closedir(d);
    assert_true(files > 0);
}

static void test_rdonly_handle_cannot_write(void **state)
{
    (void)state;
    start(SMALL);
    pres_t *w = open_h(PRES_RDWR);
    pres_ref_t ref = 0;
    assert_rc(pres_connect(w, "rw_u", "rw_d", "rw_gw", LONG_TTL, &ref), 0);
    pres_t *r = open_h(PRES_RDONLY);
    assert_rc(pres_connect(r, "rw_u", "rw_d2", "rw_gw", LONG_TTL, NULL), -EROFS);
    assert_rc(pres_heartbeat(r, "rw_d", 1), -EROFS);
    assert_rc(pres_heartbeat_ref(r, ref, 1), -EROFS);
    assert_rc(pres_disconnect(r, "rw_d"), -EROFS);
    assert_rc(pres_disconnect_ref(r, ref), -EROFS);
    assert_rc(pres_gateway_attach(r, "rw_gw"), -EROFS);
    assert_rc(pres_set_activity(r, "rw_d", PRES_IDLE), -EROFS);
    pres_device_info_t d = dev(r, "rw_d");
    assert_int_equal(d.connected, 1);
    assert_int_equal(d.active, 1);
    assert_rc(pres_device(r, "rw_d2", &d), -ENOENT);
    assert_rc(pres_report_stale(r, "rw_d"), 0);
    pres_close(r);
    pres_close(w);
}

int main(void)
{
#define T(f) cmocka_unit_test_teardown(f, teardown)
    const struct CMUnitTest tests[] = {
        T(test_second_daemon_refused),
        T(test_bad_usage),
        T(test_config_file),
        T(test_sighup_reloads),
        T(test_sigterm_leaves_store_usable),
        T(test_restart_adopts_region),
        T(test_gateway_death_sigkill),
        T(test_gateway_close),
        T(test_gateway_takeover),
        T(test_gateway_death_while_daemon_down),
        T(test_eviction),
        T(test_region_permissions),
        T(test_rdonly_handle_cannot_write),
    };
#undef T
    return cmocka_run_group_tests_name("daemon", tests, NULL, NULL);
}
