"""The consumer a source owns, against a real nats-server: where a new one starts (LATEST, TRIM_HORIZON,
AT_TIMESTAMP), acknowledgements and a delivery limit, an existing one keeping its position when the options
change, the state the dispatcher reads at start-up, and exclusive consumption (JetStream's pinned client): one
feed receives, a standby takes over when it goes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from eventfn.broker.bus import UNREAD, Bus
from eventfn.broker.connection import connect
from eventfn.broker.feeds import Delivery, PullFeed, queue_publish
from eventfn.broker.specs import ConsumerOptions
from eventfn.config import NatsSettings
from eventfn.sources import mappings
from eventfn.sources.source import async_queue
from eventfn.testing import NatsServer
from tests.conftest import Collector


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    async with connect([nats_server.url], NatsSettings()) as connected:
        await connected.ensure_stream("S", ["s.>"], max_age=60)
        yield connected


async def provision(bus: Bus, name: str = "c", *, ack_wait: float = 30.0, **options: Any) -> None:
    await bus.ensure_consumer(
        "S",
        name,
        filter_subjects=["s.>"],
        ack_wait=ack_wait,
        max_ack_pending=100,
        options=ConsumerOptions(**options),
    )


async def consumer_config(nc: Client, name: str = "c") -> dict[str, Any]:
    reply = await nc.request(f"$JS.API.CONSUMER.INFO.S.{name}", b"", timeout=5)
    return json.loads(reply.data)["config"]  # type: ignore[no-any-return]


@asynccontextmanager
async def feeding(bus: Bus, name: str = "c", *, max_inflight: int = 10, **options: Any) -> AsyncIterator[PullFeed]:
    """A running pull feed on consumer `name`, stopped on exit."""
    feed = bus.pull_feed("S", name, max_inflight=max_inflight, options=ConsumerOptions(**options))
    async with anyio.create_task_group() as tg:
        await tg.start(feed.run)
        try:
            yield feed
        finally:
            feed.stop()


async def receive(feed: PullFeed, count: int = 1, timeout: float = 10.0) -> list[Delivery]:
    with anyio.fail_after(timeout):
        return [await feed.receive() for _ in range(count)]


async def publish(bus: Bus, *bodies: str) -> list[int]:
    return [await bus.publish_stored(f"s.{body}", body.encode()) for body in bodies]


# -- where a new consumer starts -------------------------------------------------------------------------------------


async def test_latest_starts_at_events_published_after_the_consumer(bus: Bus) -> None:
    await publish(bus, "before")
    await provision(bus)  # LATEST is the default
    await publish(bus, "after")
    async with feeding(bus) as feed:
        [delivery] = await receive(feed)
    assert delivery.data == b"after"


async def test_trim_horizon_starts_at_the_first_stored_event(bus: Bus) -> None:
    await publish(bus, "first", "second")
    await provision(bus, start_position="TRIM_HORIZON")
    async with feeding(bus) as feed:
        assert [d.data for d in await receive(feed, 2)] == [b"first", b"second"]


async def test_at_timestamp_starts_at_the_first_event_stored_at_or_after_it(bus: Bus) -> None:
    await publish(bus, "earlier")
    between = time.time()  # the server stamps stored messages with this machine's clock
    await publish(bus, "later", "latest")
    await provision(bus, start_position="AT_TIMESTAMP", start_time=between)
    config = await consumer_config(bus.nc)
    assert config["deliver_policy"] == "by_start_time"
    async with feeding(bus) as feed:
        assert [d.data for d in await receive(feed, 2)] == [b"later", b"latest"]


async def test_from_start_overrides_the_start_position(bus: Bus) -> None:
    """A stream re-created after it was deleted holds only what came after: all of it is the consumer's work."""
    await publish(bus, "first")
    await bus.ensure_consumer(
        "S", "c", filter_subjects=["s.>"], ack_wait=30, max_ack_pending=10, options=ConsumerOptions(), from_start=True
    )
    async with feeding(bus) as feed:
        [delivery] = await receive(feed)
    assert delivery.data == b"first"


def test_options_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="AT_TIMESTAMP needs a start_time"):
        ConsumerOptions(start_position="AT_TIMESTAMP")
    with pytest.raises(ValueError, match="max_deliveries"):
        ConsumerOptions(max_deliveries=0)
    with pytest.raises(ValueError, match="explicit acks"):
        ConsumerOptions(exclusive=True, ack="none")
    with pytest.raises(msgspec.ValidationError, match="start_position"):
        msgspec.convert({"start_position": "EARLIEST"}, ConsumerOptions)


