"""AWS's own clients against one `eventfn serve`, used as their users use them: the aws CLI's `s3 sync`, `s3 cp
--recursive`, `s3api` and `lambda` commands; boto3's paginators, waiters and resources; s3transfer's ranged downloads;
presigned URLs fetched with urllib. Each test is something a user of those tools would notice if it broke."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.s3_rig import AWS, Rig, running

pytestmark = pytest.mark.e2e


#: Answers with the event it got.
ECHO = """
    def handler(event, context):
        return {"statusCode": 200, "body": __import__("json").dumps(event)}
"""


BOOM = """
    def handler(event, context):
        raise KeyError("no such order")
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running(tmp_path_factory.mktemp("awsclients"), {"echo": ECHO, "boom": BOOM}, buckets=("files",)) as found:
        yield found


def aws(rig: Rig, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = rig.aws_env()
    if config is not None:
        env["AWS_CONFIG_FILE"] = str(config)
    return subprocess.run(
        [AWS, "--endpoint-url", rig.url, "--cli-read-timeout", "10", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_aws_s3_cp_recursive_uploads_an_empty_file_and_the_next_on_one_connection(rig: Rig, tmp_path: Path) -> None:
    # The aws CLI's botocore takes the final answer to a zero-length PUT sent with `Expect: 100-continue` for the
    # answer to its Expect, and reads its status line again as the next request's on that connection: the next
    # upload then waits for an answer it already had, until its read timeout.
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "a-empty.txt").write_bytes(b"")
    (folder / "b.txt").write_text("bee")
    (folder / "c.txt").write_text("sea")
    config = tmp_path / "one-at-a-time"
    config.write_text("[default]\ns3 =\n  max_concurrent_requests = 1\n")  # one connection, files in order
    up = aws(rig, "s3", "cp", "--recursive", "--only-show-errors", str(folder), "s3://files/tree/", config=config)
    assert up.returncode == 0, up.stderr
    stored = rig.root / "files" / "tree"
    assert {p.name: p.read_bytes() for p in stored.iterdir()} == {"a-empty.txt": b"", "b.txt": b"bee", "c.txt": b"sea"}


def test_presigned_urls_from_a_default_boto3_client_are_fetched_with_urllib(rig: Rig) -> None:
    # boto3 presigns S3 URLs with Signature Version 2 unless told `signature_version="s3v4"`: both kinds work.
    (rig.root / "files" / "shared").mkdir()
    (rig.root / "files" / "shared" / "report 1+1.txt").write_bytes(b"the report")
    legacy, v4 = rig.client(), rig.client(signature_version="s3v4")
    for client in (legacy, v4):
        params = {"Bucket": "files", "Key": "shared/report 1+1.txt", "ResponseContentType": "text/x-report"}
        url = client.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
        with urllib.request.urlopen(url, timeout=30) as answer:
            assert (answer.read(), answer.headers["Content-Type"]) == (b"the report", "text/x-report")
        params = {"Bucket": "files", "Key": "shared/upload.txt", "ContentType": "text/plain"}
        url = client.generate_presigned_url("put_object", Params=params, ExpiresIn=60)
        put = urllib.request.Request(url, data=b"put by url", method="PUT", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(put, timeout=30) as answer:
            assert answer.status == 200
        assert (rig.root / "files" / "shared" / "upload.txt").read_bytes() == b"put by url"
        (rig.root / "files" / "shared" / "upload.txt").unlink()
    # Signature Version 2 moves the headers it signs into the URL: S3 takes them as the request's.
    params = {"Bucket": "files", "Key": "shared/meta.txt", "ContentType": "text/csv", "Metadata": {"owner": "ana"}}
    url = legacy.generate_presigned_url("put_object", Params=params, ExpiresIn=60)
    put = urllib.request.Request(url, data=b"a,b", method="PUT", headers={"Content-Type": "text/csv"})
    with urllib.request.urlopen(put, timeout=30) as answer:
        assert answer.status == 200
    head = legacy.head_object(Bucket="files", Key="shared/meta.txt")
    assert (head["ContentType"], head["Metadata"]) == ("text/csv", {"owner": "ana"})
    url = legacy.generate_presigned_url("get_object", Params={"Bucket": "files", "Key": "shared/report 1+1.txt"})
    assert "AWSAccessKeyId=" in url
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url.replace("shared/report", "shared/other"), timeout=30)
    assert refused.value.code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in refused.value.read()


def test_a_function_url_event_has_the_forwarding_headers_lambdas_front_end_adds(rig: Rig) -> None:
    # Mangum (FastAPI, Starlette) takes the scheme from x-forwarded-proto, "https" if it is missing, and the port
    # from x-forwarded-port; a real function URL event always has them, with x-forwarded-for and x-amzn-trace-id.
    port = urlsplit(rig.url).port
    status, _, body = rig.raw("GET", "/fn/echo/items?x=1")
    assert status == 200, body
    headers = json.loads(body)["headers"]
    assert (headers["x-forwarded-for"], headers["x-forwarded-proto"], headers["x-forwarded-port"]) == (
        "127.0.0.1",
        "http",
        str(port),
    )
    assert re.fullmatch(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24}", headers["x-amzn-trace-id"])
    # What a client or a proxy in front already said is kept; the client's address is appended to the chain.
    sent = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "X-Amzn-Trace-Id": "Root=1-abc-def"}
    _, _, body = rig.raw("GET", "/fn/echo/", headers=sent)
    headers = json.loads(body)["headers"]
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert (headers["x-forwarded-proto"], headers["x-amzn-trace-id"]) == ("https", "Root=1-abc-def")


def test_aws_lambda_invoke_log_tail_of_a_failed_function_shows_the_error_and_traceback(
    rig: Rig, tmp_path: Path
) -> None:
    # As Lambda's Python runtime logs it: what `--log-type Tail` is asked for to see why an invocation failed (and
    # what a function URL's 502 leaves in the service's log).
    out = tmp_path / "out.json"
    done = aws(rig, "lambda", "invoke", "--function-name", "boom", "--log-type", "Tail", str(out))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["FunctionError"] == "Unhandled"
    assert json.loads(out.read_text())["errorType"] == "KeyError"
    tail = base64.b64decode(answer["LogResult"]).decode().splitlines()
    error = tail.index("[ERROR] KeyError: 'no such order'")
    assert tail[error + 1] == "Traceback (most recent call last):"
    assert tail[error + 2].startswith('  File "') and tail[error + 2].endswith(", in handler")
    assert tail[error + 3] == '    raise KeyError("no such order")'
    assert tail[0].startswith("START RequestId:") and tail[-1].startswith("REPORT RequestId:")


def test_a_multipart_object_read_by_parts_as_clients_do_comes_back_whole(rig: Rig) -> None:
    # Clients that download by part numbers (the CRT, the Go transfer manager) ask for part 1, read PartsCount,
    # then fetch parts 2..PartsCount: the count must be that of the parts served (here the whole object is part 1).
    s3 = rig.client()
    data = bytes(range(256)) * (24 * 1024)  # 6 MB: two parts of 5 MB and 1 MB
    upload = s3.create_multipart_upload(Bucket="files", Key="parts.bin")["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), 5 * 1024 * 1024), start=1):
        chunk = data[start : start + 5 * 1024 * 1024]
        etag = s3.upload_part(Bucket="files", Key="parts.bin", UploadId=upload, PartNumber=number, Body=chunk)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    s3.complete_multipart_upload(Bucket="files", Key="parts.bin", UploadId=upload, MultipartUpload={"Parts": parts})
    first = s3.get_object(Bucket="files", Key="parts.bin", PartNumber=1)
    body = first["Body"].read()
    for number in range(2, first["PartsCount"] + 1):
        body += s3.get_object(Bucket="files", Key="parts.bin", PartNumber=number)["Body"].read()
    assert body == data
    assert "PartsCount" not in s3.head_object(Bucket="files", Key="parts.bin"), "S3 says it only when asked by part"


def test_a_function_url_event_has_utf8_header_values_as_text(rig: Rig) -> None:
    # The server reads header bytes as latin-1; a UTF-8 name in a header must reach the handler as the sender wrote
    # it, not as mojibake ("JosÃ©"); bytes that are not UTF-8 still arrive, one character each.
    where = urlsplit(rig.url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(
            b"GET /fn/echo/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Name: Jos\xc3\xa9\r\n"
            b"X-Latin: caf\xe9\r\nCookie: who=Jos\xc3\xa9\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    event = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert (event["headers"]["x-name"], event["headers"]["x-latin"]) == ("José", "café")
    assert event["cookies"] == ["who=José"]
