"""Text in SVG output: XML escaping and flamegraph.pl's number formatting.

Its own module because both the legend (``build.py``) and the drawing (``svg.py``) write SVG
text, and ``svg.py`` imports ``build.py``: here, neither needs the other for it.
"""

from __future__ import annotations

_XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})
# C0 controls are not allowed in XML 1.0 at all; show them as U+FFFD.
_XML_ESCAPES.update({c: "\ufffd" for c in range(32) if c not in (9, 10, 13)})


def escape_xml(text: str) -> str:
    return text.translate(_XML_ESCAPES)


def perl_num(v: float) -> str:
    """Perl's number stringification (%.15g): 101.0 -> '101', 111.5 -> '111.5'."""
    return str(v) if isinstance(v, int) else format(v, ".15g")
