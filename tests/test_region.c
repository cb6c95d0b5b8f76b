/*
 * test_region.c - the region's files: creation, validation of untrusted
 * bytes, permissions, read-only mapping, and damage (property 6, 7).
 *
 * The store is made directly with pres__region_create (no daemon needed:
 * clients work without one), then damaged in place; each damage must give
 * -EPROTO (or -EACCES) from pres_open or from a lookup, never a crash or a
 * hang, and presencectl must exit 3.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "harness.h"
#include "store.h"

static char dir[256];
static const char *NAME = "rt";

static void path_of(char *out, size_t cap, const char *suffix)
{
    snprintf(out, cap, "%s/presence.%s%s", dir, NAME, suffix);
}

static int make_store(void **state)
{
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/pres-region-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    setenv("PRESENCE_SHM_DIR", dir, 1);
    pres_map_t m;
    pres_layout_params_t lp = { .dev_cap = 64, .user_cap = 64, .gw_cap = 16,
                                .exceptions = 16, .typing = 16, .events = 1024, .notes = 16,
                                .idle_after_ms = 1000, .offline_grace_ms = 1000,
                                .retain_ms = 100000 };
    if (pres__region_create(&m, NAME, &lp) < 0)
        return -1;
    pres__region_unmap(&m);
    return 0;
}

static int remove_store(void **state)
{
    (void)state;
    char p[512];
    path_of(p, sizeof p, "");
    unlink(p);
    path_of(p, sizeof p, ".readers");
    unlink(p);
    path_of(p, sizeof p, ".lnk");
    unlink(p);
    rmdir(dir);
    return 0;
}

/* Map the records file for damaging it. */
static uint8_t *map_raw(size_t *size)
{
    char p[512];
    path_of(p, sizeof p, "");
    int fd = open(p, O_RDWR);
    assert_true(fd >= 0);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    *size = (size_t)st.st_size;
    uint8_t *b = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    assert_true(b != MAP_FAILED);
    return b;
}

static int ctl_status(const char *cmd)
{
    char line[1024];
    snprintf(line, sizeof line, "PRESENCE_SHM_DIR=%s %s/presencectl --name %s %s >/dev/null 2>&1",
             dir, th_build_dir(), NAME, cmd);
    int rc = system(line);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static void test_fresh_store_opens(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, NAME, PRES_RDWR), 0);
    pres_stats_t s;
    assert_int_equal(pres_stats(p, &s), 0);
    assert_int_equal(s.capacity, 64);
    /* Without a daemon, clients still connect and read. */
    assert_int_equal(pres_connect(p, "u", "d", "g", 10000, NULL), 0);
    pres_device_info_t info;
    assert_int_equal(pres_device(p, "d", &info), 0);
    assert_int_equal(info.connected, 1);
    pres_close(p);
    assert_int_equal(ctl_status("check"), 0);

    char path[512];
    struct stat st;
    path_of(path, sizeof path, "");
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0660);
    path_of(path, sizeof path, ".readers");
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0660);
}

/* Each damage: a function that breaks the header, and the expected error. */
static void expect_open_fails(int expect)
{
    pres_t *p = NULL;
    assert_int_equal(pres_open(&p, NAME, PRES_RDONLY), expect);
    assert_null(p);
    assert_int_equal(ctl_status("stats"), 3);
}

static void test_bad_magic(void **state)
{
    (void)state;
    size_t n;
    uint8_t *b = map_raw(&n);
    ((pres_hdr_t *)b)->magic = __builtin_bswap64(PRES_MAGIC);   /* other byte order */
    expect_open_fails(-EPROTO);
    munmap(b, n);
}

static void test_wrong_format(void **state)
{
    (void)state;
    size_t n;
    uint8_t *b = map_raw(&n);
    ((pres_hdr_t *)b)->format = PRES_FORMAT + 1;
    expect_open_fails(-EPROTO);
    munmap(b, n);
}

static void test_truncated(void **state)
{
    (void)state;
    char p[512];
    path_of(p, sizeof p, "");
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(truncate(p, st.st_size / 2), 0);
    expect_open_fails(-EPROTO);
    assert_int_equal(truncate(p, 100), 0);       /* shorter than a header */
    expect_open_fails(-EPROTO);
}

