/*
 * presence.h - libpresence: a presence store shared by the processes of one
 * host.
 *
 * A store is created and owned by the reaper daemon, presenced.  Gateways
 * (the processes that own client sockets) write device presence through this
 * library; delivery workers and tools read it.  Every call works on shared
 * memory directly: no call talks to the daemon, takes a lock, or waits for
 * another process.
 *
 * Conventions (see API.md for the full contract):
 *  - Functions return 0 (or a count, where said) on success and a negative
 *    errno value on failure; pres_strerror() describes any of them.
 *  - Ids are byte strings of 1 .. PRES_ID_MAX bytes without NUL.  They are
 *    copied; the caller keeps ownership of everything it passes in.
 *  - Times given out are wall-clock milliseconds since the Unix epoch; TTLs
 *    are durations in milliseconds (1 .. PRES_TTL_MAX_MS).  Liveness is
 *    judged on the monotonic clock at the time of each read.
 *  - Every function may be called from any thread of any process at once,
 *    on handles opened by that process.  A pres_t must not be used in a
 *    child after fork(): the child opens its own.
 *
 * This header includes standard headers only.
 */
#ifndef PRESENCE_H
#define PRESENCE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PRES_VERSION_MAJOR 0
#define PRES_VERSION_MINOR 1
#define PRES_VERSION_PATCH 0

#if defined(__GNUC__) && !defined(PRES_STATIC)
#define PRES_API __attribute__((visibility("default")))
#else
#define PRES_API
#endif

#define PRES_ID_MAX          63
#define PRES_EXCEPTIONS_MAX  64
#define PRES_TTL_MAX_MS      86400000u   /* one day */

/* One process's handle on one store.  Opaque. */
typedef struct pres pres_t;

/* A device record handle for cheap repeat writes (pres_heartbeat_ref).  It
 * names one connection of one device: a later connect of the device, or its
 * eviction, makes it -ESTALE. */
typedef uint64_t pres_ref_t;

enum { PRES_RDONLY = 0, PRES_RDWR = 1 };

/* ------------------------------------------------------------------------ */
/* Handles                                                                   */

/**
 * Attach to the store NAME (NULL: $PRESENCE_NAME, else "default") in
 * $PRESENCE_SHM_DIR (default /dev/shm).
 *
 * @param[out] out   receives the handle; owned by the caller, freed by
 *                   pres_close().
 * @param[in]  flags PRES_RDONLY (maps the records read-only; needs read
 *                   permission only) or PRES_RDWR.
 * @return 0; -EINVAL bad name or flags; -ENOENT no store (no daemon has
 *         created it); -EPROTO files that are not an intact store of this
 *         version, or a store made on another clock; -EACCES permissions, or
 *         files owned by another user; -ENOSPC the store's 1023 client slots
 *         are all attached; -EMFILE 64 handles already open in this
 *         process; -ENOMEM.
 * Cost: a few system calls (open, fstat, mmap).  Any thread.
 */
PRES_API int pres_open(pres_t **out, const char *name, int flags);

/**
 * Detach.  If this handle attached a gateway, the daemon ends that gateway's
 * connections (as on the death of the process).  NULL is ignored.  No other
 * thread may use the handle during or after the call.
 */
PRES_API void pres_close(pres_t *p);

/** A static message for a value returned by any function here (or any
 *  negative errno), prefixed with the code's name, e.g. "ENOENT: ...". */
PRES_API const char *pres_strerror(int err);

/** The wall clock, in milliseconds since the Unix epoch. */
PRES_API uint64_t pres_now_ms(void);

/* ------------------------------------------------------------------------ */
/* Gateways (need PRES_RDWR; -EROFS otherwise)                               */

/**
 * Bind gateway_id to the calling process.  When the process dies, however it
 * dies, or closes this handle, every device whose current gateway is
 * gateway_id stops being connected within 1 s (while the daemon runs).  A
 * later attach of the same id by another process takes the id over.
 * @return 0; -EINVAL; -ENAMETOOLONG; -EROFS; -ENOSPC gateway table full.
 */
PRES_API int pres_gateway_attach(pres_t *p, const char *gateway_id);

