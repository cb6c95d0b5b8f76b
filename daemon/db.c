/*
 * db.c - the LMDB mirror's writer: opening (and refusing what is not ours),
 * staging with coalescing, batched durable commits that grow the map, and
 * the walks a rebuild needs.
 *
 * Staging is a hash table keyed by (kind, id) over a dense array of entries
 * whose encoded values live in one byte arena.  A record changed a thousand
 * times in a batch is one entry and one put; memory is proportional to the
 * distinct records staged (a value that grows gets a new arena slice of at
 * least twice its old one, so a record's slices sum to under four times its
 * largest value).  A commit sorts the entries by key so that LMDB touches
 * each leaf page once, writes them in one transaction and empties the
 * table; a failed commit leaves it as it was, to be tried again.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "db.h"

enum { K_USER = 1, K_DEV = 2 };

/* One staged record: a put of the value at arena[voff .. voff + vlen), or a
 * delete.  vcap is the size of its arena slice, reused while it fits. */
typedef struct {
    uint64_t hash;
    uint32_t voff, vlen, vcap;
    uint8_t  kind;
    uint8_t  del;
    uint8_t  klen;
    char     key[PRES_ID_MAX];
} stage_t;

/* Below this many entries the staging buffers are kept across commits;
 * above it they are freed after a commit, so one storm does not pin its
 * peak memory for the life of the daemon. */
#define STAGE_KEEP      65536u
/* How often a commit clears reader slots of dead processes: a dead reader's
 * snapshot keeps its pages from reuse and would make the map grow. */
#define READER_CHECK_MS 10000u
/* MDB_MAP_RESIZED in a row before giving up: only another writer grows the
 * map, and there is none but us, so more than a couple means trouble. */
#define RESIZE_TRIES    3

struct pd_db {
    MDB_env  *env;
    MDB_dbi   meta, users, devices;
    uint64_t  map_size, map_max, page;
    stage_t  *ents;
    size_t    n, cap;
    uint32_t *slots;             /* entry index + 1, 0 empty; power of 2 */
    size_t    nslots;
    uint8_t  *arena;
    size_t    alen, acap;
    uint64_t  reader_check_ms;
    char      dir[PATH_MAX];
    char      name[PRES_ID_MAX + 1];
    char      err[PATH_MAX + 256];
};

static int fail(pd_db_t *db, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Record what went wrong, in one line, and return rc. */
static int fail(pd_db_t *db, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(db->err, sizeof db->err, fmt, ap);
    va_end(ap);
    return rc;
}

static int id_ok(const char *id, size_t *len)
{
    if (!id)
        return -EINVAL;
    size_t n = strnlen(id, PRES_ID_MAX + 1);
    if (n == 0)
        return -EINVAL;
    if (n > PRES_ID_MAX)
        return -ENAMETOOLONG;
    *len = n;
    return 0;
}

/* ---- staging --------------------------------------------------------------- */

/* FNV-1a over the kind and the key, then a final mix so the low bits we
 * index with depend on every byte.  Private to this process: no seed. */
static uint64_t key_hash(int kind, const char *key, size_t len)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325) ^ (uint64_t)kind;
    for (size_t i = 0; i < len; i++) {
        h ^= (uint8_t)key[i];
        h *= UINT64_C(0x100000001b3);
    }
    h ^= h >> 33;
    h *= UINT64_C(0xff51afd7ed558ccd);
    return h ^ (h >> 33);
}

/* The entry for (kind, key), or -1.  Linear probing; the table is at most
 * half full, so a probe sequence is short and always ends at an empty slot. */
static long stage_find(const pd_db_t *db, int kind, const char *key, size_t len, uint64_t h)
{
    if (!db->nslots)
        return -1;
    size_t mask = db->nslots - 1;
    for (size_t s = h & mask;; s = (s + 1) & mask) {
        uint32_t v = db->slots[s];
        if (!v)
            return -1;
        const stage_t *e = &db->ents[v - 1];
        if (e->hash == h && e->kind == kind && e->klen == len && memcmp(e->key, key, len) == 0)
            return (long)(v - 1);
    }
}

