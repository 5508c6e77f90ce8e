"""Event source mappings: what durable consumers a function's settings call for, and their provisioning.

Every function has one mapping for its async-invoke queue (`<function>--async`) and one per trigger
(`<function>--<trigger name>`, default `t<index>`). Each mapping is one durable pull consumer on the events
stream, filtering the trigger's subjects plus the mapping's own redrive subject, so an event redriven from
the DLQ goes back through the same batching and filters.

`enabled` is durable server-side state: a disabled mapping is a *paused* consumer (JetStream's consumer
pause), so it holds for every eventfn process on the stream and across restarts. The `enabled` value the
settings declared is kept in the consumer's metadata; provisioning applies it only when it changes, so
`eventfn mappings disable` is not undone by a restart.
"""

from __future__ import annotations

import msgspec

from eventfn import subjects
from eventfn.broker.bus import Bus
from eventfn.config import FunctionSettings, Trigger
from eventfn.filters import Filter, compile_filters
from eventfn.sources.dispatch import Mapping, feed_credit

_ENABLED_KEY = "eventfn_enabled"
_ASYNC_QUEUE = Trigger(subjects=[], name="async")


class Planned(msgspec.Struct, frozen=True, kw_only=True):
    """One mapping as the settings declare it."""

    function: str
    consumer: str
    trigger: Trigger
    timeout: float
    concurrency: int

    @property
    def filter_subjects(self) -> list[str]:
        """What the consumer takes: the trigger's subjects (or the async queue) and the redrive subject."""
        own = self.trigger.subjects or [subjects.ASYNC_PREFIX + self.function]
        return [*own, subjects.REDRIVE_PREFIX + self.consumer]

    @property
    def ack_wait(self) -> float:
        # An event waits at most a batching window plus one invocation before it is settled; the margin
        # covers the wait for a worker (long waits are marked in progress, see Mapping.ack_wait).
        return self.timeout + self.trigger.batch_window + 10.0

    @property
    def batches_at_once(self) -> int:
        """The mapping's `max_concurrency`, within the function's concurrency."""
        return min(self.trigger.max_concurrency or self.concurrency, max(1, self.concurrency))

    @property
    def max_inflight(self) -> int:
        """The feed's credit, which is also the consumer's max ack pending."""
        return feed_credit(self.batches_at_once, self.trigger.batch_size)

    def mapping(self) -> Mapping:
        """The dispatcher's view of this mapping (filters compiled)."""
        trigger = self.trigger
        return Mapping(
            function=self.function,
            consumer=self.consumer,
            batch_size=trigger.batch_size,
            batch_window=trigger.batch_window,
            max_batch_bytes=trigger.max_batch_bytes,
            filter=_filter(trigger, self.function),
            report_batch_item_failures=trigger.report_batch_item_failures,
            concurrency=self.batches_at_once,
            ack_wait=self.ack_wait,
        )


def _filter(trigger: Trigger, function: str) -> Filter | None:
    """The trigger's compiled filters, or None when they pass everything (no per-event work then)."""
    if not trigger.filters:
        return None
    compiled = compile_filters(trigger.filters, f"function {function}")
    return None if compiled.matches_everything else compiled


def plan(function: str, settings: FunctionSettings | None) -> dict[str, Planned]:
    """The mappings `settings` call for, by consumer name."""
    if settings is None:
        return {}
    triggers = [
        _ASYNC_QUEUE,
        *(t if t.name else msgspec.structs.replace(t, name=f"t{i}") for i, t in enumerate(settings.trigger_list())),
    ]
    planned = [
        Planned(
            function=function,
            consumer=f"{function}--{trigger.name}",
            trigger=trigger,
            timeout=settings.timeout,
            concurrency=settings.concurrency,
        )
        for trigger in triggers
    ]
    return {p.consumer: p for p in planned}


async def provision(bus: Bus, stream: str, planned: Planned, *, from_start: bool = False) -> None:
    """Create or update the mapping's consumer; apply `enabled` when the declared value changed.

    `from_start` creates a missing consumer at the stream's first event whatever its trigger (for a stream
    re-created after it was deleted: all it holds arrived after that).
    """
    declared = "true" if planned.trigger.enabled else "false"
    existing = await bus.consumer_metadata(stream, planned.consumer)
    await bus.ensure_consumer(
        stream,
        planned.consumer,
        filter_subjects=planned.filter_subjects,
        ack_wait=planned.ack_wait,
        max_ack_pending=planned.max_inflight,
        description=f"eventfn mapping of function {planned.function}",
        metadata={_ENABLED_KEY: declared},
        # The async queue's subject is the function's own: whatever was sent to it before its consumer existed
        # (the function was broken at first sight, or a producer came first) is its work too. Triggers on
        # shared subjects start at new events, as Lambda's LATEST.
        from_start=from_start or planned.trigger.name == _ASYNC_QUEUE.name,
    )
    if existing is None or existing.get(_ENABLED_KEY) != declared:
        await set_enabled(bus, stream, planned.consumer, planned.trigger.enabled)


async def set_enabled(bus: Bus, stream: str, consumer: str, enabled: bool) -> None:
    """Resume or pause the mapping's consumer (events wait in JetStream while it is paused)."""
    if enabled:
        await bus.resume_consumer(stream, consumer)
    else:
        await bus.pause_consumer(stream, consumer)
