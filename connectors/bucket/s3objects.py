"""The S3 API's object operations: GetObject (with Range and conditions), HeadObject, PutObject, CopyObject and
DeleteObject, and what the multipart upload (`s3multipart`) shares with them: staging a body, placing it.

Every write ends in the bucket watcher's `apply`: the staged file is renamed over the key (or the key removed)
with the key taken from the watcher's workers, and its S3 event is stored before the API answers, as the one
event of that change.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote

import anyio
import anyio.to_thread

from eventfn.web import Caller, Request, Response
from eventfn_connectors.bucket.files import Ignore, Stat, key_parts, key_problem
from eventfn_connectors.bucket.multipart import Uploads
from eventfn_connectors.bucket.options import bucket_problem
from eventfn_connectors.bucket.payload import receive
from eventfn_connectors.bucket.s3xml import (
    S3Error,
    http_date,
    invalid_argument,
    no_such_bucket,
    no_such_key,
    ok,
    parse_http_date,
    quote_etag,
    text,
    timestamp,
)
from eventfn_connectors.bucket.store import (
    EtagCache,
    Meta,
    Opened,
    Staged,
    clean_staging,
    commit,
    etag_of,
    is_bucket,
    open_object,
    read_range,
    remove,
    write_problem,
)

#: Headers stored with an object and given back with it (besides `x-amz-meta-*`).
STORED_HEADERS = (
    "content-type",
    "content-encoding",
    "content-disposition",
    "content-language",
    "cache-control",
    "expires",
)
#: S3's content type of an object put without one.
DEFAULT_CONTENT_TYPE = "binary/octet-stream"
#: S3's limit on user metadata (`x-amz-meta-*` names and values).
MAX_METADATA_BYTES = 2048
#: Objects up to this size are read into the response at once; larger ones are streamed.
INLINE_BYTES = 256 * 1024
#: `response-*` parameters of GetObject, and the header each sets.
_OVERRIDES = {f"response-{h}": h for h in STORED_HEADERS}
RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})\Z", re.ASCII)
#: Types a browser runs scripts in, besides any XML (`_confined`).
_SCRIPTED = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml"})
#: Staged bodies older than this are a crash's leftovers.
_STALE_STAGED = 24 * 3600.0


class Watcher(Protocol):
    """What the S3 API needs of the bucket watcher (`BucketConnector`)."""

    root: Path
    ignore: Ignore

    async def apply(self, bucket: str, key: str, change: Callable[[], Stat | None], *, name: str, etag: str) -> None:
        """Make `change` with the key taken from the workers, and announce it before returning."""
        ...

    def known_etag(self, bucket: str, key: str, st: os.stat_result) -> str | None:
        """The ETag the watcher read of this very file, if it did."""
        ...


def allow(caller: Caller | None, action: str, resource: str) -> None:
    """AccessDenied unless `caller` may do `action` on `resource` (`<bucket>` or `<bucket>/<key>`)."""
    if caller is not None and not caller.allows(action, resource):
        raise S3Error(
            403,
            "AccessDenied",
            f"Access Denied: {caller.name} may not {action} on {resource} (a function's role may do what its "
            "[permissions] name)",
        )


def decode(raw: str) -> str:
    """A percent-encoded path segment or header value, as UTF-8."""
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise S3Error(400, "InvalidURI", "Couldn't parse the specified URI: it is not UTF-8 once decoded.") from None


def _precondition_failed(condition: str) -> S3Error:
    return S3Error(
        412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold", Condition=condition
    )


def _etag_matches(header: str, etag: str) -> bool:
    return any(t.strip().removeprefix("W/").strip('"') in (etag, "*") for t in header.split(","))


def _conditions(request: Request, etag: str, mtime: float, prefix: str = "") -> int | None:
    """RFC 7232's conditional request headers (`prefix`: `x-amz-copy-source-` for a copy's source): 412 or 304
    if one fails, None if the request goes on."""
    mtime = float(int(mtime))  # HTTP dates have whole seconds
    if (match := request.header(f"{prefix}if-match")) is not None:
        if not _etag_matches(match, etag):
            return 412
    elif (since := request.header(f"{prefix}if-unmodified-since")) is not None:
        when = parse_http_date(since)
        if when is not None and mtime > when:
            return 412
    if (none_match := request.header(f"{prefix}if-none-match")) is not None:
        if _etag_matches(none_match, etag):
            return 412 if prefix or request.method not in ("GET", "HEAD") else 304
    elif (since := request.header(f"{prefix}if-modified-since")) is not None:
        when = parse_http_date(since)
        if when is not None and mtime <= when:
            return 412 if prefix else 304
    return None


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a `Range` header; None for the whole object (no header, or one S3 ignores)."""
    if header is None:
        return None
    match = RANGE.match(header.strip())
    if match is None or not (match.group(1) or match.group(2)):
        return None  # several ranges, another unit: served whole, as RFC 9110 allows
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            return None
    else:
        start, end = max(0, size - int(last)), size - 1
        if int(last) == 0:
            start = size  # unsatisfiable
    if start >= size:
        error = S3Error(
            416,
            "InvalidRange",
            "The requested range is not satisfiable",
            RangeRequested=header,
            ActualObjectSize=str(size),
        )
        error.headers.append(("Content-Range", f"bytes */{size}"))
        raise error
    return start, min(end, size - 1)


