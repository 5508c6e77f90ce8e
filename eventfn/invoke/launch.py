"""How a worker process comes to exist: started, tracked, then let go to confine itself and load its handler.

`start` returns a `WorkerProcess`: the process and the two descriptors of its frame channel, held on the service's
side. The child waits for `release` before it reads its environment or runs any handler code, so that the pool can
put it in its cgroup first (`isolation.Isolation.track`). The worker's side of the start-up is
`eventfn.invoke.runtime.start` (confine, take the channel, load, send `Ready`).

Two ways, one shape: a child forked by the service's fork server (`Forked`, a few milliseconds: the runtime is
imported already, see `eventfn.invoke.zygote`), or a new interpreter (`Subprocess`, ~100 ms) when there is no fork
server (outside `isolation.isolated`, off Linux, or while it cannot serve) or the worker's start-up variables
(`sandbox.is_start_up_variable`: `PYTHONPATH`, `LD_PRELOAD`, `TZ`...) differ from the fork server's, since they only
take effect when an interpreter starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import anyio
import anyio.abc
import msgspec

from eventfn.invoke import forks, isolation
from eventfn.invoke.protocol import WorkerSpec

log = logging.getLogger(__name__)


class WorkerProcess(Protocol):
    """A started worker process, as a pool holds it."""

    pid: int
    #: The service's end of the channel: frames from the worker are read here (a pipe or a socket).
    reader: int
    #: The service's end of the channel: frames to the worker are written here (never the same descriptor).
    writer: int
    #: Already tracked (a spare, put in its cgroup ahead of the cold start), or None: `isolation.Isolation.track` it.
    tree: isolation.ProcessTree | None

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited and been reaped (negative: killed by that signal), else None."""

    async def release(self) -> None:
        """Let it go on: it reads its environment and confinement, then loads the handler."""

    async def wait(self) -> int:
        """Wait for it to exit; its exit status."""

    def kill(self) -> None:
        """SIGKILL it (not what it started: `isolation.ProcessTree.kill` does that)."""

    async def aclose(self) -> None:
        """Reap it (after `kill`, or once it exited) and let go of what the launcher holds for it."""


class _Released:
    """What both kinds share: the channel's descriptors, and the environment the child reads once released."""

    pid: int

    def __init__(self, reader: int, writer: int, preamble: bytes) -> None:
        self.reader = reader
        self.writer = writer
        #: What `release` writes: the child's environment (and, for a forked one, which function it serves).
        self.preamble = preamble
        self.tree: isolation.ProcessTree | None = None

    async def release(self) -> None:
        data, self.preamble = self.preamble, b""
        # The pipe holds 64 KB; a larger environment is written from a thread, as the child reads it.
        if len(data) <= 32 * 1024:
            _write_all(self.writer, data)
        else:
            await anyio.to_thread.run_sync(_write_all, self.writer, data)


class Subprocess(_Released):
    """A worker started as `python -m eventfn.invoke.runtime`, its channel on two pipes.

    The child's stdin and stdout are the pipes' other ends; the runtime moves them aside before any handler code runs.
    Its environment arrives in the preamble on the channel (`isolation.Isolation.preamble`), never on its command.
    """

    def __init__(self, process: anyio.abc.Process, reader: int, writer: int, preamble: bytes) -> None:
        super().__init__(reader, writer, preamble)
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        return await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def aclose(self) -> None:
        await self.process.aclose()


