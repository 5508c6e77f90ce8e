"""The embedded broker through crashes, and one store with one owner, against real processes:
the nats-server dies with `serve` however it ends, a restart stops an orphan on its store, a second service on
the same data directory is refused, a dead server is restarted (or `serve` exits 1), and streams deleted under
a running service are re-created. "Acknowledged" means the publish got its JetStream ack; each test counts
such events by id through the probe, which reports to a nats-server of its own (the fixture), so killing the
service's broker never silences it."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import nats
import nats.errors
import pytest
from nats.aio.client import Client

from eventfn.broker import auth
from eventfn.broker.natsserver import find_binary
from eventfn.testing import NatsServer, Serve, wait_stats, write_handler
from tests.conftest import Collector

pytestmark = pytest.mark.e2e

STEADY = """
    # /// eventfn
    # timeout = 1
    # concurrency = 2
    # triggers = [{ subjects = ["events.steady.>"], batch_size = 20, batch_window = 0.02 }]
    # ///
    import json
    import _probe

    def handler(event, context):
        _probe.report("probe.steady", ",".join(str(json.loads(r["body"])["n"]) for r in event["Records"]))
"""

HELLO = """
    def handler(event, context):
        return {"hello": event.get("name")}
"""


async def admin_client(url: str, data_dir: Path) -> Client:
    """A client with the JetStream API on the embedded server (stream info, deleting a stream, the DLQ): the
    service's credentials, which `serve` wrote under `data_dir` (an admin may not touch the events stream)."""
    credentials = auth.context_file(data_dir, auth.SERVICE)
    if not credentials.exists():  # an external nats-server (the fixture's), which runs without authentication
        return await nats.connect(url)
    found = auth.read_context(credentials)
    return await nats.connect(url, user=found.user, password=found.password, inbox_prefix=found.inbox_prefix)


async def _quiet(_: object = None) -> None:
    """nats-py prints every reconnect attempt unless given callbacks; the tests expect those attempts."""


async def publisher_client(url: str) -> Client:
    """An anonymous client that reconnects for as long as a test runs (the broker restarts under it)."""
    return await nats.connect(
        url,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        error_cb=_quiet,
        disconnected_cb=_quiet,
        reconnected_cb=_quiet,
    )


def free_port() -> int:
    """A free loopback port below the ephemeral range: no outgoing connection takes it meanwhile, so the
    broker can be restarted on it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10_000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


def servers_on(data_dir: Path) -> list[int]:
    """Pids of the live nats-server processes started on `data_dir`'s config (a zombie holds nothing)."""
    config = os.fsencode(str(data_dir.resolve() / "nats-server.conf"))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(args[0]) == b"nats-server" and config in args:
            found.append(int(entry.name))
    return found


async def no_server_left(data_dir: Path, timeout: float = 15.0) -> None:
    """Wait until no nats-server runs on `data_dir` (it closes its store first, which takes a moment)."""
    with anyio.fail_after(timeout):
        while servers_on(data_dir):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # another process's exit: /proc is all there is to watch


def server_pid(data_dir: Path) -> int:
    return int((data_dir / "nats-server.pid").read_text())


def numbers(seen: Collector) -> set[int]:
    return {int(n) for text in seen.texts for n in text.split(",") if n}


async def wait_until_seen(seen: Collector, wanted: Callable[[set[int]], bool], timeout: float) -> None:
    with anyio.fail_after(timeout):
        while not wanted(numbers(seen)):
            await seen.wait_for(len(seen.messages) + 1, timeout=timeout)


