"""Dispatch decisions against the in-memory source: batching, window, byte cap, filters, retries, partial batch
failures, dead letters, and the three ordering models. Fast (no NATS, no workers); the end-to-end behaviour
against a real nats-server and `eventfn serve` is in test_mappings.py, test_retry_policy.py and
test_ordering.py."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from eventfn.config import RetryPolicy
from eventfn.invoke.invocation import Invocation, LambdaError, Outcome
from eventfn.sources.dispatch import Dispatcher
from eventfn.sources.mappings import Mapping
from eventfn.sources.memory import MemoryFeed, MemorySink
from eventfn.sources.ordering import Recovery, Unordered
from eventfn.sources.source import Ordering, plain_subjects

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.02, max_delay=0.04)


def mapping(*, ordering: str = "none", key: str | None = None, **settings: Any) -> Mapping:
    settings.setdefault("retry", FAST_RETRY)
    return Mapping(
        function="fn",
        name="fn--t0",
        source=plain_subjects(["events.>"], ordering=Ordering(model=ordering, key=key)),  # type: ignore[arg-type]
        **settings,
    )


class Function:
    """The function under test: records each invocation's events and answers as `answer` says.

    `answer(events, attempt_of)` returns True (success), False (the whole invocation fails) or a list of
    item ids to report in `batchItemFailures`.
    """

    def __init__(self, answer: Callable[[list[dict[str, Any]]], bool | list[str]] | None = None,
                 pause: Callable[[], float] | None = None) -> None:  # fmt: skip
        self.answer = answer or (lambda _: True)
        self.pause = pause
        self.calls: list[list[dict[str, Any]]] = []
        self.running: dict[str, int] = defaultdict(int)
        self.overlaps: list[str] = []

    async def __call__(self, invocation: Invocation) -> Outcome:
        payload = json.loads(invocation.payload)
        if isinstance(payload, dict) and "Records" in payload:
            items = [{**json.loads(r["body"]), "id": r["messageId"]} for r in payload["Records"]]
        else:
            items = [{**payload, "id": invocation.request_id}]
        self.calls.append(items)
        keys = {str(i.get("k")) for i in items}
        for key in keys:
            if self.running[key]:
                self.overlaps.append(key)
            self.running[key] += 1
        try:
            await anyio.sleep(self.pause() if self.pause else 0)
        finally:
            for key in keys:
                self.running[key] -= 1
        answer = self.answer(items)
        if answer is True:
            return Outcome(ok=True, payload=b"null")
        if answer is False:
            error = LambdaError(type="Boom", message="no")
            return Outcome(ok=False, error=error, payload=b'{"errorType":"Boom","errorMessage":"no"}')
        failures = [{"itemIdentifier": i} for i in answer]
        return Outcome(ok=True, payload=json.dumps({"batchItemFailures": failures}).encode())

    def order(self, key: str) -> list[int]:
        """The `n` of each invocation of `key`'s events, in invocation order (retries repeat)."""
        return [i["n"] for call in self.calls for i in call if str(i.get("k")) == key]


async def run(
    m: Mapping,
    fn: Function,
    feed: MemoryFeed,
    until: Callable[[], bool],
    *,
    sink: MemorySink | None = None,
    recovery: Recovery | None = None,
) -> Dispatcher:
    feed.max_inflight = m.max_inflight
    dispatcher = Dispatcher(sink or MemorySink(), m, feed, invoke=fn, recovery=recovery)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            # Polls the feed's settled state (bounded by fail_after): what is awaited differs per test.
            while not until():  # noqa: ASYNC110
                await anyio.sleep(0.002)
            dispatcher.stop()
    return dispatcher


def event(n: int, key: str | None = None, **extra: Any) -> bytes:
    return json.dumps({"n": n, "k": key, **extra}).encode()


# -- unordered -------------------------------------------------------------------------------------------------


