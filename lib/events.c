/*
 * events.c - the change feed.
 */
#include "store.h"

void pres__ev_emit(pres_map_t *m, unsigned latch, int kind, int status,
                   const char *user, size_t ulen, const char *dev, size_t dlen,
                   const char *gw, size_t glen, const char *conv, size_t clen,
                   uint64_t at_ms)
{
    (void)m; (void)latch; (void)kind; (void)status; (void)user; (void)ulen; (void)dev;
    (void)dlen; (void)gw; (void)glen; (void)conv; (void)clen; (void)at_ms;
}
