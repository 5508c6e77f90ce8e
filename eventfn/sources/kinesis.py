"""The JSON a sharded stream's mapping writes and reads, in Lambda's Kinesis formats.

- `batch`: the handler's event for a batch of one shard, `{"Records": [...]}`, each record as Lambda delivers a
  Kinesis record (so Kinesis handler code, Powertools' `KinesisDataStreamModel` and batch processor included,
  runs unchanged), plus the tumbling-window fields when the mapping has a window;
- `window_response`: a tumbling-window invocation's answer, `{"state": {...}, "batchItemFailures": [...]}`;
- `batch_info_record`: the failure record of a batch given up (Lambda's on-failure record with
  `KinesisBatchInfo`): metadata about the batch, not its records, which stay in the stream.

Built once per process: the encoders, and each mapping's constant fields (`Shape`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from eventfn import decoding
from eventfn.errors import UnreadableData
from eventfn.filters import decode_body
from eventfn.sources.records import REGION, StoredMessage, item_failures
from eventfn.sources.shards import ARRIVAL_HEADER, KEY_HEADER, shard_id
from eventfn.subjects import FUNCTION_ARN_PREFIX

#: `invokeIdentityArn` of every record: eventfn has no IAM roles; this names the service.
INVOKE_IDENTITY_ARN = "arn:aws:iam::000000000000:role/eventfn"
#: A sharded stream's ARN is this plus its name.
STREAM_ARN_PREFIX = f"arn:aws:kinesis:{REGION}:000000000000:stream/"
#: The most bytes of window state a shard keeps: more ends its window early (Lambda's 1 MB).
MAX_STATE_BYTES = 1024 * 1024


def stream_arn(name: str) -> str:
    """The `eventSourceARN` of sharded stream `name`."""
    return STREAM_ARN_PREFIX + name


def arrival_ns(message: StoredMessage) -> int:
    """When the record arrived in the stream (ns): its put's stored time, or its own."""
    headers = message.headers
    if headers:
        value = headers.get(ARRIVAL_HEADER)
        if value is not None and value.isascii() and value.isdigit():
            return int(value)
    return message.timestamp_ns


def partition_key(message: StoredMessage) -> str:
    """The record's partition key (an empty string for a record written to its shard without one)."""
    headers = message.headers
    return (headers.get(KEY_HEADER) if headers else None) or ""


# -- the handler's event ----------------------------------------------------------------------------------------


class Payload(msgspec.Struct, frozen=True):
    """The `kinesis` object of a record. `data` is bytes: JSON writes it as base64, as Kinesis does."""

    kinesisSchemaVersion: str
    partitionKey: str
    sequenceNumber: str
    data: bytes
    approximateArrivalTimestamp: float


class Record(msgspec.Struct, frozen=True):
    """One record of a batch, as Lambda delivers a Kinesis record."""

    kinesis: Payload
    eventSource: str
    eventVersion: str
    eventID: str
    eventName: str
    invokeIdentityArn: str
    awsRegion: str
    eventSourceARN: str


class Batch(msgspec.Struct, frozen=True):
    Records: list[Record]


class Window(msgspec.Struct, frozen=True):
    """A tumbling window's bounds, as ISO 8601 UTC times."""

    start: str
    end: str


class WindowBatch(msgspec.Struct, frozen=True):
    """A batch of a mapping with a tumbling window: the records, the window and the state so far."""

    Records: list[Record]
    window: Window
    state: msgspec.Raw
    shardId: str
    eventSourceARN: str
    isFinalInvokeForWindow: bool
    isWindowTerminatedEarly: bool


_encoder = msgspec.json.Encoder()


def iso(seconds: float) -> str:
    """Epoch seconds as Lambda writes a window bound (`2020-12-09T07:04:00Z`)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Shape:
    """Batches of one shard of one stream: the fields every record shares are built once."""

    def __init__(self, stream: str, index: int) -> None:
        self.stream = stream
        self.shard_id = shard_id(index)
        self.arn = stream_arn(stream)
        self._id_prefix = self.shard_id + ":"

    def record(self, message: StoredMessage) -> Record:
        seq = str(message.stream_seq)
        return Record(
            kinesis=Payload(
                kinesisSchemaVersion="1.0",
                partitionKey=partition_key(message),
                sequenceNumber=seq,
                data=message.data,
                # Kinesis gives milliseconds.
                approximateArrivalTimestamp=(arrival_ns(message) // 1_000_000) / 1000,
            ),
            eventSource="aws:kinesis",
            eventVersion="1.0",
            eventID=self._id_prefix + seq,
            eventName="aws:kinesis:record",
            invokeIdentityArn=INVOKE_IDENTITY_ARN,
            awsRegion=REGION,
            eventSourceARN=self.arn,
        )

    def batch(self, messages: Sequence[StoredMessage]) -> bytes:
        """The handler's event for `messages` (records of this shard, in order)."""
        return _encoder.encode(Batch(Records=[self.record(m) for m in messages]))

    def window_batch(
        self,
        messages: Sequence[StoredMessage],
        start: float,
        end: float,
        state: bytes,
        *,
        final: bool = False,
        early: bool = False,
    ) -> bytes:
        """The event of a mapping with a tumbling window: `messages` (none for the window's final invoke), the
        window `[start, end)` and the state (JSON) the window's earlier invocations returned."""
        return _encoder.encode(
            WindowBatch(
                Records=[self.record(m) for m in messages],
                window=Window(start=iso(start), end=iso(end)),
                state=msgspec.Raw(state),
                shardId=self.shard_id,
                eventSourceARN=self.arn,
                isFinalInvokeForWindow=final,
                isWindowTerminatedEarly=early,
            )
        )


