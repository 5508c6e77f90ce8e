"""The S3 API over the buckets, end to end: one `eventfn serve` for the module, driven with boto3 (`endpoint_url`)
as any S3 code drives S3, and with raw HTTP for what boto3 never sends (`..` in a key, aws-chunked bodies, a
5 GB Content-Length). A function with a bucket trigger counts the events the API's writes make.

Where a test checks that something produced *no* second event, it writes a last file straight into the bucket
folder and waits for that file's event: the watcher handles the kernel's reports in order, so an event the
earlier writes wrongly caused would have been published by then.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import socket
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import nats
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from eventfn import subjects
from eventfn.config import HttpSettings
from eventfn.sources.connector import Context
from eventfn.web import Body, Request
from eventfn_connectors.bucket import BucketConnector, BucketSettings
from tests.conftest import Collector
from tests.s3_rig import Rig, running

pytestmark = pytest.mark.e2e

MB = 1024 * 1024
#: Counts what the API's writes to bucket `events` make: one report per record.
COUNTER = """
    # /// eventfn
    # triggers = [{ type = "bucket", bucket = "events", events = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"] }]
    # retry = { max_attempts = 0 }
    # ///
    import json
    from _probe import report


    def handler(event, context):
        for record in event["Records"]:
            found = record["s3"]["object"]
            report("probe.s3api", json.dumps(
                {"name": record["eventName"], "key": found["key"], "etag": found.get("eTag"), "size": found.get("size")}
            ))
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running(tmp_path_factory.mktemp("s3api"), {"counter": COUNTER}, buckets=("data", "listing")) as found:
        yield found


@pytest.fixture(scope="module")
def s3(rig: Rig) -> Any:
    return rig.client()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def code_of(call: Callable[[], object]) -> tuple[str, int]:
    """The S3 error code and HTTP status a call fails with."""
    with pytest.raises(ClientError) as caught:
        call()
    error = caught.value.response
    return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]


def xml_code(body: bytes) -> str:
    return body.decode().split("<Code>")[1].split("</Code>")[0]


# -- objects -------------------------------------------------------------------------------------------------------


def test_put_then_get_and_head_give_back_the_bytes_headers_and_md5_etag(rig: Rig, s3: Any) -> None:
    body = b"hello, objects"
    put = s3.put_object(
        Bucket="data", Key="docs/hello world+1.txt", Body=body, ContentType="text/plain", Metadata={"owner": "ana"}
    )
    assert put["ETag"] == f'"{md5(body)}"'
    assert (rig.root / "data" / "docs" / "hello world+1.txt").read_bytes() == body, "an object is a file"
    got = s3.get_object(Bucket="data", Key="docs/hello world+1.txt")
    assert got["Body"].read() == body
    assert (got["ContentType"], got["Metadata"], got["ETag"]) == ("text/plain", {"owner": "ana"}, put["ETag"])
    head = s3.head_object(Bucket="data", Key="docs/hello world+1.txt")
    assert head["ContentLength"] == len(body) and head["ETag"] == put["ETag"] and head["ContentType"] == "text/plain"
    # A file a user dropped into the folder is an object too: S3's default type, its MD5 as ETag.
    dropped_bytes = b"\x00dropped"
    (rig.root / "data" / "dropped.bin").write_bytes(dropped_bytes)
    dropped = s3.head_object(Bucket="data", Key="dropped.bin")
    assert dropped["ETag"] == f'"{md5(dropped_bytes)}"' and dropped["ContentType"] == "binary/octet-stream"
    # Conditional requests, as s3transfer sends If-Match with each ranged part of a download.
    assert code_of(lambda: s3.get_object(Bucket="data", Key="dropped.bin", IfMatch='"0000"')) == (
        "PreconditionFailed",
        412,
    )
    status, _, _ = rig.raw("GET", "/data/dropped.bin", headers={"If-None-Match": dropped["ETag"]})
    assert status == 304


