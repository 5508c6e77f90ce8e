"""S3 event notifications as S3 shapes them (event structure 2.1), and the record shape of bucket batches.

One change of one object is one record (`record_for`), published as an event's data; `S3Shape` assembles a batch
as `{"Records": [...]}` and sets, per mapping, what S3 sets per notification configuration: `configurationId` (the
trigger's name) and `responseElements["x-amz-request-id"]` (the record's item identifier, which a handler
names in `batchItemFailures` to fail that record alone).

Keys are encoded as S3 encodes them in notifications: `application/x-www-form-urlencoded` per UTF-8 byte (space
becomes `+`, letters, digits and `-_.*` stay), except that S3 keeps `/` as it is. Decode with
`urllib.parse.unquote_plus`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import unquote_plus

import msgspec

from eventfn.sources.records import REGION, SOURCE_ARN_PREFIX, DeliveredMessage

#: The event structure version S3 writes today.
EVENT_VERSION = "2.1"
#: `userIdentity.principalId` and the bucket's `ownerIdentity.principalId`: the watcher cannot tell who wrote a
#: file (its owner is not who wrote it), so every record names eventfn.
PRINCIPAL = "eventfn"
#: `requestParameters.sourceIPAddress`: changes come from this machine.
SOURCE_IP = "127.0.0.1"
#: The CloudEvents `type` of a bucket event is this plus the event name (CloudEvents' AWS S3 adapter).
CLOUD_EVENT_TYPE_PREFIX = "com.amazonaws.s3."

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.*/")
#: Each byte's encoding.
_ENCODED = tuple(chr(b) if b in _SAFE else "+" if b == 0x20 else f"%{b:02X}" for b in range(256))
_PLAIN = re.compile(r"[A-Za-z0-9/*._-]*\Z")


def encode_key(key: str) -> str:
    """`key` as an S3 notification carries it: form-encoded per UTF-8 byte, `/` kept (`red flower.jpg` ->
    `red+flower.jpg`, `a/é` -> `a/%C3%A9`). Per byte, so the encoding of a prefix is a prefix of the encoding."""
    if _PLAIN.match(key):
        return key  # the common case: nothing to encode
    return "".join([_ENCODED[b] for b in key.encode("utf-8")])


def decode_key(encoded: str) -> str:
    """The object key a record's `s3.object.key` stands for."""
    return unquote_plus(encoded)


# -- the record ---------------------------------------------------------------------------------------------------


class Identity(msgspec.Struct, frozen=True):
    principalId: str


class RequestParameters(msgspec.Struct, frozen=True):
    sourceIPAddress: str


class ResponseElements(msgspec.Struct, frozen=True):
    request_id: str = msgspec.field(name="x-amz-request-id")
    id_2: str = msgspec.field(name="x-amz-id-2")


class Bucket(msgspec.Struct, frozen=True):
    name: str
    ownerIdentity: Identity
    arn: str


class Object(msgspec.Struct, frozen=True, omit_defaults=True):
    """The object: a removal has no `size` or `eTag` (as S3's); `versionId` is left out (buckets here are not
    versioned, and S3 leaves it out for an unversioned bucket)."""

    key: str
    size: int | None = None
    eTag: str | None = None
    versionId: str | None = None
    sequencer: str = ""


class S3(msgspec.Struct, frozen=True):
    s3SchemaVersion: str
    configurationId: str
    bucket: Bucket
    object: Object


class Record(msgspec.Struct, frozen=True):
    """One S3 event notification record, its fields in S3's order."""

    eventVersion: str
    eventSource: str
    awsRegion: str
    eventTime: str
    eventName: str
    userIdentity: Identity
    requestParameters: RequestParameters
    responseElements: ResponseElements
    s3: S3


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """What the watcher saw happen to one object: what a record and its event id are made of."""

    bucket: str
    key: str
    #: `ObjectCreated:Put`, `ObjectCreated:Copy` or `ObjectRemoved:Delete`.
    name: str
    sequencer: str
    #: When it happened, in nanoseconds since the epoch.
    time_ns: int
    size: int | None = None
    etag: str | None = None

    @property
    def event_class(self) -> str:
        """`ObjectCreated` or `ObjectRemoved`."""
        return self.name.partition(":")[0]

    @property
    def event_id(self) -> str:
        """The same for every replica and every re-scan that sees this change: JetStream stores it once.

        Made of the event class, not its name: a replica that takes a move for a copy and one that takes it for a
        put announce one event between them."""
        return event_id(self.bucket, self.key, self.event_class, self.sequencer, self.etag or "")


