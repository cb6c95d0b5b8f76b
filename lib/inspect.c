/*
 * inspect.c - what presencectl dump and check see of the structure.
 *
 * check walks every index and table with the same bounds the readers use
 * and verifies the invariants listed in doc/region.md.  On a store in use
 * some states are transient (a record between its publish and the
 * supersede of its older copy, a record taken from a ring and not yet
 * claimed); a pass that finds problems is repeated once a little later and
 * only what persists is reported.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "inspect.h"
#include "policy.h"

int pres__inspect_info(pres_t *p, pres_inspect_info_t *out)
{
    if (!p || !out)
        return -EINVAL;
    const pres_map_t *m = &p->m;
    memset(out, 0, sizeof *out);
    pres__region_path(out->path, sizeof out->path, p->name, NULL);
    out->format = m->hdr->format;
    out->region_bytes = m->size;
    out->readers_bytes = m->rsize;
    out->device_capacity = m->dev_cap;
    out->user_capacity = m->user_cap;
    out->gateway_capacity = m->gw_cap;
    out->reader_slots = PRES_READER_SLOTS;
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++)
        if (pa_load(&m->rslots[i].owner))
            out->reader_slots_used++;
    out->device_buckets = m->dev_mask + 1;
    out->user_buckets = m->user_mask + 1;
    out->gp_epoch = pa_load(&m->rhdr->gp_epoch);
    out->oldest_reader_ms = pa_load(&m->hdr->oldest_reader_ms);
    uint64_t pid = pa_load(&m->hdr->daemon_pid);
    out->daemon_pid = pid && pres__proc_alive((int)pid, 0) ? (int)pid : 0;
    out->exception_capacity = m->exc_cap;
    out->typing_capacity = m->typ_cap;
    for (uint32_t i = 0; i < m->exc_cap; i++) {
        uint64_t a = pa_load(&m->excs[i].alloc);
        out->exceptions_in_use += a != PRES_ALLOC_FREE && a != PRES_ALLOC_POOLED;
    }
    for (uint32_t i = 0; i < m->typ_cap; i++) {
        uint64_t a = pa_load(&m->typs[i].alloc);
        out->typing_in_use += a != PRES_ALLOC_FREE && a != PRES_ALLOC_POOLED;
    }
    return 0;
}

int pres__inspect_feed(pres_t *p, pres_inspect_feed_t *out)
{
    if (!p || !out)
        return -EINVAL;
    const pres_map_t *m = &p->m;
    memset(out, 0, sizeof *out);
    out->capacity = m->ev_mask + 1;
    out->last_seq = pa_load(&m->hdr->ev_next) - 1;
    out->watchers_asleep = pa_load(&m->rhdr->ev_sleepers);
    return 0;
}

int pres__inspect_devices(pres_t *p, int (*fn)(const pres_device_info_t *, void *), void *arg)
{
    if (!p || !fn)
        return -EINVAL;
    const pres_map_t *m = &p->m;
    int rc = 0;
    for (uint32_t i = 0; i < m->dev_cap && rc == 0; i++) {
        pres_rs_t *t = pres__gp_enter(p);
        if (!t)
            return -ENOSPC;
        pres_snap_t s;
        pres_device_info_t info;
        const pres_dev_t *d = &m->devs[i];
        uint64_t a = pa_load(&d->alloc);
        int live = a != PRES_ALLOC_FREE && a != PRES_ALLOC_POOLED &&
                   a != PRES_ALLOC_RETIRED && pres__dev_snap(m, i, &s) == 0;
        if (live && d->keylen >= 1 && d->keylen <= PRES_ID_MAX) {
            /* Only the current record of a device (a superseded one is
             * DEAD, and snap refuses it). */
            uint64_t nm = pres__mono_ms();
            pres__dev_info(m, i, &s, nm, pres__wall_of(m, nm), &info);
            pres__gp_leave(t);
            rc = fn(&info, arg);
            continue;
        }
        pres__gp_leave(t);
    }
    return rc;
}

