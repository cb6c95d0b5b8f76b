/*
 * error.c - pres_strerror: one table for the codes the API gives meaning
 * to, strerror() for the rest, each message prefixed with the code's name
 * (like LMDB's mdb_strerror).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "presence.h"

static const struct {
    int code;
    const char *msg;
} errors[] = {
    { 0,             "OK: success" },
    { EINVAL,        "EINVAL: invalid argument (a NULL or empty id, a bad store name, a TTL outside 1 ms .. 1 day, or a bad enum value)" },
    { ENAMETOOLONG,  "ENAMETOOLONG: an id is longer than PRES_ID_MAX (63) bytes" },
    { ENOENT,        "ENOENT: no such store (no daemon has created it), or no such device or user" },
    { EROFS,         "EROFS: the handle was opened read-only" },
    { ENOSPC,        "ENOSPC: the store is full (device, user, gateway or exception capacity, or attached processes)" },
    { EPROTO,        "EPROTO: the store's files are not a store of this version, or are damaged" },
    { ESTALE,        "ESTALE: the device has since been connected again or evicted" },
    { EACCES,        "EACCES: the store's files do not allow this (permissions, or owned by another user)" },
    { E2BIG,         "E2BIG: a privacy exception list is longer than PRES_EXCEPTIONS_MAX" },
    { ETIMEDOUT,     "ETIMEDOUT: no event within the timeout" },
    { EOVERFLOW,     "EOVERFLOW: the cursor fell behind the change feed's capacity" },
    { EBUSY,         "EBUSY: the device is being changed by a process that is stopped; try again" },
    { ENOMEM,        "ENOMEM: out of memory" },
};

PRES_API const char *pres_strerror(int err)
{
    static __thread char buf[128];
    /* -INT_MIN does not exist: negate as unsigned. */
    unsigned code = err < 0 ? 0u - (unsigned)err : (unsigned)err;
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if ((unsigned)errors[i].code == code)
            return errors[i].msg;
    const char *name = code <= 4095 ? strerrorname_np((int)code) : NULL;
    snprintf(buf, sizeof buf, "%s: %s", name ? name : "EUNKNOWN",
             code <= 4095 ? strerror((int)code) : "unknown error");
    return buf;
}
