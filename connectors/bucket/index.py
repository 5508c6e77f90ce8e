"""The index of a bucket: what was last announced of each object, kept in the connector's state (JetStream KV in
the service), shared by every replica and surviving restarts.

Keys: `buckets/<bucket>` marks a bucket watched at least once; `objects/<bucket>/<base64url of the key>` holds an
object's `Entry` (KV keys allow only `[-/_=.a-zA-Z0-9]`). A removed object keeps a tombstone for a while
(`TOMBSTONE_SECONDS`), so that its sequencer goes on growing and an object put back exactly as it was gets a new
event id (JetStream would drop a second event with the id of the first within its duplicate window).

Writes are compare-and-set and the higher sequencer wins: a replica that lags behind never puts an older state
back over a newer one.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time

import msgspec

from eventfn.sources.connector import State
from eventfn_connectors.bucket.files import Stat

log = logging.getLogger("eventfn.connector.bucket")

#: How long a removed object's tombstone is kept: well past JetStream's duplicate window (2 minutes).
TOMBSTONE_SECONDS = 15 * 60.0
_ATTEMPTS = 8


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """What was last announced (or, on a bucket's first watch, found) of one object."""

    size: int
    mtime_ns: int
    ino: int
    #: None where the object was indexed without being read (a bucket's first watch).
    etag: str | None
    sequencer: str
    #: Wall-clock seconds when it was removed; None while it exists.
    removed_at: float | None = None

    @property
    def live(self) -> bool:
        return self.removed_at is None

    def same_version(self, found: Stat) -> bool:
        return self.live and (self.size, self.mtime_ns, self.ino) == (found.size, found.mtime_ns, found.ino)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


def marker_key(bucket: str) -> str:
    return f"buckets/{bucket}"


def object_prefix(bucket: str) -> str:
    return f"objects/{bucket}/"


def object_key(bucket: str, key: str) -> str:
    encoded = base64.urlsafe_b64encode(key.encode("utf-8")).decode("ascii").rstrip("=")
    return object_prefix(bucket) + encoded


def key_of(state_key: str, bucket: str) -> str | None:
    """The object key a state key stands for (None if it is not one of `bucket`'s)."""
    encoded = state_key.removeprefix(object_prefix(bucket))
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class BucketIndex:
    """One bucket's index: a copy in memory, written through to the state."""

    def __init__(self, bucket: str, state: State) -> None:
        self.bucket = bucket
        self.state = state
        self.entries: dict[str, Entry] = {}
        self._revisions: dict[str, int] = {}

    async def load(self) -> None:
        """Read every entry of the bucket from the state."""
        found = await self.state.items(object_prefix(self.bucket))
        entries: dict[str, Entry] = {}
        revisions: dict[str, int] = {}
        for state_key, stored in found.items():
            key = key_of(state_key, self.bucket)
            try:
                entry = _decoder.decode(stored.value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                entry = None
            if key is None or entry is None:
                log.warning("bucket %s: index entry %s is unreadable and is ignored", self.bucket, state_key)
                continue
            entries[key] = entry
            revisions[key] = stored.revision
        self.entries, self._revisions = entries, revisions

    async def watched_before(self) -> bool:
        """Whether the bucket has been watched (and indexed) before."""
        return await self.state.get(marker_key(self.bucket)) is not None

    async def mark_watched(self) -> None:
        await self.state.create(marker_key(self.bucket), msgspec.json.encode({"since": time.time()}))

    def live(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        return entry if entry is not None and entry.live else None

    async def record(self, key: str, entry: Entry) -> Entry:
        """Store `entry` unless the state holds a newer one (a higher sequencer); returns what the index holds."""
        state_key = object_key(self.bucket, key)
        data = _encoder.encode(entry)
        for _ in range(_ATTEMPTS):
            revision = self._revisions.get(key)
            written = (
                await self.state.create(state_key, data)
                if revision is None
                else await self.state.update(state_key, data, revision)
            )
            if written is not None:
                self.entries[key] = entry
                self._revisions[key] = written
                return entry
            # Another replica wrote first: keep the newer of the two.
            stored = await self.state.get(state_key)
            if stored is None:
                self._revisions.pop(key, None)
                continue
            try:
                theirs = _decoder.decode(stored.value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self._revisions[key] = stored.revision
                continue
            self._revisions[key] = stored.revision
            if theirs.sequencer >= entry.sequencer:
                self.entries[key] = theirs
                return theirs
        raise RuntimeError(f"bucket {self.bucket}: the index entry of {key!r} kept changing under eventfn")

    async def purge(self, now: float) -> int:
        """Remove tombstones older than `TOMBSTONE_SECONDS`; returns how many."""
        purged = 0
        for key, entry in list(self.entries.items()):
            if entry.removed_at is None or now - entry.removed_at < TOMBSTONE_SECONDS:
                continue
            state_key = object_key(self.bucket, key)
            stored = await self.state.get(state_key)
            # Only if nobody changed it meanwhile (the state has no delete-if-revision; this narrows the window).
            if stored is None or stored.revision == self._revisions.get(key):
                await self.state.delete(state_key)
                purged += 1
                self.entries.pop(key, None)
                self._revisions.pop(key, None)
                continue
            try:
                self.entries[key] = _decoder.decode(stored.value)
                self._revisions[key] = stored.revision
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.entries.pop(key, None)
                self._revisions.pop(key, None)
        return purged

    def forget(self) -> None:
        """Drop the copy in memory (the bucket is no longer watched)."""
        self.entries.clear()
        self._revisions.clear()
