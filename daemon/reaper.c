/*
 * reaper.c - the daemon's passes: the one reclaimer of the store.
 *
 * Each tick (every PD_TICK_MS):
 *   1. clients: find the dead (liveness.c) and sweep what they held;
 *   2. gateways: end the connections of gateways whose process died or
 *      closed its handle;
 *   3. devices: a pass over a chunk of the device table (the whole table
 *      each second at most): repair latches and PENDING records of dead
 *      clients, evict devices offline longer than retain_ms, unlink DEAD
 *      records and retire them, count what is held and connected;
 *   4. users: retire users left without devices;
 *   5. grace periods: advance the epoch, free what every reader has passed;
 *   6. rings: take back records handed out and never claimed by a client
 *      that died, and offer free records again.
 *
 * Nothing here blocks on a client.  The daemon writes a device's live word
 * only by CAS (clients may race it), interior links by plain release
 * stores (only the daemon writes them), and bucket heads by CAS.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "atomics.h"
#include "clock.h"
#include "daemon.h"
#include "store.h"

#define DAEMON_LATCH      (PRES_DAEMON_CLIENT + 1)
#define LIVE_LATCH_MASK   (~(uint64_t)0 << 50)
#define LIVE_STATE_MASK   (UINT64_C(3) << 40)
/* The device pass visits at most this many records a tick, so a tick stays
 * short (a few ms) at any capacity; a small store is covered every tick. */
#define PASS_CHUNK        65536u

/* ---- small helpers ------------------------------------------------------- */

static int stack_push(pd_stack_t *s, uint32_t v)
{
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 1024;
        uint32_t *a = realloc(s->v, nc * sizeof *a);
        if (!a)
            return -ENOMEM;
        s->v = a;
        s->cap = nc;
    }
    s->v[s->n++] = v;
    return 0;
}

static void retire(pd_t *d, uint32_t idx, int users)
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
    d->ret[d->ret_n++] = (pd_retired_t){ .idx = idx, .users = (uint32_t)users, .epoch = 0 };
}

/* ---- unlinking ---------------------------------------------------------------
 * Remove record i from a chain whose head is *head and whose next field for
 * a record is given by next_of.  The head is also written by clients
 * inserting, hence the CAS; interior links only by us.  The removed record
 * keeps its own next: a reader standing on it walks on.  Returns 1 if it
 * was found and unlinked, 0 if not in the chain, -1 if the chain is bad. */
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

/* Unlink a DEAD device record from both indexes and retire it. */
static void dev_unlink_retire(pd_t *d, uint32_t i)
{
    pres_map_t *m = &d->m;
    pres_dev_t *r = &m->devs[i];
    uint32_t gen = pa_load(&r->gen);
    if (r->keylen >= 1 && r->keylen <= PRES_ID_MAX) {
        uint64_t h = pres__hash(r->key, r->keylen, m->seed);
        if (unlink_from(&m->dev_buckets[h & m->dev_mask], i, gen, m->dev_cap, dev_next, m) < 0)
            pd_log(LOG_WARN, "device bucket of record %u is damaged", i);
    }
    uint32_t u = pa_load(&r->user);
    if (u < m->user_cap) {
        uint64_t *head = &m->users[u].dhead;
        if (pa_load(head) != PRES_LINK_RETIRED &&
            unlink_from(head, i, gen, m->dev_cap, dev_unext, m) < 0)
            pd_log(LOG_WARN, "device list of user record %u is damaged", u);
    }
    /* Only now, unreachable: the record waits for a grace period. */
    pa_store(&r->alloc, PRES_ALLOC_RETIRED);
    retire(d, i, 0);
}

