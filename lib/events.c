/*
 * events.c - the change feed: a ring of event slots in the region.
 *
 * Writers (gateways; the daemon for what only the passing of time or a
 * death produces) append without locks; any number of watchers in any
 * number of processes read without writing to the ring, so none of them
 * can slow a writer down.  doc/region.md, "The change feed", has the long
 * form; in short, appending seq s (lap = s >> log2(slots), in slot
 * s & (slots - 1)):
 *
 *  1. claim: s = ev_next; CAS the slot's word from the state its previous
 *     lap left (PUBLISHED, LOST or EMPTY) to {lap, CLAIMED, our latch}.
 *     That CAS gives s to one writer; a writer that loses it looks again.
 *  2. help ev_next on: CAS s -> s + 1.  Whoever finds the slot already
 *     claimed for s does the same, so a writer killed between 1 and 2
 *     holds nobody up.  ev_next moves only by this CAS and only after s was
 *     claimed: every seq below ev_next is claimed, and seqs have no gaps.
 *  3. copy the event in: 34 relaxed word stores;
 *  4. publish: CAS {lap, CLAIMED, latch} -> {lap, PUBLISHED, 0}, ordering
 *     the copy before the state (the CAS releases).  It fails only if the
 *     claim was declared lost meanwhile (below): watchers got PRES_EV_LOST
 *     for s, and the event is dropped.
 *  5. wake watchers only if ev_sleepers is set: clear it, bump ev_futex
 *     and FUTEX_WAKE every waiter of the shared futex.  The publish and the
 *     load of ev_sleepers (both seq_cst), against a watcher's setting of
 *     ev_sleepers and its load of the slot's word (both seq_cst), are a
 *     Dekker handshake: the writer sees the sleeper or the sleeper sees the
 *     event.  No wakeup is lost, and nobody asleep costs writers nothing.
 *     ev_sleepers is a flag, not a count, so a watcher killed in its sleep
 *     costs one needless wakeup, not a system call on every append.
 *
 * Claims left by writers that die or stop.  A writer killed between 1 and
 * 4 leaves its slot CLAIMED under its latch (its thread's reader slot + 1,
 * as for device latches).  The daemon declares such a claim LOST as soon
 * as the kernel says the thread is gone (daemon/feed.c), so a watcher
 * waits on a dead writer at most the daemon's liveness check.  A claim
 * whose writer is stopped (SIGSTOP, a debugger), or that a running writer
 * has held for seconds, is declared LOST too, but with the writer's latch
 * kept in the word: that writer may resume and go on copying into the
 * slot, so no other event may be written there while it lives.  A writer
 * that reaches such a slot a lap later, its latch's thread alive, declares
 * that seq LOST as well (keeping the latch) and takes the next one.  The
 * stopped writer, once it resumes, finds its publish refused and clears its
 * latch from the word; the daemon clears the latches of the dead before
 * their latch values (reader slots) go to other threads.
 *
 * A writer that finds the previous lap's writer still holding the slot (a
 * whole lap was appended meanwhile) does what device.c's latch_take does:
 * it waits while the kernel says that writer runs, and declares the claim
 * LOST when the writer is dead, stopped, or still there after
 * LATCH_WAIT_MS.  No writer ever waits on a stopped or dead process.
 *
 * Reading seq c: load the word (acquire); if it is {lap(c), PUBLISHED or
 * LOST}, copy the event, then an acquire fence and the word again.  A
 * writer of a later lap changes the word (its claim) before it writes any
 * of the slot, so an unchanged word means an untorn copy; a word of a
 * later lap means the ring lapped the cursor (-EOVERFLOW).
 */
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "store.h"

/* The event as the slot holds it from at_ms on, moved as whole words. */
#define EV_WORDS 34
typedef union {
    struct {
        uint64_t at_ms;
        uint32_t kind, status;
        uint8_t  len[4];
        char     id[4][PRES_ID_MAX];   /* user, device, gateway, conversation */
    } e;
    uint64_t w[EV_WORDS];
} ev_body_t;
_Static_assert(sizeof(ev_body_t) == EV_WORDS * 8, "event body is whole words");

