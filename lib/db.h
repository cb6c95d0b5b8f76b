/*
 * db.h - the LMDB mirror: its record formats, and the library's read-only
 * access to it (for users evicted from shared memory).
 *
 * presenced is the one writer of the mirror (daemon/db.h); the library only
 * reads it (DESIGN.md, "Which part may use which").  Both sides share what
 * is here: the layout of the environment, the byte format of its records,
 * and the check that an environment is a mirror of a given store.
 *
 * The environment is one directory per store with three named databases:
 *
 *   "meta"     "magic"    = "libpresence" (11 bytes, no NUL)
 *              "format"   = u32 PRES_DB_FORMAT
 *              "name"     = the store name (no NUL)
 *              "alive_ms" = u64 wall ms of the daemon's last commit
 *   "users"    user id   -> user record (pres_db_user_t, encoded)
 *   "devices"  device id -> device record (pres_db_dev_t, encoded)
 *
 * Records are byte blobs, not C structs: a leading u32 record version, then
 * fixed-width little-endian integers and length-prefixed ids, so a mirror
 * reads the same on any host and any compiler, and a blob that does not
 * parse exactly (short, long, a bad length or count) is -EPROTO, never an
 * out-of-bounds read.
 */
#ifndef PRES_DB_H
#define PRES_DB_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <lmdb.h>

#include "presence.h"

#define PRES_DB_HIDDEN __attribute__((visibility("hidden")))

/* The layout of the environment (meta keys, databases): bumped when it
 * changes.  Records carry their own version, PRES_DB_RECORD. */
#define PRES_DB_FORMAT   1u
#define PRES_DB_RECORD   1u
#define PRES_DB_MAGIC    "libpresence"

#define PRES_DB_META     "meta"
#define PRES_DB_USERS    "users"
#define PRES_DB_DEVICES  "devices"

/* Named databases an environment may open: ours are three; one spare so a
 * later format can add one without every reader failing MDB_DBS_FULL. */
#define PRES_DB_MAXDBS   4u
/* Reader slots of the lock file.  LMDB's default of 126 is too few for a
 * host of delivery workers each keeping a few reset read txns; a slot is 64
 * bytes, so 1024 cost 64 KiB.  Both sides ask for the same number because
 * whichever opens the environment first sizes the lock file. */
#define PRES_DB_MAXREADERS 1024u

typedef struct {
    uint64_t last_seen_ms;     /* 0: never connected */
    uint64_t frozen_seen_ms;   /* last seen when they became invisible */
    uint32_t policy;           /* privacy flags, opaque here: bits 0-1 last
                                  seen audience, 2-3 online audience, 4
                                  approximate, 5 reciprocal, 6 invisible,
                                  7 set */
    uint32_t n_allow, n_deny;  /* <= PRES_EXCEPTIONS_MAX each */
    char     allow[PRES_EXCEPTIONS_MAX][PRES_ID_MAX + 1];
    char     deny[PRES_EXCEPTIONS_MAX][PRES_ID_MAX + 1];
} pres_db_user_t;

typedef struct {
    char     user_id[PRES_ID_MAX + 1];
    char     gateway_id[PRES_ID_MAX + 1];   /* may be "" */
    uint64_t connected_at_ms, last_seen_ms, last_active_ms;
    uint32_t connected;        /* 1: was connected when written */
} pres_db_dev_t;

/* The largest encodings, for sizing buffers.
 * user:   version, last_seen, frozen_seen, policy, n_allow, n_deny, then
 *         each id as a u8 length and its bytes.
 * device: version, user id, gateway id (u8 length + bytes each), the three
 *         times, connected. */
#define PRES_DB_USER_MAX (4u + 8u + 8u + 4u + 4u + 4u + \
                          2u * PRES_EXCEPTIONS_MAX * (1u + PRES_ID_MAX))
#define PRES_DB_DEV_MAX  (4u + 2u * (1u + PRES_ID_MAX) + 3u * 8u + 4u)

/* Encode into buf (cap bytes); *len gets the length.  Returns 0, -EINVAL
 * (an empty id where one is required), -ENAMETOOLONG (an id of more than
 * PRES_ID_MAX bytes, i.e. no NUL within PRES_ID_MAX + 1), -E2BIG (a list
 * longer than PRES_EXCEPTIONS_MAX), -ENOBUFS (cap too small; the
 * PRES_DB_*_MAX sizes always suffice).  Pure functions: any thread. */
