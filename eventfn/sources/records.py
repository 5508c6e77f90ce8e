"""The JSON shapes the dispatcher writes and reads, in Lambda's formats.

- `batch_payload`: the event a handler gets for a batch from a plain subject, `{"Records": [...]}`, each record
  an SQS record (so SQS handler code, Powertools' `SqsModel` and batch processor included, runs unchanged) plus
  the NATS `subject`;
- `item_failures`: Lambda's partial batch response, `{"batchItemFailures": [{"itemIdentifier": id}]}`;
- `failure_record` / `success_record`: Lambda's asynchronous-invocation destination records, which are also
  what the dead-letter stream holds, with an `eventfn` section that makes the event redrivable byte for byte.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import msgspec

from eventfn import decoding
from eventfn.errors import UnreadableData
from eventfn.invoke.invocation import LambdaError
from eventfn.subjects import FUNCTION_ARN_PREFIX, REDRIVE_PREFIX

log = logging.getLogger(__name__)

#: How many earlier failures a record carries in its attempt history (the newest are kept).
HISTORY_LIMIT = 10
#: Header a redriven event carries its attempt history in (JSON list of `Attempt`).
HISTORY_HEADER = "Eventfn-History"
#: Header holding the subject an event was first published to (a redrive republishes it elsewhere).
SUBJECT_HEADER = "Eventfn-Subject"
#: Headers NATS and eventfn set themselves; the rest are the event's own (message attributes, kept on a redrive).
SYSTEM_HEADER_PREFIXES = ("Nats-", "Eventfn-")


class StoredMessage(Protocol):
    """What a record needs of a delivered message (`feeds.Delivery` has it)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    stream: str
    stream_seq: int
    delivered: int
    timestamp_ns: int


# -- batches ---------------------------------------------------------------------------------------------------

#: `awsRegion` of a batch record: the region of eventfn's ARNs.
REGION = "local"
#: `attributes.SenderId`: NATS does not tell who published a message, so every record names the transport.
SENDER_ID = "nats"
#: The message attribute that holds the record's NATS subject. Headers named `Eventfn-*` never become
#: attributes (`SYSTEM_HEADER_PREFIXES`), so no header of the event can collide with it.
SUBJECT_ATTRIBUTE = SUBJECT_HEADER
#: What a receipt handle starts with (its format's version); the rest is `<stream>/<consumer>/<seq>/<delivered>`.
RECEIPT_PREFIX = "eventfn1/"
#: The source ARN of a mapping: this plus `<stream>/<consumer>` (eventfn's own scheme, so it is not taken for AWS).
SOURCE_ARN_PREFIX = f"arn:eventfn:nats:{REGION}:000000000000:consumer/"


class DeliveredMessage(StoredMessage, Protocol):
    """What a batch record needs of a delivery besides the stored message: when it was received."""

    #: Wall-clock seconds when this delivery reached eventfn.
    received_at: float


class _Attributes(msgspec.Struct, frozen=True):
    ApproximateReceiveCount: str
    SentTimestamp: str
    SenderId: str
    ApproximateFirstReceiveTimestamp: str
    #: The event's JetStream stream sequence (SQS has it on FIFO queues only; Powertools' models accept it).
    SequenceNumber: str


class MessageAttribute(msgspec.Struct, frozen=True):
    """An SQS message attribute: each header of the message becomes one, as a String."""

    stringValue: str
    stringListValues: tuple[str, ...] = ()
    binaryListValues: tuple[str, ...] = ()
    dataType: str = "String"


class Record(msgspec.Struct, frozen=True, omit_defaults=True):
    """One event in a batch: an SQS record (what Powertools' `SqsModel` parses), `body` the event's data as text,
    plus the NATS `subject` (also in the message attribute `Eventfn-Subject`) and, for binary data, `bodyEncoding`."""

    messageId: str
    receiptHandle: str
    body: str
    attributes: _Attributes
    messageAttributes: dict[str, MessageAttribute]
    md5OfBody: str
    eventSource: str
    eventSourceARN: str
    awsRegion: str
    subject: str
    #: Set (and only then present) when `body` holds base64 because the data was not UTF-8 text.
    bodyEncoding: str | None = None


