"""The service's side of the fork server (`eventfn.invoke.zygote`): start it, ask it for workers, learn how they end.

One `ForkServer` per service (`isolation.isolated` starts it). `fork` hands the zygote the child's ends of its
channel and returns the new process's pid and a pidfd (a handle that cannot come to name another process once
this one is reaped, which the zygote does). The zygote reports each child's exit status; should the zygote itself
die, its children die with it (PR_SET_PDEATHSIG) and are reported killed.

`fork` returns None whenever the zygote cannot serve (it died, hangs, or never started on this platform): the
caller starts the worker as a new interpreter instead. The log says so once, and the next cold start starts a
new zygote (at most every `RETRY_AFTER` seconds while it keeps failing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

import anyio
import anyio.abc

from eventfn.invoke.zygote import RECORD

log = logging.getLogger(__name__)

#: Seconds for a zygote to import the runtime and say it is ready.
START_TIMEOUT = 10.0
#: Seconds for a zygote to answer a fork request; past it, it is stopped as hung and workers start without it.
FORK_TIMEOUT = 2.0
#: Seconds between attempts to start a zygote while they keep failing.
RETRY_AFTER = 30.0
#: The zygote's children as the service knows them: their exit status once it is reported.
Exit = asyncio.Future[int]

SUPPORTED = sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class Spare(Protocol):
    """A child forked (and tracked) ahead of the cold start it will serve (`eventfn.invoke.launch` makes them)."""

    async def discard(self) -> None:
        """Stop it, and let go of what is held for it."""


class _Unavailable(Exception):
    """The zygote cannot fork a worker now; the message says why (never leaves this module: `fork` returns None)."""


class _Zygote:
    """One running zygote process and its control socket."""

    def __init__(self, process: anyio.abc.Process, control: socket.socket) -> None:
        self.process = process
        # Signalled through a pidfd, never `process.kill()`: that polls the process first, and a poll that reaps it
        # before asyncio's child watcher does loses its exit status.
        self.pidfd = os.pidfd_open(process.pid)
        self.control = control
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.replies: deque[asyncio.Future[tuple[int, int]]] = deque()
        #: Its children alive, by pid: their pidfd and their exit status to come.
        self.children: dict[int, tuple[int, Exit]] = {}
        #: Why it can no longer serve (None while it can), and whether the log said so.
        self.lost: str | None = None
        self.reported = False
        asyncio.get_running_loop().add_reader(control.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data = self.control.recv(RECORD.size)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lose(f"its control socket failed: {exc}")
                return
            if not data:
                self._lose("it exited")
                return
            kind, pid, value = RECORD.unpack(data)
            if kind == b"X":
                if (child := self.children.pop(pid, None)) is not None and not child[1].done():
                    child[1].set_result(value)
            elif kind == b"F":
                if self.replies:
                    reply = self.replies.popleft()
                    if not reply.done():
                        reply.set_result((pid, value))
            elif kind == b"R" and not self.ready.done():
                self.ready.set_result(None)

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        self.kill()  # hung, or it misbehaved: its children go with it, whatever state it is in
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.control.fileno())
        error = _Unavailable(reason)
        waiting: list[asyncio.Future[Any]] = [self.ready, *self.replies]
        for future in waiting:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a request that timed out no longer waits for it
        self.replies.clear()
        # Its children die with it (PR_SET_PDEATHSIG); no one is left to report how: their pidfds say when.
        children, self.children = self.children, {}
        for pidfd, ended in children.values():
            _await_orphan(pidfd, ended)

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited already

    async def stop(self) -> None:
        self._lose("it was stopped")
        self.control.close()
        with anyio.CancelScope(shield=True):
            await self.process.wait()
        os.close(self.pidfd)


def _failed(zygote: _Zygote, reason: str) -> None:
    """A fork request failed: the zygote is done for, and the log says so once."""
    zygote._lose(reason)
    if not zygote.reported:
        zygote.reported = True
        log.warning(
            "the fork server (pid %d) failed: %s; this worker starts as a new interpreter, and the next cold start "
            "starts a new fork server",
            zygote.process.pid,
            zygote.lost,
        )


def _await_orphan(pidfd: int, ended: Exit) -> None:
    """A child whose exit its zygote will not report: killed with the zygote, done once its pidfd says it is gone."""
    loop = asyncio.get_running_loop()

    def gone() -> None:
        loop.remove_reader(pidfd)
        if not ended.done():
            ended.set_result(-signal.SIGKILL)

    loop.add_reader(pidfd, gone)


class ForkServer:
    """The service's fork server: a zygote started on demand, restarted after it died (see the module docstring)."""

    def __init__(self, *, environment: Mapping[str, str], credentials: Mapping[str, Any], user_namespace: bool) -> None:
        #: The start-up variables of every worker it forks: a worker whose own differ is started without it.
        self.environment = dict(environment)
        self._credentials = dict(credentials)
        self._user_namespace = user_namespace
        self._zygote: _Zygote | None = None
        self._lock = anyio.Lock()
        self._failed_at: float | None = None
        #: Stopped for good (the service ends).
        self.closed = False
        #: The next cold start's child, forked and tracked ahead of it (see `eventfn.invoke.launch`).
        self.spare: Spare | None = None
        #: The task making the next spare, while it runs.
        self.refilling: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The running zygote's pid."""
        return self._zygote.process.pid if self._zygote is not None and self._zygote.lost is None else None

    def holds(self, pid: int) -> bool:
        """Whether `pid` is a child of the running zygote, alive as far as the service knows."""
        zygote = self._zygote
        return zygote is not None and zygote.lost is None and pid in zygote.children

    async def start(self) -> bool:
        """Start the zygote unless it runs; False (and one log line) if it cannot start."""
        async with self._lock:
            return await self._ensure() is not None

    async def _ensure(self) -> _Zygote | None:
        zygote = self._zygote
        if zygote is not None and zygote.lost is None:
            return zygote
        if self.closed:
            return None
        if zygote is not None:
            self._zygote = None
            await zygote.stop()
            if zygote.reported:
                log.info("starting a new fork server")
            else:
                code = zygote.process.returncode
                how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"status {code}"
                log.warning(
                    "the fork server (pid %d) stopped: %s (%s); starting a new one",
                    zygote.process.pid,
                    zygote.lost,
                    how,
                )
        elif self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER:
            return None
        try:
            self._zygote = await self._spawn()
        except (OSError, _Unavailable, TimeoutError) as exc:
            self._failed_at = time.monotonic()
            log.warning(
                "workers start as new interpreters (slower cold starts): the fork server did not start: %s", exc
            )
            return None
        self._failed_at = None
        log.info("workers are forked by a fork server (pid %d)", self._zygote.process.pid)
        return self._zygote

    async def _spawn(self) -> _Zygote:
        if not SUPPORTED:
            raise _Unavailable("it needs Linux 5.3 or later (pidfd)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            command = [
                sys.executable,
                "-B",
                "-P",
                "-m",
                "eventfn.invoke.zygote",
                str(theirs.fileno()),
                str(os.getpid()),
            ]
            if self._user_namespace:
                command.append("--user-namespace")
            # From the event loop's thread: the zygote's PR_SET_PDEATHSIG fires when the thread that started it ends.
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,
                env=self.environment,
                cwd="/",
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
                **self._credentials,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        try:
            zygote = _Zygote(process, ours)
        except OSError:  # no pidfd (a kernel before 5.3): it is not left running
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.aclose()
            ours.close()
            raise
        try:
            with anyio.fail_after(START_TIMEOUT):
                await zygote.ready
        except BaseException:
            await zygote.stop()
            raise
        return zygote

    async def fork(self, reader: int, writer: int) -> tuple[int, int, Exit] | None:
        """A new child that will read frames from `reader` and write them to `writer` (the child's ends; the caller
        closes its copies): its pid, a pidfd and its exit status to come. None: start this worker without the zygote.
        """
        async with self._lock:
            zygote = await self._ensure()
        if zygote is None:
            return None
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[tuple[int, int]] = loop.create_future()
        try:
            socket.send_fds(zygote.control, [b"fork"], [reader, writer])
        except OSError as exc:  # a full socket buffer: it has not read for a while
            _failed(zygote, f"a request could not be sent: {exc}")
            return None
        zygote.replies.append(reply)
        try:
            with anyio.fail_after(FORK_TIMEOUT):
                pid, error = await reply
        except TimeoutError:
            _failed(zygote, f"it did not answer within {FORK_TIMEOUT:g} s")
            return None
        except _Unavailable as exc:
            _failed(zygote, str(exc))
            return None
        if pid == 0:
            raise OSError(error, f"cannot fork a worker: {os.strerror(error)}")
        ended: Exit = loop.create_future()
        try:
            # The child cannot have exited and been reaped yet: it waits for its release, which comes after this.
            pidfd = os.pidfd_open(pid)
        except OSError:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            raise
        if zygote.lost is None:
            zygote.children[pid] = (pidfd, ended)
        else:  # lost meanwhile: this child dies with it
            _await_orphan(pidfd, ended)
        return pid, pidfd, ended

    async def aclose(self) -> None:
        """Stop the zygote (its children die with it)."""
        self.closed = True
        if self.refilling is not None:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([self.refilling])  # a spare forked meanwhile is discarded, not left behind
        spare, self.spare = self.spare, None
        if spare is not None:
            await spare.discard()
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            await zygote.stop()
