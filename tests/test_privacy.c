/*
 * test_privacy.c - the privacy decision of lib/privacy.c, with no store and
 * no daemon: the rules of API.md "What a person sees of a user".
 *
 * Three kinds of check.  Every combination of the inputs that matter
 * (target policy, the viewer's relation to the target, the viewer's own
 * policy, the truth) against a reference written apart from the library:
 * it works out the sets of viewers each audience admits, then builds the
 * view from a verdict, where the library walks a chain of ifs.  The
 * universal promises over the same combinations (an exact time never
 * reaches a refused viewer, a refusal never leaks devices, the target's
 * own reciprocal flag changes nothing for others).  And named scenarios
 * with their answers written out by hand, so that the reference and the
 * library cannot share a misreading unnoticed.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "privacy.h"

#define DAY   PV_DAY_MS
#define HOUR  UINT64_C(3600000)
/* Any wall-clock instant far from 0, so that times days before it exist. */
#define NOW   UINT64_C(1700000000000)

/* ------------------------------------------------------------------------ */
/* The reference                                                             */

/* Viewer classes as bits; an audience is the set of classes it admits. */
#define STRANGER 1u
#define CONTACT  2u
static const unsigned AUDIENCE_ADMITS[3] = {
    [PV_EVERYONE] = STRANGER | CONTACT,
    [PV_CONTACTS] = CONTACT,
    [PV_NOBODY]   = 0u,
};

/* The buckets as a table of upper bounds on the age, in days. */
static const struct { int64_t days; int seen; } BUCKETS[] = {
    { 3, PV_SEEN_RECENTLY }, { 7, PV_SEEN_WEEK }, { 30, PV_SEEN_MONTH },
};

static int ref_bucket(uint64_t t, uint64_t now)
{
    if (t == 0)
        return PV_SEEN_NEVER;
    /* Signed: a time in the future has a negative age, within the first. */
    int64_t age = (int64_t)now - (int64_t)t;
    for (size_t i = 0; i < sizeof BUCKETS / sizeof BUCKETS[0]; i++)
        if (age <= BUCKETS[i].days * (int64_t)DAY)
            return BUCKETS[i].seen;
    return PV_SEEN_LONG_AGO;
}

typedef struct { int online, last_seen; } verdict_t;

/* Is each audience granted?  Sets first, then the lists, then reciprocity. */
static verdict_t ref_verdict(const pres_pol_t *t, const pres_viewer_ctx_t *v)
{
    if (v->system || v->self)
        return (verdict_t){ 1, 1 };
    unsigned cls = v->is_contact ? CONTACT : STRANGER;
    unsigned on_set = t->set ? AUDIENCE_ADMITS[t->online] : STRANGER | CONTACT;
    unsigned ls_set = t->set ? AUDIENCE_ADMITS[t->last_seen] : STRANGER | CONTACT;
    /* Without a policy there are no lists either. */
    int allow = t->set && v->in_allow, deny = t->set && v->in_deny;
    const pres_pol_t *o = v->own;
    int mirror = o != NULL && o->set && o->reciprocal;
    verdict_t r;
    r.online = ((on_set & cls) != 0 || allow) && !deny
               && !(mirror && o->online == PV_NOBODY);
    r.last_seen = ((ls_set & cls) != 0 || allow) && !deny
                  && !(mirror && o->last_seen == PV_NOBODY);
    return r;
}

static pres_view_out_t ref_view(const pres_pol_t *t, const pres_truth_t *tr,
                                const pres_viewer_ctx_t *v, uint64_t now)
{
    verdict_t ok = ref_verdict(t, v);
    int masked = !(v->system || v->self) && t->set && t->invisible;
    uint64_t shown = masked ? t->frozen_seen_ms : tr->last_seen_ms;
    int approx = t->set && t->approximate;

    pres_view_out_t w = { PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0 };
    if (ok.online && !masked) {
        w.status = tr->status;
        w.devices = tr->devices;
    }
    if (ok.last_seen) {
        w.seen = shown == 0 ? PV_SEEN_NEVER : PV_SEEN_EXACT;
        w.last_seen_ms = shown;
    } else if (approx) {
        w.seen = shown == 0 ? PV_SEEN_LONG_AGO : ref_bucket(shown, now);
    }
    return w;
}

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

