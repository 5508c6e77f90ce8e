"""Lambda's API over HTTP, so that `aws lambda ... --endpoint-url` and boto3's `lambda` client work unchanged:

- Invoke (`POST /2015-03-31/functions/{name}/invocations`): `RequestResponse` through `Function.invoke` (with
  `X-Amz-Log-Type: Tail`, the invocation's last 4 KB of log), `Event` stored on the function's async subject
  (202 once JetStream has it), `DryRun` (204);
- ListFunctions (`GET /2015-03-31/functions/`), GetFunction (`GET .../functions/{name}`) and
  GetFunctionConfiguration (`GET .../functions/{name}/configuration`).

A name may carry a qualifier (`name:qualifier`, a full or partial ARN) or come with `?Qualifier=`: `$LATEST` and
the version serving are found; Lambda's other versions and aliases do not exist here. Errors are Lambda's: a JSON
body `{"Type", "Message"}`, the code in `x-amzn-ErrorType` (which botocore reads as the error code), Lambda's status.
"""

from __future__ import annotations

import base64
import bisect
import logging
import re
from urllib.parse import parse_qs, unquote

import anyio.to_thread
import msgspec

from eventfn import decoding, events, subjects
from eventfn.broker.bus import Bus
from eventfn.config import HttpSettings
from eventfn.errors import UnreadableData
from eventfn.fronts.http.lambda_models import (
    LATEST,
    CodeCache,
    CodeInfo,
    Concurrency,
    ErrorBody,
    FunctionCodeLocation,
    GetFunctionResult,
    ListFunctionsResult,
    configuration,
    encoder,
    function_arn,
    read_code,
)
from eventfn.invoke.functions import Function, Functions
from eventfn.invoke.invocation import SYNC_PAYLOAD_LIMIT, Invocation, Outcome, request_too_large
from eventfn.web import BodyTooLarge, Caller, Request, Response

log = logging.getLogger(__name__)

PREFIX = "/2015-03-31/"
#: Lambda's limit on `X-Amz-Client-Context` (base64).
CLIENT_CONTEXT_LIMIT = 3583
#: Lambda's limit on an `Event` invocation's payload (1 MB since 2025; 256 KB before).
ASYNC_PAYLOAD_LIMIT = 1024 * 1024
#: Room an `Event` leaves in its NATS message for the CloudEvents headers.
_ENVELOPE = 4096
#: Functions per ListFunctions page, at most (Lambda's).
PAGE = 50
#: What stored events from an `Event` invoke carry as their CloudEvents source.
EVENT_SOURCE = "eventfn-lambda-api"

# Lambda's FunctionName pattern: a name, `name:qualifier`, `123456789012:function:name[:qualifier]`, or the ARN.
_NAME = re.compile(
    r"(?:arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z0-9-]+):)?"
    r"(?:(?P<account>\d{12}):)?"
    r"(?:function:)?"
    r"(?P<name>[a-zA-Z0-9_.-]{1,140})"
    r"(?::(?P<qualifier>\$LATEST|[a-zA-Z0-9_-]{1,128}))?"
)
_QUALIFIER = re.compile(r"\$LATEST|[a-zA-Z0-9_-]{1,128}")
_JSON = "application/json"


class _Target(msgspec.Struct, frozen=True):
    """A FunctionName as the request gave it, parsed."""

    name: str
    qualifier: str | None
    region: str | None
    account: str | None


