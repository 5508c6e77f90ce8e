"""The retry policy as a pure function (`decide`, `backoff`) and the dead-letter record (`failure_record`)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventfn.config import RetryPolicy
from eventfn.invoke.invocation import LambdaError
from eventfn.sources.records import failure_record
from eventfn.sources.retry import Ack, DeadLetter, Retry, backoff, decide

POLICY = RetryPolicy(max_attempts=3, base_delay=2.0, max_delay=10.0, max_event_age=3600.0)


def test_success_is_acked() -> None:
    assert decide(True, 1, 0.0, POLICY) == Ack()


def test_success_is_acked_even_when_retries_are_used_up_and_the_event_is_old() -> None:
    assert decide(True, 99, 10 * POLICY.max_event_age, POLICY) == Ack()


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_failure_with_retries_left_is_retried(attempt: int) -> None:
    assert isinstance(decide(False, attempt, 0.0, POLICY), Retry)


@pytest.mark.parametrize(("attempt", "expected_base"), [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (30, 10.0)])
def test_backoff_doubles_from_base_delay_and_is_capped(attempt: int, expected_base: float) -> None:
    assert backoff(attempt, POLICY, rand=lambda: 0.0) == pytest.approx(expected_base / 2)
    assert backoff(attempt, POLICY, rand=lambda: 0.5) == pytest.approx(expected_base * 3 / 4)
    assert backoff(attempt, POLICY, rand=lambda: 0.999999) == pytest.approx(expected_base, rel=1e-5)


@pytest.mark.parametrize("attempt", [1, 2, 3])
@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.75, 0.999999])
def test_retry_delay_lies_within_half_to_full_of_the_capped_exponential(attempt: int, r: float) -> None:
    d = min(POLICY.max_delay, POLICY.base_delay * 2 ** (attempt - 1))
    decision = decide(False, attempt, 0.0, POLICY, rand=lambda: r)
    assert isinstance(decision, Retry)
    assert d / 2 <= decision.delay <= d
    assert decision.delay == pytest.approx(d / 2 + r * d / 2)


def test_retry_delay_uses_random_jitter_by_default() -> None:
    delays = {decide(False, 1, 0.0, POLICY).delay for _ in range(50)}  # type: ignore[union-attr]
    assert all(1.0 <= d <= 2.0 for d in delays)
    assert len(delays) > 1


def test_default_policy_is_lambda_async_two_retries() -> None:
    policy = RetryPolicy()
    assert isinstance(decide(False, 1, 0.0, policy), Retry)
    assert isinstance(decide(False, 2, 0.0, policy), Retry)
    assert decide(False, 3, 0.0, policy) == DeadLetter("RetriesExhausted")


def test_failure_after_max_attempts_retries_is_dead_lettered() -> None:
    # attempt 1 is the first invocation; max_attempts=3 retries make attempt 4 the last one.
    assert decide(False, POLICY.max_attempts + 1, 0.0, POLICY) == DeadLetter("RetriesExhausted")
    assert decide(False, POLICY.max_attempts + 5, 0.0, POLICY) == DeadLetter("RetriesExhausted")


def test_zero_retries_dead_letters_the_first_failure() -> None:
    assert decide(False, 1, 0.0, RetryPolicy(max_attempts=0)) == DeadLetter("RetriesExhausted")


def test_event_older_than_max_event_age_is_dead_lettered_even_with_retries_left() -> None:
    assert decide(False, 1, POLICY.max_event_age, POLICY) == DeadLetter("EventAgeExceeded")
    assert decide(False, 1, POLICY.max_event_age + 1, POLICY) == DeadLetter("EventAgeExceeded")
    assert isinstance(decide(False, 1, POLICY.max_event_age - 1, POLICY), Retry)


def test_event_age_is_reported_before_exhausted_retries() -> None:
    assert decide(False, 99, POLICY.max_event_age + 1, POLICY) == DeadLetter("EventAgeExceeded")


def test_backoff_is_capped_for_very_late_attempts() -> None:
    policy = RetryPolicy(max_attempts=10_000, base_delay=1.0, max_delay=60.0)
    decision = decide(False, 2000, 0.0, policy, rand=lambda: 1.0)
    assert decision == Retry(60.0)


# -- the dead-letter record ------------------------------------------------------------------------------------


@dataclass
class FakeDelivery:
    """The plain data `Delivery` exposes (no settle methods are used by `failure_record`)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    stream: str = "EVENTS"
    stream_seq: int = 17
    delivered: int = 3


