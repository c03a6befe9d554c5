"""Failure classes: why a target failed — ``code``, ``infra``, ``flaky`` or ``unknown`` (pure;
``docs/failures.md`` "Failure classes" lists the rules with their sources).

A failure is classified from what is known of it alone: the error lines and output it printed,
its exit code (a signal when 128+N or negative), the tool's own failure code (Bazel's
``failureDetail``) and, for Bazel, the build's exit code.  The rules are tried in order — the
farm's own (a TOML file named by ``BUILDER_TELEMETRY_FAILURE_RULES``) first, then the built-in
table below, infrastructure before code (an out-of-memory kill prints ``fatal error:`` too) —
and the first that matches gives the class; none matching gives ``unknown``.  ``flaky`` needs
other builds (the same target passed on the same commit): the storage service's ``failures``
query decides it (services/storage/failures.py), not this module; a farm rule may say it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from buildtel.shared.protocol import FAILURE_CLASSES

TEXT_CHARS = 64 * 1024  # of a failure's text searched by the rules: bounded work per failure
# Signals sent to a process from outside it (signal(7)): the machine, a supervisor or a limit ended it.
# SIGSEGV, SIGABRT, SIGFPE, SIGILL and SIGBUS are the program's own faults: not infra by themselves.
OUTSIDE_SIGNALS = {1: "SIGHUP", 9: "SIGKILL", 14: "SIGALRM", 15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ"}


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: every condition given must hold (at least one is given)."""

    name: str
    cls: str
    pattern: re.Pattern[str] | None = None  # searched in the error lines and output
    exit_codes: frozenset[int] = frozenset()  # the target's exit status
    signals: frozenset[int] = frozenset()  # the signal that ended it (exit 128+N, or -N)
    tool_codes: frozenset[str] = frozenset()  # the tool's failure code, e.g. spawn.REMOTE_CACHE_FAILED
    build_exit_codes: frozenset[int] = frozenset()  # Bazel builds: the build's exit code
    source: str = ""  # where the rule comes from (docs)


@dataclass(frozen=True, slots=True)
class Evidence:
    """What is known of one failure."""

    text: str = ""  # its error lines and output, newline-joined
    exit_code: int | None = None
    tool_code: str = ""
    build_exit_code: int | None = None  # only for Bazel builds (its exit codes have documented meanings)

    @property
    def signal(self) -> int | None:
        code = self.exit_code
        if code is None:
            return None
        if code < 0:  # Python's subprocess: killed by signal -code
            return -code
        if 128 < code <= 128 + 64:  # the shell's 128+N
            return code - 128
        return None


def _re(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.MULTILINE)


SIGNAL_DOC = "signal(7); the shell reports a child killed by signal N as exit status 128+N"
BAZEL_EXIT_DOC = "Bazel exit codes (bazel.build/run/scripts#exit-codes)"
BAZEL_FD_DOC = "Bazel failure_details.proto (Spawn.Code, RemoteExecution)"
DEVELOCITY_DOC = "Develocity failure classification: verification vs. build/infrastructure failures"