class Steady:
    """Publishes numbered events to a trigger subject, each awaiting its JetStream ack, until stopped.

    `acked` holds the numbers whose publish was acknowledged: those must all be processed. A publish that
    failed (broker down, no ack in time) may or may not be stored; nothing is claimed for it.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: list[int] = []
        self.failed = 0
        self._stop = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        client = await publisher_client(self.url)
        js = client.jetstream()
        task_status.started()
        n = 0
        try:
            while not self._stop.is_set():
                try:
                    await js.publish("events.steady.item", b'{"n": %d}' % n, timeout=0.5)
                    self.acked.append(n)
                except (nats.errors.Error, TimeoutError):
                    self.failed += 1
                    await anyio.sleep(0.05)
                n += 1
                await anyio.sleep(0.005)  # a steady stream, not a flood
        finally:
            await client.close()

    def stop(self) -> None:
        self._stop.set()


def embedded(handlers: Path, data_dir: Path, probe_url: str, port: int = 0) -> Serve:
    return Serve(handlers, None, data_dir, nats_port=port, env={"PROBE_NATS": probe_url})


async def test_serve_sigkilled_five_times_under_a_steady_stream_leaves_no_server_and_loses_nothing(
    tmp_path: Path, handlers: Path, nats_server: NatsServer, probe
) -> None:
    write_handler(handlers, "steady", STEADY)
    data_dir, port = tmp_path / "data", free_port()
    seen = await probe("probe.steady")
    steady = Steady(f"nats://127.0.0.1:{port}")
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for cycle in range(5):
            service = await embedded(handlers, data_dir, nats_server.url, port).astart()
            if cycle == 0:
                await tg.start(steady.run)
            before = len(numbers(seen))
            await wait_until_seen(seen, lambda got, before=before: len(got) >= before + 100, timeout=30)
            pid = server_pid(data_dir)
            service.kill()
            await no_server_left(data_dir)  # the kernel stopped the server with its parent: no orphan
            assert pid not in servers_on(data_dir)
        final = await embedded(handlers, data_dir, nats_server.url, port).astart()
        try:
            count = len(steady.acked)
            with anyio.fail_after(30):
                while len(steady.acked) < count + 40:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # the publisher's own progress: it keeps no event to await
            steady.stop()
        finally:
            steady.stop()
    # Deliveries each kill left unacknowledged come back after their ack wait (1 + 0.02 + 10 s).
    await wait_until_seen(seen, lambda got: set(steady.acked) <= got, timeout=40)
    await final.astop()
    await no_server_left(data_dir)
    print(
        f"\n5 SIGKILLs: {len(steady.acked)} acknowledged, {steady.failed} publishes failed while down, "
        f"{len(numbers(seen))} distinct processed, in {time.monotonic() - started:.1f} s"
    )
    assert "Traceback" not in final.log.service_text()
    assert "left running" not in final.log.text(), "no orphan was there to clean up"


async def test_embedded_server_killed_mid_stream_is_restarted_and_nothing_acknowledged_is_lost(
    tmp_path: Path, handlers: Path, nats_server: NatsServer, probe
) -> None:
    write_handler(handlers, "steady", STEADY)
    data_dir = tmp_path / "data"
    seen = await probe("probe.steady")
    async with embedded(handlers, data_dir, nats_server.url) as service:
        url = (await service.log.await_line(r"embedded NATS at (nats://\S+):")).group(1)
        steady = Steady(url)
        async with anyio.create_task_group() as tg:
            await tg.start(steady.run)
            await wait_until_seen(seen, lambda got: len(got) >= 50, timeout=30)
            killed = server_pid(data_dir)
            os.kill(killed, signal.SIGKILL)
            await service.log.await_line(rf"embedded nats-server \(pid {killed}\) was killed by SIGKILL", timeout=15)
            await service.log.await_line(r"embedded nats-server restarted \(pid \d+\) at " + url, timeout=30)
            await service.log.await_line(r"NATS: reconnected", timeout=30)
            count = len(steady.acked)
            with anyio.fail_after(30):
                while len(steady.acked) < count + 50:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # the publisher's own progress: it keeps no event to await
            steady.stop()
        await wait_until_seen(seen, lambda got: set(steady.acked) <= got, timeout=40)
        assert service.process is not None and service.process.poll() is None, "serve kept running"
        restarted = server_pid(data_dir)
        assert restarted != killed and servers_on(data_dir) == [restarted], "one server, the new one"
    text = service.log.text()
    # What the dead server last said is in the service's log; its own log is kept in the data directory.
    assert "its last log lines:" in text and "Server is ready" in text
    assert "Server is ready" in (data_dir / "nats-server.log").read_text()
    assert "logfile_size_limit" in (data_dir / "nats-server.conf").read_text()
    assert service.process.returncode == 0
    await no_server_left(data_dir)
    print(f"\nbroker SIGKILL: {len(steady.acked)} acknowledged, {steady.failed} failed while down, all processed")


def test_second_serve_on_the_same_data_dir_fails_at_once_and_leaves_the_first_alone(
    tmp_path: Path, handlers: Path
) -> None:
    write_handler(handlers, "hello", HELLO)
    data_dir = tmp_path / "data"
    with Serve(handlers, None, data_dir) as first:
        assert first.process is not None
        url = first.log.wait_for(r"embedded NATS at (nats://\S+):").group(1)
        files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in data_dir.iterdir() if p.is_file()}
        second = subprocess.run(
            [sys.executable, "-m", "eventfn", "serve", "--handlers", str(handlers), "--data-dir", "data"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert second.stderr.strip().count("\n") == 0 and "Traceback" not in second.stderr, second.stderr
        assert f"in use by another eventfn serve (pid {first.process.pid})" in second.stderr
        assert f"data directory {data_dir} is in use" in second.stderr and "--data-dir" in second.stderr
        after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in data_dir.iterdir() if p.is_file()}
        # The first server's log grows on its own; every other file is as the first service left it.
        assert {k: v for k, v in after.items() if k != "nats-server.log"} == {
            k: v for k, v in files.items() if k != "nats-server.log"
        }
        assert servers_on(data_dir) == [server_pid(data_dir)]

        async def invoke() -> object:
            client = await nats.connect(url)
            try:
                reply = await client.request("eventfn.invoke.hello", b'{"name": "Ann"}', timeout=10)
            finally:
                await client.close()
            return json.loads(reply.data)

        assert anyio.run(invoke) == {"hello": "Ann"}, "the first service still serves"
    assert first.process.returncode == 0


CRASH = """
    # /// eventfn
    # isolation = "inprocess"
    # triggers = ["events.crash"]
    # ///
    import os

    def handler(event, context):
        os._exit(1)  # the service process dies at once: no finally, no cleanup
