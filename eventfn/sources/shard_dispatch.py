"""Runs one shard of a sharded stream with Kinesis's semantics (placeholder until the stream work lands)."""

from __future__ import annotations

from typing import Any

from eventfn.sources import records
from eventfn.sources.dispatch import Dispatcher


class ShardDispatcher(Dispatcher):
    def __init__(self, *args: Any, state: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = state


records.SHAPES.setdefault("kinesis", records.SqsShape())  # placeholder
