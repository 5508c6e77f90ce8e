"""The dead-letter queue: list, show, redrive and purge failure records.

Records live in the stream `EVENTFN_DLQ`, one subject per function (`eventfn.dlq.<function>`); a record's id
is its stream sequence. A redrive works like SQS's DLQ redrive: the original event (its bytes and headers)
is published again, through the mapping that failed it (`eventfn.redrive.<consumer>`), carrying its attempt
history; only once that publish is stored is the record deleted. An event that fails again comes back with
the longer history.

Anyone allowed to publish to `eventfn.dlq.>` can store anything there, so records are read as untrusted data:
a record that is not eventfn's is listed as unreadable, never a crash, and a redrive checks every field it
would send before it sends anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from eventfn import decoding, subjects
from eventfn.broker.bus import Bus
from eventfn.broker.specs import StoredRecord
from eventfn.errors import UnreadableData
from eventfn.sources import records

DLQ_STREAM = subjects.DLQ_STREAM
EVENTS_STREAM = subjects.EVENTS_STREAM


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """One line of `eventfn dlq ls`: every text field is one printable line."""

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


class _BatchInfo(msgspec.Struct, frozen=True):
    """A sharded stream's batch given up (`kinesis.batch_info_record`): where its records are, not the records."""

    shardId: str = "?"
    startSequenceNumber: str = "?"
    endSequenceNumber: str = "?"
    streamArn: str = "?"

    def describe(self) -> str:
        stream = self.streamArn.rpartition("/")[2]
        return f"{self.shardId} {self.startSequenceNumber}-{self.endSequenceNumber} of stream {stream}"


class _Record(msgspec.Struct, frozen=True):
    """The parts of a failure record that listing and redriving need; `requestPayload` kept byte for byte. A
    record of a stream batch has `KinesisBatchInfo` instead of the `eventfn` section."""

    timestamp: str
    requestContext: _RequestContext
    eventfn: _Source | None = None
    KinesisBatchInfo: _BatchInfo | None = None
    requestPayload: msgspec.Raw = msgspec.Raw(b"null")
    responsePayload: msgspec.Raw = msgspec.Raw(b"null")


_decoder = msgspec.json.Decoder(_Record)
_text_decoder = msgspec.json.Decoder(str)

#: Characters of an error message `eventfn dlq ls` shows.
SUMMARY_MESSAGE_LIMIT = 200


class RecordNotFound(LookupError):
    """No DLQ record has that id (or it belongs to another function)."""


class MappingGone(LookupError):
    """The mapping that failed the event no longer exists (its trigger was renamed or its function deleted)."""


class OriginalGone(LookupError):
    """A record stored without its payload, whose event the stream no longer holds."""


class UnreadableRecord(ValueError):
    """A record that cannot be redriven: not a failure record eventfn can read, or one whose fields cannot be
    sent. `args` are (record id, what is wrong)."""


def _function_of(record: StoredRecord) -> str:
    return record.subject.removeprefix(subjects.DLQ_PREFIX)


def read_record(data: bytes) -> _Record:
    """A stored failure record; raises `UnreadableData` for anything else."""
    return decoding.typed(_decoder, data)


def summary(stored: StoredRecord) -> Summary:
    """The `eventfn dlq ls` line of one stored record. Never raises: a record eventfn cannot read says so."""
    function = decoding.one_line(_function_of(stored))
    try:
        record = read_record(stored.data)
    except UnreadableData as exc:
        return Summary(
            id=stored.seq,
            function=function,
            timestamp="?",
            condition="?",
            attempts=0,
            error_type="Eventfn.UnreadableRecord",
            error_message=decoding.one_line(
                f"not a failure record eventfn can read: {exc.problem}", SUMMARY_MESSAGE_LIMIT
            ),
            subject="?",
        )
    if bytes(record.responsePayload) == b"null":
        error_type, error_message = "?", ""
    else:
        error_type, error_message = records.error_fields(bytes(record.responsePayload))
    return Summary(
        id=stored.seq,
        function=function,
        timestamp=decoding.one_line(record.timestamp, 64),
        condition=decoding.one_line(record.requestContext.condition, 64),
        attempts=record.requestContext.approximateInvokeCount,
        error_type=decoding.one_line(error_type, 128),
        error_message=decoding.one_line(error_message, SUMMARY_MESSAGE_LIMIT),
        subject=decoding.one_line(
            record.eventfn.subject
            if record.eventfn is not None
            else record.KinesisBatchInfo.describe()
            if record.KinesisBatchInfo is not None
            else "?"
        ),
    )


async def list_records(bus: Bus, function: str | None, *, limit: int = 1000) -> list[Summary]:
    """The DLQ records of `function` (or of every function), oldest first."""
    subject = subjects.DLQ_PREFIX + (function or ">")
    return [summary(r) for r in await bus.read(DLQ_STREAM, subject, limit=limit)]


async def show(bus: Bus, record_id: int) -> bytes:
    """The whole failure record (JSON) with id `record_id` (as stored: it may not be eventfn's, or JSON)."""
    stored = await bus.get(DLQ_STREAM, record_id) if _is_sequence(record_id) else None
    if stored is None or not stored.subject.startswith(subjects.DLQ_PREFIX):
        raise RecordNotFound(record_id)
    return stored.data


def _is_sequence(record_id: int) -> bool:
    """Whether `record_id` can be a stream sequence (JetStream refuses to look up anything else)."""
    return 0 < record_id < 2**64