"""


async def test_serve_dying_with_exit_1_leaves_no_nats_server(tmp_path: Path, handlers: Path) -> None:
    write_handler(handlers, "crash", CRASH)
    data_dir = tmp_path / "data"
    service = await Serve(handlers, None, data_dir).astart()
    try:
        url = (await service.log.await_line(r"embedded NATS at (nats://\S+):")).group(1)
        pid = server_pid(data_dir)
        client = await nats.connect(url)
        await client.publish("events.crash", b"{}")
        await client.flush()
        await client.close()
        assert await service.await_exit() == 1
        await no_server_left(data_dir)
        assert pid not in servers_on(data_dir)
    finally:
        await service.astop()


async def test_restart_stops_an_orphan_holding_its_store_and_spares_an_unrelated_pid(
    tmp_path: Path, handlers: Path
) -> None:
    write_handler(handlers, "hello", HELLO)
    data_dir, port = tmp_path / "data", free_port()
    await (await Serve(handlers, None, data_dir, nats_port=port).astart()).astop()
    # A pid file naming a process that is not this store's server: left alone.
    unrelated = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220
    try:
        (data_dir / "nats-server.pid").write_text(f"{unrelated.pid}\n")
        async with Serve(handlers, None, data_dir, nats_port=port) as service:
            assert "left running" not in service.log.text()
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()
    # A server on this store that nothing stops when its service dies (left by an eventfn without this
    # supervision, or on a platform without a parent-death signal), as a crashed service would leave it.
    log_file = data_dir / "nats-server.log"
    ready_before = log_file.read_text().count("Server is ready")
    orphan = subprocess.Popen(  # noqa: ASYNC220
        [find_binary(), "-c", str(data_dir.resolve() / "nats-server.conf")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with anyio.fail_after(15):
            while log_file.read_text().count("Server is ready") == ready_before:  # noqa: ASYNC110
                await anyio.sleep(0.05)  # it logs to a file: there is nothing to wait on but its growth
        (data_dir / "nats-server.pid").write_text(f"{orphan.pid}\n")
        async with Serve(handlers, None, data_dir, nats_port=port) as service:
            await service.log.await_line(rf"stopping nats-server pid {orphan.pid}, left running on")
            assert orphan.poll() is not None, "the orphan was stopped before the new server started"
            assert servers_on(data_dir) == [server_pid(data_dir)]
            client = await nats.connect(f"nats://127.0.0.1:{port}")
            reply = await client.request("eventfn.invoke.hello", b'{"name": "Bo"}', timeout=10)
            await client.close()
            assert json.loads(reply.data) == {"hello": "Bo"}
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


async def test_a_broker_that_keeps_dying_is_restarted_a_bounded_number_of_times_then_serve_exits_1(
    tmp_path: Path, handlers: Path
) -> None:
    write_handler(handlers, "hello", HELLO)
    data_dir = tmp_path / "data"
    # Five restarts as by default, each after 0.1 s instead of 0 to 4 s ([recovery] nats_restart_delays).
    config = tmp_path / "eventfn.toml"
    config.write_text("[recovery]\nnats_restart_delays = [0, 0.1, 0.1, 0.1, 0.1]\n", encoding="utf-8")
    service = await Serve(handlers, None, data_dir, extra_args=["--config", str(config)]).astart()
    try:
        for restarts in range(5):
            os.kill(server_pid(data_dir), signal.SIGKILL)
            await service.log.await_line(r"embedded nats-server restarted", count=restarts + 1, timeout=30)
        os.kill(server_pid(data_dir), signal.SIGKILL)
        assert await service.await_exit() == 1
        await service.astop()
        last = service.log.lines[-1]
        assert last.startswith("eventfn: error: NATS at nats://127.0.0.1:") and "6 times in a row" in last, last
        assert "Traceback" not in service.log.service_text()
        assert servers_on(data_dir) == []
    finally:
        await service.astop()


SINK = """
    # /// eventfn
    # retry = {{ max_attempts = 0 }}
    # triggers = ["events.sd.>"]
    # ///
    import json
    import _probe

    def handler(event, context):
        if event.get("fail"):
            raise ValueError("failing on purpose")
        _probe.report("probe.sd", str(event["n"]))