static void test_area_out_of_range(void **state)
{
    (void)state;
    size_t n;
    uint8_t *b = map_raw(&n);
    pres_hdr_t *h = (pres_hdr_t *)b;
    h->area[PRES_AREA_DEVICES].count = UINT64_C(1) << 40;
    expect_open_fails(-EPROTO);
    h->area[PRES_AREA_DEVICES].count = 64;
    h->area[PRES_AREA_DEVICES].off = n;           /* past the end */
    expect_open_fails(-EPROTO);
    munmap(b, n);
}

static void test_other_boot(void **state)
{
    (void)state;
    size_t n;
    uint8_t *b = map_raw(&n);
    memcpy(((pres_hdr_t *)b)->boot_id, "00000000-0000-0000-0000-000000000000", 36);
    expect_open_fails(-EPROTO);
    munmap(b, n);
}

static void test_not_ready(void **state)
{
    (void)state;
    size_t n;
    uint8_t *b = map_raw(&n);
    ((pres_hdr_t *)b)->ready = 0;                 /* a creator killed mid-way */
    expect_open_fails(-EPROTO);
    munmap(b, n);
}

/* A process in a time namespace with another monotonic clock would misjudge
 * every expiry: it is refused (presencectl exits 3), while the same command
 * with a zero offset is accepted. */
static int ctl_in_timens(long offset_s)
{
    char line[1024];
    snprintf(line, sizeof line,
             "PRESENCE_SHM_DIR=%s unshare --fork --time --monotonic %ld "
             "%s/presencectl --name %s stats >/dev/null 2>&1",
             dir, offset_s, th_build_dir(), NAME);
    int rc = system(line);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static void test_other_time_namespace(void **state)
{
    (void)state;
    if (system("unshare --fork --time --monotonic 1 true >/dev/null 2>&1") != 0)
        skip();               /* no time namespaces here (kernel or privileges) */
    assert_int_equal(ctl_in_timens(0), 0);
    assert_int_equal(ctl_in_timens(100000), 3);
}

static void test_readers_mismatch(void **state)
{
    (void)state;
    char p[512];
    path_of(p, sizeof p, ".readers");
    int fd = open(p, O_RDWR);
    assert_true(fd >= 0);
    uint64_t bogus = 12345;
    assert_int_equal(pwrite(fd, &bogus, sizeof bogus, offsetof(pres_rhdr_t, instance)),
                     (ssize_t)sizeof bogus);
    close(fd);
    expect_open_fails(-EPROTO);
}

static void test_missing_store(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, "nosuchstore", PRES_RDONLY), -ENOENT);
    assert_int_equal(pres_open(&p, ".hidden", PRES_RDONLY), -EINVAL);
    assert_int_equal(pres_open(&p, "bad/name", PRES_RDONLY), -EINVAL);
}

/* Connect devices that share a bucket, then damage a chain. */
static uint32_t connect_two_in_one_bucket(pres_t *p, char ids[2][16])
{
    const pres_map_t *m = &p->m;
    uint64_t want = UINT64_MAX;
    int got = 0;
    for (int k = 0; got < 2 && k < 10000; k++) {
        char id[16];
        snprintf(id, sizeof id, "dev%d", k);
        uint64_t b = pres__hash(id, strlen(id), m->seed) & m->dev_mask;
        if (want == UINT64_MAX || b == want) {
            want = b;
            assert_int_equal(pres_connect(p, "u", id, "g", 60000, NULL), 0);
            strcpy(ids[got++], id);
        }
    }
    assert_int_equal(got, 2);
    return (uint32_t)want;
}

static void test_cycle_in_chain(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, NAME, PRES_RDWR), 0);
    char ids[2][16];
    uint32_t b = connect_two_in_one_bucket(p, ids);
    /* The head record's next points back at itself: a cycle. */
    uint64_t head = p->m.dev_buckets[b];
    p->m.devs[PRES_LINK_IDX(head)].next = head;
    pres_device_info_t info;
    /* ids[0] was inserted first, so it sits behind the head: unreachable
     * through the cycle, and the walk must stop. */
    assert_int_equal(pres_device(p, ids[0], &info), -EPROTO);
    assert_int_equal(pres_heartbeat(p, ids[0], 1000), -EPROTO);
    assert_int_not_equal(ctl_status("check"), 0);
    assert_int_equal(ctl_status("check"), 3);
    pres_close(p);
}

