"""The `eventfn` command line: serve, invoke, pub, functions.

User mistakes (a bad flag, an unreachable server, a broken settings file) print one line and exit non-zero;
only a bug in eventfn itself shows a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec

from eventfn import __version__, events, subjects
from eventfn.bus import Bus, connect
from eventfn.config import ServiceConfig, environment_overrides, load_service_config
from eventfn.errors import EventfnError, ServiceUnavailable

DEFAULT_URL = "nats://127.0.0.1:4222"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventfn",
        description="Run Lambda-style handler files on events from NATS JetStream.",
        epilog="Settings: flags override EVENTFN_* environment variables, which override eventfn.toml.",
    )
    parser.add_argument("--version", action="version", version=f"eventfn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="service settings file (default: ./eventfn.toml if present)")
        p.add_argument("--nats", metavar="URL", help="NATS server URL(s), comma-separated (env EVENTFN_NATS_URL)")
        p.add_argument("--data-dir", help="state directory (default: ./.eventfn; env EVENTFN_DATA_DIR)")

    serve = commands.add_parser(
        "serve",
        help="run the service (starts an embedded NATS unless --nats is given)",
        description="Run handler files from a directory as functions.",
    )
    common(serve)
    serve.add_argument("--handlers", help="handler directory (default: ./handlers; env EVENTFN_HANDLERS)")
    serve.add_argument("--nats-port", type=int, help="port of the embedded NATS server (default 4222; 0: any free)")
    serve.add_argument("--creds", help="NATS credentials file (env EVENTFN_NATS_CREDS)")
    serve.add_argument("--token", help="NATS auth token (env EVENTFN_NATS_TOKEN)")
    serve.add_argument("--tls-ca", help="CA bundle to verify the NATS server")
    serve.add_argument("--tls-cert", help="client certificate for NATS (with --tls-key)")
    serve.add_argument("--tls-key", help="client key for NATS")
    serve.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO; env EVENTFN_LOG_LEVEL)",
    )

    invoke = commands.add_parser(
        "invoke",
        help="invoke a function and print its result",
        description="Invoke a function synchronously (or --async) over NATS.",
    )
    common(invoke)
    invoke.add_argument("name", help="function name")
    invoke.add_argument("payload", nargs="?", help="JSON event, or - to read stdin (default {})")
    invoke.add_argument(
        "--async",
        dest="is_async",
        action="store_true",
        help="queue the event (stored, at least once) and return at once",
    )
    invoke.add_argument("--timeout", type=float, default=930.0, help="seconds to wait for the result")

    pub = commands.add_parser(
        "pub",
        help="publish an event to a subject (stored if a stream holds it)",
        description="Publish a CloudEvent (binary mode) to a NATS subject.",
    )
    common(pub)
    pub.add_argument("subject")
    pub.add_argument("payload", nargs="?", help="event data, or - to read stdin (default {})")
    pub.add_argument("--type", default=events.PLAIN_EVENT_TYPE, help="CloudEvents type attribute")

    functions = commands.add_parser("functions", help="list functions with state, triggers and last error")
    common(functions)
    functions.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _config(args: argparse.Namespace) -> ServiceConfig:
    overrides: dict[str, Any] = environment_overrides(os.environ)
    flags = {
        "handlers": getattr(args, "handlers", None),
        "data_dir": args.data_dir,
        "log_level": getattr(args, "log_level", None),
        "nats.port": getattr(args, "nats_port", None),
        "nats.creds": getattr(args, "creds", None),
        "nats.token": getattr(args, "token", None),
        "nats.tls_ca": getattr(args, "tls_ca", None),
        "nats.tls_cert": getattr(args, "tls_cert", None),
        "nats.tls_key": getattr(args, "tls_key", None),
        "nats.url": [u for u in args.nats.split(",") if u] if args.nats else None,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_service_config(args.config, overrides)


def _client_urls(config: ServiceConfig) -> list[str]:
    """Where a client command finds NATS: configured URL, else the running service's, else the default."""
    if config.nats.url:
        return list(config.nats.url)
    written = Path(config.data_dir) / "nats.url"
    if written.exists():
        return [written.read_text(encoding="utf-8").strip()]
    return [DEFAULT_URL]


