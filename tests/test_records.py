"""Lambda's JSON shapes as `eventfn.sources.records` writes and reads them: partial batch responses, batch records
(SQS records; `tests/test_powertools.py` has Powertools parse them),
dead-letter (failure) records with their attempt history, and on-success destination records."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventfn.invoke.invocation import LambdaError
from eventfn.sources.records import (
    HISTORY_HEADER,
    HISTORY_LIMIT,
    MESSAGE_LIMIT,
    SUBJECT_ATTRIBUTE,
    SUBJECT_HEADER,
    Attempt,
    Receipt,
    batch_payload,
    encode_history,
    failure_record,
    history_of,
    item_failures,
    record_for,
    source_arn,
    success_record,
)
from eventfn.subjects import FUNCTION_ARN_PREFIX

IDS = {"id-1", "id-2", "id-3"}
SOURCE_ARN = "arn:eventfn:nats:local:000000000000:consumer/EVENTFN/orders--t0"
#: 2023-11-14T22:13:20.123456789Z
SENT_NS = 1_700_000_000_123_456_789
#: A third of a second later, in seconds (as `Delivery.received_at`).
RECEIVED_AT = 1_700_000_000.456


@dataclass
class Stored:
    """A stand-in with the attributes of the `records.StoredMessage` protocol."""

    subject: str = "events.orders.created"
    data: bytes = b'{"order": 42}'
    headers: dict[str, str] | None = None
    stream: str = "EVENTFN"
    stream_seq: int = 17
    delivered: int = 1
    timestamp_ns: int = SENT_NS
    received_at: float = RECEIVED_AT


ERROR = json.dumps({"errorMessage": "no stock", "errorType": "ValueError", "requestId": "r-1"}).encode()
CAUSE = LambdaError(type="ValueError", message="no stock")


# -- item_failures: Lambda's ReportBatchItemFailures rules -------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"   ",
        b"null",
        b"{}",
        b'{"statusCode": 200}',
        b'{"batchItemFailures": []}',
        b'{"batchItemFailures": null}',
    ],
    ids=["empty", "blank", "null", "empty-object", "no-key", "empty-list", "null-list"],
)
def test_item_failures_treats_null_empty_and_keyless_responses_as_full_success(response: bytes) -> None:
    assert item_failures(response, IDS) == set()


@pytest.mark.parametrize(
    "response",
    [
        b'{"batchItemFailures": "id-1"}',
        b'{"batchItemFailures": {"itemIdentifier": "id-1"}}',
        b'{"batchItemFailures": 1}',
        b'{"batchItemFailures": ["id-1"]}',
        b'{"batchItemFailures": [{"itemIdentifier": "id-1"}, null]}',
        b'{"batchItemFailures": [{}]}',
        b'{"batchItemFailures": [{"itemId": "id-1"}]}',
        b'{"batchItemFailures": [{"itemIdentifier": ""}]}',
        b'{"batchItemFailures": [{"itemIdentifier": null}]}',
        b'{"batchItemFailures": [{"itemIdentifier": 1}]}',
        b'{"batchItemFailures": [{"itemIdentifier": "not-in-batch"}]}',
        b'{"batchItemFailures": [{"itemIdentifier": "id-1"}, {"itemIdentifier": "not-in-batch"}]}',
        b'{"batchItemFailures": [',
    ],
    ids=[
        "string-not-list",
        "object-not-list",
        "number-not-list",
        "item-not-object",
        "one-item-null",
        "missing-identifier",
        "misspelt-key",
        "empty-identifier",
        "null-identifier",
        "numeric-identifier",
        "unknown-identifier",
        "one-unknown-among-known",
        "invalid-json",
    ],
)
def test_item_failures_fails_the_whole_batch_for_a_malformed_response(response: bytes) -> None:
    assert item_failures(response, IDS) is None


def test_item_failures_returns_exactly_the_reported_identifiers() -> None:
    response = b'{"batchItemFailures": [{"itemIdentifier": "id-3"}, {"itemIdentifier": "id-1"}]}'
    assert item_failures(response, IDS) == {"id-1", "id-3"}


def test_item_failures_accepts_a_repeated_identifier_and_extra_keys() -> None:
    response = json.dumps(
        {
            "batchItemFailures": [{"itemIdentifier": "id-2", "reason": "x"}, {"itemIdentifier": "id-2"}],
            "other": 1,
        }
    ).encode()
    assert item_failures(response, IDS) == {"id-2"}


def test_item_failures_can_fail_every_item() -> None:
    response = json.dumps({"batchItemFailures": [{"itemIdentifier": i} for i in sorted(IDS)]}).encode()
    assert item_failures(response, IDS) == IDS


# -- batch records -----------------------------------------------------------------------------------------------------


def batch(*messages: Stored) -> list[dict[str, Any]]:
    payload = json.loads(batch_payload([record_for(m, f"mid-{i}", SOURCE_ARN) for i, m in enumerate(messages)]))
    assert list(payload) == ["Records"]
    records = payload["Records"]
    assert isinstance(records, list)
    return records


def attribute(value: str) -> dict[str, object]:
    return {"stringValue": value, "stringListValues": [], "binaryListValues": [], "dataType": "String"}


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def test_batch_payload_is_records_in_the_given_order() -> None:
    records = batch(Stored(data=b'{"n": 0}', stream_seq=5), Stored(data=b'{"n": 1}', stream_seq=6))
    assert [r["messageId"] for r in records] == ["mid-0", "mid-1"]
    assert [json.loads(r["body"]) for r in records] == [{"n": 0}, {"n": 1}]


def test_batch_record_is_a_whole_sqs_record_with_string_attributes() -> None:
    [rec] = batch(Stored(stream_seq=17, delivered=1))
    assert rec == {
        "messageId": "mid-0",
        "receiptHandle": "eventfn1/EVENTFN/orders--t0/17/1",
        "body": '{"order": 42}',  # the data as text, not decoded, as SQS gives it
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1700000000123",  # milliseconds since the epoch
            "SenderId": "nats",
            "ApproximateFirstReceiveTimestamp": "1700000000456",  # when this (first) delivery was received
            "SequenceNumber": "17",
        },
        "messageAttributes": {"Eventfn-Subject": attribute("events.orders.created")},
        "md5OfBody": md5('{"order": 42}'),
        "eventSource": "aws:sqs",
        "eventSourceARN": SOURCE_ARN,
        "awsRegion": "local",
        "subject": "events.orders.created",
    }


def test_batch_record_of_a_redelivery_counts_receives_and_dates_the_first_no_later_than_the_store() -> None:
    [rec] = batch(Stored(stream_seq=17, delivered=3, received_at=RECEIVED_AT + 60))
    assert rec["attributes"]["ApproximateReceiveCount"] == "3"
    # eventfn keeps no state per event: the earliest a later delivery's first receive can have been is the store.
    assert rec["attributes"]["ApproximateFirstReceiveTimestamp"] == rec["attributes"]["SentTimestamp"]
    assert rec["receiptHandle"] == "eventfn1/EVENTFN/orders--t0/17/3"


def test_receipt_handle_names_the_stream_consumer_sequence_and_delivery() -> None:
    [first, again] = batch(Stored(stream_seq=9, delivered=1), Stored(stream_seq=9, delivered=2))
    assert Receipt.parse(first["receiptHandle"]) == Receipt("EVENTFN", "orders--t0", 9, 1)
    assert Receipt.parse(again["receiptHandle"]) == Receipt("EVENTFN", "orders--t0", 9, 2)
    assert Receipt("EVENTFN", "orders--t0", 9, 2).handle() == again["receiptHandle"]
    assert source_arn("EVENTFN", "orders--t0") == SOURCE_ARN


@pytest.mark.parametrize(
    "handle",
    [
        "",
        "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a",
        "eventfn1/EVENTFN/c/1",
        "eventfn1/EVENTFN/c/1/2/3",
        "eventfn1//c/1/2",
        "eventfn1/EVENTFN/c/x/2",
        "eventfn1/EVENTFN/c/1/²",
        "eventfn2/EVENTFN/c/1/2",
    ],
)
def test_receipt_parse_refuses_a_handle_eventfn_did_not_write(handle: str) -> None:
    assert Receipt.parse(handle) is None


def test_batch_record_md5_of_body_is_sqs_digest_of_the_body_text() -> None:
    [ascii_, unicode, empty, binary] = batch(
        Stored(data=b"Test message."), Stored(data="grüße €".encode()), Stored(data=b""), Stored(data=b"\xff\x00")
    )
    assert ascii_["md5OfBody"] == "e4e68fb7bd0e697a0ae8f1bb342846b3"  # SQS's documented example
    assert unicode["md5OfBody"] == md5("grüße €")
    assert empty["md5OfBody"] == md5("")
    assert binary["md5OfBody"] == md5(binary["body"])  # the base64 text is the body a handler gets


def test_batch_record_body_is_text_for_utf8_data() -> None:
    [plain, unicode] = batch(Stored(data=b"plain words, not JSON"), Stored(data="grüße €".encode()))
    assert plain["body"] == "plain words, not JSON"
    assert unicode["body"] == "grüße €"
    assert "bodyEncoding" not in plain and "bodyEncoding" not in unicode


def test_batch_record_body_is_base64_with_body_encoding_for_non_utf8_data() -> None:
    data = b"\xff\xfe\x00\x01binary"
    [rec] = batch(Stored(data=data))
    assert rec["bodyEncoding"] == "base64"
    assert base64.b64decode(rec["body"]) == data


def test_batch_record_empty_data_is_an_empty_body() -> None:
    [rec] = batch(Stored(data=b""))
    assert rec["body"] == ""
    assert "bodyEncoding" not in rec


def test_batch_record_subject_is_the_original_one_for_a_redriven_event() -> None:
    redriven = Stored(
        subject="eventfn.redrive.orders--t0", headers={SUBJECT_HEADER: "events.orders.created", "Nats-Msg-Id": "r:1"}
    )
    [rec] = batch(redriven)
    assert rec["subject"] == "events.orders.created"
    assert rec["messageAttributes"] == {SUBJECT_ATTRIBUTE: attribute("events.orders.created")}


def test_batch_record_subject_is_the_delivery_subject_without_the_header() -> None:
    [rec] = batch(Stored(subject="events.orders.paid", headers={"trace": "t-1"}))
    assert rec["subject"] == "events.orders.paid"
    assert rec["messageAttributes"][SUBJECT_ATTRIBUTE] == attribute("events.orders.paid")


def test_batch_record_message_attributes_are_user_headers_without_nats_and_eventfn_ones() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "e-1",
        "content-type": "application/json",
        "trace": "t-1",
        "Nats-Msg-Id": "dedupe-1",
        "Nats-Expected-Stream": "EVENTFN",
        SUBJECT_HEADER: "events.orders.created",
        HISTORY_HEADER: "[]",
    }
    [rec] = batch(Stored(headers=headers))
    assert rec["messageAttributes"] == {
        "ce-specversion": attribute("1.0"),
        "ce-id": attribute("e-1"),
        "content-type": attribute("application/json"),
        "trace": attribute("t-1"),
        SUBJECT_ATTRIBUTE: attribute("events.orders.created"),
    }


def test_a_header_cannot_pose_as_the_subject_attribute() -> None:
    """The subject attribute is named like eventfn's own headers, which never become attributes."""
    [rec] = batch(Stored(subject="events.orders.paid", headers={SUBJECT_ATTRIBUTE: "events.admin.x", "a": "b"}))
    assert rec["messageAttributes"] == {"a": attribute("b"), SUBJECT_ATTRIBUTE: attribute("events.orders.paid")}