async def test_unordered_events_all_run_and_a_failure_is_handed_back_with_a_delay() -> None:
    feed = MemoryFeed()
    for n in range(20):
        feed.publish(event(n))
    failed: set[int] = set()

    def answer(items: list[dict[str, Any]]) -> bool:
        n = items[0]["n"]
        if n == 5 and n not in failed:
            failed.add(n)
            return False
        return True

    fn = Function(answer)
    d = await run(mapping(concurrency=4), fn, feed, lambda: len(set(feed.acked)) == 20)
    assert [seq for seq, _ in feed.naked] == [6]  # stream position of n=5
    assert feed.naked[0][1] > 0
    assert fn.order("None").count(5) == 2
    assert (d.stats.processed, d.stats.failed, d.stats.retried) == (20, 1, 1)


async def test_an_idle_mapping_holds_one_task_and_grows_to_its_concurrency_under_load() -> None:
    """At batch size 1 the tasks that take events start as the ones there are get busy: an idle mapping (one of a
    thousand) holds one, and slow invocations still run `concurrency` at once, never more."""
    feed = MemoryFeed()
    at_once = 0
    most = 0
    gate = anyio.Event()

    async def slow(invocation: Invocation) -> Outcome:
        nonlocal at_once, most
        at_once += 1
        most = max(most, at_once)
        try:
            await gate.wait()
        finally:
            at_once -= 1
        return Outcome(ok=True, payload=b"null")

    m = mapping(concurrency=4)
    feed.max_inflight = m.max_inflight
    dispatcher = Dispatcher(MemorySink(), m, feed, invoke=slow)
    scheduler = dispatcher.scheduler
    assert isinstance(scheduler, Unordered)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            await wait_for(lambda: scheduler._receiving == 1)
            assert scheduler._workers == 1, "idle: one task waits for the next event"
            for n in range(10):
                feed.publish(event(n))
            await wait_for(lambda: at_once == 4 and scheduler._workers == 4)
            gate.set()
            await wait_for(lambda: len(set(feed.acked)) == 10)
            dispatcher.stop()
    assert most == 4 and scheduler._workers == 4


async def wait_for(condition: Callable[[], bool]) -> None:
    """Until `condition` holds (bounded by the caller's fail_after): the scheduler's state has no event to await."""
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(0.002)


async def test_events_waiting_in_the_feed_for_a_slot_are_kept_alive() -> None:
    """At batch size 1 the feed holds more events than run at once (`feed_credit`): an event that waits behind slow
    invocations for longer than a third of the ack wait is marked in progress while it waits, again and again, so
    that the source does not redeliver it (the dispatcher marks it once more as it starts)."""
    feed = MemoryFeed()
    for n in range(4):
        feed.publish(event(n))
    m = mapping(concurrency=1, timeout=0.03, redelivery_margin=0.0)  # ack wait 0.03 s: kept alive every 0.01 s
    assert m.max_inflight > m.concurrency + 1
    fn = Function(pause=lambda: 0.06)
    await run(m, fn, feed, lambda: len(set(feed.acked)) == 4)
    last = 4  # the stream position of n=3, which waited behind three invocations of 0.06 s
    assert feed.kept_alive.count(last) >= 3, feed.kept_alive


async def test_batches_fill_to_their_size_and_a_trickle_closes_at_the_window() -> None:
    feed = MemoryFeed()
    for n in range(10):
        feed.publish(event(n))
    fn = Function()
    await run(mapping(batch_size=4, batch_window=0.05), fn, feed, lambda: len(feed.acked) == 10)
    assert [len(c) for c in fn.calls] == [4, 4, 2]


async def test_a_batch_closes_before_it_would_pass_its_byte_cap() -> None:
    feed = MemoryFeed()
    for n in range(6):
        feed.publish(event(n, pad="x" * 1000))
    fn = Function()
    await run(mapping(batch_size=10, batch_window=0.05, max_batch_bytes=4000), fn, feed, lambda: len(feed.acked) == 6)
    assert max(len(c) for c in fn.calls) == 2
    assert sum(len(c) for c in fn.calls) == 6


