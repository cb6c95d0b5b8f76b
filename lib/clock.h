/*
 * clock.h - the two clocks of a store.
 *
 * TTLs and expiries use CLOCK_MONOTONIC_COARSE: the same clock in every
 * process of the host (the daemon checks the time namespace at attach), a
 * few nanoseconds to read through the vDSO instead of ~25 ns for
 * CLOCK_MONOTONIC, and its ~4 ms resolution is far below any TTL that makes
 * sense.  Wall-clock time is used only for what is shown and stored.
 */
#ifndef PRES_CLOCK_H
#define PRES_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t pres__mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static inline uint64_t pres__wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A monotonic instant as wall time, relative to a pair read together. */
static inline uint64_t pres__mono_to_wall(uint64_t mono, uint64_t now_mono,
                                          uint64_t now_wall)
{
    if (mono >= now_mono)
        return now_wall + (mono - now_mono);
    return now_wall > now_mono - mono ? now_wall - (now_mono - mono) : 0;
}

#endif /* PRES_CLOCK_H */
