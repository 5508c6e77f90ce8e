"""Start-up, shutdown and restart of a real `eventfn serve`: nothing lost, configuration kept, clear errors."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client

from eventfn.testing import NatsServer, Serve, write_handler
from tests.conftest import Collector, at_once

pytestmark = pytest.mark.e2e

SLOW = """
    # /// eventfn
    # triggers = ["events.work.>"]
    # concurrency = 4
    # timeout = {timeout}
    # ///
    import time
    import _probe

    def handler(event, context):
        time.sleep(0.1)
        _probe.report("probe.slow", str(event["n"]))
        return event["n"]
"""


async def test_sigterm_with_events_in_flight_then_restart_loses_none(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    write_handler(handlers, "slow", SLOW.format(timeout=5))
    first = await serve()
    seen = await probe("probe.slow")
    total = 80
    for n in range(total):
        await nc.publish("events.work.item", json.dumps({"n": n}).encode())
    await seen.wait_for(8)
    first.signal(signal.SIGTERM)
    assert await first.await_exit() == 0
    stopped_at = len(seen.messages)
    assert stopped_at < total, "the test must interrupt work in progress"
    assert "Traceback" not in first.log.text()

    await serve()
    # Well inside the 35 s ack wait: deliveries the first run had received but not started were handed back
    # (nak), not left to time out.
    done = await seen.wait_for(total, timeout=15)
    numbers = [int(t) for t in done]
    assert sorted(set(numbers)) == list(range(total)), "every event processed after the restart"
    assert len(numbers) == total, "a clean shutdown settles in-flight work: no event runs twice"


async def test_restart_keeps_configuration_and_applies_changed_settings(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(handlers, "slow", SLOW.format(timeout=5))
    await (await serve()).astop()
    js = nc.jetstream()
    before = {c.name: c.config for c in await js.consumers_info("EVENTFN")}
    assert set(before) == {"slow--async", "slow--t0"}

    await (await serve()).astop()
    again = {c.name: c.config for c in await js.consumers_info("EVENTFN")}
    assert again == before, "a restart with the same settings changes nothing"

    write_handler(handlers, "slow", SLOW.format(timeout=20).replace("events.work.>", "events.jobs.*"))
    await (await serve()).astop()
    after = {c.name: c.config for c in await js.consumers_info("EVENTFN")}
    assert set(after) == set(before)
    # ack wait = timeout + batching window + 10 s
    assert after["slow--t0"].ack_wait == 30.0 and before["slow--t0"].ack_wait == 15.0
    assert after["slow--t0"].filter_subjects == ["events.jobs.*", "eventfn.redrive.slow--t0"]
    stream = await js.stream_info("EVENTFN")
    assert "events.>" in stream.config.subjects


async def test_embedded_server_serves_requests_and_stops_with_the_service(tmp_path: Path, handlers: Path) -> None:
    write_handler(
        handlers,
        "hello",
        """
        def handler(event, context):
            return {"hello": event.get("name")}
    """,
    )
    service = Serve(handlers, None, tmp_path / "data")
    async with service:
        url = (await service.log.await_line(r"embedded NATS at (nats://\S+):")).group(1)
        assert url.startswith("nats://127.0.0.1:")
        assert (tmp_path / "data" / "jetstream").is_dir()
        client = await nats.connect(url)
        reply = await client.request("eventfn.invoke.hello", b'{"name": "Ann"}', timeout=10)
        assert json.loads(reply.data) == {"hello": "Ann"}
        await client.close()
    assert service.process is not None and service.process.returncode == 0
    host, port = url.removeprefix("nats://").split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


async def _serve_error(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-m", "eventfn", "serve", *args], cwd=cwd, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


async def test_start_up_errors_are_one_clear_line(tmp_path: Path, handlers: Path, nats_server: NatsServer) -> None:
    # Four independent starts run at once, each in a directory of its own (its own default data directory; only
    # the last one reads an eventfn.toml).
    places = {name: tmp_path / name for name in ("in_use", "unreachable", "no_dir", "typo")}
    for place in places.values():
        place.mkdir()
    (places["typo"] / "eventfn.toml").write_text('[stream]\nsubjectz = ["x.>"]\n')
    in_use, unreachable, no_dir, typo = await at_once(
        _serve_error(
            "--handlers",
            str(handlers),
            "--nats-port",
            str(nats_server.port),
            "--data-dir",
            str(tmp_path / "d1"),
            cwd=places["in_use"],
        ),
        _serve_error("--handlers", str(handlers), "--nats", "nats://127.0.0.1:1", cwd=places["unreachable"]),
        _serve_error("--handlers", str(tmp_path / "missing"), "--nats", nats_server.url, cwd=places["no_dir"]),
        _serve_error("--handlers", str(handlers), "--nats", nats_server.url, cwd=places["typo"]),
    )
    for result, expected in [
        (in_use, f"port {nats_server.port} is already in use"),
        (unreachable, "cannot connect"),
        (no_dir, "handler directory not found"),
        (typo, "subjectz"),
    ]:
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr


async def test_service_reconnects_and_resumes_consuming_after_nats_restarts(tmp_path: Path, handlers: Path) -> None:
    write_handler(handlers, "slow", SLOW.format(timeout=5))
    store = tmp_path / "restartable"
    first = await NatsServer(store).astart()
    try:
        async with Serve(handlers, first.url, tmp_path / "data", env={"PROBE_NATS": first.url}) as service:
            await first.astop()
            second = await NatsServer(store, port=first.port).astart()
            try:
                await service.log.await_line(r"reconnected", timeout=30)
                client = await nats.connect(second.url)
                seen = Collector()
                await client.subscribe("probe.slow", cb=seen.on_message)
                await client.flush()
                await client.publish("events.work.after", b'{"n": 99}')
                # Well inside the 5 s pull-request expiry: the feed re-requests on reconnect.
                assert await seen.wait_for(1, timeout=4) == ["99"]
                await client.close()
            finally:
                await second.astop()
    finally:
        await first.astop()
