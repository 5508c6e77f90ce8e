"""The `eventfn` command line: serve, invoke, pub, functions, mappings, dlq, schedules.

User mistakes (a bad flag, an unreachable server, a broken settings file) print one line and exit non-zero;
only a bug in eventfn itself shows a traceback.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import msgspec

from eventfn import __version__, cli_queues, cli_streams, decoding, events, subjects
from eventfn.broker import auth
from eventfn.broker.bus import Bus
from eventfn.broker.connection import connect
from eventfn.config import (
    NatsSettings,
    ServiceConfig,
    environment_overrides,
    load_service_config,
    name_problem,
    valid_subject,
)
from eventfn.errors import EventfnError, ServiceUnavailable, UnreadableData

DEFAULT_URL = "nats://127.0.0.1:4222"
#: What to do when a client command cannot reach NATS (`serve` keeps `connection.connect`'s own hint).
CLIENT_FIX = "is `eventfn serve` running? Start it, or point at it with --nats URL"
#: Table cells are cut to these widths (`dlq show` and `--json` print everything).
CELL_WIDTH = 64
LAST_CELL_WIDTH = 120


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventfn",
        description="Run Lambda-style handler files on events from NATS JetStream.",
        epilog="Settings: flags override EVENTFN_* environment variables, which override eventfn.toml.",
    )
    parser.add_argument("--version", action="version", version=f"eventfn {__version__}")
    _global_options(parser, default=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        # Given after the subcommand they win; left out, the value given before it (or None) stays.
        _global_options(p, default=argparse.SUPPRESS)

    serve = commands.add_parser(
        "serve",
        help="run the service (starts an embedded NATS unless --nats is given)",
        description="Run handler files from a directory as functions.",
    )
    common(serve)
    serve.add_argument("--handlers", help="handler directory (default: ./handlers; env EVENTFN_HANDLERS)")
    serve.add_argument("--nats-port", type=int, help="port of the embedded NATS server (default 4222; 0: any free)")
    serve.add_argument(
        "--http-port", type=int, help="port of the HTTP server (default 8080; 0: any free; env EVENTFN_HTTP_PORT)"
    )
    serve.add_argument("--http-host", help="address the HTTP server binds (default 127.0.0.1; env EVENTFN_HTTP_HOST)")
    serve.add_argument("--no-http", action="store_true", help="run no HTTP server")
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
    invoke.add_argument("--timeout", type=_seconds, default=930.0, help="seconds to wait for the result")

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

    maps = commands.add_parser(
        "mappings",
        help="list event source mappings (state, lag, counters), or enable/disable one",
        description="`eventfn mappings` lists; `eventfn mappings disable NAME` pauses one (its events wait in "
        "JetStream); `eventfn mappings enable NAME` resumes it where it stopped.",
    )
    common(maps)
    maps.add_argument("action", nargs="?", choices=["enable", "disable"], help="enable or disable NAME")
    maps.add_argument("name", nargs="?", help="mapping name, as listed (e.g. orders--t0)")
    maps.add_argument("--json", action="store_true", help="print JSON instead of a table")

    dlq = commands.add_parser("dlq", help="dead-letter records: ls, show, redrive, purge")
    common(dlq)
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    ls = dlq_commands.add_parser("ls", help="list records (of one function, or all)")
    common(ls)
    ls.add_argument("function", nargs="?")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show = dlq_commands.add_parser("show", help="print one whole record")
    common(show)
    show.add_argument("id", type=int, help="record id, as listed")
    redrive = dlq_commands.add_parser("redrive", help="re-inject records into the function (then delete them)")
    common(redrive)
    redrive.add_argument("function")
    redrive.add_argument("--id", dest="ids", type=int, action="append", help="only this record (repeatable)")
    purge = dlq_commands.add_parser("purge", help="delete every record of a function")
    common(purge)
    purge.add_argument("function")

    cli_queues.register(commands, common)
    cli_streams.register(commands, common)
    schedules = commands.add_parser(
        "schedules",
        help="list schedule triggers and their next fire times (reads the handler directory; no NATS needed)",
        description='Each schedule trigger (type = "schedule") of the functions in the handler directory, with its '
        "next fire times on its timezone's wall clock.",
    )
    common(schedules)
    schedules.add_argument("--handlers", help="handler directory (default: ./handlers; env EVENTFN_HANDLERS)")
    schedules.add_argument("--count", type=_count, default=5, help="fire times to show per schedule (default 5)")
    schedules.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _global_options(p: argparse.ArgumentParser, *, default: Any) -> None:
    """The options every command takes, before or after its name (`eventfn --nats URL functions`)."""
    p.add_argument(
        "--config", type=Path, default=default, help="service settings file (default: ./eventfn.toml if present)"
    )
    p.add_argument(
        "--nats", metavar="URL", default=default, help="NATS server URL(s), comma-separated (env EVENTFN_NATS_URL)"
    )
    p.add_argument("--data-dir", default=default, help="state directory (default: ./.eventfn; env EVENTFN_DATA_DIR)")


def _seconds(text: str) -> float:
    """A positive number of seconds (anything else is argparse's one-line usage error)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _count(text: str) -> int:
    """A number of fire times, 1 to 1000."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 1000):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 1000")
    return int(text)


def _config(args: argparse.Namespace) -> ServiceConfig:
    overrides: dict[str, Any] = environment_overrides(os.environ)
    flags = {
        "handlers": getattr(args, "handlers", None),
        "data_dir": args.data_dir,
        "log_level": getattr(args, "log_level", None),
        "nats.port": getattr(args, "nats_port", None),
        "http.port": getattr(args, "http_port", None),
        "http.host": getattr(args, "http_host", None),
        "http.enabled": False if getattr(args, "no_http", False) else None,
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


def _client(config: ServiceConfig) -> tuple[list[str], NatsSettings]:
    """Where a client command finds NATS, and as whom it connects.

    Credentials: a nats CLI context file ([nats] context / EVENTFN_NATS_CONTEXT), else those in the settings,
    else the admin credentials the embedded server wrote to `<data dir>/auth/admin.json` (sent only to that
    server). Replies come to the admin's inbox prefix unless one is set.
    """
    nats = config.nats
    if nats.context:
        nats = auth.client_settings(nats, auth.read_context(Path(nats.context)))
        config = msgspec.structs.replace(config, nats=nats)
    urls = _client_urls(config)
    if not (nats.context or nats.creds or nats.token or nats.user) and (found := auth.admin_context(config, urls)):
        nats = auth.client_settings(nats, found)
    return urls, msgspec.structs.replace(nats, inbox_prefix=nats.inbox_prefix or auth.INBOX_PREFIXES[auth.ADMIN])


def _connect(config: ServiceConfig) -> AbstractAsyncContextManager[Bus]:
    """A client command's connection; when NATS cannot be reached, the hint is about `eventfn serve`."""
    urls, settings = _client(config)
    # A refused request is this command's one error line; the client's own warning would repeat it.
    logging.getLogger("eventfn").setLevel(logging.ERROR)
    return connect(urls, settings, name="eventfn-cli", fix=CLIENT_FIX)


def _check_name(name: str) -> None:
    """A one-line error unless `name` can be a function's (a bad name would make a bad NATS subject)."""
    if problem := name_problem(name):
        raise EventfnError(f"{name!r} is not a valid function name: {problem} (see `eventfn functions`)")


def _payload(value: str | None) -> bytes:
    if value is None:
        return b"{}"
    return sys.stdin.buffer.read() if value == "-" else value.encode()


async def _invoke(config: ServiceConfig, args: argparse.Namespace) -> int:
    _check_name(args.name)
    data = _payload(args.payload)
    async with _connect(config) as bus:
        if args.is_async:
            # Lambda answers an async invoke of an unknown function with 404; a stored event would wait for
            # it forever. (A plain publish to eventfn.async.<name> still waits: the function may come later.)
            await _dry_run(bus, args.name)
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


async def _dry_run(bus: Bus, name: str) -> None:
    """Ask the running service whether function `name` exists (Lambda's DryRun invocation); nothing runs."""
    headers = {"Eventfn-Invocation-Type": "DryRun"}
    reply = await _request(bus, subjects.INVOKE_PREFIX + name, b"", 10.0, headers)
    if error := (reply.headers or {}).get("Eventfn-Error"):
        try:
            message = str(msgspec.json.decode(reply.data)["errorMessage"])
        except (msgspec.DecodeError, KeyError, TypeError):
            message = reply.data.decode(errors="replace")
        hint = " (see `eventfn functions`)" if error == "ResourceNotFoundException" else ""
        raise EventfnError(f"{error}: {message}; nothing was queued{hint}")


async def _request(bus: Bus, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None) -> Any:
    try:
        return await bus.request(subject, data, headers=headers, timeout=timeout)
    except LookupError:
        raise ServiceUnavailable(bus.url) from None
    except TimeoutError:
        raise EventfnError(f"no reply on {subject} within {timeout:g} s") from None


async def _pub(config: ServiceConfig, args: argparse.Namespace) -> int:
    if not valid_subject(args.subject) or "*" in args.subject or ">" in args.subject:
        raise EventfnError(f"{args.subject!r} is not a NATS subject to publish to (dot-separated tokens, no wildcards)")
    data = _payload(args.payload)
    content_type = "application/json"
    try:
        decoding.json_value(data)
    except UnreadableData:  # not JSON eventfn can read (invalid, or nested too deeply)
        content_type = "text/plain"
    event = events.new_event(args.subject, data, source="eventfn-cli", type=args.type, content_type=content_type)
    async with _connect(config) as bus:
        denied = bus.denials.count
        try:
            seq = await bus.publish_stored(args.subject, data, events.binary_headers(event))
        except Exception:
            if bus.denials.count > denied:  # refused, not merely unstored: say so rather than publish again
                raise EventfnError(
                    f"the NATS server refused to let this user publish to {args.subject!r}: {bus.denials.last}"
                ) from None
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
    async with _connect(config) as bus:
        reply = await _request(bus, subjects.API_PREFIX + "functions", b"", 5.0)
    infos: list[dict[str, Any]] = msgspec.json.decode(reply.data)
    if args.json:
        print(msgspec.json.format(reply.data, indent=2).decode())
        return 0
    rows: list[tuple[str, ...]] = [("NAME", "STATE", "VERSION", "TRIGGERS", "LAST ERROR")]
    for info in infos:
        state = info["state"]
        serving = info.get("serving_version")
        if serving and serving != info["version"]:  # a broken update: the old version still answers
            state += f" (serving {serving})"
        rows.append(
            (info["name"], state, info["version"] or "-", ",".join(info["triggers"]) or "-", info["last_error"] or "-")
        )
    _table(rows)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    """Print aligned columns, one line per row whatever the cells hold."""
    cells = [[_cell(c, CELL_WIDTH) for c in row[:-1]] + [_cell(row[-1], LAST_CELL_WIDTH)] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]) - 1)]
    for row in cells:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1])


