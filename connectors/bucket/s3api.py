"""The S3 API over the buckets: a subset of S3's REST API, path-style (`/<bucket>/<key>`), so that boto3, the aws
CLI and any S3 client work against the bucket folders with only an endpoint URL set.

Served: ListBuckets, CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation, ListObjects (v1 and v2),
DeleteObjects, the object operations of `s3objects` (Get, Head, Put, Copy, Delete) and the multipart upload of
`s3multipart`.
Anything else S3 has answers `NotImplemented` (501) in S3's XML. Errors are S3's XML with S3's codes and statuses.

Who may do what is the caller's to say (`Caller.allows`, with S3's action names: `s3:GetObject`, `s3:PutObject`,
`s3:DeleteObject`, `s3:ListBucket`, ...); a caller whose credentials failed (`Caller.problem`) gets 403 with
the code the authenticator chose. Writes to a bucket some trigger names produce its S3 event before the answer.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread

from eventfn.config import HttpSettings
from eventfn.web import BodyTooLarge, Caller, Request, Response
from eventfn_connectors.bucket.files import key_parts, md5_of
from eventfn_connectors.bucket.options import bucket_problem
from eventfn_connectors.bucket.payload import check_body, entity_too_large
from eventfn_connectors.bucket.s3multipart import Multipart
from eventfn_connectors.bucket.s3objects import Objects, Watcher, allow, decode
from eventfn_connectors.bucket.s3xml import (
    Listed,
    S3Error,
    common_prefixes,
    complete_request,
    contents,
    delete_request,
    delete_result,
    element,
    list_buckets,
    listed_key,
    no_such_bucket,
    ok,
    whole,
)
from eventfn_connectors.bucket.store import EtagCache, Lister, Page, buckets, is_bucket, open_object
from eventfn_connectors.bucket.watcher import NotAnnounced

log = logging.getLogger("eventfn.connector.bucket")

#: Sub-resources of S3's API that are not served here: a request naming one is answered 501, never served as
#: another operation (a GET of `?tagging` is not a GetObject).
UNSUPPORTED = frozenset(
    "accelerate acl analytics attributes cors encryption intelligent-tiering inventory legal-hold lifecycle logging "
    "metrics notification object-lock ownershipControls policy policyStatus publicAccessBlock replication "
    "requestPayment restore retention select tagging torrent versioning versions website".split()
)
#: Bytes of an XML request body (DeleteObjects of 1000 keys of 1024 bytes, CompleteMultipartUpload of 10,000 parts).
MAX_XML_BYTES = 4 << 20
#: Keys deleted at once by one DeleteObjects.
_DELETE_CONCURRENCY = 8
#: Listed objects up to this size without an ETag known are read for it.
_LIST_READ_BYTES = 64 * 1024


class S3Api:
    """The S3 API front (`eventfn.web.Front`) of the bucket watcher."""

    service = "s3"

    def __init__(self, watcher: Watcher, settings: HttpSettings) -> None:
        self.watcher = watcher
        self.root = watcher.root
        self.ignore = watcher.ignore
        self.settings = settings
        self.objects = Objects(watcher, limit=settings.max_object_bytes)
        self.multipart = Multipart(self.objects)
        self.etags: EtagCache = self.objects.etags

    def claims(self, request: Request) -> bool:
        """An unsigned request is the S3 API's if it lists the buckets (`GET /`) or names an existing bucket."""
        if request.path == "/":
            return request.method in ("GET", "HEAD")
        bucket = decode_or_none(request.path[1:].partition("/")[0])
        return bucket is not None and bucket_problem(bucket) is None and is_bucket(self.root, bucket)

    def too_large(self, request: Request, limit: int) -> Response:
        response = entity_too_large(limit).response(request.request_id, request.path)
        response.headers.append(("x-amz-request-id", request.request_id))
        return response

    def busy(self, request: Request) -> Response:
        response = S3Error(503, "SlowDown", "Please reduce your request rate.").response(request.request_id,
                                                                                          request.path)  # fmt: skip
        response.headers += [("Retry-After", "1"), ("x-amz-request-id", request.request_id)]
        return response

    async def handle(self, request: Request, caller: Caller | None) -> Response:
        resource = request.path
        try:
            if caller is not None and caller.problem is not None:
                code, message = caller.problem
                raise S3Error(403, code, message)
            response = await self._route(request, caller)
        except S3Error as exc:
            response = exc.response(request.request_id, resource)
        except NotAnnounced as exc:
            log.warning("S3 API: %s", exc)
            response = S3Error(503, "ServiceUnavailable", str(exc)).response(request.request_id, resource)
        except TimeoutError:
            response = S3Error(
                503, "SlowDown", "The object is busy (being read by the bucket watcher); try again."
            ).response(request.request_id, resource)
        except OSError as exc:  # the disk: full, read-only, permissions of the service's own user
            log.warning("S3 API: %s %s failed: %s", request.method, request.path, exc)
            response = S3Error(
                500, "InternalError", f"The service could not do this on its disk: {exc.strerror or exc}"
            ).response(request.request_id, resource)
        response.headers.append(("x-amz-request-id", request.request_id))
        return response

    async def _route(self, request: Request, caller: Caller | None) -> Response:
        method = request.method
        raw_bucket, _, raw_key = request.path[1:].partition("/")
        bucket, key = decode(raw_bucket), decode(raw_key)
        query = dict(parse_qsl(request.query, keep_blank_values=True))
        if unsupported := sorted(UNSUPPORTED & query.keys()):
            raise _not_implemented(f"?{unsupported[0]}")
        if not bucket:
            if method in ("GET", "HEAD"):
                return await self._list_buckets(caller)
            raise _method_not_allowed(method, "the service")
        if (problem := bucket_problem(bucket)) is not None:
            raise S3Error(400, "InvalidBucketName", f"The specified bucket is not valid: {problem}", BucketName=bucket)
        objects = self.objects
        if not key:
            if method == "GET" and "location" in query:
                return await self._location(caller, bucket)
            if method == "GET" and "uploads" in query:
                raise _not_implemented("ListMultipartUploads")
            if method == "GET":
                return await self._list(caller, bucket, query, v2=query.get("list-type") == "2")
            if method == "HEAD":
                return await self._head_bucket(caller, bucket)
            if method == "PUT":
                return await self._create_bucket(request, caller, bucket)
            if method == "DELETE":
                return await self._delete_bucket(caller, bucket)
            if method == "POST" and "delete" in query:
                return await self._delete_many(request, caller, bucket)
            raise _method_not_allowed(method, "a bucket")
        upload_id = query.get("uploadId")
        if method in ("GET", "HEAD") and upload_id is None:
            return await objects.get(request, caller, bucket, key, query)
        if method == "PUT":
            if upload_id is not None:
                return await self.multipart.upload_part(request, caller, bucket, key, query)
            if request.header("x-amz-copy-source") is not None:
                return await objects.copy(request, caller, bucket, key)
            return await objects.put(request, caller, bucket, key)
        if method == "DELETE":
            if upload_id is not None:
                return await self.multipart.abort_upload(caller, bucket, key, upload_id)
            await objects.delete(caller, bucket, key, request)
            return Response(204)
        if method == "POST" and "uploads" in query:
            return await self.multipart.create_upload(request, caller, bucket, key)
        if method == "POST" and upload_id is not None:
            chosen = complete_request(await _xml_body(request))
            return await self.multipart.complete_upload(request, caller, bucket, key, upload_id, chosen)
        if method == "GET" and upload_id is not None:
            return await self.multipart.list_parts(caller, bucket, key, upload_id, query)
        raise _method_not_allowed(method, "an object")

    # -- buckets --------------------------------------------------------------------------------------------------

    async def _list_buckets(self, caller: Caller | None) -> Response:
        allow(caller, "s3:ListAllMyBuckets", "*")
        found = await anyio.to_thread.run_sync(buckets, self.root)
        return list_buckets(found, self.settings.account_id)

    async def _exists(self, bucket: str) -> None:
        if not await anyio.to_thread.run_sync(is_bucket, self.root, bucket):
            raise no_such_bucket(bucket)

    async def _head_bucket(self, caller: Caller | None, bucket: str) -> Response:
        allow(caller, "s3:ListBucket", bucket)
        await self._exists(bucket)
        return Response(200, [("x-amz-bucket-region", self.settings.region)])

    async def _location(self, caller: Caller | None, bucket: str) -> Response:
        allow(caller, "s3:GetBucketLocation", bucket)
        await self._exists(bucket)
        region = "" if self.settings.region == "us-east-1" else self.settings.region  # S3's answer for us-east-1
        return ok("LocationConstraint", region)

    async def _create_bucket(self, request: Request, caller: Caller | None, bucket: str) -> Response:
        """CreateBucket: a folder under the root (its configuration, if any, is read and not used)."""
        allow(caller, "s3:CreateBucket", bucket)
        await _xml_body(request)

        def make() -> bool:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                (self.root / bucket).mkdir()
            except FileExistsError:
                return False
            return True

        if not await anyio.to_thread.run_sync(make):
            raise S3Error(
                409,
                "BucketAlreadyOwnedByYou",
                "Your previous request to create the named bucket succeeded and you already own it.",
                BucketName=bucket,
            )
        log.info("S3 API: bucket %s created (%s)", bucket, self.root / bucket)
        return Response(200, [("Location", f"/{bucket}")])

    async def _delete_bucket(self, caller: Caller | None, bucket: str) -> Response:
        allow(caller, "s3:DeleteBucket", bucket)
        try:
            await anyio.to_thread.run_sync(os.rmdir, self.root / bucket)
        except (FileNotFoundError, NotADirectoryError):
            raise no_such_bucket(bucket) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise S3Error(
                409,
                "BucketNotEmpty",
                "The bucket you tried to delete is not empty (its folder holds files or folders; hidden and "
                "temporary files count too, though they are not objects).",
                BucketName=bucket,
            ) from None
        log.info("S3 API: bucket %s deleted", bucket)
        return Response(204)

    # -- listing --------------------------------------------------------------------------------------------------

    async def _list(self, caller: Caller | None, bucket: str, query: dict[str, str], *, v2: bool) -> Response:
        """ListObjectsV2 (`list-type=2`) and ListObjects: keys in the order of their UTF-8 bytes, as S3's."""
        allow(caller, "s3:ListBucket", bucket)
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        max_keys = min(whole(query.get("max-keys"), "max-keys", 1000), 1000)
        encoding = query.get("encoding-type")
        if encoding not in (None, "url"):
            raise S3Error(400, "InvalidArgument", "Invalid Encoding Method specified in Request",
                          ArgumentName="encoding-type", ArgumentValue=encoding)  # fmt: skip
        url = encoding == "url"
        token = query.get("continuation-token") if v2 else None
        start = query.get("start-after" if v2 else "marker", "")
        if token is not None:
            after = _decode_token(token)
        else:
            after = start.encode("utf-8")
            if not v2 and delimiter and start.endswith(delimiter):
                after += b"\xff"  # a marker that is a common prefix: on past what it rolls up
        page, etags = await anyio.to_thread.run_sync(self._page, bucket, prefix, delimiter, after, max_keys)
        listed = [
            Listed(found.key, found.stat.st_size, found.stat.st_mtime,
                   etag if etag is not None else self.watcher.known_etag(bucket, found.key, found.stat))
            for found, etag in zip(page.objects, etags, strict=True)
        ]  # fmt: skip
        parts = [
            element("Name", bucket),
            element("Prefix", listed_key(prefix, url)),
            element("Delimiter", listed_key(delimiter, url) if delimiter else None),
            element("MaxKeys", max_keys),
            element("EncodingType", encoding),
            element("IsTruncated", "true" if page.next_after is not None else "false"),
        ]
        if v2:
            parts += [
                element("KeyCount", len(listed) + len(page.prefixes)),
                element("ContinuationToken", token),
                element("StartAfter", listed_key(start, url) if start else None),
            ]
            if page.next_after is not None:
                parts.append(element("NextContinuationToken", _encode_token(page.next_after)))
        else:
            parts.append(element("Marker", listed_key(start, url)))
            if page.next_after is not None:
                last = page.next_after.removesuffix(b"\xff").decode("utf-8")
                parts.append(element("NextMarker", listed_key(last, url)))
        body = "".join(parts) + contents(listed, url) + common_prefixes(page.prefixes, url)
        return ok("ListBucketResult", body)

    def _page(
        self, bucket: str, prefix: str, delimiter: str, after: bytes, max_keys: int
    ) -> tuple[Page, list[str | None]]:
        """One page of a listing (in a thread), and the ETag of each object where it is known without reading a
        large file (from its metadata, from an earlier read, or read if small)."""
        if not is_bucket(self.root, bucket):
            raise no_such_bucket(bucket)
        lister = Lister(self.root, bucket, self.ignore)
        page = lister.page(prefix, delimiter, after, max_keys)
        etags: list[str | None] = []
        for found in page.objects:
            meta = lister.metadata(found.key)
            etag = meta.etag if meta is not None else self.etags.get(found.stat)
            if etag is None and found.stat.st_size <= _LIST_READ_BYTES:
                etag = self._small_etag(bucket, found.key, found.stat)
            etags.append(etag)
        return page, etags

    def _small_etag(self, bucket: str, key: str, st: os.stat_result) -> str | None:
        parts = key_parts(key)
        opened = open_object(self.root, bucket, parts, self.ignore) if parts is not None else None
        if opened is None:
            return None
        try:
            if (opened.stat.st_ino, opened.stat.st_size, opened.stat.st_mtime_ns) != (
                st.st_ino, st.st_size, st.st_mtime_ns
            ):  # fmt: skip
                return None  # changed since it was listed: no ETag rather than another version's
            etag = md5_of(opened.fd)
        finally:
            os.close(opened.fd)
        self.etags.put(opened.stat, etag)
        return etag

    # -- deleting many --------------------------------------------------------------------------------------------

    async def _delete_many(self, request: Request, caller: Caller | None, bucket: str) -> Response:
        """DeleteObjects: each key deleted (and announced) as DeleteObject does, errors reported per key."""
        body = await _xml_body(request)
        check_body(request, body)
        keys, quiet = delete_request(body)
        await self._exists(bucket)
        outcome: list[tuple[str, str] | None] = [None] * len(keys)
        limit = anyio.Semaphore(_DELETE_CONCURRENCY)

        async def one(i: int, key: str) -> None:
            async with limit:
                try:
                    await self.objects.delete(caller, bucket, key)
                except S3Error as exc:
                    outcome[i] = (exc.code, exc.message)
                except NotAnnounced as exc:
                    outcome[i] = ("ServiceUnavailable", str(exc))
                except (TimeoutError, OSError) as exc:
                    outcome[i] = ("InternalError", f"{type(exc).__name__}: {exc}")

        async with anyio.create_task_group() as tg:
            for i, key in enumerate(keys):
                tg.start_soon(one, i, key)
        deleted = [key for key, failed in zip(keys, outcome, strict=True) if failed is None]
        errors = [(key, *failed) for key, failed in zip(keys, outcome, strict=True) if failed is not None]
        return delete_result(deleted, errors, quiet)


