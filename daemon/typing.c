/*
 * typing.c - the daemon's side of typing: unlinking typing records that no
 * longer count and freeing them after a grace period (lib/typing.c has the
 * clients' side).
 *
 * A pass walks every conversation chain (a chunk of buckets a tick, a full
 * pass a second for a large store, every tick for a small one) with the
 * chain sweep the device index uses, and unlinks records that are ENDED or
 * DEAD, that expired (a margin after their expiry, so the change feed's
 * timers find them first), whose device is gone (another generation) or
 * no longer connected (the same margin after it stopped), or that are not
 * their device's current record any more.  A LIVE record is first CASed
 * to DEAD, which fails if its writer extended it meanwhile: it stays.  A
 * PENDING record is its writer's until the kernel says the writer is dead.
 *
 * Records a writer took and never linked (it was killed first) are found
 * by a sweep of the table, after a client died and every few seconds:
 * under a dead token and in no chain.
 */
#include <stdlib.h>

#include "atomics.h"
#include "clock.h"
#include "daemon.h"
#include "store.h"

#define SMALL_INDEX   65536u
#define PASS_TICKS    50u
/* How long after typing stopped counting (TTL passed, device no longer
 * connected) its record stays linked: the change feed's timers publish
 * TYPING_STOP within 100 ms, reading the record. */
#define MARGIN_MS     1000u
#define SWEEP_MS      5000u

typedef struct pd_typing {
    uint64_t pos;             /* next bucket of the pass */
    uint64_t last_sweep;      /* mono ms of the last table sweep */
    int      sweep_soon;
} pd_typing_t;

int pd_typing_init(pd_t *d)
{
    d->ty = calloc(1, sizeof *d->ty);
    if (!d->ty)
        return -ENOMEM;
    d->ty->sweep_soon = 1;          /* what a client killed before us left */
    return 0;
}

void pd_typing_fini(pd_t *d)
{
    free(d->ty);
    d->ty = NULL;
}

void pd_typing_deaths(pd_t *d)
{
    d->ty->sweep_soon = 1;
}

static uint64_t *typ_next(pres_map_t *m, uint32_t j) { return &m->typs[j].next; }
static uint32_t typ_gen(pres_map_t *m, uint32_t j) { return pa_load(&m->typs[j].gen); }

/* Has device dev (generation dgen) stopped being connected more than the
 * margin ago (or gone altogether)? */
static int device_gone(const pres_map_t *m, uint32_t dev, uint32_t dgen, uint64_t nm)
{
    pres_snap_t s;
    if (dev >= m->dev_cap || pa_load(&m->devs[dev].gen) != dgen)
        return 1;
    int rc = pres__dev_snap(m, dev, &s);
    if (rc == -EAGAIN)
        return 1;                    /* DEAD (or never published again) */
    if (rc < 0)
        return 0;                    /* a writer in the way: next pass */
    if (PRES_LIVE_STATE(s.live) == PRES_DS_CONNECTED && PRES_LIVE_EXPIRY(s.live) > nm)
        return 0;
    return pres__dev_stopped_at(m, &s) + MARGIN_MS <= nm;
}

/* Does record i (LIVE, word w) no longer count? */
static int live_done(pd_t *d, uint32_t i, uint64_t w, uint64_t nm)
{
    pres_map_t *m = &d->m;
    const pres_typ_t *r = &m->typs[i];
    if (PRES_TW_EXPIRY(w) + MARGIN_MS <= nm)
        return 1;
    uint32_t dev = pa_load(&r->dev);
    if (device_gone(m, dev, pa_load(&r->dgen), nm))
        return 1;
    /* Clients make a record LIVE only once its device's link names it:
     * one the link no longer names was replaced. */
    return pa_load_acquire(&m->devs[dev].typing) != PRES_LINK(i, pa_load(&r->gen));
}

