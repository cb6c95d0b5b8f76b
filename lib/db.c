/*
 * db.c - the LMDB mirror as the library sees it: record encoding and
 * decoding (shared with presenced), and read-only lookups of users and
 * devices that have been evicted from shared memory.
 *
 * The library never writes the mirror (DESIGN.md): environments are opened
 * MDB_RDONLY and nothing here creates a file.  One MDB_env serves every
 * handle of a process on a directory, because LMDB's POSIX locks belong to
 * the process: a second env on the same files, once closed, would release
 * the first's locks and let the daemon reclaim pages a reader still uses.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "db.h"

/* ---- encoding ------------------------------------------------------------ */

/* A bounded writer: the first write that does not fit sets `over`, and
 * every later one does nothing, so encoders check once at the end. */
typedef struct {
    uint8_t *p;
    size_t   left;
    int      over;
} wr_t;

static void w_bytes(wr_t *w, const void *src, size_t n)
{
    if (w->over || n > w->left) {
        w->over = 1;
        return;
    }
    memcpy(w->p, src, n);
    w->p += n;
    w->left -= n;
}

static void w_u8(wr_t *w, uint8_t v)
{
    w_bytes(w, &v, 1);
}

static void w_u32(wr_t *w, uint32_t v)
{
    uint8_t b[4];
    pres__le32_put(b, v);
    w_bytes(w, b, sizeof b);
}

static void w_u64(wr_t *w, uint64_t v)
{
    uint8_t b[8];
    pres__le64_put(b, v);
    w_bytes(w, b, sizeof b);
}

/* The length of an id held in a PRES_ID_MAX + 1 buffer. */
static int id_len(const char *id, int may_be_empty, size_t *len)
{
    size_t n = strnlen(id, PRES_ID_MAX + 1);
    if (n > PRES_ID_MAX)
        return -ENAMETOOLONG;
    if (n == 0 && !may_be_empty)
        return -EINVAL;
    *len = n;
    return 0;
}

static int w_id(wr_t *w, const char *id, int may_be_empty)
{
    size_t n;
    int rc = id_len(id, may_be_empty, &n);
    if (rc < 0)
        return rc;
    w_u8(w, (uint8_t)n);
    w_bytes(w, id, n);
    return 0;
}

