"""`python -m benchmarks.queues [--quick] [--out DIR]`: queue drains at batch 10, beside the raw ceiling of the run.

1. A standard queue: N messages preloaded (plain publishes, as `nats pub` sends them); events/s until every one is
   deleted, through a queue trigger with batch size 10.
2. A FIFO queue with 100 message groups (`Message-Group-Id` headers, round robin): the same, in order per group.

Each runs for process isolation (the default) and in-process isolation. The ceiling: raw nats-py (the pipelined
consumer of `benchmarks.ceiling`) draining an equal backlog of its own work-queue stream, the same messages with
the same headers, timed the same way: each consumer is created paused, the clock starts as it is resumed, and
stops when its acknowledgement floor passes the last preloaded message (read from the server).

Starts its own nats-server and one `eventfn serve`. Writes `queues.json` and `queues.md` into DIR (default:
benchmarks/results); the table also goes to stdout. A full run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import nats
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from benchmarks import report, stream
from benchmarks.child import Child
from benchmarks.harness import median, with_child
from benchmarks.report import Row, evaluate
from eventfn.testing import NatsServer, Serve, write_handler

GROUPS = 100
BATCH = 10
_PAUSED_FOREVER = "2200-01-01T00:00:00Z"

NO_OP = """
    # /// eventfn
    # description = "Does nothing: the queue drain's function."
    {isolation}
    # [[triggers]]
    # type = "queue"
    # queue = "{queue}"
    # batch_size = {batch}
    # enabled = false
    # ///
    def handler(event, context):
        return None
"""

#: (queue, fifo, isolation) of each function; the ceilings' queues have no function.
VARIANTS = [
    ("std_p", False, "process"),
    ("std_i", False, "inprocess"),
    ("fifo_p", True, "process"),
    ("fifo_i", True, "inprocess"),
]
CEILINGS = [("ceil_std", False), ("ceil_fifo", True)]
#: For reference: the same drain from a plain subject of the events stream (eventfn's SQS-shaped batches there).
PLAIN_SUBJECT = "events.bench.queues.plain"
PLAIN = """
    # /// eventfn
    # min_warm = 10
    # [[triggers]]
    # subjects = ["{subject}"]
    # batch_size = {batch}
    # enabled = false
    # ///
    def handler(event, context):
        return None
"""


def toml() -> str:
    lines = []
    for name, fifo in [(n, f) for n, f, _ in VARIANTS] + CEILINGS:
        lines += [f"[queues.{name}]", f"fifo = {'true' if fifo else 'false'}", "visibility_timeout = 60"]
        lines += ["max_receive_count = 0", ""]
    return "\n".join(lines)


def headers_for(n: int, fifo: bool) -> dict[str, str] | None:
    return {"Message-Group-Id": f"g{n % GROUPS:03d}"} if fifo else None


async def preload(nc: Client, queue: str, count: int, fifo: bool) -> int:
    """Publish `count` messages to `queue` as `nats pub` does; returns the stream sequence of the last."""
    subject = f"eventfn.queue.{queue}"
    js = nc.jetstream()
    for start in range(0, count, 2000):
        for n in range(start, min(count, start + 2000)):
            await nc.publish(subject, stream.event(n), headers=headers_for(n, fifo))
        await nc.flush()
    with anyio.fail_after(120):
        while (await js.stream_info(f"EVENTFN_Q_{queue}")).state.messages < count:  # noqa: ASYNC110
            await anyio.sleep(0.05)  # JetStream has no "stored" event
    info = await js.stream_info(f"EVENTFN_Q_{queue}")
    return int(info.state.last_seq)


async def timed_drain(nc: Client, queue: str, consumer: str, last_seq: int, fifo: bool, timeout: float) -> float:
    """Resume `consumer`; seconds until it acknowledged every message up to `last_seq` (see benchmarks.stream:
    one more message wakes the pull requests made while it was paused; it comes after the backlog)."""
    js = nc.jetstream()
    name = f"EVENTFN_Q_{queue}"
    begin = time.perf_counter()
    await js.resume_consumer(name, consumer)
    await nc.publish(f"eventfn.queue.{queue}", stream.event(-1), headers=headers_for(0, fifo))
    await nc.flush()
    last_busy = begin
    with anyio.fail_after(timeout):
        while True:
            await anyio.sleep(stream.POLL_INTERVAL)
            asked = time.perf_counter()
            info = await js.consumer_info(name, consumer)
            if (info.ack_floor.stream_seq or 0) >= last_seq:
                return (last_busy + asked) / 2 - begin
            last_busy = asked


async def ceiling(nc: Client, url: str, work: Path, queue: str, count: int, fifo: bool) -> float:
    last = await preload(nc, queue, count, fifo)
    js = nc.jetstream()
    config = ConsumerConfig(
        durable_name="raw",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=60.0,
        max_ack_pending=20_000,
    )
    await js.add_consumer(f"EVENTFN_Q_{queue}", config)
    await js.pause_consumer(f"EVENTFN_Q_{queue}", "raw", _PAUSED_FOREVER)
    args = ["drain", "--url", url, "--stream", f"EVENTFN_Q_{queue}", "--consumer", "raw"]
    child = Child("benchmarks.ceiling", args, work / "logs" / f"ceiling-{queue}.log")
    took, _ = await with_child(child, lambda: timed_drain(nc, queue, "raw", last, fifo, timeout=count / 300 + 60))
    return count / took


async def warm(nc: Client, function: str, count: int = 10) -> None:
    """Bring up the function's warm workers (its default concurrency) before the clock starts."""
    request = functools.partial(nc.request, f"eventfn.invoke.{function}", b"{}", timeout=30)
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(request)


