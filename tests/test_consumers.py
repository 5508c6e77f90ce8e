"""The consumer a source owns, against a real nats-server: where a new one starts (LATEST, TRIM_HORIZON,
AT_TIMESTAMP), acknowledgements and a delivery limit, an existing one keeping its position when the options
change, and the state the dispatcher reads at start-up."""

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

from eventfn.broker.bus import Bus, ConsumerOptions, Delivery, PullFeed, connect
from eventfn.config import NatsSettings
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
async def feeding(bus: Bus, name: str = "c", *, max_inflight: int = 10) -> AsyncIterator[PullFeed]:
    """A running pull feed on consumer `name`, stopped on exit."""
    feed = bus.pull_feed("S", name, max_inflight=max_inflight)
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
            while (state := await bus.consumer_state("S", "c")) is None or state.ack_floor_stream_seq < 1:  # noqa: ASYNC110
                await anyio.sleep(0.02)  # acks are fire-and-forget: poll until the server counted the first
        assert (state.delivered_stream_seq, state.ack_floor_stream_seq, state.ack_pending) == (3, 1, 1)
        await second.ack()


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
