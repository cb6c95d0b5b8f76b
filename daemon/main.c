/*
 * main.c - presenced: options and configuration, the single-daemon lock,
 * creating or adopting the store, and the main loop.
 *
 * The daemon runs in the foreground under a supervisor with --foreground;
 * without it, it detaches, and the command returns once the store is
 * published (so a script can use the store as soon as presenced returns).
 * Signal handlers only set flags.
 *
 * Start: the lock, then the LMDB mirror (a damaged, foreign or unwritable
 * directory stops us before the region is touched), then the store:
 * adopted when its files validate (LMDB is then brought up to date with
 * it in the background), else rebuilt from LMDB when LMDB holds anything,
 * else created empty.  SIGTERM/SIGINT: the mirror is flushed, then exit 0
 * (1 if LMDB refused part of it).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "atomics.h"
#include "clock.h"
#include "daemon.h"
#include "mirror.h"
#include "store.h"

int pd_log_level = LOG_INFO;
static volatile sig_atomic_t stop_flag, reload_flag;

void pd_log(int level, const char *fmt, ...)
{
    static const char *names[] = { "error", "warn", "info", "debug" };
    if (level > pd_log_level)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "presenced[%d] %s %s\n", (int)getpid(), names[level], msg);
}

/* ---- options: one table feeds the command line and the config file ------ */

enum opt_kind { OPT_U64, OPT_STR, OPT_FLAG };

typedef struct {
    const char *name;
    enum opt_kind kind;
    size_t off;                  /* in pd_config_t */
    size_t size;                 /* OPT_STR: buffer size */
    uint64_t min, max;
    const char *help;
} opt_t;

#define CFG(f) offsetof(pd_config_t, f)
static const opt_t opts[] = {
    { "name", OPT_STR, CFG(name), sizeof(((pd_config_t *)0)->name), 0, 0,
      "store name (default: $PRESENCE_NAME or \"default\")" },
    { "db", OPT_STR, CFG(db), sizeof(((pd_config_t *)0)->db), 0, 0,
      "LMDB directory (default: $XDG_STATE_HOME/presence/NAME or ./var/NAME)" },
    { "capacity", OPT_U64, CFG(capacity), 0, 1, PRES_DEV_CAP_MAX, "device records (1048576)" },
    { "users", OPT_U64, CFG(users), 0, 1, PRES_USER_CAP_MAX, "user records (= capacity)" },
    { "exceptions", OPT_U64, CFG(exceptions), 0, 1, UINT32_MAX,
      "privacy exception entries over all users (262144)" },
    { "events", OPT_U64, CFG(events), 0, 1024, UINT32_MAX, "change-feed capacity (262144)" },
    { "gateways", OPT_U64, CFG(gateways), 0, 1, PRES_GW_CAP_MAX,
      "distinct gateway ids (16384, rounded up to a power of two)" },
    { "foreground", OPT_FLAG, CFG(foreground), 0, 0, 1, "do not detach" },
    { "idle-after-ms", OPT_U64, CFG(idle_after_ms), 0, 0, UINT32_MAX,
      "a device without interaction this long is idle (300000)" },
    { "offline-grace-ms", OPT_U64, CFG(offline_grace_ms), 0, 0, UINT32_MAX,
      "a user's status holds this long after the last device (10000)" },
    { "retain-ms", OPT_U64, CFG(retain_ms), 0, 1, UINT64_MAX / 2,
      "offline devices stay in shared memory this long (2592000000)" },
    { "config", OPT_STR, CFG(config), sizeof(((pd_config_t *)0)->config), 0, 0,
      "a file of key = value lines (the long options)" },
    { "log-level", OPT_U64, CFG(log_level), 0, 0, 3, "0 error .. 3 debug (2)" },
    { "db-map-max", OPT_U64, CFG(db_map_max), 0, 0, UINT64_MAX / 2,
      "bytes LMDB's map may grow to (0: the free space of its filesystem)" },
};
#define NOPTS (sizeof opts / sizeof opts[0])