static pres_view_out_t decide(const pres_pol_t *t, const pres_truth_t *tr,
                              const pres_viewer_ctx_t *v)
{
    pres_view_out_t o;
    /* Garbage first: every field must be written. */
    memset(&o, 0xa5, sizeof o);
    pres__privacy_decide(t, tr, v, NOW, &o);
    return o;
}

static int same_view(const pres_view_out_t *a, const pres_view_out_t *b)
{
    return a->status == b->status && a->seen == b->seen
           && a->last_seen_ms == b->last_seen_ms && a->devices == b->devices;
}

static void describe(char *buf, size_t cap, const pres_pol_t *t, const pres_truth_t *tr,
                     const pres_viewer_ctx_t *v)
{
    const pres_pol_t *o = v->own;
    snprintf(buf, cap,
             "target{set %d ls %d on %d approx %d recip %d invis %d frozen %llu} "
             "truth{status %d dev %u seen %llu} "
             "viewer{sys %d self %d contact %d allow %d deny %d} "
             "own{%s set %d ls %d on %d recip %d}",
             t->set, t->last_seen, t->online, t->approximate, t->reciprocal, t->invisible,
             (unsigned long long)t->frozen_seen_ms, tr->status, tr->devices,
             (unsigned long long)tr->last_seen_ms, v->system, v->self, v->is_contact,
             v->in_allow, v->in_deny, o ? "yes" : "none", o ? o->set : 0,
             o ? o->last_seen : 0, o ? o->online : 0, o ? o->reciprocal : 0);
}

static void fail_view(const char *what, const pres_view_out_t *got, const pres_view_out_t *want,
                      const pres_pol_t *t, const pres_truth_t *tr, const pres_viewer_ctx_t *v)
{
    char buf[512];
    describe(buf, sizeof buf, t, tr, v);
    fail_msg("%s: got {status %d seen %d ms %llu dev %u}, want {status %d seen %d ms %llu "
             "dev %u} for %s", what, got->status, got->seen,
             (unsigned long long)got->last_seen_ms, got->devices, want->status, want->seen,
             (unsigned long long)want->last_seen_ms, want->devices, buf);
}

#define assert_view(o, st, sn, ms, dv) do {                                   \
        pres_view_out_t o_ = (o);                                             \
        assert_int_equal(o_.status, (st));                                    \
        assert_int_equal(o_.seen, (sn));                                      \
        assert_int_equal(o_.last_seen_ms, (ms));                              \
        assert_int_equal(o_.devices, (dv));                                   \
    } while (0)

static const pres_viewer_ctx_t STRANGER_V = { 0 };
static const pres_viewer_ctx_t CONTACT_V = { .is_contact = 1 };
static const pres_viewer_ctx_t SYSTEM_V = { .system = 1 };
static const pres_viewer_ctx_t SELF_V = { .self = 1 };

static pres_pol_t policy(int last_seen, int online)
{
    return (pres_pol_t){ .set = 1, .last_seen = last_seen, .online = online };
}

static const pres_truth_t ACTIVE_2 = { PV_ACTIVE_NOW, 2, NOW };
static const pres_truth_t NEVER_T = { PV_OFFLINE, 0, 0 };

/* ------------------------------------------------------------------------ */
/* Validation and buckets                                                    */

