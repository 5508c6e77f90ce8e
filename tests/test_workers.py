"""Worker pools driven directly: real `python -m eventfn.invoke.runtime` processes, no NATS.

Each test writes a handler file to `tmp_path`, starts a `Pool` for it and always retires the pool, so no
worker process outlives its test.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute

from eventfn.errors import HandlerLoadError
from eventfn.invoke.invocation import Invocation, Outcome
from eventfn.invoke.workers import Pool
from tests.conftest import running_pool, spec_for, write_handler


async def execute(pool: Pool, request_id: str, payload: bytes, **options: Any) -> Outcome:
    """One invocation run straight on the pool (no concurrency slots, no log lines): its outcome."""
    return (await pool.execute(Invocation(request_id=request_id, payload=payload, **options))).outcome


def result(outcome: Outcome) -> Any:
    assert outcome.ok, outcome.payload
    return json.loads(outcome.payload)


def error(outcome: Outcome) -> dict[str, Any]:
    assert not outcome.ok, outcome.payload
    assert outcome.function_error and outcome.error is not None
    value = json.loads(outcome.payload)
    assert isinstance(value, dict)
    # Typed where it was made (the worker, or eventfn for a timeout or crash): the same as the JSON says.
    assert (outcome.error.type, outcome.error.message) == (value["errorType"], value["errorMessage"])
    assert outcome.error.stack_trace == value.get("stackTrace", [])
    return value


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- results and errors ----------------------------------------------------------------------------------------


async def test_a_service_larger_than_the_functions_memory_does_not_make_its_workers_out_of_memory(
    tmp_path: Path,
) -> None:
    # On Linux a process keeps, in its `ru_maxrss`, the peak of the image it was before `exec`: a worker started
    # by a 300 MB service read as over a 128 MB function's memory from its first invocation (every one failed as
    # Runtime.OutOfMemory). The service here is this test process, made larger than the function's memory.
    ballast = bytearray(300 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):  # resident, not just reserved
        ballast[i] = 1
    code = """
        def handler(event, context):
            return "small"
    """
    async with running_pool(tmp_path, code) as pool:
        assert pool.spec.memory < len(ballast) // (1024 * 1024)
        outcome = await execute(pool, "req-1", b"{}", is_json=True)
    del ballast
    assert outcome.error is None, outcome.payload
    assert result(outcome) == "small"


async def test_handler_result_is_returned_as_json(tmp_path: Path) -> None:
    code = """
        def handler(event, context):
            return {"doubled": event["n"] * 2, "items": [1, "two", None, True]}
    """
    async with running_pool(tmp_path, code) as pool:
        outcome = await execute(pool, "req-1", b'{"n": 21}', is_json=True)
    assert result(outcome) == {"doubled": 42, "items": [1, "two", None, True]}
    assert outcome.error is None
    assert outcome.duration_ms >= 0


async def test_handler_exception_becomes_lambda_error_object(tmp_path: Path) -> None:
    code = """
        def handler(event, context):
            helper()

        def helper():
            raise ValueError("bad order 42")
    """
    async with running_pool(tmp_path, code) as pool:
        outcome = await execute(pool, "req-err", b"{}")
    err = error(outcome)
    assert err["errorMessage"] == "bad order 42"
    assert err["errorType"] == "ValueError"
    assert err["requestId"] == "req-err"
    trace = err["stackTrace"]
    assert isinstance(trace, list) and all(isinstance(line, str) for line in trace)
    assert 'fn.py", line 2, in handler' in trace[0]
    assert 'fn.py", line 5, in helper' in trace[-1]
    assert not any("runtime.py" in line for line in trace)  # the runtime's own frames are left out


async def test_worker_is_reused_after_handler_exception(tmp_path: Path) -> None:
    code = """
        import os
        def handler(event, context):
            if event == "fail":
                raise RuntimeError("x")
            return os.getpid()
    """
    async with running_pool(tmp_path, code) as pool:
        first = result(await execute(pool, "a", b'"ok"'))
        error(await execute(pool, "b", b'"fail"'))
        assert result(await execute(pool, "c", b'"ok"')) == first


async def test_unserializable_result_is_marshal_error(tmp_path: Path) -> None:
    code = """
        def handler(event, context):
            return {"a": object()}
    """
    async with running_pool(tmp_path, code) as pool:
        err = error(await execute(pool, "req-m", b"{}"))
    assert err["errorType"] == "Runtime.MarshalError"
    assert "Unable to marshal response" in err["errorMessage"]
    assert err["requestId"] == "req-m"


async def test_decimal_result_is_a_json_number(tmp_path: Path) -> None:
    code = """
        from decimal import Decimal

        def handler(event, context):
            return {"price": Decimal("1.5"), "count": Decimal("3")}
    """
    async with running_pool(tmp_path, code) as pool:
        assert result(await execute(pool, "r", b"{}")) == {"price": 1.5, "count": 3}


async def test_async_def_handler_is_awaited(tmp_path: Path) -> None:
    code = """
        import asyncio

        async def handler(event, context):
            await asyncio.sleep(0)
            return {"got": event, "request": context.aws_request_id}
    """
    async with running_pool(tmp_path, code) as pool:
        first = await execute(pool, "req-a1", b'{"x": 1}')
        second = await execute(pool, "req-a2", b'{"x": 2}')
    assert result(first) == {"got": {"x": 1}, "request": "req-a1"}
    assert result(second) == {"got": {"x": 2}, "request": "req-a2"}


async def test_async_handler_exception_becomes_lambda_error_object(tmp_path: Path) -> None:
    code = """
        async def handler(event, context):
            raise KeyError("missing")
    """
    async with running_pool(tmp_path, code) as pool:
        err = error(await execute(pool, "req-ak", b"{}"))
    assert err["errorType"] == "KeyError"


async def test_lambda_handler_name_and_environment_are_used(tmp_path: Path) -> None:
    code = """
        import os
        GREETING = os.environ["GREETING"]

        def lambda_handler(event, context):
            return f"{GREETING}, {event['name']}!"
    """
    async with running_pool(tmp_path, code, env={"GREETING": "Hej"}) as pool:
        assert result(await execute(pool, "r", b'{"name": "Ada"}')) == "Hej, Ada!"


async def test_handler_can_import_helpers_beside_it(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("def shout(s):\n    return s.upper()\n", encoding="utf-8")
    code = """
        import helpers

        def handler(event, context):
            return helpers.shout(event)
    """
    async with running_pool(tmp_path, code) as pool:
        assert result(await execute(pool, "r", b'"quiet"')) == "QUIET"


# -- timeouts and crashes --------------------------------------------------------------------------------------


async def test_timeout_kills_the_worker_and_next_invocation_gets_a_new_one(tmp_path: Path) -> None:
    code = """
        import os

        def handler(event, context):
            if event == "spin":
                while True:
                    pass
            return os.getpid()
    """
    async with running_pool(tmp_path, code, timeout=1.0) as pool:
        warm_pid = result(await execute(pool, "r1", b'"pid"'))
        begin = time.monotonic()
        outcome = await execute(pool, "r-spin", b'"spin"')
        elapsed = time.monotonic() - begin
        err = error(outcome)
        assert err["errorType"] == "Sandbox.Timedout"
        assert "Task timed out after 1.00 seconds" in err["errorMessage"]
        assert "r-spin" in err["errorMessage"]
        assert 1.0 <= elapsed < 4.0
        assert not process_exists(warm_pid)
        assert pool.idle == []
        new_pid = result(await execute(pool, "r2", b'"pid"'))
        assert new_pid != warm_pid


async def test_os_exit_gives_runtime_exit_error_and_next_invocation_works(tmp_path: Path) -> None:
    code = """
        import os

        def handler(event, context):
            if event == "exit":
                os._exit(3)
            return os.getpid()
    """
    async with running_pool(tmp_path, code) as pool:
        first_pid = result(await execute(pool, "r1", b'"pid"'))
        err = error(await execute(pool, "r-exit", b'"exit"'))
        assert err["errorType"] == "Runtime.ExitError"
        assert "exit status 3" in err["errorMessage"]
        assert "r-exit" in err["errorMessage"]
        assert pool.idle == []
        assert result(await execute(pool, "r2", b'"pid"')) != first_pid


async def test_worker_killed_by_signal_is_reported(tmp_path: Path) -> None:
    code = """
        import os, signal

        def handler(event, context):
            os.kill(os.getpid(), signal.SIGKILL)
    """
    async with running_pool(tmp_path, code) as pool:
        err = error(await execute(pool, "r-sig", b"{}"))
    assert err["errorType"] == "Runtime.ExitError"
    assert "signal: kill" in err["errorMessage"]


# -- init ------------------------------------------------------------------------------------------------------


async def test_module_init_runs_once_on_a_warm_worker(tmp_path: Path) -> None:
    inits = tmp_path / "inits.log"
    code = f"""
        import os

        with open({str(inits)!r}, "a") as f:
            f.write("init\\n")
        CALLS = 0

        def handler(event, context):
            global CALLS
            CALLS += 1
            return {{"calls": CALLS, "pid": os.getpid()}}
    """
    async with running_pool(tmp_path, code, min_warm=0) as pool:
        # The init phase ran at start, before any invocation, in a worker that validated the version and stopped.
        assert inits.read_text() == "init\n" and pool.size == 0
        results = [result(await execute(pool, f"r{i}", b"{}")) for i in range(4)]
        assert len(pool.idle) == 1
    assert [r["calls"] for r in results] == [1, 2, 3, 4]
    assert len({r["pid"] for r in results}) == 1
    assert inits.read_text() == "init\ninit\n", "once to validate, once in the worker that served all four"


async def test_min_warm_workers_start_with_the_pool_and_stay_through_reaping(tmp_path: Path) -> None:
    entry = write_handler(tmp_path, "import os\ndef handler(e, c):\n    return os.getpid()\n")
    pool = Pool(spec=spec_for(entry, timeout=5), env=dict(os.environ), version="v1", min_warm=2, idle_timeout=0.01)
    try:
        await pool.start()
        warm = [worker.process.pid for worker, _ in pool.idle]
        assert len(warm) == 2 and all(map(process_exists, warm))
        assert result(await execute(pool, "r1", b"{}")) in warm, "served warm: no cold start"
        assert await pool.reap() == 0 and pool.size == 2, "provisioned workers are not reaped"
    finally:
        await pool.retire()


async def test_an_idle_pool_scales_to_zero(tmp_path: Path) -> None:
    entry = write_handler(tmp_path, "import os\ndef handler(e, c):\n    return os.getpid()\n")
    pool = Pool(spec=spec_for(entry, timeout=5), env=dict(os.environ), version="v1")
    try:
        await pool.start()
        assert pool.size == 0, "validating a version leaves no worker behind"
        first = await pool.execute(Invocation(request_id="r1", payload=b"{}"))
        pid = result(first.outcome)
        assert first.init_ms is not None, "a cold start"
        assert [w.process.pid for w, _ in pool.idle] == [pid]
        assert await pool.reap() == 0, "not idle for idle_timeout yet"
        pool.idle_timeout = 0.0  # as if it had passed
        assert await pool.reap() == 1 and pool.size == 0 and not process_exists(pid)
    finally:
        await pool.retire()


async def test_start_returns_init_duration(tmp_path: Path) -> None:
    entry = write_handler(tmp_path, "def handler(e, c):\n    return 1\n")
    pool = Pool(spec=spec_for(entry, timeout=5), env=dict(os.environ), version="v1")
    try:
        init_ms = await pool.start()
        assert 0 < init_ms < 10_000
    finally:
        await pool.retire()


async def test_syntax_error_makes_start_raise_handler_load_error_at_the_bad_line(tmp_path: Path) -> None:
    entry = write_handler(
        tmp_path,
        """
        import os


        def handler(event, context)
            return 1
    """,
    )
    pool = Pool(spec=spec_for(entry, timeout=5), env=dict(os.environ), version="v1")
    try:
        with pytest.raises(HandlerLoadError) as info:
            await pool.start()
    finally:
        await pool.retire()
    assert info.value.file == str(entry)
    assert info.value.line == 4
    assert info.value.function == "fn"
    assert "Runtime.UserCodeSyntaxError" in info.value.problem
    assert f"{entry}:4" in str(info.value)
    assert pool.idle == []


async def test_exception_at_import_points_at_the_raising_line(tmp_path: Path) -> None:
    entry = write_handler(
        tmp_path,
        """
        import os
        DB = os.environ["EVENTFN_TEST_SURELY_UNSET_VARIABLE"]

        def handler(event, context):
            return 1
    """,
    )
    pool = Pool(spec=spec_for(entry, timeout=5), env=dict(os.environ), version="v1")
    try:
        with pytest.raises(HandlerLoadError) as info:
            await pool.start()
    finally:
        await pool.retire()
    assert info.value.file == str(entry)
    assert info.value.line == 2
    # Lambda's runtime names an exception during init by its own type (only a failed import is ImportModuleError).
    assert info.value.error_type == "KeyError"
    assert "KeyError" in info.value.problem


async def test_missing_entry_point_is_handler_not_found(tmp_path: Path) -> None:
    entry = write_handler(tmp_path, "def main(event, context):\n    return 1\n")
    pool = Pool(spec=spec_for(entry, timeout=5), env=dict(os.environ), version="v1")
    try:
        with pytest.raises(HandlerLoadError) as info:
            await pool.start()
    finally:
        await pool.retire()
    assert "Runtime.HandlerNotFound" in info.value.problem


async def test_named_attribute_is_the_entry_point(tmp_path: Path) -> None:
    entry = write_handler(tmp_path, "def main(event, context):\n    return 'main'\n")
    pool = Pool(spec=spec_for(entry, timeout=5, attribute="main"), env=dict(os.environ), version="v1")
    try:
        await pool.start()
        assert result(await execute(pool, "r", b"{}")) == "main"
    finally:
        await pool.retire()


async def test_cold_start_failure_during_invoke_answers_with_the_init_error(tmp_path: Path) -> None:
    entry = write_handler(tmp_path, "def handler(event, context)\n    return 1\n")
    pool = Pool(spec=spec_for(entry, timeout=5), env=dict(os.environ), version="v1")
    try:
        err = error(await execute(pool, "r-cold", b"{}"))  # no start(): the invocation cold-starts a worker
    finally:
        await pool.retire()
    assert err["errorType"] == "Runtime.UserCodeSyntaxError"
    assert err["requestId"] == "r-cold"


# -- the event and the context ---------------------------------------------------------------------------------

ECHO = """
    def handler(event, context):
        return {"type": type(event).__name__, "event": event}
