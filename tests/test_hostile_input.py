"""Hostile bodies, headers and stored records against every decode of user data, as pure functions.

Each path returns, or raises only its documented error, whatever the bytes: JSON nested past the recursion
limit, invalid UTF-8, huge numbers, NaN, lone surrogates, odd content types, broken `ce-*` headers, bad base64,
JSON of the wrong shape. Hypothesis is derandomized (the same examples on every run, so CI cannot flake) and
keeps no example database (nothing is written into the repository).
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from eventfn import decoding, events, filters
from eventfn.broker.specs import StoredRecord
from eventfn.errors import EventDecodeError, UnreadableData
from eventfn.fronts import nats_api as api
from eventfn.invoke import handler as runtime
from eventfn.invoke.invocation import LambdaError
from eventfn.sources import deadletters, dispatch, dlq, records

# Hypothesis caches constants it reads from the source in its home directory, from test collection on: keep that
# out of the repository too.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "eventfn-hypothesis")

HOSTILE = settings(
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- strategies -------------------------------------------------------------------------------------------------


def _nested(depth: int, shape: int) -> bytes:
    opener, closer = [(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":[', b"]}]")][shape]
    return opener * depth + b"1" + closer * depth


#: JSON values, ending in every kind of leaf, as Python's json writes them (NaN and Infinity included).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(alphabet=st.characters(exclude_categories=()), max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)

bodies = st.one_of(
    st.binary(max_size=40),
    # Nested past the recursion limit (the reproduction is 1,000 levels), closed or not.
    st.builds(_nested, st.integers(1, 4000), st.integers(0, 2)),
    st.integers(1, 4000).map(lambda n: b"[" * n),
    # Numbers past 64 bits, past Python's 4,300-digit limit, past a float.
    st.integers(15, 6000).map(lambda n: b"9" * n),
    st.sampled_from([b"1e999", b"-1e999", b"NaN", b"-Infinity", b'{"n": NaN}', b"1" * 400 + b".5e-999"]),
    # Lone surrogates, escaped (valid JSON text, not UTF-8-encodable) and raw (invalid UTF-8).
    st.sampled_from(
        [b'"\\ud800"', b'{"\\udc00": 1}', b'["a\\udfff"]', b'"\xed\xa0\x80"', b"\xff\xfe{}", b"\xef\xbb\xbf{}"]
    ),
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.text(max_size=20).map(str.encode),
)

#: The typed error beside a failure's bytes (as a handler's exception names it: any text, any length).
causes = st.none() | st.builds(LambdaError, type=st.text(max_size=40), message=st.text(max_size=3000))

CE_KEYS = ["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "ce-subject", "content-type", "Content-Type"]
CONTENT_TYPES = [
    "application/cloudevents+json",
    "application/cloudevents+json; charset=utf-8",
    "application/cloudevents-batch+json",
    "application/json",
    "text/plain",
    "",
    ";;;",
]
#: Header values as nats-py hands them over: any text without surrogates (it decodes with "replace").
header_text = st.text(max_size=30)
header_values = st.one_of(
    header_text,
    st.sampled_from(CONTENT_TYPES),
    bodies.map(lambda b: b.decode("utf-8", "replace")),
)
headers_st = st.none() | st.dictionaries(
    st.sampled_from(
        [*CE_KEYS, records.HISTORY_HEADER, records.SUBJECT_HEADER, "Nats-Msg-Id", api.CLIENT_CONTEXT_HEADER]
    )
    | header_text,
    header_values,
    max_size=6,
)


def _structured(fields: dict[str, Any], data: bytes | None) -> bytes:
    """A structured CloudEvent with `fields`, and `data` spliced in as raw JSON bytes (it may not be JSON)."""
    body = json.dumps(fields).encode()
    if data is None:
        return body
    return body[:-1] + (b", " if fields else b"") + b'"data": ' + data + b"}"


structured_bodies = st.builds(
    _structured,
    st.fixed_dictionaries(
        {},
        optional={
            "id": header_text | st.integers(),
            "source": header_text,
            "type": header_text,
            "specversion": st.sampled_from(["1.0", "0.3", ""]) | st.none(),
            "datacontenttype": st.sampled_from(CONTENT_TYPES) | st.none() | st.integers(),
            "data_base64": st.text(max_size=12) | st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode()),
            "time": header_text,
            "extension": json_values,
        },
    ),
    st.none() | bodies,
)
structured_headers = st.sampled_from(CONTENT_TYPES[:2]).map(lambda ct: {"content-type": ct})

SUBJECTS = st.sampled_from(["eventfn.async.fn", "events.orders.created", "x"]) | st.text(min_size=1, max_size=12)


@dataclass
class Message:
    """A stand-in with the attributes of `records.StoredMessage` (and what `dispatch` reads of a delivery)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    stream: str = "EVENTFN"
    stream_seq: int = 7
    delivered: int = 3
    timestamp_ns: int = 1_700_000_000_000_000_000
    received_at: float = 1_700_000_001.0


