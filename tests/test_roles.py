"""Execution roles and the HTTP APIs' principals: policies (globs, the defaults from bucket triggers, invoke), the
admin key file, `[http] access_keys` with `env:NAME` secrets, roles made per function and per start; a denial
through `HttpApp` with a small front; and `eventfn serve` end to end: unmodified boto3 code in a handler uses its
role (no endpoint, no keys in the code), its keys stay out of the log and `eventfn functions`, and rotate on restart.

The parts that need the Lambda API or the S3 API skip while those answer 501 / are absent (they are built beside
this one); the denial through `HttpApp` stands in for them meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import stat
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import boto3
import botocore.config
import nats
import pytest
from botocore.exceptions import ClientError

from eventfn.config import FunctionSettings, HttpSettings, Permissions
from eventfn.errors import ConfigError
from eventfn.fronts.http.app import HttpApp
from eventfn.fronts.http.auth import Authenticator
from eventfn.fronts.http.roles import Policy, admin_file, function_name, role_policy
from eventfn.fronts.http.server import HttpServer
from eventfn.testing import Serve, wait_until, write_handler
from eventfn.web import Caller, Request, Response
from tests.test_sigv4 import KEY, REGION, SECRET, Recorder, sign

URL = "http://127.0.0.1:8080"


def http(**overrides: Any) -> HttpSettings:
    return HttpSettings(**{"port": 0, "access_keys": {KEY: SECRET}, "require_auth": True, **overrides})


@pytest.fixture(autouse=True)
def _no_machine_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# -- policies ---------------------------------------------------------------------------------------------------


def test_s3_patterns_are_bucket_and_key_globs() -> None:
    policy = Policy(s3_read=["uploads/*", "docs/2026/??.txt", "whole"], s3_write=["thumbs/small/*"])
    assert policy.allows("s3:GetObject", "uploads/a/b/c.jpg"), "`*` spans `/`, as IAM's does"
    assert policy.allows("s3:HeadObject", "uploads/x")
    assert policy.allows("s3:GetObject", "docs/2026/ab.txt")
    assert not policy.allows("s3:GetObject", "docs/2026/abc.txt")
    assert policy.allows("s3:GetObject", "whole/any/key"), "a bucket alone is all of it"
    assert not policy.allows("s3:GetObject", "uploadsX/a"), "the bucket is matched whole"
    assert not policy.allows("s3:PutObject", "uploads/a"), "reading is not writing"
    assert policy.allows("s3:PutObject", "thumbs/small/a.png")
    assert policy.allows("s3:DeleteObject", "thumbs/small/a.png")
    assert not policy.allows("s3:GetObject", "thumbs/small/a.png"), "writing is not reading"
    assert not policy.allows("s3:PutObject", "thumbs/large/a.png")
    assert policy.allows("s3:ListBucket", "uploads") and policy.allows("s3:ListBucket", "docs")
    assert not policy.allows("s3:ListBucket", "thumbs"), "listing comes with reading"
    assert not policy.allows("s3:ListAllMyBuckets", "")
    assert Policy(s3_read=["*"]).allows("s3:ListAllMyBuckets", "")
    assert not policy.allows("s3:GetObject", "uploads"), "an object action needs a key"
    assert not Policy(s3_read=["a[b]/*"]).allows("s3:GetObject", "ab/k"), "only * and ? are wildcards"
    assert Policy(s3_read=["a[b]/*"]).allows("s3:GetObject", "a[b]/k")


def test_invoke_patterns_match_names_whatever_the_spelling() -> None:
    policy = Policy(invoke=["notify", "report-*"])
    for name in ("notify", "notify:prod", "notify:$LATEST", "arn:aws:lambda:us-east-1:000000000000:function:notify:1"):
        assert policy.allows("lambda:InvokeFunction", name), name
    assert policy.allows("lambda:InvokeFunctionUrl", "report-daily")
    assert not policy.allows("lambda:InvokeFunction", "notify2")
    assert not policy.allows("lambda:InvokeFunction", "billing")
    for action in ("lambda:GetFunction", "lambda:GetFunctionConfiguration", "lambda:ListFunctions"):
        assert not policy.allows(action, "notify"), "describing shows the environment: access keys only"
    assert not policy.allows("s3:GetObject", "notify/x")
    assert not policy.allows("lambda:DeleteFunction", "notify"), "an action not granted is denied"
    assert function_name("arn:aws:lambda:r:1:function:f") == "f"


def test_a_role_reads_the_buckets_its_triggers_name_and_nothing_else_by_default() -> None:
    settings = FunctionSettings(
        triggers=[
            {"type": "bucket", "bucket": "uploads", "prefix": "in/"},
            "events.orders",
            {"type": "schedule", "name": "tick", "schedule": "rate(1 minute)"},
        ]
    )
    policy = role_policy(settings)
    assert policy.allows("s3:GetObject", "uploads/in/a.jpg")
    assert policy.allows("s3:GetObject", "uploads/elsewhere.jpg"), "the whole bucket its trigger names"
    assert policy.allows("s3:ListBucket", "uploads")
    assert not policy.allows("s3:PutObject", "uploads/a.jpg")
    assert not policy.allows("s3:GetObject", "thumbs/a.jpg")
    assert not policy.allows("lambda:InvokeFunction", "anything")
    assert not policy.allows("s3:ListAllMyBuckets", "")
    nothing = role_policy(FunctionSettings())
    assert not any(
        nothing.allows(a, r)
        for a, r in [("s3:GetObject", "uploads/a"), ("lambda:InvokeFunction", "f"), ("s3:ListBucket", "uploads")]
    )


def test_permissions_add_to_the_defaults() -> None:
    settings = FunctionSettings(
        triggers=[{"type": "bucket", "bucket": "uploads"}],
        permissions=Permissions(s3_read=["shared/*"], s3_write=["thumbs/*"], invoke=["notify"]),
    )
    policy = role_policy(settings)
    assert policy.allows("s3:GetObject", "uploads/a") and policy.allows("s3:GetObject", "shared/a")
    assert policy.allows("s3:PutObject", "thumbs/a.png") and not policy.allows("s3:PutObject", "private/a")
    assert policy.allows("lambda:InvokeFunction", "notify") and not policy.allows("lambda:InvokeFunction", "billing")


# -- keys and roles ---------------------------------------------------------------------------------------------


def test_roles_are_made_per_function_kept_for_the_run_and_new_at_each_start(tmp_path: Path) -> None:
    auth = Authenticator(http(), tmp_path)
    settings = FunctionSettings()
    first = auth.environment("resize", settings)
    assert set(first) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert first["AWS_ACCESS_KEY_ID"].startswith("ASIA") and len(first["AWS_ACCESS_KEY_ID"]) == 20
    assert len(first["AWS_SECRET_ACCESS_KEY"]) == 40 and len(first["AWS_SESSION_TOKEN"]) >= 100
    assert auth.environment("resize", settings) == first, "a reload keeps the role (old workers still hold it)"
    other = auth.environment("notify", settings)
    assert not set(other.values()) & set(first.values()), "each function its own"
    restarted = Authenticator(http(), tmp_path)
    assert not set(restarted.environment("resize", settings).values()) & set(first.values()), "rotated"


async def test_a_reload_takes_the_serving_settings_and_drops_the_roles_of_functions_gone(tmp_path: Path) -> None:
    auth = Authenticator(http(), tmp_path)
    env = auth.environment("fn", FunctionSettings())
    key, secret, token = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_SESSION_TOKEN"]
    request = sign("GET", f"{URL}/2015-03-31/functions/", key=key, secret=secret, token=token)
    caller = await auth.caller(request)
    assert caller.name == "role/fn" and not caller.allows("lambda:InvokeFunction", "notify")
    auth.update({"fn": FunctionSettings(permissions=Permissions(invoke=["notify"]))})
    assert caller.allows("lambda:InvokeFunction", "notify"), "the policy of the version now serving"
    auth.update({"fn": None})  # no version serves it any more
    again = sign("GET", f"{URL}/2015-03-31/functions/", key=key, secret=secret, token=token)
    problem = (await auth.caller(again)).problem
    assert problem is not None and problem[0] == "ExpiredTokenException"


def test_the_admin_key_is_made_once_private_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        Authenticator(http(), tmp_path / "data")
    path = admin_file(tmp_path / "data")
    kept = json.loads(path.read_text())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert kept["AccessKeyId"].startswith("AKIA") and len(kept["SecretAccessKey"]) == 40
    assert str(path) in caplog.text, "its path is said"
    assert kept["SecretAccessKey"] not in caplog.text and kept["AccessKeyId"] not in caplog.text
    Authenticator(http(), tmp_path / "data")
    assert json.loads(path.read_text()) == kept, "the next start keeps it"
    path.write_text("{broken")
    with pytest.raises(ConfigError, match="delete it"):
        Authenticator(http(), tmp_path / "data")


async def test_the_admin_key_file_is_an_aws_credential_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Authenticator(http(), tmp_path / "data")
    config = tmp_path / "aws-config"
    config.write_text(f"[profile eventfn]\ncredential_process = cat {admin_file(tmp_path / 'data')}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    credentials = boto3.Session(profile_name="eventfn").get_credentials()
    assert credentials is not None
    request = sign("GET", f"{URL}/2015-03-31/functions/", key=credentials.access_key, secret=credentials.secret_key)
    caller = await auth.caller(request)
    assert caller.problem is None and caller.allows("lambda:ListFunctions", "") and caller.allows("s3:PutObject", "a/b")


async def test_access_keys_may_read_their_secret_from_the_environment(tmp_path: Path) -> None:
    settings = http(access_keys={KEY: "env:EVENTFN_TEST_SECRET"})
    auth = Authenticator(settings, tmp_path, environ={"EVENTFN_TEST_SECRET": SECRET})
    caller = await auth.caller(sign("GET", f"{URL}/uploads", service="s3"))
    assert caller.name == KEY and caller.allows("s3:DeleteObject", "any/key")
    with pytest.raises(ConfigError) as failed:
        Authenticator(settings, tmp_path, environ={})
    assert "EVENTFN_TEST_SECRET" in str(failed.value) and f"access_keys.{KEY}" in str(failed.value)
    with pytest.raises(ConfigError, match="empty"):
        Authenticator(http(access_keys={KEY: ""}), tmp_path)


def test_no_admin_key_file_with_http_off(tmp_path: Path) -> None:
    Authenticator(http(enabled=False), tmp_path)
    assert not admin_file(tmp_path).exists()


# -- a denial, through HttpApp and a small front, by real boto3 --------------------------------------------------


class Enforcer(Recorder):
    """A front that asks the caller's policy, as the Lambda and S3 APIs do, and answers AWS's AccessDenied."""

    async def handle(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        if caller.problem is None:
            if self.service == "s3":
                bucket_key = request.decoded_path.lstrip("/")
                action = {"GET": "s3:GetObject", "PUT": "s3:PutObject", "DELETE": "s3:DeleteObject"}[request.method]
            else:
                bucket_key = request.decoded_path.split("/")[3]
                action = "lambda:InvokeFunction"
            if not caller.allows(action, bucket_key):
                code = "AccessDenied" if self.service == "s3" else "AccessDeniedException"
                return self.error(403, code, f"{caller.name} is not allowed {action} on {bucket_key}")
        return await super().handle(request, caller)


@contextlib.asynccontextmanager
async def enforced(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A server with enforcing fronts, and the environment of function `resize`'s role."""
    auth = Authenticator(http(host="127.0.0.1"), tmp_path)
    settings = FunctionSettings(
        triggers=[{"type": "bucket", "bucket": "uploads"}],
        permissions=Permissions(s3_write=["thumbs/*"], invoke=["notify"]),
    )
    env = auth.environment("resize", settings)
    server = HttpServer(auth.settings, HttpApp([Enforcer("lambda", "/2015-03-31/"), Enforcer("s3", "/")], auth))
    listener = await server.bind()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.run, listener)
        try:
            yield server.url, env
        finally:
            server.stop()