static int w_list(wr_t *w, const char (*ids)[PRES_ID_MAX + 1], uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        int rc = w_id(w, ids[i], 0);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int w_done(const wr_t *w, const uint8_t *buf, size_t *len)
{
    if (w->over)
        return -ENOBUFS;
    *len = (size_t)(w->p - buf);
    return 0;
}

int pres__db_user_encode(const pres_db_user_t *u, uint8_t *buf, size_t cap, size_t *len)
{
    if (u->n_allow > PRES_EXCEPTIONS_MAX || u->n_deny > PRES_EXCEPTIONS_MAX)
        return -E2BIG;
    wr_t w = { buf, cap, 0 };
    w_u32(&w, PRES_DB_RECORD);
    w_u64(&w, u->last_seen_ms);
    w_u64(&w, u->frozen_seen_ms);
    w_u32(&w, u->policy);
    w_u32(&w, u->n_allow);
    w_u32(&w, u->n_deny);
    int rc = w_list(&w, u->allow, u->n_allow);
    if (rc == 0)
        rc = w_list(&w, u->deny, u->n_deny);
    return rc < 0 ? rc : w_done(&w, buf, len);
}

int pres__db_dev_encode(const pres_db_dev_t *d, uint8_t *buf, size_t cap, size_t *len)
{
    wr_t w = { buf, cap, 0 };
    w_u32(&w, PRES_DB_RECORD);
    int rc = w_id(&w, d->user_id, 0);
    if (rc == 0)
        rc = w_id(&w, d->gateway_id, 1);
    if (rc < 0)
        return rc;
    w_u64(&w, d->connected_at_ms);
    w_u64(&w, d->last_seen_ms);
    w_u64(&w, d->last_active_ms);
    w_u32(&w, d->connected ? 1u : 0u);
    return w_done(&w, buf, len);
}

/* ---- decoding -------------------------------------------------------------- */

/* A bounded reader: a read past the end sets `bad` and yields zeros, so a
 * decoder reads its fields straight through and checks once at the end. */
typedef struct {
    const uint8_t *p;
    size_t         left;
    int            bad;
} rd_t;

static const uint8_t *r_take(rd_t *r, size_t n)
{
    if (r->bad || n > r->left) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *q = r->p;
    r->p += n;
    r->left -= n;
    return q;
}

static uint32_t r_u32(rd_t *r)
{
    const uint8_t *q = r_take(r, 4);
    return q ? pres__le32_get(q) : 0;
}

static uint64_t r_u64(rd_t *r)
{
    const uint8_t *q = r_take(r, 8);
    return q ? pres__le64_get(q) : 0;
}

/* An id: a u8 length of at most PRES_ID_MAX, then that many bytes, none of
 * them NUL (an id with a NUL would be cut short as a C string). */
static void r_id(rd_t *r, char *out, int may_be_empty)
{
    out[0] = '\0';
    const uint8_t *l = r_take(r, 1);
    if (!l)
        return;
    size_t n = *l;
    if (n > PRES_ID_MAX || (n == 0 && !may_be_empty)) {
        r->bad = 1;
        return;
    }
    const uint8_t *q = r_take(r, n);
    if (!q || memchr(q, 0, n)) {
        r->bad = 1;
        return;
    }
    memcpy(out, q, n);
    out[n] = '\0';
}

static void r_list(rd_t *r, char (*ids)[PRES_ID_MAX + 1], uint32_t n)
{
    for (uint32_t i = 0; i < PRES_EXCEPTIONS_MAX; i++) {
        if (i < n)
            r_id(r, ids[i], 0);
        else
            ids[i][0] = '\0';
    }
}

/* A record is exactly its fields: a short read or bytes left over both
 * mean it is not what we wrote. */
static int r_done(const rd_t *r)
{
    return r->bad || r->left != 0 ? -EPROTO : 0;
}

int pres__db_user_decode(const void *buf, size_t len, pres_db_user_t *u)
{
    rd_t r = { buf, len, 0 };
    if (r_u32(&r) != PRES_DB_RECORD)
        return -EPROTO;
    u->last_seen_ms = r_u64(&r);
    u->frozen_seen_ms = r_u64(&r);
    u->policy = r_u32(&r);
    u->n_allow = r_u32(&r);
    u->n_deny = r_u32(&r);
    /* Bound the counts before they bound a loop. */
    if (r.bad || u->n_allow > PRES_EXCEPTIONS_MAX || u->n_deny > PRES_EXCEPTIONS_MAX)
        return -EPROTO;
    r_list(&r, u->allow, u->n_allow);
    r_list(&r, u->deny, u->n_deny);
    return r_done(&r);
}

int pres__db_dev_decode(const void *buf, size_t len, pres_db_dev_t *d)
{
    rd_t r = { buf, len, 0 };
    if (r_u32(&r) != PRES_DB_RECORD)
        return -EPROTO;
    r_id(&r, d->user_id, 0);
    r_id(&r, d->gateway_id, 1);
    d->connected_at_ms = r_u64(&r);
    d->last_seen_ms = r_u64(&r);
    d->last_active_ms = r_u64(&r);
    d->connected = r_u32(&r);
    if (d->connected > 1)
        return -EPROTO;
    return r_done(&r);
}

/* ---- errors and meta ------------------------------------------------------- */

int pres__db_errno(int rc)
{
    switch (rc) {
    case MDB_SUCCESS:
        return 0;
    case MDB_NOTFOUND:
        return -ENOENT;
    case MDB_MAP_FULL:
        return -ENOSPC;
    case MDB_TXN_FULL:
        return -E2BIG;
    case MDB_READERS_FULL:
    case MDB_MAP_RESIZED:
        return -EAGAIN;
    case MDB_BAD_VALSIZE:
        return -EINVAL;
    case MDB_PAGE_NOTFOUND:
    case MDB_CORRUPTED:
    case MDB_VERSION_MISMATCH:
    case MDB_INVALID:
    case MDB_INCOMPATIBLE:
        return -EPROTO;
    default:
        return rc > 0 ? -rc : -EIO;   /* MDB_PANIC and misuse */
    }
}

static int why_fail(char *why, size_t whylen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int why_fail(char *why, size_t whylen, const char *fmt, ...)
{
    if (why && whylen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, whylen, fmt, ap);
        va_end(ap);
    }
    return -EPROTO;
}

static int meta_get(MDB_txn *txn, MDB_dbi meta, const char *key, MDB_val *v)
{
    MDB_val k = { strlen(key), (void *)key };
    return mdb_get(txn, meta, &k, v);
}

/* A name from the files, made printable for a message. */
static void printable(char *out, size_t cap, const MDB_val *v)
{
    size_t n = v->mv_size < cap - 1 ? v->mv_size : cap - 1;
    const unsigned char *s = v->mv_data;
    for (size_t i = 0; i < n; i++)
        out[i] = s[i] >= 0x20 && s[i] < 0x7f ? (char)s[i] : '?';
    out[n] = '\0';
}

int pres__db_meta_check(MDB_txn *txn, MDB_dbi meta, const char *name, char *why, size_t whylen)
{
    MDB_val v;
    int rc = meta_get(txn, meta, "magic", &v);
    if (rc == MDB_NOTFOUND)
        return why_fail(why, whylen, "is not a libpresence database (no magic in its meta)");
    if (rc)
        return pres__db_errno(rc);
    if (v.mv_size != strlen(PRES_DB_MAGIC) || memcmp(v.mv_data, PRES_DB_MAGIC, v.mv_size))
        return why_fail(why, whylen, "is not a libpresence database (foreign magic)");

    rc = meta_get(txn, meta, "format", &v);
    if (rc && rc != MDB_NOTFOUND)
        return pres__db_errno(rc);
    if (rc || v.mv_size != 4)
        return why_fail(why, whylen, "is damaged: its format is missing or malformed");
    uint32_t format = pres__le32_get(v.mv_data);
    if (format != PRES_DB_FORMAT)
        return why_fail(why, whylen, "has format %u; this build reads format %u",
                        format, PRES_DB_FORMAT);

    rc = meta_get(txn, meta, "name", &v);
    if (rc && rc != MDB_NOTFOUND)
        return pres__db_errno(rc);
    if (rc)
        return why_fail(why, whylen, "is damaged: its store name is missing");
    if (v.mv_size != strlen(name) || memcmp(v.mv_data, name, v.mv_size)) {
        char other[PRES_ID_MAX + 1];
        printable(other, sizeof other, &v);
        return why_fail(why, whylen, "belongs to store '%s'", other);
    }
    return 0;
}

/* ---- read-only environments, shared per process ----------------------------- */

/* Reset read txns kept per environment.  Renewing one reuses its reader
 * slot, so a lookup takes no lock shared with other processes (a fresh
 * MDB_NOTLS txn claims a slot under LMDB's process-shared reader mutex).
 * Each kept txn holds a slot of the lock file for the life of the env, so
 * keep few: 4 serve the usual few threads; more at once begin fresh ones. */
#define RO_POOL 4

struct ro_env {
    struct ro_env   *next;
    MDB_env         *env;
    MDB_dbi          users, devices;
    dev_t            dev;           /* the directory, however it was named */
    ino_t            ino;
    pid_t            pid;           /* the process that opened it */
    unsigned         refs;          /* handles of this process on it */
    char             name[PRES_ID_MAX + 1];
    /* Read-held by every lookup, write-held to adopt a map the daemon grew:
     * LMDB remaps in place, which no lookup may be reading through. */
    pthread_rwlock_t map;
    pthread_mutex_t  pool_lock;
    MDB_txn         *pool[RO_POOL];
    unsigned         n_pool;
};

struct pres_db_ro {
    /* The env this handle uses, valid while pid is the caller's.  In a
     * child after fork() pid differs: the handle opens the child's own. */
    _Atomic(struct ro_env *) env;
    _Atomic pid_t    pid;
    char             dir[PATH_MAX];
    char             name[PRES_ID_MAX + 1];
};

static pthread_mutex_t ro_lock = PTHREAD_MUTEX_INITIALIZER;   /* guards ro_envs */
static struct ro_env  *ro_envs;
static pthread_once_t  ro_once = PTHREAD_ONCE_INIT;

/* fork() while another thread holds ro_lock would leave the child a lock
 * nobody can release: hold it across the fork.  The child abandons the
 * parent's environments (it must not use or close them: their locks and
 * reader slots are the parent's) and starts an empty table. */
static void ro_prepare(void)
{
    pthread_mutex_lock(&ro_lock);
}

static void ro_parent(void)
{
    pthread_mutex_unlock(&ro_lock);
}

static void ro_child(void)
{
    ro_envs = NULL;
    pthread_mutex_unlock(&ro_lock);
}

static void ro_init(void)
{
    pthread_atfork(ro_prepare, ro_parent, ro_child);
}

/* Errors of mdb_env_open for a reader: files it cannot open are "no
 * mirror" (-ENOENT), files that are not LMDB's are -EPROTO. */
static int ro_open_errno(int rc)
{
    int e = pres__db_errno(rc);
    return e == -EPROTO || e == -ENOMEM ? e : -ENOENT;
}

/* No meta: an environment with nothing in it is one the daemon is
 * creating (it writes the meta and the databases in its first txn), so
 * not there yet; one holding other data is not ours. */
static int ro_no_meta(MDB_txn *txn)
{
    MDB_dbi main_dbi;
    MDB_stat st;
    if (mdb_dbi_open(txn, NULL, 0, &main_dbi) != 0 || mdb_stat(txn, main_dbi, &st) != 0)
        return -EPROTO;
    return st.ms_entries == 0 ? -ENOENT : -EPROTO;
}

/* Open the named databases and check the meta; in one read txn, committed
 * so the DBI handles stay open for the life of the env. */
static int ro_validate(struct ro_env *e, const char *name)
{
    MDB_txn *txn;
    MDB_dbi meta;
    int rc = mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn);
    if (rc)
        return ro_open_errno(rc);
    rc = mdb_dbi_open(txn, PRES_DB_META, 0, &meta);
    if (rc == MDB_NOTFOUND) {
        int err = ro_no_meta(txn);
        mdb_txn_abort(txn);
        return err;
    }
    if (rc == 0)
        rc = mdb_dbi_open(txn, PRES_DB_USERS, 0, &e->users);
    if (rc == 0)
        rc = mdb_dbi_open(txn, PRES_DB_DEVICES, 0, &e->devices);
    /* A missing database (MDB_NOTFOUND) means not ours, not "no record". */
    int err = rc == MDB_NOTFOUND ? -EPROTO : pres__db_errno(rc);
    if (err == 0)
        err = pres__db_meta_check(txn, meta, name, NULL, 0);
    if (err == 0 && (rc = mdb_txn_commit(txn)) != 0)
        return pres__db_errno(rc);
    if (err)
        mdb_txn_abort(txn);
    return err;
}

