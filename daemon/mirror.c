/*
 * mirror.c - the write-behind mirror of the store to LMDB.
 *
 * What is mirrored (lib/db.h has the formats): for each device its user,
 * gateway, connection start, last seen, last activity and whether it was
 * connected when written; for each user its last seen and privacy policy
 * with its exception lists.
 *
 * How a change reaches LMDB.  A record is *dirty* from the moment the
 * daemon learns it changed until a commit holding a read of it made after
 * that moment has returned.  The daemon learns from
 *   - the change notes clients write (d->nb each tick): a device note
 *     marks the device, a user note the user;
 *   - its own passes (reaper.c): a TTL seen passing, a user's last seen
 *     raised by an eviction, and an interaction on a device that was
 *     already active (one store on the gateway's hot path, no note: one
 *     index pass in ACTIVE_PASSES compares each connected device's
 *     activity word with the one last written); a gateway death writes a
 *     note;
 *   - sweeps, when notes were lost (d->resync & PD_RESYNC_MIRROR), after
 *     adopting a region (LMDB may lack what the previous daemon had not
 *     committed when it was killed), and at SIGTERM: every record is
 *     marked, and the writer writes those whose state differs from what
 *     it last wrote (a 64-bit fingerprint per record).  A heartbeat that
 *     only moves the expiry changes nothing mirrored until the TTL passes.
 *
 * The main thread only marks: a flag per record (queued at most once,
 * however often it changes) and a queue stamped with the tick it became
 * dirty.  When the writer thread is idle, the main thread hands it the
 * queue's records in order (their indexes: "in flight" from then on).
 * The writer reads each as readers do (a consistent snapshot, inside a
 * read section of its own handle on the store, so the daemon's reclamation
 * never frees what it is reading), leaves out what is as it was last
 * written, stages the rest (coalesced per record by daemon/db.c), adds the
 * users of devices that changed (their last seen moves with them), and
 * commits in one durable transaction.  A record in flight, or a user the
 * writer read in a job not yet committed, is never evicted or retired from
 * shared memory, so nothing is answered only from LMDB before LMDB has it.
 * A commit that fails (a full map or disk) keeps everything staged and is
 * retried, backing off; new changes keep coalescing meanwhile.
 *
 * mirror_lag_ms is now minus the oldest stamp of a record still dirty (the
 * queue's head, the oldest job not committed, a sweep in progress): 0 when
 * LMDB holds everything.
 *
 * Threads: flags, queue and stamps are the main thread's; fingerprints and
 * the LMDB writer (pd_db_t) the writer's once started; the job is handed
 * over under the mutex; the per-record words both read (the activity last
 * written, the job that last read a user) are relaxed atomics.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>

#include "atomics.h"
#include "clock.h"
#include "mirror.h"
#include "store.h"

/* Records handed to the writer in one job at most.  A job takes whatever
 * queued while the last one was written, so a storm coalesces into larger
 * jobs, and larger jobs write fewer bytes a record: LMDB copies each leaf
 * page a commit touches, and a million devices fill some 27,000 pages, so
 * 32k random changes copy 19,000 pages and 250k copy nearly all of them,
 * 8 times fewer a record.  This bounds the writer's staging memory (some
 * 200 bytes a record). */
#define MAX_JOB        262144u
/* Records the writer reads in one read section: short sections, so the
 * daemon's grace periods (which wait for them) keep moving. */
#define SECTION        1024u
/* Records a sweep marks a tick at most, and its share of the tick (20 ms):
 * a store of a million devices is marked in about two seconds. */
#define SWEEP_CHUNK    16384u
#define SWEEP_NS       UINT64_C(3000000)
/* Interactions no note announces (on a device already active) are looked
 * for on one pass of the device index in this many: they reach LMDB
 * within a pass (20 s for a large store, less with a short --retain-ms,
 * every tick for a small one). */
#define ACTIVE_PASSES  1u
/* An idle mirror still commits this often: the commit time (meta
 * "alive_ms") is what a rebuild takes as the last seen of devices that
 * LMDB says were connected. */
#define ALIVE_MS       1000u
/* A failed commit is retried after this long, doubling up to the max. */
#define RETRY_MS       1000u
#define RETRY_MAX_MS   16000u
/* LMDB's first map: at least this, and twice what the capacities need. */
#define MAP_MIN        (UINT64_C(64) << 20)
/* Bytes a record of each kind takes in LMDB at most, with the key and the
 * B-tree's node header; users typically have no exception lists. */
#define DEV_BYTES      (PRES_DB_DEV_MAX + PRES_ID_MAX + 16u)
#define USER_BYTES     (64u + PRES_ID_MAX + 16u)
#define EXC_BYTES      64u

/* Per-record flags (main thread). */
#define F_QUEUED  1u      /* in the queue */
#define F_FLIGHT  2u      /* handed to the writer, not yet committed */

/* Queue entries: a record index, bit 31 set for a user. */
#define Q_USER    (UINT32_C(1) << 31)

typedef struct {
    uint64_t pos, at;                /* queue position, mono ms */
} stamp_t;

/* What the main thread hands the writer, and what comes back. */
typedef struct {
    uint32_t *ents;                  /* room for MAX_JOB */
    size_t    n;
    uint64_t  seq;                   /* jobs are numbered from 1 */
    uint64_t  wall;                  /* the commit's alive_ms */
    int       commit;                /* 0: stage only (commits failing) */
    int       check;                 /* compare unwritten records with LMDB */
    int       rc;                    /* 0 committed, 1 staged, < 0 failed */
    uint32_t  again[64];             /* caught mid-publish: read again */
    size_t    n_again;
    size_t    written;
    uint64_t  ms;
} job_t;

