/*
 * test_db.c - the LMDB mirror: record encoding (round trips, and every
 * malformed blob refused without a read out of bounds), the daemon's writer
 * (creation and file modes, staging and coalescing, deletes, persistence,
 * refusing foreign or another store's files, a full map), and the library's
 * read-only side (missing, shared per process, after fork, a map the writer
 * grew meanwhile).
 *
 * Every test works in a private directory under $TMPDIR.  The writer and a
 * reader of one environment are never open in the same process at once
 * (LMDB forbids it: closing one would drop the other's locks); where both
 * are needed, the writer runs in a child.
 *
 * With PRES_DB_TIMING set, test_timing prints how long a commit of 100,000
 * devices takes and the put + commit throughput in batches of 10,000.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "db.h"
#include "../daemon/db.h"
#include "harness.h"

#define MiB (UINT64_C(1) << 20)

static char tmp[256];          /* this test's private directory */
static char dbdir[PATH_MAX];   /* tmp/state/db: not there until opened */

/* ---- fixtures and helpers ---------------------------------------------------- */

static int make_tmp(void **state)
{
    (void)state;
    const char *t = getenv("TMPDIR");
    snprintf(tmp, sizeof tmp, "%s/pres-db-XXXXXX", t && *t ? t : "/tmp");
    if (!mkdtemp(tmp))
        return -1;
    snprintf(dbdir, sizeof dbdir, "%s/state/db", tmp);
    return 0;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path) < 0 && errno != ENOENT ? -1 : 0;
}

static int remove_tmp(void **state)
{
    (void)state;
    return nftw(tmp, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void path_in(char *out, size_t cap, const char *dir, const char *file)
{
    snprintf(out, cap, "%s/%s", dir, file);
}

static int exists(const char *dir, const char *file)
{
    char p[PATH_MAX + 64];
    path_in(p, sizeof p, dir, file);
    return access(p, F_OK) == 0;
}

static void write_file(const char *path, const void *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, buf, len), (ssize_t)len);
    close(fd);
}

/* An id of exactly len bytes, distinct per (tag, i). */
static void make_id(char *out, size_t len, char tag, unsigned i)
{
    char num[16];
    size_t n = (size_t)snprintf(num, sizeof num, "%u", i);
    if (n > len)
        n = len;   /* the low digits: distinct enough */
    memset(out, tag, len);
    memcpy(out + len - n, num + strlen(num) - n, n);
    out[len] = '\0';
}

static void fill_user(pres_db_user_t *u, unsigned seed, uint32_t n_allow, uint32_t n_deny)
{
    memset(u, 0, sizeof *u);
    u->last_seen_ms = UINT64_C(1700000000000) + seed;
    u->frozen_seen_ms = UINT64_C(0xfedcba9876543210) - seed;
    u->policy = 0xc5u ^ seed;
    u->n_allow = n_allow;
    u->n_deny = n_deny;
    /* Counts past the arrays are for testing refusals: fill what fits. */
    for (uint32_t i = 0; i < n_allow && i < PRES_EXCEPTIONS_MAX; i++)
        make_id(u->allow[i], 1 + (i + seed) % PRES_ID_MAX, 'a', i);
    for (uint32_t i = 0; i < n_deny && i < PRES_EXCEPTIONS_MAX; i++)
        make_id(u->deny[i], PRES_ID_MAX - (i + seed) % 20, 'd', i);
}

static void fill_dev(pres_db_dev_t *d, unsigned seed)
{
    memset(d, 0, sizeof *d);
    make_id(d->user_id, 1 + seed % PRES_ID_MAX, 'u', seed);
    make_id(d->gateway_id, 10, 'g', seed % 7);
    d->connected_at_ms = UINT64_C(1700000000000) + seed;
    d->last_seen_ms = d->connected_at_ms + 1000;
    d->last_active_ms = UINT64_MAX - seed;
    d->connected = seed & 1;
}

static void assert_user_eq(const pres_db_user_t *a, const pres_db_user_t *b)
{
    assert_true(a->last_seen_ms == b->last_seen_ms);
    assert_true(a->frozen_seen_ms == b->frozen_seen_ms);
    assert_int_equal(a->policy, b->policy);
    assert_int_equal(a->n_allow, b->n_allow);
    assert_int_equal(a->n_deny, b->n_deny);
    for (uint32_t i = 0; i < a->n_allow; i++)
        assert_string_equal(a->allow[i], b->allow[i]);
    for (uint32_t i = 0; i < a->n_deny; i++)
        assert_string_equal(a->deny[i], b->deny[i]);
}

static void assert_dev_eq(const pres_db_dev_t *a, const pres_db_dev_t *b)
{
    assert_string_equal(a->user_id, b->user_id);
    assert_string_equal(a->gateway_id, b->gateway_id);
    assert_true(a->connected_at_ms == b->connected_at_ms);
    assert_true(a->last_seen_ms == b->last_seen_ms);
    assert_true(a->last_active_ms == b->last_active_ms);
    assert_int_equal(a->connected, b->connected);
}

static pd_db_t *open_db(const char *dir, const char *name, uint64_t size, uint64_t max)
{
    char err[512] = "";
    pd_db_t *db = NULL;
    int rc = pd_db_open(&db, dir, name, size, max, err, sizeof err);
    if (rc != 0)
        print_error("pd_db_open %s: %d %s\n", dir, rc, err);
    assert_int_equal(rc, 0);
    return db;
}

/* pd_db_open must fail with want, and say why in a message holding `says`. */
static void assert_open_fails(const char *dir, const char *name, int want, const char *says)
{
    char err[512] = "";
    pd_db_t *db = NULL;
    int rc = pd_db_open(&db, dir, name, MiB, MiB, err, sizeof err);
    if (rc != want || !strstr(err, says))
        print_error("pd_db_open %s: got %d '%s', want %d '...%s...'\n", dir, rc, err, want, says);
    assert_int_equal(rc, want);
    assert_null(db);
    assert_non_null(strstr(err, says));
}

/* An LMDB environment made without us, holding one key if `key`. */
static void make_raw_env(const char *dir, const char *key)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mkdir(dir, 0770), 0);
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_open(env, dir, 0, 0660), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, NULL, 0, &dbi), 0);
    if (key) {
        MDB_val k = { strlen(key), (void *)key }, v = { 5, "value" };
        assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    }
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
}

/* Put raw bytes under key in a named database of a closed environment. */
static void raw_put(const char *dir, const char *dbname, const char *key, const void *val,
                    size_t len)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    mdb_env_set_maxdbs(env, PRES_DB_MAXDBS);
    assert_int_equal(mdb_env_open(env, dir, 0, 0660), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, dbname, 0, &dbi), 0);
    MDB_val k = { strlen(key), (void *)key }, v = { len, (void *)val };
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
}

