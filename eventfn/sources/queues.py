"""Queues with SQS's semantics on JetStream.

Each queue is a work-queue stream of its own (`EVENTFN_Q_<name>`): a message is stored once, delivered to one
consumer at a time, and deleted once acknowledged. Its messages are sent to `eventfn.queue.<name>` (plain
`nats pub`), and delayed ones are scheduled by the server (`eventfn.queue.<name>.delayed.<id>`).

- Sending: `send_message` (the CLI's `eventfn queue send`); a plain publish works too. Headers are message
  attributes, except SQS's own properties: `Message-Group-Id`, `Message-Deduplication-Id` and `Delay-Seconds`.
  JetStream drops a message whose `Nats-Msg-Id` it stored within the stream's duplicate window (5 minutes on a
  FIFO queue): `send_message` sets it to the deduplication id.
- Receiving: a queue mapping's dispatcher applies `Redrive` (delays, receive counts, the visibility timeout and
  the redrive policy); its batches are SQS's (`queue_records.QueueShape`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import anyio
import msgspec

from eventfn import events, subjects
from eventfn.broker.bus import Bus
from eventfn.broker.specs import ConsumerOptions, StreamSpec
from eventfn.config import DLQ_SUFFIX, RESOURCE_NAME, QueueSettings
from eventfn.errors import QueueError, QueueNotFound
from eventfn.sources import queue_records, records
from eventfn.sources.connector import Entry
from eventfn.sources.deadletters import DLQ_RETRY_DELAY, Sink, nak_quietly
from eventfn.sources.source import Message, Ordering, QueueRef, Source

if TYPE_CHECKING:  # a user's own nats-py client; only `Bus` speaks NATS
    from nats.aio.client import Client

log = logging.getLogger(__name__)

#: Headers of a message sent to a queue (SQS's names): its FIFO group, its deduplication id, a delay of its own.
GROUP_HEADER = queue_records.GROUP_HEADER
DEDUP_HEADER = queue_records.DEDUP_HEADER
DELAY_HEADER = queue_records.DELAY_HEADER
#: On a message moved to a dead-letter queue: the queue it came from.
SOURCE_HEADER = queue_records.SOURCE_HEADER
#: JetStream's deduplication header, and the one the server's scheduler adds to what it publishes when due.
MSG_ID_HEADER = "Nats-Msg-Id"
SCHEDULER_HEADER = "Nats-Scheduler"
#: SQS's deduplication interval: a FIFO queue drops a message whose id it saw this long ago or less.
DEDUP_WINDOW = 300.0
#: SQS's largest batch for a FIFO queue.
FIFO_MAX_BATCH = 10
#: SQS's longest delay (15 minutes).
MAX_DELAY = 900.0
#: SQS's longest group and deduplication ids.
MAX_ID_LENGTH = 128
#: Messages whose deferrals one mapping remembers (older entries are forgotten: their messages went elsewhere).
_DEFERRALS_KEPT = 100_000


def subject(name: str) -> str:
    """Where messages of queue `name` are sent (and stored)."""
    return subjects.QUEUE_PREFIX + name


def delayed_subject(name: str, token: str) -> str:
    """Where a delayed message waits, scheduled to be published to `subject(name)` when its delay ends."""
    return f"{subjects.QUEUE_PREFIX}{name}.delayed.{token}"


def delayed_subjects(name: str) -> str:
    """Every delayed message of queue `name` (a wildcard)."""
    return f"{subjects.QUEUE_PREFIX}{name}.delayed.*"


def arn(name: str) -> str:
    """The `eventSourceARN` of queue `name` in its records: `arn:aws:sqs:local:000000000000:<name>`."""
    return queue_records.arn(name)


def stream_spec(name: str, queue: QueueSettings, replicas: int) -> StreamSpec:
    """The work-queue stream of queue `name`."""
    return StreamSpec(
        name=subjects.queue_stream(name),
        subjects=[subject(name), delayed_subjects(name)],
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
        retention=queue.retention,
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


# -- sending -----------------------------------------------------------------------------------------------------


class Sent(msgspec.Struct, frozen=True, kw_only=True):
    """What `send_message` stored."""

    #: The `messageId` its handler will see (None for a delayed message: it is stored anew when due).
    message_id: str | None
    #: Its position in the queue's stream (of the scheduled copy, for a delayed message); for a message dropped as
    #: a duplicate, the position of the one stored first.
    sequence: int
    #: When a delayed message becomes visible (RFC 3339, UTC).
    delayed_until: str | None = None


def outgoing(
    queue: str,
    body: bytes,
    *,
    attributes: Mapping[str, str] | None = None,
    delay: float | None = None,
    group: str | None = None,
    dedup_id: str | None = None,
    fifo: bool = False,
    content_based: bool = False,
    now: float | None = None,
) -> tuple[str, dict[str, str], str | None]:
    """The subject and headers of a message for queue `queue`, checked as SQS checks a SendMessage (raises
    `QueueError`); with a delay, also when it becomes visible."""
    if not RESOURCE_NAME.match(queue):
        raise QueueError(queue, "not a queue name", "1 to 80 ASCII letters, digits, `_` and `-`")
    headers: dict[str, str] = {}
    for name, value in (attributes or {}).items():
        if problem := _attribute_problem(name, value):
            raise QueueError(queue, f"message attribute {name!r}: {problem}")
        headers[name] = value
    for what, given in (("group", group), ("deduplication id", dedup_id)):
        if given is not None and not _valid_id(given):
            raise QueueError(
                queue, f"{what} {given!r} is invalid", f"1 to {MAX_ID_LENGTH} printable ASCII characters, no spaces"
            )
    if fifo:
        if group is None:
            raise QueueError(queue, "a FIFO queue needs a message group id", "give one (--group G)")
        if dedup_id is None and not content_based:
            raise QueueError(
                queue,
                "a FIFO queue needs a deduplication id (it has no content_based_deduplication)",
                "give one (--dedup-id D), or set content_based_deduplication = true for the queue",
            )
        if delay is not None:
            raise QueueError(
                queue, "a FIFO queue takes no per-message delay (SQS's rule)", "set the queue's delay_seconds"
            )
    if delay is not None and not 0 <= delay <= MAX_DELAY:
        raise QueueError(queue, f"delay {delay:g} is out of range", f"0 to {MAX_DELAY:g} seconds")
    if group is not None:
        headers[GROUP_HEADER] = group
    if dedup_id is None and fifo and content_based:
        dedup_id = hashlib.sha256(body).hexdigest()
    if dedup_id is not None:
        headers[DEDUP_HEADER] = dedup_id
        headers[MSG_ID_HEADER] = dedup_id  # what JetStream deduplicates on
    if delay is None:
        return subject(queue), headers, None
    # Given, it replaces the queue's delay_seconds (SQS's rule); a delay of 0 says so to the dispatcher.
    headers[DELAY_HEADER] = f"{delay:g}"
    if delay == 0:
        return subject(queue), headers, None
    # The server's schedules have whole seconds: a delay is rounded up, never shortened.
    due = datetime.fromtimestamp(math.ceil((time.time() if now is None else now) + delay), UTC)
    at = due.strftime("%Y-%m-%dT%H:%M:%SZ")
    headers["Nats-Schedule"] = f"@at {at}"
    headers["Nats-Schedule-Target"] = subject(queue)
    return delayed_subject(queue, uuid.uuid4().hex), headers, at


async def send_message(
    client: Bus | Client,
    queue: str,
    body: bytes | str,
    *,
    attributes: Mapping[str, str] | None = None,
    delay: float | None = None,
    group: str | None = None,
    dedup_id: str | None = None,
    fifo: bool = False,
    content_based: bool = False,
) -> Sent:
    """Send `body` to queue `queue` and return once JetStream stored it (SQS's SendMessage).

    `client` is a nats-py client (or eventfn's `Bus`). `attributes` become message attributes (NATS headers);
    `delay` seconds (0 to 900; standard queues only) hide it that long, replacing the queue's `delay_seconds`.
    A FIFO queue (`fifo`, as declared) needs `group` and, unless it has `content_based` deduplication,
    `dedup_id`: JetStream drops a message with the id of one stored in the last 5 minutes (the id of the first is
    returned). Raises `QueueError` for a message SQS would refuse, `QueueNotFound` if the queue's stream does not
    exist.
    """
    data = body.encode() if isinstance(body, str) else body
    where, headers, at = outgoing(
        queue,
        data,
        attributes=attributes,
        delay=delay,
        group=group,
        dedup_id=dedup_id,
        fifo=fifo,
        content_based=content_based,
    )
    if isinstance(client, Bus):
        bus = client
    else:
        bus = Bus(client, client.connected_url.geturl() if client.connected_url else "nats")
    stream = subjects.queue_stream(queue)
    try:
        seq = await bus.publish_stored(where, data, headers or None)
    except Exception as exc:
        try:
            exists = await bus.stream_exists(stream)
        except Exception:
            exists = True  # say what failed first
        if not exists:
            raise QueueNotFound(queue) from exc
        raise QueueError(
            queue, f"the message was not stored ({type(exc).__name__}: {exc})", "is NATS up? send it again"
        ) from exc
    return Sent(message_id=None if at else events.request_id_for(seq, stream), sequence=seq, delayed_until=at)


def _attribute_problem(name: str, value: str) -> str | None:
    if not name or not name.isascii() or not name.isprintable() or any(c in name for c in " :"):
        return "a name is printable ASCII without spaces or colons (it becomes a NATS header)"
    if name in (GROUP_HEADER, DEDUP_HEADER, DELAY_HEADER):
        return "the name is reserved: give the group, deduplication id and delay as such (--group, --dedup-id, --delay)"
    if name.startswith(records.SYSTEM_HEADER_PREFIXES):
        return "names that start with Nats- or Eventfn- are reserved for NATS and eventfn"
    if not value.isprintable():
        return "the value has a line break or another unprintable character (it becomes a NATS header)"
    return None


def own_delay(text: str) -> float | None:
    """The seconds a `Delay-Seconds` header says, if it is a plain decimal number (SQS takes 0 to 900); None for
    anything else, which Python's float() would take: `inf`, `nan`, `1e9`, `1_0`, non-ASCII digits."""
    text = text.strip()
    return float(text) if _DELAY.fullmatch(text) else None


_DELAY = re.compile(r"[-+]?[0-9]{1,12}(?:\.[0-9]{1,12})?", re.ASCII)


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and value.isascii() and value.isprintable() and " " not in value


# -- receiving: what a queue mapping applies --------------------------------------------------------------------


class HandBacks(Protocol):
    """Where queue mappings note deliveries handed back unstarted (the state store, `broker.state.KvState`)."""

    async def get(self, key: str) -> Entry | None: ...

    async def put_expiring(self, key: str, value: bytes, ttl: float) -> None: ...


class Redrive:
    """SQS's receive side for one queue mapping: delays, receive counts, the visibility timeout and the redrive
    policy (the move to the queue's DLQ).

    A message not yet due when delivered (the queue's `delay_seconds`, or its own `Delay-Seconds` header, counted
    from when it was stored) goes back until it is; that delivery is not a receive. The deferrals are counted here,
    per message: JetStream counts every delivery. A message whose deferrals this process does not know (another
    process deferred it) is taken to have had one, the usual case: the count errs towards one receive more, never
    towards an early move to the DLQ.
    """

    def __init__(
        self,
        queue: QueueRef,
        sink: Sink,
        *,
        stream: str,
        state: HandBacks | None = None,
        retry_delay: float = DLQ_RETRY_DELAY,
    ) -> None:
        self.queue = queue
        self.name = queue.name
        self.fifo = queue.fifo
        self.visibility_timeout = queue.visibility_timeout
        self.max_receive_count = queue.max_receive_count
        self.dead_letter = queue.dead_letter
        self._dlq_subject = subject(queue.dead_letter) if queue.dead_letter else None
        #: Seconds before a message whose move to the DLQ failed is moved again (`[recovery] dlq_retry_delay`).
        self._retry_delay = retry_delay
        self._sink = sink
        self._stream = stream
        self._deferrals: dict[int, int] = {}
        #: Where hand-backs are noted for every process (`handed_back`); None: in this process only.
        self._state = state
        #: Deliveries of each message that this process handed back unstarted.
        self._handbacks: dict[int, int] = {}
        #: Counters for the mapping's stats.
        self.moved = 0
        self.deferred = 0

    def delay_of(self, message: Message) -> float:
        """Seconds the message waits after it was stored before its first receive (0 for one the server's scheduler
        already held back, or that says `Delay-Seconds: 0`)."""
        delay = self.queue.delay_seconds
        headers = message.headers
        if headers:
            if SCHEDULER_HEADER in headers:
                return 0.0
            if not self.fifo and (own := headers.get(DELAY_HEADER)) is not None:
                given = own_delay(own)
                if given is not None and 0 <= given <= MAX_DELAY:
                    return given
                if message.delivered == 1:  # once per message, not per delivery
                    log.warning(
                        "queue %s: message %s has %s: %r, not a number of seconds from 0 to %g; %s",
                        self.name,
                        events.request_id_for(message.stream_seq, message.stream),
                        DELAY_HEADER,
                        own,
                        MAX_DELAY,
                        f"the queue's delay ({delay:g} s) applies" if given is None else "taken as the nearest",
                    )
                if given is not None:
                    return min(MAX_DELAY, max(0.0, given))
        return delay

    def due_in(self, message: Message) -> float:
        """Seconds until the message may be received (0 or less: now)."""
        delay = self.delay_of(message)
        if delay <= 0:
            return 0.0
        seq = message.stream_seq
        if seq not in self._deferrals:
            if message.delivered > 1:
                return message.timestamp_ns / 1e9 + delay - time.time()  # counted by `receive_count`'s guess
            if len(self._deferrals) >= _DEFERRALS_KEPT:
                for old in list(self._deferrals)[: _DEFERRALS_KEPT // 10]:
                    del self._deferrals[old]
            self._deferrals[seq] = 0
        return message.timestamp_ns / 1e9 + delay - time.time()

    def receive_count(self, message: Message, attempt: int) -> int:
        """SQS's ApproximateReceiveCount of the message, this receive included: `attempt` (its deliveries, plus
        receives held in place by a FIFO mapping) less the deliveries that came before it was due."""
        deferrals = self._deferrals.get(message.stream_seq)
        if deferrals is None:
            deferrals = 1 if message.delivered > 1 and self.delay_of(message) > 0 else 0
        return max(1, attempt - deferrals - self._handbacks.get(message.stream_seq, 0))

    async def confirmed(self, message: Message, receives: int) -> int:
        """`receives` (from `receive_count`) less the deliveries that any process handed back unstarted (a
        stopping mapping's), as noted in the state store: asked only when the count reaches the redrive policy's
        limit. If the store cannot be read, `receives` stands (one receive more, never one less)."""
        if self._state is None or message.delivered < 2:
            return receives
        local = self._handbacks.get(message.stream_seq, 0)
        try:
            found = 0
            for delivery in range(1, message.delivered):
                if await self._state.get(self._handback_key(message, delivery)) is not None:
                    found += 1
        except Exception as exc:
            log.warning("queue %s: hand-backs of message %d not read (%s)", self.name, message.stream_seq, exc)
            return receives
        return max(1, receives - max(0, found - local))

    async def handed_back(self, messages: list[Message]) -> None:
        """Note that these deliveries were handed back unstarted (a mapping stopping or handing over), here and in
        the state store for whichever process receives them next, before they go back: their next delivery is
        not a receive more. Notes expire with the queue's retention."""
        for message in messages:
            self._handbacks[message.stream_seq] = self._handbacks.get(message.stream_seq, 0) + 1
        if self._state is None:
            return
        state, ttl = self._state, self.queue.retention

        async def note(message: Message) -> None:
            try:
                await state.put_expiring(self._handback_key(message, message.delivered), b"", ttl)
            except Exception as exc:  # counted as a receive when it comes back: conservative
                log.warning("queue %s: hand-back of message %d not noted (%s)", self.name, message.stream_seq, exc)

        async with anyio.create_task_group() as tg:
            for message in messages:
                tg.start_soon(note, message)

    def _handback_key(self, message: Message, delivery: int) -> str:
        return f"{self._stream}.{message.stream_seq}.{delivery}"

    async def defer(self, message: Message, wait: float) -> float | None:
        """Hand a message that is not due yet back for `wait` seconds: a standard queue's goes back to the stream
        (None); a FIFO queue's is held in place, and its group with it (returns `wait`)."""
        self.deferred += 1
        if self.fifo:
            return wait
        self._deferrals[message.stream_seq] = self._deferrals.get(message.stream_seq, 0) + 1
        await nak_quietly(message, wait)
        return None

    def forget(self, message: Message) -> None:
        """The message is deleted (or moved): its count is no longer needed."""
        if self._deferrals:
            self._deferrals.pop(message.stream_seq, None)
        if self._handbacks:
            self._handbacks.pop(message.stream_seq, None)

    async def move(self, message: Message, message_id: str, receives: int, why: str) -> float | None:
        """Move the message to the queue's DLQ (its body and headers, and the queue it came from) and, once that
        write is stored, delete it here; with no DLQ, delete it. If the write fails, the message comes back after a
        delay (a FIFO queue's is held in place: returns the delay) and is moved then."""
        if self._dlq_subject is None:
            log.error("queue %s: message %s deleted (%s); the queue has no DLQ", self.name, message_id, why)
            await self._delete(message, message_id)
            return None
        headers = {
            k: v
            for k, v in (message.headers or {}).items()
            if k != DELAY_HEADER and not k.startswith(records.SYSTEM_HEADER_PREFIXES)
        }
        if self.fifo and DEDUP_HEADER not in headers and (given := (message.headers or {}).get(MSG_ID_HEADER)):
            # Sent with `Nats-Msg-Id` only: that was its deduplication id, and stays so in the DLQ (and after a
            # redrive), rather than the move's own id below.
            headers[DEDUP_HEADER] = given
        # The id makes a second move (a crash between the write and the delete) a no-op within the DLQ's window.
        headers[MSG_ID_HEADER] = f"moved:{self._stream}:{message.stream_seq}"
        headers[SOURCE_HEADER] = self.name
        try:
            await self._sink.publish_stored(self._dlq_subject, message.data, headers)
        except Exception as exc:
            log.error(
                "queue %s: moving message %s to %s failed (%s); it stays, and is moved in %.0f s",
                self.name,
                message_id,
                self.dead_letter,
                exc,
                self._retry_delay,
            )
            if self.fifo:
                return self._retry_delay
            await nak_quietly(message, self._retry_delay)
            return None
        self.moved += 1
        log.error(
            "queue %s: message %s moved to %s after %d receive(s) (%s)",
            self.name,
            message_id,
            self.dead_letter,
            receives,
            why,
        )
        await self._delete(message, message_id)
        return None

    async def _delete(self, message: Message, message_id: str) -> None:
        self.forget(message)
        try:
            await message.ack()
        except Exception as exc:  # redelivered, it is moved again: the DLQ drops the copy (same id)
            log.warning("queue %s: deleting message %s failed: %s", self.name, message_id, exc)

    async def failed(self, message: Message, message_id: str, receives: int, error: str) -> float | None:
        """A receive of the message failed: moved to the DLQ if that was its last, else visible again after the
        visibility timeout (a FIFO queue's is held in place that long, its group with it: returns the delay)."""
        if self.max_receive_count and receives >= self.max_receive_count:
            return await self.move(message, message_id, receives, f"last error: {error}")
        log.warning(
            "queue %s: receive %d of message %s failed (%s); visible again in %g s",
            self.name,
            receives,
            message_id,
            error,
            self.visibility_timeout,
        )
        if self.fifo:
            return self.visibility_timeout
        await nak_quietly(message, self.visibility_timeout)
        return None
