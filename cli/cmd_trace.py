"""``buildtel trace``: show a build's trace as a span tree, or export it to Jaeger/Zipkin/OTLP.

    buildtel trace ID [--json]
    buildtel trace export ID --otlp URL [--otlp-protocol json] | --zipkin URL | --jaeger-file FILE
                             | --chrome-trace FILE [--json]
    buildtel trace --recent [N] [--json]

ID is a session id or a trace id in the CLI's one id grammar (cli/ids.py):
32 hex digits, a unique prefix of at least 6, ``last`` or ``last~N`` (stored sessions).

Traces come from the tracer service over NATS (``services/tracer/query.py``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from buildtel.cli.common import open_bus
from buildtel.cli.errors import CLIError
from buildtel.cli.ids import GRAMMAR, parse_id, resolve_trace_id
from buildtel.cli.jsonout import emit
from buildtel.cli.textsafe import safe, safe_block
from buildtel.shared.settings import Settings

# The tracer modules (opentelemetry-proto, aiohttp) are imported when the command runs, not
# when the parser is built: every buildtel command builds the parser.


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "trace", help="show a build's trace (span tree with timings), or export it",
        description="Show the trace of a build session (or any trace id) as a span tree, or export it: "
                    "'buildtel trace export ID --jaeger-file trace.json' (open it in the Jaeger UI), "
                    "'--chrome-trace build.json' (open it in ui.perfetto.dev or chrome://tracing: one track per "
                    "worker), '--zipkin http://zipkin:9411', '--otlp http://jaeger:4318'.")
    p.add_argument("words", nargs="*", metavar="[export] ID", help=f"a session or trace id: {GRAMMAR}")
    p.add_argument("--json", action="store_true", help="print the spans as JSON instead of a tree")
    p.add_argument("--recent", type=int, nargs="?", const=20, metavar="N", help="list the N newest traces")
    p.add_argument("--otlp", metavar="URL", help="export: POST to this OTLP/HTTP endpoint (Jaeger, Tempo, collector)")
    p.add_argument("--otlp-protocol", choices=("protobuf", "json"), default="protobuf",
                   help="export: OTLP encoding (default protobuf)")
    p.add_argument("--zipkin", metavar="URL", help="export: POST Zipkin v2 JSON to this endpoint")
    p.add_argument("--jaeger-file", metavar="FILE", help="export: write a Jaeger UI JSON file")
    p.add_argument("--chrome-trace", metavar="FILE",
                   help="export: write Chrome Trace Event JSON (Perfetto, chrome://tracing), a track per worker")
    p.set_defaults(func=cmd_trace, quiet_logs=True)


async def cmd_trace(args: argparse.Namespace, settings: Settings) -> int:
    from buildtel.services.tracer.query import QueryError, TraceClient, render_tree
    from buildtel.services.tracer.subjects import TracerSubjects

    words = list(args.words)
    exporting = bool(words) and words[0] == "export"
    if exporting:
        words = words[1:]
        if not (args.otlp or args.zipkin or args.jaeger_file or args.chrome_trace):
            raise CLIError("trace export needs --otlp URL, --zipkin URL, --jaeger-file FILE or --chrome-trace FILE")
    elif args.otlp or args.zipkin or args.jaeger_file or args.chrome_trace:
        raise CLIError("--otlp/--zipkin/--jaeger-file/--chrome-trace belong to 'buildtel trace export ID'")
    if args.recent is None and len(words) != 1:
        raise CLIError("give one session id or trace id (or --recent)")
    ref = parse_id(words[0]) if args.recent is None else None
    ident = ref.value if ref else ""
    async with open_bus(settings) as bus:
        from buildtel.services.storage.api import StorageClient

        client = TraceClient(bus.nc, TracerSubjects(bus.subjects))
        try:
            if ref is None:
                return _print_recent(await client.recent(max(1, args.recent)), as_json=args.json)
            ident = await resolve_trace_id(StorageClient(bus.nc, bus.subjects), client, ref)
            trace = await client.find(ident)
        except QueryError as exc:
            if exc.code == 404:
                named = "" if ident == words[0].strip().lower() else f", named by {safe(words[0].strip())}"
                raise CLIError(f"no trace stored for {ident!r}{named} (is it a session or trace id?)") from None
            raise CLIError(str(exc)) from None
    if exporting:
        return await _export(trace, args)
    if args.json:
        emit({"trace_id": trace.trace_id, "session_ids": trace.session_ids, "spans": trace.spans})
    else:
        print(safe_block(render_tree(trace)))  # span names and attributes come from publishers
    return 0


def _print_recent(traces: list, *, as_json: bool = False) -> int:  # type: ignore[type-arg]
    from buildtel.services.tracer.query import format_duration

    if as_json:
        emit(traces)
        return 0
    if not traces:
        print("no traces stored yet", file=sys.stderr)
        return 0
    print(f"{'TRACE':<32}  {'DURATION':>10}  SESSIONS")
    for t in traces:
        print(f"{safe(t.trace_id)}  {format_duration(max(0, t.end_ns - t.start_ns)):>10}  "
              f"{safe(', '.join(t.sessions)) or '-'}")
    return 0


async def _export(trace: Any, args: argparse.Namespace) -> int:
    from buildtel.services.tracer.exporters import (
        ExportError,
        OtlpHttpExporter,
        ZipkinExporter,
        write_chrome_trace,
        write_jaeger_file,
    )

    done = []
    if args.jaeger_file:
        path = write_jaeger_file(args.jaeger_file, {trace.trace_id: trace.spans})
        done.append(f"wrote {path} (Jaeger UI: Search -> JSON File)")
    if args.chrome_trace:
        chrome = write_chrome_trace(args.chrome_trace, trace.spans)
        done.append(f"wrote {chrome} (ui.perfetto.dev: Open trace file; or chrome://tracing: Load)")
    for exporter in ([OtlpHttpExporter(args.otlp, protocol=args.otlp_protocol)] if args.otlp else []) + \
                    ([ZipkinExporter(args.zipkin)] if args.zipkin else []):
        try:
            await exporter.export(trace.spans)
        except ExportError as exc:
            raise CLIError(str(exc)) from None
        finally:
            await exporter.close()
        done.append(f"sent to {exporter.url}")
    if args.json:
        emit({"trace_id": trace.trace_id, "session_ids": trace.session_ids, "spans": len(trace.spans),
              "jaeger_file": str(path) if args.jaeger_file else None,
              "chrome_trace": str(chrome) if args.chrome_trace else None,
              "sent_to": [line.removeprefix("sent to ") for line in done if line.startswith("sent to ")]})
        return 0
    for line in done:
        print(f"trace {safe(trace.trace_id)}: {len(trace.spans)} spans {safe(line)}")
    return 0