async def test_a_role_is_refused_what_its_policy_does_not_grant(tmp_path: Path) -> None:
    async with enforced(tmp_path) as (url, env):
        outcomes = await anyio.to_thread.run_sync(lambda: _calls(url, env))
    assert outcomes == ["ok", "AccessDeniedException", "ok", "ok", "AccessDenied", "AccessDenied", "AccessDenied"]


def _calls(url: str, env: dict[str, str]) -> list[str]:
    """What each call of a role's boto3 client gets: `ok`, or AWS's error code."""
    session = boto3.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=env["AWS_SESSION_TOKEN"],
        region_name=REGION,
    )
    options = botocore.config.Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"})
    lam = session.client("lambda", endpoint_url=url, config=options)
    s3 = session.client("s3", endpoint_url=url, config=options)

    outcomes = []
    calls = [
        lambda: lam.invoke(FunctionName="notify", Payload=b"{}"),
        lambda: lam.invoke(FunctionName="billing", Payload=b"{}"),
        lambda: s3.get_object(Bucket="uploads", Key="in/cat.jpg"),
        lambda: s3.put_object(Bucket="thumbs", Key="cat.png", Body=b"png"),
        lambda: s3.put_object(Bucket="private", Key="cat.png", Body=b"png"),
        lambda: s3.put_object(Bucket="uploads", Key="cat.png", Body=b"png"),
        lambda: s3.get_object(Bucket="thumbs", Key="cat.png"),
    ]
    for call in calls:
        try:
            call()
            outcomes.append("ok")
        except ClientError as exc:
            outcomes.append(exc.response["Error"]["Code"])
    return outcomes