BUILTIN: tuple[Rule, ...] = (
    # -- infra: the machine, the network, the remote services -----------------------------------
    Rule("signal", "infra", signals=frozenset(OUTSIDE_SIGNALS), source=SIGNAL_DOC),
    Rule("killed", "infra", _re(r"\bKilled\b|\bTerminated\b|Killed signal terminated program|OOMKilled"),
         source=SIGNAL_DOC + " (the shell's and make's words for SIGKILL/SIGTERM)"),
    Rule("out-of-memory", "infra", _re(
        r"[Oo]ut of memory|Cannot allocate memory|std::bad_alloc|\bMemoryError\b|virtual memory exhausted|"
        r"\bENOMEM\b|java\.lang\.OutOfMemoryError"), source="errno ENOMEM (errno(3)); C++ std::bad_alloc"),
    Rule("no-space", "infra", _re(r"No space left on device|\bENOSPC\b|Disk quota exceeded|\bEDQUOT\b|"
                                  r"File size limit exceeded"), source="errno ENOSPC, EDQUOT (errno(3))"),
    Rule("network", "infra", _re(
        r"Could not resolve host|Temporary failure in name resolution|Name or service not known|"
        r"Connection refused|Connection reset|Connection timed out|Network is unreachable|No route to host|"
        r"\bECONNREFUSED\b|\bECONNRESET\b|\bETIMEDOUT\b|TLS handshake timeout|\bi/o timeout\b|"
        r"(?:Read|Connect) timed out"), source="errno ECONNREFUSED, ECONNRESET, ETIMEDOUT (errno(3)); getaddrinfo(3)"),
    Rule("timeout", "infra", exit_codes=frozenset({124}),
         source="timeout(1): exit status 124 when the command timed out"),
    Rule("remote", "infra", tool_codes=frozenset({
        "spawn.TIMEOUT", "spawn.OUT_OF_MEMORY", "spawn.EXECUTION_FAILED", "spawn.EXECUTION_DENIED",
        "spawn.REMOTE_CACHE_FAILED", "spawn.EXEC_IO_EXCEPTION", "spawn.REMOTE_CACHE_EVICTED",
        "spawn.UNSPECIFIED_EXECUTION_FAILURE"}), source=BAZEL_FD_DOC),
    Rule("remote-execution", "infra", tool_codes=frozenset({"remote_execution.", "remote_options."}),
         source=BAZEL_FD_DOC),
    Rule("bazel-exit", "infra", build_exit_codes=frozenset({33, 34, 36, 37, 38, 39, 45}),
         source=BAZEL_EXIT_DOC + ": 33 out of memory, 34 remote error, 36 local environment (e.g. disk full), "
         "37 internal error, 38 and 45 build event upload, 39 remote cache evicted blobs"),
    # -- code: what the sources say ---------------------------------------------------------------
    Rule("compiler", "code", _re(
        r"^\S+?:\d+(?::\d+)?: (?:fatal )?error[:\[]|\berror\[E\d+\]|\berror C\d{4}\b|\berror TS\d+\b|"
        r"\bSyntaxError\b|^error: (?:could not compile|aborting due to)"),
        source=DEVELOCITY_DOC + "; GCC/Clang 'file:line:col: error:', rustc error[E…], MSVC C…, tsc TS…"),
    Rule("linker", "code", _re(
        r"undefined reference to|multiple definition of|ld: cannot find|ld returned \d+ exit status|"
        r"Undefined symbols for architecture|unresolved external symbol|\bLNK\d{4}\b"),
        source=DEVELOCITY_DOC + "; GNU ld, ld64, MSVC link"),
    Rule("test-assertion", "code", _re(
        r"\bAssertionError\b|Assertion .* failed|\bassert(?:ion)? failed\b|^\[  FAILED  \]|^--- FAIL:|"
        r"\bExpected:? .*\bbut (?:was|got)\b|^FAILED .*::"),
        source=DEVELOCITY_DOC + " (test failures); pytest, GoogleTest, go test, JUnit"),
)
# The rule names a failure's class_rule may carry (farm rules: "farm:<name>").
BUILTIN_NAMES = tuple(r.name for r in BUILTIN)


def classify(ev: Evidence, rules: tuple[Rule, ...] = ()) -> tuple[str, str]:
    """(class, rule name) of the failure ``ev``: the farm's ``rules`` first, then ``BUILTIN``."""
    text = ev.text[:TEXT_CHARS]
    sig = ev.signal
    for r in (*rules, *BUILTIN):
        if r.pattern is not None and not _outside_quotes(r.pattern, text):
            continue
        if r.exit_codes and ev.exit_code not in r.exit_codes:
            continue
        if r.signals and sig not in r.signals:
            continue
        if r.tool_codes and not _code_matches(ev.tool_code, r.tool_codes):
            continue
        if r.build_exit_codes and ev.build_exit_code not in r.build_exit_codes:
            continue
        return r.cls, r.name
    return "unknown", ""


_ECHO = re.compile(r"\b(?:echo|printf)\b")


