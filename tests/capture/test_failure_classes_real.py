"""Failure classes proven on real builds, with make and with ninja (docs/failures.md).

One project, built by ``buildtel run`` (a subprocess, as a user runs it) against one real stack
(``buildtel up``: its own NATS and Redis, shared by the module), with ``make -k`` and with each
ninja on the machine (``ninja -k 0``: the test extra's 1.13, which prints ``[code=N]`` and exits
with a failed edge's code, and a distribution's 1.11 where there is one).  Each failed target is
a real tool failing for real:

* a compile error (gcc) and a link error (undefined reference) → ``code``;
* a compiled C test whose ``assert`` fails → ``code`` (rule test-assertion) though it dies of
  SIGABRT, its signature the assertion line;
* a killed compiler: gcc runs cc1 through ``-wrapper`` a script that SIGKILLs itself → gcc says
  "Killed signal terminated program" → ``infra``;
* an edge killed by SIGKILL (as the OOM killer does) → ``infra`` by its exit code 137 where the
  tool says it (make; ninja >= 1.13), ``unknown`` where nothing does (ninja 1.11 prints no code);
* a full disk: the kernel's ENOSPC, ``gcc -c -o /dev/full`` (the assembler says "No space left on
  device") → ``infra`` (rule no-space); and a program writing past ``ulimit -f`` (SIGXFSZ, "File
  size limit exceeded") → ``infra``;
* a test that fails one time in two (a compiled program counting its runs in a file outside the
  tree): two builds of the same commit of a real git repository, the first fails, the second
  passes → ``buildtel failures`` shows its group as ``flaky``.

Each record's class, rule, exit code and kept output are read back through the CLI
(``buildtel show ID --failures --json``, ``buildtel log ID TARGET --json``, ``buildtel log ID``).
A ninja 1.13 build whose only failure is a SIGKILLed edge exits 137 and is stored ``failed``, not
``cancelled``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.capture.project import ninja_binaries
from tests.cli.test_stack import buildtel
from tests.web.farm import running_stack

pytestmark = pytest.mark.timeout(600)  # the module's stack and one tool's three builds, on a loaded machine

NINJAS = ninja_binaries()
TOOLS = ["make", *(f"ninja-{v}" for v in NINJAS)]

BAD_C = "int broken(void) { return 1 }\n"
MAIN_C = "int missing_fn(void);\nint main(void) { return missing_fn(); }\n"
K_C = "int k(int x) { return x + 1; }\n"
T_C = "#include <assert.h>\nint main(void) { int x = 1; assert(x == 2); return 0; }\n"
BIG_C = """\
#include <stdio.h>
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    if (!f) return 2;
    for (int i = 0; i < 200000; i++) fputs("0123456789abcdef0123456789abcdef\\n", f);
    return fclose(f) == 0 ? 0 : 3;
}
"""
# Fails on odd runs, passes on even ones: the count lives outside the tree, so a clean checkout
# of the same commit still alternates.
FLAKY_C = """\
#include <assert.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int n = 0;
    FILE *f = fopen(argv[1], "r");
    if (f) { if (fscanf(f, "%d", &n) != 1) n = 0; fclose(f); }
    f = fopen(argv[1], "w");
    if (!f) return 2;
    fprintf(f, "%d\\n", ++n);
    fclose(f);
    assert(n % 2 == 0 && "fails on odd runs");
    return 0;
}
"""
KILLER = "#!/bin/sh\nkill -9 $$\n"

MAKEFILE = """\
all: bad.o app check killed.o oom full.o big.bin flaky
bad.o: bad.c
\tgcc -c bad.c -o bad.o
app: main.c
\tgcc main.c -o app
t_assert: t.c
\tgcc t.c -o t_assert
check: t_assert
\t./t_assert
killed.o: k.c
\tgcc -wrapper $(CURDIR)/killer -c k.c -o killed.o
oom:
\techo allocating; kill -9 $$$$
full.o: k.c
\tgcc -c k.c -o /dev/full
bigwriter: big.c
\tgcc big.c -o bigwriter
big.bin: bigwriter
\trm -f big.bin; ulimit -f 16; ./bigwriter big.bin
flaky_t: flaky.c
\tgcc flaky.c -o flaky_t
flaky: flaky_t
\t./flaky_t {state}
.PHONY: all check oom full.o big.bin flaky
"""
NINJA_FILE = """\
rule cc
  command = gcc -c $in -o $out
rule link
  command = gcc $in -o $out
rule killcc
  command = gcc -wrapper {root}/killer -c $in -o $out
