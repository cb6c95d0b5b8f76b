/*
 * daemon.h - presenced's private state.
 */
#ifndef PRES_DAEMON_H
#define PRES_DAEMON_H

#include <stdint.h>
#include <stdio.h>

#include "region.h"

enum { LOG_ERR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG };

typedef struct {
    char     name[64];
    char     db[4096];
    char     config[4096];
    uint64_t capacity, users, exceptions, events, gateways;
    uint64_t idle_after_ms, offline_grace_ms, retain_ms;
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
    uint32_t users;              /* 1: a user record */
    uint64_t epoch;              /* freed once every reader passed it */
} pd_retired_t;

typedef struct {
    uint32_t *v;
    size_t    n, cap;
} pd_stack_t;

typedef struct {
    uint32_t idx;
    uint32_t users;
    uint64_t pos;                /* ring position it was taken at */
    uint32_t client;             /* the taker, and its slot's generation */
    uint64_t cgen;
} pd_claim_t;

typedef struct {
    pd_config_t    cfg;
    pres_map_t     m;
    int            lock_fd;
    pd_client_t    cl[PRES_CLIENTS];
    pd_stack_t     dev_pool, user_pool;
    pd_retired_t  *ret;
    size_t         ret_n, ret_cap;
    uint64_t       dev_rc, user_rc;       /* ring positions reclaimed up to */
    uint64_t      *dev_offered, *user_offered; /* ring position of the last offer */
    pd_claim_t    *claims;                /* taken, not yet claimed, taker alive */
    size_t         claims_n, claims_cap;
    uint64_t      *exp_seen;              /* per device: last expiry counted */
    uint8_t       *unl;                   /* per device: out of hash / user list */
    uint8_t       *user_empty;            /* per user: empty at the last pass */
    uint32_t      *gw_pending;            /* per gateway: incarnation dying */
    uint64_t       hb_pos, ub_pos;        /* the passes, in chunks of buckets */
    uint64_t       pass_devices, pass_connected, pass_users;
    uint64_t       ticks;
    int            sweep_soon;
    int            gw_check, gw_dying;
    uint8_t       *dead_seen;             /* per device: DEAD at the last sweep */
    int64_t        devices_diff, users_diff;
    uint64_t       epoch_time[1024];      /* mono ms at which epoch e began */
    uint64_t       epoch_of[1024];
    uint64_t       last_tick_mono;
    uint64_t       adopt_mono;            /* when this daemon took the store */
} pd_t;

void pd_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
extern int pd_log_level;

/* reaper.c */
int  pd_adopt(pd_t *d);
void pd_tick(pd_t *d);
void pd_shutdown(pd_t *d);

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
