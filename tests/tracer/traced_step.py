"""A build step that uses the tracing API, run as a subprocess by the tests.

``python traced_step.py LEVEL DEPTH``: starts a trace named after its level
(``build`` -> ``compile`` -> ``link``), runs the next level as a child process
with ``TRACEPARENT`` in its environment, and prints a JSON list of what every
level saw.  ``TEST_SESSION_ID`` makes level 0 join that build session's trace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from buildtel.services.tracer import api

NAMES = ["build", "compile", "link"]


def main() -> int:
    level, depth = int(sys.argv[1]), int(sys.argv[2])
    session = os.environ.get("TEST_SESSION_ID") if level == 0 else None
    inherited = os.environ.get("TRACEPARENT")
    with api.start_trace(NAMES[level], session_id=session, **{"step.level": level}) as span:
        api.add_event("step.started", level=level)
        api.set_attribute("step.args", [str(level), str(depth)])
        seen = [{"level": level, "trace_id": span.trace_id, "span_id": span.span_id, "traceparent_in": inherited}]
        if level + 1 < depth:
            env = api.child_env()
            env["OTEL_SERVICE_NAME"] = f"step-{level + 1}"
            child = subprocess.run([sys.executable, __file__, str(level + 1), str(depth)], env=env,
                                   capture_output=True, text=True, check=True)
            seen += json.loads(child.stdout)
    if level == 0:
        api.shutdown_tracing()  # explicit here; the child levels rely on the SDK's exit hook
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
