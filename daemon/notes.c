/*
 * notes.c - reading the change notes clients write (see lib/notes.c).
 *
 * Each tick the daemon reads the notes written since the last one into
 * d->nb, for the mirror and the timers.  A note it cannot read (the ring
 * overflowed, or a position stayed unwritten for a whole tick: its writer
 * was killed between taking the position and writing it, or is stopped
 * there) is lost: the daemon then asks every consumer to sweep all records
 * (d->resync), which finds whatever the lost note would have named.
 */
#include <stdlib.h>

#include "atomics.h"
#include "daemon.h"
#include "store.h"

static int nb_push(pd_t *d, unsigned kind, uint32_t idx)
{
    if (d->nb_n == d->nb_cap) {
        size_t nc = d->nb_cap ? d->nb_cap * 2 : 4096;
        pd_note_t *a = realloc(d->nb, nc * sizeof *a);
        if (!a)
            return -1;
        d->nb = a;
        d->nb_cap = nc;
    }
    d->nb[d->nb_n++] = (pd_note_t){ kind, idx };
    return 0;
}

static void lost(pd_t *d, const char *why)
{
    pd_log(LOG_DEBUG, "change notes lost (%s): sweeping", why);
    pa_add_relaxed(&d->m.hdr->dc.notes_lost, 1);
    d->resync = PD_RESYNC_ALL;
}

void pd_notes_read(pd_t *d)
{
    pres_map_t *m = &d->m;
    uint64_t size = m->note_mask + 1;
    unsigned shift = (unsigned)__builtin_ctzll(size);
    uint64_t head = pa_load_acquire(&m->hdr->note_head);
    uint64_t tail = d->note_tail;
    d->nb_n = 0;
    if (head - tail > size) {
        lost(d, "overflow");
        tail = head - size;
    }
    while (tail < head) {
        uint64_t s = pa_load_acquire(&m->notes[tail & m->note_mask]);
        uint32_t lap = (uint32_t)(tail >> shift);
        if (PRES_NOTE_LAP(s) != lap || PRES_NOTE_KIND(s) == 0) {
            if (PRES_NOTE_KIND(s) != 0 && (uint32_t)(PRES_NOTE_LAP(s) - lap) < 0x80000000u) {
                lost(d, "overwritten");          /* a later lap's: overflow */
                tail++;
                continue;
            }
            /* Not written yet: its writer is between its two steps.  Wait
             * a tick for it, then give the note up. */
            if (d->note_wait != tail) {
                d->note_wait = tail;
                break;
            }
            lost(d, "unwritten");
            tail++;
            continue;
        }
        uint32_t idx = PRES_NOTE_IDX(s);
        unsigned kind = PRES_NOTE_KIND(s);
        if (nb_push(d, kind, idx) < 0) {
            lost(d, "out of memory");
            tail = head;
            break;
        }
        tail++;
    }
    d->note_tail = tail;
    pa_store(&m->hdr->note_tail, tail);
}
