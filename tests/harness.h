/*
 * harness.h - helpers shared by the tests: a private store in a temporary
 * directory served by a real presenced, the tools run as child processes,
 * and polling for conditions under a deadline (never a bare sleep).
 *
 * The binaries under test are found in $PRES_BUILD (set by tests/run.sh to
 * build, build/asan or build/tsan).
 */
#ifndef PRES_TEST_HARNESS_H
#define PRES_TEST_HARNESS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct {
    char  dir[256];     /* temporary PRESENCE_SHM_DIR, removed by stop */
    char  db[300];      /* dir/db, passed as --db */
    char  name[64];     /* store name, also set as PRESENCE_NAME */
    pid_t pid;          /* the daemon, 0 when not running */
} th_store_t;

/* The build directory holding presenced, presencectl, ... */
const char *th_build_dir(void);

/* Make a temporary directory, set PRESENCE_SHM_DIR and PRESENCE_NAME in the
 * environment, start `presenced --foreground --name NAME --db DIR/db` plus
 * the NULL-terminated extra arguments (may be NULL), and wait (<= 10 s) until
 * pres_open succeeds.  Returns 0 or -1. */
int  th_store_start(th_store_t *s, const char *const *extra_args);

/* Start the daemon again on the same directory and name (after a stop or a
 * kill), waiting until the store opens.  Returns 0 or -1. */
int  th_daemon_start(th_store_t *s, const char *const *extra_args);

/* Spawn presenced with the given arguments (NULL-terminated, without argv[0])
 * and wait for it to exit; returns its exit status, or -1 if it did not exit
 * within timeout_ms (it is then killed).  stderr goes to errbuf if not NULL. */
int  th_daemon_run_expect_exit(const char *const *args, int timeout_ms,
                               char *errbuf, size_t errcap);

/* SIGTERM the daemon and wait for it; returns its exit status (or -1). */
int  th_daemon_stop(th_store_t *s);

/* SIGKILL the daemon and reap it. */
void th_daemon_kill(th_store_t *s);

/* Stop the daemon if running and remove the directory.  A daemon that does
 * not exit 0 on SIGTERM is reported on stderr with its log.  With
 * $PRES_TEST_KEEP set the directory is kept (and named). */
void th_store_destroy(th_store_t *s);

/* Print the daemon's stderr, kept in DIR/presenced.log (unless
 * $PRES_TEST_VERBOSE is set: then the daemon writes to our stderr). */
void th_store_dump_log(const th_store_t *s);

/* Run build/presencectl with --name s->name and the given arguments
 * (NULL-terminated); capture stdout into out (NUL-terminated, truncated to
 * cap).  Returns the exit status, or -1. */
int  th_ctl(th_store_t *s, char *out, size_t cap, const char *const *args);

/* Run `presencectl check` until it exits 0, under a deadline of 5 s: the
 * daemon may still be finishing what dead clients left it.  A first run
 * that failed is reported on stderr even when a later one passes; the
 * daemon's log is printed when it never passes.  Returns the last exit
 * status (0: intact). */
int  th_check_ok(th_store_t *s, const char *when);

/* Poll cond(arg) every millisecond or so until it returns non-zero or
 * timeout_ms passes.  Returns 1 when the condition held, 0 on timeout. */
int  th_wait_until(int (*cond)(void *arg), void *arg, int timeout_ms);

/* Monotonic milliseconds and nanoseconds. */
uint64_t th_mono_ms(void);
uint64_t th_now_ns(void);

/* Sleep this long (restarting after signals), to pace a load, never in
 * place of a condition. */
void th_nap_us(long us);

/* xorshift64*: a deterministic pseudo-random stream from *state (not 0),
 * reproducible from a printed seed. */
uint64_t th_rand(uint64_t *state);

/* Fork a child that runs fn(arg) and _exit()s with its return value. */
pid_t th_fork(int (*fn)(void *arg), void *arg);

/* Wait for a child; returns its exit status, 128+signal if killed, or -1
 * if it has not exited within timeout_ms (it is then SIGKILLed). */
int  th_wait_child(pid_t pid, int timeout_ms);
/* SIGKILL and reap each child kids[0..n) that is > 0, and zero it. */
void th_kill_children(pid_t *kids, size_t n);
/* Write the message into msg (cap bytes) only if *set was 0 (it becomes 1):
 * of many processes or threads finding problems, the first one tells. */
void th_note_first(_Atomic int *set, char *msg, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* In a cmocka test: expr must return want; the failure names both codes. */
#define assert_rc(expr, want) do {                                           \
        int r_ = (expr);                                                     \
        if (r_ != (want))                                                    \
            fail_msg("%s returned %d (%s), expected %d (%s)", #expr, r_,     \
                     pres_strerror(r_), (int)(want), pres_strerror(want));   \
    } while (0)

/* Scale for iteration counts: 1 normally, smaller under sanitizers
 * ($PRES_TEST_SANITIZED set), so the whole suite stays quick. */
int  th_scale(int normal, int sanitized);

#endif /* PRES_TEST_HARNESS_H */
