/*
 * region.h - the layout of a store's shared memory (private to libpresence
 * and presenced).
 *
 * A store NAME is three files in $PRESENCE_SHM_DIR:
 *
 *   presence.NAME          the records: header, hash buckets, gateway table,
 *                          device and user records, privacy exception
 *                          entries, typing records, the change feed and the
 *                          daemon's change notes.  RDWR handles map it
 *                          read-write; RDONLY handles map it read-only, so a
 *                          stray write of a reader cannot damage a record.
 *   presence.NAME.readers  what every attached process must be able to write:
 *                          the grace-period epoch, client slots (pid, start
 *                          time) and reader slots (epoch, counters).
 *   presence.NAME.lock     held (flock) by the one running daemon.
 *
 * The region holds offsets and indexes, never pointers (property 1).  See
 * doc/region.md for the protocols and the invariants `presencectl check`
 * verifies.
 */
#ifndef PRES_REGION_H
#define PRES_REGION_H

#include <stddef.h>
#include <stdint.h>
#include "presence.h"

/* "PRESENCE" read as a big-endian number: a host of the other byte order
 * sees it reversed, so a region is never misread across byte orders. */
#define PRES_MAGIC          UINT64_C(0x50524553454e4345)
#define PRES_READERS_MAGIC  UINT64_C(0x5052455352454144)   /* "PRESREAD" */
/* The region format version, separate from the library version: bumped on
 * any change of the layout below. */
#define PRES_FORMAT         2u

#define PRES_HDR_SIZE       4096u
#define PRES_CACHELINE      64u
#define PRES_PAGE           4096u

/* Capacity bounds.  Device indexes travel in 24 bits of a pres_ref_t;
 * client indexes in the 14-bit latch field of a device's live word. */
#define PRES_DEV_CAP_MAX    (UINT32_C(1) << 24)
#define PRES_USER_CAP_MAX   (UINT32_C(1) << 25)   /* ring slots hold index + 1 in 26 bits */
#define PRES_GW_CAP_MAX     (UINT32_C(1) << 16)
#define PRES_CLIENTS        1024u    /* attached handles at once */
#define PRES_READER_SLOTS   4096u    /* (thread, handle) pairs in read sections */
#define PRES_DAEMON_CLIENT  0u       /* client index the daemon uses */
/* A latch names the reader slot (index + 1) of the writing thread: a latch
 * belongs to one thread, never to a handle shared by threads.  The daemon
 * writes under its own value, beyond every slot. */
#define PRES_DAEMON_LATCH   (PRES_READER_SLOTS + 1)
/* A reader slot's owner while the daemon clears it: no client claims it. */
#define PRES_RS_SWEEPING    (~(uint64_t)0)

/* ---- areas of the records file ---------------------------------------- */

enum pres_area {
    PRES_AREA_DEV_BUCKETS = 0,  /* uint64_t link heads */
    PRES_AREA_USER_BUCKETS,     /* uint64_t link heads */
    PRES_AREA_GATEWAYS,         /* pres_gw_t */
    PRES_AREA_DEVICES,          /* pres_dev_t */
    PRES_AREA_USERS,            /* pres_user_t */
    PRES_AREA_EXCEPTIONS,       /* pres_exc_t: privacy policies' entries */
    PRES_AREA_TYPING,           /* pres_typ_t: who types where */
    PRES_AREA_TYP_BUCKETS,      /* uint64_t link heads, by conversation */
    PRES_AREA_EVENTS,           /* pres_event_slot_t: the change feed */
    PRES_AREA_NOTES,            /* uint64_t: records changed, for the daemon */
    PRES_AREA_DEV_RING,         /* free-record rings, one per kind (uint64_t) */
    PRES_AREA_USER_RING,
    PRES_AREA_EXC_RING,
    PRES_AREA_TYP_RING,
    PRES_AREA_COUNT
};

/* Kinds of records handed out through a free-record ring, in the order of
 * their ring areas. */
enum pres_rkind { PRES_RK_DEV = 0, PRES_RK_USER, PRES_RK_EXC, PRES_RK_TYP, PRES_RK_COUNT };

