"""S3's wire format for the S3 API: its XML responses, its XML errors (`S3Error`), and the few XML request bodies
it reads (DeleteObjects, CompleteMultipartUpload).

Responses are built as text with every value escaped: the shapes are small and fixed, and botocore reads them
by element name. Request bodies are parsed with the standard library's expat, after refusing any DOCTYPE (no
entity can be declared, so none can expand or reach a file).
"""

from __future__ import annotations

import email.utils
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import quote
from xml.sax.saxutils import escape

from eventfn.web import Response

NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'
XML = ("Content-Type", "application/xml")
#: What S3 allows in a DeleteObjects request.
MAX_DELETE_KEYS = 1000
#: Characters XML 1.0 cannot carry: a key holding one is listed only with `encoding-type=url`.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class S3Error(Exception):
    """An S3 error response: its HTTP status, S3's code (`NoSuchKey`, `InvalidRange`, ...), a message that says
    what went wrong and what to do, and the elements S3 adds (`Key`, `BucketName`, `UploadId`, ...)."""

    def __init__(self, status: int, code: str, message: str, **fields: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        #: Headers the error response carries (`Content-Range` of a 416).
        self.headers: list[tuple[str, str]] = []

    def response(self, request_id: str, resource: str) -> Response:
        fields = "".join(f"<{name}>{text(value)}</{name}>" for name, value in self.fields.items())
        body = (
            f"{_DECLARATION}<Error><Code>{self.code}</Code><Message>{text(self.message)}</Message>{fields}"
            f"<Resource>{text(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
        )
        return Response(self.status, [XML, *self.headers], body.encode("utf-8"))


def no_such_bucket(bucket: str) -> S3Error:
    return S3Error(
        404,
        "NoSuchBucket",
        f"The specified bucket does not exist: there is no folder {bucket!r} under the buckets root "
        "(create it with CreateBucket, `aws s3 mb`, or mkdir)",
        BucketName=bucket,
    )


def no_such_key(bucket: str, key: str) -> S3Error:
    return S3Error(404, "NoSuchKey", "The specified key does not exist.", Key=key, BucketName=bucket)


def no_such_upload(upload_id: str) -> S3Error:
    return S3Error(
        404,
        "NoSuchUpload",
        "The specified multipart upload does not exist: it was completed or aborted, or never created.",
        UploadId=upload_id,
    )


def invalid_argument(message: str, name: str = "", value: str = "") -> S3Error:
    fields = {"ArgumentName": name, "ArgumentValue": value} if name else {}
    return S3Error(400, "InvalidArgument", message, **fields)


def malformed_xml(why: str) -> S3Error:
    return S3Error(
        400,
        "MalformedXML",
        f"The XML you provided was not well-formed or did not validate against our published schema: {why}",
    )


def whole(value: str | None, name: str, default: int | None = None) -> int:
    """A whole number parameter (ASCII digits, 18 at most), or `default` if absent; InvalidArgument otherwise."""
    if value is None and default is not None:
        return default
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise invalid_argument(f"{name} must be a whole number", name, (value or "")[:40])
    return int(value)


def text(value: str) -> str:
    """`value` as XML character data (a character XML 1.0 cannot carry, a NUL say, written as `\\xNN`)."""
    if _NOT_XML.search(value):
        value = _NOT_XML.sub(lambda found: f"\\x{ord(found.group()):02x}", value)
    return escape(value)


def timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds, as S3 lists times."""
    when = datetime.fromtimestamp(seconds, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def http_date(seconds: float) -> str:
    """An HTTP date (`Last-Modified`)."""
    return email.utils.formatdate(seconds, usegmt=True)


def parse_http_date(value: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _document(root: str, inner: str) -> bytes:
    return f'{_DECLARATION}<{root} xmlns="{NAMESPACE}">{inner}</{root}>'.encode()


def ok(root: str, inner: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """A 200 with the XML document `<root>inner</root>`."""
    return Response(200, [XML, *headers], _document(root, inner))


def element(name: str, value: str | int | None) -> str:
    return "" if value is None else f"<{name}>{text(str(value))}</{name}>"


# -- listings ----------------------------------------------------------------------------------------------------


class Listed(NamedTuple):
    """One object of a listing."""

    key: str
    size: int
    mtime: float
    etag: str | None


def list_buckets(buckets: Sequence[tuple[str, float]], owner: str) -> Response:
    items = "".join(
        f"<Bucket><Name>{text(name)}</Name><CreationDate>{timestamp(made)}</CreationDate></Bucket>"
        for name, made in buckets
    )
    return ok(
        "ListAllMyBucketsResult",
        f"<Owner><ID>{text(owner)}</ID><DisplayName>{text(owner)}</DisplayName></Owner><Buckets>{items}</Buckets>",
    )


def listed_key(key: str, url: bool) -> str:
    """A key as a listing carries it: URL-encoded with `encoding-type=url` (botocore decodes it), else as it is
    (a key with a character XML cannot carry is encoded even so, rather than breaking the document)."""
    if url or _NOT_XML.search(key):
        return quote(key, safe="/")
    return key


def contents(objects: Sequence[Listed], url: bool) -> str:
    parts = []
    for found in objects:
        etag = f"<ETag>{text(quote_etag(found.etag))}</ETag>" if found.etag else ""
        parts.append(
            f"<Contents><Key>{text(listed_key(found.key, url))}</Key>"
            f"<LastModified>{timestamp(found.mtime)}</LastModified>{etag}"
            f"<Size>{found.size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
        )
    return "".join(parts)


def common_prefixes(prefixes: Sequence[str], url: bool) -> str:
    return "".join(f"<CommonPrefixes><Prefix>{text(listed_key(p, url))}</Prefix></CommonPrefixes>" for p in prefixes)


def quote_etag(etag: str) -> str:
    return f'"{etag}"'


# -- request bodies ---------------------------------------------------------------------------------------------


def _parse(body: bytes) -> ElementTree.Element:
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise malformed_xml("a DOCTYPE or an entity declaration is not allowed")
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise malformed_xml(str(exc)) from None
    return root


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(parent: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in parent if _local(child.tag) == name]


def _child_text(parent: ElementTree.Element, name: str) -> str | None:
    found = _children(parent, name)
    return (found[0].text or "") if found else None


def delete_request(body: bytes) -> tuple[list[str], bool]:
    """The keys of a DeleteObjects request, and whether it is quiet (only errors reported)."""
    root = _parse(body)
    if _local(root.tag) != "Delete":
        raise malformed_xml(f"the root element is <{_local(root.tag)}>, not <Delete>")
    keys = []
    for item in _children(root, "Object"):
        key = _child_text(item, "Key")
        if key is None:
            raise malformed_xml("an <Object> has no <Key>")
        keys.append(key)
    if not keys:
        raise malformed_xml("no <Object> to delete")
    if len(keys) > MAX_DELETE_KEYS:
        raise malformed_xml(f"{len(keys)} objects; a DeleteObjects request deletes at most {MAX_DELETE_KEYS}")
    quiet = (_child_text(root, "Quiet") or "").strip().lower() == "true"
    return keys, quiet


def delete_result(deleted: Sequence[str], errors: Sequence[tuple[str, str, str]], quiet: bool) -> Response:
    done = "" if quiet else "".join(f"<Deleted><Key>{text(key)}</Key></Deleted>" for key in deleted)
    failed = "".join(
        f"<Error><Key>{text(key)}</Key><Code>{code}</Code><Message>{text(message)}</Message></Error>"
        for key, code, message in errors
    )
    return ok("DeleteResult", done + failed)


def complete_request(body: bytes) -> list[tuple[int, str]]:
    """The parts of a CompleteMultipartUpload request: (part number, ETag without quotes), as sent."""
    root = _parse(body)
    if _local(root.tag) != "CompleteMultipartUpload":
        raise malformed_xml(f"the root element is <{_local(root.tag)}>, not <CompleteMultipartUpload>")
    parts = []
    for part in _children(root, "Part"):
        number, etag = _child_text(part, "PartNumber"), _child_text(part, "ETag")
        number = (number or "").strip()
        if etag is None or not (number.isascii() and number.isdigit()) or len(number) > 5:
            raise malformed_xml("each <Part> needs a <PartNumber> (1 to 10000) and an <ETag>")
        parts.append((int(number), etag.strip().strip('"')))
    if not parts:
        raise malformed_xml("a CompleteMultipartUpload request lists at least one <Part>")
    return parts
