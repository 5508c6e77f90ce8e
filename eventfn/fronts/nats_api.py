"""The service's request/reply surface over NATS: sync invoke (`eventfn.invoke.<function>`) and the control API
(`eventfn.api.functions`, `eventfn.api.mappings[.enable|.disable]`) that the CLI talks to.

Requests are served by queue group `eventfn`, so several service processes share them. A sync invoke is a thin
adapter over `Functions.invoke`: its headers become an `Invocation` (invocation type, client context, and a
CloudEvent in binary or structured mode, normalized as a stored event is), and the `Outcome` becomes the reply.
A request whose headers cannot be read is answered with a 400 error, never a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream

from eventfn import decoding, events, subjects
from eventfn.broker.bus import Bus, Request
from eventfn.errors import EventDecodeError, UnreadableData
from eventfn.invoke.functions import Function, Functions, invalid_info
from eventfn.invoke.invocation import SYNC_PAYLOAD_LIMIT, Invocation, Outcome, refusal
from eventfn.sources import mappings
from eventfn.sources.dispatch import Running, Stats

log = logging.getLogger(__name__)

EVENTS_STREAM = subjects.EVENTS_STREAM
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


class Catalog(Protocol):
    """What the control API reads of the service: its functions, the handler entries refused for their names
    (entry -> reason), the mappings provisioned and those running, by name."""

    @property
    def functions(self) -> Mapping[str, Function]: ...

    @property
    def invalid(self) -> Mapping[str, str]: ...

    @property
    def provisioned(self) -> Mapping[str, mappings.Mapping]: ...

    @property
    def running(self) -> Mapping[str, Running]: ...


class Api:
    """Serves sync invokes through `functions` and control requests about `catalog` until `stop()`; in-flight
    requests finish first."""

    def __init__(self, bus: Bus, functions: Functions, catalog: Catalog) -> None:
        self.bus = bus
        self.functions = functions
        self.catalog = catalog
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
        inflight = _InFlight()
        try:
            with self._intake:
                async with (
                    self.bus.requests(subjects.INVOKE_PREFIX + "*", queue="eventfn") as invokes,
                    self.bus.requests(subjects.API_PREFIX + ">", queue="eventfn") as api,
                ):
                    task_status.started()
                    async with anyio.create_task_group() as readers:
                        readers.start_soon(self._read, invokes, inflight, self._invoke_sync)
                        readers.start_soon(self._read, api, inflight, self._api)
        finally:
            await inflight.finish()

    @staticmethod
    async def _read(
        stream: MemoryObjectReceiveStream[Request], inflight: _InFlight, handle: Callable[[Request], Awaitable[None]]
    ) -> None:
        while True:
            # What has arrived is taken without a wait (anyio's receive yields to the loop even with items waiting).
            try:
                try:
                    request = stream.receive_nowait()
                except anyio.WouldBlock:
                    request = await stream.receive()
            except anyio.EndOfStream:
                return
            inflight.start(_guarded(handle, request))

    async def _invoke_sync(self, request: Request) -> None:
        name = request.subject.removeprefix(subjects.INVOKE_PREFIX)
        request_id = events.new_request_id()
        headers = request.headers or {}
        invocation_type = headers.get("Eventfn-Invocation-Type", "RequestResponse")
        if invocation_type not in ("RequestResponse", "DryRun"):
            message = (
                f"Eventfn-Invocation-Type {invocation_type!r}: use RequestResponse or DryRun here "
                f"(for an Event invocation publish to {subjects.ASYNC_PREFIX}{name})"
            )
            return await _respond(request, refusal(400, "InvalidParameterValueException", message), request_id)
        dry_run = invocation_type == "DryRun"
        payload, client_context, cloud_event = request.data, None, None
        if headers and not dry_run:  # a DryRun runs nothing: what the handler would get is not read
            try:
                client_context = _client_context(headers)
                if events.is_cloud_event(headers):
                    event = events.from_nats(request.subject, request.data, headers, fallback_id=request_id)
                    payload, cloud_event = event.data, events.to_attributes(event)
            except EventDecodeError as exc:
                return await _respond(request, refusal(400, "InvalidRequestContentException", str(exc)), request_id)
            except UnreadableData as exc:
                message = f"{CLIENT_CONTEXT_HEADER} must be a base64-encoded JSON object: {exc.problem}"
                return await _respond(request, refusal(400, "InvalidRequestContentException", message), request_id)
        invocation = Invocation(
            request_id=request_id,
            payload=payload,
            client_context=client_context,
            cloud_event=cloud_event,
            # Over a cap a sync caller is told at once (Lambda's 429), never queued without bound.
            wait_for_slot=False,
            dry_run=dry_run,
            max_request_bytes=SYNC_PAYLOAD_LIMIT,
            # Room for the reply's headers within one NATS message.
            max_response_bytes=min(SYNC_PAYLOAD_LIMIT, self.bus.max_payload - 1024),
        )
        outcome = await self.functions.invoke(name, invocation)
        with anyio.CancelScope(shield=True):
            await _respond(request, outcome, request_id)

    async def _api(self, request: Request) -> None:
        op = request.subject.removeprefix(subjects.API_PREFIX)
        catalog = self.catalog
        if op == "functions":
            infos = [fn.info() for fn in sorted(catalog.functions.values(), key=lambda f: f.name)]
            infos += [invalid_info(entry, reason) for entry, reason in sorted(catalog.invalid.items())]
            await request.respond(msgspec.json.encode(infos))
        elif op == "mappings":
            await request.respond(msgspec.json.encode(await self._mapping_infos()))
        elif op in ("mappings.enable", "mappings.disable"):
            name = request.data.decode(errors="replace").strip()
            if name not in catalog.provisioned:
                known = ", ".join(sorted(catalog.provisioned))
                return await _reply_error(
                    request, 404, "ResourceNotFoundException", f"no mapping named {name!r} (mappings: {known})"
                )
            enable = op.endswith("enable")
            mapping = catalog.provisioned[name]
            await mappings.set_enabled(self.bus, mapping, enable)
            if enable and (running := catalog.running.get(name)):
                running.dispatcher.feed.refresh()  # requests that waited through the pause go unserved
            [info] = [i for i in await self._mapping_infos() if i.name == name]
            await request.respond(msgspec.json.encode(info))
        else:
            await _reply_error(request, 400, "InvalidRequestContentException", f"unknown operation {op!r}")

    async def _mapping_infos(self) -> list[MappingInfo]:
        infos = []
        for name, mapping in sorted(self.catalog.provisioned.items()):
            running = self.catalog.running.get(name)
            state = await self.bus.consumer_state(mapping.source.stream, name)
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


class _InFlight:
    """The requests being answered, one asyncio task each: what a task group per request did, at a third of its
    cost (anyio's `start_soon` was 8% of the service's time under sync invokes, py-spy)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, request: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(request)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self) -> None:
        """Wait until every request is answered; cancelled meanwhile, cancel them (as a task group would) and wait
        for them to end."""
        try:
            while self._tasks:
                await asyncio.wait(list(self._tasks))
        except BaseException:
            for task in self._tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                while self._tasks:
                    await asyncio.wait(list(self._tasks))
            raise


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
    return decoding.base64_json_object(raw) if raw else None


async def _respond(request: Request, outcome: Outcome, request_id: str) -> None:
    """Answer with `outcome`: an invocation error by `Eventfn-Error` and `Eventfn-Status`, a DryRun by its status
    alone; a result (or a function error, `Eventfn-Function-Error`) with the request id."""
    error = outcome.error
    if error is not None and not error.function_error:
        headers = {"Eventfn-Error": error.type, "Eventfn-Status": str(outcome.status)}
    elif outcome.status != 200:
        headers = {"Eventfn-Status": str(outcome.status)}
    else:
        headers = {"Eventfn-Request-Id": request_id}
        if error is not None:
            headers["Eventfn-Function-Error"] = "Unhandled"
    await request.respond(outcome.payload, headers)


async def _reply_error(request: Request, status: int, error_type: str, message: str) -> None:
    await _respond(request, refusal(status, error_type, message), "")
