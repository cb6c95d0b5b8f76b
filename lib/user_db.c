/*
 * user_db.c - what a person sees of a user who is no longer in shared
 * memory: their devices were evicted after --retain-ms, so the user record
 * went too, and the LMDB mirror the daemon keeps is the only place that
 * still knows them (DESIGN.md property 9).
 *
 * The library opens the mirror read-only (lib/db.c: one environment per
 * process, shared by its handles), on the first lookup that needs it, from
 * the directory the daemon wrote into the store's header.  A process that
 * may not open that directory answers -ENOENT for such users: it cannot
 * tell them from users the store never knew.
 *
 * Such a user has no device in memory, so no device of theirs is
 * connected: status OFFLINE, no devices; their last seen is the one the
 * mirror holds.  The privacy rules are those of every other user
 * (lib/privacy.c), from the policy and lists the mirror holds; the
 * viewer's own policy (for reciprocity) comes from shared memory when the
 * viewer is there, else from the mirror.
 */
#include <stdlib.h>

#include "db.h"
#include "privacy.h"
#include "store.h"

/* The handle's mirror, opened once (under the handle's lock: two threads
 * asking at once open it once).  NULL: none this process may open now;
 * asked again next time, since the daemon may create it meanwhile. */
static pres_db_ro_t *mirror_of(pres_t *p)
{
    /* acquire: pairs with the release below, so the handle is complete. */
    pres_db_ro_t *db = __atomic_load_n(&p->db, __ATOMIC_ACQUIRE);
    if (db)
        return db;
    pthread_mutex_lock(&p->lock);
    db = __atomic_load_n(&p->db, __ATOMIC_ACQUIRE);
    if (!db) {
        /* The daemon writes the header's path at create and adopt; a
         * copy cut short by that write names no mirror and fails. */
        char dir[sizeof p->m.hdr->db_dir];
        memcpy(dir, p->m.hdr->db_dir, sizeof dir);
        dir[sizeof dir - 1] = '\0';
        if (dir[0] && pres__db_ro_open(dir, p->name, &db) == 0)
            __atomic_store_n(&p->db, db, __ATOMIC_RELEASE);
        else
            db = NULL;
    }
    pthread_mutex_unlock(&p->lock);
    return db;
}

void pres__user_db_close(pres_t *p)
{
    pres__db_ro_close(p->db);
    p->db = NULL;
}

/* A policy as the mirror stores it: the low byte of the policy word. */
static void policy_of(uint32_t w, uint64_t frozen, pres_pol_t *pol)
{
    memset(pol, 0, sizeof *pol);
    pol->set = (w & PRES_PV_SET) != 0;
    pol->last_seen = PRES_PV_SEEN(w);
    pol->online = PRES_PV_ONLINE(w);
    pol->approximate = (w & PRES_PV_APPROX) != 0;
    pol->reciprocal = (w & PRES_PV_RECIP) != 0;
    pol->invisible = (w & PRES_PV_INVISIBLE) != 0;
    pol->frozen_seen_ms = frozen;
}

static int listed(const char (*ids)[PRES_ID_MAX + 1], uint32_t n, const char *id)
{
    for (uint32_t k = 0; k < n && k < PRES_EXCEPTIONS_MAX; k++)
        if (strcmp(ids[k], id) == 0)
            return 1;
    return 0;
}

/* The viewer's own policy: from shared memory if the viewer is there (only
 * the flags matter, so the word alone), else from the mirror.  *has: the
 * viewer has a record at all. */
static int own_policy(pres_t *p, pres_db_ro_t *db, const char *vid, size_t vlen,
                      pres_db_user_t *tmp, pres_pol_t *own, int *has)
{
    const pres_map_t *m = &p->m;
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return -ENOSPC;
    int u = pres__idx_user_find(m, vid, vlen, pres__hash(vid, vlen, m->seed));
    uint64_t w = u >= 0 ? pa_load(&m->users[u].privacy) : 0;
    pres__gp_leave(t);
    *has = 0;
    if (u >= 0) {
        policy_of((uint32_t)(w & 0xffu), 0, own);
        *has = 1;
        return 0;
    }
    if (u != -ENOENT)
        return u;
    int rc = pres__db_ro_user(db, vid, tmp);
    if (rc == -ENOENT)
        return 0;
    if (rc < 0)
        return rc;
    policy_of(tmp->policy, 0, own);
    *has = 1;
    return 0;
}

static int view(pres_t *p, pres_db_ro_t *db, const char *user_id, const pres_viewer_t *viewer,
                pres_db_user_t *rec, pres_user_view_t *out)
{
    int rc = pres__db_ro_user(db, user_id, rec);
    if (rc < 0)
        return rc == -EPROTO ? rc : -ENOENT;
    pres_truth_t truth = { PV_OFFLINE, 0, rec->last_seen_ms };
    pres_viewer_ctx_t ctx = { .system = !viewer || !viewer->viewer_id };
    pres_pol_t target, own;
    int has_own = 0;
    policy_of(rec->policy, rec->frozen_seen_ms, &target);
    if (!ctx.system) {
        size_t vlen;
        const char *vid = viewer->viewer_id;
        if ((rc = pres__id_check(vid, &vlen)) < 0)
            return rc;
        ctx.self = strcmp(vid, user_id) == 0;
        ctx.is_contact = viewer->is_contact != 0;
        ctx.in_allow = listed(rec->allow, rec->n_allow, vid);
        ctx.in_deny = listed(rec->deny, rec->n_deny, vid);
        if (!ctx.self && (rc = own_policy(p, db, vid, vlen, rec + 1, &own, &has_own)) < 0)
            return rc == -EPROTO ? rc : -ENOENT;
        ctx.own = has_own ? &own : NULL;
    }
    pres_view_out_t o;
    pres__privacy_decide(&target, &truth, &ctx, pres__wall_of(&p->m, pres__mono_ms()), &o);
    out->status = o.status;
    out->seen = o.seen;
    out->last_seen_ms = o.last_seen_ms;
    out->devices = o.devices;
    return 0;
}

int pres__user_from_db(pres_t *p, const char *user_id, size_t len, const pres_viewer_t *viewer,
                       pres_user_view_t *out)
{
    (void)len;
    pres_db_ro_t *db = mirror_of(p);
    if (!db)
        return -ENOENT;
    /* Two records of up to 8 KiB each (the user's, the viewer's): off the
     * stack of whoever calls. */
    pres_db_user_t *rec = malloc(2 * sizeof *rec);
    if (!rec)
        return -ENOMEM;
    int rc = view(p, db, user_id, viewer, rec, out);
    free(rec);
    return rc;
}
