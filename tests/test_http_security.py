"""The HTTP front attacked as a hostile client or handler would: one `eventfn serve` for the module (loopback, the
test access key), raw HTTP for what no well-behaved client sends, botocore's signer for signed requests.

Each test is one attack that worked before its fix; what it checks is that the attack is refused *and* that the
legitimate use next to it still works (so a test cannot pass by refusing everything).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from eventfn.fronts.http import peers
from tests.s3_rig import ACCESS_KEY, REGION, SECRET_KEY, Rig, running

pytestmark = pytest.mark.e2e

IAM_URL = """
    # /// eventfn
    # [url]
    # auth = "aws_iam"
    # ///
    def handler(event, context):
        return {"caller": event["requestContext"].get("authorizer", {}).get("iam", {}).get("accessKey")}
"""
CORS_URL = """
    # /// eventfn
    # [url.cors]
    # allow_origins = ["*", "https://app.example"]
    # allow_methods = ["GET"]
    # allow_credentials = true
    # ///
    def handler(event, context):
        return {"ok": True}
"""
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SECRET = b"the secret bucket's object"
OUTSIDE = b"a file beside the buckets root"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("security")
    (directory / "outside.txt").write_bytes(OUTSIDE)
    with running(directory, {"iam": IAM_URL, "corsy": CORS_URL}, buckets=("uploads", "secret")) as found:
        (found.root / "secret" / "s.txt").write_bytes(SECRET)
        yield found


def send(
    rig: Rig, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request exactly as given (the path with its query, as sent)."""
    where = urlsplit(rig.url)
    conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        sent = {"Host": where.netloc, "Content-Length": str(len(body)), **(headers or {})}
        for name, value in sent.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def signed(rig: Rig, method: str, path: str, service: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    """The headers of `method path` signed with the test access key (botocore's SigV4, as boto3 signs)."""
    request = AWSRequest(method=method, url=rig.url + path, data=b"", headers=headers or {})
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), service, REGION).add_auth(request)
    return dict(request.headers.items())


def admin_s3(rig: Rig) -> Any:
    """boto3's S3 client with the test key, presigning with SigV4."""
    client = boto3.client(
        "s3",
        endpoint_url=rig.url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(signature_version="s3v4", retries={"total_max_attempts": 1}),
    )
    rig.clients.append(client)
    return client


def error_code(body: bytes) -> str:
    return body.split(b"<Code>")[1].split(b"</Code>")[0].decode() if b"<Code>" in body else body.decode()[:200]


# -- the S3 API's confinement ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "../outside.txt",  # the folder above the buckets root: the project, eventfn.toml, the data dir
        "%2E%2E/outside.txt",
        "../data/auth/http.json",  # the admin key
        ".eventfn-uploads/x",  # the staging folder: others' uploads in flight
        "./secret/s.txt",  # the root itself, as a bucket
    ],
)
def test_a_copy_source_never_leaves_the_buckets(rig: Rig, source: str) -> None:
    status, _, body = send(rig, "PUT", "/uploads/stolen", {"x-amz-copy-source": source})
    assert (status, error_code(body)) == (400, "InvalidArgument"), body
    assert not (rig.root / "uploads" / "stolen").exists()


def test_an_upload_part_copy_never_leaves_the_buckets(rig: Rig) -> None:
    s3 = admin_s3(rig)
    upload = s3.create_multipart_upload(Bucket="uploads", Key="parts")["UploadId"]
    try:
        path = f"/uploads/parts?partNumber=1&uploadId={upload}"
        status, _, body = send(rig, "PUT", path, {"x-amz-copy-source": "../outside.txt"})
        assert (status, error_code(body)) == (400, "InvalidArgument"), body
        status, _, body = send(rig, "PUT", path, {"x-amz-copy-source": "secret/s.txt"})
        assert status == 200, body  # a real bucket's object is copied (no credentials needed on loopback)
    finally:
        s3.abort_multipart_upload(Bucket="uploads", Key="parts", UploadId=upload)


