/*
 * feed.c - the daemon's part in the change feed's crash safety.
 *
 * A writer killed between claiming a seq and publishing it leaves the slot
 * CLAIMED under its latch (lib/events.c).  Watchers must not wait on it
 * longer than it takes the kernel to tell us the writer is dead, so:
 *
 *  - when clients die (pd_feed_gone, from the dead-client repair, while
 *    their reader slots are still unclaimable): every claim under one of
 *    their latches is declared LOST, and their latches are cleared from
 *    slots declared LOST while they were stopped, before those latch values
 *    can name another thread;
 *  - at adopt (pd_feed_init): the same for every writer the kernel says is
 *    gone, and for a previous daemon's claims;
 *  - each tick (pd_feed_tick): a scan behind the head of the feed finds the
 *    oldest claim not yet published; a claim whose writer is stopped for
 *    STUCK_STOPPED_MS, or held by a running one for STUCK_RUNNING_MS, is
 *    declared LOST with the writer's latch kept (it may resume and go on
 *    copying into the slot: lib/events.c), so that watchers move on.
 *    It also moves ev_next past a claim whose writer died before doing so.
 *
 * Slots declared LOST with a latch kept ("zombies") are rare: only a
 * stopped or pathologically slow writer makes one.  When none can exist,
 * the repair after a death looks only at the claims not yet published,
 * between the scan's position and the head; otherwise at the whole ring.
 */
#include <stdlib.h>

#include "atomics.h"
#include "clock.h"
#include "daemon.h"
#include "store.h"

/* A stopped writer holds up every watcher: after this long its claim is
 * declared lost.  A running one is given longer (it may only be starved
 * of CPU). */
#define STUCK_STOPPED_MS  1000
#define STUCK_RUNNING_MS  5000
/* Slots the scan reads a tick, at most: at a million events a second the
 * scan falls behind and jumps (writers a lap later handle a stuck claim
 * themselves), so its cost stays bounded. */
#define SCAN_MAX          4096u

struct pd_feed {
    uint64_t scan;               /* seqs below are published or lost */
    uint64_t stuck_seq, stuck_word, stuck_since;
    int      zombies;            /* slots LOST with a latch may exist */
};

static inline uint64_t lap_of(const pres_map_t *m, uint64_t s)
{
    return (s >> __builtin_ctzll(m->ev_mask + 1)) & PRES_EVW_LAP_MASK;
}

static uint64_t wall_now(const pres_map_t *m)
{
    return pres__wall_of(m, pres__mono_ms());
}

typedef int (*dead_fn)(pd_t *d, unsigned latch, const uint8_t *dead);

static int dead_by_kernel(pd_t *d, unsigned latch, const uint8_t *unused)
{
    (void)unused;
    return !pd_latch_live(d, latch);
}

static int dead_listed(pd_t *d, unsigned latch, const uint8_t *dead)
{
    (void)d;
    return latch >= 1 && latch <= PRES_READER_SLOTS && dead[latch - 1];
}

/* One slot: a claim of the dead becomes LOST; a latch of the dead left in a
 * LOST slot goes.  Returns 1 if a latch (of the living) stays in a LOST
 * slot. */
static int audit_slot(pd_t *d, pres_event_slot_t *sl, dead_fn dead, const uint8_t *arg)
{
    uint64_t w = pa_load_acquire(&sl->word);
    unsigned x = PRES_EVW_LATCH(w), st = PRES_EVW_STATE(w);
    if (!x || (st != PRES_EVS_CLAIMED && st != PRES_EVS_LOST))
        return 0;
    if (!dead(d, x, arg))
        return st == PRES_EVS_LOST;
    if (st == PRES_EVS_CLAIMED) {
        if (pres__ev_declare_lost(sl, w, PRES_EVW_LAP(w), 0, wall_now(&d->m))) {
            pd_log(LOG_DEBUG, "feed: a dead writer's event is lost");
            pres__ev_wake(&d->m);
        }
    } else {
        pa_cas(&sl->word, &w, PRES_EVW_MAKE(PRES_EVW_LAP(w), PRES_EVS_LOST, 0));
    }
    return 0;
}

static void audit_all(pd_t *d, dead_fn dead, const uint8_t *arg)
{
    pres_map_t *m = &d->m;
    int zombies = 0;
    /* A ring that never lapped holds nothing beyond its head (and a store
     * just made is not read at all: its pages stay untouched). */
    uint64_t n = pa_load_acquire(&m->hdr->ev_next), end = m->ev_mask + 1;
    if (n < end)
        end = n + 1;
    for (uint64_t j = 0; j < end; j++)
        zombies |= audit_slot(d, &m->events[j], dead, arg);
    d->feed->zombies = zombies;
}

