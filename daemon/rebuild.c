/*
 * rebuild.c - a store made again from LMDB when its region is gone (a
 * reboot) or damaged: every device offline, last seen and privacy kept.
 *
 * The records are filled in place, single-threaded, in the callback that
 * pres__region_create_filled calls before the store is published, so no
 * client sees it half made.  Every record a rebuild fills is taken from its
 * free-record ring as a client would take it (pres__alloc_take under the
 * daemon's client index), so the rings, the alloc words and the daemon's
 * adoption of the store (reaper.c, adopt_ring) see ordinary held records.
 *
 *   devices   LMDB's devices whose last seen is within --retain-ms (older
 *             ones would be evicted at once; LMDB keeps them): linked at
 *             the head of their hash chain and of their user's list,
 *             DISCONNECTED since the last seen LMDB holds, on their last
 *             gateway (an entry of the gateway table with no owner, which
 *             the next attach of that id takes).  A device LMDB says was
 *             connected was connected until at least the mirror's last
 *             commit (meta alive_ms, renewed every second): that is its
 *             last seen, and the mirror writes it back as disconnected.
 *   users     the users of those devices, and every user with a privacy
 *             policy (a policy outlives the devices); other users are
 *             answered from LMDB by the library.  Last seen as LMDB has
 *             it; the policy word and its block of exception entries (a
 *             HEAD, the allow entries, the deny entries) as
 *             pres_set_privacy would have written them.
 *
 * Counts: the records made are added to the readers file's folded
 * counters, as if published by a client that is gone, so pres_stats
 * counts them.  LMDB holding more than the capacities allow refuses the
 * rebuild (the daemon exits 1): a smaller store would silently lose data.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "atomics.h"
#include "clock.h"
#include "mirror.h"
#include "policy.h"
#include "store.h"

typedef struct {
    pd_t       *d;
    pd_db_t    *db;
    pres_t      as;            /* the daemon, as an allocator of records */
    uint64_t    nm, nw, alive, retain;
    uint64_t    devs, users, excs;            /* made */
    uint64_t    need_devs, need_users, need_excs;
    uint64_t    old, fixes;
    int         full;          /* a capacity was exceeded: count only */
    int         gw_full;
    uint32_t   *fix;           /* devices LMDB had connected */
    size_t      nfix, capfix;
    pres_db_user_t *scratch;
} rb_t;

static uint64_t mono_of(const rb_t *c, uint64_t wall)
{
    int64_t mono = (int64_t)wall - pa_load(&c->d->m.hdr->wall_offset_ms);
    if (mono < 0)
        return 0;
    return (uint64_t)mono > c->nm ? c->nm : (uint64_t)mono;
}

/* A new user record: linked at the head of its chain, no devices yet. */
static int user_make(rb_t *c, const char *id, size_t len, uint64_t h, uint32_t *out)
{
    pres_map_t *m = &c->d->m;
    uint32_t u;
    int rc = pres__alloc_take(&c->as, PRES_RK_USER, &u);
    if (rc < 0)
        return rc;
    pres_user_t *r = &m->users[u];
    r->keylen = (uint8_t)len;
    memcpy(r->key, id, len);
    r->flags = 0;
    r->privacy = 0;
    r->last_seen = 0;
    r->status = 0;
    r->dhead = PRES_LINK_NULLS(u);
    uint64_t *bucket = &m->user_buckets[h & m->user_mask];
    r->next = *bucket;
    *bucket = PRES_LINK(u, r->gen);
    c->users++;
    *out = u;
    return 0;
}

static int user_find(rb_t *c, const char *id, uint32_t *u, int make)
{
    pres_map_t *m = &c->d->m;
    size_t len = strlen(id);
    uint64_t h = pres__hash(id, len, m->seed);
    int i = pres__idx_user_find(m, id, len, h);
    if (i >= 0) {
        *u = (uint32_t)i;
        return 0;
    }
    if (i != -ENOENT || !make)
        return i;
    c->need_users++;
    if (c->full || c->users >= m->user_cap) {
        c->full = 1;
        return -ENOSPC;
    }
    return user_make(c, id, len, h, u);
}

/* The gateway table entry of an id ("" too: an entry without a key, as a
 * dead filler's tombstone is), READY and owned by nobody. */