# -- end to end: `eventfn serve`, handlers with unmodified boto3 code ---------------------------------------------

WHOAMI = """
    import os

    def handler(event, context):
        return {name: os.environ.get(name) for name in (
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_LAMBDA",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION", "MINE")}
"""
CALLER = """
    # /// eventfn
    # environment = { MINE = "visible" }
    # [permissions]
    # invoke = ["notify*"]
    # ///
    import json, os
    import boto3
    from botocore.exceptions import ClientError

    def handler(event, context):
        seen = {"key": bool(os.environ.get("AWS_ACCESS_KEY_ID")), "token": bool(os.environ.get("AWS_SESSION_TOKEN"))}
        print("credentials set:", seen)
        try:
            answer = boto3.client("lambda").invoke(FunctionName=event["target"], Payload=json.dumps({"from": "caller"}))
            return {**seen, "payload": json.loads(answer["Payload"].read())}
        except ClientError as exc:
            return {**seen, "error": exc.response["Error"]["Code"]}
"""
THUMBNAIL = """
    # /// eventfn
    # triggers = [{ type = "bucket", bucket = "uploads", suffix = ".txt" }]
    # retry = { max_attempts = 0 }
    # [permissions]
    # s3_write = ["thumbs/*"]
    # ///
    import json
    from urllib.parse import unquote_plus
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3")

    def handler(event, context):
        for record in event["Records"]:
            bucket, key = record["s3"]["bucket"]["name"], unquote_plus(record["s3"]["object"]["key"])
            data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            try:
                s3.put_object(Bucket="private", Key=key, Body=data)
                denied = None
            except ClientError as exc:
                denied = exc.response["Error"]["Code"]
            result = {"read": data.decode(), "denied": denied}
            s3.put_object(Bucket="thumbs", Key=key + ".json", Body=json.dumps(result).encode())
"""
NOTIFY = """
    def handler(event, context):
        return {"notified": event}
"""