class LambdaApi:
    """Answers Lambda API requests about `functions`; stores `Event` invocations through `bus`."""

    service = "lambda"

    def __init__(self, functions: Functions, bus: Bus, settings: HttpSettings) -> None:
        self.functions = functions
        self.bus = bus
        self.settings = settings
        self.code = CodeCache()

    def claims(self, request: Request) -> bool:
        return request.path.startswith(PREFIX)

    def too_large(self, request: Request, limit: int) -> Response:
        return _refused(request, request_too_large(limit))

    def busy(self, request: Request) -> Response:
        message = "Rate Exceeded. Reason: the service holds as many request payloads as it may; retry shortly"
        return _error(request, 429, "TooManyRequestsException", message)

    async def handle(self, request: Request, caller: Caller | None) -> Response:
        """Route one request to its operation; a request the API does not have gets Lambda's 404."""
        if caller is not None and caller.problem is not None:
            code, message = caller.problem
            return _error(request, 403, code, message)
        parts = request.path[len(PREFIX) :].split("/")
        if parts and parts[-1] == "" and len(parts) > 1:
            parts.pop()  # a trailing slash: `functions/` is ListFunctions, as `functions` is
        method = request.method
        if parts[0] == "functions":
            if len(parts) == 1 and method == "GET":
                return await self._list(request, caller)
            name = unquote(parts[1]) if len(parts) > 1 else ""
            if len(parts) == 3 and parts[2] == "invocations" and method == "POST":
                return await self._invoke(request, caller, name)
            if len(parts) == 2 and method == "GET":
                return await self._get(request, caller, name, whole=True)
            if len(parts) == 3 and parts[2] == "configuration" and method == "GET":
                return await self._get(request, caller, name, whole=False)
        return _error(
            request,
            404,
            "UnknownOperationException",
            f"{method} {request.path}: eventfn's Lambda API has Invoke, ListFunctions, GetFunction and "
            "GetFunctionConfiguration only",
        )

    # -- Invoke ---------------------------------------------------------------------------------------------------

    async def _invoke(self, request: Request, caller: Caller | None, raw_name: str) -> Response:
        target = _target(request, raw_name)
        if isinstance(target, Response):
            return target
        if denied := self._denied(request, caller, "lambda:InvokeFunction", target):
            return denied
        invocation_type = request.header("x-amz-invocation-type") or "RequestResponse"
        if invocation_type not in ("RequestResponse", "Event", "DryRun"):
            message = f"X-Amz-Invocation-Type {invocation_type!r}: use RequestResponse, Event or DryRun"
            return _error(request, 400, "InvalidParameterValueException", message)
        log_type = request.header("x-amz-log-type") or "None"
        if log_type not in ("None", "Tail"):
            return _error(
                request, 400, "InvalidParameterValueException", f"X-Amz-Log-Type {log_type!r}: use None or Tail"
            )
        limit = self.settings.max_body
        if invocation_type == "Event":  # stored as one NATS message
            limit = min(limit, ASYNC_PAYLOAD_LIMIT, self.bus.max_payload - _ENVELOPE)
        try:
            body = await request.read(limit)
        except BodyTooLarge:
            return _refused(request, request_too_large(limit))
        found = self._find(request, target)
        if isinstance(found, Response):
            return found
        fn, version = found
        if invocation_type == "DryRun":  # nothing runs: the payload is not read
            return _answer(request, await fn.invoke(_dry_run(request)), version)
        payload = body or b"{}"  # Lambda's event for an empty payload
        try:
            decoding.json_value(payload)
        except UnreadableData as exc:
            message = f"Could not parse request body into json: {exc.problem}"
            return _error(request, 400, "InvalidRequestContentException", message)
        client_context = None
        if raw := request.header("x-amz-client-context"):
            try:
                if len(raw) > CLIENT_CONTEXT_LIMIT:
                    raise UnreadableData(f"it is {len(raw)} bytes long, more than Lambda's {CLIENT_CONTEXT_LIMIT}")
                client_context = decoding.base64_json_object(raw)
            except UnreadableData as exc:
                message = f"X-Amz-Client-Context must be a base64-encoded JSON object: {exc.problem}"
                return _error(request, 400, "InvalidRequestContentException", message)
        if invocation_type == "Event":
            return await self._store(request, fn, payload)
        invocation = Invocation(
            request_id=request.request_id,
            payload=payload,
            is_json=True,
            client_context=client_context,
            # Over a cap a sync caller is told at once (Lambda's 429), never queued without bound.
            wait_for_slot=False,
            max_request_bytes=self.settings.max_body,
            max_response_bytes=SYNC_PAYLOAD_LIMIT,
            log_tail=log_type == "Tail",
        )
        return _answer(request, await fn.invoke(invocation), version)

    async def _store(self, request: Request, fn: Function, payload: bytes) -> Response:
        """An `Event` invocation: stored on the function's async subject as `eventfn invoke --async` does; 202 once
        JetStream has it (its retries and DLQ then follow the function's settings)."""
        subject = subjects.ASYNC_PREFIX + fn.name
        event = events.new_event(subject, payload, source=EVENT_SOURCE, id=request.request_id or None)
        try:
            await self.bus.publish_stored(subject, payload, events.binary_headers(event))
        except Exception as exc:  # the bus's (nats-py's) errors: no stream, no acknowledgement in time
            log.warning("Event invoke of %s: not stored on %s: %s", fn.name, subject, exc or type(exc).__name__)
            message = f"the event could not be stored on {subject} ({type(exc).__name__}); nothing was queued: retry"
            return _error(request, 500, "ServiceException", message)
        return Response(202, [("Content-Type", _JSON), ("x-amzn-RequestId", event.id)])

    # -- ListFunctions, GetFunction, GetFunctionConfiguration -----------------------------------------------------

    async def _list(self, request: Request, caller: Caller | None) -> Response:
        if caller is not None and not caller.allows("lambda:ListFunctions", "*"):
            return _error(request, 403, "AccessDeniedException", _not_authorized(caller, "lambda:ListFunctions", "*"))
        query = parse_qs(request.query, keep_blank_values=True)
        marker = query.get("Marker", [""])[0]
        raw_max = query.get("MaxItems", [""])[0]
        max_items = PAGE
        if raw_max:
            if not raw_max.isdigit() or not 1 <= int(raw_max) <= 10_000:
                message = f"MaxItems {raw_max!r}: give a whole number from 1 to 10000"
                return _error(request, 400, "InvalidParameterValueException", message)
            max_items = min(int(raw_max), PAGE)
        by_name = self.functions.by_name
        names = sorted(by_name)
        self.code.forget_except(set(names))
        # The marker is the last name of the page before: a function added or removed meanwhile shifts nothing.
        start = bisect.bisect_right(names, marker) if marker else 0
        page = names[start : start + max_items]
        configs = []
        for name in page:
            fn = by_name.get(name)
            if fn is not None:  # (removed by a reload while this page was read)
                configs.append(configuration(fn, self.settings, await self._code(fn)))
        more = start + max_items < len(names)
        result = ListFunctionsResult(functions=configs, next_marker=page[-1] if more and page else None)
        return _json(request, encoder.encode(result))

    async def _get(self, request: Request, caller: Caller | None, raw_name: str, *, whole: bool) -> Response:
        target = _target(request, raw_name)
        if isinstance(target, Response):
            return target
        if denied := self._denied(request, caller, "lambda:GetFunction", target):
            return denied
        found = self._find(request, target)
        if isinstance(found, Response):
            return found
        fn, version = found
        code = await self._code(fn)
        config = configuration(fn, self.settings, code, version)
        if not whole:
            return _json(request, encoder.encode(config))
        settings = fn.settings or fn.source.settings
        result = GetFunctionResult(
            configuration=config,
            code=FunctionCodeLocation(repository_type="S3", location=code.location),
            concurrency=Concurrency(reserved_concurrent_executions=settings.concurrency) if settings else None,
        )
        return _json(request, encoder.encode(result))

    async def _code(self, fn: Function) -> CodeInfo:
        source = fn.source
        info = self.code.get(source)
        if info is None:
            info = await anyio.to_thread.run_sync(read_code, source)
            self.code.put(source, info)
        return info

    # -- names, qualifiers, permissions ---------------------------------------------------------------------------

    def _find(self, request: Request, target: _Target) -> tuple[Function, str] | Response:
        """The function and the version a request names (`$LATEST` or the one serving), or Lambda's 404."""
        settings = self.settings
        fn = self.functions.by_name.get(target.name)
        qualifier = target.qualifier or LATEST
        elsewhere = (target.region is not None and target.region != settings.region) or (
            target.account is not None and target.account != settings.account_id
        )
        if fn is None or elsewhere:
            arn = function_arn(settings, target.name, target.qualifier)
            if elsewhere:
                arn = f"arn:aws:lambda:{target.region or settings.region}:{target.account or settings.account_id}:"
                arn += f"function:{target.name}" + (f":{target.qualifier}" if target.qualifier else "")
            return _error(request, 404, "ResourceNotFoundException", f"Function not found: {arn}")
        if qualifier != LATEST and qualifier != (fn.pool.version if fn.pool else None):
            serving = f"; version {fn.pool.version} serves now" if fn.pool else ""
            message = (
                f"Function not found: {function_arn(settings, fn.name, qualifier)} "
                f"(eventfn has $LATEST and the version serving{serving})"
            )
            return _error(request, 404, "ResourceNotFoundException", message)
        return fn, qualifier

    def _denied(self, request: Request, caller: Caller | None, action: str, target: _Target) -> Response | None:
        """Lambda's 403 if `caller` may not do `action` on the function; None if it may."""
        if caller is None or caller.allows(action, target.name):
            return None
        arn = function_arn(self.settings, target.name)
        return _error(request, 403, "AccessDeniedException", _not_authorized(caller, action, arn))