static int user_linked(pres_map_t *m, uint32_t u)
{
    pres_user_t *r = &m->users[u];
    if (r->keylen < 1 || r->keylen > PRES_ID_MAX)
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

/* ---- the daemon's own connection changes (gateway deaths) ----------------- */

/* End record i's connection on behalf of its dead gateway.  Returns 0 done
 * (or nothing to do), -EBUSY if a live client holds its latch now. */
static int dev_end_by_death(pd_t *d, uint32_t i, uint32_t gw, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    pres_dev_t *r = &m->devs[i];
    uint64_t L = pa_load_acquire(&r->live);
    for (;;) {
        if (PRES_LIVE_STATE(L) != PRES_DS_CONNECTED)
            return 0;
        unsigned k = PRES_LIVE_SEQ(L) & 1;
        if (pa_load(&r->conn[k].gw) != gw)
            return 0;
        unsigned holder = PRES_LIVE_LATCH(L);
        if (holder && holder != DAEMON_LATCH && pd_client_live(d, holder - 1))
            return -EBUSY;
        uint64_t want = (L & ~LIVE_LATCH_MASK) | ((uint64_t)DAEMON_LATCH << 50);
        if (pa_cas(&r->live, &L, want)) {
            L = want;
            break;
        }
    }
    unsigned k = PRES_LIVE_SEQ(L) & 1;
    uint64_t exp = PRES_LIVE_EXPIRY(L);
    uint32_t ttl = pa_load(&r->ttl[k]);
    int was_connected = exp > nm;
    pres_conn_t c = {
        .gw = pa_load(&r->conn[k].gw),
        .flags = PRES_CONN_DIED,
        .connected_at = pa_load(&r->conn[k].connected_at),
        /* last seen: the moment the death was detected, or, for a
         * connection whose TTL had already passed, its last sign of life */
        .ended = was_connected ? nw : pres__mono_to_wall(exp > ttl ? exp - ttl : 0, nm, nw),
    };
    pa_store(&r->conn[k ^ 1].gw, c.gw);
    pa_store(&r->conn[k ^ 1].flags, c.flags);
    pa_store(&r->conn[k ^ 1].connected_at, c.connected_at);
    pa_store(&r->conn[k ^ 1].ended, c.ended);
    pa_store(&r->ttl[k ^ 1], ttl);
    pa_store(&r->cid[k ^ 1], pa_load(&r->cid[k]));
    uint64_t newexp = was_connected ? nm : exp;
    for (;;) {
        if (PRES_LIVE_STATE(L) == PRES_DS_DEAD) {
            pa_cas(&r->live, &L, L & ~LIVE_LATCH_MASK);
            return 0;
        }
        uint64_t want = PRES_LIVE_MAKE(newexp, PRES_DS_DISCONNECTED, PRES_LIVE_SEQ(L) + 1, 0);
        if (pa_cas(&r->live, &L, want))
            break;
    }
    if (was_connected)
        pa_add_relaxed(&m->hdr->dc.expirations, 1);
    d->exp_seen[i] = newexp;
    return 0;
}

/* A gateway died (or its handle closed): end its devices' connections.
 * Returns 0 when all are ended, -EBUSY to try again next tick. */
static int gateway_death(pd_t *d, uint32_t g)
{
    pres_map_t *m = &d->m;
    uint64_t nm = pres__mono_ms(), nw = pres__wall_ms();
    int busy = 0, n = 0;
    for (uint32_t i = 0; i < m->dev_cap; i++) {
        pres_dev_t *r = &m->devs[i];
        uint64_t L = pa_load(&r->live);
        if (PRES_LIVE_STATE(L) != PRES_DS_CONNECTED)
            continue;
        if (pa_load(&r->conn[PRES_LIVE_SEQ(L) & 1].gw) != g)
            continue;
        if (dev_end_by_death(d, i, g, nm, nw) < 0)
            busy = 1;
        else
            n++;
    }
    pd_log(LOG_INFO, "gateway %.*s: %d connections ended", (int)m->gws[g].keylen,
           m->gws[g].key, n);
    return busy ? -EBUSY : 0;
}

static uint8_t *gw_pending;

static void gateways_pass(pd_t *d)
{
    pres_map_t *m = &d->m;
    if (!gw_pending)
        gw_pending = calloc(m->gw_cap, 1);
    for (uint32_t g = 0; g < m->gw_cap; g++) {
        pres_gw_t *e = &m->gws[g];
        uint64_t s = pa_load_acquire(&e->state);
        if ((s & 0xff) == PRES_GW_EMPTY)
            continue;
        if ((s & 0xff) == PRES_GW_FILLING) {
            unsigned filler = (unsigned)(s >> 8);
            if (filler && !pd_client_live(d, filler - 1)) {
                /* Left half-written: a tombstone no key matches. */
                e->keylen = 0;
                pa_store_release(&e->state, PRES_GW_READY);
            }
            continue;
        }
        uint64_t owner = pa_load_acquire(&e->owner);
        if (owner && (owner == PRES_GW_CLOSED || !pd_token_live(d, owner))) {
            /* Only if nobody took the id over meanwhile. */
            if (pa_cas(&e->owner, &owner, 0)) {
                pa_add_relaxed(&m->hdr->dc.gateway_deaths, 1);
                pa_add_relaxed(&e->died, 1);
                if (gw_pending)
                    gw_pending[g] = 1;
            }
        }
        if (gw_pending && gw_pending[g] && gateway_death(d, g) == 0)
            gw_pending[g] = 0;
    }
}

/* ---- a dead or departed client ---------------------------------------------- */

static void client_gone(pd_t *d, uint32_t client, uint64_t token)
{
    pres_map_t *m = &d->m;
    /* Its reader slots: a dead reader stops holding back grace periods. */
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++) {
        pres_rslot_t *s = &m->rslots[i];
        uint64_t o = pa_load_acquire(&s->owner);
        if (!o || (o & ~UINT64_C(0xffffffff)) != token)
            continue;
        for (int k = 0; k < PRES_C_COUNT; k++) {
            uint64_t v = pa_load(&s->counters[k]);
            if (v)
                pa_add_relaxed(&m->rhdr->folded[k], v);
            pa_store(&s->counters[k], 0);
        }
        pa_store(&s->epoch, 0);
        pa_store_release(&s->owner, 0);
    }
    pres_client_t *c = &m->clients[client];
    if (((pa_load(&c->gen)) & 0xffffu) == ((token >> 32) & 0xffffu)) {
        for (int k = 0; k < PRES_C_COUNT; k++) {
            uint64_t v = pa_load(&c->counters[k]);
            if (v)
                pa_add_relaxed(&m->rhdr->folded[k], v);
            pa_store(&c->counters[k], 0);
        }
    }
    /* Latches it held and records it was connecting: repaired now, before
     * its client index can serve another process. */
    for (uint32_t i = 0; i < m->dev_cap; i++) {
        pres_dev_t *r = &m->devs[i];
        uint64_t L = pa_load_acquire(&r->live);
        while (PRES_LIVE_LATCH(L) == client + 1) {
            uint64_t want = L & ~LIVE_LATCH_MASK;
            if (PRES_LIVE_STATE(L) == PRES_DS_PENDING)
                want = (want & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40);
            if (pa_cas(&r->live, &L, want))
                break;
        }
    }
    /* Gateway entries it left half-filled. */
    for (uint32_t g = 0; g < m->gw_cap; g++) {
        pres_gw_t *e = &m->gws[g];
        uint64_t s = pa_load_acquire(&e->state);
        if ((s & 0xff) == PRES_GW_FILLING && (s >> 8) == client + 1) {
            e->keylen = 0;           /* a tombstone no key matches */
            pa_store_release(&e->state, PRES_GW_READY);
        }
    }
    /* Records it took from a ring and never claimed. */
    for (int users = 0; users < 2; users++) {
        uint64_t *ring = users ? m->user_ring : m->dev_ring;
        uint64_t size = (users ? m->user_rmask : m->dev_rmask) + 1;
        unsigned shift = users ? m->user_rshift : m->dev_rshift;
        uint64_t cons = pa_load_acquire(users ? &m->hdr->user_cons : &m->hdr->dev_cons);
        uint32_t cap = users ? m->user_cap : m->dev_cap;
        for (uint64_t p = users ? d->user_rc : d->dev_rc; p < cons; p++) {
            uint64_t s = pa_load_acquire(&ring[p & (size - 1)]);
            if (PRES_RING_LAP(s) != ((p >> shift) & 0xffffffu) ||
                PRES_RING_OWNER1(s) != client + 1 || PRES_RING_IDX(s) >= cap)
                continue;
            uint32_t i = PRES_RING_IDX(s);
            uint64_t *alloc = users ? &m->users[i].alloc : &m->devs[i].alloc;
            if (pa_load(alloc) == PRES_ALLOC_FREE) {
                pa_store(alloc, PRES_ALLOC_POOLED);
                stack_push(users ? &d->user_pool : &d->dev_pool, i);
            }
        }
    }
    /* Its gateways end their connections; its other records (unpublished
     * users, PENDING devices) are found by the next full pass. */
    d->scan_pos = 0;
    d->pass_devices = d->pass_connected = 0;
    gateways_pass(d);
}