static void slot_insert(pd_db_t *db, uint64_t h, uint32_t idx)
{
    size_t mask = db->nslots - 1;
    size_t s = h & mask;
    while (db->slots[s])
        s = (s + 1) & mask;
    db->slots[s] = idx + 1;
}

/* Room for one more entry: the array, and the table kept at most half full. */
static int stage_reserve(pd_db_t *db)
{
    if (db->n == db->cap) {
        size_t cap = db->cap ? db->cap * 2 : 1024;
        stage_t *e = realloc(db->ents, cap * sizeof *e);
        if (!e)
            return -ENOMEM;
        db->ents = e;
        db->cap = cap;
    }
    if ((db->n + 1) * 2 <= db->nslots)
        return 0;
    size_t nslots = db->nslots ? db->nslots * 2 : 2048;
    uint32_t *slots = calloc(nslots, sizeof *slots);
    if (!slots)
        return -ENOMEM;
    free(db->slots);
    db->slots = slots;
    db->nslots = nslots;
    for (size_t i = 0; i < db->n; i++)
        slot_insert(db, db->ents[i].hash, (uint32_t)i);
    return 0;
}

/* A slice of the arena of `need` bytes; its offset in *off. */
static int arena_alloc(pd_db_t *db, size_t need, uint32_t *off)
{
    if (db->alen + need > UINT32_MAX)
        return -ENOMEM;
    if (db->alen + need > db->acap) {
        size_t cap = db->acap ? db->acap * 2 : 65536;
        while (cap < db->alen + need)
            cap *= 2;
        uint8_t *a = realloc(db->arena, cap);
        if (!a)
            return -ENOMEM;
        db->arena = a;
        db->acap = cap;
    }
    *off = (uint32_t)db->alen;
    db->alen += need;
    return 0;
}

/* Make e's slice hold vlen bytes. */
static int stage_value_room(pd_db_t *db, stage_t *e, uint32_t vlen)
{
    if (vlen <= e->vcap)
        return 0;
    uint32_t cap = e->vcap ? (e->vcap * 2 > vlen ? e->vcap * 2 : vlen) : vlen;
    uint32_t off;
    int rc = arena_alloc(db, cap, &off);
    if (rc < 0)
        return rc;
    e->voff = off;
    e->vcap = cap;
    return 0;
}

/* Stage a put (val != NULL) or a delete of (kind, key): the latest wins. */
static int stage(pd_db_t *db, int kind, const char *key, size_t len, const uint8_t *val,
                 size_t vlen)
{
    uint64_t h = key_hash(kind, key, len);
    long i = stage_find(db, kind, key, len, h);
    if (i < 0) {
        int rc = stage_reserve(db);
        if (rc < 0)
            return rc;
        stage_t *e = &db->ents[db->n];
        memset(e, 0, sizeof *e);
        e->hash = h;
        e->kind = (uint8_t)kind;
        e->klen = (uint8_t)len;
        memcpy(e->key, key, len);
        /* Publish only once the value fits: a failure leaves no entry. */
        if (val && (rc = stage_value_room(db, e, (uint32_t)vlen)) < 0)
            return rc;
        slot_insert(db, h, (uint32_t)db->n);
        i = (long)db->n++;
    } else if (val) {
        int rc = stage_value_room(db, &db->ents[i], (uint32_t)vlen);
        if (rc < 0)
            return rc;
    }
    stage_t *e = &db->ents[i];
    e->del = val == NULL;
    e->vlen = val ? (uint32_t)vlen : 0;
    if (val)
        memcpy(db->arena + e->voff, val, vlen);
    return 0;
}

static void stage_clear(pd_db_t *db)
{
    if (db->cap > STAGE_KEEP) {
        free(db->ents);
        free(db->slots);
        free(db->arena);
        db->ents = NULL;
        db->slots = NULL;
        db->arena = NULL;
        db->cap = db->nslots = db->acap = 0;
    } else if (db->nslots) {
        memset(db->slots, 0, db->nslots * sizeof *db->slots);
    }
    db->n = 0;
    db->alen = 0;
}