# -- acknowledgements and deliveries ----------------------------------------------------------------------------------


async def test_max_deliveries_stops_redelivering_a_message(bus: Bus, nc: Client) -> None:
    advisories = Collector()
    await nc.subscribe("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.S.c", cb=advisories.on_message)
    await nc.flush()
    await provision(bus, max_deliveries=2)
    assert (await consumer_config(bus.nc))["max_deliver"] == 2
    await publish(bus, "poison")
    async with feeding(bus) as feed:
        for attempt in (1, 2):
            [delivery] = await receive(feed)
            assert (delivery.data, delivery.delivered) == (b"poison", attempt)
            await delivery.nak()
        await advisories.wait_for(1)
        await publish(bus, "next")
        [delivery] = await receive(feed)  # a third delivery of the first would come before this one
        assert delivery.data == b"next"
        await delivery.ack()


async def test_ack_none_forgets_a_message_once_delivered(bus: Bus) -> None:
    await provision(bus, ack="none")
    await publish(bus, "once")
    async with feeding(bus) as feed:
        [delivery] = await receive(feed)
        assert delivery.data == b"once"
        state = await bus.consumer_state("S", "c")
        assert state is not None
        assert (state.ack_pending, state.ack_floor_stream_seq) == (0, 1)
        await delivery.ack()  # settling releases the feed's credit; the server ignores the ack


async def test_an_unchanged_consumer_is_not_written_again_and_a_changed_one_is(bus: Bus, nc: Client) -> None:
    writes = Collector()
    await nc.subscribe("$JS.API.CONSUMER.CREATE.S.>", cb=writes.on_message)
    await nc.flush()
    await provision(bus, ack_wait=30)
    await writes.wait_for(1)
    for current in (UNREAD, (await bus.consumer_configs("S"))["c"]):  # read here, or as listed by the caller
        await bus.ensure_consumer("S", "c", filter_subjects=["s.>"], ack_wait=30, max_ack_pending=100, current=current)
    await provision(bus, ack_wait=31)  # a change is written (and the unchanged ones before it were not)
    await writes.wait_for(2)
    await nc.flush()
    assert len(writes.messages) == 2
    assert json.loads(writes.messages[1].data)["config"]["ack_wait"] == 31 * 10**9


async def test_consumers_are_listed_past_a_page_and_provisioned_side_by_side(bus: Bus) -> None:
    await bus.ensure_stream("EVENTFN", ["eventfn.>"], max_age=60)  # one page of JetStream's list holds 256
    wanted = [mappings.Mapping(function=f"f{i}", name=f"f{i}--async", source=async_queue(f"f{i}")) for i in range(260)]
    outcome = await mappings.provision_all(bus, wanted)
    assert outcome.error is None and not outcome.taken and len(outcome.done) == 260
    listed = await bus.consumer_configs("EVENTFN")
    assert sorted(listed) == sorted(m.name for m in wanted)
    assert listed["f7--async"]["filter_subjects"] == ["eventfn.async.f7", "eventfn.redrive.f7--async"]
    assert await bus.consumer_configs("NO_SUCH_STREAM") == {}


async def test_an_idle_feed_asks_less_often_and_still_gets_a_message_at_once(bus: Bus, nc: Client) -> None:
    await provision(bus)
    requests = Collector()
    await nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.S.c", cb=requests.on_message)
    await nc.flush()
    feed = PullFeed(bus.nc, "S", "c", max_inflight=2, expires=0.5, idle_expires=60.0)
    async with anyio.create_task_group() as tg:
        await tg.start(feed.run)
        await requests.wait_for(2)  # the first expired with nothing: the next one lasts long
        expiries = [json.loads(m.data)["expires"] for m in requests.messages]
        assert expiries == [int(0.5e9), int(60e9)]
        asked = time.monotonic()
        await publish(bus, "one")
        (delivery,) = await receive(feed)
        assert time.monotonic() - asked < 10  # served by the long request, not after it
        await delivery.ack()
        await requests.wait_for(3)  # events came: short requests again
        assert json.loads(requests.messages[2].data)["expires"] == int(0.5e9)
        feed.stop()


