"""Sharded streams under hostile or careless use: odd puts (no key, empty or huge or unicode keys, binary and empty
data, header names nats-py itself would not send, records near NATS's largest message), handler answers Lambda
refuses, and the CLI used wrongly. Real nats-server, real `eventfn serve`; puts sent as `nats pub` sends them
(or, where nats-py refuses to send what the Go client would, as raw protocol over a socket)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import pytest
from nats.aio.client import Client

from eventfn.sources import shards
from eventfn.testing import Serve, write_handler
from tests.conftest import Collector

pytestmark = pytest.mark.e2e

#: Reports every record it gets (key, data as base64, sequence number), then answers what `ANSWER` says.
REPORTER = """
    # /// eventfn
    # timeout = 5
    # [[triggers]]
    # type = "stream"
    # stream = "clicks"
    # starting_position = "TRIM_HORIZON"
    # batch_size = {batch_size}
    # batch_window = 0.05
    # {extra}
    # [retry]
    # base_delay = 0.1
    # ///
    import json

    import _probe


    def handler(event, context):
        records = [
            [r["kinesis"]["partitionKey"], r["kinesis"]["data"], int(r["kinesis"]["sequenceNumber"]),
             r["eventID"].split(":")[0]]
            for r in event["Records"]
        ]
        _probe.report("probe.hostile", json.dumps(records))
"""


def add_reporter(handlers: Path, name: str = "seen", *, batch_size: int = 100, extra: str = "") -> None:
    write_handler(handlers, name, REPORTER.format(batch_size=batch_size, extra=extra))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "eventfn.toml"
    path.write_text("[streams.clicks]\nshards = 2\n", encoding="utf-8")
    return path


async def start(serve: Callable[..., Awaitable[Serve]], config: Path) -> Serve:
    service = await serve(
        extra_args=["--config", str(config)], env={"EVENTFN_WORKER_ENV_PASSTHROUGH": "PROBE_NATS"}
    )
    await service.log.await_line(r"eventfn ready")
    return service


class Seen:
    """The records the reporter handled: (key, data, sequence number, shard), in the order reported."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    @property
    def records(self) -> list[tuple[str, bytes, int, str]]:
        return [
            (key, base64.b64decode(data), seq, shard)
            for m in self.collector.messages
            for key, data, seq, shard in json.loads(m.data)
        ]

    async def until(self, count: int, timeout: float = 30.0) -> list[tuple[str, bytes, int, str]]:
        with anyio.fail_after(timeout):
            while len(self.records) < count:
                await self.collector.wait_for(len(self.collector.messages) + 1, timeout=timeout)
        return self.records


async def seen(nc: Client) -> Seen:
    collector = Collector()
    await nc.subscribe("probe.hostile", cb=collector.on_message)
    await nc.flush()
    return Seen(collector)


def raw_publish(url: str, frames: list[bytes]) -> None:
    """Send protocol frames as a client nats-py does not model would (the Go `nats` CLI sends such headers), then a
    PING, and wait for the PONG: the server has processed them all."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=10) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        sock.sendall(b"".join(frames) + b"PING\r\n")
        got = b""
        while b"PONG" not in got:
            chunk = sock.recv(4096)
            if not chunk:
                raise AssertionError(f"server closed the connection: {got!r}")
            got += chunk
        assert b"-ERR" not in got, got


def hpub(subject: str, headers: bytes, data: bytes) -> bytes:
    head = b"NATS/1.0\r\n" + headers + b"\r\n"
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), len(head), len(head) + len(data), head, data)


# -- hostile puts -----------------------------------------------------------------------------------------------------


async def test_a_put_with_a_header_name_nats_py_refuses_does_not_block_the_stream(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path, nats_server: Any
) -> None:
    """`nats pub -H 'x/y:1'` stores a put whose header name nats-py will not publish again: the router must still
    route it (and everything behind it), not retry it forever."""
    add_reporter(handlers)
    service = await start(serve, config)
    records = await seen(nc)
    raw_publish(
        nats_server.url,
        [
            hpub("eventfn.stream.clicks", b"Partition-Key: k1\r\nx/y: odd name\r\n", b"first"),
            hpub("eventfn.stream.clicks", b"Partition-Key: k1\r\nTrace(id): 7\r\n", b"second"),
        ],
    )
    await nc.publish("eventfn.stream.clicks", b"third", headers={"Partition-Key": "k1"})
    await nc.flush()
    try:
        got = await records.until(3)
    except TimeoutError:
        pytest.fail("not routed:\n" + service.log.text()[-3000:])
    assert [data for _, data, _, _ in got] == [b"first", b"second", b"third"], "all three, in put order"
    assert "header 'x/y' left off its record" in service.log.text(), "the odd header is named, not silently lost"
    assert "Traceback" not in service.log.text()
