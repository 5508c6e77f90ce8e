"""One client connection of the HTTP server (`eventfn.fronts.http.server`): requests parsed with httptools, the
head's limits and timeouts, bodies handed to fronts with flow control, answers written in request order.

The limits, what a client sees, and why they sit here are in the server's docstring.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import NoReturn, Protocol

import httptools

from eventfn.config import HttpSettings
from eventfn.fronts.http import peers
from eventfn.web import Body, BodyBudget, BodyIncomplete, BodyTooLarge, Request, Response, ServerBusy

log = logging.getLogger(__name__)

App = Callable[[Request], Awaitable[Response]]


class Host(Protocol):
    """What a connection needs of its server (`HttpServer`)."""

    settings: HttpSettings
    app: App
    #: Open connections, and closed ones whose request is still being answered.
    connections: set[Connection]
    #: The server is stopping: answers close their connections.
    stopping: bool
    #: Bytes of request bodies held in memory at once, across connections.
    budget: BodyBudget

    def settled(self) -> None:
        """A request was answered or a connection closed."""

    def track(self, task: asyncio.Task[None]) -> None:
        """Hold a connection's task until it ends."""


#: Bytes of unread body buffered before reading from the socket pauses.
BUFFER = 1 << 20
#: Limits of a request's head: the target (414 past it), all header names and values, how many (431).
MAX_URL = 16 * 1024
MAX_HEADERS_BYTES = 64 * 1024
MAX_HEADERS = 128
#: Bytes of an unfinished head held at most (the request line, separators and one header still being received:
#: the parser reports a header only once it is complete).
MAX_HEAD = MAX_URL + MAX_HEADERS_BYTES + 8 * 1024
#: After answering a request whose input was not read to its end: how long, and how many bytes, to keep reading
#: and discarding it before closing.
LINGER = 2.0
LINGER_BYTES = 64 << 20

_REASONS = {s.value: s.phrase for s in HTTPStatus}
#: Headers the server writes itself: a front's own would contradict its framing.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


class _Clock:
    """The Date header, formatted at most once a second."""

    second = 0
    text = ""

    @classmethod
    def date(cls) -> str:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.text = email.utils.formatdate(now, usegmt=True)
        return cls.text


def response_head(
    status: int, headers: list[tuple[str, str]], length: int | None, keep_alive: bool, http10: bool
) -> bytes:
    """The status line and headers; `length` None: no Content-Length (a 1xx, 204 or 304)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    dated = False
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:  # no header injection from a handler
            continue
        lower = name.lower()
        if lower in _OWN_HEADERS:
            continue
        dated = dated or lower == "date"
        lines.append(f"{name}: {value}")
    if not dated:
        lines.append(f"Date: {_Clock.date()}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if not keep_alive:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _error(status: int, message: str) -> Response:
    return Response(status, [("Content-Type", "text/plain; charset=utf-8")], (message + "\n").encode())


async def _no_body() -> bytes | None:
    return None


class _Reject(Exception):
    """A request the server refuses from its head: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Pipe:
    """One request's body between the parser and the front reading it."""

    __slots__ = (
        "buffered",
        "chunks",
        "complete",
        "conn",
        "continued",
        "expect",
        "fed",
        "problem",
        "ready",
        "timed_out",
    )

    def __init__(self, conn: Connection, expect: bool) -> None:
        self.conn = conn
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        #: Why the body cannot be read to its end (the client left, sent bad framing), or None.
        self.problem: str | None = None
        self.timed_out = False
        self.ready = asyncio.Event()
        self.expect = expect
        self.continued = False
        #: Some of the body arrived (so a 100 Continue is not needed).
        self.fed = False

    def feed(self, chunk: bytes) -> None:
        self.fed = True
        self.chunks.append(chunk)
        self.buffered += len(chunk)
        self.ready.set()
        if self.buffered > BUFFER:
            self.conn.pause()

    def end(self, problem: str | None = None) -> None:
        if not self.complete:
            self.complete = True
            self.problem = problem
            self.ready.set()

    @property
    def whole(self) -> bool:
        """Whether the body arrived to its end (so that the next request on the connection can be parsed)."""
        return self.complete and self.problem is None

    @property
    def unanswered(self) -> bool:
        """The client waits for a 100 Continue that was never sent: it may take the final answer for that of its
        `Expect` (botocore does, and keeps the status line for its next request on the connection)."""
        return self.expect and not self.continued and not self.fed

    async def next_chunk(self) -> bytes | None:
        # An empty body too: the aws CLI waits for it before a zero-length PutObject's final answer.
        if self.expect and not self.continued and (not self.complete or not self.fed):
            self.continued = True
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self.chunks:
            if self.complete:
                if self.problem is not None:
                    raise BodyIncomplete(self.problem)
                return None
            self.ready.clear()
            self.conn.resume()
            try:
                await asyncio.wait_for(self.ready.wait(), self.conn.settings.read_timeout)
            except TimeoutError:
                self.timed_out = True
                self.end(f"no body data for {self.conn.settings.read_timeout:g} s (read_timeout)")
                raise BodyIncomplete(self.problem) from None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered <= BUFFER // 2:
            self.conn.resume()
        return chunk


class Connection(asyncio.Protocol):
    """One client connection: parses requests, runs them one after another, writes their responses in order."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self.settings = server.settings
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = ""
        #: The client's and the server's (host, port), and who owns the client's socket once asked (`peer_uid`).
        self._ends: tuple[tuple[str, int], tuple[str, int]] | None = None
        self._uid: int | None = None
        self._uid_known = False
        #: The transport is closed (or closing): nothing more is written.
        self.closed = False
        self._eof = False
        self._paused = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._queue: collections.deque[tuple[Request, _Pipe | None, bool]] = collections.deque()
        self._wake = asyncio.Event()
        self._serving = False
        self._loop = asyncio.get_running_loop()
        #: One timer per connection (the head, idle or linger deadline), moved lazily: see `_arm`.
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._on_deadline: Callable[[], None] | None = None
        self._busy = False
        self._lingering = False
        self._discarded = 0
        # The request being parsed: its head (from its first byte), then its body.
        self._head_began: float | None = None
        self._head_bytes = 0
        #: Requests whose parsing began: tells a head that went on from one that ended and another began.
        self._begun = 0
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._pipe: _Pipe | None = None
        #: A request the parser refused: answered after those before it, then the connection closes.
        self._error: tuple[int, str] | None = None
        self._reject: _Reject | None = None

    def peer_uid(self) -> int | None:
        """Who owns the client's socket (`peers.socket_uid`), looked up once per connection, when first asked."""
        if not self._uid_known and self._ends is not None:
            self._uid = peers.socket_uid(*self._ends)
            self._uid_known = True
        return self._uid

    # -- transport events -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        here = transport.get_extra_info("sockname")
        if isinstance(peer, tuple) and isinstance(here, tuple):
            self._ends = ((peer[0], peer[1]), (here[0], here[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        # The first request has `header_timeout` from the connection's start.
        self._arm(self.settings.header_timeout, self._head_timeout)
        self._serving = True
        self.server.track(self._loop.create_task(self._serve()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self._pipe is not None:
            self._pipe.end("the client closed the connection before the body ended")
        for _, pipe, _ in self._queue:
            if pipe is not None:
                pipe.end("the client closed the connection before the body ended")
        self._drained.set()
        self._wake.set()
        self._release()

    def eof_received(self) -> bool:
        # A client may half-close once it has sent its request (`nc`, some scripts): its answers still go out.
        self._eof = True
        if self._pipe is not None:
            self._pipe.end("the client ended its side of the connection before the body ended")
        self._wake.set()
        return not self._lingering and not self.idle()

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.close()
            return
        if self._error is not None:
            return
        try:
            begun = self._begun
            if self._head_began is not None and self._head_bytes + len(data) > MAX_HEAD:
                # The parser holds a header until it is complete: feed no more than a head may take.
                room = max(0, MAX_HEAD - self._head_bytes)
                self._feed(data[:room])
                if self._begun == begun and self._head_began is not None and self._error is None:
                    self._fail(431, f"request head over {MAX_HEAD} bytes")
                    return
                data = data[room:]
                begun = self._begun
            within = self._head_began is not None
            self._feed(data)
            if within and self._begun == begun and self._head_began is not None:
                self._head_bytes += len(data)
        except httptools.HttpParserError as exc:
            if self._reject is not None:
                self._fail(self._reject.status, self._reject.message)
            else:
                self._fail(400, f"malformed request: {exc}")

    def _feed(self, data: bytes) -> None:
        while data:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # `Upgrade: h2c` (curl --http2) and the like: answered as plain HTTP/1.1, parsing goes on.
                data = data[exc.args[0] :]

    # -- parser callbacks -------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1
        self._head_began = time.monotonic()
        self._head_bytes = 0
        if not self._busy and not self._queue:
            # From a request's first byte its head has `header_timeout` to arrive, however slowly it trickles in.
            self._arm(self.settings.header_timeout, self._head_timeout)
        self._url = bytearray()
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            self._refuse(414, f"request target over {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADERS_BYTES:
            self._refuse(431, f"request headers over {MAX_HEADERS_BYTES} bytes")
        if len(self._headers) >= MAX_HEADERS:
            self._refuse(431, f"more than {MAX_HEADERS} request headers")
        # llhttp admits only token characters in a name: ASCII.
        self._headers.append((name.decode("ascii").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._head_began = None
        if not self._busy and not self._queue:
            self._cancel_timer()
        target = bytes(self._url)
        if target[:1] == b"/" and b"#" not in target:  # origin-form, the usual: no need for the URL parser
            raw_path, _, raw_query = target.partition(b"?")
        else:
            try:
                url = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                self._refuse(400, "malformed request target")
            raw_path, raw_query = url.path or b"/", url.query or b""
        path = raw_path.decode("latin-1")
        if not path.startswith("/"):
            self._refuse(400, "the request target must be a path")
        headers = self._headers
        declared: int | None = None
        chunked = False
        expect = False
        for name, value in headers:
            if name == "content-length":  # llhttp has checked it is digits, and the only one
                declared = int(value) if value.isascii() and value.isdigit() else None
            elif name == "transfer-encoding":
                coding = value.rpartition(",")[2].strip().lower()
                if coding != "chunked" or chunked:
                    # RFC 9112 6.3: a body whose length cannot be known reliably (a request smuggling vector).
                    self._refuse(400, f"unsupported Transfer-Encoding {value!r}: only chunked, once, is accepted")
                chunked = True
            elif name == "expect":
                expect = value.lower() == "100-continue"
        version = self.parser.get_http_version()
        if self.parser.should_upgrade() and (declared or chunked):
            self._refuse(400, "a request with Upgrade cannot have a body")
        pipe: _Pipe | None = None
        expect = expect and version != "1.0"
        if chunked or declared or expect:
            pipe = _Pipe(self, expect)
            body = Body(None if chunked else declared or 0, pipe.next_chunk, self.server.budget)
        else:
            body = Body(0, _no_body)
        self._pipe = pipe
        request = Request(
            method=self.parser.get_method().decode("ascii"),
            path=path,
            query=raw_query.decode("latin-1"),
            headers=headers,
            client=self.client,
            http_version=version,
            body=body,
            received=time.time(),
            peer_uid=self.peer_uid,
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

    def _refuse(self, status: int, message: str) -> NoReturn:
        # An exception in a parser callback stops the parser; httptools re-raises it as an HttpParserError.
        self._reject = _Reject(status, message)
        raise self._reject

    # -- serving ----------------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while not self.closed:  # requests still queued when the client left are not started
                if not self._queue:
                    if self._error is not None:
                        status, message = self._error
                        await self._send(_error(status, message), keep_alive=False, head=False, http10=False)
                        self._finish(linger=True)
                        return
                    if self._eof:
                        self.close()
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                request, pipe, keep_alive = self._queue.popleft()
                self._busy = True
                self.resume()
                response = await self._answer(request, pipe)
                whole = pipe is None or pipe.whole
                if pipe is not None and pipe.chunks:  # read to its end but not by the front: dropped
                    pipe.chunks.clear()
                    pipe.buffered = 0
                # A body that did not arrive whole cannot be skipped safely: the connection closes after; so does
                # one whose client still waits for its 100 Continue.
                keep_alive = keep_alive and whole and not self.server.stopping and not self._eof
                keep_alive = keep_alive and not (pipe is not None and pipe.unanswered)
                try:
                    sent = await self._send(
                        response,
                        keep_alive=keep_alive,
                        head=request.method == "HEAD",
                        http10=request.http_version == "1.0",
                    )
                finally:
                    request.release()
                self._busy = False
                self.server.settled()
                if not (keep_alive and sent):
                    self._finish(linger=not whole)
                    return
                if not self._drained.is_set():  # a client that does not read its answers gets no more
                    await self._drained.wait()
                self._next_timer()
        except Exception:
            log.exception("HTTP connection from %s failed", self.client)
            self.close()
        finally:
            self._busy = False
            self._serving = False
            self._release()
            self.server.settled()

    async def _answer(self, request: Request, pipe: _Pipe | None) -> Response:
        try:
            return await self.server.app(request)
        except BodyTooLarge as exc:
            return _error(413, f"request body too large: the limit is {exc.limit} bytes")
        except ServerBusy:
            busy = _error(503, "too many request bodies at once: try again shortly")
            busy.headers.append(("Retry-After", "1"))
            return busy
        except BodyIncomplete as exc:
            timed_out = pipe is not None and pipe.timed_out
            return _error(408 if timed_out else 400, f"request body incomplete: {exc}")
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return _error(500, f"internal error (request {request.request_id}; see the service log)")

    async def _send(self, response: Response, *, keep_alive: bool, head: bool, http10: bool) -> bool:
        """Write `response`; False if the connection cannot go on (a stream that ended short or ran long)."""
        status = response.status
        stream = response.stream
        try:
            if not 200 <= status <= 999:
                log.error("HTTP: a front answered status %r; sent 500 instead", status)
                response = _error(500, "internal error (an invalid status)")
                status = 500
            bodiless = status in (204, 304)
            length = response.length if response.length is not None else len(response.body)
            head_bytes = response_head(status, response.headers, None if bodiless else length, keep_alive, http10)
            if head or bodiless:
                self.write(head_bytes)
                return True
            if response.stream is None:
                # One write (one syscall) for a small answer; a large body is not copied to join it.
                body = response.body
                if len(body) <= 16 * 1024:
                    self.write(head_bytes + body)
                else:
                    self.write(head_bytes)
                    self.write(body)
                return True
            self.write(head_bytes)
            return await self._stream(response.stream, length)
        finally:
            if stream is not None:
                await _close(stream)

    async def _stream(self, stream: AsyncIterator[bytes], length: int) -> bool:
        sent = 0
        async for chunk in stream:
            if self.closed:
                return False
            if sent + len(chunk) > length:
                log.error("HTTP: a front streamed more than the %d bytes it declared; the connection closes", length)
                self.write(chunk[: length - sent])
                return False
            self.write(chunk)
            sent += len(chunk)
            if not self._drained.is_set():
                await self._drained.wait()
        # A stream that ended short of its Content-Length: the client must not wait for more.
        return sent == length

    # -- helpers ----------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self._paused or self.transport is None or self.closed:
            return
        if self._lingering or (
            self._error is None and len(self._queue) <= 1 and (self._pipe is None or self._pipe.buffered <= BUFFER // 2)
        ):
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _finish(self, *, linger: bool) -> None:
        """Close after the last answer; with unread input, half-close and discard it for a while first."""
        if self.closed or not linger or self._eof or self.transport is None or not self.transport.can_write_eof():
            self.close()
            return
        self._lingering = True
        self.transport.write_eof()  # after what is buffered
        self.resume()
        self._arm(LINGER, self.close)

    def _fail(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answered (after those before it) and the connection closed."""
        self._error = (status, message)
        self._head_began = None
        if self._pipe is not None:
            self._pipe.end(f"malformed request: {message}")
            self._pipe = None
        self.pause()
        self._wake.set()

    def _release(self) -> None:
        if self.closed and not self._serving:
            self.server.connections.discard(self)

    def _next_timer(self) -> None:
        """After an answer: the next request's head, if it began, keeps its deadline; else the idle timeout."""
        if self._queue:
            return
        if self._head_began is not None:
            left = self.settings.header_timeout - (time.monotonic() - self._head_began)
            self._arm(max(0.0, left), self._head_timeout)
        else:
            self._arm(self.settings.keepalive_timeout, self._idle_timeout)

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Call `callback` in `delay` s, unless re-armed or cancelled before.

        Every request moves the deadline (its head's, then the idle one): rather than a new timer each time, a
        deadline later than the timer's leaves the timer be, and when it fires it re-arms itself for the rest."""
        self._deadline = self._loop.time() + delay
        self._on_deadline = callback
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        callback = self._on_deadline
        if callback is None:
            return
        if self._loop.time() + 0.001 < self._deadline:  # moved later meanwhile
            self._timer = self._loop.call_at(self._deadline, self._tick)
            return
        self._on_deadline = None
        callback()

    def _cancel_timer(self) -> None:
        self._on_deadline = None  # the timer, if it fires, finds nothing to do

    def _stop_timer(self) -> None:
        self._on_deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        if self._busy or self._queue:
            return
        if self._head_began is not None:
            self._fail(408, f"request head not received within {self.settings.header_timeout:g} s (header_timeout)")
        else:
            self.close()

    def _idle_timeout(self) -> None:
        if self.idle():
            self.close()

    def idle(self) -> bool:
        """No request in flight, waiting or being received (or only input being discarded before closing)."""
        return self._lingering or (not self._busy and not self._queue and self._pipe is None and self._error is None)


async def _close(stream: AsyncIterator[bytes]) -> None:
    """Close a response stream (an async generator holding a file, say) however its sending ended."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.exception("HTTP: closing a response stream failed")
