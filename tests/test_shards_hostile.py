"""Sharded streams under hostile or careless use: odd puts (no key, empty or huge or unicode keys, binary and empty
data, header names nats-py itself would not send, records near NATS's largest message), handler answers Lambda
refuses, and the CLI used wrongly. Real nats-server, real `eventfn serve`; puts sent as `nats pub` sends them
(or, where nats-py refuses to send what the Go client would, as raw protocol over a socket)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import pytest
from nats.aio.client import Client

from eventfn.sources import shards
from eventfn.testing import Serve, write_handler
from tests.conftest import Collector, at_once

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
    import base64
    import hashlib
    import json

    import _probe


    def short(data):  # a big record's data is reported by its size and digest: the report must fit in a message
        if len(data) < 4000:
            return data
        raw = base64.b64decode(data)
        return base64.b64encode(b"%d:%s" % (len(raw), hashlib.sha256(raw).hexdigest().encode())).decode()


    def handler(event, context):
        records = [
            [r["kinesis"]["partitionKey"], short(r["kinesis"]["data"]), int(r["kinesis"]["sequenceNumber"]),
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
    service = await serve(extra_args=["--config", str(config)], env={"EVENTFN_WORKER_ENV_PASSTHROUGH": "PROBE_NATS"})
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
    assert "Traceback" not in service.log.service_text()


async def test_odd_keys_and_data_are_routed_by_their_key_and_delivered_intact(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path, nats_server: Any
) -> None:
    add_reporter(handlers)
    service = await start(serve, config)
    records = await seen(nc)
    long_key = "k" * 300
    sent: list[tuple[str, dict[str, str] | None, bytes, str]] = [
        # (subject suffix, headers, data, the key the record must carry)
        ("", {"Partition-Key": "clé-ünï-🙂"}, b"unicode header key", "clé-ünï-🙂"),
        (".a.b.c", None, b"dotted subject key", "a.b.c"),
        (".clé", None, b"unicode subject key", "clé"),
        (".subject-loses", {"Partition-Key": "header-wins"}, b"both", "header-wins"),
        ("", {"Partition-Key": long_key}, b"long key", long_key),
        ("", {"Partition-Key": "bin"}, bytes(range(256)), "bin"),
        ("", {"Partition-Key": "empty"}, b"", "empty"),
        ("", {"Partition-Key": "  padded  "}, b"padded key", "padded"),
    ]
    for suffix, headers, data, _ in sent:
        await nc.publish("eventfn.stream.clicks" + suffix, data, headers=headers)
    # No key at all, and an empty one: each keyed by its position among the puts.
    await nc.publish("eventfn.stream.clicks", b"no key")
    await nc.publish("eventfn.stream.clicks", b"empty key", headers={"Partition-Key": ""})
    await nc.flush()
    got = await records.until(len(sent) + 2)
    by_data = {data: (key, shard) for key, data, _, shard in got}
    assert len(got) == len(by_data) == len(sent) + 2, "each record once"
    for _, _, data, key in sent:
        assert by_data[data][0] == key, data
        assert by_data[data][1] == shards.shard_id(shards.shard_of(key, 2)), f"{data!r}: the shard its key picks"
    assert by_data[b"no key"][0] == str(len(sent) + 1) and by_data[b"empty key"][0] == str(len(sent) + 2)
    assert "Traceback" not in service.log.service_text()


async def test_a_record_near_the_largest_message_is_processed_and_one_over_it_with_headers_is_dropped_loudly(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    add_reporter(handlers, batch_size=2)
    service = await start(serve, config)
    records = await seen(nc)
    js = nc.jetstream()
    fits = b"f" * (nc.max_payload - 400)
    # Fits as a put, but not once the router adds the record's arrival time and id.
    too_big = b"t" * (nc.max_payload - 60)
    for data in (fits, too_big, b"after"):
        await js.publish("eventfn.stream.clicks", data, headers={"Partition-Key": "big"})
    got = await records.until(2)
    digest = b"%d:%s" % (len(fits), hashlib.sha256(fits).hexdigest().encode())
    assert [data for _, data, _, _ in got] == [digest, b"after"]
    assert "put 2 dropped" in service.log.text(), "the dropped put is named in an error line"
    assert "Traceback" not in service.log.service_text()


async def test_a_burst_of_thousands_of_puts_keeps_each_key_in_order_with_nothing_lost(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    add_reporter(handlers, extra="parallelization_factor = 3")
    await start(serve, config)
    records = await seen(nc)
    count = 3000
    for n in range(count):
        await nc.publish("eventfn.stream.clicks", str(n).encode(), headers={"Partition-Key": f"k{n % 37}"})
    await nc.flush()
    got = await records.until(count, timeout=60)
    numbers = [int(data) for _, data, _, _ in got]
    assert sorted(numbers) == list(range(count)), "each put once"
    for k in range(37):
        mine = [int(data) for key, data, _, _ in got if key == f"k{k}"]
        assert mine == sorted(mine), f"key k{k} out of order"


async def test_a_put_whose_subject_is_not_utf8_does_not_deafen_the_service(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path, nats_server: Any
) -> None:
    """nats-server takes any bytes in a subject token; nats-py's reader used to die decoding such a subject (the
    router's pull brought the put to the service's connection, which then heard nothing more, the put coming back
    after every reconnect)."""
    add_reporter(handlers)
    service = await start(serve, config)
    records = await seen(nc)
    raw_publish(nats_server.url, [b"PUB eventfn.stream.clicks.k\xff\xfe 8\r\nnot utf8\r\n"])
    await nc.publish("eventfn.stream.clicks", b"after", headers={"Partition-Key": "k1"})
    await nc.flush()
    try:
        got = await records.until(2, timeout=20)
    except TimeoutError:
        pytest.fail("the service went deaf:\n" + service.log.text()[-3000:])
    by_data = {data: key for key, data, _, _ in got}
    assert by_data == {b"not utf8": "k\ufffd\ufffd", b"after": "k1"}
    # The service still answers requests on its connection.
    reply = await nc.request("eventfn.invoke.seen", b'{"Records": []}', timeout=10)
    assert reply.data == b"null"


async def test_a_partition_key_header_spelled_in_another_case_is_the_key(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    """NATS header names are case-sensitive, HTTP's are not: a put with `partition-key: user-1` used to be taken
    for a put without a key, and its records spread over the shards, out of order."""
    add_reporter(handlers)
    await start(serve, config)
    records = await seen(nc)
    for n in range(12):
        name = ("partition-key", "PARTITION-KEY", "Partition-key")[n % 3]
        await nc.publish("eventfn.stream.clicks", str(n).encode(), headers={name: "user-1"})
    await nc.flush()
    got = await records.until(12)
    assert {key for key, _, _, _ in got} == {"user-1"}
    assert {shard for _, _, _, shard in got} == {shards.shard_id(shards.shard_of("user-1", 2))}
    assert [int(data) for _, data, _, _ in got] == list(range(12)), "one key: in put order"


# -- replicas ---------------------------------------------------------------------------------------------------------


async def test_a_replica_stopped_gracefully_hands_its_shards_over_without_waiting_for_its_heartbeat_to_lapse(
    tmp_path: Path, nats_server: Any, handlers: Path, nc: Client, config: Path
) -> None:
    add_reporter(handlers)
    # Heartbeats every 0.5 s instead of 2 s; the lapse for a replica that died stays the default 10 s.
    config.write_text(config.read_text(encoding="utf-8") + "[recovery]\nheartbeat = 0.5\n", encoding="utf-8")
    records = await seen(nc)
    replicas = [
        Serve(
            handlers,
            nats_server.url,
            tmp_path / f"data-{name}",
            extra_args=["--config", str(config)],
            env={"PROBE_NATS": nats_server.url, "EVENTFN_WORKER_ENV_PASSTHROUGH": "PROBE_NATS"},
        )
        for name in ("a", "b")
    ]
    a, b = replicas
    try:
        for replica in replicas:
            await replica.astart()
        for replica in replicas:
            await replica.log.await_line(r"replicas: 2 live", timeout=30)
        await b.astop()  # SIGTERM: it leaves the members as it stops
        # It is gone at a's next heartbeat (0.5 s), not once its own heartbeat is 10 s old (the lapse for a replica
        # that died): the wait is shorter than the lapse on purpose.
        await a.log.await_line(r"replicas: 1 live", timeout=8)
        keys = [f"user-{n}" for n in range(8)]
        assert {shards.shard_of(k, 2) for k in keys} == {0, 1}
        for n, key in enumerate(keys):
            await nc.publish("eventfn.stream.clicks", str(n).encode(), headers={"Partition-Key": key})
        await nc.flush()
        got = await records.until(len(keys), timeout=20)
    finally:
        await a.astop()
        await b.astop()
    assert sorted(int(data) for _, data, _, _ in got) == list(range(len(keys)))
    assert "Traceback" not in a.log.service_text() + b.log.text()


# -- the CLI ------------------------------------------------------------------------------------------------------


async def eventfn(*args: str, cwd: Path) -> tuple[int, str, str]:
    done = await anyio.run_process([sys.executable, "-m", "eventfn", *args], cwd=cwd, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_stream_commands_used_wrongly_say_what_to_do_without_a_traceback(
    tmp_path: Path, nats_server: Any, config: Path
) -> None:
    nats = ("--nats", nats_server.url)
    # Keys NATS would not carry as given: refused, rather than the record going to another shard than the one
    # the command names (a header value loses its outer spaces on the way).
    bad_keys = ("", " padded", "padded ", "   ", "a\nb", "k" * 257)
    # The commands change nothing (no service ever ran: the streams do not exist yet), so they run at once.
    put, listed, described, described_json, nope, nowhere, *bad = await at_once(
        eventfn("stream", "put", "clicks", "--key", "k", "x", *nats, cwd=tmp_path),
        eventfn("stream", "ls", "--json", *nats, cwd=tmp_path),
        eventfn("stream", "describe", "clicks", *nats, cwd=tmp_path),
        eventfn("stream", "describe", "clicks", "--json", *nats, cwd=tmp_path),
        eventfn("stream", "put", "nope", "--key", "k", "x", *nats, cwd=tmp_path),
        eventfn("stream", "ls", "--nats", "nats://127.0.0.1:1", cwd=tmp_path),
        *(eventfn("stream", "put", "clicks", "--key", key, "x", *nats, cwd=tmp_path) for key in bad_keys),
    )
    code, out, err = put
    assert code == 1 and "has not been created yet" in err and "eventfn serve" in err, err
    code, out, err = listed
    assert code == 0, err
    assert json.loads(out) == [
        {"stream": "clicks", "shards": 2, "created": False, "records": 0, "lastSequence": 0, "unrouted": 0}
    ]
    code, out, err = described
    assert code == 0 and "has not been created yet" in out, out + err
    code, out, err = described_json
    assert code == 0 and json.loads(out)["created"] is False
    for key, (code, _, err) in zip(bad_keys, bad, strict=True):
        assert code == 1 and "--key" in err, (key, err)
    code, out, err = nope
    assert code == 1 and "not declared" in err
    code, out, err = nowhere
    assert code == 1 and "cannot connect" in err
    assert all("Traceback" not in err for _, _, err in (put, listed, described, described_json, nope, nowhere, *bad))


async def test_a_shard_mapping_disabled_then_enabled_goes_on_from_its_checkpoint(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    config.write_text("[streams.clicks]\nshards = 1\n", encoding="utf-8")
    add_reporter(handlers)
    service = await start(serve, config)
    records = await seen(nc)
    for n in range(3):
        await nc.publish("eventfn.stream.clicks", str(n).encode(), headers={"Partition-Key": f"k{n}"})
    await nc.flush()
    await records.until(3)
    disabled = await service.acli("mappings", "disable", "seen--t0--shard-0")
    assert disabled.returncode == 0, disabled.stderr
    for n in range(3, 6):
        await nc.publish("eventfn.stream.clicks", str(n).encode(), headers={"Partition-Key": f"k{n}"})
    await nc.flush()
    # Polled (nothing to await while a mapping is paused): until the three records are routed and wait behind it.
    with anyio.fail_after(20):
        while True:
            described = await service.acli("--config", str(config), "stream", "describe", "clicks", "--json")
            [mapping] = json.loads(described.stdout)["mappings"]
            if mapping["behind"] == 3:
                break
            await anyio.sleep(0.2)
    assert mapping["paused"] and mapping["checkpoint"] == 3, mapping
    assert len(records.records) == 3, "nothing runs while the mapping is disabled"
    enabled = await service.acli("mappings", "enable", "seen--t0--shard-0")
    assert enabled.returncode == 0, enabled.stderr
    got = await records.until(6)
    assert [int(data) for _, data, _, _ in got] == list(range(6)), "from the checkpoint: none again, none lost"
