"""Function URLs (`/fn/<name>/...`), the routes functions declare (`type = "http"` triggers), and webhooks (routes
with `mode = "async"`): each request becomes a Lambda function URL / HTTP API payload v2.0 event (`url_events`).

- **A function URL** is `/fn/<name>` plus any path: the function sees the rest as `rawPath` (`/fn/hello/a/b` is
  `/a/b`, what the function's own URL would have shown), `routeKey` `$default`. `[url] enabled = false` removes it.
- **A route** (`path = "/orders/{id}"`, `methods`) is matched as API Gateway matches (`routes`); its event has
  `routeKey` `GET /orders/{id}`, `pathParameters`, and the whole path as `rawPath`.
- **Sync** (URLs, routes by default): the event goes through the one invocation path (`Functions.invoke`), and the
  result is mapped back as Lambda maps it. A function error is a 502 `{"message":"Internal Server Error"}` (the
  details are in the log's REPORT and a line naming the request), a timeout 504, throttling 429; a result that
  is not a valid response object a 502 and a log line saying what is wrong.
- **Async** (webhooks): the event is stored on the function's async queue (`eventfn.async.<name>`) and the answer,
  202 `{"eventId": ...}`, goes out only once JetStream has acknowledged it; a store that fails is a 503, never a
  202. The function's retry policy and DLQ apply from there. A delivery id (`X-GitHub-Delivery`,
  `Idempotency-Key`) makes a redelivery within JetStream's duplicate window the same event (the same id).
- **Auth** is checked before anything runs (`signatures`), and **CORS** added per function (`cors`; a function's
  `[url] cors` applies to its routes too).

Every response carries `x-amzn-RequestId`: the request id that the event's `requestContext.requestId`, the log's
START/END/REPORT lines and the handler's `context.aws_request_id` (for a sync call) show.
"""

from __future__ import annotations

import logging
import uuid

import msgspec

from eventfn import events, subjects
from eventfn.broker.bus import Bus
from eventfn.config import HTTP_METHODS, HttpSettings, HttpTrigger, UrlSettings
from eventfn.fronts.http import routes
from eventfn.fronts.http.cors import CorsPolicy
from eventfn.fronts.http.signatures import Guard, denied, iam_forbidden, is_loopback
from eventfn.fronts.http.url_events import (
    Endpoint,
    Identity,
    http_response,
    request_event,
    routes_endpoint,
    url_endpoint,
)
from eventfn.invoke.functions import Functions
from eventfn.invoke.invocation import SYNC_PAYLOAD_LIMIT, Invocation, Outcome
from eventfn.web import Caller, Request, Response

log = logging.getLogger(__name__)

PREFIX = "/fn/"
#: Headers that name one delivery of a webhook: a redelivery carries the same one.
DELIVERY_HEADERS = ("x-github-delivery", "idempotency-key")
#: The CloudEvents type of a stored webhook request.
WEBHOOK_EVENT_TYPE = "io.eventfn.http.request"
#: Seconds JetStream has to acknowledge a webhook's event before the request is answered 503.
STORE_TIMEOUT = 5.0
_DELIVERY_NAMESPACE = uuid.UUID("9a3c7f1e-2b8d-4e0a-8c51-6d2f0b7e4a93")
_ALLOWED_METHODS = frozenset(HTTP_METHODS)
_json = msgspec.json.Encoder()


class _Target:
    """What a request resolved to: the function, how it is called, and the event's route fields."""

    __slots__ = ("asynchronous", "cors", "endpoint", "function", "guard", "params", "raw_path", "route_key", "source")

    def __init__(
        self,
        function: str,
        guard: Guard,
        cors: CorsPolicy | None,
        endpoint: Endpoint,
        *,
        route_key: str,
        raw_path: str,
        source: str,
        params: dict[str, str] | None = None,
        asynchronous: bool = False,
    ) -> None:
        self.function = function
        self.guard = guard
        self.cors = cors
        self.endpoint = endpoint
        self.route_key = route_key
        self.raw_path = raw_path
        #: The CloudEvents source of a stored event: the URL or route path.
        self.source = source
        self.params = params
        self.asynchronous = asynchronous


class _Url:
    """A function URL as `update` prepared it."""

    __slots__ = ("cors", "endpoint", "guard")

    def __init__(self, guard: Guard, cors: CorsPolicy | None, endpoint: Endpoint) -> None:
        self.guard = guard
        self.cors = cors
        self.endpoint = endpoint