async def test_partial_batch_failure_retries_only_the_reported_item() -> None:
    feed = MemoryFeed()
    for n in range(5):
        feed.publish(event(n))
    reported: set[int] = set()

    def answer(items: list[dict[str, Any]]) -> list[str]:
        bad = [i for i in items if i["n"] == 2 and 2 not in reported]
        reported.update(i["n"] for i in bad)
        return [i["id"] for i in bad]

    fn = Function(answer)
    d = await run(mapping(batch_size=5, batch_window=0.05), fn, feed, lambda: len(feed.acked) == 5)
    assert [[i["n"] for i in c] for c in fn.calls] == [[0, 1, 2, 3, 4], [2]]
    assert (d.stats.processed, d.stats.retried) == (5, 1)


async def test_an_invalid_batch_response_fails_every_item() -> None:
    feed = MemoryFeed()
    for n in range(3):
        feed.publish(event(n))
    calls = 0

    def answer(items: list[dict[str, Any]]) -> list[str] | bool:
        nonlocal calls
        calls += 1
        return ["not-an-id-of-this-batch"] if calls == 1 else True

    fn = Function(answer)
    d = await run(mapping(batch_size=3, batch_window=0.05), fn, feed, lambda: len(feed.acked) == 3)
    assert d.stats.retried == 3
    assert sorted(seq for seq, _ in feed.naked) == [1, 2, 3]


async def test_events_the_filters_reject_are_acknowledged_without_an_invocation() -> None:
    feed = MemoryFeed()
    for n in range(6):
        feed.publish(event(n, kind="keep" if n % 2 else "drop"))
    fn = Function()
    d = await run(mapping(filters=({"body": {"kind": ["keep"]}},)), fn, feed, lambda: len(feed.acked) == 6)
    assert sorted(c[0]["n"] for c in fn.calls) == [1, 3, 5]
    assert d.stats.filtered == 3


async def test_exhausted_retries_are_dead_lettered_and_acknowledged_only_after_the_write() -> None:
    feed = MemoryFeed()
    feed.publish(event(1))
    sink = MemorySink()
    fn = Function(lambda _: False)
    d = await run(mapping(retry=RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.01)), fn, feed,
                  lambda: bool(feed.acked), sink=sink)  # fmt: skip
    assert len(fn.calls) == 2
    [(subject, record, headers)] = sink.stored
    assert subject == "eventfn.dlq.fn"
    assert json.loads(record)["requestContext"]["condition"] == "RetriesExhausted"
    assert headers and headers["Nats-Msg-Id"] == "dlq:fn--t0:1"
    assert d.stats.dead_lettered == 1


async def test_an_event_the_dlq_cannot_take_stays_with_its_source() -> None:
    feed = MemoryFeed()
    feed.publish(event(1))
    sink = MemorySink()
    sink.failing = True
    fn = Function(lambda _: False)
    policy = RetryPolicy(max_attempts=0, base_delay=0.01, max_delay=0.01)
    d = await run(mapping(retry=policy), fn, feed, lambda: bool(feed.naked), sink=sink)
    assert feed.acked == [] and d.stats.dead_lettered == 0
    assert feed.naked[0][1] >= 1.0  # handed back after a delay, not at once


# -- per key ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 5])
async def test_per_key_events_run_in_order_and_never_at_once_under_concurrency(batch_size: int) -> None:
    feed = MemoryFeed()
    rng = random.Random(7)
    keys = [f"k{i}" for i in range(6)]
    for n in range(120):
        key = rng.choice(keys)
        feed.publish(event(n, key), headers={"Key": key})
    fn = Function(pause=lambda: rng.random() / 500)
    m = mapping(ordering="key", key="header:Key", concurrency=4, batch_size=batch_size, batch_window=0.005)
    await run(m, fn, feed, lambda: len(feed.acked) == 120)
    assert fn.overlaps == []
    for key in keys:
        assert fn.order(key) == sorted(fn.order(key))
    assert len({k for c in fn.calls for k in {i["k"] for i in c}}) == 6
    assert feed.naked == []  # retries never leave an ordered mapping


