"""The HTTP server: a lean asyncio protocol on httptools (the parser uvicorn uses), in the service's event loop.

Chosen by measurement (`benchmarks/http.py`): against uvicorn with httptools and granian, serving the same
hello-world and function URL. A protocol of our own also holds the limits where they cost nothing:

- **Body limit.** A front reads the body with its limit (`Request.read` / `chunks`); a declared length over it
  is answered 413 before a byte of the body is read (a client sending `Expect: 100-continue` never sends it),
  a chunked body is cut off where it passes the limit. Either way the connection closes after the 413.
- **Bodies in memory.** Bodies that fronts read whole count against one budget (`BUFFERED_BODIES` bodies of
  `max_body`) until answered: past it a request is refused unread with its front's retryable answer (`Front.busy`),
  so that a flood of large bodies cannot grow the service's memory without bound.
- **Head limits.** A request target over `MAX_URL` bytes is a 414, headers over `MAX_HEADERS_BYTES` (or more than
  `MAX_HEADERS` of them) a 431.
- **Timeouts.** A request's head must arrive within `header_timeout` of its first byte, however slowly it
  trickles in (408, then close); a body may pause at most `read_timeout` (408); an idle keep-alive connection
  closes after `keepalive_timeout`.
- **Malformed requests** (a parser error, a bad header, bad chunk framing) get 400 and the connection closes:
  never a 500, which only an exception in a front (a bug) gives.
- **Flow control both ways.** Reading pauses while a body's unread chunks pass `BUFFER` bytes or a pipelined
  request waits; a response waits for the transport to drain before the next chunk or the next request.
- **Closing with unread input** (after a 413, a 400, a 408, a 503) half-closes first and discards what the client
  still sends for up to `LINGER` seconds, so that a client busy sending its body reads the answer instead of a
  connection reset.

A client that goes away mid-request does not cancel its handler: an invocation runs to its end (as Lambda's
does); what it answers is dropped.

This module listens, counts connections (503 past `max_connections`) and stops; each connection's work, and the
limits named above, are in `eventfn.fronts.http.connection`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import anyio

from eventfn.config import HttpSettings
from eventfn.errors import ConfigError
from eventfn.fronts.http.connection import LINGER, LINGER_BYTES, App, Connection, response_head
from eventfn.web import BodyBudget

log = logging.getLogger(__name__)

__all__ = ["App", "HttpServer"]

#: Request bodies of `[http] max_body` that the server holds in memory at once (`BodyBudget`); past them, a body that
#: a front would read whole is refused (its front's 429 or 503) rather than buffered.
BUFFERED_BODIES = 16


class HttpServer:
    """Serves `app` on `settings.host:port` until stopped; in-flight requests finish first."""

    def __init__(self, settings: HttpSettings, app: App) -> None:
        self.settings = settings
        self.app = app
        #: Open connections, and closed ones whose request is still being answered.
        self.connections: set[Connection] = set()
        self.stopping = False
        self.budget = BodyBudget(BUFFERED_BODIES * settings.max_body)
        self.port = settings.port
        self.done = anyio.Event()
        self._stop = anyio.Event()
        #: Set whenever a connection finishes a request or closes (a stopping server waits for in-flight ones).
        self._settled = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refused: set[_Refuse] = set()
        self._refusal_logged = 0.0

    def settled(self) -> None:
        self._settled.set()

    def track(self, task: asyncio.Task[None]) -> None:
        """Hold a connection's task until it ends (the loop keeps only weak references)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}"

    async def bind(self) -> asyncio.Server:
        """Listen on `settings.host:port` (port 0: any free one; `port` then says which)."""
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                self._accept,
                host=self.settings.host or None,
                port=self.settings.port,
                backlog=1024,
                reuse_address=True,
            )
        except OSError as exc:
            raise ConfigError(
                f"[http] {self.settings.host}:{self.settings.port}",
                f"the HTTP server cannot listen there: {exc.strerror or exc}",
                "choose another port with --http-port, EVENTFN_HTTP_PORT or [http] port (0: any free port), "
                "or run without HTTP: --no-http or [http] enabled = false",
            ) from None
        self.port = server.sockets[0].getsockname()[1]
        return server

    def _accept(self) -> asyncio.Protocol:
        # Counted here, not in connection_made: a burst of accepts is made before any of them starts.
        if len(self.connections) >= self.settings.max_connections or self.stopping:
            now = time.monotonic()
            if now - self._refusal_logged > 10:
                self._refusal_logged = now
                log.warning(
                    "HTTP: %d connections open ([http] max_connections); refusing more with 503",
                    len(self.connections),
                )
            return _Refuse(self._refused)
        conn = Connection(self)
        self.connections.add(conn)
        return conn

    async def run(self, server: asyncio.Server) -> None:
        """Serve on `server` (from `bind`) until `stop()`; then wait for in-flight requests."""
        try:
            await self._stop.wait()
            self.stopping = True
            server.close()
            for refused in list(self._refused):
                refused.close()
            while True:
                for conn in list(self.connections):
                    if conn.idle():
                        conn.close()
                if not any(not c.idle() for c in self.connections):
                    break
                self._settled.clear()
                await self._settled.wait()
            for conn in list(self.connections):
                conn.close()
        finally:
            server.close()
            self.done.set()

    def stop(self) -> None:
        self._stop.set()


class _Refuse(asyncio.Protocol):
    """A connection over `max_connections`: a 503, then the request it sends is discarded briefly and it closes."""

    def __init__(self, registry: set[_Refuse]) -> None:
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.read = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.registry.add(self)
        body = b"too many connections: try again shortly\n"
        answer = response_head(503, [("Retry-After", "1"), ("Content-Type", "text/plain")], len(body), False, False)
        transport.write(answer + body)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER, self.close)

    def data_received(self, data: bytes) -> None:
        self.read += len(data)
        if self.read > LINGER_BYTES:
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
