"""What a user writes: a schedule trigger's options (`[[triggers]] type = "schedule"`) and the scheduler's
service settings (`[schedules]` in `eventfn.toml`)."""

from __future__ import annotations

import difflib
import functools
import zoneinfo
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from eventfn.config import TriggerOptions
from eventfn_connectors.schedule.expressions import Expression, parse

#: What happens to ticks missed for longer than `misfire_grace` (no replica ran the schedule then):
#: `fire_once` fires one event for them all, carrying the latest missed time; `skip` drops them.
Misfire = Literal["fire_once", "skip"]


class ScheduleSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The scheduler's settings: `[schedules]` in `eventfn.toml`."""

    #: The misfire policy of triggers that do not set their own.
    misfire: Misfire = "fire_once"
    #: Seconds a tick may be late and still fire as itself (a busy replica, a quick restart, NATS away for a
    #: moment). Ticks older than this when a replica gets to them are missed: the misfire policy applies.
    misfire_grace: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 60.0


class ScheduleTrigger(TriggerOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A trigger that fires on a schedule (`type = "schedule"`), delivering EventBridge's Scheduled Event."""

    type: str = "schedule"
    #: `rate(5 minutes)`, `cron(0 12 * * ? *)` or a 5-field crontab (`expressions`).
    schedule: str
    #: The IANA timezone the expression is read in (cron and crontab; a rate is the same in any).
    timezone: str = "UTC"
    #: This trigger's misfire policy; default: `[schedules] misfire`.
    misfire: Misfire | None = None

    def __post_init__(self) -> None:
        # A ValueError here becomes a config error naming the function, the file and this trigger.
        parse(self.schedule)
        zone(self.timezone)

    @property
    def expression(self) -> Expression:
        """The parsed `schedule`."""
        return parse(self.schedule)

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        """The parsed `timezone`."""
        return zone(self.timezone)

    def describe(self) -> list[str]:
        return [f"schedule {self.schedule} {self.timezone}"]

    def upcoming(self, after: float, count: int) -> list[datetime]:
        """The next `count` fire times after `after` (epoch seconds), in the trigger's timezone."""
        tz = self.zone
        return [datetime.fromtimestamp(t, tz) for t in self.expression.upcoming(after, tz, count)]


@functools.lru_cache(maxsize=256)
def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA timezone `name`; a ValueError that says what is wrong (and what was perhaps meant) if there is
    none of that name."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        known = zoneinfo.available_timezones()
        close = difflib.get_close_matches(name, known, n=1) or difflib.get_close_matches(
            name.title(), known, n=1, cutoff=0.8
        )
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if not known:
            hint = "; this system has no timezone database: install the `tzdata` package"
        raise ValueError(
            f"timezone {name!r} is not an IANA timezone name such as 'UTC', 'Europe/Berlin' or 'America/New_York'{hint}"
        ) from exc
