"""Secret redaction for captured environments, applied on the agent before anything leaves it.

A variable is redacted when its *name* contains a sensitive word (TOKEN, SECRET,
PASSWORD, KEY, CREDENTIAL, AUTH, COOKIE, …) or its *value* looks like a key:
well-known token shapes (AWS, GitHub, GitLab, Slack, JWT, PEM blocks), URLs with
a password, or long high-entropy strings.  Redaction keeps the name so a diff
between builds still shows that the variable was set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

REDACTED = "[REDACTED]"

_SENSITIVE_NAME = re.compile(
    r"TOKEN|SECRET|PASSW(OR)?D|PASSPHRASE|(^|_)PASS($|_)|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE|SIGNATURE|DSN",
    re.IGNORECASE,
)
# Names that contain a sensitive word but hold nothing secret (paths, sockets, ids this project
# sets itself); keeping them makes diffs and replays useful.
_SAFE_NAMES = frozenset({"KEYTIMEOUT", "KEYMAP", "XAUTHORITY", "SSH_AUTH_SOCK", "GPG_AGENT_INFO",
                         "BUILDER_TELEMETRY_SESSION_ID", "SESSION_MANAGER", "XDG_SESSION_ID",
                         "XDG_SESSION_TYPE", "XDG_SESSION_CLASS", "XDG_SESSION_DESKTOP", "DESKTOP_SESSION"})

_SECRET_VALUE = re.compile(
    r"""
      AKIA[0-9A-Z]{16}                              # AWS access key id
    | gh[pousr]_[A-Za-z0-9]{30,}                     # GitHub tokens
    | github_pat_[A-Za-z0-9_]{40,}
    | glpat-[A-Za-z0-9_\-]{20,}                      # GitLab
    | xox[abposr]-[A-Za-z0-9-]{10,}                  # Slack
    | sk-[A-Za-z0-9_\-]{20,}                         # OpenAI-style / Stripe secret keys
    | (sk|rk)_(live|test)_[A-Za-z0-9]{16,}
    | AIza[0-9A-Za-z_\-]{35}                         # Google API key
    | eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]+   # JWT
    | -----BEGIN[ A-Z]*PRIVATE\ KEY-----
    | [a-z][a-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@       # URL with user:password@
    """,
    re.VERBOSE,
)
_HEXLIKE = re.compile(r"^[A-Za-z0-9+/=_\-]{32,}$")


def _entropy(s: str) -> float:
    counts: dict[str, int] = {}
    for ch in s:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def looks_secret_value(value: str) -> bool:
    if _SECRET_VALUE.search(value):
        return True
    # Long unbroken token-alphabet strings with high entropy are keys far more often than
    # not; paths and commit hashes are excluded by the '/' check and the 40-hex rule.
    if _HEXLIKE.match(value) and "/" not in value:
        if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", value):
            return False  # git commit / content hashes are not secrets
        return _entropy(value) >= 4.0
    return False


def is_sensitive_name(name: str) -> bool:
    return name.upper() not in _SAFE_NAMES and bool(_SENSITIVE_NAME.search(name))


def redact_value(name: str, value: str) -> str:
    if is_sensitive_name(name) or looks_secret_value(value):
        return REDACTED
    return value


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with every secret value replaced by ``[REDACTED]``."""
    return {k: redact_value(k, v) for k, v in env.items()}


def redact_argv(argv: list[str]) -> list[str]:
    """Redact secrets passed on a command line (``--token=…``, ``--password X``, key-like values)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and "=" in arg:
            name, _, value = arg.partition("=")
            out.append(f"{name}={REDACTED}" if is_sensitive_name(name) or looks_secret_value(value) else arg)
            continue
        if arg.startswith("-") and is_sensitive_name(arg.lstrip("-")):
            hide_next = True
            out.append(arg)
            continue
        out.append(REDACTED if looks_secret_value(arg) else arg)
    return out
