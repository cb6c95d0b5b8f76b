/*
 * test_gp.c - grace periods and allocation, the two protocols under the
 * indexes, exercised directly (no daemon: the test plays its part).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "harness.h"
#include "store.h"

static char dir[256];
static const char *NAME = "gp";

static int make_store(void **state)
{
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/pres-gp-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    setenv("PRESENCE_SHM_DIR", dir, 1);
    pres_map_t m;
    pres_layout_params_t lp = { .dev_cap = 8, .user_cap = 8, .gw_cap = 4, .exceptions = 4,
                                .typing = 4, .events = 1024, .notes = 4,
                                .idle_after_ms = 1000, .offline_grace_ms = 1000,
                                .retain_ms = 1000 };
    if (pres__region_create(&m, NAME, &lp) < 0)
        return -1;
    pres__region_unmap(&m);
    return 0;
}

static int remove_store(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* A reader inside a section holds back exactly the grace periods that
 * started after its entry; leaving releases them; sections nest. */
static void test_section_holds_grace_period(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, NAME, PRES_RDONLY), 0);
    pres_map_t *m = &p->m;
    uint32_t active;
    assert_int_equal(pres__gp_min_active(m, &active), UINT64_MAX);
    assert_int_equal(active, 0);

    pres_rs_t *t = pres__gp_enter(p);
    assert_non_null(t);
    uint64_t e = pa_load(&m->rhdr->gp_epoch);
    assert_int_equal(pres__gp_min_active(m, &active), e);
    assert_int_equal(active, 1);
    uint64_t target = pres__gp_advance(m);
    assert_true(target > e);
    /* not passed: the reader's epoch is older than the target */
    assert_true(pres__gp_min_active(m, NULL) < target);

    pres_rs_t *t2 = pres__gp_enter(p);        /* nested: same slot, same epoch */
    assert_ptr_equal(t, t2);
    pres__gp_leave(t2);
    assert_true(pres__gp_min_active(m, NULL) < target);
    pres__gp_leave(t);
    assert_int_equal(pres__gp_min_active(m, &active), UINT64_MAX);

    /* A section entered after the advance does not hold it back. */
    t = pres__gp_enter(p);
    assert_true(pres__gp_min_active(m, NULL) >= target);
    pres__gp_leave(t);
    pres_close(p);
}

/* Closing a handle gives its reader slots back; a thread's slot goes back
 * when the thread exits. */
static void *reader_thread(void *arg)
{
    pres_t *p = arg;
    pres_device_info_t info;
    (void)pres_device(p, "nosuch", &info);
    return NULL;
}

static uint32_t slots_used(const pres_map_t *m)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++)
        n += pa_load(&m->rslots[i].owner) != 0;
    return n;
}

static void test_slots_released(void **state)
{
    (void)state;
    pres_t *p, *q;
    assert_int_equal(pres_open(&p, NAME, PRES_RDONLY), 0);
    assert_int_equal(pres_open(&q, NAME, PRES_RDONLY), 0);
    pres_device_info_t info;
    assert_int_equal(pres_device(p, "nosuch", &info), -ENOENT);
    assert_int_equal(slots_used(&q->m), 1);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, reader_thread, p), 0);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(slots_used(&q->m), 1);      /* the thread's went back */
    pres_close(p);
    assert_int_equal(slots_used(&q->m), 0);
    pres_close(q);
}

/* A child after fork() must not touch the parent's reader slot. */
static void test_fork_child_has_own_slot(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, NAME, PRES_RDONLY), 0);
    pres_device_info_t info;
    assert_int_equal(pres_device(p, "nosuch", &info), -ENOENT);
    uint64_t owner = 0;
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++)
        if (p->m.rslots[i].owner)
            owner = p->m.rslots[i].owner;
    pid_t pid = fork();
    if (pid == 0) {
        pres_t *c;
        if (pres_open(&c, NAME, PRES_RDONLY) != 0)
            _exit(1);
        pres_device_info_t i2;
        if (pres_device(c, "nosuch", &i2) != -ENOENT)
            _exit(2);
        pres_close(c);
        _exit(0);
    }
    assert_int_equal(th_wait_child(pid, 10000), 0);
    int still = 0;
    for (uint32_t i = 0; i < PRES_READER_SLOTS; i++)
        still |= p->m.rslots[i].owner == owner;
    assert_true(still);
    assert_int_equal(slots_used(&p->m), 1);
    pres_close(p);
}

/* The ring hands out every record once, names the taker in the slot, and
 * answers -ENOSPC when empty. */
