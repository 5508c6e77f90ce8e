"""Sources against a real nats-server: a source's own stream, its start position, and a dispatcher fed by a
real pull feed (the seams the connectors plug into)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
import msgspec
import pytest

from eventfn.broker.bus import Bus
from eventfn.broker.connection import connect
from eventfn.broker.specs import StreamSpec
from eventfn.config import NatsSettings
from eventfn.invoke.invocation import Invocation, Outcome
from eventfn.sources import mappings
from eventfn.sources.dispatch import Dispatcher
from eventfn.sources.mappings import Mapping
from eventfn.sources.source import Source, plain_subjects
from eventfn.testing import NatsServer


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    async with connect([nats_server.url], NatsSettings()) as connected:
        yield connected


def work_queue_source() -> Source:
    """What a connector with its own stream (a work queue) declares."""
    return Source(
        kind="test-queue",
        stream="TESTQ",
        subjects=("testq.jobs",),
        stream_spec=StreamSpec(name="TESTQ", subjects=["testq.>"], max_age=3600),
    )


@pytest.mark.parametrize("together", [False, True], ids=["alone", "with-the-others"])
async def test_a_source_with_its_own_stream_gets_it_made_and_its_events_dispatched(bus: Bus, together: bool) -> None:
    mapping = Mapping(function="worker", name="worker--jobs", source=work_queue_source(), batch_size=3)
    if together:  # as the service provisions: every mapping at once, each stream made once
        other = msgspec.structs.replace(mapping, name="worker--more")
        outcome = await mappings.provision_all(bus, [mapping, other])
        assert outcome.error is None and sorted(m.name for m in outcome.done) == ["worker--jobs", "worker--more"]
    else:
        await mappings.provision(bus, mapping)
    for n in range(5):
        await bus.publish_stored("testq.jobs", json.dumps({"n": n}).encode())
    seen: list[int] = []
    done = anyio.Event()

    async def invoke(invocation: Invocation) -> Outcome:
        seen.extend(json.loads(r["body"])["n"] for r in json.loads(invocation.payload)["Records"])
        if len(seen) == 5:
            done.set()
        return Outcome(ok=True, payload=b"null")

    feed = bus.pull_feed("TESTQ", mapping.name, max_inflight=mapping.max_inflight)
    dispatcher = Dispatcher(bus, mapping, feed, invoke=invoke)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            await done.wait()
            dispatcher.stop()
    assert sorted(seen) == [0, 1, 2, 3, 4]
    state = await bus.consumer_state("TESTQ", mapping.name)
    assert state is not None and state.ack_pending == 0 and state.pending == 0


@pytest.mark.parametrize(("position", "expected"), [("LATEST", 0), ("TRIM_HORIZON", 4), ("AT_TIMESTAMP", 2)])
async def test_a_new_mapping_starts_where_its_source_says(bus: Bus, position: str, expected: int) -> None:
    await bus.ensure(StreamSpec(name="EVENTFN", subjects=["events.>"], max_age=3600))
    for n in range(2):
        await bus.publish_stored("events.start", b"%d" % n)
    between = time.time()
    await anyio.sleep(0.01)  # the timestamps of the two halves must differ
    for n in range(2, 4):
        await bus.publish_stored("events.start", b"%d" % n)
    source = plain_subjects(
        ["events.start"],
        start_position=position,  # type: ignore[arg-type]
        start_time=between if position == "AT_TIMESTAMP" else None,
    )
    mapping = Mapping(function="f", name=f"f--{position.lower().replace('_', '')}", source=source)
    await mappings.provision(bus, mapping)
    state = await bus.consumer_state("EVENTFN", mapping.name)
    assert state is not None and state.pending == expected


async def test_an_existing_mapping_keeps_its_position_when_its_source_changes(bus: Bus) -> None:
    await bus.ensure(StreamSpec(name="EVENTFN", subjects=["events.>"], max_age=3600))
    await bus.publish_stored("events.keep", b"1")
    mapping = Mapping(function="f", name="f--keep", source=plain_subjects(["events.keep"]))
    await mappings.provision(bus, mapping)
    moved = msgspec.structs.replace(mapping, source=plain_subjects(["events.keep"], start_position="TRIM_HORIZON"))
    await mappings.provision(bus, moved)
    state = await bus.consumer_state("EVENTFN", mapping.name)
    assert state is not None and state.pending == 0  # still at LATEST: the stored event is not replayed