def stored_headers(request: Request) -> tuple[dict[str, str], dict[str, str]]:
    """The headers to keep with an object put by `request`, and its user metadata (`x-amz-meta-*`)."""
    headers: dict[str, str] = {}
    user: dict[str, str] = {}
    for name, value in request.headers:
        if name in STORED_HEADERS:
            if name == "content-encoding":
                value = ",".join(v for v in (p.strip() for p in value.split(",")) if v and v != "aws-chunked")
                if not value:
                    continue
            headers[name] = value
        elif name.startswith("x-amz-meta-"):
            user[name.removeprefix("x-amz-meta-")] = value
    if "AWSAccessKeyId=" in request.query:
        # A Signature Version 2 presigned URL carries the headers it signed in its query (botocore moves them there),
        # and S3 takes them as the request's own.
        for name, value in parse_qsl(request.query, keep_blank_values=True):
            name = name.lower()
            if name == "content-type":
                headers.setdefault(name, value)
            elif name.startswith("x-amz-meta-"):
                user.setdefault(name.removeprefix("x-amz-meta-"), value)
    if sum(len(k) + len(v) for k, v in user.items()) > MAX_METADATA_BYTES:
        raise S3Error(
            400,
            "MetadataTooLarge",
            f"Your metadata headers exceed the maximum allowed metadata size ({MAX_METADATA_BYTES} bytes).",
            MaxSizeAllowed=str(MAX_METADATA_BYTES),
        )
    return headers, user


def _object_headers(meta: Meta | None, etag: str, st: os.stat_result) -> list[tuple[str, str]]:
    stored = meta.headers if meta is not None else {}
    headers = [
        ("Content-Type", stored.get("content-type", DEFAULT_CONTENT_TYPE)),
        ("ETag", quote_etag(etag)),
        ("Last-Modified", http_date(st.st_mtime)),
        ("Accept-Ranges", "bytes"),
    ]
    headers.extend((name.title(), value) for name, value in stored.items() if name != "content-type")
    if meta is not None:
        headers.extend((f"x-amz-meta-{name}", value) for name, value in meta.user.items())
    return headers


