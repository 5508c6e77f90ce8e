"""JetStream stalls, reported without flooding the log.

A stall is JetStream not doing its part for eventfn: a stream or consumer without a leader (an election after
a server was lost), stored publishes or pull requests failing, API calls timing out. Whatever notices one
reports it here as it happens, per message if need be; the log gets one line when a stall starts, one summary
per interval while it lasts, and one line when everything that stalled works again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Seconds between two "still stalled" lines.
INTERVAL = 10.0
#: Troubles named in one summary line; the rest are counted.
_SHOWN = 5


class _Trouble:
    __slots__ = ("count", "reason")

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.count = 1


class Stalls:
    """The one reporter of JetStream stalls for a connection; keys name what stalled ("stream EVENTFN")."""

    def __init__(self, *, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._active: dict[str, _Trouble] = {}
        self._affected: list[str] = []
        self._since = 0.0
        self._logged_at = 0.0

    @property
    def stalled(self) -> bool:
        """True while anything reported as failed has not recovered."""
        return bool(self._active)

    def failures(self, what: str) -> int:
        """How many failures of `what` were reported since it stalled (0: it is not stalled)."""
        trouble = self._active.get(what)
        return trouble.count if trouble else 0

    def failed(self, what: str, reason: str, *, since: float | None = None) -> None:
        """`what` is not working, because of `reason`; `since` is when that began, if known before now (a request
        sent then got no answer). Cheap to call for every failure."""
        now = self._clock()
        if not self._active:
            self._active[what] = _Trouble(reason)
            self._affected = [what]
            self._since = now if since is None else min(since, now)
            self._logged_at = now
            log.warning("JetStream stall: %s: %s", what, reason)
            return
        trouble = self._active.get(what)
        if trouble is None:
            self._active[what] = _Trouble(reason)
            if what not in self._affected:
                self._affected.append(what)
        else:
            trouble.reason = reason
            trouble.count += 1
        if now - self._logged_at >= self.interval:
            self._logged_at = now
            log.warning("JetStream still stalled after %.0f s: %s", now - self._since, self._summary())

    def recovered(self, what: str) -> None:
        """`what` works (again). A no-op unless it had failed; cheap enough for every success."""
        if not self._active or self._active.pop(what, None) is None or self._active:
            return
        log.info("JetStream recovered after %.1f s (%s)", self._clock() - self._since, ", ".join(self._affected))

    def forget(self, what: str) -> None:
        """`what` is no longer watched (its feed stopped): it neither keeps a stall going nor ends one in the log."""
        self._active.pop(what, None)

    def _summary(self) -> str:
        items = list(self._active.items())
        text = "; ".join(
            f"{what}: {t.reason}" + (f" ({t.count} times)" if t.count > 1 else "") for what, t in items[:_SHOWN]
        )
        if len(items) > _SHOWN:
            text += f"; and {len(items) - _SHOWN} more"
        return text
