"""Batch records as Powertools for AWS Lambda reads them: its parser's `SqsModel` and its batch processor take
eventfn's batches unchanged, and a partial failure Powertools reports retries that item alone.

The unit tests parse what `records.batch_payload` writes; the end-to-end test runs plain Lambda code built on
Powertools under `eventfn serve`, fed by plain publishes (what `nats pub` sends).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import SqsModel, SqsRecordModel
from nats.aio.client import Client

from eventfn.sources.records import SUBJECT_ATTRIBUTE, Receipt, batch_payload, record_for, source_arn
from eventfn.testing import Serve, mapping_stats, wait_until, write_handler

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ARN = source_arn("EVENTFN", "orders--t0")


@dataclass
class Delivered:
    """A stand-in with the attributes of `records.DeliveredMessage`."""

    data: bytes
    subject: str = "events.orders.created"
    headers: dict[str, str] | None = None
    stream: str = "EVENTFN"
    stream_seq: int = 1
    delivered: int = 1
    timestamp_ns: int = 1_700_000_000_123_456_789
    received_at: float = 1_700_000_000.5


def event_of(*messages: Delivered) -> dict[str, Any]:
    """The handler's event for a batch of `messages`, as JSON decodes it in the worker."""
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(len(messages))]
    value = json.loads(batch_payload([record_for(m, id_, SOURCE_ARN) for m, id_ in zip(messages, ids, strict=True)]))
    assert isinstance(value, dict)
    return value


MIXED = (
    Delivered(b'{"order": 1}', stream_seq=11),
    Delivered(b"\xff\xfe binary \x00", stream_seq=12, delivered=2),  # not UTF-8: base64 with `bodyEncoding`
    Delivered(
        b"plain text",
        subject="events.orders.paid",
        headers={"trace": "t-1", "ce-type": "order.paid", "Nats-Msg-Id": "d-1"},  # user headers, and NATS's own
        stream_seq=13,
    ),
)


def test_sqs_model_parses_a_batch_of_json_binary_and_header_carrying_messages() -> None:
    parsed = parse(event=event_of(*MIXED), model=SqsModel)
    json_rec, binary, with_headers = parsed.Records
    assert json_rec.eventSource == "aws:sqs"
    assert json_rec.eventSourceARN == SOURCE_ARN
    assert json_rec.awsRegion == "local"
    assert json.loads(str(json_rec.body)) == {"order": 1}
    assert json_rec.md5OfBody == hashlib.md5(b'{"order": 1}').hexdigest()
    assert json_rec.attributes.ApproximateReceiveCount == "1"
    assert json_rec.attributes.SentTimestamp.timestamp() == pytest.approx(1_700_000_000.123)
    assert json_rec.attributes.ApproximateFirstReceiveTimestamp.timestamp() == pytest.approx(1_700_000_000.5)
    assert json_rec.attributes.SenderId == "nats"
    assert json_rec.attributes.SequenceNumber == "11"
    assert json_rec.attributes.MessageGroupId is None  # not a FIFO queue
    assert Receipt.parse(json_rec.receiptHandle) == Receipt("EVENTFN", "orders--t0", 11, 1)

    assert base64.b64decode(str(binary.body)) == b"\xff\xfe binary \x00"
    assert binary.attributes.ApproximateReceiveCount == "2"
    assert binary.md5OfBody == hashlib.md5(str(binary.body).encode()).hexdigest()

    attributes = with_headers.messageAttributes
    assert set(attributes) == {"trace", "ce-type", SUBJECT_ATTRIBUTE}  # NATS's own header is not the user's
    assert attributes["trace"].stringValue == "t-1"
    assert attributes["trace"].dataType == "String"
    assert attributes["ce-type"].stringValue == "order.paid"
    assert attributes[SUBJECT_ATTRIBUTE].stringValue == "events.orders.paid"


def test_powertools_tolerates_the_eventfn_extras_and_the_raw_event_keeps_them() -> None:
    event = event_of(*MIXED)
    assert [r["subject"] for r in event["Records"]] == ["events.orders.created"] * 2 + ["events.orders.paid"]
    assert [r.get("bodyEncoding") for r in event["Records"]] == [None, "base64", None]
    parse(event=event, model=SqsModel)  # extra keys are ignored, not refused
    assert SQSRecord(event["Records"][1]).raw_event["bodyEncoding"] == "base64"


