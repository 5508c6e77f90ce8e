"""Function URLs and declared routes end to end: real HTTP requests to one `eventfn serve`, plain Lambda handlers
(some built on Powertools, which parses and routes the events itself), and the auth checks without a server.

Handlers append what they saw to a file before they return, so a response that came back proves the file is
complete: a refused request's marker missing from it proves the handler never ran.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from eventfn.config import Cors, FunctionSettings, HttpSettings, UrlSettings
from eventfn.fronts.http import routes
from eventfn.fronts.http.function_urls import FunctionUrls
from eventfn.fronts.http.signatures import is_loopback
from eventfn.fronts.http.url_events import http_response, is_text, query_parameters
from eventfn.invoke.functions import Functions
from eventfn.invoke.registry import FunctionSource
from eventfn.invoke.slots import Slots
from eventfn.testing import Serve, write_handler
from eventfn.web import Body, Request

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
MAX_BODY = 64 * 1024
TOKEN = "s3cret-url-token"

ECHO = """
    # /// eventfn
    # timeout = 5
    # triggers = [
    #   {type = "http", path = "/orders/{id}", methods = ["GET", "PUT"]},
    #   {type = "http", path = "/orders/special", methods = ["GET"]},
    #   {type = "http", path = "/files/{path+}"},
    # ]
    # [environment]
    # SEEN = "SEEN_FILE"
    # [url.cors]
    # allow_origins = ["https://app.example"]
    # allow_methods = ["GET", "POST"]
    # allow_headers = ["x-custom"]
    # expose_headers = ["x-result"]
    # max_age = 300
    # ///
    import json, os

    def handler(event, context):
        with open(os.environ["SEEN"], "a") as f:
            f.write(event["rawQueryString"] + "\\n")
        body = json.dumps({"event": event, "requestId": context.aws_request_id})
        return {"statusCode": 200, "headers": {"content-type": "application/json", "x-result": "yes",
                "access-control-allow-origin": "https://evil.example"}, "body": body}
"""

SHAPES = """
    # /// eventfn
    # timeout = 1
    # ///
    import base64, time

    def handler(event, context):
        shape = (event.get("queryStringParameters") or {}).get("shape")
        if shape == "dict":
            return {"a": 1, "b": [True, None]}
        if shape == "string":
            return "Hello"
        if shape == "none":
            return None
        if shape == "full":
            return {"statusCode": 201, "headers": {"x-one": "1", "x-num": 7, "content-type": "text/plain",
                    "content-length": "999"}, "cookies": ["a=1; Max-Age=60", "b=2; HttpOnly"], "body": "made"}
        if shape == "binary":
            return {"statusCode": 200, "headers": {"content-type": "image/png"}, "isBase64Encoded": True,
                    "body": base64.b64encode(b"\\x89PNG\\x00\\xff").decode()}
        if shape == "empty":
            return {"statusCode": 204}
        if shape == "bad_status":
            return {"statusCode": "200", "body": "x"}
        if shape == "bad_body":
            return {"statusCode": 200, "body": {"not": "a string"}}
        if shape == "raise":
            raise ValueError("the handler failed on purpose")
        if shape == "sleep":
            time.sleep(5)
        return {"statusCode": 400, "body": "unknown shape"}
"""

POWERTOOLS = """
    # /// eventfn
    # timeout = 10
    # triggers = [{type = "http", path = "/api/{proxy+}"}]
    # ///
    from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
    from aws_lambda_powertools.utilities.parser import parse
    from aws_lambda_powertools.utilities.parser.models import APIGatewayProxyEventV2Model, LambdaFunctionUrlModel

    app = APIGatewayHttpResolver()

    @app.get("/orders/<order_id>")
    def get_order(order_id):
        event = app.current_event
        return {"order": order_id, "x": event.get_query_string_value("x"), "cookies": event.cookies,
                "path": event.path, "routeKey": event.route_key}

    @app.get("/api/orders/<order_id>")
    def get_api_order(order_id):
        return {"apiOrder": order_id, "proxy": app.current_event.path_parameters}

    @app.post("/orders")
    def post_order():
        return Response(status_code=201, content_type="application/json", body={"created": app.current_event.json_body},
                        cookies=[])

    def handler(event, context):
        url = parse(event=event, model=LambdaFunctionUrlModel)
        v2 = parse(event=event, model=APIGatewayProxyEventV2Model)
        assert url.requestContext.requestId == context.aws_request_id == v2.requestContext.requestId
        assert url.requestContext.timeEpoch.year >= 2024
        return app.resolve(event, context)