struct pd_mirror {
    pd_db_t  *db;
    uint64_t  map_max;               /* --db-map-max, 0: from the filesystem */
    char      dir[4096];
    uint32_t  dev_cap, user_cap;
    /* main thread: flags, the queue (a ring large enough for every record
     * once) and where each tick's entries start */
    uint8_t  *dflag, *uflag;
    uint32_t *q;
    uint64_t  qmask, qhead, qtail;
    stamp_t  *st;
    size_t    st_h, st_n, st_cap;
    uint32_t *fl;                    /* handed over since the last commit */
    size_t    fl_n, fl_cap;
    uint64_t  fl_oldest;             /* their oldest stamp, 0: none */
    int       pending;               /* staged, not committed */
    int       sweeping;
    uint64_t  sweep_pos, sweep_at, sweep_end;
    int       adopting;              /* the adopt's sweep is not handed over */
    uint64_t  dev_passes;            /* passes of the device index done */
    uint64_t  notes_taken;           /* d->note_tail when d->nb was taken */
    uint64_t  last_tick;             /* mono ms of the last mirror tick */
    uint64_t  last_commit, retry_at, retry_ms;
    int       failing;
    uint64_t  seq, committed_seq, commits, committed;
    /* both threads, relaxed atomics */
    uint64_t *dact;                  /* per device: activity word last written */
    uint64_t *ujob;                  /* per user: the job that last read it */
    /* the writer (and a rebuild, before it starts) */
    uint64_t *dfp, *ufp;             /* fingerprints of what was last written */
    pres_t   *rp;                    /* its own read-only handle on the store */
    pres_user_t *users;              /* the daemon's read-write map of them */
    pres_db_user_t *wu, *wold;
    uint32_t *extra;                 /* users of devices read in the job */
    size_t    n_extra, cap_extra;
    /* the handoff */
    job_t     job;
    pthread_t thr;
    int       started;
    pthread_mutex_t mu;
    pthread_cond_t  cv;
    int       busy, done, quit, ready;
    char      err[512];
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int grow(void **v, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < need)
        nc *= 2;
    void *a = realloc(*v, nc * elem);
    if (!a)
        return -ENOMEM;
    *v = a;
    *cap = nc;
    return 0;
}

/* ---- reading records as the mirror writes them ---------------------------------- */

static uint64_t fp_add(uint64_t h, uint64_t v)
{
    return pres__hash_mix(h ^ v) + UINT64_C(0x9e3779b97f4a7c15);
}

static uint64_t fp_end(uint64_t h)
{
    return h ? h : 1;            /* 0 means "not known to be written" */
}

/* Device i as the mirror writes it: into *out, its key into key, and the
 * fingerprint, the activity word and the user index.  check: only the
 * current record of its key (the first live one in its chain) will do.
 * Returns 0, -EAGAIN (pending: its publish writes a note), -ESTALE (dead,
 * superseded: *user is still set), -EBUSY (publishes racing the read),
 * -EPROTO.  Call inside a read section (or before the store is published). */
static int dev_read(const pres_map_t *m, uint32_t i, uint64_t nm, uint64_t nw, int check,
                    pres_db_dev_t *out, char *key, uint64_t *fp, uint64_t *act, uint32_t *user)
{
    const pres_dev_t *r = &m->devs[i];
    *user = pa_load(&r->user);
    pres_snap_t s;
    int rc = pres__dev_snap(m, i, &s);
    if (rc == -EAGAIN && PRES_LIVE_STATE(pa_load(&r->live)) == PRES_DS_DEAD)
        return -ESTALE;
    if (rc < 0)
        return rc;
    uint8_t kl = r->keylen;
    if (kl < 1 || kl > PRES_ID_MAX)
        return -EPROTO;
    uint64_t h = pres__hash(r->key, kl, m->seed);
    if (check && pres__idx_dev_find(m, r->key, kl, h) != (int)i)
        return -ESTALE;
    pres_device_info_t info;
    pres__dev_info(m, i, &s, nm, nw, &info);
    memcpy(key, info.device_id, PRES_ID_MAX + 1);
    memcpy(out->user_id, info.user_id, sizeof out->user_id);
    memcpy(out->gateway_id, info.gateway_id, sizeof out->gateway_id);
    out->connected_at_ms = info.connected_at_ms;
    out->last_seen_ms = info.last_seen_ms;
    out->last_active_ms = info.last_active_ms;
    out->connected = (uint32_t)info.connected;
    if (!out->user_id[0])
        return -EPROTO;
    /* A connected device's last seen is the time of the write: it moves
     * with every read and says nothing new, so it is not part of it. */
    uint64_t f = fp_add(h, *user);
    f = fp_add(f, s.c.gw);
    f = fp_add(f, s.c.connected_at);
    f = fp_add(f, s.activity);
    f = fp_add(f, out->connected ? UINT64_MAX : out->last_seen_ms);
    /* Bit 0 says whether it was connected: a device connected before and
     * after a write changes nothing of its user's. */
    f = (f & ~UINT64_C(1)) | out->connected;
    *fp = f ? f : 2;
    *act = s.activity;
    return 0;
}

/* The entries of the exception block that policy word w names, checked as
 * a reader checks them (indexes in range, a HEAD then n_allow ALLOW then
 * n_deny DENY entries, the last ending the list).  The block is immutable
 * while published.  0 or -EPROTO. */