/* How many of our descriptors are open on dir/file: one env per directory
 * per process holds exactly one on lock.mdb. */
static int fds_on(const char *dir, const char *file)
{
    char want[PATH_MAX + 64], real[PATH_MAX], link[PATH_MAX], p[300];
    path_in(want, sizeof want, dir, file);
    if (!realpath(want, real))
        return 0;
    DIR *d = opendir("/proc/self/fd");
    assert_non_null(d);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        snprintf(p, sizeof p, "/proc/self/fd/%s", de->d_name);
        ssize_t l = readlink(p, link, sizeof link - 1);
        if (l <= 0)
            continue;
        link[l] = '\0';
        n += strcmp(link, real) == 0;
    }
    closedir(d);
    return n;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- encoding ------------------------------------------------------------------ */

static void test_user_roundtrip(void **state)
{
    (void)state;
    static pres_db_user_t u, back;
    static uint8_t buf[PRES_DB_USER_MAX];
    size_t len;

    /* Full lists of the longest ids: the largest record there is. */
    fill_user(&u, 0, PRES_EXCEPTIONS_MAX, PRES_EXCEPTIONS_MAX);
    for (int i = 0; i < PRES_EXCEPTIONS_MAX; i++) {
        make_id(u.allow[i], PRES_ID_MAX, 'A', (unsigned)i);
        make_id(u.deny[i], PRES_ID_MAX, 'D', (unsigned)i);
    }
    assert_int_equal(pres__db_user_encode(&u, buf, sizeof buf, &len), 0);
    assert_int_equal(len, PRES_DB_USER_MAX);
    memset(&back, 0x5a, sizeof back);
    assert_int_equal(pres__db_user_decode(buf, len, &back), 0);
    assert_user_eq(&u, &back);

    /* Mixed lengths, and the entries past the counts come back empty. */
    fill_user(&u, 7, 3, 64);
    assert_int_equal(pres__db_user_encode(&u, buf, sizeof buf, &len), 0);
    memset(&back, 0x5a, sizeof back);
    assert_int_equal(pres__db_user_decode(buf, len, &back), 0);
    assert_user_eq(&u, &back);
    assert_string_equal(back.allow[3], "");
    assert_string_equal(back.allow[63], "");

    /* Nothing set: the smallest record. */
    memset(&u, 0, sizeof u);
    assert_int_equal(pres__db_user_encode(&u, buf, sizeof buf, &len), 0);
    assert_int_equal(len, 32);
    assert_int_equal(pres__db_user_decode(buf, len, &back), 0);
    assert_user_eq(&u, &back);

    /* The integers are little-endian after a u32 record version. */
    u.last_seen_ms = 0x0102030405060708u;
    assert_int_equal(pres__db_user_encode(&u, buf, sizeof buf, &len), 0);
    const uint8_t head[] = { 1, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1 };
    assert_memory_equal(buf, head, sizeof head);
}

static void test_dev_roundtrip(void **state)
{
    (void)state;
    pres_db_dev_t d, back;
    uint8_t buf[PRES_DB_DEV_MAX];
    size_t len;

    fill_dev(&d, 1);
    make_id(d.user_id, PRES_ID_MAX, 'u', 1);
    make_id(d.gateway_id, PRES_ID_MAX, 'g', 1);
    assert_int_equal(pres__db_dev_encode(&d, buf, sizeof buf, &len), 0);
    assert_int_equal(len, PRES_DB_DEV_MAX);
    memset(&back, 0x5a, sizeof back);
    assert_int_equal(pres__db_dev_decode(buf, len, &back), 0);
    assert_dev_eq(&d, &back);

    /* A device with no gateway known, not connected. */
    fill_dev(&d, 2);
    d.gateway_id[0] = '\0';
    assert_int_equal(pres__db_dev_encode(&d, buf, sizeof buf, &len), 0);
    assert_int_equal(pres__db_dev_decode(buf, len, &back), 0);
    assert_dev_eq(&d, &back);

    /* connected is a flag: any non-zero value is written as 1. */
    d.connected = 7;
    assert_int_equal(pres__db_dev_encode(&d, buf, sizeof buf, &len), 0);
    assert_int_equal(pres__db_dev_decode(buf, len, &back), 0);
    assert_int_equal(back.connected, 1);
}

static void test_encode_errors(void **state)
{
    (void)state;
    static pres_db_user_t u;
    static uint8_t buf[PRES_DB_USER_MAX];
    pres_db_dev_t d;
    size_t len;

    fill_user(&u, 0, PRES_EXCEPTIONS_MAX + 1, 0);
    assert_int_equal(pres__db_user_encode(&u, buf, sizeof buf, &len), -E2BIG);
    fill_user(&u, 0, 0, PRES_EXCEPTIONS_MAX + 1);
    assert_int_equal(pres__db_user_encode(&u, buf, sizeof buf, &len), -E2BIG);
    fill_user(&u, 0, 2, 0);
    memset(u.allow[1], 'x', sizeof u.allow[1]);   /* no NUL: 64 bytes or more */
    assert_int_equal(pres__db_user_encode(&u, buf, sizeof buf, &len), -ENAMETOOLONG);
    u.allow[1][0] = '\0';
    assert_int_equal(pres__db_user_encode(&u, buf, sizeof buf, &len), -EINVAL);
    fill_user(&u, 0, 2, 2);
    assert_int_equal(pres__db_user_encode(&u, buf, 40, &len), -ENOBUFS);

    fill_dev(&d, 3);
    d.user_id[0] = '\0';
    assert_int_equal(pres__db_dev_encode(&d, buf, PRES_DB_DEV_MAX, &len), -EINVAL);
    fill_dev(&d, 3);
    memset(d.gateway_id, 'g', sizeof d.gateway_id);
    assert_int_equal(pres__db_dev_encode(&d, buf, PRES_DB_DEV_MAX, &len), -ENAMETOOLONG);
    fill_dev(&d, 3);
    assert_int_equal(pres__db_dev_encode(&d, buf, 10, &len), -ENOBUFS);
}

/* Decode from a heap copy of exactly len bytes, so AddressSanitizer sees
 * any read past the end. */
static int decode_exact(int user, const uint8_t *src, size_t len)
{
    static pres_db_user_t u;
    pres_db_dev_t d;
    uint8_t *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    memcpy(copy, src, len);
    int rc = user ? pres__db_user_decode(copy, len, &u) : pres__db_dev_decode(copy, len, &d);
    free(copy);
    return rc;
}