"""

THROTTLED = """
    # /// eventfn
    # concurrency = 0
    # ///
    def handler(event, context):
        return "never"
"""

CLOSED = """
    # /// eventfn
    # [url]
    # enabled = false
    # ///
    def handler(event, context):
        return "never"
"""

GUARDED = """
    # /// eventfn
    # [url]
    # auth = "bearer"
    # secret = "env:URL_TOKEN"
    # [environment]
    # SEEN = "SEEN_FILE"
    # ///
    import os

    def handler(event, context):
        with open(os.environ["SEEN"], "a") as f:
            f.write(event["rawQueryString"] + "\\n")
        return {"ok": True}
"""

UNCONFIGURED = """
    # /// eventfn
    # [url]
    # auth = "bearer"
    # secret = "env:EVENTFN_TEST_NOT_SET"
    # ///
    def handler(event, context):
        return "never"
"""


class Svc:
    def __init__(self, serve: Serve, seen: Path) -> None:
        self.serve = serve
        self.seen = seen
        self.url = urlsplit(serve.http_url)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: list[tuple[str, str]] = ()
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request on a fresh connection: status, headers (in order, repeats kept), body."""
        conn = http.client.HTTPConnection(self.url.hostname or "", self.url.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, _, body = self.request(method, path, **kwargs)
        return status, json.loads(body)

    def seen_lines(self) -> list[str]:
        return self.seen.read_text().splitlines() if self.seen.exists() else []


def header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Svc]:
    root = tmp_path_factory.mktemp("urls")
    handlers = root / "handlers"
    handlers.mkdir()
    seen = root / "seen.txt"
    for name, code in [
        ("echo", ECHO),
        ("shapes", SHAPES),
        ("pt", POWERTOOLS),
        ("throttled", THROTTLED),
        ("closed", CLOSED),
        ("guarded", GUARDED),
        ("unconfigured", UNCONFIGURED),
    ]:
        write_handler(handlers, name, code.replace("SEEN_FILE", str(seen)))
    for example in ["hello", "items"]:  # the shipped examples the README's curl lines call
        shutil.copy(ROOT / "handlers" / f"{example}.py", handlers)
    config = root / "eventfn.toml"
    config.write_text(f"[http]\nmax_body = {MAX_BODY}\n")
    env = {"URL_TOKEN": TOKEN}
    with Serve(handlers, None, root / "data", extra_args=["--config", str(config)], env=env) as serve:
        yield Svc(serve, seen)


# -- the event --------------------------------------------------------------------------------------------------


def test_a_get_becomes_a_function_url_event_with_query_cookies_and_joined_headers(svc: Svc) -> None:
    status, headers, body = svc.request(
        "GET",
        "/fn/echo/a/b%20c?x=1&x=2&name=J%C3%B6rg&flag",
        headers=[
            ("Cookie", "s=1; t=2"),
            ("Cookie", "u=3"),
            ("X-Multi", "one"),
            ("X-Multi", "two"),
            ("User-Agent", "ua/1"),
        ],
    )
    assert status == 200, body
    got = json.loads(body)
    event = got["event"]
    request_id = header(headers, "x-amzn-requestid")[0]
    assert got["requestId"] == event["requestContext"]["requestId"] == request_id
    assert event["version"] == "2.0" and event["routeKey"] == "$default"
    assert event["rawPath"] == "/a/b%20c"  # what the function's own URL would show: /fn/echo is its host
    assert event["rawQueryString"] == "x=1&x=2&name=J%C3%B6rg&flag"
    assert event["queryStringParameters"] == {"x": "1,2", "name": "Jörg", "flag": ""}
    assert event["cookies"] == ["s=1", "t=2", "u=3"]
    assert "cookie" not in event["headers"]
    assert event["headers"]["x-multi"] == "one,two"
    assert event["headers"]["user-agent"] == "ua/1"
    assert "body" not in event and event["isBase64Encoded"] is False
    assert "pathParameters" not in event
    context = event["requestContext"]
    url_id = context["apiId"]
    assert len(url_id) == 32 and url_id == context["domainPrefix"]
    assert context["domainName"] == f"{url_id}.lambda-url.us-east-1.on.aws"
    assert context["accountId"] == "anonymous"  # as Lambda sends it for a URL without IAM auth
    assert context["stage"] == "$default" and context["routeKey"] == "$default"
    assert context["http"] == {
        "method": "GET",
        "path": "/a/b%20c",
        "protocol": "HTTP/1.1",
        "sourceIp": "127.0.0.1",
        "userAgent": "ua/1",
    }
    assert isinstance(context["timeEpoch"], int)
    assert len(context["time"]) == len("30/Nov/2026:04:31:14 +0000") and context["time"].endswith(" +0000")


