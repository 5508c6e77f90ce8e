"""`eventfn stream`: sharded streams: ls, describe, put.

Everything shown is read from JetStream, so it works whether or not a service runs: each shard's records and last
sequence number, and for each mapping (one consumer per shard) its checkpoint (the consumer's ack floor), the
records behind it, and its iterator age (how long ago the first record it has not processed arrived).
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

import msgspec

from eventfn import subjects
from eventfn.broker.bus import Bus
from eventfn.config import DataStreamSettings, ServiceConfig
from eventfn.errors import EventfnError
from eventfn.sources import shards

Connect = Callable[[ServiceConfig], AbstractAsyncContextManager[Bus]]

#: Kinesis's limit on a partition key.
MAX_KEY_LENGTH = 256


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the `stream` command and its actions to the CLI's parser."""
    parser = commands.add_parser(
        "stream",
        help="sharded streams: ls, describe, put",
        description="Sharded streams declared in eventfn.toml ([streams.<name>]): their shards, and the checkpoint "
        "and iterator age of each mapping on them.",
    )
    common(parser)
    actions = parser.add_subparsers(dest="stream_command", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="each stream: shards, records, last sequence number, puts not yet routed")
    common(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    describe = actions.add_parser(
        "describe", help="one stream's shards (hash key range, last sequence) and mappings (checkpoint, iterator age)"
    )
    common(describe)
    describe.add_argument("name", help="stream name, as declared")
    describe.add_argument("--json", action="store_true", help="print JSON instead of tables")
    put = actions.add_parser(
        "put",
        help="put one record (the service routes it to its shard, in put order)",
        description="Put one record, as `nats pub -H Partition-Key:KEY eventfn.stream.NAME DATA` does.",
    )
    common(put)
    put.add_argument("name", help="stream name, as declared")
    put.add_argument("data", help="the record's data, or - to read stdin")
    put.add_argument("--key", required=True, help="partition key (picks the shard; 1 to 256 characters)")
    put.add_argument("--json", action="store_true", help="print JSON")


async def run(config: ServiceConfig, args: argparse.Namespace, connect: Connect) -> int:
    """Run the action `args` names; returns the exit code."""
    action = args.stream_command
    if action in ("describe", "put"):
        _declared(config, args.name)
    key, data = "", b""
    if action == "put":
        key = _key(args.key)
        data = sys.stdin.buffer.read() if args.data == "-" else args.data.encode()
    async with connect(config) as bus:
        if action == "ls":
            listed = [await _summary(bus, name, stream) for name, stream in sorted(config.streams.items())]
            if args.json:
                _print_json(listed)
            elif listed:
                rows: list[tuple[str, ...]] = [("STREAM", "SHARDS", "RECORDS", "LAST SEQUENCE", "UNROUTED")]
                rows += [
                    (s["stream"], str(s["shards"]), _n(s["records"]), _n(s["lastSequence"]), _n(s["unrouted"]))
                    for s in listed
                ]
                _table(rows)
            else:
                print("no sharded streams declared (add [streams.<name>] to eventfn.toml)", file=sys.stderr)
        elif action == "describe":
            found = await _describe(bus, args.name, config.streams[args.name])
            if args.json:
                _print_json(found)
            else:
                _print_description(found)
        else:
            return await _put(bus, args.name, config.streams[args.name], key, data, as_json=args.json)
    return 0


def _declared(config: ServiceConfig, name: str) -> None:
    if name not in config.streams:
        declared = ", ".join(sorted(config.streams)) or "none"
        raise EventfnError(
            f"stream {name!r} is not declared (declared: {declared}); declare it in eventfn.toml as [streams.{name}]"
        )


def _key(key: str) -> str:
    # A header value loses its outer spaces on the way: the record would take another key, and shard, than named.
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable() or key != key.strip():
        raise EventfnError(
            f"--key must be 1 to {MAX_KEY_LENGTH} printable characters, not starting or ending with a space (it is "
            "sent as a NATS header)"
        )
    return key


async def _put(bus: Bus, name: str, stream: DataStreamSettings, key: str, data: bytes, *, as_json: bool) -> int:
    if not await bus.stream_exists(subjects.ingest_stream(name)):
        raise EventfnError(f"stream {name} has not been created yet: start `eventfn serve` with this eventfn.toml")
    seq = await bus.publish_stored(shards.put_subject(name), data, {shards.KEY_HEADER: key})
    shard = shards.shard_id(shards.shard_of(key, stream.shards))
    if as_json:
        _print_json({"stream": name, "partitionKey": key, "shardId": shard, "putSequence": seq})
    else:
        print(f"put {seq} to stream {name}: partition key {key!r} goes to {shard} (the service routes it)")
    return 0


# -- reading JetStream ---------------------------------------------------------------------------------------------


async def _api(bus: Bus, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JetStream API request; the error it answers (none: `{}` for a missing stream or message)."""
    try:
        reply = await bus.request("$JS.API." + subject, msgspec.json.encode(body) if body else b"", timeout=5.0)
    except LookupError:
        raise EventfnError("JetStream does not answer: is it enabled on this NATS server?") from None
    except TimeoutError:
        raise EventfnError(f"JetStream did not answer {subject} within 5 s") from None
    value: dict[str, Any] = msgspec.json.decode(reply.data)
    if error := value.get("error"):
        if error.get("code") == 404:
            return {}
        raise EventfnError(f"JetStream refused {subject}: {error.get('description')}")
    return value


async def _summary(bus: Bus, name: str, stream: DataStreamSettings) -> dict[str, Any]:
    info = await _api(bus, f"STREAM.INFO.{subjects.data_stream(name)}")
    ingest = await _api(bus, f"STREAM.INFO.{subjects.ingest_stream(name)}")
    state = info.get("state") or {}
    return {
        "stream": name,
        "shards": stream.shards,
        "created": bool(info),
        "records": state.get("messages", 0),
        "lastSequence": state.get("last_seq", 0),
        "unrouted": (ingest.get("state") or {}).get("messages", 0),
    }


async def _describe(bus: Bus, name: str, stream: DataStreamSettings) -> dict[str, Any]:
    data_stream = subjects.data_stream(name)
    summary = await _summary(bus, name, stream)
    info = await _api(bus, f"STREAM.INFO.{data_stream}", {"subjects_filter": f"{subjects.SHARD_PREFIX}{name}.*"})
    counts = (info.get("state") or {}).get("subjects") or {}
    shard_list = []
    for index, (low, high) in enumerate(shards.hash_ranges(stream.shards)):
        subject = shards.shard_subject(name, index)
        last = await _message(bus, data_stream, {"last_by_subj": subject}) if counts.get(subject) else None
        shard_list.append(
            {
                "shardId": shards.shard_id(index),
                "hashKeyRange": {"startingHashKey": str(low), "endingHashKey": str(high)},
                "records": counts.get(subject, 0),
                "lastSequence": last["seq"] if last else None,
            }
        )
    mappings = []
    for consumer in sorted(await _consumers(bus, data_stream) if summary["created"] else [], key=lambda c: c["name"]):
        config = consumer.get("config") or {}
        filters = config.get("filter_subjects") or [config.get("filter_subject", "")]
        subject = filters[0] if filters else ""
        token = subject.rpartition(".")[2]
        floor = (consumer.get("ack_floor") or {}).get("stream_seq", 0)
        behind = int(consumer.get("num_pending") or 0) + int(consumer.get("num_ack_pending") or 0)
        age_ms = None
        if behind and subject:
            first = await _message(bus, data_stream, {"seq": floor + 1, "next_by_subj": subject})
            if first is not None:
                age_ms = max(0, (time.time_ns() - _arrival_ns(first)) // 1_000_000)
        mappings.append(
            {
                "mapping": consumer.get("name"),
                "function": str(consumer.get("name")).partition("--")[0],
                "shardId": shards.shard_id(int(token)) if token.isdigit() else "?",
                "checkpoint": floor,
                "behind": behind,
                "inFlight": int(consumer.get("num_ack_pending") or 0),
                "iteratorAgeMs": age_ms or 0,
                "paused": bool(consumer.get("paused")),
            }
        )
    return {**summary, "shards": shard_list, "mappings": mappings}


async def _consumers(bus: Bus, stream: str) -> list[dict[str, Any]]:
    """Every consumer of `stream` (JetStream lists them a page at a time)."""
    found: list[dict[str, Any]] = []
    while True:
        page = await _api(bus, f"CONSUMER.LIST.{stream}", {"offset": len(found)})
        batch = page.get("consumers") or []
        found += batch
        if not batch or len(found) >= int(page.get("total") or 0):
            return found


async def _message(bus: Bus, stream: str, query: dict[str, Any]) -> dict[str, Any] | None:
    found = await _api(bus, f"STREAM.MSG.GET.{stream}", query)
    message: dict[str, Any] | None = found.get("message")
    return message


def _arrival_ns(message: dict[str, Any]) -> int:
    """A stored record's arrival (ns): its `Eventfn-Arrival` header, or when it was stored."""
    if raw := message.get("hdrs"):
        for line in base64.b64decode(raw).decode("utf-8", "replace").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip() == shards.ARRIVAL_HEADER and value.strip().isdigit():
                return int(value.strip())
    stamp = str(message.get("time", ""))
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    try:
        seconds = datetime.fromisoformat(whole + "+00:00").timestamp()
    except ValueError:
        return time.time_ns()
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


# -- printing ------------------------------------------------------------------------------------------------------


def _print_description(found: dict[str, Any]) -> None:
    if not found["created"]:
        print(f"stream {found['stream']} has not been created yet: start `eventfn serve` with this eventfn.toml")
        return
    print(
        f"stream {found['stream']}: {len(found['shards'])} shard(s), {_n(found['records'])} record(s), last sequence "
        f"{_n(found['lastSequence'])}, {_n(found['unrouted'])} put(s) not yet routed"
    )
    print()
    rows: list[tuple[str, ...]] = [("SHARD", "STARTING HASH KEY", "ENDING HASH KEY", "RECORDS", "LAST SEQUENCE")]
    for shard in found["shards"]:
        key_range = shard["hashKeyRange"]
        rows.append(
            (
                shard["shardId"],
                key_range["startingHashKey"],
                key_range["endingHashKey"],
                _n(shard["records"]),
                _n(shard["lastSequence"]),
            )
        )
    _table(rows)
    print()
    if not found["mappings"]:
        print("no mappings (no function has a trigger on this stream)")
        return
    rows = [("MAPPING", "SHARD", "CHECKPOINT", "BEHIND", "IN FLIGHT", "ITERATOR AGE")]
    for m in found["mappings"]:
        age = _age(m["iteratorAgeMs"]) + (" (paused)" if m["paused"] else "")
        rows.append((m["mapping"], m["shardId"], _n(m["checkpoint"]), _n(m["behind"]), _n(m["inFlight"]), age))
    _table(rows)


def _age(ms: int) -> str:
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.1f} min"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _print_json(value: Any) -> None:
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _table(rows: list[tuple[str, ...]]) -> None:
    """Aligned columns (the CLI's format; every cell here is a name or a number eventfn wrote)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1])
