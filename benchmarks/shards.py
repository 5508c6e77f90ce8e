"""`python -m benchmarks.shards [--quick] [--out DIR]`: a 4-shard sharded stream, beside raw nats-py in the same run.

1. Routing: N records put to `eventfn.stream.bench` as `nats pub -H Partition-Key:<key>` sends them (core
   publishes, flushed every 2,000), with the service running and its consumers paused: puts routed per second
   (until the last is stored on its shard and the put stream is empty). The ceiling: the same N records written
   straight to their shard subjects by one raw nats-py client, pipelined (`publish_async`), until all are stored.
2. Drain: the 2N records (batch 100, `parallelization_factor` 1, a handler that does nothing with them) as events
   per second, from the resume of the four shard mappings (`eventfn mappings enable`, workers warmed first) until
   every shard's consumer has acknowledged its last record, polled every 10 ms. The ceiling: the raw nats-py
   pipelined consumer (`benchmarks.ceiling`, an ack per record) draining the same records through one durable
   consumer on the four shard subjects, timed the same way; it runs before and after eventfn, the better counts.

Starts its own nats-server and one `eventfn serve` (default settings, process isolation). Writes `shards.json` and
`shards.md` into DIR (default: benchmarks/results); the table also goes to stdout.
"""

from __future__ import annotations

import argparse
import re
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

from benchmarks import report
from benchmarks.child import Child
from benchmarks.harness import with_child
from benchmarks.report import Row, evaluate
from benchmarks.stream import event
from eventfn.sources import shards
from eventfn.testing import NatsServer, Serve, write_handler

STREAM, SHARDS = "bench", 4
DATA = f"EVENTFN_S_{STREAM}"
INGEST = f"EVENTFN_SI_{STREAM}"
POLL = 0.01
_PAUSED_FOREVER = "2200-01-01T00:00:00Z"

HANDLER = """
    # /// eventfn
    # min_warm = 4
    # [[triggers]]
    # type = "stream"
    # stream = "bench"
    # starting_position = "TRIM_HORIZON"
    # batch_size = 100
    # enabled = false
    # ///
    def handler(event, context):
        return None
"""


def key(n: int) -> str:
    return f"customer-{n % 997}"


async def stored(nc: Client, stream: str) -> int:
    info = await nc.jetstream().stream_info(stream)
    return info.state.messages


async def wait_for(check: Any, timeout: float) -> float:
    """Poll `check()` every POLL s until it is true (JetStream state has no event to await); returns when."""
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - JetStream state has no event to await
            await anyio.sleep(POLL)
    return time.perf_counter()


async def route(nc: Client, count: int, offset: int) -> float:
    """Put `count` records as `nats pub` does; seconds until the router stored them all on their shards."""
    before = await stored(nc, DATA)
    begin = time.perf_counter()
    for start in range(0, count, 2000):
        for n in range(start, min(count, start + 2000)):
            await nc.publish(shards.put_subject(STREAM), event(offset + n), headers={shards.KEY_HEADER: key(n)})
        await nc.flush()

    async def routed() -> bool:
        return await stored(nc, DATA) >= before + count and await stored(nc, INGEST) == 0

    return await wait_for(routed, timeout=count / 200 + 60) - begin


async def direct(nc: Client, count: int, offset: int) -> float:
    """Write `count` records straight to their shards, pipelined; seconds until all are stored."""
    js = nc.jetstream()
    begin = time.perf_counter()
    pending = []
    for n in range(count):
        subject = shards.shard_subject(STREAM, shards.shard_of(key(n), SHARDS))
        pending.append(await js.publish_async(subject, event(offset + n), headers={shards.KEY_HEADER: key(n)}))
        if len(pending) >= 2000:
            for ack in pending:
                await ack
            pending = []
    for ack in pending:
        await ack
    return time.perf_counter() - begin


async def last_sequences(nc: Client) -> dict[int, int]:
    js = nc.jetstream()
    return {i: (await js.get_last_msg(DATA, shards.shard_subject(STREAM, i))).seq or 0 for i in range(SHARDS)}


async def ceiling_drain(nc: Client, url: str, work: Path, name: str, total: int) -> float:
    """The raw pipelined consumer's events/s on the same records (one consumer on every shard subject)."""
    js = nc.jetstream()
    await js.add_consumer(
        DATA,
        ConsumerConfig(
            durable_name=name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=20_000,
            filter_subject=f"eventfn.shard.{STREAM}.*",
        ),
    )
    await js.pause_consumer(DATA, name, _PAUSED_FOREVER)
    last = (await js.stream_info(DATA)).state.last_seq
    child = Child(
        "benchmarks.ceiling", ["drain", "--stream", DATA, "--consumer", name, "--url", url], work / f"{name}.log"
    )

    async def timed() -> float:
        begin = time.perf_counter()
        await js.resume_consumer(DATA, name)
        # A pull request that waited through the pause is left unserved until a new message arrives.
        await nc.publish(shards.shard_subject(STREAM, 0), b"{}", headers={shards.KEY_HEADER: "kick"})

        async def done() -> bool:
            info = await js.consumer_info(DATA, name)
            return (info.ack_floor.stream_seq or 0) >= last

        return total / (await wait_for(done, timeout=total / 500 + 60) - begin)

    rate, _ = await with_child(child, timed)
    await js.delete_consumer(DATA, name)
    return rate


