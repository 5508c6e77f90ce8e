"""The worker process: loads one handler once (Lambda's init phase) and runs it per `Invoke` frame.

Run as `python -m eventfn.runtime SPEC_JSON`. Frames travel on the process's original stdin/stdout; those
descriptors are moved aside first, so that nothing the handler writes can corrupt the protocol. The handler's
output (`print`, logging, and whatever C code or child processes write to fd 1 and 2) is tagged with the
request id, capped per invocation (`eventfn.output`) and sent to the service in `Output` frames ahead of the
invocation's `Result`.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import logging
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from types import ModuleType, TracebackType
from typing import Any, BinaryIO

import msgspec

from eventfn import decoding, marshal, sandbox
from eventfn.errors import UnreadableData
from eventfn.output import DescriptorCapture, HandlerOutput, TaggedStream
from eventfn.protocol import (
    HEADER,
    MAX_FRAME,
    InitFailed,
    Invoke,
    Output,
    Ready,
    Result,
    WorkerSpec,
    decoder,
    frame,
)
from eventfn.records import ARN_PREFIX

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

    def __init__(self, spec: WorkerSpec, log_stream: str, invoke: Invoke) -> None:
        self.function_name = spec.function
        self.invoked_function_arn = ARN_PREFIX + spec.function
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
        self._deadline = invoke.deadline

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the invocation times out, floored at 0."""
        return max(0, int((self._deadline - time.time()) * 1000))


_json = msgspec.json.Encoder()
_json_decode = msgspec.json.decode

# Frames of the machinery between the runtime and the handler, left out of a stack trace as Lambda's runtime
# leaves out its bootstrap: eventfn itself, asyncio (async handlers), concurrent.futures (an in-process
# handler's thread) and the import system (init).
_STDLIB = os.path.dirname(os.__file__)
_MACHINERY = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
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


def error_object(exc: BaseException, request_id: str = "") -> dict[str, Any]:
    """Lambda's error object for an exception raised by handler code."""
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "requestId": request_id,
        "stackTrace": stack_trace(exc.__traceback__),
    }


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


class _Channel:
    """Reads and writes frames on the descriptors moved aside from stdin/stdout."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO) -> None:
        self.reader = reader
        self.writer = writer
        self._lock = threading.Lock()  # output frames also come from handler threads and the descriptor pump

    def send(self, message: Ready | InitFailed | Result | Output) -> None:
        data = frame(message)
        with self._lock:
            self.writer.write(data)
            self.writer.flush()

    def send_output(self, data: bytes) -> None:
        self.send(Output(data=data))

    def receive(self) -> Invoke | None:
        header = self.reader.read(HEADER.size)
        if len(header) < HEADER.size:
            return None
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise SystemExit(f"eventfn worker: frame of {size} bytes exceeds the limit")
        message = decoder.decode(self.reader.read(size))
        if not isinstance(message, Invoke):
            raise SystemExit(f"eventfn worker: unexpected frame {type(message).__name__}")
        return message


def _take_protocol_descriptors() -> _Channel:
    reader = os.fdopen(os.dup(0), "rb")
    writer = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # C-level writes to stdout never reach the protocol stream (`serve` then captures both)
    return _Channel(reader, writer)


def is_coroutine_function(entry: Callable[..., Any]) -> bool:
    """Whether `entry` is an `async def` (without importing inspect or asyncio for plain functions)."""
    code = getattr(entry, "__code__", None)
    if code is not None:
        return bool(code.co_flags & 0x80)  # CO_COROUTINE
    import inspect

    # A callable object with `async def __call__` is awaited like a coroutine function.
    return inspect.iscoroutinefunction(entry) or inspect.iscoroutinefunction(type(entry).__call__)


def _max_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def encode_result(result: Any, request_id: str) -> tuple[bytes, bool]:
    """The handler's return value as JSON, or Lambda's `Runtime.MarshalError` where Lambda cannot encode it."""
    try:
        return marshal.encode(result), True
    except MemoryError:
        raise
    except Exception as exc:  # what Lambda's runtime catches: TypeError, ValueError (a cycle), RecursionError...
        error = {
            "errorMessage": f"Unable to marshal response: {exc}",
            "errorType": "Runtime.MarshalError",
            "requestId": request_id,
            "stackTrace": [],
        }
        return _json.encode(error), False


def unmarshal_error(exc: UnmarshalError, request_id: str) -> bytes:
    """Lambda's error object for an event the runtime could not parse (no stack: no handler code ran)."""
    return _json.encode(
        {"errorMessage": str(exc), "errorType": "Runtime.UnmarshalError", "requestId": request_id, "stackTrace": []}
    )