static void test_valid_every_value(void **state)
{
    (void)state;
    int n = 0;
    for (int ls = -1; ls <= 3; ls++)
        for (int on = -1; on <= 3; on++)
            for (int flags = 0; flags < 8; flags++) {
                int in_range = ls >= 0 && ls <= 2 && on >= 0 && on <= 2;
                int want = in_range && on <= ls ? 0 : -EINVAL;
                assert_int_equal(pres__privacy_valid(ls, on, flags & 1, (flags >> 1) & 1,
                                                     (flags >> 2) & 1), want);
                n++;
            }
    assert_int_equal(n, 5 * 5 * 8);
    /* The six valid pairs by name: online as wide as last seen, or wider. */
    assert_int_equal(pres__privacy_valid(PV_EVERYONE, PV_EVERYONE, 0, 0, 0), 0);
    assert_int_equal(pres__privacy_valid(PV_CONTACTS, PV_EVERYONE, 0, 0, 0), 0);
    assert_int_equal(pres__privacy_valid(PV_NOBODY, PV_EVERYONE, 0, 0, 0), 0);
    assert_int_equal(pres__privacy_valid(PV_CONTACTS, PV_CONTACTS, 0, 0, 0), 0);
    assert_int_equal(pres__privacy_valid(PV_NOBODY, PV_CONTACTS, 0, 0, 0), 0);
    assert_int_equal(pres__privacy_valid(PV_NOBODY, PV_NOBODY, 1, 1, 1), 0);
    /* Online narrower than last seen. */
    assert_int_equal(pres__privacy_valid(PV_EVERYONE, PV_CONTACTS, 0, 0, 0), -EINVAL);
    assert_int_equal(pres__privacy_valid(PV_EVERYONE, PV_NOBODY, 0, 0, 0), -EINVAL);
    assert_int_equal(pres__privacy_valid(PV_CONTACTS, PV_NOBODY, 0, 0, 0), -EINVAL);
    /* Far out of range, both ways. */
    assert_int_equal(pres__privacy_valid(INT32_MIN, 0, 0, 0, 0), -EINVAL);
    assert_int_equal(pres__privacy_valid(0, INT32_MAX, 0, 0, 0), -EINVAL);
}

static void test_bucket_boundaries(void **state)
{
    (void)state;
    static const struct { uint64_t t; int want; } cases[] = {
        { NOW,                       PV_SEEN_RECENTLY },
        { NOW - 1,                   PV_SEEN_RECENTLY },
        { NOW - 3 * DAY,             PV_SEEN_RECENTLY },
        { NOW - 3 * DAY - 1,         PV_SEEN_WEEK },
        { NOW - 7 * DAY,             PV_SEEN_WEEK },
        { NOW - 7 * DAY - 1,         PV_SEEN_MONTH },
        { NOW - 30 * DAY,            PV_SEEN_MONTH },
        { NOW - 30 * DAY - 1,        PV_SEEN_LONG_AGO },
        { NOW - 3650 * DAY,          PV_SEEN_LONG_AGO },
        { 1,                         PV_SEEN_LONG_AGO },
        { 0,                         PV_SEEN_NEVER },
        { NOW + 1,                   PV_SEEN_RECENTLY },   /* clock skew */
        { NOW + 40 * DAY,            PV_SEEN_RECENTLY },
        { UINT64_MAX,                PV_SEEN_RECENTLY },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int got = pres__privacy_bucket(cases[i].t, NOW);
        if (got != cases[i].want)
            fail_msg("bucket of now - %lld ms: %d, want %d",
                     (long long)(NOW - cases[i].t), got, cases[i].want);
        /* The reference agrees where its signed age is defined. */
        if (cases[i].t <= NOW + 40 * DAY)
            assert_int_equal(ref_bucket(cases[i].t, NOW), cases[i].want);
    }
    /* Near the epoch: no wrap-around of now - t. */
    assert_int_equal(pres__privacy_bucket(1, 2), PV_SEEN_RECENTLY);
    assert_int_equal(pres__privacy_bucket(5, 2), PV_SEEN_RECENTLY);
    assert_int_equal(pres__privacy_bucket(1, 3 * DAY + 1), PV_SEEN_RECENTLY);
    assert_int_equal(pres__privacy_bucket(1, 3 * DAY + 2), PV_SEEN_WEEK);
}

