"""The dispatcher: from stored events to invocations, and from outcomes to acks, retries and dead letters.

`decide` is the whole retry policy as one pure function: (outcome, attempt, age, policy) -> ack, retry after
a delay, or dead-letter. `Dispatcher` applies it: a retry is a JetStream `nak` with a delay (the server holds
the message; no worker waits), a dead letter is a durable write to the function's DLQ subject followed by
the ack of the original, never the other way round.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec

from eventfn import events, subjects
from eventfn.bus import Bus, Delivery, PullFeed
from eventfn.config import RetryPolicy
from eventfn.errors import EventDecodeError
from eventfn.workers import Outcome, error_payload, error_type_of

log = logging.getLogger(__name__)

ARN_PREFIX = "arn:aws:lambda:local:000000000000:function:"


class Ack(msgspec.Struct, frozen=True):
    """Done: acknowledge."""


class Retry(msgspec.Struct, frozen=True):
    """Deliver again after `delay` seconds."""

    delay: float


class DeadLetter(msgspec.Struct, frozen=True):
    """Give up: write a failure record to the DLQ, then acknowledge. `condition` uses Lambda's names."""

    condition: str


Decision = Ack | Retry | DeadLetter


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


class _RequestContext(msgspec.Struct, frozen=True):
    requestId: str
    functionArn: str
    condition: str
    approximateInvokeCount: int


class _ResponseContext(msgspec.Struct, frozen=True):
    statusCode: int = 200
    executedVersion: str = "$LATEST"
    functionError: str = "Unhandled"


class _Source(msgspec.Struct, frozen=True, omit_defaults=True):
    """What eventfn adds to Lambda's record so the event can be redriven byte for byte."""

    subject: str
    stream: str
    stream_seq: int
    data_base64: str | None = None
    headers: dict[str, str] | None = None
    cloud_event: dict[str, str] | None = None


class FailureRecord(msgspec.Struct, frozen=True):
    """Lambda's asynchronous-invocation destination record, as written to the DLQ."""

    version: str
    timestamp: str
    requestContext: _RequestContext
    requestPayload: Any
    responseContext: _ResponseContext
    responsePayload: Any
    eventfn: _Source


_record_encoder = msgspec.json.Encoder()


def _json_or_text(data: bytes) -> Any:
    """The payload as Lambda puts it in a record: JSON as JSON, else text, else None (binary)."""
    if not data:
        return None
    try:
        msgspec.json.decode(data)
        return msgspec.Raw(data)
    except msgspec.DecodeError:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None


def failure_record(
    function: str, delivery: Delivery, request_id: str, condition: str, error: bytes, cloud_event: dict[str, str] | None
) -> bytes:
    """Encode the DLQ record for `delivery`."""
    payload = _json_or_text(delivery.data)
    return _record_encoder.encode(
        FailureRecord(
            version="1.0",
            timestamp=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            requestContext=_RequestContext(
                requestId=request_id,
                functionArn=ARN_PREFIX + function,
                condition=condition,
                approximateInvokeCount=delivery.delivered,
            ),
            requestPayload=payload,
            responseContext=_ResponseContext(),
            responsePayload=_json_or_text(error),
            eventfn=_Source(
                subject=delivery.subject,
                stream=delivery.stream,
                stream_seq=delivery.stream_seq,
                data_base64=base64.b64encode(delivery.data).decode() if payload is None and delivery.data else None,
                headers=dict(delivery.headers) if delivery.headers else None,
                cloud_event=cloud_event,
            ),
        )
    )


Invoker = Callable[[str, bytes, dict[str, str] | None], Awaitable[Outcome]]


