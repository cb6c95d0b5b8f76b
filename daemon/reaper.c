/*
 * reaper.c - the daemon's passes: the one reclaimer of the store.
 *
 * Each tick (every 20 ms):
 *   1. clients: find the dead (liveness.c) and repair what they held;
 *   2. gateways: end the connections of gateways whose process died or
 *      closed its handle;
 *   the change feed's repairs (feed.c) and the timers (timers.c): expiry,
 *   typing and status events, the connected count;
 *   3. the device index, a chunk of buckets a tick: repair latches of dead
 *      writers, evict devices offline longer than retain_ms, unlink DEAD
 *      records from their chain (one walk per chain, never one walk per
 *      record), count what is held;
 *   4. the user index, a chunk of buckets a tick: unlink DEAD devices from
 *      each user's list, retire users left without devices or policy;
 *   5. a record-table sweep now and then for what no chain reaches
 *      (records a client abandoned half-linked);
 *   6. privacy exception entries and typing records (privacy.c, typing.c);
 *   7. grace periods: advance the epoch, free what every reader passed;
 *   8. rings: take back records handed out and never claimed by a client
 *      that died, and offer free records again.
 *
 * A device record is retired once it is out of both its hash chain and its
 * user's list.  Nothing here waits for a client.  The daemon writes live
 * words only by CAS (clients race it), interior links by release stores
 * (only the daemon writes them), bucket and list heads by CAS.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "atomics.h"
#include "clock.h"
#include "daemon.h"
#include "mirror.h"
#include "store.h"

#define LIVE_LATCH_MASK   (~(uint64_t)0 << 50)
#define LIVE_STATE_MASK   (UINT64_C(3) << 40)
/* Buckets a pass visits a tick: a small index every tick; a large one in
 * PASS_TICKS ticks (a million devices: 1,049 buckets a tick, a full pass
 * every 20 s), or faster when --retain-ms asks for evictions sooner (a
 * pass every quarter of it, at most one a second), so the daemon's work
 * per second stays proportional to the store, not to the tick rate.  What
 * needs promptness is done elsewhere:
 * expiries, status changes and the connected count by the timers
 * (timers.c), a dead writer's latches by its repair (client_gone); the
 * passes evict, unlink what was superseded, retire empty users and
 * correct the counts, which can wait seconds.  A pass of a million
 * devices touches two million records at random (the index and the users'
 * lists), about half a second of a core: once a second that was most of
 * the daemon's CPU at steady state. */
#define SMALL_INDEX       65536u
#define PASS_TICKS        1000u
#define PASS_TICKS_MIN    (1000u / PD_TICK_MS)
/* Checks that only repair after crashes or catch what an event missed run
 * every this many ticks (1 s). */
#define SLOW_TICKS        50u
/* The record-table sweep, which finds only what crashed clients left
 * half-done (and runs at once after a death), runs every this many ticks
 * for a large store (30 s). */
#define SWEEP_TICKS       1500u

#define UNL_HASH 1u
#define UNL_USER 2u

/* ---- small helpers ------------------------------------------------------- */

static void stack_push(pd_stack_t *s, uint32_t v)
{
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 1024;
        uint32_t *a = realloc(s->v, nc * sizeof *a);
        if (!a) {
            pd_log(LOG_ERR, "out of memory: record %u not pooled", v);
            return;
        }
        s->v = a;
        s->cap = nc;
    }
    s->v[s->n++] = v;
}

void pd_retire(pd_t *d, uint32_t idx, int kind)
{
    if (d->ret_n == d->ret_cap) {
        size_t nc = d->ret_cap ? d->ret_cap * 2 : 1024;
        pd_retired_t *a = realloc(d->ret, nc * sizeof *a);
        if (!a) {
            pd_log(LOG_ERR, "out of memory: record %u not retired", idx);
            return;
        }
        d->ret = a;
        d->ret_cap = nc;
    }
    d->ret[d->ret_n++] = (pd_retired_t){ .idx = idx, .kind = (uint32_t)kind, .epoch = 0 };
}

void pd_pool_back(pd_t *d, int kind, uint32_t i)
{
    pa_store(pres__alloc_word(&d->m, kind, i), PRES_ALLOC_POOLED);
    stack_push(&d->pool[kind], i);
}

uint64_t pd_in_use(const pd_t *d, int kind)
{
    const pres_hdr_t *h = d->m.hdr;
    /* prod is ours and cons never passes it: no underflow. */
    uint64_t idle = pa_load(&h->prod[kind]) - pa_load(&h->ring[kind].cons) + d->pool[kind].n;
    return idle >= d->m.rcap[kind] ? 0 : d->m.rcap[kind] - idle;
}

static const char *const kind_name[PRES_RK_COUNT] = {
    "device", "user", "exception", "typing",
};

static int keylen_ok(uint8_t n)
{
    return n >= 1 && n <= PRES_ID_MAX;
}

/* Is the thread whose latch value this is still there?  (Untracked new
 * clients count as alive: death is only ever the kernel's verdict.) */
int pd_latch_live(const pd_t *d, unsigned latch)
{
    if (latch == PRES_DAEMON_LATCH)
        return 0;                /* a previous daemon's, killed mid-write */
    if (latch == 0 || latch > PRES_READER_SLOTS)
        return 0;
    uint64_t o = pa_load_acquire(&d->m.rslots[latch - 1].owner);
    if (o == 0 || o == PRES_RS_SWEEPING)
        return 0;
    return pd_token_live(d, o & ~UINT64_C(0xffffffff));
}

/* ---- unlinking by walking (rare paths and list heads) ---------------------
 * Remove record i from the chain at *head.  The head is also written by
 * clients inserting, hence the CAS; interior links only by us.  The removed
 * record keeps its own link: a reader standing on it walks on.  Returns 1
 * unlinked, 0 not in the chain, -1 damaged or too contended. */
static int unlink_from(uint64_t *head, uint32_t i, uint32_t gen, uint32_t cap,
                       uint64_t *(*next_of)(pres_map_t *, uint32_t), pres_map_t *m)
{
    uint64_t want = PRES_LINK(i, gen);
    for (int tries = 0; tries < 64; tries++) {
        uint64_t *prev = head;
        uint64_t l = pa_load_acquire(prev);
        uint32_t steps = 0;
        while (!PRES_LINK_IS_NULLS(l) && l != want) {
            uint32_t j = PRES_LINK_IDX(l);
            if (j >= cap || ++steps > cap)
                return -1;
            prev = next_of(m, j);
            l = pa_load_acquire(prev);
        }
        if (l != want)
            return 0;
        uint64_t nxt = pa_load_acquire(next_of(m, i));
        if (prev == head) {
            if (pa_cas(head, &l, nxt))
                return 1;
            continue;                /* a client inserted meanwhile */
        }
        pa_store_release(prev, nxt);
        return 1;
    }
    return -1;
}

