"""How a pool places invocations on its workers: one deadline timer per pool, invocations queued behind a quick
handler's run (and moved to another worker when that run times out, crashes or runs out of memory), an invocation
that takes a warm worker freed before its cold start ends, and a spare worker when every worker is busy.

Real `python -m eventfn.invoke.runtime` workers, driven through `Pool.execute` as `Function.invoke` drives it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute

from eventfn.invoke import workers
from eventfn.invoke.invocation import Execution, Invocation, Outcome
from eventfn.invoke.workers import QUICK_MS, Pool
from tests.conftest import running_pool, write_handler
from tests.test_workers import RENDEZVOUS

#: A handler that is quick unless asked: it warms up as quick, then one event spins, exits or eats memory.
MOODY = """
    import os

    def handler(event, context):
        if event == "spin":
            while True:
                pass
        if event == "exit":
            os._exit(3)
        if event == "eat":
            hoard = bytearray(512 * 1024 * 1024)
            return len(hoard)
        if isinstance(event, dict) and "sleep" in event:
            import time
            time.sleep(event["sleep"])
        return {"pid": os.getpid(), "left": context.get_remaining_time_in_millis()}
"""


#: Request ids in the order `Pool.execute` said they started (where `Function.invoke` writes START lines).
STARTED: list[str] = []


async def run(pool: Pool, request_id: str, event: Any) -> Execution:
    invocation = Invocation(request_id=request_id, payload=json.dumps(event).encode())
    return await pool.execute(invocation, lambda started: STARTED.append(started.request_id))


def ok(outcome: Outcome) -> dict[str, Any]:
    assert outcome.ok, outcome.payload
    value = json.loads(outcome.payload)
    assert isinstance(value, dict)
    return value


async def warm_up(pool: Pool) -> int:
    """Run quick invocations until the worker counts as quick; returns its pid."""
    pid = 0
    for i in range(5):
        pid = ok((await run(pool, f"warm-{i}", {})).outcome)["pid"]
    workers = [w for w, _ in pool.idle]
    assert len(workers) == 1 and workers[0].typical_ms is not None and workers[0].typical_ms < QUICK_MS
    return pid


async def run_together(pool: Pool, events: list[tuple[str, Any]]) -> dict[str, Execution]:
    """Start the invocations in this order in one pass of the event loop: the first runs on the warm worker, the
    others queue behind it there (it is quick)."""
    done: dict[str, Execution] = {}

    async def one(request_id: str, event: Any) -> None:
        done[request_id] = await run(pool, request_id, event)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for request_id, event in events:
                tg.start_soon(one, request_id, event)
    return done


async def test_invocations_queued_behind_a_run_that_times_out_run_elsewhere_and_the_timeout_fires_on_time(
    tmp_path: Path,
) -> None:
    async with running_pool(tmp_path, MOODY, timeout=1.0) as pool:
        pool.max_workers = 1  # no spare: the queued invocations can only go where the pool sends them
        stuck = await warm_up(pool)
        begin = time.monotonic()
        done = await run_together(pool, [("r-spin", "spin"), ("r-a", {}), ("r-b", {})])
        spun = done["r-spin"].outcome
        assert not spun.ok and spun.error is not None
        assert spun.error.type == "Sandbox.Timedout"
        assert spun.error.message == "RequestId: r-spin Error: Task timed out after 1.00 seconds"
        assert 1.0 <= done["r-spin"].duration_ms / 1000 < 4.0
        # The two queued behind it never started there: they ran, once, on the worker that replaced it, each with
        # its whole timeout ahead of it (the deadline counts from the start of the run, not from the queueing).
        for request_id in ("r-a", "r-b"):
            value = ok(done[request_id].outcome)
            assert value["pid"] != stuck
            assert value["left"] > 900
        assert time.monotonic() - begin < 10


async def test_invocations_queued_behind_a_run_that_crashes_run_elsewhere(tmp_path: Path) -> None:
    STARTED.clear()
    async with running_pool(tmp_path, MOODY) as pool:
        pool.max_workers = 1
        crashed = await warm_up(pool)
        done = await run_together(pool, [("r-exit", "exit"), ("r-a", {}), ("r-b", {}), ("r-c", {})])
        error = done["r-exit"].outcome.error
        assert error is not None and error.type == "Runtime.ExitError"
        assert "exit status 3" in error.message
        pids = {ok(done[r].outcome)["pid"] for r in ("r-a", "r-b", "r-c")}
        assert crashed not in pids
    # Each started once (one START line each), the crashed one first: the others had not started where it ran.
    started = [r for r in STARTED if r.startswith("r-")]
    assert sorted(started) == ["r-a", "r-b", "r-c", "r-exit"] and started[0] == "r-exit"


async def test_invocations_queued_behind_a_run_out_of_memory_run_elsewhere(tmp_path: Path) -> None:
    async with running_pool(tmp_path, MOODY, memory=128) as pool:
        pool.max_workers = 1
        hungry = await warm_up(pool)
        done = await run_together(pool, [("r-eat", "eat"), ("r-a", {}), ("r-b", {})])
        error = done["r-eat"].outcome.error
        assert error is not None and error.type == "Runtime.OutOfMemory"
        for request_id in ("r-a", "r-b"):
            assert ok(done[request_id].outcome)["pid"] != hungry


async def test_one_timer_serves_every_deadline_of_the_pool(tmp_path: Path) -> None:
    # Runs that time out one after another, and beside runs that do not: each fails at its own deadline.
    async with running_pool(tmp_path, MOODY, timeout=1.0) as pool:
        done = await run_together(pool, [("r-spin-1", "spin"), ("r-quick", {"sleep": 0.2}), ("r-spin-2", "spin")])
        for request_id in ("r-spin-1", "r-spin-2"):
            error = done[request_id].outcome.error
            assert error is not None and error.type == "Sandbox.Timedout", done[request_id].outcome.payload
            assert 1.0 <= done[request_id].duration_ms / 1000 < 8.0
        ok(done["r-quick"].outcome)
        again = await run(pool, "r-spin-3", "spin")
        assert again.outcome.error is not None and again.outcome.error.type == "Sandbox.Timedout"


SLOW_INIT = """
    import os, time

    if os.path.exists({flag!r}):
        time.sleep(5)  # every cold start after the first is slow

    def handler(event, context):
        time.sleep(event.get("sleep", 0))
        return os.getpid()
