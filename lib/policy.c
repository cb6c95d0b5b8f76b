/*
 * policy.c - privacy policies in the store: pres_set_privacy, and the walk
 * of a policy that pres_user, presenced and `presencectl check` share.
 *
 * A user's policy is one 64-bit word in the user record (region.h: the
 * audiences and flags, and the index of the policy's first exception
 * entry), so replacing a policy is one CAS and a reader sees the old policy
 * or the new one, never half of each.  What does not fit in the word goes
 * into a block of exception entries: a HEAD (the list lengths and the last
 * seen frozen by invisibility), then the allow entries, then the deny
 * entries, linked by index.  A policy with neither lists nor invisibility
 * needs no block: the word is all of it, and user records do not grow.
 *
 * Writing (pres_set_privacy): take the block's entries from the daemon's
 * ring, fill them completely, and publish them with one CAS of the word
 * (release: every entry is written before the word names it).  A published
 * block is immutable.  The writer whose CAS replaced a block marks its
 * entries RETIRED, and presenced frees them after a grace period, so a
 * reader standing on the old block reads it to the end.  The writer then
 * marks its own entries HELD (owned by the policy, no longer by the
 * writer), which is how presenced tells a replaced block whose replacer
 * died before retiring it from one still being written.
 *
 * Reading (pres__policy_read): one acquire load of the word inside a read
 * section, then at most 1 + 64 + 64 entries, every index checked: a
 * damaged block is -EPROTO, never a wild read or a loop.
 *
 * doc/region.md, "Privacy", has the invariants and what presenced does for
 * writers killed at any point.
 */
#include "policy.h"

/* ---- reading ------------------------------------------------------------ */

static const pres_exc_t *entry(const pres_map_t *m, uint32_t i1)
{
    return i1 >= 1 && i1 <= m->exc_cap ? &m->excs[i1 - 1] : NULL;
}

static const pres_exc_t *head_of(const pres_map_t *m, uint64_t w, uint32_t *na, uint32_t *nd)
{
    const pres_exc_t *h = entry(m, PRES_PV_HEAD(w));
    if (!h || pa_load(&h->kind) != PRES_EXC_HEAD)
        return NULL;
    *na = pa_load(&h->n_allow);
    *nd = pa_load(&h->n_deny);
    return *na <= PRES_EXCEPTIONS_MAX && *nd <= PRES_EXCEPTIONS_MAX ? h : NULL;
}

int pres__policy_block(const pres_map_t *m, uint64_t w, uint32_t *idx, size_t *n)
{
    uint32_t na, nd;
    *n = 0;
    if (!PRES_PV_HEAD(w))
        return 0;
    const pres_exc_t *e = head_of(m, w, &na, &nd);
    if (!e)
        return -EPROTO;
    idx[0] = PRES_PV_HEAD(w) - 1;
    uint32_t nx = pa_load(&e->next);
    for (uint32_t k = 0; k < na + nd; k++) {
        /* The counts bound the walk: a cycle runs out of them. */
        if (!(e = entry(m, nx)) || pa_load(&e->kind) != (k < na ? PRES_EXC_ALLOW : PRES_EXC_DENY))
            return -EPROTO;
        idx[k + 1] = nx - 1;
        nx = pa_load(&e->next);
    }
    if (nx != 0)
        return -EPROTO;
    *n = 1 + na + nd;
    return 0;
}