def _config(root: Path) -> list[str]:
    toml = root / "eventfn.toml"
    toml.write_text(
        textwrap.dedent(
            f"""
            [http.access_keys]
            {KEY} = "{SECRET}"
            AKIAEVENTFNTEST00002 = "env:EVENTFN_TEST_SECOND_SECRET"

            [buckets]
            root = "{root / "buckets"}"
            """
        )
    )
    return ["--config", str(toml)]


class Running:
    def __init__(self, serve: Serve, root: Path) -> None:
        self.serve = serve
        self.root = root

    async def invoke(self, function: str, event: dict[str, Any] | None = None) -> Any:
        nc = await nats.connect(self.serve.url)  # anonymous on loopback may invoke
        try:
            reply = await nc.request(f"eventfn.invoke.{function}", json.dumps(event or {}).encode(), timeout=30)
        finally:
            await nc.close()
        return json.loads(reply.data)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("roles")
    handlers = root / "handlers"
    handlers.mkdir()
    write_handler(handlers, "whoami", WHOAMI)
    write_handler(handlers, "caller", CALLER)
    write_handler(handlers, "notify", NOTIFY)
    write_handler(handlers, "billing", NOTIFY)
    write_handler(handlers, "thumbnail", THUMBNAIL)
    env = {"EVENTFN_TEST_SECOND_SECRET": "second-secret", "AWS_CONFIG_FILE": "/dev/null"}
    with Serve(handlers, None, root / "data", extra_args=_config(root), env=env) as serve:
        yield Running(serve, root)