"""


async def test_an_invocation_takes_a_warm_worker_that_frees_before_its_cold_start_ends(tmp_path: Path) -> None:
    flag = tmp_path / "slow-init"
    async with running_pool(tmp_path, SLOW_INIT.format(flag=str(flag))) as pool:
        flag.touch()
        done: dict[str, Execution] = {}
        begin = time.monotonic()

        async def one(request_id: str, event: Any) -> None:
            done[request_id] = await run(pool, request_id, event)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "r-busy", {"sleep": 0.3})
                tg.start_soon(one, "r-waits", {})  # no worker free: a cold start begins for it (5 s)
        took = time.monotonic() - begin
        warm = json.loads(done["r-busy"].outcome.payload)
        assert json.loads(done["r-waits"].outcome.payload) == warm  # the warm worker, once free
        assert done["r-waits"].init_ms is None  # it did not pay for a cold start
        assert took < 4.0
        # The cold start goes on: its worker joins the pool for the next rise in demand.
        assert pool.size == 2


async def test_a_spare_worker_starts_when_every_worker_is_busy_within_the_cap(tmp_path: Path) -> None:
    for cap, expected in ((None, 3), (2, 2)):
        async with running_pool(tmp_path, RENDEZVOUS) as pool:
            pool.max_workers = cap
            async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
                payload = json.dumps({"port": listener.extra(SocketAttribute.local_port)}).encode()
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        for i in range(2):
                            tg.start_soon(pool.execute, Invocation(request_id=f"r{i}", payload=payload))
                        # Both run at once (two workers busy, none idle): a spare starts unless the cap says no.
                        held = [await listener.listeners[0].accept() for _ in range(2)]
                        await asyncio.gather(*pool._spawns)  # the start-ups the pool began end
                        assert len(pool.idle) == expected - 2
                        for conn in held:
                            await conn.send(b"go")
                            await conn.aclose()
            assert len(pool.idle) == expected


async def test_a_burst_that_a_quick_warm_worker_absorbs_starts_no_cold_start(tmp_path: Path, monkeypatch: Any) -> None:
    # The wait before a cold start is made long here, so that a slow machine cannot make the test pass or fail:
    # what is measured is that the burst never needed one.
    monkeypatch.setattr(workers, "GROW_AFTER", 30.0)
    async with running_pool(tmp_path, MOODY) as pool:
        warm = await warm_up(pool)
        done = await run_together(pool, [(f"r{i}", {}) for i in range(12)])
        assert {ok(e.outcome)["pid"] for e in done.values()} == {warm}
        assert pool.size == 1 and not pool._spawns


async def test_the_deadline_of_a_queued_invocation_counts_from_its_own_start(tmp_path: Path) -> None:
    async with running_pool(tmp_path, MOODY, timeout=1.0) as pool:
        pool.max_workers = 1
        warm = await warm_up(pool)
        # Queued behind a run that turns out slow this time (0.6 s of the 1 s timeout): counted from the queueing,
        # its deadline would pass 0.4 s into its own run; counted from its start, it has its whole second.
        done = await run_together(pool, [("r-slow", {"sleep": 0.6}), ("r-next", {})])
        assert ok(done["r-slow"].outcome)["pid"] == warm
        queued = ok(done["r-next"].outcome)
        assert queued["pid"] == warm  # it did wait in that worker's pipe
        assert queued["left"] > 900


#: Appends `<request id> <pid>` to the file named by the event, after sleeping as long as it says; then tells the
#: test on its port, if it names one, that it ran.
MARKS = """
    import os
    import socket
    import time

    def handler(event, context):
        time.sleep(event.get("sleep", 0))
        line = f"{context.aws_request_id} {os.getpid()}\\n"
        with open(event["marks"], "a") as marks:
            marks.write(line)
        if "port" in event:
            with socket.create_connection(("127.0.0.1", event["port"]), timeout=10) as told:
                told.sendall(line.encode())
        return {"pid": os.getpid()}