typedef struct {
    uint64_t off;      /* from the start of the file; page aligned */
    uint64_t count;    /* elements */
    uint64_t size;     /* bytes per element, fixed by the format */
} pres_area_t;

/* ---- links ---------------------------------------------------------------
 * A link is one 64-bit word.  bit 0 set: a nulls marker ending a chain,
 * bits 1..63 naming the chain (its bucket, or for a user's device list the
 * user's index).  bit 0 clear: bits 1..31 the record index, bits 32..63 the
 * generation of the record when it was linked.  A reader that reaches a
 * record whose generation differs, or a marker naming another chain, has
 * been carried off its chain (or the region is damaged) and restarts.
 */
#define PRES_LINK_NULLS(chain)   ((((uint64_t)(chain)) << 1) | 1u)
#define PRES_LINK(idx, gen)      ((((uint64_t)(gen)) << 32) | (((uint64_t)(idx)) << 1))
#define PRES_LINK_IS_NULLS(l)    (((l) & 1u) != 0)
#define PRES_LINK_CHAIN(l)       ((l) >> 1)
#define PRES_LINK_IDX(l)         ((uint32_t)(((l) >> 1) & 0x7fffffffu))
#define PRES_LINK_GEN(l)         ((uint32_t)((l) >> 32))
/* A user's device-list head once the daemon has retired the user: no device
 * may be linked to it any more. */
#define PRES_LINK_RETIRED        (~(uint64_t)0)
/* A user's device-list head while the daemon retires the user: the user is
 * still there (lookups find it), and a client that links a device or sets
 * a privacy policy turns it back into the empty marker, which makes the
 * daemon's final CAS to RETIRED fail (doc/region.md, "Users").  Odd, so a
 * walker takes it for a marker, and no chain is named by it. */
#define PRES_LINK_RETIRING       (~(uint64_t)0 - 2)
/* A device-list head that holds no list: RETIRED or RETIRING. */
#define PRES_LINK_NO_LIST(l)     ((l) >= PRES_LINK_RETIRING)

/* ---- the live word of a device ------------------------------------------
 *   bits  0..39  expiry, CLOCK_MONOTONIC milliseconds (34 years of uptime)
 *   bits 40..41  state (PRES_DS_*)
 *   bits 42..49  seq: bumped by every publish of a connection copy; bit 0
 *                selects the current copy of conn[]
 *   bits 50..63  latch: 0 free, else (reader slot index + 1) of the one
 *                thread allowed to write the other copy
 * Heartbeats change only the expiry, with one CAS; everything else about a
 * connection is written into the idle copy under the latch and published by
 * one CAS that flips seq.  See doc/region.md, "Device records".
 */
enum pres_dev_state {
    PRES_DS_PENDING = 0,       /* allocated, being linked: invisible */
    PRES_DS_CONNECTED = 1,     /* connected until the expiry */
    PRES_DS_DISCONNECTED = 2,  /* ended by a disconnect or a gateway death */
    PRES_DS_DEAD = 3           /* superseded or evicted: being unlinked */
};

#define PRES_LIVE_EXP_BITS     40
#define PRES_LIVE_EXP_MASK     ((UINT64_C(1) << PRES_LIVE_EXP_BITS) - 1)
#define PRES_LIVE_STATE(w)     ((unsigned)(((w) >> 40) & 3u))
#define PRES_LIVE_SEQ(w)       ((unsigned)(((w) >> 42) & 0xffu))
#define PRES_LIVE_LATCH(w)     ((unsigned)((w) >> 50))
#define PRES_LIVE_EXPIRY(w)    ((w) & PRES_LIVE_EXP_MASK)
#define PRES_LIVE_MAKE(exp, st, seq, latch) \
    (((uint64_t)(exp) & PRES_LIVE_EXP_MASK) | ((uint64_t)(st) << 40) | \
     ((uint64_t)((seq) & 0xffu) << 42) | ((uint64_t)(latch) << 50))
#define PRES_LATCH_MAX         ((1u << 14) - 1)

