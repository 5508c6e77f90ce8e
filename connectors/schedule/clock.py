"""The scheduler's clock: what time it is, and a way to sleep until a given time. Injected, so that a test can
drive a schedule through days, DST changes and downtime in no time (`ManualClock`)."""

from __future__ import annotations

import time
from typing import Protocol

import anyio

#: The longest single sleep of `SystemClock`: a wall clock stepped by NTP, or a suspended machine, is noticed
#: within this many seconds.
MAX_NAP = 30.0


class Clock(Protocol):
    """Wall-clock time as epoch seconds."""

    def now(self) -> float:
        """The current time."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once `now()` has reached `deadline` (at once if it has)."""
        ...


class SystemClock:
    """The machine's wall clock (`time.time`)."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        # Sleep in naps: anyio sleeps on a monotonic clock, and the wall clock may be stepped meanwhile.
        while (left := deadline - time.time()) > 0:  # noqa: ASYNC110 (a deadline on the wall clock, not an event)
            await anyio.sleep(min(left, MAX_NAP))


class ManualClock:
    """A clock that moves only when told (`set`, `advance`): sleepers wake as it passes their deadlines."""

    def __init__(self, start: float) -> None:
        self._now = start
        self._moved: anyio.Event | None = None

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        while self._now < deadline:
            if self._moved is None:
                self._moved = anyio.Event()
            await self._moved.wait()

    def set(self, when: float) -> None:
        """Jump to `when` (forward, or back as a stepped wall clock can)."""
        self._now = when
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    def advance(self, seconds: float) -> None:
        """Move forward by `seconds`."""
        self.set(self._now + seconds)