/* Reader slots whose client slot was freed or reused without them being
 * released (a daemon killed in the middle of a sweep). */
static void readers_sweep(pd_t *d)
{
    pres_map_t *m = &d->m;
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++) {
        pres_rslot_t *s = &m->rslots[i];
        uint64_t o = pa_load_acquire(&s->owner);
        if (!o)
            continue;
        uint32_t cl = PRES_TOKEN_CLIENT(o);
        const pres_client_t *c = cl < PRES_CLIENTS ? &m->clients[cl] : NULL;
        if (c && pa_load(&c->pid) != 0 &&
            (pa_load(&c->gen) & 0xffffu) == ((o >> 32) & 0xffffu))
            continue;
        for (int k = 0; k < PRES_C_COUNT; k++) {
            uint64_t v = pa_load(&s->counters[k]);
            if (v)
                pa_add_relaxed(&m->rhdr->folded[k], v);
            pa_store(&s->counters[k], 0);
        }
        pa_store(&s->epoch, 0);
        uint64_t exp = o;
        pa_cas(&s->owner, &exp, 0);
    }
}

/* ---- the device pass -------------------------------------------------------- */

static void dev_visit(pd_t *d, uint32_t i, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    pres_dev_t *r = &m->devs[i];
    uint64_t a = pa_load(&r->alloc);
    if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED || a == PRES_ALLOC_RETIRED)
        return;
    uint64_t L = pa_load_acquire(&r->live);
    unsigned st = PRES_LIVE_STATE(L), holder = PRES_LIVE_LATCH(L);

    /* A latch whose holder died: drop it (the idle copy it was writing is
     * never read).  A PENDING record of a dead client was never published:
     * it goes. */
    if (holder && (holder == DAEMON_LATCH || !pd_client_live(d, holder - 1))) {
        uint64_t want = L & ~LIVE_LATCH_MASK;
        if (st == PRES_DS_PENDING)
            want = (want & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40);
        if (!pa_cas(&r->live, &L, want))
            return;                  /* changed under us: next pass */
        L = want;
        st = PRES_LIVE_STATE(L);
        holder = 0;
    }
    if (st == PRES_DS_PENDING && holder == 0 && !pd_token_live(d, a)) {
        uint64_t want = (L & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40);
        if (!pa_cas(&r->live, &L, want))
            return;
        st = PRES_DS_DEAD;
    }
    if (st == PRES_DS_PENDING)
        return;                      /* a live client is connecting it */

    if (st != PRES_DS_DEAD && holder == 0) {
        unsigned k = PRES_LIVE_SEQ(L) & 1;
        uint64_t exp = PRES_LIVE_EXPIRY(L);
        uint64_t ended_wall = st == PRES_DS_DISCONNECTED ? pa_load(&r->conn[k].ended) : 0;
        int evict = 0;
        if (st == PRES_DS_DISCONNECTED)
            evict = nw > ended_wall && nw - ended_wall > d->cfg.retain_ms;
        else
            evict = nm > exp && nm - exp > d->cfg.retain_ms;
        if (evict) {
            uint64_t want = (L & ~LIVE_STATE_MASK) | ((uint64_t)PRES_DS_DEAD << 40);
            if (pa_cas(&r->live, &L, want)) {
                pa_add_relaxed(&m->hdr->dc.evictions, 1);
                st = PRES_DS_DEAD;
            }
        }
    }
    if (st == PRES_DS_DEAD) {
        dev_unlink_retire(d, i);
        return;
    }
    d->pass_devices++;
    uint64_t exp = PRES_LIVE_EXPIRY(L);
    if (st == PRES_DS_CONNECTED) {
        if (exp > nm) {
            d->pass_connected++;
        } else if (d->exp_seen[i] != exp) {
            /* A connection whose TTL passed: counted once. */
            d->exp_seen[i] = exp;
            pa_add_relaxed(&m->hdr->dc.expirations, 1);
        }
    }
}

