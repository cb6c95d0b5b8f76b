/*
 * store.h - a process's handle on a store, and the internal layers of the
 * library: grace periods (pres__gp_), allocation (pres__alloc_), indexes
 * (pres__idx_) and record reads (pres__dev_).
 */
#ifndef PRES_STORE_H
#define PRES_STORE_H

#include <errno.h>
#include <pthread.h>
#include <string.h>

#include "atomics.h"
#include "clock.h"
#include "region.h"

#define PRES_HIDDEN __attribute__((visibility("hidden")))

struct pres {
    pres_map_t   m;
    int          rdwr;
    uint32_t     client;        /* our client slot */
    uint64_t     cgen;          /* its generation when we claimed it */
    uint64_t     token;         /* PRES_TOKEN(client, cgen) */
    unsigned     latch;         /* client + 1: names us in ring slots and
                                   half-filled gateway entries */
    uint64_t     id;            /* unique within the process */
    pthread_mutex_t lock;       /* guards the lists below (slow paths only) */
    uint32_t    *rslots;        /* reader slots claimed through this handle */
    size_t       n_rslots, cap_rslots;
    uint32_t     spare_users[4]; /* unpublished user records, index + 1 */
    uint32_t     gws[16];       /* gateways attached through this handle */
    size_t       n_gws;
    char         name[64];
    struct pres_db_ro *db;      /* the LMDB mirror, read-only: opened on
                                   first need (user_db.c) */
};

/* ---- grace periods (gp.c) ------------------------------------------------ */

/* A read section: while it is open, no record the caller can reach through
 * the indexes is freed.  Sections nest; they are per (thread, handle). */
typedef struct {
    uint64_t       hid;
    pres_rslot_t  *slot;
    uint32_t       nest;
    uint32_t       index;
} pres_rs_t;

#define PRES_TLS_RS 8
extern __thread pres_rs_t pres__tls_rs[PRES_TLS_RS];
PRES_HIDDEN pres_rs_t *pres__gp_claim(pres_t *p);

static inline pres_rs_t *pres__gp_slot(pres_t *p)
{
    pres_rs_t *t = &pres__tls_rs[0];
    if (__builtin_expect(t->hid == p->id, 1))
        return t;
    for (int i = 1; i < PRES_TLS_RS; i++)
        if (pres__tls_rs[i].hid == p->id)
            return &pres__tls_rs[i];
    return pres__gp_claim(p);
}

/* Enter: publish the epoch we start in, then a full fence so that the
 * daemon, which unlinks a record and then advances the epoch (a full
 * barrier) before it scans the slots, either sees our epoch or we see the
 * unlink: never both miss (the store->load order of Dekker's handshake). */
static inline pres_rs_t *pres__gp_enter(pres_t *p)
{
    pres_rs_t *t = pres__gp_slot(p);
    if (__builtin_expect(t == NULL, 0))
        return NULL;
    if (t->nest++ == 0) {
        pa_store(&t->slot->epoch, pa_load(&p->m.rhdr->gp_epoch));
        pa_fence();
    }
    return t;
}

/* Leave: release, so every read of the section happens before the daemon
 * can see the slot quiescent and free what we were reading. */
static inline void pres__gp_leave(pres_rs_t *t)
{
    if (--t->nest == 0)
        pa_store_release(&t->slot->epoch, 0);
}

/* Counters live in the thread's reader slot: one writer, no lock prefix. */
static inline void pres__count(pres_rs_t *t, int which)
{
    uint64_t *c = &t->slot->counters[which];
    pa_store(c, pa_load(c) + 1);
}

/* Add a slot's counters to the totals of departed slots, and zero them. */
PRES_HIDDEN void pres__counters_fold(pres_map_t *m, uint64_t *counters);
PRES_HIDDEN int  pres__gp_client_register(pres_t *p);
PRES_HIDDEN void pres__gp_client_release(pres_t *p);
PRES_HIDDEN int  pres__client_alive(const pres_map_t *m, uint32_t client);
enum { PRES_HOLDER_DEAD = 0, PRES_HOLDER_RUNNING, PRES_HOLDER_STOPPED };
/* What the kernel says of the thread whose latch value this is. */
PRES_HIDDEN int  pres__latch_holder_state(const pres_map_t *m, unsigned latch);

/* Daemon side. */
PRES_HIDDEN uint64_t pres__gp_advance(pres_map_t *m);
PRES_HIDDEN uint64_t pres__gp_min_active(const pres_map_t *m, uint32_t *n_active);

/* Wall-clock time of a monotonic instant, the same in every process. */
static inline uint64_t pres__wall_of(const pres_map_t *m, uint64_t mono)
{
    return (uint64_t)((int64_t)mono + pa_load(&m->hdr->wall_offset_ms));
}

