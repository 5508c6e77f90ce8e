"""Connector discovery: the entry-point group `eventfn.connectors`.

Each entry point names a connector class (`eventfn.sources.connector.Connector`); its name is only a label, the
class's `type` is what triggers name. The built-ins (`eventfn_connectors`: `bucket`, `schedule`) register the
same way, in eventfn's own `pyproject.toml`. A plugin that fails to load is reported once and left out: triggers
of its type are then an error that says why, and nothing else is affected.

Found once per process (`connector_classes`); tests and embedders may `register` a class directly.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata
from typing import Any

import msgspec

log = logging.getLogger(__name__)

GROUP = "eventfn.connectors"
#: The trigger type of plain NATS subjects, which is not a connector.
SUBJECTS = "subjects"

_registered: dict[str, Any] = {}
#: Entry points that could not be used, by the type they were expected to provide (or their name): why.
_broken: dict[str, str] = {}


@functools.cache
def _discovered() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in metadata.entry_points(group=GROUP):
        where = (
            f"entry point {entry.name!r} ({entry.value}) of {entry.dist.name if entry.dist else 'an unknown package'}"
        )
        try:
            cls = entry.load()
            problem = _problem(cls)
        except (Exception, SystemExit) as exc:  # a broken plugin must not stop the service
            cls, problem = None, f"failed to import: {type(exc).__name__}: {exc}"
        if problem is not None:
            _broken[entry.name] = f"{where} {problem}"
            log.error("connector %s %s; its triggers cannot be used", where, problem)
            continue
        if cls.type in found and found[cls.type] is not cls:
            _broken[cls.type] = f"{where} declares type {cls.type!r}, which another connector has"
            log.error("connector %s declares type %r, which another connector has; it is left out", where, cls.type)
            continue
        found[cls.type] = cls
    return found


def _problem(cls: Any) -> str | None:
    kind = getattr(cls, "type", None)
    if not isinstance(kind, str) or not kind.isidentifier() or not kind.islower() or kind == SUBJECTS:
        return f"has no valid `type` (a lower-case identifier other than {SUBJECTS!r}), got {kind!r}"
    trigger = getattr(cls, "Trigger", None)
    # Checked by name: eventfn.config reads the connectors through this module, which may not import it back.
    options = [(base.__module__, base.__qualname__) for base in getattr(trigger, "__mro__", ())]
    if not (isinstance(trigger, type) and ("eventfn.config", "TriggerOptions") in options):
        # Anything else was left out of the trigger types without a word: "unknown trigger type".
        return "has no `Trigger` options type (a subclass of eventfn.config.TriggerOptions)"
    settings = getattr(cls, "Settings", None)
    if not (isinstance(settings, type) and issubclass(settings, msgspec.Struct)):
        return "has no `Settings` type (a msgspec.Struct)"
    return None


def register(cls: Any) -> None:
    """Use connector class `cls` in this process besides those found through entry points."""
    if (problem := _problem(cls)) is not None:
        raise TypeError(f"connector {cls!r} {problem}")
    _registered[cls.type] = cls


def connector_classes() -> dict[str, Any]:
    """The connector classes by trigger type."""
    return {**_discovered(), **_registered}


def why_missing(kind: str) -> str | None:
    """Why a connector of type `kind` is missing, when an entry point for it failed to load."""
    connector_classes()
    return _broken.get(kind)


def settings_sections() -> dict[str, str]:
    """`eventfn.toml` tables that hold a connector's settings, mapped to its type: its `section`, if it names
    one (the bucket watcher's `[buckets]`), else `[connectors.<type>]`."""
    return {getattr(cls, "section", None) or f"connectors.{kind}": kind for kind, cls in connector_classes().items()}
