"""`eventfn serve`: one root task group holding the broker, the functions, their mappings and the APIs.

Start-up: NATS (embedded or remote) -> streams -> functions discovered and loaded -> consumers and feeds ->
sync-invoke and control subscriptions -> the handler watcher. A reload re-discovers the handler directory
and applies the difference; a shutdown stops intake first, lets in-flight invocations settle, then stops
workers, the connection and the embedded server, in that order.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from eventfn import isolation, mappings, registry, subjects
from eventfn.api import Api
from eventfn.bus import Bus, connect
from eventfn.config import Destinations, FunctionSettings, RetryPolicy, ServiceConfig
from eventfn.dispatch import Dispatcher
from eventfn.errors import ConfigError, EventfnError, HandlerLoadError
from eventfn.functions import Function, Running
from eventfn.inprocess import InProcessPool
from eventfn.natsserver import embedded_server
from eventfn.protocol import WorkerSpec
from eventfn.registry import FunctionSource
from eventfn.reports import reports
from eventfn.slots import Slots
from eventfn.workers import Pool

log = logging.getLogger(__name__)

EVENTS_STREAM = subjects.EVENTS_STREAM
DLQ_STREAM = subjects.DLQ_STREAM
#: Function loads at once during start-up (each is a process starting and importing user code).
LOAD_PARALLELISM = 4


class Service:
    """The running service: owns functions, mappings and the request handlers."""

    def __init__(self, config: ServiceConfig, bus: Bus, tg: anyio.abc.TaskGroup) -> None:
        self.config = config
        self.bus = bus
        self.tg = tg
        self.handlers_dir = Path(config.handlers)
        self.functions: dict[str, Function] = {}
        self.account = Slots(config.max_concurrency)
        self._reload_lock = anyio.Lock()
        self.api = Api(self)
        self._stream_subjects: list[str] = []
        #: Consumer name -> the mapping last provisioned for it, to skip unchanged ones.
        self.provisioned: dict[str, mappings.Planned] = {}

    # -- functions ----------------------------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-discover the handler directory and apply what changed. Safe to call at any time."""
        async with self._reload_lock:
            sources = registry.discover(self.handlers_dir, self.config.functions)
            for name in [n for n in self.functions if n not in sources]:
                await self._remove(self.functions.pop(name))
            changed = [
                s
                for s in sources.values()
                if s.name not in self.functions or self.functions[s.name].source.version != s.version
            ]
            limiter = anyio.CapacityLimiter(LOAD_PARALLELISM)
            async with anyio.create_task_group() as tg:
                for source in changed:
                    tg.start_soon(self._load, source, limiter)
            await self._provision()

    async def _load(self, source: FunctionSource, limiter: anyio.CapacityLimiter) -> None:
        fn = self.functions.setdefault(source.name, Function(source, self.account))
        fn.source = source
        if source.error or source.settings is None:
            fn.last_error = source.error or "settings could not be read"
            log.error("function %s: %s%s", source.name, fn.last_error, _keeps_serving(fn))
            return
        settings = source.settings
        spec = WorkerSpec(
            function=source.name,
            task_root=source.task_root,
            module=source.module,
            entry_file=source.entry_file,
            attribute=source.attribute,
            memory=settings.memory,
            timeout=settings.timeout,
        )
        pool: Pool | InProcessPool
        if settings.isolation == "inprocess":
            pool = InProcessPool(spec, source.version)
        else:
            pool = Pool(
                spec=spec,
                env=self._environment(source, settings),
                version=source.version,
                min_warm=settings.min_warm,
                idle_timeout=settings.idle_timeout,
            )
        async with limiter:
            try:
                init_ms = await pool.start()
            except HandlerLoadError as exc:
                fn.last_error = str(exc)
                log.error("%s%s", exc, _keeps_serving(fn))
                return
        old, fn.pool, fn.settings = fn.pool, pool, settings
        fn.last_error, fn.init_ms = None, init_ms
        fn.limiter.total = max(1, settings.concurrency)
        log.info(
            "function %s %s (version %s, init %.1f ms)",
            source.name,
            "reloaded" if old else "loaded",
            source.version,
            init_ms,
        )
        if old is not None:
            # In-flight invocations finish on the old code; new ones already go to the new pool.
            self.tg.start_soon(old.retire)

    def _environment(self, source: FunctionSource, settings: FunctionSettings) -> dict[str, str]:
        """A worker's whole environment: basics and passthrough, Lambda's variables, the function's own.

        Nothing else of the service's environment (its NATS credentials, anyone's secrets) reaches a handler.
        """
        env = dict(isolation.current().environment)
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": source.name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(settings.memory),
                "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(settings.timeout)),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{source.name}",
                "AWS_EXECUTION_ENV": f"eventfn_python{sys.version_info.major}.{sys.version_info.minor}",
                "LAMBDA_TASK_ROOT": source.task_root,
                "_HANDLER": f"{source.module}.{source.attribute or 'handler'}",
            }
        )
        env.update(settings.environment)
        return env

    async def _remove(self, fn: Function) -> None:
        log.info("function %s removed", fn.name)
        await self._stop_mappings(fn, list(fn.mappings))
        if fn.pool is not None:
            self.tg.start_soon(fn.pool.retire)

    # -- streams, consumers, dispatchers ------------------------------------------------------------------

    async def _provision(self) -> None:
        """Bring the events stream, the durable consumers and the running dispatchers in line with the functions.

        Consumers exist for every function whose settings are valid, even while its code fails to load, so
        events arriving meanwhile wait for the fix instead of being missed. Dispatchers run only for functions
        with a loaded version and a concurrency above 0.
        """
        triggers = [
            s
            for fn in self.functions.values()
            if (st := fn.routing_settings)
            for t in st.trigger_list()
            for s in t.subjects
        ]
        base = [*self.config.stream.subjects, subjects.ASYNC_PREFIX + ">", subjects.REDRIVE_PREFIX + ">"]
        stream_subjects, problems = subjects.stream_subjects(base, triggers)
        for problem in problems.values():
            log.error("%s", problem)
        if stream_subjects != self._stream_subjects:
            await self.bus.ensure_stream(
                EVENTS_STREAM,
                stream_subjects,
                max_age=self.config.stream.max_age,
                max_bytes=self.config.stream.max_bytes,
            )
            self._stream_subjects = stream_subjects
        for fn in self.functions.values():
            wanted = {
                name: planned
                for name, planned in mappings.plan(fn.name, fn.routing_settings).items()
                if not any(s in problems for s in planned.trigger.subjects)
            }
            loaded = fn.pool is not None and fn.settings is not None
            # Concurrency 0 (Lambda's "disabled"): trigger events wait in JetStream; async invokes go straight
            # to the DLQ, as Lambda sends them to the dead-letter queue without retries.
            runnable = {n for n, p in wanted.items() if loaded and (not fn.disabled or p.trigger.name == "async")}
            await self._stop_mappings(
                fn, [n for n, r in fn.mappings.items() if n not in runnable or wanted.get(n) != r.planned]
            )
            for name, planned in wanted.items():
                if self.provisioned.get(name) != planned:
                    await mappings.provision(self.bus, EVENTS_STREAM, planned)
                    self.provisioned[name] = planned
                if name in runnable and name not in fn.mappings:
                    await self._start_mapping(fn, planned)

    async def _start_mapping(self, fn: Function, planned: mappings.Planned) -> None:
        mapping = planned.mapping()
        if fn.disabled:
            mapping = msgspec.structs.replace(mapping, reject="Throttled", concurrency=1)
        feed = self.bus.pull_feed(EVENTS_STREAM, planned.consumer, max_inflight=mapping.max_inflight)
        settings = fn.settings
        assert settings is not None

        def policy() -> tuple[RetryPolicy, Destinations]:
            current = fn.settings or settings
            return current.retry, current.destinations

        dispatcher = Dispatcher(self.bus, mapping, feed, invoke=fn.invoke, policy=policy)
        running = Running(dispatcher, planned)
        fn.mappings[planned.consumer] = running

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                await dispatcher.run(task_status=task_status)
            finally:
                running.done.set()

        await self.tg.start(run)

    async def _stop_mappings(self, fn: Function, names: list[str]) -> None:
        stopping = [fn.mappings.pop(name) for name in names]
        for running in stopping:
            running.dispatcher.stop()
        for running in stopping:
            await running.done.wait()

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def reap_idle_workers(self, interval: float = 1.0) -> None:
        """Scale pools down: stop workers idle past their function's `idle_timeout` (down to `min_warm`)."""
        while True:
            await anyio.sleep(interval)
            for fn in list(self.functions.values()):
                if fn.pool is not None and (stopped := await fn.pool.reap()):
                    log.info("function %s scaled down by %d idle worker(s) to %d", fn.name, stopped, fn.pool.size)

    async def watch(
        self, stop: anyio.Event, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply handler directory changes as they settle (hot reload), until `stop` is set.

        `started()` is signalled just before the first step of the watch generator, which installs the
        file-system watch before its first await, so once the starter resumes no change can be missed.
        """
        task_status.started()
        async for _ in registry.watch(self.handlers_dir, stop):
            try:
                await self.reload()
            except EventfnError as exc:
                log.error("reload failed: %s", exc)
            except Exception:
                # NATS unreachable mid-reload, a folder removed under us...: keep serving what is loaded.
                log.exception("reload failed; the functions loaded before keep serving")

    async def shutdown(self) -> None:
        """Stop intake, let in-flight invocations settle (bounded by their timeouts), stop workers."""
        self.api.stop()
        async with self._reload_lock:  # a reload under way finishes first; none starts after
            functions = list(self.functions.values())
            running = [r for fn in functions for r in fn.mappings.values()]
            for fn in functions:
                fn.mappings.clear()
            for r in running:  # every feed stops pulling before any wait
                r.dispatcher.stop()
            longest = max((fn.settings.timeout for fn in functions if fn.settings), default=0.0)
            with anyio.move_on_after(longest + self.config.shutdown_grace) as scope:
                for r in running:
                    await r.done.wait()
                log.debug("mappings stopped")
                await self.api.done.wait()
                log.debug("requests settled")
            if scope.cancelled_caught:
                log.warning("in-flight invocations did not finish in time; their events will be redelivered")
            for fn in functions:
                if fn.pool is not None:
                    await fn.pool.retire()
        # Whatever still runs past the deadline is cancelled (its worker killed); its events are redelivered.
        self.tg.cancel_scope.cancel()


def _keeps_serving(fn: Function) -> str:
    return f"; version {fn.pool.version} keeps serving" if fn.pool else ""


@asynccontextmanager
async def _nats_url(config: ServiceConfig) -> AsyncIterator[tuple[list[str], bool]]:
    if config.nats.url:
        yield list(config.nats.url), False
        return
    async with embedded_server(Path(config.data_dir), config.nats.port) as url:
        yield [url], True


async def serve(config: ServiceConfig, *, ready: anyio.Event | None = None) -> None:
    """Run the service until SIGTERM or SIGINT."""
    data_dir = Path(config.data_dir)
    handlers = Path(config.handlers)
    if not handlers.is_dir():
        raise ConfigError(
            str(handlers),
            "handler directory not found",
            "create it, or point at yours with --handlers / EVENTFN_HANDLERS",
        )
    async with AsyncExitStack() as stack:
        urls, embedded = await stack.enter_async_context(_nats_url(config))
        bus = await stack.enter_async_context(connect(urls, config.nats))
        await stack.enter_async_context(isolation.isolated(config))  # once NATS works: its errors come first
        await bus.ensure_stream(DLQ_STREAM, [subjects.DLQ_PREFIX + ">"], max_age=14 * 86_400.0)
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "nats.url").write_text(bus.url + "\n", encoding="utf-8")
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                service = Service(config, bus, tg)
                await service.reload()
                await tg.start(service.api.serve_requests)
                stop_watching = anyio.Event()
                await tg.start(service.watch, stop_watching)
                tg.start_soon(service.reap_idle_workers)
                tg.start_soon(reports.run)
                await service.reload()  # whatever changed between the first discovery and the watch
                _announce(service, bus.url, embedded)
                if ready is not None:
                    ready.set()
                async for signum in signals:
                    log.info("received %s; finishing in-flight invocations", signal.Signals(signum).name)
                    break
                stop_watching.set()
                await service.shutdown()
        (data_dir / "nats.url").unlink(missing_ok=True)
    log.info("stopped")


def _announce(service: Service, url: str, embedded: bool) -> None:
    loaded = [fn for fn in service.functions.values() if fn.pool is not None]
    failed = [fn.name for fn in service.functions.values() if fn.state == "Failed"]
    log.info(
        "eventfn ready: %d function(s) from %s%s",
        len(loaded),
        service.handlers_dir,
        f"; failed: {', '.join(failed)}" if failed else "",
    )
    if embedded:
        log.info("embedded NATS at %s: try `nats --server %s req %shello '{}'`", url, url, subjects.INVOKE_PREFIX)
    else:
        log.info("connected to NATS at %s", url)