rule oom
  command = echo allocating; kill -9 $$$$
rule fullcc
  command = gcc -c $in -o /dev/full
rule run
  command = ./$in
rule fsize
  command = rm -f $out; ulimit -f 16; ./$in $out
rule flaky
  command = ./$in {state}
build bad.o: cc bad.c
build app: link main.c
build t_assert: link t.c
build check: run t_assert
build killed.o: killcc k.c
build oom: oom
build full.o: fullcc k.c
build bigwriter: link big.c
build big.bin: fsize bigwriter
build flaky_t: link flaky.c
build flaky: flaky flaky_t
"""


@dataclass
class Case:
    cls: str
    rule: str
    exit_code: int | None  # with make and ninja >= 1.13 (which print the edge's code)
    line: str  # part of a line the tool printed that the record's output must hold
    signature: str  # part of the signature (the error line it comes from, normalised)
    old_ninja: tuple[str, str] | None = None  # (class, rule) when ninja 1.11 says no exit code


CASES: dict[str, Case] = {
    "bad.o": Case("code", "compiler", 1, "error: expected ", "bad.c:N:N: error: expected "),
    "app": Case("code", "linker", 1, "undefined reference to `missing_fn'", "undefined reference to `missing_fn'"),
    "check": Case("code", "test-assertion", 134, "t.c:2: main: Assertion `x == 2' failed.",
                  "t_assert: t.c:N: main: Assertion `x == N' failed."),
    "killed.o": Case("infra", "killed", 1, "gcc: fatal error: Killed signal terminated program ",
                     "gcc: fatal error: Killed signal terminated program <tmp>"),  # the wrapper's path is under /tmp
    # Nothing but the exit status says how it died: its signature is make's *** line, or none at all.
    "oom": Case("infra", "signal", 137, "allocating", "", old_ninja=("unknown", "")),
    "full.o": Case("infra", "no-space", 1, "/dev/full: No space left on device", "<tmp>: Fatal error: "),
    "big.bin": Case("infra", "signal", 153, "File size limit exceeded", "File size limit exceeded",
                    old_ninja=("infra", "no-space")),
    "flaky": Case("code", "test-assertion", 134, "Assertion `n % 2 == 0 && \"fails on odd runs\"' failed.",
                  "flaky_t: flaky.c:N: main: Assertion `n % N == N && \"fails on odd runs\"' failed."),
}


@dataclass
class Builds:
    tool: str
    branch: str
    root: Path
    first: dict[str, Any] = field(default_factory=dict)  # `buildtel run --json` of each build
    second: dict[str, Any] = field(default_factory=dict)
    killed_only: dict[str, Any] = field(default_factory=dict)  # a build of the SIGKILLed edge alone
    shown: dict[str, dict[str, Any]] = field(default_factory=dict)  # `show --failures --json` per build

    @property
    def coded(self) -> bool:
        """Whether the tool says a failed target's exit code (make; ninja >= 1.13)."""
        if self.tool == "make":
            return True
        return tuple(int(x) for x in self.tool.removeprefix("ninja-").split(".")[:2]) >= (1, 13)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with running_stack(tmp_path_factory.mktemp("stack")) as (_cache, env, _info):
        yield env


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args], cwd=root,
                   check=True, capture_output=True)


def _project(root: Path, tool: str, state: Path) -> str:
    """The project as a git repository on a branch of its own (the groups of `buildtel failures
    --branch`); its branch."""
    root.mkdir()
    for name, text in (("bad.c", BAD_C), ("main.c", MAIN_C), ("k.c", K_C), ("t.c", T_C), ("big.c", BIG_C),
                       ("flaky.c", FLAKY_C), ("killer", KILLER)):
        (root / name).write_text(text)
    (root / "killer").chmod(0o755)
    if tool == "make":
        (root / "Makefile").write_text(MAKEFILE.format(state=state))
    else:
        (root / "build.ninja").write_text(NINJA_FILE.format(root=root, state=state))
    branch = "ft-" + tool
    _git(root, "init", "-q", "-b", branch)
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "one commit")
    return branch


def _argv(tool: str, *targets: str) -> list[str]:
    if tool == "make":
        return ["make", "-k", "-j1", *targets]
    return [NINJAS[tool.removeprefix("ninja-")], "-k", "0", "-j1", *targets]


def _run(env: dict[str, str], root: Path, argv: list[str]) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "run", "--json", "--", *argv], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.stdout.strip(), res.stderr[-3000:]
    doc: dict[str, Any] = json.loads(res.stdout)
    assert doc["exit_code"] == res.returncode, res.stderr[-3000:]
    doc["console"] = res.stderr  # --json: the build's own output goes to stderr
    return doc


