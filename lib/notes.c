/*
 * notes.c - change notes: which records the daemon should look at again.
 *
 * Writers that change something the daemon must act on without polling
 * (a connect, a disconnect, a new TTL, an idle device becoming active, a
 * privacy policy, typing) write the record's index into the note ring.  The
 * daemon reads it every tick to keep the LMDB mirror and its timers (expiry
 * events, status changes, typing TTLs) up to date.
 *
 * Protocol.  A writer takes a position with one fetch-and-add on note_head
 * and stores the note there with a release store; the note carries the lap
 * of its position, so the daemon can tell a note of this lap from one of
 * the previous lap (not yet written: the writer is between its two steps,
 * or was killed there) and from one of a later lap (the ring overflowed
 * and the note it wanted was overwritten).  Writers never wait and never
 * fail: a note that is lost, by overflow or by a writer killed between its
 * two steps, makes the daemon sweep every record instead (the notes are an
 * optimisation of a full scan, never the only way a change is found).
 *
 * Barriers: the release store orders the record's changes before the note,
 * so the daemon, reading the note with an acquire load, sees the change
 * (or a later one) when it looks at the record.
 */
#include "store.h"

void pres__note(pres_map_t *m, unsigned kind, uint32_t idx)
{
    uint64_t pos = pa_fetch_add(&m->hdr->note_head, 1);
    unsigned shift = (unsigned)__builtin_ctzll(m->note_mask + 1);
    pa_store_release(&m->notes[pos & m->note_mask],
                     PRES_NOTE_MAKE(kind, idx, (uint32_t)(pos >> shift)));
}
