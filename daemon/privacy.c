/*
 * privacy.c - the daemon's side of privacy policies: freeing the exception
 * entries of replaced policies, of writers that gave up, and of writers
 * killed at any instruction (lib/policy.c has the writer's side).
 *
 * An entry's alloc word says whose it is: a client's token (taken, being
 * written, or published by a writer not yet done), HELD (published: the
 * policy's), RETIRED (replaced, or given back: free it after a grace
 * period), or FREE/POOLED (ours).  The writer that replaces a block marks
 * it RETIRED, and the daemon frees RETIRED entries it finds by scanning
 * the alloc words: a pass when a note says a policy changed, and every few
 * seconds as a backstop, a chunk a tick for a large area.
 *
 * What a killed writer leaves:
 *  - entries under its token never published: unreachable from every
 *    user's policy word;
 *  - a block it published and did not yet mark HELD: reachable;
 *  - a block it replaced and did not yet mark RETIRED: unreachable, HELD
 *    (or under the token of its setter, who marks it HELD later).
 * So the candidates of a pass are the entries under dead tokens and the
 * HELD entries not known to be in a policy, and a mark over every user's
 * policy word decides: a candidate not reached is garbage, since a dead
 * client publishes nothing more, and a HELD block, once replaced, is never
 * published again.  (Candidates are collected before the mark starts: an
 * entry that becomes HELD during the mark was published after the mark
 * may have read its user's word, and is not a candidate.)  A candidate
 * reached under a dead token is adopted: HELD.  Marks run only when a
 * pass found candidates: after a death, after lost notes, never at steady
 * state, where notes keep the "known to be in a policy" hints current.
 *
 * Entries are freed only through pd_retire (a grace period): a reader may
 * stand on a block its writer just replaced.  A flag per entry remembers
 * that it was handed to pd_retire, so nothing is retired twice.
 */
#include <stdlib.h>
#include <string.h>

#include "atomics.h"
#include "daemon.h"
#include "policy.h"

/* A pass over the alloc words: every tick for an area up to SMALL_AREA
 * entries, else PASS_TICKS ticks for the whole (a second). */
#define SMALL_AREA    65536u
#define PASS_TICKS    50u
/* A pass at least this often, whatever the notes say. */
#define BACKSTOP_MS   5000u

#define F_RETIRING 1u   /* handed to pd_retire, not yet freed */
#define F_REACHED  2u   /* in a policy, as of the last mark or note */

typedef struct pd_privacy {
    uint8_t  *flag;           /* per entry: F_* */
    uint8_t  *mark;           /* per entry: scratch of a mark */
    uint32_t *cand;           /* candidates of the pass under way */
    uint64_t *cand_was;       /* the alloc word each had */
    size_t    ncand;
    uint64_t  pos;            /* next entry of the pass; UINT64_MAX: none */
    int       pass_all;       /* this pass: every HELD entry is a candidate */
    int       want, want_all;
    uint64_t  last_pass;      /* mono ms a pass last started */
    uint64_t  lost_seen;      /* notes_lost as last seen */
} pd_privacy_t;

static int is_token(uint64_t a)
{
    return a != PRES_ALLOC_FREE && a != PRES_ALLOC_POOLED && a != PRES_ALLOC_RETIRED &&
           a != PRES_ALLOC_HELD;
}

/* Hand entry i to pd_retire, once. */
static void retire(pd_t *d, uint32_t i)
{
    if (d->pv->flag[i] & F_RETIRING)
        return;
    d->pv->flag[i] |= F_RETIRING;
    pd_retire(d, i, PRES_RK_EXC);
}

/* The entries reachable from policy word w: the checked walk, or for a
 * damaged block as far as its links go (bounded), so that nothing a
 * reader could reach is ever called garbage. */