def _stored(env: dict[str, str], sid: str) -> dict[str, Any]:
    """``show ID --failures --json`` once storage has the session (bounded wait)."""
    deadline = time.monotonic() + 180
    while True:
        res = buildtel("show", sid, "--failures", "--json", env=env, timeout=120)
        if res.returncode == 0:
            doc: dict[str, Any] = json.loads(res.stdout)
            return doc
        assert time.monotonic() < deadline, f"session {sid} was not stored: {res.stderr[-2000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module", params=TOOLS)
def builds(request: pytest.FixtureRequest, stack: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Builds:
    tool: str = request.param
    tmp = tmp_path_factory.mktemp(tool)
    root = tmp / "proj"
    b = Builds(tool, _project(root, tool, tmp / "flaky-runs.txt"), root)
    b.first = _run(stack, root, _argv(tool))
    b.second = _run(stack, root, _argv(tool))  # the same commit: the flaky test passes this time
    b.killed_only = _run(stack, root, _argv(tool, "oom"))
    for key in ("first", "second", "killed_only"):
        doc = getattr(b, key)
        b.shown[key] = _stored(stack, doc["session_id"])
    return b


@pytest.mark.parametrize("target", CASES)
def test_each_real_failure_is_classified_and_keeps_its_output(builds: Builds, stack: dict[str, str],
                                                               target: str) -> None:
    case = CASES[target]
    assert builds.first["outcome"] == "failed", builds.first["console"][-3000:]
    rows = {r["target"]: r for r in builds.shown["first"]["failures"]}
    assert set(rows) == set(CASES), builds.first["console"][-3000:]
    r = rows[target]
    want = (case.cls, case.rule) if builds.coded or case.old_ninja is None else case.old_ninja
    code = case.exit_code if builds.coded else None  # ninja 1.11 prints no code at all
    assert (r["failure_class"], r["class_rule"], r["exit_code"]) == (*want, code), r
    assert r["attributed"] and any(case.line in line for line in r["output"]), (r["output"], r["note"])
    assert case.signature in (r["signature"] or ""), r

    # The same record through `buildtel log ID TARGET`, and the line in the whole log.
    sid = builds.first["session_id"]
    one = buildtel("log", sid, target, "--json", env=stack, timeout=120)
    assert one.returncode == 0, one.stderr
    rec = json.loads(one.stdout)
    assert (rec["target"], rec["output"], rec["signature"]) == (target, r["output"], r["signature"])
    assert (rec["failure_class"], rec["class_rule"], rec["exit_code"]) == (*want, code)
    whole = buildtel("log", sid, env=stack, timeout=120)
    assert whole.returncode == 0 and case.line in whole.stdout, whole.stderr


def test_a_test_failing_one_time_in_two_is_flaky(builds: Builds, stack: dict[str, str]) -> None:
    second = {r["target"] for r in builds.shown["second"]["failures"]}
    assert second == set(CASES) - {"flaky"}, builds.second["console"][-3000:]
    out = buildtel("failures", "--json", "--branch", builds.branch, env=stack, timeout=120)
    assert out.returncode == 0, out.stderr
    groups = {tuple(g["targets"]): g for g in json.loads(out.stdout)["groups"]}
    flaky = groups[("flaky",)]
    assert (flaky["failure_class"], flaky["count"], flaky["example_sessions"]) == (
        "flaky", 1, [builds.first["session_id"]])
    assert groups[("check",)]["failure_class"] == "code"  # fails every time: no flake
    assert groups[("check",)]["count"] == 2


def test_a_build_whose_edge_was_sigkilled_failed_and_was_not_cancelled(builds: Builds) -> None:
    doc = builds.killed_only
    expected = {"make": 2}.get(builds.tool, 137 if builds.coded else 1)  # ninja 1.13: the edge's code
    assert (doc["outcome"], doc["exit_code"]) == ("failed", expected), doc["console"][-2000:]
    shown = builds.shown["killed_only"]
    assert (shown["outcome"], shown["exit_code"]) == ("failed", expected)
    [row] = shown["failures"]
    assert (row["target"], row["failure_class"], row["exit_code"]) == (
        "oom", *(("infra", 137) if builds.coded else ("unknown", None)))
    if builds.tool != "make":  # ninja logs no failed edge: the count says where it was read
        assert "0 targets captured (ninja); up-to-date targets not known (the build failed); " \
               "1 failed ninja edge(s) read from the console" in doc["console"], doc["console"][-2000:]