def _cell(text: str, width: int) -> str:
    """`text` on one line: whitespace runs (newlines, tabs) become one space, other control characters are
    escaped (a record's error text is user data), and text past `width` ends in an ellipsis."""
    flat = " ".join(text.split())
    if not flat.isprintable():
        flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in flat)
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def _schedules(config: ServiceConfig, args: argparse.Namespace) -> int:
    """The schedule triggers in the handler directory and their next fire times, read from the files alone."""
    from eventfn.invoke.registry import scan  # only this command reads the handler directory

    handlers = Path(config.handlers)
    if not handlers.is_dir():
        raise EventfnError(f"handler directory {handlers} not found (give it with --handlers DIR)")
    now = time.time()
    found: list[dict[str, Any]] = []
    broken: list[str] = []
    for name, source in scan(handlers, config.functions).functions.items():
        if source.settings is None:
            broken.append(f"function {name}: {source.error}; its schedules, if any, are not listed")
            continue
        for i, trigger in enumerate(source.settings.trigger_list()):
            upcoming = getattr(trigger, "upcoming", None)  # the schedule connector's trigger type has it
            if trigger.type != "schedule" or upcoming is None:
                continue
            found.append(
                {
                    "function": name,
                    "trigger": trigger.name or f"t{i}",
                    "schedule": getattr(trigger, "schedule", ""),
                    "timezone": getattr(trigger, "timezone", ""),
                    "enabled": trigger.enabled,
                    "next": [t.isoformat() for t in upcoming(now, args.count)],
                }
            )
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(found), indent=2).decode())
    elif found:
        rows: list[tuple[str, ...]] = [("FUNCTION", "TRIGGER", "SCHEDULE", "TIMEZONE", "NEXT")]
        for item in found:
            times = item["next"] or ["never"]
            trigger = item["trigger"] + ("" if item["enabled"] else " (disabled)")
            rows.append((item["function"], trigger, item["schedule"], item["timezone"], times[0]))
            rows.extend(("", "", "", "", t) for t in times[1:])
        _table(rows)
    else:
        print(f"no schedule triggers in {handlers}", file=sys.stderr)
    for problem in broken:
        print(f"eventfn: error: {problem}", file=sys.stderr)
    return 1 if broken else 0


