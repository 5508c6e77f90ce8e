"""Sharded streams, the fast layer: where a partition key goes (MD5 onto the hash key ranges), the Kinesis records a
handler gets (read back by Powertools itself), and the shard dispatcher's decisions against the in-memory source:
order per shard and per key, bisecting, partial batch responses, retries given up with Lambda's batch info,
record age, tumbling windows and their state, and order after a crash. Real nats-server and `eventfn serve`:
test_shards_nats.py and test_shards_e2e.py."""

from __future__ import annotations

import base64
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.kinesis_stream_event import KinesisStreamRecord
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import KinesisDataStreamModel

from eventfn.config import DataStreamSettings, RetryPolicy, StreamTrigger
from eventfn.invoke.invocation import Invocation, LambdaError, Outcome
from eventfn.sources import kinesis, shards
from eventfn.sources.mappings import Mapping
from eventfn.sources.memory import MemoryFeed, MemorySink, MemoryState
from eventfn.sources.shard_dispatch import ShardDispatcher
from eventfn.sources.shard_outcomes import Commit, GiveUp, Retry, Split, decide
from eventfn.sources.source import ShardRef

FAST = RetryPolicy(base_delay=0.01, max_delay=0.02)

# -- placement -------------------------------------------------------------------------------------------------------


def test_the_hash_key_ranges_split_the_128_bit_space_evenly_with_no_gap() -> None:
    ranges = shards.hash_ranges(4)
    assert ranges[0] == (0, 2**126 - 1)
    assert ranges[-1] == (3 * 2**126, 2**128 - 1)
    assert all(ranges[i][1] + 1 == ranges[i + 1][0] for i in range(3))


@pytest.mark.parametrize(
    ("key", "count", "expected"),
    [
        ("a", 4, 0),  # MD5 0cc175b9...: below 2**126
        ("b", 4, 2),  # MD5 92eb5ffe...: 0x80.. to 0xbf..
        ("b", 2, 1),
        ("anything", 1, 0),
    ],
)
def test_a_partition_key_goes_to_the_shard_whose_range_holds_its_md5(key: str, count: int, expected: int) -> None:
    assert shards.shard_of(key, count) == expected


def test_shard_of_agrees_with_the_ranges_for_many_keys() -> None:
    for n in range(500):
        key = f"user-{n}"
        value = int(hashlib.md5(key.encode()).hexdigest(), 16)
        low, high = shards.hash_ranges(7)[shards.shard_of(key, 7)]
        assert low <= value <= high


def test_a_key_keeps_its_lane_and_keys_spread_over_the_lanes() -> None:
    assert shards.lane_of("k1", 4) == shards.lane_of("k1", 4)
    assert {shards.lane_of(f"k{n}", 4) for n in range(100)} == {0, 1, 2, 3}
    assert shards.lane_of("k1", 1) == 0


# -- the records a handler gets ---------------------------------------------------------------------------------------


class Stored:
    """A stand-in for a stored record (`records.StoredMessage`)."""

    def __init__(self, seq: int, data: bytes, key: str, arrival_ns: int | None = None) -> None:
        self.subject = "eventfn.shard.clicks.3"
        self.data = data
        self.headers = {shards.KEY_HEADER: key}
        if arrival_ns is not None:
            self.headers[shards.ARRIVAL_HEADER] = str(arrival_ns)
        self.stream = "EVENTFN_S_clicks"
        self.stream_seq = seq
        self.delivered = 1
        self.timestamp_ns = 1_700_000_009_000_000_000


SHAPE = kinesis.Shape("clicks", 3)


def test_powertools_parses_the_records_with_its_kinesis_model() -> None:
    batch = [Stored(41, b'{"page": "/"}', "user-1", 1_700_000_000_123_456_789), Stored(42, b"\xff\x00", "user-2")]
    parsed = parse(event=json.loads(SHAPE.batch(batch)), model=KinesisDataStreamModel)
    first, second = parsed.Records
    assert first.kinesis.data == b'{"page": "/"}'
    assert second.kinesis.data == b"\xff\x00"  # binary data too: base64 on the wire
    assert first.kinesis.partitionKey == "user-1"
    assert first.kinesis.sequenceNumber == "41"
    assert first.kinesis.approximateArrivalTimestamp == pytest.approx(1_700_000_000.123)
    assert second.kinesis.approximateArrivalTimestamp == pytest.approx(1_700_000_009.0)  # no header: stored time
    assert first.kinesis.kinesisSchemaVersion == "1.0"
    assert first.eventID == "shardId-000000000003:41"
    assert first.eventSource == "aws:kinesis"
    assert first.eventName == "aws:kinesis:record"
    assert first.eventVersion == "1.0"
    assert first.eventSourceARN == "arn:aws:kinesis:local:000000000000:stream/clicks"
    assert first.awsRegion == "local"
    assert first.invokeIdentityArn.startswith("arn:aws:iam::")


