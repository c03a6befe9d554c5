"""ninja's console output and exit code: the evidence ``.ninja_log`` lacks about how a build ended.

ninja logs only edges that finished successfully, so a log alone cannot tell a build that
succeeded from one that failed or was interrupted.  What ninja printed can
(``src/status_printer.cc``, ``src/ninja.cc``):

* ``[n/m] description`` when an edge finishes (default ``NINJA_STATUS`` ``"[%f/%t] "``; on a
  smart terminal the lines are overwritten with ``\\r`` and escape sequences, both removed here);
* for a failed edge, after its status line: ``FAILED: [code=N] out1 out2 `` (the ``[code=N]``
  since ninja 1.13), then the command, then what the command printed;
* at the end ``ninja: build stopped: subcommand failed.`` / ``…: interrupted by user.`` (SIGINT,
  SIGTERM or SIGHUP) / ``…: cannot make progress due to previous errors.``, or
  ``ninja: no work to do.``; ``ninja: error: …`` / ``ninja: fatal: …`` for ninja's own failures.

:func:`parse_ninja_output` never raises: any text is a valid (perhaps uninformative) console
output.  A failed edge's error text is the lines after its ``FAILED:`` line up to the next
status line, ``FAILED:`` line or ``ninja:`` line, at most :data:`MAX_ERROR_BYTES`.
:func:`ninja_outcome` applies the rules of docs/importers.md to what the output and the exit code say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from buildtel.shared.importers.common import STOPPED_CODES, signal_name

MAX_ERROR_BYTES = 16 * 1024  # per failed edge: a compiler can print megabytes; the start says why

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_STATUS = re.compile(r"\[(\d{1,18})/(\d{1,18})\]( |$)")  # bounded: int() of 5000 digits raises
_FAILED = re.compile(r"FAILED: (?:\[code=(-?\d+)\] )?(.*)")
_STOPPED = "ninja: build stopped: "


@dataclass
class FailedEdge:
    """One ``FAILED:`` block: the edge's outputs, ninja's ``[code=N]`` if printed, what followed."""

    outputs: list[str]
    code: int | None
    text: str
    line: int  # 1-based line of the FAILED: line
    finished_before: int  # edges that finished successfully before it (status lines not followed by FAILED)


@dataclass
class NinjaOutput:
    """What a ninja console output says about the run that printed it."""

    failed: list[FailedEdge] = field(default_factory=list)
    stopped: str | None = None  # the reason after "ninja: build stopped: ", without the final "."
    no_work: bool = False  # "ninja: no work to do."
    errors: list[str] = field(default_factory=list)  # "ninja: error: …" / "ninja: fatal: …" lines
    status_lines: int = 0  # "[n/m]" lines seen (finished edges, failed ones included)
    last_status: tuple[int, int] | None = None  # the last (n, m)

    @property
    def interrupted(self) -> bool:
        return self.stopped is not None and self.stopped.startswith("interrupted")

    @property
    def succeeded_edges(self) -> int | None:
        """Edges that finished successfully, when the status lines are recognised (else None)."""
        if self.status_lines == 0:
            return 0 if self.no_work else None
        return self.status_lines - len(self.failed)

    @property
    def all_finished(self) -> bool:
        """The last status line says every edge finished (``[m/m]``)."""
        return self.last_status is not None and self.last_status[0] == self.last_status[1]


def _clip(text: str) -> str:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= MAX_ERROR_BYTES:
        return text
    cut = raw[:MAX_ERROR_BYTES].decode("utf-8", "ignore")
    return f"{cut}\n… [{len(raw) - len(cut.encode())} more bytes not kept]"


def _lines(data: bytes) -> list[str]:
    # Console output is whatever the commands printed: never refused, bad bytes replaced.
    text = _ANSI.sub("", data.decode("utf-8", "replace"))
    out = []
    for raw in text.split("\n"):
        # A smart terminal overwrites the status line with "\r": the last rewrite is what stood.
        out.append(raw.rstrip("\r").rsplit("\r", 1)[-1])
    return out


def parse_ninja_output(data: bytes) -> NinjaOutput:
    """Everything the output says about failed edges and how the run ended; never raises."""
    res = NinjaOutput()
    block: list[str] | None = None
    current: FailedEdge | None = None

    def close() -> None:
        nonlocal block, current
        if current is not None and block is not None:
            while block and not block[-1].strip():
                block.pop()
            current.text = _clip("\n".join(block))
        block, current = None, None

    for n, line in enumerate(_lines(data), start=1):
        if m := _STATUS.match(line):
            close()
            res.status_lines += 1
            res.last_status = (int(m.group(1)), int(m.group(2)))
            continue
        if m := _FAILED.match(line):
            close()
            code = int(m.group(1)) if m.group(1) and len(m.group(1)) < 12 else None
            outputs = m.group(2).split()
            succeeded = res.status_lines - len(res.failed) - 1 if res.status_lines else 0
            current = FailedEdge(outputs, code, "", n, max(0, succeeded))
            res.failed.append(current)
            block = []
            continue
        if line.startswith("ninja: "):
            close()
            if line.startswith(_STOPPED):
                res.stopped = line[len(_STOPPED):].strip().rstrip(".")
            elif line.strip() == "ninja: no work to do.":
                res.no_work = True
            elif line.startswith(("ninja: error: ", "ninja: fatal: ")):
                res.errors.append(line.strip())
            continue
        if block is not None:
            block.append(line)
    close()
    return res


def ninja_outcome(out: NinjaOutput | None, code: int | None) -> tuple[str, str, list[str]]:
    """The outcome of the run, the evidence it rests on (for ``labels["outcome_evidence"]``) and
    warnings where the evidence disagrees.  Rules, first match wins (docs/importers.md):

    1. the output says ``build stopped: interrupted by user`` → cancelled;
    2. the output says ``build stopped`` for another reason (``subcommand failed``, ``cannot make
       progress…``) → failed, whatever the exit code (ninja 1.13 exits 137 for a SIGKILLed edge);
    3. the exit code is SIGHUP, SIGINT or SIGTERM to ninja (129, 130, 143, or -1, -2, -15) → cancelled;
    4. any other non-zero exit code, or an output with ``FAILED:`` edges or ``ninja: error/fatal``
       → failed;
    5. the exit code is 0, or the output ends with every edge finished (``[m/m]``) → success;
    6. otherwise (no evidence, or an output that stops short without saying why) → unknown.
    """
    said: list[str] = []
    if code is not None:
        sig = signal_name(code)
        said.append(f"exit code {code}" + (f" ({sig})" if sig else ""))
    if out is not None:
        said.append("ninja output")
    evidence = " + ".join(said) or "none"
    warnings: list[str] = []
    if out is not None and out.interrupted:
        return "cancelled", evidence, warnings
    stopped = out is not None and out.stopped is not None
    if not stopped and code is not None and code in STOPPED_CODES:
        return "cancelled", evidence, warnings
    failed_out = out is not None and bool(out.failed or out.errors or stopped)
    if (code is not None and code != 0) or failed_out:
        if code == 0:
            warnings.append("exit code 0 but the output shows failures: recorded as failed")
        return "failed", evidence, warnings
    if code == 0:
        return "success", evidence, warnings
    if out is not None and (out.all_finished or out.no_work):
        return "success", evidence, warnings
    if out is not None:
        warnings.append("the output neither shows every edge finished nor says why ninja stopped "
                        "(cut short, or a custom NINJA_STATUS): outcome unknown")
    return "unknown", evidence, warnings
