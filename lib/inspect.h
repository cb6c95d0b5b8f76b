/*
 * inspect.h - the narrow inspection interface of libpresence.
 *
 * What `presencectl check` and `presencectl dump` must see of the store's
 * structure, beyond the public API.  Linked from libpresence.a; not exported
 * by the shared object.
 */
#ifndef PRES_INSPECT_H
#define PRES_INSPECT_H

#include <stdio.h>
#include "presence.h"

/* A summary of the store's layout, for humans. */
typedef struct {
    char     path[256];          /* the region file */
    uint32_t format;             /* region format version */
    uint64_t region_bytes;       /* size of the records file */
    uint64_t readers_bytes;      /* size of the reader-table file */
    uint64_t device_capacity, user_capacity, gateway_capacity;
    uint64_t reader_slots, reader_slots_used;
    uint64_t device_buckets, user_buckets;
    uint64_t gp_epoch;           /* current grace-period epoch */
    uint64_t oldest_reader_ms;   /* age of the oldest open read section */
    int      daemon_pid;         /* 0: no daemon holds the store */
    /* privacy exception entries and typing records: capacity, and those
     * neither free nor pooled (in a policy or typing, being written, or
     * waiting for a grace period) */
    uint64_t exception_capacity, exceptions_in_use;
    uint64_t typing_capacity, typing_in_use;
} pres_inspect_info_t;

/** Fill *out.  @return 0 or a negative errno. */
int pres__inspect_info(pres_t *p, pres_inspect_info_t *out);

/* The change feed (presencectl stats and dump show it beside pres_stats_t,
 * whose layout API.md fixes). */
typedef struct {
    uint64_t capacity;           /* events the ring holds */
    uint64_t last_seq;           /* the last seq appended (0: none yet) */
    uint64_t watchers_asleep;    /* nonzero: a watcher may be waiting in
                                    pres_watch now (cleared by the next
                                    event) */
} pres_inspect_feed_t;

/** Fill *out.  @return 0 or a negative errno. */
int pres__inspect_feed(pres_t *p, pres_inspect_feed_t *out);

/**
 * Call fn for every device record held (connected or not), in table order,
 * each read as pres_device() would read it.  Stops early and returns fn's
 * value when fn returns non-zero.
 * @return 0, fn's non-zero value, or a negative errno (-EPROTO: damage).
 */
int pres__inspect_devices(pres_t *p,
                          int (*fn)(const pres_device_info_t *d, void *arg),
                          void *arg);

/**
 * Verify every invariant of the store's structure (see doc/region.md),
 * printing one line to `out` for each problem found (and, when verbose, a
 * line for each invariant checked).
 * @return the number of problems found (0: intact), or a negative errno
 *         when the store cannot be examined at all.
 */
long pres__inspect_check(pres_t *p, FILE *out, int verbose);

#endif /* PRES_INSPECT_H */