class Dispatcher:
    """Runs one mapping: a pull feed on one durable consumer, feeding one function."""

    def __init__(
        self,
        bus: Bus,
        function: str,
        consumer: str,
        feed: PullFeed,
        *,
        invoke: Invoker,
        retry: Callable[[], RetryPolicy],
        concurrency: int,
    ) -> None:
        self.bus = bus
        self.function = function
        self.consumer = consumer
        self.feed = feed
        self._invoke = invoke
        self._retry = retry
        self.concurrency = max(1, concurrency)
        self.processed = 0
        self.failed = 0
        self.dead_lettered = 0

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until `stop()`; in-flight invocations finish and settle before this returns."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.feed.run)
            for _ in range(self.concurrency):
                tg.start_soon(self._consume)
            task_status.started()

    def stop(self) -> None:
        """Stop pulling; messages received but not started go back to the server at once."""
        self.feed.stop()

    async def _consume(self) -> None:
        async for delivery in self.feed:
            if self.feed._stopping:
                # Handed back untouched: redelivered at once to whoever consumes next (a restart, a reload).
                with anyio.CancelScope(shield=True):
                    await delivery.nak()
                continue
            await self.handle(delivery)

    async def handle(self, delivery: Delivery) -> None:
        """Invoke the function for one delivery and settle it per the retry policy."""
        received = time.monotonic()
        fallback_id = events.request_id_for(delivery.stream_seq, delivery.stream)
        cloud_event: dict[str, str] | None = None
        try:
            event = events.from_nats(
                delivery.subject,
                delivery.data,
                delivery.headers,
                fallback_id=fallback_id,
                timestamp=datetime.fromtimestamp(delivery.timestamp_ns / 1e9, UTC),
            )
        except EventDecodeError as exc:
            log.error("%s: %s; dead-lettering", self.function, exc)
            with anyio.CancelScope(shield=True):
                await self._dead_letter(
                    delivery,
                    fallback_id,
                    "PoisonMessage",
                    error_payload("EventDecodeError", str(exc), fallback_id),
                    None,
                )
            return
        cloud_event = events.to_attributes(event)
        request_id = event.id if _looks_like_uuid(event.id) else fallback_id
        outcome = await self._invoke(request_id, event.data, cloud_event)
        with anyio.CancelScope(shield=True):
            await self.settle(delivery, request_id, outcome, cloud_event, received)

    async def settle(
        self, delivery: Delivery, request_id: str, outcome: Outcome, cloud_event: dict[str, str] | None, received: float
    ) -> None:
        """Apply the retry policy's decision for `outcome` to `delivery`."""
        age = max(0.0, time.time() - delivery.timestamp_ns / 1e9)
        decision = decide(outcome.ok, delivery.delivered, age, self._retry())
        if isinstance(decision, Ack):
            self.processed += 1
            await delivery.ack()
        elif isinstance(decision, Retry):
            self.failed += 1
            log.warning(
                "%s: attempt %d of request %s failed (%s); retrying in %.2f s",
                self.function,
                delivery.delivered,
                request_id,
                error_type_of(outcome.payload),
                decision.delay,
            )
            await delivery.nak(decision.delay)
        else:
            self.failed += 1
            await self._dead_letter(delivery, request_id, decision.condition, outcome.payload, cloud_event)

    async def _dead_letter(
        self, delivery: Delivery, request_id: str, condition: str, error: bytes, cloud_event: dict[str, str] | None
    ) -> None:
        record = failure_record(self.function, delivery, request_id, condition, error, cloud_event)
        try:
            # The id makes a repeated write (a crash between the write and the ack) a no-op.
            await self.bus.publish_stored(
                subjects.DLQ_PREFIX + self.function,
                record,
                headers={"Nats-Msg-Id": f"dlq:{delivery.stream}:{delivery.stream_seq}", "Eventfn-Condition": condition},
            )
        except Exception as exc:
            log.error(
                "%s: DLQ write for request %s failed (%s); the event stays queued", self.function, request_id, exc
            )
            await delivery.nak(5.0)
            return
        self.dead_lettered += 1
        log.error(
            "%s: request %s dead-lettered (%s) after %d attempt(s)",
            self.function,
            request_id,
            condition,
            delivery.delivered,
        )
        await delivery.ack()


def _looks_like_uuid(value: str) -> bool:
    return len(value) == 36 and value.count("-") == 4