ERROR = json.dumps(
    {
        "errorMessage": "boom",
        "errorType": "ValueError",
        "requestId": "r-1",
        "stackTrace": ['  File "fn.py", line 2, in handler\n'],
    }
).encode()


def record(
    delivery: FakeDelivery,
    *,
    condition: str = "RetriesExhausted",
    error: bytes = ERROR,
    cloud_event: dict[str, str] | None = None,
) -> dict[str, Any]:
    cause = LambdaError(type="ValueError", message="boom")
    raw = failure_record("orders", delivery, "req-123", condition, error, cloud_event, cause=cause)  # type: ignore[arg-type]
    value = json.loads(raw)
    assert isinstance(value, dict)
    return value


def test_failure_record_has_lambda_destination_shape() -> None:
    rec = record(FakeDelivery("events.orders.new", b'{"order": 42}', None))
    assert set(rec) >= {
        "version",
        "timestamp",
        "requestContext",
        "requestPayload",
        "responseContext",
        "responsePayload",
    }
    assert rec["version"] == "1.0"
    assert rec["requestContext"] == {
        "requestId": "req-123",
        "functionArn": "arn:aws:lambda:local:000000000000:function:orders",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert rec["requestPayload"] == {"order": 42}
    assert rec["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"}
    assert rec["responsePayload"] == json.loads(ERROR)


def test_failure_record_timestamp_is_current_utc_with_milliseconds() -> None:
    rec = record(FakeDelivery("events.x", b"{}", None))
    stamp = rec["timestamp"]
    assert stamp.endswith("Z")
    assert len(stamp.split(".")[1]) == 4  # "mmmZ"
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - parsed) < timedelta(seconds=5)


def test_failure_record_invoke_count_and_condition_come_from_the_delivery() -> None:
    rec = record(FakeDelivery("events.x", b"{}", None, delivered=1), condition="EventAgeExceeded")
    assert rec["requestContext"]["approximateInvokeCount"] == 1
    assert rec["requestContext"]["condition"] == "EventAgeExceeded"


def test_failure_record_keeps_what_is_needed_to_redrive_the_event() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "e-1"}
    cloud_event = {"id": "e-1", "source": "/s", "type": "t", "specversion": "1.0"}
    rec = record(
        FakeDelivery("events.orders.new", b'{"a": 1}', headers, stream="EVENTS", stream_seq=99), cloud_event=cloud_event
    )
    assert rec["eventfn"] == {
        "subject": "events.orders.new",
        "stream": "EVENTS",
        "stream_seq": 99,
        "headers": headers,
        "cloud_event": cloud_event,
    }


def test_failure_record_text_payload_is_a_string() -> None:
    rec = record(FakeDelivery("events.x", b"hello there", None))
    assert rec["requestPayload"] == "hello there"
    assert "data_base64" not in rec["eventfn"]


def test_failure_record_binary_payload_is_null_with_base64_copy() -> None:
    data = b"\xff\xfe\x00binary"
    rec = record(FakeDelivery("events.x", data, None))
    assert rec["requestPayload"] is None
    assert base64.b64decode(rec["eventfn"]["data_base64"]) == data


def test_failure_record_empty_payload_is_null_without_base64() -> None:
    rec = record(FakeDelivery("events.x", b"", None))
    assert rec["requestPayload"] is None
    assert "data_base64" not in rec["eventfn"]
    assert "headers" not in rec["eventfn"]


def test_failure_record_non_json_error_is_kept_as_text() -> None:
    rec = record(FakeDelivery("events.x", b"{}", None), error=b"worker crashed")
    assert rec["responsePayload"] == "worker crashed"