/* ---- allocation (alloc.c) ------------------------------------------------ */

PRES_HIDDEN int pres__alloc_take(pres_t *p, int kind, uint32_t *idx);
/* Records of a kind offered now (a moment's figure: others take too). */
PRES_HIDDEN uint64_t pres__alloc_avail(const pres_t *p, int kind);

/* ---- change notes (notes.c) and the change feed (events.c) --------------- */

/* Tell the daemon record idx of a kind (PRES_NOTE_*) changed.  Never waits. */
PRES_HIDDEN void pres__note(pres_map_t *m, unsigned kind, uint32_t idx);

/* Append an event to the change feed (latch: the caller's latch value, the
 * reader slot index + 1 of its thread, or PRES_DAEMON_LATCH).  Ids may be
 * NULL (empty).  Never waits on another process. */
PRES_HIDDEN void pres__ev_emit(pres_map_t *m, unsigned latch, int kind, int status,
                               const char *user, size_t ulen, const char *dev, size_t dlen,
                               const char *gw, size_t glen, const char *conv, size_t clen,
                               uint64_t at_ms);

/* The same in two steps, for a change that must be announced exactly once
 * even if its writer is killed half-way: claim a seq *before* making the
 * change (under the record's latch, so that the feed orders the changes of
 * a record as they happened), then publish what happened, or abandon the
 * claim (the seq reads as PRES_EV_LOST) if nothing did.  A thread holds at
 * most one claim at a time, briefly: watchers wait for it. */
typedef struct {
    pres_event_slot_t *slot;     /* NULL: no claim held */
    uint64_t seq;
    uint64_t word;               /* the CLAIMED word we wrote */
} pres_evc_t;

typedef struct {
    int         kind, status;
    uint64_t    at_ms;
    const char *user, *dev, *gw, *conv;   /* may be NULL: empty */
    size_t      ulen, dlen, glen, clen;
} pres_ev_t;

/* 0, or -EPROTO when the ring is damaged (then c->slot is NULL). */
PRES_HIDDEN int  pres__ev_claim(pres_map_t *m, unsigned latch, pres_evc_t *c);
PRES_HIDDEN void pres__ev_publish(pres_map_t *m, pres_evc_t *c, const pres_ev_t *e);
PRES_HIDDEN void pres__ev_abandon(pres_map_t *m, pres_evc_t *c);
/* Publish claim c as an event about device record i on gateway entry gw. */
PRES_HIDDEN void pres__ev_dev(pres_map_t *m, pres_evc_t *c, int kind, uint32_t i, uint32_t gw,
                              uint64_t at_ms);
/* Device record i stops being connected: end its live typing record, if
 * any, announcing PRES_EV_TYPING_STOP.  Returns 1 if it ended one. */
PRES_HIDDEN int  pres__ev_typing_end(pres_map_t *m, unsigned latch, uint32_t i, uint32_t gw,
                                     uint64_t at_ms);
/* End typing record t, whose word was w (LIVE), by the CAS LIVE -> ENDED:
 * whoever makes that CAS announces the stop.  Returns 1 if we made it. */
PRES_HIDDEN int  pres__ev_typ_stop(pres_map_t *m, unsigned latch, uint32_t t, uint64_t w,
                                   uint32_t gw, uint64_t at_ms);
/* Declare slot sl, whose word was w, lost at lap `lap`, keeping latch
 * `keep` (a writer that may still copy into it) or 0.  1 if the CAS took. */
PRES_HIDDEN int  pres__ev_declare_lost(pres_event_slot_t *sl, uint64_t w, uint64_t lap,
                                       unsigned keep, uint64_t at_ms);
/* Wake the watchers asleep, if any (after a publish or a declaration). */
PRES_HIDDEN void pres__ev_wake(pres_map_t *m);

/* ---- the user view (user.c) ------------------------------------------------ */

/* What a user's devices add up to at one instant, before privacy. */
typedef struct {
    int      status;         /* enum pres_status, damped by the offline grace */
    int      raw_status;     /* the same without the grace */
    unsigned devices;        /* connected now */
    uint64_t last_seen_ms;   /* wall; 0: never connected */
    /* The monotonic instant at which status may next change with no write
     * (an expiry, the idle timer, the end of the grace); UINT64_MAX none. */
    uint64_t next_change;
    /* A record being connected (PENDING) was passed over: a device may be
     * between its old record and its new one, and count as absent for the
     * instant. */
    int      unsettled;
} pres_agg_t;

/* Aggregate user u's devices at monotonic nm (wall nw).  Call inside a read
 * section.  0, -EAGAIN (carried off the list: read again), -EPROTO. */
