"""The bucket watcher: turns files written into, moved into and removed from bucket folders into S3 events.

How a change becomes one event:
1. watchfiles reports a path (or a re-scan finds a difference with the index): only a hint;
2. the object's key is *reconciled*, one key at a time: its file now against what the index says was announced
   last. Unchanged: nothing. Gone: `ObjectRemoved:Delete`. New or changed: once its write is complete (no
   process has it open for writing, `files.inspect`) its MD5 is taken and `ObjectCreated:Put` (or `:Copy` for a
   file moved or linked from another key) is published;
3. after the publish, the index records it (at least once: a crash in between publishes again, with the same
   event id, which JetStream drops).

A write through the S3 API (`s3api`) is the same change seen from the other side: the API takes the key from the
workers (`apply`), renames its complete file over it (or removes it), and reconciles it at once with the event
name and ETag it knows (`ObjectCreated:Put`, `:Copy`, `:CompleteMultipartUpload`, `ObjectRemoved:Delete`),
publishing and indexing before it answers. The kernel's hint of that rename comes after and finds the index up
to date: one event per write, whichever side sees it first.

Event ids are made of the bucket, the key, the event class, the sequencer and the ETag, and the sequencer of the
file's ctime: every replica watching the same root computes the same id for the same change, and JetStream
stores it once. The index (the connector's state, JetStream KV) is shared, so a replica started later, or
restarted, announces only what changed since any of them last looked.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import anyio
import anyio.abc
import msgspec
from watchfiles import Change as FileChange

from eventfn import events, subjects
from eventfn.sources.connector import Bound, Connector, Context
from eventfn.sources.records import REGION
from eventfn.sources.source import RecordShape, Source
from eventfn.web import Front
from eventfn_connectors.bucket.files import (
    ROOT_VARIABLE,
    Ignore,
    Inspection,
    Scan,
    Stat,
    inspect,
    key_problem,
    lstat_key,
    scan,
)
from eventfn_connectors.bucket.index import BucketIndex, Entry
from eventfn_connectors.bucket.options import BucketSettings, BucketTrigger
from eventfn_connectors.bucket.records import (
    CLOUD_EVENT_TYPE_PREFIX,
    Change,
    S3Shape,
    encode_record,
    record_for,
    sequencer,
    sequencer_value,
)
from eventfn_connectors.bucket.watching import Folders, Item, KeyQueue

if TYPE_CHECKING:
    from eventfn.config import HttpSettings

#: Keys reconciled at once: each waits mostly on NATS (a publish, an index write).
WORKERS = 32
#: Files read (hashed) at once, each in a thread of its own.
READERS = 4
#: Files up to this size are read on the event loop: their MD5 takes less time than a thread's hand-over.
INLINE_BYTES = 64 * 1024
#: How often a file still open for writing is looked at again: from the first to the last, doubling.
_POLL_FIRST, _POLL_LAST = 0.05, 1.0
#: After a failure (NATS unreachable, a file that cannot be read): from the first to the last, doubling.
_RETRY_FIRST, _RETRY_LAST = 0.5, 30.0
#: A warning about failures at most this often; the rest go to the debug log.
_WARN_EVERY = 10.0
#: Seconds the S3 API waits for a worker to be done with a key it changes (hashing a huge file, say).
CLAIM_TIMEOUT = 60.0


class Written(NamedTuple):
    """A file the S3 API just renamed over a key: the event it makes, and the file it is."""

    #: `ObjectCreated:Put`, `:Copy` or `:CompleteMultipartUpload`.
    name: str
    etag: str
    stat: Stat


class NotAnnounced(Exception):
    """The S3 API changed an object, but its event could not be stored yet (NATS unreachable): the watcher goes on
    trying, as for any change it finds."""

    def __init__(self, bucket: str, key: str, cause: BaseException) -> None:
        super().__init__(
            f"bucket {bucket}: {key!r} was changed, but its event could not be stored yet "
            f"({type(cause).__name__}: {cause}); it is announced as soon as NATS takes it"
        )


class BucketConnector(Connector):
    """The S3-like bucket watcher: `[[triggers]] type = "bucket"`, settings in `[buckets]`."""

    type = "bucket"
    Trigger = BucketTrigger
    Settings = BucketSettings
    section = "buckets"
    shapes: ClassVar[Mapping[str, RecordShape]] = {"s3": S3Shape()}

    def __init__(self, settings: BucketSettings, context: Context) -> None:
        super().__init__(settings, context)
        self.settings: BucketSettings = settings
        self.log = context.log
        #: The buckets root, absolute (relative settings: to the working directory the service started in).
        self.root = Path(settings.root).absolute()
        self._root_prefix = str(self.root) + os.sep
        self.ignore = Ignore(settings.ignore, hidden=settings.ignore_hidden)
        #: Subjects some trigger takes, by bucket: a change nobody takes is indexed, not published.
        self._wanted: dict[str, tuple[str, ...]] = {}
        self._indexes: dict[str, BucketIndex] = {}
        #: Objects by (inode, size, mtime): a new key whose file is one of them was moved or linked from it.
        self._inodes: dict[tuple[int, int, int], Item] = {}
        #: Files whose writers cannot be known: the version first seen and when (the settle time runs from it).
        self._settling: dict[Item, tuple[Stat, float]] = {}
        self._polls: dict[Item, int] = {}
        self._failures: dict[Item, int] = {}
        self._refused: set[Item] = set()
        self._last_warning = -math.inf
        self._queue = KeyQueue()
        self.folders = Folders(
            str(self.root), on_change=self._hint, on_gap=self._gap, warn=self._warn, debounce=settings.debounce
        )
        self._changed = anyio.Event()
        self._reopen: set[str] = set()
        self._limiter: anyio.CapacityLimiter | None = None
        #: Where folder scans run (the service's run task group).
        self._scans: anyio.abc.TaskGroup | None = None

    # -- the plugin API -------------------------------------------------------------------------------------------

    def source(self, bound: Bound) -> Source:
        trigger: BucketTrigger = bound.trigger
        return Source(
            kind=self.type,
            stream=subjects.EVENTS_STREAM,
            subjects=self._subjects(trigger),
            records="s3",
            filters=trigger.key_filters(),
        )

    def _subjects(self, trigger: BucketTrigger) -> tuple[str, ...]:
        return tuple(self.context.subject(trigger.bucket, cls) + f".{name}" for cls, name in trigger.event_patterns())

    def update(self, triggers: Sequence[Bound]) -> None:
        super().update(triggers)
        wanted: dict[str, list[str]] = {}
        for bound in self.triggers:
            wanted.setdefault(bound.trigger.bucket, []).extend(self._subjects(bound.trigger))
        self._wanted = {bucket: tuple(found) for bucket, found in wanted.items()}
        self._changed.set()

    def environment(self, bound: Bound) -> dict[str, str]:
        return {ROOT_VARIABLE: str(self.root)}

    def http_front(self, settings: HttpSettings) -> Front:
        """The S3 API over the buckets (`eventfn_connectors.bucket.s3api`)."""
        from eventfn_connectors.bucket.s3api import S3Api  # it needs this module's types: imported when used

        return S3Api(self, settings)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._limiter = anyio.CapacityLimiter(READERS)
        # watchfiles logs each batch of changes at INFO: noise beside the one line per object announced here.
        quiet = logging.getLogger("watchfiles.main")
        if quiet.getEffectiveLevel() == logging.INFO:  # at DEBUG, keep them
            quiet.setLevel(logging.WARNING)
        if not self._wanted:
            # No trigger names a bucket: nothing to watch, and no buckets root to make in the service's directory.
            task_status.started()
            task_status = anyio.TASK_STATUS_IGNORED
            while not self._wanted:
                await self._changed.wait()
                self._changed = anyio.Event()
        async with anyio.create_task_group() as tg:
            self._scans = tg
            for _ in range(WORKERS):
                tg.start_soon(self._worker)
            tg.start_soon(self._queue.release_due)
            try:
                await anyio.to_thread.run_sync(functools.partial(self.root.mkdir, parents=True, exist_ok=True))
            except FileExistsError:  # mkdir's word for "something that is not a folder is there"
                raise NotADirectoryError(
                    f"the buckets root {self.root} is not a folder; make it one, or set [buckets] root"
                ) from None
            await tg.start(self.folders.run)
            await self._sync_buckets()
            self.log.info(
                "bucket watcher: watching %d bucket(s) under %s: %s",
                len(self._indexes),
                self.root,
                ", ".join(sorted(self._indexes)) or "none yet",
            )
            task_status.started()
            interval = self.settings.rescan_interval or math.inf
            next_rescan = time.monotonic() + interval
            while True:
                wait = next_rescan - time.monotonic()
                if self._reopen:
                    wait = min(wait, _RETRY_FIRST * 4)
                with anyio.move_on_after(max(0.0, wait)):
                    await self._changed.wait()
                if self._changed.is_set() or self._reopen:
                    self._changed = anyio.Event()
                    await self._sync_buckets()
                if time.monotonic() >= next_rescan:
                    next_rescan = time.monotonic() + interval
                    await self._rescan_all(purge=True)

    # -- buckets --------------------------------------------------------------------------------------------------

    async def _sync_buckets(self) -> None:
        """Start announcing the buckets triggers name now, stop announcing the others."""
        wanted = set(self._wanted)
        for bucket in sorted(set(self._indexes) - wanted):
            self._indexes.pop(bucket).forget()
            self._inodes = {k: v for k, v in self._inodes.items() if v[0] != bucket}
            self.folders.forget(str(self.root / bucket))
            self.log.info("bucket %s: no trigger names it any more; its changes are no longer announced", bucket)

        async def open_one(bucket: str) -> None:
            try:
                await self._open(bucket)
                self._reopen.discard(bucket)
            except Exception as exc:  # NATS or the disk: expected trouble, tried again soon
                self._indexes.pop(bucket, None)
                self._reopen.add(bucket)
                self._warn(f"bucket {bucket}: cannot start watching it ({type(exc).__name__}: {exc}); trying again")

        async with anyio.create_task_group() as tg:
            for bucket in sorted(wanted - set(self._indexes)):
                tg.start_soon(open_one, bucket)

    async def _open(self, bucket: str) -> None:
        """Index `bucket`, watch it, and announce what changed in it since it was last watched."""
        folder = self.root / bucket
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            await anyio.to_thread.run_sync(functools.partial(folder.mkdir, exist_ok=True))
            self.log.info("bucket %s: created its folder %s (a trigger names it)", bucket, folder)
            mode = os.lstat(folder).st_mode
        if not stat.S_ISDIR(mode):
            what = "a symbolic link, which eventfn never follows" if stat.S_ISLNK(mode) else "not a folder"
            raise NotADirectoryError(f"{folder} is {what}; make it a folder to use the bucket")
        index = BucketIndex(bucket, self.context.state)
        await index.load()
        first = not await index.watched_before()
        self._indexes[bucket] = index  # hints count from here; the scan below sees what came before
        for key, entry in index.entries.items():
            self._inodes[(entry.ino, entry.size, entry.mtime_ns)] = (bucket, key)
        found = await self._watched_scan(bucket)
        if first and not self.settings.announce_existing:
            await self._index_silently(index, found.objects)
            await index.mark_watched()
            self.log.info(
                "bucket %s: first watch: %d object(s) already there indexed without events (announce_existing is off)",
                bucket,
                len(found.objects),
            )
            return
        changes = self._diff(index, found)
        if first:
            await index.mark_watched()
        self.log.info(
            "bucket %s: watching %s; %d object(s) indexed, %d change(s) since it was last watched",
            bucket,
            folder,
            sum(1 for e in index.entries.values() if e.live),
            changes,
        )

    async def _watched_scan(self, bucket: str, prefix: str = "") -> Scan:
        """The objects of `bucket` under `prefix`, listed once the kernel watches every folder they are in (so that
        nothing written meanwhile goes unseen)."""
        folder = self.root / bucket / prefix
        while True:
            found = await anyio.to_thread.run_sync(functools.partial(scan, folder, self.ignore, prefix))
            paths = {str(self.root / bucket / f) if f else str(self.root / bucket) for f in found.folders}
            if paths <= self.folders.paths:
                self._report_refused(bucket, found.refused)
                return found
            await self.folders.watch(paths)

    async def _index_silently(self, index: BucketIndex, objects: dict[str, Stat]) -> None:
        limit = anyio.Semaphore(WORKERS)

        async def one(key: str, found: Stat) -> None:
            async with limit:
                await index.record(key, Entry(found.size, found.mtime_ns, found.ino, None, sequencer(found.ctime_ns)))
                self._inodes[(found.ino, found.size, found.mtime_ns)] = (index.bucket, key)

        async with anyio.create_task_group() as tg:
            for key, found in objects.items():
                tg.start_soon(one, key, found)

    def _diff(self, index: BucketIndex, found: Scan, prefix: str = "") -> int:
        """Queue every key under `prefix` that differs between the disk and the index; returns how many."""
        count = 0
        for key, seen in found.objects.items():
            entry = index.live(key)
            if entry is None or not entry.same_version(seen):
                self._queue.add((index.bucket, key))
                count += 1
        for key, entry in index.entries.items():
            if (
                entry.live
                and key.startswith(prefix)
                and key not in found.objects
                and not any(key.startswith(u) for u in found.unreadable)
            ):
                self._queue.add((index.bucket, key))
                count += 1
        return count

    async def _cover(self, bucket: str, prefix: str = "") -> None:
        """Watch and reconcile what is under `prefix` of `bucket` (a folder that appeared, the whole bucket)."""
        index = self._indexes.get(bucket)
        if index is None:
            return
        try:
            self._diff(index, await self._watched_scan(bucket, prefix), prefix)
        except Exception as exc:
            self._warn(f"bucket {bucket}: scanning {prefix or 'it'} failed ({type(exc).__name__}: {exc})")

    async def _rescan_all(self, *, purge: bool = False) -> None:
        for bucket, index in list(self._indexes.items()):
            await self._cover(bucket)
            if purge:
                try:
                    await index.purge(time.time())
                except Exception as exc:
                    self._warn(f"bucket {bucket}: removing old tombstones failed ({type(exc).__name__}: {exc})")

    def _gap(self) -> None:
        """The kernel may not have reported everything for a while: look at everything again."""
        self._spawn(self._rescan_all)

    def _report_refused(self, bucket: str, refused: dict[str, str]) -> None:
        for key, problem in refused.items():
            if (bucket, key) not in self._refused:
                self._refused.add((bucket, key))
                self.log.warning("bucket %s: %r is not an object: %s", bucket, key, problem)

    # -- watching -------------------------------------------------------------------------------------------------

    def _hint(self, change: FileChange, path: str) -> None:
        """What a reported path means: a key to reconcile, a folder to watch and scan, or nothing."""
        if not path.startswith(self._root_prefix):
            return
        parts = tuple(p for p in path[len(self._root_prefix) :].split(os.sep) if p)
        if not parts or parts[0] not in self._indexes or ".." in parts:
            return
        bucket = parts[0]
        if len(parts) == 1:  # the bucket's folder itself, removed or put back
            if change != FileChange.modified:
                self._spawn(functools.partial(self._cover, bucket))
            return
        key = "/".join(parts[1:])
        if self.ignore.key(key):
            return
        if change == FileChange.deleted:
            self._queue.add((bucket, key))
            index = self._indexes[bucket]
            if key not in index.entries:  # maybe a folder: whatever the index holds under it
                self.folders.forget(path)
                prefix = key + "/"
                for other, entry in index.entries.items():
                    if entry.live and other.startswith(prefix):
                        self._queue.add((bucket, other))
            return
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            self._queue.add((bucket, key))
            return
        if stat.S_ISDIR(mode):
            if path not in self.folders.paths:  # a folder made or moved in: watch it, then see what it holds
                self._spawn(functools.partial(self._cover, bucket, key + "/"))
        elif stat.S_ISREG(mode):
            self._queue.add((bucket, key))

    def _spawn(self, task: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # Scans run beside the workers; a task group of their own would hold the watch loop up.
        if self._scans is not None:
            self._scans.start_soon(task)

    # -- the S3 API's changes -------------------------------------------------------------------------------------

    async def apply(self, bucket: str, key: str, change: Callable[[], Stat | None], *, name: str, etag: str) -> None:
        """Make a change the S3 API was asked for and announce it before returning, as the one event of that change.

        `change` runs in a thread with the key taken from the workers (`KeyQueue.claim`): it renames a complete
        file over `key` and returns its `Stat` (announced as `name`, an `ObjectCreated` name, with `etag`), or
        removes the object and returns None (`ObjectRemoved:Delete`, if it existed). The index records it before
        the key is given back, so the hint the kernel sends about the same change finds nothing new. Raises what
        `change` raises, and NotAnnounced when the change was made but its event could not be stored yet."""
        if bucket not in self._indexes:  # no trigger names the bucket: nothing is announced
            await anyio.to_thread.run_sync(change)
            return
        item = (bucket, key)
        with anyio.fail_after(CLAIM_TIMEOUT):
            await self._queue.claim(item)
        # Until announced, the key is the workers' to look at again (a crash of this call included).
        delay: float | None = _RETRY_FIRST
        try:
            found = await anyio.to_thread.run_sync(change)
            written = Written(name, etag, found) if found is not None else None
            try:
                delay = await self._reconcile(bucket, key, written)
            except Exception as exc:
                raise NotAnnounced(bucket, key, exc) from exc
        finally:
            self._queue.done(item, delay)

    def known_etag(self, bucket: str, key: str, st: os.stat_result) -> str | None:
        """The ETag the watcher read of this very file (same inode, size and mtime), if it did."""
        index = self._indexes.get(bucket)
        entry = index.live(key) if index is not None else None
        if entry is None or entry.etag is None:
            return None
        same = (entry.size, entry.mtime_ns, entry.ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
        return entry.etag if same else None

    # -- reconciling ----------------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            item = await self._queue.get()
            delay: float | None = None
            try:
                delay = await self._reconcile(*item)
                self._failures.pop(item, None)
            except Exception as exc:  # NATS unreachable, the disk refusing: the key is tried again later
                failures = self._failures[item] = self._failures.get(item, 0) + 1
                delay = min(_RETRY_LAST, _RETRY_FIRST * 2.0 ** (failures - 1))
                self._warn(
                    f"bucket {item[0]}: {item[1]!r} could not be announced ({type(exc).__name__}: {exc}); "
                    f"trying again in {delay:.1f}s"
                )
            finally:
                self._queue.done(item, delay)

    async def _reconcile(self, bucket: str, key: str, written: Written | None = None) -> float | None:
        """Announce what changed of `key` since the index last recorded it. Returns when to look again, if at all.

        `written`: the S3 API just put this file there (its event name and ETag are known, and it is complete)."""
        index = self._indexes.get(bucket)
        if index is None:
            return None
        item = (bucket, key)
        folder = self.root / bucket
        found = lstat_key(folder, key, self.ignore)
        entry = index.entries.get(key)
        live = entry if entry is not None and entry.live else None
        if found is None or (live is not None and live.same_version(found)):
            self._settling.pop(item, None)
            self._polls.pop(item, None)
            if found is None and live is not None:
                await self._removed(index, key, live)
            return None
        if (problem := key_problem(key)) is not None:
            self._report_refused(bucket, {key: problem})
            return None
        if written is not None and written.stat.same_version(found):
            name, seen = written.name, Inspection("complete", found, written.etag)
        else:
            read = await self._read(item, found)
            if not isinstance(read, tuple):
                return read
            seen, source = read
            name = "ObjectCreated:Copy" if source is not None else "ObjectCreated:Put"
        self._settling.pop(item, None)
        self._polls.pop(item, None)
        assert seen.stat is not None
        if live is not None and live.same_version(seen.stat):
            return None
        last = sequencer_value(entry.sequencer) if entry is not None else -1
        change = Change(
            bucket=bucket,
            key=key,
            name=name,
            sequencer=sequencer(max(seen.stat.ctime_ns, last + 1)),
            time_ns=seen.stat.ctime_ns,
            size=seen.stat.size,
            etag=seen.etag,
        )
        await self._announce(change)
        st = seen.stat
        await index.record(key, Entry(st.size, st.mtime_ns, st.ino, seen.etag, change.sequencer))
        self._inodes[(st.ino, st.size, st.mtime_ns)] = item
        return None

    async def _read(self, item: Item, found: Stat) -> tuple[Inspection, tuple[Item, str | None] | None] | float:
        """The object's content, once its write is complete, and the object it was moved or linked from (if any);
        or when to look again."""
        bucket, key = item
        folder = self.root / bucket
        source = self._moved_from(found, item)
        known = self._settling.get(item)
        quiet = known is not None and known[0] == found and time.monotonic() - known[1] >= self.settings.settle
        stop = threading.Event()
        read = functools.partial(inspect, folder, key, etag=source[1] if source else None, quiet=quiet, stop=stop)
        if found.size <= INLINE_BYTES:
            # Reading a small file takes less than handing it to a thread (~70 us against ~600 us measured on 2
            # busy cores): a burst of small files would otherwise be paced by thread switches.
            seen = read()
        else:
            # Cancelled (the service stops), the thread is left to give up at its next chunk: a stop must not wait
            # for gigabytes to be read.
            try:
                seen = await anyio.to_thread.run_sync(read, limiter=self._limiter, abandon_on_cancel=True)
            finally:
                stop.set()
        if seen.status == "gone":
            return 0.0  # changed between the two looks: once more, from the start
        if seen.status == "changed":
            return _POLL_FIRST
        if seen.status == "writing":
            polls = self._polls[item] = self._polls.get(item, 0) + 1
            return min(_POLL_LAST, _POLL_FIRST * 2.0 ** (polls - 1))
        assert seen.stat is not None
        if seen.status == "unsure":
            if known is None or known[0] != seen.stat:
                self._settling[item] = (seen.stat, time.monotonic())
            return float(self.settings.settle)
        return seen, source

    def _moved_from(self, found: Stat, item: Item) -> tuple[Item, str | None] | None:
        """The object (and its ETag, if known) whose file `found` is, when it is another key's: moved or linked."""
        origin = self._inodes.get((found.ino, found.size, found.mtime_ns))
        if origin is None or origin == item or (index := self._indexes.get(origin[0])) is None:
            return None
        entry = index.entries.get(origin[1])
        if entry is None or (entry.ino, entry.size, entry.mtime_ns) != (found.ino, found.size, found.mtime_ns):
            return None
        return origin, entry.etag

    async def _removed(self, index: BucketIndex, key: str, entry: Entry) -> None:
        change = Change(
            bucket=index.bucket,
            key=key,
            name="ObjectRemoved:Delete",
            sequencer=sequencer(sequencer_value(entry.sequencer) + 1),
            time_ns=time.time_ns(),
        )
        await self._announce(change)
        await index.record(key, msgspec.structs.replace(entry, sequencer=change.sequencer, removed_at=time.time()))

    async def _announce(self, change: Change) -> None:
        cls, name = change.name.split(":")
        subject = self.context.subject(change.bucket, cls, name)
        if not any(subjects.matches(wanted, subject) for wanted in self._wanted.get(change.bucket, ())):
            self.log.debug("bucket %s: %s %r: no trigger takes it", change.bucket, change.name, change.key)
            return
        event = events.new_event(
            subject,
            encode_record(record_for(change)),
            source=f"aws:s3.{REGION}.{change.bucket}",
            type=CLOUD_EVENT_TYPE_PREFIX + change.name,
            id=change.event_id,
            time=datetime.fromtimestamp(change.time_ns / 1e9, UTC),
        )
        if await self.context.publish(subject, event):
            size = "" if change.size is None else f", {change.size} bytes"
            self.log.info("bucket %s: %s %r (sequencer %s%s)", change.bucket, change.name, change.key,
                          change.sequencer, size)  # fmt: skip
        else:
            # Another replica (or this one, before a restart) stored it first: JetStream dropped this one.
            self.log.info("bucket %s: %s %r was announced already", change.bucket, change.name, change.key)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            self.log.warning("%s", message)
        else:
            self.log.debug("%s", message)
