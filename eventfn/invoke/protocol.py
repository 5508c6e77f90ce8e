"""The wire between a worker pool and a worker process: length-prefixed msgpack frames.

Kept to msgspec only, because the worker imports it before user code and every import there is paid on each
cold start. A frame is a 4-byte big-endian length followed by one msgpack-encoded message.
"""

from __future__ import annotations

import struct

import msgspec

from eventfn.errors import HandlerLoadError
from eventfn.invoke.invocation import Invocation, LambdaError

HEADER = struct.Struct(">I")
#: Largest frame either side accepts: a 6 MB payload (Lambda's sync limit) with room for its envelope.
MAX_FRAME = 8 * 1024 * 1024


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker process needs to load one version of one function."""

    function: str
    task_root: str
    module: str
    entry_file: str
    attribute: str | None
    memory: int
    timeout: float
    #: Bytes of handler output (print, logging, fd 1 and 2) kept per invocation; the rest is counted and dropped.
    max_log_bytes: int = 256 * 1024


class Invoke(msgspec.Struct, frozen=True, kw_only=True, tag="invoke"):
    """Run the handler once. `payload` is the raw event body; `is_json` says it is known-valid JSON.

    A pool sends `timeout` (its deadline is counted from when the worker starts it: an invocation may wait in the
    pipe behind the one the worker runs); an in-process run has a fixed `deadline`.
    """

    request_id: str
    payload: bytes
    deadline: float = 0.0  # wall-clock epoch seconds
    #: Seconds from the start of the run, when set (then `deadline` is not used).
    timeout: float = 0.0
    is_json: bool = False
    client_context: bytes | None = None
    cloud_event: dict[str, str] | None = None

    @classmethod
    def of(cls, invocation: Invocation, deadline: float = 0.0, timeout: float = 0.0) -> Invoke:
        """What a pool sends (`timeout` from its start) or runs in-process (due by `deadline`) for `invocation`."""
        return cls(
            request_id=invocation.request_id,
            payload=invocation.payload,
            deadline=deadline,
            timeout=timeout,
            is_json=invocation.is_json,
            client_context=invocation.client_context,
            cloud_event=invocation.cloud_event,
        )


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    """The handler module loaded; `init_ms` is Lambda's Init Duration."""

    init_ms: float


class InitFailed(msgspec.Struct, frozen=True, kw_only=True, tag="init_failed"):
    """The handler could not be loaded: Lambda's `errorType`, `errorMessage` and `stackTrace`, and where."""

    error_type: str
    message: str
    file: str
    line: int | None
    stack_trace: list[str] = []

    def load_error(self, function: str) -> HandlerLoadError:
        """The service's error for this failure, in Lambda's terms."""
        return HandlerLoadError(
            function,
            self.file,
            self.line,
            f"{self.error_type}: {self.message}",
            error_type=self.error_type,
            error_message=self.message,
            stack_trace=self.stack_trace,
        )


class Result(msgspec.Struct, frozen=True, kw_only=True, tag="result"):
    """The outcome of one `Invoke`: the handler's JSON result, or Lambda's error object and, typed, its fields."""

    payload: bytes
    #: Set for a function error: the fields of the error object in `payload`, so the service never parses it.
    error: LambdaError | None = None
    duration_ms: float
    max_rss_mb: int
    #: The worker must not take another invocation (it ran out of memory).
    fatal: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class Output(msgspec.Struct, frozen=True, kw_only=True, tag="output"):
    """Handler output, already tagged and capped: whole lines of UTF-8 for the service log.

    It travels on the frame channel, ahead of the `Result` it belongs to, so that the service writes it
    between that invocation's START and END lines.
    """

    data: bytes


Message = Invoke | Ready | InitFailed | Result | Output

encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Message)


def frame(message: Message) -> bytes:
    """Encode `message` as one frame."""
    body = encoder.encode(message)
    return HEADER.pack(len(body)) + body