/* ---- check ------------------------------------------------------------------ */

typedef struct {
    FILE *out;
    int verbose;
    int quiet;          /* first pass: count only */
    long problems;
    uint8_t *dev_in_hash, *dev_in_user, *user_in_hash, *dev_in_ring, *user_in_ring;
    uint8_t *exc_in_block, *exc_in_ring, *typ_in_chain, *typ_in_ring;
} chk_t;

static void problem(chk_t *c, const char *fmt, ...)
{
    c->problems++;
    if (c->quiet || c->problems > 200)
        return;
    va_list ap;
    va_start(ap, fmt);
    fputs("problem: ", c->out);
    vfprintf(c->out, fmt, ap);
    fputc('\n', c->out);
    va_end(ap);
}

static void note(chk_t *c, const char *fmt, ...)
{
    if (c->quiet || !c->verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    fputs("ok: ", c->out);
    vfprintf(c->out, fmt, ap);
    fputc('\n', c->out);
    va_end(ap);
}

static int token_live(const pres_map_t *m, uint64_t tok)
{
    uint32_t cl = PRES_TOKEN_CLIENT(tok);
    if (cl >= PRES_CLIENTS)
        return 0;
    const pres_client_t *c = &m->clients[cl];
    return pa_load(&c->pid) != 0 &&
           (pa_load(&c->gen) & 0xffffu) == ((tok >> 32) & 0xffffu) &&
           pres__client_alive(m, cl);
}

static void check_dev_chains(chk_t *c, const pres_map_t *m)
{
    for (uint64_t b = 0; b <= m->dev_mask; b++) {
        uint64_t l = pa_load_acquire(&m->dev_buckets[b]);
        uint32_t steps = 0;
        while (!PRES_LINK_IS_NULLS(l)) {
            uint32_t i = PRES_LINK_IDX(l);
            if (i >= m->dev_cap) {
                problem(c, "device bucket %llu links to index %u beyond capacity %u",
                        (unsigned long long)b, i, m->dev_cap);
                goto next;
            }
            if (++steps > m->dev_cap) {
                problem(c, "device bucket %llu: chain longer than the capacity (a cycle)",
                        (unsigned long long)b);
                goto next;
            }
            const pres_dev_t *d = &m->devs[i];
            if (c->dev_in_hash[i]++)
                problem(c, "device record %u is linked twice in the hash index", i);
            if (pa_load(&d->gen) != PRES_LINK_GEN(l))
                problem(c, "device record %u: link generation %u, record generation %u",
                        i, PRES_LINK_GEN(l), pa_load(&d->gen));
            if (d->keylen < 1 || d->keylen > PRES_ID_MAX)
                problem(c, "device record %u: key length %u", i, d->keylen);
            else if ((pres__hash(d->key, d->keylen, m->seed) & m->dev_mask) != b)
                problem(c, "device record %u is in bucket %llu, its key hashes elsewhere",
                        i, (unsigned long long)b);
            l = pa_load_acquire(&d->next);
        }
        if (PRES_LINK_CHAIN(l) != b)
            problem(c, "device bucket %llu ends in the marker of chain %llu",
                    (unsigned long long)b, (unsigned long long)PRES_LINK_CHAIN(l));
    next:;
    }
}

static void check_user_list(chk_t *c, const pres_map_t *m, uint32_t u)
{
    uint64_t l = pa_load_acquire(&m->users[u].dhead);
    if (PRES_LINK_NO_LIST(l))
        return;
    uint32_t steps = 0;
    while (!PRES_LINK_IS_NULLS(l)) {
        uint32_t i = PRES_LINK_IDX(l);
        if (i >= m->dev_cap || ++steps > m->dev_cap) {
            problem(c, "user record %u: device list leaves the table or cycles", u);
            return;
        }
        const pres_dev_t *d = &m->devs[i];
        if (c->dev_in_user[i]++)
            problem(c, "device record %u is in two users' lists", i);
        if (pa_load(&d->user) != u)
            problem(c, "device record %u is in the list of user %u but belongs to user %u",
                    i, u, pa_load(&d->user));
        if (pa_load(&d->gen) != PRES_LINK_GEN(l))
            problem(c, "device record %u: stale generation in user %u's list", i, u);
        l = pa_load_acquire(&d->unext);
    }
    if (PRES_LINK_CHAIN(l) != u)
        problem(c, "user record %u: device list ends in the marker of %llu", u,
                (unsigned long long)PRES_LINK_CHAIN(l));
}

static void check_user_chains(chk_t *c, const pres_map_t *m)
{
    for (uint64_t b = 0; b <= m->user_mask; b++) {
        uint64_t l = pa_load_acquire(&m->user_buckets[b]);
        uint32_t steps = 0;
        while (!PRES_LINK_IS_NULLS(l)) {
            uint32_t u = PRES_LINK_IDX(l);
            if (u >= m->user_cap || ++steps > m->user_cap) {
                problem(c, "user bucket %llu: chain leaves the table or cycles",
                        (unsigned long long)b);
                goto next;
            }
            const pres_user_t *r = &m->users[u];
            if (c->user_in_hash[u]++)
                problem(c, "user record %u is linked twice", u);
            if (r->keylen < 1 || r->keylen > PRES_ID_MAX)
                problem(c, "user record %u: key length %u", u, r->keylen);
            else if ((pres__hash(r->key, r->keylen, m->seed) & m->user_mask) != b)
                problem(c, "user record %u is in bucket %llu, its key hashes elsewhere",
                        u, (unsigned long long)b);
            check_user_list(c, m, u);
            l = pa_load_acquire(&r->next);
        }
        if (PRES_LINK_CHAIN(l) != b)
            problem(c, "user bucket %llu ends in the marker of chain %llu",
                    (unsigned long long)b, (unsigned long long)PRES_LINK_CHAIN(l));
    next:;
    }
}

static const char *const ring_what[PRES_RK_COUNT] = {
    "device", "user", "exception", "typing",
};

static void check_ring(chk_t *c, const pres_map_t *m, int kind)
{
    const pres_hdr_t *h = m->hdr;
    uint64_t cons = pa_load(&h->ring[kind].cons);
    uint64_t prod = pa_load(&h->prod[kind]);
    uint64_t size = m->rmask[kind] + 1;
    unsigned shift = m->rshift[kind];
    uint32_t cap = m->rcap[kind];
    const uint64_t *ring = m->ring[kind];
    uint8_t *const rings[PRES_RK_COUNT] = { c->dev_in_ring, c->user_in_ring, c->exc_in_ring,
                                            c->typ_in_ring };
    uint8_t *in = rings[kind];
    const char *what = ring_what[kind];
    if (cons > prod || prod - cons > size) {
        problem(c, "%s ring: consumer %llu, producer %llu, size %llu", what,
                (unsigned long long)cons, (unsigned long long)prod, (unsigned long long)size);
        return;
    }
    for (uint64_t pos = cons; pos < prod; pos++) {
        uint64_t s = pa_load(&ring[pos & (size - 1)]);
        if (PRES_RING_LAP(s) != ((pos >> shift) & 0xffffffu) || PRES_RING_OWNER1(s))
            continue;                /* taken meanwhile */
        uint32_t i = PRES_RING_IDX(s);
        if (i >= cap) {
            problem(c, "%s ring offers index %u beyond capacity", what, i);
            continue;
        }
        if (in[i]++)
            problem(c, "%s record %u is offered twice", what, i);
    }
}

/* The walk above is a moment in the past: the daemon may have unlinked a
 * record since.  Look again before calling it a problem. */
static int dev_still_in_hash(const pres_map_t *m, uint32_t i)
{
    const pres_dev_t *d = &m->devs[i];
    if (d->keylen < 1 || d->keylen > PRES_ID_MAX)
        return 0;
    uint64_t b = pres__hash(d->key, d->keylen, m->seed) & m->dev_mask;
    uint64_t l = pa_load_acquire(&m->dev_buckets[b]);
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l) && steps <= m->dev_cap; steps++) {
        uint32_t j = PRES_LINK_IDX(l);
        if (j >= m->dev_cap)
            return 0;
        if (j == i)
            return 1;
        l = pa_load_acquire(&m->devs[j].next);
    }
    return 0;
}

