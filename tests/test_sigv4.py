"""SigV4 verification against botocore's own signer: requests signed by `SigV4Auth`, `S3SigV4Auth` and presigned
URLs (`S3SigV4QueryAuth`, boto3's `generate_presigned_url`) are taken, over real HTTP from real boto3 clients and
as requests built from botocore's signed ones; tampered ones are refused with AWS's error code."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import boto3
import botocore.config
import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from eventfn.config import FunctionSettings, HttpSettings, Permissions
from eventfn.fronts.http import sigv4
from eventfn.fronts.http.app import HttpApp
from eventfn.fronts.http.auth import Authenticator
from eventfn.fronts.http.roles import EVERYTHING, Anyone, Principal
from eventfn.fronts.http.server import HttpServer
from eventfn.web import Body, BodyMismatch, BodyTooLarge, Caller, Request, Response

KEY = "AKIAEVENTFNTEST00001"
SECRET = "eventfn-test-secret-key"
REGION = "us-east-1"
#: Keys S3 takes that botocore encodes in the path (spaces, unicode, `+`, `~`, `=`, `&`, dot segments, `//`).
ODD_KEYS = [
    "plain.txt",
    "with space.txt",
    "ünïcödé/ключ 鍵.bin",
    "a+b=c&d;e,f.txt",
    "tilde~/x!'()*$@:",
    "dots/./and/../twice//slash",
    "%41 percent-looking",
]


def settings(**overrides: Any) -> HttpSettings:
    return HttpSettings(**{"host": "127.0.0.1", "port": 0, "access_keys": {KEY: SECRET}, **overrides})


@pytest.fixture
def auth(tmp_path: Path) -> Authenticator:
    return Authenticator(settings(require_auth=True), tmp_path / "data")


# -- a real server with fronts that say who called --------------------------------------------------------------


class Recorder:
    """A front answering in its API's error format: the caller's problem as AWS's error, else a success that
    boto3 parses (the body as read, and `caller` in a header)."""

    def __init__(self, service: str, prefix: str) -> None:
        self.service = service
        self.prefix = prefix
        self.callers: list[Caller] = []

    def claims(self, request: Request) -> bool:
        return request.path.startswith(self.prefix)

    async def handle(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        self.callers.append(caller)
        if caller.problem is not None:
            return self.error(403, *caller.problem)
        try:
            body = await request.read()
        except BodyMismatch as exc:
            return self.error(400, exc.code, str(exc))
        headers = [("x-caller", caller.name)]
        if self.service == "s3":
            if request.method == "GET" and request.query.startswith("list-type=2"):
                xml = b'<?xml version="1.0"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>'
                return Response(200, [*headers, ("Content-Type", "application/xml")], xml)
            return Response(200, [*headers, ("ETag", '"0"')], body if request.method == "GET" else b"")
        return Response(200, [*headers, ("Content-Type", "application/json")], json.dumps({"n": len(body)}).encode())

    def error(self, status: int, code: str, message: str) -> Response:
        if self.service == "s3":
            xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            return Response(status, [("Content-Type", "application/xml")], xml.encode())
        body = json.dumps({"message": message}).encode()
        return Response(status, [("Content-Type", "application/json"), ("x-amzn-ErrorType", code)], body)


class Rig:
    def __init__(self, url: str, auth: Authenticator, lam: Recorder, s3: Recorder) -> None:
        self.url = url
        self.auth = auth
        self.lam = lam
        self.s3 = s3

    def client(
        self,
        service: str,
        key: str = KEY,
        secret: str = SECRET,
        token: str | None = None,
        signature_version: str | None = None,
    ) -> Any:
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            aws_session_token=token,
            config=botocore.config.Config(
                retries={"max_attempts": 1}, s3={"addressing_style": "path"}, signature_version=signature_version
            ),
        )


@contextlib.asynccontextmanager
async def serving(auth: Authenticator) -> AsyncIterator[Rig]:
    lam, s3 = Recorder("lambda", "/2015-03-31/"), Recorder("s3", "/")
    server = HttpServer(auth.settings, HttpApp([lam, s3], auth))
    listener = await server.bind()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.run, listener)
        try:
            yield Rig(server.url, auth, lam, s3)
        finally:
            server.stop()


async def in_thread(call: Callable[[], Any]) -> Any:
    return await anyio.to_thread.run_sync(call)


# -- botocore's requests, as the server receives them ----------------------------------------------------------


def as_request(signed: AWSRequest) -> Request:
    """What the server makes of botocore's signed request: the raw path and query, lower-cased headers."""
    parts = urlsplit(signed.url)
    body = signed.body or b""
    if isinstance(body, str):
        body = body.encode()
    headers = [(n.lower(), v if isinstance(v, str) else v.decode()) for n, v in signed.headers.items()]
    if "Host" not in signed.headers:  # what the HTTP client adds, and botocore signed
        headers.append(("host", parts.netloc))
    return Request(
        method=signed.method,
        path=parts.path or "/",
        query=parts.query,
        headers=headers,
        client="127.0.0.1",
        body=Body.of(body),
    )


