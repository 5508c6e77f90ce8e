"""Lambda's calling convention for Python handlers, shared by the worker runtime (`invoke.runtime`) and by
in-process functions (`invoke.inprocess`): loading the entry point, the `context` object, decoding the event,
and encoding the result or Lambda's error object exactly as Lambda's Python runtime does.

Imported by the worker before user code, so it keeps to the standard library, msgspec and eventfn's own small
modules: every import here is paid on each cold start.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType, TracebackType
from typing import Any

import msgspec

from eventfn import decoding
from eventfn.errors import UnreadableData
from eventfn.invoke import marshal
from eventfn.invoke.invocation import LambdaError, error_object
from eventfn.invoke.protocol import InitFailed, Invoke, WorkerSpec
from eventfn.subjects import FUNCTION_ARN_PREFIX

#: Entry points looked up when no `handler = "module.function"` setting names one.
ENTRY_NAMES = ("handler", "lambda_handler")


class CognitoIdentity:
    """Lambda's `context.identity`: always present, fields None outside Cognito."""

    cognito_identity_id: str | None = None
    cognito_identity_pool_id: str | None = None


class ClientContext:
    """Lambda's `context.client_context`, built from the JSON a sync caller sent."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.client = data.get("client")
        self.custom = data.get("custom")
        self.env = data.get("env")


class LambdaContext:
    """The `context` argument, with the attributes and method of Lambda's Python runtime."""

    function_version = "$LATEST"
    identity = CognitoIdentity()

    def __init__(self, spec: WorkerSpec, log_stream: str, invoke: Invoke, deadline: float | None = None) -> None:
        self.function_name = spec.function
        self.invoked_function_arn = FUNCTION_ARN_PREFIX + spec.function
        # Lambda's runtime reads this from the environment, so it is a string there too.
        self.memory_limit_in_mb = str(spec.memory)
        self.log_group_name = f"/aws/lambda/{spec.function}"
        self.log_stream_name = log_stream
        self.aws_request_id = invoke.request_id
        self.cloud_event = invoke.cloud_event
        self.client_context = None
        if invoke.client_context:
            try:
                self.client_context = ClientContext(decoding.json_value(invoke.client_context))
            except (UnreadableData, AttributeError):  # the service checks it; an in-process caller may not
                self.client_context = None
        self._deadline = invoke.deadline if deadline is None else deadline

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the invocation times out, floored at 0."""
        return max(0, int((self._deadline - time.time()) * 1000))


_json_decode = msgspec.json.decode

# Frames of the machinery between the runtime and the handler, left out of a stack trace as Lambda's runtime
# leaves out its bootstrap: eventfn itself, asyncio (async handlers), concurrent.futures (an in-process
# handler's thread) and the import system (init).
_STDLIB = os.path.dirname(os.__file__)
_MACHINERY = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # eventfn/
    *(os.path.join(_STDLIB, package) + os.sep for package in ("asyncio", "concurrent", "importlib")),
    "<frozen importlib.",
)


def stack_trace(tb: TracebackType | None) -> list[str]:
    """Lambda's `stackTrace`: the frames from the first one past eventfn's machinery, each formatted as
    Lambda's runtime does (`  File "path", line N, in name\n    source\n`, no column markers)."""
    frames = [(f.filename, f.lineno or 0, f.name, f.line) for f in traceback.extract_tb(tb)]
    start = 0
    while start < len(frames) and frames[start][0].startswith(_MACHINERY):
        start += 1
    return traceback.format_list(frames[start:] or frames)  # all machinery: an eventfn bug, show it whole


class UnmarshalError(Exception):
    """The event cannot be parsed as JSON (Lambda's `Runtime.UnmarshalError`): the handler is not run."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"Unable to unmarshal input: the event could not be parsed as JSON: {problem}")


def decode_event(payload: bytes, is_json: bool) -> Any:
    """The handler's `event`: JSON as Python values; otherwise text, or base64 for binary data.

    Raises `UnmarshalError` (and nothing else) for JSON nested too deeply to parse, or for a payload that is not
    JSON although `is_json` says it is. Deep JSON is not handed over as text: the handler expects its structure.
    """
    if not payload:
        return {}
    try:
        return _json_decode(payload)  # `decoding.json_value`, inlined: this runs once per event
    except decoding.ERRORS as exc:
        if is_json or isinstance(exc, RecursionError):
            raise UnmarshalError(decoding.problem(exc)) from None
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii")


def _user_location(exc: BaseException, task_root: str) -> tuple[str, int | None]:
    """The innermost file:line inside the function's own code where `exc` was raised."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return exc.filename, exc.lineno
    for entry in reversed(traceback.extract_tb(exc.__traceback__)):
        if entry.filename.startswith(task_root):
            return entry.filename, entry.lineno
    return "", None