async def test_the_state_names_what_was_delivered_and_acknowledged(bus: Bus) -> None:
    await provision(bus, start_position="TRIM_HORIZON")
    state = await bus.consumer_state("S", "c")
    assert state is not None and (state.delivered_stream_seq, state.ack_floor_stream_seq) == (0, 0)
    await publish(bus, "a", "b", "c")
    async with feeding(bus) as feed:
        first, second, third = await receive(feed, 3)
        await first.ack()
        await third.ack()
        with anyio.fail_after(10):
            # Acks are fire-and-forget, and JetStream counts them apart from the requests that read its state: poll
            # until it counted both.
            while (state := await bus.consumer_state("S", "c")) is None or state.ack_pending > 1:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert (state.delivered_stream_seq, state.ack_floor_stream_seq, state.ack_pending) == (3, 1, 1)
        await second.ack()


async def test_a_queued_publish_goes_out_in_order_with_the_connection_s_other_publishes(
    bus: Bus, nats_server: NatsServer, nc: Client
) -> None:
    """Acks are appended to the connection's buffer without a coroutine (`queue_publish`): the server gets them in
    the order they were written, after what was published before (an outcome's write comes before its ack); a
    client that is not plainly connected says so, and the caller publishes the ordinary way."""
    seen = Collector()
    await nc.subscribe("t.>", cb=seen.on_message)
    await nc.flush()
    await bus.nc.publish("t.1", b"1")
    assert queue_publish(bus.nc, "t.2", b"2")
    await bus.nc.publish("t.3", b"3")
    assert queue_publish(bus.nc, "t.4", b"4")
    await seen.wait_for(4)
    assert [m.data for m in seen.messages] == [b"1", b"2", b"3", b"4"]
    async with connect([nats_server.url], NatsSettings()) as other:
        closing = other.nc
    assert not queue_publish(closing, "t.5", b"5")


# -- an existing consumer -------------------------------------------------------------------------------------------


async def test_an_existing_consumer_keeps_its_position_when_options_change(bus: Bus) -> None:
    await provision(bus)  # LATEST
    await publish(bus, "one", "two")
    async with feeding(bus, max_inflight=1) as feed:
        [one] = await receive(feed)
        feed.stop()  # before the ack frees its credit: "two" stays the next to deliver
        await one.ack()
    # The source now asks to start from the beginning, or at a time, with other settings: the settings that
    # can change do, and the consumer goes on from where it is.
    await provision(bus, start_position="TRIM_HORIZON", max_deliveries=5, ack_wait=20)
    await provision(bus, start_position="AT_TIMESTAMP", start_time=0.0, max_deliveries=5, ack_wait=20)
    config = await consumer_config(bus.nc)
    assert (config["deliver_policy"], config["max_deliver"], config["ack_wait"]) == ("new", 5, 20 * 10**9)
    await publish(bus, "three")
    async with feeding(bus) as feed:
        assert [d.data for d in await receive(feed, 2)] == [b"two", b"three"]