def original_event(record: _Record) -> bytes:
    """The event's bytes as first published; raises `UnreadableData` if the record's payload cannot be read."""
    if record.eventfn is not None and record.eventfn.data_base64 is not None:
        return decoding.base64_bytes(record.eventfn.data_base64)
    payload = bytes(record.requestPayload)
    if payload == b"null":
        return b""
    if payload.startswith(b'"'):
        # A text payload was stored as a JSON string; JSON was stored as itself, byte for byte.
        return decoding.typed(_text_decoder, payload).encode()
    return payload


class Redrive(msgspec.Struct, frozen=True, kw_only=True):
    """What redriving one record publishes, checked before anything is sent."""

    record_id: int
    consumer: str
    data: bytes
    headers: dict[str, str]
    #: Set when the record holds no payload: the event is read back from this stream at this sequence.
    original: tuple[str, int] | None = None


def plan_redrive(stored: StoredRecord, function: str) -> Redrive:
    """What redriving `stored` would publish; raises `UnreadableRecord` (and nothing else) for a record that is
    not eventfn's or whose fields cannot be used as they are: a mapping that is not `function`'s (a forged record
    must not send an event to another function), a reference to a stream other than the events stream (nor read
    one out of it), a subject or header that would break the NATS protocol."""

    def refuse(problem: str) -> UnreadableRecord:
        return UnreadableRecord(stored.seq, problem)

    try:
        record = read_record(stored.data)
    except UnreadableData as exc:
        raise refuse(f"not a failure record eventfn can read: {exc.problem}") from exc
    source = record.eventfn
    if source is None:
        if record.KinesisBatchInfo is not None:
            raise refuse(
                f"it holds the metadata of a failed stream batch ({record.KinesisBatchInfo.describe()}), not events: "
                "its records stay in the stream until its retention ends; put them again to process them again"
            )
        raise refuse("not a failure record eventfn can read: it has no eventfn section")
    try:
        data = b"" if source.truncated else original_event(record)
    except UnreadableData as exc:
        raise refuse(f"not a failure record eventfn can read: {exc.problem}") from exc
    consumer = source.consumer or f"{function}--async"
    if not _is_name(consumer):
        raise refuse(f"its mapping {consumer!r} is not a consumer name")
    if not consumer.startswith(f"{function}--"):
        raise refuse(f"its mapping {consumer!r} is not one of {function}'s")
    if not _is_token(source.subject):
        raise refuse(f"its subject {source.subject!r} is not a NATS subject")
    original = None
    if source.truncated:
        if source.stream != EVENTS_STREAM or source.stream_seq < 1:
            raise refuse(f"it points at {source.stream!r} sequence {source.stream_seq}, which is not an event")
        original = (source.stream, source.stream_seq)
    headers = _headers(source.headers or {}, refuse)
    headers[records.SUBJECT_HEADER] = source.subject
    headers[records.HISTORY_HEADER] = records.encode_history(source.history or [])
    # Redriving the same record twice inside the dedupe window stores it once.
    headers["Nats-Msg-Id"] = f"redrive:{stored.seq}"
    return Redrive(record_id=stored.seq, consumer=consumer, data=data, headers=headers, original=original)


def _headers(original: Mapping[str, str], refuse: Callable[[str], UnreadableRecord]) -> dict[str, str]:
    """The event's own headers (not NATS's or eventfn's), each checked to be sendable."""
    out = {}
    for key, value in original.items():
        if key.startswith(records.SYSTEM_HEADER_PREFIXES):
            continue
        if not _is_token(key) or ":" in key:
            raise refuse(f"its header name {key!r} cannot be sent")
        if "\r" in value or "\n" in value:
            raise refuse(f"its header {key} holds a line break")
        out[key] = value
    return out


def _is_name(value: str) -> bool:
    """A consumer name eventfn creates: letters, digits, `_` and `-`."""
    return 0 < len(value) <= 255 and value.isascii() and value.replace("_", "a").replace("-", "a").isalnum()


def _is_token(value: str) -> bool:
    """A subject or header name: printable, no whitespace (the NATS protocol splits on it)."""
    return bool(value) and value.isprintable() and " " not in value


async def redrive(bus: Bus, function: str, ids: list[int] | None = None) -> list[tuple[int, int]]:
    """Re-inject `function`'s records (all, or those in `ids`); returns (record id, new event sequence) pairs.

    Every record is checked first: one that cannot be redriven raises `UnreadableRecord` before any is sent.
    """
    if ids:
        stored_records = []
        for record_id in ids:
            stored = await bus.get(DLQ_STREAM, record_id) if _is_sequence(record_id) else None
            if stored is None or _function_of(stored) != function:
                raise RecordNotFound(record_id)
            stored_records.append(stored)
    else:
        stored_records = await bus.read(DLQ_STREAM, subjects.DLQ_PREFIX + function, limit=100_000)
    plans = [plan_redrive(stored, function) for stored in stored_records]
    done: list[tuple[int, int]] = []
    for plan in plans:
        if not await bus.consumer_exists(EVENTS_STREAM, plan.consumer):
            raise MappingGone(plan.record_id, plan.consumer)
        data, headers = plan.data, plan.headers
        if plan.original is not None:
            original = await bus.get(*plan.original)
            if original is None:
                raise OriginalGone(plan.record_id, *plan.original)
            own = {
                k: v for k, v in (original.headers or {}).items() if not k.startswith(records.SYSTEM_HEADER_PREFIXES)
            }
            data, headers = original.data, {**own, **headers}
        seq = await bus.publish_stored(subjects.REDRIVE_PREFIX + plan.consumer, data, headers)
        await bus.delete(DLQ_STREAM, plan.record_id)
        done.append((plan.record_id, seq))
    return done


async def purge(bus: Bus, function: str) -> int:
    """Delete every DLQ record of `function`; returns how many there were."""
    return await bus.purge(DLQ_STREAM, subjects.DLQ_PREFIX + function)
