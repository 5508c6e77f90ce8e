"""Event source mappings: one `Mapping` from a function's settings to its dispatcher, and its provisioning.

Every function has one mapping of its async-invoke queue (`<function>--async`, the built-in `async_queue`
source) and one per trigger (`<function>--<trigger name>`, default `t<index>`, a `plain_subjects` source).
Each mapping is one durable pull consumer on its source's stream, filtering the source's subjects plus the
mapping's own redrive subject, so an event redriven from the DLQ goes back through the same batching and
filters.

`enabled` is durable server-side state: a disabled mapping is a *paused* consumer (JetStream's consumer
pause), so it holds for every eventfn process on the stream and across restarts. The `enabled` value the
settings declared is kept in the consumer's metadata; provisioning applies it only when it changes, so
`eventfn mappings disable` is not undone by a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec

from eventfn import subjects
from eventfn.broker.bus import UNREAD, Bus, ConsumerTaken, Unread
from eventfn.config import (
    BUILTIN_TRIGGERS,
    MAX_BATCH_BYTES,
    Destinations,
    FunctionSettings,
    HttpTrigger,
    QueueTrigger,
    RecoverySettings,
    RetryPolicy,
    StreamTrigger,
    Trigger,
    TriggerOptions,
)
from eventfn.errors import ConfigError
from eventfn.filters import Filter, compile_filters
from eventfn.sources import queues, shards
from eventfn.sources.connector import Bound
from eventfn.sources.deadletters import DLQ_RETRY_DELAY
from eventfn.sources.resources import Resources
from eventfn.sources.source import Ordering, Source, async_queue, plain_subjects

#: The source of a connector's trigger (the service's connectors: `hosted.Hosted.source`).
SourceFor = Callable[[Bound], Source]

_ENABLED_KEY = "eventfn_enabled"
#: The async-invoke mapping's name (`<function>--async`); trigger names may not take it.
ASYNC_MAPPING = "async"
#: Consumers created or updated at once (each a JetStream API round trip) by `provision_all`.
PROVISION_PARALLELISM = 32
#: Seconds past a function's timeout and batching window before an unsettled delivery comes again (`[recovery]`).
REDELIVERY_MARGIN = RecoverySettings().redelivery_margin


class Mapping(msgspec.Struct, frozen=True, kw_only=True):
    """One event source mapping, from settings to dispatch: its source, batching, filters, parallelism and
    retry policy. Provisioning and the dispatcher read everything from here; a change to any of it is a new
    `Mapping`, and the service restarts the dispatcher (in-flight batches finish first)."""

    function: str
    #: `<function>--<name>`: the durable consumer's name too.
    name: str
    source: Source
    batch_size: int = 1
    batch_window: float = 0.0
    max_batch_bytes: int = MAX_BATCH_BYTES
    #: Lambda filter patterns as declared (compiled by `compiled_filter`).
    filters: tuple[str | dict[str, Any], ...] = ()
    report_batch_item_failures: bool = True
    enabled: bool = True
    #: Batches in flight at once: the trigger's `max_concurrency` within the function's concurrency.
    concurrency: int = 1
    #: The function's timeout: the consumer's ack wait covers a batching window and one invocation.
    timeout: float = 3.0
    #: What the ack wait allows past a batching window and one invocation (`[recovery] redelivery_margin`).
    redelivery_margin: float = REDELIVERY_MARGIN
    #: Seconds before an event whose DLQ write failed is tried again (`[recovery] dlq_retry_delay`).
    dlq_retry_delay: float = DLQ_RETRY_DELAY
    retry: RetryPolicy = RetryPolicy()
    destinations: Destinations = Destinations()
    #: Set when the function may not run (concurrency 0) and the source dead-letters rather than waits:
    #: every event is dead-lettered with this condition.
    reject: str | None = None

    @property
    def filter_subjects(self) -> list[str]:
        """What the consumer takes: the source's subjects and the mapping's redrive subject."""
        if self.source.stream != subjects.EVENTS_STREAM:
            return list(self.source.subjects)  # a stream of its own: redrives go through its own subjects
        return [*self.source.subjects, subjects.REDRIVE_PREFIX + self.name]

    @property
    def ack_wait(self) -> float:
        """An event waits at most a batching window plus one invocation before it is settled; the margin covers
        the wait for a worker (long waits are marked in progress before the invocation starts)."""
        if self.source.ack_wait is not None:
            return self.source.ack_wait
        return self.timeout + self.batch_window + self.redelivery_margin

    @property
    def max_inflight(self) -> int:
        """The feed's credit, which is also the consumer's max ack pending."""
        source = self.source
        ordered, queue = source.ordering.ordered, source.queue is not None
        return feed_credit(self.concurrency, self.batch_size, ordered=ordered, queue=queue)

    def compiled_filter(self) -> Filter | None:
        """The compiled filters, or None when they pass everything (no per-event work then)."""
        if not self.filters:
            return None
        compiled = compile_filters(list(self.filters), f"function {self.function}")
        return None if compiled.matches_everything else compiled

    def source_filters(self) -> tuple[Filter, ...]:
        """The source's own filters (a bucket trigger's prefix and suffix, say), each of which must match."""
        where = f"function {self.function}: trigger {self.name}"
        return tuple(compile_filters([pattern], where) for pattern in self.source.filters)


#: The least credit of a mapping with batch size 1 (`feed_credit`).
BATCH1_CREDIT = 200


def feed_credit(concurrency: int, batch_size: int, *, ordered: bool = False, queue: bool = False) -> int:
    """Deliveries a mapping's feed may hold: a batch per slot plus one being gathered, within a memory bound.

    An ordered mapping holds the events of a key that waits for a retry: its credit leaves room for other keys
    to go on meanwhile.
    """
    credit = (concurrency + 1) * batch_size
    if batch_size == 1 and not ordered and not queue:
        # One event per invocation: a shallow credit left the drain waiting on pull round trips and handling a few
        # events per event-loop pass (py-spy, CPU per event); events waiting for a slot are kept alive
        # (`ordering.Unordered`). A queue keeps Lambda's poller depth: its messages count receives and visibility.
        credit = max(credit, BATCH1_CREDIT)
    if ordered:
        credit = max(credit, 1000)
    return min(credit, 20_000)


def plan(
    function: str,
    settings: FunctionSettings | None,
    connectors: SourceFor | None = None,
    resources: Resources | None = None,
    recovery: RecoverySettings | None = None,
) -> dict[str, Mapping]:
    """The mappings `settings` call for, by name; `connectors` gives the sources of connector triggers (without
    it, those triggers are left out), `resources` the queues and sharded streams that queue and stream triggers
    name (a trigger naming one not declared is a `ConfigError`), `recovery` how soon what a crash left goes on
    (`[recovery]`). A stream trigger has one mapping per shard, `<function>--<trigger>--shard-<index>`."""
    if settings is None:
        return {}
    resources = resources or Resources()
    recovery = recovery or RecoverySettings()
    base: dict[str, Any] = {
        "function": function,
        "timeout": settings.timeout,
        "redelivery_margin": recovery.redelivery_margin,
        "dlq_retry_delay": recovery.dlq_retry_delay,
        "retry": settings.retry,
        "destinations": settings.destinations,
    }
    planned = [Mapping(name=f"{function}--{ASYNC_MAPPING}", source=async_queue(function), **base)]
    for name, trigger in _named(settings):
        if isinstance(trigger, QueueTrigger):
            planned.append(_queue_mapping(function, name, trigger, settings, resources, base))
            continue
        if isinstance(trigger, StreamTrigger):
            planned += _shard_mappings(function, name, trigger, settings, resources, base)
            continue
        if isinstance(trigger, HttpTrigger):  # served by the HTTP front; an async route's events use the async queue
            continue
        if isinstance(trigger, Trigger):
            source = _trigger_source(trigger)
        elif connectors is not None:
            source = connectors(_bound(function, name, trigger))
        else:
            continue
        planned.append(
            Mapping(
                name=f"{function}--{name}",
                source=source,
                **_batching(trigger, source),
                concurrency=min(trigger.max_concurrency or settings.concurrency, max(1, settings.concurrency)),
                **base,
            )
        )
    if settings.concurrency == 0:
        planned = [_disabled(m) for m in planned]
    return {m.name: _pinned_for(m, recovery.pin_timeout) for m in planned}


def _queue_mapping(
    function: str,
    name: str,
    trigger: QueueTrigger,
    settings: FunctionSettings,
    resources: Resources,
    base: dict[str, Any],
) -> Mapping:
    queue = resources.queues.get(trigger.queue)
    if queue is None:
        raise ConfigError(
            f"function {function}",
            f"trigger {name}: queue {trigger.queue!r} is not declared",
            f"declare it in eventfn.toml as [queues.{trigger.queue}]"
            + (f" (declared: {', '.join(sorted(resources.queues))})" if resources.queues else ""),
        )
    if queue.visibility_timeout < settings.timeout:
        # Lambda refuses such a mapping: a message would become visible again while its handler still runs.
        raise ConfigError(
            f"function {function}",
            f"trigger {name}: queue visibility timeout: {queue.visibility_timeout:g} seconds is less than function "
            f"timeout: {settings.timeout:g} seconds",
            f"raise [queues.{trigger.queue}] visibility_timeout (Lambda suggests 6 times the function timeout)",
        )
    source = queues.source(trigger.queue, queue)
    cap = trigger.concurrency_cap
    return Mapping(
        name=f"{function}--{name}",
        source=source,
        **_batching(trigger, source),
        concurrency=min(cap or settings.concurrency, max(1, settings.concurrency)),
        **base,
    )


def _shard_mappings(
    function: str,
    name: str,
    trigger: StreamTrigger,
    settings: FunctionSettings,
    resources: Resources,
    base: dict[str, Any],
) -> list[Mapping]:
    stream = resources.streams.get(trigger.stream)
    if stream is None:
        raise ConfigError(
            f"function {function}",
            f"trigger {name}: stream {trigger.stream!r} is not declared",
            f"declare it in eventfn.toml as [streams.{trigger.stream}]"
            + (f" (declared: {', '.join(sorted(resources.streams))})" if resources.streams else ""),
        )
    return [
        Mapping(
            name=f"{function}--{name}--{shards.mapping_suffix(source.shard.index)}",
            source=source,
            **_batching(trigger, source),
            concurrency=trigger.parallelization_factor,
            **base,
        )
        for source in shards.sources(trigger.stream, stream, trigger)
        if source.shard is not None
    ]


def _batching(trigger: TriggerOptions, source: Source) -> dict[str, Any]:
    """A trigger's batching, filter and enabled settings as a mapping's."""
    return {
        "batch_size": min(trigger.batch_size, source.max_batch_size),
        "batch_window": trigger.batch_window,
        "max_batch_bytes": trigger.max_batch_bytes,
        "filters": tuple(trigger.filters),
        "report_batch_item_failures": trigger.report_batch_item_failures,
        "enabled": trigger.enabled,
    }


def connector_triggers(function: str, settings: FunctionSettings | None) -> list[Bound]:
    """The function's triggers of connector types (all but eventfn's own), as their connectors are told them."""
    if settings is None:
        return []
    return [_bound(function, name, t) for name, t in _named(settings) if type(t) not in BUILTIN_TRIGGERS.values()]


def _named(settings: FunctionSettings) -> list[tuple[str, TriggerOptions]]:
    """Each trigger with its name: its own, or `t<index>`."""
    return [(t.name or f"t{i}", t) for i, t in enumerate(settings.trigger_list())]


def _bound(function: str, name: str, trigger: Any) -> Bound:
    return Bound(function=function, mapping=f"{function}--{name}", name=name, trigger=trigger)


def _trigger_source(trigger: Trigger) -> Source:
    return plain_subjects(
        trigger.subjects,
        ordering=Ordering(model=trigger.ordering, key=trigger.key),
        start_position=trigger.starting_position,
        start_time=trigger.starting_position_timestamp,
    )


def _pinned_for(mapping: Mapping, pin_timeout: float) -> Mapping:
    """The mapping with its exclusive consumer's pin held `pin_timeout` seconds (`[recovery]`)."""
    consumer = mapping.source.consumer
    if not consumer.exclusive or consumer.pin_timeout == pin_timeout:
        return mapping
    source = msgspec.structs.replace(
        mapping.source, consumer=msgspec.structs.replace(consumer, pin_timeout=pin_timeout)
    )
    return msgspec.structs.replace(mapping, source=source)


