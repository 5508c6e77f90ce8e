"""Routes what is put to a sharded stream to its shard (placeholder until the stream work lands)."""

from __future__ import annotations

import anyio
import anyio.abc

from eventfn.broker.bus import Bus
from eventfn.config import DataStreamSettings


class Router:
    def __init__(self, bus: Bus, name: str, settings: DataStreamSettings) -> None:
        self.bus = bus
        self.name = name
        self.settings = settings

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
