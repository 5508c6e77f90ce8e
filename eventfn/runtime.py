"""The worker process: loads one handler once (Lambda's init phase) and runs it per `Invoke` frame.

Run as `python -m eventfn.runtime SPEC_JSON`. Frames travel on the process's original stdin/stdout; those
descriptors are moved aside first, so that the handler's `print` (and any C library writing to fd 1) goes to
stderr, tagged with the request id, instead of corrupting the protocol.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import io
import logging
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, BinaryIO

import msgspec

from eventfn import sandbox
from eventfn.protocol import (
    HEADER,
    MAX_FRAME,
    InitFailed,
    Invoke,
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
                self.client_context = ClientContext(msgspec.json.decode(invoke.client_context))
            except (msgspec.DecodeError, AttributeError):
                self.client_context = None
        self._deadline = invoke.deadline

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the invocation times out, floored at 0."""
        return max(0, int((self._deadline - time.time()) * 1000))


class _TaggedStream(io.TextIOBase):
    """Stdout/stderr for handler code: each line goes to fd 2 prefixed with Lambda's log-line fields."""

    def __init__(self, function: str, *, stamp: bool = True) -> None:
        self.function = function
        self.request_id = "-"
        self._stamp = stamp  # False for the logging handler's stream: its format has the fields already
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        if "\n" in self._buffer:
            *lines, self._buffer = self._buffer.split("\n")
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            if self._stamp:
                out = "".join(f"[{self.function}] {stamp}\t{self.request_id}\t{line}\n" for line in lines)
            else:
                out = "".join(f"[{self.function}] {line}\n" for line in lines)
            os.write(2, out.encode("utf-8", "replace"))
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            self.write("\n")


def _encode_default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


# Decimal as a JSON number, as Lambda's runtime does (DynamoDB hands out Decimals). More lenient than Lambda:
# datetime, set and bytes are encoded (ISO string, array, base64) where Lambda reports Runtime.MarshalError.
_json = msgspec.json.Encoder(enc_hook=_encode_default, decimal_format="number")
_json_decode = msgspec.json.decode


def error_object(exc: BaseException, *, task_root: str | None = None, skip_frames: int = 0) -> dict[str, Any]:
    """Lambda's error object for an exception raised by handler code.

    The stack trace starts at the first frame of the function's own code (under `task_root`), dropping the
    runtime's frames above it, as Lambda's runtime does; without one, `skip_frames` are dropped.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    start = next((i for i, f in enumerate(frames) if task_root and f.filename.startswith(task_root)), skip_frames)
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "requestId": "",
        "stackTrace": traceback.format_list(frames[start:]),
    }


def decode_event(payload: bytes, is_json: bool) -> Any:
    """The handler's `event`: JSON as Python values; otherwise text, or base64 for binary data."""
    if not payload:
        return {}
    try:
        return _json_decode(payload)
    except msgspec.DecodeError:
        if is_json:
            raise
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
    file, line = _user_location(exc, spec.task_root)
    if isinstance(exc, SyntaxError):
        error_type = "Runtime.UserCodeSyntaxError"
        message = f"Syntax error in module '{spec.module}': {exc.msg} ({os.path.basename(file)}, line {line})"
    elif isinstance(exc, HandlerNotFound):
        error_type, message, file = "Runtime.HandlerNotFound", str(exc), spec.entry_file
    else:
        error_type = "Runtime.ImportModuleError"
        message = f"Unable to import module '{spec.module}': {type(exc).__name__}: {exc}"
    error = {"errorMessage": message, "errorType": error_type, "requestId": "", "stackTrace": []}
    return InitFailed(
        error_type=error_type, message=message, file=file or spec.entry_file, line=line, error=_json.encode(error)
    )


class _Channel:
    """Reads and writes frames on the descriptors moved aside from stdin/stdout."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, message: Ready | InitFailed | Result) -> None:
        self.writer.write(frame(message))
        self.writer.flush()

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
    os.dup2(2, 1)  # C-level writes to stdout land on stderr, never in the protocol stream
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
    """The handler's return value as JSON, or Lambda's marshal error."""
    try:
        return _json.encode(result), True
    except TypeError as exc:
        error = {
            "errorMessage": f"Unable to marshal response: {exc}",
            "errorType": "Runtime.MarshalError",
            "requestId": request_id,
            "stackTrace": [],
        }
        return _json.encode(error), False


def encode_exception(exc: BaseException, request_id: str, task_root: str) -> bytes:
    """Lambda's error object for an exception the handler raised, as JSON."""
    error = error_object(exc, task_root=task_root, skip_frames=1)
    error["requestId"] = request_id
    return _json.encode(error)


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
    tagged = _TaggedStream(spec.function)
    sys.stdout = tagged
    sys.stderr = tagged
    _install_logging(tagged)
    _limit_memory(spec.memory)
    started = time.perf_counter()
    try:
        entry = load_handler(spec)
    except MemoryError:
        channel.send(init_failure(MemoryError(f"init passed the memory limit of {spec.memory} MB"), spec))
        return
    except BaseException as exc:
        channel.send(init_failure(exc, spec))
        return
    loop = None
    if is_coroutine_function(entry):
        import asyncio  # only for async handlers: it is half of a cold start's imports

        loop = asyncio.new_event_loop()
    channel.send(Ready(init_ms=(time.perf_counter() - started) * 1000))
    log_stream = f"{datetime.now(UTC):%Y/%m/%d}/[$LATEST]{os.getpid():08x}"
    while (invoke := channel.receive()) is not None:
        tagged.request_id = invoke.request_id
        begin = time.perf_counter()
        fatal = False
        try:
            event = decode_event(invoke.payload, invoke.is_json)
            result = entry(event, LambdaContext(spec, log_stream, invoke))
            if loop is not None:
                result = loop.run_until_complete(result)
            payload, ok = encode_result(result, invoke.request_id)
        except MemoryError:
            # The interpreter may be in a bad state: report, then let the pool replace this worker.
            payload, ok, fatal = out_of_memory(invoke.request_id, spec.memory), False, True
        except Exception as exc:
            payload, ok = encode_exception(exc, invoke.request_id, spec.task_root), False
        tagged.flush()
        duration = (time.perf_counter() - begin) * 1000
        channel.send(Result(ok=ok, payload=payload, duration_ms=duration, max_rss_mb=_max_rss_mb(), fatal=fatal))
        tagged.request_id = "-"


class _RequestIdFilter(logging.Filter):
    """Adds the current request id to log records, as Lambda's runtime does (`%(aws_request_id)s`)."""

    def __init__(self, stream: _TaggedStream) -> None:
        super().__init__()
        self.stream = stream

    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = self.stream.request_id
        return True


def _install_logging(stream: _TaggedStream) -> None:
    """Lambda's root-logger set-up: one handler, `[LEVEL] time request-id message`, level WARNING."""
    handler = logging.StreamHandler(_TaggedStream(stream.function, stamp=False))
    handler.setFormatter(
        logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    handler.addFilter(_RequestIdFilter(stream))
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
