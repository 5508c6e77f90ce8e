"""The dispatcher: Lambda's event-source-mapping semantics between stored events and invocations.

One `Dispatcher` runs one mapping (a durable consumer feeding one function): it gathers batches (size, window,
payload cap), drops events its filters reject (acknowledged and counted), invokes the function, and settles
every event by the retry policy, honouring partial batch responses.

`decide` is the whole retry policy as one pure function: (outcome, attempt, age, policy) -> ack, retry after a
delay, or dead-letter. A retry is a JetStream `nak` with a delay (the server holds the event; no worker waits);
a dead letter is a confirmed write to the function's DLQ subject followed by the ack of the original, never the
other way round.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import msgspec

from eventfn import decoding, events, subjects
from eventfn.broker.bus import Bus, Delivery, PullFeed
from eventfn.config import Destinations, RetryPolicy
from eventfn.errors import EventDecodeError
from eventfn.filters import Filter, decode_body
from eventfn.invoke.invocation import Invocation, LambdaError, Outcome, failure
from eventfn.sources import records

log = logging.getLogger(__name__)


class Ack(msgspec.Struct, frozen=True):
    """Done: acknowledge."""


class Retry(msgspec.Struct, frozen=True):
    """Deliver again after `delay` seconds."""

    delay: float


class DeadLetter(msgspec.Struct, frozen=True):
    """Give up: write a failure record to the DLQ, then acknowledge. `condition` uses Lambda's names."""

    condition: str


Decision = Ack | Retry | DeadLetter

#: Seconds before an event whose DLQ write failed is delivered again (it stays in the stream meanwhile).
DLQ_RETRY_DELAY = 5.0


