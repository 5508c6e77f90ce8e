"""The JSON shapes the dispatcher writes and reads, in Lambda's formats.

- `batch_payload`: the event a handler gets for a batch from a plain subject, `{"Records": [...]}`, each record
  shaped like an SQS record (so SQS handler code runs unchanged) plus the NATS `subject`;
- `item_failures`: Lambda's partial batch response, `{"batchItemFailures": [{"itemIdentifier": id}]}`;
- `failure_record` / `success_record`: Lambda's asynchronous-invocation destination records, which are also
  what the dead-letter stream holds, with an `eventfn` section that makes the event redrivable byte for byte.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

ARN_PREFIX = "arn:aws:lambda:local:000000000000:function:"
#: How many earlier failures a record carries in its attempt history (the newest are kept).
HISTORY_LIMIT = 10
#: Header a redriven event carries its attempt history in (JSON list of `Attempt`).
HISTORY_HEADER = "Eventfn-History"
#: Header holding the subject an event was first published to (a redrive republishes it elsewhere).
SUBJECT_HEADER = "Eventfn-Subject"


class StoredMessage(Protocol):
    """What a record needs of a delivered message (`bus.Delivery` has it)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    stream: str
    stream_seq: int
    delivered: int
    timestamp_ns: int


# -- batches ---------------------------------------------------------------------------------------------------


class _Attributes(msgspec.Struct, frozen=True):
    ApproximateReceiveCount: str
    SentTimestamp: str
    SequenceNumber: str


class MessageAttribute(msgspec.Struct, frozen=True):
    """An SQS message attribute: each header of the message becomes one, as a String."""

    stringValue: str
    stringListValues: tuple[str, ...] = ()
    binaryListValues: tuple[str, ...] = ()
    dataType: str = "String"


class Record(msgspec.Struct, frozen=True, omit_defaults=True):
    """One event in a batch, shaped like an SQS record; `body` is the event's data as text."""

    messageId: str
    body: str
    attributes: _Attributes
    subject: str
    messageAttributes: dict[str, MessageAttribute]
    eventSource: str
    eventSourceARN: str
    #: Set (and only then present) when `body` holds base64 because the data was not UTF-8 text.
    bodyEncoding: str | None = None


class Batch(msgspec.Struct, frozen=True):
    Records: list[Record]


_batch_encoder = msgspec.json.Encoder()


def original_subject(message: StoredMessage) -> str:
    """The subject the event was first published to (a redriven event keeps it in a header)."""
    if message.headers and (subject := message.headers.get(SUBJECT_HEADER)):
        return subject
    return message.subject


