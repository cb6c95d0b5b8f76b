/*
 * test_ctl.c - presencectl as scripts see it: exit statuses, and output
 * that machines parse (--json, --prometheus) checked against the library's
 * own answers.
 *
 * One store serves the group, with a few devices set up once:
 *   user_a: dev_a on gw_1 and dev_b on gw_2 connected, dev_c disconnected
 *   user_z: dev_z disconnected
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "harness.h"
#include "presence.h"

#define LONG_TTL 600000u
#define OUT_CAP  (256 * 1024)

static th_store_t S;
static pres_t *rw;
static char out[OUT_CAP];

/* ------------------------------------------------------------------------ */
/* A small JSON reader: validates a document and walks objects and arrays  */
/* in place.  Enough to hold the tool to RFC 8259 without a dependency.     */

static const char *ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

static const char *skip_string(const char *p)
{
    if (*p++ != '"')
        return NULL;
    for (;;) {
        unsigned char c = (unsigned char)*p++;
        if (c == '"')
            return p;
        if (c < 0x20)
            return NULL;   /* also the end of the text */
        if (c == '\\') {
            c = (unsigned char)*p++;
            if (c == 'u') {
                for (int i = 0; i < 4; i++, p++)
                    if (!strchr("0123456789abcdefABCDEF", *p) || !*p)
                        return NULL;
            } else if (!c || !strchr("\"\\/bfnrt", c)) {
                return NULL;
            }
        }
    }
}

static const char *skip_digits(const char *p)
{
    const char *q = p;
    while (*q >= '0' && *q <= '9')
        q++;
    return q == p ? NULL : q;
}

static const char *skip_number(const char *p)
{
    if (*p == '-')
        p++;
    if (*p == '0')
        p++;
    else if (!(p = skip_digits(p)))
        return NULL;
    if (*p == '.' && !(p = skip_digits(p + 1)))
        return NULL;
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!(p = skip_digits(p)))
            return NULL;
    }
    return p;
}

static const char *skip_value(const char *p, int depth)
{
    if (depth > 64)
        return NULL;
    p = ws(p);
    switch (*p) {
    case '{':
        p = ws(p + 1);
        if (*p == '}')
            return p + 1;
        for (;;) {
            if (!(p = skip_string(ws(p))))
                return NULL;
            p = ws(p);
            if (*p++ != ':')
                return NULL;
            if (!(p = skip_value(p, depth + 1)))
                return NULL;
            p = ws(p);
            if (*p == '}')
                return p + 1;
            if (*p++ != ',')
                return NULL;
        }
    case '[':
        p = ws(p + 1);
        if (*p == ']')
            return p + 1;
        for (;;) {
            if (!(p = skip_value(p, depth + 1)))
                return NULL;
            p = ws(p);
            if (*p == ']')
                return p + 1;
            if (*p++ != ',')
                return NULL;
        }
    case '"':
        return skip_string(p);
    case 't':
        return strncmp(p, "true", 4) == 0 ? p + 4 : NULL;
    case 'f':
        return strncmp(p, "false", 5) == 0 ? p + 5 : NULL;
    case 'n':
        return strncmp(p, "null", 4) == 0 ? p + 4 : NULL;
    default:
        return skip_number(p);
    }
}

/* The whole text is one JSON value.  Returns the value, or fails. */
static const char *json_doc(const char *text)
{
    const char *end = skip_value(text, 0);
    if (!end || *ws(end) != '\0')
        fail_msg("not one JSON document:\n%s", text);
    return ws(text);
}

/* The value of member key of the object at obj, or NULL. */
static const char *json_get(const char *obj, const char *key)
{
    obj = ws(obj);
    if (*obj != '{')
        return NULL;
    const char *p = ws(obj + 1);
    size_t klen = strlen(key);
    while (*p == '"') {
        const char *k = p + 1;
        const char *v = skip_string(p);
        if (!v)
            return NULL;
        v = ws(v);
        if (*v != ':')
            return NULL;
        v = ws(v + 1);
        if ((size_t)(skip_string(p) - k - 1) == klen && strncmp(k, key, klen) == 0)
            return v;
        p = skip_value(v, 0);
        if (!p)
            return NULL;
        p = ws(p);
        if (*p != ',')
            return NULL;
        p = ws(p + 1);
    }
    return NULL;
}