int pd_feed_init(pd_t *d)
{
    pres_map_t *m = &d->m;
    if (!(d->feed = calloc(1, sizeof *d->feed)))
        return -ENOMEM;
    uint64_t n = pa_load(&m->hdr->ev_next), cap = m->ev_mask + 1;
    d->feed->scan = n > cap ? n - cap : 1;
    d->feed->stuck_seq = UINT64_MAX;
    /* A previous daemon's claims count as dead (pd_latch_live), and so do
     * writers the kernel already knows gone; clients that died before we
     * track them are found by the first poll, and repaired then. */
    audit_all(d, dead_by_kernel, NULL);
    return 0;
}

void pd_feed_free(pd_t *d)
{
    free(d->feed);
    d->feed = NULL;
}

void pd_feed_gone(pd_t *d, const uint8_t *dead)
{
    pres_map_t *m = &d->m;
    struct pd_feed *f = d->feed;
    if (f->zombies) {
        audit_all(d, dead_listed, dead);
        return;
    }
    /* Every claim not yet published is at or after the scan's position
     * (the scan stops at the first one), up to the head. */
    uint64_t n = pa_load_acquire(&m->hdr->ev_next);
    for (uint64_t s = f->scan; s <= n; s++)
        audit_slot(d, &m->events[s & m->ev_mask], dead_listed, dead);
}

/* The oldest claim not yet published, seen for a while: declare it lost if
 * its writer is dead, stopped, or too slow. */
static void stuck(pd_t *d, uint64_t s, uint64_t w, uint64_t nm)
{
    pres_map_t *m = &d->m;
    struct pd_feed *f = d->feed;
    pres_event_slot_t *sl = &m->events[s & m->ev_mask];
    unsigned x = PRES_EVW_LATCH(w);
    if (!pd_latch_live(d, x)) {
        if (pres__ev_declare_lost(sl, w, PRES_EVW_LAP(w), 0, wall_now(m)))
            pres__ev_wake(m);
        return;
    }
    if (f->stuck_seq != s || f->stuck_word != w) {
        f->stuck_seq = s;
        f->stuck_word = w;
        f->stuck_since = nm;
        return;
    }
    uint64_t held = nm - f->stuck_since;
    if (held < STUCK_STOPPED_MS)
        return;
    if (held < STUCK_RUNNING_MS && pres__latch_holder_state(m, x) != PRES_HOLDER_STOPPED)
        return;
    if (pres__ev_declare_lost(sl, w, PRES_EVW_LAP(w), x, wall_now(m))) {
        pd_log(LOG_WARN, "feed: the writer of seq %llu (reader slot %u) has held it %llu ms: "
                         "declared lost", (unsigned long long)s, x - 1, (unsigned long long)held);
        f->zombies = 1;
        pres__ev_wake(m);
    }
}

void pd_feed_tick(pd_t *d, uint64_t nm)
{
    pres_map_t *m = &d->m;
    struct pd_feed *f = d->feed;
    uint64_t cap = m->ev_mask + 1;
    uint64_t n = pa_load_acquire(&m->hdr->ev_next);
    /* A claim of the head whose writer died before moving ev_next on: as
     * any writer would, move it (pres_stats counts events by it). */
    uint64_t w = pa_load_acquire(&m->events[n & m->ev_mask].word);
    if (PRES_EVW_STATE(w) != PRES_EVS_EMPTY && PRES_EVW_LAP(w) == lap_of(m, n)) {
        uint64_t e = n;
        if (pa_cas(&m->hdr->ev_next, &e, n + 1))
            n++;
    }
    if (f->scan + cap < n) {
        /* Lapped: writers dealt with what was stuck back there, perhaps by
         * declaring it lost with its latch kept. */
        f->scan = n - cap;
        f->zombies = 1;
    }
    for (uint32_t k = 0; k < SCAN_MAX && f->scan < n; k++, f->scan++) {
        w = pa_load_acquire(&m->events[f->scan & m->ev_mask].word);
        if (PRES_EVW_STATE(w) == PRES_EVS_CLAIMED && PRES_EVW_LAP(w) == lap_of(m, f->scan)) {
            stuck(d, f->scan, w, nm);
            return;
        }
    }
}