static uint64_t *dev_next(pres_map_t *m, uint32_t j) { return &m->devs[j].next; }
static uint64_t *dev_unext(pres_map_t *m, uint32_t j) { return &m->devs[j].unext; }
static uint64_t *user_next(pres_map_t *m, uint32_t j) { return &m->users[j].next; }

/* A device record out of both indexes waits for a grace period. */
static void dev_maybe_retire(pd_t *d, uint32_t i, unsigned bit)
{
    d->unl[i] |= (uint8_t)bit;
    if (d->unl[i] == (UNL_HASH | UNL_USER)) {
        d->unl[i] = 0;
        pa_store(&d->m.devs[i].alloc, PRES_ALLOC_RETIRED);
        pd_retire(d, i, PRES_RK_DEV);
    }
}

/* ---- the daemon's own connection changes (gateway deaths) ----------------- */

/* End record i's connection on behalf of its dead gateway, if it is a
 * connection made before incarnation `inc`.  0 done (or nothing to do),
 * -EBUSY if a live writer holds its latch now. */
static int dev_end_by_death(pd_t *d, uint32_t i, uint32_t gw, uint32_t inc, uint64_t nm)
{
    pres_map_t *m = &d->m;
    pres_dev_t *r = &m->devs[i];
    uint64_t L = pa_load_acquire(&r->live);
    for (;;) {
        if (PRES_LIVE_STATE(L) != PRES_DS_CONNECTED)
            return 0;
        unsigned k = PRES_LIVE_SEQ(L) & 1;
        if (pa_load(&r->conn[k].gw) != gw ||
            PRES_CONN_INC(pa_load(&r->conn[k].flags)) == (inc & PRES_CONN_INC_MASK))
            return 0;
        unsigned holder = PRES_LIVE_LATCH(L);
        if (holder && pd_latch_live(d, holder))
            return -EBUSY;
        uint64_t want = (L & ~LIVE_LATCH_MASK) | ((uint64_t)PRES_DAEMON_LATCH << 50);
        if (pa_cas(&r->live, &L, want)) {
            L = want;
            break;
        }
    }
    pa_fence_release();
    unsigned k = PRES_LIVE_SEQ(L) & 1;
    uint64_t exp = PRES_LIVE_EXPIRY(L);
    uint32_t ttl = pa_load(&r->ttl[k]);
    int was_connected = exp > nm;
    /* The change feed: an EXPIRE, unless the end of this connection was
     * announced (its TTL passed and that was said); claimed first, so that
     * a daemon killed from here on leaves a LOST event or the end still to
     * announce (lib/device.c, "the change feed"). */
    uint32_t cid = pa_load(&r->cid[k]);
    uint64_t nw = pres__wall_of(m, nm);
    pres_evc_t ev = { NULL, 0, 0 };
    if (pa_load(&r->announced) != PRES_ANN(cid, exp)) {
        pres__ev_typing_end(m, PRES_DAEMON_LATCH, i, gw, nw);
        pres__ev_claim(m, PRES_DAEMON_LATCH, &ev);
        pa_store(&r->announced, PRES_ANN(cid, exp));
    }
    /* Last seen: the moment the death was detected, or, for a connection
     * whose TTL had already passed, its last sign of life. */
    uint64_t ended = pres__wall_of(m, was_connected ? nm : (exp > ttl ? exp - ttl : 0));
    pa_store(&r->conn[k ^ 1].gw, pa_load(&r->conn[k].gw));
    pa_store(&r->conn[k ^ 1].flags, pa_load(&r->conn[k].flags) | PRES_CONN_DIED |
                                        (was_connected ? 0 : PRES_CONN_LAPSED));
    pa_store(&r->conn[k ^ 1].connected_at, pa_load(&r->conn[k].connected_at));
    pa_store(&r->conn[k ^ 1].ended, ended);
    pa_store(&r->ttl[k ^ 1], ttl);
    pa_store(&r->cid[k ^ 1], pa_load(&r->cid[k]));
    uint64_t newexp = was_connected ? nm : exp;
    for (;;) {
        if (PRES_LIVE_STATE(L) == PRES_DS_DEAD) {
            /* Superseded meanwhile: a CONNECT says it all. */
            pa_cas(&r->live, &L, L & ~LIVE_LATCH_MASK);
            pres__ev_abandon(m, &ev);
            return 0;
        }
        uint64_t want = PRES_LIVE_MAKE(newexp, PRES_DS_DISCONNECTED, PRES_LIVE_SEQ(L) + 1, 0);
        if (pa_cas(&r->live, &L, want))
            break;
    }
    if (ev.slot) {
        pa_add_relaxed(&m->hdr->dc.expirations, 1);
        pres__ev_dev(m, &ev, PRES_EV_EXPIRE, i, gw, nw);
    }
    pres__note(m, PRES_NOTE_DEV, i);
    return 0;
}

/* End, in one scan of the records, the connections of every dying gateway
 * made before its death.  Gateways whose records a live writer holds
 * latched stay pending for another try. */
static void gateway_deaths_run(pd_t *d)
{
    pres_map_t *m = &d->m;
    uint64_t nm = pres__mono_ms();
    uint8_t *busy = calloc(m->gw_cap, 1);
    if (!busy)
        return;
    for (uint32_t i = 0; i < m->dev_cap; i++) {
        pres_dev_t *r = &m->devs[i];
        uint64_t L = pa_load(&r->live);
        if (PRES_LIVE_STATE(L) != PRES_DS_CONNECTED)
            continue;
        uint32_t g = pa_load(&r->conn[PRES_LIVE_SEQ(L) & 1].gw);
        if (g >= m->gw_cap || !d->gw_pending[g])
            continue;
        if (dev_end_by_death(d, i, g, d->gw_pending[g] & 0x7fffffffu, nm) < 0)
            busy[g] = 1;
    }
    d->gw_dying = 0;
    for (uint32_t g = 0; g < m->gw_cap; g++) {
        if (!d->gw_pending[g])
            continue;
        if (busy[g]) {
            d->gw_dying = 1;
            continue;
        }
        const pres_gw_t *e = &m->gws[g];
        pd_log(LOG_INFO, "gateway %.*s: its connections are ended",
               keylen_ok(e->keylen) ? (int)e->keylen : 0, e->key);
        d->gw_pending[g] = 0;
        uint64_t exp = PRES_GW_DYING;
        pa_cas(&m->gws[g].owner, &exp, 0);
    }
    free(busy);
}

