"""The cron scheduler without NATS: expressions and their errors, fire times on an IANA wall clock (DST, L, W, #,
years), the Scheduled Event, and the connector driven through time by a manual clock: one event per tick across
three replicas sharing one state, the misfire policy, schedules changed while running.

The replicas publish into `Stream`, JetStream's duplicate window in miniature; tests/test_schedule_e2e.py runs the
same against a real nats-server with `eventfn serve` processes."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import anyio.lowlevel
import msgspec
import pytest
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from hypothesis import given, settings
from hypothesis import strategies as st

from eventfn import events
from eventfn.config import FunctionSettings, read_function_settings
from eventfn.errors import ConfigError
from eventfn.sources.connector import Bound, Context
from eventfn.sources.memory import MemoryState
from eventfn_connectors.schedule import (
    ExpressionError,
    ManualClock,
    ScheduleConnector,
    ScheduleSettings,
    ScheduleTrigger,
    parse,
    tick_id,
)

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, tz: ZoneInfo | None = None) -> float:
    """Epoch seconds of an ISO time (naive: in `tz`, default UTC)."""
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=tz or UTC)).timestamp()


def fires(expression: str, start: str, count: int, tz: str = "UTC") -> list[str]:
    """The next `count` fire times after `start` (in `tz`), as ISO times with their UTC offset."""
    zone = ZoneInfo(tz)
    times = parse(expression).upcoming(at(start, zone), zone, count)
    return [datetime.fromtimestamp(t, zone).isoformat() for t in times]


# -- expressions and their errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "seconds"),
    [
        ("rate(1 minute)", 60),
        ("rate(5 minutes)", 300),
        ("rate(1 hour)", 3600),
        ("rate(12 hours)", 43_200),
        ("rate(1 day)", 86_400),
        ("rate(7 days)", 604_800),
        ("rate(1 second)", 1),  # eventfn's extension
        ("rate(30 seconds)", 30),
        ("  rate( 2  minutes )  ", 120),
    ],
)
def test_rate_fires_on_multiples_of_its_interval(expression: str, seconds: int) -> None:
    rate = parse(expression)
    start = at("2024-05-05T10:17:31.5")
    first = rate.next_after(start, UTC)
    assert first is not None and first % seconds == 0 and start < first <= start + seconds
    assert rate.upcoming(start, UTC, 3) == [first, first + seconds, first + 2 * seconds]
    assert rate.latest_until(first, UTC) == first and rate.latest_until(first - 0.5, UTC) == first - seconds


@pytest.mark.parametrize(
    ("expression", "position", "says"),
    [
        ("rate(1 minutes)", 8, "with the value 1 the unit is 'minute'"),
        ("rate(5 minute)", 8, "with the value 5 the unit is 'minutes'"),
        ("rate(2 second)", 8, "'seconds'"),
        ("rate(0 minutes)", 6, "'0' is not a positive whole number"),
        ("rate(-5 minutes)", 6, "not a positive whole number"),
        ("rate(1.5 hours)", 6, "not a positive whole number"),
        ("rate(5 weeks)", 8, "unknown unit 'weeks'"),
        ("rate(5)", 7, "has no unit"),
        ("rate(5 minutes", 15, "not closed"),
        ("Rate(5 minutes)", 1, "lower case"),
        ("cron(0 25 * * ? *)", 8, "the hours field (2nd) value 25 is out of range (hours: 0-23"),
        ("cron(60 12 * * ? *)", 6, "the minutes field (1st) value 60 is out of range"),
        ("cron(0 12 32 * ? *)", 11, "the day-of-month field (3rd) value 32"),
        ("cron(0 12 * JANX ? *)", 13, "the month field (4th) has 'JANX' where a value belongs (month: 1-12 or JAN-DEC"),
        ("cron(0 12 ? * 8 *)", 15, "the day-of-week field (5th) value 8 is out of range (day-of-week: 1-7 or SUN-SAT"),
        ("cron(0 12 * * ? 1969)", 17, "the year field (6th) value 1969"),
        ("cron(0 12 * * * *)", 11, "exactly one of day-of-month (3rd field) and day-of-week (5th field) is '?'"),
        ("cron(0 12 1 * MON *)", 11, "exactly one of day-of-month"),
        ("cron(0 12 ? * ? *)", 15, "exactly one of day-of-month"),
        ("cron(0 12 * * ?)", 6, "cron(...) has 6 fields (minutes hours day-of-month month day-of-week year), not 5"),
        ("cron(0 12 ? * 3#1,6#3 *)", 15, "holds one item only when it uses '#'"),
        ("cron(0 12 ? * 3#6 *)", 17, "after '#' comes 1 to 5"),
        ("cron(0 12 15# * ? *)", 13, "cannot use '#'"),
        ("cron(50-10 12 * * ? *)", 6, "'50-10' runs backwards: write it as two ranges (50-59,0-10)"),
        ("cron(0/0 12 * * ? *)", 8, "after '/' comes a step of 1 or more"),
        ("cron(0 12 1,,2 * ? *)", 13, "has an empty item between commas"),
        ("cron(0 ? * * ? *)", 8, "the hours field (2nd) cannot be '?'"),
        ("cron(0 12 W * ? *)", 11, "has 'W' without a day: 15W is the weekday nearest the 15th"),
        (
            "cron(0 12 ? * #2 *)",
            15,
            "has nothing where a value belongs (day-of-week: 1-7 or SUN-SAT, with , - * / ? L #)",
        ),
        ("61 * * * *", 1, "the minute field (1st) value 61"),
        ("0 0 ? * *", 5, "the day-of-month field (3rd) cannot be '?'"),
        ("0 0 * * 8", 9, "the day-of-week field (5th) value 8 is out of range (day-of-week: 0-7 or SUN-SAT"),
        ("* * * *", 1, "not a schedule expression (4 words)"),
        ("every 5 minutes", 1, "not a schedule expression"),
    ],
)
def test_an_invalid_expression_names_the_position_and_what_is_allowed(
    expression: str, position: int, says: str
) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(expression)
    message = str(caught.value)
    assert says in message
    assert message.startswith(f"schedule {expression!r} at character {position}: ")
    assert caught.value.position == position - 1


def test_an_empty_schedule_says_what_to_write() -> None:
    with pytest.raises(ExpressionError, match=r"the schedule is empty: write rate\(<value> <unit>\), cron\("):
        parse(" ")


# -- fire times on a wall clock ---------------------------------------------------------------------------------


def test_noon_every_day_in_a_timezone_across_months_and_a_dst_change() -> None:
    assert fires("cron(0 12 * * ? *)", "2024-03-30T13:00", 3, "Europe/Berlin") == [
        "2024-03-31T12:00:00+02:00",  # the day clocks went forward: still noon on the wall clock
        "2024-04-01T12:00:00+02:00",
        "2024-04-02T12:00:00+02:00",
    ]
    assert fires("cron(0 12 * * ? *)", "2024-01-30T12:00", 3, "Europe/Berlin") == [
        "2024-01-31T12:00:00+01:00",
        "2024-02-01T12:00:00+01:00",
        "2024-02-02T12:00:00+01:00",
    ]


def test_a_time_skipped_when_clocks_go_forward_does_not_fire() -> None:
    # EventBridge Scheduler: "if the cron expression falls on a non-existent date and time, your schedule
    # invocation gets skipped". 02:30 does not exist in Berlin on 2024-03-31, nor in New York on 2024-03-10.
    assert fires("cron(30 2 * * ? *)", "2024-03-30T00:00", 3, "Europe/Berlin") == [
        "2024-03-30T02:30:00+01:00",
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]
    assert fires("30 2 * * *", "2024-03-09T12:00", 2, "America/New_York") == [
        "2024-03-11T02:30:00-04:00",
        "2024-03-12T02:30:00-04:00",
    ]


def test_a_time_repeated_when_clocks_go_back_fires_once() -> None:
    # "When the time shifts back in the Fall, your schedule runs only once": at its first occurrence.
    assert fires("cron(30 2 * * ? *)", "2024-10-26T12:00", 3, "Europe/Berlin") == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
        "2024-10-29T02:30:00+01:00",
    ]
    assert fires("cron(0/20 * * * ? *)", "2024-10-27T02:10:00+02:00", 6, "Europe/Berlin") == [
        "2024-10-27T02:20:00+02:00",
        "2024-10-27T02:40:00+02:00",
        "2024-10-27T03:00:00+01:00",  # the repeated 02:00-02:59 (+01:00) fires nothing again
        "2024-10-27T03:20:00+01:00",
        "2024-10-27T03:40:00+01:00",
        "2024-10-27T04:00:00+01:00",
    ]
    # Asked from inside the repeated hour's second pass, the next time is after it too.
    assert fires("cron(0/20 * * * ? *)", "2024-10-27T02:10:00+01:00", 1, "Europe/Berlin") == [
        "2024-10-27T03:00:00+01:00"
    ]


def test_a_half_hour_dst_change() -> None:
    # Lord Howe Island moves its clocks by 30 minutes: 02:00 -> 02:30 on 2024-10-06, 02:00 -> 01:30 on 2024-04-07.
    assert fires("cron(15 2 * * ? *)", "2024-10-05T12:00", 2, "Australia/Lord_Howe") == [
        "2024-10-07T02:15:00+11:00",
        "2024-10-08T02:15:00+11:00",
    ]
    assert fires("cron(45 1 * * ? *)", "2024-04-06T12:00", 2, "Australia/Lord_Howe") == [
        "2024-04-07T01:45:00+11:00",
        "2024-04-08T01:45:00+10:30",
    ]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # L: the month's last day (leap February included).
        ("cron(0 9 L * ? *)", ["2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30"]),
        # LW: its last weekday (2024-03-31 is a Sunday, 2024-08-31 a Saturday).
        ("cron(0 9 LW 3,8 ? *)", ["2024-03-29", "2024-08-30", "2025-03-31", "2025-08-29"]),
        # 1W: the weekday nearest the 1st, within the month (2024-06-01 is a Saturday: Monday the 3rd).
        ("cron(0 9 1W 6,9 ? *)", ["2024-06-03", "2024-09-02", "2025-06-02", "2025-09-01"]),
        # 15W: a Saturday 15th gives Friday the 14th, a Sunday 15th Monday the 16th.
        ("cron(0 9 15W 6,9 ? *)", ["2024-06-14", "2024-09-16", "2025-06-16", "2025-09-15"]),
        # 6#3: the third Friday (1 = SUN ... 7 = SAT).
        ("cron(0 9 ? * 6#3 *)", ["2024-01-19", "2024-02-16", "2024-03-15", "2024-04-19"]),
        ("cron(0 9 ? * FRI#3 *)", ["2024-01-19", "2024-02-16", "2024-03-15", "2024-04-19"]),
        # 2#5: the fifth Monday, in months that have one.
        ("cron(0 9 ? * 2#5 *)", ["2024-01-29", "2024-04-29", "2024-07-29", "2024-09-30"]),
        # 6L: the last Friday; L alone: Saturday, the week's last day.
        ("cron(0 9 ? * 6L *)", ["2024-01-26", "2024-02-23", "2024-03-29", "2024-04-26"]),
        ("cron(0 9 ? * L *)", ["2024-01-06", "2024-01-13", "2024-01-20", "2024-01-27"]),
        # Names, ranges, steps and lists.
        ("cron(0 9 ? JAN,MAR MON-WED/2 *)", ["2024-01-01", "2024-01-03", "2024-01-08", "2024-01-10"]),
        ("cron(0 9 1/10 FEB ? *)", ["2024-02-01", "2024-02-11", "2024-02-21", "2025-02-01"]),
        # The year field, and a schedule that ends.
        ("cron(0 9 1 1 ? 2025,2027-2028)", ["2025-01-01", "2027-01-01", "2028-01-01"]),
        ("cron(0 9 1 1 ? 2020-2023)", []),
        ("cron(0 9 30 2 ? *)", []),
        # Crontab: Sunday is 0 or 7; with both day fields restricted, either matches (Vixie cron).
        ("0 9 * * 0", ["2024-01-07", "2024-01-14", "2024-01-21", "2024-01-28"]),
        ("0 9 * * 7", ["2024-01-07", "2024-01-14", "2024-01-21", "2024-01-28"]),
        ("0 9 13 * 5", ["2024-01-05", "2024-01-12", "2024-01-13", "2024-01-19"]),
        # ... unless one starts with `*`: then both must (days 1, 11, 21, 31 that are Fridays).
        ("0 9 */10 * 5", ["2024-03-01", "2024-05-31", "2024-06-21", "2024-10-11"]),
    ],
)
def test_day_rules(expression: str, expected: list[str]) -> None:
    got = fires(expression, "2024-01-01T00:00", len(expected) or 1)
    assert [t[:10] for t in got] == expected
    assert all(t[11:] == "09:00:00+00:00" for t in got)


# A walk minute by minute over the days around clock changes, reading each minute on the wall clock: the
# schedule fires at the minutes that match and are not a repeated hour's second pass (fold 1).
_WALKED = [
    ("cron(30 2 * * ? *)", lambda d: d.minute == 30 and d.hour == 2),
    ("cron(0/15 1-3 * * ? *)", lambda d: d.minute % 15 == 0 and 1 <= d.hour <= 3),
    ("cron(5 * ? * SUN *)", lambda d: d.minute == 5 and d.isoweekday() == 7),
    ("45 0-4 * * 0,6", lambda d: d.minute == 45 and d.hour <= 4 and d.isoweekday() in (6, 7)),
    ("*/7 2 * * *", lambda d: d.minute % 7 == 0 and d.hour == 2),
]
_CHANGES = [
    ("Europe/Berlin", "2024-03-30T00:00"),
    ("Europe/Berlin", "2024-10-26T00:00"),
    ("America/New_York", "2024-03-09T00:00"),
    ("America/New_York", "2024-11-02T00:00"),
    ("Australia/Lord_Howe", "2024-04-06T00:00"),
    ("Australia/Lord_Howe", "2024-10-05T00:00"),
]


@pytest.mark.parametrize(("tz", "start"), _CHANGES)
@pytest.mark.parametrize(("expression", "matches"), _WALKED)
def test_fire_times_match_a_minute_by_minute_walk_of_the_wall_clock(
    tz: str, start: str, expression: str, matches: Callable[[datetime], bool]
) -> None:
    zone = ZoneInfo(tz)
    first = at(start, zone)
    walked = []
    for minute in range(3 * 24 * 60):
        when = first + 60 * minute
        local = datetime.fromtimestamp(when, zone)
        if local.fold == 0 and matches(local):
            walked.append(when)
    parsed = parse(expression)
    assert parsed.upcoming(first - 1, zone, len(walked)) == walked
    assert [parsed.latest_until(t + 59, zone) for t in walked] == walked


@settings(max_examples=300, deadline=None)
@given(
    expression=st.sampled_from(
        [
            "cron(0/20 * * * ? *)",
            "cron(30 2 ? * MON-FRI *)",
            "cron(0 9 LW * ? *)",
            "cron(15 1 ? * 1#2 *)",
            "0 2 * * *",
            "rate(7 minutes)",
            "cron(0 0 1 1 ? 2025-2027)",
        ]
    ),
    tz=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]),
    when=st.floats(min_value=at("2024-01-01T00:00"), max_value=at("2026-12-31T00:00")),
)
def test_the_latest_fire_time_and_the_next_agree(expression: str, tz: str, when: float) -> None:
    parsed, zone = parse(expression), ZoneInfo(tz)
    latest, following = parsed.latest_until(when, zone), parsed.next_after(when, zone)
    if latest is not None:
        assert latest <= when and parsed.next_after(latest, zone) == following
    if following is not None:
        assert following > when and parsed.latest_until(following, zone) == following
        assert parsed.latest_until(following - 0.001, zone) == latest


# -- the trigger in a function's settings ----------------------------------------------------------------------


def _handler(tmp_path: Path, block: str) -> Path:
    path = tmp_path / "report.py"
    lines = "\n".join(f"# {line}" for line in block.strip().splitlines())
    path.write_text(f"# /// eventfn\n{lines}\n# ///\ndef handler(event, context):\n    return event\n")
    return path


def test_a_schedule_trigger_reads_from_function_settings(tmp_path: Path) -> None:
    path = _handler(
        tmp_path,
        """