"""


async def test_an_invocation_queued_behind_a_timed_out_run_that_started_there_is_not_run_again(
    tmp_path: Path,
) -> None:
    """The run ahead of it ended just past its deadline, while its worker was being killed (a cgroup kill waits
    for an RCU grace period, 10-20 ms on a loaded host): the worker went on to the invocation queued behind it. That
    one ran; it must not be sent to another worker and run a second time (a non-idempotent handler, one invoke)."""
    marks = tmp_path / "marks.txt"
    async with (
        running_pool(tmp_path, MARKS, timeout=1.0) as pool,
        await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener,
    ):
        port = listener.extra(SocketAttribute.local_port)
        pool.max_workers = 1
        for i in range(5):
            await run(pool, f"warm-{i}", {"marks": str(marks)})
        [(worker, _)] = pool.idle
        assert worker.typical_ms is not None and worker.typical_ms < QUICK_MS
        old = worker.process.pid
        kill = worker.kill

        async def slow_kill() -> None:
            # The first kill lands once the worker has gone on to the queued invocation (bounded: 10 s).
            worker.kill = kill  # type: ignore[method-assign]
            with anyio.move_on_after(10):
                told = b""
                while f"r-queued {old}".encode() not in told:
                    async with await listener.listeners[0].accept() as conn:
                        told = await conn.receive()
            await kill()

        worker.kill = slow_kill  # type: ignore[method-assign]
        done = await run_together(
            pool,
            [("r-late", {"sleep": 1.1, "marks": str(marks)}), ("r-queued", {"marks": str(marks), "port": port})],
        )
        late = done["r-late"].outcome
        assert late.error is not None and late.error.type == "Sandbox.Timedout"
        runs = [line for line in marks.read_text().splitlines() if line.startswith("r-queued ")]
        assert runs == [f"r-queued {old}"], f"it ran {len(runs)} times: {runs}"
        queued = done["r-queued"].outcome
        assert not queued.ok and queued.error is not None and queued.error.type == "Runtime.ExitError"


async def test_every_invocation_waiting_for_cold_starts_that_fail_gets_the_init_error(tmp_path: Path) -> None:
    """More invocations wait than cold starts begin at once (`MAX_STARTING`); each failed cold start answers one of
    them: the rest must get cold starts of their own (and their error), not wait forever."""
    async with running_pool(tmp_path, "def handler(event, context):\n    return 1\n", min_warm=0) as pool:
        write_handler(tmp_path, "def handler(event, context)\n    return 1\n")  # broken since it was validated
        waiting = workers.MAX_STARTING + 2
        with anyio.fail_after(60):
            done = await run_together(pool, [(f"r-{i}", {}) for i in range(waiting)])
        for execution in done.values():
            error = execution.outcome.error
            assert error is not None and error.type == "Runtime.UserCodeSyntaxError", execution.outcome


#: Writes what is not a frame on its worker's channel (handler code can reach it), then returns.
FORGER = """
    import gc

    def handler(event, context):
        [channel] = [o for o in gc.get_objects() if type(o).__name__ == "_Channel" and hasattr(o, "writer")]
        channel.writer.write(b"\\x00\\x00\\x00\\x03\\xc1\\xc1\\xc1")
        channel.writer.flush()
        return "done"
