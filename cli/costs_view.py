"""``buildtel show ID --headers`` / ``--templates``: what included files and template
instantiations cost the session's compiles, added up across them (``shared/phases.py``).

Only imported clang ``-ftime-trace`` compiles carry these costs (docs/importers.md): each compile
keeps its costliest headers and templates as ``header:``/``template:`` phases and sums the rest
into ``(other)``, so the totals printed are exact and ``(other)`` says how much is not itemised.
"""

from __future__ import annotations

import sys
from typing import Any

from buildtel.cli.jsonout import dumps
from buildtel.cli.textsafe import safe
from buildtel.shared.phases import HEADER, TEMPLATE, rank
from buildtel.shared.protocol import BuildSession


def costs_json(s: BuildSession, kind: str, top: int) -> dict[str, Any]:
    prefix = HEADER if kind == "headers" else TEMPLATE
    costs, total = rank(s.targets, prefix)
    compiles = sum(any(p.name.startswith(prefix) for p in t.phases) for t in s.targets)
    return {"session_id": s.id, "kind": kind, "compiles": compiles, "total_s": total,
            "costs": [{"name": c.name, "total_s": c.total_s, "compiles": c.targets} for c in costs[:top]],
            "not_listed": max(0, len(costs) - top)}


def print_costs(s: BuildSession, kind: str, *, top: int, json_out: bool) -> int:
    doc = costs_json(s, kind, top)
    if json_out:
        sys.stdout.write(dumps(doc) + "\n")
        return 0
    what = "included file" if kind == "headers" else "template"
    print(f"session   {safe(s.id)}  ({safe(s.name or 'unnamed')})")
    if not doc["compiles"]:
        print(f"no {what} costs recorded: only imported clang -ftime-trace compiles carry them "
              "(buildtel import chrome-trace FILE.json, docs/importers.md)")
        return 0
    print(f"{kind}: {doc['total_s']:.3f} s of self time in {doc['compiles']} compile(s), costliest first "
          f"(each compile itemises its top {what}s; '(other)' is the rest)")
    print(f"{'SELF TIME':>10} {'SHARE':>6} {'COMPILES':>8}  {what.upper()}")
    for c in doc["costs"]:
        share = c["total_s"] / doc["total_s"] if doc["total_s"] else 0.0
        print(f"{c['total_s']:>9.3f}s {share:>6.1%} {c['compiles']:>8}  {safe(c['name'])}")
    if doc["not_listed"]:
        print(f"… {doc['not_listed']} more (--top N)")
    return 0