static int gateway_of(rb_t *c, const char *id, uint32_t *g)
{
    int rc = pres__idx_gw_get(&c->as, id, strlen(id));
    if (rc < 0) {
        c->gw_full = 1;
        return rc;
    }
    *g = (uint32_t)rc;
    return 0;
}

/* A device LMDB says was connected ended no earlier than the mirror's last
 * commit; written back as such (users too) once the store runs. */
static uint64_t last_seen_of(const rb_t *c, const pres_db_dev_t *r)
{
    return r->connected && c->alive > r->last_seen_ms ? c->alive : r->last_seen_ms;
}

/* A device too old to keep that LMDB says was connected: its last seen
 * and its user's are corrected in LMDB directly (staged here, committed by
 * the mirror's first commit). */
static int fix_old(rb_t *c, const char *id, const pres_db_dev_t *r, uint64_t seen)
{
    pres_db_dev_t f = *r;
    f.connected = 0;
    f.last_seen_ms = seen;
    int rc = pd_db_put_device(c->db, id, &f);
    if (rc == 0 && pd_db_get_user(c->db, r->user_id, c->scratch) == 0 &&
        c->scratch->last_seen_ms < seen) {
        c->scratch->last_seen_ms = seen;
        rc = pd_db_put_user(c->db, r->user_id, c->scratch);
    }
    if (rc == 0)
        c->fixes++;
    return rc;
}

static void dev_fill(rb_t *c, uint32_t i, const char *id, uint32_t u, uint32_t g,
                     const pres_db_dev_t *r, uint64_t seen)
{
    pres_map_t *m = &c->d->m;
    pres_dev_t *d = &m->devs[i];
    size_t len = strlen(id);
    d->keylen = (uint8_t)len;
    memcpy(d->key, id, len);
    d->user = u;
    /* As connect_new starts them: a stale pres_ref_t of an earlier life of
     * the slot does not match. */
    d->cid[0] = (uint32_t)((d->gen * UINT32_C(2654435761)) >> 8) & 0xffffffu;
    d->ttl[0] = 1;
    d->conn[0] = (pres_conn_t){
        .gw = g, .flags = (uint32_t)(m->gws[g].died << 2),
        .connected_at = r->connected_at_ms, .ended = seen,
    };
    /* Monotonic, from boot: an activity before this boot is 0 here (the
     * mirror keeps LMDB's then). */
    d->activity = r->last_active_ms ? mono_of(c, r->last_active_ms) : 0;
    d->typing = 0;
    d->live = PRES_LIVE_MAKE(mono_of(c, seen), PRES_DS_DISCONNECTED, 0, 0);
    uint64_t link = PRES_LINK(i, d->gen);
    d->unext = m->users[u].dhead;
    m->users[u].dhead = link;
    pres__idx_dev_link_hash(m, i, pres__hash(id, len, m->seed));
}

static int fix_push(rb_t *c, uint32_t i)
{
    if (c->nfix == c->capfix) {
        size_t nc = c->capfix ? c->capfix * 2 : 1024;
        uint32_t *a = realloc(c->fix, nc * sizeof *a);
        if (!a)
            return -ENOMEM;
        c->fix = a;
        c->capfix = nc;
    }
    c->fix[c->nfix++] = i;
    return 0;
}

static int on_device(void *ctx, const char *id, const pres_db_dev_t *r)
{
    rb_t *c = ctx;
    pres_map_t *m = &c->d->m;
    uint64_t seen = last_seen_of(c, r);
    if (c->nw > seen && c->nw - seen > c->retain) {
        c->old++;
        return r->connected ? fix_old(c, id, r, seen) : 0;
    }
    c->need_devs++;
    if (c->full || c->devs >= m->dev_cap) {
        c->full = 1;
        return 0;
    }
    uint32_t u, g, i;
    int rc = user_find(c, r->user_id, &u, 1);
    if (rc == -ENOSPC)
        return 0;
    if (rc == 0 && (rc = gateway_of(c, r->gateway_id, &g)) == 0 &&
        (rc = pres__alloc_take(&c->as, PRES_RK_DEV, &i)) == 0) {
        dev_fill(c, i, id, u, g, r, seen);
        c->devs++;
        if (r->connected)
            rc = fix_push(c, i);
    }
    return rc;
}

/* The policy's block: a HEAD (counts, frozen last seen), then the allow
 * and deny entries, each linked to the next by index + 1. */