static int block_read(const pres_map_t *m, uint64_t w, pres_db_user_t *out, uint64_t *f)
{
    uint32_t i1 = PRES_PV_HEAD(w);
    out->n_allow = out->n_deny = 0;
    out->frozen_seen_ms = 0;
    if (!i1)
        return 0;
    if (i1 > m->exc_cap)
        return -EPROTO;
    const pres_exc_t *e = &m->excs[i1 - 1];
    uint32_t na = pa_load(&e->n_allow), nd = pa_load(&e->n_deny);
    if (pa_load(&e->kind) != PRES_EXC_HEAD || na > PRES_EXCEPTIONS_MAX ||
        nd > PRES_EXCEPTIONS_MAX)
        return -EPROTO;
    out->frozen_seen_ms = pa_load(&e->frozen_seen);
    *f = fp_add(*f, out->frozen_seen_ms);
    uint32_t nx = pa_load(&e->next);
    for (uint32_t k = 0; k < na + nd; k++) {
        /* The counts bound the walk: a cycle runs out of them. */
        if (nx < 1 || nx > m->exc_cap)
            return -EPROTO;
        e = &m->excs[nx - 1];
        uint32_t kind = k < na ? PRES_EXC_ALLOW : PRES_EXC_DENY;
        uint8_t kl = e->keylen;
        if (pa_load(&e->kind) != kind || kl < 1 || kl > PRES_ID_MAX)
            return -EPROTO;
        char *id = k < na ? out->allow[k] : out->deny[k - na];
        memcpy(id, e->key, kl);
        id[kl] = '\0';
        *f = fp_add(*f, pres__hash(e->key, kl, kind));
        nx = pa_load(&e->next);
    }
    if (nx != 0)
        return -EPROTO;
    out->n_allow = na;
    out->n_deny = nd;
    return 0;
}

/* User u as the mirror writes it.  check: only a user its key finds.
 * Returns 0, -EAGAIN (not a published, current user, or its list kept
 * moving), -EPROTO.  Call inside a read section. */
static int user_read(const pres_map_t *m, uint32_t u, uint64_t nm, uint64_t nw, int check,
                     pres_db_user_t *out, char *key, uint64_t *fp, int *connected)
{
    const pres_user_t *r = &m->users[u];
    uint64_t a = pa_load(&r->alloc);
    if (a == PRES_ALLOC_FREE || a == PRES_ALLOC_POOLED || a == PRES_ALLOC_RETIRED ||
        pa_load_acquire(&r->dhead) == PRES_LINK_RETIRED)
        return -EAGAIN;
    uint8_t kl = r->keylen;
    if (kl < 1 || kl > PRES_ID_MAX)
        return -EAGAIN;
    uint64_t h = pres__hash(r->key, kl, m->seed);
    if (check && pres__idx_user_find(m, r->key, kl, h) != (int)u)
        return -EAGAIN;
    pres_agg_t agg;
    int rc = -EAGAIN;
    for (int tries = 0; tries < 4 && rc == -EAGAIN; tries++)
        rc = pres__user_agg(m, u, nm, nw, &agg);
    if (rc < 0)
        return rc;
    memcpy(key, r->key, kl);
    key[kl] = '\0';
    out->last_seen_ms = agg.last_seen_ms;
    *connected = agg.devices > 0;
    /* acquire: the block the word names is read as it was published. */
    uint64_t w = pa_load_acquire(&r->privacy);
    if (!(w & PRES_PV_SET))
        w = 0;
    out->policy = (uint32_t)(w & 0xffu);
    uint64_t f = fp_add(h, agg.devices ? UINT64_MAX : agg.last_seen_ms);
    f = fp_add(f, w & 0xffu);
    if ((rc = block_read(m, w, out, &f)) < 0)
        return rc;
    *fp = fp_end(f);
    return 0;
}

uint64_t pd_mirror_fp_dev(pd_t *d, uint32_t i, uint64_t nm, uint64_t nw)
{
    pres_db_dev_t r;
    char key[PRES_ID_MAX + 1];
    uint64_t fp, act;
    uint32_t u;
    return dev_read(&d->m, i, nm, nw, 0, &r, key, &fp, &act, &u) == 0 ? fp : 0;
}

uint64_t pd_mirror_fp_user(pd_t *d, uint32_t u, uint64_t nm, uint64_t nw)
{
    char key[PRES_ID_MAX + 1];
    uint64_t fp;
    int conn;
    return user_read(&d->m, u, nm, nw, 0, d->mirror->wu, key, &fp, &conn) == 0 ? fp : 0;
}

void pd_mirror_set_written(pd_t *d, int user, uint32_t idx, uint64_t fp)
{
    struct pd_mirror *mr = d->mirror;
    if (user && idx < mr->user_cap) {
        mr->ufp[idx] = fp;
    } else if (!user && idx < mr->dev_cap) {
        mr->dfp[idx] = fp;
        pa_store(&mr->dact[idx], pa_load(&d->m.devs[idx].activity));
    }
}

/* ---- the queue (main thread) ----------------------------------------------------- */

static void q_push(struct pd_mirror *mr, uint32_t ent, uint8_t *flag, uint64_t nm)
{
    if (*flag & F_QUEUED)
        return;
    /* A stamp per tick that queued anything: the stamps of the entries
     * after it, in order (never earlier than the one before: the head's
     * stamp is the oldest). */
    if (mr->st_h < mr->st_n && nm < mr->st[mr->st_n - 1].at)
        nm = mr->st[mr->st_n - 1].at;
    if (mr->st_h == mr->st_n || mr->st[mr->st_n - 1].at != nm) {
        if (grow((void **)&mr->st, &mr->st_cap, mr->st_n + 1, sizeof *mr->st) < 0) {
            pd_log(LOG_ERR, "mirror: out of memory queueing a change");
            return;
        }
        mr->st[mr->st_n++] = (stamp_t){ mr->qtail, nm };
    }
    *flag |= F_QUEUED;
    /* The ring holds every record once: it cannot fill. */
    mr->q[mr->qtail++ & mr->qmask] = ent;
}

/* The stamp of the queue's head (the queue is not empty). */
static uint64_t q_head_at(struct pd_mirror *mr)
{
    while (mr->st_h + 1 < mr->st_n && mr->st[mr->st_h + 1].pos <= mr->qhead)
        mr->st_h++;
    return mr->st[mr->st_h].at;
}

