/*
 * test_events.c - the change feed as its watchers see it (API.md, "The
 * change feed"): every kind of event, produced and received with the
 * right fields; the status events only when a user's status really
 * changes; pres_watch's cursor, timeouts and overflow; read-only handles;
 * many watchers at once; a writer killed or stopped in the middle of an
 * append; and the lag of expiry events over thousands of devices.
 *
 * Every test starts its own store (small, with short grace and idle times
 * where the test needs them); the teardown kills any child and removes it.
 * Times are asserted only against generous bounds.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "harness.h"
#include "presence.h"
#include "store.h"

#define WAIT_MS    5000      /* an event that must come: a loaded machine's bound */
#define QUIET_MS   400       /* an event that must not come, looked for this long */
#define LONG_TTL   600000u

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

/* A small store; extra arguments after the defaults (NULL-terminated). */
static void start(const char *a0, const char *a1, const char *a2, const char *a3)
{
    const char *args[12] = { "--capacity", "4096", "--offline-grace-ms", "200" };
    int n = 4;
    const char *more[] = { a0, a1, a2, a3 };
    for (int k = 0; k < 4 && more[k]; k++)
        args[n++] = more[k];
    args[n] = NULL;
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

static const char *kind_name(int k)
{
    static const char *const n[] = { "?", "connect", "disconnect", "expire", "user_status",
                                     "typing", "typing_stop", "lost" };
    return k >= 0 && k <= PRES_EV_LOST ? n[k] : "?";
}

static void print_ev(const char *why, const pres_event_t *e)
{
    fprintf(stderr, "%s: seq %llu %s user '%s' device '%s' gateway '%s' conv '%s' status %d\n",
            why, (unsigned long long)e->seq, kind_name(e->kind), e->user_id, e->device_id,
            e->gateway_id, e->conversation_id, e->status);
}

/* The next event, which must come within WAIT_MS and carry seq *cur. */
static pres_event_t next_ev(pres_t *p, uint64_t *cur)
{
    pres_event_t e;
    uint64_t want = *cur;
    int rc = pres_watch(p, cur, &e, WAIT_MS);
    if (rc != 0)
        fail_msg("pres_watch at seq %llu: %d (%s)", (unsigned long long)want, rc,
                 pres_strerror(rc));
    if (e.seq != want || *cur != want + 1)
        fail_msg("pres_watch gave seq %llu (cursor now %llu), expected %llu",
                 (unsigned long long)e.seq, (unsigned long long)*cur, (unsigned long long)want);
    uint64_t now = pres_now_ms();
    if (e.at_ms + 60000 < now || e.at_ms > now + 1000)
        fail_msg("event %llu at %llu ms, now is %llu", (unsigned long long)e.seq,
                 (unsigned long long)e.at_ms, (unsigned long long)now);
    return e;
}

/* The next event must be this one (NULL: the field is not checked; ""
 * must be empty). */
static pres_event_t expect(pres_t *p, uint64_t *cur, int kind, const char *user,
                           const char *dev, const char *gw)
{
    pres_event_t e = next_ev(p, cur);
    if (e.kind != kind || (user && strcmp(e.user_id, user)) || (dev && strcmp(e.device_id, dev)) ||
        (gw && strcmp(e.gateway_id, gw))) {
        print_ev("got", &e);
        fail_msg("expected %s of user '%s' device '%s' gateway '%s'", kind_name(kind),
                 user ? user : "*", dev ? dev : "*", gw ? gw : "*");
    }
    if (kind != PRES_EV_TYPING && kind != PRES_EV_TYPING_STOP && e.conversation_id[0])
        fail_msg("a %s event with conversation '%s'", kind_name(kind), e.conversation_id);
    if (kind != PRES_EV_USER_STATUS && e.status != 0)
        fail_msg("a %s event with status %d", kind_name(kind), e.status);
    return e;
}

static void expect_status(pres_t *p, uint64_t *cur, const char *user, int status)
{
    pres_event_t e = expect(p, cur, PRES_EV_USER_STATUS, user, "", "");
    if (e.status != status) {
        print_ev("got", &e);
        fail_msg("user %s: status %d, expected %d", user, e.status, status);
    }
}

/* Nothing within ms. */
static void expect_quiet(pres_t *p, uint64_t *cur, int ms)
{
    pres_event_t e;
    uint64_t at = *cur;
    int rc = pres_watch(p, cur, &e, ms);
    if (rc == 0)
        print_ev("unexpected", &e);
    assert_rc(rc, -ETIMEDOUT);
    assert_int_equal(*cur, at);
}

static uint64_t cursor_now(pres_t *p)
{
    uint64_t c = 0;
    pres_event_t e;
    assert_rc(pres_watch(p, &c, &e, 0), -ETIMEDOUT);
    return c;
}

static pres_stats_t stats(pres_t *p)
{
    pres_stats_t st;
    assert_rc(pres_stats(p, &st), 0);
    return st;
}

struct dev_arg { pres_t *p; const char *id; int connected; };

static int dev_is(void *arg)
{
    struct dev_arg *a = arg;
    pres_device_info_t d;
    return pres_device(a->p, a->id, &d) == 0 && d.connected == a->connected;
}

static void wait_dev(pres_t *p, const char *id, int connected)
{
    struct dev_arg a = { p, id, connected };
    if (!th_wait_until(dev_is, &a, WAIT_MS))
        fail_msg("%s never became %s", id, connected ? "connected" : "disconnected");
}

/* ------------------------------------------------------------------------ */
/* Each kind of event                                                        */

static void test_connect_disconnect(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p);
    uint64_t t0 = pres_now_ms();
    assert_rc(pres_connect(p, "u1", "d1", "g1", LONG_TTL, NULL), 0);
    pres_event_t e = expect(p, &cur, PRES_EV_CONNECT, "u1", "d1", "g1");
    assert_true(e.at_ms + 1000 >= t0 && e.at_ms <= pres_now_ms() + 1000);
    expect_status(p, &cur, "u1", PRES_ACTIVE_NOW);
    /* Reconnected elsewhere: a CONNECT naming the new gateway. */
    assert_rc(pres_connect(p, "u1", "d1", "g2", LONG_TTL, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "u1", "d1", "g2");
    assert_rc(pres_disconnect(p, "d1"), 0);
    expect(p, &cur, PRES_EV_DISCONNECT, "u1", "d1", "g2");
    expect_status(p, &cur, "u1", PRES_OFFLINE);    /* after the 200 ms grace */
    /* A disconnect of a disconnected device ends nothing, says nothing. */
    assert_rc(pres_disconnect(p, "d1"), 0);
    expect_quiet(p, &cur, QUIET_MS);

    /* Through a handle; a stale handle ends nothing and says nothing. */
    pres_ref_t r1, r2;
    assert_rc(pres_connect(p, "u1", "d1", "g1", LONG_TTL, &r1), 0);
    expect(p, &cur, PRES_EV_CONNECT, "u1", "d1", "g1");
    expect_status(p, &cur, "u1", PRES_ACTIVE_NOW);
    assert_rc(pres_connect(p, "u1", "d1", "g3", LONG_TTL, &r2), 0);
    expect(p, &cur, PRES_EV_CONNECT, "u1", "d1", "g3");
    assert_rc(pres_disconnect_ref(p, r1), -ESTALE);
    expect_quiet(p, &cur, QUIET_MS);
    assert_rc(pres_disconnect_ref(p, r2), 0);
    expect(p, &cur, PRES_EV_DISCONNECT, "u1", "d1", "g3");
    expect_status(p, &cur, "u1", PRES_OFFLINE);

    /* A device moving to another user. */
    assert_rc(pres_connect(p, "u2", "d1", "g1", LONG_TTL, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "u2", "d1", "g1");
    expect_status(p, &cur, "u2", PRES_ACTIVE_NOW);

    pres_stats_t st = stats(p);
    assert_int_equal(st.events, cur - 1);
    pres_close(p);
}

static void test_expire_by_ttl(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p);
    pres_stats_t st0 = stats(p);
    assert_rc(pres_connect(p, "ue", "de", "ge", 500, NULL), 0);
    pres_device_info_t d;
    assert_rc(pres_device(p, "de", &d), 0);
    expect(p, &cur, PRES_EV_CONNECT, "ue", "de", "ge");
    /* Active (announced when the daemon saw the connect: on a loaded
     * machine that may be after the expiry, within the grace), one
     * expiry, then offline. */
    int active = 0, expired = 0;
    for (;;) {
        pres_event_t e = next_ev(p, &cur);
        if (e.kind == PRES_EV_EXPIRE) {
            assert_string_equal(e.device_id, "de");
            assert_string_equal(e.user_id, "ue");
            assert_string_equal(e.gateway_id, "ge");
            /* Announced after the TTL passed, and (generously) soon after. */
            assert_true(e.at_ms >= d.expires_at_ms);
            assert_true(e.at_ms < d.expires_at_ms + 2000);
            expired++;
            continue;
        }
        assert_int_equal(e.kind, PRES_EV_USER_STATUS);
        assert_string_equal(e.user_id, "ue");
        if (e.status == PRES_OFFLINE)
            break;
        assert_int_equal(e.status, PRES_ACTIVE_NOW);
        active++;
    }
    assert_int_equal(active, 1);
    assert_int_equal(expired, 1);
    assert_int_equal(stats(p).expirations, st0.expirations + 1);
    /* Once: nothing more, and a disconnect of the expired device neither. */
    expect_quiet(p, &cur, QUIET_MS);
    assert_rc(pres_disconnect(p, "de"), 0);
    expect_quiet(p, &cur, QUIET_MS);
    assert_int_equal(stats(p).expirations, st0.expirations + 1);
    pres_close(p);
}

/* A heartbeat makes no event; a late one (the TTL had passed) revives the
 * device: the expiry (once, whoever saw it first), then a CONNECT. */
static void test_heartbeats(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p);
    pres_ref_t ref;
    assert_rc(pres_connect(p, "uh", "dh", "gh", 2000, &ref), 0);
    expect(p, &cur, PRES_EV_CONNECT, "uh", "dh", "gh");
    expect_status(p, &cur, "uh", PRES_ACTIVE_NOW);
    for (int k = 0; k < 20; k++) {
        assert_rc(pres_heartbeat(p, "dh", 2000), 0);
        assert_rc(pres_heartbeat_ref(p, ref, 2000), 0);
    }
    assert_rc(pres_heartbeat(p, "dh", 3000), 0);    /* a new TTL: no event either */
    expect_quiet(p, &cur, QUIET_MS);

    /* Late: before or after the daemon announced the expiry. */
    for (int round = 0; round < 2; round++) {
        assert_rc(pres_heartbeat_ref(p, ref, 100), 0);
        wait_dev(p, "dh", 0);
        if (round == 1)
            expect(p, &cur, PRES_EV_EXPIRE, "uh", "dh", "gh");
        uint64_t late0 = stats(p).late_heartbeats;
        assert_rc(pres_heartbeat_ref(p, ref, 2000), 0);
        assert_int_equal(stats(p).late_heartbeats, late0 + 1);
        int expires = round == 1, connects = 0;
        /* Status events may come between, the expiry always before the
         * CONNECT. */
        while (!connects) {
            pres_event_t e = next_ev(p, &cur);
            if (e.kind == PRES_EV_EXPIRE) {
                assert_int_equal(connects, 0);
                expires++;
            } else if (e.kind == PRES_EV_CONNECT) {
                assert_string_equal(e.device_id, "dh");
                assert_string_equal(e.gateway_id, "gh");
                connects++;
            } else if (e.kind != PRES_EV_USER_STATUS) {
                print_ev("unexpected", &e);
                fail();
            }
        }
        assert_int_equal(expires, 1);
        /* The revived device is connected; its status settles back. */
        pres_event_t e;
        while (pres_watch(p, &cur, &e, QUIET_MS) == 0)
            if (e.kind != PRES_EV_USER_STATUS) {
                print_ev("unexpected", &e);
                fail();
            }
    }
    pres_close(p);
}

