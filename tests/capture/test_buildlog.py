"""The pure parts of failures and logs (docs/failures.md): cutting a log to its limit (Hypothesis:
any chunking keeps the same head and tail), redaction of a log line by line, ninja's FAILED
blocks, make's window, error lines and failure signatures."""

from __future__ import annotations

import itertools
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from buildtel.shared.buildlog import LogBuffer, compress, decompress, keep, redact_log
from buildtel.shared.capture.failures import Seen, find_failures, make_anchor, ninja_blocks, timed_lines
from buildtel.shared.failrecord import records
from buildtel.shared.failsig import error_lines, quoted_only, signature
from buildtel.shared.protocol import BuildSession, TargetMetrics

_bytes = st.binary(max_size=3000) | st.text(alphabet="ab\n xyz=", max_size=3000).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(data=_bytes, limit=st.integers(4, 2000), cuts=st.lists(st.integers(0, 3000), max_size=12))
def test_any_chunking_keeps_the_same_head_and_tail(data: bytes, limit: int, cuts: list[int]) -> None:
    buf = LogBuffer(limit)
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for a, b in itertools.pairwise(points):
        buf.append(float(a), data[a:b])
    assert buf.text() == keep(data, limit)
    assert buf.total == len(data)
    assert buf.kept == min(len(data), limit) and buf.cut == max(len(data) - limit, 0)
    assert buf.cut_lines == data[limit // 4:len(data) - (limit - limit // 4)].count(b"\n") if buf.cut else True


@settings(max_examples=300, deadline=None)
@given(data=_bytes, limit=st.integers(4, 2000))
def test_keep_is_the_whole_log_or_head_marker_tail(data: bytes, limit: int) -> None:
    out = keep(data, limit)
    if len(data) <= limit:
        assert out == data
        return
    head, tail = data[:limit // 4], data[len(data) - (limit - limit // 4):]
    assert out.startswith(head) and out.endswith(tail)
    middle = out[len(head):len(out) - len(tail)]
    assert middle.strip(b"\n").startswith(b"[buildtel: ") and middle.endswith(b"]\n")
    assert f"{len(data) - limit} bytes".encode() in middle


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.text(max_size=80).filter(lambda x: "\n" not in x and "\r" not in x), max_size=30))
def test_redaction_keeps_lines_and_is_idempotent(lines: list[str]) -> None:
    data = "\n".join(lines).encode("utf-8", "surrogatepass") if lines else b""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return
    once = redact_log(data)
    assert once.count(b"\n") == data.count(b"\n")
    assert redact_log(once) == once
    assert decompress(compress(once)) == once


def test_redaction_of_secrets_in_a_log() -> None:
    log = (b"export AWS_SECRET_ACCESS_KEY=abcd1234efgh5678\n"
           b"curl https://user:hunter2@example.com/x\n"
           b"token ghp_" + b"A1b2C3d4E5" * 4 + b"\n\xff\xfe not utf-8\n")
    out = redact_log(log)
    assert b"abcd1234efgh5678" not in out and b"hunter2" not in out and b"ghp_A1b2" not in out
    assert out.count(b"[REDACTED]") == 3 and out.endswith(b"\xff\xfe not utf-8\n")
    assert zlib.decompress(compress(out)) == out


def _chunks(*parts: tuple[float, str, int]) -> list[tuple[float, bytes, int]]:
    return [(t, text.encode(), fd) for t, text, fd in parts]


