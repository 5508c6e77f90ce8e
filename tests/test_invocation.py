"""The one invocation path (`Functions.invoke`, `Function.invoke`), driven directly: real worker processes, no NATS.

Lambda's checks and their answers byte for byte, the concurrency slots, START/END/REPORT for both pool kinds,
and Lambda's error object typed where it is made.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from eventfn.config import FunctionSettings
from eventfn.errors import HandlerLoadError
from eventfn.invoke.functions import Function, Functions
from eventfn.invoke.inprocess import InProcessPool
from eventfn.invoke.invocation import SYNC_PAYLOAD_LIMIT, Invocation, LambdaError, Outcome
from eventfn.invoke.registry import FunctionSource
from eventfn.invoke.reports import reports
from eventfn.invoke.slots import Slots
from eventfn.invoke.workers import Pool

HANDLER = """
    def handler(event, context):
        if event == "fail":
            raise ValueError("bad order 42")
        if isinstance(event, dict) and "size" in event:
            return "x" * event["size"]
        print("hello from", context.aws_request_id)
        return event
"""


def write(tmp_path: Path, code: str) -> Path:
    entry = tmp_path / "fn.py"
    entry.write_text(textwrap.dedent(code).lstrip("\n"), encoding="utf-8")
    return entry


def made(tmp_path: Path, code: str = HANDLER, *, account: int = 64, **settings: Any) -> tuple[Functions, Function]:
    """A service's functions holding one function `fn` of `code`, with no version loaded yet."""
    entry = write(tmp_path, code)
    source = FunctionSource(
        name="fn",
        task_root=str(tmp_path),
        module="fn",
        entry_file=str(entry),
        attribute=None,
        version="v1",
        settings=FunctionSettings(**settings),
    )
    functions = Functions(Slots(account))
    return functions, functions.add(source)


def pool_for(fn: Function) -> Pool | InProcessPool:
    settings = fn.source.settings
    assert settings is not None
    source = fn.source
    spec = source.worker_spec(settings)
    if settings.isolation == "inprocess":
        return InProcessPool(spec, source.version)
    return Pool(spec=spec, env=dict(os.environ), version=source.version)


@asynccontextmanager
async def loaded(
    tmp_path: Path, code: str = HANDLER, *, account: int = 64, start: bool = True, **settings: Any
) -> AsyncIterator[tuple[Functions, Function]]:
    """`made`, with its version loaded (started, unless `start` is false: the first invocation cold-starts)."""
    functions, fn = made(tmp_path, code, account=account, **settings)
    pool = pool_for(fn)
    try:
        assert fn.source.settings is not None
        fn.activate(pool, fn.source.settings, await pool.start() if start else 0.0)
        yield functions, fn
    finally:
        await pool.retire()


def sync(payload: bytes = b"{}", request_id: str = "r", **options: Any) -> Invocation:
    """A sync invocation as a front makes it: throttled rather than queued, within Lambda's 6 MB."""
    return Invocation(
        request_id=request_id, payload=payload, wait_for_slot=False, max_request_bytes=SYNC_PAYLOAD_LIMIT, **options
    )


@pytest.fixture
def report_log() -> Iterator[io.StringIO]:
    """The report log (START/END/REPORT and handler output), enabled and written to a buffer."""
    logger = logging.getLogger("eventfn.report")
    level, stream = logger.level, reports.stream
    logger.setLevel(logging.INFO)
    reports.stream = buffer = io.StringIO()
    try:
        yield buffer
    finally:
        reports.flush()
        logger.setLevel(level)
        reports.stream = stream


def lines_of(log: io.StringIO, request_id: str) -> list[str]:
    reports.flush()
    return [line for line in log.getvalue().splitlines() if request_id in line]


def refused(outcome: Outcome, status: int, error_type: str, message: str) -> None:
    """`outcome` is the invocation error Lambda's API answers with (no request id, no stack)."""
    assert (outcome.ok, outcome.status, outcome.function_error) == (False, status, False)
    assert outcome.error == LambdaError(type=error_type, message=message, function_error=False)
    assert outcome.payload == msgspec.json.encode({"errorType": error_type, "errorMessage": message})


# -- Lambda's checks, in its order -------------------------------------------------------------------------------


async def test_an_unknown_function_is_lambdas_404() -> None:
    outcome = await Functions(Slots(1)).invoke("nope", sync())
    refused(outcome, 404, "ResourceNotFoundException", "Function not found: nope")


