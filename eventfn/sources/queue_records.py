"""The records of a queue's batches: SQS messages exactly as SQS hands them to Lambda.

A plain subject's batches (`records.SqsShape`) are SQS-shaped with eventfn's extras (the NATS subject); a queue's
are SQS's own: `messageId`, `receiptHandle`, `body`, `attributes` (FIFO queues add the sequence number, group and
deduplication ids), `messageAttributes` (the message's headers, less NATS's, eventfn's and SQS's own properties),
`md5OfBody`, `eventSource`, `eventSourceARN` (`arn:aws:sqs:local:000000000000:<queue>`) and `awsRegion`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from eventfn.config import DLQ_SUFFIX
from eventfn.sources.records import (
    RECEIPT_PREFIX,
    REGION,
    SENDER_ID,
    SYSTEM_HEADER_PREFIXES,
    DeliveredMessage,
    MessageAttribute,
)

#: Headers of a queue message that SQS carries as message properties, not attributes (`queues` sets them).
GROUP_HEADER = "Message-Group-Id"
DEDUP_HEADER = "Message-Deduplication-Id"
DELAY_HEADER = "Delay-Seconds"
#: Set on a message moved to a dead-letter queue: the queue it was moved from (`DeadLetterQueueSourceArn`).
SOURCE_HEADER = "Eventfn-Source-Queue"
_CONTROL = frozenset((GROUP_HEADER, DEDUP_HEADER, DELAY_HEADER))
#: The `eventSourceARN` of queue `<name>` is this plus the name.
ARN_PREFIX = f"arn:aws:sqs:{REGION}:000000000000:"


class Attributes(msgspec.Struct, frozen=True, omit_defaults=True):
    """`attributes` of an SQS record; FIFO queues add the sequence number, group and deduplication ids."""

    ApproximateReceiveCount: str
    SentTimestamp: str
    SenderId: str
    ApproximateFirstReceiveTimestamp: str
    SequenceNumber: str | None = None
    MessageGroupId: str | None = None
    MessageDeduplicationId: str | None = None
    #: On a message in a dead-letter queue: the ARN of the queue it was moved from.
    DeadLetterQueueSourceArn: str | None = None


class Record(msgspec.Struct, frozen=True, omit_defaults=True):
    """One message of a queue as SQS hands it to Lambda (no eventfn extras but `bodyEncoding`, for binary data)."""

    messageId: str
    receiptHandle: str
    body: str
    attributes: Attributes
    messageAttributes: dict[str, MessageAttribute]
    md5OfBody: str
    eventSource: str
    eventSourceARN: str
    awsRegion: str
    #: Set (and only then present) when `body` holds base64 because the data was not UTF-8 text.
    bodyEncoding: str | None = None


class Batch(msgspec.Struct, frozen=True):
    Records: list[Record]


#: A message's attributes when it has no headers: none (shared, read-only: only encoded).
_NO_ATTRIBUTES: dict[str, MessageAttribute] = {}


def arn(name: str) -> str:
    """The `eventSourceARN` of queue `name`."""
    return ARN_PREFIX + name


def attributes(headers: Mapping[str, str] | None) -> dict[str, MessageAttribute]:
    """The `messageAttributes` of a queue message: its headers, less NATS's, eventfn's and SQS's own properties."""
    if not headers:
        return _NO_ATTRIBUTES
    return {
        k: MessageAttribute(v)
        for k, v in headers.items()
        if k not in _CONTROL and not k.startswith(SYSTEM_HEADER_PREFIXES)
    }


class QueueShape:
    """Batches of one queue's messages as SQS delivers them to Lambda: always `{"Records": [...]}`.

    Built once per mapping: the ARN and the receipt handle's prefix are the queue's constants. `receive_count`
    says how often each message was received (its deliveries less those that came before it was due).
    """

    unwrap_single = False

    def __init__(
        self,
        queue: str,
        *,
        fifo: bool,
        stream: str,
        consumer: str,
        # Any: the dispatcher's counter takes its own message type (a `DeliveredMessage`).
        receive_count: Callable[[Any], int],
        content_based_deduplication: bool = False,
    ) -> None:
        self.arn = arn(queue)
        #: The source queue whose moved messages this queue holds, if it is a DLQ (`<source>-dlq`): only those say
        #: where they came from (a plain publish may carry any header).
        self._dead_letter_of = queue.removesuffix(DLQ_SUFFIX) if queue.endswith(DLQ_SUFFIX) else None
        self.fifo = fifo
        self.content_based = content_based_deduplication
        self.receive_count = receive_count
        self._receipt = f"{RECEIPT_PREFIX}{stream}/{consumer}/"

    def batch(self, messages: Sequence[DeliveredMessage], ids: Sequence[str], source_arn: str) -> bytes:
        return _encoder.encode(Batch([self.record(m, i) for m, i in zip(messages, ids, strict=True)]))

    def record(self, message: DeliveredMessage, message_id: str) -> Record:
        """The SQS record of one delivered message."""
        data = message.data
        try:
            body, encoding, text = data.decode("utf-8"), None, data
        except UnicodeDecodeError:
            text = base64.b64encode(data)
            body, encoding = text.decode("ascii"), "base64"
        headers = message.headers
        count = self.receive_count(message)
        seq = str(message.stream_seq)
        sent = str(message.timestamp_ns // 1_000_000)
        group = dedup = moved_from = None
        if headers:
            if self.fifo:
                group = headers.get(GROUP_HEADER)
                dedup = headers.get(DEDUP_HEADER) or headers.get("Nats-Msg-Id")
            if self._dead_letter_of is not None and headers.get(SOURCE_HEADER) == self._dead_letter_of:
                moved_from = arn(self._dead_letter_of)
        if self.fifo and dedup is None and self.content_based:
            dedup = hashlib.sha256(data).hexdigest()
        return Record(
            messageId=message_id,
            receiptHandle=f"{self._receipt}{seq}/{message.delivered}",
            body=body,
            attributes=Attributes(
                ApproximateReceiveCount=str(count),
                SentTimestamp=sent,
                SenderId=SENDER_ID,
                # Exact on a first receive; on a later one eventfn (which keeps no state per message) gives the
                # time the message was stored, the earliest it can have been received.
                ApproximateFirstReceiveTimestamp=str(int(message.received_at * 1000)) if count <= 1 else sent,
                SequenceNumber=seq if self.fifo else None,
                MessageGroupId=group,
                MessageDeduplicationId=dedup,
                DeadLetterQueueSourceArn=moved_from,
            ),
            messageAttributes=attributes(headers),
            md5OfBody=hashlib.md5(text, usedforsecurity=False).hexdigest(),
            eventSource="aws:sqs",
            eventSourceARN=self.arn,
            awsRegion=REGION,
            bodyEncoding=encoding,
        )


_encoder = msgspec.json.Encoder()