"""


async def test_a_worker_that_writes_what_is_not_a_frame_is_stopped_at_once(tmp_path: Path) -> None:
    """Handler code can write to its worker's channel: bytes that do not decode end that worker (its invocation
    gets Lambda's exit error), instead of an error per read in the service and an invocation left to time out."""
    async with running_pool(tmp_path, FORGER, timeout=60.0) as pool:
        with anyio.fail_after(20):
            execution = await run(pool, "r-forged", {})
        error = execution.outcome.error
        assert error is not None and error.type == "Runtime.ExitError", execution.outcome
        assert not pool.idle and pool.busy == 0


async def test_a_run_whose_caller_left_while_it_was_queued_still_has_its_worker_replaced_when_it_times_out(
    tmp_path: Path,
) -> None:
    """The caller of an invocation queued behind a run was cancelled: it stays in the pipe and runs. Should it then
    time out, no caller is left to kill its worker: the pool must still, and what is queued behind it runs elsewhere
    (not left waiting behind a worker that spins for ever)."""
    async with running_pool(tmp_path, MOODY, timeout=1.0) as pool:
        pool.max_workers = 1
        stuck = await warm_up(pool)
        done: dict[str, Execution] = {}

        async def one(request_id: str, event: Any) -> None:
            done[request_id] = await run(pool, request_id, event)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "r-first", {"sleep": 0.2})
                async with anyio.create_task_group() as leaving:
                    leaving.start_soon(one, "r-spin", "spin")
                    await asyncio.sleep(0)  # it is queued behind the first run (one pass of the loop)
                    [worker] = pool._active
                    assert [c.invocation.request_id for c in worker.calls] == ["r-first", "r-spin"]
                    leaving.cancel_scope.cancel()  # its caller leaves
                tg.start_soon(one, "r-after", {})
        assert ok(done["r-first"].outcome)["pid"] == stuck
        assert ok(done["r-after"].outcome)["pid"] != stuck
        assert pool.busy == 0