def sign(
    method: str,
    url: str,
    *,
    service: str = "lambda",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    key: str = KEY,
    secret: str = SECRET,
    token: str | None = None,
    presign: int | None = None,
) -> Request:
    aws = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    credentials = Credentials(key, secret, token)
    signer: SigV4Auth
    if presign is not None:
        signer = (S3SigV4QueryAuth if service == "s3" else SigV4QueryAuth)(
            credentials, service, REGION, expires=presign
        )
    else:
        signer = (S3SigV4Auth if service == "s3" else SigV4Auth)(credentials, service, REGION)
    signer.add_auth(aws)
    return as_request(aws)


def refused(caller: Caller) -> str:
    assert caller.problem is not None, f"accepted as {caller.name}"
    return caller.problem[0]


def tampered(request: Request, **changes: Any) -> Request:
    fields = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": list(request.headers),
        "client": request.client,
        "body": None,
    }
    fields.update(changes)
    return Request(**fields)


URL = "http://127.0.0.1:8080"


async def body_of(request: Request) -> bytes:
    return await request.read()


# -- taken ------------------------------------------------------------------------------------------------------


async def test_boto3_lambda_calls_are_taken_over_http(auth: Authenticator) -> None:
    async with serving(auth) as rig:
        client = rig.client("lambda")
        payload = '{"k": "v é"}'.encode()
        answer = await in_thread(lambda: client.invoke(FunctionName="notify", Payload=payload))
        assert json.loads(answer["Payload"].read()) == {"n": len(payload)}
        await in_thread(lambda: client.invoke(FunctionName="notify", Qualifier="prod", Payload=b"{}"))
        await in_thread(lambda: client.invoke(FunctionName="arn:aws:lambda:us-east-1:000000000000:function:x:1"))
        await in_thread(lambda: client.list_functions(MaxItems=5, Marker="a b+c~d/é"))
        await in_thread(lambda: client.get_function(FunctionName="notify:$LATEST"))
    assert [c.name for c in rig.lam.callers] == [KEY] * 5
    assert all(c.problem is None for c in rig.lam.callers)


async def test_boto3_s3_calls_with_odd_keys_are_taken_over_http(auth: Authenticator) -> None:
    async with serving(auth) as rig:
        s3 = rig.client("s3")
        for key in ODD_KEYS:
            await in_thread(lambda key=key: s3.put_object(Bucket="uploads", Key=key, Body=b"data of " + key.encode()))
            got = await in_thread(lambda key=key: s3.get_object(Bucket="uploads", Key=key))
            assert got["ResponseMetadata"]["HTTPHeaders"]["x-caller"] == KEY
        # Metadata with runs of spaces: signed trimmed, as the server trims it.
        await in_thread(lambda: s3.put_object(Bucket="uploads", Key="m", Body=b"x", Metadata={"note": "a   b  c"}))
        await in_thread(lambda: s3.list_objects_v2(Bucket="uploads", Prefix="with space/é+", Delimiter="/"))
        await in_thread(lambda: s3.delete_object(Bucket="uploads", Key="a+b=c&d;e,f.txt"))
    assert len(rig.s3.callers) == 2 * len(ODD_KEYS) + 3
    assert all(c.problem is None and c.name == KEY for c in rig.s3.callers), [c.problem for c in rig.s3.callers]