int pres__policy_read(const pres_map_t *m, uint64_t w, const char *vkey, size_t vlen,
                      uint32_t vhash, pres_pol_t *pol, int *in_allow, int *in_deny)
{
    memset(pol, 0, sizeof *pol);
    *in_allow = *in_deny = 0;
    if (!(w & PRES_PV_SET))
        return 0;
    pol->set = 1;
    pol->last_seen = PRES_PV_SEEN(w);
    pol->online = PRES_PV_ONLINE(w);
    pol->approximate = (w & PRES_PV_APPROX) != 0;
    pol->reciprocal = (w & PRES_PV_RECIP) != 0;
    pol->invisible = (w & PRES_PV_INVISIBLE) != 0;
    if (!PRES_PV_HEAD(w))
        return 0;
    uint32_t na, nd;
    const pres_exc_t *e = head_of(m, w, &na, &nd);
    if (!e)
        return -EPROTO;
    pol->frozen_seen_ms = pa_load(&e->frozen_seen);
    if (!vkey)
        return 0;
    uint32_t nx = pa_load(&e->next), at = PRES_PV_HEAD(w);
    for (uint32_t k = 0; k < na + nd; k++) {
        int allow = k < na;
        /* A block's entries are taken one after the other from the ring,
         * so they often sit at neighbouring indexes: when the list steps by
         * one, fetch a few steps ahead (a hint; the walk checks every
         * index it follows). */
        int64_t step = (int64_t)nx - (int64_t)at, ahead = (int64_t)nx - 1 + 6 * step;
        if ((step == 1 || step == -1) && ahead >= 0 && ahead < (int64_t)m->exc_cap)
            __builtin_prefetch(&m->excs[ahead]);
        at = nx;
        if (!(e = entry(m, nx)) || pa_load(&e->kind) != (allow ? PRES_EXC_ALLOW : PRES_EXC_DENY))
            return -EPROTO;
        /* The hash rejects all but the viewer's own entry without touching
         * the key. */
        if (pa_load(&e->hash) == vhash && pres__key_eq(&e->keylen, e->key, vkey, vlen)) {
            if (!allow) {
                *in_deny = 1;        /* deny beats allow: nothing more to learn */
                return 0;
            }
            *in_allow = 1;
        }
        nx = pa_load(&e->next);
    }
    return nx == 0 ? 0 : -EPROTO;
}

/* ---- writing ------------------------------------------------------------ */

static int policy_check(const pres_privacy_t *pol)
{
    size_t len;
    int rc = pres__privacy_valid(pol->last_seen, pol->online, pol->approximate,
                                 pol->reciprocal, pol->invisible);
    if (rc < 0)
        return rc;
    if (pol->n_allow > PRES_EXCEPTIONS_MAX || pol->n_deny > PRES_EXCEPTIONS_MAX)
        return -E2BIG;
    if ((pol->n_allow && !pol->allow) || (pol->n_deny && !pol->deny))
        return -EINVAL;
    for (size_t k = 0; k < pol->n_allow; k++)
        if ((rc = pres__id_check(pol->allow[k], &len)) < 0)
            return rc;
    for (size_t k = 0; k < pol->n_deny; k++)
        if ((rc = pres__id_check(pol->deny[k], &len)) < 0)
            return rc;
    return 0;
}

typedef struct {
    uint32_t idx[PRES_PV_BLOCK_MAX];
    size_t   n;
} block_t;

/* Entries taken and never published go back through the daemon: RETIRED,
 * and a note so that it looks soon.  (Clients never offer records; a
 * writer killed before this leaves entries under its token, which the
 * daemon takes back once the kernel says it is dead.) */
static void block_give_back(pres_t *p, const block_t *b, uint32_t u)
{
    for (size_t k = 0; k < b->n; k++)
        pa_store_release(&p->m.excs[b->idx[k]].alloc, PRES_ALLOC_RETIRED);
    if (b->n)
        pres__note(&p->m, PRES_NOTE_USER, u);
}

static int block_take(pres_t *p, block_t *b, size_t need, uint32_t u)
{
    b->n = 0;
    /* Plainly too few: refuse before taking, rather than take what there
     * is and hold it from others for a grace period. */
    if (need && pres__alloc_avail(p, PRES_RK_EXC) < need)
        return -ENOSPC;
    for (; b->n < need; b->n++) {
        int rc = pres__alloc_take(p, PRES_RK_EXC, &b->idx[b->n]);
        if (rc < 0) {
            block_give_back(p, b, u);
            return rc;
        }
    }
    return 0;
}