class Batch(msgspec.Struct, frozen=True):
    Records: list[Record]


class Receipt(NamedTuple):
    """What a batch record's `receiptHandle` says: which delivery of which stored event, through which mapping."""

    stream: str
    consumer: str
    stream_seq: int
    delivered: int

    def handle(self) -> str:
        """The receipt handle: `eventfn1/<stream>/<consumer>/<seq>/<delivered>` (NATS names have no `/`)."""
        return f"{RECEIPT_PREFIX}{self.stream}/{self.consumer}/{self.stream_seq}/{self.delivered}"

    @classmethod
    def parse(cls, handle: str) -> Receipt | None:
        """The receipt a handle stands for; None for a handle eventfn did not write."""
        parts = handle.removeprefix(RECEIPT_PREFIX).split("/")
        if not handle.startswith(RECEIPT_PREFIX) or len(parts) != 4:
            return None
        stream, consumer, seq, delivered = parts
        if not (stream and consumer and _is_count(seq) and _is_count(delivered)):
            return None
        return cls(stream, consumer, int(seq), int(delivered))


def _is_count(text: str) -> bool:
    return text.isascii() and text.isdigit()


def source_arn(stream: str, consumer: str) -> str:
    """The `eventSourceARN` of the mapping that consumes `stream` through durable consumer `consumer`."""
    return f"{SOURCE_ARN_PREFIX}{stream}/{consumer}"


_batch_encoder = msgspec.json.Encoder()


def original_subject(message: StoredMessage) -> str:
    """The subject the event was first published to (a redriven event keeps it in a header).

    The header counts only on a redrive subject, which only the admin role may publish to: from any other
    publisher it would let a client allowed one subject pose as another.
    """
    if (
        message.headers
        and message.subject.startswith(REDRIVE_PREFIX)
        and (subject := message.headers.get(SUBJECT_HEADER))
    ):
        return subject
    return message.subject


@functools.lru_cache(maxsize=1024)
def _receipt_prefix(source_arn: str, stream: str) -> str:
    """`eventfn1/<stream>/<consumer>/` for a mapping's ARN (built once per mapping, not per record)."""
    consumer = source_arn.rpartition("/")[2] if source_arn.startswith(SOURCE_ARN_PREFIX) else "-"
    return f"{RECEIPT_PREFIX}{stream}/{consumer}/"


@functools.lru_cache(maxsize=1024)
def _subject_attribute(subject: str) -> MessageAttribute:
    """The `Eventfn-Subject` attribute (a mapping's events mostly share a few subjects: built once each)."""
    return MessageAttribute(subject)


@functools.lru_cache(maxsize=1024)
def _plain_attributes(subject: str) -> dict[str, MessageAttribute]:
    """The message attributes of a message without headers: its subject alone (built once per subject)."""
    return {SUBJECT_ATTRIBUTE: _subject_attribute(subject)}


