"""What the bucket watcher looks at, and when: the folders the kernel watches for it (`Folders`), and the keys
waiting to be reconciled (`KeyQueue`).

Folders are watched one by one, not recursively: watchfiles' recursive mode follows symbolic links, so a link to
`/` inside a bucket would have it watch the whole filesystem, and a link to a folder of the root would report that
folder's files under the link's path. Each real folder of a watched bucket (found by scans that never follow a
link) is watched on its own; a folder that appears is added by starting a new watch with it, which takes over
from the old one once the kernel watches everything (no gap), and then the new folder is scanned for what was
written into it before.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import stat
import time
from collections.abc import Callable

import anyio
import anyio.abc
from watchfiles import Change, awatch

#: How long a watch waits for the kernel before yielding nothing: its first yield says it watches.
_READY_MS = 100
#: A new watch waits this long for more folders to take in at once.
_GATHER = 0.05

Item = tuple[str, str]


class Folders:
    """The folders watched, and the watch (a watchfiles `awatch` on each, not recursive) that covers them."""

    def __init__(
        self,
        root: str,
        *,
        on_change: Callable[[Change, str], None],
        on_gap: Callable[[], None],
        warn: Callable[[str], None],
        debounce: float,
    ) -> None:
        self.root = root
        self.paths: set[str] = set()
        self._on_change = on_change
        self._on_gap = on_gap
        self._warn = warn
        self._debounce_ms = max(1, int(debounce * 1000))
        self._wanted = 0
        self._ready = 0
        self._running = False
        self._request = anyio.Event()
        self._covered = anyio.Event()
        #: A running watch failed: what it was reporting, and what changed until the next one watched, is lost.
        self._lost = False

    async def watch(self, paths: set[str]) -> None:
        """Watch `paths` too; returns once the kernel watches them (at once while `run` has not started: its first
        watch takes them in)."""
        new = paths - self.paths
        if not new:
            return
        self.paths |= new
        if not self._running:
            return
        self._wanted += 1
        target = self._wanted
        self._request.set()
        while self._ready < target:
            covered = self._covered
            await covered.wait()

    def forget(self, prefix: str) -> None:
        """Stop counting `prefix` and the folders under it (removed: the kernel dropped their watches)."""
        self.paths = {p for p in self.paths if p != prefix and not p.startswith(prefix + os.sep)}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep a watch on the root and the folders, replaced by a new one when folders are added; started once
        the first one watches."""
        failures = 0
        old: anyio.Event | None = None
        self._running = True
        async with anyio.create_task_group() as tg:
            while True:
                target = self._wanted
                self._request = anyio.Event()
                paths = [self.root, *sorted(p for p in self.paths if _is_folder(p))]
                stop = anyio.Event()
                try:
                    await tg.start(self._one, paths, stop)
                except Exception as exc:  # a folder removed meanwhile, the kernel's watch limit: try again
                    failures += 1
                    self._warn(f"bucket watcher: cannot watch {len(paths)} folder(s) ({type(exc).__name__}: {exc})")
                    await anyio.sleep(min(30.0, 0.5 * 2.0**failures))
                    self._on_gap()
                    continue
                if old is not None:
                    old.set()
                old = stop
                if failures or self._lost:
                    failures = 0
                    self._lost = False
                    self._on_gap()
                self._ready = target
                self._covered.set()
                self._covered = anyio.Event()
                task_status.started()
                task_status = anyio.TASK_STATUS_IGNORED
                await self._request.wait()
                await anyio.sleep(_GATHER)

    async def _one(self, paths: list[str], stop: anyio.Event, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        try:
            async for changes in awatch(
                *paths,
                watch_filter=None,
                debounce=self._debounce_ms,
                step=max(1, min(20, self._debounce_ms)),
                stop_event=stop,
                rust_timeout=_READY_MS,
                yield_on_timeout=True,
                recursive=False,
            ):
                if not started:
                    started = True
                    task_status.started()
                for change, path in changes:
                    self._on_change(change, path)
        except Exception as exc:
            if not started:
                raise
            # watchfiles fails a whole batch on one name that is not UTF-8 (`Unable to decode path`), and the
            # new watch is not ready at once: once it is, a re-scan finds what was missed meanwhile.
            self._lost = True
            self._warn(f"bucket watcher: the watch failed ({_cause(exc)}); starting a new one")
            self._wanted += 1
            self._request.set()
        finally:
            stop.set()


def _cause(exc: BaseException) -> str:
    """What went wrong, out of the task groups it was raised through."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _is_folder(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class KeyQueue:
    """Keys waiting to be reconciled, each at most once, never two workers on one key; and keys due later.

    A key is also taken out of turn (`claim`) by the S3 API, which changes it and reconciles it itself: a worker
    never has it meanwhile, and a hint that comes meanwhile (the API's own rename) is looked at after."""

    def __init__(self) -> None:
        self._pending: dict[Item, None] = {}
        self._active: set[Item] = set()
        #: Hinted again while a worker had them: reconciled once more after it.
        self._again: set[Item] = set()
        self._ready = anyio.Semaphore(0)
        self._due: list[tuple[float, int, Item]] = []
        self._due_at: dict[Item, float] = {}
        self._counter = itertools.count()
        self._due_changed = anyio.Event()
        #: Claims waiting for a worker to be done with their key.
        self._released: dict[Item, anyio.Event] = {}

    def __len__(self) -> int:
        return len(self._pending) + len(self._active) + len(self._due_at)

    def add(self, item: Item) -> None:
        if item in self._active:
            self._again.add(item)
            return
        self._due_at.pop(item, None)  # a fresh hint overrides a wait
        if item not in self._pending:
            self._pending[item] = None
            self._ready.release()

    def later(self, item: Item, delay: float) -> None:
        due = time.monotonic() + delay
        if item in self._pending or self._due_at.get(item, math.inf) <= due:
            return
        self._due_at[item] = due
        heapq.heappush(self._due, (due, next(self._counter), item))
        self._due_changed.set()

    async def get(self) -> Item:
        # One token per pending key: each waiting worker takes one, so every key wakes a worker. A key claimed
        # while pending leaves its token behind: a worker that takes a token and finds no key waits for the next.
        while True:
            await self._ready.acquire()
            if self._pending:
                break
        item = next(iter(self._pending))
        del self._pending[item]
        self._active.add(item)
        return item

    async def claim(self, item: Item) -> None:
        """Take `item` as a worker takes it (once no worker has it); give it back with `done`."""
        while item in self._active:
            released = self._released.setdefault(item, anyio.Event())
            await released.wait()
        self._pending.pop(item, None)
        self._due_at.pop(item, None)
        self._active.add(item)

    def done(self, item: Item, delay: float | None) -> None:
        self._active.discard(item)
        if (released := self._released.pop(item, None)) is not None:
            released.set()
        if item in self._again:
            self._again.discard(item)
            self.add(item)
        elif delay is not None:
            self.later(item, delay)

    async def release_due(self) -> None:
        """Move keys whose wait is over to the queue, forever."""
        while True:
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                due, _, item = heapq.heappop(self._due)
                if self._due_at.get(item) == due:
                    del self._due_at[item]
                    self.add(item)
            wait = self._due[0][0] - now if self._due else math.inf
            self._due_changed = anyio.Event()
            with anyio.move_on_after(wait):
                await self._due_changed.wait()