static int exc_take(rb_t *c, uint32_t kind, const char *id, uint32_t *out)
{
    pres_map_t *m = &c->d->m;
    int rc = pres__alloc_take(&c->as, PRES_RK_EXC, out);
    if (rc < 0)
        return rc;
    pres_exc_t *e = &m->excs[*out];
    size_t len = id ? strlen(id) : 0;
    /* Published with the store: a policy's entry, as a writer marks its
     * own after the CAS that publishes them (lib/policy.c). */
    e->alloc = PRES_ALLOC_HELD;
    e->kind = kind;
    e->next = 0;
    e->keylen = (uint8_t)len;
    if (len) {
        memcpy(e->key, id, len);
        e->hash = pres__exc_hash(m, id, len);
    } else {
        e->hash = 0;             /* the HEAD has no key */
    }
    c->excs++;
    return 0;
}

static int policy_fill(rb_t *c, uint32_t u, const pres_db_user_t *r)
{
    pres_map_t *m = &c->d->m;
    if (!(r->policy & PRES_PV_SET))
        return 0;
    uint64_t w = r->policy & 0xffu;
    int invisible = (r->policy & PRES_PV_INVISIBLE) != 0;
    if (r->n_allow || r->n_deny || invisible) {
        uint32_t head, prev, x;
        int rc = exc_take(c, PRES_EXC_HEAD, NULL, &head);
        if (rc < 0)
            return rc;
        pres_exc_t *h = &m->excs[head];
        h->n_allow = r->n_allow;
        h->n_deny = r->n_deny;
        h->frozen_seen = r->frozen_seen_ms;
        h->user = u;
        prev = head;
        for (uint32_t k = 0; k < r->n_allow + r->n_deny; k++) {
            int allow = k < r->n_allow;
            if ((rc = exc_take(c, allow ? PRES_EXC_ALLOW : PRES_EXC_DENY,
                               allow ? r->allow[k] : r->deny[k - r->n_allow], &x)) < 0)
                return rc;
            m->excs[prev].next = x + 1;
            prev = x;
        }
        w |= (uint64_t)(head + 1) << 32;
    }
    m->users[u].privacy = w;
    return 0;
}

static int on_user(void *ctx, const char *id, const pres_db_user_t *r)
{
    rb_t *c = ctx;
    pres_map_t *m = &c->d->m;
    int keep = (r->policy & PRES_PV_SET) != 0;
    uint32_t u;
    int rc = user_find(c, id, &u, keep);
    if (rc == -ENOENT || rc == -ENOSPC)
        return 0;            /* no device kept, no policy: LMDB answers it */
    if (rc < 0)
        return rc;
    uint64_t need = (r->policy & PRES_PV_SET) && (r->n_allow || r->n_deny ||
                                                  (r->policy & PRES_PV_INVISIBLE))
                        ? 1 + r->n_allow + r->n_deny : 0;
    c->need_excs += need;
    if (c->excs + need > m->exc_cap)
        c->full = 1;
    if (c->full)
        return 0;
    m->users[u].last_seen = r->last_seen_ms;
    return policy_fill(c, u, r);
}

/* After the walks: what the mirror needs to know of the records made. */
static void mirror_marks(rb_t *c)
{
    pd_t *d = c->d;
    pres_map_t *m = &d->m;
    uint64_t nw = pres__wall_of(m, c->nm);
    /* LMDB holds what was filled: each record's fingerprint, so that only
     * what changes from now on is written... */
    for (uint32_t i = 0; i < m->dev_cap; i++)
        if (pa_load(&m->devs[i].alloc) == c->as.token)
            pd_mirror_set_written(d, 0, i, pd_mirror_fp_dev(d, i, c->nm, nw));
    for (uint32_t u = 0; u < m->user_cap; u++)
        if (pa_load(&m->users[u].alloc) == c->as.token)
            pd_mirror_set_written(d, 1, u, pd_mirror_fp_user(d, u, c->nm, nw));
    /* ... except the devices LMDB had connected, offline now (and their
     * users' last seen with them). */
    for (size_t k = 0; k < c->nfix; k++) {
        pd_mirror_set_written(d, 0, c->fix[k], 0);
        pd_mirror_set_written(d, 1, m->devs[c->fix[k]].user, 0);
        pd_mirror_dev(d, c->fix[k]);
    }
}