static uint8_t *flag_of(struct pd_mirror *mr, uint32_t ent)
{
    return (ent & Q_USER) ? &mr->uflag[ent & ~Q_USER] : &mr->dflag[ent];
}

static void mark_dev(pd_t *d, uint32_t i, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    if (mr && i < mr->dev_cap)
        q_push(mr, i, &mr->dflag[i], nm);
}

static void mark_user(pd_t *d, uint32_t u, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    if (mr && u < mr->user_cap)
        q_push(mr, u | Q_USER, &mr->uflag[u], nm);
}

/* Mark what the notes read this tick (d->nb) name, once, before anything
 * else the tick marks: a pass that asks whether a record may leave memory
 * must not miss a note of this tick, and a note's change was made after
 * the previous tick read the notes, which is its stamp (the age of a
 * change counts from when it may have been made, not from when the
 * daemon saw it). */
static void notes_take(pd_t *d, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    if (mr->notes_taken == d->note_tail)
        return;
    mr->notes_taken = d->note_tail;
    uint64_t at = mr->last_tick && mr->last_tick < nm ? mr->last_tick : nm;
    for (size_t k = 0; k < d->nb_n; k++) {
        const pd_note_t *n = &d->nb[k];
        if (n->kind == PRES_NOTE_DEV)
            mark_dev(d, n->idx, at);
        else if (n->kind == PRES_NOTE_USER)
            mark_user(d, n->idx, at);
    }
}

void pd_mirror_dev(pd_t *d, uint32_t i)
{
    uint64_t nm = pres__mono_ms();
    if (!d->mirror)
        return;
    notes_take(d, nm);
    mark_dev(d, i, nm);
}

void pd_mirror_user(pd_t *d, uint32_t u)
{
    uint64_t nm = pres__mono_ms();
    if (!d->mirror)
        return;
    notes_take(d, nm);
    mark_user(d, u, nm);
}

/* On one pass of the index in ACTIVE_PASSES: the activity word is a line
 * of the record the pass does not otherwise read, and the written one a
 * random place of an array, two misses a connected device. */
void pd_mirror_active(pd_t *d, uint32_t i, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    if (mr && mr->dev_passes % ACTIVE_PASSES == 0 && i < mr->dev_cap &&
        pa_load(&d->m.devs[i].activity) != pa_load(&mr->dact[i])) {
        notes_take(d, nm);
        mark_dev(d, i, nm);
    }
}

/* ---- sweeps (main thread) -------------------------------------------------------- */

static int sweep_owed(const pd_t *d)
{
    return d->mirror->sweeping || (d->resync & PD_RESYNC_MIRROR);
}

static void sweep_begin(pd_t *d, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    d->resync &= ~PD_RESYNC_MIRROR;
    mr->sweeping = 1;
    mr->sweep_pos = 0;
    if (!mr->sweep_at)
        mr->sweep_at = nm;
}

static int held(uint64_t a)
{
    return a != PRES_ALLOC_FREE && a != PRES_ALLOC_POOLED && a != PRES_ALLOC_RETIRED;
}

/* Mark up to `budget` held records (the writer leaves out those that are as
 * written), until the precise clock passes until_ns. */
static void sweep_step(pd_t *d, uint64_t nm, uint64_t budget, uint64_t until_ns)
{
    struct pd_mirror *mr = d->mirror;
    pres_map_t *m = &d->m;
    uint64_t end = (uint64_t)mr->dev_cap + mr->user_cap;
    for (; budget && mr->sweep_pos < end; budget--, mr->sweep_pos++) {
        if ((budget & 255) == 0 && now_ns() > until_ns)
            break;
        uint64_t pos = mr->sweep_pos;
        if (pos < mr->dev_cap) {
            if (held(pa_load(&m->devs[pos].alloc)))
                mark_dev(d, (uint32_t)pos, nm);
        } else if (held(pa_load(&m->users[pos - mr->dev_cap].alloc))) {
            mark_user(d, (uint32_t)(pos - mr->dev_cap), nm);
        }
    }
    if (mr->sweep_pos == end) {
        mr->sweeping = 0;
        mr->sweep_end = mr->qtail;
    }
}

int pd_mirror_may_evict(pd_t *d, uint32_t i, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    if (!mr || i >= mr->dev_cap)
        return 0;
    notes_take(d, nm);
    if (sweep_owed(d) || mr->dflag[i])
        return 0;
    /* A TTL that passed unannounced (the timers, which mark it when they
     * announce it, have not seen it yet): its last seen became final
     * without a write. */
    const pres_dev_t *r = &d->m.devs[i];
    uint64_t L = pa_load_acquire(&r->live);
    if (PRES_LIVE_STATE(L) == PRES_DS_CONNECTED &&
        pa_load(&r->announced) != PRES_ANN(pa_load(&r->cid[PRES_LIVE_SEQ(L) & 1]),
                                            PRES_LIVE_EXPIRY(L))) {
        mark_dev(d, i, nm);
        return 0;
    }
    return 1;
}

int pd_mirror_may_retire(pd_t *d, uint32_t u)
{
    struct pd_mirror *mr = d->mirror;
    if (!mr || u >= mr->user_cap)
        return 0;
    notes_take(d, pres__mono_ms());
    return !sweep_owed(d) && !mr->uflag[u] && pa_load(&mr->ujob[u]) <= mr->committed_seq;
}

/* ---- the writer thread ------------------------------------------------------------ */

/* A read section, renewed every SECTION records so that it stays short. */
typedef struct {
    pres_rs_t *t;
    unsigned   n;
    uint64_t   nm, nw;
} section_t;