int pd_db_put_user(pd_db_t *db, const char *user_id, const pres_db_user_t *u)
{
    size_t len, vlen;
    uint8_t buf[PRES_DB_USER_MAX];
    int rc = id_ok(user_id, &len);
    if (rc == 0)
        rc = pres__db_user_encode(u, buf, sizeof buf, &vlen);
    return rc < 0 ? rc : stage(db, K_USER, user_id, len, buf, vlen);
}

int pd_db_put_device(pd_db_t *db, const char *device_id, const pres_db_dev_t *d)
{
    size_t len, vlen;
    uint8_t buf[PRES_DB_DEV_MAX];
    int rc = id_ok(device_id, &len);
    if (rc == 0)
        rc = pres__db_dev_encode(d, buf, sizeof buf, &vlen);
    return rc < 0 ? rc : stage(db, K_DEV, device_id, len, buf, vlen);
}

int pd_db_del_device(pd_db_t *db, const char *device_id)
{
    size_t len;
    int rc = id_ok(device_id, &len);
    return rc < 0 ? rc : stage(db, K_DEV, device_id, len, NULL, 0);
}

size_t pd_db_staged(const pd_db_t *db)
{
    return db->n;
}

/* ---- commit ---------------------------------------------------------------- */

/* LMDB's default key order: bytes, then the shorter first; kinds apart. */
static int stage_cmp(const void *a, const void *b, void *arg)
{
    const pd_db_t *db = arg;
    const stage_t *x = &db->ents[*(const uint32_t *)a];
    const stage_t *y = &db->ents[*(const uint32_t *)b];
    if (x->kind != y->kind)
        return x->kind < y->kind ? -1 : 1;
    size_t n = x->klen < y->klen ? x->klen : y->klen;
    int c = memcmp(x->key, y->key, n);
    return c ? c : (int)x->klen - (int)y->klen;
}

static int apply(pd_db_t *db, MDB_txn *txn, const stage_t *e)
{
    MDB_dbi dbi = e->kind == K_USER ? db->users : db->devices;
    MDB_val k = { e->klen, (void *)e->key };
    if (e->del) {
        int rc = mdb_del(txn, dbi, &k, NULL);
        return rc == MDB_NOTFOUND ? 0 : rc;
    }
    MDB_val v = { e->vlen, db->arena + e->voff };
    return mdb_put(txn, dbi, &k, &v, 0);
}

static int put_alive(pd_db_t *db, MDB_txn *txn, uint64_t now_wall_ms)
{
    uint8_t b[8];
    pres__le64_put(b, now_wall_ms);
    MDB_val k = { 8, "alive_ms" }, v = { sizeof b, b };
    return mdb_put(txn, db->meta, &k, &v, 0);
}

/* Entries order[lo .. hi) in one transaction (order NULL: as staged),
 * with alive_ms if asked.  Returns an LMDB code; the txn is gone either
 * way. */
static int write_txn(pd_db_t *db, const uint32_t *order, size_t lo, size_t hi, int alive,
                     uint64_t now_wall_ms)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(db->env, NULL, 0, &txn);
    if (rc)
        return rc;
    for (size_t i = lo; i < hi && rc == 0; i++)
        rc = apply(db, txn, &db->ents[order ? order[i] : i]);
    if (rc == 0 && alive)
        rc = put_alive(db, txn, now_wall_ms);
    if (rc) {
        mdb_txn_abort(txn);
        return rc;
    }
    return mdb_txn_commit(txn);
}

/* order[lo .. hi), halving a range that exceeds one transaction's dirty-page
 * limit.  Every staged value is idempotent, so a half written before a
 * later failure is simply written again by the next commit. */
static int write_range(pd_db_t *db, const uint32_t *order, size_t lo, size_t hi,
                       uint64_t now_wall_ms)
{
    int rc = write_txn(db, order, lo, hi, hi == db->n, now_wall_ms);
    if (rc != MDB_TXN_FULL || hi - lo < 2)
        return rc;
    size_t mid = lo + (hi - lo) / 2;
    rc = write_range(db, order, lo, mid, now_wall_ms);
    return rc ? rc : write_range(db, order, mid, hi, now_wall_ms);
}

static uint64_t env_map_size(MDB_env *env)
{
    MDB_envinfo info;
    return mdb_env_info(env, &info) == 0 ? (uint64_t)info.me_mapsize : 0;
}

