/*
 * liveness.c - which client processes are alive, on the kernel's word.
 *
 * A client slot names a pid and the process's start time.  The daemon opens
 * a pidfd for it (checking the start time after opening, so a pid reused
 * before we got there is caught) and polls all pidfds without blocking:
 * a pidfd becomes readable when its process exits, zombie or not.  Where
 * pidfd_open is not available it falls back to /proc/PID/stat (state and
 * start time).  A process that is stopped or traced is alive: nothing here
 * ever decides on a timeout.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "atomics.h"
#include "daemon.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

static int pidfd_open(pid_t pid)
{
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

void pd_clients_init(pd_t *d)
{
    for (uint32_t i = 0; i < PRES_CLIENTS; i++) {
        d->cl[i].pidfd = -1;
        d->cl[i].alive = 0;
        d->cl[i].pid = 0;
    }
}

static void untrack(pd_client_t *c)
{
    if (c->pidfd >= 0)
        close(c->pidfd);
    c->pidfd = -1;
    c->alive = 0;
    c->pid = 0;
}

/* Start tracking the process now in slot i.  Returns 0 if it is dead. */
static int track(pd_client_t *c, uint64_t pid, uint64_t start, uint64_t gen)
{
    c->pid = pid;
    c->start = start;
    c->gen = gen;
    c->pidfd = pidfd_open((pid_t)pid);
    /* After opening: the pidfd refers to whatever process has the pid now,
     * so confirm it is the one that claimed the slot. */
    c->alive = pres__proc_alive((int)pid, start);
    if (!c->alive && c->pidfd >= 0) {
        close(c->pidfd);
        c->pidfd = -1;
    }
    return c->alive;
}

void pd_clients_poll(pd_t *d, void (*gone)(pd_t *, const pd_gone_t *, size_t, int))
{
    pres_map_t *m = &d->m;
    struct pollfd pfd[PRES_CLIENTS];
    uint32_t who[PRES_CLIENTS];
    nfds_t n = 0;

    for (uint32_t i = 1; i < PRES_CLIENTS; i++) {
        pres_client_t *s = &m->clients[i];
        pd_client_t *c = &d->cl[i];
        uint64_t pid = pa_load_acquire(&s->pid);
        uint64_t gen = pa_load(&s->gen);
        if (c->pid && (pid != c->pid || gen != c->gen)) {
            /* The client we tracked closed its handle (and the slot may
             * already serve another): sweep what it may have left. */
            pd_gone_t g = { i, PRES_TOKEN(i, c->gen) };
            untrack(c);
            gone(d, &g, 1, 0);
        }
        if (!pid)
            continue;
        if (!pa_load_acquire(&s->ready) && c->pid != pid) {
            /* Claimed, start time not yet written (or a tracked client
             * half-way through closing: its pidfd decides below): only a
             * vanished pid is certain. */
            if (kill((pid_t)pid, 0) < 0 && errno == ESRCH) {
                pa_store(&s->gen, gen + 1);
                uint64_t exp = pid;
                if (pa_cas(&s->pid, &exp, 0))
                    pd_log(LOG_INFO, "client slot %u: pid %llu died while attaching", i,
                           (unsigned long long)pid);
            }
            continue;
        }
        if (!c->pid && !track(c, pid, pa_load(&s->start), gen)) {
            c->pid = pid;
            c->gen = gen;
            who[n] = i;
            pfd[n].fd = -1;
            pfd[n].revents = POLLIN;      /* dead already */
            pfd[n++].events = 0;
            continue;
        }
        who[n] = i;
        pfd[n].fd = c->pidfd;
        pfd[n].events = POLLIN;
        pfd[n++].revents = 0;
    }
    int have_fds = 0;
    for (nfds_t k = 0; k < n; k++)
        have_fds |= pfd[k].fd >= 0;
    if (have_fds) {
        /* revents of fd -1 entries are cleared by poll: keep the verdict. */
        short keep[PRES_CLIENTS];
        for (nfds_t k = 0; k < n; k++)
            keep[k] = pfd[k].fd < 0 ? pfd[k].revents : 0;
        poll(pfd, n, 0);
        for (nfds_t k = 0; k < n; k++)
            if (pfd[k].fd < 0)
                pfd[k].revents = keep[k];
    }
    /* All the dead of this poll are repaired together: one scan of the
     * records however many died at once. */
    pd_gone_t dead_list[PRES_CLIENTS];
    uint64_t dead_pid[PRES_CLIENTS];
    size_t nd = 0;
    for (nfds_t k = 0; k < n; k++) {
        uint32_t i = who[k];
        pd_client_t *c = &d->cl[i];
        int dead = (pfd[k].revents & (POLLIN | POLLHUP)) != 0;
        if (!dead && c->pidfd < 0 && c->alive)
            dead = !pres__proc_alive((int)c->pid, c->start);  /* no pidfd */
        if (!dead)
            continue;
        dead_list[nd] = (pd_gone_t){ i, PRES_TOKEN(i, c->gen) };
        dead_pid[nd++] = c->pid;
        pd_log(LOG_INFO, "client %u (pid %llu) is dead", i, (unsigned long long)c->pid);
        untrack(c);
    }
    if (!nd)
        return;
    gone(d, dead_list, nd, 1);
    for (size_t k = 0; k < nd; k++) {
        /* Free the slot for others, unless it was reused meanwhile. */
        pres_client_t *s = &m->clients[dead_list[k].client];
        if (pa_load(&s->pid) == dead_pid[k]) {
            pa_store(&s->ready, 0);
            pa_store(&s->gen, pa_load(&s->gen) + 1);
            uint64_t exp = dead_pid[k];
            pa_cas(&s->pid, &exp, 0);
        }
    }
}

/* A client not tracked yet (it attached after our last poll) counts as
 * alive: every verdict of death must come from the kernel. */
int pd_client_live(const pd_t *d, uint32_t client)
{
    if (client >= PRES_CLIENTS)
        return 0;
    if (client == PRES_DAEMON_CLIENT || d->cl[client].alive)
        return 1;
    return pa_load(&d->m.clients[client].pid) != 0;
}

int pd_token_live(const pd_t *d, uint64_t token)
{
    uint32_t i = PRES_TOKEN_CLIENT(token);
    uint64_t g = (token >> 32) & 0xffffu;
    if (i >= PRES_CLIENTS)
        return 0;
    if (i == PRES_DAEMON_CLIENT)
        return 1;
    const pd_client_t *c = &d->cl[i];
    if (c->alive && (c->gen & 0xffffu) == g)
        return 1;
    /* Not (yet) tracked under this generation: a client that attached
     * since our last poll.  Live while its slot says so. */
    const pres_client_t *s = &d->m.clients[i];
    return pa_load(&s->pid) != 0 && (pa_load(&s->gen) & 0xffffu) == g;
}
