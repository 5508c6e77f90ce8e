"""The normalized event: CloudEvents 1.0 over NATS, per the CloudEvents NATS protocol binding.

Three ways a message arrives, all normalized to one `Event`:
- *binary mode* (what eventfn's own connectors and `eventfn pub` send): attributes in `ce-*` headers,
  `content-type` header for `datacontenttype`, the body is the data;
- *structured mode*: `content-type: application/cloudevents+json`, the whole event as JSON in the body;
- *plain*: no headers at all, exactly what `nats pub SUBJECT BODY` sends. The attributes are derived from
  the message: `id` from `Nats-Msg-Id` or the stream sequence, `source` from the subject.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from eventfn import decoding
from eventfn.errors import EventDecodeError, UnreadableData

SPEC_VERSION = "1.0"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
#: The `type` of an event published to a plain subject without CloudEvents attributes.
PLAIN_EVENT_TYPE = "io.eventfn.nats.message"
_REQUEST_NAMESPACE = uuid.UUID("5f0b1ad0-5e0f-4c2f-9d7e-0c4e0e7f0a11")


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """A CloudEvent with its data kept as the raw bytes it arrived with."""

    id: str
    source: str
    type: str
    specversion: str = SPEC_VERSION
    subject: str | None = None
    time: str | None = None
    datacontenttype: str | None = None
    data: bytes = b""


class _StructuredEvent(msgspec.Struct, kw_only=True):
    """The JSON form of a structured-mode CloudEvent (unknown extension attributes are ignored)."""

    id: str
    source: str
    type: str
    specversion: str
    subject: str | None = None
    time: str | None = None
    datacontenttype: str | None = None
    # Raw keeps the data's JSON text as it came; empty when the event has no `data` member.
    data: msgspec.Raw = msgspec.Raw(b"")
    data_base64: str | None = None


_structured_decoder = msgspec.json.Decoder(_StructuredEvent)
_text_decoder = msgspec.json.Decoder(str)


@functools.cache
def _stream_prefix(stream: str) -> str:
    return str(uuid.uuid5(_REQUEST_NAMESPACE, stream))[:24]


def request_id_for(stream_sequence: int, stream: str) -> str:
    """A stable Lambda-style request id for a stored message: the same on every redelivery.

    UUID-shaped: a per-stream prefix and the sequence in the last 12 hex digits (a hash per message cost
    3 us on the hot path; this is a string format).
    """
    return f"{_stream_prefix(stream)}{stream_sequence & 0xFFFF_FFFF_FFFF:012x}"


#: Request ids need to be unique, not secret: a generator seeded once from the OS (`uuid.uuid4` reads
#: os.urandom for each, 5% of the service's time under sync invokes, py-spy).
_ids = random.Random()
#: A random UUID's version (4) and variant (RFC 4122) bits, and the bits they replace.
_UUID4_BITS = (0x4 << 76) | (0x2 << 62)
_UUID4_MASK = ~((0xF << 76) | (0x3 << 62))


def new_request_id() -> str:
    """A fresh request id: a random (version 4) UUID, as Lambda's are."""
    text = f"{_ids.getrandbits(128) & _UUID4_MASK | _UUID4_BITS:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def from_nats(
    subject: str,
    data: bytes,
    headers: Mapping[str, str] | None,
    *,
    fallback_id: str,
    timestamp: datetime | None = None,
) -> Event:
    """Normalize a NATS message into an `Event`.

    Raises `EventDecodeError` (and nothing else) for a structured event that cannot be read, whatever its bytes.
    """
    if headers:
        if (spec := headers.get("ce-specversion")) is not None:
            return Event(
                id=headers.get("ce-id") or fallback_id,
                source=headers.get("ce-source") or f"nats:{subject}",
                type=headers.get("ce-type") or PLAIN_EVENT_TYPE,
                specversion=spec,
                subject=headers.get("ce-subject") or subject,
                time=headers.get("ce-time"),
                datacontenttype=headers.get("content-type") or headers.get("Content-Type"),
                data=data,
            )
        if _is_structured(headers):
            return _from_structured(subject, data)
        fallback_id = headers.get("Nats-Msg-Id") or fallback_id
    return Event(
        id=fallback_id,
        source=f"nats:{subject}",
        type=PLAIN_EVENT_TYPE,
        subject=subject,
        time=(timestamp or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        data=data,
    )


def plain_attributes(subject: str, id: str, timestamp_ns: int) -> dict[str, Any]:
    """`to_attributes(from_nats(subject, data, None, ...))` of a plain message (no headers) stored at
    `timestamp_ns`, without the `Event`: the batch-size-1 path builds one per event."""
    return {
        "id": id,
        "source": f"nats:{subject}",
        "type": PLAIN_EVENT_TYPE,
        "specversion": SPEC_VERSION,
        "subject": subject,
        "time": datetime.fromtimestamp(timestamp_ns / 1e9, UTC).isoformat().replace("+00:00", "Z"),
    }


def is_cloud_event(headers: Mapping[str, str] | None) -> bool:
    """Whether a message with these headers is a CloudEvent (binary or structured mode), not a plain message."""
    if not headers:
        return False
    return "ce-specversion" in headers or _is_structured(headers)


def _is_structured(headers: Mapping[str, str]) -> bool:
    content_type = headers.get("content-type") or headers.get("Content-Type") or ""
    return content_type.startswith(STRUCTURED_CONTENT_TYPE)


def _from_structured(subject: str, data: bytes) -> Event:
    try:
        raw = decoding.typed(_structured_decoder, data)
    except UnreadableData as exc:
        raise EventDecodeError(subject, f"invalid structured CloudEvent: {exc.problem}") from exc
    content_type = raw.datacontenttype
    if raw.data_base64 is not None:
        try:
            body = decoding.base64_bytes(raw.data_base64)
        except UnreadableData as exc:
            raise EventDecodeError(subject, f"data_base64 is {exc.problem}") from exc
    elif not (data := bytes(raw.data)):
        body = b""
    elif content_type and not _is_json_type(content_type) and data.startswith(b'"'):
        # CloudEvents JSON format 3.1.2: a string `data` with a non-JSON content type is that text itself. (It
        # was read once already as part of the event, so this cannot fail; it is bounded all the same.)
        try:
            body = decoding.typed(_text_decoder, data).encode()
        except UnreadableData as exc:
            raise EventDecodeError(subject, f"invalid structured CloudEvent: data is {exc.problem}") from exc
    else:
        body = data
        content_type = content_type or "application/json"
    return Event(
        id=raw.id,
        source=raw.source,
        type=raw.type,
        specversion=raw.specversion,
        subject=raw.subject or subject,
        time=raw.time,
        datacontenttype=content_type,
        data=body,
    )


def _is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media.endswith(("/json", "+json"))


def binary_headers(event: Event) -> dict[str, str]:
    """The NATS headers that carry `event` in binary content mode (its data goes in the body)."""
    headers = {
        "ce-specversion": event.specversion,
        "ce-id": event.id,
        "ce-source": event.source,
        "ce-type": event.type,
        # JetStream drops a second publish with the same id inside the stream's dedupe window.
        "Nats-Msg-Id": event.id,
    }
    if event.subject:
        headers["ce-subject"] = event.subject
    if event.time:
        headers["ce-time"] = event.time
    if event.datacontenttype:
        headers["content-type"] = event.datacontenttype
    return headers


def new_event(
    subject: str,
    data: bytes,
    *,
    source: str,
    type: str = PLAIN_EVENT_TYPE,
    content_type: str | None = "application/json",
    id: str | None = None,
    time: datetime | None = None,
) -> Event:
    """A fresh event: a random id and the current time unless given.

    A source that may publish one event twice (a cron tick after a restart, a file seen again by a re-scan)
    gives an `id` of its own making, the same each time: JetStream stores one message per id within the
    stream's duplicate window (`Bus.publish_event`). `time` is when it happened (naive: local time).
    """
    if id == "":
        raise ValueError("an event id cannot be empty (CloudEvents requires one)")
    when = datetime.now(UTC) if time is None else time.astimezone(UTC)
    return Event(
        id=str(uuid.uuid4()) if id is None else id,
        source=source,
        type=type,
        subject=subject,
        time=when.isoformat().replace("+00:00", "Z"),
        datacontenttype=content_type,
        data=data,
    )


def to_attributes(event: Event) -> dict[str, Any]:
    """The event's CloudEvents attributes (without data), as the handler's `context.cloud_event` sees them."""
    return {f: getattr(event, f) for f in event.__struct_fields__ if f != "data" and getattr(event, f)}