async def test_presigned_urls_are_taken_until_they_expire(auth: Authenticator) -> None:
    async with serving(auth) as rig:
        s3 = rig.client("s3", signature_version="s3v4")
        for key in ODD_KEYS:
            url = s3.generate_presigned_url("get_object", Params={"Bucket": "uploads", "Key": key}, ExpiresIn=60)
            with await in_thread(lambda url=url: urllib.request.urlopen(url, timeout=10)) as answer:
                assert answer.headers["x-caller"] == KEY
        put = s3.generate_presigned_url("put_object", Params={"Bucket": "uploads", "Key": "up load"}, ExpiresIn=60)
        request = urllib.request.Request(put, data=b"unsigned payload", method="PUT")
        with await in_thread(lambda: urllib.request.urlopen(request, timeout=10)) as answer:
            assert answer.headers["x-caller"] == KEY
        expired = s3.generate_presigned_url("get_object", Params={"Bucket": "uploads", "Key": "k"}, ExpiresIn=60)
        rig.auth.clock = lambda: time.time() + 61
        with pytest.raises(urllib.error.HTTPError) as failed:
            await in_thread(lambda: urllib.request.urlopen(expired, timeout=10))
        assert failed.value.code == 403
        assert b"<Code>AccessDenied</Code>" in failed.value.read()
        problem = rig.s3.callers[-1].problem
        assert problem is not None and problem[0] == "AccessDenied" and "Request has expired" in problem[1]
        # botocore presigns with Signature Version 2 unless told otherwise: taken as S3 takes it, until it expires.
        rig.auth.clock = time.time
        legacy_client = rig.client("s3")
        for key in ODD_KEYS:
            legacy = legacy_client.generate_presigned_url("get_object", Params={"Bucket": "uploads", "Key": key})
            assert "AWSAccessKeyId=" in legacy
            with await in_thread(lambda url=legacy: urllib.request.urlopen(url, timeout=10)) as answer:
                assert answer.headers["x-caller"] == KEY
        legacy = legacy_client.generate_presigned_url("get_object", Params={"Bucket": "uploads", "Key": "k"})
        with pytest.raises(urllib.error.HTTPError) as failed:
            await in_thread(lambda: urllib.request.urlopen(legacy.replace("Signature=", "Signature=A"), timeout=10))
        assert b"<Code>SignatureDoesNotMatch</Code>" in failed.value.read()
        rig.auth.clock = lambda: time.time() + 3601
        with pytest.raises(urllib.error.HTTPError) as failed:
            await in_thread(lambda: urllib.request.urlopen(legacy, timeout=10))
        assert b"<Code>AccessDenied</Code>" in failed.value.read()
        assert "Request has expired" in rig.s3.callers[-1].problem[1]  # type: ignore[index]


async def test_the_aws_cli_is_taken_with_the_right_keys_and_refused_with_wrong_ones(
    auth: Authenticator, tmp_path: Path
) -> None:
    aws = str(Path(sys.executable).parent / "aws")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_MAX_ATTEMPTS": "1",
    }
    body = tmp_path / "body.bin"
    body.write_bytes(bytes(range(256)) * 64)
    async with serving(auth) as rig:
        put = [aws, "--endpoint-url", rig.url, "s3api", "put-object", "--bucket", "uploads", "--key", "odd key+é~"]
        done = await anyio.run_process([*put, "--body", str(body)], env=env, check=False)
        assert done.returncode == 0, done.stderr.decode()
        wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        refused = await anyio.run_process(
            [aws, "--endpoint-url", rig.url, "lambda", "list-functions"], env=wrong, check=False
        )
        assert refused.returncode != 0 and b"InvalidSignatureException" in refused.stderr, refused.stderr
    assert [c.name for c in rig.s3.callers] == [KEY]
    assert [c.problem[0] for c in rig.lam.callers if c.problem] == ["InvalidSignatureException"]


