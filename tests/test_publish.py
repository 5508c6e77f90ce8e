"""Publishing events with ids a source chooses, against a real nats-server: JetStream keeps one message per id
within the stream's duplicate window, and the id travels with the event."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventfn import events
from eventfn.broker.bus import Bus
from eventfn.broker.connection import connect
from eventfn.config import NatsSettings
from eventfn.testing import NatsServer


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    async with connect([nats_server.url], NatsSettings()) as connected:
        await connected.ensure_stream("S", ["s.>"], max_age=60)
        yield connected


async def stored_count(bus: Bus) -> int:
    return (await bus.js.stream_info("S")).state.messages


async def test_a_second_publish_of_one_id_is_dropped(bus: Bus) -> None:
    """A connector that restarts publishes its last tick again: the stream holds it once."""
    tick = events.new_event("s.tick", b'{"n": 1}', source="eventfn:cron", id="tick-1")
    first = await bus.publish_event("s.tick", tick)
    again = await bus.publish_event(
        "s.tick", events.new_event("s.tick", b'{"n": 1}', source="eventfn:cron", id="tick-1")
    )
    assert first is not None and again is not None
    assert not first.duplicate
    assert again.duplicate and again.seq == first.seq
    assert await stored_count(bus) == 1


async def test_events_with_different_ids_are_all_stored(bus: Bus) -> None:
    for n in range(3):
        published = await bus.publish_event("s.tick", events.new_event("s.tick", b"{}", source="cron", id=f"t{n}"))
        assert published is not None and not published.duplicate
    assert await stored_count(bus) == 3


async def test_the_stored_event_carries_its_id_to_the_handler(bus: Bus) -> None:
    event = events.new_event("s.file", b'{"key": "a.txt"}', source="eventfn:files", id="files/a.txt@1700000000")
    published = await bus.publish_event("s.file", event)
    assert published is not None
    stored = await bus.get("S", published.seq)
    assert stored is not None and stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] == event.id
    # What the dispatcher makes of the stored message: the handler's `context.cloud_event`.
    received = events.from_nats(
        stored.subject, stored.data, stored.headers, fallback_id=events.request_id_for(published.seq, "S")
    )
    assert events.to_attributes(received)["id"] == event.id
    assert received.data == b'{"key": "a.txt"}'


async def test_an_event_not_stored_is_a_core_publish(bus: Bus) -> None:
    """Fire and forget: nothing to wait for. A stream that captures the subject still deduplicates on the id."""
    event = events.new_event("s.ping", b"{}", source="x", id="ping-1")
    assert await bus.publish_event("s.ping", event, stored=False) is None
    assert await bus.publish_event("s.ping", event, stored=False) is None
    published = await bus.publish_event("s.ping", event)  # a stored one after them: they were handled before it
    assert published is not None and published.duplicate
    assert await stored_count(bus) == 1