static void devices_pass(pd_t *d, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    uint32_t end = d->scan_pos + PASS_CHUNK;
    if (end > m->dev_cap)
        end = m->dev_cap;
    for (uint32_t i = d->scan_pos; i < end; i++)
        dev_visit(d, i, nm, nw);
    d->scan_pos = end;
    if (end == m->dev_cap) {
        pa_store(&m->hdr->dc.devices, d->pass_devices);
        pa_store(&m->hdr->dc.connected, d->pass_connected);
        d->scan_pos = 0;
        d->pass_devices = d->pass_connected = 0;
    }
}

/* ---- users ---------------------------------------------------------------------- */

static void users_pass(pd_t *d)
{
    pres_map_t *m = &d->m;
    uint64_t users = 0;
    for (uint32_t u = 0; u < m->user_cap; u++) {
        pres_user_t *r = &m->users[u];
        uint64_t a = pa_load(&r->alloc);
        if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED || a == PRES_ALLOC_RETIRED)
            continue;
        uint64_t head = pa_load_acquire(&r->dhead);
        if (!user_linked(m, u)) {
            /* Taken by a client and never published (a spare of a handle,
             * or a client killed while creating it). */
            if (!pd_token_live(d, a)) {
                pa_store(&r->alloc, PRES_ALLOC_POOLED);
                stack_push(&d->user_pool, u);
            }
            continue;
        }
        if (head == PRES_LINK_RETIRED) {
            if (unlink_from(&m->user_buckets[pres__hash(r->key, r->keylen, m->seed) & m->user_mask],
                            u, pa_load(&r->gen), m->user_cap, user_next, m) >= 0) {
                pa_store(&r->alloc, PRES_ALLOC_RETIRED);
                retire(d, u, 1);
            }
            continue;
        }
        users++;
        /* A user without devices (and without a privacy policy to keep) is
         * retired when found empty on two passes in a row: a connect links
         * its device within microseconds of creating the user. */
        if (head == PRES_LINK_NULLS(u) && pa_load(&r->privacy) == 0) {
            if (d->user_empty[u]) {
                uint64_t exp = head;
                if (pa_cas(&r->dhead, &exp, PRES_LINK_RETIRED)) {
                    d->user_empty[u] = 0;
                    users--;
                    uint64_t h = pres__hash(r->key, r->keylen, m->seed);
                    if (unlink_from(&m->user_buckets[h & m->user_mask], u, pa_load(&r->gen),
                                    m->user_cap, user_next, m) >= 0) {
                        pa_store(&r->alloc, PRES_ALLOC_RETIRED);
                        retire(d, u, 1);
                    }
                }
            } else {
                d->user_empty[u] = 1;
            }
        } else {
            d->user_empty[u] = 0;
        }
    }
    pa_store(&m->hdr->dc.users, users);
}