static void ro_env_free(struct ro_env *e)
{
    for (unsigned i = 0; i < e->n_pool; i++)
        mdb_txn_abort(e->pool[i]);
    if (e->env)
        mdb_env_close(e->env);
    pthread_rwlock_destroy(&e->map);
    pthread_mutex_destroy(&e->pool_lock);
    free(e);
}

static int ro_env_open(const char *dir, const char *name, const struct stat *st,
                       struct ro_env **out)
{
    struct ro_env *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    pthread_rwlock_init(&e->map, NULL);
    pthread_mutex_init(&e->pool_lock, NULL);
    e->dev = st->st_dev;
    e->ino = st->st_ino;
    e->pid = getpid();
    e->refs = 1;
    snprintf(e->name, sizeof e->name, "%s", name);

    int rc = mdb_env_create(&e->env);
    if (rc) {
        e->env = NULL;
        ro_env_free(e);
        return pres__db_errno(rc);
    }
    mdb_env_set_maxdbs(e->env, PRES_DB_MAXDBS);
    mdb_env_set_maxreaders(e->env, PRES_DB_MAXREADERS);
    /* MDB_NOTLS: a txn is not tied to the thread that began it, so the
     * pool can hand a reset txn to any thread.  MDB_NORDAHEAD: lookups
     * are random; read-ahead would only evict useful pages. */
    rc = mdb_env_open(e->env, dir, MDB_RDONLY | MDB_NOTLS | MDB_NORDAHEAD, 0660);
    int err = rc ? ro_open_errno(rc) : ro_validate(e, name);
    if (err) {
        ro_env_free(e);
        return err;
    }
    *out = e;
    return 0;
}

