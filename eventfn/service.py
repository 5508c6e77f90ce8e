"""`eventfn serve`: one root task group holding the broker, the functions, their mappings and the APIs.

Start-up: NATS (embedded or remote) -> streams -> functions discovered and loaded -> consumers and feeds ->
sync-invoke and control subscriptions -> the handler watcher. A reload re-discovers the handler directory
and applies the difference; a shutdown stops intake first, lets in-flight invocations settle, then stops
workers, the connection and the embedded server, in that order.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext
from pathlib import Path

import anyio
import anyio.abc

from eventfn import subjects
from eventfn.broker.auth import EmbeddedAuth
from eventfn.broker.bus import Bus
from eventfn.broker.connection import connect
from eventfn.broker.feeds import Delivery
from eventfn.broker.natsserver import embedded_server, lock_data_dir
from eventfn.broker.specs import StreamSpec
from eventfn.broker.state import StateStore
from eventfn.config import FunctionSettings, NatsSettings, ServiceConfig
from eventfn.errors import ConfigError, EventfnError, HandlerLoadError
from eventfn.fronts.http.app import HttpApp
from eventfn.fronts.http.auth import Authenticator
from eventfn.fronts.http.function_urls import FunctionUrls
from eventfn.fronts.http.lambda_api import LambdaApi
from eventfn.fronts.http.roles import configured_keys
from eventfn.fronts.http.server import HttpServer
from eventfn.fronts.nats_api import Api
from eventfn.invoke import isolation, registry
from eventfn.invoke.functions import Function, Functions
from eventfn.invoke.inprocess import InProcessPool
from eventfn.invoke.registry import FunctionSource
from eventfn.invoke.reports import reports
from eventfn.invoke.slots import Slots
from eventfn.invoke.validated import Validated
from eventfn.invoke.workers import Pool
from eventfn.sources import mappings
from eventfn.sources.connector import Bound
from eventfn.sources.dispatch import Dispatcher, Running
from eventfn.sources.hosted import Hosted
from eventfn.sources.mappings import Mapping
from eventfn.sources.owners import Owners
from eventfn.sources.resources import Resources
from eventfn.sources.router import Router
from eventfn.sources.shard_dispatch import ShardDispatcher

log = logging.getLogger(__name__)

EVENTS_STREAM = subjects.EVENTS_STREAM
DLQ_STREAM = subjects.DLQ_STREAM
#: Function loads at once during start-up (each is a process starting and importing user code).
LOAD_PARALLELISM = 4
#: At start-up, the functions validated before the service says it is ready; the versions of any more (that keep
#: no warm worker and did not load in an earlier run) go live at once and are validated right after, so that a
#: thousand new functions do not hold the service up for their thousand imports (about 10 ms of CPU each).
VALIDATE_BEFORE_READY = 64
#: Seconds between two checks of the streams (deleted, leader, replicas, what another process changed); a feed or a
#: write that finds one gone asks at once.
STREAM_CHECK_INTERVAL = 2.0


class Service:
    """The running service: owns functions, mappings and the request handlers."""

    def __init__(self, config: ServiceConfig, bus: Bus, tg: anyio.abc.TaskGroup) -> None:
        self.config = config
        self.bus = bus
        self.tg = tg
        self.handlers_dir = Path(config.handlers)
        #: Every function by name, and the one way to invoke them (with the service-wide concurrency cap).
        self.invoker = Functions(Slots(config.max_concurrency))
        self.functions: dict[str, Function] = self.invoker.by_name
        #: Handler files and folders refused for their names: entry -> reason (shown, never loaded).
        self.invalid: dict[str, str] = {}
        self._reload_lock = anyio.Lock()
        #: Versions that loaded in earlier runs: a function scaled to zero is not imported again to start (see there).
        self.validated = Validated(Path(config.data_dir) / "validated.json")
        #: True until the first reload has ended: only then are versions taken from `validated`.
        self._starting = True
        #: Versions live but not validated yet (past `VALIDATE_BEFORE_READY` at start-up): `validate_deferred`.
        self.deferred: list[FunctionSource] = []
        self.api = Api(bus, self.invoker, self)
        state = StateStore(bus, replicas=config.stream.replicas)
        #: The queues and sharded streams declared in eventfn.toml.
        self.resources = Resources.of(config)
        #: The replicas sharing the sharded streams' shards, and which shards this one runs.
        self.owners = Owners(state.of("members"), heartbeat=config.recovery.heartbeat, lapse=config.recovery.lapse)
        self.owners.on_change = self._owners_changed
        self._replan = anyio.Event()
        #: Tumbling-window state and the like of the shard dispatchers.
        self.shard_state = state.of("shards")
        #: Queue messages handed back unstarted (a stopping mapping's), so that they do not count as receives.
        self.queue_state = state.of("queues")
        #: The installed connectors (bucket watcher, scheduler, plugins), publishing into the events stream.
        self.connectors = Hosted(
            config.connectors,
            publish=bus.publish_event,
            state=state.of,
            data_dir=Path(config.data_dir).resolve(),
        )
        #: Stream name -> what this service last made sure it has (see `watch_streams`).
        self._streams: dict[str, StreamSpec] = {}
        #: Events stream subjects JetStream refused (they partly overlap one it stores), with the reason.
        self._refused: dict[str, str] = {}
        #: Mapping name -> the mapping last provisioned (its consumer), to skip unchanged ones.
        self.provisioned: dict[str, Mapping] = {}
        #: Mapping name -> its running dispatcher.
        self.running: dict[str, Running] = {}
        self._check_streams = anyio.Event()
        #: False while the last provisioning failed part-way (JetStream did not answer): retried by
        #: `watch_streams` rather than left until the next change in the handler directory.
        self._provisioned = True
        #: The HTTP APIs: function URLs and routes, Lambda's, and the connectors' (the S3 API).
        self.urls = FunctionUrls(self.invoker, bus, config.http)
        self.http_auth = Authenticator(config.http, Path(config.data_dir))
        self.http_app = HttpApp(
            [LambdaApi(self.invoker, bus, config.http), self.urls, *self.connectors.http_fronts(config.http)],
            self.http_auth,
        )
        self.http: HttpServer | None = HttpServer(config.http, self.http_app) if config.http.enabled else None
        #: Where workers reach the HTTP APIs (loopback), once the server listens.
        self.http_url: str | None = None

    # -- functions ----------------------------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-discover the handler directory and apply what changed. Safe to call at any time."""
        async with self._reload_lock:
            found = registry.scan(self.handlers_dir, self.config.functions)
            for entry, reason in found.invalid.items():
                if self.invalid.get(entry) != reason:  # once per entry, not at every reload
                    log.error("%r not loaded: %s", str(self.handlers_dir / entry), reason)
            self.invalid = found.invalid
            sources = found.functions
            for name in [n for n in self.functions if n not in sources]:
                await self._remove(self.functions.pop(name))
            changed = [
                s
                for s in sources.values()
                if s.name not in self.functions or self.functions[s.name].source.version != s.version
            ]
            limiter = anyio.CapacityLimiter(LOAD_PARALLELISM)
            async with anyio.create_task_group() as tg:
                for index, source in enumerate(changed):
                    tg.start_soon(self._load, source, limiter, self._starting and index >= VALIDATE_BEFORE_READY)
            self._starting = False
            await self._apply()

    async def _apply(self) -> None:
        """After loads: roles, the record of validated versions, consumers and dispatchers, function URLs."""
        # The roles of functions no version serves go; the others take the policy of the version serving.
        self.http_auth.update({n: f.settings if f.pool is not None else None for n, f in self.functions.items()})
        self.validated.keep_only(set(self.functions))
        self.validated.save()
        await self._provision()
        self.urls.update()

    async def validate_deferred(self) -> None:
        """Validate the versions that went live unvalidated at start-up; one that fails to load is taken back (its
        invocations get Lambda's init error, its events wait for a fix, as for a version that failed at start)."""
        deferred = self.deferred
        limiter = anyio.CapacityLimiter(LOAD_PARALLELISM)
        failed: list[str] = []

        async def validate(source: FunctionSource) -> None:
            fn = self.functions.get(source.name)
            if fn is None or not isinstance(pool := fn.pool, Pool) or pool.version != source.version:
                return  # removed or replaced meanwhile
            probe = Pool(spec=pool.spec, env=pool.env, version=pool.version)  # validates, keeps no worker
            async with limiter:
                try:
                    init_ms = await probe.start()
                except HandlerLoadError as exc:
                    if fn.pool is pool:
                        fn.pool, fn.load_error, fn.init_ms = None, exc, None
                        fn.failed(str(exc))
                        log.error("%s", exc)
                        failed.append(fn.name)
                        self.tg.start_soon(pool.retire)
                    self.validated.failed(source.name)
                    return
            fn.init_ms = init_ms
            self.validated.loaded(source.name, source.version, init_ms)

        try:
            async with anyio.create_task_group() as tg:
                for source in deferred:
                    tg.start_soon(validate, source)
        finally:
            self.deferred = []
        log.info(
            "validated the %d function(s) that went live at start-up unvalidated%s",
            len(deferred),
            f"; failed: {', '.join(sorted(failed))}" if failed else "",
        )
        async with self._reload_lock:
            try:
                await self._apply()
            except Exception:  # NATS unreachable meanwhile...: the stream watch provisions again; never the service
                self._provisioned = False
                log.exception("provisioning after the start-up validation failed; retrying")

    async def _load(self, source: FunctionSource, limiter: anyio.CapacityLimiter, defer: bool = False) -> None:
        """Load `source`'s version: validate it (its handler imports) and serve from it. `defer`: a version that keeps
        no warm worker goes live first and is validated after start-up (`VALIDATE_BEFORE_READY`)."""
        fn = self.invoker.add(source)
        fn.source = source
        if source.error or source.settings is None:
            error = source.error or "settings could not be read"
            fn.load_error = None
            if fn.failed(error):
                log.error("function %s: %s%s", source.name, error, _keeps_serving(fn))
            return
        settings = source.settings
        spec = source.worker_spec(settings)
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
                max_workers=max(1, settings.concurrency),  # spares included
            )
        before = None
        how = ""
        if self._starting and isinstance(pool, Pool) and pool.min_warm == 0:
            before = self.validated.init_ms(source.name, source.version)
            how = ", as in an earlier run"
            if before is None and defer:
                before, how = 0.0, ", validated after start-up"
                self.deferred.append(source)
        if before is not None:
            init_ms = before  # its first invocation's cold start imports it
        else:
            async with limiter:
                try:
                    init_ms = await pool.start()
                except HandlerLoadError as exc:
                    fn.load_error = exc
                    self.validated.failed(source.name)
                    if fn.failed(str(exc)):
                        log.error("%s%s", exc, _keeps_serving(fn))
                    return
            if isinstance(pool, Pool):
                self.validated.loaded(source.name, source.version, init_ms)
        old = fn.activate(pool, settings, init_ms)
        log.info(
            "function %s %s (version %s, init %.1f ms%s)",
            source.name,
            "reloaded" if old else "loaded",
            source.version,
            init_ms,
            how if before is not None else "",
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
                "_HANDLER": source.handler(),
            }
        )
        env.update(self.connectors.environment(mappings.connector_triggers(source.name, settings)))
        if self.http_url is not None:
            # What boto3 and the aws CLI read: unmodified `boto3.client("s3")` code talks to eventfn.
            region = self.config.http.region
            env.update(
                {
                    "AWS_ENDPOINT_URL_S3": self.http_url,
                    "AWS_ENDPOINT_URL_LAMBDA": self.http_url,
                    "AWS_REGION": region,
                    "AWS_DEFAULT_REGION": region,
                }
            )
            # Its execution role, as Lambda gives it (the function's own environment may set other keys).
            env.update(self.http_auth.environment(source.name, settings))
        env.update(settings.environment)
        return env

    async def _remove(self, fn: Function) -> None:
        log.info("function %s removed", fn.name)
        await self._stop_mappings([n for n, r in self.running.items() if r.mapping.function == fn.name])
        if fn.pool is not None:
            self.tg.start_soon(fn.pool.retire)

    # -- streams, consumers, dispatchers ------------------------------------------------------------------

    async def _provision(self, *, recreated: bool = False) -> None:
        """Bring the events stream, the durable consumers and the running dispatchers in line with the functions.

        Consumers exist for every function whose settings are valid, even while its code fails to load, so
        events arriving meanwhile wait for the fix instead of being missed. Dispatchers run only for functions
        with a loaded version and a concurrency above 0. `recreated`: the stream was just re-created, so the
        consumers made now start at its first event (none published since is missed).
        """
        self._provisioned = False
        triggers = [
            s
            for fn in self.functions.values()
            if (st := fn.routing_settings)
            for t in st.subject_triggers()
            for s in t.subjects
        ]
        base = [
            *self.config.stream.subjects,
            subjects.ASYNC_PREFIX + ">",
            subjects.REDRIVE_PREFIX + ">",
            subjects.SOURCE_PREFIX + ">",
        ]
        stream_subjects, problems = subjects.stream_subjects(base, triggers)
        stream = self.config.stream
        events = StreamSpec(
            name=EVENTS_STREAM,
            subjects=stream_subjects,
            max_age=stream.max_age,
            max_bytes=stream.max_bytes,
            replicas=stream.replicas,
        )
        dlq = StreamSpec(
            name=DLQ_STREAM,
            subjects=[subjects.DLQ_PREFIX + ">"],
            max_age=self.config.dlq.max_age,
            replicas=self.config.dlq.replicas or stream.replicas,
        )
        if self._streams.get(DLQ_STREAM) != dlq:
            await self._ensure_stream(dlq)
        if self._streams.get(EVENTS_STREAM) != events:
            self._refused = await self._ensure_stream(events)
        # Subjects another service or an operator put in the stream stay; a trigger that partly overlaps one of
        # them cannot be stored, so its consumers wait until a subject covering both is configured.
        problems.update(self._refused)
        stored = [s for s in stream_subjects if s not in self._refused]
        for trigger in dict.fromkeys(triggers):
            if trigger not in problems and not any(subjects.covers(s, trigger) for s in stored):
                problems[trigger] = next(
                    (r for s, r in self._refused.items() if subjects.covers(s, trigger)),
                    f"trigger subject {trigger!r} is not stored by stream {EVENTS_STREAM}",
                )
        for problem in dict.fromkeys(problems.values()):
            log.error("%s", problem)
        for spec in self.resources.specs():
            if self._streams.get(spec.name) != spec:
                await self._ensure_stream(spec)
        bounds: list[Bound] = []
        #: Queue -> the mapping consuming it: a work-queue stream gives each message to one consumer only.
        consumed: dict[str, str] = {}
        unprovisioned: list[Mapping] = []
        to_start: list[tuple[Function, Mapping]] = []
        running_of: dict[str, list[str]] = {}  # function -> its running mappings (not a scan of all per function)
        for name, r in self.running.items():
            running_of.setdefault(r.mapping.function, []).append(name)
        # A version live before it is validated (`validate_deferred`) takes no stored events yet: one that fails to
        # load would fail them, where a version that fails at start-up leaves them waiting for a fix.
        unvalidated = {source.name: source.version for source in self.deferred}
        for fn in sorted(self.functions.values(), key=lambda f: f.name):  # the first by name keeps a queue
            try:
                planned = mappings.plan(
                    fn.name, fn.routing_settings, self.connectors.source, self.resources, self.config.recovery
                )
                _claim_queues(planned, consumed)
            except ConfigError as exc:
                log.error("function %s: its triggers cannot be set up: %s", fn.name, exc)
                continue
            bounds.extend(mappings.connector_triggers(fn.name, fn.routing_settings))
            wanted = {
                name: mapping
                for name, mapping in planned.items()
                if not any(s in problems for s in mapping.source.subjects)
            }
            loaded = fn.pool is not None and fn.settings is not None and unvalidated.get(fn.name) != fn.pool.version
            # Concurrency 0 (Lambda's "disabled"): trigger events wait in JetStream; a source that dead-letters
            # instead (the async queue: Lambda sends those to the DLQ without retries) keeps running.
            runnable = {
                n
                for n, m in wanted.items()
                if loaded and (not fn.disabled or mappings.runs_while_disabled(m)) and self._owns(m)
            }
            own = running_of.get(fn.name, [])
            await self._stop_mappings([n for n in own if n not in runnable or wanted.get(n) != self.running[n].mapping])
            for name, mapping in wanted.items():
                if self.provisioned.get(name) != mapping:
                    unprovisioned.append(mapping)
                if name in runnable and name not in self.running:
                    to_start.append((fn, mapping))
        # All consumers at once: one at a time, a thousand functions took a thousand round trips or more.
        outcome = await mappings.provision_all(self.bus, unprovisioned, from_start=recreated)
        for mapping in outcome.done:
            self.provisioned[mapping.name] = mapping
        for mapping in outcome.taken:
            await self._report_taken(mapping)
        async with anyio.create_task_group() as starting:  # side by side: each start waits for its feed
            for fn, mapping in to_start:
                if self.provisioned.get(mapping.name) == mapping:  # else its consumer is not there: started once it is
                    starting.start_soon(self._start_guarded, fn, mapping)
        if outcome.error is not None:
            raise outcome.error
        # Consumers first: what a connector publishes from now on has a mapping waiting for it.
        self.connectors.update(bounds)
        self._provisioned = True

    async def _report_taken(self, mapping: Mapping) -> None:
        """A queue's stream refused `mapping`'s consumer: say which consumer holds the queue and how to free it."""
        stream = mapping.source.stream
        holders = sorted(n for n in await self.bus.consumer_states(stream) if n != mapping.name)
        queue = mapping.source.queue.name if mapping.source.queue else stream
        log.error(
            "function %s: mapping %s cannot consume queue %s: consumer %s already does (a trigger renamed or moved "
            "to another function, or another service's function); a queue has one consumer. If nothing should "
            "consume through it, delete it: `nats --context <data_dir>/auth/admin.json consumer rm %s %s`",
            mapping.function,
            mapping.name,
            queue,
            ", ".join(holders) or "(unknown)",
            stream,
            holders[0] if holders else "<consumer>",
        )

    def _owns(self, mapping: Mapping) -> bool:
        """Whether this replica runs `mapping`: all of them but shards, which the live replicas share out."""
        shard = mapping.source.shard
        return shard is None or self.owners.owns(mapping.name.rpartition("--")[0], shard.index)

    def _owners_changed(self) -> None:
        self._replan.set()

    async def watch_owners(self) -> None:
        """When replicas come or go, start the shards this one now owns and stop those it no longer does (a
        stopping shard finishes its batch and hands its consumer over)."""
        while True:
            await self._replan.wait()
            self._replan = anyio.Event()
            try:
                async with self._reload_lock:
                    await self._provision()
            except Exception as exc:  # NATS away: `watch_streams` provisions again once it is back
                log.warning("re-spreading shards failed (%s); retried when NATS answers", exc)

    def routers(self) -> list[Router]:
        """One router per sharded stream: puts to their shards, in order (one replica at a time routes each)."""
        return [Router(self.bus, name, settings) for name, settings in self.resources.streams.items()]

    async def _ensure_stream(self, spec: StreamSpec) -> dict[str, str]:
        # Recorded before it is applied: if JetStream does not answer now (an election), `watch_streams` finds
        # the stream lacking it and provisions again.
        self._streams[spec.name] = spec
        return await self.bus.ensure(spec)

    async def watch_streams(self, interval: float = STREAM_CHECK_INTERVAL) -> None:
        """Check the streams every `interval` seconds, and at once when `streams_lost` asks, for good.

        A stall (no leader, no answer) is reported through the bus's rate-limited reporter, so an election
        after a server was lost shows in the log even while nothing is published. A stream that lost what this
        service needs (a service that read it before our update wrote its own subjects back, or an operator
        lowered its replicas) is widened again: JetStream has no compare-and-set on a stream's configuration,
        so this check is what makes concurrent provisioning by several services converge. A stream that could
        not be read, or a feed or write that found something gone, has `_restore` re-create what was deleted.
        """
        while True:
            with anyio.move_on_after(interval):
                await self._check_streams.wait()
            asked = self._check_streams.is_set()
            self._check_streams = anyio.Event()
            if not self._provisioned:
                try:
                    async with self._reload_lock:
                        if not self._provisioned:
                            await self._provision()
                            log.info("provisioning done (it had failed part-way)")
                            # The reload that failed there had not reached its URLs and routes: a new function's
                            # were 404 until some later reload.
                            self.urls.update()
                except Exception as exc:  # still failing: reported once per interval, tried again
                    self.bus.stalls.failed("provisioning", str(exc) or type(exc).__name__)
                else:
                    self.bus.stalls.recovered("provisioning")
            unreadable = False
            for name, spec in list(self._streams.items()):
                try:
                    health = await self.bus.check_stream(name)
                    if health is None:
                        unreadable = True  # deleted, or without a leader: `_restore` tells which
                        continue
                    if not (lacks := spec.lacks(health, self._refused)):
                        continue
                    log.warning(
                        "stream %s lacks %s (changed by another process or by hand); widening it again",
                        name,
                        ", ".join(lacks),
                    )
                    async with self._reload_lock:  # not while a reload provisions
                        refused = await self._ensure_stream(self._streams.get(name, spec))
                        if name == EVENTS_STREAM:
                            self._refused = refused
                            # Consumers a reload could not provision while the stream did not answer.
                            await self._provision()
                except Exception as exc:  # NATS unreachable, the JetStream API refusing: report, check again later
                    self.bus.stalls.failed(f"stream {name}", str(exc) or type(exc).__name__)
            if asked or unreadable:
                try:
                    await self._restore(consumers=asked)
                except EventfnError as exc:
                    log.error("re-creating deleted streams failed: %s", exc)
                except Exception as exc:
                    # NATS unreachable or without a leader: the bus and the feeds report that; check again later.
                    log.debug("stream check failed: %s", exc)
            if asked:
                await anyio.sleep(1.0)  # every feed on a missing consumer asks: one check a second answers them all

    async def _start_guarded(self, fn: Function, mapping: Mapping) -> None:
        try:
            await self._start_mapping(fn, mapping)
        except Exception:  # a bug in one source's dispatcher must not stop the service
            log.exception("function %s: mapping %s could not be started", fn.name, mapping.name)

    async def _start_mapping(self, fn: Function, mapping: Mapping) -> None:
        stream = mapping.source.stream
        running: Running | None = None

        def pin_changed(pinned: bool) -> None:  # the feed exists before the dispatcher it feeds
            if running is not None:
                running.dispatcher.pin_changed(pinned)

        async def handed_back(deliveries: list[Delivery]) -> None:  # (the feed, again, exists first)
            if isinstance(running, Running) and isinstance(running.dispatcher, Dispatcher):
                await running.dispatcher.note_hand_back(list(deliveries))

        feed = self.bus.pull_feed(
            stream,
            mapping.name,
            max_inflight=mapping.max_inflight,
            options=mapping.source.consumer,
            on_pin_change=pin_changed,
            on_hand_back=handed_back if mapping.source.queue is not None else None,
        )

        async def recovery() -> tuple[int, int]:
            state = await self.bus.consumer_state(stream, mapping.name)
            return (state.ack_pending, state.delivered_stream_seq) if state else (0, 0)

        dispatcher: Dispatcher | ShardDispatcher
        if mapping.source.shard is not None:
            dispatcher = ShardDispatcher(
                self.bus, mapping, feed, invoke=fn.invoke, recovery=recovery, state=self.shard_state
            )
        else:
            dispatcher = Dispatcher(
                self.bus, mapping, feed, invoke=fn.invoke, recovery=recovery, state=self.queue_state
            )
        running = started = Running(dispatcher, mapping)
        self.running[mapping.name] = started

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                await dispatcher.run(task_status=task_status)
            finally:
                started.done.set()

        await self.tg.start(run)

    async def _stop_mappings(self, names: list[str]) -> None:
        stopping = [self.running.pop(name) for name in names]
        for running in stopping:
            running.dispatcher.stop()
        for running in stopping:
            await running.done.wait()

    def streams_lost(self) -> None:
        """A feed found its consumer gone, or a stored write found no stream: check the streams now."""
        self._check_streams.set()

    async def _restore(self, *, consumers: bool) -> None:
        """Re-create the DLQ and events streams, and (with `consumers`) the mappings' consumers, that are gone."""
        async with self._reload_lock:
            dlq_lost = not await self.bus.stream_exists(DLQ_STREAM)
            events_lost = EVENTS_STREAM in self._streams and not await self.bus.stream_exists(EVENTS_STREAM)
            resources_lost = [
                spec.name for spec in self.resources.specs() if not await self.bus.stream_exists(spec.name)
            ]
            for name in resources_lost:
                self._streams.pop(name, None)  # provisioned again below, with the consumers on it
            missing_on_resources = [n for n, m in self.provisioned.items() if m.source.stream in resources_lost]
            missing = []
            if consumers and not events_lost:  # a listing per stream: one request per 256 consumers, not one each
                listed = {
                    s: await self.bus.consumer_configs(s) for s in {m.source.stream for m in self.provisioned.values()}
                }
                missing = [name for name, m in self.provisioned.items() if name not in listed[m.source.stream]]
            missing = list(dict.fromkeys([*missing, *missing_on_resources]))
            if not (dlq_lost or events_lost or missing or resources_lost):
                return
            if dlq_lost:
                self._streams.pop(DLQ_STREAM, None)  # provisioned again below
            if events_lost:
                self._streams.pop(EVENTS_STREAM, None)
                missing = list(self.provisioned)
            for name in missing:
                del self.provisioned[name]
            await self._provision(recreated=events_lost)
            # A removed function's consumer is not provisioned again: only what the functions still call for.
            recreated = sorted(name for name in missing if name in self.provisioned)
        self.bus.refresh_feeds()
        what = [f"stream {DLQ_STREAM} (its records are lost)"] if dlq_lost else []
        what += [f"stream {name} (what it held is lost)" for name in resources_lost]
        if events_lost:
            what.append(f"stream {EVENTS_STREAM} with its {len(recreated)} consumer(s) (events it held are lost)")
        elif recreated:
            what.append(f"consumer(s) {', '.join(recreated)} (a trigger's consumer starts at new events)")
        if not what:
            return
        log.warning("deleted while the service ran, now re-created: %s", "; ".join(what))

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
        if self.http is not None:
            self.http.stop()
        async with self._reload_lock:  # a reload under way finishes first; none starts after
            functions = list(self.functions.values())
            running = list(self.running.values())
            self.running.clear()
            for r in running:  # every feed stops pulling before any wait
                r.dispatcher.stop()
            longest = max((fn.settings.timeout for fn in functions if fn.settings), default=0.0)
            with anyio.move_on_after(longest + self.config.shutdown_grace) as scope:
                for r in running:
                    await r.done.wait()
                log.debug("mappings stopped")
                await self.api.done.wait()
                if self.http is not None:
                    await self.http.done.wait()
                log.debug("requests settled")
            if scope.cancelled_caught:
                log.warning("in-flight invocations did not finish in time; their events will be redelivered")
            for fn in functions:
                if fn.pool is not None:
                    await fn.pool.retire()
        # Whatever still runs past the deadline is cancelled (its worker killed); its events are redelivered.
        self.tg.cancel_scope.cancel()