/**
 * Connect device_id of user_id on gateway_id until now + ttl_ms.  Creates the
 * user and the device as needed; a device that belonged to another user
 * moves to this one.  The device counts as active.
 * @param[out] ref  if not NULL, receives a handle for pres_heartbeat_ref().
 * @return 0; -EINVAL; -ENAMETOOLONG; -EROFS; -ENOSPC store full (device,
 *         user or gateway capacity); -EPROTO damaged store.
 * Cost: one lookup, plus an insertion for a new device.  Lock-free.
 */
PRES_API int pres_connect(pres_t *p, const char *user_id,
                          const char *device_id, const char *gateway_id,
                          uint32_t ttl_ms, pres_ref_t *ref);

/**
 * Set the device's expiry to now + ttl_ms.  A device whose TTL had passed
 * (and that was not disconnected) is connected again on the same gateway:
 * a late heartbeat.
 * @return 0; -ENOENT unknown or disconnected device; -EINVAL; -ENAMETOOLONG;
 *         -EROFS; -EPROTO; -EBUSY when a change of TTL (or a late heartbeat)
 *         finds another writer of this device stopped (SIGSTOP, a
 *         debugger) in the middle of changing it.
 * Cost: one lookup and one compare-and-swap.
 */
PRES_API int pres_heartbeat(pres_t *p, const char *device_id, uint32_t ttl_ms);

/** pres_heartbeat() through a handle: no lookup.  -ESTALE when the handle's
 *  connection was replaced by a later connect, or the device evicted. */
PRES_API int pres_heartbeat_ref(pres_t *p, pres_ref_t ref, uint32_t ttl_ms);

/**
 * End the device's connection now; its last seen becomes now.  A device
 * whose TTL had already passed keeps its last seen.
 * @return 0; -ENOENT unknown device; -EINVAL; -ENAMETOOLONG; -EROFS;
 *         -EBUSY another writer of this device is stopped mid-change.
 */
PRES_API int pres_disconnect(pres_t *p, const char *device_id);

/** pres_disconnect() only if ref is still the device's current connection:
 *  otherwise -ESTALE and nothing ends.  The race-free way for a gateway to
 *  report a closed socket. */
PRES_API int pres_disconnect_ref(pres_t *p, pres_ref_t ref);

enum pres_activity { PRES_ACTIVE = 1, PRES_IDLE = 2 };

/**
 * PRES_ACTIVE records an interaction now; PRES_IDLE marks the device idle
 * until its next interaction.
 * @return 0; -ENOENT device not connected; -EINVAL; -ENAMETOOLONG; -EROFS.
 */
PRES_API int pres_set_activity(pres_t *p, const char *device_id,
                               enum pres_activity a);

/* ------------------------------------------------------------------------ */
/* Readers (any handle)                                                      */

typedef struct {
    char     device_id[PRES_ID_MAX + 1];
    char     user_id[PRES_ID_MAX + 1];
    char     gateway_id[PRES_ID_MAX + 1];  /* last gateway, also when offline */
    int      connected;       /* 1 if connected at the time of the call */
    int      active;          /* 1 if connected and not idle */
    uint64_t connected_at_ms; /* start of the current or last connection */
    uint64_t expires_at_ms;   /* when the TTL passes (or passed) */
    uint64_t last_seen_ms;    /* connected: the time of the call; else the
                                 disconnect, or its last connect/heartbeat */
    uint64_t last_active_ms;  /* last interaction */
} pres_device_info_t;

/**
 * One device, connected or not, while it is held in shared memory.
 * @param[out] out  filled on success (copied; nothing points into the store).
 * @return 0; -ENOENT unknown (or evicted) device; -EINVAL; -ENAMETOOLONG;
 *         -EPROTO damaged store.
 * Cost: about one cache miss.  Lock-free, never waits for a writer.
 */
PRES_API int pres_device(pres_t *p, const char *device_id,
                         pres_device_info_t *out);

/**
 * The user's connected devices: the routing hint of a delivery worker.
 * Writes at most cap entries to out and sets *n to how many there are.
 * An unknown user, or one with none connected: 0 with *n == 0.
 * @return 0; -EINVAL; -ENAMETOOLONG; -EPROTO.
 * Cost: one miss for the user plus one per device.  Lock-free.
 */