[[triggers]]
type = "schedule"
schedule = "cron(0 12 * * ? *)"
timezone = "Europe/Berlin"
misfire = "skip"
""",
    )
    settings_ = read_function_settings("report", path, None, {})
    [trigger] = settings_.trigger_list()
    assert isinstance(trigger, ScheduleTrigger)
    assert (trigger.schedule, trigger.timezone, trigger.misfire) == ("cron(0 12 * * ? *)", "Europe/Berlin", "skip")
    assert trigger.describe() == ["schedule cron(0 12 * * ? *) Europe/Berlin"]
    assert [t.isoformat() for t in trigger.upcoming(at("2024-06-01T12:00", BERLIN), 2)] == [
        "2024-06-02T12:00:00+02:00",
        "2024-06-03T12:00:00+02:00",
    ]


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        ('schedule = "cron(0 25 * * ? *)"', "schedule 'cron(0 25 * * ? *)' at character 8: the hours field (2nd)"),
        ('schedule = "rate(1 hours)"', "with the value 1 the unit is 'hour'"),
        (
            'schedule = "rate(1 hour)"\ntimezone = "Europe/Berln"',
            "timezone 'Europe/Berln' is not an IANA timezone name such as 'UTC', 'Europe/Berlin' or "
            "'America/New_York'; did you mean 'Europe/Berlin'?",
        ),
        ('schedule = "rate(1 hour)"\nmisfire = "sometimes"', "'sometimes'"),
        ('schedule = "rate(1 hour)"\nevery = "hour"', "unknown field `every`"),
        ("timezone = 'UTC'", "missing required field `schedule`"),
    ],
)
def test_a_bad_schedule_trigger_is_an_error_naming_function_file_and_key(tmp_path: Path, lines: str, says: str) -> None:
    path = _handler(tmp_path, f'[[triggers]]\ntype = "schedule"\n{lines}')
    with pytest.raises(ConfigError) as caught:
        read_function_settings("report", path, None, {})
    message = str(caught.value)
    assert message.startswith(f"{path}: function report: invalid schedule trigger: ")
    assert says in message and "triggers[0]" in message
    assert (
        "a schedule trigger's keys are: type, name, batch_size" in message and "schedule, timezone, misfire" in message
    )


def test_the_scheduler_settings_are_checked(tmp_path: Path) -> None:
    from eventfn.config import load_service_config

    good = tmp_path / "good.toml"
    good.write_text('[schedules]\nmisfire = "skip"\nmisfire_grace = 10\n')
    assert load_service_config(good, {}).connectors["schedule"] == {"misfire": "skip", "misfire_grace": 10}
    bad = tmp_path / "bad.toml"
    bad.write_text('[schedules]\nmisfire = "later"\n')
    with pytest.raises(ConfigError, match=r"invalid setting in \[schedules\]: .*'later'"):
        load_service_config(bad, {})


def test_function_settings_accept_the_trigger_as_a_table() -> None:
    settings_ = msgspec.convert({"triggers": [{"type": "schedule", "schedule": "rate(5 minutes)"}]}, FunctionSettings)
    [trigger] = settings_.trigger_list()
    assert isinstance(trigger, ScheduleTrigger) and trigger.timezone == "UTC" and trigger.misfire is None


# -- the connector, driven through time ------------------------------------------------------------------------


class Stream:
    """Where the replicas publish: JetStream's duplicate window in miniature (one message per event id within
    `window` seconds of the first), on the test's clock."""

    def __init__(self, clock: ManualClock, window: float = 120.0) -> None:
        self.clock = clock
        self.window = window
        #: What was stored: (when, event).
        self.stored: list[tuple[float, events.Event]] = []
        self.duplicates = 0
        #: Set to make publishes fail, as when NATS is unreachable.
        self.failing = False
        self._first_seen: dict[str, float] = {}

    async def publish(self, subject: str, event: events.Event) -> Any:
        await anyio.lowlevel.checkpoint()  # a round trip: replicas publishing at the same instant interleave here
        if self.failing:
            raise ConnectionError("nats: no servers available for connection")
        now = self.clock.now()
        first = self._first_seen.get(event.id)
        if first is not None and now - first < self.window:
            self.duplicates += 1
            return SimpleNamespace(duplicate=True)
        self._first_seen[event.id] = now
        self.stored.append((now, event))
        return SimpleNamespace(duplicate=False)

    def times(self, subject: str | None = None) -> list[str]:
        """The scheduled times (`time` of each stored Scheduled Event), in the order stored."""
        return [msgspec.json.decode(e.data)["time"] for _, e in self.stored if subject in (None, e.subject)]


