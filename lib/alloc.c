/*
 * alloc.c - taking a free record from the daemon's rings.
 *
 * The daemon is the only producer of free records (it frees them after a
 * grace period); clients consume.  Consumption is one CAS on the ring slot
 * that writes the consumer's client index into the slot together with the
 * lap, then a CAS that moves the shared consumer cursor on (any consumer
 * that finds a taken slot moves the cursor past it, so a consumer killed
 * between the two CASes delays nobody).  Then the consumer claims the
 * record by storing its token into the record's alloc word.
 *
 * Crash: a consumer killed after taking the slot and before claiming the
 * record leaves a slot naming it and a record whose alloc word is still
 * PRES_ALLOC_FREE: the daemon, walking taken slots before it reuses them,
 * returns such a record to its pool once the kernel says the consumer is
 * dead.  No record is ever lost or handed out twice.
 */
#include "store.h"

int pres__alloc_take(pres_t *p, int kind, uint32_t *idx)
{
    pres_map_t *m = &p->m;
    pres_hdr_t *h = m->hdr;
    uint64_t *ring = m->ring[kind];
    uint64_t rmask = m->rmask[kind];
    unsigned shift = m->rshift[kind];
    uint64_t *cons = &h->ring[kind].cons;
    uint64_t *prod = &h->prod[kind];
    uint32_t cap = m->rcap[kind];

    /* Each failed round means another consumer made progress (lock-free);
     * the bound only turns a damaged ring into -EPROTO instead of a hang. */
    for (int round = 0; round < 1 << 20; round++) {
        uint64_t c = pa_load_acquire(cons);
        /* acquire: the slot written before the daemon moved prod is seen. */
        uint64_t pr = pa_load_acquire(prod);
        if (c >= pr)
            return c == pr ? -ENOSPC : -EPROTO;
        uint64_t *slot = &ring[c & rmask];
        uint64_t s = pa_load_acquire(slot);
        uint32_t lap = (uint32_t)((c >> shift) & 0xffffffu);
        if (PRES_RING_LAP(s) != lap) {
            /* Our cursor is stale (the slot is already a later lap's). */
            continue;
        }
        if (PRES_RING_OWNER1(s) != 0) {
            /* Taken: help the cursor past it. */
            pa_cas(cons, &c, c + 1);
            continue;
        }
        uint32_t i = PRES_RING_IDX(s);
        if (i >= cap)
            return -EPROTO;
        uint64_t taken = s | ((uint64_t)p->latch << 26);
        if (!pa_cas(slot, &s, taken))
            continue;
        pa_cas(cons, &c, c + 1);
        /* The record is ours: claim it for the daemon's bookkeeping. */
        pa_store(pres__alloc_word(m, kind, i), p->token);
        *idx = i;
        return 0;
    }
    return -EPROTO;
}

uint64_t pres__alloc_avail(const pres_t *p, int kind)
{
    const pres_hdr_t *h = p->m.hdr;
    uint64_t c = pa_load(&h->ring[kind].cons), pr = pa_load(&h->prod[kind]);
    return pr > c ? pr - c : 0;
}
