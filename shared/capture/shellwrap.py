"""The tiny SHELL wrapper make runs each recipe line through, and how it is built.

Used when make cannot take the preload library (``preload.py``: a static make, one
without ``posix_spawn``, not ELF); both write the same event lines.

make invokes ``$(SHELL) $(.SHELLFLAGS) 'recipe line'`` for every recipe line; the
capture sets ``SHELL`` to ``<wrapper> <events file> <the makefile's own SHELL>``
(see ``shared/capture/make.py``), so the wrapper receives
``argv = [wrapper, EVENTS, REAL_SHELL…, FLAGS…, LINE]``.  It appends one ``S``
line to EVENTS, runs the rest of argv, appends one ``F`` line with the exit
status and the ``wait4`` rusage, and exits the way the recipe did (same code,
or the same signal re-raised) so make cannot tell it is there.

It is C, compiled once per cache directory with the system compiler: a Python
wrapper would cost ~20 ms of interpreter start-up per recipe, ~50 % of a small
compile.  The C one costs one exec plus two ``write(2)``\\ s with ``O_APPEND``
(atomic between processes for lines under ``PIPE_BUF`` on local filesystems).
When the line is one that make itself would have ``exec``'d without a shell
(no shell metacharacters, not a builtin, a Bourne shell with ``-c``/``-ec``),
the wrapper execs it directly too, so the build runs the same processes it runs
without telemetry.  Without a C compiler a bash script is used (``$EPOCHREALTIME``,
no fork for the clock); without bash ≥ 5, make is not captured per recipe.

Event lines (tab-separated, one ``write`` each)::

    S  pid  make_pid  start                                     target
    F  pid  make_pid  start  end  status  utime_us  stime_us  maxrss_kib  target

``start``/``end`` are Unix seconds with microseconds; ``status`` is the exit code,
or minus the signal number.  ``BUILDTEL_TARGET`` (exported by make as ``$@``)
names the target; when it is missing (``$(shell …)``, or ``$(SHELL)`` used inside
a recipe: the wrapper removes it from its child's environment) the wrapper just
execs the real shell and records nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from buildtel.shared.files import private_dir

TARGET_VAR = "BUILDTEL_TARGET"

C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;
static volatile pid_t child = 0;
static volatile sig_atomic_t pending = 0;

static void forward(int sig) {
    if (child > 0) kill(child, sig); else pending = sig;
}

static const char *base(const char *p) { const char *s = strrchr(p, '/'); return s ? s + 1 : p; }

/* make's own rule for running a line without a shell (job.c, construct_command_argv_internal),
   made stricter: any quoting or metacharacter at all sends the line to the shell. */
static char **simple_argv(int argc, char **argv) {
    static const char *builtins[] = {".", ":", "alias", "bg", "break", "case", "cd", "command",
        "continue", "eval", "exec", "exit", "export", "fc", "fg", "for", "getopts", "hash", "if",
        "jobs", "login", "read", "readonly", "return", "set", "shift", "test", "times", "trap",
        "type", "ulimit", "umask", "unalias", "unset", "wait", "while", "[", "!", "{", 0};
    if (argc != 5) return 0;
    const char *sh = base(argv[2]);
    if (strcmp(sh, "sh") && strcmp(sh, "bash") && strcmp(sh, "dash")) return 0;
    if (strcmp(argv[3], "-c") && strcmp(argv[3], "-ec")) return 0;
    const char *line = argv[4];
    if (strpbrk(line, "#;\"'*?[]&|<>(){}$`^~!\\\n\r")) return 0;
    size_t n = strlen(line);
    char *copy = malloc(n + 1);
    char **words = malloc(sizeof(char *) * (n / 2 + 2));
    if (!copy || !words) return 0;
    memcpy(copy, line, n + 1);
    int k = 0;
    for (char *t = strtok(copy, " \t"); t; t = strtok(0, " \t")) words[k++] = t;
    words[k] = 0;
    if (k == 0 || strchr(words[0], '=')) return 0;  /* VAR=value cmd: the shell's job */
    for (int i = 0; builtins[i]; i++) if (!strcmp(words[0], builtins[i])) return 0;
    return words;
}

static void clean(char *dst, const char *src, size_t cap) {
    size_t i = 0;
    for (; src[i] && i + 1 < cap; i++) dst[i] = (src[i] == '\t' || src[i] == '\n' || src[i] == '\r') ? ' ' : src[i];
    dst[i] = 0;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "buildtel shell wrapper: usage: %s EVENTS SHELL [ARGS...]\n", argv[0]); return 2; }
    char **real = argv + 2;
    const char *target = getenv("BUILDTEL_TARGET");
    int fd = target ? open(argv[1], O_WRONLY | O_APPEND | O_CLOEXEC) : -1;
    if (fd < 0) {  /* not a recipe of the captured make, or no events file: be the shell */
        if (strchr(real[0], '/')) execv(real[0], real); else execvp(real[0], real);
        fprintf(stderr, "%s: %s\n", real[0], strerror(errno));
        return 127;
    }
    char name[3072];
    clean(name, target, sizeof name);
    unsetenv("BUILDTEL_TARGET");  /* a $(SHELL) inside the recipe must not record again */

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sigemptyset(&sa.sa_mask);
    int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    for (int i = 0; i < 4; i++) sigaction(sigs[i], &sa, 0);

    char line[4096];
    struct timespec t0, t1;
    clock_gettime(CLOCK_REALTIME, &t0);
    pid_t me = getpid(), mk = getppid();
    int len = snprintf(line, sizeof line, "S\t%d\t%d\t%lld.%06ld\t%s\n", (int)me, (int)mk,
                       (long long)t0.tv_sec, t0.tv_nsec / 1000, name);
    if (len > 0) { ssize_t w = write(fd, line, (size_t)len); (void)w; }

    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t def;
    sigemptyset(&def);
    for (int i = 0; i < 4; i++) sigaddset(&def, sigs[i]);
    posix_spawnattr_setsigdefault(&attr, &def);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);
    char **direct = simple_argv(argc, argv);
    char **run = direct ? direct : real;
    pid_t pid;
    int err = strchr(run[0], '/') ? posix_spawn(&pid, run[0], 0, &attr, run, environ)
                                   : posix_spawnp(&pid, run[0], 0, &attr, run, environ);
    int status = 0, code;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    if (err) {
        fprintf(stderr, "make: %s: %s\n", run[0], strerror(err));
        code = (err == ENOENT) ? 127 : 126;
    } else {
        child = pid;
        if (pending) kill(pid, pending);
        while (wait4(pid, &status, 0, &ru) < 0 && errno == EINTR) {}
        code = WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
    }
    clock_gettime(CLOCK_REALTIME, &t1);
    len = snprintf(line, sizeof line, "F\t%d\t%d\t%lld.%06ld\t%lld.%06ld\t%d\t%lld\t%lld\t%ld\t%s\n",
                   (int)me, (int)mk, (long long)t0.tv_sec, t0.tv_nsec / 1000,
                   (long long)t1.tv_sec, t1.tv_nsec / 1000, code,
                   (long long)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec,
                   (long long)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec, ru.ru_maxrss, name);
    if (len > 0) { ssize_t w = write(fd, line, (size_t)len); (void)w; }
    close(fd);
    if (code < 0) {  /* die of the same signal, so make reports it as it would have */
        signal(-code, SIG_DFL);
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, -code);
        sigprocmask(SIG_UNBLOCK, &s, 0);
        raise(-code);
        return 128 - code;
    }
    return code;
}
"""

