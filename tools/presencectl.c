/*
 * presencectl - inspect a presence store.
 *
 *   presencectl [--name NAME] dump   [--json]
 *   presencectl [--name NAME] stats  [--json | --prometheus]
 *   presencectl [--name NAME] device DEVICE_ID [--json]
 *   presencectl [--name NAME] user   USER_ID [--viewer ID [--contact]] [--json]
 *   presencectl [--name NAME] route  USER_ID [--json]
 *   presencectl [--name NAME] watch  [--json]
 *   presencectl [--name NAME] check  [--verbose]
 *
 * The tool is an ordinary client: it opens the store read-only through the
 * public API (include/presence.h), plus lib/inspect.h for what `dump` and
 * `check` must see of the structure.  Subcommands are dispatched from one
 * table (commands[]); each declares the options it accepts, so a new one is
 * a function and a row.
 *
 * Exit status (API.md): 0 done, 1 no such device, 2 bad usage (including a
 * write error on stdout), 3 store missing, damaged or incompatible.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "presence.h"
#include "inspect.h"

enum {
    EXIT_DONE     = 0,
    EXIT_NOTFOUND = 1,
    EXIT_USAGE    = 2,
    EXIT_STORE    = 3,
};

static const char *progname = "presencectl";

/* ------------------------------------------------------------------------ */
/* Command line                                                              */

/* Options a subcommand may accept; commands[] says which. */
enum {
    OPT_JSON       = 1u << 0,
    OPT_PROMETHEUS = 1u << 1,
    OPT_VERBOSE    = 1u << 2,
    OPT_VIEWER     = 1u << 3,
    OPT_CONTACT    = 1u << 4,
};

/* At most one positional argument (an id). */
#define ARGS_MAX 1

typedef struct {
    unsigned    opts;             /* OPT_* given */
    int         npos;
    const char *pos[ARGS_MAX];
    const char *viewer;           /* --viewer ID */
} args_t;

typedef struct {
    const char *name;             /* as given, or NULL: pres_open's default */
    const char *shown;            /* the name as messages show it */
    pres_t     *p;
} ctl_t;

typedef struct {
    const char *name;
    int       (*run)(ctl_t *c, const args_t *a);
    unsigned    opts;             /* OPT_* accepted */
    int         npos;             /* positional arguments required */
    const char *synopsis;         /* what follows the name in the usage */
} cmd_t;

static int cmd_dump(ctl_t *c, const args_t *a);
static int cmd_stats(ctl_t *c, const args_t *a);
static int cmd_device(ctl_t *c, const args_t *a);
static int cmd_user(ctl_t *c, const args_t *a);
static int cmd_route(ctl_t *c, const args_t *a);
static int cmd_watch(ctl_t *c, const args_t *a);
static int cmd_check(ctl_t *c, const args_t *a);

static const cmd_t commands[] = {
    { "dump",   cmd_dump,   OPT_JSON,                  0, "[--json]" },
    { "stats",  cmd_stats,  OPT_JSON | OPT_PROMETHEUS, 0, "[--json | --prometheus]" },
    { "device", cmd_device, OPT_JSON,                  1, "DEVICE_ID [--json]" },
    { "user",   cmd_user,   OPT_JSON | OPT_VIEWER | OPT_CONTACT, 1,
      "USER_ID [--viewer ID [--contact]] [--json]" },
    { "route",  cmd_route,  OPT_JSON,                  1, "USER_ID [--json]" },
    { "watch",  cmd_watch,  OPT_JSON,                  0, "[--json]" },
    { "check",  cmd_check,  OPT_VERBOSE,               0, "[--verbose]" },
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void usage(FILE *f)
{
    fprintf(f, "usage: %s [--name NAME] COMMAND [ARGS]\n\n", progname);
    for (size_t i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %s [--name NAME] %-6s %s\n", progname,
                commands[i].name, commands[i].synopsis);
    fprintf(f,
        "\n"
        "  --name NAME    the store (default: $PRESENCE_NAME, else \"default\"),\n"
        "                 in $PRESENCE_SHM_DIR (default /dev/shm)\n"
        "  --json         one JSON document instead of text (watch: one object\n"
        "                 a line)\n"
        "  --prometheus   the Prometheus text exposition format\n"
        "  --verbose      check: also name each invariant checked\n"
        "  --viewer ID    user: as this person sees the user (privacy applies)\n"
        "  --contact      user: the viewer is in the user's contacts\n"
        "  --help         this text;  --version  the library version\n"
        "\n"
        "Exit status: 0 done, 1 no such device or user, 2 bad usage,\n"
        "3 store missing, damaged or incompatible.\n");
}

/* A usage error: a message, a hint, and the exit status for it. */
__attribute__((format(printf, 1, 2)))
static int bad_usage(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", progname);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry '%s --help'.\n", progname);
    return EXIT_USAGE;
}