static void usage(FILE *f)
{
    fprintf(f, "usage: presenced [options]\n\n");
    for (size_t i = 0; i < NOPTS; i++)
        fprintf(f, "  --%-18s %s%s\n", opts[i].name, opts[i].kind == OPT_FLAG ? "" : "VALUE  ",
                opts[i].help);
    fprintf(f, "  --%-18s %s\n  --%-18s %s\n", "help", "this text", "version", "the version");
}

static int opt_set(pd_config_t *c, size_t k, const char *val, const char *where)
{
    const opt_t *o = &opts[k];
    char *p = (char *)c + o->off;
    if (o->kind == OPT_FLAG) {
        int v = 1;
        if (val && (strcmp(val, "no") == 0 || strcmp(val, "0") == 0 || strcmp(val, "false") == 0))
            v = 0;
        *(int *)p = v;
    } else if (o->kind == OPT_STR) {
        if (!val || !*val || strlen(val) >= o->size) {
            fprintf(stderr, "presenced: %s: bad value for %s\n", where, o->name);
            return -1;
        }
        strcpy(p, val);
    } else {
        char *end;
        errno = 0;
        if (!val || !*val || *val == '-') {
            fprintf(stderr, "presenced: %s: %s needs a number\n", where, o->name);
            return -1;
        }
        unsigned long long v = strtoull(val, &end, 10);
        if (errno || *end || v < o->min || v > o->max) {
            fprintf(stderr, "presenced: %s: bad value for %s: '%s' (%llu .. %llu)\n", where,
                    o->name, val, (unsigned long long)o->min, (unsigned long long)o->max);
            return -1;
        }
        if (o->off == CFG(log_level))
            *(int *)p = (int)v;
        else
            *(uint64_t *)p = v;
    }
    return 0;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r'))
        *--e = '\0';
    return s;
}

/* key = value lines; '#' starts a comment anywhere; options the command line
 * set win. */
static int config_load(pd_config_t *c, const char *path)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        fprintf(stderr, "presenced: cannot read config %s: %s\n", path, strerror(errno));
        return -1;
    }
    char line[8192];
    int lineno = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *s = trim(line);
        if (!*s)
            continue;
        char where[64];
        snprintf(where, sizeof where, "line %d", lineno);
        char *eq = strchr(s, '=');
        char *key = s, *val = NULL;
        if (eq) {
            *eq = '\0';
            val = trim(eq + 1);
        }
        key = trim(key);
        size_t k = 0;
        while (k < NOPTS && strcmp(opts[k].name, key) != 0)
            k++;
        if (k == NOPTS || strcmp(key, "config") == 0) {
            fprintf(stderr, "presenced: %s:%d: unknown key '%s'\n", path, lineno, key);
            rc = -1;
        } else if (!c->set[k]) {
            if (opts[k].kind != OPT_FLAG && !val) {
                fprintf(stderr, "presenced: %s:%d: '%s' needs '= value'\n", path, lineno, key);
                rc = -1;
            } else {
                rc = opt_set(c, k, val, where);
            }
        }
    }
    fclose(f);
    return rc;
}

static void config_defaults(pd_config_t *c)
{
    c->capacity = 1048576;
    c->exceptions = 262144;
    c->events = 262144;
    c->gateways = 16384;
    c->idle_after_ms = 300000;
    c->offline_grace_ms = 10000;
    c->retain_ms = UINT64_C(2592000000);
    c->log_level = LOG_INFO;
}