/* ---- grace periods ------------------------------------------------------------- */

static void free_record(pd_t *d, const pd_retired_t *e)
{
    pres_map_t *m = &d->m;
    if (e->users) {
        pres_user_t *u = &m->users[e->idx];
        uint32_t g = pa_load(&u->gen) + 1;
        pa_store(&u->gen, g ? g : 1);
        pa_store(&u->alloc, PRES_ALLOC_POOLED);
        stack_push(&d->user_pool, e->idx);
    } else {
        pres_dev_t *r = &m->devs[e->idx];
        /* A new generation: links and pres_ref_t handles naming the old
         * one no longer match. */
        uint32_t g = pa_load(&r->gen) + 1;
        pa_store(&r->gen, g ? g : 1);
        pa_store(&r->live, 0);
        d->exp_seen[e->idx] = 0;
        pa_store(&r->alloc, PRES_ALLOC_POOLED);
        stack_push(&d->dev_pool, e->idx);
    }
}

static void grace_periods(pd_t *d, uint64_t nm)
{
    pres_map_t *m = &d->m;
    /* One epoch a tick, and one more for what was retired since: the epoch
     * times let us export the age of the oldest open read section. */
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
        else
            age = 1024 * 50;     /* older than the history we keep */
    }
    pa_store(&m->hdr->oldest_reader_ms, age);
}

