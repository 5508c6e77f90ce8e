"""The peer: FastStream's NATS JetStream pull subscriber with a no-op handler, in a process of its own.

What a Python user would pick instead of eventfn. It binds to the durable consumer the harness created
(paused, on the same stored events), so the harness times it exactly as it times eventfn and the ceiling.
Per message: `PullSub(batch_size=100)` fetches up to 100 at a time and calls the handler once per message
(FastStream's fastest per-message setting; the default `batch_size=1` pays a round trip per message).
Batched: `PullSub(batch_size=100, batch=True)`, the handler gets a list. FastStream's per-message access
log is switched off (`logger=None`), which favours the peer.

Run by the harness as `python -m benchmarks.peer ...`.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from faststream.nats import JStream, NatsBroker, PullSub

from benchmarks import child


async def _run(args: argparse.Namespace) -> None:
    broker = NatsBroker(args.url, logger=None)
    handled = 0
    pull = PullSub(batch_size=args.batch, batch=args.batched)

    @broker.subscriber(args.subject, stream=JStream(args.stream, declare=False), durable=args.durable, pull_sub=pull)
    async def no_op(body: Any) -> None:
        nonlocal handled
        handled += len(body) if args.batched else 1

    await broker.start()
    await child.ready()
    await child.until_stopped()
    await broker.stop()
    child.result({"handled": handled})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer")
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", default="EVENTFN")
    parser.add_argument("--subject", required=True)
    parser.add_argument("--durable", required=True)
    parser.add_argument("--batch", type=int, default=100, help="messages per fetch")
    parser.add_argument("--batched", action="store_true", help="the handler takes a list (batch mode)")
    args = parser.parse_args()
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