static int parse_args(pd_config_t *c, int argc, char **argv)
{
    struct option lo[NOPTS + 3];
    for (size_t i = 0; i < NOPTS; i++)
        lo[i] = (struct option){ opts[i].name,
                                 opts[i].kind == OPT_FLAG ? no_argument : required_argument,
                                 NULL, (int)(256 + i) };
    lo[NOPTS] = (struct option){ "help", no_argument, NULL, 'h' };
    lo[NOPTS + 1] = (struct option){ "version", no_argument, NULL, 'V' };
    lo[NOPTS + 2] = (struct option){ 0, 0, 0, 0 };
    int ch;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "hV", lo, NULL)) != -1) {
        if (ch == 'h') {
            usage(stdout);
            exit(0);
        }
        if (ch == 'V') {
            printf("presenced %d.%d.%d (region format %u)\n", PRES_VERSION_MAJOR,
                   PRES_VERSION_MINOR, PRES_VERSION_PATCH, PRES_FORMAT);
            exit(0);
        }
        if (ch < 256) {
            fprintf(stderr, "presenced: unknown or incomplete option '%s'\n", argv[optind - 1]);
            usage(stderr);
            return -1;
        }
        size_t k = (size_t)(ch - 256);
        if (opt_set(c, k, optarg, "command line") < 0)
            return -1;
        c->set[k] = 1;
    }
    if (optind < argc) {
        fprintf(stderr, "presenced: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (c->config[0] && config_load(c, c->config) < 0)
        return -1;
    const char *name = pres__region_default_name(c->name[0] ? c->name : NULL);
    if (!pres__region_name_ok(name)) {
        fprintf(stderr, "presenced: bad store name '%s' (1 to 63 of [A-Za-z0-9._-], "
                        "not starting with '.')\n", name);
        return -1;
    }
    if (name != c->name)
        snprintf(c->name, sizeof c->name, "%s", name);
    if (!c->users)
        c->users = c->capacity;
    if (!c->db[0]) {
        const char *st = getenv("XDG_STATE_HOME");
        int n = st && *st ? snprintf(c->db, sizeof c->db, "%s/presence/%s", st, c->name)
                          : snprintf(c->db, sizeof c->db, "./var/%s", c->name);
        if (n < 0 || (size_t)n >= sizeof c->db)
            return -1;
    }
    pd_log_level = c->log_level;
    return 0;
}

/* ---- lifecycle ---------------------------------------------------------------- */

static int mkdir_p(const char *path)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0770) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(buf, 0770) == 0) {
        chmod(buf, 0770);        /* what the umask took: the group shares it */
        return 0;
    }
    return errno == EEXIST ? 0 : -errno;
}

/* One daemon per store: an exclusive flock on presence.NAME.lock, held for
 * life (the kernel drops it however we die). */
static int take_lock(pd_t *d)
{
    char path[PATH_MAX];
    if (pres__region_path(path, sizeof path, d->cfg.name, ".lock") < 0)
        return -1;
    int fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0660);
    if (fd < 0) {
        pd_log(LOG_ERR, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    fchmod(fd, 0660);
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        char buf[32] = "";
        ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
        buf[n > 0 ? n : 0] = '\0';
        fprintf(stderr, "presenced: store '%s' is already served by another presenced "
                        "(pid %s)\n", d->cfg.name, buf[0] ? trim(buf) : "?");
        close(fd);
        return -1;
    }
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%d\n", (int)getpid());
    if (ftruncate(fd, 0) < 0 || pwrite(fd, buf, (size_t)n, 0) != n)
        pd_log(LOG_WARN, "cannot write pid to %s", path);
    d->lock_fd = fd;
    return 0;
}

static void remove_store_files(const char *name)
{
    char path[PATH_MAX];
    if (pres__region_path(path, sizeof path, name, NULL) == 0)
        unlink(path);
    if (pres__region_path(path, sizeof path, name, ".readers") == 0)
        unlink(path);
}

/* The store's files validate: ours.  Clients find the mirror through the
 * header, so it names this daemon's --db. */
static void adopted(pd_t *d)
{
    pres_hdr_t *h = d->m.hdr;
    pd_log(LOG_INFO, "adopting store '%s': %u devices, %u users of capacity", d->cfg.name,
           d->m.dev_cap, d->m.user_cap);
    if (d->cfg.set[2] && d->cfg.capacity != d->m.dev_cap)
        pd_log(LOG_WARN, "--capacity %llu ignored: the store was made with %u",
               (unsigned long long)d->cfg.capacity, d->m.dev_cap);
    size_t n = strlen(d->cfg.db);          /* checked to fit at start */
    if (n < sizeof h->db_dir && memcmp(h->db_dir, d->cfg.db, n + 1) != 0)
        memcpy(h->db_dir, d->cfg.db, n + 1);
}

