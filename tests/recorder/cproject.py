"""A real, small C project (4 sources, 2 headers, a Makefile with -MMD dependency files) for the recorder tests."""

from __future__ import annotations

from pathlib import Path

SOURCES = {
    "include/util.h": "#ifndef UTIL_H\n#define UTIL_H\nint add(int a, int b);\nint mul(int a, int b);\n#endif\n",
    "include/config.h": "#define GREETING \"hello\"\n",
    "src/add.c": "#include \"util.h\"\nint add(int a, int b) { return a + b; }\n",
    "src/mul.c": "#include \"util.h\"\n"
                 "int mul(int a, int b) { int r = 0; for (int i = 0; i < b; i++) r = add(r, a); return r; }\n",
    "src/greet.c": "#include <stdio.h>\n#include \"config.h\"\nvoid greet(void) { puts(GREETING); }\n",
    "src/main.c": "#include <stdio.h>\n#include \"util.h\"\nvoid greet(void);\n"
                  "int main(void) { greet(); printf(\"%d\\n\", mul(add(2, 3), 4)); return 0; }\n",
}

MAKEFILE = """\
CC = gcc
CFLAGS = -O2 -Iinclude -MMD -MP
SRCS = $(wildcard src/*.c)
OBJS = $(patsubst src/%.c,build/%.o,$(SRCS))

all: build/app{stamp_goal}

build/app: $(OBJS)
\t$(CC) -o $@ $^

build/%.o: src/%.c | build
\t$(CC) $(CFLAGS) -c -o $@ $<

build:
\tmkdir -p build
{stamp_rule}
-include $(OBJS:.o=.d)

clean:
\trm -rf build
.PHONY: all clean
"""

STAMP_RULE = "\nbuild/stamp.txt: build/app\n\tdate +%s%N > $@\n"


def write_project(root: Path, *, timestamp: bool = False) -> Path:
    """Write the project under ``root``; with ``timestamp`` the build also writes build/stamp.txt
    holding the current time in nanoseconds (never reproducible)."""
    for rel, text in SOURCES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "Makefile").write_text(MAKEFILE.format(stamp_goal=" build/stamp.txt" if timestamp else "",
                                                   stamp_rule=STAMP_RULE if timestamp else ""))
    return root