messages = st.builds(Message, SUBJECTS, bodies | structured_bodies, headers_st)

# -- events and filters -----------------------------------------------------------------------------------------

FILTER = filters.compile_filters(
    [
        '{"body": {"a": [1, "x", null, true, {"numeric": [">", 0, "<=", 1e300]}]}}',
        '{"body": {"a": {"b": [{"exists": true}]}}, "subject": [{"prefix": "events."}]}',
        '{"body": [{"anything-but": ["a", 3]}], "headers": {"ce-type": [{"exists": false}]}}',
        '{"attributes": {"type": [{"prefix": "io."}]}, "body": {"n": [{"numeric": ["=", 1]}]}}',
    ],
    "hostile.py",
)


def _normalize(message: Message) -> events.Event | None:
    """`events.from_nats` as the dispatcher calls it; None for the documented failure."""
    try:
        event = deadletters.event_of(message, "fallback-id")  # type: ignore[arg-type]
    except EventDecodeError as exc:
        assert str(exc).startswith(f"cannot decode message on {records.original_subject(message)!r}")  # type: ignore[arg-type]
        return None
    assert isinstance(event, events.Event) and isinstance(event.data, bytes)
    return event


@HOSTILE
@given(messages)
def test_normalizing_a_message_returns_an_event_or_raises_event_decode_error(message: Message) -> None:
    event = _normalize(message)
    if event is not None:
        msgspec.msgpack.encode(events.to_attributes(event))  # crosses to the worker in an `Invoke` frame


@HOSTILE
@given(SUBJECTS, structured_bodies, structured_headers)
def test_a_structured_event_is_read_or_refused_with_event_decode_error(
    subject: str, body: bytes, headers: dict[str, str]
) -> None:
    _normalize(Message(subject, body, headers))


@HOSTILE
@given(messages)
def test_filters_never_raise_on_a_hostile_body_or_headers(message: Message) -> None:
    event = _normalize(message) or events.from_nats(message.subject, message.data, None, fallback_id="f")
    document = dispatch._filter_document(message, event)  # type: ignore[arg-type]
    assert isinstance(FILTER.matches(document), bool)
    assert isinstance(filters.Filter().matches(document), bool)


@HOSTILE
@given(bodies | st.text(alphabet=st.characters(exclude_categories=()), max_size=20))
def test_decode_body_never_raises(body: bytes | str) -> None:
    filters.decode_body(body)


# -- records ----------------------------------------------------------------------------------------------------


@HOSTILE
@given(messages)
def test_a_batch_record_is_built_and_encoded_for_any_message(message: Message) -> None:
    record = records.record_for(message, "id-1", "arn:x")  # type: ignore[arg-type]
    payload = json.loads(records.batch_payload([record]))
    body = payload["Records"][0]["body"]
    if record.bodyEncoding == "base64":
        assert base64.b64decode(body) == message.data
    else:
        assert body.encode() == message.data
    assert payload["Records"][0]["md5OfBody"] == hashlib.md5(body.encode()).hexdigest()


@HOSTILE
@given(bodies, st.sets(st.text(max_size=4), max_size=3))
def test_item_failures_is_a_set_or_none_for_any_response(response: bytes, ids: set[str]) -> None:
    failed = records.item_failures(response, ids)
    assert failed is None or failed <= ids


@HOSTILE
@given(bodies)
def test_error_fields_are_two_bounded_strings_for_any_error(error: bytes) -> None:
    error_type, message = records.error_fields(error)
    assert isinstance(error_type, str) and isinstance(message, str)
    assert len(message) <= records.MESSAGE_LIMIT


history_entries = st.fixed_dictionaries(
    {
        "timestamp": header_text,
        "condition": header_text,
        "approximateInvokeCount": st.integers(),
        "errorType": header_text,
        "errorMessage": st.text(max_size=2000),
    }
)


@HOSTILE
@given(
    header_values
    | st.lists(history_entries | json_values, max_size=30).map(json.dumps)
    | st.lists(history_entries, max_size=30).map(json.dumps)
)
def test_history_of_a_hostile_header_is_a_bounded_list(raw: str) -> None:
    history = records.history_of({records.HISTORY_HEADER: raw})
    assert len(history) <= records.HISTORY_LIMIT
    assert all(isinstance(a, records.Attempt) and len(a.errorMessage) <= records.MESSAGE_LIMIT for a in history)
    records.encode_history(history)


