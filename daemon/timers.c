/*
 * timers.c - what only the passing of time changes: device expiries
 * (PRES_EV_EXPIRE), typing TTLs (PRES_EV_TYPING_STOP), a user's status
 * after the idle timer, the end of the offline grace or an expiry
 * (PRES_EV_USER_STATUS), and the count of connected devices.
 *
 * A hashed timer wheel in the daemon's private memory holds at most one
 * timer per device record, user record and typing record; nothing scans
 * every record to find what is due.  Timers are fed by the change notes
 * clients write (a connect, a new TTL, a disconnect, an activity change,
 * typing), by a sweep of every record when notes were lost or a client
 * died (PD_RESYNC_TIMERS; also at adopt), and by themselves:
 *
 *  - a device's timer is set to its expiry.  On-time heartbeats move the
 *    expiry without a note, so a timer that fires early is set again to
 *    the expiry it finds (lazily: one fire a TTL per heartbeating device).
 *    A passed expiry is announced under the device's latch, unless a
 *    writer that revived, reconnected or disconnected the device announced
 *    it first (lib/device.c); its typing ends with it;
 *  - a user's timer is set to pres__user_agg's next_change, the instant
 *    its status may next change with no write.  A user is evaluated when a
 *    note names it or one of its devices, when a device of it expires or
 *    goes, and when its timer fires; a status that differs from the one
 *    last published (the user record's `status`) is published;
 *  - a typing record's timer is set to its expiry; a record whose TTL
 *    passed or whose device stopped being connected is ended (LIVE ->
 *    ENDED by CAS; whoever makes that CAS announces the stop).
 *
 * Every announcement claims its seq before the change it announces is
 * recorded (`announced`, `status`, the typing record's state), so a daemon
 * killed in between leaves either a LOST event or the change still to be
 * announced by its successor, never both announced twice silently nor
 * missed: each expiry is announced once, across restarts too.
 *
 * The wheel has TW_SLOTS slots of TW_RES_MS (CLOCK_MONOTONIC_COARSE's
 * resolution): 32 s, about a TTL; a timer further out waits in its slot
 * for the lap it is due in.  With the tick at 20 ms an expiry is announced
 * about 10 ms after it passes, plus the time the tick's work takes.
 */
#include <stdlib.h>
#include <string.h>

#include "atomics.h"
#include "clock.h"
#include "daemon.h"
#include "mirror.h"
#include "store.h"

#define TW_RES_MS     4u
#define TW_SLOTS      8192u
#define NONE          UINT32_MAX
/* Records a resync sweep examines a tick (a user among them costs a walk
 * of its devices): a million devices and their users in about two
 * seconds, a few milliseconds a tick, so that a sweep never holds up the
 * expiries due meanwhile for long. */
#define SWEEP_CHUNK   16384u
/* A device whose latch a live writer holds is looked at again this soon:
 * the writer is a few stores from done. */
#define BUSY_RETRY_MS 4u

#define LIVE_LATCH_MASK (~(uint64_t)0 << 50)
/* How many times a user's status change is put off while one of their
 * devices is being connected (each a wheel tick or so). */
#define UNSETTLED_MAX 32u

struct pd_timers {
    uint32_t  n_dev, n_user, n_typ, n;   /* timer ids: devices, users, typing */
    uint32_t *next, *prev;               /* wheel lists; prev NONE: first */
    uint16_t *slot;                      /* the slot an id is listed in */
    uint64_t *when;                      /* due (mono ms); 0: not armed */
    uint32_t  head[TW_SLOTS];
    uint64_t  cur;                       /* next wheel tick (ms / TW_RES_MS) */
    uint8_t  *counted;                   /* per device: counted connected */
    uint32_t *dev_user;                  /* per device: its user when seen */
    uint8_t  *queued;                    /* per user: bit 0 to evaluate this
                                            tick; bits 1..7 announcements
                                            put off (UNSETTLED_MAX) */
    uint32_t *uq;
    size_t    uq_n;
    uint64_t  connected;
    uint64_t  sweep;                     /* next id to sweep; UINT64_MAX none */
    int       ready;                     /* a first sweep has completed */
};

/* ---- the wheel --------------------------------------------------------------- */

static void tw_unlink(struct pd_timers *T, uint32_t id)
{
    if (!T->when[id])
        return;
    uint32_t n = T->next[id], p = T->prev[id];
    if (p == NONE)
        T->head[T->slot[id]] = n;
    else
        T->next[p] = n;
    if (n != NONE)
        T->prev[n] = p;
    T->when[id] = 0;
}