/* How long a writer waits for the previous lap's writer of a slot while the
 * kernel says it runs (it was only descheduled), as for device latches. */
#define LATCH_WAIT_MS 2000

static inline unsigned ev_shift(const pres_map_t *m)
{
    return (unsigned)__builtin_ctzll(m->ev_mask + 1);
}

static inline uint64_t lap_of(const pres_map_t *m, uint64_t seq)
{
    return (seq >> ev_shift(m)) & PRES_EVW_LAP_MASK;
}

/* Lap a comes after lap b (laps are counted modulo 2^48). */
static inline int lap_after(uint64_t a, uint64_t b)
{
    uint64_t d = (a - b) & PRES_EVW_LAP_MASK;
    return d != 0 && d < (UINT64_C(1) << 47);
}

static inline uint64_t now_wall(const pres_map_t *m)
{
    return pres__wall_of(m, pres__mono_ms());
}

/* Move ev_next past s, if nobody did yet. */
static inline void help_next(pres_map_t *m, uint64_t s)
{
    uint64_t e = s;
    pa_cas(&m->hdr->ev_next, &e, s + 1);
}

int pres__ev_declare_lost(pres_event_slot_t *sl, uint64_t w, uint64_t lap, unsigned keep,
                          uint64_t at_ms)
{
    /* lost_at first: only whoever declares a slot lost writes it, and a
     * reader that copies it checks the word again afterwards. */
    pa_store(&sl->lost_at, at_ms);
    return pa_cas(&sl->word, &w, PRES_EVW_MAKE(lap, PRES_EVS_LOST, keep));
}