def test_ninja_blocks_and_failed_edges() -> None:
    chunks = _chunks((1.0, "[1/3] cc -c a.c\nFAILED: a.o \ncc -c a.c -o a.o\na.c:1:1: error: boom\n", 1),
                     (2.0, "[2/3] cc -c b.c\n[3/3] link app\nFAILED: [code=1] app \ncc b.o -o app\n", 1),
                     (2.5, "ld: b.o: undefined reference to `f'\nninja: build stopped: subcommand failed.\n", 1))
    lines = timed_lines(chunks)
    assert [(b[0], b[1]) for b in ninja_blocks(lines)] == [("a.o", 1.0), ("app", 2.0)]
    failures, edges = find_failures(chunks, [Seen("b.o", 1.5, 1.9, "success")])
    assert [e.target for e in edges] == ["a.o", "app"]
    by = {f.target: f for f in failures}
    assert by["a.o"].output == ["cc -c a.c -o a.o", "a.c:1:1: error: boom"]
    assert by["a.o"].signature == "a.c:N:N: error: boom"
    assert by["app"].errors == ["ld: b.o: undefined reference to `f'"]
    # ninja >= 1.13 prints the edge's exit code: kept on the target and its record (None when not printed)
    assert [(e.target, e.exit_code) for e in edges] == [("a.o", None), ("app", 1)]
    assert (by["a.o"].exit_code, by["app"].exit_code) == (None, 1)


def test_a_ninja_edge_killed_by_sigkill_keeps_its_code_and_is_infra() -> None:
    # What ninja 1.13 prints for an edge whose command was SIGKILLed (it prints nothing of its own).
    chunks = _chunks((1.0, '[1/1] exec python3 -c "import os; os.kill(os.getpid(), 9)"\n'
                           'FAILED: [code=137] k.o \nexec python3 -c "import os; os.kill(os.getpid(), 9)"\n'
                           "ninja: build stopped: subcommand failed.\n", 1))
    [f], [edge] = find_failures(chunks, [])
    assert (f.target, f.exit_code, edge.exit_code) == ("k.o", 137, 137)
    session = BuildSession(id="s" * 32, name="b", start=1.0, finish=2.0, duration_s=1.0, outcome="failed",
                           targets=[TargetMetrics(name="k.o", start=1.0, end=1.0, duration_s=0.0, status="failed",
                                                  exit_code=edge.exit_code)], failures=[f])
    [rec] = records(session)
    assert (rec.failure_class, rec.class_rule, rec.exit_code) == ("infra", "signal", 137)


def test_make_output_is_not_guessed_when_recipes_overlap() -> None:
    chunks = _chunks((1.0, "cc -c a.c\ncc -c b.c\n", 0),
                     (1.2, "a.c:1: error: x\nmake: *** [Makefile:2: a.o] Error 1\n", 0))
    seen = [Seen("a.o", 1.0, 1.1, "failed"), Seen("b.o", 1.0, 1.3, "success")]
    [f], _ = find_failures(chunks, seen)
    assert not f.attributed and f.output == [] and "not attributed: 1 other recipe(s)" in f.note


def test_make_output_runs_from_the_previous_star_line_to_its_own() -> None:
    chunks = _chunks((1.0, "cc -c a.c\na.c:1: error: x\nmake: *** [Makefile:2: a.o] Error 1\ncc -c b.c\n", 0),
                     (2.0, "b.c:3: error: y\nmake: *** [b.o] Error 1\n", 0))
    seen = [Seen("a.o", 0.9, 1.0, "failed"), Seen("b.o", 1.0, 1.9, "failed")]
    failures, _ = find_failures(chunks, seen)
    assert [f.output for f in failures] == [
        ["cc -c a.c", "a.c:1: error: x", "make: *** [Makefile:2: a.o] Error 1"],
        ["cc -c b.c", "b.c:3: error: y", "make: *** [b.o] Error 1"]]
    assert make_anchor("make[2]: *** [Makefile:7: sub/x.o] Killed") == "sub/x.o"


def test_output_is_bounded_to_its_last_lines() -> None:
    body = "".join(f"line {i}\n" for i in range(5000))
    chunks = _chunks((1.0, body + "make: *** [Makefile:1: big] Error 2\n", 0))
    [f], _ = find_failures(chunks, [Seen("big", 0.5, 1.0, "failed")], output_kib=1)
    assert len("\n".join(f.output)) <= 1024 and f.output[-1].startswith("make: ***")
    assert f.output_cut_bytes > 0 and f.signature == "make: *** [Makefile:N: big] Error N"