/* Double the map, up to map_max.  No txn of ours is open here, which
 * mdb_env_set_mapsize requires. */
static int grow(pd_db_t *db)
{
    if (db->map_size >= db->map_max)
        return fail(db, -ENOSPC,
                    "LMDB at %s is full: its map of %llu bytes is at the limit (%llu); "
                    "%zu changes stay staged", db->dir, (unsigned long long)db->map_size,
                    (unsigned long long)db->map_max, db->n);
    uint64_t want = db->map_size * 2 < db->map_max ? db->map_size * 2 : db->map_max;
    int rc = mdb_env_set_mapsize(db->env, (size_t)want);
    if (rc)
        return fail(db, -ENOSPC, "LMDB at %s is full and its map cannot grow to %llu bytes: %s; "
                    "%zu changes stay staged", db->dir, (unsigned long long)want,
                    mdb_strerror(rc), db->n);
    db->map_size = env_map_size(db->env);
    return 0;
}

/* Clear the reader slots of dead processes now and then. */
static void reader_check(pd_db_t *db, uint64_t now_wall_ms)
{
    /* A wall clock stepped back checks at once: early rather than never. */
    if (now_wall_ms >= db->reader_check_ms && now_wall_ms - db->reader_check_ms < READER_CHECK_MS)
        return;
    int dead;
    mdb_reader_check(db->env, &dead);
    db->reader_check_ms = now_wall_ms;
}

/* The entries in key order, or NULL (then they go as staged: slower, not
 * wrong) when memory is short. */
static uint32_t *sorted_order(pd_db_t *db)
{
    if (db->n < 2)
        return NULL;
    uint32_t *order = malloc(db->n * sizeof *order);
    if (!order)
        return NULL;
    for (size_t i = 0; i < db->n; i++)
        order[i] = (uint32_t)i;
    qsort_r(order, db->n, sizeof *order, stage_cmp, db);
    return order;
}

int pd_db_commit(pd_db_t *db, uint64_t now_wall_ms)
{
    db->err[0] = '\0';
    reader_check(db, now_wall_ms);
    uint32_t *order = sorted_order(db);
    int rc = 0;
    for (int resized = 0;;) {
        int mrc = write_range(db, order, 0, db->n, now_wall_ms);
        if (mrc == MDB_MAP_FULL) {
            if ((rc = grow(db)) < 0)
                break;
            continue;
        }
        if (mrc == MDB_MAP_RESIZED && ++resized < RESIZE_TRIES) {
            mdb_env_set_mapsize(db->env, 0);   /* adopt the size in the file */
            db->map_size = env_map_size(db->env);
            continue;
        }
        if (mrc)
            rc = fail(db, pres__db_errno(mrc), "cannot commit %zu changes to LMDB at %s: %s",
                      db->n, db->dir, mdb_strerror(mrc));
        break;
    }
    free(order);
    if (rc == 0)
        stage_clear(db);
    return rc;
}

const char *pd_db_error(const pd_db_t *db)
{
    return db->err;
}

uint64_t pd_db_map_size(const pd_db_t *db)
{
    return db->map_size;
}

void pd_db_set_map_max(pd_db_t *db, uint64_t map_max)
{
    map_max -= map_max % db->page;
    db->map_max = map_max > db->map_size ? map_max : db->map_size;
}

/* ---- reads ----------------------------------------------------------------- */

typedef int (*decode_fn)(const void *buf, size_t len, void *out);

static int decode_user(const void *buf, size_t len, void *out)
{
    return pres__db_user_decode(buf, len, out);
}

static int decode_dev(const void *buf, size_t len, void *out)
{
    return pres__db_dev_decode(buf, len, out);
}