def test_an_object_never_runs_as_a_page_of_the_function_urls_origin(rig: Rig) -> None:
    """Objects and function URLs share one origin here: HTML someone could upload (a presigned PUT does not sign its
    Content-Type) must not run scripts there, where the URLs' cookies live."""
    s3 = admin_s3(rig)
    page = b"<script>fetch('/fn/corsy/?c=' + document.cookie)</script>"
    for key, kind in [
        ("page.html", "text/html; charset=utf-8"),
        ("img.svg", "image/svg+xml"),
        ("two", "text/plain, text/html"),
    ]:
        s3.put_object(Bucket="uploads", Key=key, Body=page, ContentType=kind)
        status, headers, _ = send(rig, "GET", f"/uploads/{key}")
        assert status == 200 and headers.get("content-security-policy") == "sandbox", (kind, headers)
        assert headers.get("x-content-type-options") == "nosniff"
    s3.put_object(Bucket="uploads", Key="photo.png", Body=page, ContentType="image/png")
    status, headers, body = send(rig, "GET", "/uploads/photo.png")
    assert (status, body, headers["content-type"]) == (200, page, "image/png")
    assert "content-security-policy" not in headers, "an image is shown as it is"
    assert headers.get("x-content-type-options") == "nosniff", "and never sniffed into a page"
    status, headers, _ = send(rig, "GET", "/uploads/photo.png?response-content-type=text%2Fhtml")
    assert status == 200 and headers.get("content-security-policy") == "sandbox"


# -- SigV4 ------------------------------------------------------------------------------------------------------


def test_a_presigned_put_cannot_be_turned_into_a_copy(rig: Rig) -> None:
    """A presigned PUT handed to someone (an upload form) must not copy what its signer may read."""
    url = urlsplit(admin_s3(rig).generate_presigned_url("put_object", Params={"Bucket": "uploads", "Key": "form"}))
    target = f"{url.path}?{url.query}"
    status, _, body = send(rig, "PUT", target, {"x-amz-copy-source": "secret/s.txt"})
    assert (status, error_code(body)) == (403, "AccessDenied"), body
    assert not (rig.root / "uploads" / "form").exists()
    status, _, body = send(rig, "PUT", target, {"x-amz-meta-owner": "mallory"}, b"x")
    assert (status, error_code(body)) == (403, "AccessDenied"), body
    status, _, body = send(rig, "PUT", target, {}, b"an upload")
    assert status == 200, body
    assert (rig.root / "uploads" / "form").read_bytes() == b"an upload"


def test_a_signed_query_means_what_was_signed(rig: Rig) -> None:
    """A signature over `prefix=a%2Bb` (the prefix `a+b`) must not hold for `prefix=a+b`, which reads `a b`."""
    (rig.root / "uploads" / "a b-listed").write_bytes(b"x")
    path = "/uploads?list-type=2&prefix=a%2Bb"
    headers = signed(rig, "GET", path, "s3", {"x-amz-content-sha256": EMPTY_SHA256})
    status, _, body = send(rig, "GET", path, headers)
    assert status == 200 and b"<KeyCount>0</KeyCount>" in body, body
    status, _, body = send(rig, "GET", path.replace("%2B", "+"), headers)
    assert (status, error_code(body)) == (403, "SignatureDoesNotMatch"), body


# -- requests without credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/secret/s.txt", b""),
        ("GET", "/2015-03-31/functions/", b""),
        ("POST", "/2015-03-31/functions/corsy/invocations", b'{"x":"="}'),  # what a text/plain form can post
    ],
)
def test_a_web_page_cannot_use_the_apis_without_credentials(rig: Rig, method: str, path: str, body: bytes) -> None:
    """Programs on this machine may use the APIs unsigned on loopback; a page in a browser here may not: another
    site's form (its `Origin`), or a site's own name resolving to 127.0.0.1 (DNS rebinding: its `Host`)."""
    port = urlsplit(rig.url).port
    for headers in [{"Origin": "https://evil.example"}, {"Origin": "null"}, {"Host": f"rebound.example:{port}"}]:
        status, _, answer = send(rig, method, path, headers, body)
        assert status == 403, (headers, answer)
        assert b"from a web page" in answer
    for headers in [{}, {"Origin": rig.url}, {"Host": f"localhost:{port}"}]:
        status, _, answer = send(rig, method, path, headers, body)
        assert status == 200, (headers, answer)