def record_for(message: StoredMessage, message_id: str, source_arn: str) -> Record:
    """The batch record of one stored message."""
    try:
        body, encoding = message.data.decode("utf-8"), None
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(message.data).decode("ascii"), "base64"
    headers = message.headers
    attributes = (
        {k: MessageAttribute(v) for k, v in headers.items() if not k.startswith(("Nats-", "Eventfn-"))}
        if headers
        else {}
    )
    return Record(
        messageId=message_id,
        body=body,
        attributes=_Attributes(
            ApproximateReceiveCount=str(message.delivered),
            SentTimestamp=str(message.timestamp_ns // 1_000_000),
            SequenceNumber=str(message.stream_seq),
        ),
        subject=original_subject(message),
        messageAttributes=attributes,
        eventSource="eventfn:nats",
        eventSourceARN=source_arn,
        bodyEncoding=encoding,
    )


def batch_payload(records: Sequence[Record]) -> bytes:
    """The handler's event for a batch."""
    return _batch_encoder.encode(Batch(Records=list(records)))


# -- partial batch responses ------------------------------------------------------------------------------------


def item_failures(response: bytes, ids: set[str]) -> set[str] | None:
    """Which items of a batch failed, per Lambda's ReportBatchItemFailures rules; None: the whole batch failed.

    Full success: a null or empty response, a response without `batchItemFailures`, or an empty or null list.
    Full failure: invalid JSON, or a `batchItemFailures` that is not a list of objects each with a non-empty
    `itemIdentifier` naming an item of this batch.
    """
    if not response.strip():
        return set()
    try:
        value = msgspec.json.decode(response)
    except msgspec.DecodeError:
        return None  # invalid JSON fails the whole batch (Lambda's rule; eventfn's runtime always sends JSON)
    if not isinstance(value, dict) or value.get("batchItemFailures") is None:
        return set()
    failures = value["batchItemFailures"]
    if not isinstance(failures, list):
        return None
    failed: set[str] = set()
    for item in failures:
        identifier = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not isinstance(identifier, str) or not identifier or identifier not in ids:
            return None
        failed.add(identifier)
    return failed


# -- destination and dead-letter records -------------------------------------------------------------------------


class _RequestContext(msgspec.Struct, frozen=True):
    requestId: str
    functionArn: str
    condition: str
    approximateInvokeCount: int


class _ResponseContext(msgspec.Struct, frozen=True, omit_defaults=True):
    statusCode: int
    executedVersion: str
    #: Absent on success, as in Lambda's on-success record.
    functionError: str | None = None


class Attempt(msgspec.Struct, frozen=True):
    """One earlier failure of an event, kept across redrives."""

    timestamp: str
    condition: str
    approximateInvokeCount: int
    errorType: str
    errorMessage: str


class _Source(msgspec.Struct, frozen=True, omit_defaults=True):
    """What eventfn adds to Lambda's record so the event can be redriven byte for byte."""

    subject: str
    stream: str
    stream_seq: int
    data_base64: str | None = None
    headers: dict[str, str] | None = None
    cloud_event: dict[str, str] | None = None
    #: The mapping (durable consumer) that delivered the event: a redrive goes back through it.
    consumer: str | None = None
    #: Earlier failures (from redrives), oldest first, this one last.
    history: list[Attempt] | None = None
    #: The payload and headers were left out to fit NATS's message size; a redrive reads the event back from
    #: `stream` at `stream_seq` (while the stream still holds it).
    truncated: bool = False


class DestinationRecord(msgspec.Struct, frozen=True):
    """Lambda's asynchronous-invocation destination record."""

    version: str
    timestamp: str
    requestContext: _RequestContext
    requestPayload: Any
    responseContext: _ResponseContext
    responsePayload: Any
    eventfn: _Source | None = None


_record_encoder = msgspec.json.Encoder()
_history_decoder = msgspec.json.Decoder(list[Attempt])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_or_text(data: bytes) -> Any:
    """A payload as Lambda puts it in a record: JSON as JSON, else text, else None (binary)."""
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


def error_fields(error: bytes) -> tuple[str, str]:
    """`errorType` and `errorMessage` (first 1 KB) of a Lambda error object; `?` where it has none."""
    try:
        value = msgspec.json.decode(error)
    except msgspec.DecodeError:
        return "?", error.decode(errors="replace")[:1024]
    if not isinstance(value, dict):
        return "?", str(value)[:1024]
    return str(value.get("errorType", "?")), str(value.get("errorMessage", ""))[:1024]


def history_of(headers: Mapping[str, str] | None) -> list[Attempt]:
    """The attempt history a redriven event carries, or an empty list."""
    if not headers or not (raw := headers.get(HISTORY_HEADER)):
        return []
    try:
        return _history_decoder.decode(raw)
    except msgspec.DecodeError:
        return []


def encode_history(history: Sequence[Attempt]) -> str:
    """The header value for `history` (newest `HISTORY_LIMIT` entries)."""
    return _record_encoder.encode(list(history[-HISTORY_LIMIT:])).decode()


def failure_record(
    function: str,
    message: StoredMessage,
    request_id: str,
    condition: str,
    error: bytes,
    cloud_event: dict[str, str] | None,
    *,
    consumer: str | None = None,
    truncate: bool = False,
) -> bytes:
    """The dead-letter (and on-failure destination) record for one event (without its payload if `truncate`)."""
    payload = None if truncate else _json_or_text(message.data)
    timestamp = _now()
    history = None
    if consumer is not None:
        error_type, error_message = error_fields(error)
        history = [
            *history_of(message.headers),
            Attempt(timestamp, condition, message.delivered, error_type, error_message),
        ][-HISTORY_LIMIT:]
    return _record_encoder.encode(
        DestinationRecord(
            version="1.0",
            timestamp=timestamp,
            requestContext=_RequestContext(
                requestId=request_id,
                functionArn=ARN_PREFIX + function,
                condition=condition,
                approximateInvokeCount=message.delivered,
            ),
            requestPayload=payload,
            responseContext=_ResponseContext(statusCode=200, executedVersion="$LATEST", functionError="Unhandled"),
            responsePayload=_json_or_text(error),
            eventfn=_Source(
                subject=original_subject(message),
                stream=message.stream,
                stream_seq=message.stream_seq,
                data_base64=(
                    base64.b64encode(message.data).decode()
                    if payload is None and message.data and not truncate
                    else None
                ),
                headers=dict(message.headers) if message.headers and not truncate else None,
                cloud_event=cloud_event,
                consumer=consumer,
                history=history,
                truncated=truncate,
            ),
        )
    )


def success_record(function: str, request_id: str, payload: bytes, result: bytes, invoke_count: int) -> bytes:
    """The on-success destination record for one invocation."""
    return _record_encoder.encode(
        DestinationRecord(
            version="1.0",
            timestamp=_now(),
            requestContext=_RequestContext(
                requestId=request_id,
                functionArn=ARN_PREFIX + function,
                condition="Success",
                approximateInvokeCount=invoke_count,
            ),
            requestPayload=_json_or_text(payload),
            responseContext=_ResponseContext(statusCode=200, executedVersion="$LATEST"),
            responsePayload=_json_or_text(result),
        )
    )
