"""The ordering models: how a mapping's events are gathered into batches and run.

- `Unordered` (ordering "none"): any order. With batch size 1, `concurrency` tasks each take the next event;
  otherwise one gatherer fills batches in arrival order and starts up to `concurrency` at once. A retry goes
  back to the source with a delay, and later events overtake it.
- `Keyed` (ordering "key" and "shard"): events with the same key never run at the same time and never overtake
  each other, retries included. Each key has a queue in stream order; a batch takes a key's events from the
  head of its queue and holds the key until the batch is settled. A failing event stays at the head of its
  key, which waits for the retry's delay, until it succeeds or is dead-lettered; other keys go on. With
  "shard", a batch holds one key (the shard) only. Both keep the events they hold alive in the source
  (`in_progress`) while they wait.

After a crash, a new `Keyed` scheduler first waits (at most an ack wait) for the events the dead process held
to be redelivered, then releases everything in stream order: an event received before it can never run
before one of its own key that the dead process had not settled.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc

from eventfn.sources.deadletters import DeadLetters, nak_quietly
from eventfn.sources.mappings import Mapping
from eventfn.sources.source import Feed, KeyReader, Message

log = logging.getLogger(__name__)

#: Unsettled events of the consumer (its ack pending count) and the highest stream position it delivered, as
#: the source reports them when a mapping starts.
Recovery = Callable[[], Awaitable[tuple[int, int]]]


class Dispatcher(Protocol):
    """What a scheduler drives (`dispatch.Dispatcher`): a mapping, its feed, and the processing of one batch."""

    mapping: Mapping
    feed: Feed
    dead_letters: DeadLetters

    async def process_guarded(self, batch: Sequence[Message]) -> list[float | None]:
        """Filter, invoke and settle `batch`; for each event, None (settled) or seconds until it runs again."""
        ...

    async def hand_back(self, messages: list[Message]) -> None:
        """Return events not started to the source (`hand_back`), noting that they were not received."""
        ...


def record_size(data: bytes) -> int:
    """About what one event adds to a batch payload: its body as a JSON string (quotes are the escaping JSON
    bodies need most) plus the record's other fields (512 bytes cover them). A batch that still comes out too
    large is split before it is sent."""
    return len(data) + data.count(b'"') + 512


async def hand_back(messages: list[Message]) -> None:
    """Return unstarted events untouched: redelivered at once to whoever consumes next."""
    with anyio.CancelScope(shield=True):
        for message in messages:
            await nak_quietly(message, 0.0)


class Unordered:
    """Ordering "none": today's behaviour, as fast as it can be."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.mapping = dispatcher.mapping
        self.feed = dispatcher.feed
        #: Batch size 1: the tasks taking events, those waiting for one, and how many there may be.
        self._workers = 0
        self._receiving = 0
        self._limit = 1
        self._running: anyio.abc.TaskGroup | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.feed.run)
            if self.mapping.batch_size != 1:
                # Several gatherers would split a trickle into many one-event batches: one fills them.
                tg.start_soon(self._gatherer, tg)
                task_status.started()
                return
            workers = max(1, self.mapping.concurrency)
            keeping = anyio.CancelScope()
            if self.mapping.max_inflight > workers + 1:
                # The feed holds more events than run at once (`mappings.feed_credit`): those waiting are kept alive.

                async def keep_alive() -> None:
                    with keeping:
                        await self._keep_waiting_alive()

                tg.start_soon(keep_alive)
            task_status.started()
            async with anyio.create_task_group() as running:
                self._running, self._limit = running, workers
                self._add_worker()
            keeping.cancel()

    def _add_worker(self) -> None:
        """One more task taking events, up to the mapping's concurrency. They start one at a time, as the ones there
        are get busy: an idle mapping (of a thousand) holds one task, not `concurrency`."""
        assert self._running is not None
        self._workers += 1
        self._running.start_soon(self._single_worker)

    async def _keep_waiting_alive(self) -> None:
        """Every third of the ack wait, tell the source that events waiting in the feed for a free slot are still
        to be worked on, so that none is redelivered while it waits (behind slow invocations, say)."""
        every = self.mapping.ack_wait / 3
        touched: dict[int, float] = {}
        while True:
            await anyio.sleep(every)
            now = time.time()
            seen: dict[int, float] = {}
            for message in self.feed.waiting():
                last = max(message.received_at, touched.get(message.stream_seq, 0.0))
                if last < now - every:
                    try:
                        await message.in_progress()
                    except Exception as exc:  # NATS gone: the source redelivers it later, at least once
                        log.debug("keepalive of event %d failed: %s", message.stream_seq, exc)
                    last = now
                seen[message.stream_seq] = last
            touched = seen

    async def _single_worker(self) -> None:
        feed, process = self.feed, self.dispatcher.process_guarded
        while True:
            self._receiving += 1
            try:
                message = await feed.receive()
            except anyio.EndOfStream:
                return
            finally:
                self._receiving -= 1
            if self._receiving == 0 and self._workers < self._limit:
                self._add_worker()  # none is left waiting for the next event while this one runs
            if feed.stopping:
                await self.dispatcher.hand_back([message])
                continue
            await process([message])

    async def _gatherer(self, tg: anyio.abc.TaskGroup) -> None:
        slots = anyio.Semaphore(max(1, self.mapping.concurrency))
        carry: Message | None = None
        while True:
            if carry is None:
                try:
                    carry = await self.feed.receive()
                except anyio.EndOfStream:
                    return
            batch, carry = [carry], None
            carry = await self._fill(batch)
            await slots.acquire()
            if self.feed.stopping:
                slots.release()
                await self.dispatcher.hand_back([*batch, *([carry] if carry else [])])
                carry = None
                continue
            tg.start_soon(self._process_in_slot, batch, slots)

    async def _process_in_slot(self, batch: list[Message], slots: anyio.Semaphore) -> None:
        try:
            await self.dispatcher.process_guarded(batch)
        finally:
            slots.release()

    async def _fill(self, batch: list[Message]) -> Message | None:
        """Add to `batch` until it is full, its window closes or the next event would pass the byte cap;
        returns an event that did not fit (it starts the next batch)."""
        mapping = self.mapping
        size = record_size(batch[0].data)
        deadline = time.monotonic() + mapping.batch_window
        while len(batch) < mapping.batch_size:
            message = await self._next_before(deadline)
            if message is None:
                return None
            size += record_size(message.data)
            if size > mapping.max_batch_bytes:
                return message
            batch.append(message)
        return None

    async def _next_before(self, deadline: float) -> Message | None:
        """An event that is waiting, or one arriving before `deadline`; None when the window closes."""
        try:
            return self.feed.receive_nowait()
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            return None
        remaining = deadline - time.monotonic()
        if remaining > 0:
            with anyio.move_on_after(remaining):
                try:
                    return await self.feed.receive()
                except anyio.EndOfStream:
                    return None
        return None


