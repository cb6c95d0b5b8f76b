/*
 * region.c - naming, creating, mapping and validating a store's files.
 *
 * Everything read from the files is untrusted (property 7): the header's
 * magic, format, sizes and every area's bounds are checked here before any
 * other code follows an offset, and the files themselves must be regular,
 * not world-writable, and owned by this user (or root).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "atomics.h"
#include "clock.h"
#include "region.h"

const char *pres__region_dir(void)
{
    const char *d = getenv("PRESENCE_SHM_DIR");
    return d && *d ? d : "/dev/shm";
}

int pres__region_name_ok(const char *name)
{
    size_t n = 0;
    if (!name || name[0] == '\0' || name[0] == '.')
        return 0;
    for (const char *c = name; *c; c++, n++) {
        if (n >= 63)
            return 0;
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
              (*c >= '0' && *c <= '9') || *c == '.' || *c == '_' || *c == '-'))
            return 0;
    }
    return 1;
}

const char *pres__region_default_name(const char *name)
{
    if (name)
        return name;
    const char *e = getenv("PRESENCE_NAME");
    return e && *e ? e : "default";
}

int pres__region_path(char *out, size_t cap, const char *name, const char *suffix)
{
    int n = snprintf(out, cap, "%s/presence.%s%s", pres__region_dir(), name,
                     suffix ? suffix : "");
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : 0;
}

/* Read /proc/PID/stat: *state gets field 3, the return value field 22 (the
 * start time in clock ticks since boot).  0 when the process is gone. */
static uint64_t proc_stat(int pid, char *state)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    /* The command name may hold spaces and parentheses: fields are counted
     * from the last ')'.  Field 3 (state) follows it; start time is 22. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return 0;
    *state = p[2];
    int field = 2;
    for (; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
}

uint64_t pres__proc_start(int pid)
{
    char st = 0;
    return proc_stat(pid, &st);
}

/* A process whose first thread exited (pthread_exit) shows that thread as
 * a zombie while its other threads run: alive while any task is not. */