static void check_records(chk_t *c, const pres_map_t *m)
{
    uint64_t n_live = 0, n_free = 0, n_pooled = 0, n_retired = 0, n_flight = 0;
    for (uint32_t i = 0; i < m->dev_cap; i++) {
        const pres_dev_t *d = &m->devs[i];
        uint64_t a = pa_load(&d->alloc), L = pa_load(&d->live);
        unsigned st = PRES_LIVE_STATE(L), latch = PRES_LIVE_LATCH(L);
        int linked = c->dev_in_hash[i] || c->dev_in_user[i];
        if (c->dev_in_ring[i]) {
            n_free++;
            if (linked)
                problem(c, "device record %u is offered as free but linked", i);
            continue;
        }
        if (a == PRES_ALLOC_POOLED) {
            n_pooled++;
            if (linked)
                problem(c, "device record %u is pooled as free but linked", i);
            continue;
        }
        if (a == PRES_ALLOC_RETIRED) {
            n_retired++;
            if (c->dev_in_hash[i] && dev_still_in_hash(m, i))
                problem(c, "device record %u is retired but still in the hash index", i);
            continue;
        }
        if (latch && latch != PRES_DAEMON_LATCH &&
            pres__latch_holder_state(m, latch) == PRES_HOLDER_DEAD)
            problem(c, "device record %u is latched by reader slot %u, whose thread is gone",
                    i, latch - 1);
        if (st == PRES_DS_CONNECTED || st == PRES_DS_DISCONNECTED) {
            n_live++;
            if (!c->dev_in_hash[i] || !c->dev_in_user[i])
                problem(c, "device record %u is %s but not linked in both indexes", i,
                        st == PRES_DS_CONNECTED ? "connected" : "disconnected");
            unsigned k = PRES_LIVE_SEQ(L) & 1;
            uint32_t gw = pa_load(&d->conn[k].gw);
            uint32_t ttl = pa_load(&d->ttl[k]);
            if (gw >= m->gw_cap || (pa_load(&m->gws[gw].state) & 0xff) != PRES_GW_READY)
                problem(c, "device record %u names gateway %u, which is not in the table", i, gw);
            if (ttl < 1 || ttl > PRES_TTL_MAX_MS)
                problem(c, "device record %u: TTL %u out of range", i, ttl);
            continue;
        }
        /* PENDING or DEAD, or taken from the ring and not yet claimed: the
         * work of a live client, or the daemon's to repair. */
        if (a == PRES_ALLOC_FREE || !token_live(m, a)) {
            if (st == PRES_DS_DEAD && (linked || a != PRES_ALLOC_FREE))
                continue;            /* waiting for the daemon to unlink it */
            problem(c, "device record %u is neither free, linked, retired nor held by a "
                       "live process (leaked)", i);
        } else {
            n_flight++;
        }
    }
    note(c, "devices: %llu held, %llu offered free, %llu pooled, %llu retired, %llu in flight",
         (unsigned long long)n_live, (unsigned long long)n_free, (unsigned long long)n_pooled,
         (unsigned long long)n_retired, (unsigned long long)n_flight);

    for (uint32_t u = 0; u < m->user_cap; u++) {
        const pres_user_t *r = &m->users[u];
        uint64_t a = pa_load(&r->alloc);
        if (c->user_in_ring[u] || a == PRES_ALLOC_POOLED || a == PRES_ALLOC_RETIRED) {
            if (c->user_in_hash[u] && a != PRES_ALLOC_RETIRED)
                problem(c, "user record %u is free but linked", u);
            continue;
        }
        if (c->user_in_hash[u])
            continue;
        if (a == PRES_ALLOC_FREE || !token_live(m, a))
            problem(c, "user record %u is neither free, linked nor held by a live process "
                       "(leaked)", u);
    }
}