static void tw_insert(struct pd_timers *T, uint32_t id, uint64_t when)
{
    uint64_t tk = when / TW_RES_MS;
    if (tk < T->cur)
        tk = T->cur;                 /* due already: the next run fires it */
    uint32_t s = (uint32_t)(tk & (TW_SLOTS - 1));
    uint32_t h = T->head[s];
    T->next[id] = h;
    T->prev[id] = NONE;
    if (h != NONE)
        T->prev[h] = id;
    T->head[s] = id;
    T->slot[id] = (uint16_t)s;
    T->when[id] = when ? when : 1;
}

static void tw_arm(struct pd_timers *T, uint32_t id, uint64_t when)
{
    if (T->when[id] == when)
        return;
    tw_unlink(T, id);
    tw_insert(T, id, when);
}

/* ---- users ------------------------------------------------------------------- */

static void user_queue(struct pd_timers *T, uint32_t u)
{
    if (u >= T->n_user || (T->queued[u] & 1))
        return;
    T->queued[u] |= 1;
    T->uq[T->uq_n++] = u;
}

static int user_held(const pres_map_t *m, uint32_t u)
{
    uint64_t a = pa_load(&m->users[u].alloc);
    uint8_t kl = m->users[u].keylen;
    return a != PRES_ALLOC_FREE && a != PRES_ALLOC_POOLED && a != PRES_ALLOC_RETIRED &&
           kl >= 1 && kl <= PRES_ID_MAX;
}

/* Publish user u's status if it is not the one last published, and set
 * its timer to the next instant it may change. */
static void user_eval(pd_t *d, uint32_t u, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    struct pd_timers *T = d->tm;
    uint32_t id = T->n_dev + u;
    if (!user_held(m, u)) {
        tw_unlink(T, id);
        return;
    }
    pres_agg_t g;
    int rc = -EAGAIN;
    for (int tries = 0; tries < 8 && rc == -EAGAIN; tries++)
        rc = pres__user_agg(m, u, nm, nw, &g);
    if (rc < 0) {
        tw_arm(T, id, nm + 100);     /* a list in motion (or damaged): later */
        return;
    }
    pres_user_t *r = &m->users[u];
    if ((uint64_t)g.status != pa_load(&r->status) && g.unsettled &&
        (T->queued[u] >> 1) < UNSETTLED_MAX) {
        /* A device between its old record and its new one counted as
         * absent: look again shortly rather than announce a flap (a
         * writer stopped mid-connect delays the announcement a little,
         * never for good). */
        T->queued[u] = (uint8_t)(T->queued[u] + 2);
        tw_arm(T, id, nm + 1);
        return;
    }
    T->queued[u] &= 1;
    if ((uint64_t)g.status != pa_load(&r->status)) {
        pres_evc_t c;
        /* The seq first: a daemon killed before the store below leaves a
         * LOST event and the change to announce again; after, a LOST. */
        if (pres__ev_claim(m, PRES_DAEMON_LATCH, &c) == 0) {
            pa_store(&r->status, (uint64_t)g.status);
            pres_ev_t e = { .kind = PRES_EV_USER_STATUS, .status = g.status, .at_ms = nw,
                            .user = r->key, .ulen = r->keylen };
            pres__ev_publish(m, &c, &e);
        }
    }
    if (g.next_change != UINT64_MAX)
        tw_arm(T, id, g.next_change);
    else
        tw_unlink(T, id);
}

static void users_run(pd_t *d, uint64_t nm, uint64_t nw)
{
    struct pd_timers *T = d->tm;
    for (size_t k = 0; k < T->uq_n; k++) {
        uint32_t u = T->uq[k];
        T->queued[u] &= (uint8_t)~1u;
        user_eval(d, u, nm, nw);
    }
    T->uq_n = 0;
}

/* ---- devices ----------------------------------------------------------------- */

/* Record i's TTL passed while it was CONNECTED: announce it under our
 * latch, unless a writer did.  The latch serialises us with writers that
 * revive, reconnect or disconnect the device (they announce too, under
 * it), and the publish that drops it bumps seq, so that a heartbeat that
 * read the live word before we took the latch fails its CAS and looks at
 * the clock again (lib/device.c: it is then late, and a revival).
 * 0: done, or nothing to do; -EBUSY: a live writer holds the latch. */
