"""Which `eventfn serve` replica consumes which shard: live members in KV, each shard given to one of them.

Each replica writes a heartbeat under its own key in the state bucket. A member is live while its key keeps
changing: each replica judges that by its own clock (when it last saw the revision change), so clocks need not
agree. Every shard mapping has an owner among the live members: all replicas
compute the same owners from the same members. The shards of one mapping go round the sorted members from
a place its name picks, so they spread evenly (4 shards on 2 replicas: 2 each), and different mappings' first
shards land on different replicas.

Owning a shard means running its dispatcher. Exclusivity does not rest on this: every shard's consumer is
JetStream's pinned client, so while two replicas disagree for a moment (one has not yet seen a member come or
go) JetStream still gives the shard to one of them; the other waits as a standby. A replica that stops leaves
at once (its key deleted); one that dies is dropped once its key has not changed for `lapse` seconds.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable

import anyio
import anyio.abc

from eventfn.config import RecoverySettings
from eventfn.sources.connector import State

log = logging.getLogger(__name__)

#: Seconds between heartbeats (`[recovery] heartbeat`).
HEARTBEAT = RecoverySettings().heartbeat
#: A member whose heartbeat has not changed this long is taken for dead (`[recovery] lapse`).
LAPSE = RecoverySettings().lapse


class Owners:
    """This replica's view of the live members, and of the shards it owns among them."""

    def __init__(
        self,
        state: State,
        *,
        member: str | None = None,
        heartbeat: float = HEARTBEAT,
        lapse: float = LAPSE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.member = member or uuid.uuid4().hex[:12]
        self.heartbeat = heartbeat
        self.lapse = lapse
        self._clock = clock
        self._wall = wall
        #: Live members, this one included, sorted.
        self.members: tuple[str, ...] = (self.member,)
        #: Each member seen: its last revision and when (this replica's clock) that revision was first seen.
        self._seen: dict[str, tuple[int, float]] = {}
        #: Called when the live members change (the service re-plans which shards it runs).
        self.on_change: Callable[[], None] | None = None
        self._beats = 0

    def owns(self, group: str, index: int) -> bool:
        """Whether this replica runs shard `index` of `group` (a stream trigger's mappings) among the live members."""
        return owner(group, index, self.members) == self.member

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Beat and watch until cancelled; started once the first beat has been read back (or failed)."""
        started = False
        try:
            while True:
                try:
                    await self.beat()
                except Exception as exc:  # NATS away: keep the members last seen; shards stay where they are
                    log.debug("membership heartbeat failed: %s", exc)
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(self.heartbeat)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await self.leave()

    async def beat(self) -> None:
        """Write this member's heartbeat, read everyone's, and update the live members."""
        self._beats += 1
        await self.state.put(self.member, f"{self._beats} {self._wall():.3f}".encode())
        entries = await self.state.items()
        now = self._clock()
        live = {self.member}
        for member, entry in entries.items():
            if member not in self._seen:
                # First sight: judged by the wall-clock time it wrote, so that a replica killed just before this
                # one (re)started is not taken for live for a whole lapse. (Clocks apart by more than the
                # lapse only delay this; from then on this replica's own clock judges.)
                self._seen[member] = (entry.revision, now - max(0.0, self._wall() - _written(entry.value)))
            revision, since = self._seen[member]
            if entry.revision != revision:
                since = now
            self._seen[member] = (entry.revision, since)
            if member == self.member or now - since < self.lapse:
                live.add(member)
            elif now - since > 3 * self.lapse:
                # Long dead (killed, never left): clear it away so the bucket does not collect the dead.
                try:
                    await self.state.delete(member)
                except Exception as exc:
                    log.debug("removing dead member %s failed: %s", member, exc)
        for member in [m for m in self._seen if m not in entries]:
            del self._seen[member]
        members = tuple(sorted(live))
        if members != self.members:
            joined = sorted(set(members) - set(self.members))
            left = sorted(set(self.members) - set(members))
            self.members = members
            log.info(
                "replicas: %d live%s%s; shards are spread again",
                len(members),
                f", joined: {', '.join(joined)}" if joined else "",
                f", gone: {', '.join(left)}" if left else "",
            )
            if self.on_change is not None:
                self.on_change()

    async def leave(self) -> None:
        """Remove this member now, so that the others take its shards at their next beat."""
        try:
            await self.state.delete(self.member)
        except Exception as exc:
            log.debug("leaving the members failed: %s", exc)


def _written(value: bytes) -> float:
    """The wall-clock time a heartbeat says it was written (0: it does not say, so it counts as old)."""
    try:
        return float(value.split()[1])
    except (IndexError, ValueError):
        return 0.0


def owner(group: str, index: int, members: tuple[str, ...]) -> str:
    """The member that runs shard `index` of `group`: round the sorted members, from a place `group` picks."""
    start = int.from_bytes(hashlib.md5(group.encode(), usedforsecurity=False).digest()[:4], "big")
    return members[(start + index) % len(members)]
