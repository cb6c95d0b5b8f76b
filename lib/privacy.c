/*
 * privacy.c - what a person may see of a user: the rules of API.md "What a
 * person sees of a user" as one pure function, fed by the user view.
 *
 * The decision has two steps.  First, for each audience (online, last
 * seen), is this viewer admitted?  The deny list, then the allow list, then
 * the audience, then the viewer's own reciprocal policy, which no allow
 * list overrides.  Second, build what the viewer sees from the verdicts:
 * an invisible target shows its frozen last seen in place of the true one
 * and never a status.  Whatever the path, an exact time reaches only a
 * viewer admitted to the last seen.
 */
#include <errno.h>

#include "privacy.h"

static int audience_valid(int a)
{
    return a >= PV_EVERYONE && a <= PV_NOBODY;
}

int pres__privacy_valid(int last_seen, int online, int approximate, int reciprocal,
                        int invisible)
{
    /* The flags are booleans: any value is one, as C reads it. */
    (void)approximate;
    (void)reciprocal;
    (void)invisible;
    if (!audience_valid(last_seen) || !audience_valid(online))
        return -EINVAL;
    /* Online narrower than last seen would leak through a last seen of
     * "now" what the online audience hides. */
    if (online > last_seen)
        return -EINVAL;
    return 0;
}

int pres__privacy_bucket(uint64_t t, uint64_t now_ms)
{
    if (t == 0)
        return PV_SEEN_NEVER;
    /* A time ahead of ours is a clock step between hosts or processes, not
     * a sighting in the future: the nearest bucket is the honest one. */
    if (t > now_ms)
        return PV_SEEN_RECENTLY;
    uint64_t age = now_ms - t;
    if (age <= 3 * PV_DAY_MS)
        return PV_SEEN_RECENTLY;
    if (age <= 7 * PV_DAY_MS)
        return PV_SEEN_WEEK;
    if (age <= 30 * PV_DAY_MS)
        return PV_SEEN_MONTH;
    return PV_SEEN_LONG_AGO;
}

/* One audience of the target's policy, for a viewer who is neither the
 * system nor the target.  Deny is asked first so that a viewer on both
 * lists is refused: the narrower wish wins.  An audience out of range (a
 * damaged record) refuses: failing closed shows nothing that was hidden. */
static int admitted(int audience, const pres_viewer_ctx_t *v)
{
    if (v->in_deny)
        return 0;
    if (v->in_allow)
        return 1;
    if (audience == PV_EVERYONE)
        return 1;
    if (audience == PV_CONTACTS)
        return v->is_contact != 0;
    return 0;
}

static void show_truth(const pres_truth_t *truth, pres_view_out_t *out)
{
    out->status = truth->status;
    out->devices = truth->devices;
    out->seen = truth->last_seen_ms ? PV_SEEN_EXACT : PV_SEEN_NEVER;
    out->last_seen_ms = truth->last_seen_ms;
}

/* The last seen `t` (0: never) to a viewer admitted to it or not. */
static void show_seen(uint64_t t, int admit, int approximate, uint64_t now_ms,
                      pres_view_out_t *out)
{
    out->last_seen_ms = 0;
    if (admit) {
        out->seen = t ? PV_SEEN_EXACT : PV_SEEN_NEVER;
        out->last_seen_ms = t;
    } else if (!approximate) {
        out->seen = PV_SEEN_HIDDEN;
    } else {
        /* NEVER would tell the refused viewer something exact; the bucket
         * of a user never seen is the one of one not seen for long. */
        out->seen = t ? pres__privacy_bucket(t, now_ms) : PV_SEEN_LONG_AGO;
    }
}

void pres__privacy_decide(const pres_pol_t *target, const pres_truth_t *truth,
                          const pres_viewer_ctx_t *v, uint64_t now_ms, pres_view_out_t *out)
{
    if (v->system || v->self) {
        show_truth(truth, out);
        return;
    }
    /* No policy: everyone is admitted to both, and the policy's other
     * fields are not read, so the caller need not clear them. */
    int set = target->set != 0;
    int see_online = !set || admitted(target->online, v);
    int see_seen = !set || admitted(target->last_seen, v);
    /* Reciprocal: a viewer who hides their own from everybody gets nobody's
     * in return.  Read from the viewer's policy, after the target's lists,
     * so that no allow list overrides it. */
    const pres_pol_t *own = v->own;
    int recip = own && own->set && own->reciprocal;
    if (recip && own->online == PV_NOBODY)
        see_online = 0;
    if (recip && own->last_seen == PV_NOBODY)
        see_seen = 0;

    int invisible = set && target->invisible;
    if (see_online && !invisible) {
        out->status = truth->status;
        out->devices = truth->devices;
    } else {
        out->status = PV_OFFLINE;
        out->devices = 0;
    }
    show_seen(invisible ? target->frozen_seen_ms : truth->last_seen_ms, see_seen,
              set && target->approximate, now_ms, out);
}
