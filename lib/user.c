/*
 * user.c - what a user's devices add up to: status, devices, last seen.
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
 */
#include "store.h"

#define AGG_SEEN_MAX 256

/* The monotonic instant a device stopped being connected. */
static uint64_t stopped_at(const pres_map_t *m, const pres_snap_t *s)
{
    if (PRES_LIVE_STATE(s->live) == PRES_DS_DISCONNECTED) {
        int64_t mono = (int64_t)s->c.ended - pa_load(&m->hdr->wall_offset_ms);
        return mono > 0 ? (uint64_t)mono : 0;
    }
    return PRES_LIVE_EXPIRY(s->live);
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

    uint64_t l = pa_load_acquire(&m->users[u].dhead);
    if (l == PRES_LINK_RETIRED)
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
        if (pa_load(&d->user) != u || pres__dev_snap(m, i, &s) != 0)
            continue;
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
        uint64_t stop = stopped_at(m, &s);
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