def backoff(attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number `attempt` (1-based): exponential, capped, with equal jitter in [d/2, d]."""
    # The exponent is bounded first: 2 ** 1024 does not fit a float, and the cap is reached long before.
    delay = min(policy.max_delay, policy.base_delay * 2.0 ** min(attempt - 1, 64))
    return delay / 2 + rand() * delay / 2


def decide(
    ok: bool, attempt: int, age: float, policy: RetryPolicy, rand: Callable[[], float] = random.random
) -> Decision:
    """What to do after invocation number `attempt` (1-based) of an event `age` seconds old."""
    if ok:
        return Ack()
    if age >= policy.max_event_age:
        return DeadLetter("EventAgeExceeded")
    if attempt > policy.max_attempts:
        return DeadLetter("RetriesExhausted")
    return Retry(backoff(attempt, policy, rand))


Invoker = Callable[[Invocation], Awaitable[Outcome]]


class Mapping(msgspec.Struct, frozen=True, kw_only=True):
    """How one mapping dispatches: its consumer, batching, filters and parallelism."""

    function: str
    consumer: str
    batch_size: int = 1
    batch_window: float = 0.0
    max_batch_bytes: int = 6 * 1024 * 1024
    filter: Filter | None = None
    report_batch_item_failures: bool = True
    #: Batches in flight at once.
    concurrency: int = 1
    #: The consumer's ack wait: a delivery held longer than a third of it is marked in progress before its
    #: invocation starts, so a long batching window or a wait for a free worker never causes a redelivery.
    ack_wait: float = 30.0
    #: Set when the function may not run (concurrency 0): every event is dead-lettered with this condition.
    reject: str | None = None

    @property
    def max_inflight(self) -> int:
        """Deliveries the feed may hold."""
        return feed_credit(self.concurrency, self.batch_size)


def feed_credit(concurrency: int, batch_size: int) -> int:
    """Deliveries a mapping's feed may hold: a batch per slot plus one being gathered, within a memory bound."""
    return min((concurrency + 1) * batch_size, 20_000)


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


class Dispatcher:
    """Runs one mapping: a pull feed on one durable consumer, feeding one function."""

    def __init__(
        self,
        bus: Bus,
        mapping: Mapping,
        feed: PullFeed,
        *,
        invoke: Invoker,
        policy: Callable[[], tuple[RetryPolicy, Destinations]],
    ) -> None:
        self.bus = bus
        self.mapping = mapping
        self.feed = feed
        self._invoke = invoke
        self._policy = policy
        self.stats = Stats()
        self._source_arn = f"arn:eventfn:nats:local:000000000000:consumer/{feed.stream}/{mapping.consumer}"

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until `stop()`; in-flight invocations finish and settle before this returns."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.feed.run)
            if self.mapping.batch_size == 1:
                # One event per invocation: `concurrency` workers each take the next event.
                for _ in range(max(1, self.mapping.concurrency)):
                    tg.start_soon(self._single_worker)
            else:
                # Batches: one gatherer fills them in arrival order (several gatherers would split a trickle
                # into many one-event batches) and starts up to `concurrency` of them at once.
                tg.start_soon(self._gatherer, tg)
            task_status.started()

    def stop(self) -> None:
        """Stop pulling; deliveries received but not started go back to the server at once."""
        self.feed.stop()

    # -- gathering ------------------------------------------------------------------------------------------

    async def _single_worker(self) -> None:
        while True:
            try:
                delivery = await self.feed.receive()
            except anyio.EndOfStream:
                return
            if self.feed.stopping:
                await _hand_back([delivery])
                continue
            await self.process_guarded([delivery])

    async def _gatherer(self, tg: anyio.abc.TaskGroup) -> None:
        slots = anyio.Semaphore(max(1, self.mapping.concurrency))
        carry: Delivery | None = None
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
                await _hand_back([*batch, *([carry] if carry else [])])
                carry = None
                continue
            tg.start_soon(self._process_in_slot, batch, slots)

    async def _process_in_slot(self, batch: list[Delivery], slots: anyio.Semaphore) -> None:
        try:
            await self.process_guarded(batch)
        finally:
            slots.release()

    async def process_guarded(self, batch: list[Delivery]) -> None:
        """`process`, but an unexpected error dead-letters what it left unsettled instead of ending the loop.

        Never raises (short of cancellation): no event can stop its mapping, or the service.
        """
        try:
            await self.process(batch)
        except Exception as exc:
            log.exception("%s: dispatching a batch failed; dead-lettering its unsettled events", self.mapping.function)
            with anyio.CancelScope(shield=True):
                for delivery in batch:
                    if not delivery.settled:
                        await self._dead_letter_poison(delivery, exc)

    async def _dead_letter_poison(self, delivery: Delivery, exc: Exception) -> None:
        """Dead-letter an event that dispatching failed on; if even that fails, hand it back after a delay."""
        try:
            message_id = events.request_id_for(delivery.stream_seq, delivery.stream)
            problem = decoding.encodable(f"{type(exc).__name__}: {exc}")
            error = failure("PoisonMessage", problem, message_id)
            await self._dead_letter(delivery, message_id, "PoisonMessage", error, None)
        except Exception:
            log.exception(
                "%s: dead-lettering event %d failed; it stays queued", self.mapping.function, delivery.stream_seq
            )
            await _nak_quietly(delivery, DLQ_RETRY_DELAY)

    async def _fill(self, batch: list[Delivery]) -> Delivery | None:
        """Add to `batch` until it is full, its window closes or the next event would pass the byte cap;
        returns an event that did not fit (it starts the next batch)."""
        mapping = self.mapping
        size = _record_size(batch[0].data)
        deadline = time.monotonic() + mapping.batch_window
        while len(batch) < mapping.batch_size:
            delivery = await self._next_before(deadline)
            if delivery is None:
                return None
            size += _record_size(delivery.data)
            if size > mapping.max_batch_bytes:
                return delivery
            batch.append(delivery)
        return None

    async def _next_before(self, deadline: float) -> Delivery | None:
        """A delivery that is waiting, or one arriving before `deadline`; None when the window closes."""
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

    # -- invoking and settling ------------------------------------------------------------------------------

    async def process(self, batch: list[Delivery]) -> None:
        """Filter, invoke and settle one batch."""
        stats = self.stats
        stats.received += len(batch)
        filter_ = self.mapping.filter
        ready: list[tuple[Delivery, events.Event | None, str]] = []
        for delivery in batch:
            message_id = events.request_id_for(delivery.stream_seq, delivery.stream)
            event: events.Event | None = None
            if delivery.headers:
                # Only a message with headers can be a CloudEvent (or fail to decode as one); a plain publish
                # is normalized only when something needs its attributes (a filter, a dead letter).
                try:
                    event = _event_of(delivery, message_id)
                except EventDecodeError as exc:
                    log.error("%s: %s; dead-lettering", self.mapping.function, exc)
                    with anyio.CancelScope(shield=True):
                        error = failure("EventDecodeError", str(exc), message_id)
                        await self._dead_letter(delivery, message_id, "PoisonMessage", error, None)
                    continue
            if filter_ is not None and not filter_.matches(
                _filter_document(delivery, event or _event_of(delivery, message_id))
            ):
                stats.filtered += 1
                with anyio.CancelScope(shield=True):
                    await delivery.ack()
                continue
            if delivery.delivered > 1 and time.time() - delivery.timestamp_ns / 1e9 >= self._policy()[0].max_event_age:
                # A retry that comes due after the event expired is not run again (Lambda's maximum event age).
                with anyio.CancelScope(shield=True):
                    error = failure("EventAgeExceeded", "event older than max_event_age", message_id)
                    await self._dead_letter(delivery, message_id, "EventAgeExceeded", error, event)
                continue
            ready.append((delivery, event, message_id))
        if ready and self.mapping.reject is not None:
            with anyio.CancelScope(shield=True):
                for delivery, event, message_id in ready:
                    error = failure(
                        "TooManyRequestsException",
                        "Rate Exceeded. Reason: ReservedFunctionConcurrentInvocationLimitExceeded (concurrency 0)",
                        message_id,
                    )
                    await self._dead_letter(delivery, message_id, self.mapping.reject, error, event)
            return
        if ready:
            await self._mark_in_progress(ready)
            if self.mapping.batch_size == 1:
                delivery, event, message_id = ready[0]
                await self._invoke_one(delivery, event or _event_of(delivery, message_id), message_id)
            else:
                await self._invoke_batch(ready)

    async def _mark_in_progress(self, ready: list[tuple[Delivery, events.Event | None, str]]) -> None:
        oldest = time.time() - self.mapping.ack_wait / 3
        for delivery, _, _ in ready:
            if delivery.received_at < oldest:
                await delivery.in_progress()

    async def _invoke_one(self, delivery: Delivery, event: events.Event, message_id: str) -> None:
        request_id = event.id if _looks_like_uuid(event.id) else message_id
        self.stats.invocations += 1
        invocation = Invocation(
            request_id=request_id,
            payload=event.data,
            cloud_event=events.to_attributes(event),
            wait_for_slot=True,
            keepalive=delivery.in_progress,
            keepalive_every=self.mapping.ack_wait / 3,
        )
        outcome = await self._invoke(invocation)
        with anyio.CancelScope(shield=True):
            await self._settle(delivery, request_id, outcome, event)
            await self._on_success(outcome, request_id, event.data, delivery.delivered)

    async def _invoke_batch(self, ready: list[tuple[Delivery, events.Event | None, str]]) -> None:
        payload = records.batch_payload([records.record_for(d, mid, self._source_arn) for d, _, mid in ready])
        if len(payload) > self.mapping.max_batch_bytes and len(ready) > 1:
            # The size estimate missed (unusual escaping): split rather than pass the cap.
            half = len(ready) // 2
            await self._invoke_batch(ready[:half])
            await self._invoke_batch(ready[half:])
            return
        request_id = str(uuid.uuid4())
        self.stats.invocations += 1

        async def keepalive() -> None:
            for delivery, _, _ in ready:
                await delivery.in_progress()

        invocation = Invocation(
            request_id=request_id,
            payload=payload,
            is_json=True,
            wait_for_slot=True,
            keepalive=keepalive,
            keepalive_every=self.mapping.ack_wait / 3,
        )
        outcome = await self._invoke(invocation)
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
        with anyio.CancelScope(shield=True):
            for delivery, event, message_id in ready:
                item = error if failed is None else _BATCH_ITEM_FAILURE if message_id in failed else outcome
                await self._settle(delivery, message_id, item, event)
            await self._on_success(outcome, request_id, payload, max(d.delivered for d, _, _ in ready))

    async def _settle(self, delivery: Delivery, request_id: str, outcome: Outcome, event: events.Event | None) -> None:
        stats = self.stats
        if outcome.ok:
            stats.processed += 1
            stats.last_result = "OK"
            await delivery.ack()
            return
        age = max(0.0, time.time() - delivery.timestamp_ns / 1e9)
        retry, _ = self._policy()
        decision = decide(outcome.ok, delivery.delivered, age, retry)
        stats.failed += 1
        stats.last_result = "PROBLEM: Function call failed"
        stats.last_error = outcome.error.type if outcome.error is not None else "?"
        if isinstance(decision, Retry):
            stats.retried += 1
            log.warning(
                "%s: attempt %d of request %s failed (%s); retrying in %.2f s",
                self.mapping.function,
                delivery.delivered,
                request_id,
                stats.last_error,
                decision.delay,
            )
            await delivery.nak(decision.delay)
        elif isinstance(decision, DeadLetter):
            await self._dead_letter(delivery, request_id, decision.condition, outcome, event)

    async def _dead_letter(
        self, delivery: Delivery, request_id: str, condition: str, failed: Outcome, event: events.Event | None
    ) -> None:
        """Write the event's failure record to the DLQ and, once that write is durable, acknowledge the event.

        Does not raise for anything the event holds (the record cannot fail to build) or for NATS trouble: if the
        write fails, the event is handed back after a delay and stays in the stream.
        """
        function = self.mapping.function
        cloud_event = None
        if event is not None or not delivery.headers:  # a message with headers decoded as `event` if it could
            cloud_event = events.to_attributes(event or _event_of(delivery, request_id))
        error, cause = failed.payload, failed.error
        record = records.failure_record(
            function, delivery, request_id, condition, error, cloud_event, cause=cause, consumer=self.mapping.consumer
        )
        if len(record) > self.bus.max_payload - 4096:
            # Too big for one NATS message with the event inside: keep the reference to it in the stream.
            record = records.failure_record(
                function,
                delivery,
                request_id,
                condition,
                error[:4096],
                cloud_event,
                cause=cause,
                consumer=self.mapping.consumer,
                truncate=True,
            )
        try:
            # The id makes a repeated write (a crash between the write and the ack) a no-op.
            await self.bus.publish_stored(
                subjects.DLQ_PREFIX + function,
                record,
                headers={
                    # Per mapping: two functions dead-lettering one fanned-out event are two records.
                    "Nats-Msg-Id": f"dlq:{self.mapping.consumer}:{delivery.stream_seq}",
                    "Eventfn-Condition": condition,
                },
            )
        except Exception as exc:
            log.error("%s: DLQ write for request %s failed (%s); the event stays queued", function, request_id, exc)
            await _nak_quietly(delivery, DLQ_RETRY_DELAY)
            return
        self.stats.dead_lettered += 1
        log.error(
            "%s: request %s dead-lettered (%s) after %d attempt(s)", function, request_id, condition, delivery.delivered
        )
        try:
            await delivery.ack()
        except Exception as exc:  # redelivered, it is dead-lettered again: the record's id makes that a no-op
            log.warning("%s: ack of dead-lettered request %s failed: %s", function, request_id, exc)
        _, destinations = self._policy()
        if destinations.on_failure:
            await self._notify(destinations.on_failure, record)

    async def _on_success(self, outcome: Outcome, request_id: str, payload: bytes, invoke_count: int) -> None:
        _, destinations = self._policy()
        if outcome.ok and destinations.on_success:
            record = records.success_record(self.mapping.function, request_id, payload, outcome.payload, invoke_count)
            await self._notify(destinations.on_success, record)

    async def _notify(self, subject: str, record: bytes) -> None:
        try:
            await self.bus.publish(subject, record)
        except Exception as exc:
            log.warning("%s: destination %s not notified: %s", self.mapping.function, subject, exc)


def _event_of(delivery: Delivery, message_id: str) -> events.Event:
    """The delivery as a normalized CloudEvent; raises `EventDecodeError` for a broken structured event."""
    return events.from_nats(
        records.original_subject(delivery),
        delivery.data,
        delivery.headers,
        fallback_id=message_id,
        timestamp=datetime.fromtimestamp(delivery.timestamp_ns / 1e9, UTC),
    )


def _record_size(data: bytes) -> int:
    """About what one event adds to a batch payload: its body as a JSON string (quotes are the escaping JSON
    bodies need most) plus the record's other fields (512 bytes cover them). A batch that still comes out too
    large is split before it is sent."""
    return len(data) + data.count(b'"') + 512


async def _hand_back(deliveries: list[Delivery]) -> None:
    """Return unstarted deliveries untouched: redelivered at once to whoever consumes next."""
    with anyio.CancelScope(shield=True):
        for delivery in deliveries:
            await _nak_quietly(delivery, 0.0)


async def _nak_quietly(delivery: Delivery, delay: float) -> None:
    """Hand an event back for redelivery after `delay`; if even that fails (NATS gone), its ack wait expires and
    JetStream redelivers it anyway, so the failure is only logged."""
    try:
        await delivery.nak(delay)
    except Exception as exc:
        log.warning("event %d not handed back (%s); it is redelivered after its ack wait", delivery.stream_seq, exc)


def _filter_document(delivery: Delivery, event: events.Event) -> dict[str, Any]:
    """What filter patterns match against: the body (JSON where it is JSON) and the message's metadata."""
    return {
        "subject": event.subject or delivery.subject,
        # decode_body keeps each number's JSON text: Lambda compares numbers as written (300 is not 300.0).
        "body": decode_body(event.data),
        "headers": delivery.headers or {},
        "attributes": {"type": event.type, "source": event.source, "id": event.id},
    }


def _looks_like_uuid(value: str) -> bool:
    return len(value) == 36 and value.count("-") == 4