async def test_per_key_a_failing_event_holds_its_key_while_other_keys_go_on() -> None:
    feed = MemoryFeed()
    for n in range(10):
        key = "bad" if n < 3 else f"ok{n}"
        feed.publish(event(n, key), headers={"Key": key})
    attempts: dict[int, int] = defaultdict(int)

    def answer(items: list[dict[str, Any]]) -> bool:
        n = items[0]["n"]
        attempts[n] += 1
        return not (n == 0 and attempts[n] <= 2)

    fn = Function(answer)
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.2)
    m = mapping(ordering="key", key="header:Key", concurrency=3, retry=policy)
    await run(m, fn, feed, lambda: len(feed.acked) == 10)
    assert fn.order("bad") == [0, 0, 0, 1, 2]
    invoked = [c[0]["n"] for c in fn.calls]
    # Every other key ran before the failing key's first retry came due.
    assert invoked.index(0, 1) > max(invoked.index(n) for n in range(3, 10))


async def test_per_key_an_event_that_exhausts_its_retries_is_dead_lettered_and_its_key_goes_on() -> None:
    feed = MemoryFeed()
    for n in range(3):
        feed.publish(event(n, "a"), headers={"Key": "a"})
    sink = MemorySink()
    fn = Function(lambda items: items[0]["n"] != 0)
    policy = RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.01)
    await run(mapping(ordering="key", key="header:Key", retry=policy), fn, feed, lambda: len(feed.acked) == 3,
              sink=sink)  # fmt: skip
    assert fn.order("a") == [0, 0, 1, 2]
    assert len(sink.stored) == 1


async def test_per_key_a_reported_item_failure_holds_the_later_items_of_its_key_only() -> None:
    feed = MemoryFeed()
    for n in range(6):
        key = "a" if n % 2 == 0 else "b"  # a: 0 2 4, b: 1 3 5
        feed.publish(event(n, key), headers={"Key": key})
    reported = False

    def answer(items: list[dict[str, Any]]) -> list[str]:
        nonlocal reported
        bad = [i["id"] for i in items if i["n"] == 2 and not reported]
        reported = reported or bool(bad)
        return bad

    fn = Function(answer)
    m = mapping(ordering="key", key="header:Key", batch_size=6, batch_window=0.02)
    await run(m, fn, feed, lambda: len(feed.acked) == 6)
    assert [[i["n"] for i in c] for c in fn.calls] == [[0, 2, 4, 1, 3, 5], [2, 4]]
    # a: 0 is settled, 2 failed and 4 went back with it unsettled (4 ran, but may not overtake 2's retry).
    assert feed.acked[:4] == [1, 2, 4, 6]


async def test_per_key_reads_the_key_from_a_subject_token() -> None:
    feed = MemoryFeed()
    for n in range(8):
        feed.publish(event(n, f"s{n % 2}"), subject=f"orders.s{n % 2}.created")
    fn = Function()
    m = mapping(ordering="key", key="subject:1", concurrency=2, batch_size=3, batch_window=0.01)
    await run(m, fn, feed, lambda: len(feed.acked) == 8)
    assert fn.order("s0") == [0, 2, 4, 6] and fn.order("s1") == [1, 3, 5, 7]


# -- per shard -------------------------------------------------------------------------------------------------