async def test_a_dry_run_answers_204_and_runs_nothing(tmp_path: Path) -> None:
    functions, _ = made(tmp_path)  # not even loaded: a DryRun only asks whether the function exists
    outcome = await functions.invoke("fn", sync(b"x" * (SYNC_PAYLOAD_LIMIT + 1), dry_run=True))
    assert (outcome.ok, outcome.status, outcome.payload, outcome.error) == (True, 204, b"", None)


async def test_a_request_over_the_limit_is_413_before_the_function_is_looked_at(tmp_path: Path) -> None:
    functions, _ = made(tmp_path)
    outcome = await functions.invoke("fn", sync(b"x" * (SYNC_PAYLOAD_LIMIT + 1)))
    message = f"Request must be smaller than {SYNC_PAYLOAD_LIMIT} bytes for the InvokeFunction operation"
    refused(outcome, 413, "RequestTooLargeException", message)
    stored = Invocation(request_id="r", payload=b"x" * (SYNC_PAYLOAD_LIMIT + 1))  # sized when it was stored
    assert (await functions.invoke("fn", stored)).status == 200  # on to the next check: nothing is loaded


async def test_a_function_that_failed_to_load_answers_with_its_init_error(tmp_path: Path) -> None:
    functions, fn = made(tmp_path, "def handler(event, context)\n    return 1\n")
    with pytest.raises(HandlerLoadError) as failed:
        await pool_for(fn).start()
    fn.load_error = failed.value  # as the service records it
    outcome = await functions.invoke("fn", sync(request_id="r-init"))
    assert (outcome.ok, outcome.status, outcome.function_error) == (False, 200, True)
    error = json.loads(outcome.payload)
    assert list(error) == ["errorMessage", "errorType", "requestId", "stackTrace"]
    assert error["errorType"] == "Runtime.UserCodeSyntaxError" and error["requestId"] == "r-init"
    assert outcome.error == LambdaError(
        type=error["errorType"], message=error["errorMessage"], stack_trace=error["stackTrace"]
    )

    fn.load_error = None  # settings that could not be read: no init error of Lambda's kind to tell
    fn.last_error = "settings: unknown key 'timeot'"
    outcome = await functions.invoke("fn", sync())
    assert outcome.function_error and outcome.error == LambdaError(
        type="Runtime.ImportModuleError", message="settings: unknown key 'timeot'"
    )
    assert (
        outcome.payload
        == b'{"errorType":"Runtime.ImportModuleError","errorMessage":"settings: unknown key \'timeot\'"}'
    )


# -- concurrency ---------------------------------------------------------------------------------------------------


async def test_a_sync_invocation_over_a_cap_is_throttled_at_once_and_holds_no_slot(tmp_path: Path) -> None:
    async with loaded(tmp_path, account=1, concurrency=1) as (functions, fn):
        reason = "Rate Exceeded. Reason: {}"
        assert fn.limiter.try_take()  # the function's one slot is in use
        outcome = await functions.invoke("fn", sync())
        refused(
            outcome, 429, "TooManyRequestsException", reason.format("ReservedFunctionConcurrentInvocationLimitExceeded")
        )
        fn.limiter.give()
        assert functions.account.try_take()  # the service's one slot is in use
        outcome = await functions.invoke("fn", sync())
        refused(outcome, 429, "TooManyRequestsException", reason.format("ConcurrentInvocationLimitExceeded"))
        assert fn.limiter.used == 0
        functions.account.give()

        free = await functions.invoke("fn", sync(b'"free"'))
        assert free.payload == b'"free"', free.payload  # (the whole error object, if it is one)
        assert fn.limiter.used == functions.account.used == 0

        assert fn.settings is not None
        fn.settings = msgspec.structs.replace(fn.settings, concurrency=0)  # disabled: sync invokes are throttled
        outcome = await functions.invoke("fn", sync())
        refused(
            outcome, 429, "TooManyRequestsException", reason.format("ReservedFunctionConcurrentInvocationLimitExceeded")
        )


