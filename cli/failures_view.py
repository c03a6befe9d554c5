"""``buildtel show ID --failures``: the failed targets of a session, each with its error lines and
output (``docs/failures.md``), failed targets without kept output listed too."""

from __future__ import annotations

import sys
from typing import Any

from buildtel.cli.jsonout import dumps
from buildtel.cli.textsafe import safe
from buildtel.shared.failrecord import failed_targets
from buildtel.shared.protocol import BuildSession


def failures_json(s: BuildSession) -> dict[str, Any]:
    return {"session_id": s.id, "outcome": s.outcome, "exit_code": s.exit_code, "failures": failed_targets(s),
            "log": s.log is not None and bool(s.log.object)}


def print_failures(s: BuildSession, *, json_out: bool) -> int:
    doc = failures_json(s)
    if json_out:
        sys.stdout.write(dumps(doc) + "\n")
        return 0
    rows = doc["failures"]
    print(f"session   {safe(s.id)}  {safe(s.outcome)}  exit code {s.exit_code if s.exit_code is not None else '-'}"
          f"  {len(rows)} failed target(s)")
    if not rows:
        print("no failed target was recorded" + (f"; the whole log: buildtel log {s.id}" if doc["log"] else ""))
    for r in rows:
        code = r["exit_code"] if r["exit_code"] is not None else "-"
        print(f"\n== {safe(r['target'])}  (exit code {code})")
        if r["kept_with"]:  # the same failure as its label's: classified and counted there
            print(f"note       {safe(r['note'])}")
            continue
        rule = f" (rule {safe(r['class_rule'])})" if r["class_rule"] else " (no rule matched)"
        print(f"class      {safe(r['failure_class'] or 'unknown')}{rule}"
              + (f"  tool code {safe(r['tool_code'])}" if r["tool_code"] else ""))
        if r["signature"]:
            print(f"signature  {safe(r['signature'])}")
        if not r["attributed"] or not r["output"]:
            print(f"note       {safe(r['note'])}")
        if r["output_cut_bytes"]:
            print(f"           (its first {r['output_cut_bytes']} bytes are not kept)")
        for line in r["output"]:
            print(f"  {safe(line)}")
    if rows and doc["log"]:
        print(f"\nthe whole log: buildtel log {s.id}")
    if rows:
        print("the same failures in other builds: buildtel failures (docs/failures.md)")
    return 0