"""


async def test_streams_and_consumers_deleted_under_a_running_service_are_recreated(
    tmp_path: Path, handlers: Path, nats_server: NatsServer, serve: Callable[..., Awaitable[Serve]], probe
) -> None:
    write_handler(handlers, "sink", SINK.format())
    # The DLQ write that finds the DLQ gone is tried again after 1 s ([recovery] dlq_retry_delay), not 5 s.
    service = await serve(config="[recovery]\ndlq_retry_delay = 1\n")
    seen = await probe("probe.sd")
    admin = await admin_client(nats_server.url, tmp_path / "data")
    js = admin.jetstream()
    try:
        await js.publish("events.sd.x", b'{"n": 1}')
        assert await seen.wait_for(1) == ["1"]

        mark = service.log.mark()
        await js.delete_stream("EVENTFN")
        await service.log.await_line(r"now re-created: stream EVENTFN with its 2 consumer\(s\)", start=mark)
        await js.publish("events.sd.x", b'{"n": 2}')  # acknowledged by the re-created stream
        assert await seen.wait_for(2) == ["1", "2"]

        mark = service.log.mark()
        await js.delete_consumer("EVENTFN", "sink--t0")
        await service.log.await_line(r"now re-created: consumer\(s\) sink--t0", start=mark)
        await js.publish("events.sd.x", b'{"n": 3}')
        assert await seen.wait_for(3) == ["1", "2", "3"]

        mark = service.log.mark()
        await js.delete_stream("EVENTFN_DLQ")
        await js.publish("events.sd.x", b'{"n": 4, "fail": true}')
        await service.log.await_line(r"now re-created: stream EVENTFN_DLQ", start=mark, timeout=30)
        await wait_stats(admin, "sink--t0", dead_lettered=1, timeout=30)
        record = await js.get_last_msg("EVENTFN_DLQ", "eventfn.dlq.sink")
        assert b"failing on purpose" in (record.data or b"")
        assert "Traceback" not in service.log.service_text()
    finally:
        await admin.close()
