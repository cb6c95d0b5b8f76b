/*
 * harness.c - a private store served by a real presenced, the tools run as
 * child processes, and polling under deadlines.  See harness.h.
 *
 * Every child is waited for under a deadline and killed past it, so a hung
 * daemon or tool fails one test instead of hanging the suite.  Daemons stay
 * in the test's process group: when tests/run.sh's `timeout` fires it signals
 * the whole group, daemons included.
 */
#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "inspect.h"
#include "presence.h"

/* Under sanitizers the daemon maps and initialises its region several
 * times slower; 10 s leaves room for a loaded machine as well. */
#define START_DEADLINE_MS 10000
/* SIGTERM flushes the LMDB mirror first: bounded by the daemon, but give
 * it the same room as a start. */
#define STOP_DEADLINE_MS  10000
#define CTL_DEADLINE_MS   30000

static const char log_name[] = "presenced.log";

/* ------------------------------------------------------------------------ */
/* Time and polling                                                          */

uint64_t th_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t th_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void th_nap_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static void nap_ms(long ms)
{
    th_nap_us(ms * 1000);
}

uint64_t th_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * UINT64_C(2685821657736338717);
}

int th_wait_until(int (*cond)(void *arg), void *arg, int timeout_ms)
{
    uint64_t deadline = th_mono_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        if (cond(arg))
            return 1;
        if (th_mono_ms() >= deadline)
            return cond(arg) ? 1 : 0;
        nap_ms(1);
    }
}

int th_scale(int normal, int sanitized)
{
    const char *s = getenv("PRES_TEST_SANITIZED");
    return (s && *s && strcmp(s, "0") != 0) ? sanitized : normal;
}

const char *th_build_dir(void)
{
    const char *b = getenv("PRES_BUILD");
    return (b && *b) ? b : "build";
}

/* ------------------------------------------------------------------------ */
/* Children                                                                  */

static int decode_status(int st)
{
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return -1;
}

pid_t th_fork(int (*fn)(void *arg), void *arg)
{
    fflush(NULL);  /* or buffered output is printed twice */
    pid_t pid = fork();
    if (pid == 0)
        _exit(fn(arg));
    return pid;
}

int th_wait_child(pid_t pid, int timeout_ms)
{
    uint64_t deadline = th_mono_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    int st;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return decode_status(st);
        if (r < 0 && errno != EINTR)
            return -1;
        if (th_mono_ms() >= deadline)
            break;
        nap_ms(1);
    }
    kill(pid, SIGKILL);
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    return -1;
}

/*
 * Fork and exec path with argv.  In the child, fd 1 and fd 2 become
 * out_fd / err_fd when >= 0.  A child of the main thread dies with the test
 * (PR_SET_PDEATHSIG fires when the forking *thread* exits, so only the main
 * thread asks for it).
 */
static pid_t spawn(const char *path, char *const argv[], int out_fd, int err_fd)
{
    int is_main = (pid_t)syscall(SYS_gettid) == getpid();
    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    if (is_main) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
    }
    if (out_fd >= 0 && out_fd != 1)
        dup2(out_fd, 1);
    if (err_fd >= 0 && err_fd != 2)
        dup2(err_fd, 2);
    execv(path, argv);
    fprintf(stderr, "harness: exec %s: %s\n", path, strerror(errno));
    _exit(127);
}

/* argv = { path, pre..., extra..., NULL }, a heap array the caller frees. */
static char **build_argv(const char *path, const char *const *pre, size_t npre,
                         const char *const *extra)
{
    size_t nextra = 0;
    while (extra && extra[nextra])
        nextra++;
    char **argv = calloc(1 + npre + nextra + 1, sizeof *argv);
    if (!argv)
        return NULL;
    size_t k = 0;
    argv[k++] = (char *)path;
    for (size_t i = 0; i < npre; i++)
        argv[k++] = (char *)pre[i];
    for (size_t i = 0; i < nextra; i++)
        argv[k++] = (char *)extra[i];
    argv[k] = NULL;
    return argv;
}

/* Read everything from fd into buf (NUL-terminated, truncated to cap, the
 * rest drained) until EOF or the deadline.  Returns 0 on EOF, -1 otherwise. */
