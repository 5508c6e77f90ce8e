"""Queue records as Powertools for AWS Lambda reads them: its parser's `SqsModel` and its batch processors
(`BatchProcessor(EventType.SQS)`, and `SqsFifoPartialProcessor` on a FIFO queue) take them unchanged. The unit tests
parse what `queue_records.QueueShape` writes; the end-to-end test runs plain Powertools code under `eventfn serve` on a
FIFO queue fed by plain publishes (what `nats pub -H` sends)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    SqsFifoPartialProcessor,
    process_partial_response,
)
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import SqsModel
from nats.aio.client import Client

from eventfn.sources.queue_records import QueueShape
from eventfn.sources.records import Receipt
from eventfn.testing import Serve, write_handler


@dataclass
class Delivered:
    """A stand-in with the attributes of `records.DeliveredMessage`."""

    data: bytes
    headers: dict[str, str] | None = None
    subject: str = "eventfn.queue.orders"
    stream: str = "EVENTFN_Q_orders"
    stream_seq: int = 1
    delivered: int = 1
    timestamp_ns: int = 1_700_000_000_123_456_789
    received_at: float = 1_700_000_000.5


def event_of(
    *messages: Delivered, fifo: bool = False, content_based: bool = False, queue: str = "orders"
) -> dict[str, Any]:
    """The handler's event for `messages` of queue `queue`, as JSON decodes it in the worker."""
    shape = QueueShape(
        queue,
        fifo=fifo,
        stream="EVENTFN_Q_orders",
        consumer="ship--t0",
        receive_count=lambda m: m.delivered,
        content_based_deduplication=content_based,
    )
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(len(messages))]
    value = json.loads(shape.batch(messages, ids, "ignored"))
    assert isinstance(value, dict)
    return value


def test_sqs_model_parses_standard_queue_records_without_eventfn_extras() -> None:
    event = event_of(
        Delivered(b'{"order": 1}', stream_seq=7),
        Delivered(b"\xff binary", stream_seq=8, delivered=3),
        Delivered(b"with attributes", {"trace": "t-1", "Nats-Msg-Id": "m", "Delay-Seconds": "0"}, stream_seq=9),
    )
    first, binary, attributed = parse(event=event, model=SqsModel).Records
    assert first.eventSourceARN == "arn:aws:sqs:local:000000000000:orders"
    assert first.awsRegion == "local" and first.eventSource == "aws:sqs"
    assert first.md5OfBody == hashlib.md5(b'{"order": 1}').hexdigest()
    assert first.attributes.ApproximateReceiveCount == "1"
    assert first.attributes.SentTimestamp.timestamp() == pytest.approx(1_700_000_000.123)
    assert first.attributes.ApproximateFirstReceiveTimestamp.timestamp() == pytest.approx(1_700_000_000.5)
    assert first.attributes.SequenceNumber is None and first.attributes.MessageGroupId is None
    assert Receipt.parse(first.receiptHandle) == Receipt("EVENTFN_Q_orders", "ship--t0", 7, 1)
    assert binary.attributes.ApproximateReceiveCount == "3"
    # Received before, the first receive's time is not kept: the time it was sent is the earliest it can be.
    assert binary.attributes.ApproximateFirstReceiveTimestamp == binary.attributes.SentTimestamp
    assert set(attributed.messageAttributes) == {"trace"}  # not NATS's headers, nor SQS's own properties
    assert attributed.messageAttributes["trace"].stringValue == "t-1"
    # Exactly Lambda's keys: no NATS subject as in a plain subject's records (bodyEncoding only for binary data).
    assert set(event["Records"][0]) == {
        "messageId",
        "receiptHandle",
        "body",
        "attributes",
        "messageAttributes",
        "md5OfBody",
        "eventSource",
        "eventSourceARN",
        "awsRegion",
    }
    assert event["Records"][1]["bodyEncoding"] == "base64"


