"""Lambda's Invoke API end to end: one `eventfn serve`, driven by boto3's `lambda` client with `endpoint_url` and by
the real `aws` CLI with `--endpoint-url`, as a user would; plus the API's refusals for a caller the authenticator
turned away or a policy does not allow, with a caller of the test's own."""

from __future__ import annotations

import base64
import gc
import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from eventfn.config import HttpSettings
from eventfn.fronts.http.lambda_api import LambdaApi
from eventfn.invoke.functions import Functions
from eventfn.invoke.invocation import Execution, Outcome
from eventfn.invoke.registry import FunctionSource
from eventfn.invoke.reports import LogTail
from eventfn.invoke.slots import Slots
from eventfn.testing import Serve, write_handler
from eventfn.web import Body, Request

KEY_ID, SECRET = "AKIAEVENTFNTEST00001", "eventfn-test-secret-key"
#: The service's body limit here (small, so that an oversized payload costs the test little).
MAX_BODY = 64 * 1024

CONFIG = f"""
[http]
max_body = {MAX_BODY}

[http.access_keys]
{KEY_ID} = "{SECRET}"
"""

ECHO = """
    # /// eventfn
    # description = "echoes its event"
    # timeout = 7
    # memory = 256
    # environment = { GREETING = "hello" }
    # ///
    def handler(event, context):
        print("hello from echo", event.get("marker"))
        custom = context.client_context.custom if context.client_context else None
        return {"event": event, "custom": custom, "request_id": context.aws_request_id}
"""

BOOM = """
    def handler(event, context):
        print("about to fail")
        raise ValueError("boom")
"""

# Writes more than the 4 KB tail, in two-byte characters: the tail must start at a character.
CHATTY = """
    def handler(event, context):
        for i in range(200):
            print(f"{i:03d} " + "é" * 40)
        return "done"
"""

# In the service's process: its output reaches the tail by another way than a worker's.
INPROCESS = """
    # /// eventfn
    # isolation = "inprocess"
    # ///
    def handler(event, context):
        print("hello from inprocess", event.get("marker"))
        return event
"""

# A folder function: its code is the folder.
FOLDER_MAIN = """
def handler(event, context):
    return "from a folder"
"""


ALL = ["boom", "chatty", "echo", "folder", "inprocess"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    root = tmp_path_factory.mktemp("lambda_api")
    handlers = root / "handlers"
    handlers.mkdir()
    write_handler(handlers, "echo", ECHO)
    write_handler(handlers, "boom", BOOM)
    write_handler(handlers, "chatty", CHATTY)
    write_handler(handlers, "inprocess", INPROCESS)
    (handlers / "folder").mkdir()
    (handlers / "folder" / "lambda_function.py").write_text(FOLDER_MAIN)
    (root / "eventfn.toml").write_text(CONFIG)
    env = {"EVENTFN_SECRET_NOT_FOR_FUNCTIONS": "do-not-show"}
    with Serve(handlers, None, root / "data", extra_args=["--config", str(root / "eventfn.toml")], env=env) as serve:
        for name in ("echo", "boom", "chatty", "folder", "inprocess"):
            serve.log.wait_for(rf"function {name} loaded")
        yield serve


@pytest.fixture(scope="module")
def client(service: Serve) -> Iterator[Any]:
    client = boto3.client(
        "lambda",
        endpoint_url=service.http_url,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, read_timeout=30),
    )
    yield client
    client.close()  # its pooled keep-alive sockets, closed here rather than at garbage collection (a ResourceWarning)


def _code(call: Any, *args: Any, **kwargs: Any) -> tuple[str, int, str]:
    """The error code, HTTP status and message of a call that must fail."""
    with pytest.raises(ClientError) as info:
        call(*args, **kwargs)
    response = info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Message"]


# -- Invoke with boto3 ----------------------------------------------------------------------------------------------


