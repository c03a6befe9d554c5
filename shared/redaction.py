"""Secret redaction for environments and command lines: on the agent before anything leaves it,
and again on the receiving side (collector, recorder) for agents that forgot.

What is redacted (``docs/protocol.md`` lists the same):

* a variable, option (``--token X``, ``--password=X``), ``NAME=value`` word (make variables,
  ``env``/``--build-arg``/``-F`` arguments, ``MAKEFLAGS`` words) or ``Header: value`` whose
  *name* contains a sensitive word (TOKEN, SECRET, PASSWORD, KEY, CREDENTIAL, AUTH, …);
* inside URLs, anywhere: the user-info (``user:pass@``, ``:pass@``, ``token@``; a bare user
  name is kept for ssh-like schemes), query and fragment parameters with a sensitive name
  (``?token=``, ``&sig=``, ``#access_token=``) and the secret path of chat/CI webhooks
  (``hooks.slack.com/services/…``, ``…/api/webhooks/…``, ``…/hooks/…``, ``…/webhookb2/…``);
* token shapes (AWS, GitHub, GitLab, Slack, Stripe, Google, JWT, Telegram bot tokens),
  ``Bearer``/``Basic`` credentials, long high-entropy words, and a whole value holding a PEM
  private key.

Only the secret part becomes ``[REDACTED]``: names, URL hosts and paths and the other words of a
value are kept, so a diff between builds still shows what was set.  Values are split into
words on unescaped whitespace, so a ``sh -c "…"`` argument or ``MAKEFLAGS`` is redacted
word by word like a command line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from buildtel.shared.protocol import BuildStarted, EventBatch

REDACTED = "[REDACTED]"

_SENSITIVE_NAME = re.compile(
    r"TOKEN|SECRET|PASSW(OR)?D|PASSPHRASE|(^|[_.\-])PASS($|[_.\-])|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE"
    r"|SIGNATURE|DSN|(^|[_.\-])SIG($|[_.\-])",
    re.IGNORECASE,
)
# Names that contain a sensitive word but hold nothing secret (paths, sockets, ids this project
# sets itself, make's jobserver file descriptors); keeping them makes diffs and replays useful.
_SAFE_NAMES = frozenset({"KEYTIMEOUT", "KEYMAP", "XAUTHORITY", "SSH_AUTH_SOCK", "GPG_AGENT_INFO",
                         "BUILDER_TELEMETRY_SESSION_ID", "SESSION_MANAGER", "XDG_SESSION_ID",
                         "XDG_SESSION_TYPE", "XDG_SESSION_CLASS", "XDG_SESSION_DESKTOP", "DESKTOP_SESSION",
                         "JOBSERVER-AUTH", "JOBSERVER-FDS"})

# Token shapes, replaced where they stand (each pattern spans the whole token).
_TOKEN = re.compile(
    r"""
      AKIA[0-9A-Z]{16}                              # AWS access key id
    | gh[pousr]_[A-Za-z0-9]{30,}                     # GitHub tokens
    | github_pat_[A-Za-z0-9_]{40,}
    | gl(?:pat|ptt|dt|rt|cbt|imt|soat|ffct|oas|agent)-[A-Za-z0-9_\-]{20,}   # GitLab (ptt: trigger token)
    | xox[abposr]-[A-Za-z0-9-]{10,}                  # Slack
    | sk-[A-Za-z0-9_\-]{20,}                         # OpenAI-style / Stripe secret keys
    | (?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}
    | AIza[0-9A-Za-z_\-]{35}                         # Google API key
    | eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]+   # JWT
    | bot[0-9]{6,}:[A-Za-z0-9_\-]{30,}               # Telegram bot token (in its API URLs)
    """,
    re.VERBOSE,
)
_PEM = re.compile(r"-----BEGIN[ A-Z]*PRIVATE KEY-----")  # the key's body follows: the whole value goes
_HEXLIKE = re.compile(r"^[A-Za-z0-9+/=_\-]{32,}$")
_NOT_SECRET = re.compile(  # git object ids, UUIDs, W3C traceparents
    r"[0-9a-f]{40}|[0-9a-f]{64}|[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"
    r"|[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>[^\s\"'<>`]*)")
_SSH_SCHEMES = frozenset({"ssh", "git+ssh", "ssh+git", "sftp", "scp", "rsync"})  # user name is a login, not a key
_WEBHOOK_SEGMENTS = frozenset({"hooks", "webhook", "webhooks", "webhookb2"})
_SECRET_SEGMENTS = frozenset({"key", "token", "secret", "apikey", "api_key", "access_token"})  # .../key/<secret>
_SECRET_PARAMS = frozenset({"sig", "pw", "pwd"})  # short query names that carry secrets (Azure SAS: sig)
_AUTH_SCHEME = re.compile(r"(?i)\b(Bearer|Basic)(\s+)[A-Za-z0-9._~+/\-]{8,}=*")
_AUTH_WORDS = frozenset({"bearer", "basic", "digest", "token"})
_WORD_SPLIT = re.compile(r"((?<!\\)\s+)")  # make and shells escape a space inside a value with '\'
_ASSIGN = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.\-\[\]]*)=(?P<value>.*)", re.DOTALL)
_HEADER = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9_.\-]*):(?P<value>(?!//).*)", re.DOTALL)
_QUOTES = "\"'"
_SHORT_SECRET_OPTION = re.compile(
    r"(api|access|auth|client|private|secret|deploy|git|npm)?[-_.]?(token|secret|pass|key|apikey|credential|auth)")


def _entropy(s: str) -> float:
    counts: dict[str, int] = {}
    for ch in s:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _high_entropy(word: str) -> bool:
    # Long unbroken token-alphabet strings with high entropy are keys far more often than
    # not; paths are excluded by the '/' check, ids and hashes by _NOT_SECRET.
    if _HEXLIKE.match(word) and "/" not in word and not _NOT_SECRET.fullmatch(word):
        return _entropy(word) >= 4.0
    return False


def looks_secret_value(value: str) -> bool:
    """Whether ``value`` holds a secret by its shape alone (whatever its name)."""
    return redact_text(value) != value


def is_sensitive_name(name: str) -> bool:
    bare = name.strip().lstrip("-").upper()
    return bare not in _SAFE_NAMES and name.upper() not in _SAFE_NAMES and bool(_SENSITIVE_NAME.search(bare))


def _sensitive_param(name: str) -> bool:
    from urllib.parse import unquote

    bare = unquote(name)
    return bare.lower() in _SECRET_PARAMS or is_sensitive_name(bare)


def _params(text: str) -> str:
    """``a=1&token=x;sig=y`` with the secret values replaced (query strings, fragments)."""
    parts = re.split(r"([&;])", text)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if eq and value and (_sensitive_param(name) or _high_entropy(value) or _TOKEN.search(value)):
            parts[i] = f"{name}={REDACTED}"
    return "".join(parts)


def _path(host: str, path: str) -> str:
    """The path of a URL with a webhook's or key's secret segments replaced."""
    segs = path.split("/")
    if host.lower().startswith("hooks.slack.com") and len(segs) > 2 and any(segs[2:]):
        return f"/{segs[1]}/{REDACTED}"  # /services/T…/B…/secret, /workflows/…, /triggers/…
    for i, seg in enumerate(segs):
        low = seg.lower()
        if low in _WEBHOOK_SEGMENTS and any(segs[i + 1:]):
            return "/".join([*segs[:i + 1], REDACTED])
        if low in _SECRET_SEGMENTS and i + 1 < len(segs) and segs[i + 1]:
            segs[i + 1] = REDACTED
    return "/".join(segs)


def _url(m: re.Match[str]) -> str:
    scheme, rest = m.group("scheme"), m.group("rest")
    end = len(rest)
    for ch in "/?#":
        k = rest.find(ch)
        if k != -1:
            end = min(end, k)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        if userinfo and (":" in userinfo or scheme.lower() not in _SSH_SCHEMES):
            authority = f"{REDACTED}@{host}"
    else:
        host = authority
    path, q, query = tail.partition("?")
    if not q:
        path, h, frag = path.partition("#")
        query = ""
    else:
        query, h, frag = query.partition("#")
    out = f"{scheme}://{authority}{_path(host, path)}"
    if q:
        out += "?" + _params(query)
    if h:
        out += "#" + _params(frag)
    return out


def scrub_text(text: str) -> str:
    """``text`` with URL credentials, webhook secrets and token shapes replaced where they stand."""
    if "://" in text:
        text = _URL.sub(_url, text)
    return _TOKEN.sub(REDACTED, text)


def _word(word: str) -> tuple[str, str]:
    """One word of a command line: (its redacted form, what hides the next word: ``""`` nothing,
    ``"option"`` ``--token X``, ``"header"`` ``Authorization: Bearer X``)."""
    core = word.lstrip(_QUOTES)
    q = word[:len(word) - len(core)]
    if core.startswith("-"):
        name, eq, value = core.partition("=")
        if eq:
            # -DNAME=value defines NAME (C, Java): the 'D' is not part of the name.
            key = name[2:] if name.startswith("-D") and not name.startswith("--") else name
            if "/" not in key and is_sensitive_name(key):
                return f"{q}{name}={REDACTED}", ""
            new, hide = _word(value)  # --env=TOKEN=x, -Dkey=url…, --args=--token X
            return f"{q}{name}={new}", hide
        bare = core.strip(_QUOTES).lstrip("-").lower()
        # A single dash is also a value glued to a letter (-I/opt/keys, -lkeyutils, -Idsn): only
        # names that start with the secret word (-password X, -apikey X) take the next word.
        named = core.startswith("--") or _SHORT_SECRET_OPTION.match(bare)
        if (named and "/" not in bare and is_sensitive_name(bare) and not bare.startswith("no-")
                and not bare.endswith("-stdin")):
            return word, "option"  # --token X, --password X
    elif m := _ASSIGN.fullmatch(core):
        name = m.group("name")
        if is_sensitive_name(name):
            return f"{q}{name}={REDACTED}", ""
        new, hide = _word(m.group("value"))  # ARGS="--token X": the next word is the secret
        return f"{q}{name}={new}", hide
    elif m := _HEADER.fullmatch(core):  # "PRIVATE-TOKEN: x", "Authorization:Bearer x"
        name, value = m.group("name"), m.group("value")
        if is_sensitive_name(name):
            return (word, "header") if not value.strip(_QUOTES) else (f"{q}{name}:{REDACTED}", "")
    if _high_entropy(core.strip(_QUOTES)):
        return REDACTED, ""
    return scrub_text(word), ""


def _words(words: list[str], *, in_text: bool = False) -> list[str]:
    out: list[str] = []
    hide = ""
    for w in words:
        if hide:
            # "Authorization: Bearer X": the scheme word stays, the credential after it goes.
            if hide == "header" and w.strip(_QUOTES).lower() in _AUTH_WORDS:
                hide = "option"
                out.append(w)
                continue
            lead = w[:len(w) - len(w.lstrip(_QUOTES))]
            trail = w[len(w.rstrip(_QUOTES)):] if w.strip(_QUOTES) else ""
            out.append(f"{lead}{REDACTED}{trail}" if in_text else REDACTED)
            hide = ""
            continue
        if not in_text and (_PEM.search(w) or _WORD_SPLIT.search(w)):
            out.append(redact_text(w))  # one argv element holding several words (sh -c "…")
            continue
        new, hide = _word(w)
        out.append(new)
    return out


def redact_text(text: str) -> str:
    """A free-form value (env value, ``sh -c`` script, header) with its secrets replaced."""
    if _PEM.search(text):
        return REDACTED
    if not _WORD_SPLIT.search(text):
        return _word(text)[0]
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    parts = _WORD_SPLIT.split(text)
    words = _words(parts[0::2], in_text=True)
    parts[0::2] = words
    return "".join(parts)


def redact_value(name: str, value: str) -> str:
    if is_sensitive_name(name):
        return REDACTED
    return redact_text(value)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with every secret value (or part of a value) replaced by ``[REDACTED]``."""
    return {k: redact_value(k, v) for k, v in env.items()}