async def run(work: Path, url: str, count: int) -> dict[str, Any]:
    handlers = work / "handlers"
    handlers.mkdir(parents=True)
    for queue, _, isolation in VARIANTS:
        # Process workers kept warm (the function's concurrency), whatever the engine's default `min_warm`.
        line = '# isolation = "inprocess"' if isolation == "inprocess" else "# min_warm = 10"
        write_handler(handlers, f"q_{queue}", NO_OP.format(isolation=line, queue=queue, batch=BATCH))
    write_handler(handlers, "plain_p", PLAIN.format(subject=PLAIN_SUBJECT, batch=BATCH))
    config = work / "eventfn.toml"
    config.write_text(toml())
    serve = Serve(handlers, url, work / "data", extra_args=["--config", str(config)])
    await serve.astart()
    nc = await nats.connect(url, name="bench-queues")
    raw: dict[str, Any] = {"events": count, "ceiling": {}, "eventfn": {}}
    try:
        for queue, fifo in CEILINGS:
            sys.stderr.write(f"ceiling: raw nats-py drains {count:,} messages of {queue} ...\n")
            raw["ceiling"][queue] = await ceiling(nc, url, work, queue, count, fifo)
            sys.stderr.write(f"  {raw['ceiling'][queue]:,.0f} events/s\n")
        for queue, fifo, isolation in VARIANTS:
            sys.stderr.write(f"eventfn {isolation}: drains {count:,} messages of {queue} at batch {BATCH} ...\n")
            last = await preload(nc, queue, count, fifo)
            await warm(nc, f"q_{queue}")
            took = await timed_drain(nc, queue, f"q_{queue}--t0", last, fifo, timeout=count / 100 + 60)
            raw["eventfn"][queue] = count / took
            sys.stderr.write(f"  {raw['eventfn'][queue]:,.0f} events/s\n")
        sys.stderr.write(f"eventfn process: drains {count:,} events of a plain subject at batch {BATCH} ...\n")
        await stream.preload(nc, PLAIN_SUBJECT, count)
        last = await stream.last_sequence(nc, PLAIN_SUBJECT)
        await warm(nc, "plain_p")
        kick = "eventfn.redrive.plain_p--t0"  # a subject only this mapping's consumer takes
        raw["plain"] = count / await stream.timed_drain(nc, "plain_p--t0", kick=kick, last_seq=last, timeout=200)
        sys.stderr.write(f"  {raw['plain']:,.0f} events/s\n")
        # The ceiling again, last: the machine's speed drifts; each eventfn figure is set beside the median.
        for queue, fifo in CEILINGS:
            again = await ceiling_again(nc, url, work, queue, count, fifo)
            raw["ceiling"][queue] = [raw["ceiling"][queue], again]
    finally:
        await nc.close()
        await serve.astop()
    return raw