# -- failure records: the attempt history ------------------------------------------------------------------------------


def failure(message: Stored, *, consumer: str | None, condition: str = "RetriesExhausted") -> dict[str, Any]:
    value = json.loads(
        failure_record("orders", message, "req-1", condition, ERROR, None, cause=CAUSE, consumer=consumer)
    )
    assert isinstance(value, dict)
    return value


def earlier(n: int) -> Attempt:
    return Attempt(f"2024-01-01T00:00:{n:02d}.000Z", "RetriesExhausted", 3, "KeyError", f"earlier {n}")


def test_failure_record_without_consumer_has_no_history() -> None:
    rec = failure(Stored(delivered=3), consumer=None)
    assert "history" not in rec["eventfn"]
    assert "consumer" not in rec["eventfn"]


def test_failure_record_of_a_first_failure_has_this_attempt_as_its_history() -> None:
    rec = failure(Stored(delivered=3), consumer="orders--t0")
    assert rec["eventfn"]["consumer"] == "orders--t0"
    [attempt] = rec["eventfn"]["history"]
    assert attempt == {
        "timestamp": rec["timestamp"],
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
        "errorType": "ValueError",
        "errorMessage": "no stock",
    }


def test_failure_record_appends_this_attempt_to_the_history_header_of_a_redriven_event() -> None:
    headers = {HISTORY_HEADER: encode_history([earlier(1), earlier(2)]), SUBJECT_HEADER: "events.orders.created"}
    rec = failure(
        Stored(subject="eventfn.redrive.orders--t0", headers=headers, delivered=1),
        consumer="orders--t0",
        condition="EventAgeExceeded",
    )
    history = rec["eventfn"]["history"]
    assert [h["errorMessage"] for h in history] == ["earlier 1", "earlier 2", "no stock"]
    assert history[-1]["condition"] == "EventAgeExceeded"
    assert history[-1]["approximateInvokeCount"] == 1
    assert rec["eventfn"]["subject"] == "events.orders.created"


