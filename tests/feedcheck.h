/*
 * feedcheck.h - a watcher that checks the change feed, for the tests with
 * many writers (test_events_mp, test_events_mt, test_events_crash).
 *
 * Writers name what they write so that every event can be checked on its
 * own: writer w's devices are "d<w>_<n>", each of user "u<w>_<n % 7>", on
 * gateway "g<w>".  A watcher checks that seqs come strictly one after the
 * other with no gap (an overflow is counted apart: it is the one gap the
 * feed may tell of), that each event's fields agree with that scheme, and
 * counts the events of each writer; watchers that read the same seqs end
 * with the same hash.
 */
#ifndef PRES_TEST_FEEDCHECK_H
#define PRES_TEST_FEEDCHECK_H

#include <stdint.h>
#include "presence.h"

#define FC_WRITERS 64       /* writer numbers w < FC_WRITERS */
#define FC_USERS   7
#define FC_LOST_MAX 1024

typedef struct {
    uint64_t next;                    /* the seq expected next (first: it
                                         is read by others meanwhile) */
    uint64_t first;                   /* the first seq read */
    uint64_t events, lost, statuses, overflows;
    uint64_t connects[FC_WRITERS], disconnects[FC_WRITERS], expires[FC_WRITERS];
    uint64_t hash;
    uint64_t longest_wait_ns;         /* longest time at one cursor while
                                         later seqs had been claimed */
    uint64_t errors;
    char     err[256];                /* the first error */
    uint64_t lost_seq[FC_LOST_MAX];   /* the first lost seqs read */
} fc_t;

void fc_init(fc_t *f, uint64_t start);

/* Check one event read at cursor f->next; 0, or -1 (counted in errors). */
int  fc_event(fc_t *f, const pres_event_t *e);

/*
 * Watch the feed of store `name` from seq `start` with a handle opened
 * `flags`, checking every event, until *stop is set and the cursor has
 * reached *until (a seq, set by the caller once writers are done; 0: not
 * yet), or until a wait at one cursor exceeds give_up_ms.  Returns 0, or
 * a negative errno from pres_open / pres_watch.
 */
int  fc_watch(const char *name, int flags, uint64_t start, volatile uint64_t *stop,
              volatile uint64_t *until, int give_up_ms, fc_t *f);

#endif /* PRES_TEST_FEEDCHECK_H */
