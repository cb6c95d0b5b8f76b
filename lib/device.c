/*
 * device.c - the gateway and reader operations on device records.
 *
 * The live word (see region.h) carries expiry, state, seq and latch.  The
 * protocol, in short (doc/region.md has the long form):
 *
 *  - An on-time heartbeat with an unchanged TTL is one CAS of the live word
 *    that changes only the expiry.
 *  - Everything else that changes a connection (connect, disconnect, a new
 *    TTL, a late heartbeat) takes the latch (a CAS that writes the writer's
 *    client index into the live word), writes the copy of conn[] that seq
 *    does not select, and publishes it by one CAS that flips seq, sets the
 *    expiry and state and drops the latch.  A reader reads the live word,
 *    the selected copy, and the live word again; if seq moved it reads
 *    again.  It never waits for the latch: the latch guards only the copy
 *    no reader is told to read.  A writer killed while holding the latch
 *    leaves a half-written idle copy that nobody reads; the next writer
 *    (after the kernel confirms the death) or the daemon takes the latch
 *    over.
 *  - A new device (or one moving to another user) gets a new record: it is
 *    PENDING (invisible) until linked into its user's list and the hash
 *    chain, then published CONNECTED; older records of the same device
 *    behind it are marked DEAD for the daemon to unlink and free after a
 *    grace period.  The first live record in a chain wins, so readers see
 *    the old device until the new one is published.
 */
#include <sched.h>

#include "store.h"

#define REF_IDX_BITS 25
#define REF_GEN_BITS 15
#define REF_GEN_MASK ((1u << REF_GEN_BITS) - 1)
#define REF_CID_MASK 0xffffffu

static pres_ref_t make_ref(uint32_t idx, uint32_t gen, uint32_t cid)
{
    return (uint64_t)(idx + 1) | ((uint64_t)(gen & REF_GEN_MASK) << REF_IDX_BITS) |
           ((uint64_t)(cid & REF_CID_MASK) << (REF_IDX_BITS + REF_GEN_BITS));
}

int pres__id_check(const char *id, size_t *len)
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

static int ttl_check(uint32_t ttl)
{
    return ttl >= 1 && ttl <= PRES_TTL_MAX_MS ? 0 : -EINVAL;
}

/* ---- the latch ---------------------------------------------------------- */

#define LIVE_LATCH_MASK  (~(uint64_t)0 << 50)
#define LIVE_STATE_MASK  (UINT64_C(3) << 40)

/* How long a writer keeps waiting for a latch holder that the kernel says
 * is running (not stopped): the holder is a few stores from done and was
 * only descheduled.  Beyond this something is badly wrong with it. */
#define LATCH_WAIT_MS 2000

/* Take the latch of a CONNECTED or DISCONNECTED record for this thread
 * (its reader slot names it).  Another writer holds it only for a few
 * stores: we wait while the kernel says the holder runs, take it over when
 * the kernel says the holder is dead (what it left is the idle copy, which
 * nobody reads), and give up with -EBUSY when the holder is stopped (a
 * signal or a debugger).  -EAGAIN: the record is no longer current. */
static int latch_take(pres_t *p, pres_rs_t *t, pres_dev_t *d, uint64_t *out)
{
    unsigned me = t->index + 1;
    uint64_t L = pa_load_acquire(&d->live);
    uint64_t deadline = 0;
    for (uint32_t spin = 0;; spin++) {
        unsigned st = PRES_LIVE_STATE(L);
        if (st == PRES_DS_DEAD || st == PRES_DS_PENDING)
            return -EAGAIN;
        unsigned holder = PRES_LIVE_LATCH(L);
        int free_ = holder == 0;
        if (!free_ && spin >= 64 && spin % 64 == 0) {
            int s = pres__latch_holder_state(&p->m, holder);
            if (s == PRES_HOLDER_DEAD)
                free_ = 1;
            else if (s == PRES_HOLDER_STOPPED)
                return -EBUSY;
            if (!deadline)
                deadline = pres__mono_ms() + LATCH_WAIT_MS;
            else if (pres__mono_ms() > deadline)
                return -EBUSY;
        }
        if (free_) {
            uint64_t want = (L & ~LIVE_LATCH_MASK) | ((uint64_t)me << 50);
            if (pa_cas(&d->live, &L, want)) {
                /* Our copy stores must not become visible before the latch:
                 * a reader that sees any of them then also sees the live
                 * word move on (pairs with pres__dev_snap's acquire fence). */
                pa_fence_release();
                *out = want;
                return 0;
            }
            continue;
        }
        if (spin < 64)
            pa_pause();
        else
            sched_yield();
        L = pa_load_acquire(&d->live);
    }
}

/* Publish the idle copy: flip seq, set expiry and state, drop the latch.
 * Heartbeats may move the expiry meanwhile, and a DEAD mark may land: the
 * CAS is retried against what is there (the DEAD mark wins). */
