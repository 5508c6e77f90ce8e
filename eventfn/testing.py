"""Test support: a real nats-server and a real `eventfn serve`, each as a child process.

Used by eventfn's own tests and usable by anyone testing their functions against the real thing:

    with NatsServer(tmp_path / "nats") as nats, Serve(handlers_dir, nats.url, tmp_path / "data") as serve:
        ...  # publish with nats-py exactly as the nats CLI would

`NatsCluster` starts three such servers as one JetStream cluster, to test what a lost server does. All of
them wait for readiness by reading the child's log (never by sleeping), and all are stopped on exit.
A `Serve` with the embedded server (`nats_url` None) has access control on: `serve.url` is the server,
`serve.connect_options("admin")` the keyword arguments for `nats.connect` as one of its roles, and
`serve.cli("dlq", "ls")` runs a client command that finds the admin credentials itself. Clients without
credentials (`nats.connect(serve.url)`) may invoke, as `nats req` does.
`PROBE_MODULE` is a tiny helper a handler can import to report to NATS over a raw socket, so a test can
count what handlers saw without any client library inside the worker.

To learn an outcome, prefer a structured signal to log wording: `mapping_stats(nc, "fn--t0")` (the counters
`eventfn mappings` shows) and `function_info(nc, "fn")` (state and versions), polled by `wait_until` with a
deadline; `wait_stats` and `wait_serving` wait for the common cases. In async tests wait for a log line with
`await serve.log.await_line(...)`, which leaves the event loop running; `wait_for` blocks and is for sync code.

Every wait that can take seconds has a blocking form for sync code and an async form for async code: `start` and
`astart` (`with` and `async with`), `stop` and `astop`, a cluster's `restart` and `arestart`, `wait` and
`await_exit`, `cli` and `acli`, `wait_for` and `await_line`. The blocking forms refuse to run where an asyncio event
loop runs on the calling thread (`in_event_loop()`): there they would stop every task of the loop, the test's own
NATS client among them, for as long as they wait. `kill` has one form: SIGKILL and reaping take milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from eventfn import subjects
from eventfn.broker import auth
from eventfn.broker.natsserver import find_binary

__all__ = [
    "PROBE_MODULE",
    "LogWatcher",
    "NatsCluster",
    "NatsServer",
    "Requester",
    "Serve",
    "api",
    "function_info",
    "in_event_loop",
    "mapping_info",
    "mapping_stats",
    "wait_serving",
    "wait_stats",
    "wait_until",
    "write_handler",
]

_T = TypeVar("_T")


def in_event_loop() -> bool:
    """Whether an asyncio event loop runs on the calling thread (an async test, a fixture's `start` called from
    one): a blocking wait there stops the whole loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _refuse_in_event_loop(blocking: str, instead: str) -> None:
    if in_event_loop():
        raise RuntimeError(
            f"{blocking} blocks the thread it runs on, and an event loop runs on this one: every task would stop "
            f"while it waits. In async code use {instead}."
        )


