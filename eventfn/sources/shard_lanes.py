"""A shard's lanes and their tumbling windows.

With `parallelization_factor` N a shard has N lanes; a record's partition key picks its lane (`shards.lane_of`),
and each lane runs its batches one at a time, so the records of a key stay in order. A lane with a tumbling window
has at most one window open.

Windows are aligned to the epoch (a 60 s window runs from one whole minute to the next) and a record belongs to the
one its arrival time falls in. Each lane of a shard has at most one open window: its bounds, the state its
invocations returned, and the last record that state includes, stored in the service's key-value state (JetStream
KV) before the records are acknowledged, so that it survives restarts and hand-overs.
"""

from __future__ import annotations

import logging
from collections import deque

import anyio
import msgspec

from eventfn import decoding
from eventfn.errors import UnreadableData
from eventfn.sources.connector import State
from eventfn.sources.source import Message

log = logging.getLogger(__name__)


class Window:
    """A lane's open window: `[start, end)` (epoch seconds), the state its invocations returned (JSON), and the last
    record (stream position) that state includes."""

    __slots__ = ("end", "start", "state", "through")

    def __init__(self, start: float, end: float, state: bytes = b"{}", through: int = 0) -> None:
        self.start = start
        self.end = end
        self.state = state
        self.through = through


class Lane:
    """Records of one lane of a shard, in stream order, run one batch at a time; and its open window."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.queue: deque[Message] = deque()
        self.changed = anyio.Event()
        self.window: Window | None = None
        #: Where the last closed window ended: a late record joins the next window.
        self.closed_end = 0.0
        #: Whether its stored window was read (once, when it first has work).
        self.loaded = False

    def wake(self) -> None:
        self.changed.set()

    async def wait(self, timeout: float | None) -> None:
        """Until `wake` (or `timeout` seconds)."""
        event = self.changed
        with anyio.move_on_after(timeout):
            await event.wait()
        if self.changed is event and event.is_set():
            self.changed = anyio.Event()

    def add(self, message: Message) -> None:
        """Queue a record in stream order (a redelivery behind later records, after a keepalive lapsed, goes back
        into its place, replacing an earlier delivery of it)."""
        queue = self.queue
        if queue and queue[-1].stream_seq >= message.stream_seq:
            items = [m for m in queue if m.stream_seq != message.stream_seq]
            items.append(message)
            items.sort(key=lambda m: m.stream_seq)
            self.queue = deque(items)
        else:
            queue.append(message)
        self.wake()


def window_start(arrival_ns: int, width: float, floor: float) -> float:
    """The start of the window a record that arrived at `arrival_ns` belongs to: the one its arrival falls in,
    unless that is before `floor` (a window already closed): then the window at `floor`, the one open now."""
    start = ((arrival_ns / 1e9) // width) * width
    return max(start, floor)


class _Saved(msgspec.Struct, frozen=True):
    start: float
    end: float
    state: msgspec.Raw
    through: int


_decoder = msgspec.json.Decoder(_Saved)
_encoder = msgspec.json.Encoder()


class WindowStore:
    """The open windows of one mapping's lanes, in `state` (keys `windows/<mapping>/<lane>-of-<lanes>`: a change of
    `parallelization_factor` starts fresh windows rather than mix another lane's state in)."""

    def __init__(self, state: State, mapping: str, lanes: int) -> None:
        self._state = state
        self._mapping = mapping
        self._lanes = lanes

    def key(self, lane: int) -> str:
        return f"windows/{self._mapping}/{lane}-of-{self._lanes}"

    async def load(self, lane: int) -> Window | None:
        """The lane's stored window; None when there is none, or it cannot be read (logged: a fresh one starts)."""
        try:
            entry = await self._state.get(self.key(lane))
        except Exception as exc:
            log.warning("%s: window state not read (%s); starting a fresh window", self._mapping, exc)
            return None
        if entry is None:
            return None
        try:
            saved = decoding.typed(_decoder, entry.value)
        except UnreadableData:
            log.warning("%s: stored window state unreadable; starting a fresh window", self._mapping)
            return None
        return Window(saved.start, saved.end, bytes(saved.state), saved.through)

    async def save(self, lane: int, window: Window) -> None:
        """Store the lane's window; raises if the store cannot take it now."""
        value = _encoder.encode(_Saved(window.start, window.end, msgspec.Raw(window.state), window.through))
        await self._state.put(self.key(lane), value)

    async def drop(self, lane: int) -> None:
        """Remove the lane's window (it closed)."""
        await self._state.delete(self.key(lane))