async def test_per_shard_each_batch_holds_one_shard_in_order() -> None:
    feed = MemoryFeed()
    for n in range(30):
        shard = f"s{n % 3}"
        feed.publish(event(n, shard), subject=f"clicks.{shard}")
    fn = Function(pause=lambda: 0.002)
    m = mapping(ordering="shard", key="subject:1", concurrency=3, batch_size=4, batch_window=0.01)
    await run(m, fn, feed, lambda: len(feed.acked) == 30)
    assert all(len({i["k"] for i in c}) == 1 for c in fn.calls)
    assert fn.overlaps == []
    for shard in ("s0", "s1", "s2"):
        assert fn.order(shard) == sorted(fn.order(shard))


# -- recovery after a crash ------------------------------------------------------------------------------------


async def test_after_a_crash_later_events_wait_for_the_unsettled_ones_to_come_back() -> None:
    feed = MemoryFeed()
    # The event a dead process held comes back only when its ack wait runs out; a newer one is there at once.
    feed.publish(event(1, "a"), headers={"Key": "a"}, deliver_after=0.1)
    feed.publish(event(2, "a"), headers={"Key": "a"})

    async def recovery() -> tuple[int, int]:
        return 1, 1  # one unsettled event, at or below stream position 1

    fn = Function()
    await run(mapping(ordering="key", key="header:Key"), fn, feed, lambda: len(feed.acked) == 2, recovery=recovery)
    assert fn.order("a") == [1, 2]


async def test_without_the_recovery_barrier_the_late_event_would_have_come_second() -> None:
    feed = MemoryFeed()
    feed.publish(event(1, "a"), headers={"Key": "a"}, deliver_after=0.1)
    feed.publish(event(2, "a"), headers={"Key": "a"})
    fn = Function()
    await run(mapping(ordering="key", key="header:Key"), fn, feed, lambda: len(feed.acked) == 2)
    assert fn.order("a") == [2, 1]  # what the barrier prevents (the test above)


async def test_per_key_an_event_arriving_while_its_key_runs_waits_for_it() -> None:
    feed = MemoryFeed()
    feed.publish(event(0, "a"), headers={"Key": "a"})
    fn = Function()

    async def invoke(invocation: Invocation) -> Outcome:
        n = json.loads(invocation.payload)["n"]
        if n < 3:  # the key's next event arrives, and is received, while this one runs
            feed.publish(event(n + 1, "a"), headers={"Key": "a"})
            await anyio.sleep(0.02)
        return await fn(invocation)

    m = mapping(ordering="key", key="header:Key", concurrency=2)
    feed.max_inflight = m.max_inflight
    dispatcher = Dispatcher(MemorySink(), m, feed, invoke=invoke)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            while len(feed.acked) < 4:  # noqa: ASYNC110 (polls the feed's settled state)
                await anyio.sleep(0.002)
            dispatcher.stop()
    assert fn.order("a") == [0, 1, 2, 3]
    assert dispatcher.stats.dead_lettered == 0


@pytest.mark.parametrize("batch_size", [1, 4])
async def test_per_key_a_poison_event_is_dead_lettered_and_its_key_goes_on(batch_size: int) -> None:
    """A structured CloudEvent that cannot be read, between two good events of its key: it goes to the DLQ at
    once (PoisonMessage), and the key's next event runs after it, in order."""
    feed = MemoryFeed()
    broken = {"Key": "a", "content-type": "application/cloudevents+json"}
    feed.publish(event(0, "a"), headers={"Key": "a"})
    feed.publish(b"[" * 5000 + b"]" * 5000, headers=broken)
    feed.publish(event(2, "a"), headers={"Key": "a"})
    sink = MemorySink()
    fn = Function()
    m = mapping(ordering="key", key="header:Key", batch_size=batch_size, batch_window=0.01)
    d = await run(m, fn, feed, lambda: len(feed.acked) == 3, sink=sink)
    assert fn.order("a") == [0, 2]
    [(_, record, headers)] = sink.stored
    assert headers and headers["Eventfn-Condition"] == "PoisonMessage"
    assert json.loads(record)["eventfn"]["stream_seq"] == 2
    assert d.stats.dead_lettered == 1
