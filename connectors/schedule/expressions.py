"""Schedule expressions and their fire times: EventBridge's `rate(...)` and `cron(...)`, and the 5-field crontab.

- `rate(<value> <unit>)`: minute(s), hour(s), day(s), and, as an eventfn extension, second(s). As EventBridge
  requires, the unit is singular for 1 and plural otherwise. Ticks are whole multiples of the interval since the
  Unix epoch (`rate(5 minutes)` fires at :00, :05, ...): every replica and `eventfn schedules` agree on them
  without asking anyone, and they do not depend on the timezone (EventBridge Scheduler counts a rate's days as
  24 hours too).
- `cron(minutes hours day-of-month month day-of-week year)`, EventBridge's dialect: day-of-week 1-7 is SUN-SAT,
  exactly one of day-of-month and day-of-week is `?`; `L` (last day of the month; in day-of-week alone: Saturday,
  the week's last day; `6L`: the month's last Friday), `LW` (the month's last weekday), `15W` (the weekday
  nearest the 15th, within the month), `6#3` (the month's third Friday, alone in its field), years 1970-2199.
- a 5-field crontab `minute hour day-of-month month day-of-week`: day-of-week 0-7 with Sunday 0 or 7, and, as
  in Vixie cron, a day that matches either day field when both are restricted (neither starts with `*`).
  `L`, `W` and `#` work there as in `cron(...)`.

Fire times are evaluated on the wall clock of an IANA timezone, as EventBridge Scheduler does: a time that does
not exist (the hour skipped when clocks go forward) does not fire; a time that happens twice (the hour repeated
when they go back) fires once, at its first occurrence.

Why a small evaluator of our own rather than a library: apscheduler 3's `CronTrigger` counts weekdays from
Monday=0 and has no `?`, `W` or year rules of EventBridge's kind; cronsim and croniter read Vixie/Quartz-like
crontabs (Sunday=0, no `?` rule, no year field in cronsim) and run jobs of a skipped hour after the jump, where
EventBridge skips them. Translating EventBridge's dialect into either would still need a parser of our own, the
place where errors must name the position of the problem; matching is then ~100 lines.
"""

from __future__ import annotations

import bisect
import calendar
import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

#: The years a cron expression may name (EventBridge's range); fire times are looked for within them.
FIRST_YEAR, LAST_YEAR = 1970, 2199
#: The longest rate: its ticks must stay representable as dates.
MAX_RATE_SECONDS = 100 * 365 * 86_400