static void test_decode_malformed(void **state)
{
    (void)state;
    static pres_db_user_t u;
    static uint8_t ub[PRES_DB_USER_MAX + 1];
    uint8_t db[PRES_DB_DEV_MAX + 1];
    pres_db_dev_t d;
    size_t ulen, dlen;
    fill_user(&u, 5, 4, 2);
    fill_dev(&d, 5);
    assert_int_equal(pres__db_user_encode(&u, ub, sizeof ub, &ulen), 0);
    assert_int_equal(pres__db_dev_encode(&d, db, sizeof db, &dlen), 0);

    /* Every truncation, and one byte too many. */
    for (size_t n = 0; n < ulen; n++)
        assert_int_equal(decode_exact(1, ub, n), -EPROTO);
    for (size_t n = 0; n < dlen; n++)
        assert_int_equal(decode_exact(0, db, n), -EPROTO);
    ub[ulen] = 0;
    db[dlen] = 0;
    assert_int_equal(decode_exact(1, ub, ulen + 1), -EPROTO);
    assert_int_equal(decode_exact(0, db, dlen + 1), -EPROTO);
    assert_int_equal(decode_exact(1, ub, ulen), 0);
    assert_int_equal(decode_exact(0, db, dlen), 0);

    /* A record version we do not know. */
    uint8_t c[PRES_DB_USER_MAX];
    memcpy(c, ub, ulen);
    c[0] = 2;
    assert_int_equal(decode_exact(1, c, ulen), -EPROTO);
    memcpy(c, db, dlen);
    c[3] = 1;
    assert_int_equal(decode_exact(0, c, dlen), -EPROTO);

    /* Counts beyond PRES_EXCEPTIONS_MAX, huge ones, or not matching the bytes. */
    const size_t n_allow_at = 4 + 8 + 8 + 4, n_deny_at = n_allow_at + 4;
    uint32_t bad_counts[] = { PRES_EXCEPTIONS_MAX + 1, UINT32_MAX, 5, 3 };
    for (size_t i = 0; i < sizeof bad_counts / sizeof *bad_counts; i++) {
        memcpy(c, ub, ulen);
        pres__le32_put(c + n_allow_at, bad_counts[i]);
        assert_int_equal(decode_exact(1, c, ulen), -EPROTO);
        memcpy(c, ub, ulen);
        pres__le32_put(c + n_deny_at, bad_counts[i]);
        assert_int_equal(decode_exact(1, c, ulen), -EPROTO);
    }

    /* An id length of 0, of 64, or an id holding a NUL. */
    const size_t first_id = n_deny_at + 4;
    uint8_t bad_len[] = { 0, PRES_ID_MAX + 1, 0xff };
    for (size_t i = 0; i < sizeof bad_len; i++) {
        memcpy(c, ub, ulen);
        c[first_id] = bad_len[i];
        assert_int_equal(decode_exact(1, c, ulen), -EPROTO);
        memcpy(c, db, dlen);
        c[4] = bad_len[i];   /* the device's user id */
        assert_int_equal(decode_exact(0, c, dlen), -EPROTO);
    }
    memcpy(c, ub, ulen);
    c[first_id + 1] = '\0';
    assert_int_equal(decode_exact(1, c, ulen), -EPROTO);
    memcpy(c, db, dlen);
    c[5] = '\0';
    assert_int_equal(decode_exact(0, c, dlen), -EPROTO);

    /* connected is 0 or 1. */
    memcpy(c, db, dlen);
    pres__le32_put(c + dlen - 4, 2);
    assert_int_equal(decode_exact(0, c, dlen), -EPROTO);

    /* Random bytes: refused or accepted, never a read out of bounds. */
    uint64_t seed = 0x9e3779b97f4a7c15u;
    for (int i = 0; i < th_scale(20000, 2000); i++) {
        size_t n = th_rand(&seed) % 300;
        for (size_t j = 0; j < n; j++)
            c[j] = (uint8_t)th_rand(&seed);
        if (n >= 4)
            pres__le32_put(c, PRES_DB_RECORD);   /* get past the version */
        if (n >= 32 && (i & 1)) {
            pres__le32_put(c + n_allow_at, (uint32_t)(th_rand(&seed) % 4));
            pres__le32_put(c + n_deny_at, (uint32_t)(th_rand(&seed) % 4));
        }
        int ru = decode_exact(1, c, n), rd = decode_exact(0, c, n);
        assert_true(ru == 0 || ru == -EPROTO);
        assert_true(rd == 0 || rd == -EPROTO);
    }
}

/* ---- the writer ----------------------------------------------------------------- */

