"""Queues as a user meets them: `eventfn serve` as a subprocess with queues declared in eventfn.toml, messages sent
as `nats pub` sends them, the service SIGKILLed mid-handler, and the `eventfn queue` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client

from eventfn.testing import NatsServer, Serve, write_handler
from tests.conftest import at_once

pytestmark = pytest.mark.e2e

TOML = """
[queues.orders]
visibility_timeout = {visibility}
max_receive_count = {max_receive_count}

[queues.jobs]
fifo = true
max_receive_count = 0
"""


def declare(tmp_path: Path, *, visibility: float = 3, max_receive_count: int = 2) -> Path:
    path = tmp_path / "eventfn.toml"
    path.write_text(TOML.format(visibility=visibility, max_receive_count=max_receive_count), encoding="utf-8")
    return path


async def eventfn(
    nats_server: NatsServer, config: Path, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `eventfn ARGS` as a user would, against the test's NATS and eventfn.toml."""
    return await anyio.run_process(
        [sys.executable, "-m", "eventfn", *args, "--nats", nats_server.url, "--config", str(config)],
        input=stdin,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, stderr)
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    assert line.startswith("eventfn: error: "), line
    return line


async def listed(nats_server: NatsServer, config: Path) -> dict[str, dict[str, Any]]:
    result = await eventfn(nats_server, config, "queue", "ls", "--json")
    assert result.returncode == 0, result.stderr
    return {q["name"]: q for q in json.loads(result.stdout)}


SLOW_SHIP = """
    # /// eventfn
    # timeout = 3
    # [[triggers]]
    # type = "queue"
    # queue = "orders"
    # ///
    import time

    import _probe

    def handler(event, context):
        for record in event["Records"]:
            count = record["attributes"]["ApproximateReceiveCount"]
            _probe.report("probe.ship", f"{record['body']} {count}")
            if count == "1":
                time.sleep(2.5)  # the service is killed meanwhile
"""


async def test_a_service_killed_mid_handler_leaves_the_message_to_be_received_again(
    tmp_path: Path, handlers: Path, nats_server: NatsServer, nc: Client, probe: Callable[[str], Any]
) -> None:
    config = declare(tmp_path, visibility=3, max_receive_count=5)
    write_handler(handlers, "ship", SLOW_SHIP)
    seen = await probe("probe.ship")
    args = ["--config", str(config)]
    env = {"PROBE_NATS": nats_server.url}
    first = await Serve(handlers, nats_server.url, tmp_path / "data", extra_args=args, env=env).astart()
    try:
        await nc.publish("eventfn.queue.orders", b"order-1")  # as `nats pub` sends it
        assert await seen.wait_for(1) == ["order-1 1"]
    finally:
        first.kill()  # mid-handler: the message is neither deleted nor handed back
    async with Serve(handlers, nats_server.url, tmp_path / "data", extra_args=args, env=env):  # restarted
        # Visible again once the visibility timeout (3 s) ends: the new service receives it.
        assert await seen.wait_for(2) == ["order-1 1", "order-1 2"]


FLAKY_SHIP = """
    # /// eventfn
    # timeout = 1
    # [[triggers]]
    # type = "queue"
    # queue = "orders"
    # batch_size = 1
    # ///
    import os

    import _probe

    def handler(event, context):
        record = event["Records"][0]
        fixed = os.path.exists({fixed!r})
        _probe.report("probe.ship", f"{{'ok' if fixed else 'fail'}} {{record['body']}} "
                      f"{{record['attributes']['ApproximateReceiveCount']}}")
        if not fixed:
            raise RuntimeError("the warehouse is closed")
"""


