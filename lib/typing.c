/*
 * typing.c - who is typing where: pres_typing and pres_typing_list.
 *
 * Typing belongs to a device, one conversation at a time.  A typing record
 * (region.h: pres_typ_t) names its device (index and generation), the
 * device's user, the conversation and when it started; its `word` holds
 * its state (PENDING, LIVE, ENDED, DEAD) and expiry, changed only by CAS.
 * Records sit in hash chains by conversation, after hlist_nulls like the
 * device index: clients insert at the head (a CAS of the bucket), only
 * presenced removes, and a chain ends in the marker naming its bucket.
 * The device's `typing` link names its current record, so a list answers
 * from the conversation's chain alone, without scanning devices.
 *
 * A record counts (pres_typing_list) only while all of these hold: its key
 * is the conversation, it is LIVE and its expiry has not passed, its
 * device still has the generation it names, the device's link still names
 * it, and the device is connected now on the very connection the typing
 * was typed on (typing ends with its connection).  So a
 * disconnect, an expiry, a reconnect or a move to another conversation
 * ends typing at once, at read time, whatever the daemon is doing.
 *
 * Start (a new record): take a record, fill it PENDING, link it at its
 * chain's head, CAS the device's link from what we read to it, then CAS it
 * LIVE.  Readers cannot count it before it is the device's current record
 * and LIVE, and the daemon leaves a PENDING record of a live writer alone.
 * If the link moved meanwhile (another thread typing on the same device)
 * our record becomes DEAD and we start again; the one whose CAS won is
 * current.  Then the replaced record is ENDED.  A repeat in the same
 * conversation within the TTL is one CAS that moves the expiry: no new
 * record, no event.  Stopping (ttl 0) is a CAS from LIVE to ENDED.
 */
#include "store.h"

/* What pres_typing needs of its device, read once. */
typedef struct {
    pres_t     *p;
    pres_rs_t  *t;
    uint32_t    dev;
    pres_snap_t s;
    uint64_t    nm, nw;
    const char *conv;
    size_t      clen;
    uint64_t    ch;          /* the conversation's hash */
} typing_t;

static int typ_key_eq(const pres_typ_t *r, const char *key, size_t len)
{
    return pres__key_eq(&r->keylen, r->key, key, len);
}

/* The record link l (device i's link, as read) names, if it is the record
 * of the device's current connection (snapshot s): its index, or -1. */
static int current_of(const pres_map_t *m, uint32_t i, const pres_snap_t *s, uint64_t l)
{
    const pres_dev_t *d = &m->devs[i];
    if (l == 0 || PRES_LINK_IS_NULLS(l))
        return -1;
    uint32_t r = PRES_LINK_IDX(l);
    if (r >= m->typ_cap)
        return -1;
    const pres_typ_t *t = &m->typs[r];
    /* The connection it was typed on is the device's current one: not a
     * reconnect (another cid) nor a revival after an expiry (another
     * connected_at).  Equality, not order: the wall clock may step. */
    if (pa_load(&t->gen) != PRES_LINK_GEN(l) || pa_load(&t->dev) != i ||
        pa_load(&t->dgen) != pa_load(&d->gen) || pa_load(&t->cid) != s->cid ||
        pa_load(&t->conn_at) != s->c.connected_at)
        return -1;
    return (int)r;
}

int pres__typ_current(const pres_map_t *m, uint32_t i, const pres_snap_t *s)
{
    /* acquire: the record the link names is seen as it was filled. */
    return current_of(m, i, s, pa_load_acquire(&m->devs[i].typing));
}

/* ---- events -------------------------------------------------------------
 * As for a device's changes, the seq is claimed before the change it
 * announces: a writer killed in between leaves a LOST event (watchers
 * resync), never a change nobody announced. */

