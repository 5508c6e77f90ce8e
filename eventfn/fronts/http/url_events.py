"""An HTTP request as Lambda's function URL / API Gateway HTTP API payload v2.0 event, and the function's result
back as an HTTP response, the way Lambda maps both.

The event (`request_event`):
- headers lower-cased, repeats comma-joined, values read as UTF-8 (as senders write them; latin-1 where they are not
  UTF-8); `Cookie` headers become `cookies` (and leave `headers`, as Lambda does); query values URL-decoded,
  repeats comma-joined; `rawPath` and `rawQueryString` as sent;
- the headers Lambda's front end adds: `x-forwarded-for` (the client's address appended to any the request
  brought), `x-forwarded-proto` (`http`) and `x-forwarded-port` (from `Host`) unless a proxy in front set them, and
  `x-amzn-trace-id` unless the request has one (Mangum and WSGI adapters build the URL's scheme and port from
  these; without them Mangum assumes https);
- `body` is text for text types (`text/*`, JSON, XML, JavaScript, form-urlencoded) that are UTF-8, else base64
  with `isBase64Encoded` (a missing content type counts as binary, as in Lambda);
- absent members are left out rather than null (`cookies`, `queryStringParameters`, `pathParameters`, `body`),
  as in the events Lambda sends;
- a function URL's `requestContext` is Lambda's: `apiId`/`domainPrefix` the URL id (32 characters, made from the
  account, region and function name, stable), `domainName` `<url-id>.lambda-url.<region>.on.aws`, `accountId`
  `anonymous` unless the URL uses `aws_iam` (then the account, and `authorizer.iam` names the caller); a declared
  route's is API Gateway's: `apiId` from the account and region, `domainName`
  `<api-id>.execute-api.<region>.amazonaws.com`, `accountId` the account. The Host the client used is in
  `headers.host`.

The response (`http_response`): a result with `statusCode` is Lambda's response object (`headers`, `cookies` as
`Set-Cookie`, `body`, `isBase64Encoded`); any other JSON (an object, a string, null...) is a 200
`application/json` response whose body is that JSON, as Lambda's function URLs answer. What is not a valid response
object is a problem string, which the front answers with 502.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import secrets
import time
from typing import Any
from urllib.parse import unquote, unquote_plus

import msgspec

from eventfn.web import Request, Response

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
#: Media types Lambda passes as text; everything else (and no content type) is base64.
_TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/ecmascript",
        "application/x-javascript",
        "application/x-www-form-urlencoded",
        "application/graphql",
        "application/yaml",
        "application/x-yaml",
    }
)
#: Response headers the server writes itself: a function's own would contradict them.
_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"})
#: An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class _Http(msgspec.Struct, frozen=True):
    method: str
    path: str
    protocol: str
    sourceIp: str
    userAgent: str


class _Iam(msgspec.Struct, frozen=True):
    accessKey: str
    accountId: str
    callerId: str
    cognitoIdentity: None
    principalOrgId: None
    userArn: str
    userId: str


class _Authorizer(msgspec.Struct, frozen=True):
    iam: _Iam


class _RequestContext(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    accountId: str
    apiId: str
    authorizer: _Authorizer | None = None
    domainName: str
    domainPrefix: str
    http: _Http
    requestId: str
    routeKey: str
    stage: str
    time: str
    timeEpoch: int


class _Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    version: str
    routeKey: str
    rawPath: str
    rawQueryString: str
    cookies: list[str] | None = None
    headers: dict[str, str]
    queryStringParameters: dict[str, str] | None = None
    pathParameters: dict[str, str] | None = None
    requestContext: _RequestContext
    body: str | None = None
    isBase64Encoded: bool


_encoder = msgspec.json.Encoder()


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a request arrived, as the event's `requestContext` names it: a function URL or the routes' API."""

    api_id: str
    domain_name: str
    #: `anonymous` for a function URL without IAM auth (as Lambda sends it), else the account.
    account_id: str