static size_t block_of(const pres_map_t *m, uint64_t w, uint32_t *idx)
{
    size_t n = 0;
    if (pres__policy_block(m, w, idx, &n) == 0)
        return n;
    uint32_t nx = PRES_PV_HEAD(w);
    for (n = 0; nx >= 1 && nx <= m->exc_cap && n < PRES_PV_BLOCK_MAX; n++) {
        idx[n] = nx - 1;
        nx = pa_load(&m->excs[nx - 1].next);
    }
    return n;
}

int pd_privacy_init(pd_t *d)
{
    pres_map_t *m = &d->m;
    pd_privacy_t *pv = calloc(1, sizeof *pv);
    if (!pv)
        return -ENOMEM;
    d->pv = pv;
    pv->flag = calloc(m->exc_cap, 1);
    pv->mark = calloc(m->exc_cap, 1);
    pv->cand = calloc(m->exc_cap, sizeof *pv->cand);
    pv->cand_was = calloc(m->exc_cap, sizeof *pv->cand_was);
    if (!pv->flag || !pv->mark || !pv->cand || !pv->cand_was)
        return -ENOMEM;
    /* What pd_adopt found RETIRED already waits for a grace period: those
     * entries exactly (clients may be retiring more meanwhile: the store
     * is usable before the daemon is done adopting it).  Anything else
     * may be what a client killed before we started left: the first pass
     * looks at all of it. */
    for (size_t k = 0; k < d->ret_n; k++)
        if (d->ret[k].kind == PRES_RK_EXC)
            pv->flag[d->ret[k].idx] |= F_RETIRING;
    pv->pos = UINT64_MAX;
    pv->want = pv->want_all = 1;
    pv->lost_seen = pa_load(&m->hdr->dc.notes_lost);
    return 0;
}

void pd_privacy_fini(pd_t *d)
{
    pd_privacy_t *pv = d->pv;
    if (!pv)
        return;
    free(pv->flag);
    free(pv->mark);
    free(pv->cand);
    free(pv->cand_was);
    free(pv);
    d->pv = NULL;
}

void pd_privacy_deaths(pd_t *d)
{
    /* A writer killed between replacing a block and retiring it leaves a
     * HELD block that the hints still say is in a policy. */
    d->pv->want = d->pv->want_all = 1;
}

void pd_privacy_exc_freed(pd_t *d, uint32_t i)
{
    d->pv->flag[i] = 0;
}

/* A user record is freed (grace period over, nobody can reach it): its
 * policy goes with it.  Marked RETIRED for the next pass to hand to
 * pd_retire (not from here: we are inside the grace-period loop). */
void pd_privacy_user_freed(pd_t *d, uint32_t u)
{
    pres_map_t *m = &d->m;
    uint32_t idx[PRES_PV_BLOCK_MAX];
    uint64_t w = pa_load(&m->users[u].privacy);
    pa_store(&m->users[u].privacy, 0);
    size_t n = block_of(m, w, idx);
    for (size_t k = 0; k < n; k++) {
        uint64_t *a = &m->excs[idx[k]].alloc;
        uint64_t v = pa_load(a);
        if (!(d->pv->flag[idx[k]] & F_RETIRING) && v != PRES_ALLOC_FREE &&
            v != PRES_ALLOC_POOLED)
            pa_store(a, PRES_ALLOC_RETIRED);
    }
    if (n)
        d->pv->want = 1;
}

/* A policy changed: its entries are in a policy now (a hint for passes). */
static void note_user(pd_t *d, uint32_t u)
{
    pres_map_t *m = &d->m;
    uint32_t idx[PRES_PV_BLOCK_MAX];
    if (u >= m->user_cap)
        return;
    size_t n = block_of(m, pa_load_acquire(&m->users[u].privacy), idx);
    for (size_t k = 0; k < n; k++)
        d->pv->flag[idx[k]] |= F_REACHED;
    d->pv->want = 1;
}

/* Mark every entry some user's policy word reaches (retired user records
 * included: theirs go when the record is freed), then decide on the
 * candidates of the pass. */
