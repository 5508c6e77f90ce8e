"""eventfn on a three-server JetStream cluster (real nats-server processes on loopback): losing the server that
leads the events stream loses nothing and stalls processing for seconds only; replica counts an operator raised
stay, and a stream narrowed by hand is widened again."""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from eventfn.config import ServiceConfig
from eventfn.testing import NatsCluster, NatsServer, Serve, _free_ports, in_event_loop, wait_serving, write_handler
from tests.conftest import FAST_RECOVERY

pytestmark = pytest.mark.e2e

SINK = """
    # /// eventfn
    # timeout = 2
    # concurrency = 2
    # triggers = [{ subjects = ["events.load.>"], batch_size = 20, batch_window = 0.05 }]
    # ///
    import json
    import _probe

    def handler(event, context):
        numbers = [json.loads(r["body"])["n"] for r in event["Records"]]
        _probe.report("probe.sink", ",".join(map(str, numbers)))
"""

ORDERS = """
    # /// eventfn
    # triggers = ["orders.>"]
    # ///
    def handler(event, context):
        return event
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as started:
        yield started


@pytest.fixture
def serve_on_cluster(
    tmp_path: Path, cluster: NatsCluster, nats_server: NatsServer, handlers: Path
) -> Iterator[Callable[..., Any]]:
    """`eventfn serve --nats url1,url2,url3` with `settings` as its eventfn.toml; handlers report to the
    standalone `nats_server`, so the probe never depends on the cluster under test. Awaited in async tests, as the
    `serve` fixture is."""
    started: list[Serve] = []

    def start(settings: str = "", *, wait_ready: bool = True) -> Serve | Awaitable[Serve]:
        config = tmp_path / "eventfn.toml"
        config.write_text(settings)
        serve = Serve(
            handlers,
            cluster.url,
            tmp_path / "data",
            extra_args=["--config", str(config)],
            env={"PROBE_NATS": nats_server.url},
        )
        started.append(serve)
        if in_event_loop():
            return serve.astart(wait_ready=wait_ready)
        return serve.start(wait_ready=wait_ready)

    yield start
    for serve in started:
        serve.stop()


@pytest.fixture
async def admin(cluster: NatsCluster) -> Any:
    """An operator's connection to the cluster (to any server; it moves to another when its server dies)."""
    client = await nats.connect(cluster.urls, reconnect_time_wait=0.2)
    yield client
    await client.close()


async def stream_config(nc: Client, name: str) -> dict[str, Any]:
    reply = await nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=5)
    return json.loads(reply.data)["config"]  # type: ignore[no-any-return]


async def edit_stream(nc: Client, name: str, **changes: Any) -> None:
    """What `nats stream edit` does: the stream's whole configuration sent back with the changes."""
    config = {**await stream_config(nc, name), **changes}
    reply = json.loads((await nc.request(f"$JS.API.STREAM.UPDATE.{name}", json.dumps(config).encode(), timeout=5)).data)
    assert "error" not in reply, reply


async def consumer_copies(js: JetStreamContext, consumer: str) -> int:
    """On how many servers the consumer's state is kept: its leader and its followers."""
    info = await js.consumer_info("EVENTFN", consumer)
    assert info.cluster is not None
    return 1 + len(info.cluster.replicas or [])


def numbers(texts: list[str]) -> set[int]:
    return {int(n) for text in texts for n in text.split(",") if n}