static void section_next(struct pd_mirror *mr, section_t *s)
{
    if (s->t && ++s->n < SECTION)
        return;
    if (s->t)
        pres__gp_leave(s->t);
    /* The slot was claimed when the thread started: this cannot fail. */
    s->t = pres__gp_enter(mr->rp);
    s->n = 0;
    s->nm = pres__mono_ms();
    s->nw = pres__wall_of(&mr->rp->m, s->nm);
}

static void extra_user(struct pd_mirror *mr, uint32_t u, uint64_t seq)
{
    if (u >= mr->user_cap || pa_load(&mr->ujob[u]) == seq)
        return;
    if (grow((void **)&mr->extra, &mr->cap_extra, mr->n_extra + 1, sizeof *mr->extra) < 0)
        return;                  /* its own note, or the next sweep, brings it */
    pa_store(&mr->ujob[u], seq);
    mr->extra[mr->n_extra++] = u;
}

/* After an adopt, a record this daemon never wrote may be in LMDB as it
 * is: what the fingerprint covers is compared, and an equal record is only
 * noted as written.  A restart after a kill -9 so reads LMDB once rather
 * than writing all of it again (new records are not looked up: that is
 * for the adopt's sweep only). */
static int dev_same(struct pd_mirror *mr, const char *key, const pres_db_dev_t *r)
{
    pres_db_dev_t o;
    return pd_db_get_device(mr->db, key, &o) == 0 && !strcmp(o.user_id, r->user_id) &&
           !strcmp(o.gateway_id, r->gateway_id) && o.connected_at_ms == r->connected_at_ms &&
           o.last_active_ms == r->last_active_ms && o.connected == r->connected &&
           (r->connected || o.last_seen_ms == r->last_seen_ms);
}

static int user_same(struct pd_mirror *mr, const char *key, const pres_db_user_t *u,
                     int connected)
{
    pres_db_user_t *o = mr->wold;
    if (pd_db_get_user(mr->db, key, o) != 0 || o->policy != u->policy ||
        o->frozen_seen_ms != u->frozen_seen_ms || o->n_allow != u->n_allow ||
        o->n_deny != u->n_deny || (!connected && o->last_seen_ms != u->last_seen_ms))
        return 0;
    for (uint32_t k = 0; k < u->n_allow; k++)
        if (strcmp(o->allow[k], u->allow[k]))
            return 0;
    for (uint32_t k = 0; k < u->n_deny; k++)
        if (strcmp(o->deny[k], u->deny[k]))
            return 0;
    return 1;
}

static void stage_dev(struct pd_mirror *mr, uint32_t i, const section_t *s, job_t *j)
{
    pres_db_dev_t r;
    char key[PRES_ID_MAX + 1];
    uint64_t fp, act;
    uint32_t u;
    int rc = dev_read(&mr->rp->m, i, s->nm, s->nw, 1, &r, key, &fp, &act, &u);
    if (rc == -EBUSY && j->n_again < sizeof j->again / sizeof j->again[0])
        j->again[j->n_again++] = i;
    if (rc == -ESTALE)
        extra_user(mr, u, j->seq);   /* moved away, say: its user lost it */
    if (rc < 0 || fp == mr->dfp[i])
        return;
    if (j->check && mr->dfp[i] == 0 && dev_same(mr, key, &r)) {
        mr->dfp[i] = fp;
        pa_store(&mr->dact[i], act);
        return;
    }
    /* The store keeps activity on the monotonic clock, which starts at
     * boot: a rebuild after a reboot holds an older last activity as 0.
     * LMDB keeps the real one. */
    pres_db_dev_t old;
    if (PRES_ACT_TIME(act) == 0 && pd_db_get_device(mr->db, key, &old) == 0)
        r.last_active_ms = old.last_active_ms;
    if ((rc = pd_db_put_device(mr->db, key, &r)) < 0) {
        pd_log(LOG_WARN, "mirror: device '%s' not staged: %s", key, strerror(-rc));
        return;
    }
    /* Its user's last seen moves with it, unless it stays connected (a
     * reconnect, an interaction): the user is connected before and after. */
    if (!((mr->dfp[i] & 1) && r.connected))
        extra_user(mr, u, j->seq);
    mr->dfp[i] = fp;
    pa_store(&mr->dact[i], act);
    j->written++;
}

static void stage_user(struct pd_mirror *mr, uint32_t u, const section_t *s, job_t *j)
{
    char key[PRES_ID_MAX + 1];
    uint64_t fp;
    int conn;
    int rc = user_read(&mr->rp->m, u, s->nm, s->nw, 1, mr->wu, key, &fp, &conn);
    if (rc < 0 || fp == mr->ufp[u])
        return;
    if (j->check && mr->ufp[u] == 0 && mr->wu->last_seen_ms &&
        user_same(mr, key, mr->wu, conn)) {
        mr->ufp[u] = fp;
        return;
    }
    /* No last seen in memory: a record made again after the user left
     * memory (by a policy, say) knows nothing of the one LMDB has.  Else
     * the region's is the truth, even when earlier than LMDB's: a device
     * whose TTL passed was last seen at its last sign of life, before the
     * writes made while it still counted as connected. */
    if (mr->wu->last_seen_ms == 0 && pd_db_get_user(mr->db, key, mr->wold) == 0) {
        mr->wu->last_seen_ms = mr->wold->last_seen_ms;
        /* And the region learns it again (a max, as an eviction raises it),
         * so pres_user stops answering "never" for this user. */
        uint64_t cur = 0;
        pa_cas(&mr->users[u].last_seen, &cur, mr->wold->last_seen_ms);
    }
    if ((rc = pd_db_put_user(mr->db, key, mr->wu)) < 0) {
        pd_log(LOG_WARN, "mirror: user '%s' not staged: %s", key, strerror(-rc));
        return;
    }
    mr->ufp[u] = fp;
    j->written++;
}