/* ------------------------------------------------------------------------ */
/* Every combination                                                         */

#define MAX_TARGETS 512
#define MAX_OWNS    32

/* Targets: with and without a policy (without one, the fields hold values
 * that must be ignored), each valid audience pair, each flag, and a frozen
 * last seen of never, recent and a month ago. */
static size_t all_targets(pres_pol_t *out)
{
    static const uint64_t frozen[] = { 0, NOW - 5 * HOUR, NOW - 31 * DAY };
    size_t n = 0;
    for (int set = 0; set <= 1; set++)
        for (int ls = PV_EVERYONE; ls <= PV_NOBODY; ls++)
            for (int on = PV_EVERYONE; on <= ls; on++)
                for (int flags = 0; flags < 8; flags++)
                    for (size_t f = 0; f < sizeof frozen / sizeof frozen[0]; f++)
                        out[n++] = (pres_pol_t){ set, ls, on, flags & 1, (flags >> 1) & 1,
                                                 (flags >> 2) & 1, frozen[f] };
    return n;
}

/* The viewer's own policy: none (NULL, first), one not set that would hide
 * everything if it were, and each valid pair with reciprocal off and on
 * (and the viewer's own approximate and invisible set, which must not
 * matter to what they see). */
static size_t all_owns(pres_pol_t *pols, const pres_pol_t **out)
{
    size_t n = 0, k = 0;
    out[n++] = NULL;
    pols[k] = (pres_pol_t){ 0, PV_NOBODY, PV_NOBODY, 1, 1, 1, 0 };
    out[n++] = &pols[k++];
    for (int ls = PV_EVERYONE; ls <= PV_NOBODY; ls++)
        for (int on = PV_EVERYONE; on <= ls; on++)
            for (int recip = 0; recip <= 1; recip++) {
                pols[k] = (pres_pol_t){ 1, ls, on, recip, recip, recip, NOW - DAY };
                out[n++] = &pols[k++];
            }
    return n;
}

/* Active and idle now, online within the grace (status held, no device),
 * offline days ago and months ago, and never connected. */
static const pres_truth_t TRUTHS[] = {
    { PV_ACTIVE_NOW, 3, NOW },
    { PV_IDLE_NOW,   1, NOW },
    { PV_IDLE_NOW,   0, NOW - 2000 },
    { PV_OFFLINE,    0, NOW - 5 * DAY },
    { PV_OFFLINE,    0, NOW - 90 * DAY },
    { PV_OFFLINE,    0, 0 },
};

typedef struct { long views, private, refused_online, refused_seen, buckets; } tally_t;

/* The promises that hold whatever the rules' details. */
static void check_invariants(const pres_view_out_t *o, const pres_pol_t *t,
                             const pres_truth_t *tr, const pres_viewer_ctx_t *v, tally_t *n)
{
    verdict_t ok = ref_verdict(t, v);
    int privacy = !(v->system || v->self);
    n->private += privacy;
    n->buckets += o->seen >= PV_SEEN_RECENTLY && o->seen <= PV_SEEN_LONG_AGO;
    if (o->seen != PV_SEEN_EXACT && o->last_seen_ms != 0)
        fail_view("a time without EXACT", o, o, t, tr, v);
    if (!ok.online) {
        n->refused_online++;
        if (o->status != PV_OFFLINE || o->devices != 0)
            fail_view("refused online, shown a status", o, o, t, tr, v);
    }
    if (!ok.last_seen) {
        n->refused_seen++;
        if (o->seen == PV_SEEN_EXACT || o->seen == PV_SEEN_NEVER || o->last_seen_ms != 0)
            fail_view("refused last seen, shown it", o, o, t, tr, v);
    }
    if (privacy && t->set && t->invisible && (o->status != PV_OFFLINE || o->devices != 0))
        fail_view("invisible, shown a status", o, o, t, tr, v);
    if (!privacy) {
        pres_view_out_t truth = { tr->status, tr->last_seen_ms ? PV_SEEN_EXACT : PV_SEEN_NEVER,
                                  tr->last_seen_ms, tr->devices };
        if (!same_view(o, &truth))
            fail_view("system or self, not the truth", o, &truth, t, tr, v);
    }
    /* The target's reciprocal is about what the target sees, not others. */
    pres_pol_t flipped = *t;
    flipped.reciprocal = !t->reciprocal;
    pres_view_out_t f = decide(&flipped, tr, v);
    if (!same_view(o, &f))
        fail_view("target's own reciprocal changed the view", &f, o, t, tr, v);
}