MONTHS = {name: i + 1 for i, name in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
#: Weekday names, Sunday first; internally a weekday is 0 (Sunday) to 6 (Saturday).
WEEKDAYS = {name: i for i, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}

RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
SYNTAX = (
    "rate(<value> <unit>), cron(<minutes> <hours> <day-of-month> <month> <day-of-week> <year>) or a 5-field crontab"
)


class ExpressionError(ValueError):
    """A schedule expression that cannot be read: the message names the expression, where in it the problem is
    (1-based character and field) and what is allowed there."""

    def __init__(self, expression: str, problem: str, position: int | None = None) -> None:
        self.expression = expression
        self.problem = problem
        self.position = position
        where = f" at character {position + 1}" if position is not None else ""
        super().__init__(f"schedule {expression!r}{where}: {problem}")


class Expression:
    """A parsed schedule expression: its fire times as epoch seconds, evaluated in a timezone."""

    text: str

    def next_after(self, after: float, tz: tzinfo) -> float | None:
        """The first fire time strictly after `after`; None if there is none (before the year 2200)."""
        raise NotImplementedError

    def latest_until(self, until: float, tz: tzinfo) -> float | None:
        """The last fire time at or before `until`; None if there is none (since 1970)."""
        raise NotImplementedError

    def upcoming(self, after: float, tz: tzinfo, count: int) -> list[float]:
        """The next `count` fire times after `after` (fewer if the schedule ends)."""
        out: list[float] = []
        current: float | None = after
        while len(out) < count and current is not None:
            current = self.next_after(current, tz)
            if current is not None:
                out.append(current)
        return out


@dataclass(frozen=True)
class Rate(Expression):
    """`rate(N unit)`: every `seconds`, on multiples of it since the epoch."""

    text: str
    seconds: int

    def next_after(self, after: float, tz: tzinfo) -> float | None:
        return float((math.floor(after / self.seconds) + 1) * self.seconds)

    def latest_until(self, until: float, tz: tzinfo) -> float | None:
        return float(math.floor(until / self.seconds) * self.seconds)


@dataclass(frozen=True)
class _Days:
    """What a day-of-month or day-of-week field selects."""

    #: Plain values (days of the month 1-31, or weekdays 0-6 with Sunday 0); `*` is all of them.
    values: frozenset[int] = frozenset()
    #: The field is `?`: any day.
    any: bool = False
    #: The field starts with `*` (for a crontab's rule on restricted day fields).
    star: bool = False
    #: Day-of-month: `L` (last day), `LW` (last weekday), `nW` (weekday nearest day n).
    last: bool = False
    last_weekday: bool = False
    nearest_weekday: frozenset[int] = frozenset()
    #: Day-of-week: `dL` (the month's last weekday d), `d#k` (its k-th weekday d).
    last_of: frozenset[int] = frozenset()
    nth: frozenset[tuple[int, int]] = frozenset()


@dataclass(frozen=True)
class Cron(Expression):
    """A cron expression (EventBridge's 6 fields or a 5-field crontab), as sets of matching values."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    month_days: _Days
    months: frozenset[int]
    weekdays: _Days
    years: frozenset[int]
    #: Vixie cron's rule: a day matching either day field counts when both are restricted.
    either_day: bool

    @functools.cached_property
    def _times(self) -> list[int]:
        """Fire times within a day, as seconds after midnight (wall clock), in order."""
        return sorted(h * 3600 + m * 60 for h in self.hours for m in self.minutes)

    def next_after(self, after: float, tz: tzinfo) -> float | None:
        local = datetime.fromtimestamp(after, tz)
        start = local.date()
        wall = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        times = self._times
        for day in self._days(start, forward=True):
            # On the first day, earlier wall-clock times are earlier instants too (a repeated hour's first
            # occurrence comes before its second), so the search starts at the wall clock of `after`.
            for seconds in times[bisect.bisect_left(times, wall) if day == start else 0 :]:
                when = _instant(day, seconds, tz)
                if when is not None and when > after:
                    return when
        return None

    def latest_until(self, until: float, tz: tzinfo) -> float | None:
        start = datetime.fromtimestamp(until, tz).date()
        # The first day is searched whole: in a repeated hour's second occurrence, a later wall-clock time's
        # first occurrence is an earlier instant.
        for day in self._days(start, forward=False):
            for seconds in reversed(self._times):
                when = _instant(day, seconds, tz)
                if when is not None and when <= until:
                    return when
        return None

    def _days(self, start: date, *, forward: bool) -> Iterator[date]:
        """Matching days from `start` on (or back), within the years a cron expression can name."""
        year, month = start.year, start.month
        step = 1 if forward else -1
        while FIRST_YEAR <= year <= LAST_YEAR:
            if year not in self.years:
                year, month = year + step, (1 if forward else 12)
                continue
            if month in self.months:
                days = _month_days(self, year, month)
                if (year, month) == (start.year, start.month):
                    days = [d for d in days if (d >= start.day if forward else d <= start.day)]
                for day in days if forward else reversed(days):
                    yield date(year, month, day)
            month += step
            if not 1 <= month <= 12:
                year, month = year + step, (1 if forward else 12)


@functools.lru_cache(maxsize=1024)
def _month_days(cron: Cron, year: int, month: int) -> list[int]:
    """The days of one month that both day fields select (under a crontab's rule, either, when both are
    restricted)."""
    length = calendar.monthrange(year, month)[1]
    first_weekday = (calendar.weekday(year, month, 1) + 1) % 7  # Sunday 0
    by_date = _month_day_matches(cron.month_days, year, month, length)
    by_weekday = _weekday_matches(cron.weekdays, first_weekday, length)
    if cron.either_day and not cron.month_days.star and not cron.weekdays.star:
        return sorted(by_date | by_weekday)
    return sorted(by_date & by_weekday)


def _instant(day: date, seconds: int, tz: tzinfo) -> float | None:
    """The epoch time of wall-clock `seconds` after midnight on `day` in `tz`; None if that time does not exist
    there (skipped by a clock change). A repeated time gives its first occurrence (fold 0)."""
    wall = datetime.combine(day, time()) + timedelta(seconds=seconds)
    aware = wall.replace(tzinfo=tz)
    instant = aware.astimezone(UTC)
    if instant.astimezone(tz).replace(tzinfo=None) != wall:
        return None
    return instant.timestamp()


def _month_day_matches(field: _Days, year: int, month: int, length: int) -> set[int]:
    if field.any:
        return set(range(1, length + 1))
    days = {d for d in field.values if d <= length}
    if field.last:
        days.add(length)
    if field.last_weekday:
        days.add(_nearest_weekday(year, month, length, length))
    days.update(_nearest_weekday(year, month, d, length) for d in field.nearest_weekday if d <= length)
    return days


def _nearest_weekday(year: int, month: int, day: int, length: int) -> int:
    """The weekday (Monday-Friday) nearest `day`, without leaving the month (Quartz's `W`)."""
    weekday = calendar.weekday(year, month, day)  # Monday 0
    if weekday == 5:  # Saturday: the Friday before, or the Monday after if the 1st
        return day - 1 if day > 1 else day + 2
    if weekday == 6:  # Sunday: the Monday after, or the Friday before if the month's last day
        return day + 1 if day < length else day - 2
    return day


def _weekday_matches(field: _Days, first_weekday: int, length: int) -> set[int]:
    if field.any:
        return set(range(1, length + 1))
    days = {d for d in range(1, length + 1) if (first_weekday + d - 1) % 7 in field.values}
    for weekday in field.last_of:
        first = 1 + (weekday - first_weekday) % 7
        days.add(first + 7 * ((length - first) // 7))
    for weekday, nth in field.nth:
        first = 1 + (weekday - first_weekday) % 7
        if (day := first + 7 * (nth - 1)) <= length:
            days.add(day)
    return days


# -- parsing ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None
    #: Besides `, - * /`: the field's own characters.
    specials: str = ""


_EVENTBRIDGE_FIELDS = (
    _Field("minutes", 0, 59),
    _Field("hours", 0, 23),
    _Field("day-of-month", 1, 31, specials="?LW"),
    _Field("month", 1, 12, MONTHS),
    _Field("day-of-week", 1, 7, {k: v + 1 for k, v in WEEKDAYS.items()}, specials="?L#"),
    _Field("year", FIRST_YEAR, LAST_YEAR),
)
_CRONTAB_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31, specials="LW"),
    _Field("month", 1, 12, MONTHS),
    _Field("day-of-week", 0, 7, WEEKDAYS, specials="L#"),
)
_ORDINALS = ("1st", "2nd", "3rd", "4th", "5th", "6th")


@functools.lru_cache(maxsize=256)
def parse(expression: str) -> Expression:
    """Read a schedule expression; raises `ExpressionError` naming the position of the problem."""
    text = expression.strip()
    offset = len(expression) - len(expression.lstrip())
    lowered = text.lower()
    for kind in ("rate", "cron"):
        if lowered.startswith(kind) and lowered[len(kind) :].lstrip().startswith("("):
            if not text.startswith(kind + "("):
                raise ExpressionError(expression, f"write {kind}(...) in lower case, with no space before '('", offset)
            if not text.endswith(")"):
                raise ExpressionError(expression, f"{kind}( is not closed with ')'", offset + len(text))
            inner, start = text[len(kind) + 1 : -1], offset + len(kind) + 1
            if kind == "rate":
                return _parse_rate(expression, inner, start)
            return _parse_cron(expression, inner, start, _EVENTBRIDGE_FIELDS)
    words = len(text.split())
    if words == len(_CRONTAB_FIELDS):
        return _parse_cron(expression, text, offset, _CRONTAB_FIELDS)
    problem = "the schedule is empty" if not words else f"not a schedule expression ({words} words)"
    raise ExpressionError(expression, f"{problem}: write {SYNTAX}", offset if words else None)


_RATE = re.compile(r"\s*(?P<value>\S+)(?:\s+(?P<unit>\S+))?\s*")


def _parse_rate(expression: str, inner: str, start: int) -> Rate:
    match = _RATE.fullmatch(inner)
    if match is None:
        raise ExpressionError(expression, "rate(...) holds a value and a unit: rate(5 minutes)", start)
    value_text, unit = match["value"], match["unit"]
    if not (value_text.isascii() and value_text.isdigit()) or int(value_text) == 0:
        raise ExpressionError(
            expression, f"the rate's value {value_text!r} is not a positive whole number", start + match.start("value")
        )
    value = int(value_text)
    if unit is None:
        raise ExpressionError(
            expression, "the rate has no unit: minute(s), hour(s), day(s) or second(s)", start + match.end()
        )
    base = unit.removesuffix("s")
    if base not in RATE_UNITS:
        raise ExpressionError(
            expression, f"unknown unit {unit!r}: minute(s), hour(s), day(s) or second(s)", start + match.start("unit")
        )
    wanted = base if value == 1 else base + "s"
    if unit != wanted:
        raise ExpressionError(
            expression,
            f"with the value {value} the unit is {wanted!r} (EventBridge wants it singular for 1, plural otherwise)",
            start + match.start("unit"),
        )
    seconds = value * RATE_UNITS[base]
    if seconds > MAX_RATE_SECONDS:
        raise ExpressionError(expression, "the rate is longer than 100 years", start + match.start("value"))
    return Rate(text=expression.strip(), seconds=seconds)


def _parse_cron(expression: str, inner: str, start: int, fields: tuple[_Field, ...]) -> Cron:
    eventbridge = fields is _EVENTBRIDGE_FIELDS
    words = [(m.group(), start + m.start()) for m in re.finditer(r"\S+", inner)]
    if len(words) != len(fields):
        what = "cron(...) has 6 fields" if eventbridge else "a crontab has 5 fields"
        names = " ".join(f.name for f in fields)
        raise ExpressionError(expression, f"{what} ({names}), not {len(words)}", start)
    parsed = [
        _FieldParser(expression, field, word, at, index, eventbridge=eventbridge).parse()
        for index, (field, (word, at)) in enumerate(zip(fields, words, strict=True))
    ]
    if eventbridge and (words[2][0] == "?") == (words[4][0] == "?"):
        raise ExpressionError(
            expression,
            "exactly one of day-of-month (3rd field) and day-of-week (5th field) is '?' (EventBridge matches one "
            "of them): cron(0 12 * * ? *) every day, cron(0 12 ? * MON-FRI *) on weekdays",
            words[2][1] if words[2][0] != "?" else words[4][1],
        )
    return Cron(
        text=expression.strip(),
        minutes=parsed[0].values,
        hours=parsed[1].values,
        month_days=parsed[2],
        months=parsed[3].values,
        weekdays=parsed[4],
        years=parsed[5].values if eventbridge else frozenset(range(FIRST_YEAR, LAST_YEAR + 1)),
        either_day=not eventbridge,
    )


class _FieldParser:
    """One field of a cron expression: comma-separated items, each a value, a range or a step, or a special."""

    def __init__(self, expression: str, field: _Field, word: str, at: int, index: int, *, eventbridge: bool) -> None:
        self.expression = expression
        self.field = field
        self.word = word
        self.at = at
        self.label = f"the {field.name} field ({_ORDINALS[index]})"
        self.eventbridge = eventbridge
        self.weekdays = field.name == "day-of-week"

    def error(self, problem: str, offset: int = 0) -> ExpressionError:
        return ExpressionError(self.expression, f"{self.label} {problem}", self.at + offset)

    def allowed(self) -> str:
        """What the field takes, for error messages."""
        names = ""
        if self.field.names:
            first, *_, last = self.field.names
            names = f" or {first}-{last}"
        specials = "".join(f" {c}" for c in self.field.specials)
        return f"{self.field.name}: {self.field.low}-{self.field.high}{names}, with , - * /{specials}"

    def parse(self) -> _Days:
        if self.word == "?":
            if "?" not in self.field.specials:
                raise self.error(f"cannot be '?' ({self.allowed()})")
            return _Days(any=True)
        values: set[int] = set()
        last = last_weekday = False
        nearest: set[int] = set()
        last_of: set[int] = set()
        nth: set[tuple[int, int]] = set()
        items = self.word.split(",")
        offset = 0
        for item in items:
            upper = item.upper()
            specials = self.field.specials
            if not item:
                raise self.error(f"has an empty item between commas ({self.allowed()})", offset)
            if "#" in item:
                if "#" not in specials:
                    raise self.error(f"cannot use '#' ({self.allowed()})", offset + item.index("#"))
                if len(items) > 1 and self.eventbridge:
                    raise self.error("holds one item only when it uses '#' (EventBridge's rule)", offset)
                day, _, which = item.partition("#")
                if not (which.isascii() and which.isdigit() and 1 <= int(which) <= 5):
                    raise self.error(
                        f"'{item}': after '#' comes 1 to 5 (which one in the month)", offset + len(day) + 1
                    )
                nth.add((self.weekday(day, offset), int(which)))
            elif upper == "L" and "L" in specials:
                if self.weekdays:
                    values.add(6)  # the week's last day: Saturday
                else:
                    last = True
            elif upper == "LW" and "W" in specials:
                last_weekday = True
            elif upper.endswith("W") and "W" in specials:
                if item == "W":
                    raise self.error("has 'W' without a day: 15W is the weekday nearest the 15th", offset)
                nearest.add(self.number(item[:-1], offset))
            elif upper.endswith("L") and "L" in specials and self.weekdays:
                last_of.add(self.weekday(item[:-1], offset))
            elif self.weekdays:
                values.update(self.to_weekday(v) for v in self.item(item, offset))
            else:
                values.update(self.item(item, offset))
            offset += len(item) + 1
        return _Days(
            values=frozenset(values),
            star=self.word.startswith("*"),
            last=last,
            last_weekday=last_weekday,
            nearest_weekday=frozenset(nearest),
            last_of=frozenset(last_of),
            nth=frozenset(nth),
        )

    def to_weekday(self, value: int) -> int:
        """A day-of-week value as 0 (Sunday) to 6: EventBridge counts 1 (SUN) to 7 (SAT), a crontab 0 or 7
        (Sunday) to 6."""
        return (value - 1 if self.eventbridge else value) % 7

    def weekday(self, text: str, offset: int) -> int:
        """The weekday named in `dL` or `d#k`, as 0 (Sunday) to 6."""
        return self.to_weekday(self.number(text, offset))

    def item(self, item: str, offset: int) -> range:
        """A value, a range `a-b` or `*`, each maybe followed by `/step`."""
        body, slash, step_text = item.partition("/")
        step = 1
        if slash and (not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0):
            raise self.error(f"'{item}': after '/' comes a step of 1 or more", offset + len(body) + 1)
        if slash:
            step = int(step_text)
        if body == "*":
            return range(self.field.low, self.field.high + 1, step)
        first, dash, second = body.partition("-")
        low = self.number(first, offset)
        if not dash:
            # `5/15` steps from 5 to the field's end, as EventBridge's `0/15`.
            return range(low, (self.field.high if slash else low) + 1, step)
        high = self.number(second, offset + len(first) + 1)
        if high < low:
            low_end, high_end = self.field.low, self.field.high
            raise self.error(
                f"'{body}' runs backwards: write it as two ranges ({first}-{high_end},{low_end}-{second})", offset
            )
        return range(low, high + 1, step)

    def number(self, text: str, offset: int) -> int:
        """A value of the field, as a number or a name, checked against the field's range."""
        if self.field.names and text.upper() in self.field.names:
            return self.field.names[text.upper()]
        if not (text.isascii() and text.isdigit()):
            shown = repr(text) if text else "nothing"
            raise self.error(f"has {shown} where a value belongs ({self.allowed()})", offset)
        value = int(text)
        if not self.field.low <= value <= self.field.high:
            raise self.error(f"value {value} is out of range ({self.allowed()})", offset)
        return value


def kind_of(expression: Expression) -> str:
    """The syntax an expression is written in: rate, cron or crontab."""
    if isinstance(expression, Rate):
        return "rate"
    return "cron" if expression.text.startswith("cron(") else "crontab"
