"""Cgroups for workers: one cgroup v2 folder per service, one child per worker, `cgroup.kill` to end them.

A worker's cgroup holds it and every process it starts, whatever they do (`setsid()`, double forks), and
keeps holding them after the worker died; only a process allowed to write to the hierarchy can move out. The
service's folder is `eventfn-<pid>` in the service's own cgroup; a keeper process empties it if the service
is SIGKILLed, and the next start removes those of services that are gone.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

log = logging.getLogger(__name__)


class CgroupsUnavailable(Exception):
    """No writable cgroup v2 hierarchy with `cgroup.kill` here; the message says why."""


class Cgroups:
    """A cgroup v2 folder for this service (`eventfn-<pid>`, under its own cgroup), with one child per worker."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._next = 0
        self._leftover: set[Path] = set()

    @classmethod
    def create(cls) -> Cgroups:
        """Create this service's cgroup, after removing those of services that died; `CgroupsUnavailable`."""
        own = own_cgroup()
        sweep_stale(own)
        base = own / f"eventfn-{os.getpid()}"
        try:
            base.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupsUnavailable(f"cannot create a cgroup in {own}: {exc.strerror}") from exc
        if not (base / "cgroup.kill").exists():
            base.rmdir()
            raise CgroupsUnavailable("the kernel has no cgroup.kill (Linux 5.14 or later)")
        return cls(base)

    async def add(self, pid: int) -> Path:
        """A new cgroup holding process `pid`.

        Moving a process waits for an RCU grace period (milliseconds; tens of them on a loaded host): that write
        runs in a worker thread, not on the event loop.
        """
        for path in list(self._leftover):
            self.remove(path)
        path = self.base / f"w{self._next}"
        self._next += 1
        path.mkdir()
        try:
            await anyio.to_thread.run_sync((path / "cgroup.procs").write_text, str(pid))
        except OSError:
            path.rmdir()
            raise
        return path

    def remove(self, path: Path) -> None:
        """Remove cgroup `path`; one whose last processes are still exiting is retried later."""
        try:
            path.rmdir()
            self._leftover.discard(path)
        except FileNotFoundError:
            self._leftover.discard(path)
        except OSError:
            self._leftover.add(path)

    async def close(self) -> None:
        """Kill whatever is left in this service's cgroups and remove them."""
        await _remove_tree(self.base)


def kill_cgroup(path: Path) -> None:
    """SIGKILL every process in cgroup `path` and its children, at once."""
    (path / "cgroup.kill").write_text("1")


def own_cgroup() -> Path:
    """This process's cgroup folder in the cgroup v2 hierarchy; `CgroupsUnavailable` if there is none."""
    try:
        with open("/proc/self/cgroup") as file:
            lines = file.read().splitlines()
        with open("/proc/self/mountinfo") as file:
            mounts = file.read().splitlines()
    except OSError as exc:
        raise CgroupsUnavailable(f"cannot read /proc: {exc.strerror}") from exc
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        raise CgroupsUnavailable("no cgroup v2 hierarchy (cgroup v1 only)")
    for line in mounts:
        before, _, after = line.partition(" - ")
        fields = before.split()
        if after.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return Path(mountpoint) / path[len(root) :].lstrip("/")
    raise CgroupsUnavailable(f"cgroup v2 is not mounted where this process's cgroup ({path}) is visible")


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def sweep_stale(parent: Path) -> None:
    """Kill and remove the cgroups of eventfn services that are gone (SIGKILLed before they could)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for path in entries:
        match = re.fullmatch(r"eventfn-(\d+)", path.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        try:
            kill_cgroup(path)
        except OSError:
            continue
        log.warning("killed what was left in %s by an eventfn service that ended without cleaning up", path)
        for child in path.iterdir():
            if child.is_dir():
                try:
                    child.rmdir()
                except OSError:
                    pass  # still exiting: removed by a later start
        try:
            path.rmdir()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _remove_tree(base: Path, wait: float = 2.0) -> None:
    """Kill everything in `base` and remove it with its children, waiting up to `wait` s for processes to exit."""
    try:
        kill_cgroup(base)
    except OSError:
        return
    with anyio.move_on_after(wait):
        while True:
            for child in [p for p in base.iterdir() if p.is_dir()]:
                try:
                    child.rmdir()
                except OSError:
                    pass
            try:
                base.rmdir()
                return
            except OSError:
                pass
            # Killed processes leave their cgroup as they finish exiting: nothing announces it but cgroup.events.
            await anyio.sleep(0.02)
    log.warning("cgroup %s still holds processes; the next start removes it", base)


# The keeper: if the service dies without cleaning up, it kills what is left in the service's cgroups.
# Its stdin is a pipe whose only writer is the service: end of file means the service is gone.
_KEEPER = """trap '' INT TERM HUP
read -r _
echo 1 > "$1/cgroup.kill" 2>/dev/null
i=0
while [ -d "$1" ] && [ "$i" -lt 100 ]; do
  for d in "$1"/*/; do rmdir "$d" 2>/dev/null; done
  rmdir "$1" 2>/dev/null && break
  sleep 0.05 2>/dev/null || sleep 1
  i=$((i + 1))
done
"""


@asynccontextmanager
async def keeper(base: Path) -> AsyncIterator[None]:
    """Run the keeper for `base` while the context lasts."""
    read, write = os.pipe()
    try:
        process = await anyio.open_process(
            ["/bin/sh", "-c", _KEEPER, "eventfn-keeper", str(base)],
            stdin=read,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # no terminal signal reaches it
        )
    except OSError as exc:
        os.close(read)
        os.close(write)
        log.warning("no keeper for the workers' cgroups (%s): a SIGKILLed service may leave processes", exc)
        yield
        return
    os.close(read)
    try:
        yield
    finally:
        os.close(write)
        with anyio.CancelScope(shield=True):
            await process.aclose()