PRES_HIDDEN int pres__user_agg(const pres_map_t *m, uint32_t u, uint64_t nm, uint64_t nw,
                               pres_agg_t *out);

/* ---- users no longer in shared memory (user_db.c) ------------------------- */

/* pres_user for a user not in shared memory (evicted with its devices after
 * --retain-ms): answered from the LMDB mirror, which the library only reads
 * (DESIGN.md).  len is strlen(user_id); viewer as pres_user takes it.
 * Returns 0, -ENOENT (no such user, or no mirror this process may open),
 * -EPROTO (a record that does not decode), -EINVAL / -ENAMETOOLONG (a bad
 * viewer id), -ENOMEM.  Any thread; costs a B-tree lookup or two. */
PRES_HIDDEN int  pres__user_from_db(pres_t *p, const char *user_id, size_t len,
                                    const pres_viewer_t *viewer, pres_user_view_t *out);
/* Drop the handle's mirror (pres_close). */
PRES_HIDDEN void pres__user_db_close(pres_t *p);

/* ---- hashing and indexes (index.c) --------------------------------------- */

static inline uint64_t pres__hash_mix(uint64_t x)
{
    x ^= x >> 32;
    x *= UINT64_C(0xd6e8feb86659fd93);
    x ^= x >> 32;
    x *= UINT64_C(0xd6e8feb86659fd93);
    x ^= x >> 32;
    return x;
}

/* The same function and seed (from the header) in every process. */
static inline uint64_t pres__hash(const char *key, size_t len, uint64_t seed)
{
    uint64_t h = seed ^ (len * UINT64_C(0x9e3779b97f4a7c15));
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, key, 8);
        h = pres__hash_mix(h ^ v);
        key += 8;
        len -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, key, len);
    return pres__hash_mix(h ^ v ^ ((uint64_t)len << 59));
}

static inline int pres__key_eq(const uint8_t *klen, const char *k, const char *key, size_t len)
{
    return *klen == len && memcmp(k, key, len) == 0;
}

/* Find the current record of a device: the first in its chain with the key
 * that is CONNECTED or DISCONNECTED.  Call inside a read section.  Returns
 * the index, -ENOENT, or -EPROTO (a chain that is too long, leaves the table
 * or ends in another chain's marker). */
PRES_HIDDEN int pres__idx_dev_find(const pres_map_t *m, const char *key, size_t len, uint64_t h);
PRES_HIDDEN int pres__idx_user_find(const pres_map_t *m, const char *key, size_t len, uint64_t h);
PRES_HIDDEN int pres__idx_user_get(pres_t *p, const char *key, size_t len, uint32_t *out);
PRES_HIDDEN void pres__idx_dev_link_hash(pres_map_t *m, uint32_t i, uint64_t h);
PRES_HIDDEN int pres__idx_gw_find(const pres_map_t *m, const char *key, size_t len);
PRES_HIDDEN int pres__idx_gw_get(pres_t *p, const char *key, size_t len);

/* ---- records (device.c) -------------------------------------------------- */

/* A consistent snapshot of a device record. */
typedef struct {
    uint64_t live;
    pres_conn_t c;
    uint32_t ttl, cid;
    uint64_t activity;
} pres_snap_t;

PRES_HIDDEN int  pres__dev_snap(const pres_map_t *m, uint32_t i, pres_snap_t *s);
/* The monotonic instant a device that is not connected stopped being
 * connected: its disconnect, or its expiry (also when a disconnect came
 * after the TTL had passed). */
PRES_HIDDEN uint64_t pres__dev_stopped_at(const pres_map_t *m, const pres_snap_t *s);
PRES_HIDDEN void pres__dev_info(const pres_map_t *m, uint32_t i, const pres_snap_t *s,
                                uint64_t now_mono, uint64_t now_wall,
                                pres_device_info_t *out);
PRES_HIDDEN int  pres__id_check(const char *id, size_t *len);
/* An interaction on connected device i at monotonic nm (pres_set_activity's
 * PRES_ACTIVE, pres_typing): one store, and a note when it wakes the device. */
PRES_HIDDEN void pres__dev_interact(pres_map_t *m, uint32_t i, uint64_t nm);

/* Copy a key of the region into a NUL-terminated buffer of PRES_ID_MAX + 1. */
static inline void pres__key_out(char *dst, uint8_t len, const char *src)
{
    if (len > PRES_ID_MAX)
        len = 0;
    memcpy(dst, src, len);
    dst[len] = '\0';
}

/* ---- typing (typing.c) ------------------------------------------------------ */

/* The typing record device i's link names, if it is the record of the
 * device's current connection (snapshot s): its index, or -1. */
PRES_HIDDEN int pres__typ_current(const pres_map_t *m, uint32_t i, const pres_snap_t *s);

#endif /* PRES_STORE_H */