/* The activity word: bit 63 idle (PRES_IDLE until the next interaction),
 * bits 0..62 the monotonic millisecond of the last interaction. */
#define PRES_ACT_IDLE          (UINT64_C(1) << 63)
#define PRES_ACT_TIME(w)       ((w) & ~PRES_ACT_IDLE)

/* One connection's slow-changing facts: written only into the copy that
 * is not current, by the latch holder.  Fields are read with relaxed
 * atomic loads because a reader may race with a writer of the idle copy
 * (it then notices the seq change and reads again). */
typedef struct {
    uint32_t gw;             /* gateway table index */
    uint32_t flags;          /* bit 0 PRES_CONN_DIED: ended by its gateway's
                                death; bit 1 PRES_CONN_LAPSED: ended by a
                                disconnect after its TTL had passed (it
                                stopped being connected at the expiry);
                                bits 2..31 the gateway's incarnation (its
                                `died` count) when this was written */
    uint64_t connected_at;   /* wall ms */
    uint64_t ended;          /* wall ms of the end (state DISCONNECTED) */
} pres_conn_t;

#define PRES_CONN_DIED   1u
#define PRES_CONN_LAPSED 2u
#define PRES_CONN_INC(f) ((f) >> 2)
#define PRES_CONN_INC_MASK 0x3fffffffu

/* A record's alloc word: PRES_ALLOC_FREE while on the free stack (or never
 * used); an allocator claims it (CAS to its token) before popping it, so a
 * process killed between the two leaves a record the daemon can identify. */
#define PRES_ALLOC_FREE   UINT64_C(0)
#define PRES_ALLOC_POOLED UINT64_C(1)   /* in the daemon's private pool */
#define PRES_ALLOC_RETIRED UINT64_C(2)  /* unlinked, waiting for a grace period */
/* Exception entries only: published in a user's policy, owned by it rather
 * than by the client that wrote it (so a replaced block whose replacer died
 * before retiring it can be told from one still being written). */
#define PRES_ALLOC_HELD   UINT64_C(3)
#define PRES_TOKEN(client, cgen)  ((((uint64_t)(client) + 1) << 48) | (((uint64_t)(cgen) & 0xffffu) << 32))
#define PRES_TOKEN_CLIENT(t)      ((uint32_t)((t) >> 48) - 1)

/* A device record: 192 bytes.  The first cache line holds what a heartbeat
 * needs (link, live word, both TTLs) and the start of the key, so a lookup of
 * a short id and a heartbeat each touch one line. */
typedef struct {
    uint64_t next;           /* hash chain link (free-stack link when free) */
    uint64_t live;           /* see above */
    uint32_t ttl[2];         /* TTL of conn[0], conn[1] */
    uint32_t cid[2];         /* connection id of conn[0], conn[1]: bumped by
                                each pres_connect, checked by pres_ref_t */
    uint32_t gen;            /* bumped each time the slot is freed */
    uint32_t user;           /* user record index; fixed while linked */
    uint8_t  keylen;
    char     key[PRES_ID_MAX];
    uint64_t activity;       /* see above */
    uint64_t unext;          /* the user's device list */
    uint64_t alloc;          /* PRES_ALLOC_FREE, or the allocator's token */
    pres_conn_t conn[2];
    uint64_t typing;         /* link to the device's typing record, 0 none */
    uint64_t announced;      /* the end of which connection the change feed
                                has announced: PRES_ANN(cid, expiry); written
                                only under the latch (lib/events.c) */
} pres_dev_t;

/* A connection is named by its connection id and its expiry: a revival
 * (late heartbeat) keeps the id and moves the expiry past the old one, a
 * reconnect changes the id. */
#define PRES_ANN(cid, exp)   ((((uint64_t)(cid) & 0xffffffu) << 40) | ((uint64_t)(exp) & PRES_LIVE_EXP_MASK))