# -- refused over HTTP, with the code each API uses ---------------------------------------------------------------

WRONG: list[tuple[str, dict[str, Any], str, str]] = [
    ("wrong secret", {"secret": "not-the-secret"}, "InvalidSignatureException", "SignatureDoesNotMatch"),
    ("unknown key", {"key": "AKIAUNKNOWN000000000"}, "UnrecognizedClientException", "InvalidAccessKeyId"),
    ("a token with a plain key", {"token": "some-token"}, "UnrecognizedClientException", "InvalidToken"),
    ("a stale role's key", {"key": "ASIAGONE000000000000", "token": "t"}, "ExpiredTokenException", "ExpiredToken"),
]


@pytest.mark.parametrize(("case", "credentials", "lambda_code", "s3_code"), WRONG, ids=[w[0] for w in WRONG])
async def test_boto3_with_wrong_credentials_gets_aws_error(
    auth: Authenticator, case: str, credentials: dict[str, Any], lambda_code: str, s3_code: str
) -> None:
    async with serving(auth) as rig:
        lam, s3 = rig.client("lambda", **credentials), rig.client("s3", **credentials)
        with pytest.raises(ClientError) as failed:
            await in_thread(lambda: lam.invoke(FunctionName="notify", Payload=b"{}"))
        assert failed.value.response["Error"]["Code"] == lambda_code
        with pytest.raises(ClientError) as failed:
            await in_thread(lambda: s3.put_object(Bucket="b", Key="with space", Body=b"x"))
        assert failed.value.response["Error"]["Code"] == s3_code


async def test_a_role_must_send_its_own_token(auth: Authenticator) -> None:
    role = auth.environment("fn", FunctionSettings(permissions=Permissions(invoke=["*"])))
    key, secret, token = role["AWS_ACCESS_KEY_ID"], role["AWS_SECRET_ACCESS_KEY"], role["AWS_SESSION_TOKEN"]
    async with serving(auth) as rig:
        await in_thread(lambda: rig.client("lambda", key, secret, token).invoke(FunctionName="notify"))
        assert rig.lam.callers[-1].name == "role/fn"
        for wrong in (None, token[:-4] + "AAAA"):
            with pytest.raises(ClientError) as failed:
                await in_thread(lambda wrong=wrong: rig.client("lambda", key, secret, wrong).invoke(FunctionName="n"))
            assert failed.value.response["Error"]["Code"] == "UnrecognizedClientException"
            with pytest.raises(ClientError) as failed:
                await in_thread(lambda wrong=wrong: rig.client("s3", key, secret, wrong).list_buckets())
            assert failed.value.response["Error"]["Code"] == "InvalidToken"


# -- tampered: botocore's signed requests, changed on the way --------------------------------------------------


async def test_a_changed_body_is_refused(auth: Authenticator) -> None:
    url = f"{URL}/2015-03-31/functions/notify/invocations"
    request = sign("POST", url, body=b'{"amount": 1}')
    assert (await auth.caller(request)).name == KEY
    assert await request.read() == b'{"amount": 1}', "the front reads the body the signature check read"
    changed = tampered(request, body=Body.of(b'{"amount": 1000}'))
    assert refused(await auth.caller(changed)) == "InvalidSignatureException"
    # S3 signs the body by its SHA-256 in x-amz-content-sha256: checked where the front's read ends.
    put = sign("PUT", f"{URL}/uploads/k", service="s3", body=b"original")
    assert (await auth.caller(put)).name == KEY
    assert await put.read() == b"original"
    changed = tampered(put, body=Body.of(b"replaced"))
    assert (await auth.caller(changed)).name == KEY
    with pytest.raises(BodyMismatch):
        await changed.read()
    streamed = tampered(put, body=Body.of(b"replaced"))
    await auth.caller(streamed)
    with pytest.raises(BodyMismatch):
        async for _ in streamed.chunks(1 << 20):
            pass