async def test_a_message_moves_to_the_dlq_after_max_receive_count_and_back_with_queue_redrive(
    tmp_path: Path,
    handlers: Path,
    nats_server: NatsServer,
    nc: Client,
    probe: Callable[[str], Any],
    serve: Callable[..., Awaitable[Serve]],
) -> None:
    config = declare(tmp_path, visibility=1, max_receive_count=2)
    fixed = tmp_path / "fixed"
    write_handler(handlers, "ship", FLAKY_SHIP.format(fixed=str(fixed)))
    seen = await probe("probe.ship")
    service = await serve(extra_args=["--config", str(config)])
    await nc.publish("eventfn.queue.orders", b"order-7", headers={"customer": "c-9"})
    line = await service.log.await_line(r"queue orders: message \S+ moved to orders-dlq after 2 receive\(s\).*")
    assert line.group(0).endswith("(last error: RuntimeError)")
    # Retried after the visibility timeout, then moved.
    assert await seen.wait_for(2) == ["fail order-7 1", "fail order-7 2"]
    queues = await listed(nats_server, config)
    assert (queues["orders"]["messages"], queues["orders"]["dead_letter_messages"]) == (0, 1)
    assert queues["orders-dlq"]["messages"] == 1

    fixed.touch()
    result = await eventfn(nats_server, config, "queue", "redrive", "orders")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "1 message(s) moved from orders-dlq back to orders"
    assert await seen.wait_for(3) == ["fail order-7 1", "fail order-7 2", "ok order-7 1"]
    queues = await listed(nats_server, config)
    assert queues["orders"]["dead_letter_messages"] == 0
    again = await eventfn(nats_server, config, "queue", "redrive", "orders")
    assert again.stdout.decode().strip() == "0 message(s) moved from orders-dlq back to orders"


async def test_queue_commands_send_show_and_purge_and_name_mistakes(
    tmp_path: Path, nats_server: NatsServer, serve: Callable[..., Awaitable[Serve]]
) -> None:
    config = declare(tmp_path)
    await serve(extra_args=["--config", str(config)])  # creates the queues' streams; no function consumes them
    # Commands that do not depend on one another run at once (each is a process start of its own).
    sent, later, piped = await at_once(
        eventfn(nats_server, config, "queue", "send", "orders", "hello", "--attr", "a=1"),
        eventfn(nats_server, config, "queue", "send", "orders", "later", "--delay", "600"),
        eventfn(
            nats_server, config, "queue", "send", "jobs", "-", "--group", "g", "--dedup-id", "1", stdin=b"from stdin"
        ),
    )
    assert sent.returncode == 0, sent.stderr
    reply = json.loads(sent.stdout)
    assert set(reply) == {"MessageId", "MD5OfMessageBody"}
    assert "DelayedUntil" in json.loads(later.stdout)
    assert json.loads(piped.stdout)["SequenceNumber"] == "1"

    stats, text, listing = await at_once(
        eventfn(nats_server, config, "queue", "stats", "orders", "--json"),
        eventfn(nats_server, config, "queue", "stats", "orders"),
        eventfn(nats_server, config, "queue", "ls"),
    )
    detail = json.loads(stats.stdout)
    assert (detail["messages"], detail["in_flight"], detail["delayed"]) == (1, 0, 1)
    assert detail["dead_letter"] == "orders-dlq" and detail["dead_letter_messages"] == 0
    assert detail["oldest_age"] >= 0 and detail["settings"]["visibility_timeout"] == 3
    assert "visibility timeout  3 s" in text.stdout.decode()
    table = listing.stdout.decode().splitlines()
    assert table[0].split() == ["NAME", "TYPE", "MESSAGES", "IN", "FLIGHT", "DELAYED", "OLDEST", "DLQ"]
    assert [line.split()[:2] for line in table[1:]] == [
        ["jobs", "fifo"],
        ["orders", "standard"],
        ["orders-dlq", "standard"],
    ]

    purged = await eventfn(nats_server, config, "queue", "purge", "orders")
    assert purged.stdout.decode().strip() == "2 message(s) purged from orders"
    assert (await listed(nats_server, config))["orders"]["delayed"] == 0

    nope, no_group, no_dlq, bad_attr = await at_once(
        eventfn(nats_server, config, "queue", "send", "nope", "x"),
        eventfn(nats_server, config, "queue", "send", "jobs", "x"),
        eventfn(nats_server, config, "queue", "redrive", "jobs"),
        eventfn(nats_server, config, "queue", "send", "orders", "x", "--attr", "a"),
    )
    assert "queue nope: not declared in eventfn.toml (declared: jobs, orders, orders-dlq)" in one_line_error(nope)
    assert "a FIFO queue needs a message group id" in one_line_error(no_group)
    assert "it has no DLQ" in one_line_error(no_dlq)
    assert "--attr 'a' is not K=V" in one_line_error(bad_attr)