static int get_rec(pd_db_t *db, int kind, const char *id, decode_fn decode, void *out)
{
    size_t len;
    int rc = id_ok(id, &len);
    if (rc < 0)
        return rc;
    long i = stage_find(db, kind, id, len, key_hash(kind, id, len));
    if (i >= 0) {
        const stage_t *e = &db->ents[i];
        return e->del ? -ENOENT : decode(db->arena + e->voff, e->vlen, out);
    }
    MDB_txn *txn;
    if ((rc = mdb_txn_begin(db->env, NULL, MDB_RDONLY, &txn)) != 0)
        return pres__db_errno(rc);
    MDB_val k = { len, (void *)id }, v;
    rc = mdb_get(txn, kind == K_USER ? db->users : db->devices, &k, &v);
    int err = rc ? pres__db_errno(rc) : decode(v.mv_data, v.mv_size, out);
    mdb_txn_abort(txn);
    return err;
}

int pd_db_get_user(pd_db_t *db, const char *id, pres_db_user_t *out)
{
    return get_rec(db, K_USER, id, decode_user, out);
}

int pd_db_get_device(pd_db_t *db, const char *id, pres_db_dev_t *out)
{
    return get_rec(db, K_DEV, id, decode_dev, out);
}

int pd_db_alive_ms(pd_db_t *db, uint64_t *out)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(db->env, NULL, MDB_RDONLY, &txn);
    if (rc)
        return pres__db_errno(rc);
    MDB_val k = { 8, "alive_ms" }, v;
    rc = mdb_get(txn, db->meta, &k, &v);
    int err = rc ? pres__db_errno(rc) : v.mv_size != 8 ? -EPROTO : 0;
    if (err == 0)
        *out = pres__le64_get(v.mv_data);
    mdb_txn_abort(txn);
    return err;
}

uint64_t pd_db_entries(pd_db_t *db)
{
    MDB_txn *txn;
    MDB_stat su, sd;
    /* UINT64_MAX when LMDB cannot say: never taken for "empty". */
    if (mdb_txn_begin(db->env, NULL, MDB_RDONLY, &txn) != 0)
        return UINT64_MAX;
    uint64_t n = UINT64_MAX;
    if (mdb_stat(txn, db->users, &su) == 0 && mdb_stat(txn, db->devices, &sd) == 0)
        n = (uint64_t)su.ms_entries + sd.ms_entries;
    mdb_txn_abort(txn);
    return n;
}

/* ---- walks ------------------------------------------------------------------ */

typedef struct {
    int   kind;
    int (*ucb)(void *ctx, const char *id, const pres_db_user_t *u);
    int (*dcb)(void *ctx, const char *id, const pres_db_dev_t *d);
    void *ctx;
    void *rec;                   /* one decoded record, reused */
    int   skipped;
} walk_t;

/* One record of a walk: > 0 skipped as damaged, else the callback's value. */
static int walk_one(pd_db_t *db, walk_t *w, const MDB_val *k, const MDB_val *v)
{
    char id[PRES_ID_MAX + 1];
    int bad = k->mv_size == 0 || k->mv_size > PRES_ID_MAX || memchr(k->mv_data, 0, k->mv_size);
    if (!bad) {
        memcpy(id, k->mv_data, k->mv_size);
        id[k->mv_size] = '\0';
        bad = w->kind == K_USER ? pres__db_user_decode(v->mv_data, v->mv_size, w->rec) < 0
                                : pres__db_dev_decode(v->mv_data, v->mv_size, w->rec) < 0;
    }
    if (bad) {
        w->skipped++;
        fail(db, 0, "LMDB at %s: skipped %d damaged %s record(s)", db->dir, w->skipped,
             w->kind == K_USER ? "user" : "device");
        return 1;
    }
    return w->kind == K_USER ? w->ucb(w->ctx, id, w->rec) : w->dcb(w->ctx, id, w->rec);
}

static int walk(pd_db_t *db, walk_t *w)
{
    db->err[0] = '\0';
    w->rec = malloc(w->kind == K_USER ? sizeof(pres_db_user_t) : sizeof(pres_db_dev_t));
    if (!w->rec)
        return -ENOMEM;
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    int rc = mdb_txn_begin(db->env, NULL, MDB_RDONLY, &txn);
    if (rc == 0)
        rc = mdb_cursor_open(txn, w->kind == K_USER ? db->users : db->devices, &cur);
    int err = 0;
    MDB_val k, v;
    for (MDB_cursor_op op = MDB_FIRST; rc == 0; op = MDB_NEXT) {
        if ((rc = mdb_cursor_get(cur, &k, &v, op)) != 0)
            break;
        if ((err = walk_one(db, w, &k, &v)) < 0)
            break;
    }
    if (rc && rc != MDB_NOTFOUND)
        err = fail(db, pres__db_errno(rc), "cannot read LMDB at %s: %s", db->dir, mdb_strerror(rc));
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    free(w->rec);
    return err < 0 ? err : w->skipped;
}

