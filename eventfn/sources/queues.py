"""Queues with SQS's semantics on JetStream.

Each queue is a work-queue stream of its own (`EVENTFN_Q_<name>`): a message is stored once, delivered to one
consumer at a time, and deleted once acknowledged. Its messages are sent to `eventfn.queue.<name>` (plain
`nats pub`), and delayed ones are scheduled by the server (`eventfn.queue.<name>.delayed.<id>`).
"""

from __future__ import annotations

from eventfn import subjects
from eventfn.broker.specs import ConsumerOptions, StreamSpec
from eventfn.config import DLQ_SUFFIX, QueueSettings
from eventfn.sources.source import Ordering, QueueRef, Source

#: Headers of a message sent to a queue (SQS's names): its FIFO group, its deduplication id, a delay of its own.
GROUP_HEADER = "Message-Group-Id"
DEDUP_HEADER = "Message-Deduplication-Id"
DELAY_HEADER = "Delay-Seconds"
#: SQS's deduplication interval: a FIFO queue drops a message whose id it saw this long ago or less.
DEDUP_WINDOW = 300.0
#: SQS's largest batch for a FIFO queue.
FIFO_MAX_BATCH = 10


def subject(name: str) -> str:
    """Where messages of queue `name` are sent (and stored)."""
    return subjects.QUEUE_PREFIX + name


def delayed_subject(name: str, token: str) -> str:
    """Where a delayed message waits, scheduled to be published to `subject(name)` when its delay ends."""
    return f"{subjects.QUEUE_PREFIX}{name}.delayed.{token}"


def stream_spec(name: str, queue: QueueSettings, replicas: int) -> StreamSpec:
    """The work-queue stream of queue `name`."""
    return StreamSpec(
        name=subjects.queue_stream(name),
        subjects=[subject(name), f"{subjects.QUEUE_PREFIX}{name}.delayed.*"],
        max_age=queue.retention,
        duplicate_window=DEDUP_WINDOW if queue.fifo else 120.0,
        replicas=queue.replicas or replicas,
        retention="workqueue",
        allow_schedules=True,
    )


def ref(name: str, queue: QueueSettings) -> QueueRef:
    return QueueRef(
        name=name,
        fifo=queue.fifo,
        visibility_timeout=queue.visibility_timeout,
        max_receive_count=queue.max_receive_count,
        dead_letter=name + DLQ_SUFFIX if queue.max_receive_count else None,
        delay_seconds=queue.delay_seconds,
        content_based_deduplication=queue.content_based_deduplication,
    )


def source(name: str, queue: QueueSettings) -> Source:
    """The source of a mapping on queue `name`: its stream from the first message kept, the visibility timeout as
    the ack wait; a FIFO queue ordered per message group, by one process at a time."""
    return Source(
        kind="queue",
        stream=subjects.queue_stream(name),
        subjects=(subject(name),),
        consumer=ConsumerOptions(start_position="TRIM_HORIZON", exclusive=queue.fifo),
        records="sqs",
        ordering=Ordering(model="key", key=f"header:{GROUP_HEADER}") if queue.fifo else Ordering(),
        max_batch_size=FIFO_MAX_BATCH if queue.fifo else 10_000,
        ack_wait=queue.visibility_timeout,
        queue=ref(name, queue),
    )
