"""Test support: a real nats-server and a real `eventfn serve`, each as a child process.

Used by eventfn's own tests and usable by anyone testing their functions against the real thing:

    with NatsServer(tmp_path / "nats") as nats, Serve(handlers_dir, nats.url, tmp_path / "data") as serve:
        ...  # publish with nats-py exactly as the nats CLI would

Both wait for readiness by reading the child's log (never by sleeping), and both are stopped on exit.
`PROBE_MODULE` is a tiny helper a handler can import to report to NATS over a raw socket, so a test can
count what handlers saw without any client library inside the worker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import TracebackType

from eventfn.natsserver import find_binary

__all__ = ["PROBE_MODULE", "LogWatcher", "NatsServer", "Serve", "write_handler"]


class LogWatcher:
    """Collects a child process's output lines in a thread; `wait_for` blocks until a line matches."""

    def __init__(self, stream: object, echo_prefix: str | None = None) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._echo = echo_prefix
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: object) -> None:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            line = raw.decode(errors="replace").rstrip("\n")
            if self._echo is not None:
                sys.stderr.write(f"{self._echo}{line}\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, *, timeout: float = 15.0, start: int = 0, count: int = 1) -> re.Match[str]:
        """Block until `count` lines from index `start` on match `pattern`; returns the last match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for line in self.lines[start:] if (m := regex.search(line))]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    tail = "\n".join(self.lines[-40:])
                    raise TimeoutError(f"{len(found)}/{count} lines matching {pattern!r}; last lines:\n{tail}")
                self._cond.wait(remaining)

    def close(self, stream: object) -> None:
        """After the process exited: read the rest of its output, then close the pipe."""
        self._thread.join(timeout=5)
        stream.close()  # type: ignore[attr-defined]

    def mark(self) -> int:
        """The index of the next line, to wait only for what comes after this point."""
        with self._cond:
            return len(self.lines)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class NatsServer:
    """A nats-server with JetStream on a free loopback port, its store in `store_dir`."""

    def __init__(self, store_dir: Path, *, port: int = -1) -> None:
        self.store_dir = store_dir
        self.port = port
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [find_binary(), "-js", "-sd", str(self.store_dir), "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.log = LogWatcher(self.process.stdout)
        match = self.log.wait_for(r"Listening for client connections on (\S+)")
        self.url = "nats://" + match.group(1)
        self.port = int(match.group(1).rsplit(":", 1)[1])
        self.log.wait_for(r"Server is ready")
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close(self.process.stdout)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Serve:
    """`eventfn serve` as a subprocess, connected to `nats_url` (or embedded when None)."""

    def __init__(
        self,
        handlers: Path,
        nats_url: str | None,
        data_dir: Path,
        *,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        echo: bool = False,
    ) -> None:
        self.args = [
            sys.executable,
            "-m",
            "eventfn",
            "serve",
            "--handlers",
            str(handlers),
            "--data-dir",
            str(data_dir),
            *(["--nats", nats_url] if nats_url else ["--nats-port", "0"]),
            *(extra_args or []),
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if "PROBE_NATS" in self.env and "EVENTFN_WORKER_ENV_PASSTHROUGH" not in self.env:
            # Workers see only what is passed through to them: the probe needs to know where NATS is.
            self.env["EVENTFN_WORKER_ENV_PASSTHROUGH"] = "PROBE_NATS"
        self.cwd = cwd
        self.echo = echo
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True) -> Serve:
        self.process = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
        )
        self.log = LogWatcher(self.process.stdout, echo_prefix="serve| " if self.echo else None)
        if wait_ready:
            self.log.wait_for(r"eventfn ready", timeout=30)
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM and wait for a clean exit (SIGKILL after 30 s); returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.process.stdout.closed:  # type: ignore[union-attr]
            self.log.close(self.process.stdout)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the service (its workers die with their pipes closed)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.log.close(self.process.stdout)

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


#: Save as `_probe.py` in a handler directory; handlers call `report(subject, text)` to publish to NATS.
PROBE_MODULE = '''\
"""Publishes to NATS over a raw socket (the text protocol), so handlers need no client library."""
import os
import socket
import threading

_sock = None
_lock = threading.Lock()  # in-process handlers run on several threads; one socket, one reader at a time


def _connect():
    global _sock
    host, port = os.environ["PROBE_NATS"].removeprefix("nats://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.recv(4096)  # INFO
    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\\r\\n')
    _sock = sock


def report(subject, text):
    """Publish `text` to `subject` and wait for the server's PONG, so it is delivered before we return."""
    with _lock:
        if _sock is None:
            _connect()
        data = text.encode()
        _sock.sendall(b"PUB %s %d\\r\\n%s\\r\\nPING\\r\\n" % (subject.encode(), len(data), data))
        buf = b""
        while b"PONG" not in buf:
            buf += _sock.recv(4096)
'''


def write_handler(directory: Path, name: str, source: str) -> Path:
    """Write `directory/<name>.py` from `source` (dedented); returns its path."""
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    return path
