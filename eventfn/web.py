"""The HTTP front's wire types: a request as the server parsed it, a response to write, the caller it
authenticated, and the protocol an HTTP front implements (the Lambda API, function URLs, a connector's S3 API).

The server (`eventfn.fronts.http.server`) owns sockets, parsing, limits and timeouts; a front sees a `Request`
whose head is complete and whose body it reads (`read()` for the whole, up to its limit, or `chunks()` to stream
it), and returns a `Response`. Standard library and msgspec only: connectors import this.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol
from urllib.parse import unquote

#: Lambda's limit on a sync request: the default body limit of a front that buffers the body.
DEFAULT_BODY_LIMIT = 6 * 1024 * 1024


class BodyTooLarge(Exception):
    """The request's body is over the limit its front set; the server answers 413 and closes the connection."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


class ServerBusy(Exception):
    """The server holds as many request bodies in memory as it may (`BodyBudget`): this one is not read. The front
    answers it in its own format (`Front.busy`), a status that clients retry (429 or 503)."""

    def __init__(self, budget: int) -> None:
        super().__init__(f"the server holds {budget} bytes of request bodies in memory already")
        self.budget = budget


class BodyBudget:
    """Bytes of request bodies read into memory (`Request.read`) that the server holds at once, across connections:
    a flood of large bodies is refused rather than buffered without bound. A body is counted at its declared length
    (a chunked one at its front's limit) from its read until its answer is written; streamed bodies
    (`Request.chunks`) are not counted."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.total and self.used:  # one body alone may take it whole
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class BodyIncomplete(Exception):
    """The client stopped sending the body (closed, or sent nothing for the read timeout)."""


class BodyMismatch(BodyIncomplete):
    """The body is not the one its sender signed: its SHA-256 differs from the declared one (SigV4's
    `x-amz-content-sha256`). Raised where the body ends, so that no front takes it as complete."""

    #: S3's error code for it.
    code = "XAmzContentSHA256Mismatch"


class Request:
    """One HTTP request: its head, parsed, and its body, read on demand.

    `path` is the raw (percent-encoded) path, `query` the raw query string without `?`; header names are
    lower-cased, in the order sent, repeats kept.
    """

    __slots__ = (
        "_body",
        "_peer_uid",
        "_request_id",
        "client",
        "headers",
        "http_version",
        "method",
        "path",
        "query",
        "received",
    )

    def __init__(
        self,
        *,
        method: str,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        client: str,
        http_version: str = "1.1",
        body: Body | None = None,
        request_id: str = "",
        received: float = 0.0,
        peer_uid: Callable[[], int | None] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.client = client
        self.http_version = http_version
        self._body = body if body is not None else Body.of(b"")
        self._request_id = request_id
        #: time.time() when the head was complete.
        self.received = received
        self._peer_uid = peer_uid

    @property
    def request_id(self) -> str:
        """A UUID for the request (Lambda's `requestId`), made when first asked for: most requests never are."""
        if not self._request_id:
            self._request_id = str(uuid.uuid4())
        return self._request_id

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._request_id = value

    def peer_uid(self) -> int | None:
        """The user owning the connection's other end, where the server can tell (a client on this machine, on
        Linux); None where it cannot. A request made in this process (no connection) is this process's user's."""
        if self._peer_uid is None:
            return os.geteuid() if hasattr(os, "geteuid") else None
        return self._peer_uid()

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header `name` (lower-case), or `default`."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def decoded_path(self) -> str:
        return unquote(self.path)

    @property
    def content_length(self) -> int | None:
        raw = self.header("content-length")
        return int(raw) if raw is not None and raw.isascii() and raw.isdigit() else None

    async def read(self, limit: int = DEFAULT_BODY_LIMIT) -> bytes:
        """The whole body; `BodyTooLarge` past `limit` bytes (a declared length over it is refused unread)."""
        return await self._body.read(limit)

    def chunks(self, limit: int) -> AsyncIterator[bytes]:
        """The body as it arrives, with the server's flow control; `BodyTooLarge` past `limit` bytes."""
        return self._body.chunks(limit)

    def expect_sha256(self, hexdigest: str) -> None:
        """Make reading the body check it against `hexdigest` (see `Body.expect_sha256`)."""
        self._body.expect_sha256(hexdigest)

    def release(self) -> None:
        """Give back what reading the body took of the server's budget (the server calls it once answered)."""
        self._body.release()


class Body:
    """A request body as a front reads it; the server gives one that reads from the connection."""

    def __init__(
        self,
        declared: int | None,
        next_chunk: Callable[[], Awaitable[bytes | None]],
        budget: BodyBudget | None = None,
    ) -> None:
        #: Content-Length, or None for a chunked body.
        self.declared = declared
        self._next = next_chunk
        self._budget = budget
        #: What `read` took of the budget.
        self._held = 0
        self._consumed = False
        #: The whole body, once `read` has read it (SigV4 hashes it, then the front reads it again).
        self._cache: bytes | None = None
        #: The SHA-256 (hex) the sender declared for the body, checked where it ends (`expect_sha256`).
        self._expected: str | None = None

    @classmethod
    def of(cls, data: bytes) -> Body:
        """A body already in memory (tests, fronts that call other fronts)."""
        sent = False

        async def next_chunk() -> bytes | None:
            nonlocal sent
            if sent:
                return None
            sent = True
            return data

        return cls(len(data), next_chunk)

    def expect_sha256(self, hexdigest: str) -> None:
        """Check the body against the SHA-256 its sender declared and signed, as it is read: where it ends, a
        mismatch raises `BodyMismatch` instead (call it before the body is read)."""
        self._expected = hexdigest.lower()
        if self._cache is not None and hashlib.sha256(self._cache).hexdigest() != self._expected:
            raise BodyMismatch(_MISMATCH)

    async def read(self, limit: int) -> bytes:
        if self._cache is not None:
            if len(self._cache) > limit:
                raise BodyTooLarge(limit)
            return self._cache
        if self.declared is not None and self.declared > limit:
            raise BodyTooLarge(limit)
        if self._budget is not None and not self._consumed:
            need = self.declared if self.declared is not None else limit
            if need and not self._budget.take(need):
                raise ServerBusy(self._budget.total)
            self._held = need
        parts = [chunk async for chunk in self.chunks(limit)]
        self._cache = b"".join(parts)
        return self._cache

    async def chunks(self, limit: int) -> AsyncIterator[bytes]:
        if self.declared is not None and self.declared > limit:
            raise BodyTooLarge(limit)
        if self._cache is not None:
            if len(self._cache) > limit:
                raise BodyTooLarge(limit)
            if self._cache:
                yield self._cache
            return
        if self._consumed:
            return
        self._consumed = True
        total = 0
        digest = hashlib.sha256() if self._expected is not None else None
        while (chunk := await self._next()) is not None:
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(limit)
            if chunk:
                if digest is not None:
                    digest.update(chunk)
                yield chunk
        if digest is not None and digest.hexdigest() != self._expected:
            raise BodyMismatch(_MISMATCH)

    @property
    def consumed(self) -> bool:
        return self._consumed

    def release(self) -> None:
        if self._budget is not None and self._held:
            self._budget.give(self._held)
            self._held = 0


_MISMATCH = "the body's SHA-256 is not the x-amz-content-sha256 it was signed with (changed on the way?)"


class Response:
    """What a front answers: a status, headers (names as written), and a body in memory or streamed.

    A streamed body (`stream`) needs `length`: the server writes Content-Length, never chunked encoding, so that
    a client that stops reading stops the stream.
    """

    __slots__ = ("body", "headers", "length", "status", "stream")

    def __init__(
        self,
        status: int = 200,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        stream: AsyncIterator[bytes] | None = None,
        length: int | None = None,
    ) -> None:
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.stream = stream
        self.length = length if stream is not None else len(body)


class Caller(Protocol):
    """Who sent a request, as its credentials showed: an access key of `[http] access_keys`, a function's
    execution role, anyone (no credentials, where none are required), or nobody (`problem` says why: no
    credentials where they are required, an unknown key, a bad signature)."""

    #: The access key id, `role/<function>` for a function's execution role, or "anonymous".
    @property
    def name(self) -> str: ...

    #: None if the request is authenticated (or needs no credentials); else AWS's error code and message
    #: (`MissingAuthenticationToken`, `InvalidAccessKeyId`, `SignatureDoesNotMatch`, ...), which the front
    #: answers in its own format with 403.
    @property
    def problem(self) -> tuple[str, str] | None: ...

    def allows(self, action: str, resource: str) -> bool:
        """Whether the caller may do `action` (`s3:GetObject`, `s3:PutObject`, `lambda:InvokeFunction`, ...) on
        `resource` (`<bucket>/<key>`, `<bucket>`, a function name)."""
        ...


class Front(Protocol):
    """One HTTP API the server routes to."""

    #: The SigV4 service name of requests it serves (`lambda`, `s3`), or "" for none (function URLs).
    @property
    def service(self) -> str: ...

    def claims(self, request: Request) -> bool:
        """Whether an unsigned request is this front's (by its path)."""
        ...

    async def handle(self, request: Request, caller: Caller | None) -> Response:
        """Answer `request`; `caller` is None where the request carried no credentials."""
        ...

    def too_large(self, request: Request, limit: int) -> Response:
        """The 413 for a body over `limit` bytes, in this front's format (said before the front ran, where a
        signature check had to read the body)."""
        ...

    def busy(self, request: Request) -> Response:
        """The answer, in this front's format, to a request whose body the server would not read (`ServerBusy`):
        a status its clients retry."""
        ...