static void gateways_pass(pd_t *d)
{
    pres_map_t *m = &d->m;
    int any = 0;
    for (uint32_t g = 0; g < m->gw_cap; g++) {
        pres_gw_t *e = &m->gws[g];
        uint64_t s = pa_load_acquire(&e->state);
        if ((s & 0xff) == PRES_GW_EMPTY)
            continue;
        if ((s & 0xff) == PRES_GW_FILLING) {
            unsigned filler = (unsigned)((s >> 8) & 0xffffffu);
            if (!filler || filler > PRES_CLIENTS || !pd_client_live(d, filler - 1)) {
                e->keylen = 0;       /* half-written: a tombstone no key matches */
                pa_store_release(&e->state, PRES_GW_READY);
            }
            continue;
        }
        uint64_t owner = pa_load_acquire(&e->owner);
        if (owner && owner != PRES_GW_DYING &&
            (owner == PRES_GW_CLOSED || !pd_token_live(d, owner))) {
            /* The incarnation goes up first and the one being ended is
             * recorded in the region, then the owner becomes DYING: a
             * daemon killed anywhere here, and restarted, finishes the job
             * with the right incarnation.  A process attaching the id again
             * replaces the owner; its connections carry the new
             * incarnation and are left alone. */
            uint64_t inc = pa_fetch_add(&e->died, 1) + 1;
            pa_store(&e->ending, inc);
            if (pa_cas(&e->owner, &owner, PRES_GW_DYING)) {
                pa_add_relaxed(&m->hdr->dc.gateway_deaths, 1);
                d->gw_pending[g] = (uint32_t)inc | 0x80000000u;
            }
        } else if (owner == PRES_GW_DYING && !d->gw_pending[g]) {
            d->gw_pending[g] = (uint32_t)pa_load(&e->ending) | 0x80000000u;
        }
        any |= d->gw_pending[g] != 0;
    }
    if (any)
        gateway_deaths_run(d);
}

/* ---- a client that is gone ---------------------------------------------------- */

/* Clear a reader slot: first claim it for ourselves (no client claims a
 * SWEEPING slot), so a slot freed and claimed again since we looked is
 * never wiped under its new reader. */
static int rslot_sweep(pd_t *d, uint32_t i, uint64_t o, int keep)
{
    pres_map_t *m = &d->m;
    pres_rslot_t *s = &m->rslots[i];
    if (!pa_cas(&s->owner, &o, PRES_RS_SWEEPING))
        return 0;
    pres__counters_fold(m, s->counters);
    pa_store(&s->epoch, 0);
    /* keep: stay SWEEPING (unclaimable) until the caller has dropped the
     * latches that name this slot, so no new thread writes under the same
     * latch value meanwhile. */
    if (!keep)
        pa_store_release(&s->owner, 0);
    return 1;
}

static int gone_has(const pd_gone_t *g, size_t n, uint32_t client, uint64_t token)
{
    for (size_t k = 0; k < n; k++)
        if (g[k].client == client || g[k].token == token)
            return 1;
    return 0;
}

/* Records the dead took from a ring and never claimed: positions up to the
 * consumer cursor, and the slot at the cursor itself (a taker killed
 * between its two CASes). */
static void dead_ring_records(pd_t *d, const pd_gone_t *g, size_t n, int kind)
{
    pres_map_t *m = &d->m;
    uint64_t *ring = m->ring[kind];
    uint64_t size = m->rmask[kind] + 1;
    unsigned shift = m->rshift[kind];
    uint64_t *cons = &m->hdr->ring[kind].cons;
    uint64_t prod = pa_load(&m->hdr->prod[kind]);
    uint64_t *offered = d->offered[kind];
    uint32_t cap = m->rcap[kind];
    uint64_t c = pa_load_acquire(cons);
    uint64_t from = d->rc[kind];
    if (c - from > size)
        from = c - size;
    for (uint64_t p = from; p <= c && p < prod; p++) {
        uint64_t s = pa_load_acquire(&ring[p & (size - 1)]);
        uint32_t i = PRES_RING_IDX(s), o = PRES_RING_OWNER1(s);
        if (PRES_RING_LAP(s) != ((p >> shift) & 0xffffffu) || !o || i >= cap ||
            offered[i] != p || !gone_has(g, n, o - 1, UINT64_MAX))
            continue;
        if (pa_load(pres__alloc_word(m, kind, i)) != PRES_ALLOC_FREE)
            continue;
        pd_pool_back(d, kind, i);
        if (p == c) {
            uint64_t exp = c;
            pa_cas(cons, &exp, c + 1);       /* as any consumer would */
        }
    }
    for (size_t k = 0; k < d->claims_n; k++) {
        pd_claim_t *cl = &d->claims[k];
        if ((int)cl->kind == kind && gone_has(g, n, cl->client, UINT64_MAX) &&
            d->offered[kind][cl->idx] == cl->pos &&
            pa_load(pres__alloc_word(m, kind, cl->idx)) == PRES_ALLOC_FREE)
            pd_pool_back(d, kind, cl->idx);
    }
}

/* Clients that closed their handle (dead == 0) or died (dead == 1).  A
 * clean close left nothing behind but what its token names; a death may
 * have left anything its client index names, repaired here, before the
 * index is given to another process. */
static void client_gone(pd_t *d, const pd_gone_t *g, size_t n, int dead)
{
    pres_map_t *m = &d->m;
    uint8_t slots[PRES_READER_SLOTS];
    d->gw_check = 1;
    memset(slots, 0, sizeof slots);
    /* Their reader slots first: grace periods stop waiting for them now,
     * before the longer repairs below. */
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++) {
        uint64_t o = pa_load_acquire(&m->rslots[i].owner);
        if (o && o != PRES_RS_SWEEPING &&
            gone_has(g, n, UINT32_MAX, o & ~UINT64_C(0xffffffff)))
            slots[i] = (uint8_t)rslot_sweep(d, i, o, dead);
    }
    if (!dead)
        return;
    /* One scan of the records for all of them: latches their threads held
     * (their slots are swept, so no live thread holds those values now),
     * and records they were connecting. */
    for (uint32_t i = 0; i < m->dev_cap; i++) {
        pres_dev_t *r = &m->devs[i];
        uint64_t L = pa_load_acquire(&r->live);
        for (;;) {
            unsigned holder = PRES_LIVE_LATCH(L), st = PRES_LIVE_STATE(L);
            int mine = holder && holder <= PRES_READER_SLOTS && slots[holder - 1];
            int orphan = st == PRES_DS_PENDING && holder == 0 &&
                         gone_has(g, n, UINT32_MAX, pa_load(&r->alloc));
            if (!mine && !orphan)
                break;
            uint64_t want = L & ~LIVE_LATCH_MASK;
            if (st == PRES_DS_PENDING)
                want = (want & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40);
            if (pa_cas(&r->live, &L, want))
                break;
        }
    }
    /* Gateway entries they left half-filled. */
    for (uint32_t e = 0; e < m->gw_cap; e++) {
        pres_gw_t *gw = &m->gws[e];
        uint64_t s = pa_load_acquire(&gw->state);
        uint32_t filler = (uint32_t)((s >> 8) & 0xffffffu);
        if ((s & 0xff) == PRES_GW_FILLING && filler && gone_has(g, n, filler - 1, UINT64_MAX)) {
            gw->keylen = 0;          /* a tombstone no key matches */
            pa_store_release(&gw->state, PRES_GW_READY);
        }
    }
    /* Their claims in the change feed, while their latch values name
     * nobody else. */
    pd_feed_gone(d, slots);
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++)
        if (slots[i])
            pa_store_release(&m->rslots[i].owner, 0);
    for (int k = 0; k < PRES_RK_COUNT; k++)
        dead_ring_records(d, g, n, k);
    d->sweep_soon = 1;
    pd_privacy_deaths(d);
    pd_typing_deaths(d);
    /* A writer killed between a change and its note leaves the timers
     * unaware of it: they look at every record again. */
    d->resync |= PD_RESYNC_ALL;
}

