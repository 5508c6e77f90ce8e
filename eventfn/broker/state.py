"""Connector state in JetStream KV: one bucket (`eventfn_state`), each connector under its own key prefix.

Every replica on one NATS shares it, which is what lets two bucket watchers keep one index and three schedulers
agree on the last tick fired. Revisions give compare-and-set (`create`, `update`).
"""

from __future__ import annotations

import re

import anyio
import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from eventfn.broker.bus import Bus
from eventfn.subjects import STATE_BUCKET, STATE_STREAM

#: The KV bucket (its stream is `KV_eventfn_state`).
BUCKET = STATE_BUCKET
STREAM = STATE_STREAM
_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
#: Seconds `KvState.items` waits for the keys the stream said it holds.
ITEMS_WAIT = 10.0


class Entry(msgspec.Struct, frozen=True):
    """A value of the state store and its revision (for compare-and-set)."""

    value: bytes
    revision: int


class StateStore:
    """The state bucket, opened (and created, history 1) when a connector first uses it."""

    def __init__(self, bus: Bus, *, replicas: int = 1) -> None:
        self._bus = bus
        self._replicas = replicas
        self._kv: KeyValue | None = None
        self._lock = anyio.Lock()
        self._ttl_allowed = False

    async def kv(self) -> KeyValue:
        async with self._lock:
            if self._kv is None:
                self._kv = await open_store(self._bus, replicas=self._replicas)
            return self._kv

    async def allow_ttl(self) -> None:
        """Let keys expire one by one (JetStream's per-message TTL, nats-server 2.11+), once per process."""
        if self._ttl_allowed:
            return
        await self.kv()
        async with self._lock:
            if not self._ttl_allowed:
                await self._bus.allow_message_ttl(STREAM)
                self._ttl_allowed = True

    async def put_expiring(self, key: str, value: bytes, ttl: float) -> None:
        """Store `value` under the bucket key `key` for `ttl` seconds, after which JetStream removes it."""
        await self.allow_ttl()
        await self._bus.publish_stored(f"$KV.{BUCKET}.{key}", value, headers={"Nats-TTL": f"{max(1, int(ttl))}s"})

    async def keys_stored(self, prefix: str) -> dict[str, int]:
        """The bucket's keys that start with `prefix` (deleted ones included: their marker is their last message),
        as the stream counts them."""
        return await self._bus.subject_counts(STREAM, f"$KV.{BUCKET}.{prefix}>") or {}

    def of(self, kind: str) -> KvState:
        """Connector `kind`'s view of the store."""
        return KvState(self, kind)


async def open_store(bus: Bus, *, replicas: int = 1) -> KeyValue:
    """The state bucket, created (history 1) if it does not exist yet."""
    try:
        return await bus.js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await bus.js.create_key_value(
            bucket=BUCKET, history=1, replicas=replicas, description="eventfn connector state"
        )
    except nats.js.errors.BadRequestError:  # another service created it meanwhile
        return await bus.js.key_value(BUCKET)


class KvState:
    """One connector's view of the state bucket: keys are `<type>.<key>` in KV (`sources.connector.State`)."""

    def __init__(self, store: StateStore, kind: str) -> None:
        self._store = store
        self._prefix = f"{kind}."

    def _key(self, key: str) -> str:
        if not _KEY.match(key) or key.startswith(".") or key.endswith("."):
            raise ValueError(f"state key {key!r} is invalid: use letters, digits and -_=/. (encode the rest)")
        return self._prefix + key

    async def get(self, key: str) -> Entry | None:
        try:
            entry = await (await self._store.kv()).get(self._key(key))
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is one
            return None
        return Entry(entry.value or b"", entry.revision or 0)

    async def put(self, key: str, value: bytes) -> int:
        return await (await self._store.kv()).put(self._key(key), value)

    async def create(self, key: str, value: bytes) -> int | None:
        try:
            return await (await self._store.kv()).create(self._key(key), value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        try:
            return await (await self._store.kv()).update(self._key(key), value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def delete(self, key: str) -> None:
        await (await self._store.kv()).delete(self._key(key))

    async def put_expiring(self, key: str, value: bytes, ttl: float) -> None:
        """`put`, but the key is removed after `ttl` seconds (for notes that must not pile up)."""
        await self._store.put_expiring(self._key(key), value, ttl)

    async def items(self, prefix: str = "") -> dict[str, Entry]:
        """Every key of this view that starts with `prefix`, with its value.

        Read with a KV watch, which delivers the last message of each key, deleted ones included. How many that is
        comes from the stream first: nats-py's "nothing more" marker cannot be trusted, as it may come before
        entries the server already sent (under load it did, and a bucket watcher found its index empty). A key
        removed meanwhile could leave one short: after `ITEMS_WAIT` seconds, what came is the answer.
        """
        kv = await self._store.kv()
        counts = await self._store.keys_stored(self._prefix)
        out: dict[str, Entry] = {}
        if not counts:
            return out
        watcher = await kv.watch(self._prefix + ">", ignore_deletes=False)
        seen: set[str] = set()
        try:
            with anyio.move_on_after(ITEMS_WAIT):
                async for entry in watcher:
                    if entry is None:  # the marker: not proof that nothing more comes
                        continue
                    seen.add(entry.key)
                    key = entry.key.removeprefix(self._prefix)
                    if entry.operation is None and entry.value is not None and key.startswith(prefix):
                        out[key] = Entry(entry.value, entry.revision or 0)
                    else:
                        out.pop(key, None)  # deleted or purged
                    if len(seen) >= len(counts):
                        break
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return out