def _outside_quotes(pattern: re.Pattern[str], text: str) -> bool:
    """Whether ``pattern`` matches ``text`` somewhere but in the quoted argument of an ``echo`` or
    ``printf`` command line: an echoed command that prints a message (``echo "No space left on
    device" >&2``, as make echoes it, or as the console of a neighbour's recipe brings it in) is
    not the failure itself (``'std::bad_alloc'`` in a message is)."""
    for m in pattern.finditer(text):
        before = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
        quoted = before.count('"') % 2 == 1 or before.count("'") % 2 == 1
        if not (quoted and _ECHO.search(before)):
            return True
    return False


def _code_matches(code: str, codes: frozenset[str]) -> bool:
    """``code`` is one of ``codes``, or starts with one of them that ends with a dot (a category)."""
    return bool(code) and (code in codes or any(c.endswith(".") and code.startswith(c) for c in codes))


# -- the farm's rules ----------------------------------------------------------------------------
_KEYS = {"name", "class", "pattern", "exit_code", "signal", "tool_code", "build_exit_code"}


def _ints(where: str, key: str, value: Any) -> frozenset[int]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise ValueError(f"{where}: {key} must be an integer or a list of integers")
    return frozenset(items)


def parse_rules(text: str, origin: str = "rules") -> tuple[Rule, ...]:
    """The rules of a farm's TOML file (``[[rule]]`` tables); ValueError naming the rule when one is bad."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{origin}: not TOML: {exc}") from None
    extra = set(doc) - {"rule"}
    if extra:
        raise ValueError(f"{origin}: unknown top-level key(s) {sorted(extra)}; rules are [[rule]] tables")
    raw = doc.get("rule", [])
    if not isinstance(raw, list):
        raise ValueError(f"{origin}: 'rule' must be an array of tables ([[rule]])")
    out: list[Rule] = []
    for i, t in enumerate(raw, 1):
        where = f"{origin}: rule {i}"
        if not isinstance(t, dict):
            raise ValueError(f"{where}: not a table")
        if set(t) - _KEYS:
            raise ValueError(f"{where}: unknown key(s) {sorted(set(t) - _KEYS)} (allowed: {sorted(_KEYS)})")
        name = t.get("name", str(i))
        if not isinstance(name, str) or not name or len(name) > 100:
            raise ValueError(f"{where}: name must be a string of 1 to 100 characters")
        where = f"{origin}: rule {i} ({name})"
        cls = t.get("class")
        if cls not in FAILURE_CLASSES:
            raise ValueError(f"{where}: class must be one of {', '.join(FAILURE_CLASSES)}, not {cls!r}")
        pattern = None
        if "pattern" in t:
            if not isinstance(t["pattern"], str) or not t["pattern"]:
                raise ValueError(f"{where}: pattern must be a non-empty string (a Python regular expression)")
            try:
                pattern = _re(t["pattern"])
            except re.error as exc:
                raise ValueError(f"{where}: bad pattern: {exc}") from None
        codes = t.get("tool_code", [])
        codes = codes if isinstance(codes, list) else [codes]
        if not all(isinstance(c, str) and c for c in codes):
            raise ValueError(f"{where}: tool_code must be a string or a list of strings")
        rule = Rule(f"farm:{name}", cls, pattern,
                    _ints(where, "exit_code", t["exit_code"]) if "exit_code" in t else frozenset(),
                    _ints(where, "signal", t["signal"]) if "signal" in t else frozenset(),
                    frozenset(codes),
                    _ints(where, "build_exit_code", t["build_exit_code"]) if "build_exit_code" in t else frozenset(),
                    source=origin)
        if not (rule.pattern or rule.exit_codes or rule.signals or rule.tool_codes or rule.build_exit_codes):
            raise ValueError(f"{where}: give at least one of pattern, exit_code, signal, tool_code, build_exit_code")
        out.append(rule)
    return tuple(out)


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> tuple[Rule, ...]:
    return parse_rules(Path(path).read_text(encoding="utf-8"), path)


def load_rules(path: Path | None) -> tuple[Rule, ...]:
    """The farm's rules from ``path`` (none when None); read again when the file changes.
    OSError or ValueError (naming the file and the rule) when it cannot be used."""
    if path is None:
        return ()
    st = Path(path).stat()
    return _load(str(path), st.st_mtime_ns, st.st_size)
