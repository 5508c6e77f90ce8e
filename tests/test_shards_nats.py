"""Sharded streams against a real nats-server: the router writes puts to their shards by the MD5 of their key, in
put order, and takes them off the put stream; `put_record` from Python; the shard dispatcher's checkpoint is its
consumer's ack floor, so a new dispatcher goes on where the last one stopped, replaying nothing. Puts are sent as
`nats pub` sends them: core publishes, the key in a `Partition-Key` header (`nats pub -H`) or in the subject."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from eventfn.broker.bus import Bus
from eventfn.broker.connection import connect
from eventfn.config import DataStreamSettings, NatsSettings, RetryPolicy, StreamTrigger
from eventfn.invoke.invocation import Invocation, Outcome
from eventfn.sources import mappings, shards
from eventfn.sources.mappings import Mapping
from eventfn.sources.router import Router
from eventfn.sources.shard_dispatch import ShardDispatcher
from eventfn.testing import NatsServer
from tests.conftest import Collector

SETTINGS = DataStreamSettings(shards=4)


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    async with connect([nats_server.url], NatsSettings()) as connected:
        await connected.ensure(shards.stream_spec("clicks", SETTINGS, 1))
        await connected.ensure(shards.ingest_spec("clicks", SETTINGS, 1))
        yield connected


async def shard_records(nc: Client) -> Collector:
    """Every record written to a shard of `clicks` (a core subscription sees JetStream's writes too)."""
    collector = Collector()
    await nc.subscribe("eventfn.shard.clicks.*", cb=collector.on_message)
    await nc.flush()
    return collector


async def test_the_router_writes_each_put_to_its_keys_shard_in_put_order(bus: Bus, nc: Client) -> None:
    seen = await shard_records(nc)
    router = Router(bus, "clicks", SETTINGS, window=64)
    async with anyio.create_task_group() as tg:
        await tg.start(router.run)
        for n in range(300):
            if n % 3 == 0:  # nats pub -H Partition-Key:user-<k> eventfn.stream.clicks <body>
                await nc.publish("eventfn.stream.clicks", b"%d" % n, headers={"Partition-Key": f"user-{n % 11}",
                                                                              "trace": f"t{n}"})  # fmt: skip
            elif n % 3 == 1:  # the key in the subject: nats pub eventfn.stream.clicks.user.<k> <body>
                await nc.publish(f"eventfn.stream.clicks.user.{n % 11}", b"%d" % n)
            else:  # no key: the put's position is its key
                await nc.publish("eventfn.stream.clicks", b"%d" % n)
        await seen.wait_for(300)
        router.stop()
    by_shard: dict[str, list[int]] = defaultdict(list)
    keys: dict[str, set[int]] = defaultdict(set)
    for msg in seen.messages:
        n = int(msg.data)
        assert msg.headers is not None
        key = msg.headers["Partition-Key"]
        assert msg.subject == f"eventfn.shard.clicks.{shards.shard_of(key, 4)}", (n, key)
        expected_key = f"user-{n % 11}" if n % 3 == 0 else f"user.{n % 11}" if n % 3 == 1 else None
        if expected_key is not None:
            assert key == expected_key
        else:
            assert key.isdigit()  # its stream sequence among the puts
        if n % 3 == 0:
            assert msg.headers["trace"] == f"t{n}"  # the put's own headers travel with it
        assert int(msg.headers["Eventfn-Arrival"]) > 1_700_000_000 * 10**9
        by_shard[msg.subject].append(n)
        keys[msg.subject].add(n % 11)
    assert sorted(n for ns in by_shard.values() for n in ns) == list(range(300)), "each put once"
    for subject, ns in by_shard.items():
        assert ns == sorted(ns), f"{subject} out of put order"
    assert len(by_shard) == 4, "the keys spread over the shards"
    assert router.routed == 300
    state = await bus.consumer_state(subjects_ingest(), "router")
    assert state is not None and state.ack_floor_stream_seq == 300, "every put acknowledged"


def subjects_ingest() -> str:
    return "EVENTFN_SI_clicks"


async def test_a_stopped_router_hands_over_and_the_next_one_goes_on_in_order(bus: Bus, nc: Client) -> None:
    seen = await shard_records(nc)
    for n in range(100):
        await nc.publish("eventfn.stream.clicks", b"%d" % n, headers={"Partition-Key": "one-key"})
    first = Router(bus, "clicks", SETTINGS, window=8)
    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        await seen.wait_for(10)
        first.stop()
    second = Router(bus, "clicks", SETTINGS, window=8)
    async with anyio.create_task_group() as tg:
        await tg.start(second.run)
        await seen.wait_for(100)
        second.stop()
    # What the shard holds: each put once, in put order. (The core subscription sees every write; a write the first
    # router had sent but not yet seen stored when it stopped is sent again by the second, and JetStream drops it
    # by its Nats-Msg-Id: the stream, not the wire, is where "once" holds.)
    js = nc.jetstream()
    info = await js.stream_info("EVENTFN_S_clicks")
    stored = [await js.get_msg("EVENTFN_S_clicks", seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    assert [int(m.data or b"") for m in stored] == list(range(100))
    assert first.routed + second.routed == 100


async def test_put_record_through_the_router_or_straight_to_its_shard(bus: Bus, nc: Client) -> None:
    seen = await shard_records(nc)
    direct = await shards.put_record(nc, "clicks", b"direct", "user-1", shards=4)
    assert direct.shard_id == f"shardId-{shards.shard_of('user-1', 4):012d}"
    assert direct.sequence_number == "1"
    queued = await shards.put_record(nc, "clicks", b"routed", "user-2", headers={"trace": "x"})
    assert queued.put_sequence == 1 and queued.sequence_number is None
    router = Router(bus, "clicks", SETTINGS)
    async with anyio.create_task_group() as tg:
        await tg.start(router.run)
        await seen.wait_for(2)
        router.stop()
    routed: Msg = seen.messages[1]
    assert routed.data == b"routed"
    assert routed.subject == f"eventfn.shard.clicks.{shards.shard_of('user-2', 4)}"
    assert routed.headers is not None and routed.headers["trace"] == "x"


# -- the dispatcher on a real consumer --------------------------------------------------------------------------------


def shard_mapping(index: int, **trigger: Any) -> Mapping:
    source = shards.sources("clicks", SETTINGS, StreamTrigger(stream="clicks", starting_position="TRIM_HORIZON",
                                                              **trigger))[index]  # fmt: skip
    return Mapping(
        function="fn",
        name=f"fn--t0--shard-{index}",
        source=source,
        batch_size=10,
        retry=RetryPolicy(base_delay=0.01),
        timeout=2.0,
    )


class Recorder:
    """A function that records the records of each invocation (sequence number, data)."""

    def __init__(self, pause: float = 0.0) -> None:
        self.calls: list[list[tuple[int, str]]] = []
        self.changed = anyio.Event()
        self.pause = pause

    async def __call__(self, invocation: Invocation) -> Outcome:
        await anyio.sleep(self.pause)
        event = json.loads(invocation.payload)
        records = event["Records"]
        self.calls.append([(int(r["kinesis"]["sequenceNumber"]), base64.b64decode(r["kinesis"]["data"]).decode())
                           for r in records])  # fmt: skip
        self.changed.set()
        self.changed = anyio.Event()
        return Outcome(ok=True, payload=b"null")

    @property
    def records(self) -> list[tuple[int, str]]:
        return [r for call in self.calls for r in call]

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(20):
            while len(self.records) < count:
                await self.changed.wait()


async def run_dispatcher(bus: Bus, mapping: Mapping, fn: Recorder, count: int) -> ShardDispatcher:
    """Provision `mapping`, run its dispatcher on a real pull feed until `fn` has `count` records, and stop it."""
    await mappings.provision(bus, mapping)
    feed = bus.pull_feed("EVENTFN_S_clicks", mapping.name, max_inflight=mapping.max_inflight,
                         options=mapping.source.consumer)  # fmt: skip

    async def recovery() -> tuple[int, int]:
        state = await bus.consumer_state("EVENTFN_S_clicks", mapping.name)
        return (state.ack_pending, state.delivered_stream_seq) if state else (0, 0)

    dispatcher = ShardDispatcher(bus, mapping, feed, invoke=fn, recovery=recovery)
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        await fn.wait_for(count)
        dispatcher.stop()
    return dispatcher


async def test_the_checkpoint_is_the_ack_floor_and_a_new_dispatcher_goes_on_from_it(bus: Bus, nc: Client) -> None:
    keys = [k for k in (f"user-{n}" for n in range(200)) if shards.shard_of(k, 4) == 2][:5]
    sequences = []
    for n in range(40):
        put = await shards.put_record(nc, "clicks", b"%d" % n, keys[n % 5], shards=4)
        sequences.append(int(put.sequence_number or 0))
    await shards.put_record(nc, "clicks", b"elsewhere", "user-x", shards=4)  # another shard's: never seen here
    first = Recorder(pause=0.05)
    await run_dispatcher(bus, shard_mapping(2), first, 20)
    state = await bus.consumer_state("EVENTFN_S_clicks", "fn--t0--shard-2")
    assert state is not None
    done = len(first.records)
    assert done < 40, "stopped mid-stream"
    assert state.ack_floor_stream_seq == sequences[done - 1], "checkpointed after the last record handled"
    second = Recorder()
    await run_dispatcher(bus, shard_mapping(2), second, 40 - done)
    assert [data for _, data in first.records + second.records] == [str(n) for n in range(40)], "no gap, no replay"
    assert [seq for seq, _ in first.records + second.records] == sequences