def test_ranges_are_served_as_s3_serves_them(rig: Rig, s3: Any) -> None:
    data = bytes(range(256)) * 1200  # past the size read into memory at once: streamed
    s3.put_object(Bucket="data", Key="range.bin", Body=data)
    end = len(data) - 1
    for header, first, last in [
        ("bytes=10-19", 10, 19),
        ("bytes=300000-", 300000, end),
        ("bytes=-5", end - 4, end),
        ("bytes=0-999999999", 0, end),
    ]:
        got = s3.get_object(Bucket="data", Key="range.bin", Range=header)
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert got["ContentRange"] == f"bytes {first}-{last}/{len(data)}"
        assert got["Body"].read() == data[first : last + 1]
    assert code_of(lambda: s3.get_object(Bucket="data", Key="range.bin", Range=f"bytes={len(data)}-")) == (
        "InvalidRange",
        416,
    )
    status, headers, _ = rig.raw("GET", "/data/range.bin", headers={"Range": "bytes=-0"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"


def test_listing_is_in_utf8_byte_order_with_prefixes_delimiters_and_pages(rig: Rig, s3: Any) -> None:
    keys = ["ä.txt", "a0", "a/c/d", "z z", "a.b", "b", "a/b", "a-b"]
    for key in keys:
        path = rig.root / "listing" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(key)
    (rig.root / "listing" / "ignored.tmp").write_text("a temporary file is not an object")
    (rig.root / "listing" / ".hidden").write_text("nor is a hidden one")
    in_order = sorted(keys, key=lambda k: k.encode())  # S3's order: '-' < '.' < '/' < '0'
    assert in_order == ["a-b", "a.b", "a/b", "a/c/d", "a0", "b", "z z", "ä.txt"]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="listing", PaginationConfig={"PageSize": 3})
    listed = [item for page in pages for item in page.get("Contents", [])]
    assert [item["Key"] for item in listed] == in_order
    assert all(item["ETag"] == f'"{md5(item["Key"].encode())}"' and item["Size"] == len(item["Key"].encode())
               for item in listed)  # fmt: skip
    top = s3.list_objects_v2(Bucket="listing", Delimiter="/")
    assert [c["Key"] for c in top["Contents"]] == ["a-b", "a.b", "a0", "b", "z z", "ä.txt"]
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["a/"]
    inside = s3.list_objects_v2(Bucket="listing", Prefix="a/", Delimiter="/")
    assert [c["Key"] for c in inside["Contents"]] == ["a/b"] and [p["Prefix"] for p in inside["CommonPrefixes"]] == [
        "a/c/"
    ]
    after = s3.list_objects_v2(Bucket="listing", StartAfter="a/b", MaxKeys=2)
    assert [c["Key"] for c in after["Contents"]] == ["a/c/d", "a0"] and after["IsTruncated"]
    # ListObjects (v1), paged by markers with a delimiter: each common prefix once.
    seen: list[str] = []
    marker = ""
    for _ in range(10):
        page = s3.list_objects(Bucket="listing", Delimiter="/", MaxKeys=2, Marker=marker)
        seen += [c["Key"] for c in page.get("Contents", [])] + [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        if not page["IsTruncated"]:
            break
        marker = page["NextMarker"]
    assert sorted(seen) == sorted(["a-b", "a.b", "a/", "a0", "b", "z z", "ä.txt"]) and len(seen) == 7
    assert "listing" in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_errors_are_s3s_codes_in_its_xml(rig: Rig, s3: Any) -> None:
    assert code_of(lambda: s3.get_object(Bucket="data", Key="missing")) == ("NoSuchKey", 404)
    assert code_of(lambda: s3.get_object(Bucket="no-such-bucket", Key="k")) == ("NoSuchBucket", 404)
    assert code_of(lambda: s3.put_object(Bucket="no-such-bucket", Key="k", Body=b"x")) == ("NoSuchBucket", 404)
    assert code_of(lambda: s3.abort_multipart_upload(Bucket="data", Key="k", UploadId="0" * 40)) == (
        "NoSuchUpload",
        404,
    )
    assert code_of(lambda: s3.put_object(Bucket="data", Key="x.tmp", Body=b"x")) == ("InvalidArgument", 400)
    status, headers, body = rig.raw("GET", "/data/missing")
    assert status == 404 and headers["content-type"] == "application/xml" and xml_code(body) == "NoSuchKey"
    assert b"<Key>missing</Key>" in body and b"<RequestId>" in body
    status, _, body = rig.raw("GET", "/data/k?tagging")
    assert status == 501 and xml_code(body) == "NotImplemented"
    # A wrong Content-MD5 stores nothing.
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    assert code_of(lambda: s3.put_object(Bucket="data", Key="md5.txt", Body=b"x", ContentMD5=wrong)) == (
        "BadDigest",
        400,
    )
    assert not (rig.root / "data" / "md5.txt").exists()


def test_an_object_over_the_limit_is_refused_before_its_body_is_sent(rig: Rig) -> None:
    where = urlsplit(rig.url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        limit = HttpSettings().max_object_bytes
        head = f"PUT /data/huge.bin HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Length: {limit + 1}\r\n"
        head += "Expect: 100-continue\r\n\r\n"
        sock.sendall(head.encode())
        answer = b""
        while b"</Error>" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 400 ") and b"100 Continue" not in answer, "answered without asking for the body"
    assert xml_code(answer.split(b"\r\n\r\n", 1)[1]) == "EntityTooLarge"


def test_keys_stay_inside_their_bucket(rig: Rig, s3: Any, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    bucket = rig.root / "data"
    (bucket / "link").symlink_to(outside)
    (bucket / "leak.txt").symlink_to(outside / "secret.txt")
    for path in ["/data/a/..%2F..%2F..%2Fescape.txt", "/data/%2Fescape.txt", "/data/a%00b", "/data/a//b"]:
        status, _, body = rig.raw("PUT", path, b"x")
        assert (status, xml_code(body)) == (400, "InvalidArgument"), path
        status, _, body = rig.raw("GET", path)
        assert (status, xml_code(body)) == (400, "InvalidArgument"), path
    assert not (rig.root.parent / "escape.txt").exists() and not (rig.root / "escape.txt").exists()
    # Links are never followed, to read or to write.
    assert code_of(lambda: s3.get_object(Bucket="data", Key="link/secret.txt")) == ("NoSuchKey", 404)
    assert code_of(lambda: s3.get_object(Bucket="data", Key="leak.txt")) == ("NoSuchKey", 404)
    assert code_of(lambda: s3.put_object(Bucket="data", Key="link/new.txt", Body=b"x")) == ("InvalidArgument", 400)
    assert not (outside / "new.txt").exists()
    s3.put_object(Bucket="data", Key="leak.txt", Body=b"replaced")  # the link is replaced, not written through
    assert (outside / "secret.txt").read_text() == "secret" and not (bucket / "leak.txt").is_symlink()
    too_long = "/data/" + "n" * 300
    assert rig.raw("GET", too_long)[0] == 404 and rig.raw("DELETE", too_long)[0] == 204
    status, _, body = rig.raw("PUT", "/data/.hidden", b"x")
    assert status == 400 and b"ignores" in body, "a key the watcher ignores is refused, with why"


def test_copy_keeps_or_replaces_metadata(rig: Rig, s3: Any) -> None:
    s3.put_object(Bucket="data", Key="orig.json", Body=b"{}", ContentType="application/json", Metadata={"v": "1"})
    copied = s3.copy_object(Bucket="data", Key="copies/same.json", CopySource={"Bucket": "data", "Key": "orig.json"})
    assert copied["CopyObjectResult"]["ETag"] == f'"{md5(b"{}")}"'
    head = s3.head_object(Bucket="data", Key="copies/same.json")
    assert (head["ContentType"], head["Metadata"]) == ("application/json", {"v": "1"})
    s3.copy_object(Bucket="data", Key="copies/new.json", CopySource="data/orig.json", MetadataDirective="REPLACE",
                   ContentType="text/plain", Metadata={"v": "2"})  # fmt: skip
    head = s3.head_object(Bucket="data", Key="copies/new.json")
    assert (head["ContentType"], head["Metadata"]) == ("text/plain", {"v": "2"})
    assert code_of(lambda: s3.copy_object(Bucket="data", Key="orig.json", CopySource="data/orig.json")) == (
        "InvalidRequest",
        400,
    )
    assert code_of(lambda: s3.copy_object(Bucket="data", Key="c", CopySource="data/missing")) == ("NoSuchKey", 404)
    assert code_of(lambda: s3.copy_object(Bucket="data", Key="c", CopySource={"Bucket": "data", "Key": "../x"})) == (
        "InvalidArgument",
        400,
    )


def test_deletes_are_idempotent_and_batched(rig: Rig, s3: Any) -> None:
    for key in ["del/a", "del/b/c", "del/d"]:
        s3.put_object(Bucket="data", Key=key, Body=b"x")
    assert s3.delete_object(Bucket="data", Key="del/a")["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert s3.delete_object(Bucket="data", Key="del/a")["ResponseMetadata"]["HTTPStatusCode"] == 204
    result = s3.delete_objects(
        Bucket="data", Delete={"Objects": [{"Key": "del/b/c"}, {"Key": "del/d"}, {"Key": "gone"}]}
    )
    assert sorted(d["Key"] for d in result["Deleted"]) == ["del/b/c", "del/d", "gone"] and "Errors" not in result
    assert not (rig.root / "data" / "del").exists(), "S3 has no folders: the last object takes its folder along"


def test_multipart_uploads_assemble_parts_with_s3s_etag(rig: Rig, s3: Any, tmp_path: Path) -> None:
    data = os.urandom(11 * MB)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    small = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
    s3.upload_file(str(source), "data", "big/file.bin", Config=small)
    digests = b"".join(hashlib.md5(data[i : i + 5 * MB]).digest() for i in range(0, len(data), 5 * MB))
    head = s3.head_object(Bucket="data", Key="big/file.bin")
    assert head["ETag"] == f'"{hashlib.md5(digests).hexdigest()}-3"' and head["ContentLength"] == len(data)
    target = tmp_path / "back.bin"
    s3.download_file("data", "big/file.bin", str(target), Config=small)  # ranged GETs with If-Match
    assert target.read_bytes() == data
    assert not list((rig.root / ".eventfn-uploads").glob("*/*")), "a completed upload leaves nothing behind"
    # By hand: parts listed, a part too small refused, an aborted upload gone.
    upload = s3.create_multipart_upload(Bucket="data", Key="parts.bin")["UploadId"]
    one = s3.upload_part(Bucket="data", Key="parts.bin", UploadId=upload, PartNumber=1, Body=b"a" * 1024)
    two = s3.upload_part(Bucket="data", Key="parts.bin", UploadId=upload, PartNumber=2, Body=b"b")
    listed = s3.list_parts(Bucket="data", Key="parts.bin", UploadId=upload)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in listed] == [(1, one["ETag"], 1024), (2, two["ETag"], 1)]
    parts = {"Parts": [{"PartNumber": 1, "ETag": one["ETag"]}, {"PartNumber": 2, "ETag": two["ETag"]}]}
    complete = functools.partial(s3.complete_multipart_upload, Bucket="data", Key="parts.bin", UploadId=upload)
    assert code_of(lambda: complete(MultipartUpload=parts)) == ("EntityTooSmall", 400)
    wrong = {"Parts": [{"PartNumber": 1, "ETag": two["ETag"]}]}
    assert code_of(lambda: complete(MultipartUpload=wrong)) == ("InvalidPart", 400)
    s3.abort_multipart_upload(Bucket="data", Key="parts.bin", UploadId=upload)
    assert code_of(lambda: s3.list_parts(Bucket="data", Key="parts.bin", UploadId=upload)) == ("NoSuchUpload", 404)
    assert code_of(lambda: s3.head_object(Bucket="data", Key="parts.bin")) == ("404", 404)


def test_aws_chunked_bodies_are_decoded_and_their_trailing_checksum_checked(rig: Rig) -> None:
    data = os.urandom(40_000)

    def framed(checksum: str) -> bytes:
        chunks = [data[i : i + 16384] for i in range(0, len(data), 16384)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        return body + b"0\r\nx-amz-checksum-crc32:" + checksum.encode() + b"\r\n\r\n"

    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    headers = {
        "Content-Encoding": "aws-chunked",
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "x-amz-trailer": "x-amz-checksum-crc32",
        "x-amz-decoded-content-length": str(len(data)),
    }
    status, answered, _ = rig.raw("PUT", "/data/chunked.bin", framed(crc), headers)
    assert status == 200 and answered["etag"] == f'"{md5(data)}"'
    assert (rig.root / "data" / "chunked.bin").read_bytes() == data
    status, _, body = rig.raw("PUT", "/data/chunked-bad.bin", framed("AAAAAA=="), headers)
    assert (status, xml_code(body)) == (400, "BadDigest") and not (rig.root / "data" / "chunked-bad.bin").exists()
    status, _, body = rig.raw("PUT", "/data/chunked-cut.bin", framed(crc)[:-30], headers)
    assert (status, xml_code(body)) == (400, "IncompleteBody")


def test_malformed_requests_never_get_a_500(rig: Rig) -> None:
    evil_xml = b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]><Delete>&e;</Delete>'
    huge_part = b"<CompleteMultipartUpload><Part><PartNumber>" + b"9" * 5000 + b"</PartNumber><ETag>x</ETag></Part>"
    upload = "uploadId=" + "0" * 40
    assert rig.raw("PUT", "/data/malformed.bin", b"0123456789")[0] == 200
    cases: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
        ("GET", "/data?list-type=2&max-keys=" + "9" * 5000, b"", {}, 400, "InvalidArgument"),
        ("GET", "/data?list-type=2&max-keys=%C2%B2", b"", {}, 400, "InvalidArgument"),
        ("GET", "/data?list-type=2&continuation-token=%%%", b"", {}, 400, "InvalidArgument"),
        ("GET", "/data?list-type=2&encoding-type=base64", b"", {}, 400, "InvalidArgument"),
        # A range that is not one S3 reads is ignored: the whole object, as RFC 9110 allows.
        ("GET", "/data/malformed.bin", b"", {"Range": "bytes=" + "9" * 5000 + "-"}, 200, ""),
        ("GET", "/data/%ff%fe", b"", {}, 400, "InvalidURI"),
        ("PUT", "/data/k", b"x", {"x-amz-decoded-content-length": "\u00b2"}, 400, "InvalidArgument"),
        ("PUT", "/data/k", b"x", {"Content-MD5": "not base64!"}, 400, "InvalidDigest"),
        ("PUT", "/data/k", b"zz\r\n", {"Content-Encoding": "aws-chunked"}, 400, "InvalidRequest"),
        ("PUT", "/data/k", b"", {"x-amz-copy-source": "%ff"}, 400, "InvalidURI"),
        ("PUT", "/data/k", b"", {"x-amz-copy-source": "nobucketkey"}, 400, "InvalidArgument"),
        ("PUT", "/data/k?partNumber=0&uploadId=x", b"x", {}, 400, "InvalidArgument"),
        ("PUT", "/data/k?partNumber=" + "1" * 5000 + "&uploadId=x", b"x", {}, 400, "InvalidArgument"),
        ("PUT", "/data/k?partNumber=1&uploadId=../../etc", b"x", {}, 404, "NoSuchUpload"),
        ("POST", "/data?delete", evil_xml, {}, 400, "MalformedXML"),
        ("POST", "/data?delete", b"<Delete><Object/></Delete>", {}, 400, "MalformedXML"),
        ("POST", "/data?delete", b"not xml", {}, 400, "MalformedXML"),
        ("POST", "/data/k?" + upload, huge_part + b"</CompleteMultipartUpload>", {}, 400, "MalformedXML"),
        ("GET", "/data/k?" + upload + "&max-parts=-1", b"", {}, 404, "NoSuchUpload"),
        ("POST", "/data/k", b"", {}, 405, "MethodNotAllowed"),
        ("PATCH", "/data/k", b"", {}, 405, "MethodNotAllowed"),
    ]
    for method, path, body, headers, expected, code in cases:
        status, _, answer = rig.raw(method, path, body, headers)
        assert (status, xml_code(answer) if code else "") == (expected, code), (method, path[:80], answer[:300])
    assert b"root:" not in rig.raw("POST", "/data?delete", evil_xml)[2]


# -- events ------------------------------------------------------------------------------------------------------


async def test_each_write_through_the_api_is_one_event_stored_before_the_answer(
    rig: Rig, s3: Any, tmp_path: Path
) -> None:
    def call(method: Callable[..., Any], **kwargs: Any) -> Any:
        return anyio.to_thread.run_sync(functools.partial(method, **kwargs))

    nc = await nats.connect(rig.nats_url)
    try:
        js = nc.jetstream()
        reports = Collector()
        await nc.subscribe("probe.s3api", cb=reports.on_message)
        await nc.flush()

        async def stored(name: str) -> dict[str, Any]:
            """The last event stored for `name` in bucket `events`, read as soon as the API answered."""
            subject = f"{subjects.SOURCE_PREFIX}bucket.events.{name.replace(':', '.')}"
            return json.loads((await js.get_last_msg(subjects.EVENTS_STREAM, subject)).data)["s3"]["object"]

        await call(s3.put_object, Bucket="events", Key="put.txt", Body=b"put")
        assert (await stored("ObjectCreated:Put"))["key"] == "put.txt"
        await call(s3.copy_object, Bucket="events", Key="copy.txt", CopySource="events/put.txt")
        assert (await stored("ObjectCreated:Copy"))["key"] == "copy.txt"
        source = tmp_path / "multi.bin"
        source.write_bytes(os.urandom(6 * MB))
        small = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
        await call(s3.upload_file, Filename=str(source), Bucket="events", Key="multi.bin", Config=small)
        multi = await stored("ObjectCreated:CompleteMultipartUpload")
        assert multi["key"] == "multi.bin" and multi["eTag"].endswith("-2") and multi["size"] == 6 * MB
        await call(s3.delete_object, Bucket="events", Key="copy.txt")
        assert (await stored("ObjectRemoved:Delete"))["key"] == "copy.txt"

        # The watcher saw every one of those files appear and go: the last file's event comes after anything it
        # would have announced of them.
        (rig.root / "events" / "zz-last.txt").write_text("last")
        with anyio.fail_after(30):
            while "zz-last.txt" not in [json.loads(t)["key"] for t in reports.texts]:
                await reports.wait_for(len(reports.messages) + 1, timeout=30)
        seen = sorted((r["key"], r["name"]) for r in map(json.loads, reports.texts))
        assert seen == [
            ("copy.txt", "ObjectCreated:Copy"),
            ("copy.txt", "ObjectRemoved:Delete"),
            ("multi.bin", "ObjectCreated:CompleteMultipartUpload"),
            ("put.txt", "ObjectCreated:Put"),
            ("zz-last.txt", "ObjectCreated:Put"),
        ]
        info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=f"{subjects.SOURCE_PREFIX}bucket.events.>")
        assert sum((info.state.subjects or {}).values()) == 5, info.state.subjects
    finally:
        await nc.close()


# -- who may do what (the front alone: the caller is what the authenticator makes of the credentials) ---------------


class Policy:
    """A caller as the authenticator hands it over: allowed what `allowed` lists, or refused with `problem`."""

    def __init__(self, allowed: set[tuple[str, str]], problem: tuple[str, str] | None = None) -> None:
        self.name = "role/thumbnail"
        self.allowed = allowed
        self.problem = problem

    def allows(self, action: str, resource: str) -> bool:
        return (action, resource) in self.allowed


def front_over(root: Path) -> Any:
    async def nowhere(subject: str, event: object) -> object:
        raise AssertionError("no trigger names these buckets: nothing is published")

    context = Context("bucket", publish=nowhere, state=None, data_dir=root)  # type: ignore[arg-type]
    return BucketConnector(BucketSettings(root=str(root)), context).http_front(HttpSettings())


def request(method: str, path: str, body: bytes = b"") -> Request:
    return Request(method=method, path=path, query="", headers=[("content-length", str(len(body)))],
                   client="127.0.0.1", body=Body.of(body), request_id="r1")  # fmt: skip


async def test_a_caller_gets_access_denied_beyond_its_policy(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    (tmp_path / "thumbs").mkdir()
    (tmp_path / "uploads" / "in.png").write_bytes(b"png")
    front = front_over(tmp_path)
    role = Policy({("s3:GetObject", "uploads/in.png"), ("s3:PutObject", "thumbs/in.png")})
    assert (await front.handle(request("GET", "/uploads/in.png"), role)).status == 200
    assert (await front.handle(request("PUT", "/thumbs/in.png", b"small"), role)).status == 200
    denied = await front.handle(request("PUT", "/uploads/in.png", b"overwrite"), role)
    assert denied.status == 403 and xml_code(denied.body) == "AccessDenied" and b"s3:PutObject" in denied.body
    assert (tmp_path / "uploads" / "in.png").read_bytes() == b"png"
    listing = await front.handle(request("GET", "/uploads"), role)
    assert (listing.status, xml_code(listing.body)) == (403, "AccessDenied")
    deleting = await front.handle(request("DELETE", "/thumbs/in.png"), role)
    assert (deleting.status, xml_code(deleting.body)) == (403, "AccessDenied")


async def test_credentials_that_failed_are_refused_with_their_code(tmp_path: Path) -> None:
    front = front_over(tmp_path)
    forged = Policy({("s3:GetObject", "uploads/in.png")}, ("SignatureDoesNotMatch", "The signature does not match."))
    answer = await front.handle(request("GET", "/uploads/in.png"), forged)
    assert answer.status == 403 and xml_code(answer.body) == "SignatureDoesNotMatch"