static int group_alive(int pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *dir = opendir(path);
    if (!dir)
        return 0;
    int alive = 0;
    struct dirent *e;
    while (!alive && (e = readdir(dir)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char tpath[320], buf[512];
        snprintf(tpath, sizeof tpath, "/proc/%d/task/%s/stat", pid, e->d_name);
        int fd = open(tpath, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = '\0';
        char *p = strrchr(buf, ')');
        if (p && p[1] == ' ' && p[2] != 'Z' && p[2] != 'X')
            alive = 1;
    }
    closedir(dir);
    return alive;
}

int pres__proc_state(int pid, uint64_t start)
{
    char st = 0;
    if (pid <= 0)
        return 0;
    uint64_t s = proc_stat(pid, &st);
    if (s == 0)
        return 0;                        /* no such process */
    if (start != 0 && s != start)
        return 0;                        /* the pid was reused */
    if (st == 'X')
        return 0;
    if (st == 'Z')
        return group_alive(pid);         /* the leader exited; others may not */
    return st == 'T' || st == 't' ? 2 : 1;
}

int pres__proc_alive(int pid, uint64_t start)
{
    return pres__proc_state(pid, start) != 0;
}

int pres__boot_id(char out[40])
{
    memset(out, 0, 40);
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, out, 36);
    close(fd);
    return n == 36 ? 0 : -EIO;
}

int64_t pres__timens_mono_s(void)
{
    /* In a time namespace CLOCK_MONOTONIC is shifted: a client whose
     * monotonic clock differs from the creator's would misjudge every
     * expiry, so the offset is part of the store's identity. */
    FILE *f = fopen("/proc/self/timens_offsets", "re");
    if (!f)
        return 0;
    char name[32];
    long long s, ns;
    int64_t off = 0;
    while (fscanf(f, "%31s %lld %lld", name, &s, &ns) == 3)
        if (strcmp(name, "monotonic") == 0)
            off = s;
    fclose(f);
    return off;
}

/* Open one of the store's files: no symlinks, a regular file, never
 * world-writable, owned by us or by root. */
static int open_checked(const char *path, int oflags, struct stat *st)
{
    int fd = open(path, oflags | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return -ENOENT;
        if (errno == ELOOP)
            return -EACCES;
        return errno == EACCES || errno == EPERM ? -EACCES : -errno;
    }
    if (fstat(fd, st) < 0 || !S_ISREG(st->st_mode)) {
        close(fd);
        return -EPROTO;
    }
    if ((st->st_mode & S_IWOTH) || (st->st_uid != geteuid() && st->st_uid != 0)) {
        close(fd);
        return -EACCES;
    }
    return fd;
}

/* Element sizes, fixed by the format. */
static const uint64_t area_esize[PRES_AREA_COUNT] = {
    8, 8, sizeof(pres_gw_t), sizeof(pres_dev_t), sizeof(pres_user_t),
    sizeof(pres_exc_t), sizeof(pres_typ_t), 8, sizeof(pres_event_slot_t), 8,
    8, 8, 8, 8,
};

static int pow2(uint64_t n)
{
    return n != 0 && (n & (n - 1)) == 0;
}

static int area_ok(const pres_area_t *a, uint64_t expect_size, uint64_t file_size)
{
    if (a->size != expect_size || a->off % PRES_PAGE != 0 || a->off < PRES_HDR_SIZE)
        return 0;
    if (a->count > (UINT64_C(1) << 40) / (expect_size ? expect_size : 1))
        return 0;
    return a->off + a->count * a->size <= file_size;
}

int pres__region_validate(const pres_map_t *m, uint64_t size, uint64_t rsize)
{
    const pres_hdr_t *h = m->hdr;
    const pres_rhdr_t *r = m->rhdr;
    if (size < PRES_HDR_SIZE || h->magic != PRES_MAGIC || h->format != PRES_FORMAT ||
        h->hdr_size != PRES_HDR_SIZE || h->file_size != size ||
        h->areas_count != PRES_AREA_COUNT || pa_load_acquire(&h->ready) != 1)
        return -EPROTO;
    for (int i = 0; i < PRES_AREA_COUNT; i++)
        if (!area_ok(&h->area[i], area_esize[i], size))
            return -EPROTO;
    uint64_t db = h->area[PRES_AREA_DEV_BUCKETS].count;
    uint64_t ub = h->area[PRES_AREA_USER_BUCKETS].count;
    uint64_t tb = h->area[PRES_AREA_TYP_BUCKETS].count;
    uint64_t dc = h->area[PRES_AREA_DEVICES].count;
    uint64_t uc = h->area[PRES_AREA_USERS].count;
    uint64_t gc = h->area[PRES_AREA_GATEWAYS].count;
    uint64_t xc = h->area[PRES_AREA_EXCEPTIONS].count;
    uint64_t tc = h->area[PRES_AREA_TYPING].count;
    if (!pow2(db) || !pow2(ub) || !pow2(tb) || !pow2(gc) ||
        !pow2(h->area[PRES_AREA_EVENTS].count) || !pow2(h->area[PRES_AREA_NOTES].count) ||
        h->area[PRES_AREA_EVENTS].count < PRES_EVENTS_MIN ||
        dc == 0 || dc > PRES_DEV_CAP_MAX || uc == 0 || uc > PRES_USER_CAP_MAX ||
        gc > PRES_GW_CAP_MAX || xc == 0 || xc > PRES_USER_CAP_MAX ||
        tc == 0 || tc > PRES_USER_CAP_MAX)
        return -EPROTO;
    const uint64_t caps[PRES_RK_COUNT] = { dc, uc, xc, tc };
    for (int k = 0; k < PRES_RK_COUNT; k++) {
        uint64_t rc = h->area[PRES_AREA_DEV_RING + k].count;
        if (rc < caps[k] || !pow2(rc))
            return -EPROTO;
    }

    if (rsize < PRES_HDR_SIZE || r->magic != PRES_READERS_MAGIC ||
        r->format != PRES_FORMAT || r->hdr_size != PRES_HDR_SIZE ||
        r->file_size != rsize || r->instance != h->instance ||
        r->clients != PRES_CLIENTS || r->reader_slots != PRES_READER_SLOTS ||
        r->off_clients % PRES_PAGE || r->off_readers % PRES_PAGE ||
        r->off_clients < PRES_HDR_SIZE ||
        r->off_clients + (uint64_t)PRES_CLIENTS * sizeof(pres_client_t) > r->off_readers ||
        r->off_readers + (uint64_t)PRES_READER_SLOTS * sizeof(pres_rslot_t) > rsize)
        return -EPROTO;
    return 0;
}

static void map_pointers(pres_map_t *m)
{
    pres_hdr_t *h = m->hdr;
#define AREA(type, a) ((type *)(m->base + h->area[a].off))
    m->dev_buckets = AREA(uint64_t, PRES_AREA_DEV_BUCKETS);
    m->user_buckets = AREA(uint64_t, PRES_AREA_USER_BUCKETS);
    m->typ_buckets = AREA(uint64_t, PRES_AREA_TYP_BUCKETS);
    m->gws = AREA(pres_gw_t, PRES_AREA_GATEWAYS);
    m->devs = AREA(pres_dev_t, PRES_AREA_DEVICES);
    m->users = AREA(pres_user_t, PRES_AREA_USERS);
    m->excs = AREA(pres_exc_t, PRES_AREA_EXCEPTIONS);
    m->typs = AREA(pres_typ_t, PRES_AREA_TYPING);
    m->events = AREA(pres_event_slot_t, PRES_AREA_EVENTS);
    m->notes = AREA(uint64_t, PRES_AREA_NOTES);
    for (int k = 0; k < PRES_RK_COUNT; k++) {
        uint64_t n = h->area[PRES_AREA_DEV_RING + k].count;
        m->ring[k] = AREA(uint64_t, PRES_AREA_DEV_RING + k);
        m->rmask[k] = n - 1;
        m->rshift[k] = (unsigned)__builtin_ctzll(n);
    }
#undef AREA
    m->dev_mask = h->area[PRES_AREA_DEV_BUCKETS].count - 1;
    m->user_mask = h->area[PRES_AREA_USER_BUCKETS].count - 1;
    m->typ_mask = h->area[PRES_AREA_TYP_BUCKETS].count - 1;
    m->ev_mask = h->area[PRES_AREA_EVENTS].count - 1;
    m->note_mask = h->area[PRES_AREA_NOTES].count - 1;
    m->dev_cap = (uint32_t)h->area[PRES_AREA_DEVICES].count;
    m->user_cap = (uint32_t)h->area[PRES_AREA_USERS].count;
    m->gw_cap = (uint32_t)h->area[PRES_AREA_GATEWAYS].count;
    m->exc_cap = (uint32_t)h->area[PRES_AREA_EXCEPTIONS].count;
    m->typ_cap = (uint32_t)h->area[PRES_AREA_TYPING].count;
    m->rcap[PRES_RK_DEV] = m->dev_cap;
    m->rcap[PRES_RK_USER] = m->user_cap;
    m->rcap[PRES_RK_EXC] = m->exc_cap;
    m->rcap[PRES_RK_TYP] = m->typ_cap;
    m->seed = h->hash_seed;
    m->clients = (pres_client_t *)(m->rbase + m->rhdr->off_clients);
    m->rslots = (pres_rslot_t *)(m->rbase + m->rhdr->off_readers);
}

void pres__region_unmap(pres_map_t *m)
{
    if (m->base)
        munmap(m->base, m->size);
    if (m->rbase)
        munmap(m->rbase, m->rsize);
    memset(m, 0, sizeof *m);
}

static int map_once(pres_map_t *m, const char *name, int rdwr)
{
    char path[PATH_MAX], rpath[PATH_MAX];
    struct stat st, rst;
    int rc;

    if ((rc = pres__region_path(path, sizeof path, name, NULL)) < 0 ||
        (rc = pres__region_path(rpath, sizeof rpath, name, ".readers")) < 0)
        return rc;
    int fd = open_checked(path, rdwr ? O_RDWR : O_RDONLY, &st);
    if (fd < 0)
        return fd;
    int rfd = open_checked(rpath, O_RDWR, &rst);
    if (rfd < 0) {
        close(fd);
        return rfd == -ENOENT ? -EPROTO : rfd;
    }
    rc = -EPROTO;
    if (st.st_size < (off_t)PRES_HDR_SIZE || rst.st_size < (off_t)PRES_HDR_SIZE)
        goto out;
    m->size = (size_t)st.st_size;
    m->rsize = (size_t)rst.st_size;
    m->base = mmap(NULL, m->size, PROT_READ | (rdwr ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
    if (m->base == MAP_FAILED) {
        m->base = NULL;
        rc = -errno;
        goto out;
    }
    m->rbase = mmap(NULL, m->rsize, PROT_READ | PROT_WRITE, MAP_SHARED, rfd, 0);
    if (m->rbase == MAP_FAILED) {
        m->rbase = NULL;
        rc = -errno;
        goto out;
    }
    m->hdr = (pres_hdr_t *)m->base;
    m->rhdr = (pres_rhdr_t *)m->rbase;
    if ((rc = pres__region_validate(m, m->size, m->rsize)) < 0)
        goto out;
    char boot[40];
    if (pres__boot_id(boot) == 0 && memcmp(boot, m->hdr->boot_id, 36) != 0) {
        rc = -EPROTO;            /* made before a reboot: not our clock */
        goto out;
    }
    if (pres__timens_mono_s() != m->hdr->timens_mono_s) {
        rc = -EPROTO;            /* another time namespace's clock */
        goto out;
    }
    map_pointers(m);
    rc = 0;
out:
    close(fd);
    close(rfd);
    if (rc < 0)
        pres__region_unmap(m);
    return rc;
}

int pres__region_map(pres_map_t *m, const char *name, int rdwr)
{
    int rc = -EPROTO;
    memset(m, 0, sizeof *m);
    /* The daemon publishes the readers file first and the records file
     * last, each by rename: a client racing a daemon that replaces a
     * damaged store may pair an old file with a new one.  The instance ids
     * then differ; trying again settles it. */
    for (int i = 0; i < 3 && rc == -EPROTO; i++)
        rc = map_once(m, name, rdwr);
    return rc;
}

/* ---- creation (daemon) ---------------------------------------------------- */

static uint64_t page_up(uint64_t x)
{
    return (x + PRES_PAGE - 1) & ~(uint64_t)(PRES_PAGE - 1);
}

static uint64_t pow2_at_least(uint64_t x)
{
    uint64_t p = 1;
    while (p < x)
        p <<= 1;
    return p;
}

static int create_file(const char *path, uint64_t size)
{
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0660);
    if (fd < 0)
        return -errno;
    /* The umask may have taken the group bits away: the store is meant to
     * be shared by the group, and never by the world. */
    if (fchmod(fd, 0660) < 0 || ftruncate(fd, (off_t)size) < 0) {
        int e = -errno;
        close(fd);
        unlink(path);
        return e;
    }
    return fd;
}

static void layout(pres_hdr_t *h, const pres_layout_params_t *lp)
{
    const uint64_t counts[PRES_AREA_COUNT] = {
        pow2_at_least(lp->dev_cap), pow2_at_least(lp->user_cap), lp->gw_cap,
        lp->dev_cap, lp->user_cap, lp->exceptions, lp->typing,
        pow2_at_least(lp->typing), pow2_at_least(lp->events), pow2_at_least(lp->notes),
        pow2_at_least(lp->dev_cap), pow2_at_least(lp->user_cap),
        pow2_at_least(lp->exceptions), pow2_at_least(lp->typing),
    };
    uint64_t off = PRES_HDR_SIZE;
    for (int i = 0; i < PRES_AREA_COUNT; i++) {
        h->area[i].off = off;
        h->area[i].count = counts[i];
        h->area[i].size = area_esize[i];
        off = page_up(off + counts[i] * area_esize[i]);
    }
    h->file_size = off;
}

static void init_records(pres_map_t *m)
{
    /* Each bucket starts as the nulls marker naming itself. */
    for (uint64_t i = 0; i <= m->dev_mask; i++)
        m->dev_buckets[i] = PRES_LINK_NULLS(i);
    for (uint64_t i = 0; i <= m->user_mask; i++)
        m->user_buckets[i] = PRES_LINK_NULLS(i);
    for (uint64_t i = 0; i <= m->typ_mask; i++)
        m->typ_buckets[i] = PRES_LINK_NULLS(i);
    for (uint32_t i = 0; i < m->dev_cap; i++)
        m->devs[i].gen = 1;
    for (uint32_t i = 0; i < m->user_cap; i++)
        m->users[i].gen = 1;
    for (uint32_t i = 0; i < m->typ_cap; i++)
        m->typs[i].gen = 1;
    /* Every record starts free and offered in its ring (lap 0), so clients
     * can connect even before the daemon's first pass, or without it. */
    for (int k = 0; k < PRES_RK_COUNT; k++) {
        for (uint32_t i = 0; i < m->rcap[k]; i++)
            m->ring[k][i] = PRES_RING_MAKE(i, 0, 0);
        m->hdr->prod[k] = m->rcap[k];
    }
    m->hdr->ev_next = 1;
}

int pres__region_create(pres_map_t *m, const char *name, const pres_layout_params_t *lp)
{
    return pres__region_create_filled(m, name, lp, NULL, NULL);
}

int pres__region_create_filled(pres_map_t *m, const char *name, const pres_layout_params_t *lp,
                               int (*fill)(pres_map_t *m, void *ctx), void *ctx)
{
    char path[PATH_MAX], rpath[PATH_MAX], tmp[PATH_MAX], rtmp[PATH_MAX];
    pres_hdr_t h0;
    int rc, fd = -1, rfd = -1;

    memset(m, 0, sizeof *m);
    if (lp->dev_cap == 0 || lp->dev_cap > PRES_DEV_CAP_MAX || lp->user_cap == 0 ||
        lp->user_cap > PRES_USER_CAP_MAX || lp->gw_cap == 0 ||
        lp->gw_cap > PRES_GW_CAP_MAX || (lp->gw_cap & (lp->gw_cap - 1)) ||
        lp->exceptions == 0 || lp->exceptions > PRES_USER_CAP_MAX ||
        lp->typing == 0 || lp->typing > PRES_USER_CAP_MAX || lp->events < PRES_EVENTS_MIN ||
        lp->events > (UINT64_C(1) << 30) || lp->notes == 0 || lp->notes > (UINT64_C(1) << 30))
        return -EINVAL;
    if ((rc = pres__region_path(path, sizeof path, name, NULL)) < 0 ||
        (rc = pres__region_path(rpath, sizeof rpath, name, ".readers")) < 0)
        return rc;
    char suffix[32], rsuffix[40];
    snprintf(suffix, sizeof suffix, ".tmp.%d", (int)getpid());
    snprintf(rsuffix, sizeof rsuffix, ".readers.tmp.%d", (int)getpid());
    if ((rc = pres__region_path(tmp, sizeof tmp, name, suffix)) < 0 ||
        (rc = pres__region_path(rtmp, sizeof rtmp, name, rsuffix)) < 0)
        return rc;
    unlink(tmp);
    unlink(rtmp);

    memset(&h0, 0, sizeof h0);
    layout(&h0, lp);
    uint64_t off_clients = PRES_HDR_SIZE;
    uint64_t off_readers = page_up(off_clients + (uint64_t)PRES_CLIENTS * sizeof(pres_client_t));
    uint64_t rsize = page_up(off_readers + (uint64_t)PRES_READER_SLOTS * sizeof(pres_rslot_t));

    if ((fd = create_file(tmp, h0.file_size)) < 0) {
        rc = fd;
        goto fail;
    }
    if ((rfd = create_file(rtmp, rsize)) < 0) {
        rc = rfd;
        goto fail;
    }
    m->size = h0.file_size;
    m->rsize = rsize;
    m->base = mmap(NULL, m->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    m->rbase = mmap(NULL, m->rsize, PROT_READ | PROT_WRITE, MAP_SHARED, rfd, 0);
    if (m->base == MAP_FAILED || m->rbase == MAP_FAILED) {
        rc = -errno;
        if (m->base == MAP_FAILED)
            m->base = NULL;
        if (m->rbase == MAP_FAILED)
            m->rbase = NULL;
        goto fail;
    }
    m->hdr = (pres_hdr_t *)m->base;
    m->rhdr = (pres_rhdr_t *)m->rbase;
    pres_hdr_t *h = m->hdr;
    memcpy(h, &h0, sizeof h0);
    uint64_t inst = 0;
    while (inst == 0)
        if (getrandom(&inst, sizeof inst, 0) != sizeof inst)
            inst = pres__wall_ms() ^ ((uint64_t)getpid() << 40);
    if (getrandom(&h->hash_seed, sizeof h->hash_seed, 0) != sizeof h->hash_seed)
        h->hash_seed = inst * UINT64_C(0x9e3779b97f4a7c15);
    h->magic = PRES_MAGIC;
    h->format = PRES_FORMAT;
    h->hdr_size = PRES_HDR_SIZE;
    h->instance = inst;
    h->areas_count = PRES_AREA_COUNT;
    pres__boot_id(h->boot_id);
    h->timens_mono_s = pres__timens_mono_s();
    h->created_wall_ms = pres__wall_ms();
    h->wall_offset_ms = (int64_t)h->created_wall_ms - (int64_t)pres__mono_ms();
    h->idle_after_ms = lp->idle_after_ms;
    h->offline_grace_ms = lp->offline_grace_ms;
    h->retain_ms = lp->retain_ms;
    if (lp->db_dir)
        snprintf(h->db_dir, sizeof h->db_dir, "%s", lp->db_dir);

    pres_rhdr_t *r = m->rhdr;
    r->magic = PRES_READERS_MAGIC;
    r->format = PRES_FORMAT;
    r->hdr_size = PRES_HDR_SIZE;
    r->file_size = rsize;
    r->instance = inst;
    r->clients = PRES_CLIENTS;
    r->reader_slots = PRES_READER_SLOTS;
    r->off_clients = off_clients;
    r->off_readers = off_readers;
    r->gp_epoch = 1;

    map_pointers(m);
    init_records(m);
    if (fill && (rc = fill(m, ctx)) < 0)
        goto fail;
    pa_store_release(&h->ready, 1);
    /* Publish: readers file first, records file last, each by an atomic
     * rename, so a client that opens the records file finds everything. */
    if (rename(rtmp, rpath) < 0 || rename(tmp, path) < 0) {
        rc = -errno;
        unlink(rpath);
        goto fail;
    }
    close(fd);
    close(rfd);
    return 0;
fail:
    if (fd >= 0) {
        close(fd);
        unlink(tmp);
    }
    if (rfd >= 0) {
        close(rfd);
        unlink(rtmp);
    }
    pres__region_unmap(m);
    return rc;
}