def test_fifo_records_carry_the_group_sequence_and_deduplication_id() -> None:
    event = event_of(
        Delivered(b"a", {"Message-Group-Id": "g-1", "Message-Deduplication-Id": "d-1"}, stream_seq=41),
        Delivered(b"b", {"Message-Group-Id": "g-2", "Nats-Msg-Id": "from-nats-pub"}, stream_seq=42),
        Delivered(b"c", {"Message-Group-Id": "g-2"}, stream_seq=43),
        fifo=True,
        content_based=True,
    )
    records = parse(event=event, model=SqsModel).Records
    assert [r.attributes.MessageGroupId for r in records] == ["g-1", "g-2", "g-2"]
    assert [r.attributes.SequenceNumber for r in records] == ["41", "42", "43"]
    assert [r.attributes.MessageDeduplicationId for r in records] == [
        "d-1",
        "from-nats-pub",
        hashlib.sha256(b"c").hexdigest(),  # content-based: the body's SHA-256
    ]
    assert all(r.messageAttributes == {} for r in records)


def test_a_moved_message_names_the_queue_it_came_from() -> None:
    event = event_of(Delivered(b"x", {"Eventfn-Source-Queue": "orders", "k": "v"}), queue="orders-dlq")
    [record] = parse(event=event, model=SqsModel).Records
    assert record.attributes.DeadLetterQueueSourceArn == "arn:aws:sqs:local:000000000000:orders"
    assert set(record.messageAttributes) == {"k"}


def test_batch_processors_report_failures_by_message_id() -> None:
    event = event_of(
        *(Delivered(str(n).encode(), {"Message-Group-Id": "g"}, stream_seq=n) for n in range(4)), fifo=True
    )

    def record_handler(record: Any) -> None:
        if record.body == "1":
            raise ValueError("no")

    standard = process_partial_response(
        event=event, record_handler=record_handler, processor=BatchProcessor(event_type=EventType.SQS)
    )
    ids = [r["messageId"] for r in event["Records"]]
    assert standard == {"batchItemFailures": [{"itemIdentifier": ids[1]}]}
    fifo = process_partial_response(event=event, record_handler=record_handler, processor=SqsFifoPartialProcessor())
    assert fifo == {"batchItemFailures": [{"itemIdentifier": i} for i in ids[1:]]}  # stops at the first failure


# -- end to end --------------------------------------------------------------------------------------------------------

FIFO_HANDLER = """
    # /// eventfn
    # timeout = 2
    # [[triggers]]
    # type = "queue"
    # queue = "jobs"
    # batch_size = 10
    # batch_window = 0.5
    # ///
    '''Plain Lambda code: Powertools' FIFO batch processor, with its parser's SqsModel.'''
    import json

    from aws_lambda_powertools.utilities.batch import SqsFifoPartialProcessor, process_partial_response
    from aws_lambda_powertools.utilities.parser import parse
    from aws_lambda_powertools.utilities.parser.models import SqsModel

    import _probe

    processor = SqsFifoPartialProcessor(skip_group_on_error=True)


    def record_handler(record):
        count = record.attributes.approximate_receive_count
        _probe.report("probe.jobs", f"{record.body} {count}")
        if record.body == "a1" and count == "1":
            raise ValueError("not yet")


    def handler(event, context):
        parse(event=event, model=SqsModel)
        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
"""


@pytest.mark.e2e
async def test_powertools_fifo_processor_on_a_fifo_queue_holds_the_failed_group_only(
    tmp_path: Path,
    handlers: Path,
    serve: Callable[..., Awaitable[Serve]],
    nc: Client,
    probe: Callable[[str], Any],
) -> None:
    (tmp_path / "eventfn.toml").write_text("[queues.jobs]\nfifo = true\nvisibility_timeout = 2\n", encoding="utf-8")
    write_handler(handlers, "jobs", FIFO_HANDLER)
    seen = await probe("probe.jobs")
    await serve(extra_args=["--config", str(tmp_path / "eventfn.toml")])
    for n in range(3):
        for group in ("a", "b"):
            body = f"{group}{n}"
            # What `nats pub -H Message-Group-Id:a -H Nats-Msg-Id:a0 eventfn.queue.jobs a0` sends.
            headers = {"Message-Group-Id": group, "Nats-Msg-Id": body}
            await nc.publish("eventfn.queue.jobs", body.encode(), headers=headers)
    got = await seen.wait_for(7)
    a = [t for t in got if t.startswith("a")]
    b = [t for t in got if t.startswith("b")]
    assert b == ["b0 1", "b1 1", "b2 1"]
    # a1 failed: a2, skipped in that batch (Powertools reported it too), came back after it, not counted as a
    # receive (its handler never ran: a group's failure does not drive the rest of it to the DLQ).
    assert a == ["a0 1", "a1 1", "a1 2", "a2 1"]
