"""In-process isolation (`isolation = "inprocess"`): the handler runs inside the service process.

The trade: no process hop per invocation (faster, less memory), for no isolation at all. An `async def`
handler runs on the service's event loop and its timeout cancels it; a plain `def` handler runs in a worker
thread and a timeout fails the invocation but cannot stop the thread. A crash, a blocking call in an async
handler, a memory leak or `os._exit` affects the whole service and every other function. Environment
variables cannot be per-function (the process has one environment), so such a function may not set any.
Use it for trusted, well-behaved, latency-critical handlers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import anyio

from eventfn import runtime
from eventfn.errors import HandlerLoadError
from eventfn.protocol import Invoke, WorkerSpec
from eventfn.reports import reports
from eventfn.workers import Outcome, report_line, timed_out

_versions = itertools.count()


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
        self._threads = ThreadPoolExecutor(thread_name_prefix=f"eventfn-{spec.function}")

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
        try:
            module_spec = importlib.util.spec_from_file_location(name, spec.entry_file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            names = [spec.attribute] if spec.attribute else list(runtime.ENTRY_NAMES)
            entry = next((getattr(module, n) for n in names if callable(getattr(module, n, None))), None)
            if entry is None:
                raise runtime.HandlerNotFound(f"Handler '{' or '.join(names)}' missing on module '{spec.module}'")
        except BaseException as exc:  # any failure in user init code is reported, not raised
            failure = runtime.init_failure(exc, spec)
            raise HandlerLoadError(
                spec.function, failure.file, failure.line, f"{failure.error_type}: {failure.message}"
            ) from None
        self._entry = entry
        self._is_async = runtime.is_coroutine_function(entry)
        return (time.perf_counter() - started) * 1000

    async def reap(self) -> int:
        """Nothing to scale down."""
        return 0

    async def retire(self) -> None:
        """Take no new invocations; running ones finish on this version."""
        self.retired = True
        self._threads.shutdown(wait=False)

    async def invoke(
        self,
        request_id: str,
        payload: bytes,
        *,
        is_json: bool = False,
        client_context: bytes | None = None,
        cloud_event: dict[str, str] | None = None,
    ) -> Outcome:
        """Run one invocation in this process, with the function's timeout."""
        entry = self._entry
        assert entry is not None, "start() first"
        spec = self.spec
        begin = time.perf_counter()
        invoke = Invoke(
            request_id=request_id,
            payload=payload,
            deadline=time.time() + spec.timeout,
            is_json=is_json,
            client_context=client_context,
            cloud_event=cloud_event,
        )
        self.busy += 1
        outcome: Outcome | None = None
        try:
            with anyio.move_on_after(spec.timeout):
                outcome = await self._run(entry, invoke)
        finally:
            self.busy -= 1
        if outcome is None:
            outcome = timed_out(request_id, spec.timeout)
        if reports.enabled():
            duration = (time.perf_counter() - begin) * 1000
            reports.add(f"START RequestId: {request_id} Version: $LATEST Function: {spec.function}")
            reports.add(f"END RequestId: {request_id}")
            reports.add(report_line(spec, request_id, duration, outcome, isolation="inprocess"))
        return outcome

    async def _run(self, entry: Callable[..., Any], invoke: Invoke) -> Outcome:
        request_id = invoke.request_id
        try:
            event = runtime.decode_event(invoke.payload, invoke.is_json)
            context = runtime.LambdaContext(self.spec, self._log_stream, invoke)
            if self._is_async:
                result = await entry(event, context)
            else:
                # A plain thread pool: anyio's to_thread costs several event-loop round trips per call. A
                # timeout abandons the thread's work: it cannot be stopped, only no longer waited for.
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._threads, entry, event, context)
            body, ok = runtime.encode_result(result, request_id)
        except runtime.UnmarshalError as exc:
            body, ok = runtime.unmarshal_error(exc, request_id), False
        except MemoryError:
            body, ok = runtime.out_of_memory(request_id, self.spec.memory), False
        except Exception as exc:  # handler errors become Lambda error objects
            body, ok = runtime.encode_exception(exc, request_id, self.spec.task_root), False
        return Outcome(ok=ok, payload=body, error_type=None if ok else "Unhandled")
