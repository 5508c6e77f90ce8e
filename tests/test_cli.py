"""The `eventfn` command as a new user meets it: run as a subprocess against a real nats-server and a real
`eventfn serve`. Every mistake is one line on stderr and exit 1, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client

from eventfn.testing import NatsServer, Serve, function_info, wait_serving, wait_until, write_handler
from tests.conftest import at_once

pytestmark = pytest.mark.e2e

ECHO = """
    import _probe

    def handler(event, context):
        _probe.report("probe.echo", __import__("json").dumps(event))
        return {"event": event}
"""


async def eventfn(*args: str, cwd: Path, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    """Run `eventfn ARGS` as a user would (without blocking the test's event loop)."""
    return await anyio.run_process([sys.executable, "-m", "eventfn", *args], cwd=cwd, check=False, stdout=stdout)


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """The error a failed command printed: exit 1, one `eventfn: error:` line, no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, stderr)
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    assert line.startswith("eventfn: error: "), line
    return line


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def stored_on(nc: Client, subject: str) -> int:
    info = await nc.jetstream().stream_info("EVENTFN", subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


# -- unknown function, async -------------------------------------------------------------------------------------------


async def test_async_invoke_of_an_unknown_function_is_refused_and_nothing_is_queued(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, nc: Client, probe
) -> None:
    write_handler(handlers, "echo", ECHO)
    await serve()
    url = ["--nats", nats_server.url]
    line = one_line_error(await eventfn("invoke", "nosuch", "--async", "{}", *url, cwd=tmp_path))
    assert "ResourceNotFoundException" in line and "nosuch" in line and "nothing was queued" in line
    assert await stored_on(nc, "eventfn.async.nosuch") == 0

    seen = await probe("probe.echo")
    queued = await eventfn("invoke", "echo", "--async", '{"n": 1}', *url, cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr.decode()
    assert json.loads(queued.stdout)["StatusCode"] == 202
    assert json.loads((await seen.wait_for(1))[0]) == {"n": 1}
    assert len(seen.messages) == 1, "the existence check ran nothing"


async def test_dry_run_invoke_answers_204_for_a_function_and_404_otherwise_without_running_it(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    write_handler(handlers, "echo", ECHO)
    await serve()
    seen = await probe("probe.echo")
    dry = {"Eventfn-Invocation-Type": "DryRun"}
    exists = await nc.request("eventfn.invoke.echo", b'{"n": 1}', headers=dry, timeout=10)
    assert exists.headers["Eventfn-Status"] == "204" and exists.data == b""
    missing = await nc.request("eventfn.invoke.nosuch", b"{}", headers=dry, timeout=10)
    assert missing.headers["Eventfn-Status"] == "404"
    unread = {**dry, "Eventfn-Client-Context": "not base64", "ce-specversion": "1.0"}  # what would run is not read
    assert (await nc.request("eventfn.invoke.echo", b"{}", headers=unread, timeout=10)).headers[
        "Eventfn-Status"
    ] == "204"
    wrong = await nc.request("eventfn.invoke.echo", b"{}", headers={"Eventfn-Invocation-Type": "Event"}, timeout=10)
    assert wrong.headers["Eventfn-Error"] == "InvalidParameterValueException"
    assert "eventfn.async.echo" in json.loads(wrong.data)["errorMessage"]
    real = await nc.request("eventfn.invoke.echo", b'{"n": 2}', timeout=10)
    assert json.loads(real.data) == {"event": {"n": 2}}
    assert [json.loads(t) for t in await seen.wait_for(1)] == [{"n": 2}], "only the real invoke ran"


async def test_async_invoke_without_a_running_service_says_so(
    tmp_path: Path, nats_server: NatsServer, nc: Client
) -> None:
    await nc.jetstream().add_stream(name="EVENTFN", subjects=["eventfn.async.>"])  # left by an earlier serve
    line = one_line_error(await eventfn("invoke", "echo", "--async", "--nats", nats_server.url, cwd=tmp_path))
    assert "no eventfn service answered" in line and "eventfn serve" in line
    assert await stored_on(nc, "eventfn.async.echo") == 0


# -- CLI errors --------------------------------------------------------------------------------------------------------


async def test_global_options_work_before_and_after_the_subcommand(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer
) -> None:
    write_handler(handlers, "echo", ECHO)
    await serve()
    url = nats_server.url
    wrong = f"nats://127.0.0.1:{free_port()}"
    listings = (
        ["--nats", url, "functions", "--json"],
        ["functions", "--json", "--nats", url],
        ["--nats", wrong, "functions", "--json", "--nats", url],  # given twice, the later one wins
        ["--data-dir", str(tmp_path / "nowhere"), "--nats", url, "functions", "--json"],
    )
    dlq = (["--nats", url, "dlq", "ls"], ["dlq", "--nats", url, "ls"], ["dlq", "ls", "--nats", url])
    results = await at_once(*(eventfn(*args, cwd=tmp_path) for args in (*listings, *dlq)))
    for args, result in zip(listings, results[: len(listings)], strict=True):
        assert result.returncode == 0, (args, result.stderr.decode())
        assert [f["name"] for f in json.loads(result.stdout)] == ["echo"], args
    for args, result in zip(dlq, results[len(listings) :], strict=True):
        assert result.returncode == 0, (args, result.stderr.decode())
        assert result.stdout.decode().startswith("ID"), args


async def test_output_into_a_closed_pipe_ends_quietly(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer
) -> None:
    """`eventfn mappings | head -3` once the reader has gone: no BrokenPipeError traceback."""
    write_handler(handlers, "echo", ECHO)
    await serve()

    async def into_a_closed_pipe(command: list[str]) -> subprocess.CompletedProcess[bytes]:
        reader, writer = os.pipe()
        os.close(reader)  # every write fails with EPIPE, as after `head` has exited
        try:
            return await eventfn(*command, "--nats", nats_server.url, cwd=tmp_path, stdout=writer)
        finally:
            os.close(writer)

    commands = (["mappings"], ["functions"], ["functions", "--json"], ["dlq", "ls"], ["invoke", "echo"])
    for command, result in zip(commands, await at_once(*map(into_a_closed_pipe, commands)), strict=True):
        assert result.stderr.decode() == "", command
        assert result.returncode == 141, (command, result.returncode)  # as a tool killed by SIGPIPE


async def test_dlq_ls_prints_one_line_per_record(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, probe
) -> None:
    write_handler(
        handlers,
        "broken",
        """
        # /// eventfn
        # [retry]
        # max_attempts = 0
        # ///
        def handler(event, context):
            raise ValueError("first line\\n\\tsecond line\\r\\nthird \\x1b[31mred\\x1b[0m " + "x" * 300)
        """,
    )
    await serve()
    dead = await probe("eventfn.dlq.broken")
    for n in ("1", "2"):
        queued = await eventfn("invoke", "broken", "--async", n, "--nats", nats_server.url, cwd=tmp_path)
        assert queued.returncode == 0, queued.stderr.decode()
    await dead.wait_for(2)
    result = await eventfn("dlq", "ls", "--nats", nats_server.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    header, *rows = result.stdout.decode().splitlines()
    assert header.split() == ["ID", "FUNCTION", "TIME", "CONDITION", "ATTEMPTS", "ERROR"]
    assert len(rows) == 2, rows
    for row in rows:
        # The record's fields are made one printable line when read (control characters dropped or escaped).
        assert "ValueError: first line second line third " in row and "red" in row
        assert "\x1b" not in row and "\t" not in row and "\r" not in row
        assert row.endswith("…") and len(row) < 250
    shown = await eventfn("dlq", "show", rows[0].split()[0], "--nats", nats_server.url, cwd=tmp_path)
    assert "x" * 300 in shown.stdout.decode(), "`dlq show` still prints the whole record"


async def test_client_command_that_cannot_connect_points_at_eventfn_serve(tmp_path: Path) -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"
    commands = (["functions"], ["mappings"], ["invoke", "echo"], ["pub", "events.x"], ["dlq", "ls"])
    for result in await at_once(*(eventfn(*command, "--nats", nowhere, cwd=tmp_path) for command in commands)):
        line = one_line_error(result)
        assert "is `eventfn serve` running?" in line and "--nats URL" in line, line
        assert "embedded" not in line, line


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["invoke", "my func"], "whitespace"),
        (["invoke", "--", "-dash"], "starts with '-'"),
        (["invoke", "a.b", "--async"], "'.'"),
        (["invoke", "café"], "non-ASCII"),
        (["invoke", "x" * 65], "over 64"),
        (["dlq", "ls", "a>b"], "'>'"),
        (["dlq", "purge", "my func"], "whitespace"),
    ],
)
async def test_an_invalid_function_name_is_a_one_line_error(tmp_path: Path, args: list[str], reason: str) -> None:
    # Refused before connecting: no server is needed to tell a bad name. (--nats goes first: after `--` it
    # would be read as more arguments.)
    line = one_line_error(await eventfn("--nats", f"nats://127.0.0.1:{free_port()}", *args, cwd=tmp_path))
    assert "is not a valid function name" in line and reason in line, line


async def test_publishing_to_an_invalid_subject_is_a_one_line_error(tmp_path: Path) -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"
    subjects = ("a b", "events.*", "events..x", "")
    for result in await at_once(*(eventfn("pub", subject, "--nats", nowhere, cwd=tmp_path) for subject in subjects)):
        line = one_line_error(result)
        assert "is not a NATS subject to publish to" in line, line


# -- function state ----------------------------------------------------------------------------------------------------


async def test_functions_shows_the_broken_version_and_the_one_still_serving(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, nc: Client
) -> None:
    write_handler(handlers, "fn", "def handler(event, context):\n    return 'v1'\n")
    await serve()
    serving = (await wait_serving(nc, "fn"))["version"]
    write_handler(handlers, "fn", "def handler(event, context)\n    return 'v2'\n")
    await wait_until(lambda: function_info(nc, "fn"), lambda i: i is not None and i["state"] == "Failed")

    [info] = json.loads((await eventfn("functions", "--json", "--nats", nats_server.url, cwd=tmp_path)).stdout)
    assert info["state"] == "Failed" and info["serving_version"] == serving != info["version"]
    table = await eventfn("functions", "--nats", nats_server.url, cwd=tmp_path)
    [row] = table.stdout.decode().splitlines()[1:]
    assert f"Failed (serving {serving})" in row and info["version"] in row and "fn.py:1" in row


@pytest.mark.parametrize("command", [["dlq", "show"], ["dlq", "redrive", "fn", "--id"]])
async def test_a_record_id_beyond_what_jetstream_counts_is_not_found_not_a_traceback(
    tmp_path: Path, nats_server: NatsServer, command: list[str]
) -> None:
    result = await eventfn(*command, str(2**64), "--nats", nats_server.url, cwd=tmp_path)
    assert one_line_error(result).startswith(f"eventfn: error: no DLQ record {2**64}")


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "soon"])
async def test_a_timeout_that_is_not_a_positive_number_is_a_usage_error(tmp_path: Path, value: str) -> None:
    result = await eventfn(
        "invoke", "hello", "--timeout", value, "--nats", f"nats://127.0.0.1:{free_port()}", cwd=tmp_path
    )
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert f"{value!r} is not a positive number of seconds".encode() in result.stderr, result.stderr
