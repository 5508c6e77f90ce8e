"""In-process isolation (`isolation = "inprocess"`): the handler runs inside the service process.

The trade: no process hop per invocation (faster, less memory), for no isolation at all. An `async def`
handler runs on the service's event loop and its timeout cancels it; a plain `def` handler runs in a worker
thread and a timeout fails the invocation but cannot stop the thread. A crash, a blocking call in an async
handler, a memory leak or `os._exit` affects the whole service and every other function. Environment
variables cannot be per-function (the process has one environment), so such a function may not set any.
Use it for trusted, well-behaved, latency-critical handlers.

Handler output is tagged and capped per invocation as a worker's is: once an in-process function is loaded,
the service's sys.stdout and sys.stderr route what an invocation (or an init) writes, found by a context
variable, to its `HandlerOutput`; logging records it emits count against the same budget. Writes from threads
the handler starts itself, and C code writing to fd 1 or 2, are not attributed and go to the service's streams.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import io
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from eventfn.invoke import handler as runtime
from eventfn.invoke.invocation import Execution, Invocation, LambdaError, Outcome, out_of_memory, timed_out
from eventfn.invoke.output import HandlerOutput
from eventfn.invoke.protocol import Invoke, WorkerSpec
from eventfn.invoke.reports import LogTail, reports

_versions = itertools.count()


class _Invocation:
    """The invocation (or init) that code running in this context belongs to; its output budget is made on
    its first write, so that a silent invocation costs nothing."""

    __slots__ = ("_output", "request_id", "spec", "tail")

    def __init__(self, spec: WorkerSpec, request_id: str, tail: LogTail | None = None) -> None:
        self.spec = spec
        self.request_id = request_id
        #: Where its output also goes, when the invocation asked for its log.
        self.tail = tail
        self._output: HandlerOutput | None = None

    def output(self) -> HandlerOutput:
        with _creating:
            if self._output is None:
                send = reports.output if self.tail is None else self._send_both
                self._output = HandlerOutput(self.spec.function, self.spec.max_log_bytes, send)
                self._output.begin(self.request_id)
        return self._output

    def _send_both(self, data: bytes) -> None:
        reports.output(data)
        assert self.tail is not None
        self.tail.output(data)

    def end(self) -> None:
        if self._output is not None:
            self._output.end()


_current: contextvars.ContextVar[_Invocation | None] = contextvars.ContextVar("eventfn_invocation", default=None)
_creating = threading.Lock()


class _Router(io.TextIOBase):
    """The service's sys.stdout or sys.stderr while in-process functions are loaded: what an invocation writes
    goes to its output budget; everything else to the original stream."""

    def __init__(self, original: TextIO) -> None:
        self.original = original

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        invocation = _current.get()
        if invocation is None:
            return self.original.write(text)
        invocation.output().write(text)
        return len(text)

    def flush(self) -> None:
        invocation = _current.get()
        if invocation is not None:
            invocation.output().flush()
        self.original.flush()

    def fileno(self) -> int:
        return self.original.fileno()

    def isatty(self) -> bool:
        return self.original.isatty()


class _CountRecords(logging.Filter):
    """On the service's log handlers: a record an in-process invocation logs counts against its output budget
    (dropped past it), and the report log is written first, so the record follows its START line."""

    def filter(self, record: logging.LogRecord) -> bool:
        invocation = _current.get()
        if invocation is None or record.name == "eventfn" or record.name.startswith("eventfn."):
            return True
        admitted = getattr(record, "eventfn_admitted", None)
        if admitted is None:  # once per record, however many handlers it passes
            admitted = invocation.output().admit(len(record.getMessage()) + 1)
            record.eventfn_admitted = admitted
        if admitted:
            reports.flush()
        return bool(admitted)


def _route_output() -> None:
    """Install the routing streams and the record filter, once per process."""
    if isinstance(sys.stdout, _Router):
        return
    if reports.stream is None:
        reports.stream = sys.stderr  # the report log keeps writing to the service's own stream
    sys.stdout = _Router(sys.stdout)
    sys.stderr = _Router(sys.stderr)
    records = _CountRecords()
    for handler in logging.getLogger().handlers:
        handler.addFilter(records)


class InProcessPool:
    """One loaded version of a function, invoked in the service process (the `Pool` interface)."""

    def __init__(self, spec: WorkerSpec, version: str) -> None:
        self.spec = spec
        self.version = version
        self.busy = 0
        self.retired = False
        self._entry: Callable[..., Any] | None = None
        self._is_async = False
        self._log_stream = f"{datetime.now(UTC):%Y/%m/%d}/[$LATEST]inprocess{os.getpid():08x}"
        self._deadlines = _Deadlines(spec.timeout)
        self._threads = _Threads(f"eventfn-{spec.function}", self._deadlines)

    @property
    def size(self) -> int:
        """Invocations running now (there are no workers to count)."""
        return self.busy

    async def start(self) -> float:
        """Import the handler module under a name of its own (versions never share module state)."""
        spec = self.spec
        started = time.perf_counter()
        if spec.task_root not in sys.path:
            sys.path.insert(0, spec.task_root)
        name = f"_eventfn_inprocess_{spec.function.replace('-', '_')}_{next(_versions)}"
        _route_output()
        init = _Invocation(spec, "-")
        token = _current.set(init)
        try:
            module_spec = importlib.util.spec_from_file_location(name, spec.entry_file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            # As in workers (`python -B`): no .pyc in the handler directory, which a later edit of the same size
            # within the same second would not invalidate.
            writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
            try:
                module_spec.loader.exec_module(module)
            finally:
                sys.dont_write_bytecode = writes_bytecode
            entry = runtime.entry_point(module, spec)
        except BaseException as exc:  # any failure in user init code is reported, not raised
            raise runtime.init_failure(exc, spec).load_error(spec.function) from None
        finally:
            _current.reset(token)
            init.end()
        self._entry = entry
        self._is_async = runtime.is_coroutine_function(entry)
        return (time.perf_counter() - started) * 1000

    async def reap(self) -> int:
        """Nothing to scale down."""
        return 0

    async def retire(self) -> None:
        """Take no new invocations; running ones finish on this version."""
        self.retired = True
        self._threads.close()

    async def execute(
        self,
        invocation: Invocation,
        on_start: Callable[[Invocation], None] | None = None,
        tail: LogTail | None = None,
    ) -> Execution:
        """Run one invocation in this process, with the function's timeout; `on_start` is called first. `tail` also
        gets what it writes (logging records excepted: they go to the service's log handlers directly)."""
        entry = self._entry
        assert entry is not None, "start() first"
        spec = self.spec
        request_id = invocation.request_id
        begin = time.perf_counter()
        invoke = Invoke.of(invocation, time.time() + spec.timeout)
        if on_start is not None:
            on_start(invocation)
        self.busy += 1
        outcome: Outcome | None = None
        output = _Invocation(spec, request_id, tail)
        token = _current.set(output)
        try:
            if self._is_async:
                # The pool's watchdog cancels the handler at its deadline (anyio's scope per invocation cost ~8 us,
                # py-spy), and only that cancellation becomes a timeout: an outer one still propagates.
                task = asyncio.current_task()
                assert task is not None
                cancelling = task.cancelling()
                watch = self._deadlines.watch(task.cancel)
                try:
                    outcome = await self._run(entry, invoke)
                except asyncio.CancelledError:
                    if not watch.expired or task.uncancel() > cancelling:
                        raise
                    outcome = None
                finally:
                    self._deadlines.finish(watch)
            else:
                # A thread cannot be cancelled: the wait for it ends at the deadline instead (`_Threads.call`).
                try:
                    outcome = await self._run(entry, invoke)
                except _TimedOut:
                    outcome = None
        finally:
            _current.reset(token)
            self.busy -= 1
            output.end()
        if outcome is None:
            outcome = timed_out(request_id, spec.timeout)
        return Execution(outcome=outcome, duration_ms=(time.perf_counter() - begin) * 1000, isolation="inprocess")

    async def _run(self, entry: Callable[..., Any], invoke: Invoke) -> Outcome:
        request_id = invoke.request_id
        error: LambdaError | None
        try:
            event = runtime.decode_event(invoke.payload, invoke.is_json)
            context = runtime.LambdaContext(self.spec, self._log_stream, invoke)
            if self._is_async:
                result = await entry(event, context)
            else:
                # Threads of its own (`_Threads`): anyio's to_thread costs several event-loop round trips per call. A
                # timeout abandons the thread's work: it cannot be stopped, only no longer waited for.
                # The thread runs in a copy of this context, so that its output is found to be this invocation's.
                run = contextvars.copy_context().run
                result = await self._threads.call(run, entry, event, context)
            body, error = runtime.encode_result(result, request_id)
        except runtime.UnmarshalError as exc:
            body, error = runtime.unmarshal_error(exc, request_id)
        except MemoryError:
            body, error = out_of_memory(request_id, self.spec.memory)
        except Exception as exc:  # handler errors become Lambda error objects
            body, error = runtime.encode_exception(exc, request_id)
        if error is not None and (current := _current.get()) is not None:
            current.output().write(runtime.error_log(error), stamp=False)
        return Outcome(ok=error is None, payload=body, error=error)


class _TimedOut(BaseException):
    """The wait for a handler's thread reached the function's timeout (a BaseException: the handler's own
    exceptions are `Exception`s, and this must not be taken for one of them)."""


class _Watch:
    """One running invocation's deadline (`_Deadlines`): what to call when it passes, and whether it did."""

    __slots__ = ("arg", "deadline", "done", "expire", "expired")

    def __init__(self, deadline: float, expire: Callable[[Any], object], arg: Any) -> None:
        self.deadline = deadline
        self.expire = expire
        self.arg = arg
        self.done = False
        self.expired = False


class _Deadlines:
    """The deadlines of a pool's running invocations, watched by one timer of the loop.

    Every invocation of a pool has the function's timeout, so deadlines come due in the order invocations began:
    a queue in that order, and one timer set for its head, replace a timer (and a cancel scope) per invocation.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._watches: deque[_Watch] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, expire: Callable[[Any], object], arg: Any = None) -> _Watch:
        """Call `expire(arg)` when the timeout has passed, unless `finish` came first."""
        loop = asyncio.get_running_loop()
        watch = _Watch(loop.time() + self.timeout, expire, arg)
        self._watches.append(watch)
        if self._timer is None:
            self._timer = loop.call_at(watch.deadline, self._fire)
        return watch

    def finish(self, watch: _Watch) -> None:
        """The invocation ended: its deadline no longer matters."""
        watch.done = True
        watches = self._watches
        while watches and watches[0].done:
            watches.popleft()

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        watches = self._watches
        now = loop.time()
        while watches and (watches[0].done or watches[0].deadline <= now):
            watch = watches.popleft()
            if not watch.done:
                watch.done = watch.expired = True
                watch.expire(watch.arg)
        if watches:
            self._timer = loop.call_at(watches[0].deadline, self._fire)


class _Call:
    """One handler call handed to a thread: what to run, the loop future waiting for it, and its deadline."""

    __slots__ = ("args", "fn", "waiter", "watch")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], waiter: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.args = args
        self.waiter = waiter
        self.watch: _Watch | None = None


class _Threads:
    """The threads that run an in-process pool's plain `def` handlers, at most `limit` at once.

    What `loop.run_in_executor` on a thread pool did, at less cost per call: a call is one `_Call` and one loop
    future with a timer (no concurrent future chained both ways), and results reach the loop in bunches: a thread
    that finishes a call wakes the loop only if no other result is waiting for it, so the calls that end within
    one loop pass cost one wake-up (a write to the loop's self-pipe and a pass), not one each. And a call made
    while a thread is awake is left to the awake threads as long as they finish calls: only when none has
    finished one for `SPARE_AFTER` seconds (they block: sleep, I/O, a long computation) are more threads woken for
    the calls waiting. Each thread more contends for the GIL with the loop (several times the CPU per call with
    10 threads than with one or two, measured), and quick handlers are all run by a few. The threads are daemons:
    a handler that never returns does not hold the service's exit.
    """

    #: Seconds without a finished call after which waiting calls get threads of their own.
    SPARE_AFTER = 0.0005

    def __init__(self, name: str, deadlines: _Deadlines, limit: int = min(32, (os.cpu_count() or 1) + 4)) -> None:
        self._name = name
        self._deadlines = deadlines
        self._limit = limit
        self._calls: deque[_Call] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._idle = 0  # threads waiting for a call that no submitter has woken yet
        self._count = 0
        self._check_due = False
        self._finished = 0  # calls finished, ever (read by `_check` to see progress)
        self._finished_seen = 0
        self._closed = False
        self._results: list[tuple[_Call, Any, BaseException | None]] = []
        self._results_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """`fn(*args)` in a thread, as a future of this loop that fails with `_TimedOut` once the function's timeout
        has passed (`_Deadlines`). A thread that outlives the timeout is abandoned: its result is dropped."""
        loop = self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        call = _Call(fn, args, waiter)
        check = False
        with self._ready:
            if self._closed:
                raise RuntimeError("this version no longer takes invocations")
            self._calls.append(call)
            if self._count == self._idle:  # no thread awake: wake one now
                self._wake(1)
            elif not self._check_due:
                self._check_due = check = True
                self._finished_seen = self._finished
        if check:
            loop.call_later(self.SPARE_AFTER, self._check)
        call.watch = self._deadlines.watch(_expire, waiter)
        return waiter

    def _check(self) -> None:
        """On the loop: if calls are waiting and no awake thread has finished one since the last look, wake threads
        for them; if the awake threads are making progress, look again later."""
        with self._ready:
            if self._closed or not self._calls:
                self._check_due = False
                return
            finished = self._finished
            if finished == self._finished_seen:
                self._check_due = False
                self._wake(len(self._calls))
                return
            self._finished_seen = finished
        asyncio.get_running_loop().call_later(self.SPARE_AFTER, self._check)

    def _wake(self, wanted: int) -> None:
        """Wake (or start) up to `wanted` threads; the caller holds `_ready`."""
        while wanted > 0 and self._idle:
            self._idle -= 1
            self._ready.notify()
            wanted -= 1
        while wanted > 0 and self._count < self._limit:
            self._count += 1
            threading.Thread(target=self._work, name=f"{self._name}_{self._count}", daemon=True).start()
            wanted -= 1

    def close(self) -> None:
        """Take no more calls; threads end once the calls already taken are done."""
        with self._ready:
            self._closed = True
            self._idle = 0
            self._ready.notify_all()

    def _work(self) -> None:
        ready, calls = self._ready, self._calls
        while True:
            with ready:
                while not calls:
                    if self._closed:
                        self._count -= 1
                        return
                    self._idle += 1
                    ready.wait()  # whoever woke it took it off the idle count
                call = calls.popleft()
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.fn(*call.args)
            except BaseException as exc:  # handed to the waiting invocation, as a thread pool's future would
                error = exc
            with self._results_lock:
                self._results.append((call, result, error))
                first = len(self._results) == 1
                self._finished += 1
            if first and (loop := self._loop) is not None:
                try:
                    loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop has closed: nobody waits any more
                    pass

    def _deliver(self) -> None:
        """On the loop: hand every result waiting to its invocation."""
        with self._results_lock:
            results, self._results = self._results, []
        for call, result, error in results:
            if call.watch is not None:
                self._deadlines.finish(call.watch)
            waiter = call.waiter
            if waiter.done():  # timed out, or the invocation was cancelled
                continue
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_TimedOut())
