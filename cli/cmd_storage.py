"""``buildtel storage rebalance --partitions N``: change the number of storage partitions offline
(``services/storage/rebalance.py``; docs/scaling.md, Partitions).

Every storage instance must be stopped.  With a configured NATS (``BUILDER_TELEMETRY_NATS_URL``)
the command joins it as the operator; on a machine whose stack ``buildtel up`` ran, stop the stack
first ('buildtel down'): the command then starts the stack's embedded nats-server (its JetStream
data under ``<data dir>/engines/nats``) for the time it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

from buildtel.cli.errors import CLIError
from buildtel.shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    storage = sub.add_parser("storage", help="storage maintenance: change the number of partitions",
                             description="Storage maintenance (docs/scaling.md, Partitions).")
    ssub = storage.add_subparsers(dest="storage_command", required=True, metavar="{rebalance}")
    reb = ssub.add_parser(
        "rebalance", help="re-home stored sessions into N partitions (storage stopped)",
        description="Re-home every stored session into N storage partitions by session id (telemetry/p<k>/, or "
                    "telemetry/ itself for N=1), switch the sessions stream's partition mapping and the storage "
                    "consumers to N, keeping every session once. Every storage instance must be stopped and "
                    "caught up. Then start N storage instances with BUILDER_TELEMETRY_STORAGE_PARTITIONS=N.")
    reb.add_argument("--partitions", type=int, required=True, metavar="N", help="the new number of partitions")
    reb.set_defaults(func=cmd_rebalance)


@contextlib.asynccontextmanager
async def _operator(settings: Settings) -> AsyncIterator[Any]:
    from buildtel.cli.cmd_stack import stack_running
    from buildtel.shared.auth import StackAuth
    from buildtel.shared.bus import close_nats, connect_nats
    from buildtel.shared.engines import NatsEngine

    if settings.nats_url:
        nc = await connect_nats(settings, settings.nats_url, name="buildtel-rebalance", role="operator")
        try:
            yield nc
        finally:
            await close_nats(nc)
        return
    if stack_running(settings) is not None:
        raise CLIError("a stack is running here and its storage with it: stop it first ('buildtel down')")
    auth = StackAuth.generate()
    engine = NatsEngine(settings.engines_dir / "nats", auth=auth, namespace=[settings.namespace,
                                                                              *settings.tenant_list]).start()
    try:
        nc = await connect_nats(settings.with_(stack_auth=auth), engine.url, name="buildtel-rebalance",
                                role="operator")
        try:
            yield nc
        finally:
            await close_nats(nc)
    finally:
        engine.stop()


async def cmd_rebalance(args: argparse.Namespace, settings: Settings) -> int:
    from buildtel.services.storage.rebalance import RebalanceError, rebalance

    async with _operator(settings) as nc:
        try:
            rep = await rebalance(settings, nc, args.partitions)
        except RebalanceError as exc:
            raise CLIError(str(exc)) from None
    spread = ", ".join(f"p{k}: {n}" for k, n in sorted(rep.per_partition.items())) or "none stored"
    print(f"buildtel: rebalanced {rep.sessions} session(s) from {rep.before} to {rep.after} partition(s) ({spread})"
          + (f"; {rep.duplicates} stored twice kept once" if rep.duplicates else ""), file=sys.stderr)
    if rep.arrived_during_switch:
        print(f"buildtel: {rep.arrived_during_switch} session(s) arrived during the switch: the partition of the "
              "mapping they met stores them (queries find them there)", file=sys.stderr)
    print(f"buildtel: now start storage with BUILDER_TELEMETRY_STORAGE_PARTITIONS={rep.after}"
          + (f" and --partition 0..{rep.after - 1}" if rep.after > 1 else ""), file=sys.stderr)
    return 0