/* ---- rings ------------------------------------------------------------------------ */

static void ring_service(pd_t *d, int users)
{
    pres_map_t *m = &d->m;
    pres_hdr_t *h = m->hdr;
    uint64_t *ring = users ? m->user_ring : m->dev_ring;
    uint64_t size = (users ? m->user_rmask : m->dev_rmask) + 1;
    unsigned shift = users ? m->user_rshift : m->dev_rshift;
    uint64_t *rc = users ? &d->user_rc : &d->dev_rc;
    uint64_t *cons = users ? &h->user_cons : &h->dev_cons;
    uint64_t *prod = users ? &h->user_prod : &h->dev_prod;
    pd_stack_t *pool = users ? &d->user_pool : &d->dev_pool;
    uint32_t cap = users ? m->user_cap : m->dev_cap;

    /* Taken slots, in order: the record is the taker's once it claimed it
     * (alloc set).  Unclaimed and its taker dead: it comes back to us. */
    uint64_t c = pa_load_acquire(cons);
    while (*rc < c) {
        uint64_t s = pa_load_acquire(&ring[*rc & (size - 1)]);
        if (PRES_RING_LAP(s) != ((*rc >> shift) & 0xffffffu) || !PRES_RING_OWNER1(s))
            break;
        uint32_t i = PRES_RING_IDX(s);
        if (i < cap) {
            uint64_t *alloc = users ? &m->users[i].alloc : &m->devs[i].alloc;
            if (pa_load(alloc) == PRES_ALLOC_FREE) {
                if (pd_client_live(d, PRES_RING_OWNER1(s) - 1))
                    break;               /* claiming it right now */
                pa_store(alloc, PRES_ALLOC_POOLED);
                stack_push(pool, i);
            }
        }
        (*rc)++;
    }
    /* Offer free records: a slot is written only once the consumption of
     * its previous lap was processed above. */
    uint64_t p = pa_load(prod);
    while (pool->n && p - *rc < size) {
        uint32_t i = pool->v[--pool->n];
        pa_store(users ? &m->users[i].alloc : &m->devs[i].alloc, PRES_ALLOC_FREE);
        pa_store_release(&ring[p & (size - 1)], PRES_RING_MAKE(i, 0, (p >> shift) & 0xffffffu));
        p++;
        /* release: the slot is written before consumers may reach it. */
        pa_store_release(prod, p);
    }
}

/* ---- the tick ------------------------------------------------------------------------ */

void pd_tick(pd_t *d)
{
    pres_map_t *m = &d->m;
    uint64_t nm = pres__mono_ms(), nw = pres__wall_ms();
    pa_store(&m->hdr->daemon_beat_mono, nm);
    pd_clients_poll(d, client_gone);
    readers_sweep(d);
    gateways_pass(d);
    devices_pass(d, nm, nw);
    if (d->scan_pos == 0)
        users_pass(d);
    grace_periods(d, nm);
    ring_service(d, 0);
    ring_service(d, 1);
    d->last_tick_mono = nm;
}

/* ---- adopting a store ----------------------------------------------------------------- */

/* Rebuild what only the daemon's memory held: the pools (records freed and
 * not yet offered), records retired and not yet freed, and records taken
 * from a ring by a client that died before claiming them. */