@HOSTILE
@given(messages, bodies, causes, st.booleans(), st.none() | st.just("fn--t0"))
def test_a_failure_record_is_always_written_and_redrives_the_event_byte_for_byte(
    message: Message, error: bytes, cause: LambdaError | None, truncate: bool, consumer: str | None
) -> None:
    event = _normalize(message)
    cloud_event = events.to_attributes(event) if event is not None else None
    raw = records.failure_record(
        "fn",
        message,  # type: ignore[arg-type]
        "req-1",
        "RetriesExhausted",
        error,
        cloud_event,
        cause=cause,
        consumer=consumer,
    )
    stored = StoredRecord(seq=5, subject="eventfn.dlq.fn", data=raw, headers=None)
    summary = dlq.summary(stored)
    assert summary.error_type != "Eventfn.UnreadableRecord", summary.error_message
    try:
        plan = dlq.plan_redrive(stored, "fn")
    except dlq.UnreadableRecord as exc:
        # Only a subject or header that could not be sent as it is; never the payload.
        assert "subject" in exc.args[1] or "header" in exc.args[1], exc.args[1]
        return
    assert plan.data == message.data
    assert plan.consumer == (consumer or "fn--async")
    truncated = records.failure_record(
        "fn",
        message,  # type: ignore[arg-type]
        "r",
        "c",
        error,
        cloud_event,
        cause=cause,
        consumer=consumer,
        truncate=True,
    )
    assert dlq.plan_redrive(StoredRecord(6, "eventfn.dlq.fn", truncated, None), "fn").original == ("EVENTFN", 7)


def test_a_failure_record_that_cannot_be_shaped_falls_back_to_the_bytes_as_base64() -> None:
    # A header value with a lone surrogate cannot be written as UTF-8 (nats-py never produces one; something
    # else unforeseen might): the last-resort record still keeps the event.
    message = Message("events.x", b"\xff[" * 3, {"k": "\ud800"})
    raw = records.failure_record("fn", message, "req-1", "RetriesExhausted", b"{}", None, cause=None, consumer="fn--t0")  # type: ignore[arg-type]
    record = json.loads(raw)
    assert record["responsePayload"]["errorType"] == "Eventfn.RecordFallback"
    assert "UnicodeEncodeError" in record["responsePayload"]["errorMessage"]
    plan = dlq.plan_redrive(StoredRecord(seq=5, subject="eventfn.dlq.fn", data=raw, headers=None), "fn")
    assert plan.data == message.data and plan.consumer == "fn--t0"


# -- the DLQ ----------------------------------------------------------------------------------------------------

#: Text with lone surrogates (which JSON can escape and msgspec refuses), and text without (control characters,
#: any other code point).
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
texts = st.text(max_size=12)
subjects = texts | st.sampled_from(["a b", "a\r\nb", "", "events.ok", "a\x1b[2Jb", "events.ok"])
streams = texts | st.sampled_from(["EVENTFN", "A.B", "*", "", "EVENTFN"])
consumers = texts | st.sampled_from(["fn--t0", "a.b", ">", "a b", "", "--", "fn--t0"])
#: The `eventfn` section of a record: the right types with hostile values, so that the fields are checked.
typed_sources = st.fixed_dictionaries(
    {"subject": subjects, "stream": streams, "stream_seq": st.integers()},
    optional={
        "consumer": st.none() | consumers,
        "truncated": st.booleans(),
        "data_base64": st.none() | texts | st.sampled_from(["!!!", "YQ", "YQ==", "\u00e9"]),
        "headers": st.none() | st.dictionaries(texts | st.sampled_from(["a:b", "ce-id", "Nats-Msg-Id"]), texts),
        "history": st.none() | st.lists(history_entries, max_size=3),
    },
)
#: ... and any shape at all.
any_sources = st.fixed_dictionaries(
    {},
    optional={
        "subject": any_text | json_values,
        "stream": any_text | json_values,
        "stream_seq": st.integers() | json_values,
        "consumer": consumers | json_values,
        "truncated": json_values,
        "data_base64": json_values,
        "headers": json_values,
        "history": st.lists(history_entries | json_values, max_size=3),
    },
)


def _record(source: dict[str, Any], context: Any, payload: bytes, response: bytes) -> bytes:
    """A DLQ record with `source` as its `eventfn` section and the payloads spliced in as raw bytes."""
    head = json.dumps({"timestamp": "t\u001b[0m", "requestContext": context, "eventfn": source}).encode()[:-1]
    return head + b', "requestPayload": ' + payload + b', "responsePayload": ' + response + b"}"