def test_failure_record_history_keeps_the_newest_entries_up_to_the_limit() -> None:
    previous = [earlier(n) for n in range(HISTORY_LIMIT)]
    headers = {HISTORY_HEADER: encode_history(previous)}
    rec = failure(Stored(headers=headers), consumer="orders--t0")
    history = rec["eventfn"]["history"]
    assert len(history) == HISTORY_LIMIT == 10
    assert history[0]["errorMessage"] == "earlier 1"  # the oldest is dropped
    assert history[-1]["errorMessage"] == "no stock"


def test_failure_record_ignores_an_unreadable_history_header() -> None:
    rec = failure(Stored(headers={HISTORY_HEADER: "not json"}), consumer="orders--t0")
    assert [h["errorMessage"] for h in rec["eventfn"]["history"]] == ["no stock"]


def test_history_header_round_trips_and_is_capped() -> None:
    attempts = [earlier(n) for n in range(HISTORY_LIMIT + 3)]
    assert history_of({HISTORY_HEADER: encode_history(attempts)}) == attempts[-HISTORY_LIMIT:]
    assert history_of(None) == [] and history_of({}) == []


def test_failure_record_history_takes_the_typed_error_not_its_bytes() -> None:
    cause = LambdaError(type="Runtime.ExitError", message="x" * 5000)
    raw = failure_record(
        "orders", Stored(), "req-1", "RetriesExhausted", b"worker crashed", None, cause=cause, consumer="c"
    )
    record = json.loads(raw)
    [attempt] = record["eventfn"]["history"]
    assert attempt["errorType"] == "Runtime.ExitError"
    assert attempt["errorMessage"] == "x" * MESSAGE_LIMIT  # cut to 1 KB, as a redriven header's are
    assert record["responsePayload"] == "worker crashed"  # the bytes are the response, as they were