static void futex_wake_all(uint32_t *f)
{
    /* No FUTEX_PRIVATE_FLAG: the word is in a mapping shared by processes. */
    syscall(SYS_futex, f, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void pres__ev_wake(pres_map_t *m)
{
    /* seq_cst after the publishing CAS: see step 5 above. */
    if (pa_load_sc(&m->rhdr->ev_sleepers) == 0)
        return;
    /* Cleared before the bump: a watcher that sets it again afterwards
     * read the futex word after the bump, so it sees our event. */
    if (pa_exchange(&m->rhdr->ev_sleepers, 0) == 0)
        return;                  /* another writer is waking them */
    pa_fetch_add(&m->rhdr->ev_futex, 1);
    futex_wake_all(&m->rhdr->ev_futex);
}

/* ---- claiming ---------------------------------------------------------------- */

typedef struct {
    uint32_t spins;
    uint64_t deadline;
} ev_wait_t;

/* The previous lap's writer still holds the slot we want.  Wait while it
 * runs; declare its claim lost when it is dead (nobody will write the slot
 * again), stopped or too slow (it may resume: its latch stays). */
static void prev_claim(pres_map_t *m, unsigned me, pres_event_slot_t *sl, uint64_t w,
                       ev_wait_t *wt)
{
    unsigned x = PRES_EVW_LATCH(w);
    if (++wt->spins < 64) {
        pa_pause();
        return;
    }
    if (wt->spins % 64 != 0) {
        sched_yield();
        return;
    }
    uint64_t nm = pres__mono_ms();
    if (!wt->deadline)
        wt->deadline = nm + LATCH_WAIT_MS;
    int s = x == me ? PRES_HOLDER_STOPPED : pres__latch_holder_state(m, x);
    int lost = 0;
    if (s == PRES_HOLDER_DEAD)
        lost = pres__ev_declare_lost(sl, w, PRES_EVW_LAP(w), 0, pres__wall_of(m, nm));
    else if (s == PRES_HOLDER_STOPPED || nm > wt->deadline)
        lost = pres__ev_declare_lost(sl, w, PRES_EVW_LAP(w), x, pres__wall_of(m, nm));
    if (lost)
        pres__ev_wake(m);        /* a watcher a lap behind may wait on it */
}

/* May a slot LOST with latch x be written again?  Only once x's thread is
 * gone: while it lives it may still be copying into the slot. */
static int zombie_alive(const pres_map_t *m, unsigned me, unsigned x)
{
    return x != 0 && (x == me || pres__latch_holder_state(m, x) != PRES_HOLDER_DEAD);
}

/* Give up on a ring in which nobody has moved on for this long: it is
 * damaged (an intact ring moves within LATCH_WAIT_MS). */
#define CLAIM_GIVE_UP_MS (3 * LATCH_WAIT_MS)

int pres__ev_claim(pres_map_t *m, unsigned latch, pres_evc_t *c)
{
    ev_wait_t wt = { 0, 0 };
    uint64_t seen = pa_load(&m->hdr->ev_next), since = 0;
    for (uint64_t it = 1;; it++) {
        uint64_t s = pa_load_acquire(&m->hdr->ev_next);
        if ((it & 0xffff) == 0) {
            uint64_t nm = pres__mono_ms();
            if (s != seen || !since) {
                seen = s;
                since = nm;
            } else if (nm - since > CLAIM_GIVE_UP_MS) {
                c->slot = NULL;
                return -EPROTO;
            }
        }
        pres_event_slot_t *sl = &m->events[s & m->ev_mask];
        uint64_t lap = lap_of(m, s);
        uint64_t w = pa_load_acquire(&sl->word);
        unsigned st = PRES_EVW_STATE(w);
        if (st != PRES_EVS_EMPTY && PRES_EVW_LAP(w) == lap) {
            help_next(m, s);                 /* s is taken: on to s + 1 */
            continue;
        }
        if (st != PRES_EVS_EMPTY && lap_after(PRES_EVW_LAP(w), lap))
            continue;                        /* our ev_next was old */
        if (st == PRES_EVS_CLAIMED) {
            prev_claim(m, latch, sl, w, &wt);
            continue;
        }
        if (st == PRES_EVS_LOST && zombie_alive(m, latch, PRES_EVW_LATCH(w))) {
            /* Its stopped writer may still copy into it: this seq is lost
             * too (the latch stays), and we take the next. */
            if (pres__ev_declare_lost(sl, w, lap, PRES_EVW_LATCH(w), now_wall(m))) {
                help_next(m, s);
                pres__ev_wake(m);
            }
            continue;
        }
        uint64_t want = PRES_EVW_MAKE(lap, PRES_EVS_CLAIMED, latch);
        if (pa_cas(&sl->word, &w, want)) {
            /* The body stores that follow must not become visible before
             * the claim (a seqlock writer's order): a reader of the slot's
             * old lap that copies any of them then sees the word move on. */
            pa_fence_release();
            help_next(m, s);
            c->slot = sl;
            c->seq = s;
            c->word = want;
            return 0;
        }
    }
}

/* ---- publishing ------------------------------------------------------------ */

static void put_id(ev_body_t *b, int k, const char *id, size_t len)
{
    if (!id || len > PRES_ID_MAX)
        len = 0;
    b->e.len[k] = (uint8_t)len;
    if (len)
        memcpy(b->e.id[k], id, len);
}

/* Our claim was declared lost while we were stopped or slow: we are done
 * with the slot now, so nobody need skip it on our account any more. */
static void drop_zombie(pres_evc_t *c)
{
    unsigned me = PRES_EVW_LATCH(c->word);
    uint64_t w = pa_load(&c->slot->word);
    while (PRES_EVW_STATE(w) == PRES_EVS_LOST && PRES_EVW_LATCH(w) == me &&
           !pa_cas(&c->slot->word, &w, w & ~(UINT64_C(0x3fff) << 2)))
        ;
}

void pres__ev_publish(pres_map_t *m, pres_evc_t *c, const pres_ev_t *e)
{
    if (!c->slot)
        return;
    ev_body_t b;
    memset(&b, 0, sizeof b);
    b.e.at_ms = e->at_ms;
    b.e.kind = (uint32_t)e->kind;
    b.e.status = (uint32_t)e->status;
    put_id(&b, 0, e->user, e->ulen);
    put_id(&b, 1, e->dev, e->dlen);
    put_id(&b, 2, e->gw, e->glen);
    put_id(&b, 3, e->conv, e->clen);
    /* Relaxed stores: a reader orders them by the word (below, and its
     * re-check); the claim already keeps readers of the slot's old lap
     * from trusting what they copy. */
    uint64_t *dst = (uint64_t *)((char *)c->slot + offsetof(pres_event_slot_t, at_ms));
    for (int k = 0; k < EV_WORDS; k++)
        pa_store(&dst[k], b.w[k]);
    uint64_t w = c->word;
    if (pa_cas(&c->slot->word, &w, PRES_EVW_MAKE(PRES_EVW_LAP(c->word), PRES_EVS_PUBLISHED, 0)))
        pres__ev_wake(m);
    else
        drop_zombie(c);
    c->slot = NULL;
}

void pres__ev_abandon(pres_map_t *m, pres_evc_t *c)
{
    if (!c->slot)
        return;
    if (pres__ev_declare_lost(c->slot, c->word, PRES_EVW_LAP(c->word), 0, now_wall(m)))
        pres__ev_wake(m);
    else
        drop_zombie(c);
    c->slot = NULL;
}

void pres__ev_emit(pres_map_t *m, unsigned latch, int kind, int status,
                   const char *user, size_t ulen, const char *dev, size_t dlen,
                   const char *gw, size_t glen, const char *conv, size_t clen,
                   uint64_t at_ms)
{
    pres_evc_t c;
    if (pres__ev_claim(m, latch, &c) < 0)
        return;
    pres_ev_t e = { .kind = kind, .status = status, .at_ms = at_ms,
                    .user = user, .ulen = ulen, .dev = dev, .dlen = dlen,
                    .gw = gw, .glen = glen, .conv = conv, .clen = clen };
    pres__ev_publish(m, &c, &e);
}

/* ---- events about records ---------------------------------------------------- */

static void key_of(const uint8_t *len, const char *key, const char **out, size_t *n)
{
    uint8_t l = *len;
    *out = key;
    *n = l <= PRES_ID_MAX ? l : 0;
}

void pres__ev_dev(pres_map_t *m, pres_evc_t *c, int kind, uint32_t i, uint32_t gw,
                  uint64_t at_ms)
{
    const pres_dev_t *d = &m->devs[i];
    uint32_t u = pa_load(&d->user);
    pres_ev_t e = { .kind = kind, .at_ms = at_ms };
    key_of(&d->keylen, d->key, &e.dev, &e.dlen);
    if (u < m->user_cap)
        key_of(&m->users[u].keylen, m->users[u].key, &e.user, &e.ulen);
    if (gw < m->gw_cap)
        key_of(&m->gws[gw].keylen, m->gws[gw].key, &e.gw, &e.glen);
    pres__ev_publish(m, c, &e);
}

#define TW_STATE_MASK (UINT64_C(3) << 40)

int pres__ev_typ_stop(pres_map_t *m, unsigned latch, uint32_t t, uint64_t w, uint32_t gw,
                      uint64_t at_ms)
{
    pres_typ_t *r = &m->typs[t];
    pres_evc_t c;
    int have = pres__ev_claim(m, latch, &c) == 0;
    uint64_t ended = (w & ~TW_STATE_MASK) | ((uint64_t)PRES_TS_ENDED << 40);
    int won = pa_cas(&r->word, &w, ended);
    if (!have)
        return won;
    /* Claimed before the CAS, so that a writer killed in between leaves a
     * LOST event rather than a typing stop nobody announced.  Lost the CAS
     * (someone refreshed, stopped or moved it at the same moment, and
     * announces what it did): the seq is given up as LOST, rather than
     * repeat or contradict that announcement. */
    if (!won) {
        pres__ev_abandon(m, &c);
        return 0;
    }
    int kind = PRES_EV_TYPING_STOP;
    uint32_t u = pa_load(&r->user), i = pa_load(&r->dev);
    pres_ev_t e = { .kind = kind, .at_ms = at_ms };
    key_of(&r->keylen, r->key, &e.conv, &e.clen);
    if (u < m->user_cap)
        key_of(&m->users[u].keylen, m->users[u].key, &e.user, &e.ulen);
    if (i < m->dev_cap)
        key_of(&m->devs[i].keylen, m->devs[i].key, &e.dev, &e.dlen);
    if (gw < m->gw_cap)
        key_of(&m->gws[gw].keylen, m->gws[gw].key, &e.gw, &e.glen);
    pres__ev_publish(m, &c, &e);
    return won;
}

int pres__ev_typing_end(pres_map_t *m, unsigned latch, uint32_t i, uint32_t gw, uint64_t at_ms)
{
    const pres_dev_t *d = &m->devs[i];
    uint64_t l = pa_load_acquire(&d->typing);
    if (l == 0 || PRES_LINK_IS_NULLS(l))
        return 0;
    uint32_t t = PRES_LINK_IDX(l);
    if (t >= m->typ_cap)
        return 0;
    pres_typ_t *r = &m->typs[t];
    if (pa_load(&r->gen) != PRES_LINK_GEN(l) || pa_load(&r->dev) != i ||
        pa_load(&r->dgen) != pa_load(&d->gen))
        return 0;
    uint64_t w = pa_load_acquire(&r->word);
    if (PRES_TW_STATE(w) != PRES_TS_LIVE)
        return 0;
    return pres__ev_typ_stop(m, latch, t, w, gw, at_ms);
}

/* ---- watching ------------------------------------------------------------------ */

static void copy_out(char *dst, const char *src, uint8_t len)
{
    if (len > PRES_ID_MAX)
        len = 0;
    memcpy(dst, src, len);
    dst[len] = '\0';
}

/* The oldest seq the ring is sure to hold: the slot of ev_next - slots may
 * be being claimed for ev_next. */
static uint64_t oldest_held(const pres_map_t *m)
{
    uint64_t n = pa_load_acquire(&m->hdr->ev_next), cap = m->ev_mask + 1;
    return n > cap ? n - cap + 1 : 1;
}

/* 0: *ev is seq c; -EAGAIN: not yet written; -EOVERFLOW; -EINVAL. */
static int try_read(const pres_map_t *m, uint64_t c, pres_event_t *ev, int sc)
{
    const pres_event_slot_t *sl = &m->events[c & m->ev_mask];
    uint64_t lap = lap_of(m, c);
    /* seq_cst when we are about to sleep: the other half of step 5. */
    uint64_t w = sc ? pa_load_sc(&sl->word) : pa_load_acquire(&sl->word);
    unsigned st = PRES_EVW_STATE(w);
    if (st != PRES_EVS_EMPTY && lap_after(PRES_EVW_LAP(w), lap))
        return -EOVERFLOW;
    if (st == PRES_EVS_EMPTY || PRES_EVW_LAP(w) != lap || st == PRES_EVS_CLAIMED) {
        /* Not written yet.  A cursor more than one past ev_next was never
         * given out by us (ev_next trails a claim by at most one). */
        uint64_t n = pa_load_acquire(&m->hdr->ev_next);
        if (c > n + 1)
            return -EINVAL;
        if (n >= c + m->ev_mask + 1)
            return -EOVERFLOW;               /* lapped, slot not yet reclaimed */
        return -EAGAIN;
    }
    ev_body_t b;
    const uint64_t *src = (const uint64_t *)((const char *)sl + offsetof(pres_event_slot_t, at_ms));
    for (int k = 0; k < EV_WORDS; k++)
        b.w[k] = pa_load(&src[k]);
    uint64_t lost_at = pa_load(&sl->lost_at);
    /* The copy's loads complete before the word is read again: if it did
     * not change, no later lap's writer touched what we copied. */
    pa_fence_acquire();
    /* The latch bits of a LOST slot may be cleared meanwhile (its stopped
     * writer is done with it): that rewrites nothing we copied. */
    if ((pa_load(&sl->word) ^ w) & ~(UINT64_C(0x3fff) << 2))
        return -EOVERFLOW;
    memset(ev, 0, sizeof *ev);
    ev->seq = c;
    if (st == PRES_EVS_LOST) {
        ev->kind = PRES_EV_LOST;
        ev->at_ms = lost_at;
        return 0;
    }
    ev->at_ms = b.e.at_ms;
    ev->kind = (int)b.e.kind;
    ev->status = (int)b.e.status;
    copy_out(ev->user_id, b.e.id[0], b.e.len[0]);
    copy_out(ev->device_id, b.e.id[1], b.e.len[1]);
    copy_out(ev->gateway_id, b.e.id[2], b.e.len[2]);
    copy_out(ev->conversation_id, b.e.id[3], b.e.len[3]);
    return 0;
}

static uint64_t clock_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Sleep on ev_futex until a writer bumps it (or timeout_ms < 0: forever,
 * else until then).  The caller re-checks; spurious wakeups are fine. */
static int sleep_for(pres_map_t *m, uint64_t c, pres_event_t *ev, int64_t left_ms)
{
    uint32_t *f = &m->rhdr->ev_futex;
    /* Read before announcing ourselves: a writer that bumps it after this
     * makes FUTEX_WAIT return at once (the value differs), and one whose
     * bump we see published its event before (acquire). */
    uint32_t v = pa_load_acquire(f);
    /* seq_cst, then the slot's word seq_cst: our half of step 5. */
    pa_exchange(&m->rhdr->ev_sleepers, 1);
    int rc = try_read(m, c, ev, 1);
    if (rc == -EAGAIN) {
        struct timespec ts, *tp = NULL;
        if (left_ms >= 0) {
            ts.tv_sec = left_ms / 1000;
            ts.tv_nsec = (left_ms % 1000) * 1000000L;
            tp = &ts;
        }
        syscall(SYS_futex, f, FUTEX_WAIT, v, tp, NULL, 0);
    }
    /* The flag stays: other watchers may sleep on; the next writer clears
     * it (one wakeup too many at worst). */
    return rc;
}

/* A few polls before sleeping: at a high event rate the next event is
 * usually a few hundred nanoseconds away, and a watcher that keeps up
 * then costs writers no wakeups. */
#define POLLS 64

PRES_API int pres_watch(pres_t *p, uint64_t *cursor, pres_event_t *ev, int timeout_ms)
{
    if (!p || !cursor || !ev)
        return -EINVAL;
    pres_map_t *m = &p->m;
    if (*cursor == 0)
        *cursor = pa_load_acquire(&m->hdr->ev_next);
    uint64_t deadline = timeout_ms > 0 ? clock_ms() + (uint64_t)timeout_ms : 0;
    for (int polls = 0;; polls++) {
        int rc = try_read(m, *cursor, ev, 0);
        if (rc == 0) {
            (*cursor)++;
            return 0;
        }
        if (rc == -EOVERFLOW) {
            uint64_t o = oldest_held(m);
            *cursor = o > *cursor ? o : *cursor + 1;
            return rc;
        }
        if (rc != -EAGAIN)
            return rc;
        if (timeout_ms == 0)
            return -ETIMEDOUT;
        if (polls < POLLS) {
            pa_pause();
            continue;
        }
        int64_t left = -1;
        if (timeout_ms > 0) {
            uint64_t now = clock_ms();
            if (now >= deadline)
                return -ETIMEDOUT;
            left = (int64_t)(deadline - now);
        }
        rc = sleep_for(m, *cursor, ev, left);
        if (rc == 0) {
            (*cursor)++;
            return 0;
        }
        if (rc != -EAGAIN) {
            if (rc == -EOVERFLOW) {
                uint64_t o = oldest_held(m);
                *cursor = o > *cursor ? o : *cursor + 1;
            }
            return rc;
        }
    }
}
