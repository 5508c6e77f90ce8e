"""Normalizing NATS messages into CloudEvents: plain, binary mode and structured mode."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import pytest

from eventfn.errors import EventDecodeError
from eventfn.events import (
    PLAIN_EVENT_TYPE,
    Event,
    binary_headers,
    from_nats,
    new_event,
    new_request_id,
    plain_attributes,
    request_id_for,
    to_attributes,
)

WHEN = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)


# -- plain messages --------------------------------------------------------------------------------------------


def test_plain_message_without_headers_derives_attributes_from_the_message() -> None:
    event = from_nats("events.orders.new", b'{"id": 1}', None, fallback_id="seq-7", timestamp=WHEN)
    assert event == Event(
        id="seq-7",
        source="nats:events.orders.new",
        type=PLAIN_EVENT_TYPE,
        specversion="1.0",
        subject="events.orders.new",
        time="2024-05-06T07:08:09.123000Z",
        datacontenttype=None,
        data=b'{"id": 1}',
    )


def test_plain_message_with_empty_headers_is_plain() -> None:
    event = from_nats("events.x", b"hi", {}, fallback_id="f", timestamp=WHEN)
    assert event.id == "f"
    assert event.type == PLAIN_EVENT_TYPE
    assert event.data == b"hi"


def test_plain_message_takes_its_id_from_nats_msg_id() -> None:
    event = from_nats("events.x", b"", {"Nats-Msg-Id": "dedupe-1"}, fallback_id="f", timestamp=WHEN)
    assert event.id == "dedupe-1"
    assert event.source == "nats:events.x"


def test_plain_message_without_timestamp_gets_current_utc_time() -> None:
    before = datetime.now(UTC)
    event = from_nats("events.x", b"", None, fallback_id="f")
    assert event.time is not None and event.time.endswith("Z")
    parsed = datetime.fromisoformat(event.time.replace("Z", "+00:00"))
    assert before <= parsed <= datetime.now(UTC)


# -- binary mode -----------------------------------------------------------------------------------------------


def test_binary_mode_reads_ce_headers() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "evt-1",
        "ce-source": "/orders",
        "ce-type": "com.example.order.created",
        "ce-subject": "order/42",
        "ce-time": "2024-01-01T00:00:00Z",
        "content-type": "application/json",
    }
    event = from_nats("events.orders", b'{"n": 42}', headers, fallback_id="f", timestamp=WHEN)
    assert event == Event(
        id="evt-1",
        source="/orders",
        type="com.example.order.created",
        specversion="1.0",
        subject="order/42",
        time="2024-01-01T00:00:00Z",
        datacontenttype="application/json",
        data=b'{"n": 42}',
    )


def test_binary_mode_fills_missing_attributes() -> None:
    event = from_nats(
        "events.orders",
        b"raw",
        {"ce-specversion": "1.0", "Content-Type": "text/plain"},
        fallback_id="f",
        timestamp=WHEN,
    )
    assert event.id == "f"
    assert event.source == "nats:events.orders"
    assert event.type == PLAIN_EVENT_TYPE
    assert event.subject == "events.orders"
    assert event.time is None
    assert event.datacontenttype == "text/plain"
    assert event.data == b"raw"


# -- structured mode ---------------------------------------------------------------------------------------------


def structured(**fields: object) -> bytes:
    base: dict[str, object] = {"specversion": "1.0", "id": "s-1", "source": "/src", "type": "t.created"}
    base.update(fields)
    return json.dumps(base).encode()


CE_JSON = {"content-type": "application/cloudevents+json"}


def test_structured_mode_reads_the_attributes_from_the_body() -> None:
    body = structured(subject="order/1", time="2024-02-02T00:00:00Z", datacontenttype="text/plain", extension="ignored")
    event = from_nats("events.orders", body, CE_JSON, fallback_id="f", timestamp=WHEN)
    assert event == Event(
        id="s-1",
        source="/src",
        type="t.created",
        specversion="1.0",
        subject="order/1",
        time="2024-02-02T00:00:00Z",
        datacontenttype="text/plain",
        data=b"",
    )


def test_structured_mode_content_type_with_parameters_and_capitalized_header() -> None:
    event = from_nats(
        "events.x", structured(), {"Content-Type": "application/cloudevents+json; charset=utf-8"}, fallback_id="f"
    )
    assert event.id == "s-1"
    assert event.source == "/src"
    assert event.subject == "events.x"  # no subject in the event: the NATS subject


@pytest.mark.parametrize("data", [{"a": [1, 2]}, 5, "text", [1, "x"], True])
def test_structured_mode_json_data_becomes_the_event_data(data: object) -> None:
    event = from_nats("events.orders", structured(data=data), CE_JSON, fallback_id="f")
    assert json.loads(event.data) == data
    assert event.datacontenttype == "application/json"


def test_structured_mode_decodes_data_base64() -> None:
    raw = bytes(range(256))
    body = structured(datacontenttype="application/octet-stream", data_base64=base64.b64encode(raw).decode())
    event = from_nats("events.bin", body, CE_JSON, fallback_id="f")
    assert event.data == raw
    assert event.datacontenttype == "application/octet-stream"


def test_structured_mode_without_data_has_empty_data() -> None:
    event = from_nats("events.x", structured(), CE_JSON, fallback_id="f")
    assert event.data == b""
    assert event.datacontenttype is None


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"id": "x"}',  # required attributes missing
        b'["an", "array"]',
        b"",
    ],
)
def test_broken_structured_event_raises_event_decode_error(body: bytes) -> None:
    with pytest.raises(EventDecodeError) as info:
        from_nats("events.bad", body, CE_JSON, fallback_id="f")
    assert info.value.subject == "events.bad"
    assert "events.bad" in str(info.value)


def test_structured_event_with_invalid_base64_raises_event_decode_error() -> None:
    with pytest.raises(EventDecodeError, match="base64"):
        from_nats("events.bad", structured(data_base64="!!not base64!!"), CE_JSON, fallback_id="f")


def test_structured_mode_string_data_with_non_json_content_type_is_the_text_itself() -> None:
    body = structured(datacontenttype="application/xml", data='<much wow="xml"/>')
    event = from_nats("events.xml", body, CE_JSON, fallback_id="f")
    assert event.data == b'<much wow="xml"/>'


# -- round trip and ids ----------------------------------------------------------------------------------------


def test_binary_headers_round_trip_through_from_nats() -> None:
    original = Event(
        id="e-1",
        source="/svc",
        type="com.example.thing",
        subject="thing/1",
        time="2024-03-03T03:03:03Z",
        datacontenttype="application/json",
        data=b'{"k": "v"}',
    )
    headers = binary_headers(original)
    assert headers["Nats-Msg-Id"] == "e-1"
    assert from_nats("events.things", original.data, headers, fallback_id="other") == original


def test_binary_headers_round_trip_of_a_new_event() -> None:
    original = new_event("events.x", b"\x00\x01binary", source="eventfn:cli", content_type="application/octet-stream")
    decoded = from_nats("events.x", original.data, binary_headers(original), fallback_id="other")
    assert decoded == original


def test_a_source_chooses_the_id_and_time_of_a_new_event() -> None:
    """A cron tick or a re-scanned file gets the same id each time it is published, and it is the id the
    handler sees (`context.cloud_event["id"]`), whatever the stream sequence the message landed at."""
    tick = new_event("cron.nightly", b"{}", source="eventfn:cron", id="nightly/2024-05-06T07:08:00Z", time=WHEN)
    assert (tick.id, tick.time) == ("nightly/2024-05-06T07:08:00Z", "2024-05-06T07:08:09.123000Z")
    headers = binary_headers(tick)
    assert headers["Nats-Msg-Id"] == headers["ce-id"] == tick.id  # JetStream deduplicates on it
    received = from_nats("cron.nightly", tick.data, headers, fallback_id=request_id_for(42, "EVENTFN"))
    assert to_attributes(received)["id"] == tick.id
    assert new_event("s", b"", source="x").id != new_event("s", b"", source="x").id  # random unless chosen
    with pytest.raises(ValueError, match="cannot be empty"):
        new_event("s", b"", source="x", id="")


def test_binary_headers_omit_absent_optional_attributes() -> None:
    headers = binary_headers(Event(id="e", source="/s", type="t"))
    assert set(headers) == {"ce-specversion", "ce-id", "ce-source", "ce-type", "Nats-Msg-Id"}


def test_to_attributes_leaves_out_data_and_empty_attributes() -> None:
    event = Event(id="e", source="/s", type="t", time="2024-01-01T00:00:00Z", data=b"xyz")
    assert to_attributes(event) == {
        "id": "e",
        "source": "/s",
        "type": "t",
        "specversion": "1.0",
        "time": "2024-01-01T00:00:00Z",
    }


def test_request_id_is_stable_for_the_same_stored_message() -> None:
    first = request_id_for(42, "EVENTS")
    assert request_id_for(42, "EVENTS") == first
    assert uuid.UUID(first).version == 5
    assert len(first) == 36


def test_request_id_differs_per_sequence_and_stream() -> None:
    ids = {request_id_for(1, "EVENTS"), request_id_for(2, "EVENTS"), request_id_for(1, "OTHER")}
    assert len(ids) == 3


@pytest.mark.parametrize(
    "timestamp_ns", [1_714_979_289_123_000_000, 1_714_979_289_000_000_000, 1_714_979_289_999_999_999]
)
def test_plain_attributes_are_those_of_the_normalized_event(timestamp_ns: int) -> None:
    """The batch-size-1 path builds a plain message's `context.cloud_event` without an `Event`: the same dict."""
    when = datetime.fromtimestamp(timestamp_ns / 1e9, UTC)
    event = from_nats("events.orders.new", b"{}", None, fallback_id="seq-7", timestamp=when)
    attributes = plain_attributes("events.orders.new", "seq-7", timestamp_ns)
    assert attributes == to_attributes(event)
    assert list(attributes) == list(to_attributes(event))


def test_new_request_ids_are_distinct_random_uuids() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        value = uuid.UUID(text)
        assert str(value) == text and value.version == 4 and value.variant == uuid.RFC_4122