def _target(request: Request, raw_name: str) -> _Target | Response:
    """The FunctionName of the path parsed, its qualifier reconciled with `?Qualifier=`; or Lambda's 400."""
    match = _NAME.fullmatch(raw_name)
    if match is None:
        message = (
            f"FunctionName {raw_name[:200]!r}: give a function's name, `name:qualifier`, or its ARN "
            "(arn:aws:lambda:<region>:<account>:function:<name>[:<qualifier>])"
        )
        return _error(request, 400, "ValidationException", message)
    qualifier = match["qualifier"]
    if "Qualifier=" in request.query:
        asked = parse_qs(request.query, keep_blank_values=True).get("Qualifier", [""])[0]
        if asked and not _QUALIFIER.fullmatch(asked):
            message = f"Qualifier {asked[:200]!r}: give $LATEST or a version (letters, digits, `_` and `-`)"
            return _error(request, 400, "ValidationException", message)
        if asked and qualifier and asked != qualifier:
            message = "The derived qualifier from the function name does not match the specified qualifier."
            return _error(request, 400, "InvalidParameterValueException", message)
        qualifier = qualifier or asked or None
    return _Target(match["name"], qualifier, match["region"], match["account"])


def _dry_run(request: Request) -> Invocation:
    return Invocation(request_id=request.request_id, payload=b"", dry_run=True, wait_for_slot=False)