class LogWatcher:
    """Collects a child process's output lines in a thread. `await_line` waits for a matching line without
    blocking the event loop (for async tests); `wait_for` blocks the calling thread (for sync code)."""

    #: How long one wait in a worker thread lasts at most: a cancelled `await_line` leaves a thread this long.
    _SLICE = 0.25

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
        """Block until `count` lines from index `start` on match `pattern`; returns the last match.

        In async code use `await_line`, which does not hold up the event loop while it waits: this one refuses to
        run where an event loop runs (RuntimeError).
        """
        _refuse_in_event_loop("LogWatcher.wait_for", "`await log.await_line(...)`")
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for line in self.lines[start:] if (m := regex.search(line))]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise self._not_found(pattern, len(found), count)
                self._cond.wait(remaining)

    async def await_line(self, pattern: str, *, timeout: float = 15.0, start: int = 0, count: int = 1) -> re.Match[str]:
        """Wait until `count` lines from index `start` on match `pattern`; returns the last match.

        The event loop keeps running meanwhile (the waiting happens in a worker thread, a slice at a time), and
        cancelling the wait (a `fail_after` around it, the test's end) ends it at once.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        found: list[re.Match[str]] = []
        scanned = start
        while True:
            with self._cond:
                new, closed = self.lines[scanned:], self._closed
            found += [m for line in new if (m := regex.search(line))]
            scanned += len(new)
            if len(found) >= count:
                return found[count - 1]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or closed:
                raise self._not_found(pattern, len(found), count)
            await anyio.to_thread.run_sync(
                self._wait_past, scanned, min(remaining, self._SLICE), abandon_on_cancel=True
            )

    def _wait_past(self, index: int, timeout: float) -> None:
        """Block until there is a line past `index`, the output has ended, or `timeout` has passed."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.lines) > index or self._closed, timeout)

    def _not_found(self, pattern: str, found: int, count: int) -> TimeoutError:
        with self._cond:
            tail = "\n".join(self.lines[-40:])
        return TimeoutError(f"{found}/{count} lines matching {pattern!r}; last lines:\n{tail}")

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

    def service_text(self) -> str:
        """The service's own lines: without its handlers' output (tagged `[<function>] `), where a handler that
        fails on purpose writes its `[ERROR]` and traceback as Lambda's runtime does."""
        with self._cond:
            return "\n".join(line for line in self.lines if not line.startswith("["))


