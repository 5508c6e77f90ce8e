"""The cron scheduler: each schedule trigger's ticks, published once each as EventBridge Scheduled Events.

Exactly one event per tick, however many replicas run against one NATS:
- every replica sleeps until a schedule's next tick and then publishes it with an id derived from the schedule
  and the tick (`tick_id`), so that JetStream keeps one of the replicas' publishes (its duplicate window, two
  minutes on the events stream, covers replicas whose clocks differ by less);
- the last tick published is recorded per schedule in the connector's state (JetStream KV), moved forward only
  by compare-and-set. A replica reads it before publishing: a tick that another replica, or this one before a
  restart, has already published is not published again, however long ago that was.

A tick is published at its time. One that is late by less than `misfire_grace` (a busy replica, a quick
restart, NATS away for a moment) still fires as itself. Ticks missed for longer (no replica ran) follow the
misfire policy: `fire_once` publishes one event, carrying the latest missed time; `skip` drops them. A schedule
seen for the first time (no record) starts with its next tick; a changed schedule (new expression or timezone)
does not make up ticks missed under the old one.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import anyio
import anyio.abc
import msgspec

from eventfn import events, subjects
from eventfn.sources.connector import Bound, Connector, Context
from eventfn.sources.records import REGION
from eventfn.sources.source import Message, RecordShape, Source
from eventfn_connectors.schedule.clock import Clock, SystemClock
from eventfn_connectors.schedule.options import ScheduleSettings, ScheduleTrigger

log = logging.getLogger(__name__)

#: `account` of the events and their rules' ARNs (eventfn's ARNs use the same).
ACCOUNT = "000000000000"
RULE_ARN_PREFIX = f"arn:aws:events:{REGION}:{ACCOUNT}:rule/"
#: The CloudEvents attributes of a tick: EventBridge's `source`, and its `detail-type` under it.
EVENT_SOURCE = "aws.events"
EVENT_TYPE = "aws.events.Scheduled Event"
_ID_NAMESPACE = uuid.UUID("0b5f3c52-9d0e-4a55-8d1c-3c7f1f6f2a61")
#: Retrying a schedule whose publish or state failed: the first delay, doubled up to the last.
RETRY_DELAYS = (1.0, 30.0)
#: Compare-and-set attempts when recording a tick against replicas doing the same.
RECORD_ATTEMPTS = 5


class ScheduledEvent(msgspec.Struct, frozen=True, kw_only=True, rename={"detail_type": "detail-type"}):
    """EventBridge's Scheduled Event, field for field as EventBridge writes it."""

    version: str = "0"
    id: str
    detail_type: str = "Scheduled Event"
    source: str = EVENT_SOURCE
    account: str = ACCOUNT
    #: The tick's scheduled time, ISO 8601 in UTC with whole seconds (`2024-06-01T12:00:00Z`).
    time: str
    region: str = REGION
    #: The schedule's rule ARN.
    resources: tuple[str, ...]
    detail: dict[str, Any] = {}


class _Fired(msgspec.Struct, frozen=True):
    """A schedule's record in the state: the last tick published (or passed over), and the schedule it was
    published under (`expression@timezone`)."""

    tick: float
    schedule: str


_event_encoder = msgspec.json.Encoder()
_fired_decoder = msgspec.json.Decoder(_Fired)


def tick_id(mapping: str, tick: float) -> str:
    """The event id of `mapping`'s tick at `tick` (epoch seconds): the same on every replica, every time."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{mapping}@{math.floor(tick)}"))


def rule_arn(mapping: str) -> str:
    """The ARN a schedule's events name in `resources`: an EventBridge rule named after the mapping."""
    return RULE_ARN_PREFIX + mapping


def scheduled_event(mapping: str, tick: float) -> bytes:
    """The Scheduled Event of `mapping`'s tick at `tick`."""
    when = datetime.fromtimestamp(math.floor(tick), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return _event_encoder.encode(ScheduledEvent(id=tick_id(mapping, tick), time=when, resources=(rule_arn(mapping),)))


class EventBridgeShape:
    """Batches of Scheduled Events: at batch size 1 the event itself (as EventBridge invokes Lambda), otherwise
    a JSON list of them."""

    unwrap_single = True

    def batch(self, messages: Sequence[Message], ids: Sequence[str], source_arn: str) -> bytes:
        return _event_encoder.encode([_raw(m.data) for m in messages])


def _raw(data: bytes) -> msgspec.Raw | str:
    """The event's JSON as it is; data that is not JSON (not published by the scheduler) as a string."""
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "backslashreplace")
    return msgspec.Raw(data)