class SkewedClock:
    """A replica's clock: the world's time plus `skew` seconds."""

    def __init__(self, world: ManualClock, skew: float) -> None:
        self.world = world
        self.skew = skew

    def now(self) -> float:
        return self.world.now() + self.skew

    async def sleep_until(self, deadline: float) -> None:
        await self.world.sleep_until(deadline - self.skew)


class RecordingClock(ManualClock):
    """A manual clock that notes the deadlines it is asked to sleep until."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.deadlines: list[float] = []

    async def sleep_until(self, deadline: float) -> None:
        self.deadlines.append(deadline)
        await super().sleep_until(deadline)


def bound(schedule: str, *, function: str = "report", name: str = "t0", **options: Any) -> Bound:
    trigger = msgspec.convert({"type": "schedule", "schedule": schedule, **options}, ScheduleTrigger)
    return Bound(function=function, mapping=f"{function}--{name}", name=name, trigger=trigger)


def replica(
    stream: Stream,
    state: MemoryState,
    clock: Any,
    bounds: list[Bound],
    tmp_path: Path,
    settings: ScheduleSettings | None = None,
) -> ScheduleConnector:
    context = Context("schedule", publish=stream.publish, state=state, data_dir=tmp_path)
    connector = ScheduleConnector(settings or ScheduleSettings(), context, clock=clock)
    connector.update(bounds)
    return connector


@asynccontextmanager
async def running(*connectors: ScheduleConnector) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for connector in connectors:
            await tg.start(connector.run)
        await anyio.wait_all_tasks_blocked()
        yield
        tg.cancel_scope.cancel()


async def move(clock: ManualClock, to: float, step: float | None = None) -> None:
    """Move `clock` to `to` (in steps of `step` seconds), letting the connectors do what falls due each time."""
    while clock.now() < to:
        clock.set(min(to, clock.now() + step) if step else to)
        await anyio.wait_all_tasks_blocked()


async def test_a_tick_is_a_scheduled_event_that_powertools_accepts(tmp_path: Path) -> None:
    clock = ManualClock(at("2024-06-01T11:59:00"))
    stream = Stream(clock)
    connector = replica(stream, MemoryState(), clock, [bound("cron(0 14 * * ? *)", timezone="Europe/Berlin")], tmp_path)
    async with running(connector):
        await move(clock, at("2024-06-01T12:00:00.730"))  # published a little late: `time` is the scheduled one
    [(_, event)] = stream.stored
    parsed = EventBridgeModel.model_validate_json(event.data)
    assert parsed.detail_type == "Scheduled Event" and parsed.source == "aws.events"
    assert parsed.version == "0" and parsed.account == "000000000000" and parsed.region == "local"
    assert parsed.time == datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert parsed.resources == ["arn:aws:events:local:000000000000:rule/report--t0"] and parsed.detail == {}
    assert uuid.UUID(parsed.id).version == 5 and parsed.id == tick_id("report--t0", at("2024-06-01T12:00"))
    # As EventBridge writes it: its field order, whole seconds and a Z.
    assert list(msgspec.json.decode(event.data)) == [
        "version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"
    ]  # fmt: skip
    assert b'"time":"2024-06-01T12:00:00Z"' in event.data
    # The CloudEvent around it carries the same id and time, under the trigger's own subject.
    assert (event.id, event.time, event.source) == (parsed.id, "2024-06-01T12:00:00Z", "aws.events")
    assert event.subject == "eventfn.source.schedule.report.t0"
    source = connector.source(bound("rate(1 minute)"))
    assert (source.subjects, source.records, source.max_batch_size) == (
        ("eventfn.source.schedule.report.t0",), "eventbridge", 1
    )  # fmt: skip


def test_a_batch_of_scheduled_events_is_a_list_of_them() -> None:
    shape = ScheduleConnector.shapes["eventbridge"]
    first, second = b'{"id":"a","detail":{}}', b'{"id":"b","detail":{}}'
    messages = [SimpleNamespace(data=first), SimpleNamespace(data=second), SimpleNamespace(data=b"\xffnot json")]
    assert shape.unwrap_single
    assert msgspec.json.decode(shape.batch(messages, ["1", "2", "3"], "arn")) == [
        {"id": "a", "detail": {}},
        {"id": "b", "detail": {}},
        "\\xffnot json",
    ]


async def test_the_scheduler_sleeps_until_the_next_tick(tmp_path: Path) -> None:
    clock = RecordingClock(at("2024-06-01T11:58:17.3"))
    stream = Stream(clock)
    connector = replica(stream, MemoryState(), clock, [bound("cron(0/2 * * * ? *)")], tmp_path)
    async with running(connector):
        assert clock.deadlines == [at("2024-06-01T12:00")]
        await move(clock, at("2024-06-01T12:00"))
        assert clock.deadlines[-1] == at("2024-06-01T12:02") and stream.times() == ["2024-06-01T12:00:00Z"]
        assert [when for when, _ in stream.stored] == [at("2024-06-01T12:00")]


async def test_noon_in_berlin_across_days_and_a_dst_change(tmp_path: Path) -> None:
    clock = ManualClock(at("2024-03-29T13:00"))
    stream = Stream(clock)
    connector = replica(stream, MemoryState(), clock, [bound("cron(0 12 * * ? *)", timezone="Europe/Berlin")], tmp_path)
    async with running(connector):
        await move(clock, at("2024-04-02T00:00"), step=1800)
    assert stream.times() == [
        "2024-03-30T11:00:00Z",
        "2024-03-31T10:00:00Z",  # CEST from the 31st on: noon is 10:00 UTC
        "2024-04-01T10:00:00Z",
    ]


@pytest.mark.parametrize(
    ("skews", "last"),
    [
        ((0.0, 0.0, 0.0), 5),
        ((0.0, 0.8, -0.6), 5),
        # A clock 50 s fast fires each tick 50 s early (the others find it published): 12:06 by 12:05:30.
        ((0.0, 50.0, -30.0), 6),
    ],
)
async def test_three_replicas_publish_each_tick_once(
    tmp_path: Path, skews: tuple[float, float, float], last: int
) -> None:
    world = ManualClock(at("2024-06-01T11:59:30"))
    stream = Stream(world)
    state = MemoryState()
    schedules = [bound("rate(1 minute)"), bound("cron(0/2 * * * ? *)", name="even")]
    replicas = [replica(stream, state, SkewedClock(world, skew), schedules, tmp_path) for skew in skews]
    async with running(*replicas):
        await move(world, at("2024-06-01T12:05:30"), step=0.5)
    minutes = [f"2024-06-01T12:0{m}:00Z" for m in range(last + 1)]
    assert stream.times("eventfn.source.schedule.report.t0") == minutes
    assert stream.times("eventfn.source.schedule.report.even") == minutes[::2]
    if skews == (0.0, 0.0, 0.0):
        # Replicas that wake at one instant all publish: the ids make the stream keep one.
        assert stream.duplicates >= 9


async def test_a_restarted_replica_does_not_publish_a_tick_again_after_the_duplicate_window(tmp_path: Path) -> None:
    clock = ManualClock(at("2024-06-01T11:59:00"))
    stream = Stream(clock, window=120)
    state = MemoryState()
    schedules = [bound("cron(0 * * * ? *)")]
    async with running(replica(stream, state, clock, schedules, tmp_path)):
        await move(clock, at("2024-06-01T12:00:10"))
    clock.set(at("2024-06-01T12:03"))  # past the duplicate window: only the state knows 12:00 was published
    async with running(replica(stream, state, clock, schedules, tmp_path)):
        await move(clock, at("2024-06-01T13:00:10"), step=60)
    assert stream.times() == ["2024-06-01T12:00:00Z", "2024-06-01T13:00:00Z"]


@pytest.mark.parametrize(
    ("trigger_misfire", "settings_misfire", "expected"),
    [
        (None, "fire_once", ["2024-06-01T17:00:00Z"]),
        ("fire_once", "skip", ["2024-06-01T17:00:00Z"]),
        ("skip", "fire_once", []),
        (None, "skip", []),
    ],
)
async def test_ticks_missed_while_down_follow_the_misfire_policy(
    tmp_path: Path, trigger_misfire: str | None, settings_misfire: str, expected: list[str]
) -> None:
    clock = ManualClock(at("2024-06-01T11:59:00"))
    stream = Stream(clock)
    state = MemoryState()
    options = {"misfire": trigger_misfire} if trigger_misfire else {}
    schedules = [bound("cron(0 * * * ? *)", **options)]
    settings_ = ScheduleSettings(misfire=settings_misfire)  # type: ignore[arg-type]
    async with running(replica(stream, state, clock, schedules, tmp_path, settings_)):
        await move(clock, at("2024-06-01T12:00:10"))
    clock.set(at("2024-06-01T17:30"))  # down from 12:00:10 to 17:30: 13:00 to 17:00 were missed
    async with running(replica(stream, state, clock, schedules, tmp_path, settings_)):
        assert stream.times() == ["2024-06-01T12:00:00Z", *expected]
        await move(clock, at("2024-06-01T18:00"))
    assert stream.times() == ["2024-06-01T12:00:00Z", *expected, "2024-06-01T18:00:00Z"]


@pytest.mark.parametrize(("grace", "expected"), [(60.0, ["2024-06-01T12:00:00Z"]), (30.0, [])])
async def test_a_tick_late_by_less_than_the_grace_fires_as_itself(
    tmp_path: Path, grace: float, expected: list[str]
) -> None:
    clock = ManualClock(at("2024-06-01T10:59:00"))
    stream = Stream(clock)
    state = MemoryState()
    schedules = [bound("cron(0 * * * ? *)", misfire="skip")]
    settings_ = ScheduleSettings(misfire_grace=grace)
    async with running(replica(stream, state, clock, schedules, tmp_path, settings_)):
        await move(clock, at("2024-06-01T11:00:10"))
    clock.set(at("2024-06-01T12:00:40"))  # restarted 40 s after the 12:00 tick
    async with running(replica(stream, state, clock, schedules, tmp_path, settings_)):
        pass
    assert stream.times() == ["2024-06-01T11:00:00Z", *expected]


async def test_a_new_schedule_does_not_fire_for_the_past(tmp_path: Path) -> None:
    clock = ManualClock(at("2024-06-01T12:00:30"))  # just after a tick: still not the new schedule's
    stream = Stream(clock)
    async with running(replica(stream, MemoryState(), clock, [bound("cron(0 * * * ? *)")], tmp_path)):
        await move(clock, at("2024-06-01T13:00"))
    assert stream.times() == ["2024-06-01T13:00:00Z"]


async def test_a_changed_schedule_does_not_make_up_ticks_missed_under_the_old_one(tmp_path: Path) -> None:
    clock = ManualClock(at("2024-06-01T11:59:00"))
    stream = Stream(clock)
    state = MemoryState()
    async with running(replica(stream, state, clock, [bound("cron(0 * * * ? *)")], tmp_path)):
        await move(clock, at("2024-06-01T12:00:10"))
    clock.set(at("2024-06-01T17:35"))
    changed = [bound("cron(30 * * * ? *)")]
    async with running(replica(stream, state, clock, changed, tmp_path)):
        await move(clock, at("2024-06-01T18:30"))
    assert stream.times() == ["2024-06-01T12:00:00Z", "2024-06-01T18:30:00Z"]


async def test_schedules_added_changed_and_removed_while_running_take_effect(tmp_path: Path) -> None:
    clock = ManualClock(at("2024-06-01T10:00:00"))
    stream = Stream(clock)
    daily = bound("cron(0 12 * * ? *)", name="daily")
    connector = replica(stream, MemoryState(), clock, [daily], tmp_path)
    async with running(connector):
        await move(clock, at("2024-06-01T10:00:10"))
        connector.update([daily, bound("rate(1 minute)", name="often")])  # the scheduler sleeps until 12:00
        await move(clock, at("2024-06-01T10:01:10"), step=10)
        connector.update([daily, bound("rate(3 minutes)", name="often")])
        await move(clock, at("2024-06-01T10:06:10"), step=10)
        connector.update([daily])
        await move(clock, at("2024-06-01T12:00:00"), step=60)
    assert stream.times("eventfn.source.schedule.report.often") == [
        "2024-06-01T10:01:00Z",
        "2024-06-01T10:03:00Z",
        "2024-06-01T10:06:00Z",
    ]
    assert stream.times("eventfn.source.schedule.report.daily") == ["2024-06-01T12:00:00Z"]


async def test_a_tick_that_cannot_be_published_is_tried_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(at("2024-06-01T11:59:00"))
    stream = Stream(clock)
    connector = replica(stream, MemoryState(), clock, [bound("cron(0 * * * ? *)")], tmp_path)
    async with running(connector):
        stream.failing = True
        await move(clock, at("2024-06-01T12:00:20"), step=1)
        assert stream.stored == []
        assert "schedule report--t0: ConnectionError: nats: no servers available" in caplog.text
        stream.failing = False
        await move(clock, at("2024-06-01T12:00:40"), step=1)
    assert stream.times() == ["2024-06-01T12:00:00Z"]
    [(when, _)] = stream.stored
    assert at("2024-06-01T12:00:20") < when <= at("2024-06-01T12:00:40")


def test_tick_ids_differ_by_schedule_and_tick() -> None:
    ids = {tick_id(m, t) for m, t in itertools.product(["a--t0", "a--t1", "b--t0"], [0.0, 60.0, 120.0])}
    assert len(ids) == 9 and tick_id("a--t0", 60.0) == tick_id("a--t0", 60.4)


# -- eventfn schedules --------------------------------------------------------------------------------------------


def _eventfn(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventfn", *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def _errors(stderr: str) -> list[str]:
    """The command's own lines on stderr: a connector plugin that fails to import says so there too."""
    return [line for line in stderr.splitlines() if not line.startswith("connector entry point ")]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