static int latch_publish(pres_rs_t *t, pres_dev_t *d, uint64_t exp, unsigned st)
{
    uint64_t L = pa_load(&d->live);
    for (;;) {
        if (PRES_LIVE_LATCH(L) != t->index + 1)
            return -EAGAIN;
        if (PRES_LIVE_STATE(L) == PRES_DS_DEAD) {
            if (pa_cas(&d->live, &L, L & ~LIVE_LATCH_MASK))
                return -EAGAIN;
            continue;
        }
        uint64_t want = PRES_LIVE_MAKE(exp, st, PRES_LIVE_SEQ(L) + 1, 0);
        if (pa_cas(&d->live, &L, want))
            return 0;
    }
}

static void latch_drop(pres_rs_t *t, pres_dev_t *d)
{
    uint64_t L = pa_load(&d->live);
    while (PRES_LIVE_LATCH(L) == t->index + 1 && !pa_cas(&d->live, &L, L & ~LIVE_LATCH_MASK))
        ;
}

static void conn_write(pres_dev_t *d, unsigned k, const pres_conn_t *c,
                       uint32_t ttl, uint32_t cid)
{
    pa_store(&d->conn[k].gw, c->gw);
    pa_store(&d->conn[k].flags, c->flags);
    pa_store(&d->conn[k].connected_at, c->connected_at);
    pa_store(&d->conn[k].ended, c->ended);
    pa_store(&d->ttl[k], ttl);
    pa_store(&d->cid[k], cid);
}

static void conn_read(const pres_dev_t *d, unsigned k, pres_conn_t *c)
{
    c->gw = pa_load(&d->conn[k].gw);
    c->flags = pa_load(&d->conn[k].flags);
    c->connected_at = pa_load(&d->conn[k].connected_at);
    c->ended = pa_load(&d->conn[k].ended);
}

/* ---- reading ------------------------------------------------------------- */

int pres__dev_snap(const pres_map_t *m, uint32_t i, pres_snap_t *s)
{
    const pres_dev_t *d = &m->devs[i];
    for (int tries = 0; tries < 64; tries++) {
        uint64_t L1 = pa_load_acquire(&d->live);
        unsigned st = PRES_LIVE_STATE(L1);
        if (st == PRES_DS_PENDING || st == PRES_DS_DEAD)
            return -EAGAIN;
        unsigned k = PRES_LIVE_SEQ(L1) & 1;
        conn_read(d, k, &s->c);
        s->ttl = pa_load(&d->ttl[k]);
        s->cid = pa_load(&d->cid[k]);
        s->activity = pa_load(&d->activity);
        /* The copy's loads complete before the second load of the live
         * word: if seq is unchanged, no publish overwrote what we read. */
        pa_fence_acquire();
        uint64_t L2 = pa_load(&d->live);
        if (PRES_LIVE_SEQ(L2) == PRES_LIVE_SEQ(L1) && PRES_LIVE_STATE(L2) == st) {
            s->live = L2;
            return 0;
        }
    }
    return -EBUSY;
}

void pres__dev_info(const pres_map_t *m, uint32_t i, const pres_snap_t *s,
                    uint64_t nm, uint64_t nw, pres_device_info_t *out)
{
    const pres_dev_t *d = &m->devs[i];
    uint32_t u = pa_load(&d->user);
    pres__key_out(out->device_id, d->keylen, d->key);
    if (u < m->user_cap)
        pres__key_out(out->user_id, m->users[u].keylen, m->users[u].key);
    else
        out->user_id[0] = '\0';
    if (s->c.gw < m->gw_cap)
        pres__key_out(out->gateway_id, m->gws[s->c.gw].keylen, m->gws[s->c.gw].key);
    else
        out->gateway_id[0] = '\0';

    unsigned st = PRES_LIVE_STATE(s->live);
    uint64_t exp = PRES_LIVE_EXPIRY(s->live);
    uint64_t act = PRES_ACT_TIME(s->activity);
    uint64_t idle_after = pa_load(&m->hdr->idle_after_ms);
    out->connected = st == PRES_DS_CONNECTED && exp > nm;
    out->active = out->connected && !(s->activity & PRES_ACT_IDLE) &&
                  (idle_after == 0 || nm < act + idle_after);
    out->connected_at_ms = s->c.connected_at;
    (void)nm;
    out->expires_at_ms = pres__wall_of(m, exp);
    if (out->connected)
        out->last_seen_ms = nw;
    else if (st == PRES_DS_DISCONNECTED)
        out->last_seen_ms = s->c.ended;
    else
        out->last_seen_ms = pres__wall_of(m, exp > s->ttl ? exp - s->ttl : 0);
    out->last_active_ms = pres__wall_of(m, act);
}

/* Look a device up and snapshot it; retries while the record found is
 * being replaced. */