static int typ_remove(pd_t *d, uint32_t i, void *ctx)
{
    uint64_t nm = *(const uint64_t *)ctx;
    pres_typ_t *r = &d->m.typs[i];
    uint64_t w = pa_load_acquire(&r->word);
    switch (PRES_TW_STATE(w)) {
    case PRES_TS_ENDED:
    case PRES_TS_DEAD:
        return 1;
    case PRES_TS_PENDING:
        if (pd_token_live(d, pa_load(&r->alloc)))
            return 0;                /* its writer is a few stores from done */
        break;
    default:
        if (!live_done(d, i, w, nm))
            return 0;
        break;
    }
    /* Fails if a client extended (or published) it meanwhile: it stays. */
    return pa_cas(&r->word, &w, PRES_TW_MAKE(PRES_TW_EXPIRY(w), PRES_TS_DEAD));
}

static void typ_removed(pd_t *d, uint32_t i, void *ctx)
{
    (void)ctx;
    pres_map_t *m = &d->m;
    /* Out of its chain, and out of its device's link too, before the grace
     * period starts: a client that enters a read section after the epoch
     * moves can reach it neither way, so it cannot be freed and reused
     * under a writer that read the link (the CAS fails if the link names
     * another record; a writer racing us on the link then looks again). */
    uint32_t dev = pa_load(&m->typs[i].dev);
    if (dev < m->dev_cap) {
        uint64_t link = PRES_LINK(i, pa_load(&m->typs[i].gen));
        pa_cas(&m->devs[dev].typing, &link, 0);
    }
    pa_store(&m->typs[i].alloc, PRES_ALLOC_RETIRED);
    pd_retire(d, i, PRES_RK_TYP);
}

/* Is record i in the chain of its conversation? */
static int typ_linked(pres_map_t *m, uint32_t i)
{
    const pres_typ_t *r = &m->typs[i];
    if (r->keylen < 1 || r->keylen > PRES_ID_MAX)
        return 0;
    uint64_t b = pres__hash(r->key, r->keylen, m->seed) & m->typ_mask;
    uint64_t l = pa_load_acquire(&m->typ_buckets[b]);
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l) && steps <= m->typ_cap; steps++) {
        uint32_t j = PRES_LINK_IDX(l);
        if (j >= m->typ_cap)
            return 0;
        if (j == i)
            return 1;
        l = pa_load_acquire(&m->typs[j].next);
    }
    return 0;
}

/* Records taken by a client that died before linking them.  (One it
 * linked is the chain pass's: PENDING under a dead token goes there.) */
static void table_sweep(pd_t *d)
{
    pres_map_t *m = &d->m;
    for (uint32_t i = 0; i < m->typ_cap; i++) {
        uint64_t a = pa_load(&m->typs[i].alloc);
        if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED || a == PRES_ALLOC_RETIRED ||
            pd_token_live(d, a) || typ_linked(m, i))
            continue;
        pd_log(LOG_DEBUG, "typing record %u: taken by a dead client, never linked", i);
        pa_store(&m->typs[i].alloc, PRES_ALLOC_RETIRED);
        pd_retire(d, i, PRES_RK_TYP);
    }
}

void pd_typing_tick(pd_t *d, uint64_t nm)
{
    pres_map_t *m = &d->m;
    pd_typing_t *ty = d->ty;
    uint64_t buckets = m->typ_mask + 1;
    /* Nobody typing and nothing to free: no pass (a million devices'
     * half million empty chains a second is not free). */
    if (ty->pos == 0 && !ty->sweep_soon && pd_in_use(d, PRES_RK_TYP) == 0)
        return;
    uint64_t chunk = buckets <= SMALL_INDEX ? buckets : (buckets + PASS_TICKS - 1) / PASS_TICKS;
    uint64_t end = ty->pos + chunk < buckets ? ty->pos + chunk : buckets;
    for (uint64_t b = ty->pos; b < end; b++) {
        pd_chain_t c = { &m->typ_buckets[b], m->typ_cap, typ_next, typ_gen,
                         typ_remove, typ_removed, &nm };
        if (pd_chain_sweep(d, &c) < 0)
            pd_log(LOG_DEBUG, "typing bucket %llu: damaged or contended, again next pass",
                   (unsigned long long)b);
    }
    ty->pos = end == buckets ? 0 : end;
    /* After the chain pass, so what it unlinked this tick is RETIRED. */
    if (ty->sweep_soon || nm - ty->last_sweep >= SWEEP_MS) {
        ty->sweep_soon = 0;
        ty->last_sweep = nm;
        table_sweep(d);
    }
}