def record_for(message: DeliveredMessage, message_id: str, source_arn: str) -> Record:
    """The batch record of one delivered message, through the mapping whose ARN is `source_arn`."""
    data = message.data
    try:
        body, encoding, text = data.decode("utf-8"), None, data
    except UnicodeDecodeError:
        text = base64.b64encode(data)
        body, encoding = text.decode("ascii"), "base64"
    subject = original_subject(message)
    headers = message.headers
    if headers:
        attributes = {k: MessageAttribute(v) for k, v in headers.items() if not k.startswith(SYSTEM_HEADER_PREFIXES)}
        attributes[SUBJECT_ATTRIBUTE] = _subject_attribute(subject)
    else:
        attributes = _plain_attributes(subject)  # shared, read-only: only encoded
    delivered = message.delivered
    seq = str(message.stream_seq)
    sent = str(message.timestamp_ns // 1_000_000)
    return Record(
        messageId=message_id,
        receiptHandle=f"{_receipt_prefix(source_arn, message.stream)}{seq}/{delivered}",
        body=body,
        attributes=_Attributes(
            ApproximateReceiveCount=str(delivered),
            SentTimestamp=sent,
            SenderId=SENDER_ID,
            # Exact on a first delivery; on a later one eventfn (which keeps no state per event) gives the time the
            # event was stored, the earliest it can have been received.
            ApproximateFirstReceiveTimestamp=str(int(message.received_at * 1000)) if delivered == 1 else sent,
            SequenceNumber=seq,
        ),
        messageAttributes=attributes,
        # SQS's digest of the body as sent (its UTF-8 text); for binary data, of the base64 text handed over.
        md5OfBody=hashlib.md5(text, usedforsecurity=False).hexdigest(),
        eventSource="aws:sqs",
        eventSourceARN=source_arn,
        awsRegion=REGION,
        subject=subject,
        bodyEncoding=encoding,
    )


def batch_payload(records: Sequence[Record]) -> bytes:
    """The handler's event for a batch."""
    return _batch_encoder.encode(Batch(Records=list(records)))


class SqsShape:
    """Batches as SQS delivers them to Lambda: `{"Records": [...]}`, one record per message."""

    unwrap_single = True

    def batch(self, messages: Sequence[DeliveredMessage], ids: Sequence[str], source_arn: str) -> bytes:
        return batch_payload([record_for(m, i, source_arn) for m, i in zip(messages, ids, strict=True)])


#: Record shapes by the name a source declares.
SHAPES = {"sqs": SqsShape()}


# -- partial batch responses ------------------------------------------------------------------------------------


def item_failures(response: bytes, ids: set[str]) -> set[str] | None:
    """Which items of a batch failed, per Lambda's ReportBatchItemFailures rules; None: the whole batch failed.

    Full success: a null or empty response, a response without `batchItemFailures`, or an empty or null list.
    Full failure: invalid JSON (or JSON nested too deeply to read), or a `batchItemFailures` that is not a list of
    objects each with a non-empty `itemIdentifier` naming an item of this batch.
    """
    if not response.strip():
        return set()
    try:
        value = decoding.json_value(response)
    except UnreadableData:
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


def _kept_exactly(payload: Any, data: bytes) -> bool:
    """Whether a redrive can rebuild `data` from `payload` alone. Text is kept as a JSON string, so JSON that is
    itself a string would read back as text: it keeps base64 beside it, as does JSON with whitespace around it
    (a reader of the record drops that) and binary data (stored as null)."""
    if isinstance(payload, str) or not data:
        return True
    return isinstance(payload, msgspec.Raw) and data[:1] not in b'" \t\r\n' and not data[-1:].isspace()


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json_or_text(data: bytes) -> Any:
    """A payload as Lambda puts it in a record: JSON as JSON, else text, else None (binary).

    JSON eventfn cannot parse (nested too deeply, say) is kept as text, so the record itself stays readable.
    """
    if not data:
        return None
    try:
        decoding.json_value(data)
        return msgspec.Raw(data)
    except UnreadableData:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None


#: How much of an error message a record or history entry keeps.
MESSAGE_LIMIT = 1024


def error_fields(error: bytes) -> tuple[str, str]:
    """`errorType` and `errorMessage` (first 1 KB) of a stored record's Lambda error object (which anyone who may
    publish to the DLQ can write); `?` where it has none."""
    try:
        value = decoding.json_value(error)
    except UnreadableData:
        return "?", decoding.text(error, MESSAGE_LIMIT)
    if not isinstance(value, dict):
        return "?", decoding.text(error, MESSAGE_LIMIT)
    return _field(value, "errorType", "?"), _field(value, "errorMessage", "")


def _field(error: dict[str, Any], key: str, default: str) -> str:
    """One field of an error object as text: a string as it is, anything else as its JSON (cut to 1 KB)."""
    value = error.get(key, default)
    if isinstance(value, str):
        return value[:MESSAGE_LIMIT]
    try:
        return decoding.text(_record_encoder.encode(value), MESSAGE_LIMIT)
    except decoding.ERRORS:  # a value too deep to write back; it was readable, so it is not worth more
        return default


def history_of(headers: Mapping[str, str] | None) -> list[Attempt]:
    """The attempt history a redriven event carries (its messages cut to 1 KB), or an empty list."""
    if not headers or not (raw := headers.get(HISTORY_HEADER)):
        return []
    try:
        history = decoding.typed(_history_decoder, raw)
    except UnreadableData:
        return []  # a header that is not eventfn's: the history starts again rather than the event failing
    return [
        a
        if len(a.errorMessage) <= MESSAGE_LIMIT
        else msgspec.structs.replace(a, errorMessage=a.errorMessage[:MESSAGE_LIMIT])
        for a in history[-HISTORY_LIMIT:]
    ]


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
    cause: LambdaError | None,
    consumer: str | None = None,
    truncate: bool = False,
) -> bytes:
    """The dead-letter (and on-failure destination) record for one event (without its payload if `truncate`).

    `error` is Lambda's error object as the function answered it; `cause` its fields, which the attempt history
    keeps (`?` for none).

    Never raises: should the event's data or headers defeat the record's shape, a last-resort record keeps the
    event's bytes as base64 and the error as text, so that dead-lettering cannot fail on what it dead-letters.
    """
    try:
        return _failure_record(function, message, request_id, condition, error, cause, cloud_event, consumer, truncate)
    except Exception as exc:
        log.exception(
            "%s: the failure record of request %s could not be built; writing a plain one", function, request_id
        )
        return last_resort_record(function, message, request_id, condition, error, exc, consumer, truncate)


