"""`eventfn queue`: queues: ls, stats, send, purge, redrive.

Every queue comes from `eventfn.toml` (`[queues.<name>]`, with the DLQ queue of each that has a redrive policy);
what each holds is read from its JetStream stream, as SQS's queue attributes tell it: messages waiting, in
flight (received and neither deleted nor visible again yet), delayed, the age of the oldest, and its DLQ's.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec

from eventfn import subjects
from eventfn.broker.bus import Bus
from eventfn.config import DLQ_SUFFIX, QueueSettings, ServiceConfig, all_queues
from eventfn.errors import EventfnError, QueueError, QueueNotFound
from eventfn.sources import queues

Connect = Callable[[ServiceConfig], AbstractAsyncContextManager[Bus]]

#: Messages read from a DLQ at a time by `redrive`.
_PAGE = 100


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the `queue` command and its actions to the CLI's parser."""
    parser = commands.add_parser(
        "queue",
        help="queues: ls, stats, send, purge, redrive",
        description="The queues declared in eventfn.toml ([queues.<name>]) and what they hold.",
    )
    common(parser)
    actions = parser.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="each queue: messages, in flight, delayed, oldest age, DLQ depth")
    common(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats = actions.add_parser("stats", help="one queue in detail: its settings, what it holds, its consumer")
    common(stats)
    stats.add_argument("name", help="queue name, as declared")
    stats.add_argument("--json", action="store_true", help="print JSON instead of lines")
    send = actions.add_parser(
        "send",
        help="send a message (stored when this returns)",
        description="Send BODY to queue NAME, as SQS's SendMessage: headers become message attributes.",
    )
    common(send)
    send.add_argument("name", help="queue name, as declared")
    send.add_argument("body", help="message body, or - to read stdin")
    send.add_argument("--attr", action="append", default=[], metavar="K=V", help="a message attribute (repeatable)")
    send.add_argument("--delay", type=_delay, help="seconds before it can be received (0-900; standard queues)")
    send.add_argument("--group", help="message group id (FIFO queues: required)")
    send.add_argument("--dedup-id", help="deduplication id (FIFO queues: required without content-based dedup)")
    purge = actions.add_parser("purge", help="delete every message of a queue (delayed ones and those in flight too)")
    common(purge)
    purge.add_argument("name", help="queue name, as declared")
    redrive = actions.add_parser(
        "redrive",
        help="move the messages of a queue's DLQ back to it, oldest first",
        description="Move every message of NAME's DLQ (NAME-dlq) back to NAME, oldest first; each leaves the DLQ "
        "only once NAME has stored it (run it again if it was interrupted: a copy already moved is not sent twice "
        "within the queue's deduplication window).",
    )
    common(redrive)
    redrive.add_argument("name", help="the source queue (its DLQ is NAME-dlq)")


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= queues.MAX_DELAY:
        raise argparse.ArgumentTypeError(f"{text!r} is not a delay from 0 to {queues.MAX_DELAY:g} seconds")
    return value


async def run(config: ServiceConfig, args: argparse.Namespace, connect: Connect) -> int:
    """Run the action `args` names; returns the exit code."""
    declared = all_queues(config)
    name = getattr(args, "name", None)
    if name is not None and name not in declared:
        raise QueueNotFound(name, sorted(declared))
    async with connect(config) as bus:
        if args.queue_command == "ls":
            return await _ls(bus, declared, args.json)
        assert name is not None
        queue = declared[name]
        if args.queue_command == "stats":
            return await _stats(bus, name, queue, args.json)
        if args.queue_command == "send":
            return await _send(bus, name, queue, args)
        if args.queue_command == "purge":
            return await _purge(bus, name)
        return await _redrive(bus, name, queue)


class QueueStats(msgspec.Struct, kw_only=True):
    """What a queue holds, as SQS's queue attributes say it."""

    name: str
    fifo: bool
    #: False: its stream does not exist (no `eventfn serve` has created it yet).
    exists: bool = True
    #: Stored, neither delayed nor in flight (ApproximateNumberOfMessages).
    messages: int = 0
    #: Received and neither deleted nor visible again (ApproximateNumberOfMessagesNotVisible).
    in_flight: int = 0
    #: Sent with a delay of their own, not yet due (ApproximateNumberOfMessagesDelayed).
    delayed: int = 0
    #: Seconds since the oldest stored message was sent (0: none).
    oldest_age: float = 0.0
    #: The DLQ queue's name and what it holds (None: no redrive policy).
    dead_letter: str | None = None
    dead_letter_messages: int | None = None


async def queue_stats(bus: Bus, name: str, queue: QueueSettings) -> QueueStats:
    """What queue `name` holds now."""
    stream = subjects.queue_stream(name)
    counts = await bus.subject_counts(stream, f"{queues.subject(name)}.>")
    main = await bus.subject_counts(stream, queues.subject(name))
    dead_letter = name + DLQ_SUFFIX if queue.max_receive_count else None
    stats = QueueStats(name=name, fifo=queue.fifo, dead_letter=dead_letter)
    if dead_letter is not None:
        held = await bus.subject_counts(subjects.queue_stream(dead_letter), queues.subject(dead_letter))
        stats.dead_letter_messages = sum(held.values()) if held is not None else None
    if counts is None or main is None:
        stats.exists = False
        return stats
    stored = sum(main.values())
    stats.in_flight = min(stored, sum(c.ack_pending for c in (await bus.consumer_states(stream)).values()))
    stats.messages = stored - stats.in_flight
    stats.delayed = sum(counts.values())  # `<subject>.>`: the delayed ones only
    if stored:
        oldest = await bus.read(stream, queues.subject(name), limit=1)
        if oldest and oldest[0].timestamp:
            stats.oldest_age = max(0.0, time.time() - oldest[0].timestamp)
    return stats


async def _ls(bus: Bus, declared: dict[str, QueueSettings], as_json: bool) -> int:
    found = [await queue_stats(bus, name, queue) for name, queue in sorted(declared.items())]
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(found), indent=2).decode())
        return 0
    if not found:
        print("no queues declared (add [queues.<name>] tables to eventfn.toml)", file=sys.stderr)
        return 0
    rows: list[tuple[str, ...]] = [("NAME", "TYPE", "MESSAGES", "IN FLIGHT", "DELAYED", "OLDEST", "DLQ")]
    for s in found:
        kind = "fifo" if s.fifo else "standard"
        if not s.exists:
            rows.append((s.name, kind, "-", "-", "-", "-", "not created yet (start eventfn serve)"))
            continue
        rows.append(
            (s.name, kind, str(s.messages), str(s.in_flight), str(s.delayed), _age(s.oldest_age), _dead_letter(s))
        )
    _table(rows)
    return 0