async def test_an_existing_consumer_keeps_its_ack_policy(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    await provision(bus, ack="none")
    await provision(bus, ack="explicit", max_deliveries=3)  # JetStream cannot change it: logged, not an error
    config = await consumer_config(bus.nc)
    assert (config["ack_policy"], config["max_deliver"]) == ("none", 3)
    assert "consumer S/c keeps ack policy none (asked for explicit)" in caplog.text


# -- exclusive consumption (JetStream's pinned client) ----------------------------------------------------------------


class PinWatch:
    """What a feed's `on_pin_change` heard, with a way to wait (without sleeping) for the next change."""

    def __init__(self) -> None:
        self.changes: list[bool] = []
        self._changed = anyio.Event()

    def __call__(self, pinned: bool) -> None:
        self.changes.append(pinned)
        self._changed.set()

    async def wait_for(self, pinned: bool, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while not self.changes or self.changes[-1] != pinned:
                self._changed = anyio.Event()
                await self._changed.wait()


def exclusive_feed(bus: Bus, watch: PinWatch | None = None, *, max_inflight: int = 10, **options: Any) -> PullFeed:
    return bus.pull_feed(
        "S", "c", max_inflight=max_inflight, options=ConsumerOptions(exclusive=True, **options), on_pin_change=watch
    )


async def pinned_id(nc: Client) -> str | None:
    reply = await nc.request("$JS.API.CONSUMER.INFO.S.c", b"", timeout=5)
    groups = json.loads(reply.data).get("priority_groups") or []
    return groups[0].get("pinned_client_id") if groups else None


async def test_an_exclusive_consumer_is_a_pinned_client_consumer(bus: Bus) -> None:
    await provision(bus, exclusive=True, pin_timeout=7)
    config = await consumer_config(bus.nc)
    assert (config["priority_groups"], config["priority_policy"], config["priority_timeout"]) == (
        ["eventfn"],
        "pinned_client",
        7 * 10**9,
    )
    await provision(bus)  # a source that no longer needs it: JetStream lets the consumer drop the group
    assert "priority_groups" not in await consumer_config(bus.nc)


@pytest.mark.parametrize("how", ["hands back", "hangs", "disconnects"])
async def test_one_feed_consumes_an_exclusive_consumer_and_a_standby_takes_over(
    bus: Bus, nats_server: NatsServer, how: str
) -> None:
    """The first feed to ask gets everything, the standby nothing. The standby takes over, and receives what the
    first left unacknowledged:
    - at once when the first stops and settles what it holds (its dispatcher hands back what it had not started);
    - within the pin timeout when the first stops asking (its process hangs, or its connection closes), and
      the first's unacknowledged messages once their ack wait ends."""
    pin_timeout = 30.0 if how == "hands back" else 2.0
    ack_wait = 2.0
    await provision(bus, ack_wait=ack_wait, exclusive=True, pin_timeout=pin_timeout)
    async with (
        connect([nats_server.url], NatsSettings()) as bus_a,
        connect([nats_server.url], NatsSettings()) as bus_b,
        anyio.create_task_group() as tg,
    ):
        first, standby = exclusive_feed(bus_a, pin_timeout=pin_timeout), exclusive_feed(bus_b, pin_timeout=pin_timeout)
        scope, gone = anyio.CancelScope(), anyio.Event()

        async def run_first() -> None:
            with scope:
                await first.run()
            gone.set()

        tg.start_soon(run_first)
        await publish(bus, "0")
        [zero] = await receive(first)
        assert first.pinned and zero.headers is None  # the pin header is the feed's business, not the handler's
        await tg.start(standby.run)
        await publish(bus, *(str(n) for n in range(1, 10)))
        deliveries = [zero, *await receive(first, 9)]
        assert [d.data for d in deliveries] == [str(n).encode() for n in range(10)]  # all of them to the first
        for delivery in deliveries[:5]:
            await delivery.ack()
        assert not standby.pinned and await pinned_id(bus.nc) is not None
        with pytest.raises(anyio.WouldBlock):
            standby.receive_nowait()

        stopped = time.monotonic()
        if how == "hands back":
            first.stop()
            for delivery in deliveries[5:]:
                await delivery.nak()
            await gone.wait()  # it unpinned as the last delivery was settled
        elif how == "hangs":
            scope.cancel()  # no more requests, and nothing settled
        else:
            await bus_a.nc.close()
            scope.cancel()
        await publish(bus, "10")
        taken_over = await receive(standby, timeout=pin_timeout + 5)
        took = time.monotonic() - stopped
        assert took < (2.0 if how == "hands back" else pin_timeout + 2.0), took
        assert standby.pinned
        rest = await receive(standby, 5, timeout=ack_wait + 5)
        # A feed that hangs, or whose connection the server has not seen closing yet, may still have had "10"
        # sent to a request it made before: it comes again after its ack wait, as the unacknowledged ones do.
        ten = next(d.delivered for d in [*taken_over, *rest] if d.data == b"10")
        assert ten == 1 or how != "hands back"
        assert sorted((int(d.data), d.delivered) for d in [*taken_over, *rest]) == [
            *((n, 2) for n in range(5, 10)),  # redelivered: handed back, or once their ack wait ran out
            (10, ten),
        ]
        for delivery in [*taken_over, *rest]:
            await delivery.ack()
        standby.stop()


async def test_a_stopped_feed_keeps_its_pin_until_its_deliveries_are_settled(bus: Bus, nats_server: NatsServer) -> None:
    """A stopping service finishes what it started; meanwhile no other process may start on the next events
    (of the same keys): the pin is kept past the pin timeout, then handed over as the last one is settled."""
    # 3 s: a stalled pin would lapse 2 to 3 s after the stopped feed's last keep-alive (one a second), so a
    # hand-over within 2 s of the ack is the unpin's, and a loaded machine still has 2 s for its two requests.
    pin_timeout = 3.0
    await provision(bus, exclusive=True, pin_timeout=pin_timeout)
    async with connect([nats_server.url], NatsSettings()) as bus_b:
        first, standby = exclusive_feed(bus, pin_timeout=pin_timeout), exclusive_feed(bus_b)
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            await publish(bus, "0")
            [zero] = await receive(first)
            await tg.start(standby.run)
            first.stop()
            await publish(bus, "1")
            with anyio.move_on_after(pin_timeout + 1.5):  # past the time the pin would have lapsed
                await standby.receive()
                pytest.fail("the standby received a message while the stopped feed's delivery was in work")
            await zero.ack()
            [one] = await receive(standby, timeout=2.0)  # unpinned at once, not after a lapse
            assert one.data == b"1" and standby.pinned and not first.pinned
            assert not await first.unpin()  # it no longer holds the pin: the standby's stays
            await one.ack()
            standby.stop()


async def test_a_busy_feed_keeps_its_pin(bus: Bus, nats_server: NatsServer) -> None:
    """With all its credit in use the pinned feed sends no pull request for messages, yet keeps its pin (a
    request that takes nothing): the standby gets nothing however long the work takes."""
    pin_timeout = 1.0
    await provision(bus, exclusive=True, pin_timeout=pin_timeout)
    async with connect([nats_server.url], NatsSettings()) as bus_b:
        busy, standby = exclusive_feed(bus, max_inflight=2, pin_timeout=pin_timeout), exclusive_feed(bus_b)
        async with anyio.create_task_group() as tg:
            await tg.start(busy.run)
            await publish(bus, "0", "1")
            held = await receive(busy, 2)
            await tg.start(standby.run)
            pin = await pinned_id(bus.nc)
            await publish(bus, "2")
            with anyio.move_on_after(3 * pin_timeout):  # the pin would lapse in a third of this
                await standby.receive()
                pytest.fail("the standby received a message: the busy feed lost its pin")
            assert busy.pinned and await pinned_id(bus.nc) == pin
            await held[0].ack()
            [two] = await receive(busy)
            assert two.data == b"2"
            for delivery in (held[1], two):
                await delivery.ack()
            busy.stop()
            standby.stop()


async def test_a_feed_whose_pin_was_taken_hears_it_and_stands_by(bus: Bus, nats_server: NatsServer) -> None:
    """An operator unpins (`nats consumer unpin`): JetStream refuses the old pin (status 423), the feed that held it
    says so and asks on as a standby, and the next message goes to the feed pinned then."""
    await provision(bus, exclusive=True, pin_timeout=3)
    first_watch, standby_watch = PinWatch(), PinWatch()
    async with connect([nats_server.url], NatsSettings()) as bus_b:
        first = exclusive_feed(bus, first_watch, pin_timeout=3)
        standby = exclusive_feed(bus_b, standby_watch, pin_timeout=3)
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            await publish(bus, "0")
            [zero] = await receive(first)
            await zero.ack()
            await tg.start(standby.run)
            reply = await bus.nc.request("$JS.API.CONSUMER.UNPIN.S.c", b'{"group": "eventfn"}', timeout=5)
            assert "error" not in json.loads(reply.data)
            await publish(bus, "1")
            await first_watch.wait_for(False)
            [one] = await receive(standby)
            assert one.data == b"1"
            assert standby.pinned and not first.pinned
            assert (first_watch.changes, standby_watch.changes) == ([True, False], [True])
            await one.ack()
            first.stop()
            standby.stop()


async def test_a_feed_outside_the_group_gets_nothing_and_says_why(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    """An eventfn that does not know the consumer is exclusive (an older version, during a rolling upgrade) is
    refused, and logs it as a stall; it cannot take messages from the pinned process."""
    await provision(bus, exclusive=True)
    await publish(bus, "0")
    async with feeding(bus) as outsider:  # no options: not in the group
        with anyio.fail_after(10):
            while bus.stalls.failures("consumer S/c") < 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)  # polling a count: nothing signals "the feed asked again"
        with pytest.raises(anyio.WouldBlock):
            outsider.receive_nowait()
    assert "JetStream stall: consumer S/c: pull request refused: Bad Request - Priority Group missing" in caplog.text