static int dev_read(const pres_map_t *m, const char *id, size_t len, uint64_t h,
                    uint32_t *idx, pres_snap_t *s)
{
    for (int tries = 0; tries < 16; tries++) {
        int i = pres__idx_dev_find(m, id, len, h);
        if (i < 0)
            return i;
        /* The rest of the record and its user's record are independent
         * misses: start them together rather than one after the other. */
        const pres_dev_t *d = &m->devs[i];
        uint32_t u = pa_load(&d->user);
        __builtin_prefetch((const char *)d + 64);
        __builtin_prefetch((const char *)d + 128);
        if (u < m->user_cap)
            __builtin_prefetch(&m->users[u]);
        int rc = pres__dev_snap(m, (uint32_t)i, s);
        if (rc == 0) {
            *idx = (uint32_t)i;
            return 0;
        }
        if (rc != -EAGAIN)
            return rc;
    }
    return -EBUSY;
}

/* ---- handles --------------------------------------------------------------- */

static pres_rs_t *enter_rw(pres_t *p, int *rc)
{
    if (!p) {
        *rc = -EINVAL;
        return NULL;
    }
    if (!p->rdwr) {
        *rc = -EROFS;
        return NULL;
    }
    pres_rs_t *t = pres__gp_enter(p);
    *rc = t ? 0 : -ENOSPC;
    return t;
}

/* Also a PENDING record: a concurrent connect of the same device that
 * linked its record before ours must not publish it after ours; its
 * publish CAS fails and it looks again (the latch bits stay). */
static int mark_dead(pres_rs_t *t, pres_dev_t *d)
{
    uint64_t L = pa_load(&d->live);
    for (;;) {
        unsigned st = PRES_LIVE_STATE(L);
        if (st == PRES_DS_DEAD)
            return 0;
        if (pa_cas(&d->live, &L, (L & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40))) {
            if (st != PRES_DS_PENDING)
                pres__count(t, PRES_C_DEV_GONE);     /* it was held */
            return st != PRES_DS_PENDING;
        }
    }
}

/* After publishing record i, mark the older records of the same device
 * behind it in the chain DEAD: the newest connect wins. */
static void supersede_older(pres_map_t *m, pres_rs_t *t, uint32_t i, const char *id, size_t len)
{
    uint64_t l = pa_load_acquire(&m->devs[i].next);
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l) && steps <= m->dev_cap; steps++) {
        uint32_t j = PRES_LINK_IDX(l);
        if (j >= m->dev_cap)
            return;
        pres_dev_t *o = &m->devs[j];
        /* The daemon's timers learn of it (its user may have lost a
         * device: a move to another user). */
        if (pres__key_eq(&o->keylen, o->key, id, len) && mark_dead(t, o))
            pres__note(m, PRES_NOTE_DEV, j);
        l = pa_load_acquire(&o->next);
    }
}

/* The gateway's incarnation goes with each connection, so a death of the
 * gateway ends only connections made before it (not those of a process
 * that attached the id again). */
static uint32_t conn_flags(const pres_map_t *m, uint32_t gwi)
{
    return (uint32_t)(pa_load(&m->gws[gwi].died) << 2);
}

/* ---- the change feed ------------------------------------------------------
 * Every end of a connection is announced once: a clean disconnect by the
 * writer that makes it (PRES_EV_DISCONNECT), an expiry by whoever first
 * holds the latch after the TTL passed: the daemon's timers, or a writer
 * that revives, reconnects or disconnects the device before them
 * (PRES_EV_EXPIRE).  `announced` records it, written under the latch after
 * the event's seq was claimed, so a writer killed anywhere leaves either
 * the end still to announce or a PRES_EV_LOST in its place, never a silent
 * gap.  Events are claimed under the latch, so the feed orders a device's
 * changes as they were made. */

static int end_announced(const pres_dev_t *d, uint64_t L)
{
    unsigned k = PRES_LIVE_SEQ(L) & 1;
    return pa_load(&d->announced) == PRES_ANN(pa_load(&d->cid[k]), PRES_LIVE_EXPIRY(L));
}

/* Under the latch: the connection L describes ended by its TTL and nobody
 * said so yet. */
static void announce_expiry(pres_map_t *m, pres_rs_t *t, uint32_t i, uint64_t L, uint64_t nw)
{
    pres_dev_t *d = &m->devs[i];
    unsigned k = PRES_LIVE_SEQ(L) & 1;
    uint32_t gw = pa_load(&d->conn[k].gw);
    pres_evc_t c;
    pres__ev_claim(m, t->index + 1, &c);
    pa_store(&d->announced, PRES_ANN(pa_load(&d->cid[k]), PRES_LIVE_EXPIRY(L)));
    pa_add_relaxed(&m->hdr->dc.expirations, 1);
    pres__ev_dev(m, &c, PRES_EV_EXPIRE, i, gw, nw);
    pres__ev_typing_end(m, t->index + 1, i, gw, nw);
}

