/*
 * user.c - what a user's devices add up to (status, devices, last seen),
 * and what a person may see of it: pres_user.
 *
 * Computed at read time from the device records, like everything else
 * (property 4), so it never depends on the daemon being timely:
 *
 *  - status: ACTIVE_NOW if a connected device is active, else IDLE_NOW if
 *    one is connected, else OFFLINE.  A device is active when connected,
 *    not marked idle, and with an interaction within idle_after_ms.
 *  - damping: for offline_grace_ms after the last device stopped being
 *    connected, the status stays what it was at that moment (the status of
 *    the device that stopped last, at the instant it stopped), so a
 *    reconnect inside the grace is invisible.
 *  - last seen: the time of the call while a device is connected, else the
 *    latest of the devices' last seen and of the user record's (devices
 *    evicted from memory).
 *
 * pres_user then applies the privacy rules (lib/privacy.c, a pure
 * function) to that truth, fed with the user's policy and the viewer's own
 * (lib/policy.c).  The user's policy word is loaded once: every rule is
 * judged against one policy, old or new, never a mix.
 */
#include "policy.h"

#define AGG_SEEN_MAX 256

/* The monotonic instant a device (not connected now) stopped being
 * connected. */
uint64_t pres__dev_stopped_at(const pres_map_t *m, const pres_snap_t *s)
{
    uint64_t exp = PRES_LIVE_EXPIRY(s->live);
    if (PRES_LIVE_STATE(s->live) == PRES_DS_DISCONNECTED) {
        /* A disconnect ends the connection now, or, on a connection whose
         * TTL had passed, leaves `ended` at its last sign of life: it
         * stopped being connected at the expiry, which the live word keeps. */
        if (s->c.flags & PRES_CONN_LAPSED)
            return exp;
        int64_t mono = (int64_t)s->c.ended - pa_load(&m->hdr->wall_offset_ms);
        uint64_t end = mono > 0 ? (uint64_t)mono : 0;
        return end < exp ? end : exp;
    }
    return exp;
}

/* Was the device active at monotonic instant at? */
static int active_at(const pres_snap_t *s, uint64_t at, uint64_t idle_after)
{
    uint64_t act = PRES_ACT_TIME(s->activity);
    return !(s->activity & PRES_ACT_IDLE) && (idle_after == 0 || at < act + idle_after);
}

int pres__user_agg(const pres_map_t *m, uint32_t u, uint64_t nm, uint64_t nw, pres_agg_t *out)
{
    uint32_t seen[AGG_SEEN_MAX];
    size_t nseen = 0;
    uint64_t idle_after = pa_load(&m->hdr->idle_after_ms);
    uint64_t grace = pa_load(&m->hdr->offline_grace_ms);
    uint64_t last_stop = 0, next = UINT64_MAX;
    int raw = PRES_OFFLINE, at_stop = PRES_OFFLINE;
    unsigned devices = 0;
    uint64_t last_seen = pa_load(&m->users[u].last_seen);
    out->unsettled = 0;

    uint64_t l = pa_load_acquire(&m->users[u].dhead);
    if (PRES_LINK_NO_LIST(l))
        l = PRES_LINK_NULLS(u);
    for (uint32_t steps = 0; !PRES_LINK_IS_NULLS(l); steps++) {
        uint32_t i = PRES_LINK_IDX(l);
        if (i >= m->dev_cap || steps > m->dev_cap)
            return -EPROTO;
        const pres_dev_t *d = &m->devs[i];
        if (pa_load(&d->gen) != PRES_LINK_GEN(l))
            return -EAGAIN;
        pres_snap_t s;
        l = pa_load_acquire(&d->unext);
        if (pa_load(&d->user) != u)
            continue;
        if (pres__dev_snap(m, i, &s) != 0) {
            if (PRES_LIVE_STATE(pa_load(&d->live)) == PRES_DS_PENDING)
                out->unsettled = 1;
            continue;
        }
        /* A device superseded by a newer record may still be linked for
         * an instant: the first (newest) record of a key counts. */
        int dup = 0;
        for (size_t k = 0; k < nseen && !dup; k++)
            dup = pres__key_eq(&m->devs[seen[k]].keylen, m->devs[seen[k]].key,
                               d->key, d->keylen);
        if (dup)
            continue;
        if (nseen < AGG_SEEN_MAX)
            seen[nseen++] = i;
        uint64_t exp = PRES_LIVE_EXPIRY(s.live);
        if (PRES_LIVE_STATE(s.live) == PRES_DS_CONNECTED && exp > nm) {
            devices++;
            int act = active_at(&s, nm, idle_after);
            if (act && raw < PRES_ACTIVE_NOW)
                raw = PRES_ACTIVE_NOW;
            else if (raw < PRES_IDLE_NOW)
                raw = PRES_IDLE_NOW;
            if (exp < next)
                next = exp;
            if (act && idle_after) {
                uint64_t idle_at = PRES_ACT_TIME(s.activity) + idle_after;
                if (idle_at < next)
                    next = idle_at;
            }
            continue;
        }
        uint64_t stop = pres__dev_stopped_at(m, &s);
        uint64_t seen_ms = PRES_LIVE_STATE(s.live) == PRES_DS_DISCONNECTED
                               ? s.c.ended
                               : pres__wall_of(m, exp > s.ttl ? exp - s.ttl : 0);
        if (seen_ms > last_seen)
            last_seen = seen_ms;
        if (stop >= last_stop) {
            int st = active_at(&s, stop, idle_after) ? PRES_ACTIVE_NOW : PRES_IDLE_NOW;
            if (stop > last_stop || st > at_stop)
                at_stop = st;
            last_stop = stop;
        }
    }
    if (PRES_LINK_CHAIN(l) != u)
        return -EAGAIN;
    out->raw_status = raw;
    out->devices = devices;
    out->status = raw;
    if (devices) {
        out->last_seen_ms = nw;
    } else {
        out->last_seen_ms = last_seen;
        if (last_stop && nm < last_stop + grace) {
            out->status = at_stop;
            if (last_stop + grace < next)
                next = last_stop + grace;
        }
    }
    out->next_change = next;
    return 0;
}