static void test_every_combination(void **state)
{
    (void)state;
    static pres_pol_t targets[MAX_TARGETS], own_pols[MAX_OWNS];
    const pres_pol_t *owns[MAX_OWNS];
    size_t n_targets = all_targets(targets);
    size_t n_owns = all_owns(own_pols, owns);
    size_t n_truths = sizeof TRUTHS / sizeof TRUTHS[0];
    assert_int_equal(n_targets, 2 * 6 * 8 * 3);
    assert_int_equal(n_owns, 2 + 6 * 2);

    tally_t n = { 0 };
    for (size_t ti = 0; ti < n_targets; ti++)
        for (size_t oi = 0; oi < n_owns; oi++)
            for (int bits = 0; bits < 32; bits++)
                for (size_t ri = 0; ri < n_truths; ri++) {
                    const pres_pol_t *t = &targets[ti];
                    const pres_truth_t *tr = &TRUTHS[ri];
                    pres_viewer_ctx_t v = { bits & 1, (bits >> 1) & 1, (bits >> 2) & 1,
                                            (bits >> 3) & 1, (bits >> 4) & 1, owns[oi] };
                    pres_view_out_t got = decide(t, tr, &v);
                    pres_view_out_t want = ref_view(t, tr, &v, NOW);
                    if (!same_view(&got, &want))
                        fail_view("differs from the reference", &got, &want, t, tr, &v);
                    check_invariants(&got, t, tr, &v, &n);
                    n.views++;
                }
    assert_int_equal(n.views, (long)(n_targets * n_owns * 32 * n_truths));
    print_message("privacy: %ld views checked (%ld by others), %ld refused online, "
                  "%ld refused last seen, %ld buckets\n",
                  n.views, n.private, n.refused_online, n.refused_seen, n.buckets);
    /* The space really holds refusals of both kinds and buckets, not only
     * admissions: a quarter of the views are by neither system nor self. */
    assert_int_equal(n.private, n.views / 4);
    assert_true(n.refused_online > n.private / 4);
    assert_true(n.refused_seen > n.refused_online);
    assert_true(n.buckets > n.refused_seen / 4);
}

/* ------------------------------------------------------------------------ */
/* Named scenarios, answers by hand                                          */

