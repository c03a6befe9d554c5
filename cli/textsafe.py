r"""Terminal safety: strings from the bus are printed with their control characters made visible.

Target names, session names, labels, agent ids, commands, environment values and
alert text come from whoever publishes on the bus.  Printed raw, a name such as
``"\x1b]0;pwned\x07\x1b[2J"`` would retitle the terminal and clear it (and other
sequences can do worse).  :func:`safe` turns each such character into a visible
Python-style escape (``\x1b``, ``\u202e``), so what is printed is exactly what was
sent, with no effect on the terminal.

Escaped: C0 controls (U+0000–U+001F, including ESC, TAB and newline), DEL (U+007F),
C1 controls (U+0080–U+009F, which some terminals treat as CSI/OSC), the line and
paragraph separators U+2028/U+2029, the bidirectional controls (U+061C, U+200E,
U+200F, U+202A–U+202E, U+2066–U+2069: "Trojan Source" reordering), and lone
surrogates (which cannot be encoded for the terminal at all).  Everything else,
backslashes included, is printed as it is.

``--json`` output must stay exact data, so :func:`safe` is not applied to it.  JSON
encoders already write C0 controls (ESC included) as ``\u001b``, but msgspec (and
``json.dumps(ensure_ascii=False)``) leave DEL, the C1 controls, U+2028/U+2029 and the
bidi controls raw; :func:`json_safe` rewrites those as ``\uXXXX`` escapes, which
decode to the same string, so the JSON is unchanged as data and inert on a terminal.
Our own escape sequences (``buildtel watch``'s redraw) surround already-safe text.
"""

from __future__ import annotations

import re

__all__ = ["UNSAFE", "json_safe", "safe", "safe_block"]

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
UNSAFE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\u2028\u2029{_BIDI}\\ud800-\\udfff]")
_JSON_RAW = re.compile(f"[\x7f-\x9f\u2028\u2029{_BIDI}]")
_UNSAFE_KEEP_NL = re.compile(f"[\\x00-\\x09\\x0b-\\x1f\\x7f-\\x9f\u2028\u2029{_BIDI}\\ud800-\\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object) -> str:
    """``str(value)`` with every control character escaped (newlines too: one field, one line)."""
    text = value if isinstance(value, str) else str(value)
    return UNSAFE.sub(_escape, text)


def json_safe(text: str) -> str:
    """JSON text with the characters JSON encoders leave raw (DEL, C1, bidi, U+2028/9)
    written as ``\\uXXXX``: the same JSON value, no effect on a terminal."""
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def safe_block(text: str) -> str:
    """For a rendered multi-line block (a report, a diff, a tree): escape like :func:`safe`
    but keep the newlines that separate its lines."""
    return _UNSAFE_KEEP_NL.sub(_escape, text)
