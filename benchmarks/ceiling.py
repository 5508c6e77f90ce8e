"""The ceiling: what raw nats-py does on this machine, as fast as it allows, in a process of its own.

- `drain`: a JetStream pull consumer, hand-pipelined as in ../shared/reference/nats-performance.md (a raw
  subscription on an inbox, two pull requests of 500 kept outstanding, a new one sent as soon as a batch is
  used up: the scheme of the Go client's `Consume()`), acking each message. Bound to a durable consumer the
  harness created; the harness times it by the consumer's state, exactly as it times eventfn.
- `latency`: the same consumer on live events; records publish-to-receive latency from the `ts` each event
  carries, and prints the latencies when it stops.
- `respond`: a raw request/reply responder (the ceiling of a sync invoke).

Run by the harness as `python -m benchmarks.ceiling MODE ...`; the protocol with the harness is in `child`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from benchmarks import child

_ACK = b"+ACK"


class _Stamp(msgspec.Struct):
    """The one field the latency consumer reads from a bench event."""

    ts: float


_stamp = msgspec.json.Decoder(_Stamp)


class PipelinedConsumer:
    """Keeps `depth` pull requests of `batch` messages outstanding on one inbox; acks every message."""

    def __init__(
        self, nc: Client, stream: str, consumer: str, *, batch: int = 500, depth: int = 2, expires: float = 5.0
    ) -> None:
        self.nc = nc
        self.batch = batch
        self.depth = depth
        self.expires_ns = int(expires * 1e9)
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.owed = 0  # requested, not yet received
        self.acked = 0
        self.latencies: list[float] | None = None
        self.first_received = self.last_received = 0.0

    async def start(self, *, measure_latency: bool = False) -> None:
        if measure_latency:
            self.latencies = []
        await self.nc.subscribe(self.inbox, cb=self._on_message, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await self._top_up()
        await self.nc.flush()

    async def _top_up(self) -> None:
        # A new request as soon as one batch's worth is used up: the server never waits for us.
        while self.owed <= self.batch * (self.depth - 1):
            body = b'{"batch":%d,"expires":%d}' % (self.batch, self.expires_ns)
            await self.nc.publish(self.subject, body, reply=self.inbox)
            self.owed += self.batch

    async def _on_message(self, msg: Msg) -> None:
        if not msg.reply:
            # A status message (408 expired, 409 cut): its request is over; its unfilled part is reported.
            headers = msg.headers or {}
            pending = int(headers.get("Nats-Pending-Messages", "0") or 0)
            self.owed = max(0, self.owed - pending) if pending else 0
            await self._top_up()
            return
        if self.latencies is not None:
            received = time.time()
            self.latencies.append(received - _stamp.decode(msg.data).ts)
            self.first_received = self.first_received or received
            self.last_received = received
        await self.nc.publish(msg.reply, _ACK)
        self.acked += 1
        self.owed -= 1
        if self.owed <= self.batch * (self.depth - 1):
            await self._top_up()


async def _consume(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.url, name="bench-ceiling")
    consumer = PipelinedConsumer(nc, args.stream, args.consumer, batch=args.batch)
    await consumer.start(measure_latency=args.mode == "latency")
    await child.ready()
    await child.until_stopped()
    await nc.flush()
    result: dict[str, object] = {"acked": consumer.acked}
    if consumer.latencies is not None:
        result.update(latencies=consumer.latencies, first=consumer.first_received, last=consumer.last_received)
    await nc.close()
    child.result(result)


async def _respond(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.url, name="bench-responder")
    answered = 0

    async def on_request(msg: Msg) -> None:
        nonlocal answered
        answered += 1
        await nc.publish(msg.reply, b"null")

    await nc.subscribe(args.subject, cb=on_request, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush()
    await child.ready()
    await child.until_stopped()
    await nc.close()
    child.result({"answered": answered})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling")
    parser.add_argument("mode", choices=["drain", "latency", "respond"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", default="EVENTFN")
    parser.add_argument("--consumer", help="durable consumer to drain (drain, latency)")
    parser.add_argument("--batch", type=int, default=500, help="messages per pull request")
    parser.add_argument("--subject", help="subject to answer (respond)")
    args = parser.parse_args()
    asyncio.run(_respond(args) if args.mode == "respond" else _consume(args))


if __name__ == "__main__":
    main()