def _failure_record(
    function: str,
    message: StoredMessage,
    request_id: str,
    condition: str,
    error: bytes,
    cause: LambdaError | None,
    cloud_event: dict[str, str] | None,
    consumer: str | None,
    truncate: bool,
) -> bytes:
    payload = None if truncate else _json_or_text(message.data)
    timestamp = _now()
    history = None
    if consumer is not None:
        error_type, error_message = (cause.type[:MESSAGE_LIMIT], cause.message[:MESSAGE_LIMIT]) if cause else ("?", "")
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
                functionArn=FUNCTION_ARN_PREFIX + function,
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
                data_base64=None if truncate or _kept_exactly(payload, message.data) else _base64(message.data),
                headers=dict(message.headers) if message.headers and not truncate else None,
                cloud_event=cloud_event,
                consumer=consumer,
                history=history,
                truncated=truncate,
            ),
        )
    )


def last_resort_record(
    function: str,
    message: StoredMessage,
    request_id: str,
    condition: str,
    error: bytes,
    problem: BaseException,
    consumer: str | None = None,
    truncate: bool = False,
) -> bytes:
    """A failure record built without decoding anything: the event as base64, the error as (cut) text.

    Its every string is made encodable first, so it is as close to unable to fail as Python allows. The
    event's headers are left out (they may be what failed), so a redrive of it republishes the bytes alone.
    """
    return _record_encoder.encode(
        DestinationRecord(
            version="1.0",
            timestamp=_now(),
            requestContext=_RequestContext(
                requestId=decoding.encodable(request_id),
                functionArn=FUNCTION_ARN_PREFIX + decoding.encodable(function),
                condition=decoding.encodable(condition),
                approximateInvokeCount=int(message.delivered),
            ),
            requestPayload=None,
            responseContext=_ResponseContext(statusCode=200, executedVersion="$LATEST", functionError="Unhandled"),
            responsePayload={
                "errorType": "Eventfn.RecordFallback",
                "errorMessage": decoding.encodable(
                    f"the failure record could not be built ({type(problem).__name__}: {problem}); the event is "
                    f"kept as base64; its error, as text: {decoding.text(error, MESSAGE_LIMIT)}"
                )[: 2 * MESSAGE_LIMIT],
            },
            eventfn=_Source(
                subject=decoding.encodable(original_subject(message)),
                stream=decoding.encodable(message.stream),
                stream_seq=int(message.stream_seq),
                data_base64=_base64(message.data) if message.data and not truncate else None,
                consumer=None if consumer is None else decoding.encodable(consumer),
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
                functionArn=FUNCTION_ARN_PREFIX + function,
                condition="Success",
                approximateInvokeCount=invoke_count,
            ),
            requestPayload=_json_or_text(payload),
            responseContext=_ResponseContext(statusCode=200, executedVersion="$LATEST"),
            responsePayload=_json_or_text(result),
        )
    )
