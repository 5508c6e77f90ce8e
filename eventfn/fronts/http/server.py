"""The HTTP server: a lean asyncio protocol on httptools (the parser uvicorn uses), in the service's event loop.

Chosen by measurement (`benchmarks/http.py`): against uvicorn with httptools and granian, serving the same
function URL. A protocol of our own also holds the limits where they cost nothing:

- **Body limit.** A front reads the body with its limit (`Request.read` / `chunks`); a declared length over it
  is answered 413 before a byte of the body is read (a client sending `Expect: 100-continue` never sends it),
  a chunked body is cut off where it passes the limit. Either way the connection closes after the 413.
- **Timeouts.** A request's head must arrive within `header_timeout` of its first byte (408, then close); a
  body may pause at most `read_timeout`; an idle keep-alive connection closes after `keepalive_timeout`.
- **Malformed requests** (a parser error, a bad header) get 400 and the connection closes: never a 500.
- **Flow control both ways.** Reading pauses while a body's unread chunks pass `BUFFER` bytes or a pipelined
  request waits; a streamed response waits for the transport to drain.

A client that goes away mid-request does not cancel its handler: an invocation runs to its end (as Lambda's
does); what it answers is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import anyio
import anyio.abc
import httptools

from eventfn.config import HttpSettings
from eventfn.web import Body, BodyIncomplete, BodyTooLarge, Request, Response

log = logging.getLogger(__name__)

App = Callable[[Request], Awaitable[Response]]

#: Bytes of unread body buffered before reading from the socket pauses.
BUFFER = 1 << 20
#: Limits of a request's head: the target, one header, all headers, how many.
MAX_URL = 16 * 1024
MAX_HEADERS_BYTES = 64 * 1024
MAX_HEADERS = 128

_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _head(status: int, headers: list[tuple[str, str]], length: int, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:  # no header injection from a handler
            continue
        lines.append(f"{name}: {value}")
    if status >= 200 and status not in (204, 304):
        lines.append(f"Content-Length: {length}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _error(status: int, message: str) -> Response:
    return Response(status, [("Content-Type", "text/plain; charset=utf-8")], (message + "\n").encode())


class _Pipe:
    """One request's body between the parser and the front reading it."""

    __slots__ = ("buffered", "chunks", "complete", "conn", "continued", "expect", "failed", "ready", "started")

    def __init__(self, conn: _Connection, expect: bool) -> None:
        self.conn = conn
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.failed = False
        self.ready = asyncio.Event()
        self.expect = expect
        self.continued = False
        self.started = False

    def feed(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.buffered += len(chunk)
        self.ready.set()
        if self.buffered > BUFFER:
            self.conn.pause()

    def end(self, *, failed: bool = False) -> None:
        self.complete = True
        self.failed = failed
        self.ready.set()

    async def next_chunk(self) -> bytes | None:
        self.started = True
        if self.expect and not self.continued and not self.complete:
            self.continued = True
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self.chunks:
            if self.complete:
                if self.failed:
                    raise BodyIncomplete("the client closed the connection before the body ended")
                return None
            self.ready.clear()
            self.conn.resume()
            try:
                await asyncio.wait_for(self.ready.wait(), self.conn.settings.read_timeout)
            except TimeoutError:
                self.conn.timed_out_body = True
                raise BodyIncomplete(f"no body data for {self.conn.settings.read_timeout:g} s (read_timeout)") from None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered <= BUFFER // 2:
            self.conn.resume()
        return chunk


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs them one after another, writes their responses in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.settings = server.settings
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.closed = False
        self.timed_out_body = False
        self._paused = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._queue: collections.deque[tuple[Request, _Pipe, bool]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        # The request being parsed.
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._pipe: _Pipe | None = None
        self._parse_error: tuple[int, str] | None = None

    # -- transport events -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.server.connections.add(self)
        self._arm(self.settings.header_timeout, self._head_timeout)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.settled()
        self._cancel_timer()
        if self._pipe is not None and not self._pipe.complete:
            self._pipe.end(failed=True)
        for _, pipe, _ in self._queue:
            if not pipe.complete:
                pipe.end(failed=True)
        self._drained.set()
        self._wake.set()

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()

    def data_received(self, data: bytes) -> None:
        if self._parse_error is not None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed request: {exc}")

    # -- parser callbacks -------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # From a request's first byte its head has `header_timeout` to arrive (however slowly it trickles in).
        if not self._busy and not self._queue:
            self._arm(self.settings.header_timeout, self._head_timeout)
        self._url = bytearray()
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            raise httptools.HttpParserError("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADERS_BYTES or len(self._headers) >= MAX_HEADERS:
            raise httptools.HttpParserError("request headers too large")
        try:
            self._headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
        except UnicodeDecodeError:
            raise httptools.HttpParserError("a header name is not ASCII") from None

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        try:
            url = httptools.parse_url(bytes(self._url))
        except httptools.HttpParserInvalidURLError:
            raise httptools.HttpParserError("malformed request target") from None
        path = (url.path or b"/").decode("latin-1")
        if not path.startswith("/"):
            raise httptools.HttpParserError("the request target must be a path")
        method = self.parser.get_method().decode("ascii")
        headers = self._headers
        declared: int | None = None
        chunked = False
        for name, value in headers:
            if name == "content-length":
                declared = int(value) if value.strip().isdigit() else -1
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if declared == -1:
            raise httptools.HttpParserError("malformed Content-Length")
        expect = any(n == "expect" and v.lower() == "100-continue" for n, v in headers)
        pipe = _Pipe(self, expect)
        if not chunked and not declared:
            pipe.complete = True
        self._pipe = pipe
        request = Request(
            method=method,
            path=path,
            query=(url.query or b"").decode("latin-1"),
            headers=headers,
            client=self.client,
            http_version=self.parser.get_http_version(),
            body=Body(declared if not chunked else None, pipe.next_chunk),
            request_id=str(uuid.uuid4()),
            received=time.time(),
        )
        self._queue.append((request, pipe, self.parser.should_keep_alive()))
        self._wake.set()
        if len(self._queue) > 1:  # a pipelined request waits: read no further for now
            self.pause()

    def on_body(self, body: bytes) -> None:
        if self._pipe is not None:
            self._pipe.feed(body)

    def on_message_complete(self) -> None:
        if self._pipe is not None:
            self._pipe.end()
            self._pipe = None

    # -- serving ----------------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while not self.closed:
                if not self._queue:
                    if self._parse_error is not None:
                        status, message = self._parse_error
                        await self._send(_error(status, message), keep_alive=False, head=False)
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                request, pipe, keep_alive = self._queue.popleft()
                self._busy = True
                self.resume()
                response = await self._answer(request)
                # A body the front left unread (or a 413, a timeout) cannot be skipped safely: close after.
                keep_alive = (
                    keep_alive and pipe.complete and not pipe.failed and not pipe.chunks and not self.server.stopping
                )
                if self._parse_error is not None:
                    keep_alive = False
                await self._send(response, keep_alive=keep_alive, head=request.method == "HEAD")
                self._busy = False
                self.server.settled()
                if not keep_alive:
                    return
                if not self._queue:
                    self._arm(self.settings.keepalive_timeout, self._idle_timeout)
        except Exception:
            log.exception("HTTP connection from %s failed", self.client)
        finally:
            self.close()

    async def _answer(self, request: Request) -> Response:
        try:
            return await self.server.app(request)
        except BodyTooLarge as exc:
            return _error(413, f"request body too large: the limit is {exc.limit} bytes")
        except BodyIncomplete as exc:
            return _error(408 if self.timed_out_body else 400, f"request body incomplete: {exc}")
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return _error(500, f"internal error (request {request.request_id}; see the service log)")

    async def _send(self, response: Response, *, keep_alive: bool, head: bool) -> None:
        length = response.length if response.length is not None else len(response.body)
        self.write(_head(response.status, response.headers, length, keep_alive))
        if head:
            return
        if response.stream is None:
            if response.body:
                self.write(response.body)
            return
        sent = 0
        async for chunk in response.stream:
            if self.closed:
                break
            self.write(chunk)
            sent += len(chunk)
            await self._drained.wait()
        if sent != length:  # the stream ended short of its Content-Length: the client must not wait for more
            self.close()

    # -- helpers ----------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed and len(self._queue) <= 1:
            if self._pipe is None or self._pipe.buffered <= BUFFER // 2:
                self._paused = False
                self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    def _fail(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answered (after those before it) and the connection closed."""
        self._parse_error = (status, message)
        if self._pipe is not None:
            self._pipe.end(failed=True)
            self._pipe = None
        self.pause()
        self._wake.set()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        if self._queue:
            return
        if self._url or self._headers:
            self._fail(408, f"request head not received within {self.settings.header_timeout:g} s (header_timeout)")
        else:
            self.close()

    def _idle_timeout(self) -> None:
        if not self._busy and not self._queue and self._pipe is None:
            self.close()

    def idle(self) -> bool:
        return not self._busy and not self._queue and self._pipe is None


class HttpServer:
    """Serves `app` on `settings.host:port` until stopped; in-flight requests finish first."""

    def __init__(self, settings: HttpSettings, app: App) -> None:
        self.settings = settings
        self.app = app
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.port = settings.port
        self.done = anyio.Event()
        self._stop = anyio.Event()
        #: Set whenever a connection finishes a request or closes (a stopping server waits for in-flight ones).
        self._settled = asyncio.Event()

    def settled(self) -> None:
        self._settled.set()

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}"

    async def bind(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: self._accept(),
                host=self.settings.host or None,
                port=self.settings.port,
                backlog=1024,
                reuse_address=True,
            )
        except OSError as exc:
            from eventfn.errors import ConfigError

            raise ConfigError(
                f"[http] {self.settings.host}:{self.settings.port}",
                f"the HTTP server cannot listen there: {exc.strerror or exc}",
                "set [http] port (or EVENTFN_HTTP_PORT; 0 for any free port), or [http] enabled = false",
            ) from None
        self.port = server.sockets[0].getsockname()[1]
        return server

    def _accept(self) -> asyncio.Protocol:
        conn = _Connection(self)
        if len(self.connections) >= self.settings.max_connections:
            log.warning("HTTP: %d connections open (max_connections); refusing one", len(self.connections))
            return _Refuse()
        return conn

    async def run(self, server: asyncio.Server) -> None:
        """Serve on `server` (from `bind`) until `stop()`; then wait for in-flight requests."""
        try:
            await self._stop.wait()
            self.stopping = True
            server.close()
            for conn in list(self.connections):
                if conn.idle():
                    conn.close()
            while any(not c.idle() for c in self.connections):
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
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_head(503, [("Retry-After", "1")], 0, False))
        transport.close()
