"""Worker pools: warm worker processes for one version of one function, reused across invocations.

Each worker is a process (forked by the service's fork server, or a new `python -m eventfn.invoke.runtime`; see
`eventfn.invoke.launch`) that loads the handler once (Lambda's init phase) and then runs one invocation at a time.
A pool hands an invocation to an idle worker, or starts a new one (a cold start) when none is idle; the caller
bounds how many run at once. An idle pool holds `min_warm` workers, none by default (scale to zero). A worker that
times out or dies is killed and dropped; the next invocation gets a fresh one. A retired pool (after a hot reload)
lets its in-flight invocations finish on the old code, then stops its workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from eventfn.errors import HandlerLoadError
from eventfn.invoke import isolation, launch, protocol
from eventfn.invoke.invocation import Execution, Invocation, Outcome, exited, load_failure, out_of_memory, timed_out
from eventfn.invoke.protocol import InitFailed, Invoke, Output, Ready, Result, WorkerSpec
from eventfn.invoke.reports import LogTail, reports

log = logging.getLogger(__name__)

_HEADER_SIZE = protocol.HEADER.size

#: Lambda allows 10 s of init before it gives up on an environment.
INIT_TIMEOUT = 10.0


class WorkerDied(Exception):
    """The worker process exited (crash, os._exit, signal) while it held an invocation."""

    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode
        if returncode is None:
            text = "Runtime exited without providing a reason"
        elif returncode < 0:
            text = f"Runtime exited with error: signal: {signal.Signals(-returncode).name.removeprefix('SIG').lower()}"
        else:
            text = f"Runtime exited with error: exit status {returncode}"
        super().__init__(text)


class _Channel(asyncio.Protocol):
    """The service's side of a worker's frame channel, driven by the event loop: each frame is parsed as its
    bytes arrive, handler output goes to the log on the way, and any other frame completes the waiting call."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buffer = bytearray()
        self.messages: deque[protocol.Message] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        woke = False
        while len(buffer) >= _HEADER_SIZE:
            (size,) = protocol.HEADER.unpack_from(buffer)
            end = _HEADER_SIZE + size
            if len(buffer) < end:
                break
            message: protocol.Message = protocol.decoder.decode(memoryview(buffer)[_HEADER_SIZE:end])
            del buffer[:end]
            if type(message) is Output:
                reports.output(message.data)
                if (tail := self.worker.tail) is not None:
                    tail.output(message.data)
                continue
            self.messages.append(message)
            woke = True
        if woke:
            self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Worker:
    """One warm worker process and its frame channel."""

    def __init__(self, process: launch.WorkerProcess, spec: WorkerSpec) -> None:
        self.process = process
        self.spec = spec
        self._channel = _Channel(self)
        self._reading: asyncio.ReadTransport | None = None
        self._writing: asyncio.WriteTransport | None = None
        self.init_ms: float | None = None
        self.invocations = 0
        #: The worker and what it starts, as `kill` finds them (set by `spawn`).
        self.tree: isolation.ProcessTree | None = None
        #: Where the output of the invocation it runs also goes, when that invocation asked for its log.
        self.tail: LogTail | None = None
        self._killed = False

    @classmethod
    async def spawn(cls, spec: WorkerSpec, env: dict[str, str]) -> Worker:
        """Start a worker and wait for its init phase; raises `HandlerLoadError` if the handler fails to load.

        `env` is the worker's whole environment; the worker confines itself before any handler code runs.
        """
        iso = isolation.current()
        try:
            process = await launch.start(spec, env)
        except OSError as exc:  # the folder vanished, no more processes allowed...
            raise HandlerLoadError(spec.function, spec.entry_file, None, f"cannot start a worker: {exc}") from exc
        worker = cls(process, spec)
        try:
            with anyio.fail_after(INIT_TIMEOUT):
                # Into its cgroup before it is let go: nothing it starts is outside.
                worker.tree = process.tree or await iso.track(process.pid)
                await worker._connect()
                await process.release()
                message = await worker._receive()
        except TimeoutError:
            await worker.kill()
            raise HandlerLoadError(
                spec.function,
                spec.entry_file,
                None,
                f"init did not finish within {INIT_TIMEOUT:.0f} s",
                error_type="Sandbox.Timedout",
            ) from None
        except (WorkerDied, OSError) as exc:
            if not isinstance(exc, WorkerDied):
                exc = WorkerDied(await worker._returncode())
            await worker.kill()
            raise HandlerLoadError(
                spec.function,
                spec.entry_file,
                None,
                f"worker died during init: {exc}",
                error_type="Runtime.ExitError",
                error_message=str(exc),
            ) from exc
        except BaseException:
            await worker.kill()  # cancelled during init: leave no process behind
            raise
        if isinstance(message, InitFailed):
            await worker.kill()
            raise message.load_error(spec.function)
        assert isinstance(message, Ready)
        worker.init_ms = message.init_ms
        worker.tree.hold_namespace()
        return worker

    async def _connect(self) -> None:
        """Attach the channel's descriptors to the event loop (they are the transports' from here on)."""
        loop = asyncio.get_running_loop()
        process = self.process
        self._reading, _ = await loop.connect_read_pipe(
            lambda: self._channel, os.fdopen(process.reader, "rb", buffering=0)
        )
        self._writing, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(process.writer, "wb", buffering=0))

    async def _receive(self) -> protocol.Message:
        """The next frame other than handler output (which goes to the service log on the way)."""
        channel = self._channel
        while not channel.messages:
            if channel.closed:
                raise WorkerDied(await self._returncode())
            channel.waiter = asyncio.get_running_loop().create_future()
            try:
                await channel.waiter
            finally:
                channel.waiter = None
        return channel.messages.popleft()

    async def _returncode(self) -> int | None:
        with anyio.move_on_after(1.0):
            return await self.process.wait()
        return None

    async def invoke(self, invoke: Invoke) -> Result:
        """Send one invocation and wait for its result (the caller applies the timeout)."""
        self.invocations += 1
        writing = self._writing
        if writing is None or writing.is_closing() or self._channel.closed:
            raise WorkerDied(await self._returncode())
        writing.write(protocol.frame(invoke))
        message = await self._receive()
        assert isinstance(message, Result)
        return message

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self._channel.closed

    async def kill(self) -> None:
        """Stop the worker and every process it started, at once; it holds nothing that needs a graceful end.

        Also after the worker died on its own: what it started may still run.
        """
        with anyio.CancelScope(shield=True):
            if self._killed:
                return  # once reaped, its pid may belong to another process
            self._killed = True
            if self.tree is None:  # `spawn` tracks it right after the process started
                self.process.kill()
            else:
                await self.tree.kill(reaped=self.process.returncode is not None)
            for transport in (self._writing, self._reading):
                if transport is not None:
                    transport.close()
            # A descriptor never attached to a transport is still the launcher's to close.
            for transport, fd in ((self._reading, self.process.reader), (self._writing, self.process.writer)):
                if transport is None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            await self.process.aclose()
            if self.tree is not None:
                self.tree.release()


