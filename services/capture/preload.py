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

from services.capture.shellwrap import capture_dir, compile_c, digest

PRELOAD_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);
typedef pid_t (*wait4_fn)(pid_t, int *, int, struct rusage *);
static spawn_fn real_spawn, real_spawnp;
static wait4_fn real_wait4;
static int fd = -1;
static pid_t self;
static char *child_preload;  /* "LD_PRELOAD=<what the user had>", or NULL */

#define SLOTS 4096
static struct { pid_t pid; long long s; long us; char *target; } slots[SLOTS];

__attribute__((constructor)) static void init(void) {
    real_spawn = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawn");
    real_spawnp = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawnp");
    real_wait4 = (wait4_fn)dlsym(RTLD_NEXT, "wait4");
    const char *ev = getenv("BUILDTEL_CAPTURE_EVENTS");
    if (!ev || !real_spawn || !real_wait4) return;
    fd = open(ev, O_WRONLY | O_APPEND | O_CLOEXEC);
    self = getpid();
    const char *orig = getenv("BUILDTEL_ORIG_LD_PRELOAD");
    if (orig && *orig && asprintf(&child_preload, "LD_PRELOAD=%s", orig) < 0) child_preload = 0;
}

static int ours(const char *e) {
    return !strncmp(e, "LD_PRELOAD=", 11) || !strncmp(e, "BUILDTEL_CAPTURE_EVENTS=", 24)
        || !strncmp(e, "BUILDTEL_ORIG_LD_PRELOAD=", 25) || !strncmp(e, "BUILDTEL_TARGET=", 16);
}

static int spawn(spawn_fn fn, pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                 const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    if (fd < 0 || getpid() != self || !envp) return fn(pid, path, fa, attr, argv, envp);
    size_t n = 0;
    while (envp[n]) n++;
    char **env = malloc(sizeof(char *) * (n + 2));
    if (!env) return fn(pid, path, fa, attr, argv, envp);
    const char *target = 0;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!strncmp(envp[i], "BUILDTEL_TARGET=", 16)) target = envp[i] + 16;
        if (!ours(envp[i])) env[k++] = envp[i];  /* the build's children run without us */
    }
    if (child_preload) env[k++] = child_preload;
    env[k] = 0;
    struct timespec t0;
    clock_gettime(CLOCK_REALTIME, &t0);
    pid_t child = 0;
    int rc = fn(&child, path, fa, attr, argv, env);
    free(env);
    if (pid) *pid = child;
    if (rc == 0 && target && *target) {  /* $(shell ...) at parse time: no target, not a recipe */
        char name[3072], line[3300];
        size_t i = 0;
        for (; target[i] && i + 1 < sizeof name; i++)
            name[i] = (target[i] == '\t' || target[i] == '\n' || target[i] == '\r') ? ' ' : target[i];
        name[i] = 0;
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
    if (fd < 0 || !(WIFEXITED(status) || WIFSIGNALED(status))) return;
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
