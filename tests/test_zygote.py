"""The fork server against real processes: pools driven directly under an isolation with a zygote, no NATS.

Each test's pools run under `forking` (a fork server started for the test, stopped afterwards, which kills its
children with it). What the tests check is read from /proc, as any other process would see it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from eventfn import sandbox
from eventfn.invoke import forks, isolation, launch
from eventfn.invoke.invocation import Invocation, Outcome
from eventfn.invoke.workers import Pool
from tests.conftest import spec_for, write_handler
from tests.test_layout import _reach

pytestmark = pytest.mark.skipif(not forks.SUPPORTED, reason="the fork server needs Linux 5.3 or later")


def _user_namespaces_work(tmp_path: Path) -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "eventfn.sandbox", "probe", str(tmp_path), "--user-namespace"],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0 and json.loads(done.stdout)["user_namespace"] is None


@pytest.fixture
async def forking(tmp_path: Path) -> AsyncIterator[isolation.Isolation]:
    """`isolation.current()` with a running fork server (and a user namespace per worker where that works)."""
    iso = isolation.Isolation(user_namespace=_user_namespaces_work(tmp_path))
    iso.forks = iso.fork_server()
    assert await iso.forks.start()
    previous, isolation._current = isolation._current, iso
    try:
        yield iso
    finally:
        isolation._current = previous
        await iso.forks.aclose()


def pool_for(tmp_path: Path, code: str, name: str, env: dict[str, str] | None = None) -> Pool:
    folder = tmp_path / name
    folder.mkdir()
    entry = write_handler(folder, code, name)
    environment = {**isolation.current().environment, "AWS_LAMBDA_FUNCTION_NAME": name, **(env or {})}
    return Pool(spec=spec_for(entry, timeout=10, function=name), env=environment, version="v1")


async def run(pool: Pool, payload: object = None) -> Outcome:
    invocation = Invocation(request_id=secrets.token_hex(4), payload=json.dumps(payload or {}).encode())
    return (await pool.execute(invocation)).outcome


def result(outcome: Outcome) -> Any:
    assert outcome.ok, outcome.payload
    return json.loads(outcome.payload)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Polled: a process's exit is announced to its parent only (here the zygote, or init)."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of process `pid` holds `needle` (read as root, or as its owner)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if chunk and needle in chunk:
                return True
    return False


WHOAMI = """
import os

def read(path):
    try:
        return open(path, "rb").read().decode(errors="replace")
    except OSError as exc:
        return type(exc).__name__

def handler(event, context):
    return {
        "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
        "environ": dict(os.environ), "initial": read("/proc/self/environ"), "cwd": os.getcwd(),
        "peek": {str(pid): read(f"/proc/{pid}/environ") for pid in event.get("peek", [])},
    }
"""


def test_the_zygote_imports_nothing_of_the_service() -> None:
    """What it imports is in every forked worker: the worker runtime's modules, nothing of the service's."""
    assert _reach("eventfn.invoke.zygote") <= _reach("eventfn.invoke.runtime") | {"eventfn.invoke.runtime"}


async def test_a_forked_worker_has_a_session_of_its_own_and_its_environment_only_after_release(
    tmp_path: Path, forking: isolation.Isolation
) -> None:
    token = secrets.token_hex(16)
    pool = pool_for(tmp_path, WHOAMI, "whoami", {"API_TOKEN": token})
    try:
        await pool.start()
        seen = result(await run(pool))
    finally:
        await pool.retire()
    assert forking.forks is not None and seen["ppid"] == forking.forks.pid, "forked by the zygote"
    assert seen["sid"] == seen["pgid"] == seen["pid"], "its own session and process group"
    assert seen["environ"]["API_TOKEN"] == token and seen["environ"]["AWS_LAMBDA_FUNCTION_NAME"] == "whoami"
    assert token not in seen["initial"] and "AWS_LAMBDA" not in seen["initial"], "/proc/<pid>/environ: start-up only"
    assert not [k for k in seen["environ"] if k not in pool.env], "nothing but its own environment"
    assert seen["cwd"] == pool.spec.task_root


async def test_no_secret_passes_from_one_function_to_another_through_the_fork(
    tmp_path: Path, forking: isolation.Isolation
) -> None:
    secret = "A-" + secrets.token_hex(24)
    holder = pool_for(tmp_path, WHOAMI, "holder", {"HOLDER_SECRET": secret})
    other = pool_for(tmp_path, WHOAMI, "other")
    try:
        await holder.start()
        held = result(await run(holder))
        await other.start()
        assert forking.forks is not None
        zygote = forking.forks.pid
        assert zygote is not None
        # Forked after the holder's worker read its secret; it cannot look into the zygote (its children would run
        # whatever it put there) nor into the holder.
        seen = result(await run(other, {"peek": [zygote, held["pid"]]}))
        assert seen["ppid"] == held["ppid"] == zygote
        assert seen["peek"] == {str(zygote): "PermissionError", str(held["pid"]): "PermissionError"}
        assert memory_holds(held["pid"], secret.encode()), "the scan finds the secret where it is"
        assert "HOLDER_SECRET" not in seen["environ"]
        for pid in (seen["pid"], zygote):
            assert secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
            assert not memory_holds(pid, secret.encode()), f"the secret is in the memory of {pid}"
    finally:
        await holder.retire()
        await other.retire()


async def test_how_a_forked_worker_ended_is_reported(tmp_path: Path, forking: isolation.Isolation) -> None:
    code = """
import os, signal

