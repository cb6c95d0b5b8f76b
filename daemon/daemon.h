/*
 * daemon.h - presenced's private state.
 */
#ifndef PRES_DAEMON_H
#define PRES_DAEMON_H

#include <stdint.h>
#include <stdio.h>

#include "region.h"

enum { LOG_ERR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG };

/* The daemon's tick: its passes, repairs and timers run every this long. */
#define PD_TICK_MS 20

typedef struct {
    char     name[64];
    char     db[4096];
    char     config[4096];
    uint64_t capacity, users, exceptions, events, gateways;
    uint64_t idle_after_ms, offline_grace_ms, retain_ms;
    uint64_t db_map_max;         /* bytes LMDB's map may grow to; 0: the
                                    free space of its filesystem */
    int      foreground;
    int      log_level;
    int      set[32];            /* which options the command line set */
} pd_config_t;

/* What the daemon knows of one client slot. */
typedef struct {
    uint64_t pid, start, gen;
    int      pidfd;              /* -1: none (not opened, or unsupported) */
    int      alive;              /* 1 tracked and alive */
} pd_client_t;

typedef struct {
    uint32_t idx;
    uint32_t kind;               /* enum pres_rkind */
    uint64_t epoch;              /* freed once every reader passed it */
} pd_retired_t;

typedef struct {
    uint32_t *v;
    size_t    n, cap;
} pd_stack_t;

typedef struct {
    uint32_t idx;
    uint32_t kind;
    uint64_t pos;                /* ring position it was taken at */
    uint32_t client;             /* the taker, and its slot's generation */
    uint64_t cgen;
} pd_claim_t;

/* A change note read from the ring (lib/notes.c). */
typedef struct {
    uint32_t kind;               /* PRES_NOTE_* */
    uint32_t idx;
} pd_note_t;

/* Who must sweep every record because change notes were lost. */
#define PD_RESYNC_MIRROR 1u
#define PD_RESYNC_TIMERS 2u
#define PD_RESYNC_ALL    (PD_RESYNC_MIRROR | PD_RESYNC_TIMERS)

typedef struct {
    pd_config_t    cfg;
    pres_map_t     m;
    int            lock_fd;
    struct pd_mirror *mirror;             /* mirror.c: LMDB */
    pd_client_t    cl[PRES_CLIENTS];
    pd_stack_t     pool[PRES_RK_COUNT];   /* free records, by kind */
    pd_retired_t  *ret;
    size_t         ret_n, ret_cap;
    uint64_t       rc[PRES_RK_COUNT];     /* ring positions reclaimed up to */
    uint64_t      *offered[PRES_RK_COUNT]; /* ring position of each record's
                                             last offer */
    pd_claim_t    *claims;                /* taken, not yet claimed, taker alive */
    size_t         claims_n, claims_cap;
    uint8_t       *unl;                   /* per device: out of hash / user list */
    uint8_t       *user_empty;            /* per user: empty at the last pass */
    uint32_t      *gw_pending;            /* per gateway: incarnation dying */
    uint64_t       hb_pos, ub_pos;        /* the passes, in chunks of buckets */
    uint64_t       pass_devices, pass_users;
    uint64_t       ticks;
    int            sweep_soon;
    int            sweeping;              /* a record-table sweep is under way */
    uint32_t       sweep_dev, sweep_user; /* ... and where it is */
    int            gw_check, gw_dying;
    uint8_t       *dead_seen;             /* per device: DEAD at the last sweep */
    int64_t        devices_diff, users_diff;
    uint64_t       epoch_time[1024];      /* mono ms at which epoch e began */
    uint64_t       epoch_of[1024];
    uint64_t       last_tick_mono;
    uint64_t       adopt_mono;            /* when this daemon took the store */
    /* change notes read this tick (notes.c) */
    pd_note_t     *nb;
    size_t         nb_n, nb_cap;
    uint64_t       note_tail;             /* next position to read */
    uint64_t       note_wait;             /* unwritten position seen last tick */
    unsigned       resync;                /* PD_RESYNC_*: sweeps owed */
    struct pd_privacy *pv;                /* privacy.c */
    struct pd_typing  *ty;                /* typing.c */
    struct pd_timers *tm;                 /* timers.c */
    struct pd_feed   *feed;               /* feed.c */
} pd_t;

