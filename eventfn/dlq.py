"""The dead-letter queue: list, show, redrive and purge failure records.

Records live in the stream `EVENTFN_DLQ`, one subject per function (`eventfn.dlq.<function>`); a record's id
is its stream sequence. A redrive works like SQS's DLQ redrive: the original event (its bytes and headers)
is published again, through the mapping that failed it (`eventfn.redrive.<consumer>`), carrying its attempt
history; only once that publish is stored is the record deleted. An event that fails again comes back with
the longer history.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from eventfn import records, subjects
from eventfn.bus import Bus, StoredRecord

DLQ_STREAM = subjects.DLQ_STREAM
EVENTS_STREAM = subjects.EVENTS_STREAM


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """One line of `eventfn dlq ls`."""

    id: int
    function: str
    timestamp: str
    condition: str
    attempts: int
    error_type: str
    error_message: str
    subject: str


class _Source(msgspec.Struct, frozen=True):
    subject: str
    stream: str
    stream_seq: int
    consumer: str | None = None
    truncated: bool = False
    data_base64: str | None = None
    headers: dict[str, str] | None = None
    history: list[records.Attempt] | None = None


class _RequestContext(msgspec.Struct, frozen=True):
    condition: str
    approximateInvokeCount: int


class _Record(msgspec.Struct, frozen=True):
    """The parts of a failure record that listing and redriving need; `requestPayload` kept byte for byte."""

    timestamp: str
    requestContext: _RequestContext
    eventfn: _Source
    requestPayload: msgspec.Raw = msgspec.Raw(b"null")
    responsePayload: msgspec.Raw = msgspec.Raw(b"null")


_decoder = msgspec.json.Decoder(_Record)


class RecordNotFound(LookupError):
    """No DLQ record has that id (or it belongs to another function)."""


class MappingGone(LookupError):
    """The mapping that failed the event no longer exists (its trigger was renamed or its function deleted)."""


class OriginalGone(LookupError):
    """A record stored without its payload, whose event the stream no longer holds."""


def _function_of(record: StoredRecord) -> str:
    return record.subject.removeprefix(subjects.DLQ_PREFIX)


def _summary(stored: StoredRecord) -> Summary:
    record = _decoder.decode(stored.data)
    error: Any = msgspec.json.decode(record.responsePayload) if record.responsePayload else None
    error = error if isinstance(error, dict) else {}
    return Summary(
        id=stored.seq,
        function=_function_of(stored),
        timestamp=record.timestamp,
        condition=record.requestContext.condition,
        attempts=record.requestContext.approximateInvokeCount,
        error_type=str(error.get("errorType", "?")),
        error_message=str(error.get("errorMessage", ""))[:200],
        subject=record.eventfn.subject,
    )


async def list_records(bus: Bus, function: str | None, *, limit: int = 1000) -> list[Summary]:
    """The DLQ records of `function` (or of every function), oldest first."""
    subject = subjects.DLQ_PREFIX + (function or ">")
    return [_summary(r) for r in await bus.read(DLQ_STREAM, subject, limit=limit)]


async def show(bus: Bus, record_id: int) -> bytes:
    """The whole failure record (JSON) with id `record_id`."""
    stored = await bus.get(DLQ_STREAM, record_id)
    if stored is None or not stored.subject.startswith(subjects.DLQ_PREFIX):
        raise RecordNotFound(record_id)
    return stored.data


def original_event(record: _Record) -> bytes:
    """The event's bytes as first published."""
    if record.eventfn.data_base64 is not None:
        return base64.b64decode(record.eventfn.data_base64)
    payload = bytes(record.requestPayload)
    if payload == b"null":
        return b""
    value = msgspec.json.decode(payload)
    # A text payload was stored as a JSON string; JSON was stored as itself, byte for byte.
    return value.encode() if isinstance(value, str) else payload


async def redrive(bus: Bus, function: str, ids: list[int] | None = None) -> list[tuple[int, int]]:
    """Re-inject `function`'s records (all, or those in `ids`); returns (record id, new event sequence) pairs."""
    if ids:
        stored_records = []
        for record_id in ids:
            stored = await bus.get(DLQ_STREAM, record_id)
            if stored is None or _function_of(stored) != function:
                raise RecordNotFound(record_id)
            stored_records.append(stored)
    else:
        stored_records = await bus.read(DLQ_STREAM, subjects.DLQ_PREFIX + function, limit=100_000)
    done: list[tuple[int, int]] = []
    for stored in stored_records:
        record = _decoder.decode(stored.data)
        source = record.eventfn
        target = subjects.REDRIVE_PREFIX + (source.consumer or f"{function}--async")
        if not await bus.consumer_exists(EVENTS_STREAM, target.removeprefix(subjects.REDRIVE_PREFIX)):
            raise MappingGone(stored.seq, target.removeprefix(subjects.REDRIVE_PREFIX))
        original_headers = source.headers or {}
        data = original_event(record)
        if source.truncated:
            original = await bus.get(source.stream, source.stream_seq)
            if original is None:
                raise OriginalGone(stored.seq, source.stream, source.stream_seq)
            data, original_headers = original.data, original.headers or {}
        headers = {k: v for k, v in original_headers.items() if not k.startswith(("Nats-", "Eventfn-"))}
        headers[records.SUBJECT_HEADER] = source.subject
        headers[records.HISTORY_HEADER] = records.encode_history(source.history or [])
        # Redriving the same record twice inside the dedupe window stores it once.
        headers["Nats-Msg-Id"] = f"redrive:{stored.seq}"
        seq = await bus.publish_stored(target, data, headers)
        await bus.delete(DLQ_STREAM, stored.seq)
        done.append((stored.seq, seq))
    return done


async def purge(bus: Bus, function: str) -> int:
    """Delete every DLQ record of `function`; returns how many there were."""
    return await bus.purge(DLQ_STREAM, subjects.DLQ_PREFIX + function)