static int reconnect(pres_t *p, pres_rs_t *t, uint32_t i, uint32_t gwi, uint32_t ttl,
                     uint64_t nm, uint64_t nw, uint32_t *cid, pres_evc_t *ev)
{
    pres_dev_t *d = &p->m.devs[i];
    uint64_t L;
    int rc = latch_take(p, t, d, &L);
    if (rc < 0)
        return rc;
    unsigned k = PRES_LIVE_SEQ(L) & 1;
    if (PRES_LIVE_STATE(L) == PRES_DS_CONNECTED && !end_announced(d, L) &&
        PRES_LIVE_EXPIRY(L) <= pres__mono_ms())
        announce_expiry(&p->m, t, i, L, nw);
    /* Typing ends with the connection it was typed on: announced now,
     * before the new connection's CONNECT. */
    pres__ev_typing_end(&p->m, t->index + 1, i, pa_load(&d->conn[k].gw), nw);
    if (!ev->slot)
        pres__ev_claim(&p->m, t->index + 1, ev);
    pres_conn_t c = { .gw = gwi, .flags = conn_flags(&p->m, gwi), .connected_at = nw, .ended = 0 };
    *cid = (pa_load(&d->cid[k]) + 1) & REF_CID_MASK;
    conn_write(d, k ^ 1, &c, ttl, *cid);
    pa_store(&d->activity, nm);
    /* Typing belongs to the connection it was typed on: the new one starts
     * without.  A CAS, so that typing on the new connection since the
     * publish stays (lib/typing.c also checks the connection's start). */
    uint64_t typing = pa_load_acquire(&d->typing);
    if ((rc = latch_publish(t, d, nm + ttl, PRES_DS_CONNECTED)) == 0 && typing)
        pa_cas(&d->typing, &typing, 0);
    return rc;
}

/* A record that will never be published: DEAD, latch dropped, for the
 * daemon to unlink and free. */
static void abandon(pres_dev_t *d)
{
    uint64_t L = pa_load(&d->live);
    while (!pa_cas(&d->live, &L, (L & ~(LIVE_LATCH_MASK | LIVE_STATE_MASK)) |
                                 ((uint64_t)PRES_DS_DEAD << 40)))
        ;
}

static int link_user(pres_t *p, uint32_t i, uint32_t *u, const char *user, size_t ulen)
{
    pres_map_t *m = &p->m;
    pres_dev_t *d = &m->devs[i];
    uint64_t link = PRES_LINK(i, pa_load(&d->gen));
    for (int r = 0; r < 1 << 16; r++) {
        uint64_t head = pa_load_acquire(&m->users[*u].dhead);
        if (head == PRES_LINK_RETIRING) {
            /* The daemon is retiring the user: stop it (its final CAS
             * expects RETIRING), then link as to any empty user. */
            pa_cas(&m->users[*u].dhead, &head, PRES_LINK_NULLS(*u));
            continue;
        }
        if (head == PRES_LINK_RETIRED) {
            /* The daemon retired this user (it had no device) since we
             * found it: find or make its successor. */
            int rc = pres__idx_user_get(p, user, ulen, u);
            if (rc < 0)
                return rc;
            pa_store(&d->user, *u);
            continue;
        }
        pa_store(&d->unext, head);
        if (pa_cas(&m->users[*u].dhead, &head, link))
            return 0;
    }
    return -EPROTO;
}

static int connect_new(pres_t *p, pres_rs_t *t, const char *user, size_t ulen,
                       const char *id, size_t len, uint64_t h, uint32_t gwi,
                       uint32_t ttl, uint64_t nm, uint64_t nw, uint32_t *idx,
                       uint32_t *cid, pres_evc_t *ev)
{
    pres_map_t *m = &p->m;
    uint32_t u, i;
    int rc = pres__idx_user_get(p, user, ulen, &u);
    if (rc < 0)
        return rc;
    if ((rc = pres__alloc_take(p, PRES_RK_DEV, &i)) < 0)
        return rc;
    pres_dev_t *d = &m->devs[i];
    pres_conn_t c = { .gw = gwi, .flags = conn_flags(m, gwi), .connected_at = nw, .ended = 0 };
    d->keylen = (uint8_t)len;
    memcpy(d->key, id, len);
    pa_store(&d->user, u);
    /* Connection ids start where the record's generation says, so a stale
     * pres_ref_t of an earlier life of this slot does not match. */
    *cid = (uint32_t)((pa_load(&d->gen) * UINT32_C(2654435761)) >> 8) & REF_CID_MASK;
    conn_write(d, 0, &c, ttl, *cid);
    pa_store(&d->activity, nm);
    pa_store(&d->typing, 0);
    pa_store(&d->announced, 0);
    /* PENDING and latched by us: invisible to readers, and the daemon
     * leaves it alone while we live. */
    uint64_t pending = PRES_LIVE_MAKE(nm + ttl, PRES_DS_PENDING, 0, t->index + 1);
    pa_store(&d->live, pending);
    if ((rc = link_user(p, i, &u, user, ulen)) < 0) {
        abandon(d);
        return rc;
    }
    pres__idx_dev_link_hash(m, i, h);
    if (!ev->slot)
        pres__ev_claim(m, t->index + 1, ev);
    uint64_t L = pending;
    if (!pa_cas(&d->live, &L, PRES_LIVE_MAKE(nm + ttl, PRES_DS_CONNECTED, 0, 0))) {
        /* A newer connect of the same device superseded ours while it was
         * PENDING: look again (and reconnect to the winner). */
        abandon(d);
        return -EAGAIN;
    }
    pres__count(t, PRES_C_DEV_NEW);
    supersede_older(m, t, i, id, len);
    *idx = i;
    return 0;
}

