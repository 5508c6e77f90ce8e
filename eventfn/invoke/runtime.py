"""The worker process: loads one handler once (Lambda's init phase) and runs it per `Invoke` frame.

Run as `python -m eventfn.invoke.runtime SPEC_JSON`. Frames travel on the process's original stdin/stdout; those
descriptors are moved aside first, so that nothing the handler writes can corrupt the protocol. The handler's
output (`print`, logging, and whatever C code or child processes write to fd 1 and 2) is tagged with the
request id, capped per invocation (`eventfn.invoke.output`) and sent to the service in `Output` frames ahead of the
invocation's `Result`.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from datetime import UTC, datetime
from typing import BinaryIO

import msgspec

from eventfn import sandbox
from eventfn.invoke.handler import (
    LambdaContext,
    UnmarshalError,
    decode_event,
    encode_exception,
    encode_result,
    error_log,
    init_failure,
    is_coroutine_function,
    load_handler,
    unmarshal_error,
)
from eventfn.invoke.invocation import LambdaError, out_of_memory
from eventfn.invoke.output import DescriptorCapture, HandlerOutput, TaggedStream
from eventfn.invoke.protocol import (
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


def _max_rss_mb(limit_mb: int) -> int:
    """The worker's peak resident size in MB, as cheaply as it can be known.

    `ru_maxrss` costs ~4 us, but on Linux it keeps the peak of the process image before `exec`: a worker started by
    a service larger than the function's `memory` would read as over it from its first invocation. So a figure over
    the limit is checked against VmHWM, the peak of this image alone (~40 us to read, paid only then); below the
    limit the cheap figure stands (it can overstate, never understate).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    if peak <= limit_mb:
        return peak
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return peak


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
    memory = spec.memory
    # Frames may arrive several at a time (a pool pipelines invocations to a worker whose handler is quick): each
    # runs in turn, its deadline counted from its own start, and gets its own Result as soon as it ends.
    while (invoke := channel.receive()) is not None:
        output.begin(invoke.request_id)
        begin = time.perf_counter()
        deadline = time.time() + invoke.timeout if invoke.timeout else invoke.deadline
        fatal = False
        error: LambdaError | None
        try:
            event = decode_event(invoke.payload, invoke.is_json)
            result = entry(event, LambdaContext(spec, log_stream, invoke, deadline))
            if loop is not None:
                result = loop.run_until_complete(result)
            payload, error = encode_result(result, invoke.request_id)
        except UnmarshalError as exc:
            payload, error = unmarshal_error(exc, invoke.request_id)
        except MemoryError:
            # The interpreter may be in a bad state: report, then let the pool replace this worker.
            (payload, error), fatal = out_of_memory(invoke.request_id, memory), True
        except Exception as exc:
            payload, error = encode_exception(exc, invoke.request_id)
        if error is not None:
            output.write(error_log(error), stamp=False)
        output.end()  # this invocation's output goes out ahead of its result
        duration = (time.perf_counter() - begin) * 1000
        max_rss = _max_rss_mb(memory)
        fatal = fatal or max_rss > memory
        channel.send(Result(payload=payload, error=error, duration_ms=duration, max_rss_mb=max_rss, fatal=fatal))
        if fatal:
            # The pool replaces this worker: an invocation queued behind this one must not start here (the pool
            # sends it to another worker, as one that never started).
            return


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
    """Entry point of a worker process started as a new interpreter."""
    start(msgspec.json.decode(sys.argv[1].encode(), type=WorkerSpec))


def start(spec: WorkerSpec | None, *, in_user_namespace: bool = False) -> None:
    """A worker's start-up once its process exists, its channel on fds 0 and 1: wait for release (the preamble),
    confine itself, take the channel, load the handler and serve. Also the path of a worker forked by the zygote
    (`eventfn.invoke.zygote`): it may have entered its user namespace already, and its spec (None here) comes
    with the preamble."""
    preamble = sandbox.confine(in_user_namespace=in_user_namespace)  # before the protocol takes fd 0 over
    if spec is None:
        spec = msgspec.json.decode(preamble.spec, type=WorkerSpec)
        sys.argv = [__file__, preamble.spec.decode()]  # as `python -m eventfn.invoke.runtime SPEC` has it
    channel = _take_protocol_descriptors()
    os.chdir(spec.task_root)
    serve(spec, channel)


if __name__ == "__main__":
    main()