def test_invoke_returns_the_result_with_lambdas_headers(client: Any) -> None:
    context = base64.b64encode(json.dumps({"custom": {"tenant": "t-1"}}).encode()).decode()
    reply = client.invoke(FunctionName="echo", Payload=b'{"marker": "sync"}', ClientContext=context)
    assert reply["StatusCode"] == 200
    assert reply["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in reply and "LogResult" not in reply
    body = json.loads(reply["Payload"].read())
    assert body["event"] == {"marker": "sync"}
    assert body["custom"] == {"tenant": "t-1"}
    assert body["request_id"] == reply["ResponseMetadata"]["RequestId"]


@pytest.mark.parametrize(
    ("function", "report"),
    [("echo", r"Memory Size: 256 MB\tMax Memory Used: \d+ MB\t"), ("inprocess", r"Memory Size: 128 MB\t")],
)
def test_log_tail_is_start_the_output_end_and_report(client: Any, function: str, report: str) -> None:
    reply = client.invoke(FunctionName=function, Payload=b'{"marker": "tail"}', LogType="Tail")
    request_id = reply["ResponseMetadata"]["RequestId"]
    lines = base64.b64decode(reply["LogResult"]).decode().splitlines()
    assert lines[0] == f"START RequestId: {request_id} Version: $LATEST"
    assert lines[1] == f"hello from {function} tail"  # printed text as Lambda's log has it: no tags
    assert lines[2] == f"END RequestId: {request_id}"
    assert re.fullmatch(
        rf"REPORT RequestId: {request_id}\tDuration: [\d.]+ ms\tBilled Duration: \d+ ms\t{report}", lines[3]
    ), lines[3]
    assert len(lines) == 4
    assert "LogResult" not in client.invoke(FunctionName=function, Payload=b"{}")  # only when asked


def test_a_log_tail_keeps_the_last_bytes_from_the_start_of_a_character() -> None:
    execution = Execution(outcome=Outcome(ok=True, payload=b"null"), duration_ms=1.0)
    printed = b"[fn] 2026-11-30T04:31:14.000Z\treq-1\t" + "€€€".encode() + b"\n[fn] [WARNING]\tlogged\n"

    def tail(size: int) -> bytes:
        log = LogTail(size=size)
        log.output(printed)
        return log.finish("r", 128, execution)

    whole = tail(1 << 20)
    assert whole.decode().splitlines()[:3] == ["€€€", "[WARNING]\tlogged", "END RequestId: r"]  # untagged
    for cut in range(1, 9):  # inside the three 3-byte characters
        kept = tail(len(whole) - cut)
        assert kept == whole[-len(kept) :] and len(whole) - len(kept) == -(-cut // 3) * 3, cut
        kept.decode()


def test_log_tail_is_the_last_4_kb_cut_at_a_character(client: Any) -> None:
    reply = client.invoke(FunctionName="chatty", LogType="Tail")
    assert json.loads(reply["Payload"].read()) == "done"
    tail = base64.b64decode(reply["LogResult"])
    assert 4000 < len(tail) <= 4096
    text = tail.decode("utf-8")  # a cut inside a two-byte character would not decode
    assert "START RequestId" not in text  # the start is past the last 4 KB
    assert text.splitlines()[-3].startswith("199 é")
    assert text.splitlines()[-1].startswith("REPORT RequestId: ")


def test_a_function_error_is_200_with_unhandled_and_lambdas_error_object(client: Any) -> None:
    reply = client.invoke(FunctionName="boom", LogType="Tail")
    assert reply["StatusCode"] == 200
    assert reply["FunctionError"] == "Unhandled"
    error = json.loads(reply["Payload"].read())
    assert error["errorType"] == "ValueError" and error["errorMessage"] == "boom"
    assert "about to fail" in base64.b64decode(reply["LogResult"]).decode()


def test_an_event_invocation_is_stored_answered_202_and_then_run(client: Any, service: Serve) -> None:
    mark = service.log.mark()
    reply = client.invoke(FunctionName="echo", InvocationType="Event", Payload=b'{"marker": "queued-1"}')
    assert reply["StatusCode"] == 202
    assert reply["Payload"].read() == b""
    service.log.wait_for(r"hello from echo queued-1", start=mark, timeout=30)


def test_dry_run_is_204_and_runs_nothing(client: Any) -> None:
    reply = client.invoke(FunctionName="echo", InvocationType="DryRun", Payload=b'{"marker": "dry"}')
    assert reply["StatusCode"] == 204


def test_an_unknown_function_is_resource_not_found_for_every_operation(client: Any) -> None:
    for invocation_type in ("RequestResponse", "Event", "DryRun"):
        with pytest.raises(client.exceptions.ResourceNotFoundException) as info:
            client.invoke(FunctionName="nope", InvocationType=invocation_type, Payload=b"{}")
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        assert "arn:aws:lambda:us-east-1:000000000000:function:nope" in info.value.response["Error"]["Message"]
    assert _code(client.get_function, FunctionName="nope")[:2] == ("ResourceNotFoundException", 404)
    assert _code(client.get_function_configuration, FunctionName="nope")[:2] == ("ResourceNotFoundException", 404)


def test_an_oversized_payload_is_request_too_large(service: Serve) -> None:
    client = boto3.client(
        "lambda",
        endpoint_url=service.http_url,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, read_timeout=30),
    )
    payload = json.dumps({"pad": "x" * MAX_BODY}).encode()
    try:
        code, status, message = _code(client.invoke, FunctionName="echo", Payload=payload)
        assert (code, status) == ("RequestTooLargeException", 413)
        assert str(MAX_BODY) in message
        with pytest.raises(client.exceptions.RequestTooLargeException):
            client.invoke(FunctionName="echo", InvocationType="Event", Payload=payload)
    finally:
        client.close()
        # The server answers 413 before the body is read and closes the connection; when that lands while the
        # client is still sending, urllib3 drops the connection without closing its socket, which the garbage
        # collector then reports as a ResourceWarning in whatever test runs at the time. Collected here, on purpose.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def test_a_payload_that_is_not_json_is_invalid_request_content(client: Any) -> None:
    code, status, message = _code(client.invoke, FunctionName="echo", Payload=b'{"marker": ')
    assert (code, status) == ("InvalidRequestContentException", 400)
    assert "Could not parse request body into json" in message
    not_an_object = base64.b64encode(b"[1]").decode()
    code, status, message = _code(client.invoke, FunctionName="echo", Payload=b"{}", ClientContext=not_an_object)
    assert (code, status) == ("InvalidRequestContentException", 400)
    assert "not an object" in message


def test_qualifiers_in_the_name_in_arns_and_as_a_parameter(client: Any, service: Serve) -> None:
    version = service.log.wait_for(r"function echo loaded \(version (\w+)").group(1)
    arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"
    for name, qualifier, executed in [
        ("echo:$LATEST", None, "$LATEST"),
        (arn, None, "$LATEST"),
        (f"{arn}:$LATEST", None, "$LATEST"),
        ("000000000000:function:echo", None, "$LATEST"),
        ("echo", "$LATEST", "$LATEST"),
        (f"echo:{version}", None, version),
        ("echo", version, version),
        (f"{arn}:{version}", version, version),
    ]:
        options = {"Qualifier": qualifier} if qualifier else {}
        reply = client.invoke(FunctionName=name, Payload=b'{"marker": "q"}', **options)
        assert (reply["StatusCode"], reply["ExecutedVersion"]) == (200, executed), name
    for name, options in [
        ("echo:7", {}),
        ("echo", {"Qualifier": "live"}),
        ("arn:aws:lambda:eu-west-1:000000000000:function:echo", {}),
        ("111111111111:function:echo", {}),
    ]:
        assert _code(client.invoke, FunctionName=name, Payload=b"{}", **options)[:2] == (
            "ResourceNotFoundException",
            404,
        ), name
    code, status, _ = _code(client.invoke, FunctionName="echo:$LATEST", Qualifier=version, Payload=b"{}")
    assert (code, status) == ("InvalidParameterValueException", 400)
    code, status, _ = _code(client.invoke, FunctionName="echo", Qualifier="no/such", Payload=b"{}")
    assert (code, status) == ("ValidationException", 400)
    config = client.get_function_configuration(FunctionName="echo", Qualifier=version)
    assert (config["Version"], config["FunctionArn"]) == (version, f"{arn}:{version}")


# -- ListFunctions, GetFunction, GetFunctionConfiguration -----------------------------------------------------------


def test_list_functions_pages_with_a_marker(client: Any) -> None:
    first = client.list_functions(MaxItems=3)
    assert [f["FunctionName"] for f in first["Functions"]] == ["boom", "chatty", "echo"]
    rest = client.list_functions(MaxItems=3, Marker=first["NextMarker"])
    assert [f["FunctionName"] for f in rest["Functions"]] == ["folder", "inprocess"]
    assert "NextMarker" not in rest
    pages = client.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 2})
    assert [f["FunctionName"] for page in pages for f in page["Functions"]] == ALL
    assert _code(client.list_functions, Marker="", MaxItems=10001)[:2] == ("InvalidParameterValueException", 400)


