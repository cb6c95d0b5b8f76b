/*
 * gp.c - cross-process grace periods: client slots, reader slots and read
 * sections (after DPDK's rte_rcu_qsbr and LMDB's reader table).
 *
 * Invariant: a record unlinked from every index before the daemon advanced
 * gp_epoch to t is freed only once every reader slot holds 0 or an epoch
 * >= t.  A reader publishes the epoch it starts in before it reads any
 * link (pres__gp_enter's fence), so a reader that could have reached the
 * record holds an epoch < t until it leaves; a reader entering later
 * cannot reach it.  A slot whose process the kernel reports dead is
 * cleared by the daemon (never on a timeout: a stopped process is alive
 * and resumes in the middle of its read).
 *
 * Slots are claimed per (thread, handle) on first use and cached in
 * thread-local storage; they go back when the thread exits, when the cache
 * needs room, and when the handle closes.
 */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include "store.h"

__thread pres_rs_t pres__tls_rs[PRES_TLS_RS];

/* Open handles of this process, for the thread-exit destructor: a slot is
 * only released while its handle (and so its mapping) still exists. */
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pres_t *reg[64];
static size_t reg_n;
static pthread_key_t tls_key;
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;
static uint32_t claim_seq;

static pres_t *reg_find(uint64_t hid)
{
    for (size_t i = 0; i < reg_n; i++)
        if (reg[i]->id == hid)
            return reg[i];
    return NULL;
}

void pres__counters_fold(pres_map_t *m, uint64_t *counters)
{
    for (int k = 0; k < PRES_C_COUNT; k++) {
        uint64_t v = pa_load(&counters[k]);
        if (v) {
            pa_add_relaxed(&m->rhdr->folded[k], v);
            pa_store(&counters[k], 0);
        }
    }
}

/* Give a reader slot back: its counters are folded into the totals first so
 * pres_stats never loses a count.  Called with reg_lock held. */
static void slot_release(pres_t *p, uint32_t index)
{
    pres_rslot_t *s = &p->m.rslots[index];
    pres__counters_fold(&p->m, s->counters);
    pa_store(&s->epoch, 0);
    pa_store_release(&s->owner, 0);
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < p->n_rslots; i++)
        if (p->rslots[i] == index) {
            p->rslots[i] = p->rslots[--p->n_rslots];
            break;
        }
    pthread_mutex_unlock(&p->lock);
}

static void tls_entry_drop(pres_rs_t *t)
{
    pres_t *p = reg_find(t->hid);
    /* Also a thread that ends inside a section (cancelled): its reads are
     * over, and a slot left behind would hold grace periods back for as
     * long as the process lives. */
    if (p)
        slot_release(p, t->index);
    memset(t, 0, sizeof *t);
}

static void tls_destroy(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < PRES_TLS_RS; i++)
        if (pres__tls_rs[i].hid)
            tls_entry_drop(&pres__tls_rs[i]);
    pthread_mutex_unlock(&reg_lock);
}

/* A child after fork() inherits this thread's cache and the registry, but
 * none of the parent's handles: forget them, or the child would release the
 * parent's reader slots.  (The child opens its own handles.) */
static void atfork_child(void)
{
    pthread_mutex_init(&reg_lock, NULL);
    reg_n = 0;
    memset(pres__tls_rs, 0, sizeof pres__tls_rs);
}

static void tls_init(void)
{
    pthread_key_create(&tls_key, tls_destroy);
    pthread_atfork(NULL, NULL, atfork_child);
}

pres_rs_t *pres__gp_claim(pres_t *p)
{
    pthread_once(&tls_once, tls_init);
    pthread_mutex_lock(&reg_lock);
    pres_rs_t *t = NULL;
    for (int i = 0; i < PRES_TLS_RS && !t; i++)
        if (pres__tls_rs[i].hid == 0 || !reg_find(pres__tls_rs[i].hid))
            t = &pres__tls_rs[i];
    for (int i = PRES_TLS_RS - 1; i >= 0 && !t; i--)
        if (pres__tls_rs[i].nest == 0)
            t = &pres__tls_rs[i];
    if (!t) {
        pthread_mutex_unlock(&reg_lock);
        return NULL;
    }
    if (t->hid)
        tls_entry_drop(t);

    uint32_t n = ++claim_seq;
    uint64_t owner = PRES_RS_OWNER(p->client, p->cgen, n);
    uint32_t start = (uint32_t)(((uint64_t)gettid() * 2654435761u) % PRES_READER_SLOTS);
    int got = -1;
    for (uint32_t k = 0; k < PRES_READER_SLOTS && got < 0; k++) {
        uint32_t i = (start + k) % PRES_READER_SLOTS;
        uint64_t exp = 0;
        if (pa_load(&p->m.rslots[i].owner) == 0 &&
            pa_cas(&p->m.rslots[i].owner, &exp, owner))
            got = (int)i;
    }
    if (got < 0) {
        pthread_mutex_unlock(&reg_lock);
        return NULL;
    }
    pthread_mutex_lock(&p->lock);
    if (p->n_rslots == p->cap_rslots) {
        size_t nc = p->cap_rslots ? p->cap_rslots * 2 : 8;
        uint32_t *a = realloc(p->rslots, nc * sizeof *a);
        if (!a) {
            pthread_mutex_unlock(&p->lock);
            pa_store_release(&p->m.rslots[got].owner, 0);
            pthread_mutex_unlock(&reg_lock);
            return NULL;
        }
        p->rslots = a;
        p->cap_rslots = nc;
    }
    p->rslots[p->n_rslots++] = (uint32_t)got;
    pthread_mutex_unlock(&p->lock);

    t->hid = p->id;
    t->slot = &p->m.rslots[got];
    t->nest = 0;
    t->index = (uint32_t)got;
    /* Any non-NULL value makes the destructor run at thread exit. */
    pthread_setspecific(tls_key, pres__tls_rs);
    pthread_mutex_unlock(&reg_lock);
    return t;
}