PRES_API int pres_route(pres_t *p, const char *user_id,
                        pres_device_info_t *out, size_t cap, size_t *n);

/** A delivery to a device that pres_route() gave failed: counted in
 *  stale_reports.  Allowed on read-only handles.
 *  @return 0; -EINVAL; -ENAMETOOLONG. */
PRES_API int pres_report_stale(pres_t *p, const char *device_id);

/**
 * Typing: device_id's user is typing in conversation_id until now + ttl_ms;
 * ttl_ms == 0 stops it.  Typing belongs to the device (one conversation at a
 * time: typing elsewhere moves it) and ends when the device disconnects or
 * expires.  Counts as an interaction (stopping does not).  A repeat within
 * the TTL only extends it (no event).
 * @return 0; -ENOENT device not connected; -EINVAL; -ENAMETOOLONG; -EROFS;
 *         -ENOSPC no typing record free.
 * Cost: a device lookup and a CAS for a repeat; a new record and three
 * CASes for a start or a move.  Lock-free.
 */
PRES_API int pres_typing(pres_t *p, const char *device_id,
                         const char *conversation_id, uint32_t ttl_ms);

/* ------------------------------------------------------------------------ */
/* What a person sees of a user                                              */

enum pres_status { PRES_OFFLINE = 0, PRES_IDLE_NOW = 1, PRES_ACTIVE_NOW = 2 };
enum pres_seen {
    PRES_SEEN_EXACT = 0,      /* last_seen_ms holds the time */
    PRES_SEEN_RECENTLY,       /* within 3 days   */
    PRES_SEEN_WEEK,           /* within 7 days   */
    PRES_SEEN_MONTH,          /* within 30 days  */
    PRES_SEEN_LONG_AGO,       /* longer ago      */
    PRES_SEEN_NEVER,          /* never connected */
    PRES_SEEN_HIDDEN          /* nothing may be shown */
};

typedef struct {
    const char *viewer_id;    /* NULL: the system's own view, no privacy rules */
    int         is_contact;   /* viewer is in the user's contacts */
} pres_viewer_t;

typedef struct {
    int      status;          /* enum pres_status, as this viewer may see it */
    int      seen;            /* enum pres_seen */
    uint64_t last_seen_ms;    /* 0 unless seen == PRES_SEEN_EXACT */
    unsigned devices;         /* connected devices now; 0 when the viewer
                                 may not see the user's online status */
} pres_user_view_t;

/**
 * A user as viewer sees them (viewer NULL: the system's view, no privacy).
 * Status aggregates the user's devices (ACTIVE_NOW if any connected device
 * is active, else IDLE_NOW if any is connected, else OFFLINE) and stays at
 * the last online status for the store's offline grace after the last
 * device stops being connected.  A user whose devices were evicted from
 * shared memory is answered from the LMDB mirror.
 * @return 0; -ENOENT a user the store has never heard of; -EINVAL;
 *         -ENAMETOOLONG; -EPROTO.
 * Cost: one miss for the user plus one per device; with a viewer, a
 * lookup of the viewer's own policy and a scan of the exception lists.
 */
PRES_API int pres_user(pres_t *p, const char *user_id, const pres_viewer_t *viewer,
                       pres_user_view_t *out);

enum pres_audience { PRES_EVERYONE = 0, PRES_CONTACTS = 1, PRES_NOBODY = 2 };
typedef struct {
    int                last_seen;   /* enum pres_audience: who sees last seen */
    int                online;      /* enum pres_audience: who sees online/idle;
                                       never narrower than last_seen */
    int                approximate; /* those refused see buckets, not HIDDEN */
    int                reciprocal;  /* hiding mine hides others' from me */
    int                invisible;   /* appear offline to everyone; routing unaffected */
    const char *const *allow;  size_t n_allow; /* always see, whatever the audience */
    const char *const *deny;   size_t n_deny;  /* never see */
} pres_privacy_t;

/**
 * Replace user_id's privacy policy (creating the user if the store has not
 * seen them).  Readers see the old policy or the new one, never a mix.
 * @return 0; -EINVAL bad enum value, online narrower than last_seen, a NULL
 *         or empty id, a NULL list with a nonzero length; -ENAMETOOLONG;
 *         -E2BIG a list longer than PRES_EXCEPTIONS_MAX; -ENOSPC exception
 *         or user capacity; -EROFS; -EPROTO damaged store.  On error the
 *         old policy stays.
 * Cost: one entry per listed id (plus one, with lists or invisible) taken
 * and written, then one CAS.  The caller keeps ownership of pol.
 */