async def ceiling_again(nc: Client, url: str, work: Path, queue: str, count: int, fifo: bool) -> float:
    await nc.jetstream().delete_consumer(f"EVENTFN_Q_{queue}", "raw")
    sys.stderr.write(f"ceiling again: {queue} ...\n")
    return await ceiling(nc, url, work, queue, count, fifo)


def rows(raw: dict[str, Any]) -> list[Row]:
    out = []
    count = raw["events"]
    for (queue, fifo, isolation), (ceiling_queue, _) in zip(
        VARIANTS, [CEILINGS[0]] * 2 + [CEILINGS[1]] * 2, strict=True
    ):
        runs = raw["ceiling"][ceiling_queue]
        kind = f"FIFO queue, {GROUPS} groups" if fifo else "standard queue"
        mode = "process" if isolation == "process" else "in-process"
        out.append(
            Row(
                scenario=f"queue drain · {kind}",
                what=f"eventfn {mode}, batch {BATCH}",
                figure=raw["eventfn"][queue],
                unit="events/s",
                ceiling=median(runs),
                ceiling_what="raw nats-py pipelined consumer, same messages",
                note=f"{count:,} messages; ceiling runs " + ", ".join(f"{c:,.0f}" for c in runs),
            )
        )
    out.append(
        Row(
            scenario="for reference · plain subject",
            what=f"eventfn process, batch {BATCH}",
            figure=raw["plain"],
            unit="events/s",
            note=f"{count:,} events of the events stream, the same drain without a queue's semantics",
        )
    )
    return [evaluate(r) for r in out]


def markdown(table: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# eventfn queue benchmark",
        "",
        f"{meta['date']} · eventfn {meta['eventfn']} · {meta['machine']} · Python {meta['python']} · "
        f"{meta['events']:,} messages of {meta['event_bytes']} bytes per drain · total {meta['seconds']:.0f} s · "
        f"CPUs {100 * meta['busy_before']:.0f}% busy with other work before the run",
        "",
        "Each drain: a backlog preloaded with plain publishes (FIFO: `Message-Group-Id` headers, round robin over "
        f"{GROUPS} groups), then the time until every message is deleted. The ceiling drains an equal backlog of its "
        "own queue stream with raw nats-py (pipelined pull, an ack per message; it keeps no order and runs no "
        "handler); the ceiling figure is the median of a run before and one after eventfn's.",
        "",
        *report.ratio_table(table, percent=True),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from benchmarks import __main__ as harness  # the revision and the CPU-busy reading

    parser = argparse.ArgumentParser(prog="python -m benchmarks.queues", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 messages per drain (default 40,000)")
    parser.add_argument("--events", type=int, default=None, help="messages per drain")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    args = parser.parse_args()
    count = args.events or (10_000 if args.quick else 40_000)
    busy = report.cpu_busy()
    if busy > 0.15:
        sys.stderr.write(f"warning: other work keeps {100 * busy:.0f}% of the CPUs busy; figures will be noisy\n")
    begin = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="eventfn-bench-queues-"))
    try:
        with NatsServer(work / "nats") as server:
            raw = anyio.run(run, work, server.url, count)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = rows(raw)
    meta = report.run_meta(
        eventfn=harness._revision(),
        events=count,
        event_bytes=len(stream.event(0)),
        seconds=time.perf_counter() - begin,
        busy_before=busy,
    )
    report.save(args.out, "queues", {"meta": meta, "raw": raw, "rows": table}, markdown(table, meta))


if __name__ == "__main__":
    main()
