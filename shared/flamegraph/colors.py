"""Frame colours: flamegraph.pl's palettes, computed deterministically.

flamegraph.pl (current versions) colours a frame by seeding Perl's ``rand``
with the sum of the name's code points and drawing one number; Perl's
``rand`` is drand48, so the colour is a pure function of the name.  We
reproduce that generator exactly, which gives the same colours as
flamegraph.pl for the same input and byte-identical output on every run.
``hash=True`` selects flamegraph.pl's ``--hash`` mode (a weighted hash of the
first characters) instead.  Its ``--random`` mode is deliberately absent:
output must not change from run to run.
"""

from __future__ import annotations

import re

__all__ = [
    "PALETTES",
    "background_colors",
    "diff_color",
    "frame_color",
    "namehash",
    "perl_name_rand",
]

PALETTES = (
    "hot", "mem", "io", "wakeup", "chain", "java", "js", "perl",
    "red", "green", "blue", "aqua", "yellow", "purple", "orange",
    "cache",  # ours: by targets' cache result (build data only; see build.py)
)

_MASK48 = (1 << 48) - 1


def perl_name_rand(name: str) -> float:
    """``srand(unpack("%32W*", name)); rand(1)`` exactly as Perl computes it.

    Perl >= 5.20 implements rand with drand48: the state is seeded as
    ``seed << 16 | 0x330E`` and advanced once by ``x * 0x5DEECE66D + 0xB``.
    """
    seed = sum(map(ord, name)) & 0xFFFFFFFF
    x = ((seed << 16) + 0x330E) & _MASK48
    x = (x * 0x5DEECE66D + 0xB) & _MASK48
    return x / 281474976710656.0  # 2**48


_MODULE_PREFIX = re.compile(r".(.*?)`")


def namehash(name: str) -> float:
    """flamegraph.pl's ``--hash`` vector hash (early characters weigh more)."""
    name = _MODULE_PREFIX.sub("", name, count=1)
    vector = 0.0
    weight = 1.0
    max_ = 1.0
    mod = 10
    for ch in name:
        i = ord(ch) % mod
        vector += (i / (mod - 1)) * weight
        mod += 1
        max_ += weight
        weight *= 0.70
        if mod > 12:
            break
    return 1 - vector / max_


_JAVA_GREEN = re.compile(r"^L?(java|javax|jdk|net|org|com|io|sun)/")
_JS_SOURCE = re.compile(r"/.*\.js")


def _resolve(palette: str, name: str) -> str:
    """Multi-palettes pick a flat palette from the frame name (as flamegraph.pl)."""
    if palette == "java":
        if name.endswith("_[j]"):
            return "green"
        if name.endswith("_[i]"):
            return "aqua"
        if _JAVA_GREEN.match(name) or ":::" in name:
            return "green"
        if "::" in name:
            return "yellow"
        if name.endswith("_[k]"):
            return "orange"
        return "red"
    if palette == "perl":
        if "::" in name:
            return "yellow"
        if "Perl" in name or ".pl" in name:
            return "green"
        if name.endswith("_[k]"):
            return "orange"
        return "red"
    if palette == "js":
        if name.endswith("_[j]"):
            return "green" if "/" in name else "aqua"
        if "::" in name:
            return "yellow"
        if _JS_SOURCE.search(name):
            return "green"
        if ":" in name:
            return "aqua"
        if name == " ":
            return "green"
        if "_[k]" in name:
            return "orange"
        return "red"
    if palette == "wakeup":
        return "aqua"
    if palette == "chain":
        return "aqua" if "_[w]" in name else "blue"
    return palette


def frame_color(palette: str, name: str, *, hash: bool = False) -> str:
    """``rgb(r,g,b)`` for a frame, as flamegraph.pl ``--colors=palette``."""
    if hash:
        v1 = namehash(name)
        v2 = v3 = namehash(name[::-1])
    else:
        v1 = v2 = v3 = perl_name_rand(name)
    if palette == "hot":
        return f"rgb({205 + int(50 * v3)},{int(230 * v1)},{int(55 * v2)})"
    if palette == "mem":
        return f"rgb(0,{190 + int(50 * v2)},{int(210 * v1)})"
    if palette == "io":
        r = 80 + int(60 * v1)
        return f"rgb({r},{r},{190 + int(55 * v2)})"
    flat = _resolve(palette, name)
    if flat == "red":
        x = 50 + int(80 * v1)
        return f"rgb({200 + int(55 * v1)},{x},{x})"
    if flat == "green":
        x = 50 + int(60 * v1)
        return f"rgb({x},{200 + int(55 * v1)},{x})"
    if flat == "blue":
        x = 80 + int(60 * v1)
        return f"rgb({x},{x},{205 + int(50 * v1)})"
    if flat == "yellow":
        x = 175 + int(55 * v1)
        return f"rgb({x},{x},{50 + int(20 * v1)})"
    if flat == "purple":
        x = 190 + int(65 * v1)
        return f"rgb({x},{80 + int(60 * v1)},{x})"
    if flat == "aqua":
        return f"rgb({50 + int(60 * v1)},{165 + int(55 * v1)},{165 + int(55 * v1)})"
    if flat == "orange":
        return f"rgb({190 + int(65 * v1)},{90 + int(65 * v1)},0)"
    return "rgb(0,0,0)"


def diff_color(delta: float, maxdelta: float, *, negate: bool = False) -> str:
    """flamegraph.pl's differential scale: red for more, blue for less, white for none."""
    if negate:
        delta = -delta
    if delta > 0:
        gb = int(210 * (maxdelta - delta) / maxdelta)
        return f"rgb(255,{gb},{gb})"
    if delta < 0:
        rg = int(210 * (maxdelta + delta) / maxdelta)
        return f"rgb({rg},{rg},255)"
    return "rgb(255,255,255)"


def background_colors(palette: str, bgcolors: str | None = None) -> tuple[str, str]:
    """Gradient stops flamegraph.pl picks for a palette (or ``--bgcolors``)."""
    if not bgcolors:
        if palette == "mem":
            bgcolors = "green"
        elif palette in ("io", "wakeup", "chain"):
            bgcolors = "blue"
        elif palette in ("red", "green", "blue", "aqua", "yellow", "purple", "orange", "cache"):
            bgcolors = "grey"
        else:
            bgcolors = "yellow"
    named = {
        "yellow": ("#eeeeee", "#eeeeb0"),
        "blue": ("#eeeeee", "#e0e0ff"),
        "green": ("#eef2ee", "#e0ffe0"),
        "grey": ("#f8f8f8", "#e8e8e8"),
    }
    if bgcolors in named:
        return named[bgcolors]
    if re.fullmatch(r"#[0-9a-fA-F]{6}", bgcolors):
        return bgcolors, bgcolors
    raise ValueError(f"unrecognised bgcolors {bgcolors!r}")