class Producer:
    """A producer as a real one behaves: publish with JetStream acknowledgements, each event with its id as
    Nats-Msg-Id, and retry a publish that fails (an election, a lost server) until it is acknowledged."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.acked: list[int] = []
        self.failed = 0
        self.stop = anyio.Event()
        self._progress = anyio.Event()

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            while True:
                try:
                    await self.js.publish(
                        "events.load.item", b'{"n": %d}' % n, headers={"Nats-Msg-Id": f"load-{n}"}, timeout=2
                    )
                    break
                except nats.errors.Error:
                    self.failed += 1
                    await anyio.sleep(0.2)  # a producer's pause before it retries, not a synchronization
            self.acked.append(n)
            self._progress.set()
            n += 1
            await anyio.sleep(0.005)  # a steady stream (about 150 events/s), not a flood

    async def wait_acked(self, count: int) -> None:
        while len(self.acked) < count:
            self._progress = anyio.Event()
            await self._progress.wait()


async def test_losing_the_stream_leader_loses_no_acknowledged_event(
    cluster: NatsCluster,
    serve_on_cluster: Callable[..., Awaitable[Serve]],
    handlers: Path,
    admin: Client,
    probe: Callable[[str], Any],
) -> None:
    write_handler(handlers, "sink", SINK)
    serve = await serve_on_cluster("[stream]\nreplicas = 3\n" + FAST_RECOVERY)
    seen = await probe("probe.sink")
    js = admin.jetstream()
    producer = Producer(js)
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer.run)
        with anyio.fail_after(30):
            while len(numbers(seen.texts)) < 300:
                await seen.wait_for(len(seen.messages) + 1)

        info = await js.stream_info("EVENTFN")
        assert info.config.num_replicas == 3 and info.cluster is not None and info.cluster.leader
        assert await consumer_copies(js, "sink--t0") == 3, "consumers inherit the stream's replicas"
        assert (await js.stream_info("EVENTFN_DLQ")).config.num_replicas == 3, "the DLQ follows [stream] replicas"
        leader = info.cluster.leader
        mark = serve.log.mark()
        cluster.kill(leader)
        killed_at = time.monotonic()
        first_after = len(producer.acked) + 1  # published after the kill (one may have been on its way)

        with anyio.fail_after(45):
            while max(numbers(seen.texts)) < first_after:
                await seen.wait_for(len(seen.messages) + 1)
        resumed_after = time.monotonic() - killed_at
        with anyio.fail_after(45):
            await producer.wait_acked(first_after + 300)
        producer.stop.set()

    acked = set(producer.acked)
    with anyio.fail_after(45):  # deliveries whose acks died with the server come back after their ack wait (5 s)
        while not acked <= numbers(seen.texts):
            await seen.wait_for(len(seen.messages) + 1)
    with anyio.fail_after(45):
        while (state := await js.consumer_info("EVENTFN", "sink--t0")).num_ack_pending or state.num_pending:  # noqa: ASYNC110
            await anyio.sleep(0.2)  # polling the server's counts: there is no event for "all settled"

    stall = (await serve.log.await_line(r"JetStream stall: (.*)", start=mark, timeout=30)).group(1)
    recovered = (await serve.log.await_line(r"JetStream recovered after ([\d.]+) s", start=mark, timeout=30)).group(1)
    new_leader = (await js.stream_info("EVENTFN")).cluster
    assert new_leader is not None and new_leader.leader not in (None, "", leader)
    seen_all = [n for text in seen.texts for n in text.split(",") if n]
    print(
        f"\nkilled {leader} (stream leader): events published after the kill processed {resumed_after:.1f} s later; "
        f"{producer.failed} publishes failed and were retried; {len(acked)} acknowledged, 0 lost, "
        f"{len(seen_all) - len(set(seen_all))} processed twice; stall logged: {stall!r}, recovered after {recovered} s"
    )
    assert resumed_after < 30

    # The lost server comes back, catches up from the others, and the log says the stream is whole again.
    mark = serve.log.mark()
    await cluster.arestart(leader)
    await serve.log.await_line(r"stream EVENTFN: all 3 replicas current again", start=mark, timeout=45)


async def test_replicas_raised_by_hand_stay_and_consumers_follow(
    serve_on_cluster: Callable[..., Awaitable[Serve]], handlers: Path, admin: Client
) -> None:
    write_handler(handlers, "sink", SINK)
    serve = await serve_on_cluster()  # replicas = 1, the default
    js = admin.jetstream()
    assert (await stream_config(admin, "EVENTFN"))["num_replicas"] == 1
    await edit_stream(admin, "EVENTFN", num_replicas=3)  # an operator's `nats stream edit --replicas 3`

    # A reload that changes the stream (a trigger outside `events.>`) keeps the three replicas.
    write_handler(handlers, "orders", ORDERS)
    await wait_serving(admin, "orders")
    with anyio.fail_after(15):
        while "orders--t0" not in {c.name for c in await js.consumers_info("EVENTFN")}:  # noqa: ASYNC110
            await anyio.sleep(0.05)  # polling the server: nothing logs "consumer created" after a reload
    config = await stream_config(admin, "EVENTFN")
    assert config["num_replicas"] == 3 and "orders.>" in config["subjects"]
    assert await consumer_copies(js, "orders--t0") == 3
    assert await consumer_copies(js, "sink--t0") == 3  # created at R1, raised with its stream
    # A consumer created while the stream's new replicas are being placed waits for them, not for the next reload.
    assert "reload failed" not in serve.log.text()


async def test_a_stream_narrowed_by_hand_is_widened_again(
    serve_on_cluster: Callable[..., Awaitable[Serve]], handlers: Path, admin: Client
) -> None:
    """What another process does when it writes back a stream it read before our update (JetStream has no
    compare-and-set on a stream's configuration), or an operator's mistake: the service puts back what it needs."""
    write_handler(handlers, "orders", ORDERS)
    serve = await serve_on_cluster("[stream]\nreplicas = 3\n")
    mark = serve.log.mark()
    config = await stream_config(admin, "EVENTFN")
    await edit_stream(admin, "EVENTFN", num_replicas=1, subjects=[s for s in config["subjects"] if s != "orders.>"])
    await serve.log.await_line(
        r"stream EVENTFN lacks subject 'orders.>', 3 replicas \(it has 1\) \(changed by another process or by hand\)",
        start=mark,
    )
    with anyio.fail_after(30):
        while (config := await stream_config(admin, "EVENTFN"))["num_replicas"] != 3:  # noqa: ASYNC110
            await anyio.sleep(0.1)  # polling the server: the widening's end is not logged
    assert "orders.>" in config["subjects"]


def test_more_replicas_than_servers_is_a_clear_error(serve_on_cluster: Callable[..., Serve]) -> None:
    serve = serve_on_cluster("[stream]\nreplicas = 5\n", wait_ready=False)
    assert serve.wait(60) != 0
    output = serve.log.text()
    assert "with 5 replicas: no suitable peers for placement" in output
    assert "lower [stream] replicas" in output and "Traceback" not in output


DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "nats-cluster"


def test_the_shipped_cluster_configs_form_a_cluster(tmp_path: Path) -> None:
    """deploy/nats-cluster/nats-{1,2,3}.conf as they ship, moved onto loopback: hosts and ports rewritten only."""
    ports = _free_ports(3)
    servers = []
    try:
        for i, port in enumerate(ports, 1):
            text = (DEPLOY / f"nats-{i}.conf").read_text()
            text = text.replace("listen: 0.0.0.0:4222", "listen: 127.0.0.1:-1")
            text = text.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{port}")
            for j, other in enumerate(ports, 1):
                text = text.replace(f"nats-route://nats-{j}:6222", f"nats-route://127.0.0.1:{other}")
            text = text.replace("store_dir: /var/lib/nats", "")  # NatsServer's -sd puts it in the test's directory
            assert "0.0.0.0" not in text and "nats-route://nats" not in text and "/var/lib" not in text
            (tmp_path / f"nats-{i}.conf").write_text(text)
            servers.append(NatsServer(tmp_path / f"n{i}", args=["-c", str(tmp_path / f"nats-{i}.conf")]).start())
        for server in servers:
            server.log.wait_for(r"JetStream cluster new metadata leader|Self is new JetStream cluster metadata leader")
            assert "[WRN]" not in server.log.text().split("Server is ready")[0]
    finally:
        for server in servers:
            server.stop()


def test_the_readme_shows_the_shipped_cluster_settings() -> None:
    readme = (DEPLOY.parent.parent / "README.md").read_text()
    section = readme.split("## Running a cluster", 1)[1].split("\n## ", 1)[0]
    section = "\n".join(line.removeprefix("   ") for line in section.splitlines()) + "\n"  # inside a list item
    shipped = (DEPLOY / "eventfn.toml").read_text()
    config = msgspec.convert(tomllib.loads(shipped), ServiceConfig)
    assert config.stream.replicas == 3 and len(config.nats.url) == 3
    assert f"```toml\n{shipped}```" in section
    for i in (1, 2, 3):
        assert f"nats-{i}" in section