async def eventfn_drain(nc: Client, total: int, last: dict[int, int]) -> float:
    """eventfn's events/s: the four shard mappings resumed, until each acknowledged its shard's last record."""
    js = nc.jetstream()
    names = [f"drain--t0--shard-{i}" for i in range(SHARDS)]
    begin = time.perf_counter()
    for name in names:
        reply = await nc.request("eventfn.api.mappings.enable", name.encode(), timeout=10)
        assert b"Enabled" in reply.data, reply.data

    async def done() -> bool:
        for i, name in enumerate(names):
            info = await js.consumer_info(DATA, name)
            if (info.ack_floor.stream_seq or 0) < last[i]:
                return False
        return True

    return total / (await wait_for(done, timeout=total / 300 + 60) - begin)


async def run(work: Path, url: str, count: int) -> dict[str, Any]:
    handlers = work / "handlers"
    handlers.mkdir(parents=True)
    write_handler(handlers, "drain", HANDLER)
    config = work / "eventfn.toml"
    config.write_text(f"[streams.{STREAM}]\nshards = {SHARDS}\n")
    serve = Serve(handlers, url, work / "data", extra_args=["--config", str(config)])
    await serve.astart()
    nc = await nats.connect(url)
    try:
        sys.stderr.write(f"routing: {count:,} records written straight to their shards (raw nats-py) ...\n")
        raw_write = await direct(nc, count, 0)
        sys.stderr.write(f"routing: {count:,} puts through the router ...\n")
        routed = await route(nc, count, count)
        total = 2 * count
        last = await last_sequences(nc)
        # Warm a worker per shard (the mappings are paused): concurrent sync invokes of an empty Kinesis batch.
        async with anyio.create_task_group() as tg:
            for _ in range(SHARDS):
                tg.start_soon(lambda: nc.request("eventfn.invoke.drain", b'{"Records": []}', timeout=30))
        sys.stderr.write(f"drain: {total:,} records, raw nats-py consumer ...\n")
        ceilings = [await ceiling_drain(nc, url, work, "ceiling-0", total)]
        sys.stderr.write(f"drain: {total:,} records through eventfn (batch 100, 4 shards) ...\n")
        ours = await eventfn_drain(nc, total, last)
        sys.stderr.write(f"drain: {total:,} records, raw nats-py consumer again ...\n")
        ceilings.append(await ceiling_drain(nc, url, work, "ceiling-1", total))
    finally:
        await nc.close()
        await serve.astop()
    return {
        "records": count,
        "routing": {"raw_seconds": raw_write, "router_seconds": routed},
        "drain": {"records": total, "eventfn": ours, "ceilings": ceilings},
    }


def rows(raw: dict[str, Any]) -> list[Row]:
    count = raw["records"]
    drain = raw["drain"]
    out = [
        Row(
            scenario=f"routing {count:,} puts to 4 shards",
            what="puts routed (stored on their shard, in put order)",
            figure=count / raw["routing"]["router_seconds"],
            unit="events/s",
            ceiling=count / raw["routing"]["raw_seconds"],
            ceiling_what="raw nats-py writing them to their shards, pipelined",
        ),
        Row(
            scenario=f"draining {drain['records']:,} records from 4 shards",
            what="batch 100, one lane per shard, checkpointed per batch",
            figure=drain["eventfn"],
            unit="events/s",
            ceiling=max(drain["ceilings"]),
            ceiling_what="raw nats-py pipelined consumer, an ack per record",
            note="ceiling runs: " + ", ".join(f"{c:,.0f}" for c in drain["ceilings"]),
        ),
    ]
    return [evaluate(r) for r in out]


def markdown(table: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# eventfn sharded stream benchmark",
        "",
        f"{meta['date']} · {meta['machine']} · Python {meta['python']}",
        "",
        *report.ratio_table(table),
    ]
    method = (__doc__ or "").split("\n\n")[1]
    lines += ["", "Method:", ""]
    lines += [" ".join(item.split()) for item in re.split(r"\n(?=\d\. )", method)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shards", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 records a phase instead of 50,000")
    parser.add_argument("--records", type=int, default=None, help="records per phase (the drain takes twice that)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    args = parser.parse_args()
    count = args.records or (10_000 if args.quick else 50_000)
    work = Path(tempfile.mkdtemp(prefix="eventfn-bench-shards-"))
    try:
        with NatsServer(work / "nats") as server:
            raw = anyio.run(run, work, server.url, count)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = rows(raw)
    meta = report.run_meta()
    report.save(args.out, "shards", {"meta": meta, "rows": table, "raw": raw}, markdown(table, meta))


if __name__ == "__main__":
    main()