def test_a_functions_configuration_has_the_fields_lambdas_clients_read(client: Any, service: Serve) -> None:
    config = client.get_function_configuration(FunctionName="echo")
    del config["ResponseMetadata"]
    echo_file = Path(service.args[service.args.index("--handlers") + 1]) / "echo.py"
    assert config["FunctionName"] == "echo"
    assert config["FunctionArn"] == "arn:aws:lambda:us-east-1:000000000000:function:echo"
    assert config["Runtime"] == f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert config["Role"] == "arn:aws:iam::000000000000:role/eventfn-echo"
    assert config["Handler"] == "echo.handler"
    assert config["Description"] == "echoes its event"
    assert (config["Timeout"], config["MemorySize"]) == (7, 256)
    assert config["Version"] == "$LATEST"
    assert config["Environment"] == {"Variables": {"GREETING": "hello"}}  # its own: nothing of the service's
    assert (config["State"], config["LastUpdateStatus"]) == ("Active", "Successful")
    assert config["PackageType"] == "Zip" and config["Architectures"][0] in ("x86_64", "arm64")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", config["LastModified"])
    assert config["CodeSize"] == echo_file.stat().st_size
    assert len(base64.b64decode(config["CodeSha256"])) == 32
    whole = client.get_function(FunctionName="echo")
    assert whole["Configuration"] == config
    assert whole["Code"] == {"RepositoryType": "S3", "Location": echo_file.resolve().as_uri()}
    assert whole["Concurrency"] == {"ReservedConcurrentExecutions": 10}
    folder = client.get_function(FunctionName="folder")
    assert folder["Configuration"]["Handler"] == "lambda_function.handler"
    assert folder["Code"]["Location"] == (echo_file.parent / "folder").resolve().as_uri()
    assert "Environment" not in folder["Configuration"]


