"""The one transport-neutral invocation: what a caller asks for (`Invocation`) and what it comes to (`Outcome`).

Every way of running a function (a sync request over NATS or HTTP, an async invoke, a mapping's event or batch)
builds an `Invocation` and awaits `Function.invoke`. Throttling, size limits, the client context, deadlines,
keepalive, START/END/REPORT and Lambda's error object are handled there, once; a front only maps an `Outcome`
onto its transport.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec


class LambdaError(msgspec.Struct, frozen=True, kw_only=True):
    """Lambda's error object, read once from the worker's reply (or made by eventfn), as typed fields."""

    #: Lambda's `errorType`, e.g. `ValueError`, `Sandbox.Timedout`, `TooManyRequestsException`.
    type: str
    #: Lambda's `errorMessage`.
    message: str
    #: Lambda's `stackTrace` (the handler's frames); empty where Lambda gives none.
    stack_trace: list[str] = []
    #: True for an error of the function (Lambda's `X-Amz-Function-Error: Unhandled`: an exception, a timeout, a
    #: crash, a failed init); False for an invocation error that never reached the handler (throttled, not found,
    #: too large), which has an HTTP-style `status` on the `Outcome`.
    function_error: bool = True


class Invocation(msgspec.Struct, frozen=True, kw_only=True):
    """One call of a function, from any front or mapping."""

    request_id: str
    #: The event as the handler's runtime receives it (JSON, text or bytes).
    payload: bytes
    #: The payload is known-valid JSON (a batch eventfn built): the runtime does not check it again.
    is_json: bool = False
    #: Lambda's client context: the JSON of an object, already checked.
    client_context: bytes | None = None
    #: CloudEvents attributes for `context.cloud_event`.
    cloud_event: dict[str, str] | None = None
    #: True (stored events): wait for a concurrency slot. False (sync callers): throttled at once, Lambda's 429.
    wait_for_slot: bool = True
    #: While the invocation waits for a slot, called every `keepalive_every` seconds (a stored event's ack wait
    #: must not run out meanwhile); during the run itself by the caller's own means.
    keepalive: Callable[[], Awaitable[None]] | None = None
    keepalive_every: float = 10.0
    #: The most bytes of result the caller can take (Lambda's 6 MB sync limit, or less: NATS's max payload).
    max_response_bytes: int | None = None


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one invocation came to: the JSON result, or Lambda's error object (as bytes and typed)."""

    ok: bool
    #: The handler's result as JSON (or raw bytes it returned); Lambda's error object when not `ok`.
    payload: bytes
    #: Set when not `ok`.
    error: LambdaError | None = None
    #: 200, or the status of an invocation error (404, 413, 429, 400, 500).
    status: int = 200
    duration_ms: float = 0.0

    @property
    def function_error(self) -> bool:
        """Lambda's `X-Amz-Function-Error`: the function ran (or failed to load) and failed."""
        return self.error is not None and self.error.function_error