def _answer(request: Request, outcome: Outcome, version: str) -> Response:
    """Invoke's answer: the result (200), a function error (200 with `X-Amz-Function-Error`), a DryRun's 204, or an
    invocation error in Lambda's format."""
    error = outcome.error
    if error is not None and not error.function_error:
        return _refused(request, outcome)
    if outcome.status == 204:
        return Response(204, [("x-amzn-RequestId", request.request_id)])
    headers = [("Content-Type", _JSON), ("x-amzn-RequestId", request.request_id), ("X-Amz-Executed-Version", version)]
    if error is not None:
        headers.append(("X-Amz-Function-Error", "Unhandled"))
    if outcome.log:
        headers.append(("X-Amz-Log-Result", base64.b64encode(outcome.log).decode("ascii")))
    return Response(200, headers, outcome.payload)


def _refused(request: Request, outcome: Outcome) -> Response:
    """An invocation error (the handler did not run) in Lambda's format."""
    error = outcome.error
    assert error is not None
    return _error(request, outcome.status, error.type, error.message)


def _not_authorized(caller: Caller, action: str, resource: str) -> str:
    return (
        f"User: {caller.name} is not authorized to perform: {action} on resource: {resource} "
        "(eventfn: the caller's access key or the function's [permissions] do not allow it)"
    )


def _error(request: Request, status: int, code: str, message: str) -> Response:
    """Lambda's error: `{"Type", "Message"}` and the code in `x-amzn-ErrorType`, which botocore reads."""
    body = encoder.encode(ErrorBody("User" if status < 500 else "Service", message))
    headers = [("Content-Type", _JSON), ("x-amzn-RequestId", request.request_id), ("x-amzn-ErrorType", code)]
    return Response(status, headers, body)


def _json(request: Request, body: bytes) -> Response:
    return Response(200, [("Content-Type", _JSON), ("x-amzn-RequestId", request.request_id)], body)
