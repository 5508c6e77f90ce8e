"""CPU time from /proc: a process alone, or `eventfn serve` and every process descending from it (its workers).

utime + stime from `/proc/<pid>/stat` (clock ticks, 10 ms each here). For a process tree the service's own time is
its utime + stime; the workers' time is that of every descendant alive, plus what exited descendants left behind:

- a process that exits and is waited for by its parent adds its whole time to the parent's cutime + cstime, so the
  service's and each live descendant's cutime + cstime count workers that came and went between two looks;
- a descendant found gone whose parent did not take its time in (reparented to init, or a parent that ignores
  SIGCHLD) is counted with its time as last seen: the tree is looked at every `interval` seconds while a window is
  open, so at most that much of such a process's time goes uncounted (`Window.uncovered` says how often it happened).

Descendants are found through the parent pid in /proc/*/stat (this kernel has no /proc/<pid>/task/*/children); a
process once found is followed even if it is reparented. No cgroup is needed (this machine's cgroup v2 is not
writable; eventfn's per-worker cgroups are removed with their worker).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/<pid>/stat this module reads, times in seconds."""

    ppid: int
    start: int  # start time in ticks since boot: with the pid, the identity of a process
    own: float  # utime + stime
    reaped: float  # cutime + cstime: children that exited and were waited for

    @property
    def total(self) -> float:
        return self.own + self.reaped


def stat(pid: int) -> Stat | None:
    """Process `pid`'s times, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name is in parentheses and may contain anything: the fields follow the last ')'.
    fields = raw.rsplit(b")", 1)[1].split()
    return Stat(
        ppid=int(fields[1]),
        start=int(fields[19]),
        own=(int(fields[11]) + int(fields[12])) / _TICK,
        reaped=(int(fields[13]) + int(fields[14])) / _TICK,
    )


def own_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads); NaN if it is gone."""
    found = stat(pid)
    return found.own if found is not None else float("nan")


def _pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


@dataclass
class Tree:
    """A process and its descendants, looked at by `sample()`: the root's own time and its descendants' time."""

    root: int
    members: dict[int, Stat] = field(default_factory=dict)
    #: Time of descendants that exited without their parent (in the tree) taking it in, as last seen.
    exited: float = 0.0
    uncovered: int = 0
    _listing: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        first = stat(self.root)
        if first is None:
            raise ProcessLookupError(self.root)
        self.members[self.root] = first
        self.sample()

    def sample(self) -> None:
        """Look again: new descendants, new times, descendants that exited."""
        listing = _pids()
        fresh = {pid: s for pid in listing - self._listing if pid not in self.members and (s := stat(pid))}
        self._listing = listing
        now: dict[int, Stat] = {}
        gone: dict[int, Stat] = {}
        for pid, before in self.members.items():
            current = stat(pid)
            if current is None or current.start != before.start:
                gone[pid] = before
            else:
                now[pid] = current
        # A new process belongs if its parent does (its parent may itself be new: repeat until nothing changes).
        added = True
        while added:
            added = False
            for pid, s in list(fresh.items()):
                if s.ppid in now:
                    now[pid] = fresh.pop(pid)
                    added = True
        if self.root not in now:
            gone.pop(self.root, None)  # the root itself gone: its time stays as last seen
            now[self.root] = self.members[self.root]
        self._settle(gone, now)
        self.members = now

    def _settle(self, gone: dict[int, Stat], now: dict[int, Stat]) -> None:
        """Count what the processes in `gone` leave behind that no live member's cutime took in."""
        by_parent: dict[int, float] = {}
        for s in gone.values():
            if s.ppid in now and s.ppid in self.members:
                by_parent[s.ppid] = by_parent.get(s.ppid, 0.0) + s.total
            elif s.ppid not in gone:
                self.exited += s.total  # reparented away, or its parent unknown: count it as last seen
                self.uncovered += 1
        for parent, owed in by_parent.items():
            took = now[parent].reaped - self.members[parent].reaped
            if took + 1.5 / _TICK < owed:  # tick rounding aside, the parent did not wait for them
                self.exited += owed - took
                self.uncovered += 1

    @property
    def service(self) -> float:
        """The root's own CPU seconds."""
        return self.members[self.root].own

    @property
    def workers(self) -> float:
        """Every descendant's CPU seconds, those that exited included (as well as they can be seen)."""
        live = sum(s.total for pid, s in self.members.items() if pid != self.root)
        return live + self.members[self.root].reaped + self.exited

    def processes(self) -> list[int]:
        """The root and its live descendants, as last looked at."""
        return list(self.members)


@dataclass
class Usage:
    """CPU seconds spent in a window, by whom."""

    service: float = 0.0
    workers: float = 0.0
    others: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    uncovered: int = 0


class Window:
    """CPU spent between `start()` and `stop()` by a process tree (`eventfn serve`, sampled every `interval` s in
    a thread of its own) and by single processes (`others`: the ceiling, the peer, nats-server)."""

    def __init__(self, root: int | None, others: dict[str, int | None] | None = None, interval: float = 0.1) -> None:
        self.root = root
        self.others = {name: pid for name, pid in (others or {}).items() if pid is not None}
        self.interval = interval
        self.usage = Usage()
        self._tree: Tree | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._begin: tuple[float, float, float, dict[str, float]] | None = None

    def start(self) -> Window:
        self._tree = Tree(self.root) if self.root is not None else None
        tree = self._tree
        self._begin = (
            time.perf_counter(),
            tree.service if tree else 0.0,
            tree.workers if tree else 0.0,
            {name: own_seconds(pid) for name, pid in self.others.items()},
        )
        if tree is not None:
            self._thread = threading.Thread(target=self._watch, name="cpu-window", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        assert self._tree is not None
        while not self._stop.wait(self.interval):
            self._tree.sample()

    def stop(self) -> Usage:
        assert self._begin is not None, "stop() before start()"
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        tree = self._tree
        if tree is not None:
            tree.sample()
        began, service, workers, others = self._begin
        self.usage = Usage(
            service=tree.service - service if tree else 0.0,
            workers=tree.workers - workers if tree else 0.0,
            others={name: own_seconds(pid) - others[name] for name, pid in self.others.items()},
            seconds=time.perf_counter() - began,
            uncovered=tree.uncovered if tree else 0,
        )
        return self.usage


def per_event_us(seconds: float, events: int) -> float | None:
    """CPU seconds as microseconds per event (None for no events)."""
    return 1e6 * seconds / events if events else None