async def _stats(bus: Bus, name: str, queue: QueueSettings, as_json: bool) -> int:
    stats = await queue_stats(bus, name, queue)
    consumers = await bus.consumer_states(subjects.queue_stream(name))
    settings: dict[str, Any] = msgspec.to_builtins(queue)
    if as_json:
        out = {
            **msgspec.to_builtins(stats),
            "settings": settings,
            "consumers": {n: msgspec.to_builtins(c) for n, c in consumers.items()},
        }
        print(msgspec.json.format(msgspec.json.encode(out), indent=2).decode())
        return 0
    if not stats.exists:
        raise QueueNotFound(name)
    lines = [
        ("queue", name),
        ("type", "fifo" if queue.fifo else "standard"),
        ("arn", queues.arn(name)),
        ("stream", subjects.queue_stream(name)),
        ("messages", str(stats.messages)),
        ("in flight", str(stats.in_flight)),
        ("delayed", str(stats.delayed)),
        ("oldest", _age(stats.oldest_age)),
        ("visibility timeout", f"{queue.visibility_timeout:g} s"),
        ("delay", f"{queue.delay_seconds:g} s"),
        ("retention", f"{queue.retention:g} s"),
        ("max receive count", f"{queue.max_receive_count}" + ("" if queue.max_receive_count else " (no DLQ)")),
    ]
    if stats.dead_letter:
        lines.append(("dlq", _dead_letter(stats)))
    for consumer, state in sorted(consumers.items()):
        paused = ", paused" if state.paused else ""
        lines.append(("consumer", f"{consumer} ({state.ack_pending} in flight, {state.pending} waiting{paused})"))
    if not consumers:
        lines.append(("consumer", "none (no function has a trigger on it)"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return 0


async def _send(bus: Bus, name: str, queue: QueueSettings, args: argparse.Namespace) -> int:
    attributes: dict[str, str] = {}
    for item in args.attr:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QueueError(name, f"--attr {item!r} is not K=V")
        attributes[key] = value
    body = sys.stdin.buffer.read() if args.body == "-" else args.body.encode()
    sent = await queues.send_message(
        bus,
        name,
        body,
        attributes=attributes,
        delay=args.delay,
        group=args.group,
        dedup_id=args.dedup_id,
        fifo=queue.fifo,
        content_based=queue.content_based_deduplication,
    )
    out: dict[str, Any] = {"MessageId": sent.message_id, "MD5OfMessageBody": hashlib.md5(body).hexdigest()}
    if queue.fifo:
        out["SequenceNumber"] = str(sent.sequence)
    if sent.delayed_until:
        out["DelayedUntil"] = sent.delayed_until
    print(msgspec.json.encode({k: v for k, v in out.items() if v is not None}).decode())
    return 0


async def _purge(bus: Bus, name: str) -> int:
    stream = subjects.queue_stream(name)
    if not await bus.stream_exists(stream):
        raise QueueNotFound(name)
    count = await bus.purge(stream, queues.subject(name))
    count += await bus.purge(stream, queues.delayed_subjects(name))
    print(f"{count} message(s) purged from {name}")
    return 0


async def _redrive(bus: Bus, name: str, queue: QueueSettings) -> int:
    if not queue.max_receive_count:
        raise QueueError(name, "it has no DLQ (max_receive_count = 0)", "redrive a queue that has a redrive policy")
    moved = await redrive(bus, name, name + DLQ_SUFFIX)
    print(f"{moved} message(s) moved from {name + DLQ_SUFFIX} back to {name}")
    return 0


async def redrive(bus: Bus, name: str, dead_letter: str) -> int:
    """Move every message of queue `dead_letter` to queue `name`, oldest first; each is deleted from the DLQ only
    once `name` stored it. Returns how many were moved."""
    dlq_stream = subjects.queue_stream(dead_letter)
    if not await bus.stream_exists(subjects.queue_stream(name)):
        raise QueueNotFound(name)
    if not await bus.stream_exists(dlq_stream):
        # Not `QueueNotFound`: a DLQ is declared by its queue's max_receive_count, not as a queue of its own.
        raise QueueError(
            dead_letter,
            f"its stream ({dlq_stream}) does not exist",
            "start `eventfn serve`, which creates it (a queue with max_receive_count > 0 gets one)",
        )
    moved = 0
    start = 1
    while page := await bus.read(dlq_stream, queues.subject(dead_letter), start=start, limit=_PAGE):
        for record in page:
            headers = {
                k: v
                for k, v in (record.headers or {}).items()
                if k != queues.SOURCE_HEADER and not k.startswith("Nats-")
            }
            # Interrupted and run again, the copy already sent is dropped as a duplicate (within the window).
            headers[queues.MSG_ID_HEADER] = f"redrive:{dlq_stream}:{record.seq}"
            try:
                await bus.publish_stored(queues.subject(name), record.data, headers)
            except Exception as exc:
                raise EventfnError(
                    f"queue {name}: message {record.seq} of {dead_letter} not stored ({exc}); {moved} moved so far, "
                    "the rest is still in the DLQ (run it again)"
                ) from exc
            await bus.delete(dlq_stream, record.seq)
            moved += 1
        start = page[-1].seq + 1
    return moved


def _dead_letter(stats: QueueStats) -> str:
    if stats.dead_letter is None:
        return "-"
    held = "not created yet" if stats.dead_letter_messages is None else str(stats.dead_letter_messages)
    return f"{held} ({stats.dead_letter})"


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1])
