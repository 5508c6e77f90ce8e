"""The service's connectors: one instance of each installed connector type, told its triggers, run supervised.

A connector that raises is logged and started again after a backoff (up to a minute): no connector can stop the
service, and one that keeps failing keeps saying why. Its triggers' mappings run meanwhile, on what is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from eventfn import plugins
from eventfn.config import HttpSettings
from eventfn.errors import ConfigError
from eventfn.sources import records
from eventfn.sources.connector import Bound, Connector, Context, Publish, State
from eventfn.sources.source import Source
from eventfn.web import Front

log = logging.getLogger(__name__)

#: Seconds before a failed connector is started again: doubling from the first, up to the last.
RESTART_BACKOFF = (1.0, 60.0)


class Hosted:
    """The connectors of one service, by trigger type."""

    def __init__(
        self,
        settings: dict[str, dict[str, Any]],
        *,
        publish: Publish,
        state: Callable[[str], State],
        data_dir: Path,
        classes: dict[str, Any] | None = None,
    ) -> None:
        self.connectors: dict[str, Connector] = {}
        found = plugins.connector_classes() if classes is None else classes
        # The built-ins first: the record shapes they add ("s3", "eventbridge") are theirs whatever order the
        # entry points come in.
        ordered = sorted(found.items(), key=lambda item: not item[1].__module__.startswith("eventfn_connectors."))
        for kind, cls in ordered:
            try:
                options = msgspec.convert(settings.get(kind, {}), cls.Settings)
                connector = cls(options, Context(kind, publish=publish, state=state(kind), data_dir=data_dir))
            except Exception as exc:  # a broken plugin: its triggers fail to plan, nothing else is touched
                log.error("connector %s could not be set up: %s: %s", kind, type(exc).__name__, exc)
                continue
            for name, shape in cls.shapes.items():
                if name in records.SHAPES and records.SHAPES[name] is not shape:  # sqs, or another connector's
                    log.error("connector %s may not replace the record shape %r, which is taken", kind, name)
                    continue
                records.SHAPES[name] = shape
            self.connectors[kind] = connector

    def source(self, bound: Bound) -> Source:
        """The source of a connector trigger's mapping (`mappings.plan`)."""
        kind = bound.trigger.type
        connector = self.connectors.get(kind)
        if connector is None:
            raise ConfigError(f"function {bound.function}", f"trigger {bound.name}: connector {kind!r} is not running")
        try:
            source = connector.source(bound)
        except Exception as exc:  # a plugin's bug: this trigger cannot be set up, the rest of the service goes on
            raise ConfigError(
                f"function {bound.function}", f"trigger {bound.name}: connector {kind} failed: {_cause(exc)}"
            ) from exc
        prefix = connector.context.prefix
        if not source.subjects or not all(s.startswith(prefix) for s in source.subjects):
            raise ConfigError(f"connector {kind}", f"its source for {bound.mapping} must take subjects under {prefix}>")
        if source.records not in records.SHAPES:
            raise ConfigError(f"connector {kind}", f"its record shape {source.records!r} is not registered")
        return source

    def update(self, bounds: Sequence[Bound]) -> None:
        """Tell each connector the triggers of its type now."""
        for kind, connector in self.connectors.items():
            mine = [b for b in bounds if b.trigger.type == kind]
            if tuple(mine) != connector.triggers:
                try:
                    connector.update(mine)
                except Exception:
                    log.exception("connector %s: applying its triggers failed", kind)

    def http_fronts(self, settings: HttpSettings | None = None) -> list[Front]:
        """The HTTP APIs the connectors serve, under the server's `settings` (`[http]`; None: the defaults)."""
        fronts = []
        for kind, connector in self.connectors.items():
            try:
                front = connector.http_front(settings if settings is not None else HttpSettings())
            except Exception as exc:  # a broken plugin's API is left out, nothing else
                log.error("connector %s: its HTTP API could not be set up: %s: %s", kind, type(exc).__name__, exc)
                continue
            if front is not None:
                fronts.append(front)
        return fronts

    def environment(self, bounds: Sequence[Bound]) -> dict[str, str]:
        """What a function with these connector triggers gets in its environment from their connectors."""
        env: dict[str, str] = {}
        for bound in bounds:
            kind = bound.trigger.type
            connector = self.connectors.get(kind)
            if connector is None:
                continue
            try:
                env.update(connector.environment(bound))
            except Exception as exc:  # a plugin's bug must not stop the function from loading
                log.error("connector %s: the environment of %s failed: %s", kind, bound.mapping, _cause(exc))
        return env

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every connector until cancelled; started once each has said it watches (or `START_TIMEOUT` passed:
        a connector slow to start must not hold the service's start)."""
        async with anyio.create_task_group() as tg:
            waiting = []
            for kind, connector in self.connectors.items():
                status = _Started()
                waiting.append((kind, status))
                tg.start_soon(_supervised, kind, connector, status)
            with anyio.move_on_after(START_TIMEOUT):
                for _, status in waiting:
                    await status.event.wait()
            for kind, status in waiting:
                if not status.event.is_set():
                    log.warning("connector %s has not said it started after %.0f s; going on", kind, START_TIMEOUT)
            task_status.started()


#: Seconds the service's start waits for its connectors to start watching.
START_TIMEOUT = 30.0


class _Started:
    """A task status that may be told more than once (a connector started again after a failure)."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def started(self, value: None = None) -> None:
        self.event.set()


async def _supervised(kind: str, connector: Connector, status: _Started) -> None:
    first, longest = RESTART_BACKOFF
    delay = first
    while True:
        began = time.monotonic()
        try:
            await connector.run(task_status=status)
        except Exception as exc:
            log.error(
                "connector %s failed: %s; starting it again in %.0f s",
                kind,
                _cause(exc),
                delay,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        else:
            log.warning("connector %s stopped by itself; starting it again in %.0f s", kind, delay)
        status.started()
        await anyio.sleep(delay)
        # A run that went well for longer than the longest wait was not part of a failing streak.
        delay = first if time.monotonic() - began > longest else min(delay * 2, longest)


def _cause(exc: BaseException) -> str:
    """What went wrong, out of the task groups it was raised through (a connector's `run` has its own)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