def url_endpoint(function: str, region: str, account_id: str) -> Endpoint:
    """A function URL's: its id is stable, derived from the account, region and function name (as Lambda's is)."""
    url_id = _id(f"url:{account_id}:{region}:{function}", 32)
    return Endpoint(api_id=url_id, domain_name=f"{url_id}.lambda-url.{region}.on.aws", account_id="anonymous")


def routes_endpoint(region: str, account_id: str) -> Endpoint:
    """The declared routes' (one HTTP API for all of them, as API Gateway's `execute-api` domain has it)."""
    api_id = _id(f"api:{account_id}:{region}", 10)
    return Endpoint(api_id=api_id, domain_name=f"{api_id}.execute-api.{region}.amazonaws.com", account_id=account_id)


def _id(seed: str, length: int) -> str:
    return base64.b32encode(hashlib.sha256(seed.encode()).digest()).decode("ascii").lower()[:length]


class Identity(msgspec.Struct, frozen=True):
    """The IAM caller of a URL with `aws_iam` auth, for `requestContext.authorizer.iam`."""

    access_key: str
    account_id: str


def request_event(
    request: Request,
    body: bytes,
    *,
    endpoint: Endpoint,
    route_key: str,
    raw_path: str,
    path_parameters: dict[str, str] | None = None,
    identity: Identity | None = None,
) -> bytes:
    """The payload v2.0 event of `request` (whose body is `body`) as JSON."""
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in request.headers:
        if not value.isascii():
            value = _text(value)
        if name == "cookie":
            cookies.extend(c for part in value.split(";") if (c := part.strip()))
        elif name in headers:
            headers[name] = f"{headers[name]},{value}"
        else:
            headers[name] = value
    received = request.received or time.time()
    forwarded = headers.get("x-forwarded-for")
    headers["x-forwarded-for"] = f"{forwarded}, {request.client}" if forwarded else request.client
    if "x-forwarded-proto" not in headers:
        headers["x-forwarded-proto"] = "http"
    if "x-forwarded-port" not in headers:
        port = headers.get("host", "").rpartition(":")[2]
        headers["x-forwarded-port"] = port if port.isdigit() else "80"
    if "x-amzn-trace-id" not in headers:
        headers["x-amzn-trace-id"] = f"Root=1-{int(received):08x}-{secrets.token_hex(12)}"
    stamp = _stamp(int(received))
    text, encoded = _body(body, headers.get("content-type"))
    authorizer = None
    account = endpoint.account_id
    if identity is not None:
        account = identity.account_id
        arn = _caller_arn(identity)
        authorizer = _Authorizer(
            _Iam(identity.access_key, identity.account_id, identity.access_key, None, None, arn, identity.access_key)
        )
    event = _Event(
        version="2.0",
        routeKey=route_key,
        rawPath=raw_path,
        rawQueryString=request.query,
        cookies=cookies or None,
        headers=headers,
        queryStringParameters=query_parameters(request.query) if request.query else None,
        pathParameters=path_parameters or None,
        requestContext=_RequestContext(
            accountId=account,
            apiId=endpoint.api_id,
            authorizer=authorizer,
            domainName=endpoint.domain_name,
            domainPrefix=endpoint.api_id,
            http=_Http(
                request.method, raw_path, f"HTTP/{request.http_version}", request.client, headers.get("user-agent", "")
            ),
            requestId=request.request_id,
            routeKey=route_key,
            stage="$default",
            time=stamp,
            timeEpoch=int(received * 1000),
        ),
        body=text,
        isBase64Encoded=encoded,
    )
    return _encoder.encode(event)


