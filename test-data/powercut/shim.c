/* Power-cut recorder for the node's durability test (see README.md here).
 *
 * LD_PRELOADed into `her2map serve`. For paths under POWERCUT_ROOT it records
 * what a power cut would keep, into POWERCUT_SHADOW:
 *   - fsync/fdatasync of a regular file: files/<inode> = its content now;
 *   - fsync/fdatasync of a folder: dirs/<inode> = its entries now
 *     ("f <inode> <name>" or "d <inode> <name>", one a line);
 * and counts the durability-relevant calls (those two, plus open/creat with
 * O_CREAT, rename, link, unlink, mkdir, rmdir under the root), appending
 * each to POWERCUT_SHADOW/log. After call number POWERCUT_CUT (1-based;
 * 0 or unset: never) it SIGKILLs the process while holding the recorder's
 * lock, so no snapshot is ever half written. The snapshot is taken before
 * the real fsync, so a write racing the fsync counts as lost (pessimistic).
 * POWERCUT_IGNORE=text leaves out of the record the fsyncs of paths that
 * contain it, so that the test can show the harness catches a missing one.
 * POWERCUT_ARM=path: the cut counts only the calls made once that file
 * exists (logged "ARMED"), so that a test can cut at the Nth call after a
 * moment it chooses (e.g. once the ingest is acknowledged), whatever the
 * number of calls before it.
 *
 * Build: cc -shared -fPIC -O1 -o shim.so shim.c -ldl
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int inside; /* our own file work is not recorded */
static char root[PATH_MAX];
static size_t root_len;
static char shadow[PATH_MAX - 64];
static long cut_at;
static char ignore[256]; /* POWERCUT_IGNORE: fsyncs of paths holding it are
                          * not recorded (the harness's own negative test) */
static long count;
static char arm[PATH_MAX]; /* POWERCUT_ARM: counting for the cut starts
                            * once this file exists */
static long armed_at = -1; /* calls made before it did */
static int ready;

static void init(void) {
    if (ready) return;
    ready = -1;
    const char *r = getenv("POWERCUT_ROOT"), *s = getenv("POWERCUT_SHADOW");
    const char *c = getenv("POWERCUT_CUT");
    if (!r || !s) return;
    snprintf(root, sizeof root, "%s", r);
    root_len = strlen(root);
    snprintf(shadow, sizeof shadow, "%s", s);
    cut_at = c ? atol(c) : 0;
    const char *ig = getenv("POWERCUT_IGNORE");
    snprintf(ignore, sizeof ignore, "%s", ig ? ig : "");
    const char *a = getenv("POWERCUT_ARM");
    snprintf(arm, sizeof arm, "%s", a ? a : "");
    ready = 1;
}

__attribute__((constructor)) static void ctor(void) { init(); }

#define REAL(ret, name, ...)                                             \
    static ret (*real_##name)(__VA_ARGS__);                              \
    static void load_##name(void) {                                      \
        if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name);         \
    }

REAL(int, fsync, int)
REAL(int, fdatasync, int)
REAL(int, open, const char *, int, ...)
REAL(int, open64, const char *, int, ...)
REAL(int, openat, int, const char *, int, ...)
REAL(int, openat64, int, const char *, int, ...)
REAL(int, creat, const char *, mode_t)
REAL(int, rename, const char *, const char *)
REAL(int, renameat, int, const char *, int, const char *)
REAL(int, renameat2, int, const char *, int, const char *, unsigned)
REAL(int, link, const char *, const char *)
REAL(int, linkat, int, const char *, int, const char *, int)
REAL(int, unlink, const char *)
REAL(int, unlinkat, int, const char *, int)
REAL(int, mkdir, const char *, mode_t)
REAL(int, mkdirat, int, const char *, mode_t)
REAL(int, rmdir, const char *)

static int under_root(const char *p) {
    return ready == 1 && p && strncmp(p, root, root_len) == 0 &&
           (p[root_len] == '/' || p[root_len] == 0);
}

/* An absolute path for (dirfd, path); relative paths against the cwd or
 * the folder of dirfd. */
