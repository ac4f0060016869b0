/* Bench only (bench/run.sh): an LD_PRELOAD shim that turns the node's
 * flushes into no-ops, so that one run can tell the cost of durability
 * (fdatasync, folder fsync, SQLite's WAL fsync) from the rest of the
 * node's work. Never use it for anything but a benchmark: with it, a
 * C-STORE Success no longer means the instance is on disk. */
#define _GNU_SOURCE
#include <sys/types.h>

int fsync(int fd) { (void)fd; return 0; }
int fdatasync(int fd) { (void)fd; return 0; }
int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags)
{
    (void)fd; (void)offset; (void)nbytes; (void)flags;
    return 0;
}
