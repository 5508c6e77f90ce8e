"""Request bodies of the S3 API (PutObject, UploadPart): streamed to a staged file with their MD5 (the ETag) taken
on the way, checked against what the client says they are, with the aws-chunked framing decoded where a client
uses it.

What is checked: `Content-MD5`; `x-amz-content-sha256` when it is a hex digest (SigV4 signs that header, not the
body, so only this check ties the body to the signature); `x-amz-checksum-crc32`, `-sha1` and `-sha256`, as
headers or as aws-chunked trailers; `x-amz-decoded-content-length`. `x-amz-checksum-crc32c` and
`-crc64nvme` are accepted unverified (the standard library computes neither), as are the per-chunk signatures of
`STREAMING-AWS4-HMAC-SHA256-PAYLOAD` (the request's own signature is verified; chunks are tied to it only by their
framing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

from eventfn.web import BodyTooLarge, Request
from eventfn_connectors.bucket.s3xml import S3Error, whole
from eventfn_connectors.bucket.store import Staged

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
#: Longest line of the aws-chunked framing (a chunk's size and signature, a trailer).
_MAX_LINE = 4096
#: Checksums verified, by the name in `x-amz-checksum-<name>`.
_VERIFIED = ("crc32", "sha1", "sha256")


def entity_too_large(limit: int) -> S3Error:
    return S3Error(
        400,
        "EntityTooLarge",
        f"Your proposed upload exceeds the maximum allowed size: {limit} bytes ([http] max_object_bytes); "
        "upload larger objects in parts (multipart upload: `aws s3 cp` does it by itself above 8 MB)",
        MaxSizeAllowed=str(limit),
    )


def _incomplete(why: str) -> S3Error:
    return S3Error(400, "IncompleteBody", f"You did not provide the number of bytes specified: {why}")


class _Crc32:
    """zlib's CRC32 with hashlib's interface: its digest is 4 bytes, big-endian, as S3's checksum."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _new_checksum(name: str) -> Any:
    return _Crc32() if name == "crc32" else hashlib.new(name)