static void test_open_creates(void **state)
{
    (void)state;
    mode_t old = umask(027);   /* a umask that would narrow 0660 */
    pd_db_t *db = open_db(dbdir, "store", MiB, 4 * MiB);
    umask(old);

    struct stat st;
    assert_int_equal(stat(dbdir, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0770);
    const char *files[] = { "data.mdb", "lock.mdb" };
    for (int i = 0; i < 2; i++) {
        char p[PATH_MAX + 64];
        path_in(p, sizeof p, dbdir, files[i]);
        assert_int_equal(stat(p, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0660);
    }
    assert_true(pd_db_map_size(db) >= MiB);
    uint64_t alive;
    assert_int_equal(pd_db_alive_ms(db, &alive), -ENOENT);   /* no commit yet */
    assert_int_equal(pd_db_entries(db), 0);
    assert_int_equal(pd_db_staged(db), 0);
    assert_string_equal(pd_db_error(db), "");
    pd_db_close(db);

    /* Reopened: the meta we wrote is accepted. */
    db = open_db(dbdir, "store", MiB, 4 * MiB);
    pd_db_close(db);
}

static void test_put_commit_get(void **state)
{
    (void)state;
    static pres_db_user_t u, got_u;
    pres_db_dev_t d, got_d;
    pd_db_t *db = open_db(dbdir, "s", MiB, 4 * MiB);

    fill_user(&u, 3, 2, 1);
    fill_dev(&d, 3);
    assert_int_equal(pd_db_put_user(db, "alice", &u), 0);
    assert_int_equal(pd_db_put_device(db, "phone-1", &d), 0);
    /* The same id as a user and as a device: two records. */
    assert_int_equal(pd_db_put_device(db, "alice", &d), 0);
    assert_int_equal(pd_db_staged(db), 3);

    /* Staged changes are seen by get before the commit. */
    assert_int_equal(pd_db_get_user(db, "alice", &got_u), 0);
    assert_user_eq(&u, &got_u);
    assert_int_equal(pd_db_entries(db), 0);

    assert_int_equal(pd_db_commit(db, 1234567), 0);
    assert_int_equal(pd_db_staged(db), 0);
    assert_string_equal(pd_db_error(db), "");
    assert_int_equal(pd_db_entries(db), 3);
    assert_int_equal(pd_db_get_user(db, "alice", &got_u), 0);
    assert_user_eq(&u, &got_u);
    assert_int_equal(pd_db_get_device(db, "phone-1", &got_d), 0);
    assert_dev_eq(&d, &got_d);
    assert_int_equal(pd_db_get_user(db, "bob", &got_u), -ENOENT);
    assert_int_equal(pd_db_get_device(db, "phone-2", &got_d), -ENOENT);
    uint64_t alive = 0;
    assert_int_equal(pd_db_alive_ms(db, &alive), 0);
    assert_true(alive == 1234567);

    /* An empty commit still stamps alive_ms. */
    assert_int_equal(pd_db_commit(db, 2000000), 0);
    assert_int_equal(pd_db_alive_ms(db, &alive), 0);
    assert_true(alive == 2000000);

    /* Bad ids. */
    char longid[PRES_ID_MAX + 2];
    memset(longid, 'x', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    assert_int_equal(pd_db_put_device(db, "", &d), -EINVAL);
    assert_int_equal(pd_db_put_device(db, NULL, &d), -EINVAL);
    assert_int_equal(pd_db_put_user(db, longid, &u), -ENAMETOOLONG);
    assert_int_equal(pd_db_get_device(db, longid, &got_d), -ENAMETOOLONG);
    fill_user(&u, 0, PRES_EXCEPTIONS_MAX + 1, 0);
    assert_int_equal(pd_db_put_user(db, "carol", &u), -E2BIG);
    assert_int_equal(pd_db_staged(db), 0);
    pd_db_close(db);
}

static void test_coalesce(void **state)
{
    (void)state;
    pres_db_dev_t d, got;
    static pres_db_user_t u, got_u;
    pd_db_t *db = open_db(dbdir, "s", MiB, 4 * MiB);

    /* A storm of changes to one record is one staged put: the latest. */
    for (unsigned i = 0; i < 1000; i++) {
        fill_dev(&d, i);
        assert_int_equal(pd_db_put_device(db, "d1", &d), 0);
    }
    assert_int_equal(pd_db_staged(db), 1);

    /* A user whose record grows and shrinks keeps one entry too. */
    for (unsigned i = 0; i < 200; i++) {
        fill_user(&u, i, (i * 7) % 65, (i * 13) % 65);
        assert_int_equal(pd_db_put_user(db, "u1", &u), 0);
    }
    assert_int_equal(pd_db_staged(db), 2);
    assert_int_equal(pd_db_commit(db, 1), 0);
    assert_int_equal(pd_db_get_device(db, "d1", &got), 0);
    assert_dev_eq(&d, &got);
    assert_int_equal(pd_db_get_user(db, "u1", &got_u), 0);
    assert_user_eq(&u, &got_u);

    /* Put then delete: the delete wins; delete then put: the put wins. */
    fill_dev(&d, 5000);
    assert_int_equal(pd_db_put_device(db, "d2", &d), 0);
    assert_int_equal(pd_db_del_device(db, "d2"), 0);
    assert_int_equal(pd_db_del_device(db, "d1"), 0);
    assert_int_equal(pd_db_put_device(db, "d1", &d), 0);
    assert_int_equal(pd_db_staged(db), 2);
    assert_int_equal(pd_db_commit(db, 2), 0);
    assert_int_equal(pd_db_get_device(db, "d2", &got), -ENOENT);
    assert_int_equal(pd_db_get_device(db, "d1", &got), 0);
    assert_dev_eq(&d, &got);

    /* Many distinct keys: each its own entry, all written. */
    for (unsigned i = 0; i < 5000; i++) {
        char id[32];
        snprintf(id, sizeof id, "dev-%u", i);
        fill_dev(&d, i);
        assert_int_equal(pd_db_put_device(db, id, &d), 0);
        if (i % 3 == 0)
            assert_int_equal(pd_db_put_device(db, id, &d), 0);
    }
    assert_int_equal(pd_db_staged(db), 5000);
    assert_int_equal(pd_db_commit(db, 3), 0);
    assert_int_equal(pd_db_entries(db), 5000 + 2);
    assert_int_equal(pd_db_get_device(db, "dev-4321", &got), 0);
    fill_dev(&d, 4321);
    assert_dev_eq(&d, &got);
    pd_db_close(db);
}

static void test_delete(void **state)
{
    (void)state;
    pres_db_dev_t d, got;
    pd_db_t *db = open_db(dbdir, "s", MiB, 4 * MiB);
    fill_dev(&d, 1);
    assert_int_equal(pd_db_put_device(db, "gone", &d), 0);
    assert_int_equal(pd_db_put_device(db, "kept", &d), 0);
    assert_int_equal(pd_db_commit(db, 10), 0);
    assert_int_equal(pd_db_entries(db), 2);

    assert_int_equal(pd_db_del_device(db, "gone"), 0);
    assert_int_equal(pd_db_del_device(db, "never-was"), 0);
    assert_int_equal(pd_db_staged(db), 2);
    /* A staged delete already hides the record... */
    assert_int_equal(pd_db_get_device(db, "gone", &got), -ENOENT);
    /* ...which is still in the committed state until the commit. */
    assert_int_equal(pd_db_entries(db), 2);
    assert_int_equal(pd_db_commit(db, 20), 0);
    assert_int_equal(pd_db_entries(db), 1);
    assert_int_equal(pd_db_get_device(db, "gone", &got), -ENOENT);
    assert_int_equal(pd_db_get_device(db, "kept", &got), 0);
    assert_int_equal(pd_db_del_device(db, ""), -EINVAL);
    pd_db_close(db);
}

typedef struct {
    int      n;
    char     last[PRES_ID_MAX + 1];
    int      stop_at;
    int      sorted;
} walk_ctx_t;

static int see_dev(void *ctx, const char *id, const pres_db_dev_t *d)
{
    walk_ctx_t *w = ctx;
    unsigned i;
    assert_int_equal(sscanf(id, "dev-%u", &i), 1);
    pres_db_dev_t want;
    fill_dev(&want, i);
    assert_dev_eq(&want, d);
    if (w->n && strcmp(w->last, id) >= 0)
        w->sorted = 0;
    snprintf(w->last, sizeof w->last, "%s", id);
    return ++w->n == w->stop_at ? -42 : 0;
}

static int see_user(void *ctx, const char *id, const pres_db_user_t *u)
{
    walk_ctx_t *w = ctx;
    unsigned i;
    assert_int_equal(sscanf(id, "user-%u", &i), 1);
    static pres_db_user_t want;
    fill_user(&want, i, i % 65, (i * 3) % 65);
    assert_user_eq(&want, u);
    w->n++;
    return 0;
}

static void test_reopen_persists(void **state)
{
    (void)state;
    static pres_db_user_t u;
    pres_db_dev_t d;
    pd_db_t *db = open_db(dbdir, "persist", MiB, 64 * MiB);
    for (unsigned i = 0; i < 300; i++) {
        char id[32];
        snprintf(id, sizeof id, "user-%u", i);
        fill_user(&u, i, i % 65, (i * 3) % 65);
        assert_int_equal(pd_db_put_user(db, id, &u), 0);
        snprintf(id, sizeof id, "dev-%u", i);
        fill_dev(&d, i);
        assert_int_equal(pd_db_put_device(db, id, &d), 0);
    }
    assert_int_equal(pd_db_commit(db, 777), 0);
    /* Staged and not committed: lost with the close. */
    assert_int_equal(pd_db_put_device(db, "dev-uncommitted", &d), 0);
    pd_db_close(db);

    db = open_db(dbdir, "persist", MiB, 64 * MiB);
    assert_int_equal(pd_db_entries(db), 600);
    uint64_t alive;
    assert_int_equal(pd_db_alive_ms(db, &alive), 0);
    assert_true(alive == 777);
    walk_ctx_t w = { .sorted = 1 };
    assert_int_equal(pd_db_each_device(db, see_dev, &w), 0);
    assert_int_equal(w.n, 300);
    assert_true(w.sorted);
    walk_ctx_t wu = { 0 };
    assert_int_equal(pd_db_each_user(db, see_user, &wu), 0);
    assert_int_equal(wu.n, 300);
    /* A callback's error stops the walk and is returned. */
    walk_ctx_t ws = { .stop_at = 10, .sorted = 1 };
    assert_int_equal(pd_db_each_device(db, see_dev, &ws), -42);
    assert_int_equal(ws.n, 10);
    assert_int_equal(pd_db_get_device(db, "dev-uncommitted", &d), -ENOENT);
    pd_db_close(db);
}

static int count_dev(void *ctx, const char *id, const pres_db_dev_t *d)
{
    (void)id;
    (void)d;
    ++*(int *)ctx;
    return 0;
}

/* A record the daemon did not write (damage, or a newer format) is -EPROTO
 * for a get and skipped, counted and named by a walk. */
static void test_damaged_record(void **state)
{
    (void)state;
    pres_db_dev_t d;
    pd_db_t *db = open_db(dbdir, "s", MiB, 4 * MiB);
    fill_dev(&d, 1);
    assert_int_equal(pd_db_put_device(db, "good", &d), 0);
    assert_int_equal(pd_db_commit(db, 1), 0);
    pd_db_close(db);
    raw_put(dbdir, PRES_DB_DEVICES, "bad", "\1\0\0\0garbage", 11);

    db = open_db(dbdir, "s", MiB, 4 * MiB);
    assert_int_equal(pd_db_get_device(db, "bad", &d), -EPROTO);
    assert_int_equal(pd_db_get_device(db, "good", &d), 0);
    int n = 0;
    assert_int_equal(pd_db_each_device(db, count_dev, &n), 1);
    assert_int_equal(n, 1);
    assert_non_null(strstr(pd_db_error(db), "damaged"));
    pd_db_close(db);

    pres_db_ro_t *ro;
    assert_int_equal(pres__db_ro_open(dbdir, "s", &ro), 0);
    assert_int_equal(pres__db_ro_device(ro, "bad", &d), -EPROTO);
    assert_int_equal(pres__db_ro_device(ro, "good", &d), 0);
    pres__db_ro_close(ro);
}

/* ---- refusing what is not ours ---------------------------------------------------- */

static void test_foreign_garbage(void **state)
{
    (void)state;
    char p[PATH_MAX + 64], junk[16384];
    snprintf(dbdir, sizeof dbdir, "%s/garbage", tmp);
    assert_int_equal(mkdir(dbdir, 0770), 0);
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = "not a database, just someone's file\n"[i % 36];
    path_in(p, sizeof p, dbdir, "data.mdb");
    write_file(p, junk, sizeof junk);

    assert_open_fails(dbdir, "s", -EPROTO, "data.mdb is damaged");
    /* Left as we found it: no lock file of ours, the data untouched. */
    assert_false(exists(dbdir, "lock.mdb"));
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(st.st_size, sizeof junk);

    pres_db_ro_t *ro = NULL;
    assert_int_equal(pres__db_ro_open(dbdir, "s", &ro), -EPROTO);
    assert_null(ro);
}

static void test_foreign_files(void **state)
{
    (void)state;
    char p[PATH_MAX + 64];
    snprintf(dbdir, sizeof dbdir, "%s/photos", tmp);
    assert_int_equal(mkdir(dbdir, 0770), 0);
    path_in(p, sizeof p, dbdir, "holiday.jpg");
    write_file(p, "jpeg", 4);
    assert_open_fails(dbdir, "s", -EPROTO, "holds other files ('holiday.jpg')");
    assert_false(exists(dbdir, "data.mdb"));
    assert_false(exists(dbdir, "lock.mdb"));
}

static void test_foreign_env(void **state)
{
    (void)state;
    /* Another program's LMDB environment: data, but none of our meta. */
    snprintf(dbdir, sizeof dbdir, "%s/other-app", tmp);
    make_raw_env(dbdir, "config");
    assert_open_fails(dbdir, "s", -EPROTO, "is not a libpresence database (no meta)");
    pres_db_ro_t *ro = NULL;
    assert_int_equal(pres__db_ro_open(dbdir, "s", &ro), -EPROTO);

    /* A key named "meta" that is not a database is not our meta either. */
    snprintf(dbdir, sizeof dbdir, "%s/other-app2", tmp);
    make_raw_env(dbdir, "meta");
    assert_open_fails(dbdir, "s", -EPROTO, "is not a libpresence database (no meta)");

    /* An environment holding nothing (ours, cut short before its first
     * commit) is taken and initialised. */
    snprintf(dbdir, sizeof dbdir, "%s/empty-env", tmp);
    make_raw_env(dbdir, NULL);
    assert_int_equal(pres__db_ro_open(dbdir, "s", &ro), -ENOENT);   /* not yet */
    pd_db_t *db = open_db(dbdir, "s", MiB, MiB);
    pd_db_close(db);
    db = open_db(dbdir, "s", MiB, MiB);
    pd_db_close(db);
}

static void test_other_store(void **state)
{
    (void)state;
    pd_db_t *db = open_db(dbdir, "alpha", MiB, MiB);
    pd_db_close(db);
    assert_open_fails(dbdir, "beta", -EPROTO, "belongs to store 'alpha'");
    pres_db_ro_t *ro = NULL;
    assert_int_equal(pres__db_ro_open(dbdir, "beta", &ro), -EPROTO);
    assert_int_equal(pres__db_ro_open(dbdir, "alpha", &ro), 0);
    pres__db_ro_close(ro);

    /* Another format: refused, saying which. */
    uint8_t f[4];
    pres__le32_put(f, PRES_DB_FORMAT + 1);
    raw_put(dbdir, PRES_DB_META, "format", f, sizeof f);
    assert_open_fails(dbdir, "alpha", -EPROTO, "has format 2");
    assert_int_equal(pres__db_ro_open(dbdir, "alpha", &ro), -EPROTO);
    raw_put(dbdir, PRES_DB_META, "magic", "nope", 4);
    assert_open_fails(dbdir, "alpha", -EPROTO, "foreign magic");
}

static void test_unwritable(void **state)
{
    (void)state;
    char file[PATH_MAX], under[PATH_MAX + 16];
    /* A path that is a file, not a directory: refused as root too. */
    snprintf(file, sizeof file, "%s/a-file", tmp);
    write_file(file, "x", 1);
    assert_open_fails(file, "s", -EACCES, "is not a directory");
    snprintf(under, sizeof under, "%s/sub/db", file);
    assert_open_fails(under, "s", -EACCES, "cannot create LMDB directory");

    if (geteuid() == 0) {
        print_message("    (root: permission bits do not bite; the file cases stand in)\n");
        return;
    }
    char ro_dir[PATH_MAX];
    snprintf(ro_dir, sizeof ro_dir, "%s/read-only", tmp);
    assert_int_equal(mkdir(ro_dir, 0500), 0);
    assert_open_fails(ro_dir, "s", -EACCES, "not writable");
    snprintf(under, sizeof under, "%s/db", ro_dir);
    assert_open_fails(under, "s", -EACCES, "cannot create LMDB directory");
    chmod(ro_dir, 0700);
}

/* ---- a full map --------------------------------------------------------------------- */

static void test_map_full(void **state)
{
    (void)state;
    pres_db_dev_t d, got;
    pd_db_t *db = open_db(dbdir, "tiny", 64 * 1024, 64 * 1024);
    assert_true(pd_db_map_size(db) == 64 * 1024);
    for (unsigned i = 0; i < 2000; i++) {
        char id[32];
        snprintf(id, sizeof id, "dev-%u", i);
        fill_dev(&d, i);
        assert_int_equal(pd_db_put_device(db, id, &d), 0);
    }
    assert_int_equal(pd_db_commit(db, 5), -ENOSPC);
    assert_non_null(strstr(pd_db_error(db), "is full"));
    assert_non_null(strstr(pd_db_error(db), "2000 changes stay staged"));
    assert_int_equal(pd_db_staged(db), 2000);
    assert_int_equal(pd_db_entries(db), 0);   /* nothing half-written */

    /* A larger ceiling: the map doubles until the same batch fits. */
    pd_db_set_map_max(db, 64 * MiB);
    assert_int_equal(pd_db_commit(db, 6), 0);
    assert_string_equal(pd_db_error(db), "");
    assert_int_equal(pd_db_staged(db), 0);
    assert_true(pd_db_map_size(db) > 64 * 1024);
    assert_true(pd_db_map_size(db) <= 64 * MiB);
    assert_int_equal(pd_db_entries(db), 2000);
    assert_int_equal(pd_db_get_device(db, "dev-1999", &got), 0);
    fill_dev(&d, 1999);
    assert_dev_eq(&d, &got);
    uint64_t grown = pd_db_map_size(db);
    pd_db_close(db);

    /* Reopened with a smaller map_size, it keeps the size it grew to. */
    db = open_db(dbdir, "tiny", 64 * 1024, 64 * 1024);
    assert_true(pd_db_map_size(db) == grown);
    pd_db_close(db);
}

/* ---- the read-only side ----------------------------------------------------------------- */

static void test_ro_missing(void **state)
{
    (void)state;
    pres_db_ro_t *ro = NULL;
    assert_int_equal(pres__db_ro_open(dbdir, "s", &ro), -ENOENT);
    assert_null(ro);
    /* A directory without data.mdb: nothing is created there. */
    char empty[PATH_MAX];
    snprintf(empty, sizeof empty, "%s/empty", tmp);
    assert_int_equal(mkdir(empty, 0770), 0);
    assert_int_equal(pres__db_ro_open(empty, "s", &ro), -ENOENT);
    assert_false(exists(empty, "lock.mdb"));
    /* A path that is a file. */
    char file[PATH_MAX];
    snprintf(file, sizeof file, "%s/file", tmp);
    write_file(file, "x", 1);
    assert_int_equal(pres__db_ro_open(file, "s", &ro), -ENOENT);
    assert_int_equal(pres__db_ro_open(NULL, "s", &ro), -EINVAL);
    assert_int_equal(pres__db_ro_open(empty, "", &ro), -EINVAL);
}

/* Commit n devices dev-<from> .. and users user-<from> .. . */
static void write_records(const char *name, unsigned from, unsigned n, uint64_t size,
                          uint64_t max)
{
    static pres_db_user_t u;
    pres_db_dev_t d;
    pd_db_t *db = open_db(dbdir, name, size, max);
    for (unsigned i = from; i < from + n; i++) {
        char id[32];
        snprintf(id, sizeof id, "dev-%u", i);
        fill_dev(&d, i);
        assert_int_equal(pd_db_put_device(db, id, &d), 0);
        snprintf(id, sizeof id, "user-%u", i);
        fill_user(&u, i, i % 65, (i * 3) % 65);
        assert_int_equal(pd_db_put_user(db, id, &u), 0);
    }
    assert_int_equal(pd_db_commit(db, 99), 0);
    pd_db_close(db);
}

static void assert_ro_has(pres_db_ro_t *ro, unsigned i)
{
    static pres_db_user_t u, want_u;
    pres_db_dev_t d, want_d;
    char id[32];
    snprintf(id, sizeof id, "dev-%u", i);
    assert_int_equal(pres__db_ro_device(ro, id, &d), 0);
    fill_dev(&want_d, i);
    assert_dev_eq(&want_d, &d);
    snprintf(id, sizeof id, "user-%u", i);
    assert_int_equal(pres__db_ro_user(ro, id, &u), 0);
    fill_user(&want_u, i, i % 65, (i * 3) % 65);
    assert_user_eq(&want_u, &u);
}

typedef struct {
    const char *name;
    unsigned    from, n;
    int         gate;          /* if >= 0: wait for a byte on it first */
} grow_arg_t;

/* In a child: the daemon's side, writing enough to grow the map. */
static int child_write(void *arg)
{
    grow_arg_t *g = arg;
    static pres_db_user_t u;
    pres_db_dev_t d;
    char err[512], go;
    pd_db_t *db;
    if (g->gate >= 0 && read(g->gate, &go, 1) != 1)
        return 9;
    if (pd_db_open(&db, dbdir, g->name, 64 * 1024, 256 * MiB, err, sizeof err) != 0)
        return 10;
    uint64_t before = pd_db_map_size(db);
    for (unsigned i = g->from; i < g->from + g->n; i++) {
        char did[32], uid[32];
        snprintf(did, sizeof did, "dev-%u", i);
        snprintf(uid, sizeof uid, "user-%u", i);
        fill_dev(&d, i);
        fill_user(&u, i, i % 65, (i * 3) % 65);
        if (pd_db_put_device(db, did, &d) || pd_db_put_user(db, uid, &u))
            return 11;
    }
    if (pd_db_commit(db, 100) != 0)
        return 12;
    int grew = pd_db_map_size(db) > before;
    pd_db_close(db);
    return grew ? 0 : 13;
}

static void test_ro_reads(void **state)
{
    (void)state;
    write_records("ro", 0, 50, 64 * 1024, 64 * MiB);
    pres_db_ro_t *ro;
    assert_int_equal(pres__db_ro_open(dbdir, "ro", &ro), 0);
    for (unsigned i = 0; i < 50; i++)
        assert_ro_has(ro, i);
    pres_db_dev_t d;
    static pres_db_user_t u;
    assert_int_equal(pres__db_ro_device(ro, "dev-50", &d), -ENOENT);
    assert_int_equal(pres__db_ro_user(ro, "nobody", &u), -ENOENT);
    assert_int_equal(pres__db_ro_user(ro, "", &u), -EINVAL);

    /* The daemon (another process) writes on and grows the map past what
     * we mapped: we adopt its size and read the new records. */
    grow_arg_t g = { "ro", 50, 3000, -1 };
    pid_t pid = th_fork(child_write, &g);
    assert_true(pid > 0);
    assert_int_equal(th_wait_child(pid, 60000), 0);
    for (unsigned i = 0; i < 3050; i += 7)
        assert_ro_has(ro, i);
    assert_ro_has(ro, 3049);
    pres__db_ro_close(ro);
    pres__db_ro_close(NULL);
}

static void test_ro_shared(void **state)
{
    (void)state;
    write_records("sh", 0, 10, MiB, MiB);
    char other_spelling[PATH_MAX + 8];
    snprintf(other_spelling, sizeof other_spelling, "%s/./", dbdir);

    pres_db_ro_t *a, *b;
    assert_int_equal(pres__db_ro_open(dbdir, "sh", &a), 0);
    assert_int_equal(fds_on(dbdir, "lock.mdb"), 1);
    assert_int_equal(pres__db_ro_open(other_spelling, "sh", &b), 0);
    /* One environment for both: still one descriptor on each file. */
    assert_int_equal(fds_on(dbdir, "lock.mdb"), 1);
    assert_int_equal(fds_on(dbdir, "data.mdb"), 1);
    assert_ro_has(a, 3);
    assert_ro_has(b, 4);
    /* The same directory under another store's name is refused. */
    pres_db_ro_t *c = NULL;
    assert_int_equal(pres__db_ro_open(dbdir, "other", &c), -EPROTO);

    pres__db_ro_close(a);
    assert_ro_has(b, 5);
    assert_int_equal(fds_on(dbdir, "lock.mdb"), 1);
    pres__db_ro_close(b);
    assert_int_equal(fds_on(dbdir, "lock.mdb"), 0);
}

typedef struct {
    pres_db_ro_t *ro;
} fork_arg_t;

/* In a child: use the handle opened by the parent; it must open the
 * child's own environment, not use the parent's. */
static int child_read(void *arg)
{
    fork_arg_t *f = arg;
    pres_db_dev_t d, want;
    int before = fds_on(dbdir, "lock.mdb");   /* the parent's, inherited */
    if (pres__db_ro_device(f->ro, "dev-2", &d) != 0)
        return 20;
    fill_dev(&want, 2);
    if (strcmp(d.user_id, want.user_id) != 0 || d.last_seen_ms != want.last_seen_ms)
        return 21;
    if (fds_on(dbdir, "lock.mdb") != before + 1)
        return 22;
    /* A second open in the child shares the child's env. */
    pres_db_ro_t *again;
    if (pres__db_ro_open(dbdir, "fk", &again) != 0)
        return 23;
    if (fds_on(dbdir, "lock.mdb") != before + 1)
        return 24;
    pres__db_ro_close(again);
    pres__db_ro_close(f->ro);
    return fds_on(dbdir, "lock.mdb") == before ? 0 : 25;
}

static void test_ro_after_fork(void **state)
{
    (void)state;
    write_records("fk", 0, 5, MiB, MiB);
    fork_arg_t f;
    assert_int_equal(pres__db_ro_open(dbdir, "fk", &f.ro), 0);
    assert_ro_has(f.ro, 1);
    pid_t pid = th_fork(child_read, &f);
    assert_true(pid > 0);
    assert_int_equal(th_wait_child(pid, 30000), 0);
    /* The parent's environment is untouched by the child. */
    assert_ro_has(f.ro, 2);
    pres__db_ro_close(f.ro);
}

static void test_ro_no_access(void **state)
{
    (void)state;
    write_records("na", 0, 3, MiB, MiB);
    pres_db_ro_t *ro = NULL;
    if (geteuid() == 0) {
        /* Root opens anything: a store path that is a file stands in. */
        char p[PATH_MAX + 64];
        path_in(p, sizeof p, dbdir, "data.mdb");
        assert_int_equal(pres__db_ro_open(p, "na", &ro), -ENOENT);
        assert_null(ro);
        return;
    }
    assert_int_equal(chmod(dbdir, 0), 0);
    assert_int_equal(pres__db_ro_open(dbdir, "na", &ro), -ENOENT);
    assert_int_equal(chmod(dbdir, 0770), 0);
    /* Files readable, but the lock file not writable: LMDB cannot take a
     * reader slot, which is "not openable", never a crash. */
    char lock[PATH_MAX + 64];
    path_in(lock, sizeof lock, dbdir, "lock.mdb");
    assert_int_equal(chmod(lock, 0440), 0);
    assert_int_equal(pres__db_ro_open(dbdir, "na", &ro), -ENOENT);
    assert_int_equal(chmod(lock, 0660), 0);
    assert_int_equal(pres__db_ro_open(dbdir, "na", &ro), 0);
    pres__db_ro_close(ro);
}

typedef struct {
    pres_db_ro_t *ro;
    unsigned      seed;
    int           bad;
} thread_arg_t;

/* Set once the writer is done: the threads run until then, so they are
 * reading while it grows the map. */
static atomic_int threads_stop;

/* Lookups from many threads on one handle, while another thread opens and
 * closes handles on the same directory (sharing its env), and the daemon
 * (a child) grows the map under them. */
static void *reader_thread(void *arg)
{
    thread_arg_t *t = arg;
    pres_db_dev_t d, want;
    for (unsigned i = 0; i < 2000 || !atomic_load(&threads_stop); i++) {
        unsigned k = (t->seed * 7919u + i) % 200;
        char id[32];
        snprintf(id, sizeof id, "dev-%u", k);
        fill_dev(&want, k);
        if (pres__db_ro_device(t->ro, id, &d) != 0 || strcmp(d.user_id, want.user_id) != 0)
            t->bad++;
    }
    return NULL;
}

static void *opener_thread(void *arg)
{
    thread_arg_t *t = arg;
    for (unsigned i = 0; i < 200 || !atomic_load(&threads_stop); i++) {
        pres_db_ro_t *h;
        pres_db_dev_t d;
        if (pres__db_ro_open(dbdir, "mt", &h) != 0) {
            t->bad++;
            continue;
        }
        t->bad += pres__db_ro_device(h, "dev-7", &d) != 0;
        pres__db_ro_close(h);
    }
    return NULL;
}

static void test_ro_threads(void **state)
{
    (void)state;
    write_records("mt", 0, 200, MiB, 64 * MiB);
    pres_db_ro_t *ro;
    assert_int_equal(pres__db_ro_open(dbdir, "mt", &ro), 0);
    /* Fork the writer before any thread starts, and let it go once they
     * run: a child forked while other threads hold locks (the sanitizers'
     * allocator, say) could deadlock in its first malloc. */
    int gate[2];
    assert_int_equal(pipe(gate), 0);
    grow_arg_t g = { "mt", 200, 3000, gate[0] };
    pid_t pid = th_fork(child_write, &g);
    assert_true(pid > 0);
    close(gate[0]);

    enum { N = 6 };
    atomic_store(&threads_stop, 0);
    static pthread_t th[N];   /* static: outlive a failed assertion */
    static thread_arg_t a[N];
    for (unsigned i = 0; i < N; i++) {
        a[i] = (thread_arg_t){ .ro = ro, .seed = i + 1 };
        assert_int_equal(pthread_create(&th[i], NULL, i == 0 ? opener_thread : reader_thread,
                                        &a[i]), 0);
    }
    assert_int_equal(write(gate[1], "g", 1), 1);
    close(gate[1]);
    int rc = th_wait_child(pid, 60000);
    atomic_store(&threads_stop, 1);
    assert_int_equal(rc, 0);
    for (unsigned i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(a[i].bad, 0);
    }
    assert_ro_has(ro, 3199);
    assert_int_equal(fds_on(dbdir, "lock.mdb"), 1);
    pres__db_ro_close(ro);
}

/* ---- timing (PRES_DB_TIMING only; never asserted) ------------------------------------------ */

static void stage_devices(pd_db_t *db, unsigned from, unsigned n)
{
    pres_db_dev_t d;
    for (unsigned i = from; i < from + n; i++) {
        char id[32];
        snprintf(id, sizeof id, "d_%010u", (unsigned)((i * 2654435761u) % 1000000007u));
        fill_dev(&d, i);
        assert_int_equal(pd_db_put_device(db, id, &d), 0);
    }
}

static void test_timing(void **state)
{
    (void)state;
    if (!getenv("PRES_DB_TIMING")) {
        print_message("    (set PRES_DB_TIMING=1 to measure commits)\n");
        return;
    }
    pd_db_t *db = open_db(dbdir, "timing", 64 * MiB, 4096 * MiB);
    uint64_t t0 = mono_ns();
    stage_devices(db, 0, 100000);
    uint64_t t1 = mono_ns();
    assert_int_equal(pd_db_commit(db, 1), 0);
    uint64_t t2 = mono_ns();
    print_message("    stage 100,000 devices: %.1f ms; commit them (one txn, fsync): %.1f ms\n",
                  (double)(t1 - t0) / 1e6, (double)(t2 - t1) / 1e6);

    /* Rewrite the same 100k plus 100k new, in batches of 10,000. */
    const unsigned batch = 10000, batches = 20;
    uint64_t worst = 0, commits = 0, t3 = mono_ns();
    for (unsigned b = 0; b < batches; b++) {
        stage_devices(db, b * batch, batch);
        uint64_t c0 = mono_ns();
        assert_int_equal(pd_db_commit(db, 2 + b), 0);
        uint64_t c = mono_ns() - c0;
        commits += c;
        worst = c > worst ? c : worst;
    }
    uint64_t t4 = mono_ns();
    double secs = (double)(t4 - t3) / 1e9;
    print_message("    put + commit in batches of %u: %.0f devices/s (%u batches; a commit "
                  "%.1f ms on average, worst %.1f ms); map %llu MiB\n",
                  batch, batch * batches / secs, batches, (double)commits / batches / 1e6,
                  (double)worst / 1e6, (unsigned long long)(pd_db_map_size(db) >> 20));
    pd_db_close(db);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_user_roundtrip),
        cmocka_unit_test(test_dev_roundtrip),
        cmocka_unit_test(test_encode_errors),
        cmocka_unit_test(test_decode_malformed),
        cmocka_unit_test_setup_teardown(test_open_creates, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_put_commit_get, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_coalesce, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_delete, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_reopen_persists, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_damaged_record, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_foreign_garbage, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_foreign_files, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_foreign_env, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_other_store, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_unwritable, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_map_full, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_ro_missing, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_ro_reads, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_ro_shared, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_ro_after_fork, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_ro_no_access, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_ro_threads, make_tmp, remove_tmp),
        cmocka_unit_test_setup_teardown(test_timing, make_tmp, remove_tmp),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
