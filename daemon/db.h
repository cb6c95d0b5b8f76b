/*
 * db.h - presenced's side of the LMDB mirror: the one writer (DESIGN.md,
 * property 9).
 *
 * Changes are staged in memory, coalesced per record (the latest state
 * wins), and written in one durable transaction per batch, so a reconnect
 * storm costs one put per record that changed, not one per change, and no
 * writer of the store ever waits for LMDB.  The record formats and the
 * environment's layout are in lib/db.h.
 *
 * Not thread-safe: one thread of the daemon owns a pd_db_t.  A process
 * must not also open the same directory with lib/'s pres__db_ro_open: LMDB
 * allows one environment per files per process (and growing the map
 * remaps it under any reader of ours).
 */
#ifndef PD_DB_H
#define PD_DB_H

#include <stddef.h>
#include <stdint.h>

/* lib/db.h by its path: a plain "db.h" here would name this file. */
#include "../lib/db.h"

typedef struct pd_db pd_db_t;

/* Open the mirror of store `name` in directory dir, creating the directory
 * (mode 0770) and the environment (files mode 0660) if missing.  A new
 * environment gets its meta (magic, format, name); an existing one must have
 * ours, and an environment that is empty (a creation cut short) is
 * initialised.  Never starts empty over someone's data: a directory whose
 * files are not an LMDB environment of this store is refused.
 *
 * map_size is the initial map (rounded up to pages; an existing environment
 * keeps its own size when that is larger); commits grow it by doubling up
 * to map_max (a map_max below map_size means map_size).  Durability: LMDB's
 * default flags, so every commit is fsynced (no MDB_NOSYNC, MDB_NOMETASYNC
 * or MDB_WRITEMAP): batches are large, so one fsync per batch is
 * affordable, and a mirror that loses acknowledged commits on power loss
 * would defeat its purpose.
 *
 * Returns 0 and *out, or -EPROTO (foreign, damaged or another store's
 * files), -EACCES (a directory that cannot be created or written, or a path
 * that is not a directory), -EINVAL, -ENOMEM, -EIO; on failure err (errlen
 * bytes, may be NULL) holds one line saying what and where, e.g.
 * "LMDB at DIR belongs to store 'x'". */
int  pd_db_open(pd_db_t **out, const char *dir, const char *name, uint64_t map_size,
                uint64_t map_max, char *err, size_t errlen);

/* Close (NULL is fine).  Staged changes not committed are dropped. */
void pd_db_close(pd_db_t *db);

/* Stage a change; nothing is written until pd_db_commit.  A later change of
 * the same record replaces the staged one (a put replaces a delete and the
 * reverse).  Returns 0, -EINVAL / -ENAMETOOLONG (a bad id), the encoder's
 * -E2BIG, or -ENOMEM.  Costs a hash lookup and a copy of the encoded
 * record; memory grows with the number of distinct records staged. */
int  pd_db_put_user(pd_db_t *db, const char *user_id, const pres_db_user_t *u);
int  pd_db_put_device(pd_db_t *db, const char *device_id, const pres_db_dev_t *d);
int  pd_db_del_device(pd_db_t *db, const char *device_id);

/* Distinct records staged and not yet committed. */
size_t pd_db_staged(const pd_db_t *db);

/* Write every staged change, and meta "alive_ms" = now_wall_ms, in one
 * durable transaction (a commit with nothing staged still writes
 * alive_ms: callers that only want to stamp liveness now and then check
 * pd_db_staged first).  Puts go in key order, which keeps the B-tree
 * writes local.
 *
 * On MDB_MAP_FULL the transaction is aborted, the map doubled (up to
 * map_max) and the same batch written again.  A batch too large for one
 * transaction's dirty-page limit (MDB_TXN_FULL) is split in halves, each
 * its own transaction (alive_ms goes with the last).
 *
 * Returns 0 (the staging area is then empty), or -ENOSPC (the map cannot
 * grow past map_max), -EIO, -EPROTO (damaged files), -ENOMEM: the whole
 * batch then stays staged (a part already written is written again next
 * time, which changes nothing) and pd_db_error says what happened. */
int  pd_db_commit(pd_db_t *db, uint64_t now_wall_ms);

/* What went wrong in the last pd_db_commit or walk, as one line; "" when
 * it succeeded.  Valid until the next call on db. */
const char *pd_db_error(const pd_db_t *db);

/* The current map size in bytes, and a new ceiling for its growth (takes
 * effect at the next commit; it never shrinks the map). */
uint64_t pd_db_map_size(const pd_db_t *db);
void     pd_db_set_map_max(pd_db_t *db, uint64_t map_max);

/* Walk every committed record, in key order, in one read txn (for a
 * rebuild: staged changes are not seen).  cb returns 0 to go on, < 0 to
 * stop: the walk then returns that value.  A record that does not decode
 * (or whose key is not a valid id) is skipped and counted.  Returns the
 * number skipped (0 normally; pd_db_error then names the last), or a
 * negative error.  cb may stage changes but must not commit. */
int  pd_db_each_user(pd_db_t *db, int (*cb)(void *ctx, const char *id, const pres_db_user_t *u),
                     void *ctx);
int  pd_db_each_device(pd_db_t *db, int (*cb)(void *ctx, const char *id, const pres_db_dev_t *d),
                       void *ctx);

/* One record, as the next commit would leave it: a staged change is seen
 * (a staged delete is -ENOENT), else the committed record.  Returns 0,
 * -ENOENT, -EPROTO (a record that does not decode), -EINVAL /
 * -ENAMETOOLONG (a bad id), or an LMDB failure. */
int  pd_db_get_user(pd_db_t *db, const char *id, pres_db_user_t *out);
int  pd_db_get_device(pd_db_t *db, const char *id, pres_db_dev_t *out);

/* The wall ms of the last commit (meta "alive_ms"): what a rebuild takes as
 * the last seen of devices that were connected.  Returns 0, -ENOENT (never
 * committed), -EPROTO (malformed), or an LMDB failure. */
int  pd_db_alive_ms(pd_db_t *db, uint64_t *out);

/* Committed users + devices (0 if LMDB cannot say). */
uint64_t pd_db_entries(pd_db_t *db);

#endif /* PD_DB_H */