# The fallback: bash >= 5 reads the clock without forking.  Same argv and event lines; no rusage.
BASH_SOURCE = r"""#!/usr/bin/env bash
events=$1; shift
if [[ -z ${BUILDTEL_TARGET+x} || ! -w $events ]]; then exec "$@"; fi
t=${BUILDTEL_TARGET//[$'\t\n\r']/ }; unset BUILDTEL_TARGET
s=$EPOCHREALTIME
printf 'S\t%d\t%d\t%s\t%s\n' $$ $PPID "$s" "$t" >>"$events"
"$@"; rc=$?
e=$EPOCHREALTIME
(( rc > 128 && rc < 160 )) && st=$(( 128 - rc )) || st=$rc
printf 'F\t%d\t%d\t%s\t%s\t%d\t0\t0\t0\t%s\n' $$ $PPID "$s" "$e" "$st" "$t" >>"$events"
exit $rc
"""


def digest(*sources: str) -> str:
    return hashlib.sha256("".join(sources).encode()).hexdigest()[:12]


def capture_dir(cache_dir: Path) -> Path:
    d = cache_dir.expanduser().resolve() / "capture"
    try:
        return private_dir(d)
    except OSError:
        d = Path(tempfile.gettempdir()) / f"buildtel-capture-{os.getuid()}"
        d.mkdir(exist_ok=True, mode=0o700)
        return d


def wrapper_path(cache_dir: Path) -> Path | None:
    """The wrapper executable under ``cache_dir`` (built on first use), or None when it
    cannot be built here.  Built once: later runs only ``stat`` it."""
    d = capture_dir(cache_dir)
    exe = d / f"buildtel-shell-{digest(C_SOURCE, BASH_SOURCE)}"
    if os.access(exe, os.X_OK):
        return exe
    # Static first: no dynamic loader at every recipe.
    return compile_c(C_SOURCE, exe, [["-static"], []]) or _build_bash(exe)


def compile_c(source: str, out_path: Path, variants: list[list[str]]) -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc or not shutil.which(cc.split()[0]):
        return None
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        src = Path(tmp) / "src.c"
        src.write_text(source)
        out = Path(tmp) / "out"
        for extra in variants:
            flags = [f for f in extra if f != "-ldl"]
            libs = [f for f in extra if f == "-ldl"]
            try:
                res = subprocess.run([*cc.split(), "-O2", *flags, "-o", str(out), str(src), *libs],
                                     capture_output=True, timeout=60, check=False)
            except (OSError, subprocess.TimeoutExpired):
                return None
            if res.returncode == 0 and out.exists():
                os.chmod(out, 0o700)  # the build runs as the same user
                os.replace(out, out_path)  # atomic: a concurrent run sees the old or the new file whole
                return out_path
    return None


def _build_bash(exe: Path) -> Path | None:
    bash = shutil.which("bash")
    if not bash:
        return None
    try:
        ver = subprocess.run([bash, "-c", "echo ${BASH_VERSINFO[0]}"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not ver.isdigit() or int(ver) < 5:
        return None
    tmp = exe.with_suffix(".tmp")
    tmp.write_text(BASH_SOURCE.replace("/usr/bin/env bash", bash, 1))
    os.chmod(tmp, 0o700)
    os.replace(tmp, exe)
    return exe