class NatsServer:
    """A nats-server with JetStream on a free loopback port, its store in `store_dir`.

    `config` starts it with that configuration file (`-c`) instead: address and port are still the ones above,
    JetStream and its store are the file's. `env` is added to the server's environment (a configuration may
    read variables such as passwords from there). `args` are more nats-server flags (a name, cluster routes).
    A restart (`start()` after `stop()` or `kill()`) keeps the port of the first start.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = -1,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port
        self.config = config
        self.env = env
        self.args = args or []
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        """Start the server and block until it is ready (in async code: `await astart()`)."""
        _refuse_in_event_loop("NatsServer.start", "`await server.astart()` (or `async with NatsServer(...)`)")
        self._launch()
        try:
            self._listening(self.log.wait_for(_NATS_LISTENING))
            self.log.wait_for(_NATS_READY)
        except BaseException:
            self.stop()  # a server that did not start (a bad configuration) is not left running or unreaped
            raise
        return self

    async def astart(self) -> NatsServer:
        """Start the server and wait until it is ready, leaving the event loop running."""
        self._launch()
        try:
            self._listening(await self.log.await_line(_NATS_LISTENING))
            await self.log.await_line(_NATS_READY)
        except BaseException:
            await self.astop()
            raise
        return self

    def _launch(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                find_binary(),
                *(["-c", str(self.config)] if self.config else ["-js", "-sd", str(self.store_dir)]),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env} if self.env else None,
        )
        self.log = LogWatcher(self.process.stdout)

    def _listening(self, match: re.Match[str]) -> None:
        self.url = "nats://" + match.group(1)
        self.port = int(match.group(1).rsplit(":", 1)[1])

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after 10 s; blocks until then (in async code: `await astop()`)."""
        _refuse_in_event_loop("NatsServer.stop", "`await server.astop()`")
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.process.stdout.closed:  # type: ignore[union-attr]
            self.log.close(self.process.stdout)

    async def astop(self) -> None:
        """`stop` without blocking the event loop; it runs to its end even when the caller is cancelled."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to tell its peers or clients, as when its machine dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.log.close(self.process.stdout)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> NatsServer:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()


_NATS_LISTENING = r"Listening for client connections on (\S+)"
_NATS_READY = r"Server is ready"


class NatsCluster:
    """`size` nats-servers with JetStream forming one cluster on loopback: server names `n1`..`nN`, a store each
    under `base_dir`, client ports picked by the servers, cluster ports found free, and every server routed to
    all the others.

        with NatsCluster(tmp_path / "cluster") as cluster:
            ...  # `eventfn serve --nats cluster.url`; cluster.kill("n2") to lose a server
    """

    def __init__(self, base_dir: Path, *, size: int = 3, name: str = "eventfn-test") -> None:
        self.base_dir = base_dir
        self.size = size
        self.name = name
        self.nodes: dict[str, NatsServer] = {}

    @property
    def urls(self) -> list[str]:
        """Every server's client URL."""
        return [node.url for node in self.nodes.values()]

    @property
    def url(self) -> str:
        """The client URLs comma-separated, as `--nats` and EVENTFN_NATS_URL take them."""
        return ",".join(self.urls)

    def start(self) -> NatsCluster:
        """Start every server, then block until each knows the cluster's JetStream meta leader (in async code
        `await astart()`)."""
        _refuse_in_event_loop("NatsCluster.start", "`await cluster.astart()` (or `async with NatsCluster(...)`)")
        for attempt in range(3):
            # A port found free can be taken by someone else before the server binds it: then try new ones.
            ports = _free_ports(self.size)
            routes = ",".join(f"nats://127.0.0.1:{port}" for port in ports)
            self.nodes = {
                f"n{i + 1}": NatsServer(
                    self.base_dir / f"n{i + 1}",
                    args=[
                        *("--server_name", f"n{i + 1}", "--cluster_name", self.name),
                        *("--cluster", f"nats://127.0.0.1:{port}", "--routes", routes),
                    ],
                )
                for i, port in enumerate(ports)
            }
            try:
                for node in self.nodes.values():
                    node.start()
                for node in self.nodes.values():
                    node.log.wait_for(
                        r"JetStream cluster new metadata leader|Self is new JetStream cluster metadata", timeout=30
                    )
            except TimeoutError:
                in_use = any(
                    "address already in use" in node.log.text() for node in self.nodes.values() if node.process
                )
                self.stop()
                if in_use and attempt < 2:
                    continue
                raise
            return self
        raise AssertionError("unreachable")

    async def astart(self) -> NatsCluster:
        """`start` without blocking the event loop (it runs in a worker thread)."""
        return await anyio.to_thread.run_sync(self.start)

    def kill(self, name: str) -> None:
        """SIGKILL server `name` (`n1`..)."""
        self.nodes[name].kill()

    def restart(self, name: str) -> None:
        """Start server `name` again (after `kill`) on its ports and store; it rejoins and catches up."""
        self.nodes[name].start()

    async def arestart(self, name: str) -> None:
        """`restart` without blocking the event loop."""
        await self.nodes[name].astart()

    def stop(self) -> None:
        """Stop every server still running (blocking; in async code `await astop()`)."""
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.stop()
            elif node.process is not None and not node.process.stdout.closed:  # type: ignore[union-attr]
                node.log.close(node.process.stdout)

    async def astop(self) -> None:
        """`stop` without blocking the event loop; it runs to its end even when the caller is cancelled."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> NatsCluster:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()


#: What a cluster's server logs once it knows the JetStream meta leader (another server, or itself).
_META_LEADER_KNOWN = r"JetStream cluster new metadata leader|Self is new JetStream cluster metadata leader"


def _free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nobody listens on right now."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Serve:
    """`eventfn serve` as a subprocess, connected to `nats_url`, or with its embedded server on `nats_port`
    (default 0: any free port) when `nats_url` is None. Its HTTP server listens on `http_port` (default 0: any free
    port; `http_url` says which once it is ready), unless `EVENTFN_HTTP_PORT` is in `env`."""

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
        nats_port: int = 0,
        http_port: int = 0,
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
            *(["--nats", nats_url] if nats_url else ["--nats-port", str(nats_port)]),
            *(extra_args or []),
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "EVENTFN_HTTP_PORT": str(http_port), **(env or {})}
        if "PROBE_NATS" in self.env and "EVENTFN_WORKER_ENV_PASSTHROUGH" not in self.env:
            # Workers see only what is passed through to them: the probe needs to know where NATS is.
            self.env["EVENTFN_WORKER_ENV_PASSTHROUGH"] = "PROBE_NATS"
        self.cwd = cwd
        self.echo = echo
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True) -> Serve:
        """Start the service and block until it logs `eventfn ready` (unless `wait_ready` is False); in async code
        `await astart()`."""
        if wait_ready:  # refused before a process is started that nobody would stop
            _refuse_in_event_loop("Serve.start", "`await serve.astart()` (or `async with Serve(...)`)")
        self._launch()
        if wait_ready:
            self.log.wait_for(_SERVE_READY, timeout=30)
        return self

    async def astart(self, *, wait_ready: bool = True) -> Serve:
        """Start the service and wait until it logs `eventfn ready` (unless `wait_ready` is False), leaving the
        event loop running."""
        self._launch()
        if wait_ready:
            await self.log.await_line(_SERVE_READY, timeout=30)
        return self

    def _launch(self) -> None:
        self.process = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
        )
        self.log = LogWatcher(self.process.stdout, echo_prefix="serve| " if self.echo else None)

    @property
    def url(self) -> str:
        """The NATS server the service uses (the embedded one's once the service is ready), without credentials."""
        if self.nats_url:
            return self.nats_url
        return (Path(self.cwd or ".") / self.data_dir / "nats.url").read_text(encoding="utf-8").strip()

    @property
    def http_url(self) -> str:
        """The service's HTTP server (`http://127.0.0.1:<port>`), once the service is ready."""
        return (Path(self.cwd or ".") / self.data_dir / "http.url").read_text(encoding="utf-8").strip()

    def credentials(self, role: str = auth.ADMIN) -> auth.Context:
        """The embedded server's credentials of `role` (service, admin or invoker), as written to the data dir."""
        return auth.read_context(auth.context_file(Path(self.cwd or ".") / self.data_dir, role))

    def connect_options(self, role: str = auth.ADMIN) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` to the embedded server as `role`."""
        found = self.credentials(role)
        return {
            "servers": [self.url],
            "user": found.user,
            "password": found.password,
            "inbox_prefix": found.inbox_prefix,
        }

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `eventfn <args>` against this service as a user would (with the service's environment plus
        `env`); with the embedded server, it finds the admin credentials in the data directory itself. Blocks until
        the command ends; in async code `await acli(...)`."""
        _refuse_in_event_loop("Serve.cli", "`await serve.acli(...)`")
        return subprocess.run(
            self._cli_command(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
            cwd=self.cwd,
        )

    async def acli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """`cli` without blocking the event loop (TimeoutError after `timeout` s, the command killed)."""
        with anyio.fail_after(timeout):
            done = await anyio.run_process(
                self._cli_command(args), check=False, env={**self.env, **(env or {})}, cwd=self.cwd
            )
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())

    def _cli_command(self, args: tuple[str, ...]) -> list[str]:
        where = ["--data-dir", str(self.data_dir), *(["--nats", self.nats_url] if self.nats_url else [])]
        return [sys.executable, "-m", "eventfn", *args, *where]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Block until the service exits (subprocess.TimeoutExpired after `timeout` s); returns its exit code. In
        async code `await await_exit()`."""
        _refuse_in_event_loop("Serve.wait", "`await serve.await_exit()`")
        assert self.process is not None
        return self.process.wait(timeout)

    async def await_exit(self, timeout: float = 30.0) -> int:
        """Wait until the service exits (TimeoutError after `timeout` s), leaving the event loop running; returns
        its exit code."""
        assert self.process is not None
        with anyio.fail_after(timeout):
            while (code := self.process.poll()) is None:  # noqa: ASYNC110 - nothing tells the loop a child exited
                await anyio.sleep(0.05)
        return code

    def stop(self) -> int | None:
        """SIGTERM and wait for a clean exit (SIGKILL after 30 s); returns the exit code. Blocks until then; in
        async code `await astop()`."""
        _refuse_in_event_loop("Serve.stop", "`await serve.astop()` (or `async with Serve(...)`)")
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

    async def astop(self) -> int | None:
        """`stop` without blocking the event loop; it runs to its end even when the caller is cancelled."""
        with anyio.CancelScope(shield=True):
            code = await anyio.to_thread.run_sync(self.stop)
        return code

    def kill(self) -> None:
        """SIGKILL the service (its workers die with their pipes closed)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.log.close(self.process.stdout)

    def __enter__(self) -> Serve:
        try:
            return self.start()
        except BaseException:  # never ready: `__exit__` will not run, so the process is stopped here
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Serve:
        try:
            return await self.astart()
        except BaseException:  # never ready: `__aexit__` will not run, so the process is stopped here
            await self.astop()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()


_SERVE_READY = r"eventfn ready"


# -- structured signals: the control API ------------------------------------------------------------------------


class Requester(Protocol):
    """What the API helpers need of a NATS client (a connected `nats.aio.client.Client` has it)."""

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> Any: ...


async def api(nc: Requester, operation: str, data: bytes = b"", *, timeout: float = 5.0) -> Any:
    """The decoded JSON answer of control-API operation `operation` (`functions`, `mappings`), as the CLI sees it."""
    reply = await nc.request(subjects.API_PREFIX + operation, data, timeout=timeout)
    return json.loads(reply.data)


async def mapping_info(nc: Requester, name: str) -> dict[str, Any]:
    """What `eventfn mappings` shows for mapping `name` (`<function>--<trigger>` or `<function>--async`)."""
    infos = {m["name"]: m for m in await api(nc, "mappings")}
    if name not in infos:
        raise LookupError(f"no mapping {name!r} listed (mappings: {', '.join(sorted(infos)) or 'none'})")
    return dict(infos[name])


async def mapping_stats(nc: Requester, name: str) -> dict[str, Any]:
    """Mapping `name`'s counters in the service that answered: received, invocations, processed, failed,
    retried, filtered, dead_lettered, last_result, last_error (they start again when the mapping restarts)."""
    return dict((await mapping_info(nc, name))["stats"])


async def function_info(nc: Requester, name: str) -> dict[str, Any] | None:
    """What `eventfn functions` shows for function `name` (state, version, serving_version, last_error, …);
    None while the service does not list it."""
    return next((dict(f) for f in await api(nc, "functions") if f["name"] == name), None)


async def wait_until(
    probe: Callable[[], Awaitable[_T]],
    done: Callable[[_T], bool],
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "the condition",
) -> _T:
    """Poll `probe()` every `interval` s until `done(value)` holds; returns that value. After `timeout` s it
    raises TimeoutError naming `what` and the last value seen (a structured signal, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s; last: {value!r}")
        await anyio.sleep(interval)


async def wait_stats(nc: Requester, mapping: str, *, timeout: float = 20.0, **at_least: int) -> dict[str, Any]:
    """Wait until each counter named in `at_least` of `mapping` has reached that value; returns the counters.

    await wait_stats(nc, "orders--t0", dead_lettered=1)  # rather than a wait for "... dead-lettered" in the log
    """

    def reached(stats: dict[str, Any]) -> bool:
        return all(stats[counter] >= value for counter, value in at_least.items())

    what = f"{mapping}: " + ", ".join(f"{counter} >= {value}" for counter, value in at_least.items())
    return await wait_until(lambda: mapping_stats(nc, mapping), reached, timeout=timeout, what=what)


async def wait_serving(
    nc: Requester, function: str, *, replacing: str | None = None, timeout: float = 20.0
) -> dict[str, Any]:
    """Wait until `function` serves the latest version of its code, and that is not version `replacing` (the
    one it served before an edit); returns its info. The log says this as `function NAME loaded|reloaded`."""

    def serving(info: dict[str, Any] | None) -> bool:
        return info is not None and info["serving_version"] == info["version"] != replacing

    info = await wait_until(lambda: function_info(nc, function), serving, timeout=timeout, what=f"{function} serving")
    assert info is not None
    return info


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