@pytest.mark.e2e
async def test_each_function_has_its_own_role_in_its_environment(running: Running) -> None:
    whoami = await running.invoke("whoami")
    assert whoami["AWS_ACCESS_KEY_ID"].startswith("ASIA"), whoami
    assert whoami["AWS_SECRET_ACCESS_KEY"] and whoami["AWS_SESSION_TOKEN"]
    assert whoami["AWS_ENDPOINT_URL_LAMBDA"] == running.serve.http_url == whoami["AWS_ENDPOINT_URL_S3"]
    assert whoami["AWS_REGION"] == "us-east-1"
    assert whoami["AWS_ACCESS_KEY_ID"] != KEY and whoami["AWS_SECRET_ACCESS_KEY"] not in (SECRET, "second-secret")
    caller = await running.invoke("caller", {"target": "notify"})
    assert caller["key"] and caller["token"], caller


@pytest.mark.e2e
async def test_role_keys_stay_out_of_the_log_and_eventfn_functions(running: Running) -> None:
    whoami = await running.invoke("whoami")
    await running.invoke("caller", {"target": "notify"})
    listed = await running.serve.acli("functions")
    listed_json = await running.serve.acli("functions", "--json")
    secrets = [
        whoami["AWS_ACCESS_KEY_ID"],
        whoami["AWS_SECRET_ACCESS_KEY"],
        whoami["AWS_SESSION_TOKEN"],
        SECRET,
        "second-secret",
        json.loads(admin_file(running.root / "data").read_text())["SecretAccessKey"],
    ]
    assert "whoami" in listed.stdout
    for secret in secrets:
        assert secret not in running.serve.log.text()
        assert secret not in listed.stdout + listed.stderr + listed_json.stdout + listed_json.stderr
    assert "credentials set: {'key': True, 'token': True}" in running.serve.log.text()


@pytest.fixture
def lambda_api(running: Running) -> Running:
    return running


@pytest.mark.e2e
async def test_unmodified_boto3_invokes_what_its_role_allows_and_no_more(lambda_api: Running) -> None:
    allowed = await lambda_api.invoke("caller", {"target": "notify"})
    assert allowed["payload"] == {"notified": {"from": "caller"}}, allowed
    denied = await lambda_api.invoke("caller", {"target": "billing"})
    assert denied["error"] == "AccessDeniedException", denied


