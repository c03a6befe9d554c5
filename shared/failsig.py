"""Error lines of a failed target's output and its failure signature (pure; ``docs/failures.md``).

An *error line* is a line that says something failed: a compiler's ``error:``/``fatal error:``,
make's ``*** … Error N``, ninja's ``FAILED:``, the linker's ``undefined reference``, a failed
``assert()``, a killed process, a full disk or a file-size limit.  The *signature* is the first
error line with what changes from build to build taken out — directories (the file's base name
stays), temp names, hex hashes, numbers — so the same failure groups across builds and machines.
"""

from __future__ import annotations

import re

MAX_ERRORS = 10
SIGNATURE_CHARS = 240

_ERROR = re.compile(
    r"error:|error\[|\bError\b|\bERROR\b|FAILED|undefined reference|multiple definition|fatal:|"
    r"Segmentation fault|\bKilled\b|\bAborted\b|Traceback \(most recent call last\)|\bpanic:|"
    # glibc's assert(): "prog: file.c:3: main: Assertion `x' failed." (before the shell's "Aborted")
    r"\bAssertion [`'\u2018].*['\u2019] failed|"
    # the shell's word for SIGXFSZ: a write past RLIMIT_FSIZE (ulimit -f)
    r"File size limit exceeded|"
    # what the machine or the network says (failure classes: shared/failclass.py)
    r"No space left on device|Cannot allocate memory|[Oo]ut of memory|std::bad_alloc|Could not resolve host|"
    r"Temporary failure in name resolution|Connection refused|Connection reset")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A path under a temporary directory, whole (its name is random too).
_TEMP_PATH = re.compile(r"(?:/tmp|/var/tmp|/private/var/folders|/dev/shm)/[^\s:'\"`()\[\]]*")
# Directories of a path: what is left is the file's base name.
_DIRS = re.compile(r"(?<![\w.])(?:\.{0,2}/)?(?:[\w.+@~-]+/)+(?=[\w.+@~-])")
_TEMP_NAME = re.compile(r"\b(?:cc[A-Za-z0-9]{6}|tmp[A-Za-z0-9_]{6,})(?=\.\w+\b|\b)")
_HEX = re.compile(r"\b(?:0x[0-9a-fA-F]+|[0-9a-f]{8,})\b")
_NUMBER = re.compile(r"(?<!\w)\d+(?:\.\d+)*")
_SPACE = re.compile(r"\s+")


def is_error_line(line: str) -> bool:
    return bool(_ERROR.search(line))


def error_lines(lines: list[str], limit: int = MAX_ERRORS) -> list[str]:
    """The first ``limit`` error lines of ``lines``."""
    out: list[str] = []
    for line in lines:
        if _ERROR.search(line):
            out.append(line)
            if len(out) >= limit:
                break
    return out


def quoted_only(line: str) -> bool:
    """Whether every error word of ``line`` stands inside quotes: a command line that prints an
    error message (``echo "Error: …"``, as make echoes it), not the error itself."""
    for m in _ERROR.finditer(line):
        before = line[:m.start()]
        if before.count('"') % 2 == 0 and before.count("'") % 2 == 0:
            return False
    return True


def signature(line: str) -> str:
    """``line`` normalised: ANSI colours, directories, temp names, hex hashes and numbers replaced."""
    s = _ANSI.sub("", line)
    s = _TEMP_PATH.sub("<tmp>", s)
    s = _DIRS.sub("", s)
    s = _TEMP_NAME.sub("<tmp>", s)
    s = _HEX.sub("<hex>", s)
    s = _NUMBER.sub("N", s)
    return _SPACE.sub(" ", s).strip()[:SIGNATURE_CHARS]
