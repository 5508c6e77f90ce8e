"""The one transport-neutral invocation: what a caller asks for (`Invocation`) and what it comes to (`Outcome`).

Every way of running a function (a sync request over NATS or HTTP, an async invoke, a mapping's event or batch)
builds an `Invocation` and awaits `Functions.invoke` (or `Function.invoke` for a function it holds). Throttling,
size limits, the client context, deadlines, keepalive, START/END/REPORT and Lambda's error object are handled
there, once; a front only maps an `Outcome` onto its transport.

Lambda's error object is typed where it is made: the worker sends its fields beside its JSON, and the errors
eventfn makes (timeouts, crashes, throttles...) are built here, bytes and `LambdaError` together. Nothing parses
an error's JSON to learn its type. Imported by the worker before user code: msgspec and eventfn's errors only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from eventfn.errors import HandlerLoadError

#: Lambda's limit on a sync request, and on a sync response.
SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024


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
    #: Lambda's DryRun: say whether the function exists and may be invoked; nothing runs.
    dry_run: bool = False
    #: The most bytes of payload accepted (Lambda's 6 MB for a sync request); None: stored events, already sized.
    max_request_bytes: int | None = None
    #: The most bytes of result the caller can take (Lambda's 6 MB sync limit, or less: NATS's max payload).
    max_response_bytes: int | None = None
    #: Lambda's `X-Amz-Log-Type: Tail`: keep the end of this invocation's log for `Outcome.log`. Off by default:
    #: nothing is buffered unless a caller asks.
    log_tail: bool = False


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one invocation came to: the JSON result, or Lambda's error object (as bytes and typed)."""

    ok: bool
    #: The handler's result as JSON (or raw bytes it returned); Lambda's error object when not `ok`.
    payload: bytes
    #: Set when not `ok`.
    error: LambdaError | None = None
    #: 200, 204 for a DryRun, or the status of an invocation error (404, 413, 429, 400, 500).
    status: int = 200
    #: The handler's own run time, where it ran to the end.
    duration_ms: float = 0.0
    #: With `Invocation.log_tail`: the last 4 KB of the invocation's log (START, the handler's output, END, REPORT),
    #: as Lambda's `X-Amz-Log-Result` has it before its base64.
    log: bytes = b""

    @property
    def function_error(self) -> bool:
        """Lambda's `X-Amz-Function-Error`: the function ran (or failed to load) and failed."""
        return self.error is not None and self.error.function_error


class Execution(msgspec.Struct, frozen=True, kw_only=True):
    """What a pool reports of one run: its outcome, and what the REPORT line says about it."""

    outcome: Outcome
    #: The REPORT line's Duration: the handler's time, or the time until eventfn gave up on it.
    duration_ms: float
    #: Set on a cold start: Lambda's Init Duration.
    init_ms: float | None = None
    max_rss_mb: int | None = None
    #: Where it ran, when that is not a worker process (`inprocess`).
    isolation: str | None = None


#: Lambda's reply to a DryRun: the function exists and may be invoked.
DRY_RUN = Outcome(ok=True, payload=b"", status=204)


class _ErrorObject(msgspec.Struct, frozen=True, omit_defaults=True):
    """Lambda's error object for a function error, its keys in the order Lambda's runtime writes them."""

    errorMessage: str
    errorType: str
    requestId: str
    #: Absent where Lambda gives none (out of memory, a timeout), `[]` where it gives an empty one.
    stackTrace: list[str] | None = None


class _BriefError(msgspec.Struct, frozen=True):
    """The error object of an invocation error (Lambda's API errors have no request id or stack)."""

    errorType: str
    errorMessage: str


_json = msgspec.json.Encoder()


def error_object(
    error_type: str, message: str, request_id: str, stack_trace: list[str] | None = None
) -> tuple[bytes, LambdaError]:
    """Lambda's error object for a function error, as JSON and typed (with `stackTrace` only if given)."""
    body = _json.encode(_ErrorObject(message, error_type, request_id, stack_trace))
    return body, LambdaError(type=error_type, message=message, stack_trace=stack_trace or [])


def failure(error_type: str, message: str, request_id: str, stack_trace: list[str] | None = None) -> Outcome:
    """The outcome of a function error eventfn made (not an exception in handler code)."""
    body, error = error_object(error_type, message, request_id, stack_trace)
    return Outcome(ok=False, payload=body, error=error)


def refusal(status: int, error_type: str, message: str) -> Outcome:
    """The outcome of an invocation error: the handler was not run; `status` is its HTTP status."""
    error = LambdaError(type=error_type, message=message, function_error=False)
    return Outcome(ok=False, payload=_json.encode(_BriefError(error_type, message)), error=error, status=status)


def not_found(function: str) -> Outcome:
    """Lambda's 404 (its message lists no other function: an invoker may not see them)."""
    return refusal(404, "ResourceNotFoundException", f"Function not found: {function}")


def request_too_large(limit: int) -> Outcome:
    """Lambda's 413 for a request payload over `limit` bytes."""
    return refusal(
        413, "RequestTooLargeException", f"Request must be smaller than {limit} bytes for the InvokeFunction operation"
    )


def throttled(reason: str) -> Outcome:
    """Lambda's 429, with its reason (`ReservedFunctionConcurrentInvocationLimitExceeded`, ...)."""
    return refusal(429, "TooManyRequestsException", f"Rate Exceeded. Reason: {reason}")


def load_failure(exc: HandlerLoadError, request_id: str) -> Outcome:
    """The outcome of an invocation that met a handler that fails to load: Lambda's init error object."""
    return failure(exc.error_type, exc.error_message, request_id, exc.stack_trace)


def not_loaded(problem: str) -> Outcome:
    """A function error for a function with no loaded version and no init error of Lambda's kind to tell."""
    error = LambdaError(type="Runtime.ImportModuleError", message=problem)
    return Outcome(ok=False, payload=_json.encode(_BriefError(error.type, problem)), error=error)


def timed_out(request_id: str, timeout: float) -> Outcome:
    """Lambda's outcome for an invocation that ran past the function's timeout."""
    message = f"RequestId: {request_id} Error: Task timed out after {timeout:.2f} seconds"
    return failure("Sandbox.Timedout", message, request_id)


def exited(request_id: str, problem: str) -> Outcome:
    """Lambda's outcome for a runtime that exited mid-invocation (a crash, `os._exit`, a signal)."""
    return failure("Runtime.ExitError", f"RequestId: {request_id} Error: {problem}", request_id)


def out_of_memory(request_id: str, limit_mb: int) -> tuple[bytes, LambdaError]:
    """Lambda's error for an invocation that passed the function's memory setting."""
    message = (
        f"RequestId: {request_id} Error: Runtime exited with error: memory limit of {limit_mb} MB exceeded "
        "(raise the function's `memory` setting)"
    )
    return error_object("Runtime.OutOfMemory", message, request_id)


def response_too_large(size: int, limit: int, request_id: str) -> Outcome:
    """Lambda's function error for a result over what the caller can take."""
    message = f"Response payload size ({size} bytes) exceeded maximum allowed payload size ({limit} bytes)."
    return failure("Function.ResponseSizeTooLarge", message, request_id)