def _text(value: str) -> str:
    """A header value as its sender wrote it: the server reads header bytes as latin-1 (losslessly), senders write
    UTF-8 (a file name, a person's name) and the event is JSON text; bytes that are not UTF-8 stay latin-1."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


@functools.lru_cache(maxsize=4)
def _stamp(second: int) -> str:
    """`requestContext.time`: `30/Nov/2026:04:31:14 +0000` (English month names, whatever the locale)."""
    when = time.gmtime(second)
    return (
        f"{when.tm_mday:02d}/{_MONTHS[when.tm_mon - 1]}/{when.tm_year}:"
        f"{when.tm_hour:02d}:{when.tm_min:02d}:{when.tm_sec:02d} +0000"
    )


def _caller_arn(identity: Identity) -> str:
    name = identity.access_key
    if name.startswith("role/"):  # a function's execution role
        return f"arn:aws:sts::{identity.account_id}:assumed-role/{name.removeprefix('role/')}/eventfn"
    return f"arn:aws:iam::{identity.account_id}:user/{name}"


def query_parameters(query: str) -> dict[str, str]:
    """`queryStringParameters`: values URL-decoded, a repeated name's values comma-joined (Lambda's rule)."""
    out: dict[str, str] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        if "%" in pair or "+" in pair:
            name, value = unquote_plus(name), unquote_plus(value)
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def path_parameter(raw: str) -> str:
    """A path parameter's value: its segment(s), URL-decoded."""
    return unquote(raw)


def is_text(content_type: str | None) -> bool:
    """Whether Lambda passes a body of this content type as text (else base64)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media in _TEXT_TYPES or media.endswith(("+json", "+xml", "/xml", "/json"))


def _body(body: bytes, content_type: str | None) -> tuple[str | None, bool]:
    if not body:
        return None, False
    if is_text(content_type):
        try:
            return body.decode("utf-8"), False
        except UnicodeDecodeError:  # declared text, but not UTF-8: the event must still carry it intact
            pass
    return base64.b64encode(body).decode("ascii"), True


# -- the response ------------------------------------------------------------------------------------------


class _Result(msgspec.Struct):
    """A JSON object result, as far as the response mapping reads it (other members are skipped)."""

    statusCode: Any = msgspec.UNSET
    headers: Any = None
    cookies: Any = None
    body: Any = None
    isBase64Encoded: Any = False


_result_decoder = msgspec.json.Decoder(_Result)
_raw_decoder = msgspec.json.Decoder(msgspec.Raw)
_JSON = ("Content-Type", "application/json")


def http_response(payload: bytes) -> Response | str:
    """The HTTP response for a function's result `payload`, or what is wrong with it as a response (a 502)."""
    if payload.lstrip()[:1] == b"{":
        try:
            result = _result_decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError) as exc:
            return f"the result is not valid JSON ({exc})"
        if result.statusCode is msgspec.UNSET:
            return Response(200, [_JSON], payload)
        return _proxy_response(result)
    try:
        _raw_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        return f"the result is not valid JSON ({exc})"
    return Response(200, [_JSON], payload)


def _proxy_response(result: _Result) -> Response | str:
    status = result.statusCode
    if type(status) is not int or not 100 <= status <= 599:
        return f"statusCode must be an integer from 100 to 599, not {_shown(status)}"
    headers: list[tuple[str, str]] = []
    if result.headers is not None:
        if not isinstance(result.headers, dict):
            return f"headers must be an object of strings, not {_shown(result.headers)}"
        for name, value in result.headers.items():
            if not _HEADER_NAME.fullmatch(name):
                return f"header name {name[:40]!r} is not a valid HTTP header name"
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int | float):
                value = str(value)
            elif not isinstance(value, str):
                return f"headers[{name!r}] must be a string, not {_shown(value)}"
            if name.lower() not in _HOP_BY_HOP:
                headers.append((name, value))
    if result.cookies is not None:
        if not isinstance(result.cookies, list) or not all(isinstance(c, str) for c in result.cookies):
            return f"cookies must be a list of strings, not {_shown(result.cookies)}"
        headers.extend(("Set-Cookie", cookie) for cookie in result.cookies)
    body, encoded = result.body, result.isBase64Encoded
    if encoded is not None and not isinstance(encoded, bool):
        return f"isBase64Encoded must be true or false, not {_shown(encoded)}"
    if body is None:
        data = b""
    elif not isinstance(body, str):
        return f"body must be a string (JSON-encode it), not {_shown(body)}"
    elif encoded:
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "isBase64Encoded is true but body is not valid base64"
    else:
        data = body.encode("utf-8", "replace")
    return Response(status, headers, data)


def _shown(value: object) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in kind:
        return kind[type(value)] if not isinstance(value, str) else f"the string {value[:40]!r}"
    return f"{type(value).__name__} {str(value)[:40]}"