int pd_adopt(pd_t *d)
{
    pres_map_t *m = &d->m;
    d->exp_seen = calloc(m->dev_cap, sizeof *d->exp_seen);
    d->user_empty = calloc(m->user_cap, 1);
    if (!d->exp_seen || !d->user_empty)
        return -ENOMEM;
    pres_client_t *me = &m->clients[PRES_DAEMON_CLIENT];
    pa_store(&me->pid, (uint64_t)getpid());
    pa_store(&me->start, pres__proc_start(getpid()));
    pa_store_release(&me->ready, 1);
    pa_store(&m->hdr->daemon_pid, (uint64_t)getpid());

    for (int users = 0; users < 2; users++) {
        uint32_t cap = users ? m->user_cap : m->dev_cap;
        uint64_t size = (users ? m->user_rmask : m->dev_rmask) + 1;
        uint64_t *ring = users ? m->user_ring : m->dev_ring;
        uint64_t cons = pa_load(users ? &m->hdr->user_cons : &m->hdr->dev_cons);
        uint64_t prod = pa_load(users ? &m->hdr->user_prod : &m->hdr->dev_prod);
        unsigned shift = users ? m->user_rshift : m->dev_rshift;
        uint8_t *offered = calloc(cap, 1);
        if (!offered)
            return -ENOMEM;
        for (uint64_t p = cons; p < prod; p++) {
            uint64_t s = pa_load(&ring[p & (size - 1)]);
            if (PRES_RING_LAP(s) == ((p >> shift) & 0xffffffu) && PRES_RING_IDX(s) < cap)
                offered[PRES_RING_IDX(s)] = 1;
        }
        /* Positions before cons were processed by the previous daemon up to
         * a point we do not know: start from cons, and judge records that
         * are free but not offered by the owner of their last taken slot. */
        uint32_t *owner = calloc(cap, sizeof *owner);
        if (!owner) {
            free(offered);
            return -ENOMEM;
        }
        uint64_t from = cons > size ? cons - size : 0;
        for (uint64_t p = from; p < cons; p++) {
            uint64_t s = pa_load(&ring[p & (size - 1)]);
            if (PRES_RING_LAP(s) == ((p >> shift) & 0xffffffu) && PRES_RING_OWNER1(s) &&
                PRES_RING_IDX(s) < cap)
                owner[PRES_RING_IDX(s)] = PRES_RING_OWNER1(s);
        }
        for (uint32_t i = 0; i < cap; i++) {
            uint64_t *alloc = users ? &m->users[i].alloc : &m->devs[i].alloc;
            uint64_t a = pa_load(alloc);
            if (a == PRES_ALLOC_POOLED) {
                stack_push(users ? &d->user_pool : &d->dev_pool, i);
            } else if (a == PRES_ALLOC_RETIRED) {
                retire(d, i, users);
            } else if (a == PRES_ALLOC_FREE && !offered[i]) {
                uint32_t o = owner[i];
                if (!o || !pres__client_alive(m, o - 1)) {
                    pa_store(alloc, PRES_ALLOC_POOLED);
                    stack_push(users ? &d->user_pool : &d->dev_pool, i);
                }
            }
        }
        if (users)
            d->user_rc = cons;
        else
            d->dev_rc = cons;
        free(owner);
        free(offered);
    }
    pd_clients_init(d);
    return 0;
}

void pd_shutdown(pd_t *d)
{
    pres_map_t *m = &d->m;
    /* Records retired but not yet freed stay RETIRED: the next daemon
     * frees them after a grace period of its own.  Pooled records stay
     * POOLED, and the next daemon takes them back. */
    pa_store(&m->hdr->daemon_pid, 0);
    pres_client_t *me = &m->clients[PRES_DAEMON_CLIENT];
    pa_store(&me->ready, 0);
    pa_store_release(&me->pid, 0);
    free(d->ret);
    free(d->exp_seen);
    free(d->user_empty);
    free(d->dev_pool.v);
    free(d->user_pool.v);
    free(gw_pending);
    gw_pending = NULL;
}
