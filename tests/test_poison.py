"""Poison messages against a real `eventfn serve`: each ends in the DLQ with a clear error, and the service
keeps running, across a SIGKILL and restart too (issue 8, section 1)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client

from eventfn.testing import NatsServer, Serve, write_handler

pytestmark = pytest.mark.e2e

#: The reproduction from the issue: 2 KB of JSON nested past every decoder's recursion limit.
POISON = b"[" * 1000 + b"]" * 1000

ECHO = """
    # /// eventfn
    # [retry]
    # max_attempts = {attempts}
    # base_delay = 0.2
    # max_delay = 0.5
    # ///
    import json
    import _probe

    def handler(event, context):
        _probe.report("probe.{name}", json.dumps(event))
        return event
"""


def echo_handler(handlers: Path, name: str, attempts: int = 1) -> None:
    """A function that reports each event it gets to `probe.<name>`; failed events get `attempts` retries."""
    write_handler(handlers, name, ECHO.replace("{name}", name).replace("{attempts}", str(attempts)))


async def cli(nats_server: NatsServer, *args: str) -> tuple[int, str, str]:
    """Run `eventfn ARGS --nats URL` as a user would (without blocking the test's event loop)."""
    result = await anyio.run_process([sys.executable, "-m", "eventfn", *args, "--nats", nats_server.url], check=False)
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


async def dlq_record(nc: Client, function: str) -> dict[str, Any]:
    record = await nc.jetstream().get_last_msg("EVENTFN_DLQ", f"eventfn.dlq.{function}")
    value: dict[str, Any] = json.loads(record.data)
    return value


def alive(service: Serve) -> bool:
    return service.process is not None and service.process.poll() is None


async def test_a_body_nested_too_deep_ends_in_the_dlq_and_the_service_stays_up(
    handlers: Path, serve: Callable[..., Serve], nc: Client, nats_server: NatsServer, probe: Any
) -> None:
    echo_handler(handlers, "deep")
    service = serve()
    seen = await probe("probe.deep")
    await nc.publish("eventfn.async.deep", POISON)  # exactly what `nats pub eventfn.async.deep "[[[…]]]"` sends
    await nc.flush()  # the log wait below blocks this thread, nats-py's flusher with it
    service.log.wait_for(r"deep: request \S+ dead-lettered \(RetriesExhausted\) after 2 attempt")

    record = await dlq_record(nc, "deep")
    error = record["responsePayload"]
    assert error["errorType"] == "Runtime.UnmarshalError"
    assert "could not be parsed as JSON" in error["errorMessage"]
    assert "nested too deeply" in error["errorMessage"]
    # The payload is kept byte for byte, as text: it is not JSON eventfn can parse.
    assert record["requestPayload"] == POISON.decode()
    assert record["eventfn"]["subject"] == "eventfn.async.deep"

    code, out, err = await cli(nats_server, "dlq", "ls", "deep")
    assert code == 0, err
    assert "Traceback" not in out + err
    assert "Runtime.UnmarshalError" in out
    code, out, err = await cli(nats_server, "dlq", "show", str(record_id(out)))
    assert code == 0, err
    assert "Runtime.UnmarshalError" in out

    await nc.publish("eventfn.async.deep", b'{"after": "poison"}')
    assert [json.loads(t) for t in await seen.wait_for(1)] == [{"after": "poison"}]
    assert alive(service)
    assert "Traceback" not in service.log.text()


def record_id(listing: str) -> int:
    """The id of the only record in an `eventfn dlq ls` table."""
    [row] = listing.splitlines()[1:]
    return int(row.split()[0])


async def test_a_poison_message_left_unsettled_by_a_sigkill_does_not_stop_the_restarted_service(
    handlers: Path, serve: Callable[..., Serve], nc: Client, probe: Any
) -> None:
    echo_handler(handlers, "deep", attempts=2)
    service = serve()
    js = nc.jetstream()
    await js.publish("eventfn.async.deep", POISON)
    # Killed after the first attempt failed and before the event is settled for good: it stays in the stream.
    service.log.wait_for(r"deep: attempt 1 of request \S+ failed \(Runtime.UnmarshalError\); retrying")
    service.kill()
    await js.publish("eventfn.async.deep", b'{"n": 1}')  # waits in the stream behind the poison

    seen = await probe("probe.deep")
    restarted = serve()
    restarted.log.wait_for(r"deep: request \S+ dead-lettered \(RetriesExhausted\) after 3 attempt")
    assert [json.loads(t) for t in await seen.wait_for(1)] == [{"n": 1}]
    record = await dlq_record(nc, "deep")
    assert record["responsePayload"]["errorType"] == "Runtime.UnmarshalError"
    assert alive(restarted)

    # And once more with the poison still pending at start-up: the issue's crash loop began "within milliseconds
    # of ready".
    restarted.kill()
    await js.publish("eventfn.async.deep", POISON)
    await js.publish("eventfn.async.deep", b'{"n": 2}')
    again = serve()
    again.log.wait_for(r"deep: request \S+ dead-lettered \(RetriesExhausted\)")
    assert [json.loads(t) for t in await seen.wait_for(2)][-1] == {"n": 2}
    assert alive(again)