static int dev_expire(pd_t *d, uint32_t i, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    pres_dev_t *r = &m->devs[i];
    uint64_t L = pa_load_acquire(&r->live);
    for (;;) {
        if (PRES_LIVE_STATE(L) != PRES_DS_CONNECTED || PRES_LIVE_EXPIRY(L) > nm)
            return 0;
        if (pa_load(&r->announced) ==
            PRES_ANN(pa_load(&r->cid[PRES_LIVE_SEQ(L) & 1]), PRES_LIVE_EXPIRY(L)))
            return 0;                /* said already (a sweep looks again) */
        unsigned holder = PRES_LIVE_LATCH(L);
        if (holder && pd_latch_live(d, holder))
            return -EBUSY;
        uint64_t want = (L & ~LIVE_LATCH_MASK) | ((uint64_t)PRES_DAEMON_LATCH << 50);
        if (pa_cas(&r->live, &L, want)) {
            L = want;
            break;
        }
    }
    /* Our copy stores must not become visible before the latch. */
    pa_fence_release();
    unsigned k = PRES_LIVE_SEQ(L) & 1;
    uint32_t cid = pa_load(&r->cid[k]), gw = pa_load(&r->conn[k].gw);
    uint64_t exp = PRES_LIVE_EXPIRY(L);
    if (pa_load(&r->announced) == PRES_ANN(cid, exp)) {
        /* A writer said it while we looked: nothing to announce, and no
         * heartbeat can be misled by a latch we take and drop. */
        while (!pa_cas(&r->live, &L, L & ~LIVE_LATCH_MASK))
            ;
        return 0;
    }
    pres_evc_t c;
    pres__ev_claim(m, PRES_DAEMON_LATCH, &c);
    pa_store(&r->announced, PRES_ANN(cid, exp));
    pa_add_relaxed(&m->hdr->dc.expirations, 1);
    pres__ev_dev(m, &c, PRES_EV_EXPIRE, i, gw, nw);
    pres__ev_typing_end(m, PRES_DAEMON_LATCH, i, gw, nw);
    pd_mirror_dev(d, i);             /* its last seen is final */
    /* The same connection into the idle copy, published with seq + 1. */
    pa_store(&r->conn[k ^ 1].gw, gw);
    pa_store(&r->conn[k ^ 1].flags, pa_load(&r->conn[k].flags));
    pa_store(&r->conn[k ^ 1].connected_at, pa_load(&r->conn[k].connected_at));
    pa_store(&r->conn[k ^ 1].ended, pa_load(&r->conn[k].ended));
    pa_store(&r->ttl[k ^ 1], pa_load(&r->ttl[k]));
    pa_store(&r->cid[k ^ 1], cid);
    for (;;) {
        uint64_t want = PRES_LIVE_STATE(L) == PRES_DS_DEAD
                            ? L & ~LIVE_LATCH_MASK
                            : PRES_LIVE_MAKE(exp, PRES_DS_CONNECTED, PRES_LIVE_SEQ(L) + 1, 0);
        if (pa_cas(&r->live, &L, want))
            return 0;
    }
}

static int dev_held(const pres_dev_t *r, uint64_t L)
{
    uint64_t a = pa_load(&r->alloc);
    unsigned st = PRES_LIVE_STATE(L);
    return a != PRES_ALLOC_FREE && a != PRES_ALLOC_POOLED && a != PRES_ALLOC_RETIRED &&
           (st == PRES_DS_CONNECTED || st == PRES_DS_DISCONNECTED);
}

static void count(struct pd_timers *T, uint32_t i, int conn)
{
    if (T->counted[i] == conn)
        return;
    T->counted[i] = (uint8_t)conn;
    if (conn)
        T->connected++;
    else
        T->connected--;
}

/* Look at device record i: announce a passed expiry, set its timer, count
 * it, and have its user (and a user it left) evaluated. */
