"""The cron scheduler (`type = "schedule"`): EventBridge Scheduled Events on `rate(...)`, `cron(...)` and crontab
schedules in an IANA timezone, one event per tick however many replicas run."""

from __future__ import annotations

from eventfn_connectors.schedule.clock import Clock, ManualClock, SystemClock
from eventfn_connectors.schedule.connector import EventBridgeShape, ScheduleConnector, ScheduledEvent, tick_id
from eventfn_connectors.schedule.expressions import Cron, Expression, ExpressionError, Rate, parse
from eventfn_connectors.schedule.options import Misfire, ScheduleSettings, ScheduleTrigger, zone

__all__ = [
    "Clock",
    "Cron",
    "EventBridgeShape",
    "Expression",
    "ExpressionError",
    "ManualClock",
    "Misfire",
    "Rate",
    "ScheduleConnector",
    "ScheduleSettings",
    "ScheduleTrigger",
    "ScheduledEvent",
    "SystemClock",
    "parse",
    "tick_id",
    "zone",
]