class FunctionUrls:
    """The front of function URLs, routes and webhooks."""

    service = ""

    def __init__(self, functions: Functions, bus: Bus, settings: HttpSettings) -> None:
        self.functions = functions
        self.bus = bus
        self.settings = settings
        #: Whether URLs without declared auth are open: only while nobody beyond this host can reach them.
        self.loopback = is_loopback(settings.host)
        self._urls: dict[str, _Url] = {}
        self._routes = routes.RouteTable()
        self._route_guards: dict[routes.Route, tuple[Guard, CorsPolicy | None]] = {}
        self._endpoint = routes_endpoint(settings.region, settings.account_id)
        #: Configuration problems logged (each once, while it lasts), and the routes last announced.
        self._logged: set[str] = set()
        self._announced: list[str] = []

    # -- configuration ----------------------------------------------------------------------------------------

    def update(self) -> None:
        """The functions changed (a reload): read their URLs and routes again."""
        settings = self.settings
        urls: dict[str, _Url] = {}
        cors: dict[str, CorsPolicy | None] = {}
        url_settings: dict[str, UrlSettings] = {}
        problems: list[str] = []
        for name, fn in self.functions.by_name.items():
            function_settings = fn.routing_settings
            url = function_settings.url if function_settings is not None else UrlSettings()
            url_settings[name] = url
            cors[name] = CorsPolicy(url.cors) if url.cors is not None else None
            if not url.enabled:
                continue
            guard = self._guard(url, f"function URL {name}")
            problems += [p] if (p := guard.problem()) else []
            endpoint = url_endpoint(name, settings.region, settings.account_id)
            if url.auth == "aws_iam":
                endpoint = msgspec.structs.replace(endpoint, account_id=settings.account_id)
            urls[name] = _Url(guard, cors[name], endpoint)
        table, conflicts = routes.build(self.functions.by_name)
        guards: dict[routes.Route, tuple[Guard, CorsPolicy | None]] = {}
        for route in table.routes:
            trigger, where = route.trigger, f"route {route.describe()}"
            # A route's own auth, else its function's URL's (secret and signature settings with it).
            guard = self._guard(trigger if trigger.auth is not None else url_settings[route.function], where)
            problems += [p] if (p := guard.problem()) else []
            guards[route] = (guard, cors[route.function])
        self._urls, self._routes, self._route_guards = urls, table, guards
        self._report(conflicts + problems, sorted(route.describe() for route in table.routes))

    def _guard(self, declared: UrlSettings | HttpTrigger, where: str) -> Guard:
        """The check of a URL's or a route's `auth`, `secret` and signature settings."""
        return Guard(
            declared.auth,
            declared.secret,
            where=where,
            loopback=self.loopback,
            signature_header=declared.signature_header,
            signature_prefix=declared.signature_prefix,
        )

    def _report(self, problems: list[str], described: list[str]) -> None:
        for problem in problems:
            if problem not in self._logged:
                log.error("%s", problem)
        self._logged = set(problems)  # a problem fixed and back again is news again
        if described != self._announced:
            self._announced = described
            if described:
                log.info("HTTP routes: %s", "; ".join(described))

    # -- requests ---------------------------------------------------------------------------------------------

    def claims(self, request: Request) -> bool:
        return request.path.startswith(PREFIX) or self._routes.find(request.path, request.method) is not None

    def too_large(self, request: Request, limit: int) -> Response:
        return denied(413, f"Request Entity Too Large: the body must be at most {limit} bytes")

    def busy(self, request: Request) -> Response:
        response = denied(429, "Too Many Requests: the service holds as many request bodies as it may; retry shortly",
                          (("Retry-After", "1"),))  # fmt: skip
        response.headers.append(("x-amzn-RequestId", request.request_id))
        return response

    async def handle(self, request: Request, caller: Caller | None) -> Response:
        target = self._target(request)
        if isinstance(target, Response):
            response = target
        elif target.cors is not None and (preflight := target.cors.preflight(request)) is not None:
            response = preflight
        else:
            response = await self._serve(target, request, caller)
            if target.cors is not None:
                response = target.cors.apply(request, response)
        response.headers.append(("x-amzn-RequestId", request.request_id))
        return response

    def _target(self, request: Request) -> _Target | Response:
        """The URL or route `request` is for, or the answer if it is none (404, 405)."""
        path, method = request.path, request.method
        if path.startswith(PREFIX):
            name, _, rest = path[len(PREFIX) :].partition("/")
            url = self._urls.get(name)
            if url is None:
                fn = self.functions.by_name.get(name)
                if fn is None:
                    why = f"no function {name}"
                elif (settings := fn.routing_settings) is not None and settings.url.enabled:
                    why = f"function {name} is not served yet (it is being provisioned); try again shortly"
                else:
                    why = f"function {name} has no URL ([url] enabled = false)"
                return denied(404, f"Not Found: {why}")
            if method not in _ALLOWED_METHODS:
                return _not_allowed(_ALLOWED_METHODS)
            raw_path = "/" + rest
            return _Target(
                name, url.guard, url.cors, url.endpoint, route_key="$default", raw_path=raw_path, source=path
            )
        found = self._routes.find(path, method)
        if found is None:
            return denied(404, "Not Found")
        if method not in _ALLOWED_METHODS:  # an `ANY` route takes HTTP API's methods, not WebDAV's or a made-up one
            return _not_allowed(_ALLOWED_METHODS)
        route = found.route
        if route is None:
            policies = [cors for r in found.matched if (cors := self._route_guards[r][1]) is not None]
            preflight = policies[0].preflight(request) if policies else None
            return preflight or _not_allowed(found.allowed)
        guard, cors = self._route_guards[route]
        return _Target(
            route.function,
            guard,
            cors,
            self._endpoint,
            route_key=route.route_key(method),
            raw_path=path,
            source=route.path,
            params=found.params,
            asynchronous=route.trigger.mode == "async",
        )

    async def _serve(self, target: _Target, request: Request, caller: Caller | None) -> Response:
        guard = target.guard
        if (refused := guard.before_body(request, caller)) is not None:
            return refused
        identity = None
        if guard.auth == "aws_iam":
            assert caller is not None, "before_body refused it"
            if not caller.allows("lambda:InvokeFunctionUrl", target.function):
                return iam_forbidden()
            identity = Identity(caller.name, self.settings.account_id)
        body = await request.read(self.settings.max_body)
        if (refused := guard.after_body(request, body)) is not None:
            return refused
        event = request_event(
            request,
            body,
            endpoint=target.endpoint,
            route_key=target.route_key,
            raw_path=target.raw_path,
            path_parameters=target.params,
            identity=identity,
        )
        if target.asynchronous:
            return await self._store(target, request, event)
        return await self._invoke(target.function, request, event)

    async def _invoke(self, function: str, request: Request, event: bytes) -> Response:
        invocation = Invocation(
            request_id=request.request_id,
            payload=event,
            is_json=True,
            # Over a cap an HTTP caller is told at once (Lambda's 429), never queued without bound.
            wait_for_slot=False,
            # The server held the body to `max_body` already; the event's own size follows from it.
            max_request_bytes=None,
            max_response_bytes=SYNC_PAYLOAD_LIMIT,
        )
        outcome = await self.functions.invoke(function, invocation)
        if outcome.error is not None:
            return _failed(function, request, outcome)
        mapped = http_response(outcome.payload)
        if isinstance(mapped, str):
            log.warning(
                "%s: request %s: the result is not a valid function URL response: %s; answered 502",
                function,
                request.request_id,
                mapped,
            )
            return denied(502, "Internal Server Error")
        return mapped

    async def _store(self, target: _Target, request: Request, event: bytes) -> Response:
        """Store a webhook's event on its function's async queue; 202 once JetStream has it."""
        function = target.function
        if len(event) + 4096 > self.bus.max_payload:  # room for the headers within one NATS message
            return denied(
                413,
                f"Request Entity Too Large: a webhook's event must fit one NATS message ({self.bus.max_payload} "
                "bytes, the server's max_payload)",
            )
        subject = subjects.ASYNC_PREFIX + function
        stored = events.new_event(subject, event, source=target.source, type=WEBHOOK_EVENT_TYPE, id=request.request_id)
        headers = events.binary_headers(stored)
        delivery = next((v for name in DELIVERY_HEADERS if (v := request.header(name))), None)
        if delivery is not None:
            headers["Nats-Msg-Id"] = str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{function}\n{delivery}"))
        try:
            pending = await self.bus.publish_soon(subject, event, headers)
            published = await pending.stored(STORE_TIMEOUT)
            event_id = stored.id
            if published.duplicate:  # a redelivery: the event stored first is the one
                record = await self.bus.get(subjects.EVENTS_STREAM, published.seq)
                event_id = (record.headers or {}).get("ce-id", "") if record is not None else ""
                if not event_id:
                    raise LookupError(f"event {published.seq} of {subjects.EVENTS_STREAM} is gone")
        except Exception as exc:  # NATS down, no stream, no ack in time: the sender must try again
            log.warning(
                "%s: webhook request %s could not be stored (%s: %s); answered 503",
                function,
                request.request_id,
                type(exc).__name__,
                exc,
            )
            return denied(
                503, "Service Unavailable: the event could not be stored; send it again", (("Retry-After", "1"),)
            )
        return Response(202, [("Content-Type", "application/json")], _json.encode({"eventId": event_id}))


def _not_allowed(allowed: frozenset[str]) -> Response:
    methods = ", ".join(sorted(allowed))
    return denied(405, f"Method Not Allowed: this path takes {methods}", (("Allow", methods),))


def _failed(function: str, request: Request, outcome: Outcome) -> Response:
    """The answer to an invocation that failed, as a function URL gives it (the details stay in the log)."""
    error = outcome.error
    assert error is not None
    if error.function_error:
        status = 504 if error.type == "Sandbox.Timedout" else 502
        log.warning("%s: request %s failed (%s); answered %d", function, request.request_id, error.type, status)
        message = "Endpoint request timed out" if status == 504 else "Internal Server Error"
        return denied(status, message)
    if outcome.status == 429:
        return denied(429, f"Too Many Requests: {error.message}", (("Retry-After", "1"),))
    return denied(outcome.status, error.message)