@pytest.mark.e2e
async def test_get_function_shows_the_functions_environment_but_not_its_role(lambda_api: Running) -> None:
    client = boto3.client(
        "lambda",
        endpoint_url=lambda_api.serve.http_url,
        region_name=REGION,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
    )
    whoami = await lambda_api.invoke("whoami")
    described = await anyio.to_thread.run_sync(lambda: client.get_function(FunctionName="caller"))
    variables = described["Configuration"].get("Environment", {}).get("Variables", {})
    assert variables.get("MINE") == "visible"
    text = json.dumps(described, default=str)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(variables)
    assert whoami["AWS_SECRET_ACCESS_KEY"] not in text and whoami["AWS_SESSION_TOKEN"] not in text


@pytest.mark.e2e
async def test_keys_from_the_environment_and_the_admin_file_work_end_to_end(lambda_api: Running) -> None:
    admin = json.loads(admin_file(lambda_api.root / "data").read_text())
    for key, secret in [("AKIAEVENTFNTEST00002", "second-secret"), (admin["AccessKeyId"], admin["SecretAccessKey"])]:
        client = boto3.client(
            "lambda",
            endpoint_url=lambda_api.serve.http_url,
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )
        listed = await anyio.to_thread.run_sync(client.list_functions)
        assert {"caller", "notify"} <= {f["FunctionName"] for f in listed["Functions"]}
    wrong = boto3.client(
        "lambda",
        endpoint_url=lambda_api.serve.http_url,
        region_name=REGION,
        aws_access_key_id=KEY,
        aws_secret_access_key="wrong",
    )
    with pytest.raises(ClientError) as failed:
        await anyio.to_thread.run_sync(wrong.list_functions)
    assert failed.value.response["Error"]["Code"] == "InvalidSignatureException", "refused even on loopback"


@pytest.mark.e2e
async def test_the_classic_thumbnail_journey_with_one_unmodified_handler(running: Running) -> None:
    buckets = running.root / "buckets"
    for bucket in ("thumbs", "private"):  # buckets exist before anything is put in them, as in S3
        (buckets / bucket).mkdir(exist_ok=True)
    (buckets / "uploads" / "cat.txt").write_text("meow")  # 1. a file lands in uploads
    thumb = buckets / "thumbs" / "cat.txt.json"  # 2. read with get_object, 3. written with put_object
    written = await wait_until(lambda: _json(thumb), bool, timeout=30, what=f"{thumb} written by the handler")
    assert written == {"read": "meow", "denied": "AccessDenied"}  # 4. refused a write its policy does not name
    assert not (buckets / "private" / "cat.txt").exists()


async def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # not yet, or not whole yet
        return None


@pytest.mark.e2e
async def test_role_keys_rotate_on_restart(tmp_path: Path) -> None:
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    write_handler(handlers, "whoami", WHOAMI)
    env = {"EVENTFN_TEST_SECOND_SECRET": "second-secret"}
    seen: list[dict[str, Any]] = []
    for _ in range(2):
        async with Serve(handlers, None, tmp_path / "data", extra_args=_config(tmp_path), env=env) as serve:
            seen.append(await Running(serve, tmp_path).invoke("whoami"))
            admin = json.loads(admin_file(tmp_path / "data").read_text())
            if len(seen) == 2:
                old = boto3.client(
                    "lambda",
                    endpoint_url=serve.http_url,
                    region_name=REGION,
                    aws_access_key_id=seen[0]["AWS_ACCESS_KEY_ID"],
                    aws_secret_access_key=seen[0]["AWS_SECRET_ACCESS_KEY"],
                    aws_session_token=seen[0]["AWS_SESSION_TOKEN"],
                )
                with pytest.raises(ClientError) as failed:
                    await anyio.to_thread.run_sync(lambda old=old: old.invoke(FunctionName="whoami"))
                assert failed.value.response["Error"]["Code"] == "ExpiredTokenException"
    first, second = seen
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert first[name] and second[name] and first[name] != second[name], name
    assert json.loads(admin_file(tmp_path / "data").read_text()) == admin, "the admin key is kept"