/* Reader slots whose client slot was freed or reused without them being
 * released (a daemon killed in the middle of a sweep). */
static void readers_sweep(pd_t *d)
{
    pres_map_t *m = &d->m;
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++) {
        uint64_t o = pa_load_acquire(&m->rslots[i].owner);
        if (!o)
            continue;
        if (o == PRES_RS_SWEEPING) {
            /* A previous daemon was killed while sweeping it. */
            pa_store(&m->rslots[i].epoch, 0);
            pa_cas(&m->rslots[i].owner, &o, 0);
            continue;
        }
        uint32_t cl = PRES_TOKEN_CLIENT(o);
        const pres_client_t *c = cl < PRES_CLIENTS ? &m->clients[cl] : NULL;
        if (c && pa_load(&c->pid) != 0 && (pa_load(&c->gen) & 0xffffu) == ((o >> 32) & 0xffffu))
            continue;
        rslot_sweep(d, i, o, 0);
    }
}

/* ---- the device index pass -------------------------------------------------- */

/* Look at one linked device record: repair, evict, count.  Returns its
 * state afterwards (DEAD: unlink it). */
static unsigned dev_examine(pd_t *d, uint32_t i, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    pres_dev_t *r = &m->devs[i];
    uint64_t L = pa_load_acquire(&r->live);
    unsigned st = PRES_LIVE_STATE(L), holder = PRES_LIVE_LATCH(L);

    /* A latch whose holder is gone: drop it (the idle copy it was writing
     * is never read).  A PENDING record of a gone writer was never
     * published: it goes. */
    if (holder && !pd_latch_live(d, holder)) {
        uint64_t want = L & ~LIVE_LATCH_MASK;
        if (st == PRES_DS_PENDING)
            want = (want & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40);
        if (!pa_cas(&r->live, &L, want))
            return PRES_LIVE_STATE(L) == PRES_DS_DEAD ? PRES_DS_DEAD : PRES_DS_PENDING;
        L = want;
        st = PRES_LIVE_STATE(L);
        holder = 0;
    }
    if (st == PRES_DS_PENDING && holder == 0 && !pd_token_live(d, pa_load(&r->alloc))) {
        uint64_t want = (L & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40);
        if (pa_cas(&r->live, &L, want))
            return PRES_DS_DEAD;
    }
    if (st == PRES_DS_PENDING || st == PRES_DS_DEAD)
        return st;

    unsigned k = PRES_LIVE_SEQ(L) & 1;
    uint64_t exp = PRES_LIVE_EXPIRY(L);
    if (holder == 0) {
        int evict;
        if (st == PRES_DS_DISCONNECTED) {
            uint64_t ended = pa_load(&r->conn[k].ended);
            evict = nw > ended && nw - ended > d->cfg.retain_ms;
        } else {
            evict = nm > exp && nm - exp > d->cfg.retain_ms;
        }
        /* The CAS fails if a client refreshed the record meanwhile.  The
         * user record keeps the latest last seen of its evicted devices. */
        uint64_t seen = st == PRES_DS_DISCONNECTED
                            ? pa_load(&r->conn[k].ended)
                            : pres__wall_of(m, exp > pa_load(&r->ttl[k]) ? exp - pa_load(&r->ttl[k]) : 0);
        /* Only once LMDB holds its final state: it is answered from there
         * from now on. */
        /* The user's last seen is raised first (a max, harmless if the
         * eviction then fails): a daemon killed between the two never
         * leaves the user without this device's last seen. */
        uint32_t u = pa_load(&r->user);
        if (evict && u < m->user_cap && pd_mirror_may_evict(d, i, nm)) {
            uint64_t cur = pa_load(&m->users[u].last_seen);
            while (cur < seen && !pa_cas(&m->users[u].last_seen, &cur, seen))
                ;
        }
        if (evict && pd_mirror_may_evict(d, i, nm) &&
            pa_cas(&r->live, &L, (L & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40))) {
            if (u < m->user_cap)
                pd_mirror_user(d, u);
            pa_add_relaxed(&m->hdr->dc.evictions, 1);
            pa_add_relaxed(&m->hdr->dc.devices_gone, 1);
            pd_timers_dev_gone(d, i);
            return PRES_DS_DEAD;
        }
    }
    /* Connected devices and expirations are counted by the timers. */
    d->pass_devices++;
    /* An interaction on a device that was already active writes no note:
     * the mirror learns its last activity here, a pass at a time. */
    if (st == PRES_DS_CONNECTED && exp > nm)
        pd_mirror_active(d, i, nm);
    return st;
}

static uint32_t dev_gen(pres_map_t *m, uint32_t j) { return pa_load(&m->devs[j].gen); }
static uint32_t user_gen(pres_map_t *m, uint32_t j) { return pa_load(&m->users[j].gen); }

/* Walk a chain once, unlinking the records `remove` picks: a head by CAS
 * (clients insert there), an interior link by a release store (only the
 * daemon writes those).  A removed record keeps its own link, so a reader
 * standing on it walks on.  One walk per chain however many records go.
 * Returns the records kept, or -1 when the chain is damaged or an unlink
 * at the head did not go through (the next pass tries again). */
long pd_chain_sweep(pd_t *d, const pd_chain_t *c)
{
    pres_map_t *m = &d->m;
    uint64_t *prev = c->head;
    uint64_t l = pa_load_acquire(prev);
    long kept = 0;
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l); ) {
        uint32_t i = PRES_LINK_IDX(l);
        if (i >= c->cap || ++steps > c->cap || c->gen_of(m, i) != PRES_LINK_GEN(l))
            return -1;
        uint64_t nxt = pa_load_acquire(c->next_of(m, i));
        if (!c->remove(d, i, c->ctx)) {
            kept++;
            prev = c->next_of(m, i);
            l = nxt;
            continue;
        }
        if (prev != c->head) {
            pa_store_release(prev, nxt);
            c->removed(d, i, c->ctx);
            l = nxt;
            continue;
        }
        if (unlink_from(c->head, i, PRES_LINK_GEN(l), c->cap, c->next_of, m) != 1)
            return -1;
        c->removed(d, i, c->ctx);
        /* Nothing was kept before the head; it may have moved: walk on from
         * what it is now. */
        l = pa_load_acquire(c->head);
        steps = 0;
    }
    return kept;
}

