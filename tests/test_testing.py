"""`eventfn.testing`'s waits: a log line awaited without blocking the event loop, polling of a structured signal
with a deadline, and blocking forms that refuse to run where they would stop an event loop."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from eventfn.testing import LogWatcher, NatsCluster, NatsServer, Serve, wait_until


class Pipe:
    """A child's output as a LogWatcher reads it: lines written to one end of a pipe."""

    def __init__(self) -> None:
        read_fd, self._write_fd = os.pipe()
        self._reader = os.fdopen(read_fd, "rb")
        self.log = LogWatcher(self._reader)

    def write(self, *lines: str) -> None:
        os.write(self._write_fd, "".join(f"{line}\n" for line in lines).encode())

    def end(self) -> None:
        """The child exits: its output ends."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1

    def close(self) -> None:
        self.end()
        self.log.close(self._reader)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


async def test_await_line_lets_the_event_loop_run_while_it_waits(pipe: Pipe) -> None:
    ticks = 0

    async def writer() -> None:
        nonlocal ticks
        for _ in range(5):
            ticks += 1
            await anyio.sleep(0.02)
        pipe.write("noise", "function fn loaded (version abc123)")

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        match = await pipe.log.await_line(r"function fn loaded \(version (\w+)\)", timeout=5)
    assert match.group(1) == "abc123"
    assert ticks == 5  # the writer ran to its end in the loop the wait shares


async def test_await_line_counts_matches_from_start(pipe: Pipe) -> None:
    pipe.write("hit 1", "hit 2")
    await pipe.log.await_line("hit 2", timeout=5)
    mark = pipe.log.mark()
    pipe.write("miss", "hit 3", "hit 4")
    assert (await pipe.log.await_line(r"hit (\d)", start=mark, count=2, timeout=5)).group(1) == "4"
    assert (await pipe.log.await_line(r"hit (\d)", count=3, timeout=5)).group(1) == "3"


async def test_await_line_times_out_with_the_last_lines(pipe: Pipe) -> None:
    pipe.write("something else")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"(?s)0/1 lines matching 'never'.*something else"):
        await pipe.log.await_line("never", timeout=0.3)
    assert time.monotonic() - started < 2


async def test_await_line_ends_when_the_output_ends(pipe: Pipe) -> None:
    pipe.write("last words")
    pipe.end()
    with pytest.raises(TimeoutError, match="last words"):
        await pipe.log.await_line("never", timeout=30)


async def test_a_cancelled_await_line_ends_at_once(pipe: Pipe) -> None:
    started = time.monotonic()
    with anyio.move_on_after(0.1):
        await pipe.log.await_line("never", timeout=30)
    assert time.monotonic() - started < 1


async def test_wait_until_returns_the_first_value_that_satisfies_it() -> None:
    values = iter(range(100))

    async def probe() -> int:
        return next(values)

    assert await wait_until(probe, lambda n: n >= 3, interval=0.001) == 3


async def test_wait_until_names_what_it_waited_for_and_the_last_value() -> None:
    async def probe() -> dict[str, int]:
        return {"processed": 1}

    with pytest.raises(TimeoutError, match=r"five processed not reached in 0.1 s; last: \{'processed': 1\}"):
        await wait_until(probe, lambda s: s["processed"] == 5, timeout=0.1, interval=0.01, what="five processed")


# -- blocking forms are for sync code ---------------------------------------------------------------------------------


def test_wait_for_blocks_in_sync_code(pipe: Pipe) -> None:
    pipe.write("function fn loaded")
    assert pipe.log.wait_for(r"fn (\w+)", timeout=5).group(1) == "loaded"


async def test_wait_for_refuses_to_block_a_running_event_loop(pipe: Pipe) -> None:
    pipe.write("function fn loaded")
    with pytest.raises(RuntimeError, match=r"LogWatcher.wait_for blocks .* use `await log.await_line\(...\)`"):
        pipe.log.wait_for("loaded", timeout=5)
    # A worker thread runs no event loop: blocking there holds up nothing else.
    assert (await anyio.to_thread.run_sync(pipe.log.wait_for, "loaded")).group(0) == "loaded"


async def test_the_blocking_forms_refuse_to_run_in_async_code_before_starting_anything(tmp_path: Path) -> None:
    service = Serve(tmp_path / "handlers", None, tmp_path / "data")
    server = NatsServer(tmp_path / "nats")
    for blocking, instead in [
        (service.start, "serve.astart"),
        (service.stop, "serve.astop"),
        (service.wait, "serve.await_exit"),
        (lambda: service.cli("functions"), "serve.acli"),
        (server.start, "server.astart"),
        (server.stop, "server.astop"),
        (NatsCluster(tmp_path / "cluster").start, "cluster.astart"),
    ]:
        with pytest.raises(RuntimeError, match=f"event loop runs on this one.*{instead}"):
            blocking()
    assert service.process is None and server.process is None, "nothing was left running"
    assert not (tmp_path / "nats").exists()


@pytest.mark.e2e
async def test_the_serve_fixture_starts_a_service_while_the_event_loop_runs(
    serve: Callable[..., Awaitable[Serve]],
) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        started = time.monotonic()
        service = await serve()
        took = time.monotonic() - started
        tg.cancel_scope.cancel()
    assert "eventfn ready" in service.log.text()
    assert ticks >= took / 0.01 / 4, f"the loop ran {ticks} ticks in the {took:.1f} s the start took"
    assert await service.astop() == 0