/* ---- privacy policies ------------------------------------------------------ */

/* One user's policy block: well formed (HEAD first, counts within bounds,
 * kinds in order, the last entry ending the list, no cycle), written for
 * this user, every key hashed as lookups expect, and no entry in two
 * blocks or free while a policy names it. */
static void check_policy(chk_t *c, const pres_map_t *m, uint32_t u, int linked)
{
    uint64_t w = pa_load_acquire(&m->users[u].privacy);
    uint32_t idx[PRES_PV_BLOCK_MAX];
    size_t n;
    if (w && !(w & PRES_PV_SET))
        problem(c, "user record %u: privacy word %#llx without its set bit", u,
                (unsigned long long)w);
    if (PRES_PV_SEEN(w) > PRES_NOBODY || PRES_PV_ONLINE(w) > PRES_PV_SEEN(w))
        problem(c, "user record %u: privacy audiences out of range or online narrower "
                   "than last seen", u);
    if (pres__policy_block(m, w, idx, &n) < 0) {
        problem(c, "user record %u: privacy block at entry %u is malformed (out of range, "
                   "counts, kinds or a cycle)", u, PRES_PV_HEAD(w) - 1);
        return;
    }
    if (n && pa_load(&m->excs[idx[0]].user) != u)
        problem(c, "user record %u: privacy block written for user %u", u,
                pa_load(&m->excs[idx[0]].user));
    for (size_t k = 0; k < n; k++) {
        const pres_exc_t *e = &m->excs[idx[k]];
        uint64_t a = pa_load(&e->alloc);
        if (c->exc_in_block[idx[k]]++)
            problem(c, "exception entry %u is in two privacy blocks", idx[k]);
        if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED || (linked && a == PRES_ALLOC_RETIRED))
            problem(c, "exception entry %u of user %u's policy is %s", idx[k], u,
                    a == PRES_ALLOC_RETIRED ? "retired" : "free");
        if (k && (e->keylen < 1 || e->keylen > PRES_ID_MAX ||
                  pa_load(&e->hash) != pres__exc_hash(m, e->key, e->keylen)))
            problem(c, "exception entry %u: key length %u or hash does not match its key",
                    idx[k], e->keylen);
    }
}

