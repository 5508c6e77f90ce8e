"""The shard dispatcher: Lambda's Kinesis event-source-mapping semantics for one shard of a sharded stream.

One `ShardDispatcher` runs one shard's mapping (`<function>--<trigger>--shard-<i>`), whose exclusive consumer
gives it the shard's records in order. Records go into `parallelization_factor` lanes by a stable hash of their
partition key; each lane runs its batches one after another, so records of one key never overtake each other.
A batch holds records of one lane (so of one shard, and, with a tumbling window, of one window).

The checkpoint is the consumer's ack floor: a record is acknowledged only once its batch's outcome is durable
(the function succeeded and the window state is stored, or the batch's failure record is in the DLQ), so the
checkpoint survives restarts and hand-overs, and after a crash only unacknowledged records come back, put into
stream order again (`shards.Resequencer`) before any later record runs.

A failed batch is retried in place (the lane waits; held records are kept alive), with backoff from the
function's retry policy (capped at 30 s), until it succeeds, or `max_retry_attempts` or `max_record_age` is
passed: then its failure record (Lambda's, with `KinesisBatchInfo`) goes to the function's DLQ and to the
trigger's `on_failure` subject, and its records are acknowledged. `bisect_on_error` splits a failed batch in two
and runs each half (not counted as a retry), down to the bad record. A partial batch response checkpoints
before the lowest failed sequence number and retries from there.

Lanes and their tumbling windows are in `shard_lanes`; how an invocation's outcome is judged, what follows it and
the failure record of a batch given up, in `shard_outcomes`.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing

import anyio
import anyio.abc
import msgspec

from eventfn.invoke.invocation import Invocation, Outcome, failure
from eventfn.sources import kinesis, retry
from eventfn.sources.connector import State
from eventfn.sources.deadletters import DeadLetters, Sink, nak_quietly
from eventfn.sources.dispatch import Stats
from eventfn.sources.mappings import Mapping
from eventfn.sources.memory import MemoryState
from eventfn.sources.ordering import Recovery, run_holding
from eventfn.sources.shard_lanes import Lane, Window, WindowStore, window_start
from eventfn.sources.shard_outcomes import Commit, FailureRecords, GiveUp, Retry, Split, Step, decide, expired, judge
from eventfn.sources.shards import Resequencer, lane_of
from eventfn.sources.source import Feed, Message

log = logging.getLogger(__name__)

Invoke = Callable[[Invocation], Awaitable[Outcome]]

#: Longest wait between two attempts of a failed batch (Lambda backs off up to about this).
MAX_RETRY_DELAY = 30.0
#: Seconds after a window's end before it closes without a record of a later window (records reach their shard
#: through the router, a moment after they arrived).
WINDOW_GRACE = 1.0
#: About what a record adds to a batch besides its data (base64: 4/3 of it): the record's other fields.
RECORD_OVERHEAD = 400


class ShardStats(Stats):
    """A shard mapping's counters (`dispatch.Stats`) and its IteratorAge."""

    shard_id: str = ""
    #: Milliseconds from the arrival of the last record of the latest batch to its invocation (Lambda's
    #: IteratorAge), and the largest seen.
    iterator_age_ms: int = 0
    max_iterator_age_ms: int = 0
    #: Batches split in two (`bisect_on_error`), and windows closed by a final invoke.
    bisected: int = 0
    windows_closed: int = 0


class _Close:
    """`_next_batch`: close the lane's window (its final invoke) before anything else."""


_CLOSE = _Close()


# -- the dispatcher ------------------------------------------------------------------------------------------------