def test_failure_record_history_of_an_error_without_fields() -> None:
    raw = failure_record("orders", Stored(), "req-1", "RetriesExhausted", b"{}", None, cause=None, consumer="c")
    [attempt] = json.loads(raw)["eventfn"]["history"]
    assert (attempt["errorType"], attempt["errorMessage"]) == ("?", "")


# -- success records ---------------------------------------------------------------------------------------------------


def test_success_record_has_lambdas_on_success_shape_without_function_error() -> None:
    raw = success_record("orders", "req-9", b'{"order": 42}', b'{"status": "ok"}', 2)
    rec = json.loads(raw)
    assert rec["version"] == "1.0"
    assert rec["requestContext"] == {
        "requestId": "req-9",
        "functionArn": FUNCTION_ARN_PREFIX + "orders",
        "condition": "Success",
        "approximateInvokeCount": 2,
    }
    assert rec["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert "functionError" not in rec["responseContext"]
    assert rec["requestPayload"] == {"order": 42}
    assert rec["responsePayload"] == {"status": "ok"}
    assert rec.get("eventfn") is None
    stamp = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - stamp) < timedelta(seconds=5)


def test_success_record_payloads_keep_text_and_null() -> None:
    rec = json.loads(success_record("orders", "req-9", b"plain text", b"null", 1))
    assert rec["requestPayload"] == "plain text"
    assert rec["responsePayload"] is None
    binary = json.loads(success_record("orders", "req-9", b"\xff\x00", b'"done"', 1))
    assert binary["requestPayload"] is None
    assert binary["responsePayload"] == "done"