static const struct option cmd_longopts[] = {
    { "json",       no_argument, NULL, 'j' },
    { "prometheus", no_argument, NULL, 'P' },
    { "verbose",    no_argument, NULL, 'v' },
    { "viewer",     required_argument, NULL, 'W' },
    { "contact",    no_argument, NULL, 'C' },
    { "help",       no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
};

static unsigned opt_bit(int ch)
{
    switch (ch) {
    case 'j': return OPT_JSON;
    case 'P': return OPT_PROMETHEUS;
    case 'v': return OPT_VERBOSE;
    case 'W': return OPT_VIEWER;
    case 'C': return OPT_CONTACT;
    default:  return 0;
    }
}

static int add_positional(const cmd_t *cmd, args_t *a, const char *arg)
{
    if (a->npos >= cmd->npos)
        return bad_usage("unexpected argument '%s'", arg);
    a->pos[a->npos++] = arg;
    return -1;
}

/* The option that getopt refused: an unknown one is argv[optind - 1]. */
static int refused_option(char **argv, int ch)
{
    const char *arg = argv[optind - 1];
    if (ch == ':')
        return bad_usage("option '%s' needs an argument", arg);
    if (strcmp(arg, "--name") == 0 || strncmp(arg, "--name=", 7) == 0)
        return bad_usage("--name goes before the command");
    return bad_usage("unknown option '%s'", arg);
}

/*
 * Parse a subcommand's arguments (argv[0] is its name).  Returns -1 to go
 * on, or the exit status.  "-" mode hands positionals to us in order, so
 * `device ID --json` works even under POSIXLY_CORRECT; "--" still ends the
 * options, for ids that start with a dash.
 */
static int parse_cmd_args(const cmd_t *cmd, int argc, char **argv, args_t *a)
{
    int ch, r;

    memset(a, 0, sizeof *a);
    optind = 0;                   /* GNU: reinitialise for a second argv */
    while ((ch = getopt_long(argc, argv, "-:hv", cmd_longopts, NULL)) != -1) {
        if (ch == 1) {
            if ((r = add_positional(cmd, a, optarg)) >= 0)
                return r;
        } else if (ch == 'h') {
            usage(stdout);
            return EXIT_DONE;
        } else if (ch == '?' || ch == ':') {
            return refused_option(argv, ch);
        } else if (!(cmd->opts & opt_bit(ch))) {
            return bad_usage("%s does not take %s", cmd->name,
                             argv[optind - 1]);
        } else {
            a->opts |= opt_bit(ch);
            if (ch == 'W')
                a->viewer = optarg;
        }
    }
    for (; optind < argc; optind++)
        if ((r = add_positional(cmd, a, argv[optind])) >= 0)
            return r;
    if (a->npos < cmd->npos)
        return bad_usage("%s needs an id", cmd->name);
    if ((a->opts & OPT_JSON) && (a->opts & OPT_PROMETHEUS))
        return bad_usage("%s: --json and --prometheus exclude each other",
                         cmd->name);
    if ((a->opts & OPT_CONTACT) && !(a->opts & OPT_VIEWER))
        return bad_usage("%s: --contact needs --viewer", cmd->name);
    return -1;
}

static const struct option global_longopts[] = {
    { "name",    required_argument, NULL, 'n' },
    { "help",    no_argument,       NULL, 'h' },
    { "version", no_argument,       NULL, 'V' },
    { NULL, 0, NULL, 0 },
};

/* Options before the command.  Returns -1 to go on (optind at the command),
 * or the exit status. */
static int parse_global(ctl_t *c, int argc, char **argv)
{
    int ch;

    /* "+": stop at the command, whose options are its own. */
    while ((ch = getopt_long(argc, argv, "+:hV", global_longopts, NULL)) != -1) {
        switch (ch) {
        case 'n':
            c->name = optarg;
            break;
        case 'h':
            usage(stdout);
            return EXIT_DONE;
        case 'V':
            printf("presencectl (libpresence) %d.%d.%d\n", PRES_VERSION_MAJOR,
                   PRES_VERSION_MINOR, PRES_VERSION_PATCH);
            return EXIT_DONE;
        default:
            return refused_option(argv, ch);
        }
    }
    if (optind >= argc)
        return bad_usage("no command given");
    return -1;
}

static const cmd_t *find_command(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(commands[i].name, name) == 0)
            return &commands[i];
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* The store                                                                 */

/* The name pres_open(NULL) resolves to, only for messages. */
static const char *shown_name(const char *name)
{
    const char *env = getenv("PRESENCE_NAME");

    if (name != NULL)
        return name;
    return env != NULL && *env != '\0' ? env : "default";
}

/* Read-only: the tool must never be able to damage the records it shows. */
static int open_store(ctl_t *c)
{
    int r = pres_open(&c->p, c->name, PRES_RDONLY);

    if (r == 0)
        return -1;
    if (r == -ENOENT) {
        const char *dir = getenv("PRESENCE_SHM_DIR");
        fprintf(stderr, "%s: no store '%s' in %s (is presenced running?)\n",
                progname, c->shown, dir != NULL && *dir ? dir : "/dev/shm");
    } else {
        fprintf(stderr, "%s: store '%s': %s\n", progname, c->shown,
                pres_strerror(r));
    }
    /* A bad name is a usage error; anything else means the store is not
     * there in a usable shape. */
    return r == -EINVAL ? EXIT_USAGE : EXIT_STORE;
}

/* Report err from a call after the store opened; the exit status for it. */
static int failed(const char *what, int err)
{
    fprintf(stderr, "%s: %s: %s\n", progname, what, pres_strerror(err));
    switch (err) {
    case -ENOENT:
        return EXIT_NOTFOUND;
    case -EINVAL:
    case -ENAMETOOLONG:           /* an id the user typed is not valid */
        return EXIT_USAGE;
    default:                      /* -EPROTO above all: damage */
        return EXIT_STORE;
    }
}

/* ------------------------------------------------------------------------ */
/* Strings: ids are arbitrary bytes without NUL                              */

/* Length of the well-formed UTF-8 sequence at s (0 if there is none), and
 * its code point.  Overlongs, surrogates and values past U+10FFFF are not
 * well-formed: a JSON decoder would reject them. */
static size_t utf8_seq(const unsigned char *s, uint32_t *cp)
{
    static const uint32_t min[4] = { 0, 0x80, 0x800, 0x10000 };
    size_t n;
    uint32_t v;

    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    if ((s[0] & 0xe0) == 0xc0)      { n = 2; v = s[0] & 0x1f; }
    else if ((s[0] & 0xf0) == 0xe0) { n = 3; v = s[0] & 0x0f; }
    else if ((s[0] & 0xf8) == 0xf0) { n = 4; v = s[0] & 0x07; }
    else return 0;
    for (size_t i = 1; i < n; i++) {
        /* A NUL here fails the test, so we never read past the string. */
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        v = v << 6 | (s[i] & 0x3f);
    }
    if (v < min[n - 1] || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
        return 0;
    *cp = v;
    return n;
}

/* A JSON string.  Control bytes, quote and backslash are escaped; bytes that
 * are not well-formed UTF-8 become \u00XX (the byte read as Latin-1), so
 * the document stays valid whatever the id holds. */
static void json_str(FILE *f, const char *str)
{
    const unsigned char *s = (const unsigned char *)str;
    uint32_t cp;
    size_t n;

    fputc('"', f);
    while (*s != '\0') {
        n = utf8_seq(s, &cp);
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if (*s == '\n')
            fputs("\\n", f);
        else if (*s == '\t')
            fputs("\\t", f);
        else if (n == 0 || cp < 0x20 || cp == 0x7f)
            fprintf(f, "\\u%04x", *s);
        else
            fwrite(s, 1, n, f);
        s += n == 0 ? 1 : n;
    }
    fputc('"', f);
}

/* Room for an id escaped for a terminal: at most 4 bytes out per byte in. */
#define HUMAN_MAX (PRES_ID_MAX * 4 + 1)

/*
 * An id made safe for a terminal: control characters (C0, DEL and C1, which
 * some terminals obey as escape sequences), backslash and bytes that are not
 * UTF-8 are shown as \xNN.  Returns the columns it takes (one per code
 * point; wide characters are not worth a table here).
 */
static size_t human_str(const char *str, char out[HUMAN_MAX])
{
    const unsigned char *s = (const unsigned char *)str;
    size_t o = 0, cols = 0, in = 0, n;
    uint32_t cp;

    /* Bounded by input bytes, each of which yields at most 4 out: an id too
     * long to be one (typed by a user) is shown cut. */
    while (*s != '\0') {
        n = utf8_seq(s, &cp);
        if ((in += n == 0 ? 1 : n) > PRES_ID_MAX)
            break;
        if (n == 0 || cp < 0x20 || (cp >= 0x7f && cp < 0xa0) || cp == '\\') {
            n = n == 0 ? 1 : n;
            for (size_t i = 0; i < n; i++, cols += 4)
                o += (size_t)sprintf(out + o, "\\x%02x", s[i]);
        } else {
            memcpy(out + o, s, n);
            o += n;
            cols++;
        }
        s += n;
    }
    out[o] = '\0';
    return cols;
}

/* Print an id left-aligned in a column of the given width. */
static void put_col(FILE *f, const char *id, size_t width)
{
    char buf[HUMAN_MAX];
    size_t cols = human_str(id, buf);

    fputs(buf, f);
    for (; cols < width; cols++)
        fputc(' ', f);
}

static size_t id_cols(const char *id)
{
    char buf[HUMAN_MAX];
    return human_str(id, buf);
}

/* failed() for a call on an id the user gave: the message names it. */
static int id_failed(const char *kind, const char *id, int err)
{
    char buf[HUMAN_MAX], what[HUMAN_MAX + 16];

    human_str(id, buf);
    if (err == -ENOENT) {
        fprintf(stderr, "%s: no %s '%s'\n", progname, kind, buf);
        return EXIT_NOTFOUND;
    }
    snprintf(what, sizeof what, "%s '%s'", kind, buf);
    return failed(what, err);
}

/* ------------------------------------------------------------------------ */
/* Times                                                                     */

/* 2024-05-01T12:34:56.789Z, or "never" for 0 (no such moment yet). */
static const char *iso_time(uint64_t ms, char buf[32])
{
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;

    size_t k;

    if (ms == 0 || gmtime_r(&secs, &tm) == NULL ||
        (k = strftime(buf, 32, "%Y-%m-%dT%H:%M:%S", &tm)) == 0)
        return strcpy(buf, ms == 0 ? "never" : "?");
    snprintf(buf + k, 32 - k, ".%03uZ", (unsigned)(ms % 1000));
    return buf;
}

/* "3.2 s ago", "in 41 s", "now": the precision a person reads at a glance. */
static const char *rel_time(uint64_t ms, uint64_t now, char buf[32])
{
    uint64_t d = ms > now ? ms - now : now - ms;
    const char *pre = ms > now ? "in " : "", *post = ms > now ? "" : " ago";

    if (ms == 0)
        return strcpy(buf, "never");
    if (d < 50)                   /* below what a reader of this can use */
        return strcpy(buf, "now");
    if (d < 10000)
        snprintf(buf, 32, "%s%.1f s%s", pre, (double)d / 1000, post);
    else if (d < 120000)
        snprintf(buf, 32, "%s%" PRIu64 " s%s", pre, d / 1000, post);
    else if (d < 2 * 3600000)
        snprintf(buf, 32, "%s%" PRIu64 " min%s", pre, d / 60000, post);
    else if (d < 2 * 86400000ull)
        snprintf(buf, 32, "%s%" PRIu64 " h%s", pre, d / 3600000, post);
    else
        snprintf(buf, 32, "%s%" PRIu64 " d%s", pre, d / 86400000, post);
    return buf;
}

/* ------------------------------------------------------------------------ */
/* Devices                                                                   */

static const char *device_state(const pres_device_info_t *d)
{
    if (!d->connected)
        return "offline";
    return d->active ? "active" : "idle";
}

/* The device object: keys are pres_device_info_t's field names. */
static void json_device(FILE *f, const pres_device_info_t *d)
{
    fputs("{\"device_id\": ", f);
    json_str(f, d->device_id);
    fputs(", \"user_id\": ", f);
    json_str(f, d->user_id);
    fputs(", \"gateway_id\": ", f);
    json_str(f, d->gateway_id);
    fprintf(f, ", \"connected\": %s, \"active\": %s, "
            "\"connected_at_ms\": %" PRIu64 ", \"expires_at_ms\": %" PRIu64
            ", \"last_seen_ms\": %" PRIu64 ", \"last_active_ms\": %" PRIu64 "}",
            d->connected ? "true" : "false", d->active ? "true" : "false",
            d->connected_at_ms, d->expires_at_ms, d->last_seen_ms,
            d->last_active_ms);
}

/* A JSON array of devices, one a line (a dump of a million stays greppable). */
static void json_devices(FILE *f, const pres_device_info_t *d, size_t n)
{
    fputc('[', f);
    for (size_t i = 0; i < n; i++) {
        fputs(i == 0 ? "\n    " : ",\n    ", f);
        json_device(f, &d[i]);
    }
    fputs(n == 0 ? "]" : "\n  ]", f);
}

static void human_time_line(const char *label, uint64_t ms, uint64_t now)
{
    char iso[32], rel[32];

    printf("%-14s %s", label, iso_time(ms, iso));
    if (ms != 0)
        printf("  (%s)", rel_time(ms, now, rel));
    putchar('\n');
}

static void human_id_line(const char *label, const char *id)
{
    printf("%-14s ", label);
    put_col(stdout, id, 0);
    putchar('\n');
}

static void human_device(const pres_device_info_t *d, uint64_t now)
{
    human_id_line("device_id", d->device_id);
    human_id_line("user_id", d->user_id);
    human_id_line("gateway_id", d->gateway_id);
    printf("%-14s %s\n", "state", device_state(d));
    human_time_line("connected_at", d->connected_at_ms, now);
    human_time_line("expires_at", d->expires_at_ms, now);
    human_time_line("last_seen", d->last_seen_ms, now);
    human_time_line("last_active", d->last_active_ms, now);
}

/* Column widths of a device table: the widest id in each, or its heading. */
typedef struct {
    size_t device, user, gateway;
} widths_t;

static widths_t table_widths(const pres_device_info_t *d, size_t n)
{
    widths_t w = { strlen("DEVICE"), strlen("USER"), strlen("GATEWAY") };
    size_t c;

    for (size_t i = 0; i < n; i++) {
        if ((c = id_cols(d[i].device_id)) > w.device)
            w.device = c;
        if ((c = id_cols(d[i].user_id)) > w.user)
            w.user = c;
        if ((c = id_cols(d[i].gateway_id)) > w.gateway)
            w.gateway = c;
    }
    return w;
}

/* One row a device; the last-seen column last, since its width varies. */
static void human_table(const pres_device_info_t *d, size_t n, uint64_t now)
{
    widths_t w = table_widths(d, n);
    char rel[32], iso[32];

    printf("%-*s  %-*s  %-*s  %-7s  %-13s  %s\n", (int)w.device, "DEVICE",
           (int)w.user, "USER", (int)w.gateway, "GATEWAY", "STATE",
           "EXPIRES", "LAST SEEN");
    for (size_t i = 0; i < n; i++) {
        put_col(stdout, d[i].device_id, w.device + 2);
        put_col(stdout, d[i].user_id, w.user + 2);
        put_col(stdout, d[i].gateway_id, w.gateway + 2);
        /* A disconnected device keeps the expiry it had, which may lie
         * ahead: shown here it would read as if the device were still on. */
        printf("%-7s  %-13s  ", device_state(&d[i]), d[i].connected ?
               rel_time(d[i].expires_at_ms, now, rel) : "-");
        if (d[i].connected)
            puts("now");
        else
            printf("%s (%s)\n", iso_time(d[i].last_seen_ms, iso),
                   rel_time(d[i].last_seen_ms, now, rel));
    }
}

static int by_device_id(const void *a, const void *b)
{
    return strcmp(((const pres_device_info_t *)a)->device_id,
                  ((const pres_device_info_t *)b)->device_id);
}

/* ------------------------------------------------------------------------ */
/* Stats: one table feeds the text, JSON and Prometheus forms                */

typedef struct {
    const char *name;             /* the pres_stats_t field */
    size_t      off;
    int         counter;          /* Prometheus: a counter, named _total */
    const char *help;
} stat_field_t;

#define STAT(field, counter, help) \
    { #field, offsetof(pres_stats_t, field), counter, help }

static const stat_field_t stat_fields[] = {
    STAT(capacity,        0, "Device records the store can hold."),
    STAT(devices,         0, "Device records held."),
    STAT(connected,       0, "Devices connected, as of the daemon's last pass."),
    STAT(users,           0, "User records held."),
    STAT(connects,        1, "Connects that succeeded."),
    STAT(disconnects,     1, "Connections ended by a disconnect call."),
    STAT(heartbeats,      1, "Heartbeats."),
    STAT(late_heartbeats, 1, "Heartbeats that came after the TTL had passed."),
    STAT(expirations,     1, "Connections ended by TTL or gateway death."),
    STAT(gateway_deaths,  1, "Gateways that died or closed their handle."),
    STAT(stale_reports,   1, "Deliveries reported failed to a routed device."),
    STAT(events,          1, "Events appended to the change feed."),
    STAT(evictions,       1, "Offline devices evicted from shared memory."),
    STAT(grace_periods,   1, "Cross-process grace periods completed."),
    STAT(mirror_lag_ms,   0, "Age of the oldest change not yet in LMDB, in seconds."),
};

#define N_STATS (sizeof stat_fields / sizeof stat_fields[0])

static uint64_t stat_value(const pres_stats_t *s, const stat_field_t *f)
{
    uint64_t v;

    memcpy(&v, (const char *)s + f->off, sizeof v);
    return v;
}

/* The change feed's capacity and last seq come beside pres_stats_t (whose
 * layout API.md fixes), from the inspection interface. */
static void json_stats(FILE *f, const pres_stats_t *s, const pres_inspect_feed_t *fd)
{
    for (size_t i = 0; i < N_STATS; i++)
        fprintf(f, "%s\"%s\": %" PRIu64, i == 0 ? "{" : ", ",
                stat_fields[i].name, stat_value(s, &stat_fields[i]));
    fprintf(f, ", \"feed_capacity\": %" PRIu64 ", \"feed_seq\": %" PRIu64 "}",
            fd->capacity, fd->last_seq);
}

static void human_stats(const pres_stats_t *s, const pres_inspect_feed_t *fd)
{
    for (size_t i = 0; i < N_STATS; i++)
        printf("%-16s %" PRIu64 "\n", stat_fields[i].name,
               stat_value(s, &stat_fields[i]));
    printf("%-16s %" PRIu64 " events\n%-16s %" PRIu64 "\n", "feed_capacity",
           fd->capacity, "feed_seq", fd->last_seq);
}

/* Prometheus wants base units: mirror_lag_ms is exported in seconds,
 * printed exactly (ms / 1000 as a decimal) rather than through a double. */
static void prometheus_gauge(const char *name, const char *help, uint64_t v)
{
    printf("# HELP %s %s\n# TYPE %s gauge\n%s %" PRIu64 "\n", name, help, name, name, v);
}

static void prometheus_stats(const pres_stats_t *s, const pres_inspect_feed_t *fd)
{
    for (size_t i = 0; i < N_STATS; i++) {
        const stat_field_t *f = &stat_fields[i];
        uint64_t v = stat_value(s, f);
        char name[64];

        if (strcmp(f->name, "mirror_lag_ms") == 0)
            strcpy(name, "presence_mirror_lag_seconds");
        else
            snprintf(name, sizeof name, "presence_%s%s", f->name,
                     f->counter ? "_total" : "");
        printf("# HELP %s %s\n# TYPE %s %s\n", name, f->help, name,
               f->counter ? "counter" : "gauge");
        if (strcmp(f->name, "mirror_lag_ms") == 0)
            printf("%s %" PRIu64 ".%03u\n", name, v / 1000,
                   (unsigned)(v % 1000));
        else
            printf("%s %" PRIu64 "\n", name, v);
    }
    prometheus_gauge("presence_feed_capacity", "Events the change feed holds.", fd->capacity);
    prometheus_gauge("presence_feed_seq", "The last seq appended to the change feed.",
                     fd->last_seq);
}

static void human_bytes(const char *label, uint64_t bytes)
{
    if (bytes >= 1024 * 1024)
        printf("%-16s %.1f MiB (%" PRIu64 " bytes)\n", label,
               (double)bytes / (1024.0 * 1024.0), bytes);
    else
        printf("%-16s %.1f KiB (%" PRIu64 " bytes)\n", label,
               (double)bytes / 1024.0, bytes);
}

static void human_layout(const pres_inspect_info_t *in)
{
    printf("%-16s %s (format %" PRIu32 ")\n", "region", in->path, in->format);
    human_bytes("region_bytes", in->region_bytes);
    human_bytes("readers_bytes", in->readers_bytes);
    printf("%-16s %" PRIu64 " devices, %" PRIu64 " users, %" PRIu64
           " gateways\n", "records", in->device_capacity,
           in->user_capacity, in->gateway_capacity);
    printf("%-16s %" PRIu64 " device, %" PRIu64 " user\n", "buckets",
           in->device_buckets, in->user_buckets);
    printf("%-16s %" PRIu64 " of %" PRIu64 " slots used\n", "readers",
           in->reader_slots_used, in->reader_slots);
    printf("%-16s %" PRIu64 " of %" PRIu64 " in use\n", "exceptions",
           in->exceptions_in_use, in->exception_capacity);
    printf("%-16s %" PRIu64 " of %" PRIu64 " records in use\n", "typing",
           in->typing_in_use, in->typing_capacity);
    printf("%-16s %" PRIu64 " ms\n", "oldest_reader", in->oldest_reader_ms);
    printf("%-16s %" PRIu64 "\n", "gp_epoch", in->gp_epoch);
    if (in->daemon_pid != 0)
        printf("%-16s pid %d\n", "daemon", in->daemon_pid);
    else
        printf("%-16s none running\n", "daemon");
}

/* ------------------------------------------------------------------------ */
/* Subcommands                                                               */

static int cmd_stats(ctl_t *c, const args_t *a)
{
    pres_inspect_info_t in;
    pres_inspect_feed_t fd;
    pres_stats_t s;
    int r;

    if ((r = pres_stats(c->p, &s)) < 0)
        return failed("stats", r);
    if ((r = pres__inspect_feed(c->p, &fd)) < 0)
        return failed("feed", r);
    if (a->opts & OPT_JSON) {
        json_stats(stdout, &s, &fd);
        putchar('\n');
    } else if (a->opts & OPT_PROMETHEUS) {
        prometheus_stats(&s, &fd);
    } else {
        if ((r = pres__inspect_info(c->p, &in)) < 0)
            return failed("layout", r);
        printf("store %s\n\n", c->shown);
        human_layout(&in);
        putchar('\n');
        human_stats(&s, &fd);
    }
    return EXIT_DONE;
}

static int cmd_device(ctl_t *c, const args_t *a)
{
    pres_device_info_t d;
    int r;

    if ((r = pres_device(c->p, a->pos[0], &d)) < 0)
        return id_failed("device", a->pos[0], r);
    if (a->opts & OPT_JSON) {
        json_device(stdout, &d);
        putchar('\n');
    } else {
        human_device(&d, pres_now_ms());
    }
    return EXIT_DONE;
}

/* ------------------------------------------------------------------------ */
/* Users                                                                     */

static const char *const status_names[] = { "offline", "idle", "active" };
static const char *const seen_names[] = {
    "exact", "recently", "week", "month", "long_ago", "never", "hidden",
};

static const char *enum_name(const char *const *names, size_t n, int v)
{
    return v >= 0 && (size_t)v < n ? names[v] : "unknown";
}

#define STATUS_NAME(v) enum_name(status_names, 3, (v))
#define SEEN_NAME(v)   enum_name(seen_names, 7, (v))

/* The pres_user_view_t object, with the user it is of. */
static void json_user(FILE *f, const char *user, const pres_user_view_t *v)
{
    fputs("{\"user_id\": ", f);
    json_str(f, user);
    fprintf(f, ", \"status\": \"%s\", \"seen\": \"%s\", \"last_seen_ms\": %" PRIu64
            ", \"devices\": %u}", STATUS_NAME(v->status), SEEN_NAME(v->seen),
            v->last_seen_ms, v->devices);
}

/* What "seen" says to a person: the time, or the bucket in words. */
static void human_seen(const pres_user_view_t *v, uint64_t now)
{
    static const char *const words[] = {
        NULL, "recently (within 3 days)", "within a week", "within a month",
        "a long time ago", "never", "hidden",
    };
    if (v->seen == PRES_SEEN_EXACT)
        human_time_line("last_seen", v->last_seen_ms, now);
    else
        printf("%-14s %s\n", "last_seen", v->seen > 0 && v->seen <= PRES_SEEN_HIDDEN ?
               words[v->seen] : "?");
}

static int cmd_user(ctl_t *c, const args_t *a)
{
    pres_viewer_t who = { a->viewer, (a->opts & OPT_CONTACT) != 0 };
    pres_user_view_t v;
    int r;

    if ((r = pres_user(c->p, a->pos[0], a->viewer ? &who : NULL, &v)) < 0) {
        /* An id the library refuses may be the viewer's. */
        if (a->viewer && (r == -EINVAL || r == -ENAMETOOLONG))
            return id_failed("viewer", a->viewer, r);
        return id_failed("user", a->pos[0], r);
    }
    if (a->opts & OPT_JSON) {
        json_user(stdout, a->pos[0], &v);
        putchar('\n');
        return EXIT_DONE;
    }
    human_id_line("user_id", a->pos[0]);
    if (a->viewer) {
        char buf[HUMAN_MAX];
        human_str(a->viewer, buf);
        printf("%-14s %s%s\n", "as seen by", buf, who.is_contact ? " (a contact)" : "");
    } else {
        printf("%-14s %s\n", "as seen by", "the system (no privacy rules)");
    }
    printf("%-14s %s\n", "status", STATUS_NAME(v.status));
    human_seen(&v, pres_now_ms());
    printf("%-14s %u\n", "devices", v.devices);
    return EXIT_DONE;
}

/* How many times route asks again when the user gained devices between the
 * count and the copy; a user still growing after that is shown as it was. */
#define ROUTE_TRIES 8

/* The user's connected devices into *out (malloc'ed), their count in *n. */
static int route_all(pres_t *p, const char *user, pres_device_info_t **out,
                     size_t *n)
{
    size_t cap = 16;
    pres_device_info_t *d = NULL, *nd;
    int r;

    for (int tries = 0; tries < ROUTE_TRIES; tries++) {
        if ((nd = realloc(d, cap * sizeof *d)) == NULL) {
            free(d);
            return -ENOMEM;
        }
        d = nd;
        r = pres_route(p, user, d, cap, n);
        if (r == -ENOENT) {       /* the API says 0 and none; same thing */
            r = 0;
            *n = 0;
        }
        if (r < 0) {
            free(d);
            return r;
        }
        if (*n <= cap)
            break;
        cap = *n + 16;            /* room for a few more arriving meanwhile */
    }
    if (*n > cap)
        *n = cap;
    *out = d;
    return 0;
}

static int cmd_route(ctl_t *c, const args_t *a)
{
    pres_device_info_t *d;
    char buf[HUMAN_MAX];
    size_t n;
    int r;

    if ((r = route_all(c->p, a->pos[0], &d, &n)) < 0)
        return id_failed("user", a->pos[0], r);
    qsort(d, n, sizeof *d, by_device_id);
    if (a->opts & OPT_JSON) {
        fputs("{\"user_id\": ", stdout);
        json_str(stdout, a->pos[0]);
        fputs(",\n  \"devices\": ", stdout);
        json_devices(stdout, d, n);
        puts("}");
    } else {
        human_str(a->pos[0], buf);
        printf("user %s: %zu connected device%s\n", buf, n, n == 1 ? "" : "s");
        if (n > 0)
            human_table(d, n, pres_now_ms());
    }
    free(d);
    return EXIT_DONE;
}

/*
 * dump first copies every device into memory, then prints: the walk goes in
 * table (hash) order, and a person wants them sorted with columns sized to
 * the widest id.  It also keeps the walk short whatever reads our stdout (a
 * pager), so the snapshot is not smeared over minutes.  The cost is one
 * pres_device_info_t (232 bytes) a device.
 */
typedef struct {
    pres_device_info_t *d;
    size_t n, cap;
} devlist_t;

static int collect_device(const pres_device_info_t *d, void *arg)
{
    devlist_t *l = arg;
    pres_device_info_t *nd;

    if (l->n == l->cap) {
        size_t cap = l->cap == 0 ? 1024 : l->cap * 2;
        if ((nd = realloc(l->d, cap * sizeof *nd)) == NULL)
            return -ENOMEM;
        l->d = nd;
        l->cap = cap;
    }
    l->d[l->n++] = *d;
    return 0;
}

static void dump_json(const pres_stats_t *s, const pres_inspect_feed_t *fd,
                      const devlist_t *l)
{
    fputs("{\"stats\": ", stdout);
    json_stats(stdout, s, fd);
    fputs(",\n  \"devices\": ", stdout);
    json_devices(stdout, l->d, l->n);
    puts("}");
}

static void dump_human(const ctl_t *c, const pres_stats_t *s,
                       const pres_inspect_feed_t *fd, const devlist_t *l)
{
    printf("store %s\n\n", c->shown);
    human_stats(s, fd);
    printf("\n%zu device%s held\n", l->n, l->n == 1 ? "" : "s");
    if (l->n > 0) {
        putchar('\n');
        human_table(l->d, l->n, pres_now_ms());
    }
}

static int cmd_dump(ctl_t *c, const args_t *a)
{
    devlist_t l = { NULL, 0, 0 };
    pres_inspect_feed_t fd;
    pres_stats_t s;
    int r;

    if ((r = pres_stats(c->p, &s)) < 0)
        return failed("stats", r);
    if ((r = pres__inspect_feed(c->p, &fd)) < 0)
        return failed("feed", r);
    if ((r = pres__inspect_devices(c->p, collect_device, &l)) < 0) {
        free(l.d);
        return failed("devices", r);
    }
    /* Table order is hash order: sorted, a dump reads and diffs well. */
    qsort(l.d, l.n, sizeof *l.d, by_device_id);
    if (a->opts & OPT_JSON)
        dump_json(&s, &fd, &l);
    else
        dump_human(c, &s, &fd, &l);
    free(l.d);
    return EXIT_DONE;
}

/*
 * watch: the change feed from now on, one event a line, each line flushed
 * as it comes (a pipe to another program sees it at once).  A watcher that
 * falls behind the feed's capacity is told on stderr and goes on from the
 * oldest event held.  Runs until SIGINT or SIGTERM (exit 0), or until the
 * store goes away (its files removed or replaced: exit 3).
 */
static volatile sig_atomic_t watch_stop;

static void on_watch_signal(int sig)
{
    (void)sig;
    watch_stop = 1;
}

/* How often watch looks up from pres_watch: for a signal, and for the
 * store going away. */
#define WATCH_POLL_MS 200

static const char *event_kind(int k)
{
    static const char *const names[] = {
        [PRES_EV_CONNECT] = "connect", [PRES_EV_DISCONNECT] = "disconnect",
        [PRES_EV_EXPIRE] = "expire", [PRES_EV_USER_STATUS] = "user_status",
        [PRES_EV_TYPING] = "typing", [PRES_EV_TYPING_STOP] = "typing_stop",
        [PRES_EV_LOST] = "lost",
    };
    return k >= PRES_EV_CONNECT && k <= PRES_EV_LOST ? names[k] : "unknown";
}

static const char *status_name(int st)
{
    switch (st) {
    case PRES_ACTIVE_NOW: return "active";
    case PRES_IDLE_NOW:   return "idle";
    default:              return "offline";
    }
}

static void json_event(FILE *f, const pres_event_t *e)
{
    fprintf(f, "{\"seq\": %" PRIu64 ", \"at_ms\": %" PRIu64 ", \"kind\": \"%s\", "
            "\"status\": ", e->seq, e->at_ms, event_kind(e->kind));
    if (e->kind == PRES_EV_USER_STATUS)
        fprintf(f, "\"%s\"", status_name(e->status));
    else
        fputs("null", f);
    fputs(", \"user_id\": ", f);
    json_str(f, e->user_id);
    fputs(", \"device_id\": ", f);
    json_str(f, e->device_id);
    fputs(", \"gateway_id\": ", f);
    json_str(f, e->gateway_id);
    fputs(", \"conversation_id\": ", f);
    json_str(f, e->conversation_id);
    fputs("}\n", f);
}

/* seq, time, kind, then only the fields the kind has. */
static void human_event(FILE *f, const pres_event_t *e)
{
    char t[32], b[HUMAN_MAX];

    fprintf(f, "%" PRIu64 " %s %-11s", e->seq, iso_time(e->at_ms, t), event_kind(e->kind));
    if (e->user_id[0])
        fprintf(f, " user %s", (human_str(e->user_id, b), b));
    if (e->device_id[0])
        fprintf(f, " device %s", (human_str(e->device_id, b), b));
    if (e->gateway_id[0])
        fprintf(f, " gateway %s", (human_str(e->gateway_id, b), b));
    if (e->conversation_id[0])
        fprintf(f, " conversation %s", (human_str(e->conversation_id, b), b));
    if (e->kind == PRES_EV_USER_STATUS)
        fprintf(f, " %s", status_name(e->status));
    if (e->kind == PRES_EV_LOST)
        fputs(" (its writer died or stopped while appending it: resync)", f);
    fputc('\n', f);
}

/* The records file we mapped is still the store's. */
static int store_still_there(const char *path, const struct stat *was)
{
    struct stat st;

    return stat(path, &st) == 0 && st.st_ino == was->st_ino && st.st_dev == was->st_dev;
}

static int cmd_watch(ctl_t *c, const args_t *a)
{
    struct sigaction sa;
    pres_inspect_info_t in;
    struct stat was;
    uint64_t cur = 0;
    int r;

    if ((r = pres__inspect_info(c->p, &in)) < 0)
        return failed("layout", r);
    if (stat(in.path, &was) < 0) {
        fprintf(stderr, "%s: %s: %s\n", progname, in.path, strerror(errno));
        return EXIT_STORE;
    }
    /* No SA_RESTART: the flag is looked at within WATCH_POLL_MS anyway. */
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_watch_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    while (!watch_stop) {
        pres_event_t e;
        r = pres_watch(c->p, &cur, &e, WATCH_POLL_MS);
        if (r == -ETIMEDOUT) {
            if (!store_still_there(in.path, &was)) {
                fprintf(stderr, "%s: store '%s' went away\n", progname, c->shown);
                return EXIT_STORE;
            }
            continue;
        }
        if (r == -EOVERFLOW) {
            fprintf(stderr, "%s: fell behind the change feed: events were lost; going on from "
                    "seq %" PRIu64 ", the oldest held\n", progname, cur);
            continue;
        }
        if (r < 0)
            return failed("watch", r);
        if (a->opts & OPT_JSON)
            json_event(stdout, &e);
        else
            human_event(stdout, &e);
        if (fflush(stdout) != 0)
            return EXIT_USAGE;    /* finish_output says why */
    }
    return EXIT_DONE;
}

/* Devices held and connected, counted by check itself: the counters of
 * pres_stats are the daemon's, stale while it is down. */
typedef struct {
    uint64_t held, connected;
} census_t;

static int count_device(const pres_device_info_t *d, void *arg)
{
    census_t *n = arg;

    n->held++;
    n->connected += d->connected != 0;
    return 0;
}

static int cmd_check(ctl_t *c, const args_t *a)
{
    census_t n = { 0, 0 };
    long problems;

    /* The library prints one line a problem to stdout; flush ours first so
     * the lines come out in order. */
    fflush(stdout);
    problems = pres__inspect_check(c->p, stdout, (a->opts & OPT_VERBOSE) != 0);
    if (problems < 0)
        return failed("check", (int)problems);
    if (problems > 0) {
        printf("store %s: %ld problem%s\n", c->shown, problems,
               problems == 1 ? "" : "s");
        return EXIT_STORE;
    }
    if (pres__inspect_devices(c->p, count_device, &n) == 0)
        printf("store %s: intact, %" PRIu64 " device%s (%" PRIu64
               " connected)\n", c->shown, n.held, n.held == 1 ? "" : "s",
               n.connected);
    else
        printf("store %s: intact\n", c->shown);
    return EXIT_DONE;
}

/* ------------------------------------------------------------------------ */

/* Output that did not arrive is a failure, even after the work was done
 * (a full disk, a closed pipe with SIGPIPE ignored). */
static int finish_output(int status)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "%s: write error on standard output: %s\n",
                progname, strerror(errno));
        return EXIT_USAGE;
    }
    return status;
}

static int run(int argc, char **argv)
{
    ctl_t c = { NULL, NULL, NULL };
    const cmd_t *cmd;
    args_t a;
    int r;

    if ((r = parse_global(&c, argc, argv)) >= 0)
        return r;
    if ((cmd = find_command(argv[optind])) == NULL)
        return bad_usage("unknown command '%s'", argv[optind]);
    if ((r = parse_cmd_args(cmd, argc - optind, argv + optind, &a)) >= 0)
        return r;
    c.shown = shown_name(c.name);
    if ((r = open_store(&c)) >= 0)
        return r;
    r = cmd->run(&c, &a);
    pres_close(c.p);
    return r;
}

int main(int argc, char **argv)
{
    return finish_output(run(argc, argv));
}