PRES_API int pres_connect(pres_t *p, const char *user_id, const char *device_id,
                          const char *gateway_id, uint32_t ttl_ms, pres_ref_t *ref)
{
    size_t ulen, len, glen;
    int rc;
    if ((rc = pres__id_check(user_id, &ulen)) < 0 ||
        (rc = pres__id_check(device_id, &len)) < 0 ||
        (rc = pres__id_check(gateway_id, &glen)) < 0 || (rc = ttl_check(ttl_ms)) < 0)
        return rc;
    pres_rs_t *t = enter_rw(p, &rc);
    if (!t)
        return rc;
    pres_map_t *m = &p->m;
    uint64_t nm = pres__mono_ms(), nw = pres__wall_of(m, nm);
    uint64_t h = pres__hash(device_id, len, m->seed);
    uint32_t idx = 0, cid = 1;
    pres_evc_t ev = { NULL, 0, 0 };     /* the CONNECT, claimed before the publish */
    int gwi = pres__idx_gw_get(p, gateway_id, glen);
    if (gwi < 0) {
        rc = gwi;
        goto out;
    }
    rc = -EAGAIN;
    for (int attempt = 0; attempt < 16 && rc == -EAGAIN; attempt++) {
        int i = pres__idx_dev_find(m, device_id, len, h);
        if (i == -EPROTO) {
            rc = i;
            break;
        }
        if (i >= 0) {
            uint32_t u = pa_load(&m->devs[i].user);
            if (u < m->user_cap &&
                pres__key_eq(&m->users[u].keylen, m->users[u].key, user_id, ulen)) {
                rc = reconnect(p, t, (uint32_t)i, (uint32_t)gwi, ttl_ms, nm, nw, &cid, &ev);
                idx = (uint32_t)i;
                if (rc == -EAGAIN)
                    pres__ev_abandon(m, &ev);
                if (rc != -EBUSY)
                    continue;
                /* Its latch is held by a stopped process: a new record
                 * supersedes it without waiting. */
            }
        }
        rc = connect_new(p, t, user_id, ulen, device_id, len, h, (uint32_t)gwi,
                         ttl_ms, nm, nw, &idx, &cid, &ev);
        /* A seq is claimed under the latch of the record it speaks of, so
         * that the feed orders a device's changes as they happened: an
         * attempt that failed gives its seq up (LOST), and the next one
         * claims under its own record. */
        if (rc == -EAGAIN)
            pres__ev_abandon(m, &ev);
    }
    if (rc == 0) {
        pres__ev_dev(m, &ev, PRES_EV_CONNECT, idx, (uint32_t)gwi, nw);
        pres__note(m, PRES_NOTE_DEV, idx);
        pres__count(t, PRES_C_CONNECTS);
        if (ref)
            *ref = make_ref(idx, pa_load(&m->devs[idx].gen), cid);
    } else {
        pres__ev_abandon(m, &ev);       /* claimed, and nothing connected */
    }
out:
    pres__gp_leave(t);
    return rc == -EAGAIN ? -EBUSY : rc;
}

