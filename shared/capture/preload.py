"""The library ``buildtel run`` preloads into GNU make to time its recipes from inside make.

make spawns each recipe line with ``posix_spawn`` and reaps it with ``waitpid``
(or ``wait``/``wait3``); with ``LD_PRELOAD`` this library wraps those calls in
make's process only: a child whose environment carries ``BUILDTEL_TARGET`` (make
exports it per recipe line, see ``make.py``) gets an ``S`` line when spawned and
an ``F`` line, with its exit status and ``wait4`` rusage, when reaped — the same
lines and file as the SHELL wrapper (``shellwrap.py``).  Children are spawned
with an environment without the library and its variables (the user's own
``LD_PRELOAD`` is given back), so compilers never load it.

Compared with the wrapper it adds no process per recipe line (one ``exec`` is
~0.5 ms on the small VMs the tests run on, 2-4 % of a small compile) and leaves
``SHELL`` alone, so make keeps exec'ing simple lines without a shell.  It needs a
dynamically linked ELF make that imports ``posix_spawn`` (glibc builds of GNU make
4.x); :func:`make_can_preload` checks, and everything else falls back to the wrapper.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from buildtel.shared.capture.shellwrap import capture_dir, compile_c, digest

PRELOAD_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);
typedef pid_t (*wait4_fn)(pid_t, int *, int, struct rusage *);
typedef FILE *(*fopen_fn)(const char *, const char *);
static spawn_fn real_spawn, real_spawnp;
static wait4_fn real_wait4;
static fopen_fn real_fopen, real_fopen64;
static int fd = -1;
static pid_t self;
static int cwd_sent;
static int role;  /* 0: another program (inherits us, records nothing), 1: make, 2: ninja */
static long long t_start_s; static long t_start_us;
static char *child_preload;  /* "LD_PRELOAD=<what the user had>", or NULL */

#define SLOTS 4096
static struct { pid_t pid; long long s; long us; char *target; } slots[SLOTS];

static void put(const char *line, int len) {
    if (len > 0 && fd >= 0) { ssize_t w = write(fd, line, (size_t)len); (void)w; }
}

static void clean(char *dst, const char *src, size_t cap) {
    size_t i = 0;
    for (; src[i] && i + 1 < cap; i++)
        dst[i] = (src[i] == '\t' || src[i] == '\n' || src[i] == '\r' || src[i] == '\x1f') ? ' ' : src[i];
    dst[i] = 0;
}

/* "N" line: a ninja started (its exe, cwd and argv), so the parent can find its log and
   count what it had to do. */
static void ninja_started(void) {
    char exe[1024] = "", cwd[1024] = "", args[3072] = "", raw[3072], line[8192];
    ssize_t n = readlink("/proc/self/exe", raw, sizeof raw - 1);
    if (n > 0) { raw[n] = 0; clean(exe, raw, sizeof exe); }
    if (getcwd(raw, sizeof raw)) clean(cwd, raw, sizeof cwd);
    int cf = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (cf >= 0) {
        ssize_t r = read(cf, raw, sizeof raw - 1);
        close(cf);
        /* Arguments separated by \x1f; blanks stand for tabs and newlines inside one. */
        for (ssize_t i = 0; i < r && i + 1 < (ssize_t)sizeof args; i++)
            args[i] = !raw[i] ? (i + 1 < r ? '\x1f' : 0)
                    : (raw[i] == '\t' || raw[i] == '\n' || raw[i] == '\r' || raw[i] == '\x1f') ? ' ' : raw[i];
        if (r > 0) args[r < (ssize_t)sizeof args ? r : (ssize_t)sizeof args - 1] = 0;
    }
    int len = snprintf(line, sizeof line, "N\t%d\t%d\t%lld.%06ld\t%s\t%s\t%s\n", (int)self, (int)getppid(),
                       t_start_s, t_start_us, exe, cwd, args);
    put(line, len);
}

__attribute__((constructor)) static void init(void) {
    real_spawn = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawn");
    real_spawnp = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawnp");
    real_wait4 = (wait4_fn)dlsym(RTLD_NEXT, "wait4");
    real_fopen = (fopen_fn)dlsym(RTLD_NEXT, "fopen");
    real_fopen64 = (fopen_fn)dlsym(RTLD_NEXT, "fopen64");
    const char *ev = getenv("BUILDTEL_CAPTURE_EVENTS");
    if (!ev || !real_spawn || !real_wait4) return;
    /* The program, not argv[0]: a gmake symlink, a pip-installed ninja behind a launcher. */
    char exe[1024];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    const char *name = program_invocation_short_name;
    if (n > 0) { exe[n] = 0; const char *s = strrchr(exe, '/'); name = s ? s + 1 : exe; }
    if (!strcmp(name, "make") || !strcmp(name, "gmake")) role = 1;
    else if (!strcmp(name, "ninja") || !strcmp(name, "ninja-build") || !strcmp(name, "samu")) role = 2;
    else return;  /* shells, scripts, cmake: nothing to record; their children inherit us */
    fd = open(ev, O_WRONLY | O_APPEND | O_CLOEXEC);
    self = getpid();
    struct timespec t0;
    clock_gettime(CLOCK_REALTIME, &t0);
    t_start_s = t0.tv_sec; t_start_us = t0.tv_nsec / 1000;
    const char *orig = getenv("BUILDTEL_ORIG_LD_PRELOAD");
    if (orig && *orig && asprintf(&child_preload, "LD_PRELOAD=%s", orig) < 0) child_preload = 0;
    if (role == 1) {
        char cwd[1024] = "", raw[1024], line[1200];
        if (getcwd(raw, sizeof raw)) clean(cwd, raw, sizeof cwd);
        put(line, snprintf(line, sizeof line, "M\t%d\t%d\t%lld.%06ld\t%s\n", (int)self, (int)getppid(),
                           t_start_s, t_start_us, cwd));
    } else {
        ninja_started();
    }
}

/* ninja opens its log for appending (lazily, before the first edge of this run is written):
   its size then is where this run's lines begin, whatever the parent saw and whenever. */
static FILE *log_open(fopen_fn fn, const char *path, const char *mode) {
    FILE *f = fn ? fn(path, mode) : 0;
    if (role != 2 || !f || fd < 0 || !strchr(mode, 'a')) return f;
    const char *b = strrchr(path, '/');
    if (strcmp(b ? b + 1 : path, ".ninja_log")) return f;
    struct stat st;
    char abs[2048] = "", raw[2048], line[2300];
    if (fstat(fileno(f), &st)) return f;
    if (path[0] == '/') clean(abs, path, sizeof abs);
    else if (getcwd(raw, 1024)) { strncat(raw, "/", sizeof raw - strlen(raw) - 1);
                                  strncat(raw, path, sizeof raw - strlen(raw) - 1); clean(abs, raw, sizeof abs); }
    put(line, snprintf(line, sizeof line, "L\t%d\t%lld\t%s\n", (int)self, (long long)st.st_size, abs));
    return f;
}

FILE *fopen(const char *path, const char *mode) {
    if (!real_fopen) real_fopen = (fopen_fn)dlsym(RTLD_NEXT, "fopen");
    return log_open(real_fopen, path, mode);
}

FILE *fopen64(const char *path, const char *mode) {
    if (!real_fopen64) real_fopen64 = (fopen_fn)dlsym(RTLD_NEXT, "fopen64");
    return log_open(real_fopen64, path, mode);
}

static int ours(const char *e) {
    return !strncmp(e, "LD_PRELOAD=", 11) || !strncmp(e, "BUILDTEL_CAPTURE_EVENTS=", 24)
        || !strncmp(e, "BUILDTEL_ORIG_LD_PRELOAD=", 25) || !strncmp(e, "BUILDTEL_TARGET=", 16);
}

/* A child that may start a build tool keeps the library: a sub-make ($(MAKE) -C sub, or a line
   naming make, cmake or ninja).  Compilers and every other child run without it. */
static int may_build(char *const argv[]) {
    for (int i = 0; argv && argv[i]; i++)
        if (strstr(argv[i], "make") || strstr(argv[i], "ninja")) return 1;
    return 0;
}

static int spawn(spawn_fn fn, pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                 const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    if (fd < 0 || role == 0 || getpid() != self || !envp) return fn(pid, path, fa, attr, argv, envp);
    size_t n = 0;
    while (envp[n]) n++;
    char **env = malloc(sizeof(char *) * (n + 2));
    if (!env) return fn(pid, path, fa, attr, argv, envp);
    const char *target = 0;
    int keep = may_build(argv);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int target_var = !strncmp(envp[i], "BUILDTEL_TARGET=", 16);
        if (target_var) target = envp[i] + 16;
        /* Children run without us (a sub-make keeps us but never its parent's target name). */
        if (keep ? !target_var : !ours(envp[i])) env[k++] = envp[i];
    }
    if (child_preload && !keep) env[k++] = child_preload;
    env[k] = 0;
    if (role != 1) target = 0;  /* ninja's edges come from its log */
    struct timespec t0;
    clock_gettime(CLOCK_REALTIME, &t0);
    pid_t child = 0;
    int rc = fn(&child, path, fa, attr, argv, env);
    free(env);
    if (pid) *pid = child;
    if (rc == 0 && target && *target) {  /* $(shell ...) at parse time: no target, not a recipe */
        char name[3072], line[3300];
        clean(name, target, sizeof name);
        if (!cwd_sent) {  /* where make works (after -C), known only once it runs recipes */
            char cwd[1024] = "", raw[1024], dl[1200];
            if (getcwd(raw, sizeof raw)) clean(cwd, raw, sizeof cwd);
            put(dl, snprintf(dl, sizeof dl, "D\t%d\t%s\n", (int)self, cwd));
            cwd_sent = 1;
        }
        int len = snprintf(line, sizeof line, "S\t%d\t%d\t%lld.%06ld\t%s\n", (int)child, (int)self,
                           (long long)t0.tv_sec, t0.tv_nsec / 1000, name);
        if (len > 0) { ssize_t w = write(fd, line, (size_t)len); (void)w; }
        for (int j = 0; j < SLOTS; j++) {
            int s = (int)((unsigned)child + j) % SLOTS;
            if (slots[s].pid == 0) {
                slots[s].pid = child; slots[s].s = t0.tv_sec; slots[s].us = t0.tv_nsec / 1000;
                slots[s].target = strdup(name);
                break;
            }
        }
    }
    return rc;
}

int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    return spawn(real_spawn, pid, path, fa, attr, argv, envp);
}

int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                 const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    return spawn(real_spawnp, pid, file, fa, attr, argv, envp);
}

static void reaped(pid_t pid, int status, const struct rusage *ru) {
    if (fd < 0 || role != 1 || !(WIFEXITED(status) || WIFSIGNALED(status))) return;
    for (int j = 0; j < SLOTS; j++) {
        int s = (int)((unsigned)pid + j) % SLOTS;
        if (slots[s].pid != pid) continue;
        struct timespec t1;
        clock_gettime(CLOCK_REALTIME, &t1);
        int code = WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
        char line[3400];
        int len = snprintf(line, sizeof line, "F\t%d\t%d\t%lld.%06ld\t%lld.%06ld\t%d\t%lld\t%lld\t%ld\t%s\n",
                           (int)pid, (int)self, slots[s].s, slots[s].us, (long long)t1.tv_sec, t1.tv_nsec / 1000,
                           code, (long long)ru->ru_utime.tv_sec * 1000000 + ru->ru_utime.tv_usec,
                           (long long)ru->ru_stime.tv_sec * 1000000 + ru->ru_stime.tv_usec, ru->ru_maxrss,
                           slots[s].target ? slots[s].target : "");
        if (len > 0) { ssize_t w = write(fd, line, (size_t)len); (void)w; }
        free(slots[s].target);
        slots[s].target = 0;
        slots[s].pid = 0;
        return;
    }
}

pid_t waitpid(pid_t pid, int *status, int options) {
    struct rusage ru;
    int st = 0;
    pid_t r = real_wait4(pid, &st, options, &ru);
    if (status) *status = st;
    if (r > 0) reaped(r, st, &ru);
    return r;
}

pid_t wait(int *status) { return waitpid(-1, status, 0); }

pid_t wait3(int *status, int options, struct rusage *rusage) {
    struct rusage ru;
    int st = 0;
    pid_t r = real_wait4(-1, &st, options, &ru);
    if (status) *status = st;
    if (rusage) *rusage = ru;
    if (r > 0) reaped(r, st, &ru);
    return r;
}
"""


