"""The cron scheduler end to end: `eventfn serve` processes on a real nats-server, a seconds-level rate, ticks
through the whole mapping machinery (a failing handler's tick retried, then dead-lettered), and three replicas
on one NATS delivering each tick exactly once, one of them killed on the way."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client

from eventfn.testing import NatsServer, Serve, wait_stats, write_handler

pytestmark = pytest.mark.e2e

TICK = """
    # /// eventfn
    # triggers = [{ type = "schedule", schedule = "rate(1 second)" }]
    # ///
    import json

    import _probe


    def handler(event, context):
        _probe.report("probe.tick", json.dumps(event))
        return None
"""

FAILING = """
    # /// eventfn
    # triggers = [{ type = "schedule", schedule = "rate(1 second)" }]
    # [retry]
    # max_attempts = 1
    # base_delay = 0.2
    # ///
    import _probe


    def handler(event, context):
        _probe.report("probe.failing", event["id"])
        raise RuntimeError("the report could not be written")
"""

Probe = Callable[[str], Awaitable[Any]]


def _seconds(times: list[str]) -> list[float]:
    return sorted(datetime.fromisoformat(t).timestamp() for t in times)


async def test_ticks_of_a_seconds_rate_reach_the_handler_and_a_failing_tick_is_dead_lettered(
    serve: Callable[..., Awaitable[Serve]], handlers: Path, nc: Client, probe: Probe
) -> None:
    write_handler(handlers, "tick", TICK)
    write_handler(handlers, "failing", FAILING)
    ticks = await probe("probe.tick")
    attempts = await probe("probe.failing")
    service = await serve()
    await service.log.await_line(r"schedule tick--t0: rate\(1 second\) in UTC \(misfire fire_once\)")

    events = [json.loads(t) for t in await ticks.wait_for(3, timeout=30)]
    # The handler gets the Scheduled Event itself (batch size 1), as Lambda does from EventBridge.
    for event in events:
        assert event["detail-type"] == "Scheduled Event" and event["source"] == "aws.events"
        assert event["resources"] == ["arn:aws:events:local:000000000000:rule/tick--t0"] and event["detail"] == {}
        assert event["time"].endswith("Z") and "." not in event["time"]
    seconds = _seconds([e["time"] for e in events])
    assert seconds == [seconds[0] + i for i in range(3)]  # one a second, none skipped
    # Published at the tick, not a polling interval later (the log says how late each was).
    late = re.compile(r"schedule tick--t0: tick \S+ published \((\S+)s after its time\)")
    lateness = [float(m[1]) for line in service.log.lines if (m := late.search(line))]
    assert lateness and min(lateness) < 0.5

    # The failing handler's tick: tried, retried once (max_attempts = 1), then dead-lettered.
    await wait_stats(nc, "failing--t0", dead_lettered=1, timeout=30)
    with anyio.fail_after(30):  # its two attempts' reports may still be on their way
        while not any(attempts.texts.count(tick) == 2 for tick in attempts.texts):
            await attempts.wait_for(len(attempts.messages) + 1)
    assert max(attempts.texts.count(tick) for tick in attempts.texts) == 2


async def test_three_replicas_deliver_each_tick_exactly_once(
    tmp_path: Path, nats_server: NatsServer, handlers: Path, nc: Client, probe: Probe
) -> None:
    write_handler(handlers, "tick", TICK)
    ticks = await probe("probe.tick")
    env = {"PROBE_NATS": nats_server.url}
    replicas = [Serve(handlers, nats_server.url, tmp_path / f"data{i}", env=env) for i in range(3)]
    try:
        async with anyio.create_task_group() as tg:
            for replica in replicas:
                tg.start_soon(replica.astart)
        for replica in replicas:  # every replica runs the schedule
            await replica.log.await_line(r"schedule tick--t0: rate\(1 second\) in UTC")
        seen = len(ticks.messages)
        received = [json.loads(t)["time"] for t in (await ticks.wait_for(seen + 5, timeout=30))[seen:]]
        # A replica dies (perhaps between publishing a tick and recording it): the other two go on.
        replicas[0].kill()
        seen = len(ticks.messages)
        await ticks.wait_for(seen + 3, timeout=30)
    finally:
        for replica in replicas:
            await replica.astop()

    # Each tick was delivered once while all three ran...
    assert len(received) == len(set(received)) >= 5
    # ...and the stream holds one event per tick, none lost, from the first to the last (the replicas' other
    # publishes of a tick were dropped by its id, or not made because the state said it was published).
    stored = await stored_times(nc, "eventfn.source.schedule.tick.t0")
    assert len(stored) == len(set(stored)) >= 8 and set(received) <= set(stored)
    seconds = _seconds(stored)
    assert seconds == [seconds[0] + i for i in range(len(seconds))]


async def stored_times(nc: Client, subject: str) -> list[str]:
    """The `time` of every Scheduled Event the events stream holds on `subject`, in stream order."""
    js = nc.jetstream()
    info = await js.stream_info("EVENTFN", subjects_filter=subject)
    count = sum((info.state.subjects or {}).values())
    subscription = await js.subscribe(subject, ordered_consumer=True)
    try:
        return [json.loads((await subscription.next_msg(timeout=10)).data)["time"] for _ in range(count)]
    finally:
        await subscription.unsubscribe()