/* A gateway's death, or the close of the handle that attached it, ends its
 * connections: one EXPIRE each. */
static int gw_child(void *arg)
{
    int fd = (int)(intptr_t)arg;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    pres_t *p = NULL;
    if (pres_open(&p, S.name, PRES_RDWR) != 0 || pres_gateway_attach(p, "gdead") != 0)
        return 10;
    for (int i = 0; i < 3; i++) {
        char dev[16];
        snprintf(dev, sizeof dev, "dd%d", i);
        if (pres_connect(p, "ud", dev, "gdead", LONG_TTL, NULL) != 0)
            return 11;
    }
    char c = 'r';
    if (write(fd, &c, 1) != 1)
        return 12;
    for (;;)
        pause();
}

static void test_expire_by_gateway_death(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDONLY);
    uint64_t cur = cursor_now(p);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = th_fork(gw_child, (void *)(intptr_t)fds[1]);
    assert_true(pid > 0);
    kids[nkids++] = pid;
    char c;
    assert_int_equal(read(fds[0], &c, 1), 1);
    int seen[3] = { 0, 0, 0 };
    for (int connects = 0; connects < 3;) {
        pres_event_t e = next_ev(p, &cur);
        if (e.kind == PRES_EV_USER_STATUS)
            continue;
        assert_int_equal(e.kind, PRES_EV_CONNECT);
        assert_string_equal(e.gateway_id, "gdead");
        connects++;
    }
    kill(pid, SIGKILL);
    assert_int_equal(th_wait_child(pid, 5000), 128 + SIGKILL);
    kids[--nkids] = 0;
    for (int got = 0; got < 3;) {
        pres_event_t e = next_ev(p, &cur);
        if (e.kind == PRES_EV_USER_STATUS)
            continue;
        if (e.kind != PRES_EV_EXPIRE || strcmp(e.gateway_id, "gdead") || strcmp(e.user_id, "ud")) {
            print_ev("got", &e);
            fail_msg("expected the dead gateway's expiries");
        }
        int i = e.device_id[2] - '0';
        assert_true(i >= 0 && i < 3);
        assert_int_equal(seen[i]++, 0);
        got++;
    }
    /* The user goes offline after the grace; nothing else. */
    pres_event_t e;
    int offline = 0;
    while (pres_watch(p, &cur, &e, QUIET_MS + 300) == 0) {
        assert_int_equal(e.kind, PRES_EV_USER_STATUS);
        offline = e.status == PRES_OFFLINE;
    }
    assert_true(offline);
    close(fds[0]);
    close(fds[1]);

    /* A close of the attaching handle: the same. */
    pres_t *g = open_h(PRES_RDWR);
    assert_rc(pres_gateway_attach(g, "gclose"), 0);
    assert_rc(pres_connect(g, "uc", "dc", "gclose", LONG_TTL, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "uc", "dc", "gclose");
    expect_status(p, &cur, "uc", PRES_ACTIVE_NOW);
    pres_close(g);
    expect(p, &cur, PRES_EV_EXPIRE, "uc", "dc", "gclose");
    expect_status(p, &cur, "uc", PRES_OFFLINE);
    pres_close(p);
}