static void check_policies(chk_t *c, const pres_map_t *m)
{
    uint64_t with = 0;
    for (uint32_t u = 0; u < m->user_cap; u++) {
        uint64_t a = pa_load(&m->users[u].alloc);
        if (c->user_in_ring[u] || a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED) {
            if (pa_load(&m->users[u].privacy) && a == PRES_ALLOC_POOLED)
                problem(c, "user record %u is pooled with a privacy policy", u);
            continue;
        }
        with += pa_load(&m->users[u].privacy) != 0;
        check_policy(c, m, u, c->user_in_hash[u]);
    }
    uint64_t held = 0, flight = 0, retired = 0, nfree = 0;
    /* The ring just before the records: a record the daemon offers in
     * between (pooled, then free) would look leaked. */
    check_ring(c, m, PRES_RK_EXC);
    for (uint32_t i = 0; i < m->exc_cap; i++) {
        uint64_t a = pa_load(&m->excs[i].alloc);
        if (c->exc_in_ring[i] || a == PRES_ALLOC_POOLED) {
            nfree++;
            continue;
        }
        if (a == PRES_ALLOC_RETIRED) {
            retired++;
            continue;
        }
        if (c->exc_in_block[i]) {
            held++;
            continue;
        }
        /* Neither in a policy nor free: being written by a live process,
         * or left by a dead one (or replaced, HELD) for the daemon. */
        if (a != PRES_ALLOC_FREE && a != PRES_ALLOC_HELD && token_live(m, a))
            flight++;
        else
            problem(c, "exception entry %u is neither free, in a policy, retired nor held "
                       "by a live process (leaked)", i);
    }
    note(c, "privacy: %llu users with a policy; exception entries: %llu in policies, %llu "
            "free, %llu retired, %llu in flight", (unsigned long long)with,
         (unsigned long long)held, (unsigned long long)nfree, (unsigned long long)retired,
         (unsigned long long)flight);
}

