/*
 * privacy.h - what a person may see of a user (pres__privacy_): the pure
 * decision of API.md "What a person sees of a user", apart from the store.
 *
 * The caller gathers the facts (the target's policy, the truth about the
 * target, who the viewer is to the target) and gets back the view.  Nothing
 * here reads shared memory, a clock or a list, so every rule can be tested
 * over every combination of its inputs (tests/test_privacy.c).
 *
 * The values are plain ints.  The PV_ names below equal the public enums of
 * presence.h (enum pres_status, pres_seen, pres_audience) value for value;
 * they are spelled apart so that this header needs no more than <stdint.h>
 * and never clashes with presence.h in a file that includes both.  The
 * public values are frozen by API.md, so the two cannot drift apart.
 */
#ifndef PRES_PRIVACY_H
#define PRES_PRIVACY_H

#include <stdint.h>

#ifndef PRES_HIDDEN
#define PRES_HIDDEN __attribute__((visibility("hidden")))
#endif

/* enum pres_status */
enum { PV_OFFLINE = 0, PV_IDLE_NOW = 1, PV_ACTIVE_NOW = 2 };
/* enum pres_seen */
enum {
    PV_SEEN_EXACT = 0,
    PV_SEEN_RECENTLY,
    PV_SEEN_WEEK,
    PV_SEEN_MONTH,
    PV_SEEN_LONG_AGO,
    PV_SEEN_NEVER,
    PV_SEEN_HIDDEN
};
/* enum pres_audience: a larger value is a narrower audience. */
enum { PV_EVERYONE = 0, PV_CONTACTS = 1, PV_NOBODY = 2 };

#define PV_DAY_MS UINT64_C(86400000)

/* What the privacy rules need of a user's policy (the target, or the viewer's own). */
typedef struct {
    int      set;          /* 0: no policy: everyone sees everything */
    int      last_seen;    /* audience 0 everyone, 1 contacts, 2 nobody */
    int      online;       /* audience; never narrower than last_seen */
    int      approximate, reciprocal, invisible;
    uint64_t frozen_seen_ms; /* invisible: last seen when they became invisible (0: never seen) */
} pres_pol_t;

/* The truth about the target, from the store, at `now_ms` (wall clock). */
typedef struct {
    int      status;        /* damped status, 0 offline 1 idle 2 active */
    unsigned devices;       /* connected devices now */
    uint64_t last_seen_ms;  /* 0: never connected */
} pres_truth_t;

typedef struct {
    int system;             /* viewer == NULL: no privacy at all */
    int self;               /* the viewer is the user: no privacy */
    int is_contact;
    int in_allow, in_deny;  /* the viewer is on the target's lists */
    const pres_pol_t *own;  /* the viewer's own policy, NULL: none */
} pres_viewer_ctx_t;

typedef struct { int status, seen; uint64_t last_seen_ms; unsigned devices; } pres_view_out_t;

/* Validate a policy as pres_set_privacy receives it: enums in range, online not narrower than last_seen. 0 or -EINVAL. */
PRES_HIDDEN int pres__privacy_valid(int last_seen, int online, int approximate, int reciprocal, int invisible);
/* Bucket of a last-seen time: RECENTLY if now - t <= 3 days, WEEK <= 7 days, MONTH <= 30 days, else LONG_AGO; t == 0: NEVER; t > now (clock skew): RECENTLY. */
PRES_HIDDEN int pres__privacy_bucket(uint64_t t, uint64_t now_ms);
/* The decision.  Pure: reads only its arguments (all non-NULL except
 * v->own) and writes every field of *out; any thread, no cost beyond a few
 * compares.  The target's policy fields, and v->in_allow / v->in_deny,
 * count only when target->set (no policy, no lists); the viewer's lists,
 * contact bit and own policy only for a viewer that is neither the system
 * nor the target. */
PRES_HIDDEN void pres__privacy_decide(const pres_pol_t *target, const pres_truth_t *truth,
                                      const pres_viewer_ctx_t *v, uint64_t now_ms,
                                      pres_view_out_t *out);

#endif /* PRES_PRIVACY_H */
