"""Checks a storage partition makes before it takes sessions (``shared/partitions.py`` has the
mapping): its data directory and the sessions stream must be laid out for the same partition
count as the settings, or sessions would go where no instance reads them, or half the history
would silently vanish from queries.  Each refusal names the fix (``buildtel storage rebalance``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from buildtel.shared import partitions
from buildtel.shared.subjects import Subjects


def _fix(p: int) -> str:
    return f"run 'buildtel storage rebalance --partitions {p}' with storage stopped (docs/scaling.md, Partitions)"


def check_layout(telemetry_dir: Path, count: int, partition: int | None) -> None:
    """Refuse a store directory laid out for another partition count."""
    if partition is not None and partitions.unpartitioned_files(telemetry_dir):
        raise ValueError(f"{telemetry_dir} holds an unpartitioned store but BUILDER_TELEMETRY_STORAGE_PARTITIONS "
                         f"is {count}: {_fix(count)}")
    extra = [k for k in partitions.partition_dirs(telemetry_dir) if k >= count or partition is None]
    if extra:
        raise ValueError(f"{telemetry_dir} holds partition directories {[f'p{k}' for k in extra]} but "
                         f"BUILDER_TELEMETRY_STORAGE_PARTITIONS is {count}: {_fix(count)}")


async def check_stream(js: Any, subjects: Subjects, count: int) -> None:
    """The sessions stream must map completed sessions to ``count`` partitions."""
    info = await js.stream_info(subjects.sessions_stream)
    actual = partitions.partitions_of_transform(info.config.subject_transform)
    if actual != count:
        raise ValueError(f"stream {subjects.sessions_stream} is partitioned for {actual} storage partition(s) "
                         f"but BUILDER_TELEMETRY_STORAGE_PARTITIONS is {count}: {_fix(count)}, or set it to {actual}")
