"""The dispatcher's guarantees, each shown against a real nats-server and a real `eventfn serve`:
at-least-once through SIGKILL, and flat memory while a large backlog drains."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client

from eventfn.sources.mappings import feed_credit
from eventfn.testing import Serve, write_handler
from tests.conftest import FAST_RECOVERY

pytestmark = pytest.mark.e2e

SINK = """
    # /// eventfn
    # timeout = 2
    # concurrency = 2
    # triggers = [{{ subjects = ["events.load.>"], batch_size = {batch}, batch_window = 0.05 }}]
    # ///
    import json
    import time
    import _probe

    def handler(event, context):
        numbers = [json.loads(r["body"])["n"] for r in event["Records"]]
        time.sleep({pause})
        _probe.report("probe.sink", ",".join(map(str, numbers)))
"""


#: Seconds without progress after which a wait fails: a stall, where a fixed cap would fail a merely slow run
#: (these tests share the machine with others).
STALL = 30.0


async def publish_numbers(nc: Client, total: int, window: int = 1000) -> None:
    """`total` events on a trigger subject, each confirmed stored.

    The bodies are what `nats pub` sends (no headers); each also names a reply subject, so JetStream acks it
    once stored. Acks are awaited a window at a time: a loaded machine only slows this down, and what fails
    is a window not stored within STALL seconds.
    """
    js = nc.jetstream()
    for start in range(0, total, window):
        numbers = range(start, min(total, start + window))
        acks = [await js.publish_async("events.load.item", b'{"n": %d}' % n) for n in numbers]
        with anyio.fail_after(STALL):
            for ack in acks:
                await ack  # a negative ack raises


def seen_numbers(texts: list[str]) -> list[int]:
    return [int(n) for text in texts for n in text.split(",") if n]


async def test_sigkill_with_thousands_in_flight_loses_nothing(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    batch, concurrency, total = 100, 2, 10_000
    write_handler(handlers, "sink", SINK.format(batch=batch, pause=0.01))
    first = await serve(config=FAST_RECOVERY)
    seen = await probe("probe.sink")
    await publish_numbers(nc, total)
    with anyio.fail_after(30):
        while len(seen_numbers(seen.texts)) < 1000:
            await seen.wait_for(len(seen.messages) + 1)
    first.kill()  # SIGKILL: no chance to settle anything
    done_before = len(set(seen_numbers(seen.texts)))
    assert done_before < total, "the kill must interrupt the drain"

    await serve(config=FAST_RECOVERY)
    with anyio.fail_after(60):  # unacknowledged events come back after their ack wait (2 + 0.05 + 3 s)
        while len(set(seen_numbers(seen.texts))) < total:
            await seen.wait_for(len(seen.messages) + 1)
    assert sorted(set(seen_numbers(seen.texts))) == list(range(total)), "every event processed, counted by id"
    # Then let the deliveries the kill left unacknowledged come back (after their ack wait) and settle.
    js = nc.jetstream()
    with anyio.fail_after(60):
        while (info := await js.consumer_info("EVENTFN", "sink--t0")).num_ack_pending or info.num_pending:  # noqa: ASYNC110
            await anyio.sleep(0.2)  # polling the server's count: there is no event for "all settled"
    numbers = seen_numbers(seen.texts)
    # The feed's credit (also the consumer's max ack pending): all that can be unacked at a kill. At batch size 1
    # it is deeper than one event per slot (`BATCH1_CREDIT`, waiting events are kept alive), at batch 100 a batch
    # per slot plus one being gathered: (2 + 1) * 100.
    in_flight_window = feed_credit(concurrency, batch)
    print(f"\nSIGKILL after {done_before} of {total}: {len(numbers) - total} duplicates (window {in_flight_window})")
    assert len(numbers) - total <= in_flight_window, f"{len(numbers) - total} duplicates"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(600)  # the ceiling of a heavily loaded run; waits inside fail on a STALL
async def test_memory_stays_flat_while_a_large_backlog_drains(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    total, batch = 200_000, 100
    write_handler(
        handlers,
        "sink",
        SINK.format(batch=batch, pause=0.002).replace('",".join(map(str, numbers))', "str(len(numbers))"),
    )
    service = await serve()
    assert service.process is not None
    seen = await probe("probe.sink")
    idle = rss_mb(service.process.pid)
    await publish_numbers(nc, total)  # the backlog is in JetStream before (and while) it drains
    samples: list[float] = []
    processed = counted = 0
    next_sample = 50
    while processed < total:
        await seen.wait_for(counted + 1, timeout=STALL)  # no overall cap: a slow drain passes, a stalled one fails
        arrived = seen.messages[counted:]
        counted += len(arrived)
        processed += sum(int(m.data) for m in arrived)
        if counted >= next_sample:  # every 50 batches, however many arrive at once
            samples.append(rss_mb(service.process.pid))
            next_sample = counted + 50
    assert processed == total, "nothing dropped, nothing run twice"
    peak = max(samples)
    print(f"\nRSS of eventfn serve: idle {idle:.1f} MB, peak while draining {total} events {peak:.1f} MB")
    assert peak - idle < 25, f"memory grew from {idle:.1f} MB to {peak:.1f} MB under backlog"
