"""The service's request/reply surface: sync invoke (`eventfn.invoke.<function>`) and the control API
(`eventfn.api.functions`, `eventfn.api.mappings[.enable|.disable]`) that the CLI talks to.

Requests are served by queue group `eventfn`, so several service processes share them. A sync invoke over a
concurrency cap is answered at once with Lambda's 429 error rather than queued. A sync invoke that is a
CloudEvent (binary or structured mode) is normalized as a stored event is: the handler gets its data and
`context.cloud_event` its attributes; one that cannot be read is answered with a 400 error, never a crash.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec

from eventfn import decoding, events, subjects
from eventfn.broker.bus import Request
from eventfn.errors import EventDecodeError, UnreadableData
from eventfn.invoke.functions import invalid_info
from eventfn.invoke.workers import error_payload, load_failure
from eventfn.sources import mappings
from eventfn.sources.dispatch import Stats

if TYPE_CHECKING:
    from eventfn.service import Service

log = logging.getLogger(__name__)

EVENTS_STREAM = subjects.EVENTS_STREAM
SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
#: Header of a sync invoke that holds Lambda's client context: base64 of a JSON object.
CLIENT_CONTEXT_HEADER = "Eventfn-Client-Context"


class MappingInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What `eventfn mappings` shows for one mapping (counters are this service process's)."""

    name: str
    function: str
    subjects: list[str]
    state: str
    batch_size: int
    batch_window: float
    filters: int
    max_concurrency: int
    lag: int
    in_flight: int
    stats: Stats