/* ---- typing --------------------------------------------------------------------- */

static void check_typ_chains(chk_t *c, const pres_map_t *m)
{
    uint64_t live = 0;
    for (uint64_t b = 0; b <= m->typ_mask; b++) {
        uint64_t l = pa_load_acquire(&m->typ_buckets[b]);
        uint32_t steps = 0;
        while (!PRES_LINK_IS_NULLS(l)) {
            uint32_t i = PRES_LINK_IDX(l);
            if (i >= m->typ_cap || ++steps > m->typ_cap) {
                problem(c, "typing bucket %llu: chain leaves the table or cycles",
                        (unsigned long long)b);
                goto next;
            }
            const pres_typ_t *r = &m->typs[i];
            if (c->typ_in_chain[i]++)
                problem(c, "typing record %u is linked twice", i);
            if (pa_load(&r->gen) != PRES_LINK_GEN(l))
                problem(c, "typing record %u: link generation %u, record generation %u", i,
                        PRES_LINK_GEN(l), pa_load(&r->gen));
            if (r->keylen < 1 || r->keylen > PRES_ID_MAX)
                problem(c, "typing record %u: key length %u", i, r->keylen);
            else if ((pres__hash(r->key, r->keylen, m->seed) & m->typ_mask) != b)
                problem(c, "typing record %u is in bucket %llu, its conversation hashes "
                           "elsewhere", i, (unsigned long long)b);
            uint64_t w = pa_load(&r->word);
            if (PRES_TW_STATE(w) == PRES_TS_LIVE) {
                live++;
                if (pa_load(&r->dev) >= m->dev_cap || pa_load(&r->user) >= m->user_cap)
                    problem(c, "typing record %u names device %u, user %u: out of range",
                            i, pa_load(&r->dev), pa_load(&r->user));
            }
            l = pa_load_acquire(&r->next);
        }
        if (PRES_LINK_CHAIN(l) != b)
            problem(c, "typing bucket %llu ends in the marker of chain %llu",
                    (unsigned long long)b, (unsigned long long)PRES_LINK_CHAIN(l));
    next:;
    }
    uint64_t linked = 0, nfree = 0, retired = 0, flight = 0;
    check_ring(c, m, PRES_RK_TYP);       /* just before the records, as above */
    for (uint32_t i = 0; i < m->typ_cap; i++) {
        uint64_t a = pa_load(&m->typs[i].alloc);
        if (c->typ_in_ring[i] || a == PRES_ALLOC_POOLED) {
            nfree++;
            if (c->typ_in_chain[i])
                problem(c, "typing record %u is free but linked", i);
        } else if (a == PRES_ALLOC_RETIRED) {
            retired++;
        } else if (c->typ_in_chain[i]) {
            linked++;
        } else if (a != PRES_ALLOC_FREE && token_live(m, a)) {
            flight++;
        } else {
            problem(c, "typing record %u is neither free, linked, retired nor held by a "
                       "live process (leaked)", i);
        }
    }
    note(c, "typing: %llu records linked (%llu typing), %llu free, %llu retired, %llu in "
            "flight", (unsigned long long)linked, (unsigned long long)live,
         (unsigned long long)nfree, (unsigned long long)retired, (unsigned long long)flight);
}