PRES_DB_HIDDEN int pres__db_user_encode(const pres_db_user_t *u, uint8_t *buf,
                                        size_t cap, size_t *len);
PRES_DB_HIDDEN int pres__db_dev_encode(const pres_db_dev_t *d, uint8_t *buf,
                                       size_t cap, size_t *len);

/* Decode len bytes at buf into *u / *d.  Returns 0, or -EPROTO for anything
 * but one exact, well-formed record of a known version (*out is then
 * unspecified).  Reads nothing outside [buf, buf + len).  List entries
 * beyond n_allow / n_deny are set to "". */
PRES_DB_HIDDEN int pres__db_user_decode(const void *buf, size_t len, pres_db_user_t *u);
PRES_DB_HIDDEN int pres__db_dev_decode(const void *buf, size_t len, pres_db_dev_t *d);

/* An LMDB return code as a negative errno: MDB_NOTFOUND -ENOENT,
 * MDB_MAP_FULL -ENOSPC, MDB_TXN_FULL -E2BIG, MDB_READERS_FULL -EAGAIN,
 * MDB_PANIC -EIO, the codes for damaged or foreign files -EPROTO, and a
 * system errno as itself. */
PRES_DB_HIDDEN int pres__db_errno(int mdb_rc);

/* Check the meta database of an environment (open in txn as meta) against
 * the store `name`.  Returns 0, or -EPROTO with the reason in why (a
 * sentence fragment such as "belongs to store 'x'"), or another negative
 * errno for an LMDB failure. */
PRES_DB_HIDDEN int pres__db_meta_check(MDB_txn *txn, MDB_dbi meta, const char *name,
                                       char *why, size_t whylen);

/* Little-endian fixed-width integers, for the meta values and records. */
static inline void pres__le32_put(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void pres__le64_put(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t pres__le32_get(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline uint64_t pres__le64_get(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* ---- read-only access (lib/db.c) ---------------------------------------
 *
 * LMDB forbids opening one environment twice in a process (closing either
 * would drop the other's POSIX locks), so handles on the same directory
 * share one MDB_env, counted in a process-wide table.  A handle used in a
 * child after fork() never touches the parent's environment: it opens the
 * child's own on first use.
 */
typedef struct pres_db_ro pres_db_ro_t;

/* Open the mirror in directory dir, which must belong to store `name`.
 * Returns 0 and a handle in *out (the caller closes it), or -ENOENT (no
 * directory, no data.mdb, or files this process may not open), -EPROTO (not
 * a mirror of this store of this format, or damaged), -EINVAL, -ENOMEM.
 * Creates nothing (LMDB would add lock.mdb only beside a data.mdb that
 * lacks one).  Readers need write access to lock.mdb (it holds LMDB's
 * reader slots), read access to data.mdb.  Any thread; costs an
 * mdb_env_open the first time a process opens a directory, a table lookup
 * after that. */
PRES_DB_HIDDEN int  pres__db_ro_open(const char *dir, const char *name, pres_db_ro_t **out);

/* Copy out one record.  Returns 0, -ENOENT (no such record), -EPROTO (a
 * record that does not decode, or damaged files), -EINVAL / -ENAMETOOLONG
 * (a bad id), -EAGAIN (LMDB's reader table is full), or the -ENOENT /
 * -EPROTO of an open after fork().  Any thread, concurrently, on one
 * handle.  Costs one B-tree lookup in a short read txn (a reset txn is
 * reused, so no shared lock is taken in the common case). */
PRES_DB_HIDDEN int  pres__db_ro_user(pres_db_ro_t *db, const char *user_id, pres_db_user_t *out);
PRES_DB_HIDDEN int  pres__db_ro_device(pres_db_ro_t *db, const char *device_id, pres_db_dev_t *out);

/* Drop the handle (NULL is fine); the environment closes with the last
 * handle of the process on it.  No lookup may be running on the handle. */
PRES_DB_HIDDEN void pres__db_ro_close(pres_db_ro_t *db);

#endif /* PRES_DB_H */