/* Start (as a TYPING event) the one for record n going LIVE. */
static void typing_event(typing_t *x, pres_evc_t *c)
{
    pres_map_t *m = &x->p->m;
    const pres_dev_t *d = &m->devs[x->dev];
    uint32_t u = pa_load(&d->user), g = x->s.c.gw;
    pres_ev_t e = { .kind = PRES_EV_TYPING, .at_ms = x->nw,
                    .dev = d->key, .dlen = d->keylen <= PRES_ID_MAX ? d->keylen : 0,
                    .conv = x->conv, .clen = x->clen };
    if (u < m->user_cap && m->users[u].keylen <= PRES_ID_MAX) {
        e.user = m->users[u].key;
        e.ulen = m->users[u].keylen;
    }
    if (g < m->gw_cap && m->gws[g].keylen <= PRES_ID_MAX) {
        e.gw = m->gws[g].key;
        e.glen = m->gws[g].keylen;
    }
    pres__ev_publish(m, c, &e);
}

/* End record r (LIVE to ENDED by CAS) and announce it: the claim first,
 * then the CAS (lib/events.c, pres__ev_typ_stop).  1 if our CAS ended it. */
static int typ_end(typing_t *x, uint32_t r)
{
    pres_map_t *m = &x->p->m;
    uint64_t w = pa_load_acquire(&m->typs[r].word);
    if (PRES_TW_STATE(w) != PRES_TS_LIVE)
        return 0;
    int won = pres__ev_typ_stop(m, x->t->index + 1, r, w, x->s.c.gw, x->nw);
    if (won)
        pres__note(m, PRES_NOTE_TYP, r);
    return won;
}

static void typ_kill(pres_typ_t *r)
{
    uint64_t w = pa_load(&r->word);
    while (PRES_TW_STATE(w) != PRES_TS_DEAD &&
           !pa_cas(&r->word, &w, PRES_TW_MAKE(PRES_TW_EXPIRY(w), PRES_TS_DEAD)))
        ;
}

/* ---- start, extend, stop ----------------------------------------------- */

/* A repeat within the TTL: move the expiry of the current record.  1 done,
 * 0 not a repeat (start anew), -EAGAIN the record changed under us. */
static int typ_extend(typing_t *x, int cur, uint32_t ttl)
{
    if (cur < 0)
        return 0;
    pres_typ_t *r = &x->p->m.typs[cur];
    uint64_t w = pa_load_acquire(&r->word);
    if (PRES_TW_STATE(w) != PRES_TS_LIVE || PRES_TW_EXPIRY(w) <= x->nm ||
        !typ_key_eq(r, x->conv, x->clen))
        return 0;
    /* The expiry becomes now + ttl, as the call says (like a heartbeat, a
     * shorter TTL shortens it); no new record, no event.  Fails if the
     * daemon took the record (DEAD) or another writer moved or ended it
     * meanwhile: then look again. */
    return pa_cas(&r->word, &w, PRES_TW_MAKE(x->nm + ttl, PRES_TS_LIVE)) ? 1 : -EAGAIN;
}

static void typ_link_chain(pres_map_t *m, uint32_t n, uint64_t h)
{
    uint64_t *bucket = &m->typ_buckets[h & m->typ_mask];
    uint64_t link = PRES_LINK(n, pa_load(&m->typs[n].gen));
    uint64_t head = pa_load_acquire(bucket);
    do {
        pa_store(&m->typs[n].next, head);
        /* The CAS publishes the filled record (release). */
    } while (!pa_cas(bucket, &head, link));
}