static int fill(pres_map_t *m, void *ctx)
{
    rb_t *c = ctx;
    /* m is c->d->m; the allocator reads the store through its handle. */
    c->as.m = *m;
    int rc = pd_db_alive_ms(c->db, &c->alive);
    if (rc == -ENOENT)
        c->alive = 0;
    else if (rc < 0)
        return rc;
    c->nm = pres__mono_ms();
    c->nw = pres__wall_of(&c->d->m, c->nm);
    int sd = pd_db_each_device(c->db, on_device, c);
    if (sd < 0)
        return sd;
    int su = pd_db_each_user(c->db, on_user, c);
    if (su < 0)
        return su;
    if (sd + su > 0)
        pd_log(LOG_WARN, "rebuild: %d damaged LMDB records skipped (%s)", sd + su,
               pd_db_error(c->db));
    if (c->full || c->gw_full)
        return -ENOSPC;
    pres_rhdr_t *rh = c->d->m.rhdr;
    rh->folded[PRES_C_DEV_NEW] += c->devs;
    rh->folded[PRES_C_USER_NEW] += c->users;
    mirror_marks(c);
    return 0;
}

static void refuse(const rb_t *c, const pres_layout_params_t *lp)
{
    if (c->gw_full)
        pd_log(LOG_ERR, "rebuild: LMDB at %s names more gateways than the table holds "
                        "(%llu): raise --gateways", c->d->cfg.db,
               (unsigned long long)lp->gw_cap);
    if (c->need_devs > lp->dev_cap)
        pd_log(LOG_ERR, "rebuild: LMDB at %s holds %llu devices seen within --retain-ms, "
                        "more than --capacity %llu: raise it", c->d->cfg.db,
               (unsigned long long)c->need_devs, (unsigned long long)lp->dev_cap);
    else if (c->need_users > lp->user_cap)
        pd_log(LOG_ERR, "rebuild: LMDB at %s holds more users with devices or a privacy "
                        "policy than --users %llu: raise it", c->d->cfg.db,
               (unsigned long long)lp->user_cap);
    else if (c->need_excs > lp->exceptions)
        pd_log(LOG_ERR, "rebuild: LMDB at %s holds more privacy exception entries than "
                        "--exceptions %llu: raise it", c->d->cfg.db,
               (unsigned long long)lp->exceptions);
}

int pd_rebuild(pd_t *d, const pres_layout_params_t *lp)
{
    rb_t c;
    memset(&c, 0, sizeof c);
    c.d = d;
    c.db = pd_mirror_db(d);
    c.retain = d->cfg.retain_ms;
    /* The daemon takes records under its own client index; its slot's
     * generation is 0 in a new store. */
    c.as.latch = PRES_DAEMON_CLIENT + 1;
    c.as.token = PRES_TOKEN(PRES_DAEMON_CLIENT, 0);
    c.scratch = malloc(sizeof *c.scratch);
    uint64_t t0 = pres__mono_ms();
    int rc = c.scratch ? pd_mirror_alloc(d, (uint32_t)lp->dev_cap, (uint32_t)lp->user_cap)
                       : -ENOMEM;
    if (rc == 0)
        rc = pres__region_create_filled(&d->m, d->cfg.name, lp, fill, &c);
    free(c.scratch);
    free(c.fix);
    if (rc == -ENOSPC && (c.full || c.gw_full)) {
        refuse(&c, lp);
        return -1;
    }
    if (rc < 0) {
        pd_log(LOG_ERR, "cannot rebuild store '%s' from LMDB at %s: %s%s%s", d->cfg.name,
               d->cfg.db, strerror(-rc), pd_db_error(c.db)[0] ? ": " : "", pd_db_error(c.db));
        return -1;
    }
    pd_log(LOG_INFO, "rebuilt store '%s' from LMDB in %llu ms: %llu devices (all offline, "
                     "%llu were connected), %llu users, %llu exception entries; %llu devices "
                     "older than --retain-ms left in LMDB (%llu marked offline there)",
           d->cfg.name, (unsigned long long)(pres__mono_ms() - t0), (unsigned long long)c.devs,
           (unsigned long long)c.nfix, (unsigned long long)c.users, (unsigned long long)c.excs,
           (unsigned long long)c.old, (unsigned long long)c.fixes);
    return 0;
}