/* A heartbeat of record i; ref_cid < 0 for a heartbeat by id. */
static int heartbeat_at(pres_t *p, pres_rs_t *t, uint32_t i, int64_t ref_cid, uint32_t ttl)
{
    pres_dev_t *d = &p->m.devs[i];
    uint64_t L = pa_load_acquire(&d->live);
    for (;;) {
        /* The clock after each load of the live word: a heartbeat is late
         * or not at its CAS, never by a clock read before an expiry that
         * was announced meanwhile (that must not be followed by a silent
         * extension; doc/region.md, "The change feed"). */
        uint64_t nm = pres__mono_ms();
        unsigned st = PRES_LIVE_STATE(L);
        if (st == PRES_DS_DEAD || st == PRES_DS_PENDING)
            return ref_cid >= 0 ? -ESTALE : -EAGAIN;
        unsigned k = PRES_LIVE_SEQ(L) & 1;
        if (ref_cid >= 0 && (pa_load(&d->cid[k]) & REF_CID_MASK) != (uint64_t)ref_cid)
            return -ESTALE;
        if (st != PRES_DS_CONNECTED)
            return -ENOENT;
        int late = PRES_LIVE_EXPIRY(L) <= nm;
        if (!late && pa_load(&d->ttl[k]) == ttl) {
            /* The fast path: only the expiry changes.  The CAS fails if
             * anything else moved (seq, state, latch), and we look again.
             * A latch holder announcing this connection's expiry took the
             * latch after the TTL passed by its clock, and ours, read after
             * we saw its latch, is later: we are late, not here. */
            if (pa_cas(&d->live, &L, (L & ~PRES_LIVE_EXP_MASK) | ((nm + ttl) & PRES_LIVE_EXP_MASK))) {
                pres__count(t, PRES_C_HEARTBEATS);
                return 0;
            }
            continue;            /* L is what is there now; nm is read again */
        }
        int rc = latch_take(p, t, d, &L);
        if (rc < 0)
            return rc == -EAGAIN && ref_cid >= 0 ? -ESTALE : rc;
        k = PRES_LIVE_SEQ(L) & 1;
        uint32_t cid = pa_load(&d->cid[k]);
        if (PRES_LIVE_STATE(L) != PRES_DS_CONNECTED ||
            (ref_cid >= 0 && (cid & REF_CID_MASK) != (uint64_t)ref_cid)) {
            latch_drop(t, d);
            L = pa_load_acquire(&d->live);
            continue;
        }
        pres_conn_t c;
        conn_read(d, k, &c);
        nm = pres__mono_ms();
        uint64_t nw = pres__wall_of(&p->m, nm);
        late = PRES_LIVE_EXPIRY(L) <= nm || end_announced(d, L);
        pres_evc_t ev = { NULL, 0, 0 };
        if (late) {
            /* Connected again: the old connection's end first, if nobody
             * announced it, then a CONNECT. */
            if (!end_announced(d, L))
                announce_expiry(&p->m, t, i, L, nw);
            c.connected_at = nw;
            pres__ev_claim(&p->m, t->index + 1, &ev);
        }
        conn_write(d, k ^ 1, &c, ttl, cid);
        if ((rc = latch_publish(t, d, nm + ttl, PRES_DS_CONNECTED)) < 0) {
            pres__ev_abandon(&p->m, &ev);
            return rc == -EAGAIN && ref_cid >= 0 ? -ESTALE : rc;
        }
        pres__ev_dev(&p->m, &ev, PRES_EV_CONNECT, i, c.gw, nw);
        /* A new TTL or a revival moves the expiry the daemon's timers know. */
        pres__note(&p->m, PRES_NOTE_DEV, i);
        pres__count(t, PRES_C_HEARTBEATS);
        if (late)
            pres__count(t, PRES_C_LATE_HEARTBEATS);
        return 0;
    }
}

/* An operation on the current record of a device named by id: look it up
 * and apply op, looking again while the record found is being replaced. */
typedef int (*dev_op_t)(pres_t *p, pres_rs_t *t, uint32_t i, uint32_t arg);

static inline int by_id(pres_t *p, const char *device_id, dev_op_t op, uint32_t arg)
{
    size_t len;
    int rc;
    if ((rc = pres__id_check(device_id, &len)) < 0)
        return rc;
    pres_rs_t *t = enter_rw(p, &rc);
    if (!t)
        return rc;
    uint64_t h = pres__hash(device_id, len, p->m.seed);
    rc = -EAGAIN;
    for (int tries = 0; tries < 16 && rc == -EAGAIN; tries++) {
        int i = pres__idx_dev_find(&p->m, device_id, len, h);
        rc = i < 0 ? i : op(p, t, (uint32_t)i, arg);
    }
    pres__gp_leave(t);
    return rc == -EAGAIN ? -EBUSY : rc;
}

static int heartbeat_op(pres_t *p, pres_rs_t *t, uint32_t i, uint32_t ttl)
{
    return heartbeat_at(p, t, i, -1, ttl);
}

PRES_API int pres_heartbeat(pres_t *p, const char *device_id, uint32_t ttl_ms)
{
    int rc = ttl_check(ttl_ms);
    return rc < 0 ? rc : by_id(p, device_id, heartbeat_op, ttl_ms);
}

static int ref_decode(const pres_t *p, pres_ref_t ref, uint32_t *idx, int64_t *cid)
{
    uint64_t i1 = ref & ((UINT64_C(1) << REF_IDX_BITS) - 1);
    if (i1 == 0 || i1 > p->m.dev_cap)
        return -ESTALE;
    uint32_t gen = (uint32_t)(ref >> REF_IDX_BITS) & REF_GEN_MASK;
    *idx = (uint32_t)(i1 - 1);
    if ((pa_load(&p->m.devs[*idx].gen) & REF_GEN_MASK) != gen)
        return -ESTALE;
    *cid = (int64_t)(ref >> (REF_IDX_BITS + REF_GEN_BITS));
    return 0;
}