async def run_holding(
    feed: Feed,
    *,
    recover: Callable[[], Awaitable[None]],
    intake: Callable[[], Coroutine[Any, Any, None]],
    timers: Callable[[], Awaitable[None]],
    workers: Sequence[Callable[[], Coroutine[Any, Any, None]]],
    release: Callable[[], Awaitable[None]],
    task_status: anyio.abc.TaskStatus[None],
) -> None:
    """The life of a scheduler that holds events between delivery and run (`Keyed`, the shard dispatcher): the
    feed, then what a crash left is recovered; intake and timers run beside the workers; once every worker ended
    (the feed stopped, no batch runs), the timers stop and `release` hands back what is still held."""
    async with anyio.create_task_group() as tg:
        await tg.start(feed.run)
        await recover()
        ticking = anyio.CancelScope()

        async def keep_time() -> None:
            with ticking:
                await timers()

        async with anyio.create_task_group() as work:
            work.start_soon(intake)
            work.start_soon(keep_time)
            task_status.started()
            async with anyio.create_task_group() as running:
                for worker in workers:
                    running.start_soon(worker)
            ticking.cancel()
        await release()


class _Barrier:
    """After a crash: events wait until the `expected` unsettled ones up to position `upto` are redelivered."""

    def __init__(self, expected: int, upto: int, until: float) -> None:
        self.expected = expected
        self.upto = upto
        self.until = until
        self.seen: set[int] = set()
        self.held: list[Message] = []