@pytest.mark.parametrize("model", [None, SqsRecordModel], ids=["data-class", "parser-model"])
def test_batch_processor_reports_exactly_the_failed_message_ids(model: type[SqsRecordModel] | None) -> None:
    event = event_of(*MIXED)
    seen: list[str] = []

    def record_handler(record: Any) -> str:
        body = record.body
        seen.append(body)
        if body == "plain text":
            raise ValueError("refused")
        return "ok"

    processor = BatchProcessor(event_type=EventType.SQS, model=model)
    response = process_partial_response(event=event, record_handler=record_handler, processor=processor)
    assert len(seen) == 3
    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][2]["messageId"]}]}


def test_batch_processor_data_class_reads_the_subject_attribute_and_user_headers() -> None:
    subjects: list[str | None] = []

    def record_handler(record: SQSRecord) -> None:
        subjects.append(record.message_attributes[SUBJECT_ATTRIBUTE].string_value)
        assert record.event_source_arn == SOURCE_ARN

    processor = BatchProcessor(event_type=EventType.SQS)
    response = process_partial_response(event=event_of(*MIXED), record_handler=record_handler, processor=processor)
    assert response == {"batchItemFailures": []}
    assert subjects == ["events.orders.created", "events.orders.created", "events.orders.paid"]


def test_the_readme_batch_examples_are_records_sqs_model_accepts() -> None:
    readme = (ROOT / "README.md").read_text()
    examples = [b for b in re.findall(r"```json\n(.*?)```", readme, re.S) if '"aws:sqs"' in b]
    assert len(examples) == 2  # a plain subject's batch, and a queue's
    for example in examples:
        [record] = parse(event=json.loads(example), model=SqsModel).Records
        assert record.md5OfBody == hashlib.md5(str(record.body).encode()).hexdigest()
        if record.eventSourceARN.startswith("arn:eventfn:"):
            assert Receipt.parse(record.receiptHandle) == Receipt("EVENTFN", "orders--orders", 42, 1)
        else:
            assert record.eventSourceARN == "arn:aws:sqs:local:000000000000:jobs"
            assert Receipt.parse(record.receiptHandle) == Receipt("EVENTFN_Q_jobs", "ship--t0", 42, 1)


# -- end to end --------------------------------------------------------------------------------------------------------

POWERTOOLS_HANDLER = """
    # /// eventfn
    # timeout = 20
    # [[triggers]]
    # subjects = ["events.shop.>"]
    # batch_size = 10
    # batch_window = 1
    # [retry]
    # max_attempts = 2
    # base_delay = 0.2
    # ///
    '''Plain Lambda code: Powertools' batch processor over SQS records, with its parser's SqsModel.'''
    import json

    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
    from aws_lambda_powertools.utilities.parser import parse
    from aws_lambda_powertools.utilities.parser.models import SqsModel

    import _probe

    processor = BatchProcessor(event_type=EventType.SQS)


    def record_handler(record):
        order = json.loads(record.body)
        count = record.attributes.approximate_receive_count
        _probe.report("probe.shop", json.dumps({"n": order["n"], "id": record.message_id, "count": count}))
        if order["n"] == 3 and count == "1":
            raise ValueError("out of stock, for now")


    def handler(event, context):
        parsed = parse(event=event, model=SqsModel)
        _probe.report("probe.shop.batch", json.dumps([r.messageId for r in parsed.Records]))
        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
"""


@pytest.mark.e2e
async def test_powertools_batch_handler_fails_one_item_and_eventfn_retries_that_item_alone(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe: Callable[[str], Any]
) -> None:
    write_handler(handlers, "shop", POWERTOOLS_HANDLER)
    await serve()
    items = await probe("probe.shop")
    batches = await probe("probe.shop.batch")
    for n in range(5):
        await nc.publish("events.shop.order", json.dumps({"n": n}).encode())  # what `nats pub` sends: no headers

    seen = [json.loads(t) for t in await items.wait_for(6)]
    first, retry = [json.loads(t) for t in await batches.wait_for(2)]
    assert sorted(first) == sorted(s["id"] for s in seen[:5])  # one batch of all five, each parsed by SqsModel
    failed = next(s for s in seen if s["n"] == 3)
    assert retry == [failed["id"]]  # the retry is the failed item alone, by its messageId
    assert seen[5] == {"n": 3, "id": failed["id"], "count": "2"}

    stats = await wait_until(
        lambda: mapping_stats(nc, "shop--t0"), lambda s: s["processed"] == 5, what="all five processed"
    )
    assert (stats["invocations"], stats["failed"], stats["retried"], stats["dead_lettered"]) == (2, 1, 1, 0)