/* A user record: 128 bytes. */
typedef struct {
    uint64_t next;           /* hash chain link */
    uint64_t dhead;          /* first device of the user (link), RETIRED */
    uint32_t gen;
    uint32_t flags;          /* PRES_UF_* */
    uint64_t alloc;          /* PRES_ALLOC_FREE, or the allocator's token */
    uint8_t  keylen;
    char     key[PRES_ID_MAX];
    uint64_t privacy;        /* the policy word, see below; 0: none */
    uint64_t last_seen;      /* wall ms: latest last seen of the user's
                                devices no longer in memory (evicted) */
    uint64_t status;         /* the daemon's: last status it published in
                                the change feed (enum pres_status; 0 until
                                a first USER_STATUS event) */
    uint64_t spare;
} pres_user_t;

/* The privacy policy word of a user, replaced as a whole by one CAS, so a
 * reader sees one policy or the other, never half of each:
 *   bits 0..1   last_seen audience (enum pres_audience)
 *   bits 2..3   online audience
 *   bit  4      approximate
 *   bit  5      reciprocal
 *   bit  6      invisible
 *   bit  7      set: a policy was set (0: everyone sees everything)
 *   bits 32..63 index + 1 of the policy's first exception entry (a
 *               PRES_EXC_HEAD), 0: no entries.  Entries are immutable while
 *               published; a replaced policy's entries are retired through
 *               a grace period.
 */
#define PRES_PV_SEEN(w)      ((int)((w) & 3u))
#define PRES_PV_ONLINE(w)    ((int)(((w) >> 2) & 3u))
#define PRES_PV_APPROX       (UINT64_C(1) << 4)
#define PRES_PV_RECIP        (UINT64_C(1) << 5)
#define PRES_PV_INVISIBLE    (UINT64_C(1) << 6)
#define PRES_PV_SET          (UINT64_C(1) << 7)
#define PRES_PV_HEAD(w)      ((uint32_t)((w) >> 32))
#define PRES_PV_MAKE(seen, online, flags, head1) \
    ((uint64_t)(seen) | ((uint64_t)(online) << 2) | (flags) | PRES_PV_SET | \
     ((uint64_t)(head1) << 32))
/* Entries of a block at most: the HEAD and two full lists. */
#define PRES_PV_BLOCK_MAX    (1 + 2 * PRES_EXCEPTIONS_MAX)

/* A privacy exception entry: 128 bytes.  A policy's entries form a list
 * from its HEAD (which holds the counts and the frozen last seen), allow
 * entries first, then deny entries. */
enum { PRES_EXC_HEAD = 1, PRES_EXC_ALLOW = 2, PRES_EXC_DENY = 3 };
typedef struct {
    uint64_t alloc;          /* FREE/POOLED/RETIRED, or the taker's token */
    uint32_t next;           /* index + 1 of the next entry, 0: last */
    uint32_t kind;           /* PRES_EXC_* */
    uint64_t frozen_seen;    /* HEAD: wall ms frozen by invisibility */
    uint32_t n_allow, n_deny; /* HEAD */
    uint32_t user;           /* HEAD: the user it was written for */
    uint32_t hash;           /* ALLOW/DENY: of the key, a quick reject */
    uint8_t  keylen;
    char     key[PRES_ID_MAX];
    uint8_t  pad[24];
} pres_exc_t;

/* A typing record: 128 bytes, in a hash chain by conversation (inserted at
 * the head by clients, removed only by the daemon).  A device names its
 * current record in `typing`; a record counts only while that link still
 * names it, its state is LIVE, its expiry has not passed and its device is
 * connected. */
enum { PRES_TS_PENDING = 0, PRES_TS_LIVE = 1, PRES_TS_ENDED = 2, PRES_TS_DEAD = 3 };
#define PRES_TW_EXPIRY(w)    ((w) & PRES_LIVE_EXP_MASK)
#define PRES_TW_STATE(w)     ((unsigned)(((w) >> 40) & 3u))
#define PRES_TW_MAKE(exp, st) (((uint64_t)(exp) & PRES_LIVE_EXP_MASK) | ((uint64_t)(st) << 40))
typedef struct {
    uint64_t next;           /* conversation chain link */
    uint64_t alloc;
    uint64_t word;           /* expiry (monotonic ms) and state */
    uint32_t dev, dgen;      /* the device and its generation */
    uint32_t user, gen;      /* the device's user; this record's generation */
    uint64_t started;        /* wall ms */
    uint8_t  keylen;         /* the conversation id */
    char     key[PRES_ID_MAX];
    uint32_t cid;            /* the device's connection it was typed on: */
    uint32_t pad;
    uint64_t conn_at;        /* its cid and connected_at (a revival moves it) */
} pres_typ_t;

