"""``buildtel flamegraph --folded`` draws with the folded parser and the SVG writer alone: no bus
client (nats, aiohttp, redis), no numpy, no service module (the session drawing is the library
shared/flamegraph/sessions.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("nats", "aiohttp", "redis", "numpy", "buildtel.services.analyzer.api", "buildtel.services.storage",
         "buildtel.services.tracer", "buildtel.cli.common")


def test_folded_flamegraph_imports_no_bus_module(tmp_path: Path) -> None:
    folded = tmp_path / "in.folded"
    folded.write_text("main;parse;lex 30\nmain;parse 10\nmain;emit 20\n")
    out = tmp_path / "out.svg"
    code = ("import sys\nfrom buildtel.cli import main\nrc = main.main(['flamegraph', '--folded', sys.argv[1], "
            "'-o', sys.argv[2]])\nprint(rc, sorted(m for m in sys.modules if m.startswith(tuple(sys.argv[3:]))))")
    done = subprocess.run([sys.executable, "-c", code, str(folded), str(out), *HEAVY], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == "0 []", done.stdout + done.stderr
    assert out.read_text().count("<title>") >= 4


def test_the_option_names_are_one_list() -> None:
    from buildtel.services.analyzer import api
    from buildtel.shared.flamegraph.svg import FLAME_OPTIONS

    assert api.FLAME_OPTIONS == FLAME_OPTIONS