int pd_db_each_user(pd_db_t *db, int (*cb)(void *ctx, const char *id, const pres_db_user_t *u),
                    void *ctx)
{
    walk_t w = { .kind = K_USER, .ucb = cb, .ctx = ctx };
    return walk(db, &w);
}

int pd_db_each_device(pd_db_t *db, int (*cb)(void *ctx, const char *id, const pres_db_dev_t *d),
                      void *ctx)
{
    walk_t w = { .kind = K_DEV, .dcb = cb, .ctx = ctx };
    return walk(db, &w);
}

/* ---- open ------------------------------------------------------------------- */

/* mkdir -p, 0770 (less the umask) for each directory made; *made says
 * whether the last one was. */
static int mkdir_p(const char *path, int *made)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0770) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    *made = mkdir(buf, 0770) == 0;
    return *made || errno == EEXIST ? 0 : -errno;
}

/* The directory exists, is one, and we may create files in it. */
static int dir_prepare(pd_db_t *db)
{
    int made = 0;
    int rc = mkdir_p(db->dir, &made);
    if (rc < 0)
        return fail(db, -EACCES, "cannot create LMDB directory %s: %s", db->dir, strerror(-rc));
    struct stat st;
    if (stat(db->dir, &st) < 0)
        return fail(db, -EACCES, "cannot use LMDB directory %s: %s", db->dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return fail(db, -EACCES, "%s is not a directory: cannot hold an LMDB database", db->dir);
    if (made)
        chmod(db->dir, 0770);   /* what the umask took: the group shares it */
    if (access(db->dir, W_OK | X_OK) < 0)
        return fail(db, -EACCES, "LMDB directory %s is not writable: %s", db->dir,
                    strerror(errno));
    return 0;
}

static int file_nonempty(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && st.st_size > 0;
}

/* Without a data.mdb there is nothing of ours here, so any other file
 * means someone else's directory: refuse rather than start a database in
 * it.  With one, LMDB and the meta decide. */
static int dir_foreign(pd_db_t *db, const char *data)
{
    if (file_nonempty(data))
        return 0;
    DIR *d = opendir(db->dir);
    if (!d)
        return fail(db, -EACCES, "cannot list LMDB directory %s: %s", db->dir, strerror(errno));
    int rc = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *n = de->d_name;
        if (!strcmp(n, ".") || !strcmp(n, "..") || !strcmp(n, "data.mdb") ||
            !strcmp(n, "lock.mdb"))
            continue;
        rc = fail(db, -EPROTO, "%s is not a libpresence database: it holds other files "
                  "('%.64s') and no data.mdb; refusing to create one there", db->dir, n);
        break;
    }
    closedir(d);
    return rc;
}

static int env_open_fail(pd_db_t *db, int mrc)
{
    int e = pres__db_errno(mrc);
    if (e == -EPROTO)
        return fail(db, e, "%s/data.mdb is damaged: %s", db->dir, mdb_strerror(mrc));
    if (e == -EACCES || e == -EPERM || e == -EROFS)
        return fail(db, -EACCES, "cannot open LMDB at %s: %s", db->dir, mdb_strerror(mrc));
    if (e == -ENOMEM)
        return fail(db, e, "cannot map %llu bytes for LMDB at %s: %s",
                    (unsigned long long)db->map_size, db->dir, mdb_strerror(mrc));
    return fail(db, e == -ENOENT ? -EIO : e, "cannot open LMDB at %s: %s", db->dir,
                mdb_strerror(mrc));
}