def decode_or_none(raw: str) -> str | None:
    try:
        return decode(raw)
    except S3Error:
        return None


async def _xml_body(request: Request) -> bytes:
    try:
        return await request.read(MAX_XML_BYTES)
    except BodyTooLarge:
        raise S3Error(
            400, "MaxMessageLengthExceeded", f"Your request was too big (over {MAX_XML_BYTES} bytes)."
        ) from None


def _encode_token(after: bytes) -> str:
    return base64.urlsafe_b64encode(after).decode("ascii").rstrip("=")


def _decode_token(token: str) -> bytes:
    try:
        return base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise S3Error(400, "InvalidArgument", "The continuation token provided is incorrect",
                      ArgumentName="continuation-token", ArgumentValue=token) from None  # fmt: skip


def _not_implemented(what: str) -> S3Error:
    return S3Error(
        501,
        "NotImplemented",
        f"A header or parameter you provided implies functionality that is not implemented: {what} "
        "(eventfn serves objects, listings, copies and multipart uploads of its bucket folders)",
    )


def _method_not_allowed(method: str, what: str) -> S3Error:
    return S3Error(405, "MethodNotAllowed", f"The specified method is not allowed against this resource: {method} "
                   f"on {what}", Method=method, ResourceType=what)  # fmt: skip
