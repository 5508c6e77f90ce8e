"""A shard batch's outcome: what the function's answer says, what follows it, and the record of a batch given up.

`judge` reads an invocation's outcome by Lambda's rules for streams (partial batch responses by sequence number, a
tumbling window's state). `decide` is the retry rule as one pure function: (records that succeeded, batch size,
retries so far, the mapping's settings) -> checkpoint, split in two, retry after a delay, or give up.
`FailureRecords` writes a given-up batch's record (Lambda's, with `KinesisBatchInfo`) to the function's DLQ, and
then to the trigger's `on_failure` subject.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import msgspec

from eventfn import subjects
from eventfn.invoke.invocation import Outcome, failure
from eventfn.sources import kinesis
from eventfn.sources.deadletters import Sink
from eventfn.sources.records import StoredMessage
from eventfn.sources.source import ShardRef

log = logging.getLogger(__name__)


class Judged(msgspec.Struct, frozen=True):
    """An invocation of a batch, judged: how many records (from the first) succeeded, the window state it returned
    (a mapping with a tumbling window), and the outcome (Lambda's error object when the batch failed)."""

    succeeded: int
    state: bytes | None
    outcome: Outcome


def judge(
    outcome: Outcome, sequence_numbers: Sequence[str], *, windowed: bool, report: bool, request_id: str
) -> Judged:
    """What an invocation's `outcome` says of a batch with these sequence numbers (in order)."""
    if not outcome.ok:
        return Judged(0, None, outcome)
    state = None
    if windowed:
        state = kinesis.window_state(outcome.payload)
        if state is None:  # Lambda's rule: a tumbling-window invocation must return its state
            message = 'a function with a tumbling window must return {"state": {...}} (and may add batchItemFailures)'
            return Judged(0, None, failure("Runtime.InvalidTumblingWindowResponse", message, request_id))
    if not report:
        return Judged(len(sequence_numbers), state, outcome)
    checkpoint = kinesis.checkpoint(outcome.payload, sequence_numbers)
    if checkpoint is None:
        message = 'batchItemFailures must be a list of {"itemIdentifier": <sequenceNumber of this batch>}'
        return Judged(0, None, failure("Runtime.InvalidBatchResponse", message, request_id))
    return Judged(checkpoint, state, outcome)


def expired(records: Sequence[StoredMessage], max_record_age: int, now_ns: int) -> int:
    """How many records at the head of `records` arrived more than `max_record_age` seconds before `now_ns`."""
    limit = now_ns - max_record_age * 1_000_000_000
    count = 0
    for message in records:
        if kinesis.arrival_ns(message) >= limit:
            break
        count += 1
    return count


class Commit(msgspec.Struct, frozen=True):
    """The first `count` records succeeded: checkpoint after them."""

    count: int


class Split(msgspec.Struct, frozen=True):
    """Run the records before `at`, then those from `at` on, as two batches (not a retry)."""

    at: int


class Retry(msgspec.Struct, frozen=True):
    """Run the batch again (after checkpointing `done` records) in `delay` seconds."""

    done: int
    delay: float


class GiveUp(msgspec.Struct, frozen=True):
    """Give the batch up (after checkpointing `done` records): its failure record to the DLQ."""

    done: int
    condition: str


Step = Commit | Split | Retry | GiveUp


def decide(succeeded: int, size: int, retries: int, shard: ShardRef, delay: Callable[[int], float]) -> Step:
    """What follows an invocation of a batch of `size` records of which the first `succeeded` succeeded (all of
    them: success), already retried `retries` times; `delay(n)` is the wait before retry number `n`."""
    if succeeded >= size:
        return Commit(size)
    if shard.bisect_on_error:
        if succeeded > 0:
            return Split(succeeded)  # Lambda splits at the returned sequence number and retries the rest
        if size > 1:
            return Split(size // 2)
    if 0 <= shard.max_retry_attempts <= retries:
        return GiveUp(succeeded, "RetryAttemptsExhausted")
    return Retry(succeeded, delay(retries + 1))


class FailureRecords:
    """Writes the failure records of one shard mapping's batches given up."""

    def __init__(self, sink: Sink, function: str, mapping: str, shape: kinesis.Shape, on_failure: str | None) -> None:
        self.sink = sink
        self.function = function
        self.mapping = mapping
        self.shape = shape
        self.on_failure = on_failure

    async def write(self, records: Sequence[StoredMessage], condition: str, invokes: int, error: bytes | None) -> None:
        """Store the record of `records` (a batch of the shard, in order) in the DLQ, then publish it to
        `on_failure` (whose trouble is only logged); raises if the DLQ cannot take it now."""
        record = kinesis.batch_info_record(self.function, self.shape, records, condition, invokes, error)
        first, last = records[0].stream_seq, records[-1].stream_seq
        headers = {
            # One record per batch given up: a second write after a crash is dropped.
            "Nats-Msg-Id": f"dlq:{self.mapping}:{first}-{last}",
            "Eventfn-Condition": condition,
        }
        await self.sink.publish_stored(subjects.DLQ_PREFIX + self.function, record, headers)
        log.error(
            "%s: %s records %d-%d (%d) given up (%s) after %d invocation(s); their batch info is in the DLQ",
            self.function,
            self.shape.shard_id,
            first,
            last,
            len(records),
            condition,
            invokes,
        )
        if self.on_failure:
            try:
                await self.sink.publish(self.on_failure, record)
            except Exception as exc:
                log.warning("%s: on_failure %s not notified: %s", self.function, self.on_failure, exc)