/* Each expiry is announced once, also across a restart of the daemon: one
 * announced before the daemon was killed is not announced again, one that
 * passed while no daemon ran is announced by the next. */
static void test_expiry_once_across_restart(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p);
    assert_rc(pres_connect(p, "ur", "before", "gr", 200, NULL), 0);
    assert_rc(pres_connect(p, "ur", "keep", "gr", LONG_TTL, NULL), 0);
    int expired = 0;
    while (!expired) {
        pres_event_t e = next_ev(p, &cur);
        expired = e.kind == PRES_EV_EXPIRE;
        if (expired)
            assert_string_equal(e.device_id, "before");
    }
    th_daemon_kill(&S);
    assert_rc(pres_connect(p, "ur", "during", "gr", 100, NULL), 0);
    wait_dev(p, "during", 0);
    const char *args[] = { "--capacity", "4096", "--offline-grace-ms", "200", NULL };
    assert_int_equal(th_daemon_start(&S, args), 0);
    int during = 0;
    pres_event_t e;
    while (pres_watch(p, &cur, &e, 1000) == 0) {
        if (e.kind == PRES_EV_EXPIRE) {
            assert_string_equal(e.device_id, "during");
            during++;
        } else if (e.kind != PRES_EV_CONNECT && e.kind != PRES_EV_USER_STATUS) {
            print_ev("unexpected", &e);
            fail();
        }
    }
    assert_int_equal(during, 1);
    /* And once more: a restart announces nothing new. */
    assert_int_equal(th_daemon_stop(&S), 0);
    assert_int_equal(th_daemon_start(&S, args), 0);
    expect_quiet(p, &cur, 1000);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Status events: only real changes of the aggregate                         */