typedef struct {
    uint64_t nm, nw;
} pd_now_t;

static int dev_hash_remove(pd_t *d, uint32_t i, void *ctx)
{
    const pd_now_t *t = ctx;
    return dev_examine(d, i, t->nm, t->nw) == PRES_DS_DEAD;
}

static void dev_hash_removed(pd_t *d, uint32_t i, void *ctx)
{
    (void)ctx;
    dev_maybe_retire(d, i, UNL_HASH);
}

static int dev_list_remove(pd_t *d, uint32_t i, void *ctx)
{
    (void)ctx;
    return PRES_LIVE_STATE(pa_load_acquire(&d->m.devs[i].live)) == PRES_DS_DEAD;
}

static void dev_list_removed(pd_t *d, uint32_t i, void *ctx)
{
    (void)ctx;
    dev_maybe_retire(d, i, UNL_USER);
}

static void dev_chain_pass(pd_t *d, uint64_t b, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    pd_now_t now = { nm, nw };
    pd_chain_t c = { &m->dev_buckets[b], m->dev_cap, dev_next, dev_gen,
                     dev_hash_remove, dev_hash_removed, &now };
    if (pd_chain_sweep(d, &c) < 0)
        pd_log(LOG_DEBUG, "device bucket %llu: damaged or contended, again next pass",
               (unsigned long long)b);
}

/* Retire an empty user, unless a client links a device or sets a policy
 * meanwhile.  The head goes to RETIRING first, where clients still find
 * the user; then, after a full fence, the privacy word is read: a policy
 * set in between is seen here, or its writer sees RETIRING and undoes it
 * (lib/policy.c: user_stays, the other half of this handshake).  Only
 * then RETIRED, by a CAS that fails if a client undid RETIRING. */
static int user_retire(pres_user_t *r, uint32_t u)
{
    uint64_t dh = PRES_LINK_NULLS(u);
    if (!pa_cas(&r->dhead, &dh, PRES_LINK_RETIRING))
        return 0;                    /* a device was linked meanwhile */
    pa_fence();
    dh = PRES_LINK_RETIRING;
    if (pa_load(&r->privacy) != 0) {
        pa_cas(&r->dhead, &dh, PRES_LINK_NULLS(u));
        return 0;
    }
    return pa_cas(&r->dhead, &dh, PRES_LINK_RETIRED);
}

/* Sweep a user's device list of its DEAD devices, then decide on the user:
 * one without devices (and without a privacy policy to keep) is retired
 * when found empty on two passes in a row, since a connect links its
 * device within microseconds of creating the user. */
static int user_remove(pd_t *d, uint32_t u, void *ctx)
{
    (void)ctx;
    pres_map_t *m = &d->m;
    pres_user_t *r = &m->users[u];
    uint64_t dh = pa_load_acquire(&r->dhead);
    if (dh == PRES_LINK_RETIRED)
        return 1;
    if (dh == PRES_LINK_RETIRING) {
        /* A daemon killed half-way through retiring it: start over. */
        pa_cas(&r->dhead, &dh, PRES_LINK_NULLS(u));
        return 0;
    }
    pd_chain_t c = { &r->dhead, m->dev_cap, dev_unext, dev_gen,
                     dev_list_remove, dev_list_removed, NULL };
    long n = pd_chain_sweep(d, &c);
    dh = pa_load_acquire(&r->dhead);
    if (n != 0 || dh != PRES_LINK_NULLS(u) || pa_load(&r->privacy) != 0) {
        d->user_empty[u] = 0;
        return 0;
    }
    if (!d->user_empty[u]) {
        d->user_empty[u] = 1;
        return 0;
    }
    /* LMDB holds its last seen before it is answered only from there. */
    if (!pd_mirror_may_retire(d, u))
        return 0;
    if (!user_retire(r, u))
        return 0;
    pa_add_relaxed(&m->hdr->dc.users_gone, 1);
    return 1;
}

static void user_removed(pd_t *d, uint32_t u, void *ctx)
{
    (void)ctx;
    pd_timers_user_gone(d, u);
    d->user_empty[u] = 0;
    pa_store(&d->m.users[u].alloc, PRES_ALLOC_RETIRED);
    pd_retire(d, u, PRES_RK_USER);
}

static void user_chain_pass(pd_t *d, uint64_t b)
{
    pres_map_t *m = &d->m;
    pd_chain_t c = { &m->user_buckets[b], m->user_cap, user_next, user_gen,
                     user_remove, user_removed, NULL };
    long kept = pd_chain_sweep(d, &c);
    if (kept < 0)
        pd_log(LOG_DEBUG, "user bucket %llu: damaged or contended, again next pass",
               (unsigned long long)b);
    else
        d->pass_users += (uint64_t)kept;
}

/* pres_stats counts devices and users from counters clients bump right
 * after the CAS that publishes or supersedes a record; a client killed
 * between the two leaves the count off by one.  A pass that finds the same
 * difference from what it counted as the pass before corrects it (a store
 * in use differs by what changed during the pass, a moving target). */
static void correct_count(pd_t *d, int users, uint64_t counted)
{
    pres_stats_t st;
    pres_t fake;
    memset(&fake, 0, sizeof fake);
    fake.m = d->m;
    if (pres_stats(&fake, &st) < 0)
        return;
    int64_t diff = (int64_t)counted - (int64_t)(users ? st.users : st.devices);
    int64_t *last = users ? &d->users_diff : &d->devices_diff;
    if (diff != 0 && diff == *last) {
        uint64_t *adj = users ? &d->m.hdr->dc.users_adjust : &d->m.hdr->dc.devices_adjust;
        pa_store(adj, pa_load(adj) + (uint64_t)diff);
        pd_log(LOG_DEBUG, "%s count corrected by %lld", users ? "user" : "device",
               (long long)diff);
        *last = 0;
        return;
    }
    *last = diff;
}

static uint64_t chunk_of(const pd_t *d, uint64_t buckets)
{
    if (buckets <= SMALL_INDEX)
        return buckets;
    uint64_t ticks = d->cfg.retain_ms / 4 / PD_TICK_MS;
    ticks = ticks < PASS_TICKS_MIN ? PASS_TICKS_MIN : ticks > PASS_TICKS ? PASS_TICKS : ticks;
    return (buckets + ticks - 1) / ticks;
}

/* The passes visit records in bucket order, each one a miss at a random
 * place: start the misses of the chains a few buckets ahead (a user's
 * record, then its first device), so that they overlap instead of coming
 * one after the other. */
#define PASS_AHEAD 8u

static void prefetch_dev_chain(const pres_map_t *m, uint64_t b)
{
    if (b > m->dev_mask)
        return;
    uint64_t l = pa_load(&m->dev_buckets[b]);
    if (!PRES_LINK_IS_NULLS(l) && PRES_LINK_IDX(l) < m->dev_cap)
        __builtin_prefetch(&m->devs[PRES_LINK_IDX(l)]);
}