def _disabled(mapping: Mapping) -> Mapping:
    """A mapping of a function switched off (concurrency 0): its events wait, or are dead-lettered at once."""
    if mapping.source.when_disabled == "dead_letter":
        return msgspec.structs.replace(mapping, reject="Throttled", concurrency=1)
    return mapping


def runs_while_disabled(mapping: Mapping) -> bool:
    """Whether the mapping's dispatcher runs while its function is switched off (to dead-letter its events)."""
    return mapping.reject is not None


async def provision(
    bus: Bus, mapping: Mapping, *, from_start: bool = False, current: dict[str, Any] | Unread | None = UNREAD
) -> None:
    """Create or update the mapping's consumer; apply `enabled` when the declared value changed.

    `from_start` creates a missing consumer at the stream's first event whatever its source (for a stream
    re-created after it was deleted: all it holds arrived after that). `current`: the consumer's configuration
    as just read (`Bus.consumer_configs`; None: there is none), saving a round trip; its stream then exists.
    """
    stream = mapping.source.stream
    if mapping.source.stream_spec is not None and isinstance(current, Unread):
        await bus.ensure(mapping.source.stream_spec)
    declared = "true" if mapping.enabled else "false"
    existing = await bus.ensure_consumer(
        stream,
        mapping.name,
        filter_subjects=mapping.filter_subjects,
        ack_wait=mapping.ack_wait,
        max_ack_pending=mapping.max_inflight,
        description=f"eventfn mapping of function {mapping.function}",
        metadata={_ENABLED_KEY: declared},
        options=mapping.source.consumer,
        from_start=from_start,
        current=current,
    )
    if existing is None:
        if not mapping.enabled:  # a new consumer is not paused
            await set_enabled(bus, mapping, False)
    elif (existing.get("metadata") or {}).get(_ENABLED_KEY) != declared:
        await set_enabled(bus, mapping, mapping.enabled)


