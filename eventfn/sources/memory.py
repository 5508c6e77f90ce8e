"""An in-memory source: a `Feed` and a `Sink` without NATS, for fast tests of dispatch decisions (batching,
window, filters, retries, partial failures, ordering) and for connector authors' own tests.

It keeps JetStream's delivery contract where the dispatcher relies on it: at most `max_inflight` unsettled
messages handed out, in stream order; a `nak(delay)` redelivers the message (delivery count + 1) after the
delay; `ack` settles it for good. End-to-end tests against a real nats-server cover the rest.
"""

from __future__ import annotations

import time
from collections import deque

import anyio
import anyio.abc

from eventfn.broker.state import Entry


class MemoryMessage:
    """One stored message, as delivered (once per delivery: a redelivery is a new object)."""

    def __init__(self, feed: MemoryFeed, seq: int, subject: str, data: bytes, headers: dict[str, str] | None,
                 timestamp_ns: int, delivered: int) -> None:  # fmt: skip
        self._feed = feed
        self.stream = feed.stream
        self.stream_seq = seq
        self.subject = subject
        self.data = data
        self.headers = headers
        self.timestamp_ns = timestamp_ns
        self.delivered = delivered
        self.received_at = time.time()
        self.settled = False

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            self._feed._settle(self, None)

    async def nak(self, delay: float = 0.0) -> None:
        if not self.settled:
            self.settled = True
            self._feed._settle(self, delay)

    async def in_progress(self) -> None:
        self._feed.kept_alive.append(self.stream_seq)


class MemoryFeed:
    """A stream of messages and one consumer of it."""

    def __init__(self, *, stream: str = "MEMORY", consumer: str = "memory", max_inflight: int = 1000) -> None:
        self.stream = stream
        self.consumer = consumer
        self.max_inflight = max_inflight
        self._seq = 0
        self._stored: dict[int, tuple[str, bytes, dict[str, str] | None, int]] = {}
        self._deliveries: dict[int, int] = {}
        #: Waiting to be delivered (stream order), and redeliveries due: (monotonic time, seq).
        self._pending: deque[int] = deque()
        self._due: list[tuple[float, int]] = []
        self._queue: deque[MemoryMessage] = deque()
        self.inflight = 0
        self._stopping = False
        self._closed = False
        #: Wakes the delivery loop (a publish, a settle, a stop) and, separately, receivers (a delivery, the end).
        self._work = anyio.Event()
        self._arrived = anyio.Event()
        #: What happened, for assertions: acknowledged positions in order, naks as (seq, delay), keepalives.
        self.acked: list[int] = []
        self.naked: list[tuple[int, float]] = []
        self.kept_alive: list[int] = []

    def publish(
        self,
        data: bytes,
        subject: str = "events.memory",
        headers: dict[str, str] | None = None,
        *,
        deliver_after: float = 0.0,
    ) -> int:
        """Store a message; returns its stream position. `deliver_after` holds its first delivery back that long,
        as a redelivery after a crash comes late."""
        self._seq += 1
        self._stored[self._seq] = (subject, data, headers, time.time_ns())
        if deliver_after > 0:
            self._due.append((time.monotonic() + deliver_after, self._seq))
        else:
            self._pending.append(self._seq)
        self._work.set()
        return self._seq

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def unsettled(self) -> int:
        """Messages stored and not acknowledged."""
        return len(self._stored) - len(set(self.acked))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not self._stopping:
            now = time.monotonic()
            due = [d for d in self._due if d[0] <= now]
            if due:
                self._due = [d for d in self._due if d[0] > now]
                # Redeliveries go first, in stream order among themselves (as JetStream's redelivery queue).
                self._pending.extendleft(sorted((seq for _, seq in due), reverse=True))
            while self._pending and self.inflight < self.max_inflight:
                self._deliver(self._pending.popleft())
            wake = min((d[0] for d in self._due), default=now + 1.0)
            with anyio.move_on_after(max(0.0, wake - time.monotonic())):
                await self._work.wait()
            self._work = anyio.Event()
        self._closed = True
        self._arrived.set()

    def _deliver(self, seq: int) -> None:
        subject, data, headers, ts = self._stored[seq]
        self._deliveries[seq] = self._deliveries.get(seq, 0) + 1
        self.inflight += 1
        self._queue.append(MemoryMessage(self, seq, subject, data, headers, ts, self._deliveries[seq]))
        self._arrived.set()

    def _settle(self, message: MemoryMessage, delay: float | None) -> None:
        self.inflight -= 1
        if delay is None:
            self.acked.append(message.stream_seq)
        else:
            self.naked.append((message.stream_seq, delay))
            self._due.append((time.monotonic() + delay, message.stream_seq))
        self._work.set()

    async def receive(self) -> MemoryMessage:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._closed:
                raise anyio.EndOfStream
            event = self._arrived
            await event.wait()
            if self._arrived is event:
                self._arrived = anyio.Event()

    def receive_nowait(self) -> MemoryMessage:
        if self._queue:
            return self._queue.popleft()
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    def waiting(self) -> list[MemoryMessage]:
        return list(self._queue)

    def stop(self) -> None:
        self._stopping = True
        self._work.set()

    def refresh(self) -> None:
        self._work.set()


class MemorySink:
    """Collects what the dispatcher publishes: dead letters (stored) and destination records."""

    max_payload = 8 * 1024 * 1024

    def __init__(self) -> None:
        self.stored: list[tuple[str, bytes, dict[str, str] | None]] = []
        self.published: list[tuple[str, bytes]] = []
        #: Set to make stored writes fail (a DLQ that cannot take records).
        self.failing = False

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.published.append((subject, data))

    async def publish_stored(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        if self.failing:
            raise ConnectionError("the sink refuses writes")
        self.stored.append((subject, data, headers))


class MemoryState:
    """A connector's `State` (`sources.connector`) in memory, with JetStream KV's revisions and compare-and-set:
    for connector authors' tests. Share one between two connectors to stand for two replicas."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[bytes, int]] = {}
        self._revision = 0

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    async def get(self, key: str) -> Entry | None:
        found = self._values.get(key)
        return Entry(found[0], found[1]) if found else None

    async def put(self, key: str, value: bytes) -> int:
        revision = self._next()
        self._values[key] = (value, revision)
        return revision

    async def put_expiring(self, key: str, value: bytes, ttl: float) -> None:
        """`put` (a memory store forgets everything at the end anyway)."""
        await self.put(key, value)

    async def create(self, key: str, value: bytes) -> int | None:
        if key in self._values:
            return None
        return await self.put(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        found = self._values.get(key)
        if (found[1] if found else 0) != revision:
            return None
        return await self.put(key, value)

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def items(self, prefix: str = "") -> dict[str, Entry]:
        return {k: Entry(v, r) for k, (v, r) in self._values.items() if k.startswith(prefix)}