class AwsChunked:
    """The aws-chunked framing, decoded as it arrives: `<hex size>[;chunk-signature=...]\\r\\n<data>\\r\\n`, ...,
    a `0` chunk, then trailers (`name:value` lines) and an empty line."""

    def __init__(self) -> None:
        self._state = "size"
        self._remaining = 0
        self._line = bytearray()
        self.trailers: dict[str, str] = {}

    @property
    def complete(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> Iterator[memoryview]:
        """The payload bytes in `data`; S3Error for framing that is not aws-chunked."""
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._state == "data":
                take = min(self._remaining, end - pos)
                yield view[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = "data-end"
                continue
            if self._state == "done":
                if data[pos:].strip():
                    raise _malformed("bytes after the last chunk's trailers")
                return
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                if len(self._line) > _MAX_LINE:
                    raise _malformed(f"a line of the chunk framing is over {_MAX_LINE} bytes")
                return
            line = bytes(self._line + data[pos:newline]).rstrip(b"\r")
            self._line.clear()
            pos = newline + 1
            self._line_done(line)

    def _line_done(self, line: bytes) -> None:
        if self._state == "size":
            size = line.split(b";", 1)[0].strip()
            if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
                raise _malformed(f"{line[:40]!r} is not a chunk's size")
            self._remaining = int(size, 16)
            self._state = "data" if self._remaining else "trailer"
        elif self._state == "data-end":
            if line:
                raise _malformed("a chunk is longer than its size says")
            self._state = "size"
        elif self._state == "trailer":
            if not line:
                self._state = "done"
                return
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _malformed(f"trailer {line[:40]!r} is not `name:value`")
            self.trailers[name.strip().lower()] = value.strip()


def _malformed(why: str) -> S3Error:
    return S3Error(400, "InvalidRequest", f"The request body is not valid aws-chunked encoding: {why}")


class Received(NamedTuple):
    """A body received whole: its size and MD5 (hex), and the checksums verified (`crc32` -> base64)."""

    size: int
    md5: str
    checksums: dict[str, str]


async def receive(request: Request, staged: Staged, limit: int) -> Received:
    """Stream `request`'s body into `staged`, checking it; at most `limit` bytes of payload (EntityTooLarge)."""
    content_sha256 = request.header("x-amz-content-sha256", "") or ""
    encoding = request.header("content-encoding", "") or ""
    chunked = "aws-chunked" in encoding.lower() or content_sha256.startswith("STREAMING-")
    decoded = request.header("x-amz-decoded-content-length")
    expected_size: int | None = None
    if decoded is not None:
        expected_size = whole(decoded, "x-amz-decoded-content-length")
    elif not chunked:
        expected_size = request.content_length
    if expected_size is not None and expected_size > limit:
        raise entity_too_large(limit)
    md5 = hashlib.md5(usedforsecurity=False)
    hashers = [md5]
    body_sha256 = None
    if _HEX_SHA256.match(content_sha256):
        body_sha256 = hashlib.sha256()
        hashers.append(body_sha256)
    trailer_names = {
        n.strip().lower().removeprefix("x-amz-checksum-")
        for n in (request.header("x-amz-trailer") or "").split(",")
        if n.strip()
    }
    wanted = {n for n in _VERIFIED if request.header(f"x-amz-checksum-{n}") is not None or n in trailer_names}
    checksums = {name: _new_checksum(name) for name in wanted}
    hashers.extend(checksums.values())
    decoder = AwsChunked() if chunked else None
    # aws-chunked framing adds a line per chunk (chunks are 8 KB at the least): the raw body may pass the limit.
    raw_limit = limit if decoder is None else limit + limit // 64 + (1 << 20)
    try:
        async for chunk in request.chunks(raw_limit):
            pieces: Iterator[memoryview | bytes] = decoder.feed(chunk) if decoder is not None else iter((chunk,))
            for piece in pieces:
                if staged.size + len(piece) > limit:
                    raise entity_too_large(limit)
                for hasher in hashers:
                    hasher.update(piece)
                staged.write(piece)
    except BodyTooLarge:
        raise entity_too_large(limit) from None
    if decoder is not None and not decoder.complete:
        raise _incomplete("the aws-chunked body ended before its last chunk")
    if expected_size is not None and staged.size != expected_size:
        raise _incomplete(f"{staged.size} bytes received, {expected_size} declared")
    _check_md5(request.header("content-md5"), md5.digest())
    if body_sha256 is not None and body_sha256.hexdigest() != content_sha256:
        raise S3Error(
            400,
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
            ClientComputedContentSHA256=content_sha256,
            S3ComputedContentSHA256=body_sha256.hexdigest(),
        )
    trailers = decoder.trailers if decoder is not None else {}
    verified = {}
    for name, hasher in checksums.items():
        sent = request.header(f"x-amz-checksum-{name}") or trailers.get(f"x-amz-checksum-{name}")
        computed = base64.b64encode(hasher.digest()).decode()
        if sent is None:
            raise _incomplete(f"the trailer x-amz-checksum-{name} announced in x-amz-trailer never came")
        if sent != computed:
            raise S3Error(400, "BadDigest", f"The {name.upper()} you specified did not match the calculated checksum.")
        verified[name] = computed
    return Received(staged.size, md5.hexdigest(), verified)


def check_body(request: Request, body: bytes) -> None:
    """Check a body read whole (an XML request) against its `Content-MD5`, `x-amz-content-sha256` and
    `x-amz-checksum-*` headers, as `receive` checks a streamed one."""
    _check_md5(request.header("content-md5"), hashlib.md5(body, usedforsecurity=False).digest())
    content_sha256 = request.header("x-amz-content-sha256", "") or ""
    if _HEX_SHA256.match(content_sha256) and hashlib.sha256(body).hexdigest() != content_sha256:
        raise S3Error(
            400,
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )
    for name in _VERIFIED:
        if (sent := request.header(f"x-amz-checksum-{name}")) is not None:
            hasher = _new_checksum(name)
            hasher.update(body)
            if base64.b64encode(hasher.digest()).decode() != sent:
                raise S3Error(
                    400, "BadDigest", f"The {name.upper()} you specified did not match the calculated checksum."
                )


def _check_md5(header: str | None, digest: bytes) -> None:
    if header is None:
        return
    try:
        sent = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        sent = b""
    if len(sent) != 16:
        raise S3Error(400, "InvalidDigest", "The Content-MD5 you specified is not valid (base64 of 16 bytes).")
    if sent != digest:
        raise S3Error(400, "BadDigest", "The Content-MD5 you specified did not match what was received.")