PRES_API int pres_set_privacy(pres_t *p, const char *user_id, const pres_privacy_t *pol);

/**
 * The users typing in conversation_id now, each once: writes at most cap
 * ids and sets *n to how many there are.
 * @return 0; -EINVAL; -ENAMETOOLONG; -EPROTO.
 * Cost: a walk of the conversation's hash chain (typing records only).
 */
PRES_API int pres_typing_list(pres_t *p, const char *conversation_id,
                              char (*user_ids)[PRES_ID_MAX + 1], size_t cap, size_t *n);

/* ------------------------------------------------------------------------ */
/* The change feed                                                           */

enum pres_event_kind {
    PRES_EV_CONNECT = 1,    /* device connected (or reconnected elsewhere) */
    PRES_EV_DISCONNECT,     /* device disconnected cleanly                 */
    PRES_EV_EXPIRE,         /* device's TTL passed, or its gateway died     */
    PRES_EV_USER_STATUS,    /* a user's aggregate status changed            */
    PRES_EV_TYPING,         /* typing started in a conversation             */
    PRES_EV_TYPING_STOP,    /* typing stopped, moved elsewhere, or its TTL
                               passed                                       */
    PRES_EV_LOST            /* the writer of this seq died while appending
                               it: what it said is unknown (resync)         */
};

typedef struct {
    uint64_t seq;                            /* strictly increasing, no gaps */
    uint64_t at_ms;
    int      kind;                           /* enum pres_event_kind */
    int      status;                         /* new status, for USER_STATUS */
    char     user_id[PRES_ID_MAX + 1];
    char     device_id[PRES_ID_MAX + 1];     /* "" for USER_STATUS */
    char     gateway_id[PRES_ID_MAX + 1];
    char     conversation_id[PRES_ID_MAX + 1];/* for typing events */
} pres_event_t;

/**
 * The next event of the feed.  *cursor == 0 means "from now": it is first
 * set to the seq the next event will have.  On success *ev is the event with
 * seq == *cursor and *cursor becomes seq + 1.  timeout_ms < 0 waits forever,
 * 0 does not wait.  A seq whose writer died (or stayed stopped) while
 * appending it reads as PRES_EV_LOST once the daemon notices: resync.
 * @return 0; -ETIMEDOUT nothing within the timeout; -EOVERFLOW the cursor
 *         fell behind the feed's capacity (it is moved to the oldest event
 *         held: resync from a snapshot); -EINVAL a NULL argument or a cursor
 *         past the feed's head; -EPROTO.
 * Any handle, read-only ones too; any number of watchers in any number of
 * processes.  Waiting sleeps on a shared futex; watchers never slow writers
 * down.  Cost: about a cache miss an event.
 */
PRES_API int pres_watch(pres_t *p, uint64_t *cursor, pres_event_t *ev, int timeout_ms);

/* ------------------------------------------------------------------------ */
/* Counters                                                                  */

typedef struct {
    uint64_t capacity;          /* device records the store can hold */
    uint64_t devices;           /* device records held */
    uint64_t connected;         /* devices connected, as of the daemon's last
                                   pass (lags expiries by <= ~100 ms) */
    uint64_t users;
    uint64_t connects;          /* pres_connect calls that succeeded */
    uint64_t disconnects;       /* connections ended by a disconnect call */
    uint64_t heartbeats, late_heartbeats;
    uint64_t expirations;       /* connections ended by TTL or gateway death */
    uint64_t gateway_deaths, stale_reports;
    uint64_t events;            /* events ever appended: the last seq */
    uint64_t evictions;
    uint64_t grace_periods;     /* cross-process grace periods completed */
    uint64_t mirror_lag_ms;     /* age of the oldest change not yet in LMDB */
} pres_stats_t;

/** The store's counters.  @return 0; -EPROTO. */
PRES_API int pres_stats(pres_t *p, pres_stats_t *out);

#ifdef __cplusplus
}
#endif

#endif /* PRESENCE_H */