def load_handler(spec: WorkerSpec) -> Callable[..., Any]:
    """Import the function's module (running its init code) and return the entry point."""
    sys.path.insert(0, spec.task_root)
    module: ModuleType
    if spec.entry_file:
        module_spec = importlib.util.spec_from_file_location(spec.module, spec.entry_file)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[spec.module] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec.module)
    return entry_point(module, spec)


def entry_point(module: ModuleType, spec: WorkerSpec) -> Callable[..., Any]:
    """The loaded module's handler: the configured attribute, else `handler` or `lambda_handler`."""
    names = [spec.attribute] if spec.attribute else list(ENTRY_NAMES)
    for name in names:
        entry = getattr(module, name, None)
        if callable(entry):
            return entry  # type: ignore[no-any-return]
    raise HandlerNotFound(f"Handler '{' or '.join(names)}' missing on module '{spec.module}'")


class HandlerNotFound(Exception):
    """The module loaded but has no callable entry point of the configured name."""


def init_failure(exc: BaseException, spec: WorkerSpec) -> InitFailed:
    """What Lambda's runtime reports when the handler fails to load, and where in the function's code.

    Lambda's names: `Runtime.UserCodeSyntaxError` (its one-frame stack trace included), `Runtime.ImportModuleError`
    for an import that fails, `Runtime.HandlerNotFound`; any other exception by its own type, with its stack
    trace. eventfn adds the stack trace of a failed import too, so that it says where.
    """
    file, line = _user_location(exc, spec.task_root)
    trace = stack_trace(exc.__traceback__)
    if isinstance(exc, SyntaxError):
        error_type, message = "Runtime.UserCodeSyntaxError", f"Syntax error in module '{spec.module}': {exc}"
        trace = [f'  File "{exc.filename}" Line {exc.lineno}\n    {exc.text}']
    elif isinstance(exc, HandlerNotFound):
        error_type, message, file, trace = "Runtime.HandlerNotFound", str(exc), spec.entry_file, []
    elif isinstance(exc, ImportError):
        error_type, message = "Runtime.ImportModuleError", f"Unable to import module '{spec.module}': {exc}"
    elif isinstance(exc, SystemExit):
        error_type, message = "Runtime.ExitError", f"Runtime exited with error: exit status {exc.code}"
    else:
        error_type, message = type(exc).__name__, str(exc)
    return InitFailed(
        error_type=error_type, message=message, file=file or spec.entry_file, line=line, stack_trace=trace
    )


def is_coroutine_function(entry: Callable[..., Any]) -> bool:
    """Whether `entry` is an `async def` (without importing inspect or asyncio for plain functions)."""
    code = getattr(entry, "__code__", None)
    if code is not None:
        return bool(code.co_flags & 0x80)  # CO_COROUTINE
    import inspect

    # A callable object with `async def __call__` is awaited like a coroutine function.
    return inspect.iscoroutinefunction(entry) or inspect.iscoroutinefunction(type(entry).__call__)


def encode_result(result: Any, request_id: str) -> tuple[bytes, LambdaError | None]:
    """The handler's return value as JSON (error None), or Lambda's `Runtime.MarshalError` where Lambda cannot
    encode it."""
    try:
        return marshal.encode(result), None
    except MemoryError:
        raise
    except Exception as exc:  # what Lambda's runtime catches: TypeError, ValueError (a cycle), RecursionError...
        return error_object("Runtime.MarshalError", f"Unable to marshal response: {exc}", request_id, [])


def unmarshal_error(exc: UnmarshalError, request_id: str) -> tuple[bytes, LambdaError]:
    """Lambda's error object for an event the runtime could not parse (no stack: no handler code ran)."""
    return error_object("Runtime.UnmarshalError", str(exc), request_id, [])


def error_log(error: LambdaError) -> str:
    """What Lambda's Python runtime writes to the function's log for a handler that failed: `[ERROR] <type>:
    <message>` and the traceback (its `stackTrace`), so that the log (and a `--log-type Tail`) says what failed."""
    lines = [f"[ERROR] {error.type}: {error.message}" if error.message else f"[ERROR] {error.type}"]
    if error.stack_trace:
        lines.append("Traceback (most recent call last):")
        lines += [line for frame in error.stack_trace for line in frame.splitlines()]
    return "\n".join(lines) + "\n"


def encode_exception(exc: BaseException, request_id: str) -> tuple[bytes, LambdaError]:
    """Lambda's error object for an exception the handler raised, as JSON and typed."""
    return error_object(type(exc).__name__, str(exc), request_id, stack_trace(exc.__traceback__))
