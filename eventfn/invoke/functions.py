"""A function as the service runs it (its latest source, the version serving, its limits), and the
one invocation path: `Functions.invoke` by name, `Function.invoke` for a function at hand.

Every caller (a sync request over NATS or HTTP, a mapping's event or batch) comes through here, so that the
checks Lambda makes (not found, too large, throttled, failed to load, response too large), the concurrency
slots and the START/END/REPORT lines are written once, for both pool kinds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import msgspec
from msgspec.structs import replace

from eventfn import subjects
from eventfn.config import FunctionSettings
from eventfn.errors import HandlerLoadError
from eventfn.invoke.inprocess import InProcessPool
from eventfn.invoke.invocation import (
    DRY_RUN,
    Invocation,
    Outcome,
    load_failure,
    not_found,
    not_loaded,
    request_too_large,
    response_too_large,
    throttled,
)
from eventfn.invoke.registry import FunctionSource
from eventfn.invoke.reports import LogTail, report_line, reports, start_line
from eventfn.invoke.slots import Slots
from eventfn.invoke.workers import Pool


class FunctionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What `eventfn functions` shows for one function."""

    name: str
    state: str
    version: str
    serving_version: str | None
    description: str
    triggers: list[str]
    invoke_subject: str
    async_subject: str
    timeout: float | None
    memory: int | None
    concurrency: int | None
    isolation: str | None
    workers: int
    init_ms: float | None
    last_error: str | None


def invalid_info(entry: str, reason: str) -> FunctionInfo:
    """What `eventfn functions` shows for a handler file or folder refused for its name (state `Invalid`)."""
    return FunctionInfo(
        name=entry,
        state="Invalid",
        version="",
        serving_version=None,
        description="",
        triggers=[],
        invoke_subject="",
        async_subject="",
        timeout=None,
        memory=None,
        concurrency=None,
        isolation=None,
        workers=0,
        init_ms=None,
        last_error=reason,
    )


