"""The events every contender drains, and the JetStream plumbing to time a drain the same way for each.

All contenders read the same stored events from eventfn's own stream. Each gets a durable consumer created
*paused* (eventfn's through `enabled = false` in its trigger, the others' by the harness), so the backlog is
in place and every consumer is subscribed before the clock starts; resuming the consumer starts the clock,
and the consumer's state (nothing pending, nothing awaiting an ack) stops it. Polling the server is the one
way to see "all acked" that is the same for eventfn, the raw client and FastStream.
"""

from __future__ import annotations

import time

import anyio
import msgspec
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

STREAM = "EVENTFN"
#: How often the drain clock looks at the consumer: a twentieth of the quick drain's duration, or less.
POLL_INTERVAL = 0.01
_PAUSED_FOREVER = "2200-01-01T00:00:00Z"


class Item(msgspec.Struct):
    sku: str
    qty: int


class BenchEvent(msgspec.Struct):
    """A small order-like JSON event (about 240 bytes), with the time it was published."""

    id: int
    ts: float
    type: str
    source: str
    customer: str
    amount: float
    currency: str
    items: list[Item]
    note: str


_encode = msgspec.json.Encoder().encode


def event(n: int, ts: float | None = None) -> bytes:
    """Event number `n`, stamped with `ts` (default: now)."""
    return _encode(
        BenchEvent(
            id=n,
            ts=time.time() if ts is None else ts,
            type="order.created",
            source="benchmarks",
            customer=f"customer-{n % 9973:05d}",
            amount=round((n % 10_000) / 7, 2),
            currency="EUR",
            items=[Item(sku="A-100", qty=2), Item(sku="B-200", qty=1)],
            note="a small JSON event, as a webhook sends",
        )
    )


async def preload(nc: Client, subject: str, count: int, *, chunk: int = 2000) -> float:
    """Publish `count` events to `subject` as `nats pub` does, and wait until the stream holds them all.

    Returns how long that took. Each chunk is flushed (a PING round trip) so the server is never flooded.
    """
    before = await stored(nc, subject)
    begin = time.perf_counter()
    for start in range(0, count, chunk):
        for n in range(start, min(count, start + chunk)):
            await nc.publish(subject, event(n))
        await nc.flush()
    with anyio.fail_after(120):
        while await stored(nc, subject) < before + count:  # noqa: ASYNC110 - JetStream has no "stored" event
            await anyio.sleep(0.05)
    return time.perf_counter() - begin


async def stored(nc: Client, subject: str) -> int:
    """How many events on `subject` the stream holds."""
    info = await nc.jetstream().stream_info(STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


def kick_subject(consumer: str) -> str:
    """Where the harness wakes a resumed consumer of its own making (see `timed_drain`)."""
    return f"events.bench.kick.{consumer}"


async def create_consumer(nc: Client, name: str, subject: str, *, paused: bool = True) -> None:
    """A durable pull consumer on `subject` (and its kick subject), from the first stored event, paused."""
    js = nc.jetstream()
    config = ConsumerConfig(
        durable_name=name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_ack_pending=20_000,
        filter_subjects=[subject, kick_subject(name)],
    )
    await js.add_consumer(STREAM, config)
    if paused:
        await js.pause_consumer(STREAM, name, _PAUSED_FOREVER)


async def acked_up_to(nc: Client, consumer: str, last_seq: int) -> bool:
    """Whether `consumer` has acknowledged every event up to stream sequence `last_seq`."""
    info = await nc.jetstream().consumer_info(STREAM, consumer)
    return (info.ack_floor.stream_seq or 0) >= last_seq


async def last_sequence(nc: Client, subject: str) -> int:
    """The stream sequence of the last event stored on `subject`."""
    msg = await nc.jetstream().get_last_msg(STREAM, subject)
    assert msg.seq is not None
    return msg.seq


async def timed_drain(nc: Client, consumer: str, *, kick: str, last_seq: int, timeout: float) -> float:
    """Resume `consumer`; return the seconds until every event up to stream sequence `last_seq` is acked.

    nats-server (2.15) leaves pull requests made while a consumer was paused waiting until they expire, even
    once it is resumed; a new message on the consumer's filter wakes them. So the resume is followed by one
    event on `kick`, a subject only this consumer takes (eventfn's mappings take their redrive subject). It is
    stored after the backlog, so it does not count. The end is taken halfway between the last look that saw
    work left and the first that saw none: the polling adds +-POLL_INTERVAL/2 of noise, no bias.
    """
    js = nc.jetstream()
    begin = time.perf_counter()
    await js.resume_consumer(STREAM, consumer)
    await nc.publish(kick, event(-1))
    await nc.flush()
    last_busy = begin
    with anyio.fail_after(timeout):
        while True:
            await anyio.sleep(POLL_INTERVAL)
            asked = time.perf_counter()
            info = await js.consumer_info(STREAM, consumer)
            if (info.ack_floor.stream_seq or 0) >= last_seq:
                return (last_busy + asked) / 2 - begin
            last_busy = asked
