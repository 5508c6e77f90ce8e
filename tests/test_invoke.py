"""End to end: `eventfn serve` as a subprocess, invoked with plain NATS requests and publishes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client

from eventfn.testing import PROBE_MODULE, NatsServer, Serve, write_handler

pytestmark = pytest.mark.e2e

ECHO = """
    # /// eventfn
    # timeout = 5
    # triggers = ["events.orders.*", "audit.>"]
    # ///
    import _probe

    def handler(event, context):
        _probe.report("probe.echo", __import__("json").dumps({"event": event, "id": context.aws_request_id}))
        return {"event": event, "function": context.function_name}
"""


FAILS = """
    def lambda_handler(event, context):
        raise KeyError("missing-field")
"""

SLOW = """
    # /// eventfn
    # timeout = 1
    # ///
    def handler(event, context):
        if event.get("spin"):
            while True:
                pass
        return "fast"
"""

CTX = """
    # /// eventfn
    # timeout = 7
    # memory = 256
    # ///
    def handler(event, context):
        return {
            "function_name": context.function_name,
            "function_version": context.function_version,
            "arn": context.invoked_function_arn,
            "memory": context.memory_limit_in_mb,
            "request_id": context.aws_request_id,
            "log_group": context.log_group_name,
            "log_stream": context.log_stream_name,
            "identity": [context.identity.cognito_identity_id, context.identity.cognito_identity_pool_id],
            "client_context": context.client_context,
            "remaining": context.get_remaining_time_in_millis(),
        }
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Serve]]:
    """One nats-server and one `eventfn serve` with every function of this module, for the tests that only call
    them (a start costs about a second); each test uses its own function or its own events."""
    root = tmp_path_factory.mktemp("invoke")
    handlers = root / "handlers"
    handlers.mkdir()
    (handlers / "_probe.py").write_text(PROBE_MODULE)
    for name, source in {"echo": ECHO, "fails": FAILS, "slow": SLOW, "ctx": CTX}.items():
        write_handler(handlers, name, source)
    with (
        NatsServer(root / "nats") as server,
        Serve(handlers, server.url, root / "data", env={"PROBE_NATS": server.url}) as serve,
    ):
        yield server, serve


@pytest.fixture(scope="module")
def nats_server(service: tuple[NatsServer, Serve]) -> NatsServer:
    """The shared service's server: `nc` and `probe` connect to it."""
    return service[0]


async def test_sync_invoke_returns_the_handler_result(nc: Client) -> None:
    reply = await nc.request("eventfn.invoke.echo", b'{"id": 1}', timeout=10)
    assert json.loads(reply.data) == {"event": {"id": 1}, "function": "echo"}
    assert "Eventfn-Function-Error" not in (reply.headers or {})


async def test_handler_exception_returns_lambda_error_object_and_error_header(nc: Client) -> None:
    reply = await nc.request("eventfn.invoke.fails", b"{}", timeout=10)
    error = json.loads(reply.data)
    assert error["errorType"] == "KeyError"
    assert error["errorMessage"] == "'missing-field'"
    assert any("fails.py" in frame and "line 2" in frame for frame in error["stackTrace"])
    assert reply.headers["Eventfn-Function-Error"] == "Unhandled"


