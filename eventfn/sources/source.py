"""The seams a source plugs into: what it delivers (`Message`, `Feed`), and what it declares (`Source`).

A source owns where its events are stored (stream and subjects), how its durable consumer delivers them
(`ConsumerOptions`: start position, acks, redelivery limit, exclusivity), the shape its batches take
(`RecordShape`), and its ordering model. The dispatcher applies Lambda's event-source-mapping semantics
(batching, window, filters, retries, partial failures, DLQ, destinations) to whatever a source delivers.

Built-in sources: a function's async-invoke queue (`async_queue`) and plain NATS subjects (`subjects`).
Connectors (the bucket watcher, cron, queues, shards) declare their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import anyio.abc
import msgspec

from eventfn import subjects
from eventfn.broker.specs import ConsumerOptions, StreamSpec
from eventfn.sources.records import DeliveredMessage, original_subject

#: The three ordering models.
OrderingModel = Literal["none", "key", "shard"]


class Message(DeliveredMessage, Protocol):
    """One stored event as a feed hands it over (`records.DeliveredMessage`: subject, data, headers, stream and
    position, deliveries, timestamps), with the ways to settle it (JetStream's `Delivery`)."""

    settled: bool

    async def ack(self) -> None:
        """Done: never deliver again."""

    async def nak(self, delay: float = 0.0) -> None:
        """Deliver again after `delay` seconds (the source holds it meanwhile)."""

    async def in_progress(self) -> None:
        """Still being worked on: do not redeliver yet."""


class Feed(Protocol):
    """A bounded supply of messages from one durable consumer."""

    stream: str
    consumer: str

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called: what is still received is handed back, not started."""

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None:
        """Supply messages until `stop()`."""

    async def receive(self) -> Message:
        """The next message; raises `anyio.EndOfStream` once stopped and drained."""

    def receive_nowait(self) -> Message:
        """The next message if one is waiting (`anyio.WouldBlock` if not, `anyio.EndOfStream` at the end)."""

    def waiting(self) -> Sequence[Message]:
        """Messages received and not yet taken (`receive`), oldest first: what a scheduler keeps alive."""
        ...

    def stop(self) -> None:
        """Stop supplying; what was received stays available to drain."""

    def refresh(self) -> None:
        """Ask again now (after a pause or a reconnect)."""


class RecordShape(Protocol):
    """How a batch of a source's messages looks to the handler (SQS, Kinesis, S3, EventBridge, ...)."""

    #: At batch size 1 the handler gets the event's own data (plain subjects, EventBridge); False: a batch of one
    #: (S3 notifications always come as `{"Records": [...]}`).
    unwrap_single: bool

    def batch(self, messages: Sequence[Message], ids: Sequence[str], source_arn: str) -> bytes:
        """The handler's event for `messages`, whose item identifiers are `ids` (one per message)."""
        ...


class Ordering(msgspec.Struct, frozen=True, kw_only=True):
    """An ordering model and, for `key` and `shard`, where the key is: `header:<Name>` or `subject:<index>`."""

    model: OrderingModel = "none"
    key: str | None = None

    @property
    def ordered(self) -> bool:
        return self.model != "none"


def key_reader(ordering: Ordering) -> KeyReader:
    """A function from a message to its ordering key (an empty string where the message has none)."""
    kind, _, where = (ordering.key or "").partition(":")
    if kind == "header":
        name = where

        def by_header(message: Message) -> str:
            headers = message.headers
            return headers.get(name, "") if headers else ""

        return by_header
    index = int(where or 0)

    def by_subject(message: Message) -> str:
        tokens = original_subject(message).split(".")
        return tokens[index] if index < len(tokens) else ""

    return by_subject


class KeyReader(Protocol):
    def __call__(self, message: Message, /) -> str: ...


class QueueRef(msgspec.Struct, frozen=True, kw_only=True):
    """What a queue mapping's dispatcher applies of its queue (`config.QueueSettings`): SQS's semantics."""

    name: str
    fifo: bool = False
    visibility_timeout: float = 30.0
    #: Receives before the message moves to `dead_letter` (0: never).
    max_receive_count: int = 0
    #: The name of the queue's DLQ queue (None: no redrive policy).
    dead_letter: str | None = None
    delay_seconds: float = 0.0
    content_based_deduplication: bool = False
    #: Seconds a message is kept.
    retention: float = 345_600.0


class ShardRef(msgspec.Struct, frozen=True, kw_only=True):
    """One shard of a sharded stream and the Kinesis mapping settings a shard's dispatcher applies."""

    #: The sharded stream's name (`[streams.<name>]`).
    stream: str
    #: 0-based; its id is `shards.shard_id(index)`.
    index: int
    shards: int
    bisect_on_error: bool = False
    max_retry_attempts: int = -1
    max_record_age: int = -1
    parallelization_factor: int = 1
    tumbling_window: int = 0
    on_failure: str | None = None


class Source(msgspec.Struct, frozen=True, kw_only=True):
    """Where a mapping's events come from and how they are delivered, shaped and ordered."""

    #: What kind of source ("async", "subjects", or a connector's type).
    kind: str
    #: The stream its events are stored in: the events stream unless it has its own.
    stream: str = subjects.EVENTS_STREAM
    #: A stream of the source's own (a work queue, say), made sure of before its consumer; None: the events
    #: stream, whose subjects the service provisions from every trigger.
    stream_spec: StreamSpec | None = None
    #: What the consumer takes (the mapping's redrive subject is added to these).
    subjects: tuple[str, ...]
    consumer: ConsumerOptions = ConsumerOptions()
    #: The record shape its batches take, by name (`records.SHAPES`).
    records: str = "sqs"
    ordering: Ordering = Ordering()
    #: Largest batch the source allows (the async queue: one event per invocation).
    max_batch_size: int = 10_000
    #: Lambda filter patterns every event must match (each one: AND), besides the mapping's own filters (any one):
    #: a connector's trigger options that select events, such as a bucket trigger's prefix and suffix.
    filters: tuple[str, ...] = ()
    #: While its function is switched off (concurrency 0): its events wait, or go to the DLQ at once (Lambda
    #: sends async invokes of a throttled-to-zero function to the DLQ without retries).
    when_disabled: Literal["wait", "dead_letter"] = "wait"
    #: Seconds a delivery may stay unsettled before the source redelivers it (a queue's visibility timeout);
    #: None: the mapping's (its function's timeout, its batching window and a margin).
    ack_wait: float | None = None
    #: Set for a queue: the dispatcher applies its visibility timeout, redrive policy and delays.
    queue: QueueRef | None = None
    #: Set for one shard of a sharded stream: a shard dispatcher (`shard_dispatch`) runs it.
    shard: ShardRef | None = None


def async_queue(function: str) -> Source:
    """A function's async-invoke queue: everything published to `eventfn.async.<function>`, kept from the first
    message on (what was sent before the function existed, or while it failed to load, is its work too)."""
    return Source(
        kind="async",
        stream=subjects.EVENTS_STREAM,
        subjects=(subjects.ASYNC_PREFIX + function,),
        consumer=ConsumerOptions(start_position="TRIM_HORIZON"),
        max_batch_size=1,
        when_disabled="dead_letter",
    )


def plain_subjects(
    trigger_subjects: Sequence[str],
    *,
    ordering: Ordering | None = None,
    start_position: Literal["LATEST", "TRIM_HORIZON", "AT_TIMESTAMP"] = "LATEST",
    start_time: float | None = None,
) -> Source:
    """Plain NATS subjects of the events stream (what `nats pub` sends), delivered as SQS-shaped records."""
    return Source(
        kind="subjects",
        stream=subjects.EVENTS_STREAM,
        subjects=tuple(trigger_subjects),
        consumer=ConsumerOptions(
            start_position=start_position, start_time=start_time, exclusive=bool(ordering and ordering.ordered)
        ),
        ordering=ordering or Ordering(),
    )
