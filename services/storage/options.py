"""The storage service's serve options: its command-line flags and the ``StorageService`` keyword
arguments they give (``buildtel serve storage``, ``python -m buildtel.services.storage``, both
through ``services/registry.py``).  Light on purpose: building a parser imports no bus client.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_serve_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--ack-wait-s", type=float, default=30.0,
                        help="JetStream ack wait of the durable consumer when this run creates it; "
                             "un-acked messages of a crashed instance are redelivered after it (default 30)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="messages fetched (and fsynced together) per batch; bounds memory in flight")
    parser.add_argument("--partition", type=int, default=None, metavar="K",
                        help="the storage partition this instance owns (0..P-1) when "
                             "BUILDER_TELEMETRY_STORAGE_PARTITIONS is P > 1: its store is telemetry/p<K>/ "
                             "(docs/scaling.md, Partitions)")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"ack_wait_s": args.ack_wait_s, "batch_size": args.batch_size, "partition": args.partition}
