"""Dead letters and destinations: an event that failed for good is written to its function's DLQ, and only once
that write is stored is the event acknowledged, never the other way round. Destination records (on success, on
failure) follow Lambda's asynchronous-invocation record format."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Protocol

from eventfn import decoding, events, subjects
from eventfn.config import Destinations, RecoverySettings
from eventfn.invoke.invocation import Outcome, failure
from eventfn.sources import records
from eventfn.sources.source import Message

log = logging.getLogger(__name__)

#: Seconds before an event whose DLQ write failed is delivered again (it stays in its stream meanwhile);
#: `[recovery] dlq_retry_delay`.
DLQ_RETRY_DELAY = RecoverySettings().dlq_retry_delay


class Sink(Protocol):
    """Where records go (`Bus` is one; tests may use an in-memory one)."""

    @property
    def max_payload(self) -> int: ...

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None: ...

    async def publish_stored(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> object: ...


class DeadLetters:
    """Writes one mapping's failure records (DLQ and on-failure destination) and success records."""

    def __init__(
        self,
        sink: Sink,
        function: str,
        consumer: str,
        destinations: Destinations,
        *,
        retry_delay: float = DLQ_RETRY_DELAY,
    ) -> None:
        self.sink = sink
        #: Seconds before an event whose DLQ write failed comes again.
        self.retry_delay = retry_delay
        self.function = function
        self.consumer = consumer
        self.destinations = destinations
        #: Events dead-lettered by this mapping in this process.
        self.count = 0

    async def write(
        self,
        message: Message,
        request_id: str,
        condition: str,
        failed: Outcome,
        event: events.Event | None,
        *,
        hand_back: bool = True,
    ) -> bool:
        """Write the event's failure record to the DLQ and, once that write is durable, acknowledge the event.

        Does not raise for anything the event holds (the record cannot fail to build) or for NATS trouble: if
        the write fails it returns False, and with `hand_back` the event goes back to its source after a delay.
        """
        function = self.function
        cloud_event = None
        if event is not None or not message.headers:  # a message with headers decoded as `event` if it could
            cloud_event = events.to_attributes(event or event_of(message, request_id))
        error, cause = failed.payload, failed.error
        record = records.failure_record(
            function, message, request_id, condition, error, cloud_event, cause=cause, consumer=self.consumer
        )
        if len(record) > self.sink.max_payload - 4096:
            # Too big for one NATS message with the event inside: keep the reference to it in the stream.
            record = records.failure_record(
                function, message, request_id, condition, error[:4096], cloud_event, cause=cause,
                consumer=self.consumer, truncate=True,
            )  # fmt: skip
        try:
            # The id makes a repeated write (a crash between the write and the ack) a no-op.
            await self.sink.publish_stored(
                subjects.DLQ_PREFIX + function,
                record,
                headers={
                    # Per mapping: two functions dead-lettering one fanned-out event are two records.
                    "Nats-Msg-Id": f"dlq:{self.consumer}:{message.stream_seq}",
                    "Eventfn-Condition": condition,
                },
            )
        except Exception as exc:
            log.error("%s: DLQ write for request %s failed (%s); the event stays queued", function, request_id, exc)
            if hand_back:
                await nak_quietly(message, self.retry_delay)
            return False
        self.count += 1
        log.error(
            "%s: request %s dead-lettered (%s) after %d attempt(s)", function, request_id, condition, message.delivered
        )
        try:
            await message.ack()
        except Exception as exc:  # redelivered, it is dead-lettered again: the record's id makes that a no-op
            log.warning("%s: ack of dead-lettered request %s failed: %s", function, request_id, exc)
        if self.destinations.on_failure:
            await self._notify(self.destinations.on_failure, record)
        return True

    async def poison(self, message: Message, exc: Exception) -> None:
        """Dead-letter an event that dispatching failed on; if even that fails, hand it back after a delay."""
        try:
            message_id = events.request_id_for(message.stream_seq, message.stream)
            problem = decoding.encodable(f"{type(exc).__name__}: {exc}")
            await self.write(message, message_id, "PoisonMessage", failure("PoisonMessage", problem, message_id), None)
        except Exception:
            log.exception("%s: dead-lettering event %d failed; it stays queued", self.function, message.stream_seq)
            await nak_quietly(message, self.retry_delay)

    async def succeeded(self, request_id: str, payload: bytes, result: bytes, invoke_count: int) -> None:
        """Send the on-success destination record, if the function has one."""
        if self.destinations.on_success:
            record = records.success_record(self.function, request_id, payload, result, invoke_count)
            await self._notify(self.destinations.on_success, record)

    async def _notify(self, subject: str, record: bytes) -> None:
        try:
            await self.sink.publish(subject, record)
        except Exception as exc:
            log.warning("%s: destination %s not notified: %s", self.function, subject, exc)


def event_of(message: Message, message_id: str) -> events.Event:
    """The message as a normalized CloudEvent; raises `EventDecodeError` for a broken structured event."""
    return events.from_nats(
        records.original_subject(message),
        message.data,
        message.headers,
        fallback_id=message_id,
        timestamp=datetime.fromtimestamp(message.timestamp_ns / 1e9, UTC),
    )


async def nak_quietly(message: Message, delay: float) -> None:
    """Hand an event back for redelivery after `delay`; if even that fails (NATS gone), its ack wait expires and
    it is redelivered anyway, so the failure is only logged."""
    try:
        await message.nak(delay)
    except Exception as exc:
        log.warning("event %d not handed back (%s); it is redelivered after its ack wait", message.stream_seq, exc)
