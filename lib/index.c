/*
 * index.c - the hash indexes (after Linux's hlist_nulls) and the gateway
 * table.
 *
 * Chains of 8-byte links {generation, index}; a chain ends in a nulls
 * marker naming its bucket.  Clients insert at the head only, with a CAS on
 * the bucket, after filling the record completely (the CAS publishes it).
 * Only the daemon removes: it unlinks a record by a CAS on the bucket (the
 * head, which clients also write) or a store into its predecessor (interior
 * links, which only the daemon writes), leaves the removed record's own
 * link intact so a reader standing on it walks on, and frees it only after
 * a grace period.  A reader checks the generation of every record it
 * reaches and the marker at the end: a mismatch means it was carried off
 * its chain (it restarts) or the region is damaged (-EPROTO after a few
 * restarts).  Every walk is bounded by the capacity.
 */
#include <sched.h>

#include "store.h"

#define RESTARTS 4

int pres__idx_dev_find(const pres_map_t *m, const char *key, size_t len, uint64_t h)
{
    uint64_t b = h & m->dev_mask;
    for (int r = 0; r < RESTARTS; r++) {
        /* acquire: the record's fields, written before the CAS that linked
         * it, are visible once we hold its link. */
        uint64_t l = pa_load_acquire(&m->dev_buckets[b]);
        uint32_t steps = 0;
        int found = -ENOENT, bad = 0;
        while (!PRES_LINK_IS_NULLS(l)) {
            uint32_t i = PRES_LINK_IDX(l);
            if (i >= m->dev_cap || ++steps > m->dev_cap)
                return -EPROTO;
            const pres_dev_t *d = &m->devs[i];
            if (pa_load(&d->gen) != PRES_LINK_GEN(l)) {
                bad = 1;
                break;
            }
            if (found < 0 && pres__key_eq(&d->keylen, d->key, key, len)) {
                unsigned st = PRES_LIVE_STATE(pa_load_acquire(&d->live));
                if (st == PRES_DS_CONNECTED || st == PRES_DS_DISCONNECTED)
                    return (int)i;
            }
            l = pa_load_acquire(&d->next);
        }
        if (!bad && PRES_LINK_CHAIN(l) == b)
            return found;
    }
    return -EPROTO;
}

static int user_scan(const pres_map_t *m, uint64_t l, uint64_t b, const char *key, size_t len)
{
    uint32_t steps = 0;
    while (!PRES_LINK_IS_NULLS(l)) {
        uint32_t i = PRES_LINK_IDX(l);
        if (i >= m->user_cap || ++steps > m->user_cap)
            return -EPROTO;
        const pres_user_t *u = &m->users[i];
        if (pa_load(&u->gen) != PRES_LINK_GEN(l))
            return -EAGAIN;
        if (pres__key_eq(&u->keylen, u->key, key, len) &&
            pa_load_acquire(&u->dhead) != PRES_LINK_RETIRED)
            return (int)i;
        l = pa_load_acquire(&u->next);
    }
    return PRES_LINK_CHAIN(l) == b ? -ENOENT : -EAGAIN;
}

int pres__idx_user_find(const pres_map_t *m, const char *key, size_t len, uint64_t h)
{
    uint64_t b = h & m->user_mask;
    for (int r = 0; r < RESTARTS; r++) {
        int rc = user_scan(m, pa_load_acquire(&m->user_buckets[b]), b, key, len);
        if (rc != -EAGAIN)
            return rc;
    }
    return -EPROTO;
}

/* A user record taken and not published (its user appeared meanwhile) is
 * kept for this handle's next new user; if the handle goes away first, the
 * daemon reclaims it with the handle's other unpublished records. */
static void spare_put(pres_t *p, uint32_t u)
{
    pthread_mutex_lock(&p->lock);
    for (size_t k = 0; k < sizeof p->spare_users / sizeof p->spare_users[0]; k++)
        if (!p->spare_users[k]) {
            p->spare_users[k] = u + 1;
            break;
        }
    pthread_mutex_unlock(&p->lock);
}

static uint32_t spare_get(pres_t *p)
{
    uint32_t u = UINT32_MAX;
    pthread_mutex_lock(&p->lock);
    for (size_t k = 0; k < sizeof p->spare_users / sizeof p->spare_users[0]; k++)
        if (p->spare_users[k]) {
            u = p->spare_users[k] - 1;
            p->spare_users[k] = 0;
            break;
        }
    pthread_mutex_unlock(&p->lock);
    return u;
}

/* Find the user or create it.  Insertion is serialised per bucket by the
 * CAS on its head: the CAS succeeds only if no record was inserted since we
 * scanned the whole chain, so two clients never both insert one user. */