@dataclass
class Pool:
    """Warm workers for one version of one function.

    `start` validates the version with one worker (stopped at once unless `min_warm` keeps it) and starts
    `min_warm` warm workers (Lambda's provisioned concurrency); the pool grows on demand (a cold start per new
    worker; the caller bounds concurrency), and `reap` stops workers idle longer than `idle_timeout` down to
    `min_warm`, to none by default: an idle function holds no process.
    """

    spec: WorkerSpec
    env: dict[str, str]
    version: str
    min_warm: int = 0
    idle_timeout: float = 300.0
    #: Idle workers with the monotonic time they became idle, the longest idle first.
    idle: list[tuple[Worker, float]] = field(default_factory=list)
    busy: int = 0
    retired: bool = False
    #: Idle workers found dead when an invocation looked for one: stopped (what they started too) by `reap`.
    dead: list[Worker] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Workers alive: idle and busy."""
        return len(self.idle) + self.busy

    async def start(self) -> float:
        """Validate the version (its handler loads) and start the warm workers; returns the validating worker's
        Init Duration. Raises `HandlerLoadError`."""
        try:
            first = await Worker.spawn(self.spec, self.env)
            if self.min_warm == 0:
                await first.kill()  # validated: the first invocation gets a cold start, as in Lambda
                return first.init_ms or 0.0
            self.idle.append((first, time.monotonic()))
            for _ in range(self.min_warm - 1):
                self.idle.append((await Worker.spawn(self.spec, self.env), time.monotonic()))
        except BaseException:
            await self.retire()  # the workers already started are not left running in a discarded pool
            raise
        return first.init_ms or 0.0

    def _take_idle(self) -> Worker | None:
        """The most recently idle worker still alive. Those found dead meanwhile (killed from outside, or with
        the fork server they came from) are set aside for `reap` rather than failing an invocation."""
        idle = self.idle
        while idle:
            worker = idle.pop()[0]
            if worker.alive:
                return worker
            self.dead.append(worker)
        return None

    async def reap(self) -> int:
        """Stop workers idle past `idle_timeout`, keeping `min_warm`; returns how many were stopped."""
        dead, self.dead = self.dead, []
        for worker in dead:
            await worker.kill()
        cutoff = time.monotonic() - self.idle_timeout
        stopped = 0
        while self.idle and self.idle[0][1] < cutoff and self.size > self.min_warm:
            worker, _ = self.idle.pop(0)
            await worker.kill()
            stopped += 1
        return stopped

    async def execute(
        self,
        invocation: Invocation,
        on_start: Callable[[Invocation], None] | None = None,
        tail: LogTail | None = None,
    ) -> Execution:
        """Run one invocation with the function's timeout, on a warm worker or a new one.

        `on_start` is called once a worker is held (or failed to start): after a cold start's init output, so
        that the invocation's START line follows it. `tail` also gets the invocation's output (not the init's).
        """
        spec = self.spec
        request_id = invocation.request_id
        begin = time.perf_counter()
        init_ms: float | None = None
        self.busy += 1
        worker: Worker | None = None
        reusable = False  # only a worker that answered this invocation in full may take another
        try:
            worker = self._take_idle()
            if worker is None:
                try:
                    worker = await Worker.spawn(spec, self.env)
                except HandlerLoadError as exc:
                    if on_start is not None:
                        on_start(invocation)
                    return Execution(outcome=load_failure(exc, request_id), duration_ms=_since(begin))
                init_ms = worker.init_ms
            if on_start is not None:
                on_start(invocation)
            worker.tail = tail
            invoke = Invoke.of(invocation, time.time() + spec.timeout)
            result: Result | None = None
            with anyio.move_on_after(spec.timeout):
                try:
                    result = await worker.invoke(invoke)
                except WorkerDied as exc:
                    outcome = exited(request_id, str(exc))
                    return Execution(outcome=outcome, duration_ms=_since(begin), init_ms=init_ms)
            if result is None:
                # The worker may be spinning in C code: only killing it (in `finally`) reclaims the slot.
                outcome = timed_out(request_id, spec.timeout)
                return Execution(outcome=outcome, duration_ms=_since(begin), init_ms=init_ms)
            if result.fatal or result.max_rss_mb > spec.memory:
                # Past the memory setting: the invocation fails and the worker is replaced, as in Lambda.
                payload, oom = out_of_memory(request_id, spec.memory)
                outcome = Outcome(ok=False, payload=payload, error=oom)
            else:
                reusable = True
                error = result.error
                outcome = Outcome(ok=error is None, payload=result.payload, error=error, duration_ms=result.duration_ms)
            return Execution(
                outcome=outcome, duration_ms=result.duration_ms, init_ms=init_ms, max_rss_mb=result.max_rss_mb
            )
        finally:
            self.busy -= 1
            if worker is not None:
                worker.tail = None
                if reusable and not self.retired and worker.alive:
                    self.idle.append((worker, time.monotonic()))
                else:
                    await worker.kill()

    async def retire(self) -> None:
        """Stop taking work: idle workers stop now; busy ones finish their invocation on this version first."""
        self.retired = True
        idle, self.idle = self.idle, []
        for worker in [w for w, _ in idle] + self.dead:
            await worker.kill()
        self.dead = []


def _since(begin: float) -> float:
    return (time.perf_counter() - begin) * 1000