def filter_document(message: StoredMessage) -> dict[str, Any]:
    """What filter patterns match a record against (Lambda's rule for Kinesis): `data` as its decoded JSON (text
    if it is not JSON) and the record's metadata at the top level."""
    return {
        "kinesisSchemaVersion": "1.0",
        "partitionKey": partition_key(message),
        "sequenceNumber": str(message.stream_seq),
        "approximateArrivalTimestamp": (arrival_ns(message) // 1_000_000) / 1000,
        "data": decode_body(message.data),
    }


# -- the handler's answer ----------------------------------------------------------------------------------------


class _StateOnly(msgspec.Struct):
    state: msgspec.Raw = msgspec.Raw(b"null")


_state_decoder = msgspec.json.Decoder(_StateOnly)


def window_state(response: bytes) -> bytes | None:
    """The `state` of a tumbling-window invocation's answer, as JSON; None when it has none (Lambda counts such
    an invocation as failed). State is an object (Lambda's is a map)."""
    try:
        value = decoding.typed(_state_decoder, response)
    except UnreadableData:
        return None
    raw = bytes(value.state)
    return raw if raw.lstrip()[:1] == b"{" else None


def checkpoint(response: bytes, sequence_numbers: Sequence[str]) -> int | None:
    """How many records of a batch succeeded by its partial batch response: the position (in the batch) of the
    lowest sequence number it reports failed, or the batch's size when it reports none; None when the response
    fails the whole batch (an empty, null or unknown `itemIdentifier`, or a bad shape)."""
    failed = item_failures(response, set(sequence_numbers))
    if failed is None:
        return None
    if not failed:
        return len(sequence_numbers)
    return min(i for i, seq in enumerate(sequence_numbers) if seq in failed)


# -- the failure record of a batch given up ----------------------------------------------------------------------


class _RequestContext(msgspec.Struct, frozen=True):
    requestId: str
    functionArn: str
    condition: str
    approximateInvokeCount: int


class _ResponseContext(msgspec.Struct, frozen=True):
    statusCode: int
    executedVersion: str
    functionError: str


class KinesisBatchInfo(msgspec.Struct, frozen=True):
    shardId: str
    startSequenceNumber: str
    endSequenceNumber: str
    approximateArrivalOfFirstRecord: str
    approximateArrivalOfLastRecord: str
    batchSize: int
    streamArn: str


class BatchInfoRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """Lambda's on-failure record of a stream batch: what failed, and where its records are (not the records)."""

    requestContext: _RequestContext
    version: str
    timestamp: str
    KinesisBatchInfo: KinesisBatchInfo
    #: Absent for records given up before any invocation (expired before they could run).
    responseContext: _ResponseContext | None = None
    #: The last error, as the function answered it (eventfn's addition: `eventfn dlq ls` shows it).
    responsePayload: msgspec.Raw | None = None


def _iso_ms(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def batch_info_record(
    function: str,
    shape: Shape,
    messages: Sequence[StoredMessage],
    condition: str,
    invokes: int,
    error: bytes | None,
) -> bytes:
    """The failure record of `messages` (a batch of this shard, in order) given up for `condition`
    (`RetryAttemptsExhausted`, `RecordAgeExceeded`), after `invokes` invocations; `error` the last one's error
    object (None if it was never invoked)."""
    first, last = messages[0], messages[-1]
    response = None
    payload = None
    if invokes:
        response = _ResponseContext(statusCode=200, executedVersion="$LATEST", functionError="Unhandled")
        if error:
            try:
                decoding.json_value(error)
                payload = msgspec.Raw(error)
            except UnreadableData:
                payload = msgspec.Raw(_encoder.encode(decoding.text(error, 1024)))
    return _encoder.encode(
        BatchInfoRecord(
            requestContext=_RequestContext(
                requestId=str(uuid.uuid4()),
                functionArn=FUNCTION_ARN_PREFIX + function,
                condition=condition,
                approximateInvokeCount=invokes,
            ),
            version="1.0",
            timestamp=_iso_ms(time.time_ns()),
            KinesisBatchInfo=KinesisBatchInfo(
                shardId=shape.shard_id,
                startSequenceNumber=str(first.stream_seq),
                endSequenceNumber=str(last.stream_seq),
                approximateArrivalOfFirstRecord=_iso_ms(arrival_ns(first)),
                approximateArrivalOfLastRecord=_iso_ms(arrival_ns(last)),
                batchSize=len(messages),
                streamArn=shape.arn,
            ),
            responseContext=response,
            responsePayload=payload,
        )
    )