/* How far LMDB's map may grow: the option, else what the file holds plus
 * what its filesystem has free. */
static uint64_t map_limit(struct pd_mirror *mr)
{
    if (mr->map_max)
        return mr->map_max;
    struct statvfs vfs;
    struct stat st;
    char path[4200];
    uint64_t have = 0;
    snprintf(path, sizeof path, "%s/data.mdb", mr->dir);
    if (stat(path, &st) == 0)
        have = (uint64_t)st.st_size;
    if (statvfs(mr->dir, &vfs) < 0)
        return pd_db_map_size(mr->db);
    return have + (uint64_t)vfs.f_bavail * vfs.f_frsize;
}

/* Devices first, then users (those handed over and those of devices that
 * changed): a user is read after every device of the job that moves it. */
static int job_run(struct pd_mirror *mr, job_t *j)
{
    section_t s = { NULL, 0, 0, 0 };
    j->n_again = 0;
    j->written = 0;
    mr->n_extra = 0;
    for (size_t k = 0; k < j->n; k++) {
        if (!(j->ents[k] & Q_USER)) {
            section_next(mr, &s);
            stage_dev(mr, j->ents[k], &s, j);
        }
    }
    for (size_t k = 0; k < j->n; k++) {
        uint32_t u = j->ents[k] & ~Q_USER;
        if ((j->ents[k] & Q_USER) && pa_load(&mr->ujob[u]) != j->seq) {
            pa_store(&mr->ujob[u], j->seq);
            section_next(mr, &s);
            stage_user(mr, u, &s, j);
        }
    }
    for (size_t k = 0; k < mr->n_extra; k++) {
        section_next(mr, &s);
        stage_user(mr, mr->extra[k], &s, j);
    }
    if (s.t)
        pres__gp_leave(s.t);
    if (!j->commit)
        return 1;
    pd_db_set_map_max(mr->db, map_limit(mr));
    return pd_db_commit(mr->db, j->wall);
}

static void *writer_main(void *arg)
{
    struct pd_mirror *mr = arg;
    /* Claim this thread's reader slot now: a failure is the start's. */
    pres_rs_t *t = pres__gp_enter(mr->rp);
    if (t)
        pres__gp_leave(t);
    pthread_mutex_lock(&mr->mu);
    mr->ready = t ? 1 : -1;
    pthread_cond_broadcast(&mr->cv);
    for (;;) {
        while (!mr->busy && !mr->quit && t)
            pthread_cond_wait(&mr->cv, &mr->mu);
        if (!mr->busy || !t)
            break;
        pthread_mutex_unlock(&mr->mu);
        uint64_t t0 = pres__mono_ms();
        int rc = job_run(mr, &mr->job);
        pthread_mutex_lock(&mr->mu);
        if (rc < 0)
            snprintf(mr->err, sizeof mr->err, "%s", pd_db_error(mr->db));
        mr->job.rc = rc;
        mr->job.ms = pres__mono_ms() - t0;
        mr->busy = 0;
        mr->done = 1;
        pthread_cond_broadcast(&mr->cv);
    }
    pthread_mutex_unlock(&mr->mu);
    return NULL;
}

/* ---- the handoff (main thread) ------------------------------------------------------ */

static void flight_add(struct pd_mirror *mr, uint32_t ent)
{
    uint8_t *flag = flag_of(mr, ent);
    if (*flag & F_FLIGHT)
        return;
    if (grow((void **)&mr->fl, &mr->fl_cap, mr->fl_n + 1, sizeof *mr->fl) < 0) {
        /* Without a place in the list the flag could never be cleared:
         * leave it off (the record may then leave memory a little early). */
        pd_log(LOG_ERR, "mirror: out of memory tracking a job");
        return;
    }
    *flag |= F_FLIGHT;
    mr->fl[mr->fl_n++] = ent;
}

/* What the last job came to: a commit clears everything in flight. */
static void job_finished(pd_t *d, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    job_t *j = &mr->job;
    for (size_t k = 0; k < j->n_again; k++)
        mark_dev(d, j->again[k], nm);
    if (j->rc == 1) {            /* staged only */
        mr->pending = 1;
        return;
    }
    if (j->rc < 0) {
        mr->pending = 1;
        if (!mr->failing)
            pd_log(LOG_ERR, "mirror: %s; the store keeps serving, and mirror_lag_ms "
                            "grows until LMDB takes the changes (retrying)", mr->err);
        mr->failing = 1;
        mr->retry_at = nm + mr->retry_ms;
        if (mr->retry_ms < RETRY_MAX_MS)
            mr->retry_ms *= 2;
        return;
    }
    if (mr->failing)
        pd_log(LOG_INFO, "mirror: LMDB takes commits again; %zu records were waiting",
               mr->fl_n);
    for (size_t k = 0; k < mr->fl_n; k++)
        *flag_of(mr, mr->fl[k]) &= (uint8_t)~F_FLIGHT;
    mr->commits++;
    mr->committed += j->written;
    if (j->written)
        pd_log(LOG_DEBUG, "mirror: job %llu: %zu records read, %zu written, in %llu ms",
               (unsigned long long)j->seq, j->n, j->written, (unsigned long long)j->ms);
    mr->committed_seq = j->seq;
    mr->fl_n = 0;
    mr->fl_oldest = 0;
    mr->pending = 0;
    mr->failing = 0;
    mr->retry_ms = RETRY_MS;
    mr->last_commit = nm;
}

/* Collect a finished job; 1 if the writer is idle now (wait: until it is). */
static int writer_idle(pd_t *d, uint64_t nm, int wait)
{
    struct pd_mirror *mr = d->mirror;
    pthread_mutex_lock(&mr->mu);
    while (wait && mr->busy)
        pthread_cond_wait(&mr->cv, &mr->mu);
    int busy = mr->busy, done = mr->done;
    mr->done = 0;
    pthread_mutex_unlock(&mr->mu);
    if (done)
        job_finished(d, nm);
    return !busy;
}