async def _mappings(config: ServiceConfig, args: argparse.Namespace) -> int:
    if args.action and not args.name:
        raise EventfnError(f"`eventfn mappings {args.action}` needs a mapping NAME (see `eventfn mappings`)")
    async with _connect(config) as bus:
        if args.action:
            reply = await _request(bus, f"{subjects.API_PREFIX}mappings.{args.action}", args.name.encode(), 10.0)
            if reply.headers and reply.headers.get("Eventfn-Error"):
                raise EventfnError(msgspec.json.decode(reply.data)["errorMessage"])
            info = msgspec.json.decode(reply.data)
            print(f"{info['name']}: {info['state']}")
            return 0
        reply = await _request(bus, subjects.API_PREFIX + "mappings", b"", 10.0)
    if args.json:
        print(msgspec.json.format(reply.data, indent=2).decode())
        return 0
    rows: list[tuple[str, ...]] = [
        ("NAME", "FUNCTION", "STATE", "SUBJECTS", "BATCH", "LAG", "PROCESSED", "FAILED", "FILTERED", "DLQ", "LAST")
    ]
    for m in msgspec.json.decode(reply.data):
        st = m["stats"]
        rows.append(
            (
                m["name"],
                m["function"],
                m["state"],
                ",".join(m["subjects"]),
                f"{m['batch_size']}/{m['batch_window']:g}s",
                str(m["lag"]),
                str(st["processed"]),
                str(st["failed"]),
                str(st["filtered"]),
                str(st["dead_lettered"]),
                st["last_result"],
            )
        )
    _table(rows)
    return 0