/* Adopt (*adopt = 1), rebuild from LMDB, or create.  0 or -1 (logged). */
static int open_store(pd_t *d, int *adopt)
{
again:;
    int rc = pres__region_map(&d->m, d->cfg.name, 1);
    if (rc == 0) {
        adopted(d);
        *adopt = 1;
        return 0;
    }
    if (rc == -EPROTO) {
        pd_log(LOG_WARN, "the files of store '%s' are damaged or of another version or boot: "
                         "replacing them", d->cfg.name);
        remove_store_files(d->cfg.name);
    } else if (rc != -ENOENT) {
        pd_log(LOG_ERR, "cannot open store '%s': %s", d->cfg.name, pres_strerror(rc));
        return -1;
    }
    uint64_t gw = 1;
    while (gw < d->cfg.gateways)
        gw <<= 1;
    pres_layout_params_t lp = {
        .dev_cap = d->cfg.capacity, .user_cap = d->cfg.users, .gw_cap = gw,
        /* typing records: a quarter of the devices typing at once */
        .exceptions = d->cfg.exceptions, .typing = d->cfg.capacity / 4 + 64,
        .events = d->cfg.events, .notes = d->cfg.capacity < 65536 ? 65536 : d->cfg.capacity,
        .db_dir = d->cfg.db,
        .idle_after_ms = (uint32_t)d->cfg.idle_after_ms,
        .offline_grace_ms = (uint32_t)d->cfg.offline_grace_ms,
        .retain_ms = d->cfg.retain_ms,
    };
    uint64_t held = pd_db_entries(pd_mirror_db(d));
    if (held == UINT64_MAX) {
        /* Never start empty over a mirror we could not read. */
        pd_log(LOG_ERR, "cannot read the LMDB mirror in %s to rebuild store '%s'",
               d->cfg.db, d->cfg.name);
        return -EIO;
    }
    if (held > 0)
        return pd_rebuild(d, &lp);
    rc = pres__region_create(&d->m, d->cfg.name, &lp);
    if (rc == -EEXIST)
        goto again;       /* raced a file into place: look again */
    if (rc < 0) {
        pd_log(LOG_ERR, "cannot create store '%s' in %s: %s", d->cfg.name, pres__region_dir(),
               strerror(-rc));
        return -1;
    }
    pd_log(LOG_INFO, "created store '%s' in %s: %u devices, %u users, %llu bytes", d->cfg.name,
           pres__region_dir(), d->m.dev_cap, d->m.user_cap, (unsigned long long)d->m.size);
    return 0;
}

/* Options that may change on a running store (SIGHUP, adopt). */
static void publish_settings(pd_t *d)
{
    pres_hdr_t *h = d->m.hdr;
    pa_store(&h->idle_after_ms, (uint32_t)d->cfg.idle_after_ms);
    pa_store(&h->offline_grace_ms, (uint32_t)d->cfg.offline_grace_ms);
    pa_store(&h->retain_ms, d->cfg.retain_ms);
}

static void on_stop(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void on_hup(int sig)
{
    (void)sig;
    reload_flag = 1;
}

static void reload(pd_t *d)
{
    pd_config_t c = d->cfg;
    if (!c.config[0]) {
        pd_log(LOG_INFO, "SIGHUP: no config file to reload");
        return;
    }
    if (config_load(&c, c.config) < 0) {
        pd_log(LOG_WARN, "SIGHUP: config %s not reloaded", c.config);
        return;
    }
    d->cfg.idle_after_ms = c.idle_after_ms;
    d->cfg.offline_grace_ms = c.offline_grace_ms;
    d->cfg.retain_ms = c.retain_ms;
    d->cfg.log_level = c.log_level;
    pd_log_level = c.log_level;
    publish_settings(d);
    pd_log(LOG_INFO, "SIGHUP: settings reloaded from %s", c.config);
}

/* Detach first, before anything is opened: LMDB's locks belong to the
 * process that opened the environment, and the writer thread would not
 * survive a fork.  The parent waits until the child says the store is
 * published, then exits 0; if the child dies first, the parent exits with
 * its status.  Returns the child's end of the pipe, or -1. */
static int detach(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid > 0) {
        char c;
        ssize_t n;
        close(p[1]);
        while ((n = read(p[0], &c, 1)) < 0 && errno == EINTR)
            ;
        if (n == 1)
            _exit(0);
        int st = 0;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
            ;
        _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 1);
    }
    close(p[0]);
    setsid();
    return p[1];
}