/* Telegram: last seen and online for contacts, strangers see "recently". */
static void test_contacts_only_approximate(void **state)
{
    (void)state;
    pres_pol_t t = policy(PV_CONTACTS, PV_CONTACTS);
    t.approximate = 1;
    pres_truth_t away = { PV_OFFLINE, 0, NOW - 2 * DAY };
    assert_view(decide(&t, &away, &CONTACT_V), PV_OFFLINE, PV_SEEN_EXACT, NOW - 2 * DAY, 0);
    assert_view(decide(&t, &away, &STRANGER_V), PV_OFFLINE, PV_SEEN_RECENTLY, 0, 0);
    assert_view(decide(&t, &ACTIVE_2, &CONTACT_V), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
    assert_view(decide(&t, &ACTIVE_2, &STRANGER_V), PV_OFFLINE, PV_SEEN_RECENTLY, 0, 0);
    pres_truth_t old = { PV_OFFLINE, 0, NOW - 10 * DAY };
    assert_view(decide(&t, &old, &STRANGER_V), PV_OFFLINE, PV_SEEN_MONTH, 0, 0);
    /* Without approximate the stranger sees nothing at all. */
    t.approximate = 0;
    assert_view(decide(&t, &away, &STRANGER_V), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    /* Online for everyone, last seen for contacts: the stranger sees
     * "online" while it lasts, never the time. */
    t = policy(PV_CONTACTS, PV_EVERYONE);
    assert_view(decide(&t, &ACTIVE_2, &STRANGER_V), PV_ACTIVE_NOW, PV_SEEN_HIDDEN, 0, 2);
}

/* WhatsApp: hiding my last seen hides everyone's from me. */
static void test_reciprocal(void **state)
{
    (void)state;
    pres_pol_t t = policy(PV_EVERYONE, PV_EVERYONE);
    pres_pol_t mine = policy(PV_NOBODY, PV_EVERYONE);
    mine.reciprocal = 1;
    pres_viewer_ctx_t v = { .is_contact = 1, .own = &mine };
    pres_truth_t away = { PV_OFFLINE, 0, NOW - 4 * DAY };
    assert_view(decide(&t, &away, &v), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    /* Online is a separate audience: still shown. */
    assert_view(decide(&t, &ACTIVE_2, &v), PV_ACTIVE_NOW, PV_SEEN_HIDDEN, 0, 2);
    /* The target's approximate decides bucket or HIDDEN. */
    t.approximate = 1;
    assert_view(decide(&t, &away, &v), PV_OFFLINE, PV_SEEN_WEEK, 0, 0);
    /* Hiding online too hides others' online. */
    mine.online = PV_NOBODY;
    assert_view(decide(&t, &ACTIVE_2, &v), PV_OFFLINE, PV_SEEN_RECENTLY, 0, 0);
    /* Without the reciprocal flag, hiding mine costs me nothing. */
    mine.reciprocal = 0;
    assert_view(decide(&t, &away, &v), PV_OFFLINE, PV_SEEN_EXACT, NOW - 4 * DAY, 0);
    /* Hidden from contacts only is not hidden from everybody: no effect. */
    mine = policy(PV_CONTACTS, PV_CONTACTS);
    mine.reciprocal = 1;
    assert_view(decide(&t, &ACTIVE_2, &v), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
    /* It applies to a target with no policy as well, never with a bucket. */
    mine = policy(PV_NOBODY, PV_NOBODY);
    mine.reciprocal = 1;
    pres_pol_t none = { .approximate = 1 };
    assert_view(decide(&none, &ACTIVE_2, &v), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    /* The target's own reciprocal says nothing about what others see. */
    pres_pol_t recip_target = policy(PV_EVERYONE, PV_EVERYONE);
    recip_target.reciprocal = 1;
    assert_view(decide(&recip_target, &away, &STRANGER_V), PV_OFFLINE, PV_SEEN_EXACT,
                NOW - 4 * DAY, 0);
}

static void test_reciprocal_beats_allow(void **state)
{
    (void)state;
    pres_pol_t t = policy(PV_NOBODY, PV_NOBODY);
    pres_pol_t mine = policy(PV_NOBODY, PV_NOBODY);
    mine.reciprocal = 1;
    pres_viewer_ctx_t v = { .is_contact = 1, .in_allow = 1, .own = &mine };
    assert_view(decide(&t, &ACTIVE_2, &v), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    t = policy(PV_EVERYONE, PV_EVERYONE);
    assert_view(decide(&t, &ACTIVE_2, &v), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    /* Once the viewer stops hiding their own, the allow list counts again. */
    mine.reciprocal = 0;
    t = policy(PV_NOBODY, PV_NOBODY);
    assert_view(decide(&t, &ACTIVE_2, &v), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
}

static void test_deny_beats_allow(void **state)
{
    (void)state;
    pres_pol_t t = policy(PV_EVERYONE, PV_EVERYONE);
    pres_viewer_ctx_t both = { .is_contact = 1, .in_allow = 1, .in_deny = 1 };
    assert_view(decide(&t, &ACTIVE_2, &both), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    /* A deny-listed viewer gets the bucket too when approximate is set. */
    t.approximate = 1;
    pres_truth_t away = { PV_OFFLINE, 0, NOW - 20 * DAY };
    assert_view(decide(&t, &away, &both), PV_OFFLINE, PV_SEEN_MONTH, 0, 0);
    pres_viewer_ctx_t denied = { .in_deny = 1 };
    assert_view(decide(&t, &ACTIVE_2, &denied), PV_OFFLINE, PV_SEEN_RECENTLY, 0, 0);
}

static void test_allow_overrides_nobody(void **state)
{
    (void)state;
    pres_pol_t t = policy(PV_NOBODY, PV_NOBODY);
    pres_viewer_ctx_t allowed = { .in_allow = 1 };
    assert_view(decide(&t, &ACTIVE_2, &allowed), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
    assert_view(decide(&t, &ACTIVE_2, &CONTACT_V), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    assert_view(decide(&t, &ACTIVE_2, &STRANGER_V), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    /* The allow list admits to NEVER as well: that is the truth it shows. */
    assert_view(decide(&t, &NEVER_T, &allowed), PV_OFFLINE, PV_SEEN_NEVER, 0, 0);
}

static void test_invisible_shows_frozen(void **state)
{
    (void)state;
    pres_pol_t t = policy(PV_EVERYONE, PV_EVERYONE);
    t.invisible = 1;
    t.frozen_seen_ms = NOW - 3 * HOUR;
    assert_view(decide(&t, &ACTIVE_2, &STRANGER_V), PV_OFFLINE, PV_SEEN_EXACT,
                NOW - 3 * HOUR, 0);
    pres_viewer_ctx_t allowed = { .is_contact = 1, .in_allow = 1 };
    assert_view(decide(&t, &ACTIVE_2, &allowed), PV_OFFLINE, PV_SEEN_EXACT, NOW - 3 * HOUR, 0);
    /* The frozen time is still the last seen audience's to refuse. */
    t.last_seen = PV_CONTACTS;
    t.approximate = 1;
    t.frozen_seen_ms = NOW - 8 * DAY;
    assert_view(decide(&t, &ACTIVE_2, &STRANGER_V), PV_OFFLINE, PV_SEEN_MONTH, 0, 0);
    assert_view(decide(&t, &ACTIVE_2, &CONTACT_V), PV_OFFLINE, PV_SEEN_EXACT, NOW - 8 * DAY, 0);
    /* Invisible before ever being seen: never, or long ago to the refused. */
    t.frozen_seen_ms = 0;
    assert_view(decide(&t, &ACTIVE_2, &CONTACT_V), PV_OFFLINE, PV_SEEN_NEVER, 0, 0);
    assert_view(decide(&t, &ACTIVE_2, &STRANGER_V), PV_OFFLINE, PV_SEEN_LONG_AGO, 0, 0);
    /* The user and the system see the truth. */
    assert_view(decide(&t, &ACTIVE_2, &SELF_V), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
    assert_view(decide(&t, &ACTIVE_2, &SYSTEM_V), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
    /* Turned off: the truth again. */
    t.invisible = 0;
    assert_view(decide(&t, &ACTIVE_2, &CONTACT_V), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
}

static void test_never_seen(void **state)
{
    (void)state;
    pres_pol_t t = policy(PV_CONTACTS, PV_CONTACTS);
    assert_view(decide(&t, &NEVER_T, &CONTACT_V), PV_OFFLINE, PV_SEEN_NEVER, 0, 0);
    assert_view(decide(&t, &NEVER_T, &STRANGER_V), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
    t.approximate = 1;
    assert_view(decide(&t, &NEVER_T, &STRANGER_V), PV_OFFLINE, PV_SEEN_LONG_AGO, 0, 0);
}

static void test_no_policy_everyone_sees(void **state)
{
    (void)state;
    /* Fields of an unset policy, lists included, are not read. */
    pres_pol_t none = { .set = 0, .last_seen = PV_NOBODY, .online = PV_NOBODY,
                        .approximate = 1, .invisible = 1, .frozen_seen_ms = 1 };
    pres_viewer_ctx_t denied = { .in_deny = 1 };
    assert_view(decide(&none, &ACTIVE_2, &STRANGER_V), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
    assert_view(decide(&none, &ACTIVE_2, &denied), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
    assert_view(decide(&none, &NEVER_T, &STRANGER_V), PV_OFFLINE, PV_SEEN_NEVER, 0, 0);
    /* A viewer's own policy that is not set is no reciprocity. */
    pres_pol_t mine = { .set = 0, .last_seen = PV_NOBODY, .online = PV_NOBODY,
                        .reciprocal = 1 };
    pres_viewer_ctx_t v = { .own = &mine };
    assert_view(decide(&none, &ACTIVE_2, &v), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
}

static void test_system_view_ignores_everything(void **state)
{
    (void)state;
    pres_pol_t t = policy(PV_NOBODY, PV_NOBODY);
    t.invisible = 1;
    t.approximate = 1;
    t.frozen_seen_ms = NOW - 40 * DAY;
    pres_pol_t mine = policy(PV_NOBODY, PV_NOBODY);
    mine.reciprocal = 1;
    pres_viewer_ctx_t sys = { .system = 1, .in_deny = 1, .own = &mine };
    assert_view(decide(&t, &ACTIVE_2, &sys), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
    assert_view(decide(&t, &NEVER_T, &sys), PV_OFFLINE, PV_SEEN_NEVER, 0, 0);
    /* Within the grace: the held status, as the store gives it. */
    pres_truth_t grace = { PV_IDLE_NOW, 0, NOW - 1500 };
    assert_view(decide(&t, &grace, &sys), PV_IDLE_NOW, PV_SEEN_EXACT, NOW - 1500, 0);
    pres_viewer_ctx_t self = { .self = 1, .in_deny = 1, .own = &mine };
    assert_view(decide(&t, &ACTIVE_2, &self), PV_ACTIVE_NOW, PV_SEEN_EXACT, NOW, 2);
}

/* A damaged audience value refuses rather than admits. */
static void test_out_of_range_fails_closed(void **state)
{
    (void)state;
    pres_pol_t t = policy(7, -3);
    assert_view(decide(&t, &ACTIVE_2, &CONTACT_V), PV_OFFLINE, PV_SEEN_HIDDEN, 0, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_every_value),
        cmocka_unit_test(test_bucket_boundaries),
        cmocka_unit_test(test_every_combination),
        cmocka_unit_test(test_contacts_only_approximate),
        cmocka_unit_test(test_reciprocal),
        cmocka_unit_test(test_reciprocal_beats_allow),
        cmocka_unit_test(test_deny_beats_allow),
        cmocka_unit_test(test_allow_overrides_nobody),
        cmocka_unit_test(test_invisible_shows_frozen),
        cmocka_unit_test(test_never_seen),
        cmocka_unit_test(test_no_policy_everyone_sees),
        cmocka_unit_test(test_system_view_ignores_everything),
        cmocka_unit_test(test_out_of_range_fails_closed),
    };
    return cmocka_run_group_tests_name("privacy", tests, NULL, NULL);
}