@pytest.mark.parametrize("service", ["lambda", "s3"])
async def test_a_changed_header_path_or_query_is_refused(auth: Authenticator, service: str) -> None:
    code = "SignatureDoesNotMatch" if service == "s3" else "InvalidSignatureException"
    path = "/uploads/some%20key" if service == "s3" else "/2015-03-31/functions/notify/invocations"
    request = sign("PUT", f"{URL}{path}?x=1&y=a%20b", service=service, headers={"X-Amz-Meta-Who": "me"}, body=b"{}")
    assert (await auth.caller(request)).problem is None
    headers = [(n, "someone else" if n == "x-amz-meta-who" else v) for n, v in request.headers]
    assert refused(await auth.caller(tampered(request, headers=headers, body=Body.of(b"{}")))) == code
    other = path.replace("some", "other").replace("notify", "billing")
    assert refused(await auth.caller(tampered(request, path=other, body=Body.of(b"{}")))) == code
    assert refused(await auth.caller(tampered(request, query="x=2&y=a%20b", body=Body.of(b"{}")))) == code
    assert refused(await auth.caller(tampered(request, method="POST", body=Body.of(b"{}")))) == code
    host = [(n, "elsewhere:80" if n == "host" else v) for n, v in request.headers]
    assert refused(await auth.caller(tampered(request, headers=host, body=Body.of(b"{}")))) == code
    # A header of AWS's own that was not signed (one a proxy could add: a copy source, an ACL) is refused too.
    added = [*request.headers, ("x-amz-copy-source", "/secrets/key")]
    problem = refused(await auth.caller(tampered(request, headers=added, body=Body.of(b"{}"))))
    assert problem == ("AccessDenied" if service == "s3" else "InvalidSignatureException")


async def test_a_skewed_clock_is_refused(auth: Authenticator) -> None:
    request = sign("GET", f"{URL}/2015-03-31/functions/")
    s3 = sign("GET", f"{URL}/uploads?list-type=2", service="s3")
    for offset in (16 * 60, -16 * 60):
        auth.clock = lambda offset=offset: time.time() + offset
        assert refused(await auth.caller(request)) == "InvalidSignatureException"
        assert refused(await auth.caller(s3)) == "RequestTimeTooSkewed"
    auth.clock = lambda: time.time() + 14 * 60
    assert (await auth.caller(request)).problem is None


async def test_a_presigned_url_is_refused_once_expired_or_before_its_time(auth: Authenticator) -> None:
    request = sign("GET", f"{URL}/uploads/a%20b", service="s3", presign=100)
    assert (await auth.caller(request)).name == KEY
    auth.clock = lambda: time.time() + 101
    problem = (await auth.caller(request)).problem
    assert problem is not None and problem[0] == "AccessDenied" and "expired" in problem[1]
    auth.clock = lambda: time.time() - 16 * 60
    assert refused(await auth.caller(request)) == "RequestTimeTooSkewed"
    # A presigned Lambda request hashes its (empty) body like any other.
    auth.clock = time.time
    assert (await auth.caller(sign("GET", f"{URL}/2015-03-31/functions/", presign=60))).name == KEY
    assert refused(await auth.caller(tampered(request, path="/uploads/x"))) == "SignatureDoesNotMatch"
    longer = tampered(request, query=request.query.replace("X-Amz-Expires=100", "X-Amz-Expires=100000"))
    assert refused(await auth.caller(longer)) == "SignatureDoesNotMatch"