async def test_a_stored_event_waits_for_a_slot_and_keeps_its_messages_alive_meanwhile(tmp_path: Path) -> None:
    async with loaded(tmp_path, account=1) as (functions, fn):
        beats = 0

        async def keepalive() -> None:
            nonlocal beats
            beats += 1

        outcomes: list[Outcome] = []

        async def invoke() -> None:
            invocation = Invocation(request_id="r", payload=b'"waited"', keepalive=keepalive, keepalive_every=0.05)
            outcomes.append(await fn.invoke(invocation))

        assert functions.account.try_take()  # another function's long invocation holds the service's slot
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(invoke)
                await anyio.sleep(0.3)
                assert outcomes == [] and beats >= 2
                functions.account.give()
        assert outcomes[0].payload == b'"waited"'
        assert fn.limiter.used == functions.account.used == 0


# -- the run: its result, its typed error, its log lines --------------------------------------------------------------


async def test_a_result_over_the_response_limit_is_lambdas_response_size_error(tmp_path: Path) -> None:
    async with loaded(tmp_path) as (functions, _):
        outcome = await functions.invoke("fn", sync(b'{"size": 200}', max_response_bytes=100))
    assert outcome.function_error and outcome.status == 200
    message = "Response payload size (202 bytes) exceeded maximum allowed payload size (100 bytes)."
    assert outcome.error == LambdaError(type="Function.ResponseSizeTooLarge", message=message)
    assert outcome.payload == msgspec.json.encode(
        {"errorMessage": message, "errorType": "Function.ResponseSizeTooLarge", "requestId": "r"}
    )


@pytest.mark.parametrize("isolation", ["process", "inprocess"])
async def test_a_handler_exception_is_typed_where_it_is_raised(
    tmp_path: Path, report_log: io.StringIO, isolation: str
) -> None:
    async with loaded(tmp_path, isolation=isolation) as (functions, _):
        outcome = await functions.invoke("fn", sync(b'"fail"', request_id="r-fail"))
    assert outcome.function_error and outcome.error is not None
    error = json.loads(outcome.payload)
    assert list(error) == ["errorMessage", "errorType", "requestId", "stackTrace"]
    assert outcome.error == LambdaError(type="ValueError", message="bad order 42", stack_trace=error["stackTrace"])
    assert (error["errorType"], error["errorMessage"], error["requestId"]) == ("ValueError", "bad order 42", "r-fail")
    assert 'fn.py", line 3, in handler' in error["stackTrace"][0]
    [report] = [line for line in lines_of(report_log, "r-fail") if "REPORT" in line]
    assert report.endswith("\tStatus: error ValueError")


@pytest.mark.parametrize("isolation", ["process", "inprocess"])
async def test_start_output_end_and_report_are_written_once_in_order(
    tmp_path: Path, report_log: io.StringIO, isolation: str
) -> None:
    async with loaded(tmp_path, isolation=isolation) as (functions, _):
        assert (await functions.invoke("fn", sync(request_id="r-log"))).ok
    lines = lines_of(report_log, "r-log")
    assert len(lines) == 4, lines
    start, output, end, report = lines
    assert start.endswith("START RequestId: r-log Version: $LATEST Function: fn")
    assert output.endswith("\tr-log\thello from r-log") and output.startswith("[fn] ")
    assert end.endswith("END RequestId: r-log")
    assert re.search(r"REPORT RequestId: r-log\tFunction: fn\tDuration: [\d.]+ ms\tBilled Duration: \d+ ms", report)
    assert report.endswith("\tStatus: ok")
    if isolation == "inprocess":
        assert "\tIsolation: inprocess" in report and "Max Memory Used" not in report
    else:
        assert "\tMax Memory Used: " in report and "Isolation" not in report


async def test_a_cold_start_that_fails_to_load_logs_start_after_the_init_output(
    tmp_path: Path, report_log: io.StringIO
) -> None:
    code = 'print("init output")\nimport no_such_module\ndef handler(event, context):\n    return 1\n'
    async with loaded(tmp_path, code, start=False) as (functions, _):  # the invocation starts the worker
        outcome = await functions.invoke("fn", sync(request_id="r-cold"))
    assert outcome.function_error and outcome.error is not None
    assert outcome.error.type == "Runtime.ImportModuleError"
    assert json.loads(outcome.payload)["errorType"] == "Runtime.ImportModuleError"
    reports.flush()
    log = report_log.getvalue()
    assert log.index("init output") < log.index("START RequestId: r-cold") < log.index("END RequestId: r-cold")
    [report] = [line for line in log.splitlines() if "REPORT RequestId: r-cold" in line]
    assert report.endswith("\tStatus: error Runtime.ImportModuleError") and "Init Duration" not in report