/* Find or open the env of dir for this process.  Call with ro_lock held. */
static int ro_env_acquire(const char *dir, const char *name, struct ro_env **out)
{
    struct stat st;
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
        return -ENOENT;
    /* mdb_env_open would create lock.mdb before it finds data.mdb missing:
     * check first, so a reader creates nothing in the daemon's directory.
     * An empty data.mdb is one the daemon is creating: not there yet. */
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/data.mdb", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -ENOENT;
    struct stat dst;
    int empty = fstat(fd, &dst) < 0 || dst.st_size == 0;
    close(fd);
    if (empty)
        return -ENOENT;

    pid_t me = getpid();
    for (struct ro_env *e = ro_envs; e; e = e->next) {
        if (e->dev != st.st_dev || e->ino != st.st_ino || e->pid != me)
            continue;
        if (strcmp(e->name, name) != 0)
            return -EPROTO;   /* its meta named another store */
        e->refs++;
        *out = e;
        return 0;
    }
    struct ro_env *e = NULL;
    int rc = ro_env_open(dir, name, &st, &e);
    if (rc < 0)
        return rc;
    e->next = ro_envs;
    ro_envs = e;
    *out = e;
    return 0;
}

/* Drop a reference.  Call with ro_lock held. */
static void ro_env_release(struct ro_env *e)
{
    if (--e->refs > 0)
        return;
    for (struct ro_env **pp = &ro_envs; *pp; pp = &(*pp)->next) {
        if (*pp == e) {
            *pp = e->next;
            break;
        }
    }
    ro_env_free(e);
}

