"""Worker pools: warm worker processes for one version of one function, reused across invocations.

Each worker is a process (forked by the service's fork server, or a new `python -m eventfn.invoke.runtime`; see
`eventfn.invoke.launch`) that loads the handler once (Lambda's init phase) and then runs one invocation at a time,
each with its own deadline and Result. An idle pool holds `min_warm` workers, none by default (scale to zero). A
pool places each invocation (the caller bounds how many it hands over at once):

- queued in the pipe of a worker whose handler is quick (`QUICK_MS`), behind its current run, up to
  `pipeline_depth`: it starts as soon as that run ends, with no wake-up of a sleeping process, and frames share
  reads and writes (measured: a third less service CPU per event, half the worker's, at batch size 1);
- else on an idle worker (the most recently used);
- else it waits for whichever comes first: a worker that frees, or a cold start begun for it (`MAX_STARTING` at a
  time). With every worker busy, a spare starts in the background, up to `max_workers`.

One timer per pool (`Pool._expire`) fails a run past its deadline, counted from the run's start. A worker that
times out, dies or runs out of memory is killed; what was queued behind its run never started there and goes to
another worker. A retired pool (after a hot reload) lets its in-flight invocations finish on the old code, then
stops its workers.
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
import msgspec

from eventfn.errors import HandlerLoadError
from eventfn.invoke import isolation, launch, protocol
from eventfn.invoke.invocation import Execution, Invocation, Outcome, exited, load_failure, out_of_memory, timed_out
from eventfn.invoke.protocol import InitFailed, Invoke, Output, Ready, Result, WorkerSpec
from eventfn.invoke.reports import LogTail, reports

log = logging.getLogger(__name__)

_HEADER_SIZE = protocol.HEADER.size

#: Lambda allows 10 s of init before it gives up on an environment.
INIT_TIMEOUT = 10.0
#: Invocations a quick worker may hold at once (see `Pool.pipeline_depth`).
PIPELINE_DEPTH = 4
#: A handler whose runs average less than this (ms) is quick: invocations may queue behind its current run.
QUICK_MS = 2.0
#: With this many workers busy and none idle, a spare one starts in the background.
SPARE_AT = 2
#: Cold starts under way at once per pool (see `Pool._grow`).
MAX_STARTING = 2
#: Seconds an invocation waits for a quick worker's queue before a cold start begins for it (see `Pool._grow`).
GROW_AFTER = 0.01


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


class _Call:
    """One invocation on its way through a pool: waiting for a worker, queued in one's pipe, or running there.

    Its `future` ends with the worker's `Result`, or with what happened instead: `_TIMED_OUT`, `_DIED` (the worker
    exited while running it), `_REQUEUE` (the worker went away before it started: it goes to another one), or the
    `HandlerLoadError` of the cold start it waited for.
    """

    __slots__ = ("deadline", "future", "init_ms", "invocation", "on_start", "tail", "worker")

    def __init__(
        self,
        invocation: Invocation,
        on_start: Callable[[Invocation], None] | None,
        tail: LogTail | None,
        future: asyncio.Future[object],
    ) -> None:
        self.invocation = invocation
        self.on_start = on_start
        self.tail = tail
        self.future = future
        self.worker: Worker | None = None
        #: loop.time() by which it must end (set when it starts).
        self.deadline = 0.0
        #: Set when it waited for the cold start of the worker it runs on: Lambda's Init Duration.
        self.init_ms: float | None = None

    def end(self, value: object) -> None:
        if not self.future.done():
            self.future.set_result(value)


#: What a `_Call` ends with when it did not get a Result (see `_Call`).
_TIMED_OUT = object()
_DIED = object()
_REQUEUE = object()


class _Channel(asyncio.Protocol):
    """The service's side of a worker's frame channel, driven by the event loop: each frame is parsed as its
    bytes arrive; handler output goes to the log (and the running invocation's tail) on the way; a `Result` ends
    the invocation at the head of the worker's queue and starts the next one queued behind it. Other frames
    (`Ready`, `InitFailed`) go to `Worker._receive`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buffer = bytearray()
        self.messages: deque[protocol.Message] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buffer = self.buffer
        buffer += data
        woke = False
        worker = self.worker
        calls = worker.calls
        while len(buffer) >= _HEADER_SIZE:
            (size,) = protocol.HEADER.unpack_from(buffer)
            end = _HEADER_SIZE + size
            if len(buffer) < end:
                break
            try:
                message: protocol.Message = protocol.decoder.decode(memoryview(buffer)[_HEADER_SIZE:end])
            except msgspec.DecodeError as exc:
                # Not the runtime's: handler code wrote to the channel. Nothing after it can be trusted either.
                log.warning(
                    "%s: worker %d wrote an invalid frame (%s): stopped", worker.spec.function, worker.process.pid, exc
                )
                buffer.clear()
                self._lost()
                return
            del buffer[:end]
            kind = type(message)
            if kind is Output:
                assert isinstance(message, Output)
                reports.output(message.data)
                if calls and (tail := calls[0].tail) is not None:
                    tail.output(message.data)
            elif kind is Result and calls:
                assert isinstance(message, Result)
                call = calls.popleft()
                call.end(message)
                if message.fatal:
                    worker.doomed = True  # it ends: what is queued behind goes to another worker
                elif worker.doomed and calls:
                    # A run that ended past its deadline (or was abandoned) while its worker is being killed: the
                    # worker went on to the next one queued. That one started: it dies with the worker, it is not
                    # sent to another one (it would run twice).
                    calls[0].end(_DIED)
                if worker.pool is not None:
                    worker.pool._ended(call, message.duration_ms)
            else:
                self.messages.append(message)
                woke = True
        if woke:
            self._wake()

    def eof_received(self) -> bool | None:
        self._lost()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        worker = self.worker
        calls = worker.calls
        if calls:
            if not worker.doomed:
                calls[0].end(_DIED)  # it was running: the worker's end is its outcome
            for call in calls:
                call.end(_REQUEUE)  # never started here (a call that ended already keeps its outcome)
        worker.doomed = True
        self._wake()

    async def wait(self) -> None:
        """Until the next frame other than output arrives, or the channel ends."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

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
        #: Invocations written to its pipe, in order: the first runs, the others wait behind it.
        self.calls: deque[_Call] = deque()
        #: The pool it works for (its watchdog and queue), once a pool hands it work.
        self.pool: Pool | None = None
        #: It takes no more work (it timed out, ran out of memory or died): it is being replaced.
        self.doomed = False
        #: A moving average of its handler's run time, in ms (None before the first): pipelining needs it small.
        self.typical_ms: float | None = None
        self._unsent: list[bytes] = []
        #: Set by the first `kill`; done once the worker is dead and its channel read to the end.
        self._killed: asyncio.Future[None] | None = None

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
            await channel.wait()
        return channel.messages.popleft()

    async def _returncode(self) -> int | None:
        with anyio.move_on_after(1.0):
            return await self.process.wait()
        return None

    @property
    def tail(self) -> LogTail | None:
        """Where the output of the invocation it runs also goes, when that invocation asked for its log."""
        return self.calls[0].tail if self.calls else None

    def send(self, call: _Call, timeout: float) -> bool:
        """Write `call` to the worker (it runs after those already queued); False if the worker is gone."""
        writing = self._writing
        if writing is None or writing.is_closing() or self._channel.closed or self.doomed:
            return False
        self.invocations += 1
        call.worker = self
        calls = self.calls
        calls.append(call)
        data = protocol.frame(Invoke.of(call.invocation, timeout=timeout))
        if len(calls) == 1:
            writing.write(data)  # it starts at once: no wait
            return True
        # Queued behind a run: frames queued in the same pass of the event loop go out in one write.
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._write_queued)
        self._unsent.append(data)
        return True

    def _write_queued(self) -> None:
        unsent, self._unsent = self._unsent, []
        writing = self._writing
        if writing is not None and not writing.is_closing():
            writing.write(b"".join(unsent))

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self._channel.closed and not self.doomed

    async def kill(self) -> None:
        """Stop the worker and every process it started, at once; it holds nothing that needs a graceful end.

        Also after the worker died on its own: what it started may still run.
        """
        with anyio.CancelScope(shield=True):
            if self._killed is not None:
                # Once reaped, its pid may belong to another process; a second caller waits for the first's kill
                # (what it held is then known to have ended or not started).
                await asyncio.shield(self._killed)
                return
            self._killed = asyncio.get_running_loop().create_future()
            try:
                await self._kill()
            finally:
                self._killed.set_result(None)

    async def _kill(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.tree is None:  # `spawn` tracks it right after the process started
                self.process.kill()
            else:
                await self.tree.kill(reaped=self.process.returncode is not None)
            if self._reading is not None and not self._channel.closed:
                # What it wrote before it died is read first: a Result there says the run queued behind started.
                with anyio.move_on_after(1.0):
                    while not self._channel.closed:
                        await self._channel.wait()
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
    `min_warm` warm workers (Lambda's provisioned concurrency); the pool grows on demand (cold starts in the
    background, see the module's docstring), and `reap` stops workers idle longer than `idle_timeout` down to
    `min_warm`, to none by default: an idle function holds no process.
    """

    spec: WorkerSpec
    env: dict[str, str]
    version: str
    min_warm: int = 0
    idle_timeout: float = 300.0
    #: Idle workers with the monotonic time they became idle, the longest idle first.
    idle: list[tuple[Worker, float]] = field(default_factory=list)
    #: Workers running (or with queued) invocations.
    busy: int = 0
    retired: bool = False
    #: At most this many workers (the function's concurrency), spares included; None: no cap of the pool's own.
    max_workers: int | None = None
    #: Invocations a worker may hold at once (one running, the rest queued in its pipe) while its handler is quick.
    pipeline_depth: int = PIPELINE_DEPTH
    _active: list[Worker] = field(default_factory=list)
    _waiting: deque[_Call] = field(default_factory=deque)
    _starting: int = 0
    _spawns: set[asyncio.Task[None]] = field(default_factory=set)
    #: Runs under way, in deadline order (insertion order: one timeout per pool), for the one timer `_expire`.
    _running: dict[_Call, None] = field(default_factory=dict)
    _alarm: asyncio.TimerHandle | None = None
    _grow_timer: asyncio.TimerHandle | None = None
    _dead: list[Worker] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Workers alive or starting: idle, busy and starting."""
        return len(self.idle) + self.busy + self._starting

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

    async def reap(self) -> int:
        """Stop workers idle past `idle_timeout`, keeping `min_warm`; returns how many were stopped."""
        await self._drop_dead()
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

        `on_start` is called once the invocation starts on a worker (or its cold start failed): after a cold start's
        init output, so that the invocation's START line follows it. `tail` also gets the invocation's output (not
        the init's). With no worker free, it waits for whichever comes first: a warm worker that finishes, or the
        cold start begun for it.
        """
        begin = time.perf_counter()
        loop = asyncio.get_running_loop()
        call = _Call(invocation, on_start, tail, loop.create_future())
        while True:
            if not self._place(call):
                self._waiting.append(call)
                self._grow()
            try:
                value = await call.future
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._abandon(call)
                raise
            if value is not _REQUEUE:
                break
            # The worker it was queued on went away before it started: it goes to another one.
            gone = call.worker
            if gone is not None and call in gone.calls:
                gone.calls.remove(call)
            call.future, call.worker = loop.create_future(), None
        request_id = invocation.request_id
        worker = call.worker
        if isinstance(value, HandlerLoadError):
            if on_start is not None:
                on_start(invocation)
            return Execution(outcome=load_failure(value, request_id), duration_ms=_since(begin))
        assert worker is not None
        try:
            if value is _TIMED_OUT:
                # The worker may be spinning in C code: only killing it (in `finally`) reclaims the slot.
                outcome = timed_out(request_id, self.spec.timeout)
                return Execution(outcome=outcome, duration_ms=_since(begin), init_ms=call.init_ms)
            if value is _DIED:
                outcome = exited(request_id, str(WorkerDied(await worker._returncode())))
                return Execution(outcome=outcome, duration_ms=_since(begin), init_ms=call.init_ms)
            assert isinstance(value, Result)
            if value.fatal or value.max_rss_mb > self.spec.memory:
                # Past the memory setting: the invocation fails and the worker is replaced, as in Lambda.
                payload, oom = out_of_memory(request_id, self.spec.memory)
                outcome = Outcome(ok=False, payload=payload, error=oom)
            else:
                error = value.error
                outcome = Outcome(ok=error is None, payload=value.payload, error=error, duration_ms=value.duration_ms)
            return Execution(
                outcome=outcome, duration_ms=value.duration_ms, init_ms=call.init_ms, max_rss_mb=value.max_rss_mb
            )
        finally:
            if worker.doomed or not worker.alive:
                await self._drop(worker)
            elif self.retired and not worker.calls and not self._holds(worker):
                await worker.kill()  # a retired pool's worker stops once its last invocation ended
            if self._dead:
                await self._drop_dead()

    # -- scheduling ------------------------------------------------------------------------------------------

    def _place(self, call: _Call) -> bool:
        """Hand `call` to a worker now if one can take it: queued behind the run of a worker whose handler is quick
        (no wake-up, and its frames share reads and writes), else on an idle one. False: it must wait."""
        timeout = self.spec.timeout
        if self.pipeline_depth > 1 and self._active:
            now = asyncio.get_running_loop().time()
            best: Worker | None = None
            for worker in self._active:
                calls = worker.calls
                typical = worker.typical_ms
                if (
                    calls
                    and len(calls) < self.pipeline_depth
                    and not worker.doomed
                    and typical is not None
                    and typical < QUICK_MS
                    # Not behind a run that is taking long this time: it may hold the queue for its whole timeout.
                    and (now - calls[0].deadline + timeout) * 1000 < QUICK_MS
                    and (best is None or len(calls) < len(best.calls))
                ):
                    best = worker
            if best is not None and best.send(call, timeout):
                return True
        while self.idle:
            worker, _ = self.idle.pop()  # the most recently used: its pages are warm
            if self._assign(worker, call):
                return True
            self._dead.append(worker)  # it exited while idle: the next `_drop` reaps it
        return False

    def _assign(self, worker: Worker, call: _Call) -> bool:
        """Start `call` on `worker`, which runs nothing (idle, or just started); False if the worker is gone."""
        worker.pool = self
        if not worker.send(call, self.spec.timeout):
            return False
        self._active.append(worker)
        self.busy += 1
        self._started(call)
        if not self.idle and self._starting == 0 and self.busy >= SPARE_AT and not self.retired:
            if self.max_workers is None or self.size < self.max_workers:
                # All workers busy: a spare starts now, so that a rise in demand does not wait for a cold start.
                self._spawn_soon()
        return True

    def _holds(self, worker: Worker) -> bool:
        return worker in self._active or any(w is worker for w, _ in self.idle)

    def _started(self, call: _Call) -> None:
        """`call` starts running on its worker: its deadline counts from now, and its START line is written."""
        loop = asyncio.get_running_loop()
        call.deadline = deadline = loop.time() + self.spec.timeout
        self._running[call] = None
        if self._alarm is None:
            self._alarm = loop.call_at(deadline, self._expire)
        if call.on_start is not None:
            call.on_start(call.invocation)

    def _ended(self, call: _Call, duration_ms: float) -> None:
        """Called by the channel when `call`'s Result arrived (it ended already): the next run queued on its worker
        starts; a worker left with nothing to run takes a waiting invocation, or goes idle; a quick one also takes
        waiting invocations into its queue."""
        self._running.pop(call, None)
        worker = call.worker
        assert worker is not None
        typical = worker.typical_ms
        worker.typical_ms = typical = duration_ms if typical is None else 0.75 * typical + 0.25 * duration_ms
        if worker.doomed:
            return
        waiting = self._waiting
        if worker.calls:
            self._started(worker.calls[0])
        else:
            self._active.remove(worker)
            self.busy -= 1
            if not waiting:
                if not self.retired:
                    self.idle.append((worker, time.monotonic()))
                return
            if not self._assign(worker, waiting[0]):  # its pipe is closing: reaped with the next run's end
                self._dead.append(worker)
                return
            waiting.popleft()
        if typical < QUICK_MS:
            timeout = self.spec.timeout
            while waiting and len(worker.calls) < self.pipeline_depth and worker.send(waiting[0], timeout):
                waiting.popleft()

    def _expire(self) -> None:
        """The pool's one deadline timer: fail every run past its deadline, then wait for the next deadline.

        Runs start in deadline order (one timeout per pool), so the oldest is first: the timer is re-armed for it.
        """
        self._alarm = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        running = self._running
        while running:
            call = next(iter(running))
            if call.deadline > now:
                self._alarm = loop.call_at(call.deadline, self._expire)
                return
            del running[call]
            assert call.worker is not None
            call.worker.doomed = True  # what is queued behind it goes to another worker
            call.end(_TIMED_OUT)

    def _grow(self) -> None:
        """Start a cold start for each waiting invocation that none is under way for, `MAX_STARTING` at a time: a
        burst must not start a dozen interpreters at once on a small machine (each takes a core for ~100 ms, and
        every warm worker and the service wait meanwhile); the waiting take warm workers as they free.

        While every busy worker is quick, the waiting are let `GROW_AFTER` seconds to be taken into their queues
        first: a cold start then only begins for demand that the warm workers do not absorb."""
        if self._active and all(w.typical_ms is not None and w.typical_ms < QUICK_MS for w in self._active):
            if self._grow_timer is None:
                self._grow_timer = asyncio.get_running_loop().call_later(GROW_AFTER, self._grow_now)
            return
        self._grow_now()

    def _grow_now(self) -> None:
        self._grow_timer = None
        for _ in range(min(len(self._waiting), MAX_STARTING) - self._starting):
            self._spawn_soon()

    def _spawn_soon(self) -> None:
        self._starting += 1
        task = asyncio.get_running_loop().create_task(self._spawn())
        # The pool holds its start-ups (until each ends): `retire` waits for them.
        self._spawns.add(task)
        task.add_done_callback(self._spawns.discard)

    async def _spawn(self) -> None:
        """A cold start in the background: the worker goes to the first invocation waiting, else to the idle ones."""
        try:
            worker = await Worker.spawn(self.spec, self.env)
        except HandlerLoadError as exc:
            self._starting -= 1
            if self._waiting:
                self._waiting.popleft().end(exc)  # as before: the invocation that waited for it reports it
                if self._waiting:
                    self._grow()  # the others waiting get cold starts of their own (nothing else may start one)
            else:
                log.warning("%s: a spare worker failed to start: %s", self.spec.function, exc)
            return
        except BaseException:
            self._starting -= 1
            raise
        self._starting -= 1
        if self._waiting:
            call = self._waiting.popleft()
            call.init_ms = worker.init_ms
            if not self._assign(worker, call):  # it died at once
                call.init_ms = None
                self._waiting.appendleft(call)
                self._grow()
                await worker.kill()
                return
            self._grow()  # demand outlasted this cold start: the next one begins
            return
        if self.retired:
            await worker.kill()
        else:
            worker.pool = self
            self.idle.append((worker, time.monotonic()))

    async def _drop(self, worker: Worker) -> None:
        """Kill a worker that timed out, died or ran out of memory; what was queued behind its run goes elsewhere."""
        worker.doomed = True
        if worker in self._active:
            self._active.remove(worker)
            self.busy -= 1
        for call in worker.calls:
            self._running.pop(call, None)
        # Killed first: until it is dead, a run queued in its pipe may still start there (`_Channel` ends that one).
        await worker.kill()
        calls, worker.calls = list(worker.calls), deque()
        for call in calls:
            if call.worker is worker:
                call.end(_REQUEUE)

    async def _drop_dead(self) -> None:
        """Reap the workers found dead while idle."""
        dead, self._dead = self._dead, []
        for worker in dead:
            await worker.kill()

    async def _abandon(self, call: _Call) -> None:
        """The caller of `call` was cancelled: take it back, or stop the worker that runs it (as before)."""
        if call in self._waiting:
            self._waiting.remove(call)
            return
        worker = call.worker
        if worker is not None and worker.calls and worker.calls[0] is call:
            self._running.pop(call, None)
            await self._drop(worker)
        elif worker is not None and call in worker.calls:
            # Queued behind another run: it cannot be taken out of the pipe; it runs and its result is dropped. Should
            # that run end its worker (a timeout, a crash), no caller is left to replace the worker: the pool does.
            # (A new future: the caller's was cancelled with it.)
            call.future = asyncio.get_running_loop().create_future()
            call.future.add_done_callback(lambda _: self._after_abandoned(worker))

    def _after_abandoned(self, worker: Worker) -> None:
        if worker.doomed or not worker.alive:
            task = asyncio.get_running_loop().create_task(self._drop(worker))
            self._spawns.add(task)  # held until it ends (`retire` waits for it)
            task.add_done_callback(self._spawns.discard)

    async def retire(self) -> None:
        """Stop taking work: idle workers stop now; busy ones finish their invocations on this version first (as do
        cold starts under way for invocations waiting)."""
        self.retired = True
        idle, self.idle = self.idle, []
        for worker, _ in idle:
            await worker.kill()
        await self._drop_dead()
        if not self._waiting and self._grow_timer is not None:
            self._grow_timer.cancel()
            self._grow_timer = None
        if not self._waiting and self._spawns:
            # Spares nobody waits for: each stops its worker once started (not cancelled: a start-up cancelled
            # between the fork and its return would leave the process behind).
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*self._spawns, return_exceptions=True)


def _since(begin: float) -> float:
    return (time.perf_counter() - begin) * 1000