static void entry_fill(pres_map_t *m, uint32_t i, uint32_t kind, const char *id, uint32_t next1)
{
    pres_exc_t *e = &m->excs[i];
    size_t len = strnlen(id, PRES_ID_MAX);
    pa_store(&e->kind, kind);
    pa_store(&e->hash, pres__exc_hash(m, id, len));
    pa_store(&e->keylen, (uint8_t)len);
    memcpy(e->key, id, len);
    pa_store(&e->next, next1);
}

/* Fill an unpublished block completely: HEAD, allow entries, deny entries.
 * The frozen time is the publisher's to set, CAS by CAS. */
static void block_fill(pres_map_t *m, const block_t *b, uint32_t u, const pres_privacy_t *pol)
{
    if (!b->n)
        return;
    pres_exc_t *h = &m->excs[b->idx[0]];
    pa_store(&h->kind, (uint32_t)PRES_EXC_HEAD);
    pa_store(&h->n_allow, (uint32_t)pol->n_allow);
    pa_store(&h->n_deny, (uint32_t)pol->n_deny);
    pa_store(&h->user, u);
    pa_store(&h->hash, 0u);
    pa_store(&h->keylen, (uint8_t)0);
    pa_store(&h->frozen_seen, 0);
    pa_store(&h->next, b->n > 1 ? b->idx[1] + 1 : 0);
    for (size_t k = 1; k < b->n; k++) {
        int allow = k - 1 < pol->n_allow;
        const char *id = allow ? pol->allow[k - 1] : pol->deny[k - 1 - pol->n_allow];
        entry_fill(m, b->idx[k], allow ? PRES_EXC_ALLOW : PRES_EXC_DENY, id,
                   k + 1 < b->n ? b->idx[k + 1] + 1 : 0);
    }
}

/* The last seen an invisible policy shows: kept from the policy it
 * replaces if that was invisible too, else the user's last seen now. */
static int frozen_of(const pres_map_t *m, uint32_t u, uint64_t w, uint64_t *out)
{
    uint32_t na, nd;
    if ((w & PRES_PV_SET) && (w & PRES_PV_INVISIBLE) && PRES_PV_HEAD(w)) {
        const pres_exc_t *h = head_of(m, w, &na, &nd);
        if (!h)
            return -EPROTO;
        *out = pa_load(&h->frozen_seen);
        return 0;
    }
    for (int tries = 0; tries < 8; tries++) {
        pres_agg_t a;
        uint64_t nm = pres__mono_ms();
        int rc = pres__user_agg(m, u, nm, pres__wall_of(m, nm), &a);
        if (rc == 0)
            *out = a.last_seen_ms;
        if (rc != -EAGAIN)
            return rc;
    }
    return -EPROTO;
}

/* Replace user u's policy word by one naming block b: one CAS, retried
 * while other writers replace it first (the frozen time is worked out
 * again against each policy it replaces).  *old: the word replaced. */
static int publish(pres_map_t *m, uint32_t u, const block_t *b, const pres_privacy_t *pol,
                   uint64_t *old)
{
    uint64_t flags = (pol->approximate ? PRES_PV_APPROX : 0) |
                     (pol->reciprocal ? PRES_PV_RECIP : 0) |
                     (pol->invisible ? PRES_PV_INVISIBLE : 0);
    uint64_t want = PRES_PV_MAKE(pol->last_seen, pol->online, flags, b->n ? b->idx[0] + 1 : 0);
    uint64_t *word = &m->users[u].privacy;
    for (int r = 0; r < 1 << 16; r++) {
        /* acquire: the replaced block's HEAD (its frozen time) is read
         * complete. */
        uint64_t w = pa_load_acquire(word);
        if (b->n && pol->invisible) {
            uint64_t fz = 0;
            int rc = frozen_of(m, u, w, &fz);
            if (rc < 0)
                return rc;
            pa_store(&m->excs[b->idx[0]].frozen_seen, fz);
        }
        /* The CAS publishes the block (release: its entries are written
         * before a reader can find them through the word). */
        if (pa_cas(word, &w, want)) {
            *old = w;
            return 0;
        }
    }
    return -EPROTO;
}

