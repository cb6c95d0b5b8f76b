/*
 * handle.c - opening and closing a store, gateways, counters.
 */
#include <stdio.h>
#include <stdlib.h>

#include "store.h"

PRES_API int pres_open(pres_t **out, const char *name, int flags)
{
    if (!out || (flags != PRES_RDONLY && flags != PRES_RDWR))
        return -EINVAL;
    *out = NULL;
    name = pres__region_default_name(name);
    if (!pres__region_name_ok(name))
        return -EINVAL;
    pres_t *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->rdwr = flags == PRES_RDWR;
    pthread_mutex_init(&p->lock, NULL);
    snprintf(p->name, sizeof p->name, "%s", name);
    int rc = pres__region_map(&p->m, name, p->rdwr);
    if (rc < 0)
        goto fail;
    if ((rc = pres__gp_client_register(p)) < 0)
        goto fail_unmap;
    *out = p;
    return 0;
fail_unmap:
    pres__region_unmap(&p->m);
fail:
    pthread_mutex_destroy(&p->lock);
    free(p);
    return rc;
}

PRES_API void pres_close(pres_t *p)
{
    if (!p)
        return;
    pres__gp_client_release(p);
    pres__user_db_close(p);
    pres__region_unmap(&p->m);
    pthread_mutex_destroy(&p->lock);
    free(p->rslots);
    free(p);
}

PRES_API int pres_gateway_attach(pres_t *p, const char *gateway_id)
{
    size_t len;
    int rc;
    if (!p)
        return -EINVAL;
    if ((rc = pres__id_check(gateway_id, &len)) < 0)
        return rc;
    if (!p->rdwr)
        return -EROFS;
    pres_rs_t *t = pres__gp_enter(p);
    if (!t)
        return -ENOSPC;
    int g = pres__idx_gw_get(p, gateway_id, len);
    if (g >= 0) {
        pthread_mutex_lock(&p->lock);
        size_t k = 0;
        while (k < p->n_gws && p->gws[k] != (uint32_t)g)
            k++;
        if (k == p->n_gws && p->n_gws == sizeof p->gws / sizeof p->gws[0]) {
            rc = -ENOSPC;
        } else {
            if (k == p->n_gws)
                p->gws[p->n_gws++] = (uint32_t)g;
            /* Takes the id over from any earlier owner: the daemon judges
             * deaths by the owner it finds here. */
            pa_store_release(&p->m.gws[g].owner, p->token);
            rc = 0;
        }
        pthread_mutex_unlock(&p->lock);
    } else {
        rc = g;
    }
    pres__gp_leave(t);
    return rc;
}

PRES_API int pres_stats(pres_t *p, pres_stats_t *out)
{
    if (!p || !out)
        return -EINVAL;
    const pres_map_t *m = &p->m;
    const pres_dcounters_t *dc = &m->hdr->dc;
    uint64_t c[PRES_C_COUNT];
    for (int k = 0; k < PRES_C_COUNT; k++)
        c[k] = pa_load(&m->rhdr->folded[k]);
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++) {
        if (!pa_load(&m->rslots[i].owner))
            continue;
        for (int k = 0; k < PRES_C_COUNT; k++)
            c[k] += pa_load(&m->rslots[i].counters[k]);
    }
    memset(out, 0, sizeof *out);
    out->capacity = m->dev_cap;
    /* Held now: published minus superseded or evicted (a sum read while
     * others write may be off by what happens during the call). */
    int64_t dv = (int64_t)(c[PRES_C_DEV_NEW] + pa_load(&dc->devices_adjust) -
                           c[PRES_C_DEV_GONE] - pa_load(&dc->devices_gone));
    int64_t us = (int64_t)(c[PRES_C_USER_NEW] + pa_load(&dc->users_adjust) -
                           pa_load(&dc->users_gone));
    out->devices = dv > 0 ? (uint64_t)dv : 0;
    out->users = us > 0 ? (uint64_t)us : 0;
    out->connected = pa_load(&dc->connected);
    out->connects = c[PRES_C_CONNECTS];
    out->disconnects = c[PRES_C_DISCONNECTS];
    out->heartbeats = c[PRES_C_HEARTBEATS];
    out->late_heartbeats = c[PRES_C_LATE_HEARTBEATS];
    out->stale_reports = c[PRES_C_STALE_REPORTS];
    out->expirations = pa_load(&dc->expirations);
    out->gateway_deaths = pa_load(&dc->gateway_deaths);
    /* Events appended: the last seq claimed (ev_next trails a claim by at
     * most one, a moment). */
    out->events = pa_load(&m->hdr->ev_next) - 1;
    out->evictions = pa_load(&dc->evictions);
    out->grace_periods = pa_load(&dc->grace_periods);
    out->mirror_lag_ms = pa_load(&dc->mirror_lag_ms);
    /* With no daemon beating (stopped, or not started again yet), changes
     * clients note wait for it: the lag grows from its last beat. */
    uint64_t beat = pa_load(&m->hdr->daemon_beat_mono), nm = pres__mono_ms();
    if (beat && nm > beat + 1000 &&
        pa_load(&m->hdr->note_head) != pa_load(&m->hdr->note_tail) &&
        nm - beat > out->mirror_lag_ms)
        out->mirror_lag_ms = nm - beat;
    return 0;
}

PRES_API uint64_t pres_now_ms(void)
{
    return pres__wall_ms();
}