class ShardDispatcher:
    """Runs one shard's mapping: its records, in order per partition key, through batches, retries and the DLQ."""

    def __init__(
        self,
        sink: Sink,
        mapping: Mapping,
        feed: Feed,
        *,
        invoke: Invoke,
        recovery: Recovery | None = None,
        state: State | None = None,
    ) -> None:
        shard = mapping.source.shard
        if shard is None:
            raise ValueError(f"mapping {mapping.name} is not a shard's")
        self.mapping = mapping
        self.feed = feed
        self.shard = shard
        self._sink = sink
        self._invoke = invoke
        self._recovery = recovery
        self.shape = kinesis.Shape(shard.stream, shard.index)
        self._stats = ShardStats(shard_id=self.shape.shard_id)
        #: This mapping's counters, with the shard's IteratorAge (`ShardStats`).
        self.stats: Stats = self._stats
        self.filter = mapping.compiled_filter()
        self.dead_letters = DeadLetters(
            sink, mapping.function, mapping.name, mapping.destinations, retry_delay=mapping.dlq_retry_delay
        )
        self.lanes = [Lane(i) for i in range(max(1, shard.parallelization_factor))]
        self._windows = WindowStore(state if state is not None else MemoryState(), mapping.name, len(self.lanes))
        self._failures = FailureRecords(sink, mapping.function, mapping.name, self.shape, shard.on_failure)
        self._window = float(shard.tumbling_window)
        self._policy = msgspec.structs.replace(mapping.retry, max_delay=min(mapping.retry.max_delay, MAX_RETRY_DELAY))
        self._resequencer = Resequencer()
        #: Every record received and not settled (queued, in a batch, or held back), by position.
        self._held: dict[int, Message] = {}
        #: When each was last kept alive (wall clock).
        self._touched: dict[int, float] = {}
        self._recheck = False
        self._evictions = 0
        self._evict = False
        self._closed = False
        self._stopping = False
        self._stopped = anyio.Event()

    # -- the service's surface ------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until `stop()`; in-flight batches finish and settle before this returns."""

        async def release() -> None:
            # Stopped: what is held and not started goes back, in order, for whoever consumes next.
            await self._hand_back(self._release_held())

        await run_holding(
            self.feed,
            recover=self._recover,
            intake=self._intake,
            timers=self._timers,
            workers=[functools.partial(self._run_lane, lane) for lane in self.lanes],
            release=release,
            task_status=task_status,
        )

    def stop(self) -> None:
        """Stop taking records; batches under way finish and settle first, what waits goes back to the stream."""
        self._stopping = True
        self._stopped.set()
        self.feed.stop()
        for lane in self.lanes:
            lane.wake()

    def pin_changed(self, pinned: bool) -> None:
        """The consumer is this process's now (True), or another's (False). Taking it over, the records the last
        holder left unsettled come back late: they are put back into order first. Losing it, held records that
        have not started go back at once, so that the process now pinned gets them in order."""
        if pinned:
            self._recheck = True
        else:
            self._evictions += 1
            self._evict = True
            for lane in self.lanes:
                lane.wake()

    # -- intake -------------------------------------------------------------------------------------------

    async def _recover(self) -> None:
        if self._recovery is None:
            return
        try:
            unsettled, upto = await self._recovery()
        except Exception as exc:  # the source cannot say: go on without waiting (logged)
            log.warning("%s: could not read where it left off (%s); starting at once", self.mapping.name, exc)
            return
        self._resequencer.arm(unsettled, upto, self.mapping.ack_wait + 5, self._held)
        if self._resequencer.armed:
            log.info(
                "%s: %d record(s) left unsettled by an earlier run; waiting for them (at most %.0f s) before later "
                "records",
                self.mapping.name,
                unsettled - len(self._held),
                self.mapping.ack_wait + 5,
            )

    async def _intake(self) -> None:
        async with aclosing(self._resequencer.take(self.feed, self._before)) as ordered:
            async for message in ordered:
                try:
                    self._add(message)
                except Exception as exc:  # a bug here must not stop the shard: that record is given up
                    log.exception("%s: scheduling record %d failed", self.mapping.name, message.stream_seq)
                    error = failure("PoisonMessage", f"{type(exc).__name__}: {exc}", "-")
                    await self._give_up([message], "PoisonMessage", 0, error.payload)
        self._closed = True
        for lane in self.lanes:
            lane.wake()

    async def _before(self, message: Message) -> None:
        """Called for each delivery before it is ordered: track it, and recheck after a takeover."""
        self._held[message.stream_seq] = message
        self._touched[message.stream_seq] = message.received_at
        if self._recheck:
            self._recheck = False
            await self._recover()

    def _add(self, message: Message) -> None:
        self.lanes[lane_of(kinesis.partition_key(message), len(self.lanes))].add(message)

    # -- lanes --------------------------------------------------------------------------------------------

    async def _run_lane(self, lane: Lane) -> None:
        while True:
            taken = await self._next_batch(lane)
            if taken is None:
                return
            try:
                if isinstance(taken, _Close):
                    await self._close_window(lane, early=False)
                else:
                    await self._process(lane, taken)
            except Exception as exc:  # a bug: the batch is given up rather than the shard stopped
                log.exception("%s: dispatching a batch failed; giving it up", self.mapping.name)
                if not isinstance(taken, _Close):
                    unsettled = [m for m in taken if not m.settled]
                    if unsettled:
                        error = failure("Eventfn.DispatchError", f"{type(exc).__name__}: {exc}", "-")
                        with anyio.CancelScope(shield=True):
                            await self._give_up(unsettled, "PoisonMessage", 0, error.payload)

    async def _next_batch(self, lane: Lane) -> list[Message] | _Close | None:
        mapping = self.mapping
        windowed = self._window > 0
        while True:
            if self._stopping:
                return None
            if windowed and not lane.loaded:
                await self._load_window(lane)
            window = lane.window
            if lane.queue:
                if windowed:
                    start = self._window_start(lane, lane.queue[0])
                    if window is not None and start >= window.end:
                        return _CLOSE
                    if window is None:
                        lane.window = Window(start, start + self._window)
                break
            timeout = None
            if windowed and window is not None:
                due = window.end + WINDOW_GRACE + mapping.batch_window - time.time()
                if due <= 0:
                    return _CLOSE
                timeout = due
            if self._closed:
                return None
            await lane.wait(timeout)
        batch: list[Message] = []
        size = 0
        deadline = time.monotonic() + mapping.batch_window
        while True:
            queue = lane.queue
            while queue and len(batch) < mapping.batch_size:
                head = queue[0]
                if windowed and self._window_start(lane, head) != lane.window.start:  # type: ignore[union-attr]
                    return batch  # the next window's: this batch is complete
                grown = size + len(head.data) * 4 // 3 + RECORD_OVERHEAD
                if batch and grown > mapping.max_batch_bytes:
                    return batch
                batch.append(queue.popleft())
                size = grown
            remaining = deadline - time.monotonic()
            if len(batch) >= mapping.batch_size or remaining <= 0 or self._stopping or self._closed:
                return batch
            await lane.wait(remaining)

    def _window_start(self, lane: Lane, message: Message) -> float:
        floor = lane.window.start if lane.window is not None else lane.closed_end
        return window_start(kinesis.arrival_ns(message), self._window, floor)

    # -- one batch ------------------------------------------------------------------------------------------

    async def _process(self, lane: Lane, batch: list[Message]) -> None:
        """Filter, invoke and settle one batch, retrying it in place until its outcome is durable."""
        stats = self._stats
        stats.received += len(batch)
        kept: list[Message] = []
        window = lane.window
        for message in batch:
            if window is not None and message.stream_seq <= window.through:
                await self._ack(message)  # the window's stored state has it already (a redelivery after a crash)
                continue
            if self.filter is not None and not self.filter.matches(kinesis.filter_document(message)):
                stats.filtered += 1
                await self._ack(message)  # Lambda skips a stream record no filter matches
                continue
            kept.append(message)
        if kept:
            await self._settle(lane, kept)

    async def _settle(self, lane: Lane, records: list[Message]) -> None:
        shard = self.shard
        evictions = self._evictions
        # Batches still to run, in order: bisecting puts both halves here.
        work: deque[list[Message]] = deque([records])
        retries = invokes = 0
        error: bytes | None = None
        while work:
            batch = work[0]
            if shard.max_record_age >= 0 and (old := expired(batch, shard.max_record_age, time.time_ns())):
                if not await self._give_up(batch[:old], "RecordAgeExceeded", invokes, error):
                    return await self._hand_back([m for b in work for m in b])
                work[0] = batch = batch[old:]
                if not batch:
                    work.popleft()
                    retries = invokes = 0
                    continue
            succeeded, state, outcome = await self._invoke_batch(lane, batch)
            invokes += 1
            error = None if outcome.ok else outcome.payload
            step = decide(succeeded, len(batch), retries, shard, self._delay)
            done = step.count if isinstance(step, Commit) else succeeded if isinstance(step, Split) else step.done
            if done and not await self._commit(lane, batch[:done], state):
                return await self._hand_back([m for b in work for m in b])
            if isinstance(step, Commit):
                work.popleft()
                retries = invokes = 0
                continue
            if isinstance(step, Split):
                # Two batches, not a retry: the failed rest after a partial failure, or both halves.
                self._stats.bisected += 1
                work.popleft()
                work.appendleft(batch[step.at :])
                if succeeded < step.at:
                    work.appendleft(batch[: step.at])
                retries = invokes = 0
                continue
            left = work[0] = batch[done:]
            self._log_failure(left, outcome, retries + 1, step)
            if isinstance(step, GiveUp):
                if not await self._give_up(left, step.condition, invokes, error):
                    return await self._hand_back([m for b in work for m in b])
                work.popleft()
                retries = invokes = 0
                continue
            retries += 1
            self._stats.retried += 1
            if not await self._pause(step.delay, evictions):
                return await self._hand_back([m for b in work for m in b])
        return None

    def _delay(self, retry_number: int) -> float:
        return retry.backoff(retry_number, self._policy)

    async def _invoke_batch(self, lane: Lane, batch: list[Message]) -> tuple[int, bytes | None, Outcome]:
        """Invoke the function with `batch`; returns how many records (from the first) succeeded, the window
        state it returned (windowed mappings), and the outcome (Lambda's error object when it failed)."""
        mapping = self.mapping
        window = lane.window
        if window is not None:
            payload = self.shape.window_batch(batch, window.start, window.end, window.state)
        else:
            payload = self.shape.batch(batch)
        stats = self._stats
        age = max(0, (time.time_ns() - kinesis.arrival_ns(batch[-1])) // 1_000_000)
        stats.iterator_age_ms = age
        stats.max_iterator_age_ms = max(stats.max_iterator_age_ms, age)
        request_id = str(uuid.uuid4())
        stats.invocations += 1
        outcome = await self._invoke(
            Invocation(request_id=request_id, payload=payload, is_json=True, keepalive_every=mapping.ack_wait / 3)
        )
        judged = judge(
            outcome,
            [str(m.stream_seq) for m in batch],
            windowed=window is not None,
            report=mapping.report_batch_item_failures,
            request_id=request_id,
        )
        succeeded, state, outcome = judged.succeeded, judged.state, judged.outcome
        if succeeded < len(batch):
            stats.failed += len(batch) - succeeded
            stats.last_result = "PROBLEM: Function call failed"
            stats.last_error = outcome.error.type if outcome.error is not None else "BatchItemFailure"
        else:
            stats.last_result = "OK"
        return succeeded, state, outcome

    def _log_failure(self, left: Sequence[Message], outcome: Outcome, attempt: int, step: Step) -> None:
        error = outcome.error.type if outcome.error is not None else "BatchItemFailure"
        then = f"retrying in {step.delay:.2f} s" if isinstance(step, Retry) else ""
        if isinstance(step, GiveUp):
            then = f"giving it up ({step.condition})"
        log.warning(
            "%s: %s records %d-%d (%d) failed on attempt %d (%s), iterator age %d ms; %s",
            self.mapping.function,
            self.shape.shard_id,
            left[0].stream_seq,
            left[-1].stream_seq,
            len(left),
            attempt,
            error,
            self._stats.iterator_age_ms,
            then,
        )

    # -- settling ---------------------------------------------------------------------------------------------

    async def _commit(self, lane: Lane, records: Sequence[Message], state: bytes | None) -> bool:
        """Checkpoint after `records` (they succeeded): store the window state they produced, then acknowledge
        them. False if the state could not be stored before the dispatcher stopped (they go back, unacked)."""
        window = lane.window
        if window is not None and state is not None:
            window.state = state
            window.through = records[-1].stream_seq
            if not await self._save_window(lane):
                return False
            if len(state) > kinesis.MAX_STATE_BYTES:
                await self._close_window(lane, early=True)
        with anyio.CancelScope(shield=True):
            for message in records:
                await self._ack(message)
            await self._flush()
        self._stats.processed += len(records)
        return True

    async def _give_up(self, records: Sequence[Message], condition: str, invokes: int, error: bytes | None) -> bool:
        """Write the failure record of `records` (Lambda's, with `KinesisBatchInfo`) to the function's DLQ and,
        once it is stored, to the trigger's `on_failure` subject, and acknowledge them. While the DLQ cannot take
        it, try again; False if the dispatcher stopped first (the records stay unacknowledged)."""
        while True:
            try:
                with anyio.CancelScope(shield=True):
                    await self._failures.write(records, condition, invokes, error)
                break
            except Exception as exc:
                log.error(
                    "%s: DLQ write for %s records %d-%d failed (%s); they stay in the shard",
                    self.mapping.function,
                    self.shape.shard_id,
                    records[0].stream_seq,
                    records[-1].stream_seq,
                    exc,
                )
                if not await self._pause(self.mapping.dlq_retry_delay, self._evictions):
                    return False
        with anyio.CancelScope(shield=True):
            for message in records:
                await self._ack(message)
            await self._flush()
        self._stats.dead_lettered += len(records)
        self.dead_letters.count += 1
        return True

    async def _ack(self, message: Message) -> None:
        self._forget(message)
        try:
            await message.ack()
        except Exception as exc:  # NATS gone: redelivered later, and a redelivery is run again (at least once)
            log.warning("%s: ack of record %d failed: %s", self.mapping.name, message.stream_seq, exc)

    async def _flush(self) -> None:
        """Wait until the acknowledgements are with the server before the lane goes on: a crash then replays at most
        the batch in flight, not the one before it too (its acknowledgements still in the client's buffer)."""
        flush = getattr(self._sink, "flush", None)  # the bus; an in-memory sink has nothing to flush
        if flush is None:
            return
        try:
            await flush()
        except Exception as exc:  # NATS away: the acknowledgements go out when it is back, or are redelivered
            log.debug("%s: flush after a checkpoint failed: %s", self.mapping.name, exc)

    def _forget(self, message: Message) -> None:
        if self._held.get(message.stream_seq) is message:
            del self._held[message.stream_seq]
            self._touched.pop(message.stream_seq, None)

    async def _hand_back(self, messages: Sequence[Message]) -> None:
        """Return records not run: redelivered at once, in stream order, to whoever consumes next."""
        with anyio.CancelScope(shield=True):
            for message in sorted(messages, key=lambda m: m.stream_seq):
                if not message.settled:
                    self._forget(message)
                    await nak_quietly(message, 0.0)

    def _release_held(self) -> list[Message]:
        """Every record held and not in a batch (queued in a lane, or held back for order)."""
        left = [m for lane in self.lanes for m in lane.queue]
        for lane in self.lanes:
            lane.queue.clear()
        left += self._resequencer.release()
        return left

    async def _pause(self, delay: float, evictions: int) -> bool:
        """Wait `delay` seconds before a retry; False (at once) if the dispatcher stops or loses its consumer."""
        with anyio.move_on_after(delay):
            await self._stopped.wait()
        return not self._stopping and self._evictions == evictions

    # -- tumbling windows -------------------------------------------------------------------------------------

    async def _load_window(self, lane: Lane) -> None:
        lane.loaded = True
        lane.window = await self._windows.load(lane.index)

    async def _save_window(self, lane: Lane) -> bool:
        """Store the lane's window, trying again until it is stored; False if the dispatcher stops first."""
        window = lane.window
        assert window is not None
        delay = 0.5
        while True:
            try:
                await self._windows.save(lane.index, window)
                return True
            except Exception as exc:
                log.warning("%s: window state not stored (%s); trying again", self.mapping.name, exc)
            if not await self._pause(delay, self._evictions):
                return False
            delay = min(MAX_RETRY_DELAY, delay * 2)

    async def _close_window(self, lane: Lane, *, early: bool) -> None:
        """The window's final invoke (`isFinalInvokeForWindow`), retried like a batch; then its state is dropped.
        `early`: the state grew past 1 MB; the same window goes on with a fresh state."""
        window = lane.window
        assert window is not None
        retries = 0
        evictions = self._evictions
        while True:
            payload = self.shape.window_batch([], window.start, window.end, window.state, final=True, early=early)
            self._stats.invocations += 1
            outcome = await self._invoke(Invocation(request_id=str(uuid.uuid4()), payload=payload, is_json=True))
            if outcome.ok:
                break
            retries += 1
            self._stats.retried += 1
            if 0 <= self.shard.max_retry_attempts < retries:
                log.error(
                    "%s: %s final invoke of window %s failed %d time(s) (%s); its state is dropped",
                    self.mapping.function,
                    self.shape.shard_id,
                    kinesis.iso(window.start),
                    retries,
                    outcome.error.type if outcome.error else "?",
                )
                break
            delay = retry.backoff(retries, self._policy)
            log.warning(
                "%s: %s final invoke of window %s failed (%s); retrying in %.2f s",
                self.mapping.function,
                self.shape.shard_id,
                kinesis.iso(window.start),
                outcome.error.type if outcome.error else "?",
                delay,
            )
            if not await self._pause(delay, evictions):
                return  # stopped: the window stays stored, and the next run closes it
        self._stats.windows_closed += 1
        if early:
            window.state = b"{}"
            await self._save_window(lane)
            return
        lane.window = None
        lane.closed_end = window.end
        try:
            await self._windows.drop(lane.index)
        except Exception as exc:  # the next run finds it, sees its end has passed, and closes it again
            log.warning("%s: closed window state not removed: %s", self.mapping.name, exc)

    # -- time -----------------------------------------------------------------------------------------------

    async def _timers(self) -> None:
        """Keep held records alive, hand them back when another process took the consumer, and release records
        held back for order when their wait is over."""
        every = self.mapping.ack_wait / 3
        next_keepalive = time.monotonic() + every
        while True:
            if self._evict:
                self._evict = False
                if left := self._release_held():
                    log.warning(
                        "%s: another process consumes the shard now; %d held record(s) handed back",
                        self.mapping.name,
                        len(left),
                    )
                    await self._hand_back(left)
            now = time.monotonic()
            if now >= next_keepalive:
                await self._keep_alive(time.time() - every)
                next_keepalive = now + every
            await anyio.sleep(min(1.0, max(0.0, next_keepalive - time.monotonic())))

    async def _keep_alive(self, older_than: float) -> None:
        now = time.time()
        for seq, message in list(self._held.items()):
            if self._touched.get(seq, 0.0) < older_than and not message.settled:
                try:
                    await message.in_progress()
                except Exception as exc:  # NATS gone: redelivered later, in order
                    log.debug("keepalive of record %d failed: %s", seq, exc)
                self._touched[seq] = now