@pytest.mark.parametrize(
    ("authorization", "why"),
    [
        ("AWS4-HMAC-SHA256 Credential=AKIAEVENTFNTEST00001/20260101/us-east-1/lambda/aws4_request", "lacks"),
        ("AWS AKIAEVENTFNTEST00001:c2lnbmF0dXJl", "only AWS4-HMAC-SHA256"),
        ("AWS4-HMAC-SHA256 Credential=AKIA/x/aws4_request, SignedHeaders=host, Signature=" + "0" * 64, "Credential"),
        (
            "AWS4-HMAC-SHA256 Credential=AKIAEVENTFNTEST00001/20260101/us-east-1/lambda/aws4_request, "
            "SignedHeaders=x-amz-date, Signature=" + "0" * 64,
            "host",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=AKIAEVENTFNTEST00001/20260101/us-east-1/lambda/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=XYZ",
            "hex",
        ),
    ],
)
async def test_a_malformed_signature_is_refused_with_why(auth: Authenticator, authorization: str, why: str) -> None:
    request = Request(
        method="GET",
        path="/2015-03-31/functions/",
        query="",
        headers=[("host", "h"), ("x-amz-date", "20260101T000000Z"), ("authorization", authorization)],
        client="127.0.0.1",
    )
    caller = await auth.caller(request)
    assert caller.problem is not None and caller.problem[0] == "IncompleteSignatureException"
    assert why in caller.problem[1]
    s3 = tampered(request, path="/uploads/k")
    problem = (await auth.caller(s3)).problem
    assert problem is not None and problem[0] == "AuthorizationHeaderMalformed"


async def test_a_date_other_than_the_credentials_day_is_refused(auth: Authenticator) -> None:
    request = sign("GET", f"{URL}/2015-03-31/functions/")
    headers = [(n, "20000101T000000Z" if n == "x-amz-date" else v) for n, v in request.headers]
    caller = await auth.caller(tampered(request, headers=headers))
    assert caller.problem is not None and "day" in caller.problem[1]


# -- without credentials, and the body limit --------------------------------------------------------------------


async def test_without_credentials_where_required_the_error_is_the_apis(auth: Authenticator) -> None:
    lam = Request(method="GET", path="/2015-03-31/functions/", query="", headers=[], client="10.0.0.1")
    assert refused(await auth.caller(lam)) == "MissingAuthenticationTokenException"
    s3 = Request(method="GET", path="/uploads", query="list-type=2", headers=[], client="10.0.0.1")
    assert refused(await auth.caller(s3)) == "AccessDenied"
    # Another scheme in Authorization (a function URL's bearer token) is not AWS credentials.
    bearer = tampered(lam, headers=[("authorization", "Bearer abc")])
    assert refused(await auth.caller(bearer)) == "MissingAuthenticationTokenException"


async def test_on_loopback_no_credentials_is_anyone_but_bad_ones_are_still_refused(tmp_path: Path) -> None:
    auth = Authenticator(settings(), tmp_path / "data")  # require_auth unset, host loopback
    assert not auth.required
    lam = Request(method="GET", path="/2015-03-31/functions/", query="", headers=[], client="127.0.0.1")
    assert isinstance(await auth.caller(lam), Anyone)
    bad = sign("GET", f"{URL}/2015-03-31/functions/", secret="wrong")
    assert refused(await auth.caller(bad)) == "InvalidSignatureException"
    assert Authenticator(settings(host="0.0.0.0"), tmp_path / "data").required
    assert not Authenticator(settings(host="0.0.0.0", require_auth=False), tmp_path / "data").required


async def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    auth = Authenticator(settings(max_body=1024, require_auth=True), tmp_path / "data")
    request = sign("POST", f"{URL}/2015-03-31/functions/f/invocations", body=b"x" * 2048)
    with pytest.raises(BodyTooLarge):
        await auth.caller(request)


# -- the pieces -------------------------------------------------------------------------------------------------


def test_signing_key_is_awss_documented_one_and_cached() -> None:
    # AWS's SigV4 documentation: deriving the signing key (secret, 20120215, us-east-1, iam).
    verifier = sigv4.Verifier()
    key = verifier.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
    assert verifier.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam") is key