static const char *must_get(const char *obj, const char *key)
{
    const char *v = json_get(obj, key);
    if (!v)
        fail_msg("no member \"%s\" in:\n%.2000s", key, obj);
    return v;
}

/* Element i of the array at arr, or NULL; *len gets the length. */
static const char *json_at(const char *arr, size_t i, size_t *len)
{
    arr = ws(arr);
    if (*arr != '[')
        fail_msg("not an array: %.200s", arr);
    const char *p = ws(arr + 1), *hit = NULL;
    size_t n = 0;
    if (*p != ']') {
        for (;;) {
            if (n == i)
                hit = p;
            n++;
            p = ws(skip_value(p, 0));
            if (*p != ',')
                break;
            p = ws(p + 1);
        }
    }
    if (len)
        *len = n;
    return hit;
}

static int json_is_str(const char *v, const char *s)
{
    size_t n = strlen(s);
    return v && v[0] == '"' && strncmp(v + 1, s, n) == 0 && v[n + 1] == '"';
}

static void assert_json_str(const char *obj, const char *key, const char *want)
{
    const char *v = must_get(obj, key);
    if (!json_is_str(v, want))
        fail_msg("\"%s\" is %.80s, expected \"%s\"", key, v, want);
}

static void assert_json_bool(const char *obj, const char *key, int want)
{
    const char *v = must_get(obj, key);
    const char *w = want ? "true" : "false";
    if (strncmp(v, w, strlen(w)) != 0)
        fail_msg("\"%s\" is %.80s, expected %s", key, v, w);
}

static uint64_t json_u64(const char *obj, const char *key)
{
    const char *v = must_get(obj, key);
    if (!skip_number(v) || *v == '-')
        fail_msg("\"%s\" is %.80s, not a count", key, v);
    return strtoull(v, NULL, 10);
}

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

#define CTL(...) ctl_run((const char *const[]){ __VA_ARGS__, NULL })

static int ctl_run(const char *const *args)
{
    memset(out, 0, 64);
    return th_ctl(&S, out, sizeof out, args);
}

static void expect_exit(int got, int want, const char *what)
{
    if (got != want)
        fail_msg("presencectl %s: exit %d, expected %d; stdout:\n%.2000s",
                 what, got, want, out);
}

static pres_stats_t stats(void)
{
    pres_stats_t st;
    assert_int_equal(pres_stats(rw, &st), 0);
    return st;
}

static int four_devices(void *arg)
{
    (void)arg;
    pres_stats_t st;
    return pres_stats(rw, &st) == 0 && st.devices == 4 && st.users == 2;
}

/* stats.devices and users come from the daemon's pass: wait until it has
 * counted the setup's records, so the tool's figures can be compared. */
static pres_stats_t settled_stats(void)
{
    if (!th_wait_until(four_devices, NULL, 5000))
        fail_msg("stats: %llu devices, %llu users; expected 4 and 2",
                 (unsigned long long)stats().devices,
                 (unsigned long long)stats().users);
    return stats();
}