static void mark_and_free(pd_t *d)
{
    pres_map_t *m = &d->m;
    pd_privacy_t *pv = d->pv;
    uint32_t idx[PRES_PV_BLOCK_MAX];
    size_t freed = 0, adopted = 0;
    memset(pv->mark, 0, m->exc_cap);
    for (uint32_t u = 0; u < m->user_cap; u++) {
        uint64_t a = pa_load(&m->users[u].alloc);
        if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED)
            continue;
        size_t n = block_of(m, pa_load_acquire(&m->users[u].privacy), idx);
        for (size_t k = 0; k < n; k++)
            pv->mark[idx[k]] = 1;
    }
    for (size_t k = 0; k < pv->ncand; k++) {
        uint32_t i = pv->cand[k];
        uint64_t was = pv->cand_was[k];
        uint64_t *a = &m->excs[i].alloc;
        /* The CASes fail if the entry moved on since the pass saw it (a
         * replacer retired it): the next pass sees it as it is then. */
        if (pv->mark[i]) {
            if (is_token(was) && pa_cas(a, &was, PRES_ALLOC_HELD))
                adopted++;
        } else if (pa_cas(a, &was, PRES_ALLOC_RETIRED)) {
            retire(d, i);
            freed++;
        }
    }
    for (uint32_t i = 0; i < m->exc_cap; i++)
        pv->flag[i] = (uint8_t)((pv->flag[i] & ~F_REACHED) | (pv->mark[i] ? F_REACHED : 0));
    if (freed || adopted)
        pd_log(LOG_DEBUG, "privacy: %zu exception entries of dead or replaced policies "
                          "freed, %zu adopted", freed, adopted);
}

static void pass_entry(pd_t *d, uint32_t i)
{
    pd_privacy_t *pv = d->pv;
    /* acquire: pairs with the release that retired it after the CAS that
     * replaced its policy, so that CAS precedes our next epoch advance. */
    uint64_t a = pa_load_acquire(&d->m.excs[i].alloc);
    if (a == PRES_ALLOC_RETIRED) {
        retire(d, i);
        return;
    }
    int cand = a == PRES_ALLOC_HELD ? pv->pass_all || !(pv->flag[i] & F_REACHED)
                                    : is_token(a) && !pd_token_live(d, a);
    if (cand && !(pv->flag[i] & F_RETIRING)) {
        pv->cand[pv->ncand] = i;
        pv->cand_was[pv->ncand++] = a;
    }
}

void pd_privacy_tick(pd_t *d, uint64_t nm)
{
    pres_map_t *m = &d->m;
    pd_privacy_t *pv = d->pv;
    for (size_t k = 0; k < d->nb_n; k++)
        if (d->nb[k].kind == PRES_NOTE_USER)
            note_user(d, d->nb[k].idx);
    uint64_t lost = pa_load(&m->hdr->dc.notes_lost);
    if (lost != pv->lost_seen) {
        pv->lost_seen = lost;         /* a policy changed unseen */
        pv->want = pv->want_all = 1;
    }
    if (nm - pv->last_pass >= BACKSTOP_MS && pd_in_use(d, PRES_RK_EXC))
        pv->want = 1;
    if (pv->pos == UINT64_MAX) {
        if (!pv->want)
            return;
        pv->pos = 0;
        pv->pass_all = pv->want_all;
        pv->want = pv->want_all = 0;
        pv->ncand = 0;
        pv->last_pass = nm;
    }
    uint64_t chunk = m->exc_cap <= SMALL_AREA ? m->exc_cap : (m->exc_cap + PASS_TICKS - 1) / PASS_TICKS;
    uint64_t end = pv->pos + chunk < m->exc_cap ? pv->pos + chunk : m->exc_cap;
    for (uint64_t i = pv->pos; i < end; i++)
        pass_entry(d, (uint32_t)i);
    pv->pos = end;
    if (end < m->exc_cap)
        return;
    pv->pos = UINT64_MAX;
    if (pv->ncand)
        mark_and_free(d);
}