async def test_repeated_and_spaced_header_values_sign_as_botocore_signs_them(auth: Authenticator) -> None:
    aws = AWSRequest(method="GET", url=f"{URL}/2015-03-31/functions/", headers={"X-Amz-Meta-Note": "  a   b  c "})
    SigV4Auth(Credentials(KEY, SECRET), "lambda", REGION).add_auth(aws)
    request = as_request(aws)
    assert (await auth.caller(request)).name == KEY
    trimmed = [(n, v.strip() if n == "x-amz-meta-note" else v) for n, v in request.headers]
    assert (await auth.caller(tampered(request, headers=trimmed))).name == KEY, "servers trim; the signature holds"


async def test_a_sigv4_spelling_of_the_same_request_is_taken(auth: Authenticator) -> None:
    # botocore leaves `~` as it is in a path and a query; SigV4 lets a client send `%7E` and sign its decoded
    # spelling (`~`): both name the same key, and both are taken. A different key is not.
    request = sign("GET", f"{URL}/uploads/x~y?prefix=a~b", service="s3")
    assert (await auth.caller(request)).name == KEY
    assert (await auth.caller(tampered(request, path="/uploads/x%7Ey", query="prefix=a%7Eb"))).name == KEY
    assert refused(await auth.caller(tampered(request, path="/uploads/x%7Ez"))) == "SignatureDoesNotMatch"


def test_no_secret_in_a_principals_repr() -> None:
    principal = Principal("role/fn", "ASIAX", "the-secret", EVERYTHING, "tok")
    assert "the-secret" not in repr(principal) and "tok" not in repr(principal)


@pytest.fixture(autouse=True)
def _no_machine_aws_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield


#: What the server can hand over: header values and queries are decoded as latin-1.
_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)


@settings_(max_examples=300, deadline=None)
@given(
    authorization=st.one_of(
        _TEXT.map(lambda t: "AWS4-HMAC-SHA256 " + t),
        st.builds(
            lambda k, d, r, s, h, sig: (
                f"AWS4-HMAC-SHA256 Credential={k}/{d}/{r}/{s}/aws4_request, SignedHeaders={h}, Signature={sig}"
            ),
            _TEXT,
            st.sampled_from(["20260101", "2026010", "99999999", "00000000"]),
            _TEXT,
            st.sampled_from(["s3", "lambda", ""]),
            st.sampled_from(["host", "host;x-amz-date", ";", "host;;date"]),
            st.sampled_from(["0" * 64, "a" * 63, "Z" * 64]),
        ),
        _TEXT,
    ),
    date=st.one_of(st.none(), _TEXT, st.sampled_from(["20260101T000000Z", "99991399T256161Z", "2026010aT000000Z"])),
    http_date=st.one_of(st.none(), _TEXT, st.just("Mon, 01 Jan 99999999 00:00:00 GMT")),
    query=st.one_of(
        _TEXT,
        st.builds(
            lambda e, c, t: (
                f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={c}&X-Amz-Date={t}&X-Amz-Expires={e}"
                f"&X-Amz-SignedHeaders=host&X-Amz-Signature={'0' * 64}"
            ),
            st.sampled_from(["1", "0", "²", "999999999", "-1"]),
            _TEXT,
            _TEXT,
        ),
    ),
)
def test_no_credentials_however_malformed_break_the_check(
    hostile: Authenticator, authorization: str, date: str | None, http_date: str | None, query: str
) -> None:
    auth = hostile
    headers = [("host", "h"), ("authorization", authorization)]
    headers += [("x-amz-date", date)] if date is not None else []
    headers += [("date", http_date)] if http_date is not None else []
    for request in (
        Request(method="GET", path="/uploads/k", query="", headers=headers, client="c"),
        Request(method="GET", path="/2015-03-31/functions/", query=query, headers=[("host", "h")], client="c"),
    ):
        caller = anyio.run(auth.caller, request)
        assert caller.problem is not None


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Authenticator:
    return Authenticator(settings(require_auth=True), tmp_path_factory.mktemp("hostile"))