def _payload(value: str | None) -> bytes:
    if value is None:
        return b"{}"
    return sys.stdin.buffer.read() if value == "-" else value.encode()


async def _invoke(config: ServiceConfig, args: argparse.Namespace) -> int:
    data = _payload(args.payload)
    async with connect(_client_urls(config), config.nats, name="eventfn-cli") as bus:
        if args.is_async:
            event = events.new_event(subjects.ASYNC_PREFIX + args.name, data, source="eventfn-cli")
            seq = await bus.publish_stored(event.subject or "", data, events.binary_headers(event))
            print(msgspec.json.encode({"StatusCode": 202, "RequestId": event.id, "Sequence": seq}).decode())
            return 0
        reply = await _request(bus, subjects.INVOKE_PREFIX + args.name, data, args.timeout)
    sys.stdout.write(reply.data.decode(errors="replace") + "\n")
    headers = reply.headers or {}
    if error := headers.get("Eventfn-Error"):
        print(f"eventfn: {error} (status {headers.get('Eventfn-Status', '?')})", file=sys.stderr)
        return 1
    if function_error := headers.get("Eventfn-Function-Error"):
        print(f"eventfn: function error ({function_error})", file=sys.stderr)
        return 1
    return 0


async def _request(bus: Bus, subject: str, data: bytes, timeout: float) -> Any:
    try:
        return await bus.request(subject, data, timeout=timeout)
    except LookupError:
        raise ServiceUnavailable(bus.url) from None
    except TimeoutError:
        raise EventfnError(f"no reply on {subject} within {timeout:g} s") from None


async def _pub(config: ServiceConfig, args: argparse.Namespace) -> int:
    data = _payload(args.payload)
    content_type = "application/json"
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError:
        content_type = "text/plain"
    event = events.new_event(args.subject, data, source="eventfn-cli", type=args.type, content_type=content_type)
    async with connect(_client_urls(config), config.nats, name="eventfn-cli") as bus:
        try:
            seq = await bus.publish_stored(args.subject, data, events.binary_headers(event))
        except Exception:
            await bus.publish(args.subject, data, events.binary_headers(event))
            print(
                f"eventfn: no stream stores {args.subject!r}: published to core NATS only "
                "(only live subscribers see it)",
                file=sys.stderr,
            )
            return 0
    print(msgspec.json.encode({"id": event.id, "subject": args.subject, "sequence": seq}).decode())
    return 0


async def _functions(config: ServiceConfig, args: argparse.Namespace) -> int:
    async with connect(_client_urls(config), config.nats, name="eventfn-cli") as bus:
        reply = await _request(bus, subjects.API_PREFIX + "functions", b"", 5.0)
    infos: list[dict[str, Any]] = msgspec.json.decode(reply.data)
    if args.json:
        print(msgspec.json.format(reply.data, indent=2).decode())
        return 0
    rows = [("NAME", "STATE", "VERSION", "TRIGGERS", "LAST ERROR")]
    for info in infos:
        rows.append(
            (info["name"], info["state"], info["version"], ",".join(info["triggers"]) or "-", info["last_error"] or "-")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `eventfn` console script."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling positionals at the first flag: `invoke NAME --async PAYLOAD` leaves PAYLOAD over.
    if len(extra) == 1 and getattr(args, "payload", "") is None and not extra[0].startswith("--"):
        args.payload, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        config = _config(args)
        if args.command == "serve":
            from eventfn.service import serve

            logging.basicConfig(
                level=config.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)-5s %(name)s: %(message)s"
            )
            anyio.run(serve, config)
            code = 0
        else:
            runner = {"invoke": _invoke, "pub": _pub, "functions": _functions}[args.command]
            code = anyio.run(runner, config, args)
    except EventfnError as exc:
        print(f"eventfn: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