/* Hand the idle writer the queue, in order, up to MAX_JOB records, if
 * there is anything to do: records, or a commit owed (staged changes, or
 * liveness).  force: commit now, whatever the backoff. */
static void job_send(pd_t *d, uint64_t nm, int force)
{
    struct pd_mirror *mr = d->mirror;
    job_t *j = &mr->job;
    j->n = 0;
    if (mr->qhead != mr->qtail) {
        uint64_t oldest = q_head_at(mr);
        while (mr->qhead != mr->qtail && j->n < MAX_JOB) {
            uint32_t ent = mr->q[mr->qhead++ & mr->qmask];
            *flag_of(mr, ent) &= (uint8_t)~F_QUEUED;
            j->ents[j->n++] = ent;
            flight_add(mr, ent);
        }
        if (mr->qhead == mr->qtail)
            mr->st_h = mr->st_n = 0;     /* empty: the stamps start over */
        if (!mr->fl_oldest || oldest < mr->fl_oldest)
            mr->fl_oldest = oldest;
    }
    /* A sweep's records are as old as the sweep: so is every job that
     * takes some, until the last of them has been handed over. */
    j->check = mr->adopting;
    if (mr->sweep_at) {
        if (j->n && (!mr->fl_oldest || mr->sweep_at < mr->fl_oldest))
            mr->fl_oldest = mr->sweep_at;
        if (!mr->sweeping && mr->qhead >= mr->sweep_end)
            mr->sweep_at = mr->adopting = 0;
    }
    int may = force || !mr->failing || nm >= mr->retry_at;
    j->commit = may && (j->n || mr->pending || force || nm - mr->last_commit >= ALIVE_MS);
    if (!j->n && !j->commit)
        return;
    j->seq = ++mr->seq;
    j->wall = pres__wall_of(&d->m, nm);
    pthread_mutex_lock(&mr->mu);
    mr->busy = 1;
    pthread_cond_signal(&mr->cv);
    pthread_mutex_unlock(&mr->mu);
}

/* ---- the tick ---------------------------------------------------------------------- */

static void lag_publish(pd_t *d, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    uint64_t oldest = UINT64_MAX;
    if (mr->qhead != mr->qtail)
        oldest = q_head_at(mr);
    if (mr->fl_oldest && mr->fl_oldest < oldest)
        oldest = mr->fl_oldest;
    if (mr->sweep_at && mr->sweep_at < oldest)
        oldest = mr->sweep_at;
    pa_store(&d->m.hdr->dc.mirror_lag_ms, oldest == UINT64_MAX || oldest > nm ? 0 : nm - oldest);
}

void pd_mirror_tick(pd_t *d, uint64_t nm)
{
    struct pd_mirror *mr = d->mirror;
    if (!mr || !mr->started)
        return;
    if (d->hb_pos == 0)
        mr->dev_passes++;            /* the tick's index pass ended one */
    notes_take(d, nm);
    if ((d->resync & PD_RESYNC_MIRROR) && !mr->sweeping)
        sweep_begin(d, nm);
    if (mr->sweeping)
        sweep_step(d, nm, SWEEP_CHUNK, now_ns() + SWEEP_NS);
    if (writer_idle(d, nm, 0))
        job_send(d, nm, 0);
    lag_publish(d, nm);
    mr->last_tick = nm;
}

/* ---- lifecycle --------------------------------------------------------------------- */

static uint64_t map_initial(const pd_config_t *c)
{
    uint64_t need = c->capacity * DEV_BYTES + c->users * USER_BYTES + c->exceptions * EXC_BYTES;
    uint64_t size = 2 * need > MAP_MIN ? 2 * need : MAP_MIN;
    if (c->db_map_max && size > c->db_map_max)
        size = c->db_map_max;
    return size;
}

int pd_mirror_open(pd_t *d)
{
    struct pd_mirror *mr = calloc(1, sizeof *mr);
    if (!mr) {
        pd_log(LOG_ERR, "out of memory opening the LMDB mirror");
        return -1;
    }
    char err[4400];
    uint64_t size = map_initial(&d->cfg);
    mr->map_max = d->cfg.db_map_max;
    snprintf(mr->dir, sizeof mr->dir, "%s", d->cfg.db);
    int rc = pd_db_open(&mr->db, d->cfg.db, d->cfg.name, size,
                        mr->map_max ? mr->map_max : size, err, sizeof err);
    if (rc < 0) {
        pd_log(LOG_ERR, "%s", err);
        pd_log(LOG_ERR, "not starting: the LMDB mirror at %s cannot be used (see above); "
                        "nothing was changed there", d->cfg.db);
        free(mr);
        return -1;
    }
    mr->retry_ms = RETRY_MS;
    pthread_mutex_init(&mr->mu, NULL);
    pthread_cond_init(&mr->cv, NULL);
    d->mirror = mr;
    pd_log(LOG_INFO, "LMDB mirror at %s: map %llu MiB%s", d->cfg.db,
           (unsigned long long)(pd_db_map_size(mr->db) >> 20),
           mr->map_max ? " (capped by --db-map-max)" : "");
    return 0;
}

pd_db_t *pd_mirror_db(pd_t *d)
{
    return d->mirror ? d->mirror->db : NULL;
}