def test_eventfn_schedules_lists_each_schedule_with_its_next_fire_times_in_its_timezone(tmp_path: Path) -> None:
    _write(
        tmp_path / "fns" / "report.py",
        """
        # /// eventfn
        # [[triggers]]
        # type = "schedule"
        # name = "noon"
        # schedule = "cron(0 12 * * ? *)"
        # timezone = "Europe/Berlin"
        # ///
        def handler(event, context):
            return None
        """,
    )
    _write(tmp_path / "fns" / "ticker.py", "def handler(event, context):\n    return None\n")
    _write(
        tmp_path / "fns" / "ticker.toml",
        'triggers = ["events.ticks", { type = "schedule", schedule = "rate(1 minute)", enabled = false }]\n',
    )
    before = time.time()
    listed = _eventfn("schedules", "--handlers", "fns", "--count", "3", "--json", cwd=tmp_path)
    after = time.time()
    assert listed.returncode == 0 and _errors(listed.stderr) == []
    noon, minutes = json.loads(listed.stdout)
    assert {k: v for k, v in noon.items() if k != "next"} == {
        "function": "report", "trigger": "noon", "schedule": "cron(0 12 * * ? *)", "timezone": "Europe/Berlin",
        "enabled": True,
    }  # fmt: skip
    days = [datetime.fromisoformat(t) for t in noon["next"]]
    assert all(d.utcoffset() == BERLIN.utcoffset(d.replace(tzinfo=None)) and d.time().isoformat() == "12:00:00"
               for d in days)  # fmt: skip
    assert [d.date() - days[0].date() for d in days] == [timedelta(days=n) for n in range(3)]
    assert before < days[0].timestamp() <= after + 86_400
    assert (minutes["function"], minutes["trigger"], minutes["timezone"], minutes["enabled"]) == (
        "ticker", "t1", "UTC", False
    )  # fmt: skip
    ticks = [datetime.fromisoformat(t).timestamp() for t in minutes["next"]]
    assert [t % 60 for t in ticks] == [0, 0, 0] and ticks[1] - ticks[0] == ticks[2] - ticks[1] == 60
    assert before < ticks[0] <= after + 60

    table = _eventfn("schedules", "--handlers", "fns", "--count", "2", cwd=tmp_path)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["FUNCTION", "TRIGGER", "SCHEDULE", "TIMEZONE", "NEXT"] and len(lines) == 5
    assert lines[1].split()[:8] == ["report", "noon", "cron(0", "12", "*", "*", "?", "*)"]
    assert lines[1].split()[8] == "Europe/Berlin" and lines[2].split() == [noon["next"][1]]
    assert lines[3].split()[:5] == ["ticker", "t1", "(disabled)", "rate(1", "minute)"]