static void dev_check(pd_t *d, uint32_t i, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    struct pd_timers *T = d->tm;
    pres_dev_t *r = &m->devs[i];
    uint64_t L = pa_load_acquire(&r->live);
    if (dev_held(r, L) && PRES_LIVE_STATE(L) == PRES_DS_CONNECTED && PRES_LIVE_EXPIRY(L) <= nm) {
        if (dev_expire(d, i, nm, nw) == -EBUSY) {
            tw_arm(T, i, nm + BUSY_RETRY_MS);
            return;
        }
        L = pa_load_acquire(&r->live);
    }
    int held = dev_held(r, L);
    uint32_t u = held ? pa_load(&r->user) : NONE;
    if (u >= T->n_user)
        u = NONE;
    if (T->dev_user[i] != u) {
        user_queue(T, T->dev_user[i]);       /* moved away, or gone */
        T->dev_user[i] = u;
    }
    int conn = held && PRES_LIVE_STATE(L) == PRES_DS_CONNECTED && PRES_LIVE_EXPIRY(L) > nm;
    if (conn)
        tw_arm(T, i, PRES_LIVE_EXPIRY(L));
    else
        tw_unlink(T, i);
    count(T, i, conn);
    user_queue(T, u);
}

void pd_timers_dev_gone(pd_t *d, uint32_t i)
{
    struct pd_timers *T = d->tm;
    if (!T || i >= T->n_dev)
        return;
    tw_unlink(T, i);
    count(T, i, 0);
    user_queue(T, T->dev_user[i]);
    T->dev_user[i] = NONE;
}

void pd_timers_user_gone(pd_t *d, uint32_t u)
{
    struct pd_timers *T = d->tm;
    if (!T || u >= T->n_user)
        return;
    /* Its devices are gone: publish OFFLINE now, while its key is there,
     * if that is not what was published last. */
    uint64_t nm = pres__mono_ms();
    user_eval(d, u, nm, pres__wall_of(&d->m, nm));
    tw_unlink(T, T->n_dev + u);
    pa_store(&d->m.users[u].status, (uint64_t)PRES_OFFLINE);
}

/* ---- typing ------------------------------------------------------------------- */

/* Does typing record t still count on its device: the device (of
 * generation dgen) connected now, on the connection the typing was typed
 * on, with its link naming t?  (A reconnect or a move ends typing.) */
static int typ_on_device(const pres_map_t *m, uint32_t t, uint32_t i, uint32_t dgen,
                         uint64_t nm, uint32_t *gw)
{
    pres_snap_t s;
    if (i >= m->dev_cap || pa_load(&m->devs[i].gen) != dgen || pres__dev_snap(m, i, &s) != 0)
        return 0;
    *gw = s.c.gw;
    return PRES_LIVE_STATE(s.live) == PRES_DS_CONNECTED && PRES_LIVE_EXPIRY(s.live) > nm &&
           pres__typ_current(m, i, &s) == (int)t;
}

static void typ_check(pd_t *d, uint32_t t, uint64_t nm, uint64_t nw)
{
    pres_map_t *m = &d->m;
    struct pd_timers *T = d->tm;
    uint32_t id = T->n_dev + T->n_user + t;
    pres_typ_t *r = &m->typs[t];
    uint64_t w = pa_load_acquire(&r->word);
    if (PRES_TW_STATE(w) != PRES_TS_LIVE) {
        tw_unlink(T, id);
        return;
    }
    uint32_t gw = NONE;
    int conn = typ_on_device(m, t, pa_load(&r->dev), pa_load(&r->dgen), nm, &gw);
    if (PRES_TW_EXPIRY(w) > nm && conn) {
        tw_arm(T, id, PRES_TW_EXPIRY(w));
        return;
    }
    tw_unlink(T, id);
    pres__ev_typ_stop(m, PRES_DAEMON_LATCH, t, w, gw, nw);
}

/* ---- firing, notes, sweeps ----------------------------------------------------- */

static void fire(pd_t *d, uint32_t id, uint64_t nm, uint64_t nw)
{
    struct pd_timers *T = d->tm;
    if (id < T->n_dev)
        dev_check(d, id, nm, nw);
    else if (id < T->n_dev + T->n_user)
        user_queue(T, id - T->n_dev);
    else
        typ_check(d, id - T->n_dev - T->n_user, nm, nw);
}

static void wheel_run(pd_t *d, uint64_t nm, uint64_t nw)
{
    struct pd_timers *T = d->tm;
    uint64_t end = nm / TW_RES_MS;
    if (end >= T->cur + TW_SLOTS)
        T->cur = end - TW_SLOTS + 1;     /* a long pause: every slot once */
    while (T->cur <= end) {
        uint32_t s = (uint32_t)(T->cur & (TW_SLOTS - 1));
        uint32_t id = T->head[s];
        /* Detached, and the wheel already past it: what fire() arms, or a
         * timer of a later lap, goes to a slot still to come. */
        T->head[s] = NONE;
        T->cur++;
        while (id != NONE) {
            uint32_t nx = T->next[id];
            uint64_t when = T->when[id];
            if (when > nm) {
                tw_insert(T, id, when);  /* a later lap's */
            } else {
                T->when[id] = 0;
                fire(d, id, nm, nw);
            }
            id = nx;
        }
    }
}