static void test_user_status_transitions(void **state)
{
    (void)state;
    start("--idle-after-ms", "1000", NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p);
    assert_rc(pres_connect(p, "us", "ds", "gs", LONG_TTL, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "us", "ds", "gs");
    expect_status(p, &cur, "us", PRES_ACTIVE_NOW);
    /* The idle timer: no interaction for 1 s. */
    expect_status(p, &cur, "us", PRES_IDLE_NOW);
    assert_rc(pres_set_activity(p, "ds", PRES_ACTIVE), 0);
    expect_status(p, &cur, "us", PRES_ACTIVE_NOW);
    assert_rc(pres_set_activity(p, "ds", PRES_IDLE), 0);
    expect_status(p, &cur, "us", PRES_IDLE_NOW);
    /* Idle already: a second IDLE changes nothing. */
    assert_rc(pres_set_activity(p, "ds", PRES_IDLE), 0);
    expect_quiet(p, &cur, QUIET_MS);
    assert_rc(pres_set_activity(p, "ds", PRES_ACTIVE), 0);
    expect_status(p, &cur, "us", PRES_ACTIVE_NOW);
    /* Offline only once the grace (200 ms) is over. */
    uint64_t t0 = pres_now_ms();
    assert_rc(pres_disconnect(p, "ds"), 0);
    expect(p, &cur, PRES_EV_DISCONNECT, "us", "ds", "gs");
    pres_event_t e = next_ev(p, &cur);
    assert_int_equal(e.kind, PRES_EV_USER_STATUS);
    assert_int_equal(e.status, PRES_OFFLINE);
    /* Times come from the coarse monotonic clock (4 ms steps). */
    assert_true(e.at_ms + 10 >= t0 + 200);
    pres_close(p);
}

/* Closing one of two devices is silent, and so is a reconnect within the
 * offline grace. */
static void test_status_silent(void **state)
{
    (void)state;
    const char *args[] = { "--capacity", "4096", "--offline-grace-ms", "1500", NULL };
    if (th_store_start(&S, args) != 0)
        fail_msg("the daemon did not start");
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p);
    assert_rc(pres_connect(p, "u2", "phone", "g", LONG_TTL, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "u2", "phone", "g");
    expect_status(p, &cur, "u2", PRES_ACTIVE_NOW);
    assert_rc(pres_connect(p, "u2", "laptop", "g", LONG_TTL, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "u2", "laptop", "g");
    expect_quiet(p, &cur, QUIET_MS);
    assert_rc(pres_disconnect(p, "laptop"), 0);
    expect(p, &cur, PRES_EV_DISCONNECT, "u2", "laptop", "g");
    expect_quiet(p, &cur, QUIET_MS);

    /* The last device goes and comes back within the grace: only the
     * device's own events, through and past the grace's end. */
    assert_rc(pres_disconnect(p, "phone"), 0);
    expect(p, &cur, PRES_EV_DISCONNECT, "u2", "phone", "g");
    assert_rc(pres_connect(p, "u2", "phone", "g", LONG_TTL, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "u2", "phone", "g");
    expect_quiet(p, &cur, 1500 + QUIET_MS);
    /* And a status event when it really changes. */
    assert_rc(pres_disconnect(p, "phone"), 0);
    expect(p, &cur, PRES_EV_DISCONNECT, "u2", "phone", "g");
    expect_status(p, &cur, "u2", PRES_OFFLINE);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Typing                                                                    */

static void expect_typing(pres_t *p, uint64_t *cur, int kind, const char *conv)
{
    pres_event_t e = expect(p, cur, kind, "ut", "dt", "gt");
    assert_string_equal(e.conversation_id, conv);
}

static void test_typing_stop(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p);
    assert_rc(pres_connect(p, "ut", "dt", "gt", LONG_TTL, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "ut", "dt", "gt");
    expect_status(p, &cur, "ut", PRES_ACTIVE_NOW);

    /* Its TTL passes: the daemon stops it, once. */
    assert_rc(pres_typing(p, "dt", "conv-ttl", 200), 0);
    expect_typing(p, &cur, PRES_EV_TYPING, "conv-ttl");
    expect_typing(p, &cur, PRES_EV_TYPING_STOP, "conv-ttl");
    expect_quiet(p, &cur, QUIET_MS);

    /* Repeats within the TTL make no event; a move stops the old
     * conversation, then starts the new; ttl 0 stops. */
    assert_rc(pres_typing(p, "dt", "conv-rep", 60000), 0);
    expect_typing(p, &cur, PRES_EV_TYPING, "conv-rep");
    for (int k = 0; k < 5; k++)
        assert_rc(pres_typing(p, "dt", "conv-rep", 60000), 0);
    expect_quiet(p, &cur, QUIET_MS);
    assert_rc(pres_typing(p, "dt", "conv-move", 60000), 0);
    expect_typing(p, &cur, PRES_EV_TYPING_STOP, "conv-rep");
    expect_typing(p, &cur, PRES_EV_TYPING, "conv-move");
    assert_rc(pres_typing(p, "dt", "conv-move", 0), 0);
    expect_typing(p, &cur, PRES_EV_TYPING_STOP, "conv-move");
    expect_quiet(p, &cur, QUIET_MS);

    /* A reconnect starts a connection without typing: the stop comes
     * before its CONNECT. */
    assert_rc(pres_typing(p, "dt", "conv-recon", 60000), 0);
    expect_typing(p, &cur, PRES_EV_TYPING, "conv-recon");
    assert_rc(pres_connect(p, "ut", "dt", "gt", LONG_TTL, NULL), 0);
    expect_typing(p, &cur, PRES_EV_TYPING_STOP, "conv-recon");
    expect(p, &cur, PRES_EV_CONNECT, "ut", "dt", "gt");
    expect_quiet(p, &cur, QUIET_MS);

    /* Its device disconnects: the disconnect stops it, before its DISCONNECT. */
    assert_rc(pres_typing(p, "dt", "conv-disc", 60000), 0);
    expect_typing(p, &cur, PRES_EV_TYPING, "conv-disc");
    assert_rc(pres_disconnect(p, "dt"), 0);
    expect_typing(p, &cur, PRES_EV_TYPING_STOP, "conv-disc");
    expect(p, &cur, PRES_EV_DISCONNECT, "ut", "dt", "gt");
    expect_status(p, &cur, "ut", PRES_OFFLINE);

    /* Its device expires: the expiry stops it. */
    assert_rc(pres_connect(p, "ut", "dt", "gt", 1500, NULL), 0);
    expect(p, &cur, PRES_EV_CONNECT, "ut", "dt", "gt");
    expect_status(p, &cur, "ut", PRES_ACTIVE_NOW);
    assert_rc(pres_typing(p, "dt", "conv-exp", 60000), 0);
    expect_typing(p, &cur, PRES_EV_TYPING, "conv-exp");
    expect(p, &cur, PRES_EV_EXPIRE, "ut", "dt", "gt");
    expect_typing(p, &cur, PRES_EV_TYPING_STOP, "conv-exp");
    expect_status(p, &cur, "ut", PRES_OFFLINE);
    expect_quiet(p, &cur, QUIET_MS);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* The cursor, timeouts, overflow                                            */

static void test_cursor_from_now(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    assert_rc(pres_connect(p, "u", "early", "g", LONG_TTL, NULL), 0);
    pres_event_t e;
    assert_rc(pres_watch(NULL, &(uint64_t){ 0 }, &e, 0), -EINVAL);
    assert_rc(pres_watch(p, NULL, &e, 0), -EINVAL);
    assert_rc(pres_watch(p, &(uint64_t){ 0 }, NULL, 0), -EINVAL);
    assert_rc(pres_watch(p, &(uint64_t){ UINT64_MAX / 2 }, &e, 0), -EINVAL);
    /* Wait for the daemon's status event, so that "now" is quiet. */
    uint64_t c1 = 1;
    while (pres_watch(p, &c1, &e, QUIET_MS) == 0)
        ;
    /* From now: a timeout leaves the cursor at the next seq ... */
    uint64_t cur = 0;
    assert_rc(pres_watch(p, &cur, &e, 0), -ETIMEDOUT);
    assert_int_equal(cur, stats(p).events + 1);
    assert_int_equal(cur, c1);
    /* ... which misses nothing from then on. */
    assert_rc(pres_connect(p, "u", "late", "g", LONG_TTL, NULL), 0);
    uint64_t at = cur;
    e = expect(p, &cur, PRES_EV_CONNECT, "u", "late", "g");
    assert_int_equal(e.seq, at);
    /* Seqs start at 1: the first event ever is seq 1. */
    uint64_t one = 1;
    assert_rc(pres_watch(p, &one, &e, 0), 0);
    assert_int_equal(e.seq, 1);
    assert_string_equal(e.device_id, "early");
    pres_close(p);
}

struct later_arg { int delay_ms; };

static void *connect_later(void *arg)
{
    struct later_arg *a = arg;
    th_nap_us((long)a->delay_ms * 1000);
    pres_t *p = NULL;
    if (pres_open(&p, S.name, PRES_RDWR) == 0) {
        pres_connect(p, "u", "wake", "g", LONG_TTL, NULL);
        pres_close(p);
    }
    return NULL;
}

static void test_timeouts(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDONLY);
    uint64_t cur = cursor_now(p);
    pres_event_t e;
    /* 0: at once. */
    uint64_t t0 = th_mono_ms();
    assert_rc(pres_watch(p, &cur, &e, 0), -ETIMEDOUT);
    assert_true(th_mono_ms() - t0 < 1000);
    /* > 0: about that long (and not much less). */
    t0 = th_mono_ms();
    assert_rc(pres_watch(p, &cur, &e, 250), -ETIMEDOUT);
    uint64_t took = th_mono_ms() - t0;
    assert_true(took >= 240 && took < 3000);
    /* A wait is cut short by an event (from another process's handle or a
     * thread: it sleeps on the shared futex). */
    pthread_t th;
    struct later_arg a = { 150 };
    assert_int_equal(pthread_create(&th, NULL, connect_later, &a), 0);
    t0 = th_mono_ms();
    assert_rc(pres_watch(p, &cur, &e, 20000), 0);
    took = th_mono_ms() - t0;
    assert_int_equal(e.kind, PRES_EV_CONNECT);
    assert_string_equal(e.device_id, "wake");
    assert_true(took < 10000);
    pthread_join(th, NULL);
    /* < 0: forever, until an event. */
    assert_int_equal(pthread_create(&th, NULL, connect_later, &a), 0);
    int got = 0;
    while (!got) {
        assert_rc(pres_watch(p, &cur, &e, -1), 0);
        got = e.kind == PRES_EV_CONNECT;
    }
    pthread_join(th, NULL);
    pres_close(p);
}

static void test_overflow(void **state)
{
    (void)state;
    start("--events", "1024", NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p), first = cur;
    /* 3000 events the watcher does not read. */
    for (int k = 0; k < 1500; k++) {
        assert_rc(pres_connect(p, "uo", "do", "go", LONG_TTL, NULL), 0);
        assert_rc(pres_disconnect(p, "do"), 0);
    }
    uint64_t last = stats(p).events;
    assert_true(last >= first + 2999);
    pres_event_t e;
    assert_rc(pres_watch(p, &cur, &e, 0), -EOVERFLOW);
    /* Moved to the oldest still held: within the last 1024. */
    assert_true(cur > first);
    assert_true(cur + 1024 > last + 1 - 1 && cur <= last);
    /* From there, every seq in order. */
    uint64_t want = cur;
    int n = 0;
    while (pres_watch(p, &cur, &e, 0) == 0) {
        assert_int_equal(e.seq, want++);
        n++;
    }
    assert_true(n > 0);
    assert_int_equal(cur, stats(p).events + 1);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* Many watchers, threads and processes: the same sequence                   */

#define MW_THREADS 6
#define MW_PROCS   3
#define MW_EVENTS  2000

typedef struct {
    uint64_t start;
    _Atomic uint64_t hash[MW_THREADS + MW_PROCS];
    _Atomic int      n[MW_THREADS + MW_PROCS];
    _Atomic int      ready;
} mw_shared_t;

static mw_shared_t *MW;

static uint64_t ev_hash(uint64_t h, const pres_event_t *e)
{
    const char *parts[] = { e->user_id, e->device_id, e->gateway_id, e->conversation_id };
    h = (h ^ e->seq) * UINT64_C(0x100000001b3);
    h = (h ^ (uint64_t)e->kind) * UINT64_C(0x100000001b3);
    h = (h ^ e->at_ms) * UINT64_C(0x100000001b3);
    for (int k = 0; k < 4; k++)
        for (const char *c = parts[k]; *c; c++)
            h = (h ^ (unsigned char)*c) * UINT64_C(0x100000001b3);
    return h;
}

static int mw_watch(int who, int flags)
{
    pres_t *p = NULL;
    if (pres_open(&p, S.name, flags) != 0)
        return 1;
    atomic_fetch_add(&MW->ready, 1);
    uint64_t cur = MW->start, h = UINT64_C(0xcbf29ce484222325);
    int n = 0;
    while (n < MW_EVENTS) {
        pres_event_t e;
        int rc = pres_watch(p, &cur, &e, 20000);
        if (rc != 0)
            break;
        h = ev_hash(h, &e);
        n++;
    }
    atomic_store(&MW->hash[who], h);
    atomic_store(&MW->n[who], n);
    pres_close(p);
    return 0;
}

static void *mw_thread(void *arg)
{
    mw_watch((int)(intptr_t)arg, PRES_RDONLY);
    return NULL;
}

static int mw_proc(void *arg)
{
    return mw_watch((int)(intptr_t)arg, PRES_RDONLY);
}

static int mw_all_ready(void *arg)
{
    (void)arg;
    return atomic_load(&MW->ready) == MW_THREADS + MW_PROCS;
}

static void test_many_watchers(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    MW = mmap(NULL, sizeof *MW, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(MW != MAP_FAILED);
    memset(MW, 0, sizeof *MW);
    pres_t *p = open_h(PRES_RDWR);
    MW->start = cursor_now(p);
    pid_t pids[MW_PROCS];
    for (int k = 0; k < MW_PROCS; k++) {
        pids[k] = th_fork(mw_proc, (void *)(intptr_t)(MW_THREADS + k));
        assert_true(pids[k] > 0);
        kids[nkids++] = pids[k];
    }
    pthread_t th[MW_THREADS];
    for (int k = 0; k < MW_THREADS; k++)
        assert_int_equal(pthread_create(&th[k], NULL, mw_thread, (void *)(intptr_t)k), 0);
    assert_true(th_wait_until(mw_all_ready, NULL, WAIT_MS));
    /* Writes in bursts and pauses, so that watchers both sleep and race. */
    char dev[32];
    for (int k = 0; k < MW_EVENTS / 2; k++) {
        snprintf(dev, sizeof dev, "mw%d", k % 97);
        assert_rc(pres_connect(p, "umw", dev, "gmw", LONG_TTL, NULL), 0);
        assert_rc(pres_disconnect(p, dev), 0);
        if (k % 100 == 0)
            th_nap_us(2000);
    }
    for (int k = 0; k < MW_THREADS; k++)
        pthread_join(th[k], NULL);
    for (int k = 0; k < MW_PROCS; k++) {
        assert_int_equal(th_wait_child(pids[k], 30000), 0);
        kids[--nkids] = 0;
    }
    for (int k = 0; k < MW_THREADS + MW_PROCS; k++) {
        assert_int_equal(atomic_load(&MW->n[k]), MW_EVENTS);
        assert_true(atomic_load(&MW->hash[k]) == atomic_load(&MW->hash[0]));
    }
    pres_close(p);
    munmap(MW, sizeof *MW);
}

/* ------------------------------------------------------------------------ */
/* A writer killed, or stopped, in the middle of an append                   */

/* A child that claims a seq as a writer would, says which, and waits
 * (stopped, or paused) without publishing; after SIGCONT it publishes
 * what it claimed and one more event, and exits. */
static int claimer(void *arg)
{
    int fd = (int)(intptr_t)arg;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    pres_t *p = NULL;
    if (pres_open(&p, S.name, PRES_RDWR) != 0)
        return 10;
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return 11;
    unsigned latch = t->index + 1;
    pres__gp_leave(t);
    pres_evc_t c;
    if (pres__ev_claim(&p->m, latch, &c) != 0)
        return 12;
    if (write(fd, &c.seq, sizeof c.seq) != (ssize_t)sizeof c.seq)
        return 13;
    raise(SIGSTOP);
    pres_ev_t e = { .kind = PRES_EV_CONNECT, .at_ms = pres_now_ms(), .dev = "zombie", .dlen = 6 };
    pres__ev_publish(&p->m, &c, &e);
    pres__ev_emit(&p->m, latch, PRES_EV_CONNECT, 0, "uz", 2, "after", 5, "gz", 2, NULL, 0,
                  pres_now_ms());
    pres_close(p);
    return 0;
}

static pid_t start_claimer(uint64_t *seq)
{
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = th_fork(claimer, (void *)(intptr_t)fds[1]);
    assert_true(pid > 0);
    kids[nkids++] = pid;
    assert_int_equal(read(fds[0], seq, sizeof *seq), (ssize_t)sizeof *seq);
    int st;
    assert_int_equal(waitpid(pid, &st, WUNTRACED), pid);
    assert_true(WIFSTOPPED(st));
    close(fds[0]);
    close(fds[1]);
    return pid;
}

static void test_writer_killed_mid_append(void **state)
{
    (void)state;
    start(NULL, NULL, NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p), seq;
    pid_t pid = start_claimer(&seq);
    assert_int_equal(seq, cur);
    /* Others go on appending behind the claim; the watcher waits for it. */
    assert_rc(pres_connect(p, "uk", "dk", "gk", LONG_TTL, NULL), 0);
    pres_event_t e;
    assert_rc(pres_watch(p, &cur, &e, 200), -ETIMEDOUT);
    assert_int_equal(cur, seq);
    uint64_t t0 = th_mono_ms();
    kill(pid, SIGKILL);
    assert_int_equal(th_wait_child(pid, 5000), 128 + SIGKILL);
    kids[--nkids] = 0;
    /* Within the daemon's liveness check (a tick; generously bounded). */
    e = next_ev(p, &cur);
    assert_int_equal(e.kind, PRES_EV_LOST);
    assert_int_equal(e.seq, seq);
    assert_true(th_mono_ms() - t0 < 3000);
    expect(p, &cur, PRES_EV_CONNECT, "uk", "dk", "gk");
    expect_status(p, &cur, "uk", PRES_ACTIVE_NOW);
    assert_int_equal(th_check_ok(&S, "after a writer died mid-append"), 0);
    pres_close(p);
}

/* A stopped writer is alive: after a second its claim is declared lost
 * (watchers go on), and while it lives its slot is not written again (a
 * lap later that seq is lost too); once it resumes its publish is refused
 * and the slot serves again. */
static void test_writer_stopped_mid_append(void **state)
{
    (void)state;
    start("--events", "1024", NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    uint64_t cur = cursor_now(p), seq;
    pid_t pid = start_claimer(&seq);
    uint64_t t0 = th_mono_ms();
    pres_event_t e = next_ev(p, &cur);
    assert_int_equal(e.kind, PRES_EV_LOST);
    assert_int_equal(e.seq, seq);
    assert_true(th_mono_ms() - t0 >= 900);
    /* A lap later, its slot: lost again, not written under it. */
    int lost = 0;
    for (int k = 0; k < 600; k++) {
        char dev[16];
        snprintf(dev, sizeof dev, "ds%d", k % 10);
        assert_rc(pres_connect(p, "us", dev, "gs", LONG_TTL, NULL), 0);
        assert_rc(pres_disconnect(p, dev), 0);
        while (pres_watch(p, &cur, &e, 0) == 0) {
            if (e.kind == PRES_EV_LOST) {
                assert_int_equal(e.seq, seq + 1024);
                lost++;
            }
        }
    }
    assert_int_equal(lost, 1);
    /* It resumes: its claim was declared lost, so its publish goes nowhere,
     * and its next append is an ordinary one. */
    kill(pid, SIGCONT);
    assert_int_equal(th_wait_child(pid, 10000), 0);
    kids[--nkids] = 0;
    int after = 0;
    while (pres_watch(p, &cur, &e, QUIET_MS) == 0) {
        assert_true(strcmp(e.device_id, "zombie") != 0);
        after += strcmp(e.device_id, "after") == 0;
    }
    assert_int_equal(after, 1);
    /* Another lap: the slot is in use again (no more lost seqs). */
    for (int k = 0; k < 600; k++) {
        assert_rc(pres_connect(p, "us", "dz", "gs", LONG_TTL, NULL), 0);
        assert_rc(pres_disconnect(p, "dz"), 0);
        while (pres_watch(p, &cur, &e, 0) == 0)
            assert_int_not_equal(e.kind, PRES_EV_LOST);
    }
    assert_int_equal(th_check_ok(&S, "after a stopped writer resumed"), 0);
    pres_close(p);
}

/* ------------------------------------------------------------------------ */
/* The lag of expiry events                                                  */

#define LAG_DEVS 3000

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static void test_expiry_lag(void **state)
{
    (void)state;
    start("--events", "65536", NULL, NULL);
    pres_t *p = open_h(PRES_RDWR);
    int n = th_scale(LAG_DEVS, LAG_DEVS / 3);
    uint64_t *exp = calloc((size_t)n, sizeof *exp);
    int64_t *lag = calloc((size_t)n, sizeof *lag);
    assert_non_null(exp);
    assert_non_null(lag);
    uint64_t cur = cursor_now(p);
    char dev[32], user[32];
    /* TTLs staggered over 2 s, from 300 ms. */
    for (int i = 0; i < n; i++) {
        snprintf(dev, sizeof dev, "lag%05d", i);
        snprintf(user, sizeof user, "lu%d", i % 500);
        assert_rc(pres_connect(p, user, dev, "glag", 300 + (uint32_t)(i * 2000 / n), NULL), 0);
        pres_device_info_t d;
        assert_rc(pres_device(p, dev, &d), 0);
        exp[i] = d.expires_at_ms;
    }
    int got = 0;
    while (got < n) {
        pres_event_t e;
        int rc = pres_watch(p, &cur, &e, 10000);
        if (rc != 0)
            fail_msg("pres_watch: %s after %d expiries", pres_strerror(rc), got);
        if (e.kind != PRES_EV_EXPIRE)
            continue;
        int i = atoi(e.device_id + 3);
        assert_true(i >= 0 && i < n && exp[i] != 0);
        lag[got++] = (int64_t)e.at_ms - (int64_t)exp[i];
        exp[i] = 0;
    }
    qsort(lag, (size_t)n, sizeof *lag, cmp_i64);
    int64_t p50 = lag[n / 2], p99 = lag[n * 99 / 100], max = lag[n - 1];
    printf("expiry lag over %d devices (TTLs 300..2300 ms): p50 %lld ms, p99 %lld ms, "
           "max %lld ms, min %lld ms\n", n, (long long)p50, (long long)p99, (long long)max,
           (long long)lag[0]);
    assert_true(lag[0] >= 0);
    assert_true(p99 < 2000);
    free(exp);
    free(lag);
    pres_close(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_connect_disconnect, teardown),
        cmocka_unit_test_teardown(test_expire_by_ttl, teardown),
        cmocka_unit_test_teardown(test_heartbeats, teardown),
        cmocka_unit_test_teardown(test_expire_by_gateway_death, teardown),
        cmocka_unit_test_teardown(test_expiry_once_across_restart, teardown),
        cmocka_unit_test_teardown(test_user_status_transitions, teardown),
        cmocka_unit_test_teardown(test_status_silent, teardown),
        cmocka_unit_test_teardown(test_typing_stop, teardown),
        cmocka_unit_test_teardown(test_cursor_from_now, teardown),
        cmocka_unit_test_teardown(test_timeouts, teardown),
        cmocka_unit_test_teardown(test_overflow, teardown),
        cmocka_unit_test_teardown(test_many_watchers, teardown),
        cmocka_unit_test_teardown(test_writer_killed_mid_append, teardown),
        cmocka_unit_test_teardown(test_writer_stopped_mid_append, teardown),
        cmocka_unit_test_teardown(test_expiry_lag, teardown),
    };
    return cmocka_run_group_tests_name("events", tests, NULL, NULL);
}