def event_id(bucket: str, key: str, event_class: str, sequencer: str, etag: str) -> str:
    """A deterministic CloudEvents id (and `Nats-Msg-Id`) for one change of one object."""
    digest = hashlib.sha256("\0".join((bucket, key, event_class, sequencer, etag)).encode("utf-8", "surrogatepass"))
    return "s3-" + digest.hexdigest()[:40]


def sequencer(value: int) -> str:
    """S3's sequencer format: upper-case hex, fixed width (18 digits), so strings compare as the numbers do."""
    return f"{value:018X}"


def sequencer_value(text: str) -> int:
    """The number a sequencer stands for."""
    return int(text, 16) if text else 0


def event_time(time_ns: int) -> str:
    """ISO 8601 in UTC with milliseconds, as S3 writes `eventTime`."""
    when = datetime.fromtimestamp(time_ns / 1e9, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=256)
def _bucket(name: str) -> Bucket:
    return Bucket(name=name, ownerIdentity=Identity(PRINCIPAL), arn=f"arn:aws:s3:::{name}")


_IDENTITY = Identity(PRINCIPAL)
_REQUEST = RequestParameters(SOURCE_IP)


def record_for(change: Change, *, configuration_id: str = "", request_id: str = "") -> Record:
    """The S3 record of `change`. The published record leaves `configurationId` and `x-amz-request-id` empty: a
    mapping's batch sets them (`S3Shape`)."""
    identifier = change.event_id
    return Record(
        eventVersion=EVENT_VERSION,
        eventSource="aws:s3",
        awsRegion=REGION,
        eventTime=event_time(change.time_ns),
        eventName=change.name,
        userIdentity=_IDENTITY,
        requestParameters=_REQUEST,
        responseElements=ResponseElements(
            request_id=request_id,
            id_2=base64.b64encode(hashlib.sha256(identifier.encode()).digest()).decode(),
        ),
        s3=S3(
            s3SchemaVersion="1.0",
            configurationId=configuration_id,
            bucket=_bucket(change.bucket),
            object=Object(key=encode_key(change.key), size=change.size, eTag=change.etag, sequencer=change.sequencer),
        ),
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)


def encode_record(record: Record) -> bytes:
    """The record as JSON (an event's data)."""
    return _encoder.encode(record)


# -- batches -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def configuration_id(source_arn: str) -> str:
    """The `configurationId` of a mapping's records: its trigger's name (the consumer is `<function>--<name>`)."""
    consumer = source_arn.rpartition("/")[2] if source_arn.startswith(SOURCE_ARN_PREFIX) else source_arn
    _, separator, trigger = consumer.partition("--")
    return trigger if separator else consumer


def _as_record(data: bytes, item_id: str, config_id: str) -> Record | msgspec.Raw | str:
    try:
        record = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # Not a record eventfn wrote (only the service may publish here): handed over as it is, never dropped.
        try:
            msgspec.json.decode(data)
            return msgspec.Raw(data)
        except msgspec.DecodeError:
            return data.decode("utf-8", "replace")
    return msgspec.structs.replace(
        record,
        responseElements=msgspec.structs.replace(record.responseElements, request_id=item_id),
        s3=msgspec.structs.replace(record.s3, configurationId=config_id),
    )


class _Batch(msgspec.Struct, frozen=True):
    Records: list[Record | msgspec.Raw | str]


class S3Shape:
    """Batches as S3 notifies Lambda: `{"Records": [...]}`, always a list (a batch of one too).

    Each record's `responseElements["x-amz-request-id"]` is its item identifier: a handler that reports batch item
    failures names it as `itemIdentifier`. `configurationId` is the trigger's name.
    """

    unwrap_single = False

    def batch(self, messages: Sequence[DeliveredMessage], ids: Sequence[str], source_arn: str) -> bytes:
        config_id = configuration_id(source_arn)
        return _encoder.encode(_Batch([_as_record(m.data, i, config_id) for m, i in zip(messages, ids, strict=True)]))