static void prefetch_user_chain(const pres_map_t *m, uint64_t b, int devices)
{
    if (b > m->user_mask)
        return;
    uint64_t l = pa_load(&m->user_buckets[b]);
    if (PRES_LINK_IS_NULLS(l) || PRES_LINK_IDX(l) >= m->user_cap)
        return;
    const pres_user_t *u = &m->users[PRES_LINK_IDX(l)];
    if (!devices) {
        __builtin_prefetch(u);
        return;
    }
    uint64_t dl = pa_load(&u->dhead);
    if (dl != PRES_LINK_RETIRED && !PRES_LINK_IS_NULLS(dl) && PRES_LINK_IDX(dl) < m->dev_cap)
        __builtin_prefetch(&m->devs[PRES_LINK_IDX(dl)]);
}

static void index_passes(pd_t *d, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    uint64_t end = d->hb_pos + chunk_of(d, m->dev_mask + 1);
    if (end > m->dev_mask + 1)
        end = m->dev_mask + 1;
    for (uint64_t b = d->hb_pos; b < d->hb_pos + PASS_AHEAD && b < end; b++)
        prefetch_dev_chain(m, b);
    for (uint64_t b = d->hb_pos; b < end; b++) {
        prefetch_dev_chain(m, b + PASS_AHEAD);
        dev_chain_pass(d, b, nm, nw);
    }
    d->hb_pos = end;
    if (end == m->dev_mask + 1) {
        correct_count(d, 0, d->pass_devices);
        d->hb_pos = 0;
        d->pass_devices = 0;
    }
    end = d->ub_pos + chunk_of(d, m->user_mask + 1);
    if (end > m->user_mask + 1)
        end = m->user_mask + 1;
    for (uint64_t b = d->ub_pos; b < d->ub_pos + 2 * PASS_AHEAD && b < end; b++)
        prefetch_user_chain(m, b, 0);
    for (uint64_t b = d->ub_pos; b < end; b++) {
        prefetch_user_chain(m, b + 2 * PASS_AHEAD, 0);
        prefetch_user_chain(m, b + PASS_AHEAD, 1);
        user_chain_pass(d, b);
    }
    d->ub_pos = end;
    if (end == m->user_mask + 1) {
        correct_count(d, 1, d->pass_users);
        d->ub_pos = 0;
        d->pass_users = 0;
    }
}

/* ---- the record-table sweep ----------------------------------------------------- */

static int user_linked(pres_map_t *m, uint32_t u)
{
    pres_user_t *r = &m->users[u];
    if (!keylen_ok(r->keylen))
        return 0;
    uint64_t h = pres__hash(r->key, r->keylen, m->seed);
    uint64_t l = pa_load_acquire(&m->user_buckets[h & m->user_mask]);
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l) && steps <= m->user_cap; steps++) {
        uint32_t j = PRES_LINK_IDX(l);
        if (j >= m->user_cap)
            return 0;
        if (j == u)
            return 1;
        l = pa_load_acquire(&m->users[j].next);
    }
    return 0;
}

/* What no chain walk reaches: DEAD records out of one index or both (a
 * client killed between linking a record into its user's list and into
 * the hash chain, or a connect that gave up); records PENDING with nobody
 * behind them; user records taken by a client that is gone and never
 * published.  Device records [from, to). */
static void table_sweep_devices(pd_t *d, uint32_t from, uint32_t to)
{
    pres_map_t *m = &d->m;
    for (uint32_t i = from; i < to; i++) {
        pres_dev_t *r = &m->devs[i];
        uint64_t a = pa_load(&r->alloc);
        if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED || a == PRES_ALLOC_RETIRED)
            continue;
        uint64_t L = pa_load_acquire(&r->live);
        unsigned st = PRES_LIVE_STATE(L), holder = PRES_LIVE_LATCH(L);
        if (st == PRES_DS_PENDING && ((holder && !pd_latch_live(d, holder)) ||
                                      (!holder && !pd_token_live(d, a)))) {
            if (pa_cas(&r->live, &L, (L & ~(LIVE_STATE_MASK | LIVE_LATCH_MASK)) |
                                         ((uint64_t)PRES_DS_DEAD << 40)))
                st = PRES_DS_DEAD;
        }
        if (st != PRES_DS_DEAD) {
            d->dead_seen[i] = 0;
            continue;
        }
        /* DEAD on two sweeps in a row: the chain passes, which run before
         * each sweep and unlink what they find in one walk per chain, did
         * not reach it.  Only then walk for it (a walk per record). */
        if (!d->dead_seen[i]) {
            d->dead_seen[i] = 1;
            continue;
        }
        d->dead_seen[i] = 0;
        pd_log(LOG_DEBUG, "sweep: device record %u DEAD and still linked", i);
        uint32_t gen = pa_load(&r->gen);
        int rh = 0, ru = 0;
        if (keylen_ok(r->keylen)) {
            uint64_t h = pres__hash(r->key, r->keylen, m->seed);
            rh = unlink_from(&m->dev_buckets[h & m->dev_mask], i, gen, m->dev_cap, dev_next, m);
        }
        uint32_t u = pa_load(&r->user);
        if (u < m->user_cap && pa_load(&m->users[u].dhead) != PRES_LINK_RETIRED)
            ru = unlink_from(&m->users[u].dhead, i, gen, m->dev_cap, dev_unext, m);
        if (rh >= 0 && ru >= 0) {
            d->unl[i] = UNL_HASH | UNL_USER;
            dev_maybe_retire(d, i, 0);
        }
    }
}

static void table_sweep_users(pd_t *d, uint32_t from, uint32_t to)
{
    pres_map_t *m = &d->m;
    for (uint32_t u = from; u < to; u++) {
        pres_user_t *r = &m->users[u];
        uint64_t a = pa_load(&r->alloc);
        if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED || a == PRES_ALLOC_RETIRED)
            continue;
        /* Retired by the daemon (only it writes RETIRED) but not yet
         * freed, or taken by a client that is gone and never published. */
        if ((pa_load(&r->dhead) != PRES_LINK_RETIRED && pd_token_live(d, a)) ||
            user_linked(m, u))
            continue;
        /* Through a grace period: a previous daemon may have unlinked it
         * while readers stood on it. */
        pa_store(&r->alloc, PRES_ALLOC_RETIRED);
        pd_retire(d, u, PRES_RK_USER);
    }
}

/* A sweep of a large store goes a chunk a tick: a million records read in
 * one tick would hold up the timers (expiry events) for most of a second. */
#define SWEEP_CHUNK 32768u

