/*
 * mirror.h - presenced's write-behind mirror of the store to LMDB, and the
 * rebuild of a store from it (DESIGN.md property 9; doc/region.md, "The
 * LMDB mirror").
 *
 * The daemon is the one writer of LMDB.  Records that changed are found
 * from the change notes, from the daemon's own passes (expiries,
 * evictions) and, when notes were lost or at adopt, from a sweep of every
 * record; each is marked dirty once, however often it changes, and a
 * writer thread commits their latest state in batches.  Writers of the
 * store (gateways) never see any of it.
 *
 * All functions but the writer thread's run in the daemon's main thread.
 */
#ifndef PD_MIRROR_H
#define PD_MIRROR_H

#include <stdint.h>

#include "daemon.h"
#include "db.h"

/* Open LMDB at cfg.db for the store, before the region is touched: a
 * damaged, foreign or unwritable directory is refused.  Returns 0, or -1
 * after logging why (the daemon then exits 1). */
int  pd_mirror_open(pd_t *d);

/* The writer the rebuild reads from (valid between open and start). */
pd_db_t *pd_mirror_db(pd_t *d);

/* Size the mirror's private state for a store of these capacities (done by
 * start when not done before; a rebuild does it first, to mark what it
 * fills).  Returns 0 or -ENOMEM. */
int  pd_mirror_alloc(pd_t *d, uint32_t dev_cap, uint32_t user_cap);

/* The region is mapped: start the writer thread.  resync: the region was
 * adopted, so LMDB may lack anything in it; a sweep writes what differs.
 * Returns 0 or -1 (logged). */
int  pd_mirror_start(pd_t *d, int resync);

/* Record dev i changed (its user is looked at with it); user u changed
 * (privacy, or last seen).  Cheap and idempotent until the next batch. */
void pd_mirror_dev(pd_t *d, uint32_t i);
void pd_mirror_user(pd_t *d, uint32_t u);
/* The index pass saw device i connected at nm: an interaction since the
 * last write (which no note announces) makes it dirty.  Looked at on one
 * pass in a few. */
void pd_mirror_active(pd_t *d, uint32_t i, uint64_t nm);

/* For a rebuild, before start: the fingerprint of what the mirror would
 * write for a record of the store (0: not a current record), and that LMDB
 * holds it already (0: it does not). */
uint64_t pd_mirror_fp_dev(pd_t *d, uint32_t i, uint64_t nm, uint64_t nw);
uint64_t pd_mirror_fp_user(pd_t *d, uint32_t u, uint64_t nm, uint64_t nw);
void     pd_mirror_set_written(pd_t *d, int user, uint32_t idx, uint64_t fp);

/* May device i / user u leave shared memory now?  Only when LMDB holds its
 * current state: not while it is queued, in flight or read by a job not
 * yet committed, nor while a sweep is owed, nor for a device whose TTL
 * passed unseen (it is marked then).  The caller tries again on a later
 * pass. */
int  pd_mirror_may_evict(pd_t *d, uint32_t i, uint64_t nm);
int  pd_mirror_may_retire(pd_t *d, uint32_t u);

/* Once a tick, after the passes: mark what this tick's notes name, mark a
 * chunk of records when a sweep is owed, hand the queue to the writer when
 * it is idle, and publish mirror_lag_ms.  Costs a flag per note. */
void pd_mirror_tick(pd_t *d, uint64_t nm);

/* SIGTERM: a last sweep of every record, every change committed, the
 * writer joined and LMDB closed.  Returns 0, or -1 when something could
 * not be committed (logged; the region still holds it, and the next
 * daemon writes it). */
int  pd_mirror_stop(pd_t *d);

/* rebuild.c: create the store from LMDB (no region, or a damaged one):
 * every device offline, last seen and privacy kept.  Returns 0, or -1
 * after logging why (LMDB holds more than the capacities allow, ...). */
int  pd_rebuild(pd_t *d, const pres_layout_params_t *lp);

#endif /* PD_MIRROR_H */