static int env_open(pd_db_t *db, const char *data, const char *lock)
{
    int existed = file_nonempty(data);
    int lock_existed = access(lock, F_OK) == 0;
    int mrc = mdb_env_create(&db->env);
    if (mrc) {
        db->env = NULL;
        return fail(db, -ENOMEM, "cannot create an LMDB environment: %s", mdb_strerror(mrc));
    }
    mdb_env_set_maxdbs(db->env, PRES_DB_MAXDBS);
    mdb_env_set_maxreaders(db->env, PRES_DB_MAXREADERS);
    /* An existing env opens at the size in its file (LMDB would otherwise
     * take ours even when smaller); a new one at ours. */
    if (!existed)
        mdb_env_set_mapsize(db->env, (size_t)db->map_size);
    /* MDB_NOTLS: txns are not tied to a thread, so whichever thread of the
     * daemon ends up committing may.  No MDB_NOSYNC, MDB_NOMETASYNC or
     * MDB_WRITEMAP: each commit is durable when it returns. */
    mrc = mdb_env_open(db->env, db->dir, MDB_NOTLS, 0660);
    if (mrc) {
        if (!lock_existed)
            unlink(lock);   /* leave a foreign directory as we found it */
        return env_open_fail(db, mrc);
    }
    if (existed && env_map_size(db->env) < db->map_size)
        mdb_env_set_mapsize(db->env, (size_t)db->map_size);
    db->map_size = env_map_size(db->env);
    if (db->map_max < db->map_size)
        db->map_max = db->map_size;
    /* The umask may have narrowed the mode given to mdb_env_open. */
    chmod(data, 0660);
    chmod(lock, 0660);
    return 0;
}

static int meta_put(MDB_txn *txn, MDB_dbi meta, const char *key, const void *val, size_t len)
{
    MDB_val k = { strlen(key), (void *)key }, v = { len, (void *)val };
    return mdb_put(txn, meta, &k, &v, 0);
}

/* A new environment: only if it holds nothing at all (a fresh one, or a
 * creation of ours cut short: it is made in one txn, so there is no half).
 * Creates the databases and writes the meta in txn. */
static int meta_create(pd_db_t *db, MDB_txn *txn)
{
    MDB_dbi main_dbi;
    MDB_stat st;
    int rc = mdb_dbi_open(txn, NULL, 0, &main_dbi);
    if (rc == 0)
        rc = mdb_stat(txn, main_dbi, &st);
    if (rc)
        return fail(db, pres__db_errno(rc), "cannot read LMDB at %s: %s", db->dir,
                    mdb_strerror(rc));
    if (st.ms_entries > 0)
        return fail(db, -EPROTO, "%s is not a libpresence database (no meta)", db->dir);
    uint8_t format[4];
    pres__le32_put(format, PRES_DB_FORMAT);
    rc = mdb_dbi_open(txn, PRES_DB_META, MDB_CREATE, &db->meta);
    if (rc == 0)
        rc = mdb_dbi_open(txn, PRES_DB_USERS, MDB_CREATE, &db->users);
    if (rc == 0)
        rc = mdb_dbi_open(txn, PRES_DB_DEVICES, MDB_CREATE, &db->devices);
    if (rc == 0)
        rc = meta_put(txn, db->meta, "magic", PRES_DB_MAGIC, strlen(PRES_DB_MAGIC));
    if (rc == 0)
        rc = meta_put(txn, db->meta, "format", format, sizeof format);
    if (rc == 0)
        rc = meta_put(txn, db->meta, "name", db->name, strlen(db->name));
    if (rc)
        return fail(db, pres__db_errno(rc), "cannot create LMDB database at %s: %s", db->dir,
                    mdb_strerror(rc));
    return 0;
}

/* An existing environment: our meta, for this store, and both databases. */
static int meta_check(pd_db_t *db, MDB_txn *txn)
{
    char why[160];
    int rc = pres__db_meta_check(txn, db->meta, db->name, why, sizeof why);
    if (rc == -EPROTO)
        return fail(db, rc, "LMDB at %s %s", db->dir, why);
    if (rc < 0)
        return fail(db, rc, "cannot read the meta of LMDB at %s: %s", db->dir, strerror(-rc));
    const char *which = PRES_DB_USERS;
    int mrc = mdb_dbi_open(txn, which, 0, &db->users);
    if (mrc == 0)
        mrc = mdb_dbi_open(txn, which = PRES_DB_DEVICES, 0, &db->devices);
    if (mrc == MDB_NOTFOUND || mrc == MDB_INCOMPATIBLE)
        return fail(db, -EPROTO, "LMDB at %s is damaged: no '%s' database", db->dir, which);
    if (mrc)
        return fail(db, pres__db_errno(mrc), "cannot open '%s' of LMDB at %s: %s", which,
                    db->dir, mdb_strerror(mrc));
    return 0;
}

