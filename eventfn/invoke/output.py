"""Handler output: tagged with Lambda's log-line fields and capped per invocation before it reaches the log.

A `HandlerOutput` is one function's output budget (`max_log_bytes`) for one period: the init phase, one
invocation, or the time between two invocations. Output past the budget is counted and dropped, and the
period ends with one marker line that says how much was dropped and which setting keeps more. Lines go to a
`send` callable: a worker sends them to the service in `Output` frames; an in-process function's go to the
service's report log directly. Either way they land in one ordered buffer with the START, END and REPORT
lines, so an invocation's output is logged between its START and its END.

Imported by every worker before user code: standard library only (no asyncio, no anyio).
"""

from __future__ import annotations

import faulthandler
import io
import os
import select
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

#: A line longer than this without a newline is written as lines of this size, so a partial line never
#: holds more memory than this.
MAX_LINE = 64 * 1024
#: Output is sent in pieces of at most this size (well under the frame limit).
CHUNK = 1024 * 1024
#: Seconds the end of an invocation waits for what was written to fd 1 and 2 to be taken in.
SETTLE_LIMIT = 0.5


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HandlerOutput:
    """The output budget of one function: `begin` and `end` delimit an invocation; each period has `limit`
    bytes (UTF-8, without the tags). Thread-safe: handler threads and the descriptor pump write too."""

    def __init__(self, function: str, limit: int, send: Callable[[bytes], None]) -> None:
        self.function = function
        self.limit = limit
        self.send = send
        self.request_id = "-"
        self.used = 0
        self.dropped = 0
        self.lock = threading.Lock()
        self.capture: DescriptorCapture | None = None
        # Partial lines, by whether their lines get a time and request id (print) or not (logging's format
        # has them): each waits for its newline, the end of the period, or MAX_LINE characters.
        self._partial: dict[bool, list[str]] = {True: [], False: []}

    def begin(self, request_id: str) -> None:
        """Start an invocation's period, closing the one in between (a background thread may have written)."""
        with self.lock:
            self._close()
            self.request_id = request_id

    def end(self) -> None:
        """End the current period: take in what is pending, say what was dropped, reset the budget."""
        if self.capture is not None:
            self.capture.settle()
        with self.lock:
            if self._partial[True]:
                self._flush(True)
            if self._partial[False]:
                self._flush(False)
            if self.dropped:
                self._close()
            self.used = 0
            self.request_id = "-"

    def write(self, text: str, *, stamp: bool = True) -> None:
        """Write text as a stream does: complete lines go out (as far as the budget allows)."""
        with self.lock:
            pieces = self._partial[stamp]
            if "\n" not in text:
                pieces.append(text)
                if sum(map(len, pieces)) > MAX_LINE:  # one write of megabytes is cut now, not copied later
                    self._flush(stamp, keep_tail=True)
                return
            *lines, rest = "".join([*pieces, text]).split("\n") if pieces else text.split("\n")
            pieces.clear()
            self._lines(lines, stamp)
            if rest:
                pieces.append(rest)
                if len(rest) > MAX_LINE:
                    self._flush(stamp)

    def flush(self, *, stamp: bool = True) -> None:
        """Write a partial line as a line (a stream's `flush`)."""
        if self._partial[stamp]:
            with self.lock:
                self._flush(stamp)

    def lines(self, lines: list[str]) -> None:
        """Write whole lines (without their newlines), stamped, as far as the budget allows."""
        with self.lock:
            self._lines(lines, True)

    def admit(self, size: int) -> bool:
        """Count `size` bytes written by other means (a logging record); False once over the budget."""
        with self.lock:
            if self.dropped or self.used + size > self.limit:
                self.dropped += size
                return False
            self.used += size
            return True

    def _flush(self, stamp: bool, *, keep_tail: bool = False) -> None:
        """Write the partial line as lines of `MAX_LINE`; with `keep_tail`, what is left of the last one stays
        partial (its newline may still come)."""
        pieces = self._partial[stamp]
        if pieces:
            line = "".join(pieces)
            pieces.clear()
            end = len(line) - len(line) % MAX_LINE if keep_tail else len(line)
            # One piece at a time: a single write of many megabytes must not be copied whole (the worker's
            # memory limit counts each copy).
            for i in range(0, end, MAX_LINE):
                self._lines([line[i : i + MAX_LINE]], stamp)
            if end < len(line):
                pieces.append(line[end:])

    def _lines(self, lines: list[str], stamp: bool) -> None:
        if self.dropped:
            self.dropped += sum(len(line.encode("utf-8", "replace")) + 1 for line in lines)
            return
        prefix = self._prefix(stamp)
        if sum(map(len, lines)) + len(lines) > self.limit - self.used:
            # Over the budget even counted in characters (each at least one byte): cut line by line rather
            # than encode everything first.
            self._send(self._cut(lines, prefix))
            return
        head = len(prefix.encode("utf-8", "replace"))
        data = "".join([f"{prefix}{line}\n" for line in lines]).encode("utf-8", "replace")
        size = len(data) - head * len(lines)
        if self.used + size <= self.limit:
            self.used += size
        else:
            data = self._cut(lines, prefix)
        self._send(data)

    def _prefix(self, stamp: bool) -> str:
        return f"[{self.function}] {_now()}\t{self.request_id}\t" if stamp else f"[{self.function}] "

    def _cut(self, lines: list[str], prefix: str) -> bytes:
        """The lines that fit, then the first part of the line that crosses the limit; the rest is dropped."""
        head = prefix.encode("utf-8", "replace")
        kept = []
        for line in lines:
            raw = line.encode("utf-8", "replace") + b"\n"
            room = self.limit - self.used
            if not self.dropped and len(raw) <= room:
                kept.append(head + raw)
                self.used += len(raw)
                continue
            if not self.dropped and room > 1:  # the first part of the line, ended by a newline of our own
                kept.append(head + raw[: room - 1] + b"\n")
                self.used += room - 1
                raw = raw[room - 1 :]
            self.dropped += len(raw)
        return b"".join(kept)

    def _close(self) -> None:
        if self.dropped:
            marker = (
                f"eventfn: output truncated: {self.dropped} bytes dropped after the first {self.used} "
                f"(this function's `max_log_bytes` is {self.limit} per invocation; raise it to keep more)"
            )
            self._send(f"{self._prefix(True)}{marker}\n".encode("utf-8", "replace"))
        self.used = self.dropped = 0

    def _send(self, data: bytes) -> None:
        while data:
            cut = len(data) if len(data) <= CHUNK else (data.rfind(b"\n", 0, CHUNK) + 1 or CHUNK)
            self.send(data[:cut])
            data = data[cut:]