def redact_argv(argv: list[str]) -> list[str]:
    """Redact secrets passed on a command line (``--token=…``, ``--password X``, ``TOKEN=…``,
    URLs with credentials, key-like values); ordinary arguments come back unchanged."""
    return _words(list(argv))


def redact_started(ev: BuildStarted) -> BuildStarted:
    """``ev`` with ``command``, ``environment.env`` and ``environment.vcs.remote`` redacted, in
    place (and returned): what any agent sends passes the same rules before it is stored."""
    ev.command = redact_argv(ev.command)
    env = ev.environment
    if env is not None:
        env.env = redact_env(env.env)
        if env.vcs is not None and env.vcs.remote:
            env.vcs.remote = redact_text(env.vcs.remote)
    return ev


def redact_batch(batch: EventBatch, data: bytes) -> bytes:
    """The bytes to keep for a received ``batch`` (decoded from ``data``): ``data`` itself when
    its BuildStarted events hold no secret, else the batch re-encoded after :func:`redact_started`
    (logged, naming the agent, so an agent that does not redact is found)."""
    changed: list[str] = []
    for ev in batch.events:
        if type(ev) is BuildStarted:
            before = (list(ev.command), dict(ev.environment.env) if ev.environment else None,
                      ev.environment.vcs.remote if ev.environment and ev.environment.vcs else None)
            redact_started(ev)
            after = (ev.command, ev.environment.env if ev.environment else None,
                     ev.environment.vcs.remote if ev.environment and ev.environment.vcs else None)
            changed += [f for f, a, b in zip(("command", "environment.env", "vcs.remote"), before, after,
                                             strict=True) if a != b]
    if not changed:
        return data
    from buildtel.shared.codec import encode
    from buildtel.shared.logs import get_logger

    get_logger("redaction").warning("redaction.unredacted_secret_received", session_id=batch.session_id,
                                    agent_id=batch.agent_id, fields=sorted(set(changed)))
    return encode(batch)