"""


@pytest.mark.parametrize(
    ("payload", "expected_type", "expected"),
    [
        (b'{"a": 1}', "dict", {"a": 1}),
        (b"[1, 2]", "list", [1, 2]),
        (b"42", "int", 42),
        (b"hello, not json", "str", "hello, not json"),
        ("grüße".encode(), "str", "grüße"),
        (b"\xff\x00\x01binary", "str", base64.b64encode(b"\xff\x00\x01binary").decode()),
        (b"", "dict", {}),
    ],
)
async def test_payload_becomes_the_event(tmp_path: Path, payload: bytes, expected_type: str, expected: Any) -> None:
    async with running_pool(tmp_path, ECHO) as pool:
        assert result(await execute(pool, "r", payload)) == {"type": expected_type, "event": expected}


async def test_context_has_lambda_attributes(tmp_path: Path) -> None:
    code = """
        def handler(event, context):
            return {
                "function_name": context.function_name,
                "function_version": context.function_version,
                "memory_limit_in_mb": context.memory_limit_in_mb,
                "invoked_function_arn": context.invoked_function_arn,
                "aws_request_id": context.aws_request_id,
                "remaining": context.get_remaining_time_in_millis(),
                "log_group_name": context.log_group_name,
                "log_stream_name": context.log_stream_name,
                "identity": [context.identity.cognito_identity_id, context.identity.cognito_identity_pool_id],
                "client_context_is_none": context.client_context is None,
            }
    """
    entry = write_handler(tmp_path, code, name="orders")
    pool = Pool(spec=spec_for(entry, timeout=2.0, function="orders", memory=256), env=dict(os.environ), version="v1")
    try:
        await pool.start()
        ctx = result(await execute(pool, "6f1c1f43-7f0e-4b5c-9b1e-1f2a3b4c5d6e", b"{}"))
    finally:
        await pool.retire()
    assert ctx["function_name"] == "orders"
    assert ctx["function_version"] == "$LATEST"
    assert ctx["memory_limit_in_mb"] == "256"
    assert ctx["invoked_function_arn"] == "arn:aws:lambda:local:000000000000:function:orders"
    assert ctx["aws_request_id"] == "6f1c1f43-7f0e-4b5c-9b1e-1f2a3b4c5d6e"
    assert 0 < ctx["remaining"] <= 2000
    assert ctx["log_group_name"] == "/aws/lambda/orders"
    assert "[$LATEST]" in ctx["log_stream_name"]
    assert ctx["identity"] == [None, None]
    assert ctx["client_context_is_none"] is True


async def test_client_context_and_cloud_event_reach_the_handler(tmp_path: Path) -> None:
    code = """
        def handler(event, context):
            cc = context.client_context
            return {"custom": cc.custom, "env": cc.env, "client": cc.client, "ce": context.cloud_event}
    """
    async with running_pool(tmp_path, code) as pool:
        outcome = await execute(
            pool,
            "r",
            b"{}",
            client_context=b'{"custom": {"k": "v"}, "env": {"e": 1}}',
            cloud_event={"id": "e-1", "type": "t"},
        )
    assert result(outcome) == {"custom": {"k": "v"}, "env": {"e": 1}, "client": None, "ce": {"id": "e-1", "type": "t"}}


async def test_print_in_handler_does_not_corrupt_the_protocol(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code = """
        import os, sys

        print("printed at import")

        def handler(event, context):
            print("hello from handler")
            print("\\x00\\x00\\x00\\x05 looks like a frame header", end="")
            sys.stdout.write("partial line without newline")
            os.write(1, b"\\x00\\x00\\x10\\x00raw bytes on fd 1\\n")
            print("to stderr", file=sys.stderr)
            return {"fine": True}
    """
    async with running_pool(tmp_path, code) as pool:
        first = await execute(pool, "req-print-1", b"{}")
        second = await execute(pool, "req-print-2", b"{}")
    assert result(first) == {"fine": True}
    assert result(second) == {"fine": True}
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "hello from handler" in line]
    assert len(lines) == 2
    assert lines[0].startswith("[fn] ")
    assert "\treq-print-1\t" in lines[0]
    assert "\treq-print-2\t" in lines[1]
    assert "raw bytes on fd 1" in err


# -- concurrency and retirement --------------------------------------------------------------------------------

RENDEZVOUS = """
    import os, socket

    def handler(event, context):
        # Tell the test this invocation is running, then wait until it says go.
        with socket.create_connection(("127.0.0.1", event["port"]), timeout=10) as s:
            s.sendall(context.aws_request_id.encode() + b"\\n")
            s.recv(2)
        return os.getpid()