void pd_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
extern int pd_log_level;

/* reaper.c */
int  pd_adopt(pd_t *d);
/* Free record idx of a kind once every reader has passed the next grace
 * period (the caller has made it unreachable and set its alloc word to
 * PRES_ALLOC_RETIRED). */
void pd_retire(pd_t *d, uint32_t idx, int kind);
/* Put a free record of a kind back in the pool the rings are refilled from. */
void pd_pool_back(pd_t *d, int kind, uint32_t i);
/* Records of a kind neither offered nor pooled (linked, being written,
 * retired): 0 when the kind is all free. */
uint64_t pd_in_use(const pd_t *d, int kind);
/* Is the thread whose latch value this is still alive (kernel's verdict)? */
int  pd_latch_live(const pd_t *d, unsigned latch);
void pd_tick(pd_t *d);
void pd_shutdown(pd_t *d);

/* A chain to sweep: its head, how to reach a record's link and generation,
 * which records to unlink and what to do with each one unlinked. */
typedef struct {
    uint64_t *head;
    uint32_t  cap;
    uint64_t *(*next_of)(pres_map_t *, uint32_t);
    uint32_t  (*gen_of)(pres_map_t *, uint32_t);
    int       (*remove)(pd_t *, uint32_t, void *ctx);
    void      (*removed)(pd_t *, uint32_t, void *ctx);
    void     *ctx;
} pd_chain_t;

/* Walk a chain once, unlinking the records `remove` picks (see reaper.c).
 * Returns the records kept, or -1 (damaged, or a head unlink that did not
 * go through: the next pass tries again). */
long pd_chain_sweep(pd_t *d, const pd_chain_t *c);

/* privacy.c: exception entries of replaced policies and of dead writers. */
int  pd_privacy_init(pd_t *d);
void pd_privacy_tick(pd_t *d, uint64_t now_mono);
void pd_privacy_deaths(pd_t *d);                  /* clients died */
void pd_privacy_user_freed(pd_t *d, uint32_t u);  /* user record u freed */
void pd_privacy_exc_freed(pd_t *d, uint32_t i);   /* entry i freed */
void pd_privacy_fini(pd_t *d);

/* typing.c: typing records ended, expired, superseded or abandoned. */
int  pd_typing_init(pd_t *d);
void pd_typing_tick(pd_t *d, uint64_t now_mono);
void pd_typing_deaths(pd_t *d);                   /* clients died */
void pd_typing_fini(pd_t *d);

/* notes.c: read the notes written since the last call into d->nb; sets
 * d->resync when some were lost. */
void pd_notes_read(pd_t *d);

/* timers.c: what only time changes (expiries, typing TTLs, status changes
 * after the idle timer or the grace) and the connected count. */
int  pd_timers_init(pd_t *d);
/* Each tick, after the notes were read (d->nb) and dead clients repaired. */
void pd_timers_tick(pd_t *d, uint64_t nm, uint64_t nw);
/* The reaper evicted device record i / is retiring user record u. */
void pd_timers_dev_gone(pd_t *d, uint32_t i);
void pd_timers_user_gone(pd_t *d, uint32_t u);
void pd_timers_free(pd_t *d);

/* feed.c: claims of the change feed left by writers that died or stopped.
 * init at adopt (a full audit), tick each tick, gone from the dead-client
 * repair while the dead's reader slots (dead[slot] != 0) are not yet given
 * back. */
int  pd_feed_init(pd_t *d);
void pd_feed_tick(pd_t *d, uint64_t nm);
void pd_feed_gone(pd_t *d, const uint8_t *dead);
void pd_feed_free(pd_t *d);

/* liveness.c */
void pd_clients_init(pd_t *d);
/* A client that went: its slot index and its token (index + generation). */
typedef struct {
    uint32_t client;
    uint64_t token;
} pd_gone_t;

/* Calls gone() once for the clients found dead (dead = 1), and once for
 * each that closed its handle (dead = 0). */
void pd_clients_poll(pd_t *d, void (*gone)(pd_t *, const pd_gone_t *, size_t, int dead));
int  pd_client_live(const pd_t *d, uint32_t client);
int  pd_token_live(const pd_t *d, uint64_t token);

#endif /* PRES_DAEMON_H */
