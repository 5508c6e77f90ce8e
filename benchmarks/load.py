"""Load generators, each in a process of its own so that the load never shares an interpreter with what it
measures (nor with the harness):

- `publish`: plain publishes (what `nats pub` sends) at a fixed rate, each event stamped with its publish time;
- `request`: N concurrent clients, each on its own connection, doing request/reply round trips back to back
  (what `nats req` does), after a warm-up; reports round trips and their latencies. With `--marks` it says when
  it starts and stops counting, so that the harness reads CPU times over exactly that span.

Run by the harness as `python -m benchmarks.load MODE ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
import nats.errors

from benchmarks import child
from benchmarks.stream import event


async def _publish(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.url, name="bench-publisher")
    await child.ready()
    sent = 0
    begin = time.perf_counter()
    while (elapsed := time.perf_counter() - begin) < args.seconds:
        due = min(int(elapsed * args.rate) + 1, int(args.seconds * args.rate))
        while sent < due:
            await nc.publish(args.subject, event(sent))
            sent += 1
        await asyncio.sleep(0.0005)
    await nc.flush()
    elapsed = time.perf_counter() - begin
    await nc.close()
    child.result({"sent": sent, "seconds": elapsed})


async def _request(args: argparse.Namespace) -> None:
    clients = [await nats.connect(args.url, name=f"bench-requester-{i}") for i in range(args.clients)]
    payload = event(0)
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop = False

    async def client(nc: nats.NATS) -> None:
        nonlocal errors
        while not stop:
            begin = time.perf_counter()
            try:
                reply = await nc.request(args.subject, payload, timeout=10)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                errors += 1
                continue
            took = time.perf_counter() - begin
            if measuring:
                if reply.headers and "Eventfn-Error" in reply.headers:
                    errors += 1
                else:
                    latencies.append(took)

    await child.ready()
    tasks = [asyncio.create_task(client(nc)) for nc in clients]  # all awaited below
    await asyncio.sleep(args.warmup)
    if args.marks:
        child.mark("measuring")  # the harness reads CPU times from here to `measured`
    measuring = True
    begin = time.perf_counter()
    await asyncio.sleep(args.seconds)
    measuring = False
    elapsed = time.perf_counter() - begin
    if args.marks:
        child.mark("measured")
    stop = True
    await asyncio.gather(*tasks)
    for nc in clients:
        await nc.close()
    child.result({"count": len(latencies), "seconds": elapsed, "errors": errors, "latencies": latencies})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load")
    parser.add_argument("mode", choices=["publish", "request"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second (publish)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to publish, or to measure")
    parser.add_argument("--clients", type=int, default=8, help="concurrent requesters (request)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of requests before measuring")
    parser.add_argument("--marks", action="store_true", help="print `measuring` and `measured` lines (request)")
    args = parser.parse_args()
    asyncio.run(_publish(args) if args.mode == "publish" else _request(args))


if __name__ == "__main__":
    main()
