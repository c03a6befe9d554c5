"""Private files: everything the stack writes is its owner's alone (0700 folders, 0600 files).

Build history, traces, recordings, engine data and credentials say a lot about a
company's code; another local user must not read them.  Modes are set explicitly
rather than left to the umask, which a build machine may have set permissively.
:func:`tighten_tree` fixes a data directory an older version left world-readable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and missing parents) 0700; an existing folder is tightened to 0700."""
    p = Path(path)
    missing = []
    q = p
    while not q.exists():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass
        os.chmod(d, DIR_MODE)
    if p.is_dir() and stat.S_IMODE(p.stat().st_mode) & 0o077:
        os.chmod(p, DIR_MODE)
    return p


def open_private(path: Path | str, mode: str = "ab") -> Any:
    """``open(path, mode)`` creating the file 0600 (an existing one is tightened to 0600)."""
    flags = os.O_CREAT | (os.O_RDWR if "+" in mode or "r" in mode else os.O_WRONLY)
    if "a" in mode:
        flags |= os.O_APPEND
    if "w" in mode:
        flags |= os.O_TRUNC
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path | str, data: str | bytes) -> None:
    """Replace ``path`` with ``data``, 0600 from the first byte (temporary file + rename)."""
    p = Path(path)
    private_dir(p.parent)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open_private(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, p)


def tighten_tree(root: Path | str) -> int:
    """Remove group/other access from ``root`` and everything under it; returns how many entries
    were changed (the caller logs it).  Symbolic links are not followed."""
    changed = 0
    top = Path(root)
    if not top.exists():
        return 0
    entries = [str(top)]
    for dirpath, dirnames, filenames in os.walk(top):
        entries.extend(os.path.join(dirpath, n) for n in dirnames + filenames)
    for name in entries:
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_IMODE(st.st_mode) & 0o077:
            continue
        os.chmod(name, stat.S_IMODE(st.st_mode) & 0o700)
        changed += 1
    return changed