static int slurp(int fd, char *buf, size_t cap, uint64_t deadline)
{
    size_t len = 0;
    char sink[4096];
    if (buf && cap)
        buf[0] = '\0';
    for (;;) {
        uint64_t now = th_mono_ms();
        if (now >= deadline)
            return -1;
        struct pollfd pfd = { fd, POLLIN, 0 };
        int r = poll(&pfd, 1, (int)(deadline - now));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        char *dst = sink;
        size_t room = sizeof sink;
        if (buf && len + 1 < cap) {
            dst = buf + len;
            room = cap - 1 - len;
        }
        ssize_t n = read(fd, dst, room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            return 0;
        if (dst != sink) {
            len += (size_t)n;
            buf[len] = '\0';
        }
    }
}

/* ------------------------------------------------------------------------ */
/* The daemon                                                                */

static void path_in(const th_store_t *s, const char *leaf, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s", s->dir, leaf);
}

/* Print the daemon's log (its stderr) to our stderr. */
void th_store_dump_log(const th_store_t *s)
{
    char path[320];
    path_in(s, log_name, path, sizeof path);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    fprintf(stderr, "---- %s ----\n", path);
    char line[512];
    while (fgets(line, sizeof line, f))
        fputs(line, stderr);
    fprintf(stderr, "---- end of %s ----\n", path);
    fclose(f);
}

static int log_fd(const th_store_t *s)
{
    const char *v = getenv("PRES_TEST_VERBOSE");
    if (v && *v)
        return -1;  /* inherit our stderr */
    char path[320];
    path_in(s, log_name, path, sizeof path);
    return open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

struct up_arg {
    th_store_t *s;
    int         exited;   /* the daemon died while we waited */
    int         status;
};

/*
 * The store is up when it opens and, where the library can tell us, this
 * daemon holds it: after a restart the old region opens at once, before
 * the new daemon has adopted it.
 */
static int store_up(void *arg)
{
    struct up_arg *a = arg;
    int st;
    if (waitpid(a->s->pid, &st, WNOHANG) == a->s->pid) {
        a->exited = 1;
        a->status = decode_status(st);
        return 1;
    }
    pres_t *p = NULL;
    if (pres_open(&p, a->s->name, PRES_RDONLY) != 0)
        return 0;
    pres_inspect_info_t info;
    int up = 1;
    if (pres__inspect_info(p, &info) == 0)
        up = info.daemon_pid == (int)a->s->pid;
    pres_close(p);
    return up;
}

int th_daemon_start(th_store_t *s, const char *const *extra_args)
{
    char path[512];
    snprintf(path, sizeof path, "%s/presenced", th_build_dir());
    const char *pre[] = { "--foreground", "--name", s->name, "--db", s->db };
    char **argv = build_argv(path, pre, sizeof pre / sizeof pre[0], extra_args);
    if (!argv)
        return -1;
    int lfd = log_fd(s);
    s->pid = spawn(path, argv, -1, lfd);
    free(argv);
    if (lfd >= 0)
        close(lfd);
    if (s->pid < 0) {
        s->pid = 0;
        return -1;
    }
    struct up_arg a = { s, 0, 0 };
    if (th_wait_until(store_up, &a, START_DEADLINE_MS) && !a.exited)
        return 0;
    if (a.exited) {
        fprintf(stderr, "harness: presenced for %s exited with status %d "
                "before the store opened\n", s->name, a.status);
        s->pid = 0;
    } else {
        fprintf(stderr, "harness: store %s did not open within %d ms\n",
                s->name, START_DEADLINE_MS);
        th_daemon_kill(s);
    }
    th_store_dump_log(s);
    return -1;
}

int th_store_start(th_store_t *s, const char *const *extra_args)
{
    static unsigned counter;
    memset(s, 0, sizeof *s);
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    snprintf(s->dir, sizeof s->dir, "%s/prestest.XXXXXX", tmp);
    if (!mkdtemp(s->dir)) {
        fprintf(stderr, "harness: mkdtemp %s: %s\n", s->dir, strerror(errno));
        s->dir[0] = '\0';
        return -1;
    }
    snprintf(s->db, sizeof s->db, "%s/db", s->dir);
    unsigned n = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
    snprintf(s->name, sizeof s->name, "t%ld_%u", (long)getpid(), n);
    setenv("PRESENCE_SHM_DIR", s->dir, 1);
    setenv("PRESENCE_NAME", s->name, 1);
    return th_daemon_start(s, extra_args);
}

int th_daemon_run_expect_exit(const char *const *args, int timeout_ms,
                              char *errbuf, size_t errcap)
{
    char path[512];
    snprintf(path, sizeof path, "%s/presenced", th_build_dir());
    char **argv = build_argv(path, NULL, 0, args);
    if (!argv)
        return -1;
    int pfd[2] = { -1, -1 };
    if (errbuf && pipe2(pfd, O_CLOEXEC) != 0) {
        free(argv);
        return -1;
    }
    uint64_t deadline = th_mono_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    pid_t pid = spawn(path, argv, -1, errbuf ? pfd[1] : -1);
    free(argv);
    if (errbuf)
        close(pfd[1]);
    if (pid < 0) {
        if (errbuf)
            close(pfd[0]);
        return -1;
    }
    if (errbuf) {
        slurp(pfd[0], errbuf, errcap, deadline);
        close(pfd[0]);
    }
    uint64_t now = th_mono_ms();
    return th_wait_child(pid, now < deadline ? (int)(deadline - now) : 0);
}

int th_daemon_stop(th_store_t *s)
{
    if (s->pid <= 0)
        return -1;
    kill(s->pid, SIGCONT);  /* a test may have left it stopped */
    kill(s->pid, SIGTERM);
    int rc = th_wait_child(s->pid, STOP_DEADLINE_MS);
    s->pid = 0;
    return rc;
}

void th_daemon_kill(th_store_t *s)
{
    if (s->pid <= 0)
        return;
    kill(s->pid, SIGKILL);
    int st;
    while (waitpid(s->pid, &st, 0) < 0 && errno == EINTR)
        ;
    s->pid = 0;
}

static int rm_entry(const char *path, const struct stat *sb, int flag,
                    struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    if (remove(path) != 0 && errno != ENOENT)
        fprintf(stderr, "harness: remove %s: %s\n", path, strerror(errno));
    return 0;
}

void th_store_destroy(th_store_t *s)
{
    if (s->pid > 0) {
        int rc = th_daemon_stop(s);
        if (rc != 0) {
            /* A clean shutdown is part of the contract; a sanitizer report
             * also lands here.  Say so, with the daemon's own words. */
            fprintf(stderr, "harness: presenced for %s: exit status %d on "
                    "SIGTERM (expected 0)\n", s->name, rc);
            th_store_dump_log(s);
        }
    }
    if (s->dir[0]) {
        const char *keep = getenv("PRES_TEST_KEEP");
        if (keep && *keep)
            fprintf(stderr, "harness: kept %s\n", s->dir);
        else
            nftw(s->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    }
    s->dir[0] = '\0';
    s->pid = 0;
}

/* ------------------------------------------------------------------------ */
/* presencectl                                                               */

int th_ctl(th_store_t *s, char *out, size_t cap, const char *const *args)
{
    char path[512];
    snprintf(path, sizeof path, "%s/presencectl", th_build_dir());
    const char *pre[] = { "--name", s->name };
    char **argv = build_argv(path, pre, 2, args);
    if (!argv)
        return -1;
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) != 0) {
        free(argv);
        return -1;
    }
    uint64_t deadline = th_mono_ms() + CTL_DEADLINE_MS;
    pid_t pid = spawn(path, argv, pfd[1], -1);
    free(argv);
    close(pfd[1]);
    if (pid < 0) {
        close(pfd[0]);
        return -1;
    }
    char dummy[1];
    if (slurp(pfd[0], out ? out : dummy, out ? cap : sizeof dummy, deadline) != 0)
        fprintf(stderr, "harness: presencectl did not finish within %d ms\n",
                CTL_DEADLINE_MS);
    close(pfd[0]);
    uint64_t now = th_mono_ms();
    return th_wait_child(pid, now < deadline ? (int)(deadline - now) : 0);
}

/* ------------------------------------------------------------------------ */
/* presencectl check under a deadline                                        */

struct check_arg {
    th_store_t *s;
    int rc, runs, first_rc;
    char *out;
    size_t cap;
    char first[1600];
};

static int check_passes(void *arg)
{
    struct check_arg *a = arg;
    const char *args[] = { "check", NULL };
    a->rc = th_ctl(a->s, a->out, a->cap, args);
    if (a->runs++ == 0 && a->rc != 0) {
        a->first_rc = a->rc;
        snprintf(a->first, sizeof a->first, "%s", a->out);
    }
    return a->rc == 0;
}

int th_check_ok(th_store_t *s, const char *when)
{
    static char out[65536];
    struct check_arg a = { s, -1, 0, 0, out, sizeof out, "" };
    int ok = th_wait_until(check_passes, &a, 5000);
    if (a.first_rc != 0)
        fprintf(stderr, "presencectl check %s: first run exit %d, %s after %d "
                "runs; first output:\n%.1500s\n", when, a.first_rc,
                ok ? "passed" : "still failing", a.runs, a.first);
    if (!ok)
        th_store_dump_log(s);
    return a.rc;
}

void th_kill_children(pid_t *kids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (kids[i] > 0) {
            kill(kids[i], SIGKILL);
            th_wait_child(kids[i], 5000);
            kids[i] = 0;
        }
    }
}

void th_note_first(_Atomic int *set, char *msg, size_t cap, const char *fmt, ...)
{
    if (atomic_exchange(set, 1) != 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, cap, fmt, ap);
    va_end(ap);
}