static void test_link_out_of_range(void **state)
{
    (void)state;
    pres_t *p;
    assert_int_equal(pres_open(&p, NAME, PRES_RDWR), 0);
    char ids[2][16];
    uint32_t b = connect_two_in_one_bucket(p, ids);
    uint64_t head = p->m.dev_buckets[b];
    p->m.devs[PRES_LINK_IDX(head)].next = PRES_LINK(1u << 30, 1);
    pres_device_info_t info;
    assert_int_equal(pres_device(p, ids[0], &info), -EPROTO);
    /* A user list that leaves the table: route refuses it too. */
    uint32_t u = p->m.devs[PRES_LINK_IDX(head)].user;
    p->m.users[u].dhead = PRES_LINK(99999, 1);
    pres_device_info_t out[4];
    size_t n;
    assert_int_equal(pres_route(p, "u", out, 4, &n), -EPROTO);
    assert_int_equal(ctl_status("check"), 3);
    pres_close(p);
}

static void test_world_writable_refused(void **state)
{
    (void)state;
    char p[512];
    path_of(p, sizeof p, "");
    assert_int_equal(chmod(p, 0666), 0);
    pres_t *h;
    assert_int_equal(pres_open(&h, NAME, PRES_RDONLY), -EACCES);
    assert_int_equal(chmod(p, 0660), 0);
    assert_int_equal(pres_open(&h, NAME, PRES_RDONLY), 0);
    pres_close(h);
}

static void test_foreign_owner_refused(void **state)
{
    (void)state;
    if (geteuid() != 0)
        skip();               /* only root can give a file away */
    char p[512];
    path_of(p, sizeof p, "");
    assert_int_equal(chown(p, 65534, 65534), 0);
    pres_t *h;
    assert_int_equal(pres_open(&h, NAME, PRES_RDONLY), -EACCES);
    assert_int_equal(chown(p, 0, 0), 0);
}

static void test_symlink_refused(void **state)
{
    (void)state;
    char p[512], lnk[512];
    path_of(p, sizeof p, "");
    path_of(lnk, sizeof lnk, ".lnk");
    assert_int_equal(rename(p, lnk), 0);
    assert_int_equal(symlink(lnk, p), 0);
    pres_t *h;
    assert_int_equal(pres_open(&h, NAME, PRES_RDONLY), -EACCES);
    unlink(p);
    assert_int_equal(rename(lnk, p), 0);
}

/* A read-only handle maps the records read-only: a stray write of the
 * calling program faults instead of damaging a record. */
static void test_rdonly_mapping_faults(void **state)
{
    (void)state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        pres_t *h;
        if (pres_open(&h, NAME, PRES_RDONLY) != 0)
            _exit(2);
        signal(SIGSEGV, SIG_DFL);
        volatile uint64_t *w = (volatile uint64_t *)&h->m.devs[0].live;
        *w = 42;                                   /* must fault */
        _exit(0);
    }
    int st = th_wait_child(pid, 10000);
    assert_int_equal(st, 128 + SIGSEGV);

    pres_t *h;
    assert_int_equal(pres_open(&h, NAME, PRES_RDONLY), 0);
    assert_int_equal(pres_connect(h, "u", "d", "g", 1000, NULL), -EROFS);
    assert_int_equal(pres_report_stale(h, "nosuch"), -ENOENT);
    pres_close(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_fresh_store_opens, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_bad_magic, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_wrong_format, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_truncated, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_area_out_of_range, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_other_boot, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_not_ready, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_readers_mismatch, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_other_time_namespace, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_missing_store, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_cycle_in_chain, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_link_out_of_range, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_world_writable_refused, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_foreign_owner_refused, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_symlink_refused, make_store, remove_store),
        cmocka_unit_test_setup_teardown(test_rdonly_mapping_faults, make_store, remove_store),
    };
    return cmocka_run_group_tests_name("region", tests, NULL, NULL);
}