static int typ_start(typing_t *x, uint64_t link_was, int cur, uint32_t ttl)
{
    pres_map_t *m = &x->p->m;
    pres_dev_t *d = &m->devs[x->dev];
    uint32_t n;
    int rc = pres__alloc_take(x->p, PRES_RK_TYP, &n);
    if (rc < 0)
        return rc;
    pres_typ_t *r = &m->typs[n];
    pa_store(&r->word, PRES_TW_MAKE(0, PRES_TS_PENDING));
    pa_store(&r->dev, x->dev);
    pa_store(&r->dgen, pa_load(&d->gen));
    pa_store(&r->user, pa_load(&d->user));
    pa_store(&r->started, x->nw);
    pa_store(&r->cid, x->s.cid);
    pa_store(&r->conn_at, x->s.c.connected_at);
    pa_store(&r->keylen, (uint8_t)x->clen);
    memcpy(r->key, x->conv, x->clen);
    typ_link_chain(m, n, x->ch);
    /* Current first, LIVE second: a record is never LIVE without having
     * been its device's current one, so the daemon may take any LIVE
     * record that its device's link does not name. */
    if (!pa_cas(&d->typing, &link_was, PRES_LINK(n, pa_load(&r->gen)))) {
        typ_kill(r);                 /* the daemon unlinks it */
        return -EAGAIN;
    }
    /* The replaced record ends first (its TYPING_STOP before our TYPING);
     * a writer killed here leaves it to the daemon, which ends a LIVE
     * record its device's link no longer names. */
    if (cur >= 0)
        typ_end(x, (uint32_t)cur);
    pres_evc_t c;
    pres__ev_claim(m, x->t->index + 1, &c);
    uint64_t w = PRES_TW_MAKE(0, PRES_TS_PENDING);
    if (!pa_cas(&r->word, &w, PRES_TW_MAKE(x->nm + ttl, PRES_TS_LIVE))) {
        pres__ev_abandon(m, &c);
        return -EAGAIN;
    }
    typing_event(x, &c);
    pres__note(m, PRES_NOTE_TYP, n);
    return 0;
}

static int typ_stop(typing_t *x, int cur)
{
    if (cur >= 0)
        typ_end(x, (uint32_t)cur);
    return 0;
}

/* One attempt on the device's current record.  -EAGAIN: look again. */
static int typing_at(typing_t *x, uint32_t ttl)
{
    pres_map_t *m = &x->p->m;
    int rc = pres__dev_snap(m, x->dev, &x->s);
    if (rc < 0)
        return rc;
    if (PRES_LIVE_STATE(x->s.live) != PRES_DS_CONNECTED || PRES_LIVE_EXPIRY(x->s.live) <= x->nm)
        return -ENOENT;
    uint64_t link = pa_load_acquire(&m->devs[x->dev].typing);
    int cur = current_of(m, x->dev, &x->s, link);
    if (ttl == 0) {
        /* Only typing in this conversation stops: a stop that raced a
         * move elsewhere leaves the move alone. */
        if (cur >= 0 && !typ_key_eq(&m->typs[cur], x->conv, x->clen))
            return 0;
        return typ_stop(x, cur);
    }
    rc = typ_extend(x, cur, ttl);
    if (rc == 0)
        rc = typ_start(x, link, cur, ttl);
    else if (rc == 1)
        rc = 0;
    if (rc == 0)
        pres__dev_interact(m, x->dev, x->nm);
    return rc;
}

PRES_API int pres_typing(pres_t *p, const char *device_id, const char *conversation_id,
                         uint32_t ttl_ms)
{
    size_t len;
    int rc;
    typing_t x = { .p = p, .conv = conversation_id };
    if (!p)
        return -EINVAL;
    if ((rc = pres__id_check(device_id, &len)) < 0 ||
        (rc = pres__id_check(conversation_id, &x.clen)) < 0)
        return rc;
    if (ttl_ms > PRES_TTL_MAX_MS)
        return -EINVAL;
    if (!p->rdwr)
        return -EROFS;
    if (!(x.t = pres__gp_enter(p)))
        return -ENOSPC;
    pres_map_t *m = &p->m;
    uint64_t h = pres__hash(device_id, len, m->seed);
    x.ch = pres__hash(conversation_id, x.clen, m->seed);
    rc = -EAGAIN;
    for (int tries = 0; tries < 16 && rc == -EAGAIN; tries++) {
        int i = pres__idx_dev_find(m, device_id, len, h);
        if (i < 0) {
            rc = i;
            break;
        }
        x.dev = (uint32_t)i;
        x.nm = pres__mono_ms();
        x.nw = pres__wall_of(m, x.nm);
        rc = typing_at(&x, ttl_ms);
    }
    pres__gp_leave(x.t);
    return rc == -EAGAIN ? -EBUSY : rc;
}

/* ---- listing ------------------------------------------------------------ */