int pres__idx_user_get(pres_t *p, const char *key, size_t len, uint32_t *out)
{
    pres_map_t *m = &p->m;
    uint64_t h = pres__hash(key, len, m->seed);
    uint64_t b = h & m->user_mask;
    uint32_t spare = UINT32_MAX;

    for (int r = 0; r < 1 << 16; r++) {
        uint64_t head = pa_load_acquire(&m->user_buckets[b]);
        int rc = user_scan(m, head, b, key, len);
        if (rc >= 0) {
            if (spare != UINT32_MAX)
                spare_put(p, spare);
            *out = (uint32_t)rc;
            return 0;
        }
        if (rc == -EPROTO)
            return rc;
        if (rc == -EAGAIN)
            continue;
        if (spare == UINT32_MAX && (spare = spare_get(p)) == UINT32_MAX &&
            (rc = pres__alloc_take(p, PRES_RK_USER, &spare)) < 0)
            return rc;
        pres_user_t *u = &m->users[spare];
        u->keylen = (uint8_t)len;
        memcpy(u->key, key, len);
        pa_store(&u->flags, 0);
        pa_store(&u->privacy, 0);
        pa_store(&u->last_seen, 0);
        pa_store(&u->status, 0);
        pa_store(&u->dhead, PRES_LINK_NULLS(spare));
        pa_store(&u->next, head);
        /* The CAS publishes the filled record (full barrier). */
        if (pa_cas(&m->user_buckets[b], &head, PRES_LINK(spare, pa_load(&u->gen)))) {
            pres_rs_t *t = pres__gp_slot(p);
            if (t)
                pres__count(t, PRES_C_USER_NEW);
            *out = spare;
            return 0;
        }
    }
    return -EPROTO;
}

void pres__idx_dev_link_hash(pres_map_t *m, uint32_t i, uint64_t h)
{
    pres_dev_t *d = &m->devs[i];
    uint64_t *bucket = &m->dev_buckets[h & m->dev_mask];
    uint64_t link = PRES_LINK(i, pa_load(&d->gen));
    uint64_t head = pa_load_acquire(bucket);
    do {
        pa_store(&d->next, head);
    } while (!pa_cas(bucket, &head, link));
}

/* ---- gateways: an open-addressed table, insert-only ---------------------- */

#define GW_STATE(s)   ((unsigned)((s) & 0xffu))
#define GW_FILLER(s)  ((unsigned)(((s) >> 8) & 0xffffffu))
#define GW_TAG(s)     ((uint32_t)((s) >> 32))

int pres__idx_gw_find(const pres_map_t *m, const char *key, size_t len)
{
    uint64_t h = pres__hash(key, len, m->seed ^ UINT64_C(0x6777));
    for (uint32_t k = 0; k < m->gw_cap; k++) {
        const pres_gw_t *g = &m->gws[(h + k) & (m->gw_cap - 1)];
        uint64_t s = pa_load_acquire(&g->state);
        if (GW_STATE(s) == PRES_GW_EMPTY)
            return -ENOENT;
        if (GW_STATE(s) == PRES_GW_READY && pres__key_eq(&g->keylen, g->key, key, len))
            return (int)((h + k) & (m->gw_cap - 1));
    }
    return -ENOENT;
}

/* Wait for an entry being filled by another client: it takes a few stores,
 * so this waits only for a process that was descheduled, or stopped, in
 * that window.  A dead filler's entry is turned into a tombstone (READY
 * with no key) by the daemon; we do not wait for it. */
static int gw_wait_filled(const pres_map_t *m, const pres_gw_t *g, uint64_t *s)
{
    for (int spin = 0; spin < 20000; spin++) {
        *s = pa_load_acquire(&g->state);
        if (GW_STATE(*s) != PRES_GW_FILLING)
            return 0;
        if (spin >= 64) {
            if (spin % 256 == 0 && !pres__client_alive(m, GW_FILLER(*s) - 1))
                return 1;
            sched_yield();
        } else {
            pa_pause();
        }
    }
    return -EBUSY;
}

int pres__idx_gw_get(pres_t *p, const char *key, size_t len)
{
    pres_map_t *m = &p->m;
    uint64_t h = pres__hash(key, len, m->seed ^ UINT64_C(0x6777));
    for (uint32_t k = 0; k < m->gw_cap; k++) {
        uint32_t i = (uint32_t)((h + k) & (m->gw_cap - 1));
        pres_gw_t *g = &m->gws[i];
        uint64_t s = pa_load_acquire(&g->state);
        if (GW_STATE(s) == PRES_GW_EMPTY) {
            /* The key's hash rides along, so a lookup of another key can
             * pass this entry without waiting for the filler. */
            uint64_t filling = PRES_GW_FILLING | ((uint64_t)p->latch << 8) |
                               ((uint64_t)(uint32_t)h << 32);
            if (pa_cas(&g->state, &s, filling)) {
                g->keylen = (uint8_t)len;
                memcpy(g->key, key, len);
                /* release: the key is complete before anyone matches it. */
                pa_store_release(&g->state, PRES_GW_READY);
                return (int)i;
            }
        }
        if (GW_STATE(s) == PRES_GW_FILLING && GW_TAG(s) != (uint32_t)h)
            continue;
        if (GW_STATE(s) == PRES_GW_FILLING) {
            int rc = gw_wait_filled(m, g, &s);
            if (rc < 0)
                return rc;
            if (rc == 1)
                continue;
        }
        if (GW_STATE(s) == PRES_GW_READY && pres__key_eq(&g->keylen, g->key, key, len))
            return (int)i;
    }
    return -ENOSPC;
}