/* The store is published: let the parent go. */
static void detach_done(int fd)
{
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        close(null);
    }
    if (write(fd, "1", 1) != 1)
        pd_log(LOG_WARN, "cannot tell the starting process the store is ready");
    close(fd);
}

int main(int argc, char **argv)
{
    static pd_t d;
    config_defaults(&d.cfg);
    if (parse_args(&d.cfg, argc, argv) < 0)
        return 2;

    struct sigaction sa = { .sa_handler = on_stop };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_hup;
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int ready_fd = -1;
    if (!d.cfg.foreground && (ready_fd = detach()) < 0) {
        fprintf(stderr, "presenced: cannot detach: %s\n", strerror(errno));
        return 1;
    }
    if (mkdir_p(d.cfg.db) < 0) {
        fprintf(stderr, "presenced: cannot create --db %s: %s\n", d.cfg.db, strerror(errno));
        return 1;
    }
    /* Clients find the mirror through the store's header, from any
     * working directory. */
    char absdb[PATH_MAX];
    errno = 0;
    if (!realpath(d.cfg.db, absdb) || strlen(absdb) >= sizeof d.m.hdr->db_dir) {
        fprintf(stderr, "presenced: --db %s: %s\n", d.cfg.db,
                errno ? strerror(errno) : "path too long");
        return 1;
    }
    snprintf(d.cfg.db, sizeof d.cfg.db, "%s", absdb);
    if (take_lock(&d) < 0)
        return 1;
    uint64_t t0 = pres__mono_ms();
    if (pd_mirror_open(&d) < 0)
        return 1;
    int adopt = 0;
    if (open_store(&d, &adopt) < 0)
        return 1;
    /* The writer's handle and reader slot before the store is ours (which
     * pd_adopt announces): whoever waits for us finds us complete. */
    if (pd_mirror_start(&d, adopt) < 0)
        return 1;
    if (pd_adopt(&d) < 0) {
        pd_log(LOG_ERR, "out of memory adopting the store");
        return 1;
    }
    publish_settings(&d);
    if (adopt)
        pd_log(LOG_INFO, "store '%s' adopted in %llu ms; LMDB is brought up to date with it "
                         "in the background", d.cfg.name,
               (unsigned long long)(pres__mono_ms() - t0));
    if (ready_fd >= 0)
        detach_done(ready_fd);
    pd_log(LOG_INFO, "serving store '%s' (db %s)", d.cfg.name, d.cfg.db);

    while (!stop_flag) {
        if (reload_flag) {
            reload_flag = 0;
            reload(&d);
        }
        /* A tick every PD_TICK_MS from start to start, whatever the tick
         * took: the timers' lag (expiry events) is the period, not the
         * period plus the work. */
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        next.tv_nsec += PD_TICK_MS * 1000000L;
        if (next.tv_nsec >= 1000000000L) {
            next.tv_sec++;
            next.tv_nsec -= 1000000000L;
        }
        pd_tick(&d);
        struct timespec done;
        clock_gettime(CLOCK_MONOTONIC, &done);
        int64_t late_ms = (done.tv_sec - next.tv_sec) * 1000 +
                          (done.tv_nsec - next.tv_nsec) / 1000000;
        if (late_ms > 5 * PD_TICK_MS)
            pd_log(LOG_DEBUG, "a tick took %lld ms", (long long)(late_ms + PD_TICK_MS));
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR &&
               !stop_flag && !reload_flag)
            ;
    }
    pd_log(LOG_INFO, "stopping: the store stays usable by its clients");
    int rc = pd_mirror_stop(&d);
    pd_shutdown(&d);
    pres__region_unmap(&d.m);
    close(d.lock_fd);
    return rc < 0 ? 1 : 0;
}
