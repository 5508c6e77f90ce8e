"""Sharded streams with Kinesis's semantics on JetStream.

A sharded stream of N shards is one JetStream stream (`EVENTFN_S_<name>`) with one subject per shard
(`eventfn.shard.<name>.<index>`). A record's partition key picks its shard as Kinesis does: the MD5 of the key,
as a 128-bit number, falls in one of N equal hash key ranges. Its sequence number is its stream sequence, so it
grows within the shard. Each mapping consumes each shard through a consumer of its own.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import anyio
import msgspec

from eventfn import subjects
from eventfn.broker.specs import ConsumerOptions, StreamSpec
from eventfn.config import DataStreamSettings, StreamTrigger
from eventfn.sources.source import Feed, Message, Ordering, ShardRef, Source

if TYPE_CHECKING:
    from nats.aio.client import Client

log = logging.getLogger(__name__)

#: The header that carries a record's partition key (on a put to `eventfn.stream.<name>`, and on its stored copy).
KEY_HEADER = "Partition-Key"
#: The header with a record's arrival time (nanoseconds since the epoch): when its put was stored, which the
#: router copies onto the record it writes to the shard. A record written straight to its shard has none: its
#: own stored time is its arrival.
ARRIVAL_HEADER = "Eventfn-Arrival"
#: Kinesis's hash key space: MD5 values, 0 to 2**128 - 1.
HASH_SPACE = 1 << 128


def hash_ranges(shards: int) -> list[tuple[int, int]]:
    """Each shard's (starting, ending) hash key, inclusive: the space split evenly, the last taking the rest."""
    step = HASH_SPACE // shards
    return [(i * step, (i + 1) * step - 1 if i < shards - 1 else HASH_SPACE - 1) for i in range(shards)]


