"""The connector plugin API: how an outside source (a bucket folder, a cron schedule, a queue...) plugs in.

A connector is a class registered under the entry-point group `eventfn.connectors` (see `eventfn.plugins`) with:

- `type`: the trigger type it serves (`[[triggers]] type = "bucket"`);
- `Trigger`: its trigger options, a msgspec Struct extending `eventfn.config.TriggerOptions` (which brings the
  mapping settings every trigger has: name, batch size and window, filters, concurrency...). Unknown keys and
  bad values are errors naming the function, the file and the key;
- `Settings`: its service-level settings, a msgspec Struct read from `eventfn.toml` (`[connectors.<type>]`, or
  the table its `section` names);
- `source(bound)`: the `Source` a trigger of its type is consumed from: subjects under its own prefix
  (`Context.subject`), its record shape (`shapes`), its ordering, its own filters;
- `run(*, task_status)`: the long-running part, started into the service's task group. It watches the outside
  world and calls `context.publish(...)` with normalized events carrying ids it chose, so that a second
  announcement of one happening (a re-scan, a second replica, a restart) is dropped by JetStream;
- `update(triggers)`: told after every reload which triggers of its type exist now;
- `http_front(settings)`: optionally, an HTTP API of its own (`eventfn.web.Front`) that the service's HTTP server
  serves (the bucket watcher's S3 API), given the server's `[http]` settings (its limits, region and account).

A connector never touches NATS itself: it publishes through its `Context` (only under its own subject prefix)
and keeps its state in `Context.state`, a key-value store (JetStream KV in the service). A trigger of its type
becomes an ordinary mapping, with batching, filters, retries, partial batch failures and DLQ.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import anyio
import anyio.abc
import msgspec

from eventfn import events, subjects
from eventfn.broker.state import Entry as Entry
from eventfn.config import HttpSettings, TriggerOptions
from eventfn.sources.source import RecordShape, Source
from eventfn.web import Front

log = logging.getLogger(__name__)


class Bound(msgspec.Struct, frozen=True, kw_only=True):
    """A trigger of a connector's type, as a function declares it."""

    function: str
    #: The mapping's name, `<function>--<trigger name>`: its durable consumer too.
    mapping: str
    #: The trigger name alone (`t<index>` by default).
    name: str
    #: The trigger's options, of the connector's `Trigger` type.
    trigger: Any


class State(Protocol):
    """A connector's key-value state, shared by every replica on one NATS (JetStream KV in the service).

    Keys are the connector's own (the store prefixes them with its type): letters, digits and `-_=/.`, not
    starting or ending with `.`. Encode anything else (a file name with spaces or unicode: base64url).
    """

    async def get(self, key: str) -> Entry | None:
        """The key's value, or None."""
        ...

    async def put(self, key: str, value: bytes) -> int:
        """Set the key; returns the new revision."""
        ...

    async def create(self, key: str, value: bytes) -> int | None:
        """Set the key only if it has no value; returns the revision, or None if it had one."""
        ...

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        """Set the key only if its revision is still `revision`; returns the new one, or None if it moved on."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the key (nothing if it has no value)."""
        ...

    async def items(self, prefix: str = "") -> dict[str, Entry]:
        """Every key (starting with `prefix`) and its value, as of now."""
        ...


Publish = Callable[[str, events.Event], Awaitable[Any]]


class Context:
    """What the service gives a connector: publishing under its own subjects, state, and where things are."""

    def __init__(self, kind: str, *, publish: Publish, state: State, data_dir: Path) -> None:
        self.type = kind
        #: Every subject this connector publishes to starts with this (`eventfn.source.<type>.`).
        self.prefix = f"{subjects.SOURCE_PREFIX}{kind}."
        self._publish = publish
        self.state = state
        #: The service's data directory (`data_dir`), for files a connector keeps locally.
        self.data_dir = data_dir
        self.log = logging.getLogger(f"eventfn.connector.{kind}")

    def subject(self, *tokens: str) -> str:
        """The subject `eventfn.source.<type>.<tokens...>`; each token must be a valid NATS subject token."""
        for token in tokens:
            if not token or any(c in token for c in ".*> \t\r\n") or not token.isprintable():
                raise ValueError(f"{token!r} is not a NATS subject token")
        return self.prefix + ".".join(tokens)

    async def publish(self, subject: str, event: events.Event) -> bool:
        """Store `event` durably on `subject` (one of `self.subject(...)`); False if JetStream already had an
        event with its id (another replica, or an earlier run, announced it). Raises if it cannot be stored now
        (NATS unreachable, no leader): the caller tries again later, with the same id."""
        if not subject.startswith(self.prefix):
            raise ValueError(f"connector {self.type} may only publish under {self.prefix}>, not to {subject!r}")
        attributes = (("id", event.id), ("source", event.source), ("type", event.type), ("subject", event.subject))
        for name, value in attributes:
            if (
                value is not None and not value.isprintable()
            ):  # it becomes a NATS header: a line break would add headers of its own
                raise ValueError(f"connector {self.type}: the event's {name} {value!r} has unprintable characters")
        published = await self._publish(subject, event)
        return not getattr(published, "duplicate", False)


class NoSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A connector without service-level settings."""


class Connector:
    """Base class of connectors; subclasses set the class attributes and implement `source` and `run`."""

    #: The trigger type (a lower-case identifier).
    type: ClassVar[str]
    #: Its trigger options (extends `TriggerOptions`).
    Trigger: ClassVar[builtins.type[TriggerOptions]]
    #: Its service-level settings (`eventfn.toml`).
    Settings: ClassVar[builtins.type[msgspec.Struct]] = NoSettings
    #: The `eventfn.toml` table its settings are in; None: `[connectors.<type>]`.
    section: ClassVar[str | None] = None
    #: Record shapes its sources name (`Source.records`), added to the dispatcher's shapes by name.
    shapes: ClassVar[Mapping[str, RecordShape]] = {}

    def __init__(self, settings: Any, context: Context) -> None:
        self.settings = settings
        self.context = context
        #: The triggers of this type, as of the last `update`.
        self.triggers: tuple[Bound, ...] = ()

    def source(self, bound: Bound) -> Source:
        """Where the mapping of `bound` takes its events from."""
        raise NotImplementedError

    def update(self, triggers: Sequence[Bound]) -> None:
        """The triggers of this type now (after a reload). Called before `run` and after every change."""
        self.triggers = tuple(triggers)

    def environment(self, bound: Bound) -> dict[str, str]:
        """Environment variables a function with this trigger gets (where to read objects, say)."""
        return {}

    def http_front(self, settings: HttpSettings) -> Front | None:
        """An HTTP API the service's HTTP server routes to (the bucket watcher's S3 API), or None; `settings` are
        the server's (`[http]`)."""
        return None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch the outside world and publish until cancelled; call `task_status.started()` once watching."""
        raise NotImplementedError