class Provisioned:
    """What `provision_all` did: the mappings whose consumers are in place, those a queue's stream refused (another
    consumer takes its messages), and the first other error (JetStream not answering), if any."""

    def __init__(self) -> None:
        self.done: list[Mapping] = []
        self.taken: list[Mapping] = []
        self.error: Exception | None = None


async def provision_all(
    bus: Bus, wanted: Sequence[Mapping], *, from_start: bool = False, parallel: int = PROVISION_PARALLELISM
) -> Provisioned:
    """`provision` each of `wanted`, `parallel` at a time, with the consumers of each stream read in a few
    requests rather than one each (an unchanged consumer then costs no request at all). One failing does not
    stop the others."""
    out = Provisioned()
    if not wanted:
        return out
    try:
        streams = {m.source.stream: m.source.stream_spec for m in wanted}
        for spec in streams.values():
            if spec is not None:
                await bus.ensure(spec)  # once per stream, not once per shard's mapping
        configs = {stream: await bus.consumer_configs(stream) for stream in streams}
    except Exception as exc:
        out.error = exc
        return out
    limiter = anyio.CapacityLimiter(parallel)

    async def one(mapping: Mapping) -> None:
        async with limiter:
            try:
                current = configs[mapping.source.stream].get(mapping.name)
                await provision(bus, mapping, from_start=from_start, current=current)
            except ConsumerTaken:
                out.taken.append(mapping)
            except Exception as exc:  # (JetStream not answering): the others go on
                out.error = out.error or exc
            else:
                out.done.append(mapping)

    async with anyio.create_task_group() as tg:
        for mapping in wanted:
            tg.start_soon(one, mapping)
    return out


async def set_enabled(bus: Bus, mapping: Mapping, enabled: bool) -> None:
    """Resume or pause the mapping's consumer (events wait in its stream while it is paused)."""
    if enabled:
        await bus.resume_consumer(mapping.source.stream, mapping.name)
    else:
        await bus.pause_consumer(mapping.source.stream, mapping.name)