def preload_path(cache_dir: Path) -> Path | None:
    """The LD_PRELOAD library (built on first use), or None without a C compiler."""
    lib = capture_dir(cache_dir) / f"libbuildtel-make-{digest(PRELOAD_SOURCE)}.so"
    if lib.exists():
        return lib
    return compile_c(PRELOAD_SOURCE, lib, [["-shared", "-fPIC", "-ldl"], ["-shared", "-fPIC"]])


def make_can_preload(make: str) -> bool:
    """Whether ``make`` is a dynamically linked ELF that spawns with posix_spawn: what the
    preload library interposes.  Anything else (static, vfork-only, Mach-O) uses the wrapper."""
    path = shutil.which(make)
    if not path:
        return False
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or b"posix_spawn\x00" not in data:
        return False
    is64, order = data[4] == 2, "<" if data[5] == 1 else ">"
    try:
        if is64:
            phoff, = struct.unpack_from(order + "Q", data, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
        else:
            phoff, = struct.unpack_from(order + "I", data, 0x1C)
            phentsize, phnum = struct.unpack_from(order + "HH", data, 0x2A)
        return any(struct.unpack_from(order + "I", data, phoff + i * phentsize)[0] == 3  # PT_INTERP
                   for i in range(phnum))
    except struct.error:
        return False