"""


async def test_concurrent_invocations_run_on_separate_warm_workers(tmp_path: Path) -> None:
    outcomes: dict[str, Outcome] = {}
    async with running_pool(tmp_path, RENDEZVOUS) as pool:
        pool.max_workers = 2  # the function's concurrency: no spare beyond it
        async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
            port = listener.extra(SocketAttribute.local_port)
            payload = json.dumps({"port": port}).encode()

            async def invoke(request_id: str) -> None:
                outcomes[request_id] = await execute(pool, request_id, payload)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(invoke, "r1")
                    tg.start_soon(invoke, "r2")
                    # Both handlers connect before either is released: they run at the same time.
                    connections = [await listener.listeners[0].accept() for _ in range(2)]
                    assert pool.busy == 2
                    for conn in connections:
                        await conn.send(b"go")
                        await conn.aclose()
        assert len(pool.idle) == 2  # both workers stay warm
    pids = {result(o) for o in outcomes.values()}
    assert len(pids) == 2


async def test_retire_lets_inflight_invocation_finish_then_stops_its_worker(tmp_path: Path) -> None:
    outcomes: list[Outcome] = []
    async with running_pool(tmp_path, RENDEZVOUS) as pool:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
            payload = json.dumps({"port": listener.extra(SocketAttribute.local_port)}).encode()

            async def invoke() -> None:
                outcomes.append(await execute(pool, "r-inflight", payload))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(invoke)
                    conn = await listener.listeners[0].accept()
                    await pool.retire()  # a hot reload happens while the invocation runs
                    await conn.send(b"go")
                    await conn.aclose()
        assert pool.idle == []
    pid = result(outcomes[0])
    assert not process_exists(pid)


async def test_retire_stops_idle_workers(tmp_path: Path) -> None:
    code = "import os\ndef handler(event, context):\n    return os.getpid()\n"
    async with running_pool(tmp_path, code) as pool:
        pid = result(await execute(pool, "r", b"{}"))
        assert process_exists(pid)
        await pool.retire()
        assert pool.idle == []
        assert not process_exists(pid)