static int name_ok(const char *name)
{
    size_t n = name ? strnlen(name, PRES_ID_MAX + 1) : 0;
    return n > 0 && n <= PRES_ID_MAX;
}

int pres__db_ro_open(const char *dir, const char *name, pres_db_ro_t **out)
{
    if (!dir || !*dir || strlen(dir) >= PATH_MAX || !name_ok(name) || !out)
        return -EINVAL;
    pthread_once(&ro_once, ro_init);
    pres_db_ro_t *h = calloc(1, sizeof *h);
    if (!h)
        return -ENOMEM;
    snprintf(h->dir, sizeof h->dir, "%s", dir);
    snprintf(h->name, sizeof h->name, "%s", name);

    struct ro_env *e = NULL;
    pthread_mutex_lock(&ro_lock);
    int rc = ro_env_acquire(dir, name, &e);
    pthread_mutex_unlock(&ro_lock);
    if (rc < 0) {
        free(h);
        return rc;
    }
    atomic_init(&h->env, e);
    atomic_init(&h->pid, e->pid);
    *out = h;
    return 0;
}

void pres__db_ro_close(pres_db_ro_t *h)
{
    if (!h)
        return;
    pthread_mutex_lock(&ro_lock);
    /* A handle inherited through fork() and never used here holds no
     * reference of this process. */
    if (atomic_load_explicit(&h->pid, memory_order_relaxed) == getpid())
        ro_env_release(atomic_load_explicit(&h->env, memory_order_relaxed));
    pthread_mutex_unlock(&ro_lock);
    free(h);
}

/* The handle's env in this process, opening it after a fork. */
static int ro_handle_env(pres_db_ro_t *h, struct ro_env **out)
{
    pid_t me = getpid();
    /* Acquire pairs with the release below: a thread that sees our pid
     * also sees the env stored before it. */
    if (atomic_load_explicit(&h->pid, memory_order_acquire) == me) {
        *out = atomic_load_explicit(&h->env, memory_order_relaxed);
        return 0;
    }
    int rc = 0;
    pthread_mutex_lock(&ro_lock);
    if (atomic_load_explicit(&h->pid, memory_order_relaxed) != me) {
        struct ro_env *e;
        rc = ro_env_acquire(h->dir, h->name, &e);
        if (rc == 0) {
            atomic_store_explicit(&h->env, e, memory_order_relaxed);
            atomic_store_explicit(&h->pid, me, memory_order_release);
        }
    }
    pthread_mutex_unlock(&ro_lock);
    if (rc == 0)
        *out = atomic_load_explicit(&h->env, memory_order_relaxed);
    return rc;
}

