"""Lambda's execution model against a real `eventfn serve`: isolation, limits, concurrency, warm reuse."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute
from nats.aio.client import Client

from eventfn.testing import Serve, wait_stats, write_handler

pytestmark = pytest.mark.e2e


async def invoke(nc: Client, name: str, payload: object = None, timeout: float = 15) -> tuple[object, dict[str, str]]:
    reply = await nc.request(f"eventfn.invoke.{name}", json.dumps(payload or {}).encode(), timeout=timeout)
    return json.loads(reply.data), dict(reply.headers or {})


async def test_memory_limit_fails_the_invocation_and_replaces_the_worker(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(
        handlers,
        "hungry",
        """
        # /// eventfn
        # memory = 128
        # ///
        import os

        def handler(event, context):
            if event.get("eat"):
                hoard = bytearray(event["eat"] * 1024 * 1024)
                return len(hoard)
            return os.getpid()
    """,
    )
    await serve()
    first_pid, _ = await invoke(nc, "hungry")
    small, _ = await invoke(nc, "hungry", {"eat": 16})
    assert small == 16 * 1024 * 1024
    error, headers = await invoke(nc, "hungry", {"eat": 512})
    assert headers["Eventfn-Function-Error"] == "Unhandled"
    assert error["errorType"] == "Runtime.OutOfMemory"
    assert "128 MB" in error["errorMessage"]
    second_pid, _ = await invoke(nc, "hungry")
    assert second_pid != first_pid, "the worker that ran out of memory was replaced"


async def test_worker_killed_from_outside_fails_only_its_invocation(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    write_handler(
        handlers,
        "victim",
        """
        # /// eventfn
        # timeout = 30
        # ///
        import os, time
        import _probe

        def handler(event, context):
            _probe.report("probe.victim", str(os.getpid()))
            time.sleep(20)
    """,
    )
    write_handler(
        handlers,
        "bystander",
        """
        def handler(event, context):
            return "fine"
    """,
    )
    await serve()
    started = await probe("probe.victim")
    async with anyio.create_task_group() as tg:
        result: dict[str, object] = {}

        async def call() -> None:
            result["error"], result["headers"] = await invoke(nc, "victim", timeout=30)

        tg.start_soon(call)
        [pid] = await started.wait_for(1)
        os.kill(int(pid), signal.SIGKILL)
    error = result["error"]
    assert isinstance(error, dict) and error["errorType"] == "Runtime.ExitError"
    assert "signal: kill" in error["errorMessage"]
    assert (await invoke(nc, "bystander"))[0] == "fine"


async def test_environment_variables_are_visible_to_their_function_only(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    reader = """
        # /// eventfn
        {settings}
        # ///
        import os

        def handler(event, context):
            return {{k: os.environ.get(k) for k in ("SHARED_NAME", "ONLY_A", "ONLY_B")}}
    """
    write_handler(
        handlers,
        "a",
        reader.format(settings='# [environment]\n        # SHARED_NAME = "from a"\n        # ONLY_A = "1"'),
    )
    write_handler(
        handlers,
        "b",
        reader.format(settings='# [environment]\n        # SHARED_NAME = "from b"\n        # ONLY_B = "2"'),
    )
    write_handler(handlers, "c", reader.format(settings="# timeout = 3"))
    await serve()
    assert (await invoke(nc, "a"))[0] == {"SHARED_NAME": "from a", "ONLY_A": "1", "ONLY_B": None}
    assert (await invoke(nc, "b"))[0] == {"SHARED_NAME": "from b", "ONLY_A": None, "ONLY_B": "2"}
    assert (await invoke(nc, "c"))[0] == {"SHARED_NAME": None, "ONLY_A": None, "ONLY_B": None}


def max_parallelism(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


async def test_reserved_concurrency_is_never_exceeded_and_is_used(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    write_handler(
        handlers,
        "capped",
        """
        # /// eventfn
        # concurrency = 3
        # triggers = ["events.capped.>"]
        # ///
        import json, time
        import _probe

        def handler(event, context):
            start = time.time()
            time.sleep(0.2)
            _probe.report("probe.capped", json.dumps([start, time.time()]))
    """,
    )
    await serve()
    spans = await probe("probe.capped")
    for n in range(15):
        await nc.publish("events.capped.job", json.dumps({"n": n}).encode())
    done = [tuple(json.loads(t)) for t in await spans.wait_for(15)]
    assert max_parallelism(done) == 3  # type: ignore[arg-type]


async def test_sync_invoke_over_a_cap_is_throttled_not_queued(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    sleeper = """
        # /// eventfn
        # concurrency = {concurrency}
        # timeout = 10
        # ///
        import time
        import _probe

        def handler(event, context):
            _probe.report("probe.busy", context.function_name)
            time.sleep(event.get("sleep", 0))
            return "done"
    """
    write_handler(handlers, "single", sleeper.format(concurrency=1))
    write_handler(handlers, "other", sleeper.format(concurrency=5))
    config = tmp_path / "eventfn.toml"
    config.write_text("max_concurrency = 1\n")
    await serve(extra_args=["--config", str(config)])
    busy = await probe("probe.busy")
    results: list[object] = []
    async with anyio.create_task_group() as tg:

        async def hold() -> None:
            results.append((await invoke(nc, "single", {"sleep": 1.5}))[0])

        tg.start_soon(hold)
        await busy.wait_for(1)
        error, headers = await invoke(nc, "single")
        assert error["errorType"] == "TooManyRequestsException"  # type: ignore[index]
        assert "ReservedFunctionConcurrentInvocationLimitExceeded" in error["errorMessage"]  # type: ignore[index]
        assert headers["Eventfn-Status"] == "429"
        error, _ = await invoke(nc, "other")  # its own limit has room; the service-wide cap of 1 has not
        assert "ConcurrentInvocationLimitExceeded" in error["errorMessage"]  # type: ignore[index]
        assert "Reserved" not in error["errorMessage"]  # type: ignore[index]
    assert results == ["done"]
    assert (await invoke(nc, "other"))[0] == "done", "slots are given back"


async def test_warm_worker_runs_init_once_and_reports_init_duration_on_cold_start_only(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(
        handlers,
        "warm",
        """
        import os
        INITS = 0
        INITS += 1
        calls = 0

        def handler(event, context):
            global calls
            calls += 1
            print("handled call", calls)
            return [os.getpid(), INITS, calls]
    """,
    )
    service = await serve()
    mark = service.log.mark()
    results = [(await invoke(nc, "warm"))[0] for _ in range(5)]
    assert {r[0] for r in results} == {results[0][0]}, "one warm worker served them all"  # type: ignore[index]
    assert [r[1:] for r in results] == [[1, n] for n in range(1, 6)]  # type: ignore[index]
    await service.log.await_line(r"REPORT RequestId", start=mark, count=5)  # report lines are written in batches
    reports = [line for line in service.log.lines[mark:] if "REPORT RequestId" in line]
    # min_warm = 0: the worker that validated the version stopped; the first invocation is a cold start.
    assert len(reports) == 5 and ["Init Duration" in line for line in reports] == [True] + [False] * 4
    request = (await service.log.await_line(r"START RequestId: (\S+) Version: \$LATEST", start=mark)).group(1)
    await service.log.await_line(rf"\[warm\] \S+\t{request}\thandled call 1", start=mark)
    await service.log.await_line(rf"END RequestId: {request}", start=mark)


async def test_pool_scales_up_on_demand_and_down_after_idle(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(
        handlers,
        "elastic",
        """
        # /// eventfn
        # concurrency = 4
        # min_warm = 1
        # idle_timeout = 1
        # ///
        import os, socket

        def handler(event, context):
            # Tell the test this invocation runs, then wait until it says go: the four run at once.
            with socket.create_connection(("127.0.0.1", event["port"]), timeout=10) as s:
                s.sendall(b"running")
                s.recv(2)
            return os.getpid()
    """,
    )
    service = await serve()
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
        port = listener.extra(SocketAttribute.local_port)
        pids: list[object] = []

        async def call() -> None:
            pids.append((await invoke(nc, "elastic", {"port": port}, timeout=30))[0])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(call)
                held = [await listener.listeners[0].accept() for _ in range(4)]
                for conn in held:
                    await conn.send(b"go")
                    await conn.aclose()
    assert len(set(pids)) == 4, "four concurrent invocations, four workers"
    [info] = json.loads((await nc.request("eventfn.api.functions", b"")).data)
    assert info["workers"] == 4
    assert await service.log.await_line(r"function elastic scaled down by \d idle worker\(s\) to 1", timeout=10)
    [info] = json.loads((await nc.request("eventfn.api.functions", b"")).data)
    assert info["workers"] == 1
    await service.log.await_line(r"REPORT RequestId.*elastic", count=4)
    reports = [line for line in service.log.lines if "REPORT" in line and "elastic" in line]
    assert sum("Init Duration" in line for line in reports) == 3, "three cold starts beyond the warm worker"


async def test_in_process_isolation_runs_sync_and_async_handlers_in_the_service(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(
        handlers,
        "fast",
        """
        # /// eventfn
        # isolation = "inprocess"
        # ///
        import os

        def handler(event, context):
            return {"pid": os.getpid(), "request": context.aws_request_id}
    """,
    )
    write_handler(
        handlers,
        "fast_async",
        """
        # /// eventfn
        # isolation = "inprocess"
        # timeout = 1
        # ///
        import asyncio

        async def handler(event, context):
            await asyncio.sleep(event.get("sleep", 0))
            if event.get("fail"):
                raise ValueError("nope")
            return "async ok"
    """,
    )
    service = await serve()
    assert service.process is not None
    result, _ = await invoke(nc, "fast")
    assert result["pid"] == service.process.pid  # type: ignore[index]
    assert (await invoke(nc, "fast_async"))[0] == "async ok"
    error, headers = await invoke(nc, "fast_async", {"fail": True})
    assert error["errorType"] == "ValueError" and headers["Eventfn-Function-Error"] == "Unhandled"  # type: ignore[index]
    assert any("fast_async.py" in frame for frame in error["stackTrace"])  # type: ignore[index]
    error, _ = await invoke(nc, "fast_async", {"sleep": 5})
    assert error["errorType"] == "Sandbox.Timedout"  # type: ignore[index]
    assert (await invoke(nc, "fast"))[0]["pid"] == service.process.pid  # type: ignore[index]


async def test_concurrency_zero_throttles_sync_dead_letters_async_and_holds_triggered_events(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(
        handlers,
        "off",
        """
        # /// eventfn
        # concurrency = 0
        # triggers = ["events.off.>"]
        # ///
        def handler(event, context):
            return "never"
    """,
    )
    await serve()
    error, headers = await invoke(nc, "off")
    assert headers["Eventfn-Status"] == "429" and "Reserved" in error["errorMessage"]  # type: ignore[index]
    js = nc.jetstream()
    await js.publish("eventfn.async.off", b'{"queued": true}')
    await nc.publish("events.off.thing", b'{"held": true}')
    await wait_stats(nc, "off--async", dead_lettered=1)
    record = json.loads((await js.get_last_msg("EVENTFN_DLQ", "eventfn.dlq.off")).data)
    assert record["requestPayload"] == {"queued": True}
    assert record["requestContext"]["condition"] == "Throttled"
    [info] = json.loads((await nc.request("eventfn.api.functions", b"")).data)
    assert info["state"] == "Inactive"
    state = await js.consumer_info("EVENTFN", "off--t0")
    assert state.num_pending == 1, "the triggered event waits in JetStream"