PRES_API int pres_heartbeat_ref(pres_t *p, pres_ref_t ref, uint32_t ttl_ms)
{
    int rc;
    uint32_t i;
    int64_t cid;
    if ((rc = ttl_check(ttl_ms)) < 0)
        return rc;
    pres_rs_t *t = enter_rw(p, &rc);
    if (!t)
        return rc;
    /* Decoded inside the read section: the record cannot be freed and
     * reused between the generation check and the CAS. */
    if ((rc = ref_decode(p, ref, &i, &cid)) == 0)
        rc = heartbeat_at(p, t, i, cid, ttl_ms);
    pres__gp_leave(t);
    return rc;
}

static int disconnect_at(pres_t *p, pres_rs_t *t, uint32_t i, int64_t ref_cid)
{
    pres_dev_t *d = &p->m.devs[i];
    uint64_t L;
    int rc = latch_take(p, t, d, &L);
    if (rc < 0)
        return rc == -EAGAIN && ref_cid >= 0 ? -ESTALE : rc;
    unsigned k = PRES_LIVE_SEQ(L) & 1;
    uint32_t cid = pa_load(&d->cid[k]);
    if (ref_cid >= 0 && (cid & REF_CID_MASK) != (uint64_t)ref_cid) {
        latch_drop(t, d);
        return -ESTALE;
    }
    if (PRES_LIVE_STATE(L) == PRES_DS_DISCONNECTED) {
        latch_drop(t, d);
        return 0;
    }
    uint64_t nm = pres__mono_ms(), nw = pres__wall_of(&p->m, nm);
    uint64_t exp = PRES_LIVE_EXPIRY(L);
    uint32_t ttl = pa_load(&d->ttl[k]);
    int expired = exp <= nm || end_announced(d, L);
    pres_conn_t c;
    conn_read(d, k, &c);
    pres_evc_t ev = { NULL, 0, 0 };
    if (expired && !end_announced(d, L)) {
        announce_expiry(&p->m, t, i, L, nw);
    } else if (!expired) {
        /* A clean end: typing stops with it, then the DISCONNECT. */
        pres__ev_typing_end(&p->m, t->index + 1, i, c.gw, nw);
        pres__ev_claim(&p->m, t->index + 1, &ev);
        pa_store(&d->announced, PRES_ANN(cid, exp));
    }
    /* An expired connection ended at its last sign of life, and stopped
     * being connected at its expiry (the user's offline grace runs from
     * there). */
    c.ended = expired ? pres__wall_of(&p->m, exp > ttl ? exp - ttl : 0) : nw;
    if (expired)
        c.flags |= PRES_CONN_LAPSED;
    conn_write(d, k ^ 1, &c, ttl, cid);
    if ((rc = latch_publish(t, d, exp, PRES_DS_DISCONNECTED)) < 0) {
        pres__ev_abandon(&p->m, &ev);   /* superseded meanwhile: not ended */
        return rc == -EAGAIN && ref_cid >= 0 ? -ESTALE : rc;
    }
    pres__ev_dev(&p->m, &ev, PRES_EV_DISCONNECT, i, c.gw, nw);
    pres__note(&p->m, PRES_NOTE_DEV, i);
    if (!expired)
        pres__count(t, PRES_C_DISCONNECTS);
    return 0;
}

static int disconnect_op(pres_t *p, pres_rs_t *t, uint32_t i, uint32_t unused)
{
    (void)unused;
    return disconnect_at(p, t, i, -1);
}

PRES_API int pres_disconnect(pres_t *p, const char *device_id)
{
    return by_id(p, device_id, disconnect_op, 0);
}

PRES_API int pres_disconnect_ref(pres_t *p, pres_ref_t ref)
{
    int rc;
    uint32_t i;
    int64_t cid;
    pres_rs_t *t = enter_rw(p, &rc);
    if (!t)
        return rc;
    if ((rc = ref_decode(p, ref, &i, &cid)) == 0)
        rc = disconnect_at(p, t, i, cid);
    pres__gp_leave(t);
    return rc;
}

void pres__dev_interact(pres_map_t *m, uint32_t i, uint64_t nm)
{
    /* Only a change of the device's active state concerns the daemon
     * (status events, the mirror): an interaction on an active device is
     * one store. */
    uint64_t w = pa_exchange(&m->devs[i].activity, nm);
    uint64_t idle_after = pa_load(&m->hdr->idle_after_ms);
    if ((w & PRES_ACT_IDLE) || (idle_after && nm >= PRES_ACT_TIME(w) + idle_after))
        pres__note(m, PRES_NOTE_DEV, i);
}