/* A slot of the change feed: 320 bytes.  `word` holds the lap of the seq
 * the slot holds (seq / slots), its state and a latch (see below and
 * lib/events.c); at_ms .. conv are the event, read and written only as the
 * 34 words from at_ms on; lost_at is the time a LOST slot was declared
 * lost, written only by whoever declares it. */
typedef struct {
    uint64_t word;
    uint64_t at_ms;
    uint32_t kind, status;
    uint8_t  ulen, dlen, glen, clen;
    char     user[PRES_ID_MAX];
    char     dev[PRES_ID_MAX];
    char     gw[PRES_ID_MAX];
    char     conv[PRES_ID_MAX];
    uint64_t lost_at;
    uint8_t  pad[32];
} pres_event_slot_t;

/* An event slot's word:
 *   bits  0..1   state (PRES_EVS_*)
 *   bits  2..15  latch: CLAIMED: the appending thread's latch value; LOST:
 *                a writer that may still be copying into the slot (it was
 *                stopped when its claim was declared lost), 0 none
 *   bits 16..63  lap of the seq: seq >> log2(slots), modulo 2^48
 * A seq s lives in slot s & (slots - 1). */
enum {
    PRES_EVS_EMPTY = 0,        /* never written */
    PRES_EVS_CLAIMED = 1,      /* a writer is copying the event in */
    PRES_EVS_PUBLISHED = 2,    /* readable */
    PRES_EVS_LOST = 3          /* its writer died or stopped: PRES_EV_LOST */
};
#define PRES_EVW_MAKE(lap, st, latch) \
    (((uint64_t)(lap) << 16) | ((uint64_t)((latch) & 0x3fffu) << 2) | (uint64_t)(st))
#define PRES_EVW_STATE(w)    ((unsigned)((w) & 3u))
#define PRES_EVW_LATCH(w)    ((unsigned)(((w) >> 2) & 0x3fffu))
#define PRES_EVW_LAP(w)      ((w) >> 16)
#define PRES_EVW_LAP_MASK    ((UINT64_C(1) << 48) - 1)
/* The smallest feed: a lap is at least this many seqs. */
#define PRES_EVENTS_MIN      1024u

/* A change note (lib/notes.c): a record the daemon should look at again,
 * for the mirror and for its timers.
 *   bits 0..1   kind (PRES_NOTE_*; 0: never written)
 *   bits 2..31  record index
 *   bits 32..63 lap of the ring position it was written at
 */
enum { PRES_NOTE_DEV = 1, PRES_NOTE_USER = 2, PRES_NOTE_TYP = 3 };
#define PRES_NOTE_MAKE(kind, idx, lap) \
    ((uint64_t)(kind) | ((uint64_t)(idx) << 2) | ((uint64_t)(uint32_t)(lap) << 32))
#define PRES_NOTE_KIND(s)    ((unsigned)((s) & 3u))
#define PRES_NOTE_IDX(s)     ((uint32_t)(((s) >> 2) & 0x3fffffffu))
#define PRES_NOTE_LAP(s)     ((uint32_t)((s) >> 32))

/* A gateway entry: 128 bytes, in an open-addressed table. */
enum pres_gw_state { PRES_GW_EMPTY = 0, PRES_GW_FILLING = 1, PRES_GW_READY = 2 };
typedef struct {
    uint64_t state;          /* PRES_GW_* | (filler's client + 1) << 8 |
                                (the key's hash tag) << 32 while FILLING */
    uint64_t owner;          /* client token of the attached process, 0 none,
                                PRES_GW_CLOSED after its handle closed,
                                PRES_GW_DYING while the daemon ends its
                                connections */
    uint64_t died;           /* incarnation: deaths handled by the daemon */
    uint64_t ending;         /* the incarnation whose connections the
                                daemon is ending (owner DYING) */
    uint8_t  keylen;
    char     key[PRES_ID_MAX];
    uint64_t spare2[4];
} pres_gw_t;
#define PRES_GW_CLOSED   UINT64_C(1)
#define PRES_GW_DYING    UINT64_C(2)

