/*
 * policy.h - privacy policies as the store holds them (pres__policy_):
 * the user's policy word and the block of exception entries it names.
 * lib/policy.c writes them (pres_set_privacy) and reads them for
 * pres_user; presenced reclaims replaced blocks and `presencectl check`
 * verifies them through the same walk.  See doc/region.md, "Privacy".
 */
#ifndef PRES_POLICY_H
#define PRES_POLICY_H

#include "privacy.h"
#include "store.h"

/* The quick-reject hash of an exception entry's key (a seed apart from the
 * indexes', so that a list's hashes say nothing of a chain's). */
static inline uint32_t pres__exc_hash(const pres_map_t *m, const char *key, size_t len)
{
    return (uint32_t)pres__hash(key, len, m->seed ^ UINT64_C(0x70726976616379));
}

/* The entries of the block that policy word w names, HEAD first, into idx
 * (room for PRES_PV_BLOCK_MAX); *n gets their count (0: w names none).
 * Checks what a reader relies on: every index in range, a HEAD first, then
 * n_allow ALLOW and n_deny DENY entries (each count at most
 * PRES_EXCEPTIONS_MAX), the last ending the list.  Call inside a read
 * section (or as the daemon).  0 or -EPROTO. */
PRES_HIDDEN int pres__policy_block(const pres_map_t *m, uint64_t w, uint32_t *idx, size_t *n);

/* What a viewer's view depends on in policy word w: its flags and frozen
 * last seen into *pol, and whether the viewer (key vkey of vlen bytes,
 * hash vhash) is on its allow and deny lists.  vkey NULL: the lists are
 * not read (a viewer's own policy matters only by its flags).  Call inside
 * a read section.  0 or -EPROTO. */
PRES_HIDDEN int pres__policy_read(const pres_map_t *m, uint64_t w, const char *vkey,
                                  size_t vlen, uint32_t vhash, pres_pol_t *pol,
                                  int *in_allow, int *in_deny);

#endif /* PRES_POLICY_H */