static void test_ring_takes_each_once(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, NAME, PRES_RDWR), 0);
    pres_map_t *m = &p->m;
    uint8_t seen[8] = { 0 };
    for (int k = 0; k < 8; k++) {
        uint32_t i;
        assert_int_equal(pres__alloc_take(p, 0, &i), 0);
        assert_true(i < 8);
        assert_int_equal(seen[i]++, 0);
        assert_int_equal(m->devs[i].alloc, p->token);
        assert_int_equal(PRES_RING_OWNER1(m->ring[PRES_RK_DEV][k]), p->latch);
    }
    uint32_t i;
    assert_int_equal(pres__alloc_take(p, 0, &i), -ENOSPC);
    assert_int_equal(m->hdr->ring[PRES_RK_DEV].cons, 8);
    pres_close(p);
}

/* A full store answers -ENOSPC for new devices and keeps working. */
static void test_full_store(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, NAME, PRES_RDWR), 0);
    char id[16];
    int k;
    for (k = 0; k < 100; k++) {
        snprintf(id, sizeof id, "d%d", k);
        int rc = pres_connect(p, "u", id, "g", 10000, NULL);
        if (rc == -ENOSPC)
            break;
        assert_int_equal(rc, 0);
    }
    assert_int_equal(k, 8);
    assert_int_equal(pres_heartbeat(p, "d0", 10000), 0);
    assert_int_equal(pres_connect(p, "u", "d1", "g2", 10000, NULL), 0);   /* in place */
    pres_device_info_t info;
    assert_int_equal(pres_device(p, "d1", &info), 0);
    assert_string_equal(info.gateway_id, "g2");
    pres_close(p);
}

/* A child that claims a reader slot, reports its index, and stops. */
static int latch_child(int wfd)
{
    pres_t *c;
    if (pres_open(&c, NAME, PRES_RDWR) != 0)
        return 1;
    pres_device_info_t info;
    (void)pres_device(c, "nosuch", &info);      /* claims this thread's slot */
    uint32_t idx = pres__tls_rs[0].index;
    if (write(wfd, &idx, sizeof idx) != (ssize_t)sizeof idx)
        return 2;
    raise(SIGSTOP);
    for (;;)
        pause();
}

static void latch_as(pres_t *p, const char *id, uint32_t slot)
{
    int i = pres__idx_dev_find(&p->m, id, strlen(id),
                               pres__hash(id, strlen(id), p->m.seed));
    assert_true(i >= 0);
    uint64_t *live = &p->m.devs[i].live;
    *live = (*live & ~(~(uint64_t)0 << 50)) | ((uint64_t)(slot + 1) << 50);
}

/* The latch protocol with another writer in the middle of a change: a
 * stopped holder is alive (writes that need the latch answer -EBUSY, a
 * connect supersedes the record, an on-time heartbeat and every read go
 * on); a dead holder's latch is taken over. */
static void test_latch_holder_stopped_then_dead(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, NAME, PRES_RDWR), 0);
    assert_int_equal(pres_connect(p, "u", "dev", "g1", 60000, NULL), 0);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(latch_child(fds[1]));
    uint32_t slot;
    assert_int_equal(read(fds[0], &slot, sizeof slot), (ssize_t)sizeof slot);
    int st;
    assert_int_equal(waitpid(pid, &st, WUNTRACED), pid);
    assert_true(WIFSTOPPED(st));

    latch_as(p, "dev", slot);
    assert_int_equal(pres_disconnect(p, "dev"), -EBUSY);
    assert_int_equal(pres_heartbeat(p, "dev", 50000), -EBUSY);   /* a new TTL */
    assert_int_equal(pres_heartbeat(p, "dev", 60000), 0);        /* on time */
    pres_device_info_t info;
    assert_int_equal(pres_device(p, "dev", &info), 0);
    assert_int_equal(info.connected, 1);
    assert_string_equal(info.gateway_id, "g1");
    /* A connect does not wait: a new record supersedes the latched one. */
    assert_int_equal(pres_connect(p, "u", "dev", "g2", 60000, NULL), 0);
    assert_int_equal(pres_device(p, "dev", &info), 0);
    assert_string_equal(info.gateway_id, "g2");

    latch_as(p, "dev", slot);
    kill(pid, SIGKILL);
    assert_int_equal(th_wait_child(pid, 10000), 128 + SIGKILL);
    /* Dead now: the next writer takes the latch over. */
    assert_int_equal(pres_disconnect(p, "dev"), 0);
    assert_int_equal(pres_device(p, "dev", &info), 0);
    assert_int_equal(info.connected, 0);
    close(fds[0]);
    close(fds[1]);
    pres_close(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_section_holds_grace_period, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_slots_released, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_fork_child_has_own_slot, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_ring_takes_each_once, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_full_store, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_latch_holder_stopped_then_dead, make_store,
                                        remove_store),
    };
    return cmocka_run_group_tests_name("gp", tests, NULL, NULL);
}