_Static_assert(sizeof(pres_dev_t) == 192, "device record layout");
_Static_assert(sizeof(pres_user_t) == 128, "user record layout");
_Static_assert(sizeof(pres_gw_t) == 128, "gateway entry layout");
_Static_assert(sizeof(pres_exc_t) == 128, "exception entry layout");
_Static_assert(sizeof(pres_typ_t) == 128, "typing record layout");
_Static_assert(sizeof(pres_event_slot_t) == 320, "event slot layout");
_Static_assert(offsetof(pres_event_slot_t, at_ms) == 8 &&
               offsetof(pres_event_slot_t, lost_at) == 8 + 34 * 8, "event slot words");

/* ---- free-record rings ----------------------------------------------------
 * The daemon (the one producer) offers free records to clients through a
 * ring per record kind, as large as a power of two >= the capacity.  Slot
 * word: bits 0..25 index + 1, bits 26..39 (client + 1) of the consumer that
 * took it (0: not taken), bits 40..63 the lap (position / ring size).  A
 * client takes a record by one CAS on the slot that writes its own client
 * index into it, so a client killed at any instruction leaves either an
 * untaken slot or a slot that names it: the daemon can always tell which
 * records a dead client held (see doc/region.md, "Allocation").
 */
#define PRES_RING_MAKE(idx, owner1, lap) \
    (((uint64_t)(idx) + 1) | ((uint64_t)(owner1) << 26) | ((uint64_t)((lap) & 0xffffffu) << 40))
#define PRES_RING_IDX(s)     ((uint32_t)((s) & 0x3ffffffu) - 1)
#define PRES_RING_OWNER1(s)  ((uint32_t)(((s) >> 26) & 0x3fffu))
#define PRES_RING_LAP(s)     ((uint32_t)((s) >> 40))

/* Counters the daemon keeps. */
typedef struct {
    uint64_t devices_gone;        /* published device records evicted */
    uint64_t connected;
    uint64_t users_gone;          /* published user records retired */
    uint64_t expirations, gateway_deaths, events, evictions, grace_periods;
    uint64_t mirror_lag_ms;
    uint64_t devices_adjust;      /* corrections (two's complement) of the */
    uint64_t users_adjust;        /* counts, see daemon/reaper.c */
    uint64_t notes_lost;          /* note-ring overflows (each: a sweep) */
    uint64_t spare[4];
} pres_dcounters_t;

/* Counters each thread keeps in its own reader slot (no shared cache line
 * on the hot path); pres_stats adds them up with those folded in from
 * slots that were given back. */
enum {
    PRES_C_CONNECTS = 0, PRES_C_DISCONNECTS, PRES_C_HEARTBEATS,
    PRES_C_LATE_HEARTBEATS, PRES_C_STALE_REPORTS,
    PRES_C_DEV_NEW,          /* device records published */
    PRES_C_DEV_GONE,         /* published device records superseded */
    PRES_C_USER_NEW,         /* user records published */
    PRES_C_COUNT
};

