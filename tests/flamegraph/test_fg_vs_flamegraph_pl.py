"""Frame-by-frame comparison with flamegraph.pl itself.

The project does not ship flamegraph.pl: the tests take it from ``FLAMEGRAPH_PL``
or fetch it once from PyPI (the ``perun-toolsuite`` source package carries
upstream's script; only its count formatting differs) into the test cache, and
run it with ``perl``.  Every drawn frame must agree: name,
depth (y), x, width, height, fill colour, percentage, label and (when the
script prints plain counts) the count.  Inputs avoid the two documented
deviations: flamegraph.pl's duplicate frames (a frame with self time next to
a sibling whose name extends it with a character below ';') and icicle
graphs with a subtitle.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks.bench_flamegraph import generate
from buildtel.shared.flamegraph import SVGFlameGraphGenerator, read_folded

PERUN = "perun-toolsuite==0.28.3"
MEMBER = "perun_toolsuite-0.28.3/perun/scripts/flamegraph.pl"


def _fetch_flamegraph_pl() -> str:
    given = os.environ.get("FLAMEGRAPH_PL", "")
    if given:
        return given
    cache = Path(__file__).resolve().parents[2] / ".builder-cache" / "test-assets"
    target = cache / "flamegraph.pl"
    if not target.exists():
        import sys
        import tarfile
        import tempfile

        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                            "perun-toolsuite",
                            PERUN, "-d", tmp], check=True, timeout=600)
            [sdist] = Path(tmp).glob("*.tar.gz")
            with tarfile.open(sdist) as tar:
                data = tar.extractfile(MEMBER)
                assert data is not None, f"{MEMBER} not in {sdist.name}"
                target.write_bytes(data.read())
    return str(target)


SCRIPT = _fetch_flamegraph_pl()
assert shutil.which("perl"), "perl is needed to run flamegraph.pl for the comparison"
SVGNS = "{http://www.w3.org/2000/svg}"
TITLE = re.compile(r"^(.*) \(([\d,.]+[KMGTPE]?) [^,]*, ([\d.]+)%")


def drawn(svg: str) -> list[tuple]:
    root = ET.fromstring(svg)
    group = root.find(f".//{SVGNS}g[@id='frames']")
    assert group is not None
    out = []
    for g in group:
        title = g.find(f"{SVGNS}title").text or ""  # type: ignore[union-attr]
        rect = g.find(f"{SVGNS}rect")
        text = g.find(f"{SVGNS}text")
        m = TITLE.match(title)
        assert m, title
        count = m.group(2) if re.fullmatch(r"[\d,]+", m.group(2)) else None
        out.append((m.group(1), rect.get("y"), rect.get("x"), rect.get("width"),  # type: ignore[union-attr]
                    rect.get("height"), rect.get("fill"), m.group(3), text.text or "", count))  # type: ignore[union-attr]
    return sorted(out, key=repr)


def perl_svg(path: Path, args: list[str]) -> str:
    return subprocess.run(["perl", SCRIPT, "--countname=samples", *args, str(path)],
                          check=True, capture_output=True, text=True).stdout


def tricky(path: Path) -> None:
    rng = random.Random(7)
    names = ["lib", "lib2", "lib.a", "codegen", "codegen#1", "a&b", "<init>", 'say "hi"', "ünïcode",
             "x_[k]", "jit_[j]", "java/lang/Thread.run", "std::vector::push", "-", "--", "z z"]
    lines = {}
    for _ in range(400):
        depth = rng.randint(1, 6)
        # interior frames never carry self time here, so flamegraph.pl's split bug cannot trigger
        stack = ";".join(rng.choice(names) for _ in range(depth)) + f";leaf{rng.randint(0, 30)}"
        lines[stack] = lines.get(stack, 0) + rng.randint(1, 5000)
    path.write_text("".join(f"{k} {v}\n" for k, v in lines.items()), encoding="utf-8")


CASES = [
    ([], {}),
    (["--width=800", "--minwidth=1"], {"width": 800, "minwidth": 1}),
    (["--inverted", "--height=20"], {"inverted": True, "height": 20}),
    (["--colors=java", "--hash"], {"colors": "java", "hash": True}),
    (["--reverse"], {"reverse": True}),
    (["--minwidth=0.5%"], {"minwidth": "0.5%"}),
    (["--colors=mem", "--title=T", "--subtitle=S"], {"colors": "mem", "title": "T", "subtitle": "S"}),
    (["--colors=js"], {"colors": "js"}),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("cmp")
    build, odd = d / "build.folded", d / "tricky.folded"
    generate(build, 5000, seed=3)
    tricky(odd)
    return [build, odd]


@pytest.mark.parametrize(("perl_args", "options"), CASES)
def test_same_frames_as_flamegraph_pl(inputs: list[Path], perl_args: list[str], options: dict) -> None:
    # Reversed, the tricky names put self time on frames like "-" beside "--",
    # which flamegraph.pl splits (see the test below).
    for path in inputs[:1] if options.get("reverse") else inputs:
        ours = SVGFlameGraphGenerator(countname="samples", **options).render(read_folded(path))
        theirs = perl_svg(path, perl_args)
        a, b = drawn(theirs), drawn(ours)
        if any(f[-1] is None for f in a):  # a copy that prints K/M suffixes: compare the rest
            a = sorted((f[:-1] for f in a), key=repr)
            b = sorted((f[:-1] for f in b), key=repr)
        assert len(a) == len(b)
        assert a == b


def test_flamegraph_pl_splits_step_and_we_do_not(tmp_path: Path) -> None:
    p = tmp_path / "step.folded"
    p.write_text("a;step 5\na;step-2;x 3\na;step;y 2\n", encoding="utf-8")
    theirs = [f[0] for f in drawn(perl_svg(p, []))]
    ours = [f[0] for f in drawn(SVGFlameGraphGenerator(countname="samples").render(read_folded(p)))]
    assert theirs.count("step") == 2  # self part and child part, on either side of step-2
    assert ours.count("step") == 1
    assert sorted(set(theirs)) == sorted(ours)


def test_a_file_with_bad_lines_draws_as_flamegraph_pl_draws_it(tmp_path: Path) -> None:
    from buildtel.shared.flamegraph import Ignored

    p = tmp_path / "bad.folded"
    p.write_text("main;compile 500\nmain;compile ten\nnot a stack line\nmain;link 300\n-3\nmain;test 200\n"
                 "main;a;b x y\nmain;link 100\n", encoding="utf-8")
    run = subprocess.run(["perl", SCRIPT, "--countname=samples", str(p)], check=True, capture_output=True, text=True)
    ignored = Ignored()
    ours = SVGFlameGraphGenerator(countname="samples").render(read_folded(p, ignored=ignored))
    # (this copy prints counts with K/M suffixes: compare everything else)
    assert [f[:-1] for f in drawn(ours)] == [f[:-1] for f in drawn(run.stdout)]
    [theirs] = re.findall(r"Ignored (\d+) lines with invalid format", run.stderr)
    assert ignored.lines == int(theirs) == 4
    assert ignored.message().startswith(f"Ignored 4 lines with invalid format (first: {p}:2:")