def _claim_queues(planned: dict[str, Mapping], consumed: dict[str, str]) -> None:
    """Record which mapping consumes each queue of `planned`; a `ConfigError` if another already does (a
    work-queue stream delivers each message to one consumer: two functions on one queue would split it)."""
    for name, mapping in planned.items():
        queue = mapping.source.queue
        if queue is None:
            continue
        other = consumed.get(queue.name)
        if other is not None and other != name:
            raise ConfigError(
                f"trigger {name.partition('--')[2]}",
                f"queue {queue.name!r} is consumed by mapping {other} already",
                "one mapping per queue (each message goes to one consumer); fan out with a sharded stream instead",
            )
    for name, mapping in planned.items():
        if mapping.source.queue is not None:
            consumed[mapping.source.queue.name] = name


def _keeps_serving(fn: Function) -> str:
    return f"; version {fn.pool.version} keeps serving" if fn.pool else ""


@asynccontextmanager
async def _nats_url(config: ServiceConfig) -> AsyncIterator[tuple[list[str], bool, NatsSettings]]:
    """Where NATS is, whether it is embedded, and the settings to connect to it with."""
    if config.nats.url:
        yield list(config.nats.url), False, config.nats
        return
    access = EmbeddedAuth(config)
    async with embedded_server(
        Path(config.data_dir),
        config.nats.port,
        host=config.nats.host,
        authorization=access.server_config,
        restart_delays=tuple(config.recovery.nats_restart_delays),
    ) as url:
        yield [url], True, access.started(url)


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
    configured_keys(config.http, os.environ)  # a secret missing from the environment: said before NATS starts
    # With the embedded server the data directory holds its store: locked before anything is written there, so
    # a second service on it leaves the first's files, store and server alone. Services on an external NATS
    # share no store, and may share a directory.
    with lock_data_dir(data_dir) if not config.nats.url else nullcontext():
        await _serve(config, data_dir, ready)
    log.info("stopped")