class Keyed:
    """Orderings "key" and "shard": per-key queues in stream order, one batch per key at a time."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        key_of: KeyReader,
        *,
        one_key_per_batch: bool,
        recovery: Recovery | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.mapping = dispatcher.mapping
        self.feed = dispatcher.feed
        self.key_of = key_of
        self.one_key_per_batch = one_key_per_batch
        self._recovery = recovery
        #: Each key's events not yet started, in stream order.
        self.queues: dict[str, list[Message]] = {}
        #: Keys with events, neither running nor waiting for a retry, in the order they became ready.
        self._ready: deque[str] = deque()
        self._ready_set: set[str] = set()
        #: Keys with a batch running.
        self.busy: set[str] = set()
        #: Keys waiting for a retry: monotonic time they may run again.
        self.blocked: dict[str, float] = {}
        self._changed = anyio.Event()
        self._closed = False
        self._barrier: _Barrier | None = None
        #: When a held event was last kept alive (by stream position).
        self._touched: dict[int, float] = {}
        #: Set when the source no longer gives this process the consumer: held events go back.
        self._evict = False

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async def release() -> None:
            # Stopped (no batch runs now): what is held goes back to the source; the next consumer runs it, in order.
            await self.dispatcher.hand_back(self._release_held())

        await run_holding(
            self.feed,
            recover=self._recover,
            intake=self._intake,
            timers=self._timers,
            workers=[self._runner] * max(1, self.mapping.concurrency),
            release=release,
            task_status=task_status,
        )

    # -- intake ---------------------------------------------------------------------------------------------

    async def _recover(self) -> None:
        if self._recovery is None:
            return
        try:
            unsettled, upto = await self._recovery()
        except Exception as exc:  # the source cannot say: go on without the barrier (logged)
            log.warning("%s: could not read where it left off (%s); starting at once", self.mapping.name, exc)
            return
        if unsettled > 0:
            log.info(
                "%s: %d event(s) left unsettled by an earlier run; waiting for them (at most %.0f s) before "
                "later events of their keys",
                self.mapping.name,
                unsettled,
                self.mapping.ack_wait + 5,
            )
            self._barrier = _Barrier(unsettled, upto, time.monotonic() + self.mapping.ack_wait + 5)

    async def _intake(self) -> None:
        while True:
            try:
                message = await self.feed.receive()
            except anyio.EndOfStream:
                break
            barrier = self._barrier
            if barrier is not None:
                barrier.held.append(message)
                if message.stream_seq <= barrier.upto:
                    barrier.seen.add(message.stream_seq)
                    if len(barrier.seen) >= barrier.expected:
                        self._release_barrier()
                continue
            try:
                self._add(message)
            except Exception as exc:  # a bug here must not stop the mapping, or the service: that event is parked
                log.exception(
                    "%s: scheduling event %d failed; dead-lettering it", self.mapping.name, message.stream_seq
                )
                await self.dispatcher.dead_letters.poison(message, exc)
        self._closed = True
        self._changed.set()

    def _release_barrier(self) -> None:
        barrier, self._barrier = self._barrier, None
        if barrier is None:
            return
        log.info("%s: resuming in order (%d event(s) were waiting)", self.mapping.name, len(barrier.held))
        for message in sorted(barrier.held, key=lambda m: m.stream_seq):
            self._add(message)

    def _add(self, message: Message) -> None:
        key = self.key_of(message)
        queue = self.queues.get(key)
        if queue is None:
            self.queues[key] = [message]
        elif not queue or queue[-1].stream_seq < message.stream_seq:
            queue.append(message)  # (a key whose events all run now keeps an empty queue)
        else:
            # A redelivery behind later events of its key that have not started: back into stream order (the same
            # event twice, after a lapsed keepalive, keeps only the newer delivery).
            positions = [m.stream_seq for m in queue]
            at = bisect.bisect_left(positions, message.stream_seq)
            if at < len(queue) and queue[at].stream_seq == message.stream_seq:
                queue[at] = message
            else:
                queue.insert(at, message)
        self._make_ready(key)

    def _make_ready(self, key: str) -> None:
        if key not in self._ready_set and key not in self.busy and key not in self.blocked and self.queues.get(key):
            self._ready.append(key)
            self._ready_set.add(key)
            self._changed.set()

    # -- batches ------------------------------------------------------------------------------------------

    async def _runner(self) -> None:
        while True:
            taken = await self._next_batch()
            if taken is None:
                return
            batch, keys = taken
            verdicts = await self.dispatcher.process_guarded(batch)
            self._settled(batch, keys, verdicts)

    async def _wait(self, timeout: float | None = None) -> None:
        event = self._changed
        if timeout is None:
            await event.wait()
        else:
            with anyio.move_on_after(timeout):
                await event.wait()
        if self._changed is event and event.is_set():
            self._changed = anyio.Event()

    async def _next_batch(self) -> tuple[list[Message], list[str]] | None:
        mapping = self.mapping
        while not self._ready:
            if self.feed.stopping or self._closed:
                return None
            await self._wait()
        if self.feed.stopping:
            return None
        batch: list[Message] = []
        keys: list[str] = []
        size = 0
        deadline = time.monotonic() + mapping.batch_window
        while True:
            while self._ready and len(batch) < mapping.batch_size and not (self.one_key_per_batch and keys):
                key = self._ready.popleft()
                self._ready_set.discard(key)
                self.busy.add(key)
                keys.append(key)
                size = self._take(key, batch, size)
            for key in keys:  # more events of the batch's own keys may have arrived during the window
                size = self._take(key, batch, size)
            remaining = deadline - time.monotonic()
            if len(batch) >= mapping.batch_size or size >= mapping.max_batch_bytes or remaining <= 0:
                return batch, keys
            if self.feed.stopping or self._closed:
                return batch, keys
            await self._wait(remaining)

    def _take(self, key: str, batch: list[Message], size: int) -> int:
        """Move events from the head of `key`'s queue into `batch` while it has room; returns its size."""
        queue = self.queues.get(key)
        mapping = self.mapping
        taken = 0
        while queue and taken < len(queue) and len(batch) < mapping.batch_size:
            message = queue[taken]
            grown = size + record_size(message.data)
            if batch and grown > mapping.max_batch_bytes:
                break
            batch.append(message)
            size = grown
            taken += 1
        if taken and queue is not None:
            del queue[:taken]
            for message in batch[-taken:]:
                self._touched.pop(message.stream_seq, None)
        return size

    def _settled(self, batch: list[Message], keys: list[str], verdicts: list[float | None]) -> None:
        """After a batch: held events go back to the head of their keys, which wait for the retry's delay."""
        held: dict[str, list[tuple[Message, float]]] = {}
        for message, verdict in zip(batch, verdicts, strict=True):
            if verdict is not None:
                held.setdefault(self.key_of(message), []).append((message, verdict))
        now = time.monotonic()
        for key in keys:
            self.busy.discard(key)
            back = held.get(key)
            queue = self.queues.setdefault(key, [])
            if back:
                queue[:0] = [m for m, _ in back]
                self.blocked[key] = now + back[0][1]
                self._changed.set()
            elif queue:
                self._make_ready(key)
            else:
                del self.queues[key]

    def evict(self) -> None:
        """Hand back every event held and not started (soon, from the timer task): another process consumes
        the source now."""
        self._evict = True

    def _release_held(self) -> list[Message]:
        """Take every event held and not started (queued for an idle key, or behind the recovery barrier) out of
        the scheduler, in stream order; keys with a batch running keep their queues."""
        left = [m for key, q in self.queues.items() if key not in self.busy for m in q]
        if self._barrier is not None:
            left += self._barrier.held
            self._barrier = None
        for key in [k for k in self.queues if k not in self.busy]:
            del self.queues[key]
            self.blocked.pop(key, None)
        self._ready.clear()
        self._ready_set.clear()
        return sorted(left, key=lambda m: m.stream_seq)

    async def _hand_back_held(self) -> None:
        self._evict = False
        if left := self._release_held():
            log.warning(
                "%s: another process consumes it now; %d held event(s) handed back", self.mapping.name, len(left)
            )
            await self.dispatcher.hand_back(left)

    # -- time ---------------------------------------------------------------------------------------------

    async def _timers(self) -> None:
        """Unblock keys whose retry delay passed, keep held events alive, and end a recovery barrier in time."""
        every = self.mapping.ack_wait / 3
        next_keepalive = time.monotonic() + every
        while True:
            if self._evict:
                await self._hand_back_held()
            now = time.monotonic()
            for key in [k for k, until in self.blocked.items() if until <= now]:
                del self.blocked[key]
                self._make_ready(key)
            if self._barrier is not None and now >= self._barrier.until:
                self._release_barrier()
            if now >= next_keepalive:
                await self._keep_alive(time.time() - every)
                next_keepalive = now + every
            wake = min([next_keepalive, *self.blocked.values(), *([self._barrier.until] if self._barrier else [])])
            await self._wait_timer(max(0.0, wake - time.monotonic()))

    async def _wait_timer(self, timeout: float) -> None:
        # Not `_changed`: the runners reset that one. A blocked key only needs its own deadline, and one set
        # while this sleeps is at least a retry delay away; 0.1 s bounds how late it may be noticed.
        await anyio.sleep(min(timeout, 0.1) if self.blocked else min(timeout, 1.0))

    async def _keep_alive(self, older_than: float) -> None:
        """Tell the source that held events are still being worked on, so that it does not redeliver them."""
        now = time.time()
        waiting = [m for q in self.queues.values() for m in q]
        if self._barrier is not None:
            waiting += self._barrier.held
        for message in waiting:
            if max(message.received_at, self._touched.get(message.stream_seq, 0.0)) < older_than:
                try:
                    await message.in_progress()
                except Exception as exc:  # NATS gone: the source redelivers it later, in order
                    log.debug("keepalive of event %d failed: %s", message.stream_seq, exc)
                self._touched[message.stream_seq] = now