PRES_API int pres_set_activity(pres_t *p, const char *device_id, enum pres_activity a)
{
    size_t len;
    int rc;
    if ((rc = pres__id_check(device_id, &len)) < 0)
        return rc;
    if (a != PRES_ACTIVE && a != PRES_IDLE)
        return -EINVAL;
    pres_rs_t *t = enter_rw(p, &rc);
    if (!t)
        return rc;
    uint64_t h = pres__hash(device_id, len, p->m.seed);
    int i = pres__idx_dev_find(&p->m, device_id, len, h);
    rc = i < 0 ? i : 0;
    if (i >= 0) {
        pres_dev_t *d = &p->m.devs[i];
        uint64_t nm = pres__mono_ms();
        uint64_t L = pa_load_acquire(&d->live);
        if (PRES_LIVE_STATE(L) != PRES_DS_CONNECTED || PRES_LIVE_EXPIRY(L) <= nm) {
            rc = -ENOENT;
        } else if (a == PRES_ACTIVE) {
            pres__dev_interact(&p->m, (uint32_t)i, nm);
        } else {
            uint64_t w = pa_load(&d->activity);
            while (!pa_cas(&d->activity, &w, w | PRES_ACT_IDLE))
                ;
            if (!(w & PRES_ACT_IDLE))
                pres__note(&p->m, PRES_NOTE_DEV, (uint32_t)i);
        }
    }
    pres__gp_leave(t);
    return rc;
}

PRES_API int pres_device(pres_t *p, const char *device_id, pres_device_info_t *out)
{
    size_t len;
    int rc;
    if (!p || !out)
        return -EINVAL;
    if ((rc = pres__id_check(device_id, &len)) < 0)
        return rc;
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return -ENOSPC;
    uint64_t h = pres__hash(device_id, len, p->m.seed);
    uint32_t i;
    pres_snap_t s;
    if ((rc = dev_read(&p->m, device_id, len, h, &i, &s)) == 0)
    {
        uint64_t nm = pres__mono_ms();
        pres__dev_info(&p->m, i, &s, nm, pres__wall_of(&p->m, nm), out);
    }
    pres__gp_leave(t);
    return rc;
}

/* Route: walk the user's device list (bounded; ends in the marker naming the
 * user) and copy out the connected ones, each device once. */
#define ROUTE_SEEN_MAX 256

static int route_walk(const pres_map_t *m, uint32_t u, pres_device_info_t *out,
                      size_t cap, size_t *n)
{
    uint32_t seen[ROUTE_SEEN_MAX];
    size_t nseen = 0, count = 0;
    uint64_t nm = pres__mono_ms(), nw = pres__wall_of(m, nm);
    uint64_t l = pa_load_acquire(&m->users[u].dhead);
    if (PRES_LINK_NO_LIST(l))
        l = PRES_LINK_NULLS(u);
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l); steps++) {
        uint32_t i = PRES_LINK_IDX(l);
        if (i >= m->dev_cap || steps > m->dev_cap)
            return -EPROTO;
        const pres_dev_t *d = &m->devs[i];
        if (pa_load(&d->gen) != PRES_LINK_GEN(l))
            return -EAGAIN;
        pres_snap_t s;
        if (pa_load(&d->user) == u && pres__dev_snap(m, i, &s) == 0 &&
            PRES_LIVE_STATE(s.live) == PRES_DS_CONNECTED && PRES_LIVE_EXPIRY(s.live) > nm) {
            int dup = 0;
            for (size_t k = 0; k < nseen && !dup; k++)
                dup = pres__key_eq(&m->devs[seen[k]].keylen, m->devs[seen[k]].key,
                                   d->key, d->keylen);
            if (!dup) {
                if (nseen < ROUTE_SEEN_MAX)
                    seen[nseen++] = i;
                if (count < cap)
                    pres__dev_info(m, i, &s, nm, nw, &out[count]);
                count++;
            }
        }
        l = pa_load_acquire(&d->unext);
    }
    if (PRES_LINK_CHAIN(l) != u)
        return -EAGAIN;
    *n = count;
    return 0;
}

PRES_API int pres_route(pres_t *p, const char *user_id, pres_device_info_t *out,
                        size_t cap, size_t *n)
{
    size_t len;
    int rc;
    if (!p || !n || (cap && !out))
        return -EINVAL;
    if ((rc = pres__id_check(user_id, &len)) < 0)
        return rc;
    *n = 0;
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return -ENOSPC;
    uint64_t h = pres__hash(user_id, len, p->m.seed);
    rc = -EAGAIN;
    for (int tries = 0; tries < 8 && rc == -EAGAIN; tries++) {
        int u = pres__idx_user_find(&p->m, user_id, len, h);
        if (u == -ENOENT)
            rc = 0;
        else
            rc = u < 0 ? u : route_walk(&p->m, (uint32_t)u, out, cap, n);
    }
    pres__gp_leave(t);
    return rc == -EAGAIN ? -EPROTO : rc;
}

PRES_API int pres_report_stale(pres_t *p, const char *device_id)
{
    size_t len;
    int rc;
    if (!p)
        return -EINVAL;
    if ((rc = pres__id_check(device_id, &len)) < 0)
        return rc;
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return -ENOSPC;
    int i = pres__idx_dev_find(&p->m, device_id, len, pres__hash(device_id, len, p->m.seed));
    rc = i < 0 ? i : 0;
    if (rc == 0)
        pres__count(t, PRES_C_STALE_REPORTS);
    pres__gp_leave(t);
    return rc;
}