class _Plan:
    """One schedule as this replica runs it."""

    def __init__(self, bound: Bound, settings: ScheduleSettings, context: Context) -> None:
        trigger: ScheduleTrigger = bound.trigger
        self.mapping = bound.mapping
        self.expression = trigger.expression
        self.zone = trigger.zone
        self.misfire = trigger.misfire or settings.misfire
        self.fingerprint = f"{trigger.schedule}@{trigger.timezone}"
        self.key = f"{bound.function}/{bound.name}"
        self.subject = context.subject(bound.function, bound.name)
        #: When to look at it next (its next tick); -inf: at once (a new plan first reads its record).
        self.due: float | None = -math.inf
        self.failures = 0

    def same_as(self, other: _Plan) -> bool:
        return (other.fingerprint, other.misfire, other.subject) == (self.fingerprint, self.misfire, self.subject)

    def when(self, tick: float) -> str:
        """`tick` on the schedule's wall clock, for logs."""
        return datetime.fromtimestamp(tick, self.zone).isoformat()


class ScheduleConnector(Connector):
    """Schedule triggers (`type = "schedule"`): EventBridge Scheduled Events on `rate(...)`, `cron(...)` or
    crontab schedules, one event per tick across replicas."""

    type = "schedule"
    Trigger = ScheduleTrigger
    Settings = ScheduleSettings
    section = "schedules"
    shapes: ClassVar[Mapping[str, RecordShape]] = {"eventbridge": EventBridgeShape()}

    def __init__(self, settings: ScheduleSettings | None, context: Context, *, clock: Clock | None = None) -> None:
        super().__init__(settings or ScheduleSettings(), context)
        self.clock: Clock = clock or SystemClock()
        self._plans: dict[str, _Plan] = {}
        #: The sleep between ticks, cancelled by `update` so that changed schedules are planned at once.
        self._sleep: anyio.CancelScope | None = None

    def source(self, bound: Bound) -> Source:
        return Source(
            kind=self.type,
            stream=subjects.EVENTS_STREAM,
            subjects=(self.context.subject(bound.function, bound.name),),
            records="eventbridge",
            max_batch_size=1,
        )

    def update(self, triggers: Sequence[Bound]) -> None:
        super().update(triggers)
        plans: dict[str, _Plan] = {}
        for bound in triggers:
            plan = _Plan(bound, self.settings, self.context)
            old = self._plans.get(bound.mapping)
            if old is not None and old.same_as(plan):
                plan = old
            else:
                self.context.log.info(
                    "schedule %s: %s in %s (misfire %s)", plan.mapping, plan.expression.text, plan.zone, plan.misfire
                )
            plans[bound.mapping] = plan
        for mapping in self._plans.keys() - plans.keys():
            self.context.log.info("schedule %s: removed", mapping)
        self._plans = plans
        if self._sleep is not None:
            self._sleep.cancel()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            now = self.clock.now()
            for plan in list(self._plans.values()):
                if plan.due is not None and plan.due <= now and self._plans.get(plan.mapping) is plan:
                    await self._tend(plan, now)
            wake = min((p.due for p in self._plans.values() if p.due is not None), default=None)
            with anyio.CancelScope() as self._sleep:
                if wake is None:
                    await anyio.sleep_forever()
                else:
                    await self.clock.sleep_until(wake)
            self._sleep = None

    async def _tend(self, plan: _Plan, now: float) -> None:
        """Publish what is due of `plan` and plan its next tick; trouble (NATS unreachable) is retried later."""
        try:
            await self._fire_due(plan, now)
        except Exception as exc:  # the state or the stream is unreachable: what is due stays due
            plan.failures += 1
            delay = min(RETRY_DELAYS[0] * 2 ** (plan.failures - 1), RETRY_DELAYS[1])
            self.context.log.warning(
                "schedule %s: %s: %s; trying again in %.0fs", plan.mapping, type(exc).__name__, exc, delay
            )
            plan.due = now + delay
            return
        plan.failures = 0
        plan.due = plan.expression.next_after(now, plan.zone)
        if plan.due is None:
            self.context.log.warning("schedule %s (%s) has no fire time left", plan.mapping, plan.fingerprint)

    async def _fire_due(self, plan: _Plan, now: float) -> None:
        """Publish `plan`'s ticks that are due at `now` and that no one has published yet."""
        fired = await self._record(plan)
        if fired is None:  # a new schedule: it starts with its next tick
            if await self.context.state.create(plan.key, _event_encoder.encode(_Fired(now, plan.fingerprint))):
                first = plan.expression.next_after(now, plan.zone)
                self.context.log.info(
                    "schedule %s (%s): new; first tick %s",
                    plan.mapping,
                    plan.fingerprint,
                    plan.when(first) if first is not None else "never",
                )
                return
            fired = await self._record(plan)  # another replica made it just now
            assert fired is not None
        expression, zone = plan.expression, plan.zone
        first = expression.next_after(fired.tick, zone)
        if first is None or first > now:
            return
        ticks: list[float] = []
        passed = fired.tick
        cutoff = now - self.settings.misfire_grace
        if first <= cutoff:
            missed = expression.latest_until(cutoff, zone)
            assert missed is not None and missed >= first
            passed = missed
            changed = fired.schedule != plan.fingerprint
            if plan.misfire == "fire_once" and not changed:
                ticks.append(missed)
            self.context.log.warning(
                "schedule %s: ticks from %s to %s were missed (no replica ran it); %s",
                plan.mapping,
                plan.when(first),
                plan.when(missed),
                f"firing once for them, as of {plan.when(missed)}"
                if ticks
                else ("skipped: the schedule changed" if changed else "skipped (misfire = skip)"),
            )
        tick = expression.next_after(max(cutoff, fired.tick), zone)
        while tick is not None and tick <= now:
            ticks.append(tick)
            tick = expression.next_after(tick, zone)
        for tick in ticks:
            event = events.new_event(
                plan.subject,
                scheduled_event(plan.mapping, tick),
                source=EVENT_SOURCE,
                type=EVENT_TYPE,
                id=tick_id(plan.mapping, tick),
                time=datetime.fromtimestamp(tick, UTC),
            )
            stored = await self.context.publish(plan.subject, event)
            self.context.log.log(
                logging.INFO if stored else logging.DEBUG,
                "schedule %s: tick %s %s (%.3fs after its time)",
                plan.mapping,
                plan.when(tick),
                "published" if stored else "was published by another replica",
                now - tick,
            )
            await self._advance(plan, tick)
        if not ticks and (passed > fired.tick or fired.schedule != plan.fingerprint):
            await self._advance(plan, passed)

    async def _record(self, plan: _Plan) -> _Fired | None:
        entry = await self.context.state.get(plan.key)
        if entry is None:
            return None
        try:
            return _fired_decoder.decode(entry.value)
        except msgspec.DecodeError:  # not ours to lose a schedule over: start it afresh
            self.context.log.warning("schedule %s: unreadable record %r; starting afresh", plan.mapping, entry.value)
            await self.context.state.delete(plan.key)
            return None

    async def _advance(self, plan: _Plan, tick: float) -> None:
        """Record `tick` as `plan`'s last, under its schedule, unless a later one is recorded already
        (compare-and-set)."""
        value = _event_encoder.encode(_Fired(tick, plan.fingerprint))
        state = self.context.state
        for _ in range(RECORD_ATTEMPTS):
            entry = await state.get(plan.key)
            if entry is None:
                if await state.create(plan.key, value) is not None:
                    return
                continue
            try:
                recorded = _fired_decoder.decode(entry.value)
                if recorded.tick > tick or (recorded.tick == tick and recorded.schedule == plan.fingerprint):
                    return
            except msgspec.DecodeError:
                pass
            if await state.update(plan.key, value, entry.revision) is not None:
                return
        self.context.log.warning(
            "schedule %s: could not record tick %s (the state kept changing)", plan.mapping, plan.when(tick)
        )