/* The header of the records file. */
typedef struct {
    uint64_t magic;
    uint32_t format;
    uint32_t hdr_size;
    uint64_t file_size;
    uint64_t instance;            /* random; the readers file must match */
    uint32_t ready;               /* 1 once fully built (set before rename) */
    uint32_t areas_count;
    pres_area_t area[PRES_AREA_COUNT];
    uint64_t hash_seed;
    char     boot_id[40];         /* /proc/sys/kernel/random/boot_id */
    int64_t  timens_mono_s;       /* monotonic offset of the creator's time */
    uint64_t created_wall_ms;
    /* configuration (read by clients; changed only by the daemon) */
    uint32_t idle_after_ms;
    uint32_t offline_grace_ms;
    uint64_t retain_ms;
    uint8_t  pad0[PRES_CACHELINE];
    /* the LMDB mirror's directory, for users no longer in memory */
    char     db_dir[1024];
    /* free-record rings: consumer cursors (clients), each on its own cache
     * line, and producer cursors (daemon) */
    struct {
        uint64_t cons __attribute__((aligned(PRES_CACHELINE)));
    } ring[PRES_RK_COUNT];
    uint64_t prod[PRES_RK_COUNT] __attribute__((aligned(PRES_CACHELINE)));
    /* the change feed: the next seq to claim (starts at 1); its watchers'
     * words are in the readers file (pres_rhdr_t) */
    uint64_t ev_next __attribute__((aligned(PRES_CACHELINE)));
    /* change notes: the next position to write (clients) and the daemon's
     * read position */
    uint64_t note_head __attribute__((aligned(PRES_CACHELINE)));
    uint64_t note_tail __attribute__((aligned(PRES_CACHELINE)));
    /* written by the daemon */
    pres_dcounters_t dc __attribute__((aligned(PRES_CACHELINE)));
    uint64_t daemon_pid  __attribute__((aligned(PRES_CACHELINE)));
    uint64_t daemon_beat_mono;    /* the daemon's clock at its last pass */
    int64_t  wall_offset_ms;      /* wall = monotonic + this: every process
                                     converts alike, so times do not drift
                                     between reads; the daemon moves it when
                                     the wall clock steps */
    uint64_t oldest_reader_ms;    /* age of the oldest open read section */
} pres_hdr_t;

_Static_assert(sizeof(pres_hdr_t) <= PRES_HDR_SIZE, "header fits its page");

/* ---- the readers file ----------------------------------------------------- */

/* A client slot: one per attached handle.  pid == 0: free. */
typedef struct {
    uint64_t pid;            /* claimed by CAS 0 -> pid */
    uint64_t start;          /* the process's start time (clock ticks since
                                boot, /proc/PID/stat field 22): guards
                                against pid reuse */
    uint64_t gen;            /* bumped when the slot is freed */
    uint64_t ready;          /* 1 once pid/start are filled */
    uint64_t flags;          /* PRES_CL_RDWR */
    uint64_t spare[11];
} pres_client_t;
#define PRES_CL_RDWR 1u
_Static_assert(sizeof(pres_client_t) == 128, "client slot layout");

/* A reader slot: two cache lines of its own, so readers never share one;
 * the counters sit with the epoch because the same thread writes both. */
typedef struct {
    uint64_t epoch;          /* 0: outside read sections; else the grace
                                period epoch seen on entry */
    uint64_t owner;          /* 0 free; else PRES_RS_OWNER(client, gen, n) */
    uint64_t counters[PRES_C_COUNT]; /* written by the owning thread only */
    uint64_t pad[6];
} pres_rslot_t;
_Static_assert(sizeof(pres_rslot_t) == 2 * PRES_CACHELINE, "reader slot layout");

#define PRES_RS_OWNER(client, cgen, n)  (PRES_TOKEN(client, cgen) | (uint32_t)(n))

typedef struct {
    uint64_t magic;
    uint32_t format;
    uint32_t hdr_size;
    uint64_t file_size;
    uint64_t instance;
    uint32_t clients;
    uint32_t reader_slots;
    uint64_t off_clients;
    uint64_t off_readers;
    /* the grace-period epoch: starts at 1, advanced only by the daemon */
    uint64_t gp_epoch __attribute__((aligned(PRES_CACHELINE)));
    /* counters folded in from clients that are gone */
    uint64_t folded[PRES_C_COUNT] __attribute__((aligned(PRES_CACHELINE)));
    /* the change feed's watchers: nonzero when one may be asleep (set by
     * watchers before they sleep, cleared by the writer that wakes them),
     * and the futex word they sleep on.  Here because every attached
     * process, read-only ones too, must write them. */
    uint32_t ev_sleepers __attribute__((aligned(PRES_CACHELINE)));
    uint32_t ev_futex;
} pres_rhdr_t;
_Static_assert(sizeof(pres_rhdr_t) <= PRES_HDR_SIZE, "readers header fits");

