"""A connector that runs a function for every line appended to a file (a tiny log shipper)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import anyio
import msgspec

from eventfn.config import TriggerOptions
from eventfn.events import new_event
from eventfn.sources.connector import Bound, Connector
from eventfn.sources.source import Source


class LinesTrigger(TriggerOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[[triggers]] type = "lines"`: the file whose new lines are events."""

    type: str = "lines"
    file: str

    def __post_init__(self) -> None:
        if not self.file:
            raise ValueError("file must name a file")

    def describe(self) -> list[str]:
        return [f"lines of {self.file}"]


class LinesSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[connectors.lines]` in eventfn.toml."""

    interval: float = 0.2  # seconds between two looks at the files


class LinesConnector(Connector):
    type = "lines"
    Trigger = LinesTrigger
    Settings = LinesSettings

    def _token(self, path: str) -> str:  # one subject token per file
        return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]

    def source(self, bound: Bound) -> Source:
        # Every new line of the file is one event, delivered as an SQS-shaped record (the built-in shape).
        return Source(kind=self.type, subjects=(self.context.subject(self._token(bound.trigger.file)),))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            for path in {b.trigger.file for b in self.triggers}:
                await self._ship(path)
            await anyio.sleep(self.settings.interval)

    async def _ship(self, path: str) -> None:
        key = "offset." + base64.urlsafe_b64encode(str(Path(path).resolve()).encode()).decode()
        entry = await self.context.state.get(key)
        offset = int(entry.value) if entry else 0
        try:
            async with await anyio.open_file(path, "rb") as file:
                await file.seek(offset)
                data = await file.read()
        except FileNotFoundError:
            return
        token = self._token(path)
        subject = self.context.subject(token)
        while (end := data.find(b"\n")) >= 0:
            line, data = data[:end], data[end + 1 :]
            # The id names the file and the line's offset: announced again after a crash, it is dropped.
            event = new_event(path, line, source="eventfn-lines", id=f"{token}-{offset}", content_type="text/plain")
            await self.context.publish(subject, event)
            offset += end + 1
            await self.context.state.put(key, str(offset).encode())
