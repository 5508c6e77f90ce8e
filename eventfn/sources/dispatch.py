"""The dispatcher: Lambda's event-source-mapping semantics between a source's stored events and invocations.

One `Dispatcher` runs one mapping. Its scheduler (`ordering`) gathers batches by the source's ordering model;
`process` drops events the filters reject (acknowledged and counted), invokes the function through the one
invocation path, and settles every event by the retry policy (`retry.decide`), honouring partial batch
responses. An unordered mapping hands a retry back to its source with a delay; an ordered one holds the
event, and its key, until the delay has passed. Dead letters go through `deadletters`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc
import msgspec

from eventfn import events
from eventfn.errors import EventDecodeError
from eventfn.filters import Filter, decode_body
from eventfn.invoke.invocation import Invocation, LambdaError, Outcome, failure
from eventfn.sources import queue_records, queues, records
from eventfn.sources.deadletters import DeadLetters, Sink, event_of
from eventfn.sources.mappings import Mapping
from eventfn.sources.ordering import Keyed, Recovery, Unordered
from eventfn.sources.ordering import hand_back as return_unstarted
from eventfn.sources.retry import DeadLetter, Retry, decide
from eventfn.sources.source import Feed, Message, RecordShape, key_reader

log = logging.getLogger(__name__)

Invoke = Callable[[Invocation], Awaitable[Outcome]]

#: What `process` says of each event of a batch: None, settled (acknowledged, dead-lettered or handed back);
#: a number, held by an ordered mapping, to run again after that many seconds.
Verdict = float | None


class Stats(msgspec.Struct, kw_only=True):
    """Counters of one mapping in this service process (Lambda's ESM metrics)."""

    received: int = 0
    invocations: int = 0
    processed: int = 0
    failed: int = 0
    retried: int = 0
    filtered: int = 0
    dead_lettered: int = 0
    last_result: str = "No records processed"
    last_error: str | None = None


_BATCH_ITEM_FAILURE = Outcome(
    ok=False,
    payload=b'{"errorType":"BatchItemFailure","errorMessage":"reported in batchItemFailures"}',
    error=LambdaError(type="BatchItemFailure", message="reported in batchItemFailures"),
)

_Ready = tuple[Message, events.Event | None, str]


class Dispatcher:
    """Runs one mapping: its source's feed, scheduled by the source's ordering model, feeding one function."""

    def __init__(
        self,
        sink: Sink,
        mapping: Mapping,
        feed: Feed,
        *,
        invoke: Invoke,
        recovery: Recovery | None = None,
        state: queues.HandBacks | None = None,
    ) -> None:
        self.mapping = mapping
        self.feed = feed
        self._invoke = invoke
        self.stats = Stats()
        self.filter = mapping.compiled_filter()
        #: The source's own filters: every one must match (the mapping's `filter`: any of its patterns).
        self.selects = mapping.source_filters()
        self.dead_letters = DeadLetters(
            sink, mapping.function, mapping.name, mapping.destinations, retry_delay=mapping.dlq_retry_delay
        )
        self._source_arn = records.source_arn(feed.stream, mapping.name)
        self._shape: RecordShape = records.SHAPES[mapping.source.records]
        #: How often an event waiting for its invocation is kept alive (a third of the ack wait).
        self._keep_every = mapping.ack_wait / 3
        ordering = mapping.source.ordering
        #: Ordered mappings retry in place: the attempts made beyond the source's delivery count, by position.
        self._extra_attempts: dict[int, int] | None = None
        self._key_of = None
        self.scheduler: Unordered | Keyed
        if ordering.ordered:
            self._extra_attempts = {}
            self._key_of = key_reader(ordering)
            self.scheduler = Keyed(self, self._key_of, one_key_per_batch=ordering.model == "shard", recovery=recovery)
        else:
            self.scheduler = Unordered(self)
        #: A queue's SQS semantics (None for other sources): its delays, receive counts and redrive policy replace
        #: the function's retry policy and DLQ, and its batches are SQS's own.
        self._queue: queues.Redrive | None = None
        if (queue := mapping.source.queue) is not None:
            self._queue = queues.Redrive(
                queue, sink, stream=feed.stream, state=state, retry_delay=mapping.dlq_retry_delay
            )
            self._source_arn = queues.arn(queue.name)
            self._shape = queue_records.QueueShape(
                queue.name,
                fifo=queue.fifo,
                stream=feed.stream,
                consumer=mapping.name,
                receive_count=self._receive_count,
                content_based_deduplication=queue.content_based_deduplication,
            )
        #: One event per invocation, handed over as itself, with nothing to filter or refuse (`process`'s shortcut).
        self._plain_single = (
            self._queue is None
            and mapping.batch_size == 1
            and self._shape.unwrap_single
            and self.filter is None
            and not self.selects
            and mapping.reject is None
        )

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until `stop()`; in-flight invocations finish and settle before this returns."""
        await self.scheduler.run(task_status=task_status)

    def stop(self) -> None:
        """Stop pulling; deliveries received but not started go back to the source at once."""
        self.feed.stop()

    async def hand_back(self, messages: list[Message]) -> None:
        """Return events not started to the source, at once. A queue first notes that they were not received, so
        that their next delivery does not count against the redrive policy (a restart must not move messages that
        never ran to the DLQ)."""
        await self.note_hand_back(messages)
        await return_unstarted(messages)

    async def note_hand_back(self, messages: list[Message]) -> None:
        """Before `messages` go back unstarted: a queue notes that they were not received."""
        if self._queue is not None and messages:
            await self._queue.handed_back(messages)

    def pin_changed(self, pinned: bool) -> None:
        """The source says whether this process is the one consuming an exclusive consumer. Having lost it (a
        stall longer than the pin timeout), an ordered mapping hands back what it holds and has not started, so
        that the process now pinned gets those events in order."""
        if not pinned and isinstance(self.scheduler, Keyed):
            self.scheduler.evict()

    # -- processing one batch -------------------------------------------------------------------------------

    async def process_guarded(self, batch: Sequence[Message]) -> list[Verdict]:
        """`process`, but an unexpected error dead-letters what it left unsettled instead of ending the loop.

        Never raises (short of cancellation): no event can stop its mapping, or the service.
        """
        try:
            return await self.process(batch)
        except Exception as exc:
            log.exception("%s: dispatching a batch failed; dead-lettering its unsettled events", self.mapping.function)
            with anyio.CancelScope(shield=True):
                for message in batch:
                    if not message.settled:
                        self._forget(message)
                        if self._queue is not None:
                            message_id = events.request_id_for(message.stream_seq, message.stream)
                            why = f"dispatching failed: {type(exc).__name__}: {exc}"
                            await self._queue.move(message, message_id, self._attempt(message), why)
                        else:
                            await self.dead_letters.poison(message, exc)
            return [None] * len(batch)

    async def process(self, batch: Sequence[Message]) -> list[Verdict]:
        """Filter, invoke and settle one batch; says of each event whether it is settled or held for a retry."""
        if self._queue is not None:
            return await self._process_queue(self._queue, batch)
        if self._plain_single and len(batch) == 1 and not (message := batch[0]).headers and self._attempt(message) == 1:
            # Batch size 1, no filters, a plain publish on its first attempt (what `process` below comes to for it,
            # without its lists): straight to the invocation.
            self.stats.received += 1
            if message.received_at < time.time() - self._keep_every:
                await message.in_progress()
            return [await self._invoke_one(message, None, events.request_id_for(message.stream_seq, message.stream))]
        stats = self.stats
        stats.received += len(batch)
        verdicts: list[Verdict] = [None] * len(batch)
        filter_ = self.filter
        selects = self.selects
        max_age = self.mapping.retry.max_event_age
        ready: list[_Ready] = []
        positions: list[int] = []
        for index, message in enumerate(batch):
            message_id = events.request_id_for(message.stream_seq, message.stream)
            event: events.Event | None = None
            if message.headers:
                # Only a message with headers can be a CloudEvent (or fail to decode as one); a plain publish
                # is normalized only when something needs its attributes (a filter, a dead letter).
                try:
                    event = event_of(message, message_id)
                except EventDecodeError as exc:
                    log.error("%s: %s; dead-lettering", self.mapping.function, exc)
                    error = failure("EventDecodeError", str(exc), message_id)
                    with anyio.CancelScope(shield=True):
                        verdicts[index] = await self._dead_letter(message, message_id, "PoisonMessage", error, None)
                    continue
            if (filter_ is not None or selects) and not _selected(
                _filter_document(message, event or event_of(message, message_id)), selects, filter_
            ):
                stats.filtered += 1
                with anyio.CancelScope(shield=True):
                    await message.ack()
                continue
            if self._attempt(message) > 1 and time.time() - message.timestamp_ns / 1e9 >= max_age:
                # A retry that comes due after the event expired is not run again (Lambda's maximum event age).
                with anyio.CancelScope(shield=True):
                    error = failure("EventAgeExceeded", "event older than max_event_age", message_id)
                    verdicts[index] = await self._dead_letter(message, message_id, "EventAgeExceeded", error, event)
                continue
            ready.append((message, event, message_id))
            positions.append(index)
        if not ready:
            return verdicts
        if self.mapping.reject is not None:
            with anyio.CancelScope(shield=True):
                for index, (message, event, message_id) in zip(positions, ready, strict=True):
                    error = failure(
                        "TooManyRequestsException",
                        "Rate Exceeded. Reason: ReservedFunctionConcurrentInvocationLimitExceeded (concurrency 0)",
                        message_id,
                    )
                    verdicts[index] = await self._dead_letter(message, message_id, self.mapping.reject, error, event)
            return verdicts
        await self._mark_in_progress(ready)
        if self.mapping.batch_size == 1 and self._shape.unwrap_single:
            message, event, message_id = ready[0]
            held = [await self._invoke_one(message, event, message_id)]
        else:
            held = await self._invoke_batch(ready)
        for index, verdict in zip(positions, held, strict=True):
            verdicts[index] = verdict
        return verdicts

    async def _process_queue(self, queue: queues.Redrive, batch: Sequence[Message]) -> list[Verdict]:
        """`process` for a queue (SQS's rules): a message not due yet goes back unreceived, one received more often
        than the redrive policy allows is moved to the DLQ, one no filter matches is deleted. In a FIFO queue, a
        message held back holds the rest of its group in the batch back with it."""
        stats = self.stats
        stats.received += len(batch)
        verdicts: list[Verdict] = [None] * len(batch)
        filter_ = self.filter
        fifo = queue.fifo
        held: set[str] = set()  # FIFO groups held back in this batch
        ready: list[_Ready] = []
        positions: list[int] = []
        for index, message in enumerate(batch):
            message_id = events.request_id_for(message.stream_seq, message.stream)
            # Each message's settling is shielded: a stop between two leaves the rest to be redelivered.
            with anyio.CancelScope(shield=True):
                group = ""
                if fifo:
                    group = message.headers.get(queues.GROUP_HEADER, "") if message.headers else ""
                    if group in held:
                        verdicts[index] = 0.0
                        continue
                    if not group:
                        log.error(
                            "queue %s: message %s has no Message-Group-Id header, which a FIFO queue needs (set it: "
                            "`nats pub -H 'Message-Group-Id: <group>'`, or `eventfn queue send --group`)",
                            queue.name,
                            message_id,
                        )
                        verdict = await queue.move(message, message_id, 0, "no Message-Group-Id")
                        self._held(message, verdict, verdicts, index, held, "")
                        continue
                if (wait := queue.due_in(message)) > 0:
                    verdict = await queue.defer(message, wait)
                    if verdict is not None:
                        verdicts[index] = verdict
                        held.add(group)
                    continue
                receives = self._receive_count(message)
                if queue.max_receive_count and receives > queue.max_receive_count:
                    receives = await queue.confirmed(message, receives)
                if queue.max_receive_count and receives > queue.max_receive_count:
                    # Received as often as allowed, and not deleted: its handler died, or outlived the timeout.
                    verdict = await queue.move(message, message_id, receives - 1, "its last receive never finished")
                    self._held(message, verdict, verdicts, index, held, group)
                    continue
                if filter_ is not None and not filter_.matches(_queue_filter_document(message)):
                    stats.filtered += 1  # SQS deletes a message no filter matches
                    queue.forget(message)
                    await message.ack()
                    continue
                ready.append((message, None, message_id))
                positions.append(index)
        if ready:
            await self._mark_in_progress(ready)
            for index, verdict in zip(positions, await self._invoke_batch(ready), strict=True):
                verdicts[index] = verdict
        stats.dead_lettered = queue.moved
        return verdicts

    def _held(
        self, message: Message, verdict: Verdict, verdicts: list[Verdict], index: int, held: set[str], group: str
    ) -> None:
        """After a move to the DLQ: if the write failed, a FIFO message is held and counted as received once more
        (it is moved when it comes round), and the rest of its group waits."""
        if verdict is None:
            self._forget(message)
            return
        verdicts[index] = verdict
        held.add(group)
        if self._extra_attempts is not None:
            self._extra_attempts[message.stream_seq] = self._extra_attempts.get(message.stream_seq, 0) + 1

    def _receive_count(self, message: Message) -> int:
        assert self._queue is not None
        return self._queue.receive_count(message, self._attempt(message))

    async def _settle_queue(
        self, queue: queues.Redrive, message: Message, message_id: str, outcome: Outcome
    ) -> Verdict:
        """Settle one message of a queue: deleted on success; after a failure visible again once the visibility
        timeout ends, or moved to the DLQ if that was its last receive (the function's retry policy and DLQ do not
        apply: the queue's redrive policy does, as in Lambda)."""
        stats = self.stats
        if outcome.ok:
            stats.processed += 1
            stats.last_result = "OK"
            self._forget(message)
            queue.forget(message)
            await message.ack()
            return None
        receives = self._receive_count(message)
        stats.failed += 1
        stats.last_result = "PROBLEM: Function call failed"
        stats.last_error = outcome.error.type if outcome.error is not None else "?"
        if self._extra_attempts is not None:
            # Held in place, the message is received again without a new delivery: count this receive.
            self._extra_attempts[message.stream_seq] = self._extra_attempts.get(message.stream_seq, 0) + 1
        if queue.max_receive_count and receives >= queue.max_receive_count:
            receives = await queue.confirmed(message, receives)
        moved = queue.moved
        verdict = await queue.failed(message, message_id, receives, stats.last_error)
        if queue.moved == moved:
            stats.retried += 1
        elif verdict is None:
            self._forget(message)
        return verdict

    def _attempt(self, message: Message) -> int:
        """Invocations of `message` so far, this one included: its deliveries, plus retries held in place."""
        extra = self._extra_attempts
        return message.delivered + (extra.get(message.stream_seq, 0) if extra else 0)

    def _forget(self, message: Message) -> None:
        if self._extra_attempts:
            self._extra_attempts.pop(message.stream_seq, None)

    async def _mark_in_progress(self, ready: list[_Ready]) -> None:
        oldest = time.time() - self._keep_every
        for message, _, _ in ready:
            if message.received_at < oldest:
                await message.in_progress()

    async def _invoke_one(self, message: Message, event: events.Event | None, message_id: str) -> Verdict:
        """Invoke the function with one event's own data (`event`: its CloudEvent, None for a plain message)."""
        if event is None:
            # A plain publish: its attributes straight from the message (no `Event` per event).
            request_id, payload = message_id, message.data
            cloud_event = events.plain_attributes(records.original_subject(message), message_id, message.timestamp_ns)
        else:
            request_id = event.id if _looks_like_uuid(event.id) else message_id
            payload, cloud_event = event.data, events.to_attributes(event)
        stats = self.stats
        stats.invocations += 1
        outcome = await self._invoke(
            Invocation(
                request_id=request_id,
                payload=payload,
                cloud_event=cloud_event,
                keepalive=message.in_progress,
                keepalive_every=self._keep_every,
            )
        )
        if outcome.ok and self._queue is None and not self.mapping.destinations.on_success:
            # The common case, settled without a shielded scope (~5 us): the ack only appends to the
            # connection's buffer (`feeds.queue_publish`), and an ack cut short by a cancellation would only
            # mean a redelivery, never a loss.
            stats.processed += 1
            stats.last_result = "OK"
            self._forget(message)
            await message.ack()
            return None
        with anyio.CancelScope(shield=True):
            verdict = await self._settle(message, request_id, outcome, event)
            if outcome.ok and self.mapping.destinations.on_success:
                await self.dead_letters.succeeded(request_id, payload, outcome.payload, self._attempt(message))
        return verdict

    async def _invoke_batch(self, ready: list[_Ready]) -> list[Verdict]:
        payload = self._shape.batch([m for m, _, _ in ready], [mid for _, _, mid in ready], self._source_arn)
        if len(payload) > self.mapping.max_batch_bytes and len(ready) > 1:
            # The size estimate missed (unusual escaping): split rather than pass the cap.
            half = len(ready) // 2
            return [*await self._invoke_batch(ready[:half]), *await self._invoke_batch(ready[half:])]
        request_id = events.new_request_id()
        self.stats.invocations += 1

        async def keepalive() -> None:
            for message, _, _ in ready:
                await message.in_progress()

        outcome = await self._invoke(
            Invocation(
                request_id=request_id,
                payload=payload,
                is_json=True,
                keepalive=keepalive,
                keepalive_every=self._keep_every,
            )
        )
        failed: set[str] | None = set()
        error = outcome
        if not outcome.ok:
            failed = None
        elif self.mapping.report_batch_item_failures:
            failed = records.item_failures(outcome.payload, {mid for _, _, mid in ready})
            if failed is None:
                error = failure(
                    "Runtime.InvalidBatchResponse",
                    'batchItemFailures must be a list of {"itemIdentifier": <messageId of this batch>}',
                    request_id,
                )
        verdicts: list[Verdict] = []
        # An ordered mapping settles no event of a key after that key's first failure in the batch: those go back
        # with it, unattempted, so that nothing of the key overtakes the retry.
        stopped: set[str] = set()
        with anyio.CancelScope(shield=True):
            if failed is not None and not failed and self._queue is None:  # (None: the whole batch failed)
                # Every event succeeded (the common case): acknowledged in a row, without a settle per event.
                stats = self.stats
                stats.processed += len(ready)
                stats.last_result = "OK"
                for message, _, _ in ready:
                    self._forget(message)
                    await message.ack()
                verdicts = [None] * len(ready)
            else:
                for message, event, message_id in ready:
                    key = self._key_of(message) if self._key_of is not None else None
                    if key is not None and key in stopped:
                        verdicts.append(0.0)
                        continue
                    item = error if failed is None else _BATCH_ITEM_FAILURE if message_id in failed else outcome
                    verdict = await self._settle(message, message_id, item, event)
                    if verdict is not None and key is not None:
                        stopped.add(key)
                    verdicts.append(verdict)
            if outcome.ok and self.mapping.destinations.on_success:
                invokes = max(self._attempt(m) for m, _, _ in ready)
                await self.dead_letters.succeeded(request_id, payload, outcome.payload, invokes)
        return verdicts

    async def _settle(self, message: Message, request_id: str, outcome: Outcome, event: events.Event | None) -> Verdict:
        if self._queue is not None:
            return await self._settle_queue(self._queue, message, request_id, outcome)
        stats = self.stats
        if outcome.ok:
            stats.processed += 1
            stats.last_result = "OK"
            self._forget(message)
            await message.ack()
            return None
        attempt = self._attempt(message)
        age = max(0.0, time.time() - message.timestamp_ns / 1e9)
        decision = decide(False, attempt, age, self.mapping.retry)
        stats.failed += 1
        stats.last_result = "PROBLEM: Function call failed"
        stats.last_error = outcome.error.type if outcome.error is not None else "?"
        if isinstance(decision, Retry):
            stats.retried += 1
            log.warning(
                "%s: attempt %d of request %s failed (%s); retrying in %.2f s",
                self.mapping.function,
                attempt,
                request_id,
                stats.last_error,
                decision.delay,
            )
            if self._extra_attempts is not None:
                self._extra_attempts[message.stream_seq] = self._extra_attempts.get(message.stream_seq, 0) + 1
                return decision.delay
            await message.nak(decision.delay)
        elif isinstance(decision, DeadLetter):
            return await self._dead_letter(message, request_id, decision.condition, outcome, event)
        return None

    async def _dead_letter(
        self, message: Message, request_id: str, condition: str, failed: Outcome, event: events.Event | None
    ) -> Verdict:
        """Dead-letter `message`. If the DLQ cannot take it now, an unordered mapping hands it back to its source
        with a delay; an ordered one holds it (and its key) and runs it again after that delay."""
        ordered = self._extra_attempts is not None
        if await self.dead_letters.write(message, request_id, condition, failed, event, hand_back=not ordered):
            self._forget(message)
            self.stats.dead_lettered += 1
            return None
        return self.mapping.dlq_retry_delay if ordered else None


class Runner(Protocol):
    """What runs one mapping (`Dispatcher`, `shard_dispatch.ShardDispatcher`), as the service drives it."""

    feed: Feed
    stats: Stats

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None:
        """Consume until `stop()`; in-flight batches finish and settle before this returns."""

    def stop(self) -> None:
        """Stop pulling; deliveries received but not started go back to the source."""

    def pin_changed(self, pinned: bool) -> None:
        """The source says whether this process now consumes the (exclusive) consumer."""


class Running:
    """A started dispatcher, the mapping it runs, and the event set when it has fully stopped."""

    def __init__(self, dispatcher: Runner, mapping: Mapping) -> None:
        self.dispatcher = dispatcher
        self.mapping = mapping
        self.done = anyio.Event()


def _filter_document(message: Message, event: events.Event) -> dict[str, Any]:
    """What filter patterns match against: the body (JSON where it is JSON) and the message's metadata."""
    return {
        "subject": event.subject or message.subject,
        # decode_body keeps each number's JSON text: Lambda compares numbers as written (300 is not 300.0).
        "body": decode_body(event.data),
        "headers": message.headers or {},
        "attributes": {"type": event.type, "source": event.source, "id": event.id},
    }


def _queue_filter_document(message: Message) -> dict[str, Any]:
    """What filter patterns match against for a queue message: its body (JSON where it is JSON) and its message
    attributes, as in its SQS record."""
    return {
        "body": decode_body(message.data),
        "messageAttributes": {
            name: {"stringValue": value.stringValue, "dataType": value.dataType}
            for name, value in queue_records.attributes(message.headers).items()
        },
    }


def _selected(document: dict[str, Any], selects: tuple[Filter, ...], filter_: Filter | None) -> bool:
    """Whether an event passes its source's filters (all of them) and the mapping's (any pattern)."""
    return all(f.matches(document) for f in selects) and (filter_ is None or filter_.matches(document))


def _looks_like_uuid(value: str) -> bool:
    return len(value) == 36 and value.count("-") == 4
