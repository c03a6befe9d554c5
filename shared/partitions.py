"""Storage partitions: which partition owns a session, and how the bus routes it there.

With ``BUILDER_TELEMETRY_STORAGE_PARTITIONS`` = P > 1 the collector publishes a completed
session on ``<ns>.sessions.completed.<id>`` and the sessions stream's subject transform
(nats-server >= 2.10) stores it as ``<ns>.sessions.completed.<k>.<id>`` with
``k = {{partition(P,1)}}``: the server's FNV-1a hash of the id token modulo P.  Storage
instance k consumes ``<ns>.sessions.completed.<k>.*`` with a durable of its own
(``storage-p<k>``) into ``telemetry/p<k>/``.  The hash is computed here too
(:func:`partition_of`), byte for byte the server's, so ``buildtel storage rebalance`` puts a
stored session where the server sends its re-deliveries (tested against the server).

P = 1 changes nothing: no transform, the bare ``completed`` subject, the ``storage`` durable
and ``telemetry/`` itself.  Sessions published on the bare subject while P > 1 (an older
collector, an import) are not lost: partition 0 consumes them too.
"""

from __future__ import annotations

from pathlib import Path

from nats.js.api import SubjectTransform

from buildtel.shared.subjects import Subjects, token

MAX_PARTITIONS = 64
DURABLE = "storage"  # the unpartitioned store's durable consumer (P = 1), as ever


def partition_of(session_id: str, partitions: int) -> int:
    """The partition nats-server's ``{{partition(P,1)}}`` maps the session's id token to."""
    h = 0x811C9DC5
    for b in token(session_id).encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def stream_transform(subjects: Subjects, partitions: int) -> SubjectTransform | None:
    """The sessions stream's transform for P partitions (None for P = 1: nothing is mapped)."""
    if partitions <= 1:
        return None
    src = f"{subjects.ns}.sessions.completed.*"
    return SubjectTransform(src=src, dest=f"{subjects.ns}.sessions.completed.{{{{partition({partitions},1)}}}}"
                                         ".{{wildcard(1)}}")


def partitions_of_transform(transform: SubjectTransform | None) -> int:
    """P from a stream's transform (1 when there is none): what the stream says, not the settings."""
    if transform is None or not transform.dest or "partition(" not in transform.dest:
        return 1
    return int(transform.dest.split("partition(", 1)[1].split(",", 1)[0])


def publish_subject(subjects: Subjects, session_id: str, partitions: int) -> str:
    """Where the collector publishes a completed session."""
    return subjects.sessions_completed if partitions <= 1 else subjects.sessions_completed_for(session_id)


def consumer_filters(subjects: Subjects, partitions: int) -> tuple[str, ...]:
    """Filter subjects of a consumer of *every* completed session (analyzer, tracer): the bare
    subject and the partitioned ones.  Empty for P = 1: the consumer's one subject, as before."""
    if partitions <= 1:
        return ()
    return (subjects.sessions_completed, subjects.sessions_completed_any)


def storage_durable(partition: int | None) -> str:
    return DURABLE if partition is None else f"{DURABLE}-p{partition}"


def storage_filters(subjects: Subjects, partition: int | None) -> tuple[str, ...]:
    """What storage partition ``k`` consumes: its mapped subject, and for k = 0 also the bare one."""
    if partition is None:
        return ()
    own = subjects.sessions_partition(partition)
    return (subjects.sessions_completed, own) if partition == 0 else (own,)


def store_dir(telemetry_dir: Path, partition: int | None) -> Path:
    """``telemetry/`` for the unpartitioned store, ``telemetry/p<k>/`` for partition k."""
    return telemetry_dir if partition is None else telemetry_dir / f"p{partition}"


def unpartitioned_files(telemetry_dir: Path) -> list[Path]:
    """Segment files (``seg-*``) of a P = 1 store directly in ``telemetry/`` (sessions that
    rebalancing re-homes; a store that never stored one holds none)."""
    if not telemetry_dir.is_dir():
        return []
    return sorted(p for p in telemetry_dir.iterdir() if p.is_file() and p.name.startswith("seg-"))


def partition_dirs(telemetry_dir: Path) -> dict[int, Path]:
    """The ``p<k>`` partition directories under ``telemetry/``, by k."""
    out: dict[int, Path] = {}
    if telemetry_dir.is_dir():
        for p in telemetry_dir.iterdir():
            if p.is_dir() and p.name.startswith("p") and p.name[1:].isdigit():
                out[int(p.name[1:])] = p
    return dict(sorted(out.items()))