int pres__gp_client_register(pres_t *p)
{
    static uint64_t next_id;
    pres_map_t *m = &p->m;
    uint64_t pid = (uint64_t)getpid();
    uint64_t start = pres__proc_start((int)pid);

    pthread_once(&tls_once, tls_init);
    pthread_mutex_lock(&reg_lock);
    int full = reg_n == sizeof reg / sizeof reg[0];
    pthread_mutex_unlock(&reg_lock);
    if (full)
        return -EMFILE;
    /* Client 0 is the daemon's. */
    for (uint32_t i = 1; i < PRES_CLIENTS; i++) {
        pres_client_t *c = &m->clients[i];
        uint64_t exp = 0;
        if (pa_load(&c->pid) != 0 || !pa_cas(&c->pid, &exp, pid))
            continue;
        pa_store(&c->start, start);
        pa_store(&c->flags, p->rdwr ? PRES_CL_RDWR : 0);
        p->client = i;
        p->cgen = pa_load(&c->gen);
        p->token = PRES_TOKEN(i, p->cgen);
        p->latch = i + 1;
        /* ready last: the daemon checks pid and start only once it is set. */
        pa_store_release(&c->ready, 1);
        pthread_mutex_lock(&reg_lock);
        p->id = ++next_id;
        if (reg_n < sizeof reg / sizeof reg[0])
            reg[reg_n++] = p;
        /* else: opened by other threads meanwhile; this handle's slots are
         * then released by pres_close only, not at thread exit */
        pthread_mutex_unlock(&reg_lock);
        return 0;
    }
    return -ENOSPC;
}

void pres__gp_client_release(pres_t *p)
{
    pres_map_t *m = &p->m;
    pthread_mutex_lock(&reg_lock);
    for (size_t i = 0; i < reg_n; i++)
        if (reg[i] == p) {
            reg[i] = reg[--reg_n];
            break;
        }
    while (p->n_rslots)
        slot_release(p, p->rslots[p->n_rslots - 1]);
    pthread_mutex_unlock(&reg_lock);

    /* Gateways attached through this handle: the daemon ends their
     * connections as on a death (unless another process took them over). */
    for (size_t i = 0; i < p->n_gws; i++) {
        uint64_t exp = p->token;
        pa_cas(&m->gws[p->gws[i]].owner, &exp, PRES_GW_CLOSED);
    }
    pres_client_t *c = &m->clients[p->client];
    pa_store(&c->ready, 0);
    pa_store(&c->gen, pa_load(&c->gen) + 1);
    pa_store_release(&c->pid, 0);
}

int pres__client_alive(const pres_map_t *m, uint32_t client)
{
    if (client >= PRES_CLIENTS)
        return 0;
    const pres_client_t *c = &m->clients[client];
    uint64_t pid = pa_load_acquire(&c->pid);
    if (pid == 0)
        return 0;
    uint64_t start = pa_load_acquire(&c->ready) ? pa_load(&c->start) : 0;
    return pres__proc_alive((int)pid, start);
}

static int client_state(const pres_map_t *m, uint32_t client, uint64_t token)
{
    const pres_client_t *c = &m->clients[client];
    uint64_t pid = pa_load_acquire(&c->pid);
    if (pid == 0 || (token && (pa_load(&c->gen) & 0xffffu) != ((token >> 32) & 0xffffu)))
        return PRES_HOLDER_DEAD;
    uint64_t start = pa_load_acquire(&c->ready) ? pa_load(&c->start) : 0;
    return pres__proc_state((int)pid, start);
}

int pres__latch_holder_state(const pres_map_t *m, unsigned latch)
{
    if (latch == PRES_DAEMON_LATCH)
        return client_state(m, PRES_DAEMON_CLIENT, 0);
    if (latch == 0 || latch > PRES_READER_SLOTS)
        return PRES_HOLDER_DEAD;
    uint64_t o = pa_load_acquire(&m->rslots[latch - 1].owner);
    if (o == 0 || o == PRES_RS_SWEEPING)
        return PRES_HOLDER_DEAD;
    uint32_t cl = PRES_TOKEN_CLIENT(o);
    if (cl >= PRES_CLIENTS)
        return PRES_HOLDER_DEAD;
    return client_state(m, cl, o);
}

uint64_t pres__gp_advance(pres_map_t *m)
{
    uint64_t t = pa_fetch_add(&m->rhdr->gp_epoch, 1) + 1;
    /* Order the unlinks before this point against the slot loads after it
     * (the daemon's half of the handshake in pres__gp_enter). */
    pa_fence();
    return t;
}

uint64_t pres__gp_min_active(const pres_map_t *m, uint32_t *n_active)
{
    uint64_t min = UINT64_MAX;
    uint32_t n = 0;
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++) {
        /* acquire: pairs with the reader's release on leaving, so its reads
         * are done before we free what it read. */
        uint64_t e = pa_load_acquire(&m->rslots[i].epoch);
        if (e) {
            n++;
            if (e < min)
                min = e;
        }
    }
    if (n_active)
        *n_active = n;
    return min;
}
