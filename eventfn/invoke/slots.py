"""Concurrency limits that cost nothing when a slot is free.

anyio's CapacityLimiter yields to the event loop twice on every acquire, even with tokens free; with two
limits per invocation (the function's and the service's) that was a tenth of the dispatcher's time at
batch size 1 (py-spy). `Slots` takes a free slot synchronously and only waits when there is none; waiters
are served first come, first served.
"""

from __future__ import annotations

from collections import deque

import anyio


class Slots:
    """A counting limit: at most `total` holders at once."""

    def __init__(self, total: int) -> None:
        self._total = total
        self.used = 0
        self._waiters: deque[anyio.Event] = deque()

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = value
        self._wake()

    @property
    def available(self) -> int:
        return max(0, self._total - self.used)

    def try_take(self) -> bool:
        """Take a slot if one is free (and nobody is already waiting for one)."""
        if self.used < self._total and not self._waiters:
            self.used += 1
            return True
        return False

    async def take(self) -> None:
        """Take a slot, waiting for one if none is free."""
        if self.try_take():
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            while True:
                await event.wait()
                if self.used < self._total:
                    break
                event = anyio.Event()  # woken but beaten to it by a resize: queue again at the front
                self._waiters.appendleft(event)
        except BaseException:
            if event in self._waiters:
                self._waiters.remove(event)
            else:
                self._wake()  # we were woken but will not take the slot: pass it on
            raise
        self.used += 1

    def give(self) -> None:
        """Return a slot."""
        self.used -= 1
        self._wake()

    def _wake(self) -> None:
        free = self._total - self.used
        while free > 0 and self._waiters:
            self._waiters.popleft().set()
            free -= 1