def test_powertools_batch_processor_reports_a_failed_record_by_its_sequence_number() -> None:
    batch = [Stored(seq, json.dumps({"n": seq}).encode(), f"k{seq}") for seq in (7, 8, 9)]

    def record_handler(record: KinesisStreamRecord) -> None:
        if record.kinesis.data_as_json()["n"] == 8:
            raise ValueError("bad record")

    response = process_partial_response(
        event=json.loads(SHAPE.batch(batch)),
        record_handler=record_handler,
        processor=BatchProcessor(event_type=EventType.KinesisDataStreams),
        context=None,  # type: ignore[arg-type]
    )
    assert response == {"batchItemFailures": [{"itemIdentifier": "8"}]}
    # The checkpoint stops at the failed record: the first one succeeded.
    assert kinesis.checkpoint(json.dumps(response).encode(), ["7", "8", "9"]) == 1


def test_partial_batch_responses_follow_lambdas_stream_rules() -> None:
    seqs = ["5", "6", "7"]
    assert kinesis.checkpoint(b"null", seqs) == 3
    assert kinesis.checkpoint(b'{"batchItemFailures": []}', seqs) == 3
    assert kinesis.checkpoint(b'{"batchItemFailures": [{"itemIdentifier": "7"}, {"itemIdentifier": "6"}]}', seqs) == 1
    assert kinesis.checkpoint(b'{"batchItemFailures": [{"itemIdentifier": ""}]}', seqs) is None
    assert kinesis.checkpoint(b'{"batchItemFailures": [{"id": "6"}]}', seqs) is None


def test_a_window_batch_carries_the_window_and_its_state() -> None:
    event = json.loads(SHAPE.window_batch([Stored(1, b"x", "k")], 120.0, 180.0, b'{"n": 2}', final=True))
    assert event["window"] == {"start": "1970-01-01T00:02:00Z", "end": "1970-01-01T00:03:00Z"}
    assert event["state"] == {"n": 2}
    assert event["shardId"] == "shardId-000000000003"
    assert event["isFinalInvokeForWindow"] is True
    assert event["isWindowTerminatedEarly"] is False
    parse(event=event, model=KinesisDataStreamModel)  # the records are still Kinesis records
    assert kinesis.window_state(b'{"state": {"a": 1}, "batchItemFailures": []}') == b'{"a": 1}'
    assert kinesis.window_state(b'{"batchItemFailures": []}') is None
    assert kinesis.window_state(b"null") is None


def test_filters_see_the_data_as_json_and_the_metadata_at_the_top_level() -> None:
    document = kinesis.filter_document(Stored(3, b'{"temp": 31}', "sensor-9"))
    assert document["partitionKey"] == "sensor-9"
    assert document["sequenceNumber"] == "3"
    assert document["data"] == {"temp": 31}


# -- decisions ------------------------------------------------------------------------------------------------------


def shard_ref(**settings: Any) -> ShardRef:
    return ShardRef(stream="clicks", index=0, shards=1, **settings)


def test_decide_follows_lambdas_stream_rules() -> None:
    def delay(n: int) -> float:
        return float(n)

    plain = shard_ref()
    assert decide(5, 5, 0, plain, delay) == Commit(5)
    assert decide(0, 5, 0, plain, delay) == Retry(0, 1.0)
    assert decide(2, 5, 3, plain, delay) == Retry(2, 4.0)  # a partial failure checkpoints, then retries the rest
    assert decide(0, 5, 2, shard_ref(max_retry_attempts=2), delay) == GiveUp(0, "RetryAttemptsExhausted")
    assert decide(0, 5, 0, shard_ref(max_retry_attempts=0), delay) == GiveUp(0, "RetryAttemptsExhausted")
    bisect = shard_ref(bisect_on_error=True, max_retry_attempts=0)
    assert decide(0, 5, 0, bisect, delay) == Split(2)  # not counted as a retry
    assert decide(3, 5, 0, bisect, delay) == Split(3)  # split at the returned sequence number
    assert decide(0, 1, 0, bisect, delay) == GiveUp(0, "RetryAttemptsExhausted")


