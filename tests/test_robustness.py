"""Hostile and unlucky input against a real `eventfn serve`: the service answers, records, and keeps running."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from eventfn.testing import Serve, wait_serving, wait_stats, write_handler

pytestmark = pytest.mark.e2e

FAILS = """
    # /// eventfn
    # triggers = ["events.shared.>"]
    # [retry]
    # max_attempts = 0
    # ///
    def handler(event, context):
        raise RuntimeError("always")
"""


async def test_two_functions_dead_lettering_the_same_event_each_keep_a_record(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(handlers, "alpha", FAILS)
    write_handler(handlers, "beta", FAILS)
    await serve()
    await nc.publish("events.shared.thing", b'{"n": 1}')
    await wait_stats(nc, "alpha--t0", dead_lettered=1)
    await wait_stats(nc, "beta--t0", dead_lettered=1)
    js = nc.jetstream()
    for function in ("alpha", "beta"):
        record = await js.get_last_msg("EVENTFN_DLQ", f"eventfn.dlq.{function}")
        assert json.loads(record.data)["requestPayload"] == {"n": 1}


async def test_a_body_nested_too_deep_to_parse_does_not_stop_the_mapping(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    write_handler(
        handlers,
        "picky",
        """
        # /// eventfn
        # triggers = [{ subjects = ["events.deep.>"], filters = ['{"body": {"keep": [true]}}'] }]
        # ///
        import _probe

        def handler(event, context):
            _probe.report("probe.picky", "ran")
    """,
    )
    service = await serve()
    seen = await probe("probe.picky")
    await nc.publish("events.deep.x", b"[" * 5000 + b"]" * 5000)
    await nc.publish("events.deep.x", b'{"keep": true}')
    assert await seen.wait_for(1) == ["ran"]
    assert service.process is not None and service.process.poll() is None


async def test_a_result_too_large_for_nats_is_answered_with_lambdas_error(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(
        handlers,
        "huge",
        """
        def handler(event, context):
            return "x" * event["size"]
    """,
    )
    await serve()
    reply = await nc.request("eventfn.invoke.huge", b'{"size": 2000000}', timeout=10)  # the server allows 1 MB
    assert json.loads(reply.data)["errorType"] == "Function.ResponseSizeTooLarge"
    assert reply.headers["Eventfn-Function-Error"] == "Unhandled"
    small = await nc.request("eventfn.invoke.huge", b'{"size": 3}', timeout=10)
    assert json.loads(small.data) == "xxx"


async def test_async_invokes_sent_before_the_function_exists_are_run_once_it_does(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    write_handler(handlers, "other", "def handler(event, context):\n    return 1\n")
    await serve()
    js = nc.jetstream()
    await js.publish("eventfn.async.later", b'{"early": true}')  # stored: the stream holds eventfn.async.>
    seen = await probe("probe.later")
    write_handler(
        handlers,
        "later",
        """
        import json
        import _probe

        def handler(event, context):
            _probe.report("probe.later", json.dumps(event))
    """,
    )
    await wait_serving(nc, "later")
    assert [json.loads(t) for t in await seen.wait_for(1)] == [{"early": True}]
