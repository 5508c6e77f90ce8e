"""The per-invocation log: Lambda's START, END and REPORT lines and the handler output between them, written
at thousands of lines per second.

Report lines obey the `eventfn.report` logger's level (INFO shows them) and look like the service's other log
lines, but they bypass logging's per-record machinery: lines are buffered and written with one call per
flush interval. At batch size 1, building and emitting two log records per invocation took a third of the
dispatcher's time (profiled with py-spy). Handler output (already tagged and capped, see `eventfn.invoke.output`)
joins the same buffer as it arrives, so it is written after its invocation's START line and before its END.

An invocation that asks for its log (Lambda's `X-Amz-Log-Type: Tail`) also gets its own `LogTail`: the same
lines in Lambda's format, of which the last 4 KB are kept.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from collections import deque
from typing import TextIO

import anyio

from eventfn.invoke.invocation import Execution

logger = logging.getLogger("eventfn.report")


class ReportLog:
    """A buffer of log lines, flushed by `run()` (or at once when nothing runs it). Thread-safe: in-process
    handlers write their output from their own threads."""

    def __init__(self, max_lines: int = 16384) -> None:
        #: Lines queued before `add` writes them itself (blocking): only when the log's reader falls this far behind.
        self.max_lines = max_lines
        #: Where lines go; None: `sys.stderr` at the time of the flush.
        self.stream: TextIO | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # one flush at a time, so lines keep their order
        self._running = False
        self._second = -1
        self._prefix = ""
        self._millis = -1
        self._head = ""

    def enabled(self) -> bool:
        """Whether report lines are wanted (the `eventfn.report` logger's level admits INFO)."""
        return logger.isEnabledFor(logging.INFO)

    def add(self, *texts: str) -> None:
        """Queue each of `texts` as a line with the service log's timestamp (the same for all), level and name."""
        millis = int(time.time() * 1000)
        if millis != self._millis:  # the head is made once per millisecond, the date and time once per second
            second, milli = divmod(millis, 1000)
            if second != self._second:
                self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
                self._second = second
            self._head = f"{self._prefix},{milli:03d} INFO  eventfn.report: "
            self._millis = millis
        head = self._head
        with self._lock:  # (inlined: this runs twice per invocation)
            lines = self._lines
            for text in texts:
                lines.append(f"{head}{text}\n")
            if self._running and len(lines) < self.max_lines:
                return
        self.flush()

    def output(self, data: bytes) -> None:
        """Queue handler output: whole lines, tagged by the runtime, written whatever the log level."""
        with self._lock:
            self._lines.append(data.decode("utf-8", "replace"))
            if self._running and len(self._lines) < self.max_lines:
                return
        self.flush()

    def flush(self, stream: TextIO | None = None) -> None:
        """Write what is queued. The buffer is let go before the write: lines added meanwhile do not wait for it."""
        with self._writing:
            with self._lock:
                if not self._lines:
                    return
                lines, self._lines = self._lines, []
            out = stream or self.stream or sys.stderr
            out.write("".join(lines))
            out.flush()

    async def run(self, interval: float = 0.05) -> None:
        """Flush every `interval` seconds, from a thread, until cancelled; then flush what is left.

        From a thread: the log is often a pipe, and a reader that falls behind (a terminal, a log shipper, a busy
        machine) blocked the event loop in `write` for as long as it lagged (p99 181 ms and a 205 ms maximum at
        500 events/s on a loaded machine, against 4.4 ms and 31 ms without report lines).
        """
        self._running = True
        try:
            while True:
                await anyio.sleep(interval)
                if self._lines:
                    await anyio.to_thread.run_sync(self.flush)
        finally:
            self._running = False
            self.flush()


#: The service's one report log.
reports = ReportLog()


def start_line(function: str, request_id: str) -> str:
    """Lambda's START line (with the function's name added)."""
    return f"START RequestId: {request_id} Version: $LATEST Function: {function}"


def report_line(function: str, memory: int, request_id: str, execution: Execution) -> str:
    """Lambda's REPORT line (with the function's name and the outcome added)."""
    line = f"REPORT RequestId: {request_id}\tFunction: {function}\t{_measures(memory, execution)}"
    if execution.isolation is not None:
        line += f"\tIsolation: {execution.isolation}"
    error = execution.outcome.error
    return line + ("\tStatus: ok" if error is None else f"\tStatus: error {error.type}")


def _measures(memory: int, execution: Execution) -> str:
    """The REPORT line's figures, in Lambda's words and order."""
    duration_ms = execution.duration_ms
    text = f"Duration: {duration_ms:.2f} ms\tBilled Duration: {math.ceil(duration_ms)} ms\tMemory Size: {memory} MB"
    if execution.max_rss_mb is not None:
        text += f"\tMax Memory Used: {execution.max_rss_mb} MB"
    if execution.init_ms is not None:
        text += f"\tInit Duration: {execution.init_ms:.2f} ms"
    return text


#: Lambda's `X-Amz-Log-Result` holds the last 4 KB of an invocation's log.
TAIL_BYTES = 4096

#: The service log's tags on a line of handler output (`[fn] ` and, on printed lines, the time and request id),
#: which Lambda's log has not: its runtime writes printed text as it is.
_TAGS = re.compile(rb"^\[[^\]\n]*\] (?:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\t[^\t\n]*\t)?", re.MULTILINE)


class LogTail:
    """One invocation's log as Lambda's `X-Amz-Log-Type: Tail` returns it: START, the handler's output, END and
    REPORT in Lambda's own format, of which the last `size` bytes are kept.

    Made only for an invocation that asks for it. Thread-safe (in-process handlers write from their threads), and
    closed once the invocation has ended, so that a thread it left running cannot change the result.
    """

    __slots__ = ("_closed", "_lock", "_parts", "_size", "_total")

    def __init__(self, size: int = TAIL_BYTES) -> None:
        self._size = size
        self._parts: deque[bytes] = deque()
        self._total = 0
        self._closed = False
        self._lock = threading.Lock()

    def start(self, request_id: str) -> None:
        self._add(f"START RequestId: {request_id} Version: $LATEST\n".encode())

    def output(self, data: bytes) -> None:
        """Handler output as the runtime sent it to the service log (whole lines, tagged): the tags go."""
        self._add(_TAGS.sub(b"", data))

    def finish(self, request_id: str, memory: int, execution: Execution) -> bytes:
        """END and REPORT; returns the tail, cut to `size` bytes at a UTF-8 character's start. Nothing is taken
        after this."""
        self._add(
            f"END RequestId: {request_id}\nREPORT RequestId: {request_id}\t{_measures(memory, execution)}\t\n".encode()
        )
        with self._lock:
            self._closed = True
            data = b"".join(self._parts)[-self._size :]
        start = 0
        while start < min(4, len(data)) and data[start] & 0xC0 == 0x80:  # a continuation byte: mid-character
            start += 1
        return data[start:]

    def _add(self, data: bytes) -> None:
        with self._lock:
            if self._closed or not data:
                return
            if len(data) > self._size:
                data = data[-self._size :]
            self._parts.append(data)
            self._total += len(data)
            # Keep only what the last `size` bytes need: a chatty handler does not grow this past one part.
            while self._total - len(self._parts[0]) >= self._size:
                self._total -= len(self._parts.popleft())