async def _serve(config: ServiceConfig, data_dir: Path, ready: anyio.Event | None) -> None:
    async with AsyncExitStack() as stack:
        urls, embedded, settings = await stack.enter_async_context(_nats_url(config))
        bus = await stack.enter_async_context(connect(urls, settings))
        await stack.enter_async_context(isolation.isolated(config))  # once NATS works: its errors come first
        data_dir.mkdir(parents=True, exist_ok=True)
        url_file = data_dir / "nats.url"
        url_file.write_text(bus.url + "\n", encoding="utf-8")
        stack.callback(url_file.unlink, missing_ok=True)  # however the service ends
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                service = Service(config, bus, tg)
                bus.on_lost = service.streams_lost
                if service.http is not None:  # before the functions load: their environment has its URL
                    listener = await service.http.bind()
                    service.http_url = service.http.url
                    http_file = data_dir / "http.url"
                    http_file.write_text(service.http_url + "\n", encoding="utf-8")
                    stack.callback(http_file.unlink, missing_ok=True)
                    tg.start_soon(service.http.run, listener)
                if service.resources.streams:  # before the first plan: which shards this replica runs
                    await tg.start(service.owners.run)
                await service.reload()
                for router in service.routers():
                    await tg.start(router.run)
                tg.start_soon(service.watch_owners)
                await tg.start(service.api.serve_requests)
                stop_watching = anyio.Event()
                await tg.start(service.watch, stop_watching)
                tg.start_soon(service.reap_idle_workers)
                tg.start_soon(service.watch_streams)
                tg.start_soon(reports.run)
                await tg.start(service.connectors.run)
                await service.reload()  # whatever changed between the first discovery and the watch
                _announce(service, bus.url, embedded)
                if service.deferred:  # once ready: they would compete with the start-up for the CPU
                    tg.start_soon(service.validate_deferred)
                if ready is not None:
                    ready.set()
                async for signum in signals:
                    log.info("received %s; finishing in-flight invocations", signal.Signals(signum).name)
                    break
                stop_watching.set()
                await service.shutdown()