def test_eventfn_schedules_reports_broken_functions_in_one_line_each(tmp_path: Path) -> None:
    _write(tmp_path / "handlers" / "ok.toml", 'triggers = [{ type = "schedule", schedule = "rate(5 minutes)" }]\n')
    _write(tmp_path / "handlers" / "ok.py", "def handler(event, context):\n    return None\n")
    _write(tmp_path / "handlers" / "bad.toml", 'triggers = [{ type = "schedule", schedule = "cron(0 25 * * ? *)" }]\n')
    _write(tmp_path / "handlers" / "bad.py", "def handler(event, context):\n    return None\n")
    result = _eventfn("schedules", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [problem] = _errors(result.stderr)
    assert problem.startswith("eventfn: error: function bad: ") and "bad.toml" in problem
    assert "schedule 'cron(0 25 * * ? *)' at character 8: the hours field (2nd) value 25 is out of range" in problem
    assert result.stdout.splitlines()[1].split()[:3] == ["ok", "t0", "rate(5"]

    missing = _eventfn("schedules", "--handlers", "nowhere", cwd=tmp_path)
    assert missing.returncode == 1
    assert _errors(missing.stderr) == [
        "eventfn: error: handler directory nowhere not found (give it with --handlers DIR)"
    ]
    for count in ("0", "x", "1001"):
        wrong = _eventfn("schedules", "--count", count, cwd=tmp_path)
        assert (
            wrong.returncode == 2
            and f"argument --count: '{count}' is not a whole number from 1 to 1000" in wrong.stderr
        )