class Forked(_Released):
    """A worker forked by the service's fork server (`forks.ForkServer`), its channel on two pipes as a
    `Subprocess`'s. Not the service's child: the zygote reaps it and reports its exit status; it is signalled through
    a pidfd, which never names another process, even after it was reaped."""

    def __init__(self, pid: int, pidfd: int, ended: forks.Exit, reader: int, writer: int, preamble: bytes) -> None:
        super().__init__(reader, writer, preamble)
        self.pid = pid
        self._pidfd = pidfd
        self._ended = ended

    @property
    def returncode(self) -> int | None:
        return self._ended.result() if self._ended.done() else None

    async def wait(self) -> int:
        return await self._ended

    def kill(self) -> None:
        if self._pidfd >= 0 and not self._ended.done():
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited; its status is on its way

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._ended
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    async def discard(self) -> None:
        """A spare no cold start took (the service stops, or it died): stop it and let go of all it holds."""
        if self.tree is not None:
            await self.tree.kill(reaped=self.returncode is not None)
        self.kill()
        await self.aclose()
        if self.tree is not None:
            self.tree.release()
        for fd in (self.reader, self.writer):
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def start(spec: WorkerSpec, env: Mapping[str, str]) -> WorkerProcess:
    """Start a worker for `spec` with environment `env` under the current isolation; it waits for `release`.

    Raises OSError when no process can be started (the folder vanished, no more processes allowed...).
    """
    iso = isolation.current()
    server = iso.forks
    if server is not None and iso.command_environment(env) == server.environment:
        forked = await _fork(iso, server)
        if forked is not None:
            forked.preamble = iso.preamble(env, spec=msgspec.json.encode(spec))
            return forked
    with _channel() as (child_in, child_out, reader, writer):
        process = await anyio.open_process(
            # -B: no .pyc written into the handler directory. Python trusts a cached .pyc whose source has the
            # same size and mtime (to the second), so an edit that keeps a file's size within a second of the
            # last load would otherwise run the old code after a hot reload.
            [sys.executable, "-B", "-P", "-m", "eventfn.invoke.runtime", msgspec.json.encode(spec).decode()],
            stdin=child_in,
            stdout=child_out,
            stderr=None,
            env=iso.command_environment(env),
            cwd=spec.task_root,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the service, which stops workers itself
            **iso.credentials(),
        )
    return Subprocess(process, reader, writer, iso.preamble(env))


@contextmanager
def _channel() -> Iterator[tuple[int, int, int, int]]:
    """A new worker's channel: its ends (stdin, stdout) and the service's (reader, writer). The child's ends are
    closed on the way out (the child has its own by then); the service's too if starting the child failed."""
    child_in, writer = os.pipe()
    reader, child_out = os.pipe()
    try:
        yield child_in, child_out, reader, writer
    except BaseException:
        os.close(reader)
        os.close(writer)
        raise
    finally:
        os.close(child_in)
        os.close(child_out)


async def _fork(iso: isolation.Isolation, server: forks.ForkServer) -> Forked | None:
    """The spare child if one is ready (forked and in its cgroup already: a cold start then costs its release and
    the handler's import only), else a new one; a new spare is made meanwhile for the next cold start."""
    spare, server.spare = server.spare, None
    if server.refilling is None and not server.closed:
        server.refilling = asyncio.get_running_loop().create_task(_refill(iso, server))
    if isinstance(spare, Forked):
        if spare.returncode is None and server.holds(spare.pid):
            return spare
        await spare.discard()  # died with a zygote that was replaced, or was killed
    return await _new_child(server)


async def _new_child(server: forks.ForkServer) -> Forked | None:
    with _channel() as (child_in, child_out, reader, writer):
        forked = await server.fork(child_in, child_out)
    if forked is None:
        os.close(reader)
        os.close(writer)
        return None
    pid, pidfd, ended = forked
    return Forked(pid, pidfd, ended, reader, writer, b"")


async def _refill(iso: isolation.Isolation, server: forks.ForkServer) -> None:
    """Fork and track the next spare; no spare is made if the zygote cannot serve (that cold start forks anew)."""
    try:
        spare = await _new_child(server)
        if spare is None:
            return
        spare.tree = await iso.track(spare.pid)
        if server.spare is None and not server.closed:
            server.spare = spare
        else:
            await spare.discard()
    except Exception as exc:  # a spare is an optimisation: the next cold start forks its own
        log.warning("could not prepare a worker ahead of the next cold start: %s", exc)
    finally:
        server.refilling = None