def as_user(uid: int, rig: Rig, request: bytes) -> bytes:
    """The raw answer to `request` sent by a process of user `uid` (forked from this one, then setuid)."""
    where = urlsplit(rig.url)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: raw sockets only, then gone without running anything of the parent's
        status = 1
        try:
            os.close(read)
            os.setgid(uid)
            os.setuid(uid)
            with socket.create_connection((where.hostname or "", where.port or 0), timeout=30) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            os.write(write, answer)
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            return pipe.read()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.skipif(not peers.AVAILABLE or os.geteuid() != 0, reason="needs root (to become another user) on Linux")
def test_another_user_on_this_machine_must_sign(rig: Rig) -> None:
    """A worker running as its own user (root's eventfn starts them as nobody) could drop its role's keys and go
    unsigned: only the service's own user may. Signed, the other user is whoever its keys say."""
    host = urlsplit(rig.url).netloc
    head = f"GET /secret/s.txt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    answer = as_user(65534, rig, (head + "\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 403 ") and b"from a process of uid 65534" in answer, answer[:400]
    keys = signed(rig, "GET", "/secret/s.txt", "s3", {"x-amz-content-sha256": EMPTY_SHA256})
    lines = "".join(f"{name}: {value}\r\n" for name, value in keys.items())
    answer = as_user(65534, rig, (head + lines + "\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(SECRET), answer[:400]
    assert send(rig, "GET", "/secret/s.txt")[::2] == (200, SECRET), "the service's own user goes unsigned"


def test_function_urls_still_serve_web_pages(rig: Rig) -> None:
    status, _, body = send(rig, "GET", "/fn/corsy/", {"Origin": "https://evil.example", "Host": "app.example"})
    assert (status, json.loads(body)) == (200, {"ok": True})


# -- function URLs ----------------------------------------------------------------------------------------------


def test_an_aws_iam_url_wants_a_signature_on_loopback_too(rig: Rig) -> None:
    status, _, body = send(rig, "GET", "/fn/iam/")
    assert (status, body) == (403, b'{"Message":"Forbidden"}')
    status, _, body = send(rig, "GET", "/fn/iam/", signed(rig, "GET", "/fn/iam/", "lambda"))
    assert status == 200, body
    assert json.loads(body) == {"caller": ACCESS_KEY}


@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
def test_cors_credentials_go_to_named_origins_only(rig: Rig, method: str) -> None:
    preflight = {"Access-Control-Request-Method": "GET"} if method == "OPTIONS" else {}
    status, headers, _ = send(rig, method, "/fn/corsy/", {"Origin": "https://evil.example", **preflight})
    assert status == 200
    assert headers.get("access-control-allow-origin") == "*", "any origin, but not by its name"
    assert "access-control-allow-credentials" not in headers, "no page of any origin acts with a visitor's cookies"
    status, headers, _ = send(rig, method, "/fn/corsy/", {"Origin": "https://app.example", **preflight})
    assert status == 200
    assert headers.get("access-control-allow-origin") == "https://app.example"
    assert headers.get("access-control-allow-credentials") == "true"


def test_nothing_here_leaks_into_the_log(rig: Rig) -> None:
    admin = json.loads((Path(rig.service.data_dir) / "auth" / "http.json").read_text())
    text = rig.service.log.text()
    assert SECRET_KEY not in text and admin["SecretAccessKey"] not in text