/* ---- pres_user --------------------------------------------------------------- */

typedef struct {
    const char *id;          /* NULL: the system's view */
    size_t      len;
    uint32_t    hash;        /* of the id, for the exception lists */
    int         is_contact;
} viewer_key_t;

/* The viewer's own policy, for reciprocity: only its flags matter, so
 * neither its lists nor its block are read.  A viewer the store does not
 * know has no policy. */
static int own_policy(const pres_map_t *m, const viewer_key_t *v, pres_pol_t *own, int *has)
{
    int a, d;
    int vu = pres__idx_user_find(m, v->id, v->len, pres__hash(v->id, v->len, m->seed));
    *has = 0;
    if (vu == -ENOENT)
        return 0;
    if (vu < 0)
        return vu;
    uint64_t w = pa_load_acquire(&m->users[vu].privacy);
    *has = 1;
    return pres__policy_read(m, w, NULL, 0, 0, own, &a, &d);
}

/* Apply the privacy rules to user u's aggregate, as viewer v sees it. */
static int view_of(const pres_map_t *m, uint32_t u, const pres_agg_t *agg,
                   const viewer_key_t *v, uint64_t now_wall, pres_user_view_t *out)
{
    pres_truth_t truth = { agg->status, agg->devices, agg->last_seen_ms };
    pres_viewer_ctx_t ctx = { .system = v->id == NULL, .is_contact = v->is_contact != 0 };
    pres_pol_t target, own;
    pres_view_out_t o;
    int has_own = 0, rc;

    memset(&target, 0, sizeof target);
    if (!ctx.system)
        ctx.self = pres__key_eq(&m->users[u].keylen, m->users[u].key, v->id, v->len);
    if (!ctx.system && !ctx.self) {
        /* acquire: the block the word names is read as it was published. */
        uint64_t w = pa_load_acquire(&m->users[u].privacy);
        if ((rc = pres__policy_read(m, w, v->id, v->len, v->hash, &target,
                                    &ctx.in_allow, &ctx.in_deny)) < 0)
            return rc;
        if ((rc = own_policy(m, v, &own, &has_own)) < 0)
            return rc;
        ctx.own = has_own ? &own : NULL;
    }
    pres__privacy_decide(&target, &truth, &ctx, now_wall, &o);
    out->status = o.status;
    out->seen = o.seen;
    out->last_seen_ms = o.last_seen_ms;
    out->devices = o.devices;
    return 0;
}

static int user_view(const pres_map_t *m, const char *id, size_t len, const viewer_key_t *v,
                     pres_user_view_t *out)
{
    uint64_t h = pres__hash(id, len, m->seed);
    for (int tries = 0; tries < 8; tries++) {
        int u = pres__idx_user_find(m, id, len, h);
        if (u < 0)
            return u;
        uint64_t nm = pres__mono_ms(), nw = pres__wall_of(m, nm);
        pres_agg_t agg;
        int rc = pres__user_agg(m, (uint32_t)u, nm, nw, &agg);
        if (rc == -EAGAIN)
            continue;                /* carried off the list: look again */
        if (rc < 0)
            return rc;
        return view_of(m, (uint32_t)u, &agg, v, nw, out);
    }
    return -EPROTO;
}

PRES_API int pres_user(pres_t *p, const char *user_id, const pres_viewer_t *viewer,
                       pres_user_view_t *out)
{
    size_t len;
    int rc;
    viewer_key_t v = { NULL, 0, 0, 0 };
    if (!p || !out)
        return -EINVAL;
    if ((rc = pres__id_check(user_id, &len)) < 0)
        return rc;
    if (viewer && viewer->viewer_id) {
        v.id = viewer->viewer_id;
        if ((rc = pres__id_check(v.id, &v.len)) < 0)
            return rc;
        v.hash = pres__exc_hash(&p->m, v.id, v.len);
        v.is_contact = viewer->is_contact;
    }
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return -ENOSPC;
    rc = user_view(&p->m, user_id, len, &v, out);
    pres__gp_leave(t);
    if (rc == -ENOENT)
        rc = pres__user_from_db(p, user_id, len, viewer, out);
    return rc;
}