static void notes_run(pd_t *d, uint64_t nm, uint64_t nw)
{
    struct pd_timers *T = d->tm;
    for (size_t k = 0; k < d->nb_n; k++) {
        uint32_t idx = d->nb[k].idx;
        switch (d->nb[k].kind) {
        case PRES_NOTE_DEV:
            if (idx < T->n_dev)
                dev_check(d, idx, nm, nw);
            break;
        case PRES_NOTE_USER:
            user_queue(T, idx);
            break;
        case PRES_NOTE_TYP:
            if (idx < T->n_typ)
                typ_check(d, idx, nm, nw);
            break;
        default:
            break;
        }
    }
}

static void sweep_run(pd_t *d, uint64_t nm, uint64_t nw)
{
    struct pd_timers *T = d->tm;
    if (d->resync & PD_RESYNC_TIMERS) {
        d->resync &= ~PD_RESYNC_TIMERS;
        T->sweep = 0;
    }
    if (T->sweep == UINT64_MAX)
        return;
    uint64_t end = T->sweep + SWEEP_CHUNK;
    for (; T->sweep < end && T->sweep < T->n; T->sweep++) {
        uint32_t id = (uint32_t)T->sweep;
        if (id < T->n_dev)
            dev_check(d, id, nm, nw);
        else if (id < T->n_dev + T->n_user)
            user_queue(T, id - T->n_dev);
        else
            typ_check(d, id - T->n_dev - T->n_user, nm, nw);
        if (T->uq_n >= SWEEP_CHUNK)
            users_run(d, nm, nw);        /* keep the queue bounded */
    }
    if (T->sweep >= T->n) {
        T->sweep = UINT64_MAX;
        T->ready = 1;
    }
}

void pd_timers_tick(pd_t *d, uint64_t nm, uint64_t nw)
{
    struct pd_timers *T = d->tm;
    notes_run(d, nm, nw);
    sweep_run(d, nm, nw);
    wheel_run(d, nm, nw);
    users_run(d, nm, nw);
    /* The count is exact once every record was seen (a sweep at adopt). */
    if (T->ready)
        pa_store(&d->m.hdr->dc.connected, T->connected);
}

int pd_timers_init(pd_t *d)
{
    pres_map_t *m = &d->m;
    struct pd_timers *T = calloc(1, sizeof *T);
    if (!T)
        return -ENOMEM;
    d->tm = T;
    T->n_dev = m->dev_cap;
    T->n_user = m->user_cap;
    T->n_typ = m->typ_cap;
    T->n = T->n_dev + T->n_user + T->n_typ;
    T->next = malloc((size_t)T->n * sizeof *T->next);
    T->prev = malloc((size_t)T->n * sizeof *T->prev);
    T->slot = malloc((size_t)T->n * sizeof *T->slot);
    T->when = calloc(T->n, sizeof *T->when);
    T->counted = calloc(T->n_dev, 1);
    T->dev_user = malloc((size_t)T->n_dev * sizeof *T->dev_user);
    T->queued = calloc(T->n_user, 1);
    T->uq = malloc((size_t)T->n_user * sizeof *T->uq);
    if (!T->next || !T->prev || !T->slot || !T->when || !T->counted || !T->dev_user ||
        !T->queued || !T->uq)
        return -ENOMEM;
    for (uint32_t s = 0; s < TW_SLOTS; s++)
        T->head[s] = NONE;
    for (uint32_t i = 0; i < T->n_dev; i++)
        T->dev_user[i] = NONE;
    T->cur = pres__mono_ms() / TW_RES_MS;
    T->sweep = 0;                        /* learn every record first */
    return 0;
}

void pd_timers_free(pd_t *d)
{
    struct pd_timers *T = d->tm;
    if (!T)
        return;
    free(T->next);
    free(T->prev);
    free(T->slot);
    free(T->when);
    free(T->counted);
    free(T->dev_user);
    free(T->queued);
    free(T->uq);
    free(T);
    d->tm = NULL;
}