def test_error_lines_and_signatures() -> None:
    lines = ["gcc -Werror=format -c x.c", "x.c:9:2: error: unknown type", "In file included", "Error 2"]
    assert error_lines(lines) == ["x.c:9:2: error: unknown type", "Error 2"]
    assert quoted_only('echo "Error: gone" >&2') and not quoted_only("Error: gone")
    assert signature("\x1b[1m/home/u/p/src/x.c:12:5:\x1b[0m error: bad") == "x.c:N:N: error: bad"
    assert signature("/usr/bin/ld: /tmp/ccAbc123.o: in function `main':") == "ld: <tmp>: in function `main':"
    assert signature("cc1: out of memory allocating 65536 bytes after 0xdeadbeef, hash 0123abcdef99") == \
        "cc1: out of memory allocating N bytes after <hex>, hash <hex>"
    assert signature("x86_64 bad2.c tmpq1w2e3r4.txt") == "x86_64 bad2.c <tmp>.txt"


def test_an_assertion_and_a_file_size_limit_are_the_signature_not_the_shells_word() -> None:
    # What make and ninja 1.13 print for a test program whose assert() fails (glibc), and for a
    # recipe that writes past `ulimit -f` (the shell reports SIGXFSZ).
    chunks = _chunks((1.0, "./t\nt: t.c:2: main: Assertion `x' failed.\nmake: *** [Makefile:2: check] Aborted\n", 0),
                     (2.0, "ulimit -f 16; ./big\nFile size limit exceeded\n"
                           "make: *** [Makefile:4: big.bin] Error 153\n", 0))
    check, big = find_failures(chunks, [Seen("check", 0.9, 1.0, "failed", 134),
                                        Seen("big.bin", 1.9, 2.0, "failed", 153)])[0]
    assert check.signature == "t: t.c:N: main: Assertion `x' failed."
    assert big.signature == "File size limit exceeded" and big.exit_code == 153
    ninja = _chunks((1.0, "[1/1] ./t\nFAILED: [code=134] check \n./t\nt: t.c:2: main: Assertion `x' failed.\n"
                          "Aborted\nninja: build stopped: subcommand failed.\n", 1))
    [f], _ = find_failures(ninja, [])
    assert f.errors == ["t: t.c:2: main: Assertion `x' failed.", "Aborted"]
    assert (f.signature, f.exit_code) == ("t: t.c:N: main: Assertion `x' failed.", 134)


def test_failure_output_of_a_build_is_bounded_together() -> None:
    chunks, seen, t = [], [], 1000.0
    for k in range(30):
        body = "".join(f"line {i} of target {k}, long enough to fill a kibibyte soon\n" for i in range(400))
        chunks += _chunks((t, f"cc -c f{k}.c\n{body}f{k}.c:1:1: error: {'x' * 500}\n", 0),
                          (t + 0.9, f"make: *** [Makefile:1: f{k}.o] Error 1\n", 0))
        seen.append(Seen(f"f{k}.o", t, t + 0.8, "failed"))
        t += 1
    failures, _ = find_failures(chunks, seen)
    sizes = [sum(len(x) + 1 for x in f.output) for f in failures]
    assert all(s <= 16 * 1024 for s in sizes) and sum(sizes) <= 256 * 1024
    assert "output cut short" not in failures[0].note and "output cut short" in failures[-1].note
    assert all(f.errors and len(f.errors[0]) <= 300 and f.signature for f in failures)


def test_no_line_spans_the_cut() -> None:
    buf = LogBuffer(80)  # head: the first 20 bytes
    buf.append(1.0, b"head line 1\nhead partial", 0)
    buf.append(2.0, b"x" * 100 + b" tail partial\nlast line\n", 0)
    lines = [line for _, _, line in timed_lines(buf.chunks())]
    assert lines[0] == "head line 1" and lines[-1] == "last line"
    assert not any("head" in line and "tail" in line for line in lines)