def shard_of(key: str, shards: int) -> int:
    """The index of the shard whose hash key range holds the MD5 of `key` (UTF-8)."""
    value = int.from_bytes(hashlib.md5(key.encode("utf-8"), usedforsecurity=False).digest(), "big")
    return min(value // (HASH_SPACE // shards), shards - 1)


def shard_id(index: int) -> str:
    """Kinesis's id of shard `index` (`shardId-000000000003`)."""
    return f"shardId-{index:012d}"


def shard_subject(name: str, index: int) -> str:
    return f"{subjects.SHARD_PREFIX}{name}.{index}"


def put_subject(name: str) -> str:
    """Where records are put (the partition key in the `Partition-Key` header, or as the subject's next tokens)."""
    return subjects.STREAM_PREFIX + name


def stream_spec(name: str, stream: DataStreamSettings, replicas: int) -> StreamSpec:
    return StreamSpec(
        name=subjects.data_stream(name),
        subjects=[f"{subjects.SHARD_PREFIX}{name}.*"],
        max_age=stream.retention,
        replicas=stream.replicas or replicas,
    )


def ingest_spec(name: str, stream: DataStreamSettings, replicas: int) -> StreamSpec:
    return StreamSpec(
        name=subjects.ingest_stream(name),
        subjects=[put_subject(name), put_subject(name) + ".>"],
        max_age=stream.retention,
        replicas=stream.replicas or replicas,
        retention="workqueue",
    )


def mapping_suffix(index: int) -> str:
    """What a shard's mapping name adds to its trigger's (`<function>--<trigger>--shard-<index>`)."""
    return f"shard-{index}"


def sources(name: str, stream: DataStreamSettings, trigger: StreamTrigger) -> list[Source]:
    """One source per shard: its subject, consumed in order by one process at a time (JetStream's pinned client)."""
    out = []
    for index in range(stream.shards):
        out.append(
            Source(
                kind="stream",
                stream=subjects.data_stream(name),
                subjects=(shard_subject(name, index),),
                consumer=ConsumerOptions(
                    start_position=trigger.starting_position,
                    start_time=trigger.starting_position_timestamp,
                    exclusive=True,
                ),
                records="kinesis",
                ordering=Ordering(model="shard", key=f"header:{KEY_HEADER}"),
                shard=ShardRef(
                    stream=name,
                    index=index,
                    shards=stream.shards,
                    bisect_on_error=trigger.bisect_on_error,
                    max_retry_attempts=trigger.max_retry_attempts,
                    max_record_age=trigger.max_record_age,
                    parallelization_factor=trigger.parallelization_factor,
                    tumbling_window=trigger.tumbling_window,
                    on_failure=trigger.on_failure,
                ),
            )
        )
    return out


def lane_of(key: str, lanes: int) -> int:
    """The lane (of a shard's `parallelization_factor` lanes) that processes records with partition key `key`:
    a stable hash, the same in every process, so a key's records always take the same lane, in order."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % lanes if lanes > 1 else 0


class Resequencer:
    """Puts redeliveries back into stream order after a crash or a hand-over.

    A consumer's unsettled messages come back only when their ack wait runs out, while new ones come at once. When
    a process starts consuming (or takes the consumer over), `arm` with the consumer's unsettled count and the
    highest position it delivered: deliveries are then held until every one of those is back (or the wait is
    over), and released together in stream order.
    """

    def __init__(self) -> None:
        self._expected = 0
        self._upto = 0
        self._until = 0.0
        self._own: frozenset[int] = frozenset()
        self._seen: set[int] = set()
        #: Deliveries held, in arrival order.
        self.held: list[Message] = []
        self.armed = False

    def arm(self, unsettled: int, upto: int, wait: float, own: Iterable[int] = ()) -> None:
        """Hold deliveries until the `unsettled` ones at or below position `upto`, less those this process holds
        already (`own`), are back, or `wait` seconds have passed."""
        self._own = frozenset(own)
        self._expected = unsettled - len(self._own)
        if self._expected <= 0 and not self.armed:
            return
        self._upto = upto
        self._until = time.monotonic() + wait
        self._seen = {m.stream_seq for m in self.held if m.stream_seq <= upto and m.stream_seq not in self._own}
        self.armed = True

    @property
    def deadline(self) -> float | None:
        """When held deliveries are released anyway (monotonic), or None when nothing is held back."""
        return self._until if self.armed else None

    def offer(self, message: Message) -> list[Message]:
        """Take a delivery; returns what may go on now, in stream order (the delivery itself when not armed)."""
        if not self.armed:
            return [message]
        self.held.append(message)
        seq = message.stream_seq
        if seq <= self._upto and seq not in self._own:
            self._seen.add(seq)
        if len(self._seen) >= self._expected:
            return self.release()
        return []

    def release(self) -> list[Message]:
        """Everything held, in stream order (a position delivered twice keeps its newest delivery)."""
        latest = {m.stream_seq: m for m in self.held}
        self.held = []
        self.armed = False
        self._seen = set()
        return [latest[seq] for seq in sorted(latest)]

    async def take(self, feed: Feed, before: Callable[[Message], Awaitable[None]]) -> AsyncGenerator[Message, None]:
        """`feed`'s deliveries in order until it ends: each first goes through `before` (which may `arm`)."""
        while True:
            message = None
            try:
                message = feed.receive_nowait()  # (a delivery waiting: no cancel scope, no trip round the loop)
            except anyio.WouldBlock:
                deadline = self.deadline
                with anyio.move_on_after(max(0.0, deadline - time.monotonic()) if deadline is not None else None):
                    try:
                        message = await feed.receive()
                    except anyio.EndOfStream:
                        break
            except anyio.EndOfStream:
                break
            if message is None or (self.armed and time.monotonic() >= self._until):
                if self.held:
                    log.info("%d held deliveries released after waiting for redeliveries", len(self.held))
                for held in self.release():
                    yield held
                if message is None:
                    continue
            await before(message)
            if not self.armed:
                yield message
                continue
            for ready in self.offer(message):
                yield ready


class PutResult(msgspec.Struct, frozen=True):
    """Where a put went: the shard its partition key picks and its sequence number there when it was written
    straight to its shard (None: through the router, which assigns it shortly), and its position among the
    stream's unrouted puts otherwise."""

    shard_id: str | None
    sequence_number: str | None
    put_sequence: int | None = None


async def put_record(
    nc: Client,
    stream: str,
    data: bytes,
    partition_key: str,
    *,
    shards: int | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> PutResult:
    """Put one record into sharded stream `stream` from Python, and wait until it is stored.

    Without `shards`, the record goes to the stream's put subject, as `nats pub` sends it, and the service's
    router writes it to its shard in put order. With `shards` (the stream's shard count, as declared), it is
    written straight to its shard, and its sequence number comes back; give the declared count, or records of
    one key end up in two shards.
    """
    own = {k: v for k, v in (headers or {}).items() if not k.startswith("Nats-")}
    own[KEY_HEADER] = partition_key
    js = nc.jetstream()
    if shards is None:
        ack = await js.publish(put_subject(stream), data, headers=own, timeout=timeout)
        return PutResult(shard_id=None, sequence_number=None, put_sequence=ack.seq)
    index = shard_of(partition_key, shards)
    ack = await js.publish(shard_subject(stream, index), data, headers=own, timeout=timeout)
    return PutResult(shard_id=shard_id(index), sequence_number=str(ack.seq))