def encode_exception(exc: BaseException, request_id: str) -> bytes:
    """Lambda's error object for an exception the handler raised, as JSON."""
    return _json.encode(error_object(exc, request_id))


def out_of_memory(request_id: str, limit_mb: int) -> bytes:
    """Lambda's error for an invocation that passed the function's memory setting."""
    return _json.encode(
        {
            "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: memory limit of {limit_mb} MB "
            "exceeded (raise the function's `memory` setting)",
            "errorType": "Runtime.OutOfMemory",
            "requestId": request_id,
        }
    )


def _limit_memory(megabytes: int) -> None:
    """Cap the address space at what the interpreter uses now plus the function's memory setting.

    An allocation past it raises MemoryError in the handler (reported as Runtime.OutOfMemory, and the worker
    is replaced); the parent also fails an invocation whose resident size ended above the setting.
    """
    with open("/proc/self/statm") as statm:
        current = int(statm.read().split()[0]) * resource.getpagesize()
    limit = current + megabytes * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(spec: WorkerSpec, channel: _Channel) -> None:
    """Load the handler, report readiness, then answer `Invoke` frames until stdin closes."""
    output = HandlerOutput(spec.function, spec.max_log_bytes, channel.send_output)
    DescriptorCapture(output)
    sys.stdout = sys.stderr = TaggedStream(output, stamp=True)
    _install_logging(output)
    _limit_memory(spec.memory)
    started = time.perf_counter()
    failure: InitFailed | None = None
    try:
        entry = load_handler(spec)
    except MemoryError:
        message = f"Runtime exited with error: init passed the memory limit of {spec.memory} MB"
        failure = InitFailed(error_type="Runtime.OutOfMemory", message=message, file=spec.entry_file, line=None)
    except BaseException as exc:
        failure = init_failure(exc, spec)
    output.end()  # the init phase's output is in, and capped, before the service hears how it went
    if failure is not None:
        channel.send(failure)
        return
    loop = None
    if is_coroutine_function(entry):
        import asyncio  # only for async handlers: it is half of a cold start's imports

        loop = asyncio.new_event_loop()
    channel.send(Ready(init_ms=(time.perf_counter() - started) * 1000))
    log_stream = f"{datetime.now(UTC):%Y/%m/%d}/[$LATEST]{os.getpid():08x}"
    while (invoke := channel.receive()) is not None:
        output.begin(invoke.request_id)
        begin = time.perf_counter()
        fatal = False
        try:
            event = decode_event(invoke.payload, invoke.is_json)
            result = entry(event, LambdaContext(spec, log_stream, invoke))
            if loop is not None:
                result = loop.run_until_complete(result)
            payload, ok = encode_result(result, invoke.request_id)
        except UnmarshalError as exc:
            payload, ok = unmarshal_error(exc, invoke.request_id), False
        except MemoryError:
            # The interpreter may be in a bad state: report, then let the pool replace this worker.
            payload, ok, fatal = out_of_memory(invoke.request_id, spec.memory), False, True
        except Exception as exc:
            payload, ok = encode_exception(exc, invoke.request_id), False
        output.end()  # this invocation's output goes out ahead of its result
        duration = (time.perf_counter() - begin) * 1000
        channel.send(Result(ok=ok, payload=payload, duration_ms=duration, max_rss_mb=_max_rss_mb(), fatal=fatal))


class _RequestIdFilter(logging.Filter):
    """Adds the current request id to log records, as Lambda's runtime does (`%(aws_request_id)s`)."""

    def __init__(self, output: HandlerOutput) -> None:
        super().__init__()
        self.output = output

    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = self.output.request_id
        return True


def _install_logging(output: HandlerOutput) -> None:
    """Lambda's root-logger set-up: one handler, `[LEVEL] time request-id message`, level WARNING."""
    handler = logging.StreamHandler(TaggedStream(output, stamp=False))
    formatter = logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime  # the `Z`: UTC, as Lambda's runtime sets it
    handler.setFormatter(formatter)
    handler.addFilter(_RequestIdFilter(output))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def main() -> None:
    """Entry point of a worker process."""
    spec = msgspec.json.decode(sys.argv[1].encode(), type=WorkerSpec)
    sandbox.confine()  # reads the preamble on stdin, before the protocol takes it over
    channel = _take_protocol_descriptors()
    os.chdir(spec.task_root)
    serve(spec, channel)


if __name__ == "__main__":
    main()