static void table_sweep(pd_t *d)
{
    pres_map_t *m = &d->m;
    uint32_t chunk = m->dev_cap <= SMALL_INDEX ? UINT32_MAX : SWEEP_CHUNK;
    if (d->sweep_dev < m->dev_cap) {
        uint32_t to = m->dev_cap - d->sweep_dev > chunk ? d->sweep_dev + chunk : m->dev_cap;
        table_sweep_devices(d, d->sweep_dev, to);
        d->sweep_dev = to;
        if (chunk != UINT32_MAX)
            return;
    }
    uint32_t to = m->user_cap - d->sweep_user > chunk ? d->sweep_user + chunk : m->user_cap;
    table_sweep_users(d, d->sweep_user, to);
    d->sweep_user = to;
    d->sweeping = to < m->user_cap;
}

/* ---- grace periods ------------------------------------------------------------- */

static void free_record(pd_t *d, const pd_retired_t *e)
{
    pres_map_t *m = &d->m;
    /* A new generation: links and pres_ref_t handles naming the old one no
     * longer match. */
    uint32_t *gen = NULL;
    switch (e->kind) {
    case PRES_RK_USER:
        gen = &m->users[e->idx].gen;
        pd_privacy_user_freed(d, e->idx);
        break;
    case PRES_RK_EXC:
        pd_privacy_exc_freed(d, e->idx);
        break;
    case PRES_RK_DEV:
        gen = &m->devs[e->idx].gen;
        pa_store(&m->devs[e->idx].live, 0);
        d->unl[e->idx] = 0;
        d->dead_seen[e->idx] = 0;
        break;
    case PRES_RK_TYP:
        gen = &m->typs[e->idx].gen;
        pa_store(&m->typs[e->idx].word, 0);
        break;
    default:
        break;
    }
    if (gen) {
        uint32_t g = pa_load(gen) + 1;
        pa_store(gen, g ? g : 1);
    }
    pd_pool_back(d, (int)e->kind, e->idx);
}

static void grace_periods(pd_t *d, uint64_t nm)
{
    pres_map_t *m = &d->m;
    /* One epoch a tick: what was retired before it is freed once every
     * reader passed it, and the epochs' times give the age of the oldest
     * open read section. */
    uint64_t t = pres__gp_advance(m);
    d->epoch_of[t % 1024] = t;
    d->epoch_time[t % 1024] = nm;
    for (size_t k = 0; k < d->ret_n; k++)
        if (d->ret[k].epoch == 0)
            d->ret[k].epoch = t;

    uint32_t active;
    uint64_t min = pres__gp_min_active(m, &active);
    uint64_t passed = active ? min : pa_load(&m->rhdr->gp_epoch);
    size_t w = 0;
    for (size_t k = 0; k < d->ret_n; k++) {
        if (d->ret[k].epoch <= passed)
            free_record(d, &d->ret[k]);
        else
            d->ret[w++] = d->ret[k];
    }
    d->ret_n = w;
    pa_store(&m->hdr->dc.grace_periods, passed > 1 ? passed - 1 : 0);
    uint64_t age = 0;
    if (active) {
        if (d->epoch_of[min % 1024] == min)
            age = nm - d->epoch_time[min % 1024];
        else if (d->epoch_of[(t + 1) % 1024])
            age = nm - d->epoch_time[(t + 1) % 1024];   /* older than we keep */
        else
            age = nm - d->adopt_mono;   /* entered before our first tick */
    }
    pa_store(&m->hdr->oldest_reader_ms, age);
}

/* ---- rings ------------------------------------------------------------------------ */

static void claim_add(pd_t *d, int kind, uint32_t i, uint64_t pos, uint32_t client)
{
    if (d->claims_n == d->claims_cap) {
        size_t nc = d->claims_cap ? d->claims_cap * 2 : 64;
        pd_claim_t *a = realloc(d->claims, nc * sizeof *a);
        if (!a)
            return;              /* checked again after the next offer */
        d->claims = a;
        d->claims_cap = nc;
    }
    d->claims[d->claims_n++] = (pd_claim_t){
        .idx = i, .kind = (uint32_t)kind, .pos = pos, .client = client,
        .cgen = pa_load(&d->m.clients[client].gen),
    };
}

/* Taken and not yet claimed: its taker is a few stores from claiming it,
 * or dead (then it is ours again), or stopped (we keep watching). */
static void claims_check(pd_t *d)
{
    pres_map_t *m = &d->m;
    size_t w = 0;
    for (size_t k = 0; k < d->claims_n; k++) {
        pd_claim_t *c = &d->claims[k];
        if (d->offered[c->kind][c->idx] != c->pos ||
            pa_load(pres__alloc_word(m, (int)c->kind, c->idx)) != PRES_ALLOC_FREE)
            continue;
        const pres_client_t *cs = &m->clients[c->client];
        if (pa_load(&cs->gen) != c->cgen || !pd_client_live(d, c->client)) {
            pd_pool_back(d, (int)c->kind, c->idx);
            continue;
        }
        d->claims[w++] = *c;
    }
    d->claims_n = w;
}

static void ring_service(pd_t *d, int kind)
{
    pres_map_t *m = &d->m;
    pres_hdr_t *h = m->hdr;
    uint64_t *ring = m->ring[kind];
    uint64_t size = m->rmask[kind] + 1;
    unsigned shift = m->rshift[kind];
    uint64_t *rc = &d->rc[kind];
    uint64_t *offered = d->offered[kind];
    pd_stack_t *pool = &d->pool[kind];
    uint32_t cap = m->rcap[kind];

    /* Taken slots, in order.  The slot speaks of its record only if that
     * is where the record was last offered; the record is the taker's once
     * it claimed it (alloc set). */
    uint64_t c = pa_load_acquire(&h->ring[kind].cons);
    uint64_t p = pa_load(&h->prod[kind]);
    if (c > p || p - *rc > size) {
        pd_log(LOG_ERR, "%s ring cursors are damaged", kind_name[kind]);
        return;
    }
    while (*rc < c) {
        uint64_t s = pa_load_acquire(&ring[*rc & (size - 1)]);
        uint32_t i = PRES_RING_IDX(s);
        if (PRES_RING_LAP(s) == ((*rc >> shift) & 0xffffffu) && PRES_RING_OWNER1(s) &&
            i < cap && offered[i] == *rc &&
            pa_load(pres__alloc_word(m, kind, i)) == PRES_ALLOC_FREE) {
            uint32_t taker = PRES_RING_OWNER1(s) - 1;
            if (taker < PRES_CLIENTS && pd_client_live(d, taker))
                claim_add(d, kind, i, *rc, taker);
            else
                pd_pool_back(d, kind, i);
        }
        (*rc)++;
    }
    /* Offer free records: a slot is written only once the consumption of
     * its previous lap was processed above. */
    while (pool->n && p - *rc < size) {
        uint32_t i = pool->v[--pool->n];
        pa_store(pres__alloc_word(m, kind, i), PRES_ALLOC_FREE);
        offered[i] = p;
        pa_store_release(&ring[p & (size - 1)], PRES_RING_MAKE(i, 0, (p >> shift) & 0xffffffu));
        p++;
        /* release: the slot is written before consumers may reach it. */
        pa_store_release(&h->prod[kind], p);
    }
}