/* ---- a process's view of a store ---------------------------------------- */

typedef struct {
    uint8_t      *base;      /* records file mapping */
    size_t        size;
    uint8_t      *rbase;     /* readers file mapping */
    size_t        rsize;
    pres_hdr_t   *hdr;
    pres_rhdr_t  *rhdr;
    uint64_t     *dev_buckets;
    uint64_t     *user_buckets;
    uint64_t     *typ_buckets;
    pres_gw_t    *gws;
    pres_dev_t   *devs;
    pres_user_t  *users;
    pres_exc_t   *excs;
    pres_typ_t   *typs;
    pres_event_slot_t *events;
    uint64_t     *notes;
    pres_client_t *clients;
    pres_rslot_t *rslots;
    uint64_t     *ring[PRES_RK_COUNT];   /* free-record rings */
    uint64_t      rmask[PRES_RK_COUNT];  /* ring size - 1 */
    unsigned      rshift[PRES_RK_COUNT]; /* log2 ring size */
    uint32_t      rcap[PRES_RK_COUNT];   /* records of each kind */
    uint64_t      dev_mask, user_mask, typ_mask; /* buckets - 1 */
    uint64_t      ev_mask, note_mask;    /* slots - 1 */
    uint32_t      dev_cap, user_cap, gw_cap, exc_cap, typ_cap;
    uint64_t      seed;
} pres_map_t;

/* The alloc word of record i of a kind. */
static inline uint64_t *pres__alloc_word(pres_map_t *m, int kind, uint32_t i)
{
    switch (kind) {
    case PRES_RK_DEV:  return &m->devs[i].alloc;
    case PRES_RK_USER: return &m->users[i].alloc;
    case PRES_RK_EXC:  return &m->excs[i].alloc;
    default:           return &m->typs[i].alloc;
    }
}

typedef struct {
    uint64_t dev_cap, user_cap, gw_cap;
    uint64_t exceptions, typing, events, notes;
    uint32_t idle_after_ms, offline_grace_ms;
    uint64_t retain_ms;
    const char *db_dir;
} pres_layout_params_t;

/* Paths of the files of store `name` in dir; out has room for PATH_MAX. */
int  pres__region_path(char *out, size_t cap, const char *name, const char *suffix);
int  pres__region_name_ok(const char *name);
const char *pres__region_dir(void);
const char *pres__region_default_name(const char *name);

/* Map the store's files.  rdwr selects the protection of the records file.
 * Validates everything (magic, format, sizes, offsets, clock).  Returns 0,
 * -ENOENT, -EPROTO, -EACCES. */
int  pres__region_map(pres_map_t *m, const char *name, int rdwr);
void pres__region_unmap(pres_map_t *m);
/* Validate mapped headers (also used on adopt by the daemon). */
int  pres__region_validate(const pres_map_t *m, uint64_t records_size, uint64_t readers_size);

/* Daemon: build a new store under temporary names and publish it by rename.
 * Returns 0 or a negative errno; on success *m maps it read-write. */
int  pres__region_create(pres_map_t *m, const char *name, const pres_layout_params_t *lp);
/* The same, calling fill(m, ctx) on the complete, initialised store before
 * it is published (a rebuild from the mirror): no client can see it half
 * filled.  A negative return from fill abandons the store and is returned. */
int  pres__region_create_filled(pres_map_t *m, const char *name, const pres_layout_params_t *lp,
                                int (*fill)(pres_map_t *m, void *ctx), void *ctx);

/* This process's identity for pid-reuse checks. */
uint64_t pres__proc_start(int pid);
/* The kernel's word on whether pid is the process that started at `start`
 * (0: any): a zombie or a reused pid is dead.  A stopped process is alive. */
int  pres__proc_alive(int pid, uint64_t start);
/* 0 dead (or reused), 1 alive and running, 2 alive and stopped or traced. */
int  pres__proc_state(int pid, uint64_t start);
int  pres__boot_id(char out[40]);
int64_t pres__timens_mono_s(void);

#endif /* PRES_REGION_H */
