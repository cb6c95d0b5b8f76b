/*
 * feedcheck.c - a watcher that checks the change feed (see feedcheck.h).
 */
#include "feedcheck.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "harness.h"

__attribute__((format(printf, 2, 3)))
static int bad(fc_t *f, const char *fmt, ...)
{
    if (f->errors++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(f->err, sizeof f->err, fmt, ap);
        va_end(ap);
    }
    return -1;
}

void fc_init(fc_t *f, uint64_t start)
{
    /* next is read by others meanwhile (writers pacing themselves). */
    memset((char *)f + offsetof(fc_t, first), 0, sizeof *f - offsetof(fc_t, first));
    __atomic_store_n(&f->next, start, __ATOMIC_RELAXED);
    f->first = start;
    f->hash = UINT64_C(0xcbf29ce484222325);
}

static uint64_t mix(uint64_t h, uint64_t v)
{
    return (h ^ v) * UINT64_C(0x100000001b3);
}

static uint64_t mix_str(uint64_t h, const char *s)
{
    for (; *s; s++)
        h = mix(h, (unsigned char)*s);
    return mix(h, 0xff);
}

/* "d<w>_<n>": w and n, or -1. */
static int parse_dev(const char *d, unsigned *w, unsigned *n)
{
    int end = -1;
    if (sscanf(d, "d%u_%u%n", w, n, &end) != 2 || end < 0 || d[end] || *w >= FC_WRITERS)
        return -1;
    return 0;
}

static int check_device_event(fc_t *f, const pres_event_t *e, uint64_t *count)
{
    unsigned w, n, uw, un;
    char gw[32];
    int end = -1;
    if (parse_dev(e->device_id, &w, &n) < 0)
        return bad(f, "seq %llu: device '%s' was never written", (unsigned long long)e->seq,
                   e->device_id);
    snprintf(gw, sizeof gw, "g%u", w);
    if (strcmp(e->gateway_id, gw) != 0)
        return bad(f, "seq %llu: device %s on gateway '%s', expected %s",
                   (unsigned long long)e->seq, e->device_id, e->gateway_id, gw);
    if (sscanf(e->user_id, "u%u_%u%n", &uw, &un, &end) != 2 || end < 0 || e->user_id[end] ||
        uw != w || un != n % FC_USERS)
        return bad(f, "seq %llu: device %s of user '%s'", (unsigned long long)e->seq,
                   e->device_id, e->user_id);
    if (e->conversation_id[0] || e->status)
        return bad(f, "seq %llu: a device event with conversation or status",
                   (unsigned long long)e->seq);
    count[w]++;
    return 0;
}

int fc_event(fc_t *f, const pres_event_t *e)
{
    if (e->seq != f->next)
        return bad(f, "seq %llu read where %llu was expected", (unsigned long long)e->seq,
                   (unsigned long long)f->next);
    /* Atomic: writers pacing themselves on watchers read it. */
    __atomic_store_n(&f->next, f->next + 1, __ATOMIC_RELAXED);
    f->events++;
    f->hash = mix(f->hash, e->seq);
    f->hash = mix(f->hash, (uint64_t)e->kind);
    f->hash = mix(f->hash, (uint64_t)e->status);
    f->hash = mix(f->hash, e->at_ms);
    f->hash = mix_str(f->hash, e->user_id);
    f->hash = mix_str(f->hash, e->device_id);
    f->hash = mix_str(f->hash, e->gateway_id);
    f->hash = mix_str(f->hash, e->conversation_id);
    switch (e->kind) {
    case PRES_EV_CONNECT:
        return check_device_event(f, e, f->connects);
    case PRES_EV_DISCONNECT:
        return check_device_event(f, e, f->disconnects);
    case PRES_EV_EXPIRE:
        return check_device_event(f, e, f->expires);
    case PRES_EV_USER_STATUS: {
        unsigned w, k;
        int end = -1;
        f->statuses++;
        if (sscanf(e->user_id, "u%u_%u%n", &w, &k, &end) != 2 || end < 0 ||
            e->user_id[end] || w >= FC_WRITERS || k >= FC_USERS)
            return bad(f, "seq %llu: status of user '%s', never written",
                       (unsigned long long)e->seq, e->user_id);
        if (e->device_id[0] || e->gateway_id[0] || e->conversation_id[0] ||
            e->status < PRES_OFFLINE || e->status > PRES_ACTIVE_NOW)
            return bad(f, "seq %llu: a status event with device '%s', gateway '%s', status %d",
                       (unsigned long long)e->seq, e->device_id, e->gateway_id, e->status);
        return 0;
    }
    case PRES_EV_LOST:
        if (f->lost < FC_LOST_MAX)
            f->lost_seq[f->lost] = e->seq;
        f->lost++;
        if (e->user_id[0] || e->device_id[0] || e->gateway_id[0] || e->conversation_id[0])
            return bad(f, "seq %llu: a lost event with ids", (unsigned long long)e->seq);
        return 0;
    default:
        return bad(f, "seq %llu: kind %d", (unsigned long long)e->seq, e->kind);
    }
}

int fc_watch(const char *name, int flags, uint64_t start, volatile uint64_t *stop,
             volatile uint64_t *until, int give_up_ms, fc_t *f)
{
    pres_t *p = NULL;
    int rc = pres_open(&p, name, flags);
    if (rc != 0)
        return rc;
    fc_init(f, start);
    uint64_t cur = start, waiting_since = th_now_ns();
    for (;;) {
        if (__atomic_load_n(stop, __ATOMIC_ACQUIRE)) {
            uint64_t u = __atomic_load_n(until, __ATOMIC_ACQUIRE);
            if (u && cur >= u)
                break;
        }
        pres_event_t e;
        rc = pres_watch(p, &cur, &e, 20);
        uint64_t now = th_now_ns();
        if (rc == -ETIMEDOUT) {
            /* Waiting is a stall only while seq cur has been claimed. */
            pres_stats_t st;
            if (pres_stats(p, &st) != 0 || st.events < cur)
                waiting_since = now;
            else if (now - waiting_since > f->longest_wait_ns)
                f->longest_wait_ns = now - waiting_since;
            if (f->longest_wait_ns > (uint64_t)give_up_ms * 1000000u) {
                bad(f, "waited %llu ms at seq %llu with later seqs claimed",
                    (unsigned long long)(f->longest_wait_ns / 1000000), (unsigned long long)cur);
                break;
            }
            continue;
        }
        waiting_since = now;
        if (rc == -EOVERFLOW) {
            f->overflows++;
            __atomic_store_n(&f->next, cur, __ATOMIC_RELAXED);
            continue;
        }
        if (rc != 0)
            break;
        fc_event(f, &e);
    }
    pres_close(p);
    return rc == -ETIMEDOUT || rc == 0 ? 0 : rc;
}
