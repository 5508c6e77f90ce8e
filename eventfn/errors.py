"""Every error eventfn raises on purpose: one root, one subclass per condition.

Each constructor takes the facts and builds a message that says what went wrong, where (file:line, subject,
function) and what to do about it. The CLI prints `str(error)` and exits non-zero; no traceback is shown for
these, because they describe the user's situation, not a bug in eventfn.
"""

from __future__ import annotations


class EventfnError(Exception):
    """Root of all errors eventfn reports to a user."""


class ConfigError(EventfnError):
    """A settings file or flag is invalid."""

    def __init__(self, where: str, problem: str, fix: str = "") -> None:
        self.where = where
        self.problem = problem
        message = f"{where}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class HandlerLoadError(EventfnError):
    """A handler file could not be loaded: syntax error, import error, missing entry point.

    `error_type`, `error_message` and `stack_trace` are Lambda's error object for the failure (for example
    `Runtime.UserCodeSyntaxError`), which an invocation that meets this failure answers with.
    """

    def __init__(
        self,
        function: str,
        file: str,
        line: int | None,
        problem: str,
        *,
        error_type: str = "Runtime.Unknown",
        error_message: str | None = None,
        stack_trace: list[str] | None = None,
    ) -> None:
        self.function = function
        self.file = file
        self.line = line
        self.problem = problem
        self.error_type = error_type
        self.error_message = problem if error_message is None else error_message
        self.stack_trace = stack_trace or []
        place = f"{file}:{line}" if line else file
        super().__init__(f"function {function!r} failed to load at {place}: {problem}")


class EventDecodeError(EventfnError):
    """A message on the bus could not be decoded into an event."""

    def __init__(self, subject: str, problem: str) -> None:
        self.subject = subject
        super().__init__(f"cannot decode message on {subject!r}: {problem}")


class QueueError(EventfnError):
    """A message cannot be sent to, or an operation done on, a queue (`[queues.<name>]`)."""

    def __init__(self, queue: str, problem: str, fix: str = "") -> None:
        self.queue = queue
        self.problem = problem
        super().__init__(f"queue {queue}: {problem}" + (f" ({fix})" if fix else ""))


class QueueNotFound(QueueError):
    """No queue of that name: not declared, or its stream not created yet."""

    def __init__(self, queue: str, declared: list[str] | None = None) -> None:
        if declared is None:
            problem = f"its stream (EVENTFN_Q_{queue}) does not exist"
            fix = f"declare it in eventfn.toml as [queues.{queue}] and start `eventfn serve`, which creates it"
        else:
            problem = "not declared in eventfn.toml"
            fix = f"declared: {', '.join(declared)}" if declared else "declare it as [queues.<name>]"
        super().__init__(queue, problem, fix)


class UnreadableData(EventfnError):
    """Bytes eventfn does not control (an event, a header, a handler's reply, a stored record) cannot be read:
    not JSON, nested too deeply, not UTF-8, not base64, or not the expected shape. `problem` says which."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


class NatsUnavailable(EventfnError):
    """The NATS server could not be reached or started."""

    def __init__(self, url: str, problem: str, fix: str = "") -> None:
        self.url = url
        message = f"NATS at {url}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class DataDirInUse(EventfnError):
    """Another `eventfn serve` holds the data directory (its lock file)."""

    def __init__(self, data_dir: str, holder_pid: str) -> None:
        self.data_dir = data_dir
        holder = f"pid {holder_pid}" if holder_pid else "another process"
        super().__init__(
            f"data directory {data_dir} is in use by another eventfn serve ({holder}); two services never share "
            "one store (stop that one first, or give this one its own --data-dir)"
        )


class ServiceUnavailable(EventfnError):
    """The CLI found NATS but no running `eventfn serve` answered."""

    def __init__(self, url: str) -> None:
        super().__init__(
            f"no eventfn service answered on {url} (start one with `eventfn serve`, or point at it with --nats)"
        )


class PermissionDenied(EventfnError):
    """The NATS server refused a publish or subscription: the user connected as lacks the permission."""

    def __init__(self, url: str, violation: str) -> None:
        self.violation = violation
        super().__init__(
            f"NATS at {url} refused it: {violation} (connect as a user allowed to: the client commands use the "
            "admin credentials, by default those the embedded server wrote to <data dir>/auth/admin.json; "
            "see README: Security and isolation)"
        )