def _announce(service: Service, url: str, embedded: bool) -> None:
    loaded = sorted(fn.name for fn in service.functions.values() if fn.pool is not None)
    failed = sorted(fn.name for fn in service.functions.values() if fn.state == "Failed")
    log.info(
        "eventfn ready: %d function(s) from %s%s%s%s",
        len(loaded),
        service.handlers_dir,
        f" ({len(service.deferred)} validated after start-up)" if service.deferred else "",
        f"; failed: {', '.join(failed)}" if failed else "",
        f"; invalid: {', '.join(map(repr, sorted(service.invalid)))}" if service.invalid else "",
    )
    if service.http is not None:
        log.info(
            "HTTP at %s: function URLs at %s/fn/<name>/, Lambda's API at %s/2015-03-31/, S3 at %s/",
            *([service.http.url] * 4),
        )
    if not embedded:
        log.info("connected to NATS at %s", url)
    elif loaded:
        example = "hello" if "hello" in loaded else loaded[0]
        log.info("embedded NATS at %s: try `nats --server %s req %s%s '{}'`", url, url, subjects.INVOKE_PREFIX, example)
    else:
        log.info(
            "embedded NATS at %s: add a handler file to %s, then try `nats --server %s req %s<name> '{}'`",
            url,
            service.handlers_dir,
            url,
            subjects.INVOKE_PREFIX,
        )