class Function:
    """One function as the service runs it: its latest source, the pool serving it, its limits."""

    def __init__(self, source: FunctionSource, account: Slots) -> None:
        self.name = source.name
        self.source = source
        self.pool: Pool | InProcessPool | None = None
        #: The service-wide cap (Lambda's account concurrency), shared by every function.
        self.account = account
        self.settings: FunctionSettings | None = None
        self.last_error: str | None = None
        #: Why the latest version failed to load, with Lambda's error object for invocations meanwhile.
        self.load_error: HandlerLoadError | None = None
        self.init_ms: float | None = None
        #: The function's own cap (Lambda's reserved concurrency).
        self.limiter = Slots(1)

    @property
    def routing_settings(self) -> FunctionSettings | None:
        """The settings its triggers and mappings follow: the serving version's while one serves (a broken
        update must not reroute events to the old code), else the latest readable ones (so events wait for
        a fix in their consumers instead of being missed)."""
        return self.settings if self.pool is not None else self.source.settings

    @property
    def disabled(self) -> bool:
        """Concurrency 0 (Lambda's way to switch a function off)."""
        return self.settings is not None and self.settings.concurrency == 0

    @property
    def state(self) -> str:
        if self.source.version != (self.pool.version if self.pool else None):
            return "Failed" if self.last_error else "Pending"
        return "Inactive" if self.disabled else "Active"

    def activate(
        self, pool: Pool | InProcessPool, settings: FunctionSettings, init_ms: float
    ) -> Pool | InProcessPool | None:
        """Serve new invocations from `pool`, a version loaded with `settings`; returns the pool it replaces (its
        in-flight invocations finish there)."""
        old, self.pool, self.settings = self.pool, pool, settings
        self.last_error, self.load_error, self.init_ms = None, None, init_ms
        self.limiter.total = max(1, settings.concurrency)
        return old

    def failed(self, error: str) -> bool:
        """Record why the latest version cannot load; True if that is news, to be logged.

        A failing function is retried whenever its version changes, and a change to a shared helper module
        changes every single-file function's version: the same error again is not news.
        """
        news = error != self.last_error
        self.last_error = error
        return news

    def info(self) -> FunctionInfo:
        settings = self.settings or self.source.settings
        return FunctionInfo(
            name=self.name,
            state=self.state,
            version=self.source.version,
            serving_version=self.pool.version if self.pool else None,
            description=settings.description if settings else "",
            triggers=[line for t in settings.trigger_list() for line in t.describe()] if settings else [],
            invoke_subject=subjects.INVOKE_PREFIX + self.name,
            async_subject=subjects.ASYNC_PREFIX + self.name,
            timeout=settings.timeout if settings else None,
            memory=settings.memory if settings else None,
            concurrency=settings.concurrency if settings else None,
            isolation=settings.isolation if settings else None,
            workers=self.pool.size if self.pool else 0,
            init_ms=self.init_ms,
            last_error=self.last_error,
        )

    async def invoke(self, invocation: Invocation) -> Outcome:
        """Run one invocation: Lambda's checks, a concurrency slot, the run with its log lines, the result's size.

        An invocation that may wait for a slot (a stored event: its messages wait unacked meanwhile) runs
        `keepalive` every `keepalive_every` seconds while it waits: a wait for another function's long invocation
        to free a service-wide slot can outlast this function's ack wait. One that may not is throttled at once.
        """
        if invocation.dry_run:
            return DRY_RUN
        limit = invocation.max_request_bytes
        if limit is not None and len(invocation.payload) > limit:
            return request_too_large(limit)
        if self.pool is None:  # no version loaded: Lambda's error object for the failure
            if self.load_error is not None:
                return load_failure(self.load_error, invocation.request_id)
            return not_loaded(self.last_error or "function is not loaded")
        if invocation.wait_for_slot:
            keepalive, every = invocation.keepalive, invocation.keepalive_every
            await _take(self.limiter, keepalive, every)
            try:
                await _take(self.account, keepalive, every)
            except BaseException:
                self.limiter.give()
                raise
        elif (reason := self._try_take()) is not None:
            return throttled(reason)
        tail = LogTail() if invocation.log_tail else None
        try:
            # Read after the wait: a reload meanwhile has put the new version in place.
            pool = self.pool
            assert pool is not None, "a loaded version is only ever replaced"
            report = reports.enabled()
            if tail is not None:
                tail.start(invocation.request_id)
            execution = await pool.execute(invocation, self._start if report else None, tail)
        finally:
            self.account.give()
            self.limiter.give()
        outcome = execution.outcome
        if report:
            end = f"END RequestId: {invocation.request_id}"
            reports.add(end, report_line(self.name, pool.spec.memory, invocation.request_id, execution))
        limit = invocation.max_response_bytes
        if limit is not None and len(outcome.payload) > limit:
            outcome = response_too_large(len(outcome.payload), limit, invocation.request_id)
        if tail is not None:
            outcome = replace(outcome, log=tail.finish(invocation.request_id, pool.spec.memory, execution))
        return outcome

    def _start(self, invocation: Invocation) -> None:
        # Called by the pool once it holds a worker: after a cold start's init output, in the one log buffer that
        # the invocation's output joins, so START, the output, END and REPORT are written in that order.
        reports.add(start_line(self.name, invocation.request_id))

    def _try_take(self) -> str | None:
        """Take both slots now, or say why not (Lambda's throttling reasons); concurrency 0 is always throttled."""
        if self.disabled or not self.limiter.try_take():
            return "ReservedFunctionConcurrentInvocationLimitExceeded"
        if not self.account.try_take():
            self.limiter.give()
            return "ConcurrentInvocationLimitExceeded"
        return None


class Functions:
    """The service's functions by name, sharing one account-wide concurrency cap (Lambda's account limit)."""

    def __init__(self, account: Slots) -> None:
        self.account = account
        self.by_name: dict[str, Function] = {}

    def add(self, source: FunctionSource) -> Function:
        """The function of this name, made if it is new."""
        fn = self.by_name.get(source.name)
        if fn is None:
            fn = self.by_name[source.name] = Function(source, self.account)
        return fn

    async def invoke(self, function: str, invocation: Invocation) -> Outcome:
        """Invoke `function` by name: Lambda's 404 if there is none, else `Function.invoke`."""
        fn = self.by_name.get(function)
        if fn is None:
            return not_found(function)
        return await fn.invoke(invocation)


async def _take(slots: Slots, keepalive: Callable[[], Awaitable[None]] | None, every: float) -> None:
    if slots.try_take():
        return
    if keepalive is None:
        await slots.take()
        return
    async with anyio.create_task_group() as tg:

        async def beat() -> None:
            while True:
                await anyio.sleep(every)
                await keepalive()

        tg.start_soon(beat)
        await slots.take()
        tg.cancel_scope.cancel()
