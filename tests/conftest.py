"""Fixtures: a real nats-server per test, `eventfn serve` subprocesses, and a NATS client that publishes
exactly as the nats CLI does (plain publishes, no headers)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from eventfn.invoke.protocol import WorkerSpec
from eventfn.invoke.workers import Pool
from eventfn.testing import PROBE_MODULE, NatsServer, Serve, in_event_loop


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def handlers(tmp_path: Path) -> Path:
    """An empty handler directory with the `_probe` helper handlers use to report back over NATS."""
    path = tmp_path / "handlers"
    path.mkdir()
    (path / "_probe.py").write_text(PROBE_MODULE)
    return path


#: `[recovery]` for a test that waits out a crash: what a SIGKILL left unsettled comes back, and a pin or a lapsed
#: replica moves, in seconds instead of the defaults' ten or more. Still generous on a loaded machine: a live service
#: renews its deliveries and its pin at a third of these, and beats four times within a lapse.
FAST_RECOVERY = "[recovery]\nredelivery_margin = 3\npin_timeout = 3\nheartbeat = 1\nlapse = 4\n"


@pytest.fixture
def serve(tmp_path: Path, nats_server: NatsServer, handlers: Path) -> Iterator[Callable[..., Any]]:
    """Start `eventfn serve` on the test's nats-server and handler directory; stopped at teardown.

    In an async test, `service = await serve(...)`: called where an event loop runs, `serve(...)` returns a
    coroutine that starts the service and waits for it to be ready with the loop running (annotate the fixture
    `Callable[..., Awaitable[Serve]]`). In a sync test, `service = serve(...)` blocks until it is ready
    (`Callable[..., Serve]`). An async test that forgets the `await` gets no `Serve` and a "never awaited" error.
    `config` is the text of its eventfn.toml (`--config`), such as `FAST_RECOVERY`.
    """
    started: list[Serve] = []

    def start(
        *,
        wait_ready: bool = True,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        config: str | None = None,
    ) -> Serve | Awaitable[Serve]:
        if config is not None:
            path = tmp_path / "serve.toml"
            path.write_text(config, encoding="utf-8")
            extra_args = [*(extra_args or []), "--config", str(path)]
        process = Serve(
            handlers,
            nats_server.url,
            tmp_path / "data",
            extra_args=extra_args,
            env={"PROBE_NATS": nats_server.url, **(env or {})},
        )
        started.append(process)
        if in_event_loop():
            return process.astart(wait_ready=wait_ready)
        return process.start(wait_ready=wait_ready)

    yield start
    for process in started:  # teardown runs outside the test's event loop: a blocking stop holds up nothing
        process.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


class Collector:
    """Messages on a subject, with a way to wait (without sleeping) until enough have arrived."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []
        self._changed = anyio.Event()

    async def on_message(self, msg: Msg) -> None:
        self.messages.append(msg)
        self._changed.set()

    @property
    def texts(self) -> list[str]:
        return [m.data.decode() for m in self.messages]

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[str]:
        with anyio.fail_after(timeout):
            while len(self.messages) < count:
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.texts


@pytest.fixture
async def probe(nc: Client) -> Callable[[str], object]:
    """`await probe("subject")` subscribes a Collector to what handlers `report` there."""

    async def subscribe(subject: str) -> Collector:
        collector = Collector()
        await nc.subscribe(subject, cb=collector.on_message)
        await nc.flush()
        return collector

    return subscribe


_T = TypeVar("_T")


async def at_once(*calls: Awaitable[_T]) -> list[_T]:
    """Await `calls` concurrently, each in a task of its own; their results in the order given. For checks that do
    not depend on one another, such as one CLI command per bad input: each is a process start of its own."""
    results: dict[int, _T] = {}

    async def run(index: int, call: Awaitable[_T]) -> None:
        results[index] = await call

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(run, index, call)
    return [results[index] for index in range(len(calls))]


# -- worker pools driven directly (no NATS, no service) -------------------------------------------------------


def spec_for(
    entry: Path, *, timeout: float, attribute: str | None = None, function: str = "fn", memory: int = 128
) -> WorkerSpec:
    return WorkerSpec(
        function=function,
        task_root=str(entry.parent),
        module=entry.stem,
        entry_file=str(entry),
        attribute=attribute,
        memory=memory,
        timeout=timeout,
    )


def write_handler(tmp_path: Path, code: str, name: str = "fn") -> Path:
    """`code` (dedented) as `<name>.py` in `tmp_path`: a handler for a pool driven directly."""
    entry = tmp_path / f"{name}.py"
    entry.write_text(textwrap.dedent(code).lstrip("\n"), encoding="utf-8")
    return entry


@asynccontextmanager
async def running_pool(
    tmp_path: Path,
    code: str,
    *,
    timeout: float = 5.0,
    env: dict[str, str] | None = None,
    memory: int = 128,
    min_warm: int = 1,
) -> AsyncIterator[Pool]:
    """A started pool for `code` with `min_warm` warm workers (one: tests of a warm pool); retired on the way out
    whatever happens."""
    entry = write_handler(tmp_path, code)
    spec = spec_for(entry, timeout=timeout, memory=memory)
    pool = Pool(spec=spec, env={**os.environ, **(env or {})}, version="v1", min_warm=min_warm)
    try:
        await pool.start()
        yield pool
    finally:
        await pool.retire()


#: Every boto3 / botocore client a test module made, closed when the module is done (see `_close_aws_clients`).
_AWS_CLIENTS: list[Any] = []


def _record_aws_clients() -> None:
    import botocore.client

    original = botocore.client.BaseClient.__init__
    if getattr(original, "_eventfn_recorded", False):
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _AWS_CLIENTS.append(self)

    init._eventfn_recorded = True  # type: ignore[attr-defined]
    botocore.client.BaseClient.__init__ = init  # type: ignore[method-assign]


@pytest.fixture(autouse=True, scope="module")
def _close_aws_clients() -> Iterator[None]:
    """A boto3 client keeps a pool of keep-alive sockets in reference cycles: left to the garbage collector, they
    are closed whenever it runs, as a ResourceWarning in whatever test runs then. Closed here, after the module."""
    _record_aws_clients()
    yield
    while _AWS_CLIENTS:
        _AWS_CLIENTS.pop().close()
