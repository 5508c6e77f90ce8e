"""A function as the service runs it: its latest source, the version serving, its limits and mappings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import msgspec

from eventfn import subjects
from eventfn.config import FunctionSettings
from eventfn.errors import HandlerLoadError
from eventfn.invoke.inprocess import InProcessPool
from eventfn.invoke.invocation import Invocation
from eventfn.invoke.registry import FunctionSource
from eventfn.invoke.slots import Slots
from eventfn.invoke.workers import Outcome, Pool


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
    """One function as the service runs it: its latest source, the pool serving it, its mappings."""

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
            triggers=[s for t in settings.trigger_list() for s in t.subjects] if settings else [],
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
        """Run one stored event or batch, waiting for a concurrency slot (its messages wait unacked meanwhile).

        While it waits, `invocation.keepalive` runs every `keepalive_every` seconds: a wait for another
        function's long invocation to free a service-wide slot can outlast this function's ack wait.
        """
        keepalive, every = invocation.keepalive, invocation.keepalive_every
        await _take(self.limiter, keepalive, every)
        try:
            await _take(self.account, keepalive, every)
            try:
                pool = self.pool
                assert pool is not None, "mappings run only while a version is loaded"
                return await pool.invoke(
                    invocation.request_id,
                    invocation.payload,
                    cloud_event=invocation.cloud_event,
                    is_json=invocation.is_json,
                )
            finally:
                self.account.give()
        finally:
            self.limiter.give()

    def try_reserve(self) -> str | None:
        """Take a slot for a sync invoke now, or say why not (Lambda's throttling reasons)."""
        if not self.limiter.try_take():
            return "ReservedFunctionConcurrentInvocationLimitExceeded"
        if not self.account.try_take():
            self.limiter.give()
            return "ConcurrentInvocationLimitExceeded"
        return None

    def release(self) -> None:
        """Give back a slot taken by `try_reserve`."""
        self.account.give()
        self.limiter.give()


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