/* After publishing on user u: is u still a user?  The daemon retires a
 * user without devices or policy by a CAS of its device-list head to
 * RETIRING, a full fence, a load of the privacy word (zero: go on to
 * RETIRED; else back to empty).  We CAS the word, fence, load the head: by
 * the fences, either the daemon sees our policy and keeps the user, or we
 * see RETIRING, and undo it (its CAS to RETIRED then fails), or RETIRED:
 * the policy went to a record already gone, and is set again on the
 * user's successor. */
static int user_stays(pres_map_t *m, uint32_t u)
{
    pa_fence();
    uint64_t dh = pa_load(&m->users[u].dhead);
    while (dh == PRES_LINK_RETIRING)
        if (pa_cas(&m->users[u].dhead, &dh, PRES_LINK_NULLS(u)))
            return 1;
    return dh != PRES_LINK_RETIRED;
}

/* The block a CAS replaced: exactly one writer replaced it (the one whose
 * CAS expected it), and that writer retires it.  Readers may still stand
 * on it: the daemon frees it only after a grace period.  A replaced
 * block's setter may be marking it HELD meanwhile: its CAS from its token
 * fails against RETIRED, and RETIRED stored over HELD is what we want. */
static void block_retire(pres_map_t *m, uint64_t w)
{
    uint32_t idx[PRES_PV_BLOCK_MAX];
    size_t n;
    if (pres__policy_block(m, w, idx, &n) < 0)
        return;                      /* damaged: presencectl check reports it */
    for (size_t k = 0; k < n; k++)
        pa_store_release(&m->excs[idx[k]].alloc, PRES_ALLOC_RETIRED);
}

/* Published and kept: the entries are the policy's now, not ours. */
static void block_hold(pres_t *p, const block_t *b)
{
    for (size_t k = 0; k < b->n; k++) {
        uint64_t tok = p->token;
        pa_cas(&p->m.excs[b->idx[k]].alloc, &tok, PRES_ALLOC_HELD);
    }
}

static int set_policy(pres_t *p, const char *user_id, size_t len, const pres_privacy_t *pol)
{
    pres_map_t *m = &p->m;
    size_t need = pol->n_allow || pol->n_deny || pol->invisible
                      ? 1 + pol->n_allow + pol->n_deny : 0;
    /* Each round but the last found its user retired under it, which the
     * daemon does only to a user without devices or policy seen empty on
     * two passes: a round or two at most. */
    for (int round = 0; round < 8; round++) {
        uint32_t u;
        block_t b;
        uint64_t old;
        int rc = pres__idx_user_get(p, user_id, len, &u);
        if (rc < 0)
            return rc;
        if ((rc = block_take(p, &b, need, u)) < 0)
            return rc;
        block_fill(m, &b, u, pol);
        if ((rc = publish(m, u, &b, pol, &old)) < 0) {
            block_give_back(p, &b, u);
            return rc;
        }
        int stays = user_stays(m, u);
        block_retire(m, old);
        if (stays)
            block_hold(p, &b);
        /* The daemon frees what we retired, and mirrors the policy. */
        pres__note(m, PRES_NOTE_USER, u);
        if (stays)
            return 0;
        /* Ours goes with the retired record: set it again on a new one. */
    }
    return -EPROTO;
}

PRES_API int pres_set_privacy(pres_t *p, const char *user_id, const pres_privacy_t *pol)
{
    size_t len;
    int rc;
    if (!p || !pol)
        return -EINVAL;
    if ((rc = pres__id_check(user_id, &len)) < 0 || (rc = policy_check(pol)) < 0)
        return rc;
    if (!p->rdwr)
        return -EROFS;
    /* One read section for the whole change: no record we found (the
     * user, the replaced block) is freed and reused before our CAS. */
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return -ENOSPC;
    rc = set_policy(p, user_id, len, pol);
    pres__gp_leave(t);
    return rc;
}