int pd_mirror_alloc(pd_t *d, uint32_t dev_cap, uint32_t user_cap)
{
    struct pd_mirror *mr = d->mirror;
    if (mr->dflag)
        return 0;
    uint64_t n = (uint64_t)dev_cap + user_cap, qsize = 1;
    while (qsize < n)
        qsize <<= 1;
    mr->dev_cap = dev_cap;
    mr->user_cap = user_cap;
    mr->dflag = calloc(dev_cap, 1);
    mr->uflag = calloc(user_cap, 1);
    mr->dfp = calloc(dev_cap, sizeof *mr->dfp);
    mr->ufp = calloc(user_cap, sizeof *mr->ufp);
    mr->dact = calloc(dev_cap, sizeof *mr->dact);
    mr->ujob = calloc(user_cap, sizeof *mr->ujob);
    mr->q = malloc(qsize * sizeof *mr->q);
    mr->job.ents = malloc(MAX_JOB * sizeof *mr->job.ents);
    mr->wu = malloc(sizeof *mr->wu);
    mr->wold = malloc(sizeof *mr->wold);
    mr->qmask = qsize - 1;
    if (!mr->dflag || !mr->uflag || !mr->dfp || !mr->ufp || !mr->dact || !mr->ujob ||
        !mr->q || !mr->job.ents || !mr->wu || !mr->wold)
        return -ENOMEM;
    return 0;
}

int pd_mirror_start(pd_t *d, int resync)
{
    struct pd_mirror *mr = d->mirror;
    if (pd_mirror_alloc(d, d->m.dev_cap, d->m.user_cap) < 0) {
        pd_log(LOG_ERR, "out of memory sizing the LMDB mirror");
        return -1;
    }
    /* The writer reads the store as a reader does, through a handle of its
     * own: its read sections hold back the daemon's reclamation. */
    mr->users = d->m.users;
    int rc = pres_open(&mr->rp, d->cfg.name, PRES_RDONLY);
    if (rc < 0) {
        pd_log(LOG_ERR, "the LMDB writer cannot open the store: %s", pres_strerror(rc));
        return -1;
    }
    uint64_t nm = pres__mono_ms();
    if (resync) {
        /* LMDB may lack what a daemon killed before its commit had seen:
         * every record is read and written (none is known written). */
        d->resync |= PD_RESYNC_MIRROR;
        mr->sweep_at = nm;
        mr->adopting = 1;
    }
    /* A rebuild may have staged corrections. */
    if (pd_db_staged(mr->db)) {
        mr->pending = 1;
        mr->fl_oldest = nm;
    }
    mr->last_commit = nm;
    if ((rc = pthread_create(&mr->thr, NULL, writer_main, mr)) != 0) {
        pd_log(LOG_ERR, "cannot start the LMDB writer thread: %s", strerror(rc));
        return -1;
    }
    mr->started = 1;
    pthread_mutex_lock(&mr->mu);
    while (!mr->ready)
        pthread_cond_wait(&mr->cv, &mr->mu);
    pthread_mutex_unlock(&mr->mu);
    if (mr->ready < 0) {
        pd_log(LOG_ERR, "the LMDB writer cannot take a reader slot of the store: all %u are "
                        "in use", PRES_READER_SLOTS);
        return -1;
    }
    return 0;
}

static void mirror_free(pd_t *d)
{
    struct pd_mirror *mr = d->mirror;
    if (mr->rp)
        pres_close(mr->rp);
    pd_db_close(mr->db);
    pthread_mutex_destroy(&mr->mu);
    pthread_cond_destroy(&mr->cv);
    free(mr->dflag);
    free(mr->uflag);
    free(mr->dfp);
    free(mr->ufp);
    free(mr->dact);
    free(mr->ujob);
    free(mr->q);
    free(mr->st);
    free(mr->fl);
    free(mr->extra);
    free(mr->job.ents);
    free(mr->wu);
    free(mr->wold);
    free(mr);
    d->mirror = NULL;
}

static void writer_quit(struct pd_mirror *mr)
{
    pthread_mutex_lock(&mr->mu);
    mr->quit = 1;
    pthread_cond_signal(&mr->cv);
    pthread_mutex_unlock(&mr->mu);
    pthread_join(mr->thr, NULL);
}

int pd_mirror_stop(pd_t *d)
{
    struct pd_mirror *mr = d->mirror;
    if (!mr)
        return 0;
    if (!mr->started || mr->ready < 0) {
        if (mr->started)
            writer_quit(mr);
        mirror_free(d);
        return 0;
    }
    uint64_t t0 = pres__mono_ms(), nm = t0;
    /* What the last notes name, then every record (the writer leaves out
     * what is as it wrote it): what no note announced, and whatever a lost
     * note or an unfinished sweep would have found. */
    pd_notes_read(d);
    notes_take(d, nm);
    sweep_begin(d, nm);
    sweep_step(d, nm, UINT64_MAX, UINT64_MAX);
    /* Job after job, each committed; the first failure ends it (a commit
     * that failed before the stop gets this one more try). */
    int rc = 0, sent = 0;
    for (;;) {
        writer_idle(d, nm, 1);
        if (mr->failing && sent)
            break;
        /* At least one commit: its alive_ms is the moment of the stop. */
        if (sent && mr->qhead == mr->qtail && !mr->pending && mr->fl_n == 0)
            break;
        nm = pres__mono_ms();
        job_send(d, nm, 1);
        sent = 1;
    }
    if (mr->failing || mr->qhead != mr->qtail) {
        pd_log(LOG_ERR, "mirror: %zu records could not be written to LMDB (%s); the store "
                        "still holds them and the next presenced writes them",
               mr->fl_n + (size_t)(mr->qtail - mr->qhead), mr->err);
        rc = -1;
    } else {
        pd_log(LOG_INFO, "mirror flushed in %llu ms: %llu records written in %llu commits "
                         "since start", (unsigned long long)(pres__mono_ms() - t0),
               (unsigned long long)mr->committed, (unsigned long long)mr->commits);
    }
    writer_quit(mr);
    mirror_free(d);
    return rc;
}
