"""The S3 API's multipart upload: CreateMultipartUpload, UploadPart, UploadPartCopy, CompleteMultipartUpload,
AbortMultipartUpload and ListParts, over the uploads `multipart.Uploads` keeps in the staging folder. A completed
upload is placed like any other write (`Objects.place`): renamed over its key and announced as
`ObjectCreated:CompleteMultipartUpload` before the answer.
"""

from __future__ import annotations

import os
import time
from urllib.parse import quote

import anyio
import anyio.to_thread

from eventfn.web import Caller, Request, Response
from eventfn_connectors.bucket.multipart import Upload, part_number
from eventfn_connectors.bucket.payload import receive
from eventfn_connectors.bucket.s3objects import RANGE, Objects, allow, copy_into, stored_headers
from eventfn_connectors.bucket.s3xml import S3Error, element, invalid_argument, ok, quote_etag, text, timestamp, whole
from eventfn_connectors.bucket.store import Meta, Staged


class Multipart:
    """The multipart operations of the S3 API, beside its object operations (`objects`)."""

    def __init__(self, objects: Objects) -> None:
        self.objects = objects
        self.uploads = objects.uploads

    async def _upload(self, upload_id: str, bucket: str, key: str) -> Upload:
        return await anyio.to_thread.run_sync(self.uploads.get, upload_id, bucket, key)

    async def create_upload(self, request: Request, caller: Caller | None, bucket: str, key: str) -> Response:
        allow(caller, "s3:PutObject", f"{bucket}/{key}")
        self.objects.writable(bucket, key)
        headers, user = stored_headers(request)
        upload = Upload(bucket=bucket, key=key, headers=headers, user=user, initiated=time.time())
        upload_id = await anyio.to_thread.run_sync(self.uploads.create, upload)
        return ok(
            "InitiateMultipartUploadResult",
            f"{element('Bucket', bucket)}{element('Key', key)}{element('UploadId', upload_id)}",
        )

    async def upload_part(
        self, request: Request, caller: Caller | None, bucket: str, key: str, query: dict[str, str]
    ) -> Response:
        """UploadPart, and UploadPartCopy (`x-amz-copy-source`, with `x-amz-copy-source-range`)."""
        allow(caller, "s3:PutObject", f"{bucket}/{key}")
        number = part_number(query.get("partNumber"))
        upload_id = query.get("uploadId", "")
        await self._upload(upload_id, bucket, key)
        if request.header("x-amz-copy-source") is not None:
            return await self._copy_part(request, caller, upload_id, number)
        staged = await self.objects.stage("part")
        try:
            received = await receive(request, staged, self.objects.limit)
            await anyio.to_thread.run_sync(staged.finish, lambda st: None)
            await anyio.to_thread.run_sync(self.uploads.add_part, upload_id, number, staged, received.md5)
        finally:
            await anyio.to_thread.run_sync(staged.discard)
        echoed = [(f"x-amz-checksum-{name}", value) for name, value in received.checksums.items()]
        return Response(200, [("ETag", quote_etag(received.md5)), *echoed])

    async def _copy_part(self, request: Request, caller: Caller | None, upload_id: str, number: int) -> Response:
        source_bucket, source_key = self.objects.source(request, caller)
        opened, _ = await self.objects.open_source(request, source_bucket, source_key)
        staged: Staged | None = None
        try:
            size = opened.stat.st_size
            start, length = 0, size
            if (wanted := request.header("x-amz-copy-source-range")) is not None:
                match = RANGE.match(wanted.strip())
                if (
                    match is None
                    or not match.group(1)
                    or not match.group(2)
                    or int(match.group(2)) < int(match.group(1))
                ):
                    raise invalid_argument("The x-amz-copy-source-range value must be of the form bytes=first-last "
                                           "where first and last are the zero-based offsets of the first and last "
                                           "bytes to copy", "x-amz-copy-source-range", wanted)  # fmt: skip
                start, last = int(match.group(1)), int(match.group(2))
                if last >= size:
                    raise S3Error(
                        416, "InvalidRange", "The requested range is not satisfiable", ActualObjectSize=str(size)
                    )
                length = last - start + 1
            if length > self.objects.limit:
                raise invalid_argument(f"a part is at most {self.objects.limit} bytes ([http] max_object_bytes)")
            staged = await self.objects.stage("part")
            md5 = await anyio.to_thread.run_sync(copy_into, opened.fd, start, length, staged)
            await anyio.to_thread.run_sync(staged.finish, lambda st: None)
            await anyio.to_thread.run_sync(self.uploads.add_part, upload_id, number, staged, md5)
        finally:
            os.close(opened.fd)
            if staged is not None:
                await anyio.to_thread.run_sync(staged.discard)
        return ok(
            "CopyPartResult",
            f"<LastModified>{timestamp(time.time())}</LastModified><ETag>{text(quote_etag(md5))}</ETag>",
        )

    async def complete_upload(
        self,
        request: Request,
        caller: Caller | None,
        bucket: str,
        key: str,
        upload_id: str,
        chosen: list[tuple[int, str]],
    ) -> Response:
        """CompleteMultipartUpload: the parts assembled into one staged file, renamed over the key, announced as
        `ObjectCreated:CompleteMultipartUpload` with S3's `<md5 of the parts' md5s>-<count>` ETag."""
        allow(caller, "s3:PutObject", f"{bucket}/{key}")
        upload = await self._upload(upload_id, bucket, key)
        self.objects.writable(bucket, key)
        staged = await self.objects.stage("complete")
        try:
            etag = await anyio.to_thread.run_sync(self.uploads.assemble, upload_id, chosen, staged)

            def meta(st: os.stat_result) -> Meta:
                return Meta(
                    etag=etag, size=st.st_size, mtime_ns=st.st_mtime_ns, headers=upload.headers, user=upload.user
                )

            await self.objects.place(bucket, key, staged, meta, "ObjectCreated:CompleteMultipartUpload", etag,
                              self.objects.write_check(request, bucket, key.split("/")))  # fmt: skip
        finally:
            await anyio.to_thread.run_sync(staged.discard)
        await anyio.to_thread.run_sync(self.uploads.remove, upload_id)
        host = request.header("host") or "localhost"
        return ok(
            "CompleteMultipartUploadResult",
            f"{element('Location', f'http://{host}/{bucket}/{quote(key)}')}{element('Bucket', bucket)}"
            f"{element('Key', key)}<ETag>{text(quote_etag(etag))}</ETag>",
        )

    async def abort_upload(self, caller: Caller | None, bucket: str, key: str, upload_id: str) -> Response:
        allow(caller, "s3:PutObject", f"{bucket}/{key}")
        await self._upload(upload_id, bucket, key)
        await anyio.to_thread.run_sync(self.uploads.remove, upload_id)
        return Response(204)

    async def list_parts(
        self, caller: Caller | None, bucket: str, key: str, upload_id: str, query: dict[str, str]
    ) -> Response:
        allow(caller, "s3:PutObject", f"{bucket}/{key}")
        await self._upload(upload_id, bucket, key)
        parts = await anyio.to_thread.run_sync(self.uploads.parts, upload_id)
        marker = whole(query.get("part-number-marker"), "part-number-marker", 0)
        most = min(whole(query.get("max-parts"), "max-parts", 1000), 1000)
        after = [p for number, p in parts.items() if number > marker]
        shown, truncated = after[:most], len(after) > most
        listed = "".join(
            f"<Part><PartNumber>{p.number}</PartNumber><LastModified>{timestamp(p.mtime)}</LastModified>"
            f"<ETag>{text(quote_etag(p.etag))}</ETag><Size>{p.size}</Size></Part>"
            for p in shown
        )
        next_marker = shown[-1].number if shown else marker
        return ok(
            "ListPartsResult",
            f"{element('Bucket', bucket)}{element('Key', key)}{element('UploadId', upload_id)}"
            f"<PartNumberMarker>{marker}</PartNumberMarker><NextPartNumberMarker>{next_marker}</NextPartNumberMarker>"
            f"<MaxParts>{most}</MaxParts><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
            f"<StorageClass>STANDARD</StorageClass>{listed}",
        )