/* ---- the tick ------------------------------------------------------------------------ */

void pd_tick(pd_t *d)
{
    pres_map_t *m = &d->m;
    uint64_t nm = pres__mono_ms(), nw = pres__wall_ms();
    pa_store(&m->hdr->daemon_beat_mono, nm);
    /* A step of the wall clock moves the offset every process converts
     * with; liveness stays on the monotonic clock. */
    int64_t off = (int64_t)nw - (int64_t)nm;
    int64_t cur = pa_load(&m->hdr->wall_offset_ms);
    if (off - cur > 1000 || cur - off > 1000) {
        pd_log(LOG_INFO, "the wall clock stepped by %lld ms", (long long)(off - cur));
        pa_store(&m->hdr->wall_offset_ms, off);
    }
    nw = pres__wall_of(m, nm);
    pd_notes_read(d);
    d->gw_check = 0;
    pd_clients_poll(d, client_gone);
    if (d->ticks % SLOW_TICKS == 0) {
        readers_sweep(d);
        d->gw_check = 1;
    }
    /* Gateway owners change when clients close or die (the poll above); a
     * death whose records a writer holds latched is tried again five times
     * a second; the slow check catches the rest. */
    if (d->gw_check || (d->gw_dying && d->ticks % 10 == 0))
        gateways_pass(d);
    pd_feed_tick(d, nm);
    pd_timers_tick(d, nm, nw);
    index_passes(d, nm, nw);
    /* The sweep reads every record: five times a second for a small
     * store, every half minute for a large one, and at once after a client
     * died. */
    d->ticks++;
    if (d->sweep_soon || d->ticks % (m->dev_cap <= SMALL_INDEX ? 10 : SWEEP_TICKS) == 0) {
        d->sweep_soon = 0;
        d->sweeping = 1;
        d->sweep_dev = d->sweep_user = 0;
    }
    if (d->sweeping)
        table_sweep(d);
    pd_privacy_tick(d, nm);
    pd_typing_tick(d, nm);
    grace_periods(d, nm);
    claims_check(d);
    for (int k = 0; k < PRES_RK_COUNT; k++)
        ring_service(d, k);
    pd_mirror_tick(d, nm);
    d->last_tick_mono = nm;
}

/* ---- adopting a store ----------------------------------------------------------------- */

/* Rebuild what only the daemon's memory held: where each record was last
 * offered, the pools (records freed and not offered), records retired and
 * not yet freed, and records taken by clients that have not claimed them. */
static int adopt_ring(pd_t *d, int kind)
{
    pres_map_t *m = &d->m;
    uint32_t cap = m->rcap[kind];
    uint64_t size = m->rmask[kind] + 1;
    uint64_t *ring = m->ring[kind];
    uint64_t cons = pa_load(&m->hdr->ring[kind].cons);
    uint64_t prod = pa_load(&m->hdr->prod[kind]);
    unsigned shift = m->rshift[kind];
    uint64_t *offered = d->offered[kind];
    if (cons > prod || prod - cons > size) {
        pd_log(LOG_ERR, "%s ring cursors are damaged", kind_name[kind]);
        return -EPROTO;
    }
    for (uint32_t i = 0; i < cap; i++)
        offered[i] = UINT64_MAX;
    uint32_t *taker = calloc(cap, sizeof *taker);
    if (!taker)
        return -ENOMEM;
    uint64_t from = prod > size ? prod - size : 0;
    for (uint64_t p = from; p < prod; p++) {
        uint64_t s = pa_load(&ring[p & (size - 1)]);
        uint32_t i = PRES_RING_IDX(s);
        if (PRES_RING_LAP(s) == ((p >> shift) & 0xffffffu) && i < cap) {
            offered[i] = p;
            taker[i] = p < cons ? PRES_RING_OWNER1(s) : 0;
        }
    }
    for (uint32_t i = 0; i < cap; i++) {
        uint64_t a = pa_load(pres__alloc_word(m, kind, i));
        if (a == PRES_ALLOC_POOLED)
            stack_push(&d->pool[kind], i);
        else if (a == PRES_ALLOC_RETIRED)
            pd_retire(d, i, kind);
        else if (a == PRES_ALLOC_FREE && (offered[i] == UINT64_MAX || offered[i] < cons)) {
            uint32_t t = taker[i];
            if (t && t <= PRES_CLIENTS && pres__client_alive(m, t - 1))
                claim_add(d, kind, i, offered[i], t - 1);
            else
                pd_pool_back(d, kind, i);
        }
    }
    free(taker);
    d->rc[kind] = cons;
    return 0;
}

int pd_adopt(pd_t *d)
{
    pres_map_t *m = &d->m;
    d->unl = calloc(m->dev_cap, 1);
    d->dead_seen = calloc(m->dev_cap, 1);
    d->user_empty = calloc(m->user_cap, 1);
    d->gw_pending = calloc(m->gw_cap, sizeof *d->gw_pending);
    if (!d->unl || !d->dead_seen || !d->user_empty || !d->gw_pending)
        return -ENOMEM;
    for (int k = 0; k < PRES_RK_COUNT; k++)
        if (!(d->offered[k] = calloc(m->rcap[k], sizeof *d->offered[k])))
            return -ENOMEM;
    d->adopt_mono = pres__mono_ms();
    pres_client_t *me = &m->clients[PRES_DAEMON_CLIENT];
    pa_store(&me->pid, (uint64_t)getpid());
    pa_store(&me->start, pres__proc_start(getpid()));
    pa_store_release(&me->ready, 1);
    pa_store(&m->hdr->daemon_pid, (uint64_t)getpid());
    pd_clients_init(d);
    int rc;
    for (int k = 0; k < PRES_RK_COUNT; k++)
        if ((rc = adopt_ring(d, k)) < 0)
            return rc;
    if ((rc = pd_privacy_init(d)) < 0 || (rc = pd_typing_init(d)) < 0 ||
        (rc = pd_feed_init(d)) < 0 || (rc = pd_timers_init(d)) < 0)
        return rc;
    return 0;
}

void pd_shutdown(pd_t *d)
{
    pres_map_t *m = &d->m;
    /* Records retired but not yet freed stay RETIRED and pooled ones
     * POOLED: the next daemon takes them back (after a grace period of its
     * own for the retired). */
    pa_store(&m->hdr->daemon_pid, 0);
    pres_client_t *me = &m->clients[PRES_DAEMON_CLIENT];
    pa_store(&me->ready, 0);
    pa_store_release(&me->pid, 0);
    pd_timers_free(d);
    pd_feed_free(d);
    free(d->ret);
    free(d->unl);
    free(d->dead_seen);
    free(d->user_empty);
    free(d->gw_pending);
    free(d->claims);
    free(d->nb);
    pd_privacy_fini(d);
    pd_typing_fini(d);
    for (int k = 0; k < PRES_RK_COUNT; k++) {
        free(d->offered[k]);
        free(d->pool[k].v);
    }
}