def _confined(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What keeps an object from running as a page of this server's origin, which function URLs share (S3 serves
    objects from an origin of their own): no type sniffed, and a document a browser would run scripts in (HTML,
    SVG, XML: whoever could put the object chose its type) sandboxed, without scripts, in an origin of its own."""
    confined = [("X-Content-Type-Options", "nosniff")]
    value = next((v for n, v in headers if n.lower() == "content-type"), "")
    kinds = [part.partition(";")[0].strip().lower() for part in value.split(",")]  # browsers take any of a list
    if any(kind in _SCRIPTED or kind.endswith(("+xml", "/xml")) for kind in kinds):
        confined.append(("Content-Security-Policy", "sandbox"))
    return confined


async def _nothing() -> AsyncIterator[bytes]:
    """The body of a HEAD response: never read (the server writes the head only, with the length given)."""
    return
    yield b""  # an async generator with nothing in it


async def _stream(fd: int, start: int, length: int) -> AsyncIterator[bytes]:
    try:
        chunks = read_range(fd, start, length)
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
    finally:
        os.close(fd)


def _no_check(there: os.stat_result | None) -> None:
    return None


class Objects:
    """The object operations of the S3 API over the watcher's buckets."""

    def __init__(self, watcher: Watcher, *, limit: int) -> None:
        self.watcher = watcher
        self.root = watcher.root
        self.ignore = watcher.ignore
        #: Bytes of one PutObject or UploadPart (`[http] max_object_bytes`).
        self.limit = limit
        self.etags = EtagCache()
        self.uploads = Uploads(self.root)
        self._cleaned = False

    # -- keys -------------------------------------------------------------------------------------------------------

    def readable(self, key: str) -> list[str]:
        parts = key_parts(key)
        if parts is None:
            raise invalid_argument(
                f"key {key!r} has an empty, '.' or '..' part, or a NUL: it cannot name an object inside the bucket"
            )
        return parts

    def writable(self, bucket: str, key: str) -> list[str]:
        """The parts of a key an object may be stored under; S3's errors otherwise."""
        if (problem := write_problem(key, self.ignore)) is not None:
            if key_problem(key) is not None and len(key.encode("utf-8", "surrogatepass")) > 1024:
                raise S3Error(400, "KeyTooLongError", f"Your key is too long: {problem}")
            raise invalid_argument(problem, "key", key[:200])
        if not is_bucket(self.root, bucket):
            raise no_such_bucket(bucket)
        return key.split("/")

    async def _open(self, bucket: str, key: str) -> tuple[Opened, str]:
        """The object open for reading, and its ETag; NoSuchKey / NoSuchBucket."""
        parts = self.readable(key)
        opened = await anyio.to_thread.run_sync(open_object, self.root, bucket, parts, self.ignore)
        if opened is None:
            raise no_such_key(bucket, key)
        try:
            known = self.watcher.known_etag(bucket, key, opened.stat) if opened.meta is None else None
            etag = await anyio.to_thread.run_sync(etag_of, opened, self.etags, known)
        except BaseException:
            os.close(opened.fd)
            raise
        return opened, etag

    async def stage(self, prefix: str = "put") -> Staged:
        if not self._cleaned:
            self._cleaned = True
            await anyio.to_thread.run_sync(clean_staging, self.root, _STALE_STAGED)
        return await anyio.to_thread.run_sync(Staged, self.root, prefix)

    # -- reading ----------------------------------------------------------------------------------------------------

    async def get(
        self, request: Request, caller: Caller | None, bucket: str, key: str, query: dict[str, str]
    ) -> Response:
        """GetObject and HeadObject."""
        allow(caller, "s3:GetObject", f"{bucket}/{key}")
        opened, etag = await self._open(bucket, key)
        fd, st = opened.fd, opened.stat
        try:
            headers = _object_headers(opened.meta, etag, st)
            status = _conditions(request, etag, st.st_mtime)
            if status == 412:
                raise _precondition_failed("If-Match" if request.header("if-match") else "If-Unmodified-Since")
            if status == 304:
                return Response(304, [h for h in headers if h[0] in ("ETag", "Last-Modified")])
            if (number := query.get("partNumber")) is not None:
                if number != "1":
                    raise S3Error(
                        416,
                        "InvalidPartNumber",
                        "The requested partnumber is not satisfiable: objects are served as one part.",
                    )
                # S3 says how many parts there are only when a part is asked for; here part 1 is the whole object,
                # so there is one (a client reading by parts then asks for no part 2, which would be refused).
                headers.append(("x-amz-mp-parts-count", "1"))
            wanted = _byte_range(request.header("range"), st.st_size)
            start, length, status = 0, st.st_size, 200
            if wanted is not None:
                start, length, status = wanted[0], wanted[1] - wanted[0] + 1, 206
                headers.append(("Content-Range", f"bytes {wanted[0]}-{wanted[1]}/{st.st_size}"))
            if request.method == "GET":
                for parameter, header in _OVERRIDES.items():
                    if (value := query.get(parameter)) is not None:
                        headers = [h for h in headers if h[0].lower() != header] + [(header.title(), value)]
            headers += _confined(headers)
            if request.method == "HEAD":
                return Response(status, headers, stream=_nothing(), length=length)
            if length <= INLINE_BYTES:
                body = await anyio.to_thread.run_sync(lambda: b"".join(read_range(fd, start, length)))
                return Response(status, headers, body)
            stream, fd = _stream(fd, start, length), -1  # the stream closes it
            return Response(status, headers, stream=stream, length=length)
        finally:
            if fd >= 0:
                os.close(fd)

    # -- writing ----------------------------------------------------------------------------------------------------

    def write_check(self, request: Request, bucket: str, parts: list[str]) -> Callable[[os.stat_result | None], None]:
        """S3's conditional writes (`If-None-Match: *`, `If-Match: <etag>`), checked against what the key holds at
        the moment of the rename (the key is taken from the watcher's workers then; two API writes of one key in
        the same bucket are serialised by it only where the bucket is watched)."""
        none_match, match = request.header("if-none-match"), request.header("if-match")
        if none_match is None and match is None:
            return _no_check

        def check(there: os.stat_result | None) -> None:
            if none_match is not None and there is not None and none_match.strip() == "*":
                raise _precondition_failed("If-None-Match")
            if match is not None:
                if there is None:
                    raise no_such_key(bucket, "/".join(parts))
                opened = open_object(self.root, bucket, parts, self.ignore)
                if opened is None:
                    raise no_such_key(bucket, "/".join(parts))
                try:
                    etag = etag_of(opened, self.etags)
                finally:
                    os.close(opened.fd)
                if not _etag_matches(match, etag):
                    raise _precondition_failed("If-Match")

        return check

    async def place(
        self, bucket: str, key: str, staged: Staged, meta: Callable[[os.stat_result], Meta], name: str, etag: str,
        check: Callable[[os.stat_result | None], None] = _no_check,
    ) -> Stat:  # fmt: skip
        """Sync the staged file, attach its metadata and rename it over the key, announced as `name`."""
        await anyio.to_thread.run_sync(staged.finish, meta)
        staged.close()
        placed: list[Stat] = []

        def change() -> Stat:
            placed.append(commit(self.root, bucket, key.split("/"), staged.path, check))
            return placed[-1]

        await self.watcher.apply(bucket, key, change, name=name, etag=etag)
        return placed[-1]

    async def put(self, request: Request, caller: Caller | None, bucket: str, key: str) -> Response:
        """PutObject: the body streamed to a staged file, checked, then renamed over the key."""
        allow(caller, "s3:PutObject", f"{bucket}/{key}")
        parts = self.writable(bucket, key)
        headers, user = stored_headers(request)
        check = self.write_check(request, bucket, parts)
        staged = await self.stage()
        try:
            received = await receive(request, staged, self.limit)
            md5 = received.md5

            def meta(st: os.stat_result) -> Meta:
                return Meta(etag=md5, size=st.st_size, mtime_ns=st.st_mtime_ns, headers=headers, user=user)

            await self.place(bucket, key, staged, meta, "ObjectCreated:Put", md5, check)
        finally:
            await anyio.to_thread.run_sync(staged.discard)
        echoed = [(f"x-amz-checksum-{name}", value) for name, value in received.checksums.items()]
        return Response(200, [("ETag", quote_etag(md5)), *echoed])

    def source(self, request: Request, caller: Caller | None) -> tuple[str, str]:
        """The bucket and key of `x-amz-copy-source` (`bucket/key`, URL-encoded, `?versionId=` allowed)."""
        raw = (request.header("x-amz-copy-source") or "").strip()
        raw, _, version = raw.partition("?versionId=")
        if version not in ("", "null"):
            raise invalid_argument("buckets here are not versioned: the only versionId is 'null'", "versionId", version)
        bucket, _, key = decode(raw).lstrip("/").partition("/")
        if not bucket or not key:
            raise invalid_argument(
                "Copy Source must mention the source bucket and key: sourcebucket/sourcekey", "x-amz-copy-source", raw
            )
        if (problem := bucket_problem(bucket)) is not None:  # `..` would be the folder above the buckets root
            raise invalid_argument(
                f"Copy Source bucket {bucket[:64]!r} is not valid: {problem}", "x-amz-copy-source", raw
            )
        allow(caller, "s3:GetObject", f"{bucket}/{key}")
        return bucket, key

    async def open_source(self, request: Request, bucket: str, key: str) -> tuple[Opened, str]:
        opened, etag = await self._open(bucket, key)
        if _conditions(request, etag, opened.stat.st_mtime, "x-amz-copy-source-") is not None:
            os.close(opened.fd)
            raise _precondition_failed("x-amz-copy-source-If-*")
        return opened, etag

    async def copy(self, request: Request, caller: Caller | None, bucket: str, key: str) -> Response:
        """CopyObject: the source's bytes (and its metadata, or the request's with `REPLACE`) to a new object."""
        allow(caller, "s3:PutObject", f"{bucket}/{key}")
        source_bucket, source_key = self.source(request, caller)
        self.writable(bucket, key)
        directive = (request.header("x-amz-metadata-directive") or "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise invalid_argument("Unknown metadata directive.", "x-amz-metadata-directive", directive)
        if (source_bucket, source_key) == (bucket, key) and directive == "COPY":
            raise S3Error(
                400,
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to itself without changing the "
                "object's metadata, storage class, website redirect location or encryption attributes.",
            )
        opened, _ = await self.open_source(request, source_bucket, source_key)
        if directive == "REPLACE":
            headers, user = stored_headers(request)
        else:
            headers = dict(opened.meta.headers) if opened.meta is not None else {}
            user = dict(opened.meta.user) if opened.meta is not None else {}
        staged: Staged | None = None
        try:
            if opened.stat.st_size > self.limit:
                raise S3Error(
                    400,
                    "InvalidRequest",
                    f"The specified copy source is larger than the maximum allowable size for a copy source: "
                    f"{self.limit} ([http] max_object_bytes)",
                )
            staged = await self.stage("copy")
            md5 = await anyio.to_thread.run_sync(copy_into, opened.fd, 0, opened.stat.st_size, staged)

            def meta(st: os.stat_result) -> Meta:
                return Meta(etag=md5, size=st.st_size, mtime_ns=st.st_mtime_ns, headers=headers, user=user)

            placed = await self.place(
                bucket, key, staged, meta, "ObjectCreated:Copy", md5, self.write_check(request, bucket, key.split("/"))
            )
        finally:
            os.close(opened.fd)
            if staged is not None:
                await anyio.to_thread.run_sync(staged.discard)
        return ok(
            "CopyObjectResult",
            f"<LastModified>{timestamp(placed.mtime_ns / 1e9)}</LastModified><ETag>{text(quote_etag(md5))}</ETag>",
        )

    async def delete(self, caller: Caller | None, bucket: str, key: str, request: Request | None = None) -> None:
        """DeleteObject (and each key of DeleteObjects): gone, announced, or nothing was there (not an error)."""
        allow(caller, "s3:DeleteObject", f"{bucket}/{key}")
        parts = self.readable(key)
        if self.ignore.key(key) or key_problem(key) is not None:
            if not is_bucket(self.root, bucket):
                raise no_such_bucket(bucket)
            return  # never an object
        check = _no_check if request is None else self.write_check(request, bucket, parts)

        def change() -> None:
            remove(self.root, bucket, parts, check)

        await self.watcher.apply(bucket, key, change, name="ObjectRemoved:Delete", etag="")


def copy_into(fd: int, start: int, length: int, staged: Staged) -> str:
    """Copy `length` bytes of `fd` from `start` into `staged`; returns their MD5 (hex)."""
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in read_range(fd, start, length):
        digest.update(chunk)
        staged.write(chunk)
    if staged.size != length:
        raise S3Error(409, "OperationAborted", "The copy source changed while it was being copied; try the copy again.")
    return digest.hexdigest()