# -- the dispatcher against the in-memory source -------------------------------------------------------------------


def mapping(*, batch_size: int = 10, batch_window: float = 0.0, report: bool = False, **trigger: Any) -> Mapping:
    [source] = shards.sources("clicks", DataStreamSettings(shards=1), StreamTrigger(stream="clicks", **trigger))
    return Mapping(
        function="fn",
        name="fn--t0--shard-0",
        source=source,
        batch_size=batch_size,
        batch_window=batch_window,
        report_batch_item_failures=report,
        retry=FAST,
        timeout=3.0,
    )


Answer = Callable[[dict[str, Any], list[dict[str, Any]]], Any]


class Function:
    """The function under test: records each invocation (its event and items) and answers as `answer` says:
    True (success), False (an error), or any other value as its JSON result."""

    def __init__(self, answer: Answer | None = None, pause: float = 0.0) -> None:
        self.answer = answer or (lambda event, items: True)
        self.pause = pause
        self.calls: list[list[dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.running: dict[str, int] = defaultdict(int)
        self.overlaps: list[str] = []
        self.concurrent = 0
        self.most_concurrent = 0
        #: Whether each invocation succeeded (as a whole).
        self.outcomes: list[bool] = []

    async def __call__(self, invocation: Invocation) -> Outcome:
        event = json.loads(invocation.payload)
        items = [
            {**json.loads(base64.b64decode(r["kinesis"]["data"])), "seq": r["kinesis"]["sequenceNumber"]}
            for r in event["Records"]
        ]
        self.calls.append(items)
        self.events.append(event)
        keys = {i["k"] for i in items}
        for key in keys:
            if self.running[key]:
                self.overlaps.append(key)
            self.running[key] += 1
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            await anyio.sleep(self.pause)
        finally:
            self.concurrent -= 1
            for key in keys:
                self.running[key] -= 1
        answer = self.answer(event, items)
        self.outcomes.append(answer is not False)
        if answer is False:
            error = LambdaError(type="Boom", message="no")
            return Outcome(ok=False, error=error, payload=b'{"errorType":"Boom","errorMessage":"no"}')
        return Outcome(ok=True, payload=b"null" if answer is True else json.dumps(answer).encode())

    def order(self, key: str) -> list[int]:
        return [i["n"] for call in self.calls for i in call if i["k"] == key]

    def succeeded(self, n: int) -> int:
        """How many successful invocations held item `n`."""
        return sum(1 for call, ok in zip(self.calls, self.outcomes, strict=True) if ok for i in call if i["n"] == n)


def put(feed: MemoryFeed, n: int, key: str, *, arrival_ns: int | None = None, **extra: Any) -> int:
    headers = {shards.KEY_HEADER: key}
    if arrival_ns is not None:
        headers[shards.ARRIVAL_HEADER] = str(arrival_ns)
    return feed.publish(json.dumps({"n": n, "k": key, **extra}).encode(), "eventfn.shard.clicks.0", headers)


async def run(
    m: Mapping,
    fn: Function,
    feed: MemoryFeed,
    until: Callable[[], bool],
    *,
    sink: MemorySink | None = None,
    state: MemoryState | None = None,
    recovery: Any = None,
    timeout: float = 10.0,
) -> ShardDispatcher:
    feed.max_inflight = m.max_inflight
    dispatcher = ShardDispatcher(sink or MemorySink(), m, feed, invoke=fn, recovery=recovery, state=state)
    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            # Polls the in-memory source's settled state (bounded by fail_after): what is awaited differs per test.
            while not until():  # noqa: ASYNC110
                await anyio.sleep(0.002)
            dispatcher.stop()
    return dispatcher


def batch_infos(sink: MemorySink) -> list[dict[str, Any]]:
    return [json.loads(data) for subject, data, _ in sink.stored if subject == "eventfn.dlq.fn"]


async def test_one_shard_runs_in_order_in_batches_of_its_size() -> None:
    feed = MemoryFeed()
    for n in range(95):
        put(feed, n, f"k{n % 7}")
    fn = Function()
    await run(mapping(batch_size=10, batch_window=0.05), fn, feed, lambda: len(feed.acked) == 95)
    assert [i["n"] for call in fn.calls for i in call] == list(range(95))
    assert all(len(call) <= 10 for call in fn.calls)
    assert fn.most_concurrent == 1
    assert sorted(feed.acked) == list(range(1, 96))


async def test_with_a_parallelization_factor_keys_run_in_parallel_each_in_order() -> None:
    feed = MemoryFeed()
    for n in range(120):
        put(feed, n, f"k{n % 12}")
    fn = Function(pause=0.005)
    m = mapping(batch_size=5, parallelization_factor=4)
    await run(m, fn, feed, lambda: len(feed.acked) == 120)
    assert fn.overlaps == []  # never two batches of one key at once
    assert fn.most_concurrent > 1  # lanes run side by side
    for k in range(12):
        assert fn.order(f"k{k}") == sorted(fn.order(f"k{k}")) == list(range(k, 120, 12))


async def test_bisecting_finds_the_bad_record_and_runs_each_good_one_once_successfully() -> None:
    feed = MemoryFeed()
    for n in range(16):
        put(feed, n, "k", bad=n == 11)
    fn = Function(lambda event, items: not any(i.get("bad") for i in items))
    sink = MemorySink()
    m = mapping(batch_size=16, batch_window=0.2, bisect_on_error=True, max_retry_attempts=1)
    dispatcher = await run(m, fn, feed, lambda: len(feed.acked) == 16, sink=sink)
    assert [fn.succeeded(n) for n in range(16)] == [1] * 11 + [0] + [1] * 4
    # Halves down to the bad record, which fails once more (its one retry); the good halves run once each.
    assert [len(c) for c in fn.calls] == [16, 8, 8, 4, 2, 2, 1, 1, 1, 4]
    [info] = batch_infos(sink)
    assert info["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert info["requestContext"]["approximateInvokeCount"] == 2
    assert info["KinesisBatchInfo"]["batchSize"] == 1
    assert info["KinesisBatchInfo"]["startSequenceNumber"] == info["KinesisBatchInfo"]["endSequenceNumber"] == "12"
    assert dispatcher.stats.dead_lettered == 1
    assert dispatcher.stats.processed == 15


async def test_a_partial_failure_checkpoints_before_the_lowest_failure_and_retries_from_there() -> None:
    feed = MemoryFeed()
    for n in range(6):
        put(feed, n, "k")
    failed_once: set[int] = set()

    def answer(event: dict[str, Any], items: list[dict[str, Any]]) -> Any:
        failures = [i["seq"] for i in items if i["n"] in (2, 4) and i["n"] not in failed_once]
        failed_once.update(i["n"] for i in items if i["n"] in (2, 4))
        return {"batchItemFailures": [{"itemIdentifier": s} for s in failures]}

    fn = Function(answer)
    await run(mapping(batch_size=6, batch_window=0.2, report=True), fn, feed, lambda: len(feed.acked) == 6)
    assert [[i["n"] for i in c] for c in fn.calls] == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5]]
    assert feed.acked[:2] == [1, 2]  # records 0 and 1 checkpointed before the retry


async def test_exhausted_retries_send_lambdas_batch_info_to_the_dlq_and_on_failure_then_the_shard_goes_on() -> None:
    feed = MemoryFeed()
    for n in range(3):
        put(feed, n, "k", arrival_ns=1_700_000_000_000_000_000 + n * 1_000_000)
    put(feed, 3, "k")
    fn = Function(lambda event, items: not any(i["n"] == 1 for i in items))
    sink = MemorySink()
    m = mapping(batch_size=3, batch_window=0.2, max_retry_attempts=2, on_failure="alerts.clicks")
    await run(m, fn, feed, lambda: len(feed.acked) == 4, sink=sink)
    assert [[i["n"] for i in c] for c in fn.calls] == [[0, 1, 2]] * 3 + [[3]]
    [info] = batch_infos(sink)
    assert info["requestContext"]["approximateInvokeCount"] == 3
    assert info["requestContext"]["functionArn"].endswith(":function:fn")
    assert info["responseContext"]["functionError"] == "Unhandled"
    assert info["responsePayload"]["errorType"] == "Boom"
    assert info["KinesisBatchInfo"] == {
        "shardId": "shardId-000000000000",
        "startSequenceNumber": "1",
        "endSequenceNumber": "3",
        "approximateArrivalOfFirstRecord": "2023-11-14T22:13:20.000Z",
        "approximateArrivalOfLastRecord": "2023-11-14T22:13:20.002Z",
        "batchSize": 3,
        "streamArn": "arn:aws:kinesis:local:000000000000:stream/clicks",
    }
    [(_, _, headers)] = [s for s in sink.stored if s[0] == "eventfn.dlq.fn"]
    assert headers is not None and headers["Nats-Msg-Id"] == "dlq:fn--t0--shard-0:1-3"
    assert [subject for subject, _ in sink.published] == ["alerts.clicks"]


async def test_records_older_than_max_record_age_are_given_up_without_an_invocation() -> None:
    import time

    feed = MemoryFeed()
    old = time.time_ns() - 120 * 1_000_000_000
    put(feed, 0, "k", arrival_ns=old)
    put(feed, 1, "k", arrival_ns=old)
    put(feed, 2, "k")
    fn = Function()
    sink = MemorySink()
    m = mapping(batch_size=3, batch_window=0.2, max_record_age=60)
    await run(m, fn, feed, lambda: len(feed.acked) == 3, sink=sink)
    assert [[i["n"] for i in c] for c in fn.calls] == [[2]]
    [info] = batch_infos(sink)
    assert info["requestContext"]["condition"] == "RecordAgeExceeded"
    assert info["requestContext"]["approximateInvokeCount"] == 0
    assert "responseContext" not in info  # never invoked
    assert info["KinesisBatchInfo"]["batchSize"] == 2


async def test_a_dlq_that_refuses_keeps_the_records_unacknowledged() -> None:
    feed = MemoryFeed()
    put(feed, 0, "k")
    sink = MemorySink()
    sink.failing = True
    fn = Function(lambda event, items: False)
    dispatcher = await run(
        mapping(max_retry_attempts=0), fn, feed, lambda: len(fn.calls) >= 1 and not feed.acked, sink=sink
    )
    assert feed.acked == []
    assert dispatcher.stats.dead_lettered == 0


WINDOW = 60
#: Arrival times in two consecutive windows, long past (they close as soon as the lane is idle).
IN_FIRST = 1_700_000_040 * 10**9  # 1_700_000_040 is a multiple of 60
IN_SECOND = (1_700_000_040 + WINDOW + 5) * 10**9


def summing(event: dict[str, Any], items: list[dict[str, Any]]) -> Any:
    """A window aggregation: the sum of `n` so far."""
    total = event["state"].get("sum", 0) + sum(i["n"] for i in items)
    return {"state": {"sum": total}, "batchItemFailures": []}


async def test_a_tumbling_window_carries_its_state_across_invocations_and_ends_with_a_final_invoke() -> None:
    feed = MemoryFeed()
    for n in range(1, 7):
        put(feed, n, "k", arrival_ns=IN_FIRST + n)
    put(feed, 100, "k", arrival_ns=IN_SECOND)
    fn = Function(summing)
    state = MemoryState()
    m = mapping(batch_size=2, tumbling_window=WINDOW)
    dispatcher = await run(m, fn, feed, lambda: len(feed.acked) == 7 and len(fn.events) >= 6, state=state)
    first = [e for e in fn.events if e["window"]["start"] == "2023-11-14T22:14:00Z"]
    assert [e["state"] for e in first] == [{}, {"sum": 3}, {"sum": 10}, {"sum": 21}]
    assert [e["isFinalInvokeForWindow"] for e in first] == [False, False, False, True]
    assert first[-1]["Records"] == []
    assert first[0]["window"]["end"] == "2023-11-14T22:15:00Z"
    assert first[0]["shardId"] == "shardId-000000000000"
    second = [e for e in fn.events if e["window"]["start"] == "2023-11-14T22:15:00Z"]
    assert [e["state"] for e in second] == [{}, {"sum": 100}]  # a fresh state, then its own final invoke
    assert dispatcher.stats.windows_closed == 2
    assert await state.items() == {}  # closed windows leave no state behind


async def test_a_window_state_stored_before_a_crash_is_not_counted_twice() -> None:
    state = MemoryState()
    # The earlier run stored the window's state with records 1 and 2 in it, and died before acknowledging them.
    await state.put(
        "windows/fn--t0--shard-0/0-of-1",
        json.dumps({"start": 1_700_000_040, "end": 1_700_000_100, "state": {"sum": 3}, "through": 2}).encode(),
    )
    feed = MemoryFeed()
    for n in range(1, 4):
        put(feed, n, "k", arrival_ns=IN_FIRST + n)
    fn = Function(summing)
    m = mapping(batch_size=5, batch_window=0.1, tumbling_window=WINDOW)
    closed = lambda: any(e["isFinalInvokeForWindow"] for e in fn.events)  # noqa: E731
    await run(m, fn, feed, lambda: len(feed.acked) == 3 and closed(), state=state)
    assert [[i["n"] for i in c] for c in fn.calls] == [[3], []]
    assert fn.events[-1]["state"] == {"sum": 6}


async def test_a_window_invocation_without_state_is_a_failure() -> None:
    feed = MemoryFeed()
    put(feed, 1, "k", arrival_ns=IN_FIRST)
    fn = Function(lambda event, items: {"batchItemFailures": []})
    sink = MemorySink()
    m = mapping(tumbling_window=WINDOW, max_retry_attempts=0)
    await run(m, fn, feed, lambda: len(feed.acked) == 1, sink=sink)
    [info] = batch_infos(sink)
    assert info["responsePayload"]["errorType"] == "Runtime.InvalidTumblingWindowResponse"


async def test_after_a_crash_later_records_wait_for_the_unsettled_ones_to_come_back() -> None:
    feed = MemoryFeed()
    # The record the dead process held comes back only when its ack wait runs out; a newer one is there at once.
    feed.publish(json.dumps({"n": 1, "k": "k"}).encode(), "eventfn.shard.clicks.0", {shards.KEY_HEADER: "k"},
                 deliver_after=0.2)  # fmt: skip
    put(feed, 2, "k")

    async def recovery() -> tuple[int, int]:
        return 1, 1

    fn = Function()
    await run(mapping(), fn, feed, lambda: len(feed.acked) == 2, recovery=recovery)
    assert fn.order("k") == [1, 2]


async def test_stopping_during_a_retry_hands_the_batch_back_unacknowledged() -> None:
    feed = MemoryFeed()
    put(feed, 0, "k")
    put(feed, 1, "k")
    fn = Function(lambda event, items: False)
    m = mapping(batch_size=2, batch_window=0.2)
    m = Mapping(**{**{f: getattr(m, f) for f in m.__struct_fields__}, "retry": RetryPolicy(base_delay=30)})
    await run(m, fn, feed, lambda: len(fn.calls) >= 1)
    assert feed.acked == []
    assert sorted(seq for seq, _ in feed.naked) == [1, 2]


async def test_filters_skip_records_by_their_data_and_partition_key() -> None:
    feed = MemoryFeed()
    for n in range(6):
        put(feed, n, "eu-1" if n % 2 else "us-1", temp=30 + n)
    fn = Function()
    patterns = ('{"data": {"temp": [{"numeric": [">", 31]}]}, "partitionKey": [{"prefix": "eu-"}]}',)
    m = msgspec.structs.replace(mapping(batch_size=10, batch_window=0.1), filters=patterns)
    dispatcher = await run(m, fn, feed, lambda: len(feed.acked) == 6)
    assert [i["n"] for call in fn.calls for i in call] == [3, 5]
    assert dispatcher.stats.filtered == 4


async def test_records_waiting_for_a_retry_are_kept_alive() -> None:
    feed = MemoryFeed()
    put(feed, 0, "k")
    put(feed, 1, "k")
    m = mapping(batch_size=1)
    # A short ack wait (its third is the keepalive period) so that the test sees keepalives within a second.
    m = msgspec.structs.replace(
        m, source=msgspec.structs.replace(m.source, ack_wait=0.3), retry=RetryPolicy(base_delay=5, max_delay=5)
    )
    fn = Function(lambda event, items: False)
    await run(m, fn, feed, lambda: {1, 2} <= set(feed.kept_alive))
    assert feed.acked == []  # the failing record waits for its retry; the next one of its lane waits behind it
    assert len(fn.calls) == 1


async def test_losing_the_consumer_hands_back_what_waits_and_keeps_what_runs() -> None:
    feed = MemoryFeed()
    for n in range(5):
        put(feed, n, "k")
    release = anyio.Event()
    started = anyio.Event()

    async def slow(invocation: Invocation) -> Outcome:
        started.set()
        await release.wait()
        return Outcome(ok=True, payload=b"null")

    m = mapping(batch_size=2)
    feed.max_inflight = m.max_inflight
    dispatcher = ShardDispatcher(MemorySink(), m, feed, invoke=slow)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            await started.wait()
            dispatcher.pin_changed(False)  # another process consumes the shard now
            while len(feed.naked) < 3:  # noqa: ASYNC110 - the in-memory source has no event for a nak
                await anyio.sleep(0.01)
            release.set()
            while len(feed.acked) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            dispatcher.stop()
    assert sorted(seq for seq, _ in feed.naked[:3]) == [3, 4, 5]  # the queued records, for the new owner
    assert feed.acked[:2] == [1, 2]  # the batch under way finished and was checkpointed