contexts = st.fixed_dictionaries({"condition": texts, "approximateInvokeCount": st.integers()})
finite_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
).map(lambda v: json.dumps(v).encode())
typed_records = st.builds(_record, typed_sources, contexts, finite_json, finite_json | st.just(b"null"))
hostile_records = bodies | st.builds(_record, any_sources, contexts | json_values, bodies, bodies)


def _list_and_plan(data: bytes, function: str) -> dlq.Redrive | None:
    """List and plan a redrive of a stored record; None if the redrive is refused (as documented)."""
    stored = StoredRecord(seq=9, subject="eventfn.dlq." + function, data=data, headers=None)
    summary = dlq.summary(stored)
    for text in (summary.function, summary.timestamp, summary.condition, summary.error_type, summary.subject):
        assert text.isprintable()
    assert summary.error_message.isprintable() and len(summary.error_message) <= dlq.SUMMARY_MESSAGE_LIMIT
    msgspec.json.encode(summary)  # `eventfn dlq ls --json`
    assert "\x1b" not in decoding.pretty(data)  # `eventfn dlq show`: no terminal escape gets through
    try:
        plan = dlq.plan_redrive(stored, "fn")
    except dlq.UnreadableRecord:
        return None
    # Only through one of the function's own mappings, reading back only from the events stream.
    assert plan.consumer.startswith("fn--") and all(c.isascii() and (c.isalnum() or c in "-_") for c in plan.consumer)
    assert plan.headers[records.SUBJECT_HEADER].isprintable()
    for key, value in plan.headers.items():
        assert key.isprintable() and " " not in key and ":" not in key and "\r" not in value and "\n" not in value
        value.encode()  # sendable
    assert plan.original is None or (plan.original[0] == "EVENTFN" and plan.original[1] >= 1)
    return plan


@HOSTILE
@given(hostile_records, st.text(max_size=8))
def test_any_bytes_in_the_dlq_are_listed_as_one_line_and_redriven_or_refused(data: bytes, function: str) -> None:
    _list_and_plan(data, function)


@HOSTILE
@given(typed_records)
def test_a_record_with_hostile_fields_is_redriven_only_with_fields_that_can_be_sent(data: bytes) -> None:
    _list_and_plan(data, "fn")


# -- the worker and sync invoke ---------------------------------------------------------------------------------


@HOSTILE
@given(bodies, st.booleans())
def test_the_worker_decodes_an_event_or_raises_unmarshal_error(payload: bytes, is_json: bool) -> None:
    try:
        runtime.decode_event(payload, is_json)
    except runtime.UnmarshalError as exc:
        body, typed = runtime.unmarshal_error(exc, "req-1")
        error = json.loads(body)
        assert (typed.type, typed.message) == (error["errorType"], error["errorMessage"])
        assert error["errorType"] == "Runtime.UnmarshalError"
        assert error["errorMessage"].startswith("Unable to unmarshal input: the event could not be parsed as JSON: ")


def test_a_body_nested_too_deep_is_an_unmarshal_error_even_where_text_is_allowed() -> None:
    poison = b"[" * 1000 + b"]" * 1000
    for is_json in (True, False):
        try:
            runtime.decode_event(poison, is_json)
        except runtime.UnmarshalError as exc:
            assert "nested too deeply" in str(exc)
        else:
            raise AssertionError("decoded")
    assert runtime.decode_event(b"[" * 10 + b"]" * 10, False) == [[[[[[[[[[]]]]]]]]]]
    assert runtime.decode_event(b"not json", False) == "not json"


@HOSTILE
@given(
    header_values
    | st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode())
    | bodies.map(lambda b: base64.b64encode(b).decode())
)
def test_a_client_context_is_a_json_object_or_refused_with_unreadable_data(raw: str) -> None:
    try:
        data = api._client_context({api.CLIENT_CONTEXT_HEADER: raw})
    except UnreadableData:
        return
    assert data is None or isinstance(decoding.json_value(data), dict)


def test_a_record_of_json_at_the_depth_limit_reads_back_and_redrives_byte_for_byte() -> None:
    # Around the recursion limit the writer may read a payload as JSON (and embed it) where a reader one level
    # deeper could not: every depth across the boundary must still list and redrive.
    for depth in range(800, 1050):
        data = b"[" * depth + b"]" * depth
        raw = records.failure_record(
            "fn", Message("s", data, None), "r", "c", b"{}", None, cause=None, consumer="fn--t0"
        )  # type: ignore[arg-type]
        stored = StoredRecord(seq=1, subject="eventfn.dlq.fn", data=raw, headers=None)
        assert dlq.summary(stored).error_type == "?", depth
        assert dlq.plan_redrive(stored, "fn").data == data, depth
