"""`python -m benchmarks [--quick] [--out DIR]`: every scenario of issues 5 and 13 in one run, beside its ceiling.

Starts its own nats-server (JetStream, loopback, a temporary store), runs the scenarios in order, and writes
`results.json`, `results.md` and `results.png` into DIR (default: benchmarks/results). `--quick` takes about a
minute on a 2-core machine; the full run a few minutes. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import nats

from benchmarks import lifecycle, report, scenarios, stream
from benchmarks.harness import FULL, QUICK, Bench, Sizes
from eventfn.broker.natsserver import find_binary
from eventfn.testing import NatsServer, Serve

SCENARIOS = ("1", "2", "3", "4", "5", "6")


async def _guarded(bench: Bench, name: str, step: Callable[[], Awaitable[None]]) -> None:
    """Run one scenario; a failure is recorded as a row and the run goes on to the next."""
    bench.say(f"{name} ...")
    try:
        await step()
    except Exception as exc:
        traceback.print_exc()
        bench.row(name, "failed", None, "", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


async def _main_service(bench: Bench, work: Path, only: set[str]) -> None:
    """Scenarios 1-4 share one `eventfn serve` hosting a function per variant."""
    handlers = work / "handlers"
    scenarios.write_functions(handlers)
    serve = Serve(handlers, bench.url, work / "data-main")
    await anyio.to_thread.run_sync(serve.start)
    assert serve.process is not None
    bench.serve_pid = serve.process.pid
    try:
        available = await scenarios.availability(bench)
        for isolation, reason in available.items():
            if reason:
                bench.say(f"{isolation} isolation not available: {reason.splitlines()[0]}")
        steps: list[tuple[str, str, Callable[[], Awaitable[None]]]] = [
            ("1", "1 drain", lambda: scenarios.drain(bench, available)),
            ("2", "2 latency", lambda: scenarios.latency(bench, handlers, available)),
            ("3", "3 sync invoke", lambda: scenarios.sync_invoke(bench, available)),
            ("4", "4 start & reload", lambda: lifecycle.cold_start(bench, handlers, available)),
        ]
        for key, name, step in steps:
            if key in only:
                await _guarded(bench, name, step)
    finally:
        bench.serve_pid = None
        await anyio.to_thread.run_sync(serve.stop)


async def _run(sizes: Sizes, work: Path, url: str, only: set[str], nats_pid: int | None) -> Bench:
    nc = await nats.connect(url, name="bench-harness")
    bench = Bench(sizes=sizes, work=work, url=url, nc=nc, nats_pid=nats_pid)
    try:
        if only & {"1", "2", "3", "4"}:
            await _guarded(bench, "1-4 main service", lambda: _main_service(bench, work, only))
        if "5" in only:
            await _guarded(bench, "5 memory", lambda: lifecycle.memory(bench))
        if "6" in only:
            lifecycle.skipped(bench)
    finally:
        await nc.close()
    return bench


def _revision() -> str:
    """The eventfn commit measured, marked when the work tree had changes beyond it."""
    root = Path(__file__).parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "eventfn")
    return f"{commit}{' + uncommitted changes to eventfn/' if dirty else ''}"


def _meta(sizes: Sizes, quick: bool, seconds: float, busy: float) -> dict[str, Any]:
    version = subprocess.run([find_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "mode": "quick" if quick else "full",
        "eventfn": _revision(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "python": ".".join(map(str, sys.version_info[:3])),
        "nats_server": version.removeprefix("nats-server: "),
        "nats_py": importlib.metadata.version("nats-py"),
        "faststream": importlib.metadata.version("faststream"),
        "events": sizes.drain,
        "event_bytes": len(stream.event(0)),
        "sizes": sizes.__dict__,
        "seconds": seconds,
        # Other work on the machine skews every figure (ratios less so): how busy it was just before the run.
        "busy_before": busy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute sample of every scenario")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run, e.g. 1,3 (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores)")
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",")}
    sizes = QUICK if args.quick else FULL
    busy = report.cpu_busy()
    if busy > 0.15:
        sys.stderr.write(f"warning: other work keeps {100 * busy:.0f}% of the CPUs busy; figures will be noisy\n")
    begin = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="eventfn-bench-"))
    with NatsServer(work / "nats") as server:
        nats_pid = server.process.pid if server.process is not None else None
        bench = anyio.run(_run, sizes, work, server.url, only, nats_pid)
    rows = [report.evaluate(row) for row in bench.rows]
    meta = _meta(sizes, args.quick, time.perf_counter() - begin, busy)
    report.write(rows, bench.bars, meta, bench.raw, args.out)
    print(report.markdown(rows, meta))
    print(f"written: {args.out}/results.json, results.md, results.png; work directory {work}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
