"""The router of a sharded stream: puts, in the order they were stored, onto their shards.

Records are put to `eventfn.stream.<name>` (plain `nats pub`; the partition key in the `Partition-Key` header) or
to `eventfn.stream.<name>.<key>` (the key is the rest of the subject). JetStream stores each put in the stream's
work-queue stream `EVENTFN_SI_<name>`; the router takes them in order through one exclusive consumer (with
several `eventfn serve`, one routes at a time) and writes each to the subject of the shard its key picks, with the
key, the put's own headers and its arrival time. Only once that write is stored is the put acknowledged (and
removed). Each write carries an id of its put (`Nats-Msg-Id`), so a put written again after a crash between the
write and the acknowledgement is dropped by JetStream: at least once, and no duplicate within the stream's
duplicate window (2 minutes).

The writes are pipelined: many are sent before the first is acknowledged, in put order, and the puts are
acknowledged as their writes are stored, so routing costs no round trip per record. A put with no key is
keyed by its position among the puts (its stream sequence), which spreads such puts evenly over the shards.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from contextlib import aclosing

import anyio
import anyio.abc
import nats.errors

from eventfn import subjects
from eventfn.broker.bus import Bus, Pending
from eventfn.broker.feeds import PullFeed
from eventfn.broker.specs import ConsumerOptions
from eventfn.config import DataStreamSettings
from eventfn.sources.shards import ARRIVAL_HEADER, KEY_HEADER, Resequencer, put_subject, shard_of, shard_subject
from eventfn.sources.source import Message

log = logging.getLogger(__name__)

#: The router's durable consumer on a stream's puts.
CONSUMER = "router"
#: One router at a time, from the first put not yet routed.
OPTIONS = ConsumerOptions(start_position="TRIM_HORIZON", exclusive=True)
#: Seconds a put may stay unacknowledged before JetStream hands it out again (a router that died).
ACK_WAIT = 15.0
#: Puts written and not yet acknowledged, at most.
WINDOW = 512
#: Seconds to wait for a write to be stored before it is sent again.
WRITE_TIMEOUT = 10.0

#: A header name nats-py writes (an HTTP token). A put may carry others (the Go client and raw protocol send them);
#: they are left off its record, which nats-py would refuse to write: the put would block its stream for good.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_KEY_LOWER = KEY_HEADER.lower()

_Routed = tuple[Message, "Pending | None", str, dict[str, str]]


class Router:
    """Routes the puts of sharded stream `name` to its shards until cancelled (or `stop()`)."""

    def __init__(self, bus: Bus, name: str, settings: DataStreamSettings, *, window: int = WINDOW) -> None:
        self.bus = bus
        self.name = name
        self.shards = settings.shards
        self.window = window
        self.ingest = subjects.ingest_stream(name)
        self._subject = put_subject(name)
        self._prefix = self._subject + "."
        #: Puts routed (written and acknowledged) by this router. A write JetStream dropped as a duplicate (a put an
        #: earlier router had written, then stopped before it saw it stored) is not counted: each put counts once.
        self.routed = 0
        #: Puts dropped because they cannot be written (too large with the record's headers).
        self.dropped = 0
        self._feed: PullFeed | None = None
        self._resequencer = Resequencer()
        self._recheck = False
        #: Puts received and not yet acknowledged, by position.
        self._unsettled: set[int] = set()
        self._stopping = False
        self._stopped = anyio.Event()

    def stop(self) -> None:
        """Stop taking puts; those written are acknowledged first."""
        self._stopping = True
        self._stopped.set()
        if self._feed is not None:
            self._feed.stop()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Provision the router's consumer, then route until cancelled or stopped. Trouble (NATS away, a bug) is
        logged and routing starts again after a pause: puts wait in their stream meanwhile."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        delay = 1.0
        while not self._stopping:
            try:
                await self._run(ready)
                return
            except Exception as exc:
                log.warning("stream %s: routing stopped (%s); starting again in %.0f s", self.name, exc, delay)
            ready()
            with anyio.move_on_after(delay):
                await self._stopped.wait()
            delay = min(30.0, delay * 2)
        ready()

    async def _run(self, ready: Callable[[], None]) -> None:
        await self.bus.ensure_consumer(
            self.ingest,
            CONSUMER,
            filter_subjects=[self._subject, self._prefix + ">"],
            ack_wait=ACK_WAIT,
            max_ack_pending=2 * self.window,
            description=f"eventfn router of sharded stream {self.name}",
            options=OPTIONS,
        )
        feed = self._feed = self.bus.pull_feed(
            self.ingest, CONSUMER, max_inflight=2 * self.window, options=OPTIONS, on_pin_change=self._pin_changed
        )
        if self._stopping:
            feed.stop()
        self._resequencer = Resequencer()
        self._unsettled.clear()
        pipeline = _Pipeline(self.window)
        async with anyio.create_task_group() as tg:
            await tg.start(feed.run)
            await self._recover()
            tg.start_soon(self._acknowledge, pipeline)
            ready()
            log.info("stream %s: routing puts to %d shard(s)", self.name, self.shards)
            try:
                await self._route_all(feed, pipeline)
            finally:
                pipeline.close()

    def _pin_changed(self, pinned: bool) -> None:
        # Taking over from a router that died: its unacknowledged puts come back late; put them back in order.
        if pinned:
            self._recheck = True

    async def _recover(self) -> None:
        try:
            state = await self.bus.consumer_state(self.ingest, CONSUMER)
        except Exception as exc:  # cannot say: go on without the barrier
            log.warning("stream %s: could not read where routing left off (%s)", self.name, exc)
            return
        if state is not None and state.ack_pending:
            self._resequencer.arm(state.ack_pending, state.delivered_stream_seq, ACK_WAIT + 5, self._unsettled)

    async def _route_all(self, feed: PullFeed, pipeline: _Pipeline) -> None:
        async with aclosing(self._resequencer.take(feed, self._before)) as ordered:
            async for message in ordered:
                await self._route(message, pipeline)
        with anyio.CancelScope(shield=True):
            for held in self._resequencer.release():  # stopped while waiting for redeliveries: back to JetStream
                await held.nak()

    async def _before(self, message: Message) -> None:
        if self._recheck:
            self._recheck = False
            await self._recover()

    def key_of(self, message: Message) -> str:
        """The put's partition key: its header, else the rest of its subject, else its position."""
        headers = message.headers
        if headers:
            if key := headers.get(KEY_HEADER):
                return key
            for name, value in headers.items():  # `partition-key`: HTTP's habit; NATS's names are case-sensitive
                if value and name.lower() == _KEY_LOWER:
                    return value
        subject = message.subject
        if subject.startswith(self._prefix) and len(subject) > len(self._prefix):
            return subject[len(self._prefix) :]
        return str(message.stream_seq)

    async def _route(self, message: Message, pipeline: _Pipeline) -> None:
        key = self.key_of(message)
        subject = shard_subject(self.name, shard_of(key, self.shards))
        headers = {}
        for name, value in (message.headers or {}).items():
            if name.startswith("Nats-") or name.lower() == _KEY_LOWER:
                continue
            if HEADER_NAME.fullmatch(name) is None:
                log.warning(
                    "stream %s: put %d: header %r left off its record (a header name is letters, digits and "
                    "!#$%%&'*+-.^_`|~)",
                    self.name,
                    message.stream_seq,
                    name,
                )
                continue
            headers[name] = value
        headers[KEY_HEADER] = key
        headers[ARRIVAL_HEADER] = str(message.timestamp_ns)
        # Unique to the put (its position, and its time in case the put stream is ever re-created).
        headers["Nats-Msg-Id"] = f"put:{message.stream_seq}:{message.timestamp_ns}"
        size = len(subject) + len(message.data) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 16
        if size > self.bus.max_payload:
            log.error(
                "stream %s: put %d dropped: %d bytes with its record's headers, more than NATS takes (%d); put "
                "smaller records",
                self.name,
                message.stream_seq,
                size,
                self.bus.max_payload,
            )
            self.dropped += 1
            await message.ack()
            return
        self._unsettled.add(message.stream_seq)
        pending: Pending | None
        try:
            pending = await self.bus.publish_soon(subject, message.data, headers)
        except (nats.errors.BadHeaderError, nats.errors.MaxPayloadError) as exc:  # never writable: not retried
            log.error(
                "stream %s: put %d dropped: it cannot be written to its shard (%s)", self.name, message.stream_seq, exc
            )
            self._unsettled.discard(message.stream_seq)
            self.dropped += 1
            await message.ack()
            return
        except Exception as exc:  # not sent (the connection is down): written again, in place, below
            log.debug("stream %s: put %d not sent (%s)", self.name, message.stream_seq, exc)
            pending = None
        await pipeline.put((message, pending, subject, headers))

    async def _acknowledge(self, pipeline: _Pipeline) -> None:
        while True:
            item = await pipeline.head()
            if item is None:
                return
            message, pending, subject, headers = item
            delay = 0.1
            duplicate = False
            while True:
                try:
                    if pending is not None:
                        duplicate = (await pending.stored(WRITE_TIMEOUT)).duplicate
                    else:
                        await self.bus.publish_stored(subject, message.data, headers, timeout=WRITE_TIMEOUT)
                    break
                except Exception as exc:
                    # JetStream did not store it (no leader, an election): write it again with the same id.
                    # Later puts may have been stored meanwhile, so this one can land behind them (as a
                    # retried Kinesis put can).
                    log.warning(
                        "stream %s: writing put %d to its shard failed (%s); trying again in %.1f s",
                        self.name,
                        message.stream_seq,
                        exc or type(exc).__name__,
                        delay,
                    )
                    pending = None
                    await message.in_progress()
                    await anyio.sleep(delay)
                    delay = min(5.0, delay * 2)
            await message.ack()
            self._unsettled.discard(message.stream_seq)
            if not duplicate:
                self.routed += 1
            pipeline.pop()


class _Pipeline:
    """Puts written and not yet acknowledged, in put order: the router writes at the tail and acknowledges at the
    head. Bounded: a full pipeline holds the writer back. (A deque, not a memory stream: that would go round the
    event loop for every put, and the client would write every put to its socket on its own.)"""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: deque[_Routed] = deque()
        self._changed = anyio.Event()
        self._closed = False

    async def put(self, item: _Routed) -> None:
        while len(self.items) >= self.size:
            await self._wait()
        self.items.append(item)
        self._changed.set()

    async def head(self) -> _Routed | None:
        """The oldest write not acknowledged (left in place until `pop`); None once closed and empty."""
        while not self.items:
            if self._closed:
                return None
            await self._wait()
        return self.items[0]

    def pop(self) -> None:
        self.items.popleft()
        self._changed.set()

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    async def _wait(self) -> None:
        event = self._changed
        await event.wait()
        if self._changed is event:
            self._changed = anyio.Event()
