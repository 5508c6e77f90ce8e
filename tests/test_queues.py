"""Queues with SQS's semantics, against a real nats-server: a real dispatcher on a real pull feed of the queue's
work-queue stream. The visibility timeout, the redrive policy, FIFO groups, delays, deduplication and filters;
what `eventfn serve` adds (provisioning, crashes, the CLI) is in test_queues_e2e.py."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from eventfn.broker.bus import Bus
from eventfn.broker.connection import connect
from eventfn.config import NatsSettings, QueueSettings
from eventfn.errors import QueueError, QueueNotFound
from eventfn.sources import queues
from eventfn.testing import NatsServer
from tests.queue_rig import BOOM, OK, Function, config, drained, item_failures, make_queues, plan, running, stored


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    async with connect([nats_server.url], NatsSettings()) as connected:
        yield connected


# -- standard queues ---------------------------------------------------------------------------------------------


async def test_a_plain_publish_is_delivered_as_an_sqs_record_and_deleted(bus: Bus) -> None:
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=5)))
    mapping = plan(resources, "orders")
    # As `nats pub` sends it: a body, and headers only if the user gives some.
    await bus.nc.publish("eventfn.queue.orders", b'{"order": 1}')
    await bus.nc.publish("eventfn.queue.orders", b"two", headers={"trace": "t-1", "Nats-Msg-Id": "m-2"})
    fn = Function()
    async with running(bus, mapping, fn):
        await fn.wait(lambda: len(fn.received) == 2)
    first, second = (r.record for r in fn.received)
    assert first["eventSource"] == "aws:sqs"
    assert first["eventSourceARN"] == "arn:aws:sqs:local:000000000000:orders"
    assert first["awsRegion"] == "local"
    assert first["body"] == '{"order": 1}'
    assert first["md5OfBody"] == hashlib.md5(b'{"order": 1}').hexdigest()
    assert first["messageAttributes"] == {}
    assert set(first["attributes"]) == {
        "ApproximateReceiveCount",
        "SentTimestamp",
        "SenderId",
        "ApproximateFirstReceiveTimestamp",
    }  # a standard queue's: no sequence number, group or deduplication id
    assert first["attributes"]["ApproximateReceiveCount"] == "1"
    assert abs(int(first["attributes"]["SentTimestamp"]) / 1000 - time.time()) < 30
    assert second["messageAttributes"] == {
        "trace": {"stringValue": "t-1", "stringListValues": [], "binaryListValues": [], "dataType": "String"}
    }
    assert first["messageId"] != second["messageId"]
    assert first["receiptHandle"].startswith("eventfn1/EVENTFN_Q_orders/fn--t0/")
    await drained(bus, "orders")


async def test_batches_take_up_to_the_batch_size_within_the_window(bus: Bus) -> None:
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=5)))
    for n in range(25):
        await bus.publish_stored("eventfn.queue.orders", str(n).encode())
    fn = Function()
    async with running(bus, plan(resources, "orders", batch_size=10, batch_window=0.5), fn):
        await fn.wait(lambda: len(fn.received) == 25)
    assert max(len(call) for call in fn.calls) == 10
    assert sorted(int(b) for b in fn.bodies()) == list(range(25))


async def test_a_failed_message_is_visible_again_after_the_visibility_timeout(bus: Bus) -> None:
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=2, max_receive_count=0)))
    await bus.publish_stored("eventfn.queue.orders", b"flaky")
    fn = Function(lambda records: BOOM if len(fn.received) == 1 else OK)
    async with running(bus, plan(resources, "orders"), fn):
        await fn.wait(lambda: len(fn.received) == 2)
    first, second = fn.received
    assert second.at - first.at >= 1.8  # hidden for the visibility timeout, not retried by the function's policy
    assert (first.count, second.count) == (1, 2)
    assert first.record["messageId"] == second.record["messageId"]
    await drained(bus, "orders")


async def test_only_the_items_listed_as_failed_come_back(bus: Bus) -> None:
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=1)))
    for body in (b"a", b"b", b"c"):
        await bus.publish_stored("eventfn.queue.orders", body)

    def answer(records: list[dict[str, Any]]) -> Any:
        if len(fn.calls) == 1:
            return item_failures(*(r["messageId"] for r in records if r["body"] == "b"))
        return OK

    fn = Function(answer)
    async with running(bus, plan(resources, "orders", batch_size=3, batch_window=0.5), fn):
        await fn.wait(lambda: len(fn.calls) == 2)
    assert sorted(r.body for r in fn.calls[0]) == ["a", "b", "c"]
    assert [(r.body, r.count) for r in fn.calls[1]] == [("b", 2)]
    await drained(bus, "orders")


async def test_after_max_receive_count_a_message_moves_to_the_queue_dlq(bus: Bus) -> None:
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=1, max_receive_count=2)))
    await bus.nc.publish("eventfn.queue.orders", b"poison", headers={"kind": "bad"})
    await bus.publish_stored("eventfn.queue.orders", b"fine")
    fn = Function(lambda records: BOOM if records[0]["body"] == "poison" else OK)
    async with running(bus, plan(resources, "orders", batch_size=1), fn) as dispatcher:
        await fn.wait(lambda: fn.bodies().count("poison") == 2)
        await drained(bus, "orders")
    assert [r.count for r in fn.received if r.body == "poison"] == [1, 2]
    moved = await stored(bus, "orders-dlq")
    assert len(moved) == 1
    body, headers = moved[0]
    assert body == b"poison"
    assert headers["kind"] == "bad"  # its attributes go with it
    assert headers["Eventfn-Source-Queue"] == "orders"
    assert dispatcher.stats.dead_lettered == 1
    # The queue's redrive policy applies, not the function's DLQ.
    assert not await bus.stream_exists("EVENTFN_DLQ") or not await bus.read("EVENTFN_DLQ", "eventfn.dlq.>")


async def test_a_message_received_too_often_without_an_outcome_is_moved_on_receipt(bus: Bus) -> None:
    """A handler that died (or a service killed mid-handler) never settles its message: received once more than
    the redrive policy allows, it is moved to the DLQ without running again."""
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=1, max_receive_count=1)))
    mapping = plan(resources, "orders")
    await bus.publish_stored("eventfn.queue.orders", b"dies")
    from eventfn.sources import mappings

    await mappings.provision(bus, mapping)
    # A consumer that takes the message and dies: nothing settles it.
    dead = bus.pull_feed(mapping.source.stream, mapping.name, max_inflight=1)
    async with anyio.create_task_group() as tg:
        await tg.start(dead.run)
        with anyio.fail_after(10):
            taken = await dead.receive()
        assert taken.data == b"dies"
        dead.stop()
    fn = Function()
    async with running(bus, mapping, fn):
        await drained(bus, "orders")  # redelivered once the visibility timeout ends, and moved
    assert fn.calls == []
    assert [body for body, _ in await stored(bus, "orders-dlq")] == [b"dies"]


async def test_with_a_filter_a_message_no_pattern_matches_is_deleted(bus: Bus) -> None:
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=5)))
    for body in (b'{"kind": "paid"}', b'{"kind": "refund"}', b"not json"):
        await bus.publish_stored("eventfn.queue.orders", body)
    fn = Function()
    filters = [{"body": {"kind": ["paid"]}}]
    async with running(bus, plan(resources, "orders", filters=filters), fn) as dispatcher:
        await drained(bus, "orders")
    assert fn.bodies() == ['{"kind": "paid"}']
    assert dispatcher.stats.filtered == 2


# -- FIFO queues -------------------------------------------------------------------------------------------------


async def test_fifo_keeps_each_group_in_order_and_a_failure_holds_its_group_only(bus: Bus) -> None:
    resources = await make_queues(bus, config(jobs=QueueSettings(fifo=True, visibility_timeout=1)))
    for n in range(5):
        for group in ("a", "b"):
            await queues.send_message(bus, "jobs", f"{group}{n}", group=group, dedup_id=f"{group}{n}", fifo=True)
    failed: list[str] = []

    def answer(records: list[dict[str, Any]]) -> Any:
        bad = [r["messageId"] for r in records if r["body"] == "a1" and not failed]
        if bad:
            failed.append("a1")
            return item_failures(*bad)
        return OK

    fn = Function(answer)
    async with running(bus, plan(resources, "jobs", batch_size=10, batch_window=0.2), fn):
        await fn.wait(lambda: fn.bodies().count("a4") + fn.bodies().count("b4") >= 2)
        await drained(bus, "jobs")
    a = [r.body for r in fn.received if r.body.startswith("a")]
    b = [r.body for r in fn.received if r.body.startswith("b")]
    # a1 failed: it and every later message of group a came back (a2.. may have been in the batch, unattempted).
    first_retry = a.index("a1", a.index("a1") + 1)
    assert a[first_retry:] == ["a1", "a2", "a3", "a4"]
    assert b == ["b0", "b1", "b2", "b3", "b4"]  # group b did not wait for a
    last_b = max(r.at for r in fn.received if r.body == "b4")
    failed_a1, retried_a1 = [r for r in fn.received if r.body == "a1"]
    assert retried_a1.count == 2
    assert retried_a1.at - failed_a1.at >= 0.9  # held for the visibility timeout, its group with it
    assert last_b < retried_a1.at  # b finished during a's visibility timeout
    records = [r.record for r in fn.received]
    assert {r["attributes"]["MessageGroupId"] for r in records} == {"a", "b"}
    assert all(r["attributes"]["MessageDeduplicationId"] == r["body"] for r in records)
    seqs = [int(r["attributes"]["SequenceNumber"]) for r in records if r["body"].startswith("b")]
    assert seqs == sorted(seqs)


async def test_fifo_deduplicates_by_id_and_by_content(bus: Bus) -> None:
    service = config(
        jobs=QueueSettings(fifo=True, visibility_timeout=5),
        hashed=QueueSettings(fifo=True, visibility_timeout=5, content_based_deduplication=True),
    )
    await make_queues(bus, service)
    first = await queues.send_message(bus, "jobs", "one", group="g", dedup_id="d-1", fifo=True)
    again = await queues.send_message(bus, "jobs", "one, resent", group="g", dedup_id="d-1", fifo=True)
    other = await queues.send_message(bus, "jobs", "one", group="g", dedup_id="d-2", fifo=True)
    assert again.message_id == first.message_id  # SQS answers a duplicate with the first one's id
    assert other.message_id != first.message_id
    assert [body for body, _ in await stored(bus, "jobs")] == [b"one", b"one"]
    for _ in range(2):
        await queues.send_message(bus, "hashed", "same body", group="g", fifo=True, content_based=True)
    await queues.send_message(bus, "hashed", "other body", group="g", fifo=True, content_based=True)
    kept = await stored(bus, "hashed")
    assert [body for body, _ in kept] == [b"same body", b"other body"]
    assert kept[0][1]["Message-Deduplication-Id"] == hashlib.sha256(b"same body").hexdigest()


async def test_a_fifo_message_without_a_group_is_moved_to_the_dlq_with_a_clear_error(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    resources = await make_queues(bus, config(jobs=QueueSettings(fifo=True, visibility_timeout=5)))
    await bus.nc.publish("eventfn.queue.jobs", b"no group")
    await queues.send_message(bus, "jobs", "grouped", group="g", dedup_id="1", fifo=True)
    fn = Function()
    with caplog.at_level(logging.ERROR, logger="eventfn.sources"):
        async with running(bus, plan(resources, "jobs"), fn):
            await drained(bus, "jobs")
    assert fn.bodies() == ["grouped"]
    assert [body for body, _ in await stored(bus, "jobs-dlq")] == [b"no group"]
    assert any("jobs" in r.message and "Message-Group-Id" in r.message for r in caplog.records)


# -- delays ------------------------------------------------------------------------------------------------------


async def test_the_queue_delay_hides_a_plain_publish_and_is_not_a_receive(bus: Bus) -> None:
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=5, delay_seconds=2)))
    fn = Function()
    async with running(bus, plan(resources, "orders"), fn) as dispatcher:
        sent = time.time()
        await bus.nc.publish("eventfn.queue.orders", b"later")
        await bus.nc.publish("eventfn.queue.orders", b"now", headers={"Delay-Seconds": "0"})  # its own delay: none
        await fn.wait(lambda: len(fn.received) == 2)
    assert fn.bodies() == ["now", "later"]  # its own delay of 0 overtook the queue's
    later = fn.received[1]
    assert later.at - sent >= 1.9
    assert later.count == 1  # the delivery that came early was handed back, not received
    assert dispatcher.stats.received >= 3


async def test_a_per_message_delay_is_scheduled_by_the_server(bus: Bus) -> None:
    resources = await make_queues(bus, config(orders=QueueSettings(visibility_timeout=5)))
    fn = Function()
    async with running(bus, plan(resources, "orders"), fn):
        before = time.time()
        sent = await queues.send_message(bus, "orders", "delayed", delay=2, attributes={"k": "v"})
        assert sent.message_id is None and sent.delayed_until is not None
        await fn.wait(lambda: len(fn.received) == 1)
    (got,) = fn.received
    assert got.at - before >= 1.9
    assert got.count == 1
    assert got.record["messageAttributes"]["k"]["stringValue"] == "v"
    assert "Delay-Seconds" not in got.record["messageAttributes"]


async def test_a_fifo_queue_delay_holds_the_group_in_order(bus: Bus) -> None:
    resources = await make_queues(bus, config(jobs=QueueSettings(fifo=True, visibility_timeout=5, delay_seconds=1)))
    fn = Function()
    async with running(bus, plan(resources, "jobs", batch_size=1), fn):
        sent = time.time()
        for n in range(3):
            await queues.send_message(bus, "jobs", f"m{n}", group="g", dedup_id=str(n), fifo=True)
        await fn.wait(lambda: len(fn.received) == 3)
    assert fn.bodies() == ["m0", "m1", "m2"]
    assert min(r.at for r in fn.received) - sent >= 0.9
    assert [r.count for r in fn.received] == [1, 1, 1]


# -- sending -----------------------------------------------------------------------------------------------------


async def test_sending_checks_what_sqs_checks(bus: Bus) -> None:
    await make_queues(bus, config(jobs=QueueSettings(fifo=True)))
    with pytest.raises(QueueError, match="group"):
        await queues.send_message(bus, "jobs", "x", fifo=True, dedup_id="1")
    with pytest.raises(QueueError, match="deduplication id"):
        await queues.send_message(bus, "jobs", "x", fifo=True, group="g")
    with pytest.raises(QueueError, match="per-message delay"):
        await queues.send_message(bus, "jobs", "x", fifo=True, group="g", dedup_id="1", delay=5)
    with pytest.raises(QueueError, match="out of range"):
        await queues.send_message(bus, "jobs", "x", delay=901)
    with pytest.raises(QueueError, match="reserved"):
        await queues.send_message(bus, "jobs", "x", attributes={"Nats-Msg-Id": "sneaky"})
    with pytest.raises(QueueError, match="line break"):
        await queues.send_message(bus, "jobs", "x", attributes={"a": "one\r\nNats-Msg-Id: 2"})
    with pytest.raises(QueueNotFound, match="EVENTFN_Q_nope"):
        await queues.send_message(bus, "nope", "x")
    assert await stored(bus, "jobs") == []


async def test_a_nats_py_client_can_send(bus: Bus) -> None:
    await make_queues(bus, config(orders=QueueSettings()))
    sent = await queues.send_message(bus.nc, "orders", b"from nats-py", attributes={"a": "1"})
    assert sent.message_id is not None
    assert await stored(bus, "orders") == [(b"from nats-py", {"a": "1"})]


# -- the pure parts: delays, receive counts, what a send puts on the wire ----------------------------------------


class Stored:
    """A stand-in for a delivered queue message (`source.Message`)."""

    def __init__(self, seq: int, *, delivered: int = 1, age: float = 0.0, headers: dict[str, str] | None = None):
        self.stream_seq = seq
        self.stream = "EVENTFN_Q_orders"
        self.delivered = delivered
        self.timestamp_ns = int((time.time() - age) * 1e9)
        self.headers = headers
        self.data = b"x"
        self.settled = False

    async def nak(self, delay: float = 0.0) -> None:
        self.settled = True


def redrive(**settings: Any) -> queues.Redrive:
    from eventfn.sources.memory import MemorySink

    ref = queues.ref("orders", QueueSettings(**settings))
    return queues.Redrive(ref, MemorySink(), stream="EVENTFN_Q_orders")


async def test_an_early_delivery_is_not_a_receive_and_an_unknown_one_is_guessed_generously() -> None:
    policy = redrive(delay_seconds=10, visibility_timeout=5)
    early = Stored(1, age=2)
    assert 7.5 < policy.due_in(early) <= 8.0
    await policy.defer(early, policy.due_in(early))  # type: ignore[arg-type]
    due = Stored(1, delivered=2, age=10)
    assert policy.due_in(due) <= 0  # type: ignore[arg-type]
    assert policy.receive_count(due, due.delivered) == 1  # type: ignore[arg-type]
    # Deferred by another process (this one never saw it): one deferral is assumed, never more.
    elsewhere = Stored(2, delivered=3, age=20)
    assert policy.receive_count(elsewhere, elsewhere.delivered) == 2  # type: ignore[arg-type]
    # Without a delay nothing is subtracted; nor for a message the server's scheduler already held back.
    assert redrive().receive_count(Stored(3, delivered=3), 3) == 3  # type: ignore[arg-type]
    scheduled = Stored(4, delivered=2, headers={"Nats-Scheduler": "eventfn.queue.orders.delayed.x"})
    assert policy.due_in(scheduled) == 0 and policy.receive_count(scheduled, 2) == 2  # type: ignore[arg-type]


def test_a_message_may_set_its_own_delay_on_a_standard_queue_only() -> None:
    standard, fifo = redrive(delay_seconds=30), redrive(fifo=True, delay_seconds=30)
    own = Stored(1, headers={"Delay-Seconds": "0"})
    assert standard.delay_of(own) == 0 and fifo.delay_of(own) == 30  # type: ignore[arg-type]
    for text, expected in (("5", 5.0), ("9999", 900.0), ("-3", 0.0), ("soon", 30.0), ("nan", 30.0), ("1_0", 30.0)):
        assert standard.delay_of(Stored(1, headers={"Delay-Seconds": text})) == expected  # type: ignore[arg-type]


def test_a_delayed_send_is_a_schedule_for_the_next_whole_second() -> None:
    subject, headers, at = queues.outgoing("orders", b"body", delay=2.5, attributes={"a": "1"}, now=1_800_000_000.2)
    assert subject.startswith("eventfn.queue.orders.delayed.")
    assert at == "2027-01-15T08:00:03Z"  # 1_800_000_002.7 rounded up: never shorter than asked
    assert headers["Nats-Schedule"] == f"@at {at}"
    assert headers["Nats-Schedule-Target"] == "eventfn.queue.orders"
    assert headers["a"] == "1"
    subject, headers, at = queues.outgoing("jobs", b"body", group="g", fifo=True, content_based=True)
    assert (subject, at) == ("eventfn.queue.jobs", None)
    assert headers["Nats-Msg-Id"] == headers["Message-Deduplication-Id"] == hashlib.sha256(b"body").hexdigest()