class Api:
    """Serves requests for one `Service` until `stop()`; in-flight requests finish first."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._intake = anyio.CancelScope()
        self.done = anyio.Event()

    def stop(self) -> None:
        """Take no new requests (those in flight finish; `done` is set after)."""
        self._intake.cancel()

    async def serve_requests(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Answer sync invokes and control requests until intake stops; in-flight ones finish."""
        try:
            await self._serve_requests(task_status)
        finally:
            self.done.set()

    async def _serve_requests(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as inflight:
            with self._intake:
                async with (
                    self.service.bus.requests(subjects.INVOKE_PREFIX + "*", queue="eventfn") as invokes,
                    self.service.bus.requests(subjects.API_PREFIX + ">", queue="eventfn") as api,
                ):
                    task_status.started()
                    async with anyio.create_task_group() as readers:
                        readers.start_soon(self._read, invokes, inflight, self._invoke_sync)
                        readers.start_soon(self._read, api, inflight, self._api)

    @staticmethod
    async def _read(
        stream: AsyncIterator[Request], tg: anyio.abc.TaskGroup, handle: Callable[[Request], Awaitable[None]]
    ) -> None:
        async for request in stream:
            tg.start_soon(_guarded, handle, request)

    async def _invoke_sync(self, request: Request) -> None:
        name = request.subject.removeprefix(subjects.INVOKE_PREFIX)
        fn = self.service.functions.get(name)
        request_id = str(uuid.uuid4())
        if fn is None:
            return await _reply_error(
                request,
                404,
                "ResourceNotFoundException",
                # Lambda's message: no list of the other functions (an invoker may not see them).
                f"Function not found: {name}",
            )
        invocation_type = (request.headers or {}).get("Eventfn-Invocation-Type", "RequestResponse")
        if invocation_type == "DryRun":  # Lambda's: the function exists and may be invoked; nothing runs
            return await request.respond(b"", {"Eventfn-Status": "204"})
        if invocation_type != "RequestResponse":
            return await _reply_error(
                request,
                400,
                "InvalidParameterValueException",
                f"Eventfn-Invocation-Type {invocation_type!r}: use RequestResponse or DryRun here "
                f"(for an Event invocation publish to {subjects.ASYNC_PREFIX}{name})",
            )
        if len(request.data) > SYNC_PAYLOAD_LIMIT:
            return await _reply_error(
                request,
                413,
                "RequestTooLargeException",
                f"Request must be smaller than {SYNC_PAYLOAD_LIMIT} bytes for the InvokeFunction operation",
            )
        if fn.pool is None:  # the function failed to load: Lambda's error object for that failure
            if fn.load_error is not None:
                body = load_failure(fn.load_error, request_id).payload
            else:
                body = _encode_error("Runtime.ImportModuleError", fn.last_error or "function is not loaded")
            return await request.respond(
                body, {"Eventfn-Function-Error": "Unhandled", "Eventfn-Request-Id": request_id}
            )
        payload, client_context, cloud_event = request.data, None, None
        if request.headers:
            try:
                client_context = _client_context(request.headers)
                if events.is_cloud_event(request.headers):
                    event = events.from_nats(request.subject, request.data, request.headers, fallback_id=request_id)
                    payload, cloud_event = event.data, events.to_attributes(event)
            except EventDecodeError as exc:
                return await _reply_error(request, 400, "InvalidRequestContentException", str(exc))
            except UnreadableData as exc:
                message = f"{CLIENT_CONTEXT_HEADER} must be a base64-encoded JSON object: {exc.problem}"
                return await _reply_error(request, 400, "InvalidRequestContentException", message)
        # Over a cap a sync caller is told at once (Lambda's 429), never queued without bound.
        if fn.disabled:
            reason: str | None = "ReservedFunctionConcurrentInvocationLimitExceeded"
        else:
            reason = fn.try_reserve()
        if reason is not None:
            return await _reply_error(request, 429, "TooManyRequestsException", f"Rate Exceeded. Reason: {reason}")
        try:
            outcome = await fn.pool.invoke(request_id, payload, client_context=client_context, cloud_event=cloud_event)
        finally:
            fn.release()
        headers = {"Eventfn-Request-Id": request_id}
        payload = outcome.payload
        limit = min(SYNC_PAYLOAD_LIMIT, self.service.bus.max_payload - 1024)
        if len(payload) > limit:
            payload = error_payload(
                "Function.ResponseSizeTooLarge",
                f"Response payload size ({len(payload)} bytes) exceeded maximum allowed payload size ({limit} bytes).",
                request_id,
            )
            outcome = msgspec.structs.replace(outcome, ok=False, error_type="Unhandled")
        if not outcome.ok:
            headers["Eventfn-Function-Error"] = outcome.error_type or "Unhandled"
        with anyio.CancelScope(shield=True):
            await request.respond(payload, headers)

    async def _api(self, request: Request) -> None:
        op = request.subject.removeprefix(subjects.API_PREFIX)
        if op == "functions":
            infos = [fn.info() for fn in sorted(self.service.functions.values(), key=lambda f: f.name)]
            infos += [invalid_info(entry, reason) for entry, reason in sorted(self.service.invalid.items())]
            await request.respond(msgspec.json.encode(infos))
        elif op == "mappings":
            await request.respond(msgspec.json.encode(await self._mapping_infos()))
        elif op in ("mappings.enable", "mappings.disable"):
            name = request.data.decode(errors="replace").strip()
            if name not in self.service.provisioned:
                known = ", ".join(sorted(self.service.provisioned))
                return await _reply_error(
                    request, 404, "ResourceNotFoundException", f"no mapping named {name!r} (mappings: {known})"
                )
            enable = op.endswith("enable")
            mapping = self.service.provisioned[name]
            await mappings.set_enabled(self.service.bus, mapping, enable)
            if enable and (running := self.service.running.get(name)):
                running.dispatcher.feed.refresh()  # requests that waited through the pause go unserved
            [info] = [i for i in await self._mapping_infos() if i.name == name]
            await request.respond(msgspec.json.encode(info))
        else:
            await _reply_error(request, 400, "InvalidRequestContentException", f"unknown operation {op!r}")

    async def _mapping_infos(self) -> list[MappingInfo]:
        infos = []
        for name, mapping in sorted(self.service.provisioned.items()):
            running = self.service.running.get(name)
            state = await self.service.bus.consumer_state(mapping.source.stream, name)
            if state is None:
                continue
            infos.append(
                MappingInfo(
                    name=name,
                    function=mapping.function,
                    subjects=list(mapping.source.subjects),
                    state="Disabled" if state.paused else ("Enabled" if running else "Inactive"),
                    batch_size=mapping.batch_size,
                    batch_window=mapping.batch_window,
                    filters=len(mapping.filters),
                    max_concurrency=mapping.concurrency,
                    lag=state.pending,
                    in_flight=state.ack_pending,
                    stats=running.dispatcher.stats if running else Stats(),
                )
            )
        return infos


async def _guarded(handle: Callable[[Request], Awaitable[None]], request: Request) -> None:
    """Run one request handler; an unexpected error is logged and answered, never the end of the service."""
    try:
        await handle(request)
    except Exception as exc:
        log.exception("request on %s failed", request.subject)
        with anyio.CancelScope(shield=True):
            try:
                await _reply_error(request, 500, "ServiceException", f"{type(exc).__name__}: {exc}")
            except Exception:  # the reply itself cannot go out: the caller times out, the service goes on
                log.warning("could not answer the failed request on %s", request.subject)


def _client_context(headers: Mapping[str, str]) -> bytes | None:
    """The JSON of a request's client context, checked; raises `UnreadableData` for one that is not base64 JSON
    of an object (Lambda refuses those too)."""
    raw = headers.get(CLIENT_CONTEXT_HEADER)
    if not raw:
        return None
    data = decoding.base64_bytes(raw)
    value: Any = decoding.json_value(data)
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else "a string" if isinstance(value, str) else "a scalar"
        raise UnreadableData(f"it is {kind}, not an object")
    return data


def _encode_error(error_type: str, message: str) -> bytes:
    return msgspec.json.encode({"errorType": error_type, "errorMessage": message})


async def _reply_error(request: Request, status: int, error_type: str, message: str) -> None:
    await request.respond(
        _encode_error(error_type, message), {"Eventfn-Error": error_type, "Eventfn-Status": str(status)}
    )