static int group_setup(void **state)
{
    (void)state;
    /* No offline grace: a disconnected user reads offline at once. */
    const char *args[] = { "--capacity", "4096", "--offline-grace-ms", "0", NULL };
    if (th_store_start(&S, args) != 0)
        return -1;
    if (pres_open(&rw, S.name, PRES_RDWR) != 0)
        return -1;
    int rc = 0;
    rc |= pres_connect(rw, "user_a", "dev_a", "gw_1", LONG_TTL, NULL);
    rc |= pres_connect(rw, "user_a", "dev_b", "gw_2", LONG_TTL, NULL);
    rc |= pres_connect(rw, "user_a", "dev_c", "gw_1", LONG_TTL, NULL);
    rc |= pres_disconnect(rw, "dev_c");
    rc |= pres_connect(rw, "user_z", "dev_z", "gw_1", LONG_TTL, NULL);
    rc |= pres_disconnect(rw, "dev_z");
    if (rc != 0) {
        fprintf(stderr, "test_ctl: setting up the devices failed\n");
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    pres_close(rw);
    rw = NULL;
    th_store_destroy(&S);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Tests                                                                     */

static void test_help(void **state)
{
    (void)state;
    expect_exit(CTL("--help"), 0, "--help");
    assert_true(strlen(out) > 20);
    assert_non_null(strstr(out, "stats"));   /* the commands are listed */
    assert_non_null(strstr(out, "route"));
}

static void test_bad_usage(void **state)
{
    (void)state;
    const char *const *const cases[] = {
        (const char *const[]){ NULL },
        (const char *const[]){ "frobnicate", NULL },
        (const char *const[]){ "--no-such-option", "stats", NULL },
        (const char *const[]){ "stats", "--no-such-option", NULL },
        (const char *const[]){ "device", NULL },
        (const char *const[]){ "route", NULL },
        (const char *const[]){ "user", NULL },
        (const char *const[]){ "device", "--json", NULL },
        (const char *const[]){ "user", "user_a", "--contact", NULL },
        (const char *const[]){ "user", "user_a", "--viewer", NULL },
        (const char *const[]){ "user", "user_a", "user_z", NULL },
        (const char *const[]){ "user", "", NULL },
        (const char *const[]){ "user", "user_a", "--viewer", "", NULL },
        (const char *const[]){ "route", "user_a", "--viewer", "v", NULL },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char what[128] = "";
        for (size_t k = 0; cases[i][k]; k++) {
            strcat(what, " ");
            strncat(what, cases[i][k], 40);
        }
        expect_exit(ctl_run(cases[i]), 2, what);
    }
}

static void test_store_missing(void **state)
{
    (void)state;
    th_store_t none = S;
    snprintf(none.name, sizeof none.name, "nosuch_%ld", (long)getpid());
    const char *const *const cases[] = {
        (const char *const[]){ "stats", NULL },
        (const char *const[]){ "stats", "--json", NULL },
        (const char *const[]){ "device", "dev_a", NULL },
        (const char *const[]){ "route", "user_a", "--json", NULL },
        (const char *const[]){ "user", "user_a", "--viewer", "v", NULL },
        (const char *const[]){ "dump", "--json", NULL },
        (const char *const[]){ "check", NULL },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = th_ctl(&none, out, sizeof out, cases[i]);
        if (rc != 3)
            fail_msg("presencectl %s on a missing store: exit %d, expected 3",
                     cases[i][0], rc);
    }
}

static void test_stats_human(void **state)
{
    (void)state;
    expect_exit(CTL("stats"), 0, "stats");
    assert_true(strlen(out) > 10);
    assert_non_null(strstr(out, "feed_capacity    262144 events"));
    assert_non_null(strstr(out, "feed_seq "));
}

static const char *const stat_fields[] = {
    "capacity", "devices", "connected", "users", "connects", "disconnects",
    "heartbeats", "late_heartbeats", "expirations", "gateway_deaths",
    "stale_reports", "events", "evictions", "grace_periods", "mirror_lag_ms",
};

static void test_stats_json(void **state)
{
    (void)state;
    pres_stats_t st = settled_stats();
    expect_exit(CTL("stats", "--json"), 0, "stats --json");
    const char *doc = json_doc(out);
    for (size_t i = 0; i < sizeof stat_fields / sizeof stat_fields[0]; i++)
        (void)json_u64(doc, stat_fields[i]);
    assert_int_equal(json_u64(doc, "capacity"), st.capacity);
    assert_int_equal(json_u64(doc, "connects"), st.connects);
    assert_int_equal(json_u64(doc, "disconnects"), st.disconnects);
    assert_int_equal(json_u64(doc, "devices"), 4);
    assert_int_equal(json_u64(doc, "users"), 2);
    /* The change feed beside the counters: its capacity (the default) and
     * its last seq, which is stats.events. */
    assert_int_equal(json_u64(doc, "feed_capacity"), 262144);
    assert_true(json_u64(doc, "feed_seq") >= st.events);
    assert_true(json_u64(doc, "feed_seq") == json_u64(doc, "events") ||
                json_u64(doc, "feed_seq") == json_u64(doc, "events") + 1);
}

static int is_counter(const char *f)
{
    static const char *const counters[] = {
        "connects", "disconnects", "heartbeats", "late_heartbeats",
        "expirations", "gateway_deaths", "stale_reports", "events",
        "evictions", "grace_periods",
    };
    for (size_t i = 0; i < sizeof counters / sizeof counters[0]; i++)
        if (strcmp(f, counters[i]) == 0)
            return 1;
    return 0;
}

/* The line of out that starts with prefix, or NULL. */
static const char *line_starting(const char *prefix)
{
    size_t n = strlen(prefix);
    for (const char *l = out; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (strncmp(l, prefix, n) == 0)
            return l;
    return NULL;
}

static void test_stats_prometheus(void **state)
{
    (void)state;
    pres_stats_t st = stats();
    expect_exit(CTL("stats", "--prometheus"), 0, "stats --prometheus");

    for (size_t i = 0; i < sizeof stat_fields / sizeof stat_fields[0]; i++) {
        const char *f = stat_fields[i];
        char metric[96], want[160];
        if (strcmp(f, "mirror_lag_ms") == 0)
            snprintf(metric, sizeof metric, "presence_mirror_lag_seconds");
        else
            snprintf(metric, sizeof metric, "presence_%s%s", f,
                     is_counter(f) ? "_total" : "");
        snprintf(want, sizeof want, "# TYPE %s %s\n", metric,
                 is_counter(f) ? "counter" : "gauge");
        if (!strstr(out, want))
            fail_msg("no \"%.*s\" in:\n%s", (int)strlen(want) - 1, want, out);
        snprintf(want, sizeof want, "# HELP %s ", metric);
        if (!line_starting(want))
            fail_msg("no \"%s\" line", want);
        /* The sample: "metric value", the value a number. */
        snprintf(want, sizeof want, "%s ", metric);
        const char *l = line_starting(want);
        if (!l)
            fail_msg("no sample line for %s", metric);
        char *end = NULL;
        strtod(l + strlen(want), &end);
        if (end == l + strlen(want) || (*end != '\n' && *end != ' ' && *end))
            fail_msg("bad sample line for %s: %.80s", metric, l);
    }
    const char *l = line_starting("presence_connects_total ");
    assert_int_equal(strtoull(l + strlen("presence_connects_total "), NULL, 10),
                     st.connects);
    l = line_starting("presence_capacity ");
    assert_int_equal((uint64_t)strtod(l + strlen("presence_capacity "), NULL),
                     st.capacity);
    assert_null(strstr(out, "presence_mirror_lag_ms"));
    assert_non_null(strstr(out, "# TYPE presence_feed_capacity gauge\n"));
    assert_non_null(line_starting("presence_feed_capacity 262144\n"));
    assert_non_null(line_starting("presence_feed_seq "));
}

static void test_device(void **state)
{
    (void)state;
    expect_exit(CTL("device", "dev_a"), 0, "device dev_a");
    assert_non_null(strstr(out, "dev_a"));

    expect_exit(CTL("device", "dev_a", "--json"), 0, "device dev_a --json");
    const char *doc = json_doc(out);
    assert_json_str(doc, "device_id", "dev_a");
    assert_json_str(doc, "user_id", "user_a");
    assert_json_str(doc, "gateway_id", "gw_1");
    assert_json_bool(doc, "connected", 1);
    assert_json_bool(doc, "active", 1);
    pres_device_info_t d;
    assert_int_equal(pres_device(rw, "dev_a", &d), 0);
    assert_int_equal(json_u64(doc, "connected_at_ms"), d.connected_at_ms);
    (void)json_u64(doc, "expires_at_ms");
    (void)json_u64(doc, "last_seen_ms");
    /* Derived from the coarse monotonic clock at each read: a few ms. */
    uint64_t la = json_u64(doc, "last_active_ms");
    assert_true(la + 10 >= d.last_active_ms && la <= d.last_active_ms + 10);

    expect_exit(CTL("device", "dev_c", "--json"), 0, "device dev_c --json");
    doc = json_doc(out);
    assert_json_bool(doc, "connected", 0);
    assert_json_bool(doc, "active", 0);
    assert_int_equal(pres_device(rw, "dev_c", &d), 0);
    assert_int_equal(json_u64(doc, "last_seen_ms"), d.last_seen_ms);
}

static void test_device_unknown(void **state)
{
    (void)state;
    expect_exit(CTL("device", "no_such_device"), 1, "device no_such_device");
    expect_exit(CTL("device", "no_such_device", "--json"), 1,
                "device no_such_device --json");
}

static void test_route(void **state)
{
    (void)state;
    expect_exit(CTL("route", "user_a", "--json"), 0, "route user_a --json");
    const char *doc = json_doc(out);
    assert_json_str(doc, "user_id", "user_a");
    const char *devs = must_get(doc, "devices");
    size_t n = 0;
    json_at(devs, 0, &n);
    assert_int_equal(n, 2);
    int seen_a = 0, seen_b = 0;
    for (size_t i = 0; i < n; i++) {
        const char *d = json_at(devs, i, NULL);
        assert_json_bool(d, "connected", 1);
        assert_json_str(d, "user_id", "user_a");
        const char *id = must_get(d, "device_id");
        seen_a += json_is_str(id, "dev_a");
        seen_b += json_is_str(id, "dev_b");
        if (json_is_str(id, "dev_b"))
            assert_json_str(d, "gateway_id", "gw_2");
    }
    assert_int_equal(seen_a, 1);
    assert_int_equal(seen_b, 1);

    expect_exit(CTL("route", "user_a"), 0, "route user_a");
    assert_non_null(strstr(out, "dev_a"));
    assert_non_null(strstr(out, "dev_b"));
    assert_null(strstr(out, "dev_c"));
}

static void test_route_none(void **state)
{
    (void)state;
    static const char *const users[] = { "no_such_user", "user_z" };
    for (size_t i = 0; i < 2; i++) {
        expect_exit(CTL("route", users[i], "--json"), 0, users[i]);
        const char *doc = json_doc(out);
        assert_json_str(doc, "user_id", users[i]);
        size_t n = 99;
        json_at(must_get(doc, "devices"), 0, &n);
        assert_int_equal(n, 0);
        expect_exit(CTL("route", users[i]), 0, users[i]);
    }
}

static void test_dump(void **state)
{
    (void)state;
    pres_stats_t st = settled_stats();
    expect_exit(CTL("dump", "--json"), 0, "dump --json");
    const char *doc = json_doc(out);
    const char *s = must_get(doc, "stats");
    assert_int_equal(json_u64(s, "capacity"), st.capacity);
    assert_int_equal(json_u64(s, "feed_capacity"), 262144);
    assert_int_equal(json_u64(s, "devices"), 4);
    const char *devs = must_get(doc, "devices");
    size_t n = 0;
    json_at(devs, 0, &n);
    assert_int_equal(n, 4);
    static const char *const ids[] = { "dev_a", "dev_b", "dev_c", "dev_z" };
    static const int connected[] = { 1, 1, 0, 0 };
    for (size_t k = 0; k < 4; k++) {
        int found = 0;
        for (size_t i = 0; i < n; i++) {
            const char *d = json_at(devs, i, NULL);
            if (!json_is_str(must_get(d, "device_id"), ids[k]))
                continue;
            found++;
            assert_json_bool(d, "connected", connected[k]);
        }
        if (found != 1)
            fail_msg("dump lists %s %d times", ids[k], found);
    }

    expect_exit(CTL("dump"), 0, "dump");
    assert_non_null(strstr(out, "feed_seq "));
    assert_non_null(strstr(out, "dev_a"));
    assert_non_null(strstr(out, "dev_z"));
}

static void test_check(void **state)
{
    (void)state;
    expect_exit(CTL("check"), 0, "check");
    assert_true(strlen(out) > 0);
}

/* ------------------------------------------------------------------------ */
/* watch: runs in the background until a signal                              */

typedef struct {
    pid_t pid;
    char  path[512];            /* its stdout */
} watcher_t;

static void watch_start(watcher_t *w, const th_store_t *st, int json)
{
    snprintf(w->path, sizeof w->path, "%s/watch-%d.out", st->dir, json);
    int fd = open(w->path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    char exe[600];
    snprintf(exe, sizeof exe, "%s/presencectl", th_build_dir());
    fflush(NULL);
    w->pid = fork();
    assert_true(w->pid >= 0);
    if (w->pid == 0) {
        dup2(fd, 1);
        execl(exe, exe, "--name", st->name, "watch", json ? "--json" : NULL, (char *)NULL);
        _exit(127);
    }
    close(fd);
}

/* Its output so far, into out. */
static size_t watch_read(const watcher_t *w)
{
    memset(out, 0, sizeof out);
    int fd = open(w->path, O_RDONLY);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, out, sizeof out - 1);
    close(fd);
    return n > 0 ? (size_t)n : 0;
}

/* Lines of its output that name `with` (NULL: any line). */
struct lines_arg { const watcher_t *w; const char *with; int want; };

static int has_lines(void *arg)
{
    struct lines_arg *a = arg;
    watch_read(a->w);
    int n = 0;
    for (const char *l = out, *nl; (nl = strchr(l, '\n')); l = nl + 1)
        if (!a->with || memmem(l, (size_t)(nl - l), a->with, strlen(a->with)))
            n++;
    return n >= a->want;
}

/* SIGTERM (or SIGINT): exit 0. */
static void watch_stop(watcher_t *w, int sig)
{
    kill(w->pid, sig);
    int rc = th_wait_child(w->pid, 5000);
    if (rc != 0)
        fail_msg("presencectl watch: exit %d after signal %d, expected 0", rc, sig);
}

/* The tool watches from the moment it took its cursor: reconnect dev_a in
 * place (a CONNECT of an active user, nothing else) until it shows one. */
static void watch_ready(const watcher_t *w)
{
    struct lines_arg any = { w, NULL, 1 };
    for (int tries = 0; tries < 50; tries++) {
        assert_int_equal(pres_connect(rw, "user_a", "dev_a", "gw_1", LONG_TTL, NULL), 0);
        if (th_wait_until(has_lines, &any, 200))
            return;
    }
    fail_msg("presencectl watch showed nothing");
}

/* Events of a user and device of their own: a connect, the user's status,
 * a disconnect. */
static void watch_events(const watcher_t *w, const char *user, const char *dev)
{
    watch_ready(w);
    assert_int_equal(pres_connect(rw, user, dev, "gw_w", LONG_TTL, NULL), 0);
    struct lines_arg two = { w, user, 2 };
    assert_true(th_wait_until(has_lines, &two, 5000));
    assert_int_equal(pres_disconnect(rw, dev), 0);
    struct lines_arg three = { w, user, 3 };
    assert_true(th_wait_until(has_lines, &three, 5000));
}

static void test_watch_json(void **state)
{
    (void)state;
    watcher_t w;
    watch_start(&w, &S, 1);
    watch_events(&w, "user_w", "dev_w\"q");
    watch_stop(&w, SIGTERM);
    watch_read(&w);
    /* One object a line, seqs consecutive, the pres_event_t field names. */
    static const char *const kinds[] = { "connect", "user_status", "disconnect" };
    char *line = out, *nl;
    uint64_t seq = 0;
    for (int k = 0; k < 3; line = nl + 1) {
        assert_non_null(nl = strchr(line, '\n'));
        *nl = '\0';
        const char *o = json_doc(line);
        uint64_t s = json_u64(o, "seq");
        if (seq)
            assert_int_equal(s, seq + 1);
        seq = s;
        if (!strstr(line, "user_w"))
            continue;            /* watch_ready's reconnects of dev_a */
        k++;
        assert_true(json_u64(o, "at_ms") > 0);
        assert_json_str(o, "kind", kinds[k - 1]);
        assert_json_str(o, "user_id", "user_w");
        const char *st = must_get(o, "status");
        if (k == 2) {
            assert_true(json_is_str(st, "active"));
            assert_json_str(o, "device_id", "");
            assert_json_str(o, "gateway_id", "");
        } else {
            assert_true(strncmp(st, "null", 4) == 0);
            assert_json_str(o, "device_id", "dev_w\\\"q");
            assert_json_str(o, "gateway_id", "gw_w");
        }
        assert_json_str(o, "conversation_id", "");
    }
}

static void test_watch_human(void **state)
{
    (void)state;
    watcher_t w;
    watch_start(&w, &S, 0);
    watch_events(&w, "user_h", "dev_h\"q");
    watch_stop(&w, SIGINT);
    watch_read(&w);
    assert_non_null(strstr(out, " connect "));
    assert_non_null(strstr(out, " user_status user user_h active"));
    assert_non_null(strstr(out, " disconnect "));
    assert_non_null(strstr(out, "user user_h device dev_h\"q gateway gw_w"));
}

/* The store goes away (its files removed): watch says so, exit 3. */
static void test_watch_store_gone(void **state)
{
    (void)state;
    th_store_t D;
    const char *args[] = { "--capacity", "4096", NULL };
    assert_int_equal(th_store_start(&D, args), 0);
    watcher_t w;
    watch_start(&w, &D, 1);
    pres_t *d = NULL;
    assert_int_equal(pres_open(&d, D.name, PRES_RDWR), 0);
    struct lines_arg any = { &w, NULL, 1 };
    int seen = 0;
    for (int tries = 0; tries < 50 && !seen; tries++) {
        assert_int_equal(pres_connect(d, "u", "d", "g", LONG_TTL, NULL), 0);
        seen = th_wait_until(has_lines, &any, 200);
    }
    assert_true(seen);
    pres_close(d);
    char path[600];
    snprintf(path, sizeof path, "%s/presence.%s", D.dir, D.name);
    assert_int_equal(unlink(path), 0);
    int rc = th_wait_child(w.pid, 5000);
    th_store_destroy(&D);
    setenv("PRESENCE_SHM_DIR", S.dir, 1);
    setenv("PRESENCE_NAME", S.name, 1);
    if (rc != 3)
        fail_msg("watch of a store that went away: exit %d, expected 3", rc);
}

/* A store whose files are not a store: exit 3, and check says so. */
static void test_damaged_store(void **state)
{
    (void)state;
    th_store_t D;
    const char *args[] = { "--capacity", "4096", NULL };
    assert_int_equal(th_store_start(&D, args), 0);
    th_daemon_stop(&D);
    char prefix[80];
    snprintf(prefix, sizeof prefix, "presence.%s", D.name);
    DIR *dir = opendir(D.dir);
    assert_non_null(dir);
    struct dirent *e;
    int damaged = 0;
    unsigned char junk[256];
    memset(junk, 0xa5, sizeof junk);
    while ((e = readdir(dir))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0)
            continue;
        char path[600];
        snprintf(path, sizeof path, "%s/%s", D.dir, e->d_name);
        int fd = open(path, O_WRONLY | O_NOFOLLOW);
        if (fd < 0)
            continue;   /* not a regular file */
        if (pwrite(fd, junk, sizeof junk, 0) == (ssize_t)sizeof junk)
            damaged++;
        close(fd);
    }
    closedir(dir);
    int rc_stats = th_ctl(&D, out, sizeof out, (const char *const[]){ "stats", NULL });
    int rc_check = th_ctl(&D, out, sizeof out, (const char *const[]){ "check", NULL });
    th_store_destroy(&D);
    setenv("PRESENCE_SHM_DIR", S.dir, 1);
    setenv("PRESENCE_NAME", S.name, 1);
    assert_true(damaged > 0);
    if (rc_stats != 3)
        fail_msg("stats on a damaged store: exit %d, expected 3", rc_stats);
    if (rc_check != 3)
        fail_msg("check on a damaged store: exit %d, expected 3", rc_check);
}

/* `user`: the pres_user_view_t fields and user_id, enums as lowercase
 * strings, as the system and as viewers see the user; exit 1 for a user
 * the store never heard of.  (Last in the group: it adds users.) */
static void expect_user_json(const char *user, const char *viewer, int contact,
                             const char *status, const char *seen, uint64_t devices)
{
    char what[160];
    int rc;
    snprintf(what, sizeof what, "user %s as %s%s --json", user, viewer ? viewer : "system",
             contact ? " (contact)" : "");
    if (!viewer)
        rc = CTL("user", user, "--json");
    else if (contact)
        rc = CTL("user", user, "--viewer", viewer, "--contact", "--json");
    else
        rc = CTL("user", user, "--json", "--viewer", viewer);
    expect_exit(rc, 0, what);
    const char *doc = json_doc(out);
    assert_json_str(doc, "user_id", user);
    assert_json_str(doc, "status", status);
    assert_json_str(doc, "seen", seen);
    assert_int_equal(json_u64(doc, "devices"), devices);
    uint64_t ls = json_u64(doc, "last_seen_ms");
    if (strcmp(seen, "exact") == 0)
        assert_true(ls > 0);
    else
        assert_int_equal(ls, 0);
}

static void test_user(void **state)
{
    (void)state;
    expect_user_json("user_a", NULL, 0, "active", "exact", 2);
    expect_user_json("user_z", NULL, 0, "offline", "exact", 0);
    expect_user_json("user_z", "someone", 0, "offline", "exact", 0);
    pres_user_view_t v;
    assert_int_equal(pres_user(rw, "user_z", NULL, &v), 0);
    expect_exit(CTL("user", "user_z", "--json"), 0, "user user_z --json");
    assert_int_equal(json_u64(json_doc(out), "last_seen_ms"), v.last_seen_ms);

    pres_privacy_t pol = { .last_seen = PRES_CONTACTS, .online = PRES_EVERYONE,
                           .approximate = 1 };
    assert_int_equal(pres_set_privacy(rw, "user_a", &pol), 0);
    expect_user_json("user_a", "stranger", 0, "active", "recently", 2);
    expect_user_json("user_a", "friend", 1, "active", "exact", 2);
    assert_int_equal(pres_set_activity(rw, "dev_a", PRES_IDLE), 0);
    assert_int_equal(pres_set_activity(rw, "dev_b", PRES_IDLE), 0);
    expect_user_json("user_a", NULL, 0, "idle", "exact", 2);

    pres_privacy_t shut = { .last_seen = PRES_NOBODY, .online = PRES_NOBODY };
    assert_int_equal(pres_set_privacy(rw, "user_p", &shut), 0);
    expect_user_json("user_p", NULL, 0, "offline", "never", 0);
    expect_user_json("user_p", "stranger", 1, "offline", "hidden", 0);
    shut.approximate = 1;
    assert_int_equal(pres_set_privacy(rw, "user_p", &shut), 0);
    expect_user_json("user_p", "stranger", 0, "offline", "long_ago", 0);

    expect_exit(CTL("user", "user_a"), 0, "user user_a");
    assert_non_null(strstr(out, "user_a"));
    assert_non_null(strstr(out, "idle"));
    expect_exit(CTL("user", "user_a", "--viewer", "stranger"), 0, "user as stranger");
    assert_non_null(strstr(out, "stranger"));
    assert_non_null(strstr(out, "recently"));

    expect_exit(CTL("user", "no_such_user"), 1, "user no_such_user");
    expect_exit(CTL("user", "no_such_user", "--json"), 1, "user no_such_user --json");
    expect_exit(CTL("user", "no_such_user", "--viewer", "x", "--contact"), 1,
                "user no_such_user as x");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_bad_usage),
        cmocka_unit_test(test_store_missing),
        cmocka_unit_test(test_stats_human),
        cmocka_unit_test(test_stats_json),
        cmocka_unit_test(test_stats_prometheus),
        cmocka_unit_test(test_device),
        cmocka_unit_test(test_device_unknown),
        cmocka_unit_test(test_route),
        cmocka_unit_test(test_route_none),
        cmocka_unit_test(test_dump),
        cmocka_unit_test(test_check),
        cmocka_unit_test(test_watch_json),
        cmocka_unit_test(test_watch_human),
        cmocka_unit_test(test_watch_store_gone),
        cmocka_unit_test(test_damaged_store),
        cmocka_unit_test(test_user),
    };
    return cmocka_run_group_tests_name("ctl", tests, group_setup, group_teardown);
}