class TaggedStream(io.TextIOBase):
    """A text stream for handler code (sys.stdout and sys.stderr, or a logging handler's) over a `HandlerOutput`."""

    def __init__(self, output: HandlerOutput, *, stamp: bool) -> None:
        self.output = output
        self._stamp = stamp

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.output.write(text, stamp=self._stamp)
        return len(text)

    def flush(self) -> None:
        self.output.flush(stamp=self._stamp)


class DescriptorCapture:
    """Routes what is written to file descriptors 1 and 2 (C libraries, child processes) into a
    `HandlerOutput`, through a pipe that a thread reads.

    The descriptors are shared with everything the handler starts, so only a reader of our own sees all of
    it. Crash reports (a segfault, an abort) cannot wait for that thread: `faulthandler` writes them to the
    original stderr, which is the service's.
    """

    def __init__(self, output: HandlerOutput) -> None:
        self.output = output
        self._stderr = os.dup(2)
        faulthandler.enable(file=self._stderr)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._fd = read_fd
        self._pending = select.poll()
        self._pending.register(read_fd, select.POLLIN)
        self._cond = threading.Condition()
        self._busy = False
        self._broken = False
        self._partial = b""
        output.capture = self
        threading.Thread(target=self._pump, name="eventfn-output", daemon=True).start()

    def settle(self, limit: float = SETTLE_LIMIT) -> None:
        """Wait until what was written to the descriptors so far has been taken in; flush a partial line.

        Waits at most `limit` seconds: a process the handler left running may keep the pipe full for good, and
        what it writes after the handler returned belongs to the time between invocations anyway.
        """
        # The common case, without a lock: nothing in the pipe, then (in this order) nothing being taken in.
        if not self._pending.poll(0) and not self._busy and not self._partial:
            return
        deadline = time.monotonic() + limit
        with self._cond:
            # `_busy` is set (under this lock) before each read, so data is either still in the pipe or busy.
            while not self._broken and (self._busy or self._pending.poll(0)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            # The pump owns the partial line while it is busy: it stays for the pump to finish.
            partial = b""
            if not self._busy:
                partial, self._partial = self._partial, b""
        if partial:
            self.output.lines([partial.decode("utf-8", "replace")])

    def _pump(self) -> None:
        ready = select.poll()
        ready.register(self._fd, select.POLLIN)
        try:
            while True:
                ready.poll()
                with self._cond:
                    self._busy = True
                data = os.read(self._fd, 65536)
                if not data:  # every writer closed the pipe: cannot happen while this process holds fd 1
                    break
                *lines, partial = (self._partial + data).split(b"\n")
                while len(partial) > MAX_LINE:
                    lines.append(partial[:MAX_LINE])
                    partial = partial[MAX_LINE:]
                self._partial = partial
                if lines:
                    self.output.lines([line.decode("utf-8", "replace") for line in lines])
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        finally:
            # Out of memory, say: never leave C code blocked on a full pipe. Its output goes uncapped instead.
            os.dup2(self._stderr, 1)
            os.dup2(self._stderr, 2)
            with self._cond:
                self._broken = True
                self._cond.notify_all()