# -- the aws CLI ----------------------------------------------------------------------------------------------------


def test_the_aws_cli_invokes_lists_and_describes(service: Serve, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_MAX_ATTEMPTS": "1",
    }
    aws = [str(Path(sys.executable).parent / "aws"), "lambda", "--endpoint-url", service.http_url]
    # `fileb://`: the payload's bytes as they are, with the CLI's version 1 and 2 alike.
    payloads = {"cli": {"marker": "cli"}, "queued": {"marker": "cli-queued"}, "big": {"pad": "x" * MAX_BODY}}
    for name, payload in payloads.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    commands = {
        "tail": [*aws, "invoke", "--function-name", "echo", "--payload", f"fileb://{tmp_path}/cli.json",
                 "--log-type", "Tail", "--query", "LogResult", "--output", "text", str(tmp_path / "tail.out")],
        "event": [*aws, "invoke", "--function-name", "echo", "--invocation-type", "Event",
                  "--payload", f"fileb://{tmp_path}/queued.json", str(tmp_path / "event.out")],
        "dry": [*aws, "invoke", "--function-name", "echo", "--invocation-type", "DryRun", str(tmp_path / "dry.out")],
        "error": [*aws, "invoke", "--function-name", "boom", str(tmp_path / "error.out")],
        "unknown": [*aws, "invoke", "--function-name", "nope", str(tmp_path / "unknown.out")],
        "large": [*aws, "invoke", "--function-name", "echo", "--payload", f"fileb://{tmp_path}/big.json",
                  str(tmp_path / "large.out")],
        "list": [*aws, "list-functions"],
        "get": [*aws, "get-function", "--function-name", "echo"],
    }  # fmt: skip
    mark = service.log.mark()
    # Started together: each start of the CLI costs a second or so of imports.
    running = {k: subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for k, c in commands.items()}  # fmt: skip
    done = {k: (p.communicate(timeout=60), p.returncode) for k, p in running.items()}
    out = {k: stdout for k, ((stdout, _), _) in done.items()}
    err = {k: stderr for k, ((_, stderr), _) in done.items()}
    code = {k: rc for k, (_, rc) in done.items()}

    assert code["tail"] == 0, err["tail"]
    log = base64.b64decode(out["tail"].strip()).decode()
    assert log.startswith("START RequestId: ") and "\nhello from echo cli\n" in log and "\nREPORT RequestId: " in log
    assert json.loads((tmp_path / "tail.out").read_text())["event"] == {"marker": "cli"}

    assert code["event"] == 0, err["event"]
    assert json.loads(out["event"])["StatusCode"] == 202
    service.log.wait_for(r"hello from echo cli-queued", start=mark, timeout=30)

    assert code["dry"] == 0, err["dry"]
    assert json.loads(out["dry"])["StatusCode"] == 204

    assert code["error"] == 0, err["error"]  # a function error is a successful call, as with Lambda
    assert json.loads(out["error"]) == {"StatusCode": 200, "FunctionError": "Unhandled", "ExecutedVersion": "$LATEST"}
    assert json.loads((tmp_path / "error.out").read_text())["errorType"] == "ValueError"

    assert code["unknown"] != 0
    assert "ResourceNotFoundException" in err["unknown"] and "function:nope" in err["unknown"]

    assert code["large"] != 0
    assert "RequestTooLargeException" in err["large"], err["large"]

    assert code["list"] == 0, err["list"]
    listed = json.loads(out["list"])["Functions"]
    assert [f["FunctionName"] for f in listed] == ALL

    assert code["get"] == 0, err["get"]
    assert json.loads(out["get"])["Configuration"]["FunctionArn"].endswith(":function:echo")