static void check_clients(chk_t *c, const pres_map_t *m)
{
    uint64_t epoch = pa_load(&m->rhdr->gp_epoch);
    for (uint32_t i = 1; i < PRES_CLIENTS; i++)
        if (pa_load(&m->clients[i].pid) && pa_load(&m->clients[i].ready) &&
            !pres__client_alive(m, i))
            problem(c, "client slot %u: process %llu is dead and not yet swept", i,
                    (unsigned long long)pa_load(&m->clients[i].pid));
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++) {
        uint64_t o = pa_load(&m->rslots[i].owner), e = pa_load(&m->rslots[i].epoch);
        if (!o) {
            if (e)
                problem(c, "reader slot %u is free but holds epoch %llu", i,
                        (unsigned long long)e);
            continue;
        }
        if (!token_live(m, o & ~UINT64_C(0xffffffff)))
            problem(c, "reader slot %u belongs to a process that is gone", i);
        if (e > epoch)
            problem(c, "reader slot %u holds epoch %llu, ahead of %llu", i,
                    (unsigned long long)e, (unsigned long long)epoch);
    }
    for (uint32_t g = 0; g < m->gw_cap; g++) {
        uint64_t s = pa_load(&m->gws[g].state);
        if ((s & 0xff) > PRES_GW_READY)
            problem(c, "gateway entry %u: bad state %llu", g, (unsigned long long)s);
        if ((s & 0xff) == PRES_GW_READY && m->gws[g].keylen > PRES_ID_MAX)
            problem(c, "gateway entry %u: key length %u", g, m->gws[g].keylen);
        if ((s & 0xff) == PRES_GW_FILLING && !pres__client_alive(m, (uint32_t)(s >> 8) - 1))
            problem(c, "gateway entry %u: left half-filled by a dead process", g);
    }
}

/* The change feed: every seq below ev_next was claimed, so each slot holds
 * the latest seq of its residue class below (or at) ev_next, or is EMPTY
 * when there is none; no claim, and no latch kept in a lost slot, belongs
 * to a writer that is gone (the daemon repairs those). */
static void check_feed(chk_t *c, const pres_map_t *m)
{
    uint64_t cap = m->ev_mask + 1;
    unsigned shift = (unsigned)__builtin_ctzll(cap);
    uint64_t n0 = pa_load_acquire(&m->hdr->ev_next);
    uint64_t lost = 0, claimed = 0;
    if (n0 == 0) {
        problem(c, "change feed: ev_next is 0 (seqs start at 1)");
        return;
    }
    for (uint64_t j = 0; j < cap; j++) {
        uint64_t w = pa_load_acquire(&m->events[j].word);
        unsigned st = PRES_EVW_STATE(w), x = PRES_EVW_LATCH(w);
        /* The latest seq of this slot's class below n0 (0: none). */
        uint64_t want = j < n0 ? j + ((n0 - 1 - j) / cap) * cap : 0;
        if (st == PRES_EVS_EMPTY) {
            if (w != 0)
                problem(c, "change feed slot %llu: empty with bits %#llx",
                        (unsigned long long)j, (unsigned long long)w);
            else if (want >= 1)
                problem(c, "change feed slot %llu: seq %llu is below the head but was never "
                           "claimed", (unsigned long long)j, (unsigned long long)want);
            continue;
        }
        /* Appends go on meanwhile: the slot may have moved on since n0,
         * never past the head (or the one claim ev_next trails). */
        uint64_t seq = (PRES_EVW_LAP(w) << shift) | j;
        if (seq < want || seq > pa_load_acquire(&m->hdr->ev_next))
            problem(c, "change feed slot %llu holds seq %llu; the head (seq %llu) says %llu",
                    (unsigned long long)j, (unsigned long long)seq, (unsigned long long)n0,
                    (unsigned long long)want);
        if (st == PRES_EVS_CLAIMED) {
            claimed++;
            if (!x || x > PRES_DAEMON_LATCH)
                problem(c, "change feed slot %llu: claimed under latch %u, which names nobody",
                        (unsigned long long)j, x);
            else if (pres__latch_holder_state(m, x) == PRES_HOLDER_DEAD)
                problem(c, "change feed slot %llu: claimed by a writer that is gone (latch %u)",
                        (unsigned long long)j, x);
        } else if (st == PRES_EVS_LOST) {
            lost++;
            if (x && pres__latch_holder_state(m, x) == PRES_HOLDER_DEAD)
                problem(c, "change feed slot %llu: lost, and still names a writer that is gone "
                           "(latch %u)", (unsigned long long)j, x);
        }
    }
    uint64_t n1 = pa_load_acquire(&m->hdr->ev_next);
    note(c, "change feed: %llu slots, seqs up to %llu consistent with the head; %llu lost, "
            "%llu being written", (unsigned long long)cap, (unsigned long long)(n1 - 1),
         (unsigned long long)lost, (unsigned long long)claimed);
}