def test_a_text_body_is_text_and_a_binary_body_base64(svc: Svc) -> None:
    _, got = svc.json("POST", "/fn/echo/", body=b'{"k": "v"}', headers=[("Content-Type", "application/json")])
    assert got["event"]["body"] == '{"k": "v"}' and got["event"]["isBase64Encoded"] is False
    assert got["event"]["requestContext"]["http"]["method"] == "POST"
    binary = b"\x00\x01\xfe\xffbinary"
    _, got = svc.json("PUT", "/fn/echo", body=binary, headers=[("Content-Type", "application/octet-stream")])
    assert got["event"]["isBase64Encoded"] is True
    assert base64.b64decode(got["event"]["body"]) == binary
    assert got["event"]["rawPath"] == "/"
    # Declared text that is not UTF-8 still arrives intact.
    _, got = svc.json("POST", "/fn/echo", body=b"caf\xe9", headers=[("Content-Type", "text/plain; charset=latin-1")])
    assert base64.b64decode(got["event"]["body"]) == b"caf\xe9"


def test_an_oversized_body_gets_413_before_it_is_sent(svc: Svc) -> None:
    with socket.create_connection((svc.url.hostname or "", svc.url.port or 0), timeout=30) as sock:
        sock.sendall(
            b"POST /fn/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (MAX_BODY + 1)
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_the_shipped_examples_answer_curl(svc: Svc) -> None:
    status, got = svc.json("GET", "/fn/hello")
    assert status == 200 and got["message"] == "Hello, world!"
    status, got = svc.json("GET", "/items/42?colour=red")
    assert status == 200 and (got["id"], got["colour"]) == ("42", "red")
    status, headers, body = svc.request(
        "POST", "/items", body=b'{"id": "7"}', headers=[("Content-Type", "application/json")]
    )
    assert (status, json.loads(body), header(headers, "location")) == (201, {"created": {"id": "7"}}, ["/items/7"])


# -- routes -----------------------------------------------------------------------------------------------------


def test_a_route_gives_its_route_key_and_path_parameters(svc: Svc) -> None:
    _, got = svc.json("GET", "/orders/o%2F42?x=1")
    event = got["event"]
    assert event["routeKey"] == "GET /orders/{id}" == event["requestContext"]["routeKey"]
    assert event["pathParameters"] == {"id": "o/42"}
    assert event["rawPath"] == "/orders/o%2F42"
    context = event["requestContext"]
    assert context["domainName"] == f"{context['apiId']}.execute-api.us-east-1.amazonaws.com"
    assert context["accountId"] == "000000000000"
    # The literal route is more specific than the parameter.
    _, got = svc.json("GET", "/orders/special")
    assert got["event"]["routeKey"] == "GET /orders/special" and "pathParameters" not in got["event"]
    _, got = svc.json("PUT", "/orders/special")  # only the parameter route takes PUT
    assert got["event"]["routeKey"] == "PUT /orders/{id}"
    _, got = svc.json("DELETE", "/files/a/b/c.txt")
    assert got["event"]["routeKey"] == "ANY /files/{path+}"
    assert got["event"]["pathParameters"] == {"path": "a/b/c.txt"}


def test_a_method_a_route_does_not_take_gets_405_and_an_unknown_path_404(svc: Svc) -> None:
    status, headers, body = svc.request("DELETE", "/orders/7?marker=delete")
    assert status == 405 and header(headers, "allow") == ["GET, PUT"], body
    status, _, _ = svc.request("GET", "/files")  # a greedy parameter needs at least one segment
    assert status == 404
    status, _, body = svc.request("GET", "/fn/closed")
    assert status == 404 and b"enabled = false" in body
    status, _, body = svc.request("GET", "/fn/nobody")
    assert status == 404 and b"no function nobody" in body
    assert "marker=delete" not in svc.seen_lines()


# -- responses --------------------------------------------------------------------------------------------------


def test_results_map_to_responses_as_lambda_maps_them(svc: Svc) -> None:
    status, headers, body = svc.request("GET", "/fn/shapes?shape=dict")
    assert (status, header(headers, "content-type"), json.loads(body)) == (
        200,
        ["application/json"],
        {"a": 1, "b": [True, None]},
    )
    status, headers, body = svc.request("GET", "/fn/shapes?shape=string")
    assert (status, body) == (200, b'"Hello"')  # the function's JSON as the body (Lambda's function URL rule)
    status, headers, body = svc.request("GET", "/fn/shapes?shape=none")
    assert (status, body) == (200, b"null")
    status, headers, body = svc.request("GET", "/fn/shapes?shape=full")
    assert (status, body) == (201, b"made")
    assert header(headers, "x-one") == ["1"] and header(headers, "x-num") == ["7"]
    assert header(headers, "content-type") == ["text/plain"]
    assert header(headers, "set-cookie") == ["a=1; Max-Age=60", "b=2; HttpOnly"]
    assert header(headers, "content-length") == ["4"]  # the function's own is not passed on
    status, headers, body = svc.request("GET", "/fn/shapes?shape=binary")
    assert (status, body, header(headers, "content-type")) == (200, b"\x89PNG\x00\xff", ["image/png"])
    status, headers, body = svc.request("GET", "/fn/shapes?shape=empty")
    assert (status, body) == (204, b"")


def test_a_result_that_is_not_a_valid_response_is_a_502_and_a_log_line(svc: Svc) -> None:
    mark = svc.serve.log.mark()
    status, headers, body = svc.request("GET", "/fn/shapes?shape=bad_status")
    assert (status, json.loads(body)) == (502, {"message": "Internal Server Error"})
    request_id = header(headers, "x-amzn-requestid")[0]
    line = svc.serve.log.wait_for(rf"shapes: request {request_id}: the result is not a valid", start=mark)
    assert "statusCode must be an integer" in line.string
    status, headers, _ = svc.request("GET", "/fn/shapes?shape=bad_body")
    assert status == 502
    svc.serve.log.wait_for(r"shapes: request \S+: .*body must be a string", start=mark)


def test_a_function_error_is_502_a_timeout_504_and_throttling_429(svc: Svc) -> None:
    mark = svc.serve.log.mark()
    status, headers, body = svc.request("GET", "/fn/shapes?shape=raise")
    assert (status, json.loads(body)) == (502, {"message": "Internal Server Error"})
    assert b"on purpose" not in body  # the details stay in the log
    request_id = header(headers, "x-amzn-requestid")[0]
    svc.serve.log.wait_for(rf"shapes: request {request_id} failed \(ValueError\); answered 502", start=mark)
    status, _, body = svc.request("GET", "/fn/shapes?shape=sleep")
    assert status == 504, body
    status, headers, body = svc.request("GET", "/fn/throttled")
    assert status == 429 and b"ReservedFunctionConcurrentInvocationLimitExceeded" in body


# -- Powertools -------------------------------------------------------------------------------------------------


def test_powertools_parses_the_events_and_its_resolver_routes_them(svc: Svc) -> None:
    status, got = svc.json("GET", "/fn/pt/orders/7?x=42", headers=[("Cookie", "session=abc")])
    assert status == 200, got
    assert got == {"order": "7", "x": "42", "cookies": ["session=abc"], "path": "/orders/7", "routeKey": "$default"}
    status, _, body = svc.request(
        "POST", "/fn/pt/orders", body=b'{"item": "book"}', headers=[("Content-Type", "application/json")]
    )
    assert (status, json.loads(body)) == (201, {"created": {"item": "book"}})
    status, got = svc.json("GET", "/api/orders/9")  # a declared route: the whole path, and its parameters
    assert (status, got) == (200, {"apiOrder": "9", "proxy": {"proxy": "orders/9"}})
    status, _ = svc.json("GET", "/fn/pt/nowhere")
    assert status == 404  # Powertools' own not-found response, passed through


# -- CORS -------------------------------------------------------------------------------------------------------


def test_cors_preflight_is_answered_without_the_function_and_responses_carry_the_headers(svc: Svc) -> None:
    preflight = [("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")]
    status, headers, _ = svc.request("OPTIONS", "/fn/echo/x?marker=preflight", headers=preflight)
    assert status == 200
    assert header(headers, "access-control-allow-origin") == ["https://app.example"]
    assert header(headers, "access-control-allow-methods") == ["GET, POST"]
    assert header(headers, "access-control-allow-headers") == ["x-custom"]
    assert header(headers, "access-control-max-age") == ["300"]
    # A route of the function answers its preflight too, though the route does not take OPTIONS.
    status, headers, _ = svc.request("OPTIONS", "/orders/1?marker=preflight", headers=preflight)
    assert status == 200 and header(headers, "access-control-allow-origin") == ["https://app.example"]
    status, headers, _ = svc.request(
        "OPTIONS", "/fn/echo?marker=preflight", headers=[("Origin", "https://evil.example"), preflight[1]]
    )
    assert status == 200 and not header(headers, "access-control-allow-origin")
    assert "marker=preflight" not in svc.seen_lines()
    # The configured headers replace the function's own.
    status, headers, _ = svc.request("GET", "/fn/echo", headers=[("Origin", "https://app.example")])
    assert header(headers, "access-control-allow-origin") == ["https://app.example"]
    assert header(headers, "access-control-expose-headers") == ["x-result"]
    status, headers, _ = svc.request("GET", "/fn/echo", headers=[("Origin", "https://evil.example")])
    assert not header(headers, "access-control-allow-origin")


# -- auth -------------------------------------------------------------------------------------------------------


def test_a_bearer_url_refuses_a_missing_or_wrong_token_before_the_function_runs(svc: Svc) -> None:
    status, headers, _ = svc.request("GET", "/fn/guarded?marker=none")
    assert status == 401 and header(headers, "www-authenticate") == ["Bearer"]
    status, _, _ = svc.request("GET", "/fn/guarded?marker=wrong", headers=[("Authorization", "Bearer nope")])
    assert status == 403
    status, _, body = svc.request("GET", "/fn/guarded?marker=good", headers=[("Authorization", f"Bearer {TOKEN}")])
    assert (status, json.loads(body)) == (200, {"ok": True})
    lines = svc.seen_lines()
    assert "marker=good" in lines and "marker=none" not in lines and "marker=wrong" not in lines
    assert TOKEN not in svc.serve.log.text()


def test_a_secret_missing_from_the_environment_is_503_and_logged_once(svc: Svc) -> None:
    status, _, body = svc.request("GET", "/fn/unconfigured", headers=[("Authorization", "Bearer x")])
    assert status == 503 and b"EVENTFN_TEST_NOT_SET" not in body
    svc.serve.log.wait_for(
        r"function URL unconfigured: its secret comes from environment variable EVENTFN_TEST_NOT_SET"
    )
    assert svc.serve.log.text().count("EVENTFN_TEST_NOT_SET") == 1


class FakeCaller:
    def __init__(self, name: str, problem: tuple[str, str] | None = None, allowed: bool = True) -> None:
        self.name = name
        self.problem = problem
        self.allowed = allowed
        self.asked: list[tuple[str, str]] = []

    def allows(self, action: str, resource: str) -> bool:
        self.asked.append((action, resource))
        return self.allowed


def functions_of(**settings: FunctionSettings) -> Functions:
    """Functions with these settings, none of them loaded (an invocation gets Lambda's not-loaded error)."""
    functions = Functions(Slots(10))
    for name, value in settings.items():
        source = FunctionSource(
            name=name,
            task_root="/",
            module=name,
            entry_file=f"/{name}.py",
            attribute=None,
            version="v1",
            settings=value,
        )
        functions.add(source)
    return functions


def front(url: UrlSettings, host: str = "127.0.0.1") -> FunctionUrls:
    """A front over one function `f` that is not loaded: a request that passes auth gets its 502."""
    functions = functions_of(f=FunctionSettings(url=url))
    urls = FunctionUrls(functions, None, HttpSettings(host=host))  # type: ignore[arg-type]  # sync: no bus used
    urls.update()
    return urls


def get(path: str = "/fn/f/x", headers: list[tuple[str, str]] | None = None) -> Request:
    return Request(
        method="GET", path=path, query="", headers=headers or [], client="10.0.0.9", body=Body.of(b""), request_id="r1"
    )


async def test_aws_iam_lets_in_only_an_authenticated_caller_allowed_to_invoke_the_url() -> None:
    urls = front(UrlSettings(auth="aws_iam"))
    allowed = FakeCaller("AKIAEVENTFNTEST00001")
    response = await urls.handle(get(), allowed)
    assert response.status == 502  # past auth: the function itself is not loaded
    assert allowed.asked == [("lambda:InvokeFunctionUrl", "f")]
    for caller in [
        None,
        FakeCaller("anonymous", problem=("MissingAuthenticationToken", "no credentials")),
        FakeCaller("AKIAOTHER", allowed=False),
    ]:
        response = await urls.handle(get(), caller)
        assert (response.status, response.body) == (403, b'{"Message":"Forbidden"}')


async def test_a_url_without_auth_is_open_on_loopback_only() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("192.168.1.5")
    assert (await front(UrlSettings()).handle(get(), None)).status == 502
    beyond = await front(UrlSettings(), host="0.0.0.0").handle(get(), None)
    assert beyond.status == 403 and b"declare its auth" in beyond.body
    opened = await front(UrlSettings(auth="none"), host="0.0.0.0").handle(get(), None)
    assert opened.status == 502


async def test_cors_headers_go_on_refusals_too() -> None:
    cors = Cors(allow_origins=["*", "https://a.b"], allow_credentials=True)
    response = await front(UrlSettings(cors=cors), host="0.0.0.0").handle(
        get(headers=[("origin", "https://a.b")]), None
    )
    assert response.status == 403
    assert ("Access-Control-Allow-Origin", "https://a.b") in response.headers  # credentials: never `*`
    assert ("Access-Control-Allow-Credentials", "true") in response.headers
    other = await front(UrlSettings(cors=cors), host="0.0.0.0").handle(get(headers=[("origin", "https://c.d")]), None)
    assert ("Access-Control-Allow-Origin", "*") in other.headers  # `*`: any origin, without credentials
    assert not any(name == "Access-Control-Allow-Credentials" for name, _ in other.headers)


def http_route(path: str, *methods: str) -> dict[str, Any]:
    return {"type": "http", "path": path, "methods": list(methods)}


def test_conflicting_routes_are_named_and_the_first_function_by_name_keeps_them() -> None:
    functions = functions_of(
        b=FunctionSettings(triggers=[http_route("/orders/{order}", "GET"), http_route("/b-only")]),
        a=FunctionSettings(triggers=[http_route("/orders/{id}", "GET", "POST")]),
        c=FunctionSettings(triggers=[http_route("/orders/{id}", "PUT"), http_route("/orders/{id}")]),
    )
    table, problems = routes.build(functions.by_name)
    assert problems == [
        "route GET /orders/{order} of function b (trigger t0) conflicts with route GET,POST /orders/{id} of "
        "function a (trigger t0): function a serves it (the first by name); change one route's path or methods"
    ]
    found = table.find("/orders/1", "GET")
    assert found is not None and found.route is not None and found.route.function == "a"
    put, other = table.find("/orders/1", "PUT"), table.find("/orders/1", "PATCH")
    assert put is not None and put.route is not None and put.route.route_key("PUT") == "PUT /orders/{id}"
    assert other is not None and other.route is not None and other.route.route_key("PATCH") == "ANY /orders/{id}"
    b_only = table.find("/b-only/", "DELETE")
    assert b_only is not None and b_only.route is not None and b_only.route.function == "b"


# -- the mapping, unit by unit ----------------------------------------------------------------------------------


def test_text_types_are_lambdas() -> None:
    for text in ["text/html", "application/json", "application/vnd.api+json", "application/xml", "image/svg+xml"]:
        assert is_text(text), text
    for binary in [None, "", "application/octet-stream", "image/png", "multipart/form-data; boundary=x"]:
        assert not is_text(binary), binary
    assert query_parameters("a=1&a=2&b=x+y&c=%2F&&d") == {"a": "1,2", "b": "x y", "c": "/", "d": ""}


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b'{"statusCode": 99}', "statusCode must be an integer from 100 to 599"),
        (b'{"statusCode": true}', "statusCode must be an integer"),
        (b'{"statusCode": 200, "headers": ["a"]}', "headers must be an object"),
        (b'{"statusCode": 200, "headers": {"a": {}}}', "headers['a'] must be a string"),
        (b'{"statusCode": 200, "headers": {"x y": "1"}}', "not a valid HTTP header name"),
        (b'{"statusCode": 200, "cookies": "a=1"}', "cookies must be a list of strings"),
        (b'{"statusCode": 200, "body": "!!", "isBase64Encoded": true}', "not valid base64"),
        (b'{"statusCode": 200, "isBase64Encoded": "yes"}', "isBase64Encoded must be true or false"),
        (b"\x89PNG raw bytes", "not valid JSON"),
        (b'{"a": 1', "not valid JSON"),
    ],
)
def test_what_is_wrong_with_a_response_object_is_said(payload: bytes, problem: str) -> None:
    mapped = http_response(payload)
    assert isinstance(mapped, str) and problem in mapped, mapped