# -- refusals: a caller turned away, a caller not allowed -----------------------------------------------------------


class _Caller:
    """A caller as the authenticator gives one: a problem with its credentials, or a policy."""

    def __init__(self, problem: tuple[str, str] | None = None, allowed: set[tuple[str, str]] | None = None) -> None:
        self.name = "AKIAOTHER"
        self.problem = problem
        self.allowed = allowed or set()

    def allows(self, action: str, resource: str) -> bool:
        return (action, resource) in self.allowed


def _api(tmp_path: Path) -> LambdaApi:
    entry = tmp_path / "echo.py"
    entry.write_text("def handler(event, context):\n    return event\n")
    functions = Functions(Slots(1))
    source = FunctionSource(
        name="echo",
        task_root=str(tmp_path),
        module="echo",
        entry_file=str(entry),
        attribute=None,
        version="v1",
        settings=None,
    )
    functions.add(source)
    return LambdaApi(functions, None, HttpSettings())  # type: ignore[arg-type]  # never reached: refused first


def _request(method: str, path: str, body: bytes = b"") -> Request:
    return Request(method=method, path=path, query="", headers=[], client="127.0.0.1", body=Body.of(body))


def _error(response: Any) -> tuple[int, str, str]:
    headers = dict(response.headers)
    return response.status, headers["x-amzn-ErrorType"], json.loads(response.body)["Message"]


async def test_a_caller_the_authenticator_refused_gets_403_with_its_code(tmp_path: Path) -> None:
    api = _api(tmp_path)
    caller = _Caller(problem=("InvalidSignatureException", "The request signature we calculated does not match"))
    for request in (
        _request("POST", "/2015-03-31/functions/echo/invocations", b"{}"),
        _request("GET", "/2015-03-31/functions/"),
        _request("GET", "/2015-03-31/functions/echo"),
    ):
        status, code, message = _error(await api.handle(request, caller))
        assert (status, code) == (403, "InvalidSignatureException")
        assert "signature" in message


async def test_a_caller_without_permission_gets_access_denied(tmp_path: Path) -> None:
    api = _api(tmp_path)
    caller = _Caller(allowed={("lambda:GetFunction", "other")})
    for method, path, action in [
        ("POST", "/2015-03-31/functions/echo/invocations", "lambda:InvokeFunction"),
        ("GET", "/2015-03-31/functions/", "lambda:ListFunctions"),
        ("GET", "/2015-03-31/functions/echo", "lambda:GetFunction"),
        ("GET", "/2015-03-31/functions/echo/configuration", "lambda:GetFunction"),
    ]:
        status, code, message = _error(await api.handle(_request(method, path), caller))
        assert (status, code) == (403, "AccessDeniedException"), path
        assert f"not authorized to perform: {action}" in message
    # Denied before existence is checked: a caller cannot learn which functions exist.
    status, code, _ = _error(await api.handle(_request("GET", "/2015-03-31/functions/secret-fn"), caller))
    assert (status, code) == (403, "AccessDeniedException")
    with anyio.fail_after(5):
        allowed = _Caller(allowed={("lambda:GetFunction", "echo")})
        response = await api.handle(_request("GET", "/2015-03-31/functions/echo"), allowed)
    assert response.status == 200
    assert json.loads(response.body)["Configuration"]["FunctionName"] == "echo"
