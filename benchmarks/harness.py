"""What every scenario shares: run sizes, the harness's NATS connection and child processes, the results
being collected, and small measuring helpers (percentiles, RSS from /proc)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
from nats.aio.client import Client

from benchmarks.child import Child
from benchmarks.report import Bar, Row, Target

T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does: the issue's sizes, or a ~1 minute sample of them."""

    drain: int
    latency_seconds: float
    sync_seconds: float
    repeats: int
    backlog: int
    rate: int = 2000
    clients: int = 8


FULL = Sizes(drain=100_000, latency_seconds=10, sync_seconds=5, repeats=5, backlog=500_000)
QUICK = Sizes(drain=20_000, latency_seconds=3, sync_seconds=2, repeats=3, backlog=100_000)


@dataclass
class Bench:
    """One run: where it works, how to reach its nats-server, and what it has measured so far."""

    sizes: Sizes
    work: Path
    url: str
    nc: Client
    rows: list[Row] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    #: The process ids CPU is read from: the main `eventfn serve` (while it runs) and the run's nats-server.
    serve_pid: int | None = None
    nats_pid: int | None = None

    def child(self, module: str, *args: str) -> Child:
        """A measured process, `python -m benchmarks.<module> ARGS --url <this run's server>`."""
        return Child(f"benchmarks.{module}", [*args, "--url", self.url], self.work / "logs" / f"{module}.log")

    def say(self, text: str) -> None:
        """Progress on stderr (stdout is left for the final table)."""
        sys.stderr.write(f"[{time.perf_counter() - self.started:6.1f} s] {text}\n")
        sys.stderr.flush()

    def row(
        self,
        scenario: str,
        what: str,
        figure: float | None,
        unit: str,
        *,
        ceiling: float | None = None,
        ceiling_what: str = "",
        target: Target | None = None,
        note: str = "",
    ) -> None:
        """Record one figure, and say it."""
        self.rows.append(
            Row(
                scenario=scenario,
                what=what,
                figure=figure,
                unit=unit,
                ceiling=ceiling,
                ceiling_what=ceiling_what,
                target=target,
                note=note,
            )
        )
        shown = "not available" if figure is None else f"{figure:,.2f} {unit}"
        versus = f" (ceiling {ceiling:,.2f}: {100 * figure / ceiling:.0f}%)" if figure is not None and ceiling else ""
        self.say(f"{scenario} · {what}: {shown}{versus}{f' — {note}' if note else ''}")

    def bar(self, panel: str, label: str, value: float | None, kind: str) -> None:
        self.bars.append(Bar(panel, label, value, kind))


async def with_child(
    child: Child, work: Callable[[], Awaitable[T]], *, timeout: float = 60.0
) -> tuple[T, dict[str, Any]]:
    """Start `child`; once it is ready, await `work()`; then stop the child. Returns both results."""
    await child.start()
    try:
        value = await work()
        return value, await child.finish(timeout=timeout)
    except BaseException:
        await child.kill()
        raise


async def child_result(child: Child, *, timeout: float) -> dict[str, Any]:
    """Start a child that ends by itself (a load generator) and return its result."""
    _, result = await with_child(child, _nothing, timeout=timeout)
    return result


async def _nothing() -> None:
    pass


def percentile(values: list[float], p: float) -> float:
    """The `p`-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid`, in MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc/*/stat."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: the parent pid follows the last ')'.
        found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    return [child for child, parent in _parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    """Every process descending from `pid` (eventfn's workers, and whatever starts them, for the serve process)."""
    by_parent: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        by_parent.setdefault(parent, []).append(child)
    found: list[int] = []
    stack = list(by_parent.get(pid, []))
    while stack:
        current = stack.pop()
        found.append(current)
        stack += by_parent.get(current, [])
    return found


async def wait_until(predicate: Any, *, timeout: float, interval: float = 0.02) -> None:
    """Poll `predicate()` (an awaitable factory) until it is true; a benchmark may poll the server."""
    with anyio.fail_after(timeout):
        while not await predicate():  # noqa: ASYNC110 - the server's state has no event to await
            await anyio.sleep(interval)