def handler(event, context):
    if event["how"] == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    pool = pool_for(tmp_path, code, "ender")
    try:
        await pool.start()
        exited = await run(pool, {"how": "exit"})
        killed = await run(pool, {"how": "kill"})
    finally:
        await pool.retire()
    assert exited.error is not None and killed.error is not None
    assert exited.error.type == killed.error.type == "Runtime.ExitError"
    assert exited.error.message.endswith(" Error: Runtime exited with error: exit status 3")
    assert killed.error.message.endswith(" Error: Runtime exited with error: signal: kill")  # as for a subprocess


async def test_a_dead_zygote_takes_its_workers_along_and_the_next_cold_start_gets_a_new_one(
    tmp_path: Path, forking: isolation.Isolation, caplog: pytest.LogCaptureFixture
) -> None:
    pool = pool_for(tmp_path, WHOAMI, "survivor")
    try:
        await pool.start()
        first = result(await run(pool))
        assert forking.forks is not None and first["ppid"] == forking.forks.pid
        [(warm, _)] = pool.idle
        os.kill(first["ppid"], signal.SIGKILL)
        with anyio.fail_after(10):
            assert await warm.process.wait() == -signal.SIGKILL, "its worker died with it (PR_SET_PDEATHSIG)"
        assert wait_gone(first["pid"])
        with caplog.at_level(logging.WARNING, logger="eventfn.invoke.forks"):
            second = result(await run(pool))  # the warm worker is dropped, not used: a cold start
        assert second["pid"] != first["pid"], "the dead worker was not handed the invocation"
        assert all(w is not warm for w, _ in pool.idle) and not pool._dead, "and it was reaped"
        assert second["ppid"] == forking.forks.pid != first["ppid"], "forked by a new zygote"
        assert (
            f"the fork server (pid {first['ppid']}) stopped: it exited (killed by SIGKILL); starting a new one"
            in caplog.text
        )
    finally:
        await pool.retire()


async def test_a_hung_zygote_does_not_hold_up_a_cold_start(
    tmp_path: Path, forking: isolation.Isolation, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forks, "FORK_TIMEOUT", 0.5)
    first, second = pool_for(tmp_path, WHOAMI, "patient"), pool_for(tmp_path, WHOAMI, "next")
    assert forking.forks is not None
    zygote = forking.forks.pid
    assert zygote is not None
    os.kill(zygote, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="eventfn.invoke.forks"):
            seen = result(await run(first))  # a cold start (no `start`: nothing validated it first)
            assert seen["ppid"] == os.getpid(), "started as a new interpreter instead"
            assert "did not answer within 0.5 s" in caplog.text
            seen = result(await run(second))
        assert seen["ppid"] == forking.forks.pid != zygote, "the next cold start has a new zygote"
        assert wait_gone(zygote), "the hung one was stopped"
    finally:
        await first.retire()
        await second.retire()
        try:
            os.kill(zygote, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def test_a_worker_with_its_own_start_up_variables_starts_as_a_new_interpreter(
    tmp_path: Path, forking: isolation.Isolation
) -> None:
    pool = pool_for(tmp_path, WHOAMI, "zoned", {"TZ": "Pacific/Auckland"})
    try:
        await pool.start()
        seen = result(await run(pool))
    finally:
        await pool.retire()
    assert seen["ppid"] == os.getpid() and "TZ=Pacific/Auckland" in seen["initial"], "read as its interpreter starts"


async def test_without_a_fork_server_workers_start_as_new_interpreters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(forks, "SUPPORTED", False)
    iso = isolation.Isolation()
    iso.forks = iso.fork_server()
    with caplog.at_level(logging.WARNING, logger="eventfn.invoke.forks"):
        assert not await iso.forks.start()
    assert caplog.text.count("workers start as new interpreters") == 1
    monkeypatch.setattr(isolation, "_current", iso)
    pool = pool_for(tmp_path, WHOAMI, "plain")
    try:
        await pool.start()
        assert result(await run(pool))["ppid"] == os.getpid()
    finally:
        await pool.retire()
        await iso.forks.aclose()
    assert caplog.text.count("workers start as new interpreters") == 1, "said once, not at every cold start"


@pytest.mark.skipif(not sandbox.LINUX, reason="Linux")
async def test_the_zygote_has_the_shared_start_up_environment_only_and_is_the_services_child(
    forking: isolation.Isolation,
) -> None:
    assert forking.forks is not None
    zygote = forking.forks.pid
    assert zygote is not None
    status = Path(f"/proc/{zygote}/status").read_text()
    environ = dict(
        item.split("=", 1) for item in Path(f"/proc/{zygote}/environ").read_text().split("\0") if "=" in item
    )
    assert environ == forking.forks.environment
    assert all(sandbox.is_start_up_variable(name) for name in environ)
    assert f"PPid:\t{os.getpid()}\n" in status


async def test_the_next_cold_start_takes_a_child_forked_ahead_of_it(
    tmp_path: Path, forking: isolation.Isolation
) -> None:
    server = forking.forks
    assert server is not None
    first, second = pool_for(tmp_path, WHOAMI, "early"), pool_for(tmp_path, WHOAMI, "late", {"LATE_ONLY": "x"})
    try:
        await first.start()  # a cold start: the first spare is forked meanwhile
        if server.refilling is not None:
            await asyncio.wait([server.refilling])
        spare = server.spare
        assert isinstance(spare, launch.Forked) and spare.tree is not None, "forked and tracked ahead"
        assert f"PPid:\t{server.pid}\n" in Path(f"/proc/{spare.pid}/status").read_text()
        seen = result(await run(second))
        assert seen["pid"] == spare.pid and seen["sid"] == spare.pid, "the spare became this function's worker"
        assert seen["environ"]["LATE_ONLY"] == "x" and seen["environ"]["AWS_LAMBDA_FUNCTION_NAME"] == "late"
        assert seen["cwd"] == second.spec.task_root
    finally:
        await first.retire()
        await second.retire()