static void absolute(int dirfd, const char *p, char *out) {
    char base[PATH_MAX] = "";
    if (!p) { out[0] = 0; return; }
    if (p[0] == '/') { snprintf(out, PATH_MAX, "%s", p); return; }
    if (dirfd == AT_FDCWD) {
        if (!getcwd(base, sizeof base)) base[0] = 0;
    } else {
        char l[64];
        snprintf(l, sizeof l, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(l, base, sizeof base - 1);
        base[n > 0 ? n : 0] = 0;
    }
    snprintf(out, PATH_MAX, "%s/%s", base, p);
}

static void fd_path(int fd, char *out) {
    char l[64];
    snprintf(l, sizeof l, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(l, out, PATH_MAX - 1);
    out[n > 0 ? n : 0] = 0;
}

static void append_log(const char *what, const char *a, const char *b) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/log", shadow);
    FILE *f = fopen(p, "a");
    if (!f) return;
    fprintf(f, "%ld %s %s%s%s\n", count, what, a + root_len, b ? " " : "",
            b ? b + root_len : "");
    fclose(f);
}

/* Count a call (the lock is held); cut the power after the chosen one. */
static void counted(const char *what, const char *a, const char *b) {
    if (armed_at < 0 && (!arm[0] || access(arm, F_OK) == 0)) {
        armed_at = count;
        if (arm[0]) append_log("ARMED", root, NULL);
    }
    count++;
    append_log(what, a, b);
    if (cut_at > 0 && armed_at >= 0 && count - armed_at >= cut_at) {
        append_log("CUT", a, NULL);
        kill(getpid(), SIGKILL);
        for (;;) pause();
    }
}

static void snapshot_file(int fd, const struct stat *st) {
    char tmp[PATH_MAX], dst[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s/files/%lu.tmp", shadow, (unsigned long)st->st_ino);
    snprintf(dst, sizeof dst, "%s/files/%lu", shadow, (unsigned long)st->st_ino);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) return;
    /* The caller's descriptor may be write-only: read through a new one
     * on the same inode. */
    char l[64];
    snprintf(l, sizeof l, "/proc/self/fd/%d", fd);
    int in = open(l, O_RDONLY | O_CLOEXEC);
    if (in < 0) { close(out); return; }
    char buf[1 << 16];
    off_t off = 0;
    for (;;) {
        ssize_t n = pread(in, buf, sizeof buf, off);
        if (n <= 0) break;
        if (write(out, buf, n) != n) break;
        off += n;
    }
    close(in);
    close(out);
    if (off != st->st_size) return; /* a short copy is no record */
    rename(tmp, dst);
}

static void snapshot_dir(const char *path, const struct stat *st) {
    char tmp[PATH_MAX], dst[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s/dirs/%lu.tmp", shadow, (unsigned long)st->st_ino);
    snprintf(dst, sizeof dst, "%s/dirs/%lu", shadow, (unsigned long)st->st_ino);
    DIR *d = opendir(path);
    if (!d) return;
    FILE *f = fopen(tmp, "w");
    if (!f) { closedir(d); return; }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char kind = e->d_type == DT_DIR ? 'd' : e->d_type == DT_REG ? 'f' : 0;
        if (e->d_type == DT_UNKNOWN) {
            struct stat es;
            if (fstatat(dirfd(d), e->d_name, &es, AT_SYMLINK_NOFOLLOW) == 0)
                kind = S_ISDIR(es.st_mode) ? 'd' : S_ISREG(es.st_mode) ? 'f' : 0;
        }
        if (kind) fprintf(f, "%c %lu %s\n", kind, (unsigned long)e->d_ino, e->d_name);
    }
    fclose(f);
    closedir(d);
    rename(tmp, dst);
}

static int sync_common(int fd, int data_only) {
    load_fsync();
    load_fdatasync();
    init();
    if (inside || ready != 1) return data_only ? real_fdatasync(fd) : real_fsync(fd);
    char path[PATH_MAX];
    fd_path(fd, path);
    if (!under_root(path)) return data_only ? real_fdatasync(fd) : real_fsync(fd);
    pthread_mutex_lock(&lock);
    inside = 1;
    struct stat st;
    if (ignore[0] && strstr(path, ignore)) {
        /* as if this fsync had never been called */
    } else if (fstat(fd, &st) == 0) {
        if (S_ISDIR(st.st_mode)) snapshot_dir(path, &st);
        else if (S_ISREG(st.st_mode)) snapshot_file(fd, &st);
    }
    int r = data_only ? real_fdatasync(fd) : real_fsync(fd);
    counted(data_only ? "fdatasync" : "fsync", path, NULL);
    inside = 0;
    pthread_mutex_unlock(&lock);
    return r;
}

int fsync(int fd) { return sync_common(fd, 0); }
int fdatasync(int fd) { return sync_common(fd, 1); }

/* A path call: run it, and count it when it succeeded under the root. */
#define PATH_CALL(what, dfa, pa, dfb, pb, call)                          \
    do {                                                                 \
        init();                                                          \
        if (inside || ready != 1) return call;                           \
        char a_[PATH_MAX], b_[PATH_MAX];                                 \
        absolute(dfa, pa, a_);                                           \
        absolute(dfb, pb, b_);                                           \
        if (!under_root(a_) && !under_root(b_)) return call;             \
        pthread_mutex_lock(&lock);                                       \
        inside = 1;                                                      \
        int r_ = call;                                                   \
        int e_ = errno;                                                  \
        const char *pb_ = pb;                                            \
        if (r_ >= 0) counted(what, a_, pb_ ? b_ : NULL);                 \
        inside = 0;                                                      \
        pthread_mutex_unlock(&lock);                                     \
        errno = e_;                                                      \
        return r_;                                                       \
    } while (0)

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | __O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char *p, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    load_open();
    if (!(flags & O_CREAT)) return real_open(p, flags, m);
    PATH_CALL("create", AT_FDCWD, p, AT_FDCWD, (const char *)NULL, real_open(p, flags, m));
}
int open64(const char *p, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    load_open64();
    if (!(flags & O_CREAT)) return real_open64(p, flags, m);
    PATH_CALL("create", AT_FDCWD, p, AT_FDCWD, (const char *)NULL, real_open64(p, flags, m));
}
int openat(int d, const char *p, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    load_openat();
    if (!(flags & O_CREAT)) return real_openat(d, p, flags, m);
    PATH_CALL("create", d, p, AT_FDCWD, (const char *)NULL, real_openat(d, p, flags, m));
}
int openat64(int d, const char *p, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    load_openat64();
    if (!(flags & O_CREAT)) return real_openat64(d, p, flags, m);
    PATH_CALL("create", d, p, AT_FDCWD, (const char *)NULL, real_openat64(d, p, flags, m));
}
int creat(const char *p, mode_t m) {
    load_creat();
    PATH_CALL("create", AT_FDCWD, p, AT_FDCWD, (const char *)NULL, real_creat(p, m));
}
int rename(const char *a, const char *b) {
    load_rename();
    PATH_CALL("rename", AT_FDCWD, a, AT_FDCWD, b, real_rename(a, b));
}
int renameat(int da, const char *a, int db, const char *b) {
    load_renameat();
    PATH_CALL("rename", da, a, db, b, real_renameat(da, a, db, b));
}
int renameat2(int da, const char *a, int db, const char *b, unsigned f) {
    load_renameat2();
    PATH_CALL("rename", da, a, db, b, real_renameat2(da, a, db, b, f));
}
int link(const char *a, const char *b) {
    load_link();
    PATH_CALL("link", AT_FDCWD, a, AT_FDCWD, b, real_link(a, b));
}
int linkat(int da, const char *a, int db, const char *b, int f) {
    load_linkat();
    PATH_CALL("link", da, a, db, b, real_linkat(da, a, db, b, f));
}
int unlink(const char *p) {
    load_unlink();
    PATH_CALL("unlink", AT_FDCWD, p, AT_FDCWD, (const char *)NULL, real_unlink(p));
}
int unlinkat(int d, const char *p, int f) {
    load_unlinkat();
    PATH_CALL("unlink", d, p, AT_FDCWD, (const char *)NULL, real_unlinkat(d, p, f));
}
int mkdir(const char *p, mode_t m) {
    load_mkdir();
    PATH_CALL("mkdir", AT_FDCWD, p, AT_FDCWD, (const char *)NULL, real_mkdir(p, m));
}
int mkdirat(int d, const char *p, mode_t m) {
    load_mkdirat();
    PATH_CALL("mkdir", d, p, AT_FDCWD, (const char *)NULL, real_mkdirat(d, p, m));
}
int rmdir(const char *p) {
    load_rmdir();
    PATH_CALL("rmdir", AT_FDCWD, p, AT_FDCWD, (const char *)NULL, real_rmdir(p));
}