static long check_pass(pres_t *p, FILE *out, int verbose, int quiet)
{
    const pres_map_t *m = &p->m;
    chk_t c = { .out = out, .verbose = verbose, .quiet = quiet };
    c.dev_in_hash = calloc(m->dev_cap, 1);
    c.dev_in_user = calloc(m->dev_cap, 1);
    c.dev_in_ring = calloc(m->dev_cap, 1);
    c.user_in_hash = calloc(m->user_cap, 1);
    c.user_in_ring = calloc(m->user_cap, 1);
    c.exc_in_block = calloc(m->exc_cap, 1);
    c.exc_in_ring = calloc(m->exc_cap, 1);
    c.typ_in_chain = calloc(m->typ_cap, 1);
    c.typ_in_ring = calloc(m->typ_cap, 1);
    long rc = -ENOMEM;
    if (!c.dev_in_hash || !c.dev_in_user || !c.dev_in_ring || !c.user_in_hash ||
        !c.user_in_ring || !c.exc_in_block || !c.exc_in_ring || !c.typ_in_chain ||
        !c.typ_in_ring)
        goto out;
    /* One read section: nothing we walk is freed under us. */
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        goto out;
    check_dev_chains(&c, m);
    note(&c, "device index: %llu buckets, chains bounded and ending in their own markers",
         (unsigned long long)(m->dev_mask + 1));
    check_user_chains(&c, m);
    note(&c, "user index and device lists: bounded, each device in its own user's list");
    check_ring(&c, m, PRES_RK_DEV);
    check_ring(&c, m, PRES_RK_USER);
    check_records(&c, m);
    check_policies(&c, m);
    check_typ_chains(&c, m);
    check_clients(&c, m);
    note(&c, "client, reader and gateway tables consistent");
    check_feed(&c, m);
    pres__gp_leave(t);
    rc = c.problems;
out:
    free(c.dev_in_hash);
    free(c.dev_in_user);
    free(c.dev_in_ring);
    free(c.user_in_hash);
    free(c.user_in_ring);
    free(c.exc_in_block);
    free(c.exc_in_ring);
    free(c.typ_in_chain);
    free(c.typ_in_ring);
    return rc;
}

long pres__inspect_check(pres_t *p, FILE *out, int verbose)
{
    if (!p || !out)
        return -EINVAL;
    long rc = check_pass(p, out, 0, 1);
    if (rc > 0) {
        /* Let transient states (a connect between its two steps, a death
         * the daemon has not swept yet) settle, then look again. */
        struct timespec ts = { 0, 300 * 1000000L };
        nanosleep(&ts, NULL);
    }
    return check_pass(p, out, verbose, 0);
}