/* Create or check the meta, and open the databases for the life of db. */
static int meta_open(pd_db_t *db)
{
    MDB_txn *txn;
    int mrc = mdb_txn_begin(db->env, NULL, 0, &txn);
    if (mrc)
        return fail(db, pres__db_errno(mrc), "cannot begin a write to LMDB at %s: %s", db->dir,
                    mdb_strerror(mrc));
    int rc;
    mrc = mdb_dbi_open(txn, PRES_DB_META, 0, &db->meta);
    if (mrc == MDB_NOTFOUND)
        rc = meta_create(db, txn);
    else if (mrc == MDB_INCOMPATIBLE)   /* a plain key named "meta" */
        rc = fail(db, -EPROTO, "%s is not a libpresence database (no meta)", db->dir);
    else if (mrc)
        rc = fail(db, pres__db_errno(mrc), "cannot read LMDB at %s: %s", db->dir,
                  mdb_strerror(mrc));
    else
        rc = meta_check(db, txn);
    if (rc < 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    if ((mrc = mdb_txn_commit(txn)) != 0)
        return fail(db, pres__db_errno(mrc), "cannot write LMDB at %s: %s", db->dir,
                    mdb_strerror(mrc));
    return 0;
}

static int open_args(pd_db_t *db, const char *dir, const char *name, uint64_t map_size,
                     uint64_t map_max)
{
    if (!dir || !*dir || strlen(dir) >= sizeof db->dir)
        return fail(db, -EINVAL, "bad LMDB directory '%s'", dir ? dir : "(null)");
    snprintf(db->dir, sizeof db->dir, "%s", dir);
    size_t n = name ? strnlen(name, PRES_ID_MAX + 1) : 0;
    if (n == 0 || n > PRES_ID_MAX)
        return fail(db, -EINVAL, "bad store name for LMDB at %s", dir);
    memcpy(db->name, name, n);
    long pg = sysconf(_SC_PAGESIZE);
    db->page = pg > 0 ? (uint64_t)pg : 4096;
    if (map_size < db->page)
        map_size = db->page;
    db->map_size = (map_size + db->page - 1) / db->page * db->page;
    map_max -= map_max % db->page;
    db->map_max = map_max > db->map_size ? map_max : db->map_size;
    return 0;
}

int pd_db_open(pd_db_t **out, const char *dir, const char *name, uint64_t map_size,
               uint64_t map_max, char *err, size_t errlen)
{
    pd_db_t *db = calloc(1, sizeof *db);
    if (!db) {
        if (err && errlen)
            snprintf(err, errlen, "out of memory opening LMDB at %s", dir ? dir : "(null)");
        return -ENOMEM;
    }
    char data[PATH_MAX + 16], lock[PATH_MAX + 16];
    int rc = open_args(db, dir, name, map_size, map_max);
    if (rc == 0) {
        snprintf(data, sizeof data, "%s/data.mdb", db->dir);
        snprintf(lock, sizeof lock, "%s/lock.mdb", db->dir);
        rc = dir_prepare(db);
    }
    if (rc == 0)
        rc = dir_foreign(db, data);
    if (rc == 0)
        rc = env_open(db, data, lock);
    if (rc == 0)
        rc = meta_open(db);
    if (rc < 0) {
        if (err && errlen)
            snprintf(err, errlen, "%s", db->err);
        pd_db_close(db);
        return rc;
    }
    int dead;
    mdb_reader_check(db->env, &dead);
    *out = db;
    return 0;
}

void pd_db_close(pd_db_t *db)
{
    if (!db)
        return;
    if (db->env)
        mdb_env_close(db->env);
    free(db->ents);
    free(db->slots);
    free(db->arena);
    free(db);
}