async def test_timeout_fails_with_lambdas_message_and_the_function_keeps_serving(nc: Client) -> None:
    reply = await nc.request("eventfn.invoke.slow", b'{"spin": true}', timeout=10)
    error = json.loads(reply.data)
    assert error["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in error["errorMessage"]
    assert reply.headers["Eventfn-Function-Error"] == "Unhandled"
    again = await nc.request("eventfn.invoke.slow", b"{}", timeout=10)
    assert json.loads(again.data) == "fast"


async def test_unknown_function_gets_resource_not_found(nc: Client) -> None:
    reply = await nc.request("eventfn.invoke.nope", b"{}", timeout=10)
    assert json.loads(reply.data)["errorType"] == "ResourceNotFoundException"
    assert reply.headers["Eventfn-Status"] == "404"


async def test_plain_publish_reaches_functions_on_matching_wildcard_subjects(nc: Client, probe) -> None:
    seen = await probe("probe.echo")
    await nc.publish("events.orders.created", b'{"id": 1}')  # matches events.orders.*
    await nc.publish("events.orders.created.extra", b'{"id": 2}')  # matches neither trigger
    await nc.publish("audit.eu.login", b'{"id": 3}')  # matches audit.>
    await nc.publish("events.orders.paid", b'{"id": 4}')
    received = [json.loads(t)["event"] for t in await seen.wait_for(3)]
    assert sorted(e["id"] for e in received) == [1, 3, 4]


async def test_non_json_body_arrives_as_text_and_binary_as_base64(nc: Client, probe) -> None:
    seen = await probe("probe.echo")
    await nc.publish("events.orders.text", b"plain words, not JSON")
    await nc.publish("events.orders.binary", b"\xff\xfe\x00\x01")
    events = sorted(json.loads(t)["event"] for t in await seen.wait_for(2))
    assert events == ["//4AAQ==", "plain words, not JSON"]


async def test_async_invoke_is_stored_and_processed(nc: Client, probe) -> None:
    seen = await probe("probe.echo")
    js = nc.jetstream()
    ack = await js.publish("eventfn.async.echo", b'{"job": 7}')
    assert ack.stream == "EVENTFN"
    [text] = await seen.wait_for(1)
    assert json.loads(text)["event"] == {"job": 7}


async def test_context_has_lambdas_attributes(nc: Client) -> None:
    reply = await nc.request("eventfn.invoke.ctx", b"{}", timeout=10)
    ctx = json.loads(reply.data)
    assert ctx["function_name"] == "ctx"
    assert ctx["function_version"] == "$LATEST"
    assert ctx["arn"].endswith(":function:ctx") and ctx["arn"].startswith("arn:aws:lambda:")
    assert ctx["memory"] == "256"
    assert len(ctx["request_id"]) == 36 and ctx["request_id"] == reply.headers["Eventfn-Request-Id"]
    assert ctx["log_group"] == "/aws/lambda/ctx"
    assert "[$LATEST]" in ctx["log_stream"]
    assert ctx["identity"] == [None, None]
    assert ctx["client_context"] is None
    assert 6000 < ctx["remaining"] <= 7000


async def _cli(*args: str, cwd: Path, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run `eventfn ARGS` as a user would (without blocking the test's event loop)."""
    with anyio.fail_after(30):
        done = await anyio.run_process([sys.executable, "-m", "eventfn", *args], cwd=cwd, input=input, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


async def test_cli_invoke_pub_and_functions(tmp_path: Path, nats_server: NatsServer, probe) -> None:
    url = ["--nats", nats_server.url]
    result = await _cli("invoke", "echo", '{"n": 5}', *url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"event": {"n": 5}, "function": "echo"}

    piped = await _cli("invoke", "echo", "-", *url, cwd=tmp_path, input=b'{"from": "stdin"}')
    assert json.loads(piped.stdout)["event"] == {"from": "stdin"}

    seen = await probe("probe.echo")
    queued = await _cli("invoke", "echo", "--async", '{"n": 6}', *url, cwd=tmp_path)
    assert json.loads(queued.stdout)["StatusCode"] == 202
    published = await _cli("pub", "events.orders.cli", '{"n": 7}', *url, cwd=tmp_path)
    assert published.returncode == 0, published.stderr
    events = [json.loads(t)["event"] for t in await seen.wait_for(2)]
    assert {"n": 6} in events and {"n": 7} in events

    listing = await _cli("functions", "--json", *url, cwd=tmp_path)
    assert [f["name"] for f in json.loads(listing.stdout)] == ["ctx", "echo", "fails", "slow"]
    [info] = [f for f in json.loads(listing.stdout) if f["name"] == "echo"]
    assert info["name"] == "echo" and info["state"] == "Active"
    assert info["triggers"] == ["events.orders.*", "audit.>"]

    missing = await _cli("invoke", "nope", *url, cwd=tmp_path)
    assert missing.returncode == 1
    assert "ResourceNotFoundException" in missing.stderr
    assert "Traceback" not in missing.stderr


async def test_sync_payload_over_lambdas_6_mb_gets_request_too_large(tmp_path: Path, handlers: Path) -> None:
    write_handler(
        handlers,
        "echo",
        """
        def handler(event, context):
            return {"event": event}
    """,
    )
    # The embedded server allows 8 MB messages, so the 6 MB rule is eventfn's to enforce.
    async with Serve(handlers, None, tmp_path / "data") as service:
        url = (await service.log.await_line(r"embedded NATS at (nats://\S+):")).group(1)
        client = await nats.connect(url)
        try:
            reply = await client.request("eventfn.invoke.echo", b'"' + b"x" * (7 * 1024 * 1024) + b'"', timeout=20)
            assert reply.headers["Eventfn-Status"] == "413"
            assert json.loads(reply.data)["errorType"] == "RequestTooLargeException"
            small = await client.request("eventfn.invoke.echo", b'{"ok": 1}', timeout=10)
            assert json.loads(small.data)["event"] == {"ok": 1}
        finally:
            await client.close()