/* A read txn: a pooled reset one renewed, or a fresh one.  LMDB codes. */
static int ro_txn_take(struct ro_env *e, MDB_txn **txn)
{
    MDB_txn *t = NULL;
    pthread_mutex_lock(&e->pool_lock);
    if (e->n_pool > 0)
        t = e->pool[--e->n_pool];
    pthread_mutex_unlock(&e->pool_lock);
    if (!t)
        return mdb_txn_begin(e->env, NULL, MDB_RDONLY, txn);
    int rc = mdb_txn_renew(t);
    if (rc == 0) {
        *txn = t;
        return 0;
    }
    mdb_txn_abort(t);   /* frees it and its reader slot */
    /* A grown map is the caller's to adopt; anything else wrong with the
     * kept txn (its slot taken back, say) is not wrong with a fresh one. */
    return rc == MDB_MAP_RESIZED ? rc : mdb_txn_begin(e->env, NULL, MDB_RDONLY, txn);
}

static void ro_txn_give(struct ro_env *e, MDB_txn *txn)
{
    mdb_txn_reset(txn);   /* releases the snapshot at once, keeps the slot */
    pthread_mutex_lock(&e->pool_lock);
    if (e->n_pool < RO_POOL) {
        e->pool[e->n_pool++] = txn;
        txn = NULL;
    }
    pthread_mutex_unlock(&e->pool_lock);
    if (txn)
        mdb_txn_abort(txn);
}

/* The daemon grew the map past ours: remap to the size in the file.  No
 * lookup is inside the map while we hold it for writing. */
static void ro_adopt_map(struct ro_env *e)
{
    pthread_rwlock_wrlock(&e->map);
    mdb_env_set_mapsize(e->env, 0);
    pthread_rwlock_unlock(&e->map);
}

typedef int (*ro_decode_fn)(const void *buf, size_t len, void *out);

static int decode_user(const void *buf, size_t len, void *out)
{
    return pres__db_user_decode(buf, len, out);
}

static int decode_dev(const void *buf, size_t len, void *out)
{
    return pres__db_dev_decode(buf, len, out);
}

/* One lookup in one read txn; the record is decoded (copied out) before
 * the txn ends, so nothing of the map escapes. */
static int ro_get(struct ro_env *e, MDB_dbi dbi, const char *id, size_t len,
                  ro_decode_fn decode, void *out, int *resized)
{
    MDB_txn *txn;
    int rc = ro_txn_take(e, &txn);
    if (rc) {
        *resized = rc == MDB_MAP_RESIZED;
        return pres__db_errno(rc);
    }
    MDB_val k = { len, (void *)id }, v;
    rc = mdb_get(txn, dbi, &k, &v);
    int err = rc ? pres__db_errno(rc) : decode(v.mv_data, v.mv_size, out);
    ro_txn_give(e, txn);
    return err;
}

static int ro_lookup(pres_db_ro_t *h, int users, const char *id, ro_decode_fn decode, void *out)
{
    size_t len;
    if (!h || !id || !out)
        return -EINVAL;
    int rc = id_len(id, 0, &len);
    if (rc < 0)
        return rc;
    struct ro_env *e = NULL;
    if ((rc = ro_handle_env(h, &e)) < 0)
        return rc;
    /* A map grown once is adopted once; a second MAP_RESIZED in a row
     * means the daemon grew it again meanwhile: one more try, then
     * -EAGAIN rather than chase a writer forever. */
    for (int tries = 0; tries < 3; tries++) {
        int resized = 0;
        pthread_rwlock_rdlock(&e->map);
        rc = ro_get(e, users ? e->users : e->devices, id, len, decode, out, &resized);
        pthread_rwlock_unlock(&e->map);
        if (!resized)
            break;
        ro_adopt_map(e);
    }
    return rc;
}

int pres__db_ro_user(pres_db_ro_t *h, const char *user_id, pres_db_user_t *out)
{
    return ro_lookup(h, 1, user_id, decode_user, out);
}

int pres__db_ro_device(pres_db_ro_t *h, const char *device_id, pres_db_dev_t *out)
{
    return ro_lookup(h, 0, device_id, decode_dev, out);
}
