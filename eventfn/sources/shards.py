"""Sharded streams with Kinesis's semantics on JetStream.

A sharded stream of N shards is one JetStream stream (`EVENTFN_S_<name>`) with one subject per shard
(`eventfn.shard.<name>.<index>`). A record's partition key picks its shard as Kinesis does: the MD5 of the key,
as a 128-bit number, falls in one of N equal hash key ranges. Its sequence number is its stream sequence, so it
grows within the shard. Each mapping consumes each shard through a consumer of its own.
"""

from __future__ import annotations

import hashlib

from eventfn import subjects
from eventfn.broker.specs import ConsumerOptions, StreamSpec
from eventfn.config import DataStreamSettings, StreamTrigger
from eventfn.sources.source import Ordering, ShardRef, Source

#: The header that carries a record's partition key (on a put to `eventfn.stream.<name>`, and on its stored copy).
KEY_HEADER = "Partition-Key"
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
