/*
 * atomics.h - the one vocabulary for words shared between processes.
 *
 * Every word of the region that more than one process (or thread) may touch
 * at once is read and written through these macros, never with plain C
 * accesses: they are the GCC/Clang __atomic builtins, which operate on plain
 * uint64_t fields of a mapping (a C11 _Atomic object cannot be placed in a
 * region another process laid out), which ThreadSanitizer understands, and
 * which offer acquire/release (liburcu 0.13's uatomic has no acquire loads).
 * All shared words are naturally aligned and at most 8 bytes, so every
 * operation is lock-free on every architecture we build for (a 16-byte CAS
 * may silently fall back to a process-local lock: we never use one).
 *
 * Naming: pa_ = "presence atomic".  Each use says, at its call site, which
 * reordering it prevents.
 */
#ifndef PRES_ATOMICS_H
#define PRES_ATOMICS_H

#include <stdint.h>

_Static_assert(__atomic_always_lock_free(8, 0), "8-byte atomics must be lock-free");

/* A load that only needs to be untorn: no ordering with other accesses. */
#define pa_load(p)            __atomic_load_n((p), __ATOMIC_RELAXED)
/* A load whose later loads must see what the storer published before its
 * release store (pairs with pa_store_release or a CAS). */
#define pa_load_acquire(p)    __atomic_load_n((p), __ATOMIC_ACQUIRE)
/* A load in the single total order of seq_cst operations: after a seq_cst
 * RMW of another word, the pair is a Dekker handshake without a fence (on
 * x86 a plain load). */
#define pa_load_sc(p)         __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define pa_store(p, v)        __atomic_store_n((p), (v), __ATOMIC_RELAXED)
/* A store that publishes every store before it (pairs with acquire loads). */
#define pa_store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* Compare-and-swap: on success, a full barrier (acq_rel + the total order
 * of seq_cst), so it both publishes what was written before it and orders
 * what is read after it; on failure *expected is refreshed with acquire. */
#define pa_cas(p, expected, desired) \
    __atomic_compare_exchange_n((p), (expected), (desired), 0, \
                                __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)

/* Read-modify-write with a full barrier. */
#define pa_fetch_add(p, v)    __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
#define pa_exchange(p, v)     __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)
/* A counter bump that orders nothing (statistics). */
#define pa_add_relaxed(p, v)  ((void)__atomic_fetch_add((p), (v), __ATOMIC_RELAXED))

/* Full fence: no load after it may be satisfied before every store before
 * it is visible (the store->load order that Dekker-style handshakes need,
 * e.g. a reader publishing its epoch before reading the index). */
#define pa_fence()            __atomic_thread_fence(__ATOMIC_SEQ_CST)
/* Loads before it are ordered before loads and stores after it. */
#define pa_fence_acquire()    __atomic_thread_fence(__ATOMIC_ACQUIRE)
/* Loads and stores before it are ordered before stores after it. */
#define pa_fence_release()    __atomic_thread_fence(__ATOMIC_RELEASE)

static inline void pa_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

#endif /* PRES_ATOMICS_H */
