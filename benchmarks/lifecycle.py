"""Scenarios 4-6 of issue 5: cold start and hot reload, memory, and what cannot be measured yet.

Cold start and hot reload are measured as a user sees them: a file appears (or changes) in the watched
directory, and requests poll the function until its (new) code answers. The floor beside them is the start of
a bare interpreter that imports msgspec (what every worker process pays) after watchfiles notices the file.
Memory is read from /proc.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import msgspec
import nats.errors
import watchfiles

from benchmarks import functions, stream
from benchmarks.functions import INPROCESS, PROCESS
from benchmarks.harness import Bench, descendants, median, rss_mb
from benchmarks.report import Target
from benchmarks.scenarios import unavailable
from eventfn.testing import Serve

POLL = 0.005
BACKLOG_SUBJECT = "events.bench.backlog"
IDLE_FUNCTIONS = 20


async def interpreter_start(repeats: int) -> float:
    """Median seconds for `python -P -c "import msgspec"`: what any worker process pays before user code."""
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        await anyio.run_process([sys.executable, "-P", "-c", "import msgspec"])
        times.append(time.perf_counter() - begin)
    return median(times)


async def watch_notice(directory: Path, repeats: int) -> float:
    """Median seconds from a file appearing to watchfiles reporting it (eventfn's step, 20 ms, no debounce).

    What any hot reload built on watchfiles waits before it can start to act.
    """
    directory.mkdir(parents=True, exist_ok=True)
    return median([await _notice_once(directory / f"f{i}.py") for i in range(repeats)])


async def _notice_once(path: Path) -> float:
    stop, noticed = anyio.Event(), anyio.Event()

    async def watch() -> None:
        async for _ in watchfiles.awatch(path.parent, step=20, debounce=20, stop_event=stop):
            noticed.set()
            return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await anyio.sleep(0.2)  # the watch is installed by then
        begin = time.perf_counter()
        path.write_text("x = 1\n")
        await noticed.wait()
        stop.set()
    return time.perf_counter() - begin


async def _until_serving(bench: Bench, function: str, version: int, timeout: float = 30.0) -> float:
    """Poll `function` with sync invokes until version `version` answers; returns when (perf_counter)."""
    subject = f"eventfn.invoke.{function}"
    with anyio.fail_after(timeout):
        while True:
            try:
                reply = await bench.nc.request(subject, b"{}", timeout=5)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                reply = None
            if reply is not None and not (reply.headers or {}).get("Eventfn-Error"):
                try:
                    answer = msgspec.json.decode(reply.data)
                except msgspec.DecodeError:
                    answer = None
                if isinstance(answer, dict) and answer.get("version") == version:
                    return time.perf_counter()
            await anyio.sleep(POLL)


async def cold_start(bench: Bench, handlers: Path, available: dict[str, str | None]) -> None:
    """Scenario 4: a new handler file to its first result; a changed file to the new code serving."""
    repeats = bench.sizes.repeats
    notice = await watch_notice(bench.work / "watch-floor", repeats) * 1e3
    interpreter = await interpreter_start(repeats) * 1e3
    raw: dict[str, object] = {"watch_notice_ms": notice, "interpreter_start_ms": interpreter}
    for isolation in (PROCESS, INPROCESS):
        label = "eventfn process" if isolation == PROCESS else "eventfn in-process"
        colds: list[float] = []
        reloads: list[float] = []
        if available[isolation] is None:
            for i in range(repeats):
                name = f"cold_{isolation}_{i}"
                block = functions.settings_block(isolation=isolation)
                begin = time.perf_counter()
                functions.place_versioned(handlers, name, 1, block)
                colds.append((await _until_serving(bench, name, 1) - begin) * 1e3)
                begin = time.perf_counter()
                functions.place_versioned(handlers, name, 2, block)
                reloads.append((await _until_serving(bench, name, 2) - begin) * 1e3)
        raw[isolation] = {"cold_ms": colds, "reload_ms": reloads}
        missing = "" if available[isolation] is None else unavailable(available[isolation])
        floor, floor_what = (
            (notice + interpreter, "file noticed + python start")
            if isolation == PROCESS
            else (notice, "file noticed by watchfiles")
        )
        for what, runs, bound in (("cold start", colds, 250.0), ("hot reload", reloads, 500.0)):
            figure = median(runs) if runs else None
            bench.row(
                "4 start & reload",
                f"{label}: {what}" + (f" (median of {len(runs)})" if runs else ""),
                figure,
                "ms",
                ceiling=floor,
                ceiling_what=floor_what,
                target=Target(text=f"≤ {bound:.0f} ms", rule="figure_at_most", bound=bound),
                note=missing or "runs: " + ", ".join(f"{r:.0f}" for r in runs),
            )
    bench.raw["start_reload"] = raw


# -- 5. memory -------------------------------------------------------------------------------------------------


async def _floors(bench: Bench) -> tuple[float, float]:
    """RSS of an idle raw nats-py client process, and of an idle interpreter that imported msgspec."""
    responder = bench.child("ceiling", "respond", "--subject", "bench.floor")
    await responder.start()
    try:
        await anyio.sleep(0.3)
        client = rss_mb(responder.pid)
    finally:
        await responder.finish()
    code = "import msgspec, sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"
    async with await anyio.open_process(
        [sys.executable, "-P", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as bare:
        assert bare.stdout is not None and bare.stdin is not None
        await bare.stdout.receive()
        worker = rss_mb(bare.pid)
        await bare.stdin.aclose()
    return client, worker


async def memory(bench: Bench) -> None:
    """Scenario 5: RSS of `eventfn serve` idle with 20 functions, per warm worker, and while a backlog drains."""
    nc, n = bench.nc, bench.sizes.backlog
    handlers = functions.handler_dir(bench.work / "handlers-memory")
    sink = functions.settings_block(subject=BACKLOG_SUBJECT, batch_size=100, enabled=False)
    functions.no_op(handlers, "mem_00", sink)
    for i in range(1, IDLE_FUNCTIONS):
        functions.no_op(handlers, f"mem_{i:02d}", functions.settings_block(subject=f"events.bench.idle.{i}"))
    client_floor, worker_floor = await _floors(bench)
    serve = Serve(handlers, bench.url, bench.work / "data-memory")
    await anyio.to_thread.run_sync(serve.start)
    try:
        assert serve.process is not None
        pid = serve.process.pid
        await anyio.sleep(2.0)  # let start-up garbage settle before calling it idle
        idle = rss_mb(pid)
        idle_pids = set(descendants(pid))
        workers = [rss_mb(child) for child in idle_pids]
        # A function with no warm worker at idle (scale to zero) gets one by its first invoke: measure that one.
        await bench.nc.request("eventfn.invoke.mem_01", b"{}", timeout=30)
        started = [rss_mb(child) for child in set(descendants(pid)) - idle_pids]
        warm = started or workers
        took = await stream.preload(nc, BACKLOG_SUBJECT, n)
        bench.say(f"5. memory: {n:,} events preloaded in {took:.1f} s; draining")
        last = await stream.last_sequence(nc, BACKLOG_SUBJECT)
        before = rss_mb(pid)
        samples: list[float] = []
        seconds = 0.0
        async with anyio.create_task_group() as tg:

            async def sample() -> None:
                while True:
                    samples.append(rss_mb(pid))
                    await anyio.sleep(0.1)

            tg.start_soon(sample)
            consumer = "mem_00--t0"
            seconds = await stream.timed_drain(
                nc, consumer, kick=f"eventfn.redrive.{consumer}", last_seq=last, timeout=n / 300 + 60
            )
            tg.cancel_scope.cancel()
        after = rss_mb(pid)
    finally:
        await anyio.to_thread.run_sync(serve.stop)
    peak = max(samples, default=before)
    bench.raw["memory"] = {
        "serve_idle_mb": idle,
        "workers_mb": workers,
        "started_by_first_invoke_mb": started,
        "backlog": n,
        "before_drain_mb": before,
        "samples_mb": samples,
        "after_drain_mb": after,
        "drain_seconds": seconds,
        "floor_client_mb": client_floor,
        "floor_worker_mb": worker_floor,
    }
    scenario = "5 memory"
    bench.row(
        scenario,
        f"eventfn serve idle, {IDLE_FUNCTIONS} functions",
        idle,
        "MB",
        ceiling=client_floor,
        ceiling_what="idle raw nats-py client",
        target=Target(text="≤ 60 MB", rule="figure_at_most", bound=60.0),
        note=f"plus {len(workers)} descendant processes (workers), {sum(workers):.0f} MB in all",
    )
    bench.row(
        scenario,
        "one warm worker (median)",
        median(warm) if warm else None,
        "MB",
        ceiling=worker_floor,
        ceiling_what="idle python + msgspec",
        target=Target(text="≤ 25 MB", rule="figure_at_most", bound=25.0),
        note=(
            f"the process the first invoke of an idle function started ({len(started)})"
            if started
            else "the workers warm at idle"
        )
        if warm
        else "no worker processes found",
    )
    bench.row(
        scenario,
        f"eventfn serve growth while {n:,} events drain (peak - idle)",
        peak - idle,
        "MB",
        target=Target(text="no growth (≤ 5 MB)", rule="figure_at_most", bound=5.0),
        note=f"idle {idle:.1f}, peak {peak:.1f}, after {after:.1f} MB; drained at {n / seconds:,.0f} events/s "
        "(process, batch 100)",
    )


def skipped(bench: Bench) -> None:
    """Scenario 6 needs what is not built yet."""
    bench.say("6. files-to-handler latency, HTTP function URLs: needs connectors/HTTP (not built yet)")
    what = "files-to-handler latency, HTTP requests/s"
    bench.row("6 connectors & HTTP", what, None, "", note="needs connectors/HTTP (not built yet)")