async def _dlq(config: ServiceConfig, args: argparse.Namespace) -> int:
    from eventfn.sources import dlq

    if getattr(args, "function", None) is not None:
        _check_name(args.function)
    async with _connect(config) as bus:
        try:
            if args.dlq_command == "ls":
                found = await dlq.list_records(bus, args.function)
                if args.json:
                    print(msgspec.json.format(msgspec.json.encode(found), indent=2).decode())
                    return 0
                rows: list[tuple[str, ...]] = [("ID", "FUNCTION", "TIME", "CONDITION", "ATTEMPTS", "ERROR")]
                for r in found:
                    rows.append(
                        (
                            str(r.id),
                            r.function,
                            r.timestamp,
                            r.condition,
                            str(r.attempts),
                            f"{r.error_type}: {r.error_message}",
                        )
                    )
                _table(rows)
            elif args.dlq_command == "show":
                print(decoding.pretty(await dlq.show(bus, args.id)))
            elif args.dlq_command == "redrive":
                done = await dlq.redrive(bus, args.function, args.ids)
                for record_id, seq in done:
                    print(f"record {record_id} redriven as event {seq}")
                print(f"{len(done)} record(s) redriven to {args.function}")
            else:
                print(f"{await dlq.purge(bus, args.function)} record(s) of {args.function} purged")
        except dlq.MappingGone as exc:
            raise EventfnError(
                f"record {exc.args[0]} came through mapping {exc.args[1]!r}, which no longer exists; nothing was "
                "redriven from there (restore the trigger, or `eventfn dlq show` it and publish it yourself)"
            ) from None
        except dlq.OriginalGone as exc:
            raise EventfnError(
                f"record {exc.args[0]} was stored without its payload (too large for one message) and stream "
                f"{exc.args[1]} no longer holds event {exc.args[2]}: it cannot be redriven"
            ) from None
        except dlq.UnreadableRecord as exc:
            raise EventfnError(
                f"record {exc.args[0]} cannot be redriven: {decoding.one_line(exc.args[1])}; nothing was redriven "
                f"(see `eventfn dlq show {exc.args[0]}`; redrive other records with --id)"
            ) from None
        except dlq.RecordNotFound as exc:
            raise EventfnError(
                f"no DLQ record {exc.args[0]}"
                + (f" for function {args.function!r}" if getattr(args, "function", None) else "")
                + " (see `eventfn dlq ls`)"
            ) from None
    return 0


def _leaves(group: BaseExceptionGroup[EventfnError]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


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
            # asyncio's own warnings (a child reaped twice, a slow callback) say nothing a user can act on.
            logging.getLogger("asyncio").setLevel(logging.ERROR)
            anyio.run(serve, config)
            # The service stopped cleanly. An in-process handler abandoned at its timeout may still hold a
            # thread, and the interpreter would wait for it at exit: flush and leave now.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        else:
            runner = {
                "invoke": _invoke,
                "pub": _pub,
                "functions": _functions,
                "mappings": _mappings,
                "dlq": _dlq,
                "schedules": _schedules,
                "queue": lambda config, args: cli_queues.run(config, args, _connect),
                "stream": lambda config, args: cli_streams.run(config, args, _connect),
            }[args.command]
            # Unencodable text (a function's output on a non-UTF-8 terminal) is escaped, not a traceback.
            if isinstance(sys.stdout, io.TextIOWrapper):
                sys.stdout.reconfigure(errors="backslashreplace")
            code = anyio.run(runner, config, args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except EventfnError as exc:
        print(f"eventfn: error: {exc}", file=sys.stderr)
        code = 1
    except BrokenPipeError:
        code = _reader_gone()
    except BaseExceptionGroup as group:  # raised inside a task group: a user's mistake is still one line
        rest = group.split(BrokenPipeError)[1]
        if rest is None:
            sys.exit(_reader_gone())
        mistakes, bugs = rest.split(EventfnError)
        if bugs is not None:
            raise
        assert mistakes is not None
        for mistake in _leaves(mistakes):
            print(f"eventfn: error: {mistake}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _reader_gone() -> int:
    """stdout's reader left (`eventfn mappings | head -3`): stop quietly, as a tool killed by SIGPIPE does."""
    # Whatever is still buffered cannot be written; point stdout at /dev/null so the exit does not try again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE
