"""The HTTP server (`eventfn.fronts.http.server`): keep-alive, pipelining, limits, timeouts, malformed requests,
flow control, max_connections and a graceful stop, against `HttpServer` serving a small app in-process over real
sockets on 127.0.0.1; and `eventfn serve`'s HTTP flags end to end."""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventfn.config import HttpSettings
from eventfn.fronts.http.connection import MAX_HEADERS, MAX_URL
from eventfn.fronts.http.server import HttpServer
from eventfn.testing import Serve
from eventfn.web import BodyIncomplete, Request, Response

#: The test app's body limit.
LIMIT = 1 << 20


class App:
    """A small front: hello, echo (body read with `LIMIT`), a bug, a request held until released, a stream."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.incomplete: list[str] = []
        self.body_failed = asyncio.Event()
        self.produced = 0
        self.stream_closed = asyncio.Event()
        self.stream: Any = None

    async def __call__(self, request: Request) -> Response:
        path, query = request.path, request.query
        if path == "/hello":
            return Response(200, [("Content-Type", "text/plain")], b"hello")
        if path == "/echo":
            try:
                body = await request.read(LIMIT)
            except BodyIncomplete as exc:
                self.incomplete.append(str(exc))
                self.body_failed.set()
                raise
            return Response(200, [("X-Method", request.method)], body)
        if path == "/order":
            i = int(query.removeprefix("i="))
            await asyncio.sleep((10 - i) * 0.005)  # earlier requests take longer: answers must still come in order
            return Response(200, body=str(i).encode())
        if path == "/ignore":  # answers without reading the body
            return Response(200, body=b"ignored")
        if path == "/boom":
            raise RuntimeError("a bug in a front")
        if path == "/slow":
            self.started.set()
            await self.release.wait()
            return Response(200, body=b"slow done")
        if path == "/stream":
            size, chunk = (int(v) for v in query.split(","))
            self.stream = self._stream(size, chunk)
            return Response(200, stream=self.stream, length=size)
        return Response(404, body=b"no such path")

    async def _stream(self, size: int, chunk: int) -> AsyncIterator[bytes]:
        block = b"x" * chunk
        try:
            while self.produced < size:
                self.produced += chunk
                yield block
        finally:
            self.stream_closed.set()


@asynccontextmanager
async def running(app: App | None = None, **options: Any) -> AsyncIterator[tuple[HttpServer, App]]:
    """`HttpServer` on a free loopback port, serving `app`, with `options` as its `[http]` settings."""
    app = app or App()
    server = HttpServer(HttpSettings(port=0, **options), app)
    listener = await server.bind()
    task = asyncio.create_task(server.run(listener))
    try:
        yield server, app
    finally:
        while _OPEN:
            _OPEN.pop().close()
        app.release.set()
        server.stop()
        with anyio.fail_after(10):
            await server.done.wait()
        await task


#: Clients of the running test, closed when its server stops.
_OPEN: list[Client] = []


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """One raw HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connecting: the window is agreed then
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
        client = cls(reader, writer)
        _OPEN.append(client)
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, *, head: bool = False, timeout: float = 10.0) -> Reply:
        with anyio.fail_after(timeout):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    assert name.lower() not in headers or name.lower() == "set-cookie", f"repeated {name}"
                    headers[name.lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = b"" if head or status < 200 else await self.reader.readexactly(length)
        return Reply(status, headers, body)

    async def closed_by_server(self, timeout: float = 10.0) -> bytes:
        """What the server sends until it closes the connection (EOF or a reset); TimeoutError if it does not within
        `timeout`."""
        received = bytearray()
        with anyio.fail_after(timeout):
            try:
                while data := await self.reader.read(65536):
                    received += data
            except ConnectionResetError:
                pass
        return bytes(received)

    def close(self) -> None:
        self.writer.close()


def get(path: str, *extra: str, method: str = "GET") -> bytes:
    return ("\r\n".join([f"{method} {path} HTTP/1.1", "Host: test", *extra]) + "\r\n\r\n").encode()


async def hello(port: int) -> Reply:
    """A fresh connection's GET /hello: the server still serves."""
    client = await Client.open(port)
    try:
        await client.send(get("/hello"))
        return await client.reply()
    finally:
        client.close()


# -- keep-alive, concurrency, pipelining, HEAD ---------------------------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        for i in range(5):
            await client.send(get("/echo", f"Content-Length: {i}", method="POST") + b"a" * i)
            reply = await client.reply()
            assert (reply.status, reply.body) == (200, b"a" * i)
            assert "connection" not in reply.headers
            assert "date" in reply.headers
        assert len(server.connections) == 1
        client.close()


async def test_many_concurrent_connections_are_served() -> None:
    async with running() as (server, _):

        async def one(n: int) -> list[bytes]:
            client = await Client.open(server.port)
            got = []
            for i in range(3):
                body = f"{n}-{i}".encode()
                await client.send(get("/echo", f"Content-Length: {len(body)}", method="PUT") + body)
                got.append((await client.reply()).body)
            client.close()
            return got

        results = await asyncio.gather(*(one(n) for n in range(200)))
        assert results == [[f"{n}-{i}".encode() for i in range(3)] for n in range(200)]


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        batch = b"".join(get(f"/order?i={i}") for i in range(5))
        batch += get("/echo", "Content-Length: 4", method="POST") + b"body"
        batch += b"".join(get(f"/order?i={i}") for i in range(5, 10))
        await client.send(batch)  # all in one write
        bodies = [(await client.reply()).body for _ in range(11)]
        assert bodies == [b"0", b"1", b"2", b"3", b"4", b"body", b"5", b"6", b"7", b"8", b"9"]
        client.close()


async def test_requests_pipelined_ahead_of_a_malformed_one_are_answered_first() -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        await client.send(get("/order?i=1") + get("/order?i=2") + b"GARBAGE\r\n\r\n")
        assert [(await client.reply()).body for _ in range(2)] == [b"1", b"2"]
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (400, "close")
        assert await client.closed_by_server() == b""


async def test_head_sends_the_head_only() -> None:
    async with running() as (server, app):
        client = await Client.open(server.port)
        await client.send(get("/hello", method="HEAD"))
        reply = await client.reply(head=True)
        assert (reply.status, reply.headers["content-length"]) == (200, "5")
        await client.send(get("/stream?1000000,1000", method="HEAD"))
        reply = await client.reply(head=True)
        assert reply.headers["content-length"] == "1000000"
        assert app.produced == 0 and app.stream.ag_frame is None  # the stream was closed unread
        # Nothing but heads was written: the next answer on the connection is read cleanly.
        await client.send(get("/hello"))
        assert (await client.reply()).body == b"hello"
        client.close()


async def test_http10_keep_alive_and_half_closed_clients_are_answered() -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        await client.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reply = await client.reply()
        assert reply.headers["connection"].lower() == "keep-alive"
        await client.send(get("/hello"))
        assert (await client.reply()).body == b"hello"
        # A client that ends its side once the request is out (`nc`, shell scripts) still reads the answer.
        client.writer.write(get("/echo", "Content-Length: 2", method="POST") + b"hi")
        client.writer.write_eof()
        reply = await client.reply()
        assert (reply.status, reply.body) == (200, b"hi")
        assert await client.closed_by_server() == b""


async def test_an_upgrade_header_is_ignored_and_parsing_goes_on() -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        await client.send(get("/hello", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c") + get("/order?i=7"))
        assert (await client.reply()).body == b"hello"
        assert (await client.reply()).body == b"7"
        client.close()


# -- bodies: Expect, limits --------------------------------------------------------------------------------------


async def test_expect_100_continue_then_the_body_is_read() -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        await client.send(get("/echo", "Content-Length: 10", "Expect: 100-continue", method="POST"))
        interim = await client.reply()
        assert interim.status == 100
        await client.send(b"0123456789")
        reply = await client.reply()
        assert (reply.status, reply.body) == (200, b"0123456789")
        client.close()


@pytest.mark.parametrize("expect", [False, True])
async def test_a_declared_length_over_the_limit_is_413_before_the_body_is_sent(expect: bool) -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        headers = [f"Content-Length: {10 * LIMIT}", *(["Expect: 100-continue"] if expect else [])]
        await client.send(get("/echo", *headers, method="POST"))  # the head only: the client waits
        reply = await client.reply()  # the first thing back (no 100 Continue)
        assert reply.status == 413
        assert reply.headers["connection"] == "close"
        assert str(LIMIT) in reply.body.decode()
        assert await client.closed_by_server() == b""
        assert (await hello(server.port)).status == 200


async def test_a_chunked_body_passing_the_limit_is_413() -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        await client.send(get("/echo", "Transfer-Encoding: chunked", method="POST"))
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"y" * 64 * 1024)
        reply_task = asyncio.create_task(client.reply())
        sent = 0
        with anyio.fail_after(10):
            while not reply_task.done() and sent < 64 * LIMIT:
                try:
                    await client.send(chunk)
                except ConnectionError:
                    break
                sent += 64 * 1024
                await asyncio.sleep(0)
        reply = await reply_task
        assert reply.status == 413
        assert sent > LIMIT


def test_a_client_sending_its_whole_oversized_body_before_reading_still_gets_the_413() -> None:
    """http.client sends the whole body, then reads: the server discards what follows its 413 rather than reset the
    connection under it (which would lose the answer)."""

    async def main() -> None:
        async with running() as (server, _):

            def post() -> int:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                conn.request("POST", "/echo", body=b"z" * (3 * LIMIT))
                status = conn.getresponse().status
                conn.close()
                return status

            assert await anyio.to_thread.run_sync(post) == 413

    asyncio.run(main())


# -- timeouts ----------------------------------------------------------------------------------------------------


async def test_a_head_trickled_in_byte_by_byte_times_out_at_header_timeout() -> None:
    async with running(header_timeout=1.0) as (server, _):
        client = await Client.open(server.port)
        begin = time.monotonic()
        reply_task = asyncio.create_task(client.reply(timeout=10))
        trickle = b"GET /hello HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 200
        for byte in trickle:  # a byte every 50 ms: each byte would reset a naive timer
            if reply_task.done():
                break
            try:
                await client.send(bytes([byte]))
            except ConnectionError:
                break
            await asyncio.sleep(0.05)
        reply = await reply_task
        took = time.monotonic() - begin
        assert reply.status == 408
        assert "header_timeout" in reply.body.decode()
        assert 0.8 < took < 4.0
        assert await client.closed_by_server() == b""


async def test_a_stalled_body_times_out_at_read_timeout() -> None:
    async with running(read_timeout=1.0) as (server, app):
        client = await Client.open(server.port)
        await client.send(get("/echo", "Content-Length: 100", method="POST") + b"only ten b")
        begin = time.monotonic()
        reply = await client.reply()
        assert reply.status == 408
        assert 0.8 < time.monotonic() - begin < 4.0
        assert "read_timeout" in app.incomplete[0]
        assert await client.closed_by_server() == b""


async def test_idle_connections_close_after_their_timeouts() -> None:
    async with running(keepalive_timeout=0.5, header_timeout=0.5) as (server, _):
        silent = await Client.open(server.port)  # never sends a byte: closed without an answer
        client = await Client.open(server.port)
        await client.send(get("/hello"))
        assert (await client.reply()).status == 200
        begin = time.monotonic()
        assert await client.closed_by_server(timeout=5) == b""
        assert 0.3 < time.monotonic() - begin < 4.0
        assert await silent.closed_by_server(timeout=5) == b""


# -- malformed requests --------------------------------------------------------------------------------------------

MALFORMED = {
    "not HTTP": b"GARBAGE\r\n\r\n",
    "unknown version": b"GET / HTTP/9.9\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\nHost test\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : test\r\n\r\n",
    "bad header name": b"GET / HTTP/1.1\r\nX(y): z\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    "bare LF folding": b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
    "letters in Content-Length": b"POST /echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    "negative Content-Length": b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    "superscript Content-Length": "POST /echo HTTP/1.1\r\nContent-Length: ²\r\n\r\n".encode("latin-1"),
    "huge Content-Length": b"POST /echo HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "two Content-Lengths": b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "Content-Length and chunked": b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "bad chunk size": b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk longer than its size": b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n",
    "unknown transfer coding": b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "target not a path": b"GET noslash HTTP/1.1\r\n\r\n",
    "CONNECT": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    "Upgrade with a body": b"POST /echo HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nab",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_a_malformed_request_gets_400_and_the_server_serves_on(raw: bytes) -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        await client.send(raw)
        reply = await client.reply()
        assert reply.status == 400, reply
        assert reply.headers["connection"] == "close"
        assert await client.closed_by_server() == b""
        assert (await hello(server.port)).status == 200


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (get("/" + "a" * (MAX_URL + 1)), 414),
        (get("/hello", *[f"X-H{i}: {'v' * 1000}" for i in range(70)]), 431),
        (get("/hello", *[f"X-H{i}: v" for i in range(MAX_HEADERS + 1)]), 431),
        # One header that never ends: the parser would hold it all; the server stops at the head limit.
        (b"GET /hello HTTP/1.1\r\nX-Endless: " + b"a" * (400 * 1024), 431),
    ],
    ids=["long target", "large headers", "many headers", "endless header"],
)
async def test_an_oversized_head_is_refused(raw: bytes, status: int) -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        writing = asyncio.create_task(client.send(raw))
        reply = await client.reply()
        assert reply.status == status
        assert await client.closed_by_server() == b""
        writing.cancel()
        assert (await hello(server.port)).status == 200


def _bodies() -> st.SearchStrategy[bytes]:
    valid = [
        get("/hello"),
        get("/echo", "Content-Length: 5", method="POST") + b"hello",
        get("/echo", "Transfer-Encoding: chunked", method="POST") + b"5\r\nhello\r\n0\r\n\r\n",
    ]
    starts = [b"GET /hello HTTP/1.1\r\n", b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET /"]

    def mutate(request: bytes, at: int, value: int) -> bytes:
        return request[: at % len(request)] + bytes([value]) + request[at % len(request) + 1 :]

    return st.one_of(
        st.binary(max_size=300),
        st.builds(lambda s, t: s + t, st.sampled_from(starts), st.binary(max_size=200)),
        st.builds(mutate, st.sampled_from(valid), st.integers(0, 200), st.integers(0, 255)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_bodies())
def test_random_input_never_gets_a_5xx_nor_stops_the_server(raw: bytes) -> None:
    async def main() -> None:
        async with running(header_timeout=2.0) as (server, _):
            client = await Client.open(server.port)
            try:
                await client.send(raw)
                client.writer.write_eof()  # whatever was sent is all there is
                with anyio.fail_after(10):
                    received = await client.reader.read()
            except ConnectionResetError:
                received = b""
            client.close()
            statuses = [int(s) for s in re.findall(rb"^HTTP/1\.1 (\d{3}) ", received, re.M)]
            assert all(s < 500 for s in statuses), received[:500]
            assert (await hello(server.port)).status == 200

    asyncio.run(main())


# -- failures of fronts and clients -------------------------------------------------------------------------------


async def test_an_exception_in_a_front_is_a_500_and_the_server_serves_on(caplog: pytest.LogCaptureFixture) -> None:
    async with running() as (server, _):
        client = await Client.open(server.port)
        await client.send(get("/boom"))
        reply = await client.reply()
        assert reply.status == 500
        assert "a bug in a front" not in reply.body.decode()  # details go to the log, not to the client
        assert "a bug in a front" in caplog.text
        await client.send(get("/hello"))  # the same connection goes on
        assert (await client.reply()).status == 200
        client.close()


async def test_a_client_leaving_mid_body_or_mid_response_leaves_the_others_served() -> None:
    async with running() as (server, app):
        other = await Client.open(server.port)
        mid_body = await Client.open(server.port)
        await mid_body.send(get("/echo", "Content-Length: 100000", method="POST") + b"a" * 1000)
        mid_body.close()
        with anyio.fail_after(10):
            await app.body_failed.wait()
        assert "before the body ended" in app.incomplete[0]

        mid_response = await Client.open(server.port, rcvbuf=16 * 1024)
        await mid_response.send(get("/stream?100000000,65536"))
        await mid_response.reader.readexactly(1000)
        mid_response.writer.transport.abort()  # a reset, as a crashed client leaves it
        with anyio.fail_after(10):
            await app.stream_closed.wait()  # the stream was closed, not run to its end
        assert app.produced < 100_000_000

        await other.send(get("/hello"))
        assert (await other.reply()).status == 200
        other.close()
        with anyio.fail_after(10):
            while len(server.connections) > 0:  # noqa: ASYNC110 - the closes reach the server in its own time
                await asyncio.sleep(0.01)


async def test_a_slow_reader_does_not_make_the_server_buffer_a_streamed_body() -> None:
    size, chunk = 32 << 20, 64 * 1024
    async with running() as (server, app):
        client = await Client.open(server.port, rcvbuf=64 * 1024)
        await client.send(get(f"/stream?{size},{chunk}"))
        with anyio.fail_after(10):
            while not server.connections or next(iter(server.connections))._drained.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.005)  # until the transport says it is full: it has no event for a test
        (conn,) = server.connections
        await asyncio.sleep(0.3)  # the client still reads nothing: the stream must not go on meanwhile
        assert app.produced < 8 << 20
        assert conn.transport is not None and conn.transport.get_write_buffer_size() <= 2 * chunk + 64 * 1024
        reply = await client.reply(timeout=30)
        assert len(reply.body) == size and app.produced == size
        client.close()


# -- max_connections and stopping -----------------------------------------------------------------------------------


async def test_connections_over_max_connections_get_503() -> None:
    async with running(max_connections=3) as (server, _):
        clients = [await Client.open(server.port) for _ in range(3)]
        for client in clients:
            await client.send(get("/hello"))
            assert (await client.reply()).status == 200
        extra = await Client.open(server.port)
        await extra.send(get("/hello"))
        reply = await extra.reply()
        assert reply.status == 503 and reply.headers["retry-after"] == "1"
        assert await extra.closed_by_server() == b""
        clients.pop().close()
        with anyio.fail_after(10):
            while len(server.connections) >= 3:  # noqa: ASYNC110 - the close reaches the server in its own time
                await asyncio.sleep(0.01)
        assert (await hello(server.port)).status == 200


async def test_a_stop_waits_for_a_request_in_flight_and_closes_idle_connections() -> None:
    async with running() as (server, app):
        idle = [await Client.open(server.port) for _ in range(2)]
        for client in idle:
            await client.send(get("/hello"))
            await client.reply()
        busy = await Client.open(server.port)
        await busy.send(get("/slow"))
        with anyio.fail_after(10):
            await app.started.wait()
        server.stop()
        for client in idle:
            assert await client.closed_by_server(timeout=5) == b""
        with pytest.raises(OSError):
            await Client.open(server.port)  # no longer listening
        assert not server.done.is_set()
        app.release.set()
        reply = await busy.reply()
        assert (reply.status, reply.body, reply.headers["connection"]) == (200, b"slow done", "close")
        with anyio.fail_after(10):
            await server.done.wait()


# -- eventfn serve ---------------------------------------------------------------------------------------------------


def _status(url: str, path: str) -> int:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.e2e
def test_serve_prints_its_http_url_and_answers_there(serve: Callable[..., Serve]) -> None:
    service = serve()
    match = service.log.wait_for(r"HTTP at (http://127\.0\.0\.1:\d+)", timeout=5)
    assert match.group(1) == service.http_url
    assert _status(service.http_url, "/no-such-path-at-all") == 404


@pytest.mark.e2e
def test_serve_without_http_and_on_a_port_in_use(serve: Callable[..., Serve], tmp_path: Path) -> None:
    service = serve(extra_args=["--no-http"])
    assert not any("HTTP at" in line for line in service.log.lines)
    assert not (tmp_path / "data" / "http.url").exists()
    service.stop()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = serve(wait_ready=False, extra_args=["--http-port", str(port)])
        assert failed.wait(timeout=60) != 0
        failed.log.wait_for("cannot listen", timeout=5)
    text = "\n".join(failed.log.lines)
    assert f"127.0.0.1:{port}" in text and "--http-port" in text
    assert "Traceback" not in text