/* The user record i stands for, if it counts now (see the top); -1 not. */
static int typ_counts(const pres_map_t *m, uint32_t i, const char *conv, size_t clen,
                      uint64_t nm)
{
    const pres_typ_t *r = &m->typs[i];
    if (!typ_key_eq(r, conv, clen))
        return -1;
    uint64_t w = pa_load_acquire(&r->word);
    if (PRES_TW_STATE(w) != PRES_TS_LIVE || PRES_TW_EXPIRY(w) <= nm)
        return -1;
    uint32_t dev = pa_load(&r->dev), u = pa_load(&r->user);
    pres_snap_t s;
    if (dev >= m->dev_cap || u >= m->user_cap || pres__dev_snap(m, dev, &s) != 0 ||
        PRES_LIVE_STATE(s.live) != PRES_DS_CONNECTED || PRES_LIVE_EXPIRY(s.live) <= nm ||
        pres__typ_current(m, dev, &s) != (int)i || pa_load(&m->devs[dev].user) != u)
        return -1;
    return (int)u;
}

/* Users already counted: the first TYP_SEEN in an array; beyond that (a
 * conversation with more people typing at once than that), by walking the
 * chain again up to the record. */
#define TYP_SEEN 256

typedef struct {
    const pres_map_t *m;
    const char *conv;
    size_t clen;
    uint64_t nm, bucket;
    uint32_t seen[TYP_SEEN];
    size_t nseen;
} list_t;

static int seen_before(const list_t *L, uint64_t first, uint32_t upto, int u)
{
    for (size_t k = 0; k < L->nseen; k++)
        if (L->seen[k] == (uint32_t)u)
            return 1;
    if (L->nseen < TYP_SEEN)
        return 0;
    uint64_t l = first;
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l) && steps <= L->m->typ_cap; steps++) {
        uint32_t j = PRES_LINK_IDX(l);
        if (j == upto || j >= L->m->typ_cap)
            break;
        if (typ_counts(L->m, j, L->conv, L->clen, L->nm) == u)
            return 1;
        l = pa_load_acquire(&L->m->typs[j].next);
    }
    return 0;
}

/* One walk of the chain.  -EAGAIN: carried off it (a record freed and
 * reused, or a marker of another chain): walk again. */
static int list_walk(list_t *L, char (*ids)[PRES_ID_MAX + 1], size_t cap, size_t *n)
{
    const pres_map_t *m = L->m;
    /* acquire: a record's fields, written before the CAS that linked it,
     * are visible once we hold its link. */
    uint64_t first = pa_load_acquire(&m->typ_buckets[L->bucket]), l = first;
    size_t count = 0;
    L->nseen = 0;
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l);) {
        uint32_t i = PRES_LINK_IDX(l);
        if (i >= m->typ_cap || ++steps > m->typ_cap)
            return -EPROTO;
        const pres_typ_t *r = &m->typs[i];
        if (pa_load(&r->gen) != PRES_LINK_GEN(l))
            return -EAGAIN;
        int u = typ_counts(m, i, L->conv, L->clen, L->nm);
        if (u >= 0 && !seen_before(L, first, i, u)) {
            if (L->nseen < TYP_SEEN)
                L->seen[L->nseen++] = (uint32_t)u;
            if (count < cap)
                pres__key_out(ids[count], m->users[u].keylen, m->users[u].key);
            count++;
        }
        l = pa_load_acquire(&r->next);
    }
    if (PRES_LINK_CHAIN(l) != L->bucket)
        return -EAGAIN;
    *n = count;
    return 0;
}

PRES_API int pres_typing_list(pres_t *p, const char *conversation_id,
                              char (*user_ids)[PRES_ID_MAX + 1], size_t cap, size_t *n)
{
    list_t L;
    int rc;
    if (!p || !n || (cap && !user_ids))
        return -EINVAL;
    if ((rc = pres__id_check(conversation_id, &L.clen)) < 0)
        return rc;
    *n = 0;
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return -ENOSPC;
    L.m = &p->m;
    L.conv = conversation_id;
    L.nm = pres__mono_ms();
    L.bucket = pres__hash(conversation_id, L.clen, p->m.seed) & p->m.typ_mask;
    rc = -EAGAIN;
    for (int r = 0; r < 4 && rc == -EAGAIN; r++)
        rc = list_walk(&L, user_ids, cap, n);
    pres__gp_leave(t);
    return rc == -EAGAIN ? -EPROTO : rc;
}
